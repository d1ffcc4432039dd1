"""`baton connect` keeps a session up: reconnect with backoff over a server
list, make before break on DRAIN (docs/protocol.md 6), REJECT 3 retry_after_ms,
TLS ticket resumption, local connections waiting while no session is up."""

import os
import signal
import socket
import threading
import time
import types

import pytest

from conftest import http_request, scaled, socket_echo, wait_until
from tcp_relay import TcpRelay

DRAIN_FAST = "drain:\n  grace_ms: 20000\n  spread_ms: 0\n  delay_ms: 5000\n"


def sessions(c):
    """The {"event":"session"} lines `baton connect` printed so far."""
    return [e for e in c.events() if e.get("event") == "session"]


def wait_session(c, n, timeout=10.0):
    """Session n's line. Session 1's line may sit in the fixture's stdout
    buffer until more output comes (it follows the ready line at once), so
    for n == 1 the ready line stands in for it."""
    if n == 1:
        r = c.ready
        return {"n": 1, "server": " ".join(c.args).split("--server ")[1].split()[0], "server_id": r["server_id"],
                "session_id": r["session_id"]}

    def got():
        s = sessions(c)
        return s[n - 1] if len(s) >= n else None

    return wait_until(got, timeout, interval=0.02, what="session %d of %s" % (n, c.args))


def addr_str(srv):
    return "%s:%d" % srv.addr


def post_drain(srv):
    status, _ = http_request(srv.ready["admin"], "POST", "/drain")
    assert status in (200, 202), status


def roundtrip(addr, data=b"ping", timeout=10.0):
    s = socket.create_connection(addr, timeout=scaled(timeout))
    try:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            b = s.recv(65536)
            if not b:
                break
            got += b
        return got
    finally:
        s.close()


# A stream the client opens while the server's DRAIN + Go Away are in flight
# is refused (docs/protocol.md 6); the client replays it on the new session
# (test_replay.py checks that path on its own).
def test_drain_make_before_break(server_factory, connect_factory):
    a = server_factory(extra=DRAIN_FAST, server_id="srv-a")
    b = server_factory(extra=DRAIN_FAST, server_id="srv-b")
    c = connect_factory(a, extra_args=["--server", addr_str(b)])
    first = wait_session(c, 1)
    assert first["server"] == addr_str(a) and first["server_id"] == "srv-a", first
    addr = c.forward_addr("echo")

    # an in-flight connection on session 1
    live = socket.create_connection(addr, timeout=scaled(10))
    socket_echo(live, b"before drain")

    # steady request/response load across the drain: zero failures allowed
    failures, done, stop = [], [0], threading.Event()

    def load():
        while not stop.is_set():
            try:
                got = roundtrip(addr, b"req-%d" % done[0])
                if got != b"req-%d" % done[0]:
                    failures.append(got)
                done[0] += 1
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.01)

    th = threading.Thread(target=load, daemon=True)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    post_drain(a)
    second = wait_session(c, 2, timeout=1.0)
    took = time.monotonic() - t0
    assert second["server"] == addr_str(b) and second["server_id"] == "srv-b", second
    assert took < scaled(1.0), took
    assert second["drains_followed"] == 1, second

    # the in-flight connection keeps working on the draining session
    for i in range(5):
        socket_echo(live, b"still alive %d" % i)
        time.sleep(0.05)
    time.sleep(0.3)
    stop.set()
    th.join(scaled(10))
    assert not failures, failures[:5]
    assert done[0] > 10, done[0]
    socket_echo(live, b"last words")
    live.close()
    # new connections go through the new session
    assert roundtrip(addr, b"after drain") == b"after drain"
    assert c.alive()
    log = c.stderr_text()
    assert "DRAIN from %s" % addr_str(a) in log, log
    assert "session 2 up to %s" % addr_str(b) in log, log


def test_kill_reconnects_to_other_server_and_waiting_conn(server_factory, connect_factory):
    lim = {"heartbeat_ms": 200, "idle_timeout_ms": 60000}
    a = server_factory(limits=lim, server_id="srv-a")
    b = server_factory(limits=lim, server_id="srv-b")
    # Protocol version 1's behaviour: the session ends with its connection
    # (with resume it would be kept and A tried again first:
    # test_resume_client.py).
    c = connect_factory(a, extra_args=["--server", addr_str(b), "--no-resume"])
    wait_session(c, 1)
    addr = c.forward_addr("echo")
    assert roundtrip(addr, b"one") == b"one"

    t0 = time.monotonic()
    a.kill()
    s2 = wait_session(c, 2, timeout=2.0)
    took = time.monotonic() - t0
    assert s2["server"] == addr_str(b), s2
    assert took < scaled(0.5), "reconnect took %.2f s" % took
    assert roundtrip(addr, b"two") == b"two"

    # No session at all for a while: B stopped (SIGSTOP), A dead. The client
    # notices B's silence by heartbeat, then keeps trying; a local connection
    # opened meanwhile waits and works once B is back.
    os.kill(b.pid, signal.SIGSTOP)
    try:
        # 2 unanswered pings at 200 ms: dead within ~0.6 s
        wait_until(lambda: "session 2 lost" in c.stderr_text(), 3.0, what="heartbeat death")
        waiting = socket.create_connection(addr, timeout=scaled(10))
        waiting.sendall(b"waited")
        time.sleep(0.7)
    finally:
        os.kill(b.pid, signal.SIGCONT)
    waiting.settimeout(scaled(10))
    got = b""
    while len(got) < 6:
        chunk = waiting.recv(100)
        assert chunk, "waiting connection closed"
        got += chunk
    assert got == b"waited"
    waiting.close()
    s3 = wait_session(c, 3)
    assert s3["server"] == addr_str(b), s3
    assert roundtrip(addr, b"three") == b"three"


