"""Session resume in `baton connect` (src/client/client.cc, docs/client.md):
the C++ client asks for resume, keeps its local connections through a break
of the tunnel's connection (reset, a black hole found by heartbeats, a cut
inside a TLS record, a hot restart of the server meeting the break), resumes,
and every byte of every stream arrives once, in order. A refused resume
gives a fresh session and resets the old streams locally; an expired window
too. The breaks come from a fault relay between client and server
(fault_relay.py); the server side of resume is checked independently by the
Python wire client (test_resume.py)."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import BIG_BYTES, TOKEN, Admin, BigSender, Via, assert_stream_over, scaled, wait_until
from test_client_status_http import get_status


@pytest.fixture
def relay(server, relay_to):
    return relay_to(server)


def echoed(s, msg):
    s.sendall(msg)
    assert recv_exactly(s, len(msg)) == msg


def relayed_client(server_factory, relay_to, connect_factory, extra="", limits=None):
    """A `baton serve` (config `extra`, `limits`), a fault relay in front of
    it, a `baton connect` through the relay and one local connection that
    has echoed once: (server, relay, admin, client, local socket)."""
    srv = server_factory(extra=extra, limits=limits)
    relay = relay_to(srv)
    c = connect_factory(Via(relay.addr))
    s = local(c)
    echoed(s, b"before")
    return srv, relay, Admin(srv), c, s


def events_of(client, kind):
    return [e for e in client.events() if e.get("event") == kind]


def wait_event(client, kind, count=1, timeout=10):
    return wait_until(lambda: len(events_of(client, kind)) >= count and events_of(client, kind), timeout,
                      what="%d %s event(s) from baton connect" % (count, kind))


def local(client, timeout=10):
    s = socket.create_connection(client.forward_addr("echo"), timeout=scaled(timeout))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(min(1 << 20, n - len(out)))
        if not b:
            raise AssertionError("EOF after %d of %d bytes" % (len(out), n))
        out += b
    return bytes(out)


def test_streams_survive_resets(server, relay, connect_factory):
    """Three resets between request/response rounds on two local
    connections: both stay open, every echo arrives once, the session (same
    session id) resumes three times, and nothing is reported lost."""
    a = Admin(server)
    c = connect_factory(Via(relay.addr), extra_args=["--status-listen", "127.0.0.1:0"])
    sid = c.ready["session_id"]
    conns = [local(c), local(c)]
    for i in range(12):
        if i in (3, 6, 9):
            k = len(events_of(c, "resumed"))
            relay.reset()
            wait_event(c, "resumed", k + 1)
        for s in conns:
            msg = os.urandom(30000 + 1000 * i)
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
    det, res = events_of(c, "detached"), events_of(c, "resumed")
    assert len(det) == 3 and len(res) == 3, (det, res)
    assert all(e["n"] == 1 for e in det + res)
    assert all(e["window_ms"] == 30000 for e in det)
    assert not events_of(c, "session_lost") and not events_of(c, "resume_failed")
    assert not [e for e in events_of(c, "session") if e["n"] > 1]  # no fresh session
    st = get_status(c.ready["status"])
    assert st["state"] == "connected" and st["session"] == 1
    assert st["resume"]["resumable"] is True and st["resume"]["window_ms"] == 30000
    assert st["counters"]["sessions_detached"] == 3 and st["counters"]["sessions_resumed"] == 3
    assert st["counters"]["resumes_refused"] == 0 and st["streams"] == 2
    m = a.metrics()
    assert m.counter("baton_session_resumes_total", result="resumed") == 3
    assert m.get("baton_sessions_detached") == 0
    assert m.get("baton_tunnels_active") == 1
    assert relay.connections == 4
    assert sid == c.ready["session_id"]
    for s in conns:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # the echo's FIN, once
        s.close()


@pytest.mark.slow
def test_big_stream_survives_20_cuts(server_factory, upstream_factory, connect_factory, relay_to):
    """BATON_TEST_BIG_BYTES (1 GiB; 64 MiB in sanitized runs) each way
    through one stream while the relay resets the connection 20 times, at
    points spread over the transfer (wherever the bytes are then: inside
    records, inside frames, with windows full): sha256 intact both ways."""
    echo = upstream_factory("echo")
    srv = server_factory(routes={"echo": echo})
    relay = relay_to(srv)
    c = connect_factory(Via(relay.addr))
    total = BIG_BYTES
    s = local(c, timeout=120)
    s.settimeout(scaled(120))
    sha_in = hashlib.sha256()
    t0 = time.monotonic()
    snd = BigSender(s, total).start()
    cuts, n, next_cut = 0, 0, total // 21
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        sha_in.update(b)
        n += len(b)
        if cuts < 20 and n >= next_cut:
            # One cut at a time: the next waits for this one's resume.
            relay.reset()
            cuts += 1
            next_cut += total // 21
            wait_event(c, "resumed", cuts, timeout=30)
    snd.join(scaled(60))
    elapsed = time.monotonic() - t0
    s.close()
    snd.check_echoed(echo, n, sha_in)
    assert cuts == 20 and len(events_of(c, "resumed")) == 20
    assert not events_of(c, "session_lost") and not events_of(c, "resume_failed")
    replayed = sum(e["replayed_bytes"] for e in events_of(c, "resumed"))
    pauses = sorted(e["paused_ms"] for e in events_of(c, "resumed"))
    print("[resume_big] %d bytes each way through 20 resets in %.1f s (%.0f MiB/s); client resent %d bytes; "
          "pause p50 %d ms, max %d ms" % (total, elapsed, total / elapsed / (1 << 20), replayed,
                                          pauses[len(pauses) // 2], pauses[-1]))


def test_black_hole_found_by_heartbeats(server_factory, connect_factory, relay_to):
    """The path goes silent (nothing is reset): the client finds it by two
    unanswered pings, keeps the session and resumes it once the path is
    back; the server still thinks the old connection alive and drops it."""
    srv, relay, a, c, s = relayed_client(server_factory, relay_to, connect_factory, limits={"heartbeat_ms": 300})
    relay.hold("up")
    relay.hold("down")
    s.sendall(b"during the black hole")  # waits in the client (kept), then goes on the resume
    det = wait_event(c, "detached")[0]
    assert "heartbeat lost" in det["reason"], det
    relay.reset()  # the path comes back (new connections get through)
    wait_event(c, "resumed")
    assert recv_exactly(s, 21) == b"during the black hole"
    m = a.metrics()
    assert m.counter("baton_session_resumes_total", result="resumed") == 1
    assert not events_of(c, "session_lost")


def test_refused_resume_gives_a_fresh_session(server_factory, connect_factory, relay_to):
    """The server keeps no detached session (resume.max_detached 0): the
    resume is refused, the old stream's local connection is reset, a fresh
    session (n 2) takes new connections."""
    srv, relay, a, c, s = relayed_client(server_factory, relay_to, connect_factory, "resume:\n  max_detached: 0\n")
    relay.reset()
    fail = wait_event(c, "resume_failed")[0]
    assert "resume refused" in fail["reason"] and "unknown_session" in fail["reason"], fail
    sess = wait_event(c, "session", 2)
    assert sess[-1]["n"] == 2 and sess[-1]["session_id"] != c.ready["session_id"]
    assert_stream_over(s)
    s2 = local(c)
    s2.sendall(b"fresh")
    assert recv_exactly(s2, 5) == b"fresh"
    m = a.metrics()
    assert m.counter("baton_session_breaks_total", result="max_detached") == 1
    assert m.counter("baton_session_resumes_total", result="unknown_session") == 1


def test_window_ends_without_server(server_factory, connect_factory, relay_to):
    """The server cannot be reached again (the relay is gone): after the
    server's resume window (1 s) the client resets the kept session's local
    connections and says so; it keeps dialing."""
    srv = server_factory(extra="resume:\n  window_ms: 1000\n")
    relay = relay_to(srv)
    c = connect_factory(Via(relay.addr), extra_args=["--status-listen", "127.0.0.1:0"])
    s = local(c)
    echoed(s, b"ping")
    relay.close()  # resets the connection and refuses new ones
    wait_event(c, "detached")
    st = get_status(c.ready["status"])
    assert st["state"] == "detached" and st["streams"] == 1, st
    fail = wait_event(c, "resume_failed")[0]
    assert "not resumed within 1000 ms" in fail["reason"], fail
    assert_stream_over(s)
    st = get_status(c.ready["status"])
    assert st["state"] == "connecting" and st["counters"]["resumes_expired"] == 1, st


def test_no_resume_flag(server, relay, connect_factory):
    """--no-resume: the session is not offered resume (HELLO does not ask);
    a reset ends it and its streams, as in protocol version 1."""
    a = Admin(server)
    c = connect_factory(Via(relay.addr), extra_args=["--no-resume"])
    s = local(c)
    echoed(s, b"ping")
    relay.reset()
    wait_event(c, "session_lost")
    wait_event(c, "session", 2)
    assert not events_of(c, "detached")
    assert_stream_over(s)
    assert a.metrics().counter("baton_session_breaks_total", result="detached") == 0


def test_break_during_hot_restart(server_factory, connect_factory, relay_to):
    """The connection breaks while the server hands its tunnels to a new
    process: wherever the session is then (attached in the old process,
    detached in either), the client resumes it and the stream goes on."""
    srv = server_factory()
    relay = relay_to(srv)
    c = connect_factory(Via(relay.addr))
    s = local(c)
    echoed(s, b"before")
    stop = threading.Event()
    sent = hashlib.sha256()
    got = hashlib.sha256()
    counts = {"sent": 0, "got": 0}

    def pump():
        i = 0
        while not stop.is_set():
            msg = hashlib.sha256(i.to_bytes(8, "big")).digest() * 64
            sent.update(msg)
            s.sendall(msg)
            counts["sent"] += len(msg)
            b = recv_exactly(s, len(msg))
            got.update(b)
            counts["got"] += len(b)
            i += 1

    th = threading.Thread(target=pump)
    th.start()
    new = server_factory(successor_of=srv, wait=False)
    relay.reset()
    new.wait_ready()
    assert new.ready["takeover"] is True
    assert srv.wait_exit(10) == 0
    k = len(events_of(c, "resumed"))
    wait_event(c, "resumed", max(k, 1))
    relay.reset()  # once more, now that the new process holds it
    wait_event(c, "resumed", k + 1)
    time.sleep(0.2)  # traffic goes on for a moment (the measure, not synchronisation)
    stop.set()
    th.join(scaled(20))
    assert not th.is_alive()
    assert counts["got"] == counts["sent"] and got.hexdigest() == sent.hexdigest()
    assert not events_of(c, "session_lost") and not events_of(c, "resume_failed")
    a = Admin(new)
    assert a.metrics().get("baton_tunnels_active") == 1


def test_hundred_tunnels_resume_across_cuts(server_factory, certs, relay_to, spawn_tool):
    """100 tunnels (the embeddable client, bench/tunnel_load) x 5 streams
    doing request/response with byte checks, through a relay that resets
    every connection 3 times: every tunnel resumes each time (300 resumes),
    no stream error, no session lost, no resume failed, and traffic flows in
    every window between the cuts."""
    from test_hot_restart import _json_lines, _quit_load, _tool
    up = spawn_tool([_tool("bench_upstream")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    echo = _json_lines(up, lambda o: o.get("event") == "ready", 10)[-1]["echo"]
    srv = server_factory(routes={"echo": echo}, limits={"max_tunnels": 1000})
    relay = relay_to(srv)
    a = Admin(srv)
    env = dict(os.environ, BATON_TOKEN=TOKEN)
    load = spawn_tool([_tool("tunnel_load"), "--server", "%s:%d" % relay.addr, "--ca", str(certs.ca_crt),
                       "--server-name", "localhost", "--route", "echo", "--tunnels", "100", "--streams", "5",
                       "--timeout-ms", str(int(scaled(60) * 1000))],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    ready = _json_lines(load, lambda o: "event" in o, 90)[-1]
    assert ready.get("event") == "ready", ready
    windows = []
    for i in range(3):
        load.stdin.write(b"mark cut%d\n" % i)
        load.stdin.flush()
        windows += _json_lines(load, lambda o: "window" in o, 30)
        relay.reset()
        wait_until(lambda: a.metrics().counter("baton_session_resumes_total", result="resumed") >= 100 * (i + 1),
                   30, what="all 100 tunnels resumed after cut %d" % i)
        # request/response flows again on the resumed sessions before the next cut
        time.sleep(0.3)  # a window of traffic (the measure, not synchronisation)
    done = _quit_load(load, windows)
    assert done["sessions_lost_total"] == 0 and done["resume_failed_total"] == 0, done["error_samples"]
    assert done["detached_total"] == 300 and done["resumed_total"] == 300, done
    for w in windows[1:-1]:
        assert w["rtts"] > 0, "\n".join(json.dumps(x) for x in windows)
    m = a.metrics()
    assert m.counter("baton_session_resumes_total", result="resumed") == 300
    assert m.get("baton_sessions_detached") == 0
    print("[resume_100] 300 resumes of 100 tunnels x 5 streams: pause p50 %d ms, p99 %d ms, max %d ms; "
          "%d round trips, 0 errors" % (done["resume_pause_p50_ms"], done["resume_pause_p99_ms"],
                                        done["resume_pause_max_ms"], done["rtts_total"]))


@pytest.mark.parametrize("direction", ["up", "down"])
def test_cut_inside_a_tls_record(server, relay, connect_factory, direction):
    """The connection is reset a few thousand bytes into a 64 KiB echo, in
    one direction: the cut falls inside a TLS record (records carry up to 16
    KiB) and inside a frame. The record's start is lost with the connection;
    the resume sends it again whole, and the echo arrives intact, once."""
    c = connect_factory(Via(relay.addr))
    s = local(c)
    echoed(s, b"warm")
    for i, n in enumerate((7001, 12345, 3)):
        msg = os.urandom(65536)
        relay.cut_after(direction, n)
        s.sendall(msg)
        assert recv_exactly(s, len(msg)) == msg
        assert len(wait_event(c, "resumed", i + 1)) == i + 1
    assert relay.resets == 3
    assert not events_of(c, "session_lost") and not events_of(c, "resume_failed")


def test_sigterm_while_detached(server_factory, connect_factory, relay_to):
    """The pod gets SIGTERM while baton connect's session is detached (the
    path is down): the server drains, the path comes back within
    drain.delay_ms, the session resumes, DRAIN (queued while detached)
    arrives and the client starts moving; the local connection's stream
    finishes on the resumed session, bytes intact; the server exits 0 once
    it is closed."""
    srv, relay, a, c, s = relayed_client(server_factory, relay_to, connect_factory,
                                         "drain:\n  delay_ms: 3000\n  spread_ms: 0\n  grace_ms: 20000\n")
    relay.down()
    wait_event(c, "detached")
    wait_until(lambda: a.metrics().get("baton_sessions_detached") == 1, 10, what="the server kept the session")
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "drain (SIGTERM)" in srv.stderr_text(), 10, what="the drain to start")
    s.sendall(b"sent while detached")  # waits in the client, goes on the resume
    relay.up()
    wait_event(c, "resumed")
    drain = wait_event(c, "drain")[0]
    assert drain["n"] == 1, drain
    assert recv_exactly(s, 19) == b"sent while detached"
    echoed(s, b"after the drain began")
    assert srv.proc.poll() is None, "exited with a stream open"
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b""
    s.close()
    assert srv.wait_exit(scaled(10)) == 0
    assert not events_of(c, "resume_failed")
