"""The lifecycle listener (docs/operations.md "Lifecycle hook"): a kubelet
preStop httpGet on the application container calls GET /drain there with an
X-Baton-Token header; the drain starts and the answer comes only when it is
over, so the application gets TERM after its tunnels have moved."""

import hashlib
import http.client
import subprocess
import threading
import time

import baton_wire as bw
from conftest import scaled

TOKEN = "lifecycle-secret-1f9c"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
LIFECYCLE = ("drain:\n  delay_ms: 0\n  spread_ms: 0\n  grace_ms: %d\n"
             "lifecycle:\n  listen: 127.0.0.1:0\n  token_sha256: " + DIGEST + "\n")


def request(addr, method="GET", path="/drain", headers=None, timeout=10.0):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=scaled(timeout))
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def metric(srv, name):
    _, text = request(srv.ready["admin"], path="/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_lifecycle_refuses_without_the_token(server_factory):
    srv = server_factory(extra=LIFECYCLE % 20000)
    lc = srv.ready["lifecycle"]
    assert lc.startswith("127.0.0.1:") and lc != srv.ready["admin"]
    assert request(lc)[0] == 401
    assert request(lc, headers={"X-Baton-Token": "wrong"})[0] == 401
    assert request(lc, headers={"X-Baton-Token": TOKEN.upper()})[0] == 401
    assert request(lc, method="POST", headers={"X-Baton-Token": TOKEN})[0] == 405
    assert request(lc, path="/stats", headers={"X-Baton-Token": TOKEN})[0] == 404
    # nothing of that started a drain
    status, body = request(srv.ready["admin"], path="/readyz")
    assert status == 200, body
    assert metric(srv, 'baton_lifecycle_requests_total{result="unauthorized"}') == 3
    assert "X-Baton-Token" in srv.stderr_text() and TOKEN not in srv.stderr_text()


def test_lifecycle_get_drains_and_answers_when_done(server_factory, tunnel_factory):
    srv = server_factory(extra=LIFECYCLE % 30000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    answer = {}

    def hook():
        answer["result"] = request(srv.ready["lifecycle"], headers={"X-Baton-Token": TOKEN}, timeout=60)
        answer["at"] = time.monotonic()

    th = threading.Thread(target=hook, daemon=True)
    th.start()
    msg = t.next_control(scaled(10))
    assert msg.type == bw.MSG_DRAIN, msg
    status, _ = request(srv.ready["admin"], path="/readyz")
    assert status == 503
    # the open stream goes on, and the hook has not answered while it is open
    s.send(b"still here")
    assert s.recv_exactly(10, timeout=scaled(10)) == b"still here"
    assert "result" not in answer, answer
    t0 = time.monotonic()
    s.close_write()
    s.recv_all(scaled(10))
    th.join(scaled(20))
    assert answer["result"][0] == 200, answer
    assert '"drained":true' in answer["result"][1], answer
    assert answer["at"] - t0 < scaled(2), "the hook answered %.2f s after the last stream ended" % (answer["at"] - t0)
    assert srv.wait_exit(scaled(10)) == 0


def test_lifecycle_config_needs_a_token(baton_bin, tmp_path, certs):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("tls:\n  cert: %s\n  key: %s\nauth:\n  tokens:\n    - name: a\n      sha256: %s\n"
                   "routes:\n  echo: 127.0.0.1:9\nlifecycle:\n  listen: 0.0.0.0:9902\n"
                   % (certs.server_crt, certs.server_key, DIGEST))
    r = subprocess.run([baton_bin, "check", "-c", str(cfg)], capture_output=True, text=True, timeout=scaled(20))
    assert r.returncode == 2, r
    assert "%s:11:" % cfg in r.stderr and "lifecycle.token_sha256" in r.stderr, r.stderr