def test_reject_overloaded_honours_retry_after(server_factory, connect_factory, tunnel_factory):
    srv = server_factory(limits={"max_tunnels": 1, "retry_after_ms": 1500})
    hog = tunnel_factory(srv)  # takes the only tunnel slot
    t0 = time.monotonic()
    c = connect_factory(srv, wait=False)
    time.sleep(0.7)
    assert c.alive()
    assert "REJECT 3" in c.stderr_text()
    hog.close()  # free the slot; the client must still wait ~1.5 s from the REJECT
    c.wait_ready(timeout=10)
    took = time.monotonic() - t0
    assert took >= 1.4, "reconnected after %.2f s, before retry_after_ms" % took
    assert took < scaled(4.0), took
    log = c.stderr_text()
    assert "REJECT 3" in log and "in 1500 ms" in log, log
    assert roundtrip(c.forward_addr("echo"), b"x") == b"x"


def test_reconnect_resumes_tls(server_factory, connect_factory, certs):
    """Every reconnect offers the latest ticket: sessions 2 and 3 (other
    servers with the same ticket key) are resumed."""
    srvs = [server_factory(ticket_key=str(certs.ticket_key), server_id="srv-%d" % i) for i in range(3)]
    c = connect_factory(srvs[0], extra_args=sum([["--server", addr_str(s)] for s in srvs[1:]], []))
    addr = c.forward_addr("echo")
    for n in (2, 3):
        srvs[n - 2].kill()
        s = wait_session(c, n, timeout=3.0)
        s1 = sessions(c)[0]
        assert s1["n"] == 1 and s1["resumed"] is False, s1
        assert s["server"] == addr_str(srvs[n - 1]) and s["resumed"] is True, s
        assert s["resumed_handshakes"] == n - 1, s
        assert roundtrip(addr, b"resumed %d" % n) == b"resumed %d" % n
    assert "resumed" in c.stderr_text()


def test_drain_follows_reconnect_hint(server_factory, connect_factory):
    """DRAIN with reconnect_hint: the replacement session goes to the hint,
    which is not in the client's --server list."""
    b = server_factory(server_id="srv-b")
    a = server_factory(server_id="srv-a",
                       extra=DRAIN_FAST + "  reconnect_hint: %s\n" % addr_str(b))
    c = connect_factory(a)
    addr = c.forward_addr("echo")
    assert roundtrip(addr, b"on a") == b"on a"
    post_drain(a)
    s2 = wait_session(c, 2, timeout=1.0)
    assert s2["server"] == addr_str(b) and s2["server_id"] == "srv-b", s2
    assert roundtrip(addr, b"on b") == b"on b"
    assert "moving to %s" % addr_str(b) in c.stderr_text()


@pytest.mark.parametrize("n", [1, 3])
def test_max_reconnects_gives_up_after_exactly_n_failed_tries(server, connect_factory, n):
    """--max-reconnects N (docs/client.md): after the session is lost the
    client dials at most N times; the Nth failed try in a row is the last.
    Every try lands on a relay that accepts the TCP connection and closes it
    (the TLS handshake fails), so each try is one counted accept."""
    relay = TcpRelay(server.addr, forward=1)  # the first connection reaches the server
    try:
        c = connect_factory(types.SimpleNamespace(addr=relay.addr), extra_args=["--max-reconnects", str(n)])
        assert roundtrip(c.forward_addr("echo"), b"via relay") == b"via relay"
        relay.cut()  # session 1 ends; from now on every try fails
        status = c.wait_exit(30)
    finally:
        relay.close()
    assert status == 1, "exit status %s" % status
    assert relay.relayed == 1
    assert relay.closed_at_once == n, "%d tries after the session was lost, --max-reconnects %d" % (
        relay.closed_at_once, n)
    err = c.stderr_text()
    assert "gave up after %d failed tries in a row" % n in err, err
