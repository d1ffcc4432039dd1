"""Security properties from docs/security.md that a test can see.

- No secret in any log line at any level: a server and a client at `trace`,
  in both log formats, carry traffic, refuse a wrong token, hot restart
  (the handoff carries TLS keys) and drain; no token, wrong token, ticket key
  or private key material appears in anything they printed, nor in the admin
  API's answers; the handoff wrote no file.
- The admin API is not reachable from another host by default: a baton with
  no `admin:` section, in a network namespace of its own, answers /healthz on
  127.0.0.1 inside it and refuses the namespace's address from outside,
  while its tunnel port on 0.0.0.0 is reachable there.
- Core dumps are off (they would write keys to disk).
(The handoff socket refusing another uid: test_hot_restart.py; constant-time
token comparison: tests/unit/util_test.cc.)
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import subprocess
from pathlib import Path

import pytest

import baton_wire as bw
from conftest import BATON_BIN, TOKEN, TOKEN_SHA256, http_request, scaled, socket_echo

WRONG_TOKEN = "wrong-token-must-not-be-logged-5d1c"


def secret_patterns(certs) -> dict:
    """name -> strings that would betray the secret if printed."""
    pats = {"token": [TOKEN], "wrong token": [WRONG_TOKEN], "token digest": [TOKEN_SHA256],
            "token hex": [TOKEN.encode().hex()], "token base64": [base64.b64encode(TOKEN.encode()).decode()]}
    ticket = [l.strip() for l in certs.ticket_key.read_text().splitlines() if l.strip()]
    pats["ticket key"] = ticket + [base64.b64encode(bytes.fromhex(t)).decode() for t in ticket if _is_hex(t)]
    for name, path in (("server key", certs.server_key), ("client key", certs.client_key), ("CA key", certs.ca_key)):
        body = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("-----")]
        # Any 24 characters of the base64 body would do; each whole line is enough to catch a dump.
        pats[name] = [l for l in body if len(l) >= 24]
    return pats


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return True
    except ValueError:
        return False


def test_no_secret_in_any_log_line(server_factory, connect_factory, tunnel_factory, certs, client_ctx, tmp_path,
                                   short_tmp):
    trace = ["--log-level", "trace"]
    srv = server_factory(ticket_key=str(certs.ticket_key), extra_args=trace)
    c = connect_factory(srv, extra_args=trace)
    s = socket.create_connection(c.forward_addr("echo"), timeout=scaled(10))
    socket_echo(s, b"traffic before the restart")
    with pytest.raises(bw.Rejected):
        bw.Tunnel.connect(srv.addr, token=WRONG_TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    # A hot restart: the handoff carries every tunnel's TLS keys and unsent bytes.
    new = server_factory(successor_of=srv, extra_args=trace + ["--log-format", "json"])
    assert new.ready["takeover"] is True and new.ready["tunnels"] >= 1, new.ready
    srv.wait_exit(10)
    socket_echo(s, b"traffic after the restart")
    s.close()
    answers = []
    for path in ("/stats", "/metrics", "/drain", "/healthz", "/readyz"):
        answers.append(http_request(new.ready["admin"], "GET", path)[1].decode("utf-8", "replace"))
    status, body = http_request(new.ready["admin"], "POST", "/drain")
    assert status in (200, 202), (status, body)
    answers.append(body.decode())
    new.wait_exit(60)
    c.stop()

    texts = {"admin answers": "\n".join(answers)}
    for p in (srv, new, c):
        texts["%s stderr" % p.stderr_path.name] = p.stderr_text(tail=10 ** 9)
        try:
            texts["%s stdout" % p.stderr_path.name] = p.stdout_extra_path.read_text()
        except OSError:
            pass
    assert sum(len(t) for t in texts.values()) > 5000, "suspiciously little was logged at trace"
    assert "trace" in texts["%s stderr" % new.stderr_path.name] or "debug" in texts["%s stderr" % new.stderr_path.name]
    leaks = []
    pats_by_name = secret_patterns(certs)
    # The patterns are real: each is found in the file it comes from.
    for name, path in (("ticket key", certs.ticket_key), ("server key", certs.server_key)):
        assert all(p in path.read_text() for p in pats_by_name[name][:1]), name
    for name, pats in pats_by_name.items():
        assert pats, name
        for where, text in texts.items():
            for pat in pats:
                if pat and pat in text:
                    leaks.append("%s found in %s" % (name, where))
    assert not leaks, leaks

    # The handoff wrote nothing to disk: the only files are the test's own.
    expected = {"server0.yaml", "server0.stderr", "server0.stdout", "server1.stderr", "server1.stdout",
                "connect0.stderr", "connect0.stdout"}
    for d in (tmp_path, short_tmp):
        for f in Path(d).rglob("*"):
            if f.is_file() and not f.is_socket() and f.name not in expected:
                raise AssertionError("unexpected file %s after a hot restart" % f)


def test_core_dumps_are_off(server):
    with open("/proc/%d/limits" % server.pid) as f:
        line = next(l for l in f if l.startswith("Max core file size"))
    assert line.split()[4] == "0", line  # soft limit


@pytest.mark.root_only("a network namespace")
def test_admin_api_not_reachable_from_another_host_by_default(certs, tmp_path, short_tmp):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "rollout"))
    import k8s_sim

    k8s_sim.sweep_stale()
    net = k8s_sim.Network()
    proc = None
    try:
        net.up()
        ns, ip = net.add_pod("sec")
        cfg = tmp_path / "baton.yaml"
        # No admin section: the default applies. The tunnel listens on every address.
        cfg.write_text("listen: 0.0.0.0:7443\ntls:\n  cert: %s\n  key: %s\nauth:\n  tokens:\n"
                       "    - name: t\n      sha256: %s\nroutes:\n  echo: 127.0.0.1:9\nhandoff:\n  socket: %s\n" % (
                           certs.server_crt, certs.server_key, TOKEN_SHA256, short_tmp / "sec.sock"))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, BATON_BIN, "serve", "-c", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        from conftest import read_json_line
        ready, _ = read_json_line(proc, scaled(10))
        assert ready["admin"].startswith("127.0.0.1:"), ready
        admin_port = int(ready["admin"].rsplit(":", 1)[1])
        # Inside the namespace (same host): answers.
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            "import http.client as h; c = h.HTTPConnection('127.0.0.1', %d, timeout=5); "
                            "c.request('GET', '/healthz'); print(c.getresponse().status)" % admin_port],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "200", (r.stdout, r.stderr)
        # From another host (the root namespace, through the veth): the tunnel
        # port is reachable, the admin port is not.
        socket.create_connection((ip, 7443), timeout=scaled(5)).close()
        with pytest.raises(ConnectionRefusedError):
            conn = http.client.HTTPConnection(ip, admin_port, timeout=scaled(5))
            conn.request("GET", "/healthz")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        left = net.down()
        assert not left, left
