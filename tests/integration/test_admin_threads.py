"""The admin HTTP threads and the event loop together: every endpoint asked
over and over from several threads while tunnels carry traffic, while the
server drains, hands over to a successor (hot restart) and stops.

The assertions here are modest (answers are 200 or 503, nothing hangs, exit
status 0); the point is the ThreadSanitizer run of scripts/test.sh, where
conftest's teardown fails the test on any "WARNING: ThreadSanitizer" report.
"""

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request

from conftest import SANITIZED, echo_roundtrip, scaled

PATHS = ("/stats", "/metrics", "/healthz", "/readyz", "/drain")


class Hammer:
    """Threads that GET every admin endpoint in a loop until stopped."""

    def __init__(self, addr: str, threads: int = 3):
        self.addr = addr
        self.stop_event = threading.Event()
        self.answers = {p: 0 for p in PATHS}
        self.bad = []  # unexpected statuses
        self.unreachable = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self):
        while not self.stop_event.is_set():
            for p in PATHS:
                try:
                    with urllib.request.urlopen("http://%s%s" % (self.addr, p), timeout=scaled(5)) as r:
                        body, status = r.read(), r.status
                except urllib.error.HTTPError as e:
                    body, status = e.read(), e.code
                except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError):
                    with self.lock:
                        self.unreachable += 1  # the process is gone (restart, stop)
                    time.sleep(0.01)
                    continue
                with self.lock:
                    if status in (200, 503):
                        self.answers[p] += 1
                    else:
                        self.bad.append((p, status, body[:200]))

    def wait_answers(self, n: int = 2, timeout: float = 20):
        deadline = time.monotonic() + scaled(timeout)
        while min(self.answers.values()) < n:
            assert time.monotonic() < deadline, "admin answers so far: %s" % self.answers
            time.sleep(0.02)

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(scaled(15))
            assert not t.is_alive(), "an admin request hung"
        assert not self.bad, self.bad


def post_drain(addr: str) -> dict:
    req = urllib.request.Request("http://%s/drain" % addr, method="POST")
    with urllib.request.urlopen(req, timeout=scaled(5)) as r:
        return json.loads(r.read())


def test_admin_under_load_then_drain_then_sigterm(server_factory, tunnel_factory):
    srv = server_factory()
    tunnels = [tunnel_factory(srv) for _ in range(2)]
    h = Hammer(srv.ready["admin"])
    for i in range(20):
        data = b"%d" % i * 500
        assert echo_roundtrip(tunnels[i % 2], data) == data
    h.wait_answers()
    assert post_drain(srv.ready["admin"])["draining"] is True
    time.sleep(0.2)
    # SIGTERM while requests are in flight: the admin stops, the loop ends
    assert srv.stop(signal.SIGTERM) == 0
    h.stop()
    assert sum(h.answers.values()) > len(PATHS)


def test_admin_under_load_during_hot_restart(server_factory, tunnel_factory):
    old = server_factory()
    t = tunnel_factory(old)
    assert echo_roundtrip(t, b"before") == b"before"
    h_old = Hammer(old.ready["admin"])
    h_old.wait_answers()
    new = server_factory(successor_of=old)
    assert new.ready["takeover"] is True
    h_new = Hammer(new.ready["admin"])
    assert old.wait_exit(scaled(10)) == 0, old.stderr_text(4000)
    h_old.stop()
    assert echo_roundtrip(t, b"after") == b"after"  # the tunnel moved
    h_new.wait_answers()
    assert new.stop(signal.SIGTERM) == 0
    h_new.stop()


def test_admin_racing_the_end_of_an_idle_drain_many_runs(server_factory):
    """The drain that ends inside POST /drain (no tunnels, delay 0) while
    every endpoint is asked from several threads: the process exits 0 each
    time, no request hangs, and (ASan/TSan runs) nothing touches the admin or
    the server after they are gone."""
    for i in range(8 if SANITIZED else 20):
        srv = server_factory(extra="drain:\n  delay_ms: 0\n  spread_ms: 0\n  grace_ms: 5000\n")
        h = Hammer(srv.ready["admin"])
        h.wait_answers(1)
        try:
            post_drain(srv.ready["admin"])
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError):
            pass  # the answer may lose the race with the exit; the exit status tells
        assert srv.wait_exit(20) == 0, (i, srv.stderr_text(4000))
        h.stop()


def test_admin_racing_handovers_many_runs(server_factory, tunnel_factory):
    """Five hot restarts in a row, each process's admin asked from several
    threads throughout: every old process exits 0 after its handover."""
    srv = server_factory()
    t = tunnel_factory(srv)
    hammers = [Hammer(srv.ready["admin"])]
    hammers[0].wait_answers(1)
    for i in range(5):
        new = server_factory(successor_of=srv)
        assert new.ready["takeover"] is True
        hammers.append(Hammer(new.ready["admin"]))
        assert srv.wait_exit(scaled(10)) == 0, (i, srv.stderr_text(4000))
        assert echo_roundtrip(t, b"%d" % i) == b"%d" % i
        srv = new
    hammers[-1].wait_answers(1)
    assert srv.stop(signal.SIGTERM) == 0
    for h in hammers:
        h.stop()
