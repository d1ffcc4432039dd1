"""Session resume against `baton serve` (docs/protocol.md section 9), driven
by the Python wire client (baton_wire.py, written from the protocol text):
a session survives its connection breaking — reset, FIN, or silently
abandoned — and every byte of its streams arrives once, in order; the
credential, the offsets and the window are enforced; a client that does not
ask never sees any of it."""

import hashlib
import os
import struct
import threading

import pytest

import baton_wire as bw
from conftest import TOKEN, Admin, scaled, wait_until
from fault_relay import FaultRelay

OTHER_TOKEN = "another-fleet-token-2b9c"


def resume_config(**kw) -> str:
    lines = ["resume:"] + ["  %s: %s" % (k, v) for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def token_digest(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()


def detached(a: Admin) -> float:
    return a.metrics().get("baton_sessions_detached")


def transfer(stream: bw.Stream, chunks, cut_at=(), on_cut=None):
    """Sends the chunks through an echo stream, reading each one's echo
    before the next; before the chunks whose index is in cut_at, on_cut()
    breaks and resumes the session. Returns the bytes echoed back."""
    got = bytearray()
    for i, c in enumerate(chunks):
        if i in cut_at:
            on_cut(i)
        stream.send(c, timeout=scaled(10))
        got += stream.recv_exactly(len(c), timeout=scaled(10))
    return bytes(got)


def test_plain_client_is_never_offered_resume(server, tunnel_factory):
    t = tunnel_factory(server)
    assert t.welcome.get(bw.TAG_RESUME_SECRET) is None
    assert t.welcome.get(bw.TAG_RESUME_WINDOW_MS) is None
    assert t.resume_secret is None and not t.resume_keeping
    s = t.open_stream("echo")
    s.send(b"x" * 100000)
    assert s.recv_exactly(100000) == b"x" * 100000
    # No RECEIVED comes to a client that did not ask (it would be an unknown message to it).
    assert t.receipts == 0
    assert all(m.type != bw.MSG_RECEIVED for m in list(t.control_msgs.queue))


def test_resumable_session_is_offered(server, tunnel_factory):
    t = tunnel_factory(server, resume=True)
    secret = t.welcome.get(bw.TAG_RESUME_SECRET)
    assert secret is not None and len(secret) == 32
    assert t.welcome.u32(bw.TAG_RESUME_WINDOW_MS) == 30000
    assert t.welcome.get(bw.TAG_RESUME_ADDRESS) is None  # resume.advertise not set
    other = tunnel_factory(server, resume=True)
    assert other.resume_secret != secret


def test_turned_off_it_is_not_offered(server_factory, tunnel_factory):
    srv = server_factory(extra=resume_config(enabled="false"))
    t = tunnel_factory(srv, resume=True)
    assert t.welcome.get(bw.TAG_RESUME_SECRET) is None


@pytest.mark.parametrize("how", ["reset", "fin", "abandoned"])
def test_streams_survive_a_broken_connection(server, tunnel_factory, client_ctx, how):
    a = Admin(server)
    t = tunnel_factory(server, resume=True)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    chunks = [os.urandom(40000 + 997 * i) for i in range(24)]

    def cut(i):
        if how == "abandoned":
            t.abandon()  # the server sees nothing: it drops that connection when the resume comes
        else:
            t.cut(reset=how == "reset")
            wait_until(lambda: detached(a) == 1, 10, what="the session detached")
        secret = t.resume_secret
        m = t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        assert m.type == bw.MSG_RESUMED
        assert t.resume_secret != secret and len(t.resume_secret) == 32  # rotated: the old one is spent
        assert m.u32(bw.TAG_RESUME_WINDOW_MS) == 30000

    got = transfer(s, chunks, cut_at=(3, 9, 17), on_cut=cut)
    assert got == b"".join(chunks)
    s.close_write()
    assert s.recv_all(scaled(10)) == b""  # FIN after every byte, once
    m = a.metrics()
    assert m.counter("baton_session_resumes_total", result="resumed") == 3
    if how != "abandoned":
        assert m.counter("baton_session_breaks_total", result="detached") == 3
    assert m.get("baton_sessions_detached") == 0
    assert m.get("baton_streams_active") == 0
    assert t.connections == 4
    assert t.receipts > 0  # the server proved receipt as the bytes came


@pytest.fixture
def relay(server):
    r = FaultRelay(server.addr)
    r.server = server
    yield r
    r.close()


def test_bytes_in_flight_both_ways_are_sent_again(server, tunnel_factory, client_ctx, relay):
    """The echo of 200 KB is held in the network (the relay) when both sides
    are reset: the server sends it again; the client's bytes held the other
    way are sent again by the client."""
    a = Admin(server)
    t = bw.Tunnel.connect(relay.addr, token=TOKEN.encode(), ctx=client_ctx, resume=True, timeout=scaled(10))
    try:
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        relay.hold("down")
        data = os.urandom(200000)
        s.send(data)
        relay.wait(lambda: relay.held["down"] >= len(data), scaled(10), "the echo held in the network")
        relay.hold("up")
        more = os.urandom(30000)
        s.send(more)  # lost on its way up
        relay.wait(lambda: relay.held["up"] >= len(more), scaled(10), "the client's bytes held")
        relay.reset()
        wait_until(lambda: detached(a) == 1, 10, what="the session detached")
        t.resume(relay.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        assert s.recv_exactly(len(data) + len(more), timeout=scaled(10)) == data + more
        s.close_write()
        assert s.recv_all(scaled(10)) == b""
        assert relay.dropped["down"] >= len(data) and relay.dropped["up"] >= len(more)
        assert a.metrics().counter("baton_resume_replayed_bytes_total") >= len(data)
        # Receipts came every 64 KiB; the last one proves everything: the
        # server lets go of all it kept.
        t.send_receipt()
        # (What the server sent since, its own RECEIVED at most, is all it may still keep.)
        wait_until(lambda: a.metrics().get("baton_resume_kept_bytes") <= 64, 10, what="the kept bytes released")
    finally:
        t.close()


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_cut_inside_a_tls_record(server, client_ctx, relay, direction):
    """Both sides reset after a byte count that falls inside a TLS record
    (and a yamux frame): the partial record is lost, the resume restores it."""
    a = Admin(server)
    t = bw.Tunnel.connect(relay.addr, token=TOKEN.encode(), ctx=client_ctx, resume=True, timeout=scaled(10))
    try:
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        data = os.urandom(300000)
        # 16 KiB records of ~16,4xx bytes: 5,000 bytes in is inside the first one.
        relay.cut_after(direction, 5000)
        # Writes that meet the cut are kept by the session (baton_wire: the
        # sender does not see the break), as a resumable client's are.
        sender = threading.Thread(target=lambda: s.send(data[:100000], timeout=scaled(10)), daemon=True)
        sender.start()
        relay.wait(lambda: relay.resets == 1, scaled(10), "the cut")
        sender.join(scaled(10))
        assert not sender.is_alive()
        wait_until(lambda: detached(a) == 1, 10, what="the session detached")
        t.resume(relay.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        s.send(data[100000:])
        assert s.recv_exactly(len(data), timeout=scaled(10)) == data
    finally:
        t.close()


def broken_session(server, tunnel_factory, a):
    """A resumable session with one echoed stream, its connection reset and the session detached."""
    t = tunnel_factory(server, resume=True)
    s = t.open_stream("echo")
    s.send(b"before the cut")
    assert s.recv_exactly(14, timeout=scaled(10)) == b"before the cut"
    t.cut()
    wait_until(lambda: detached(a) == 1, 10, what="the session detached")
    return t, s


def test_a_wrong_secret_is_refused_and_spends_nothing(server, tunnel_factory, client_ctx):
    a = Admin(server)
    t, s = broken_session(server, tunnel_factory, a)
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx, secret=bytes(32))
    assert e.value.code == 2, e.value
    assert e.value.welcome.get(bw.TAG_SESSION_ID) != t.session_id  # a fresh session instead
    assert a.metrics().counter("baton_session_resumes_total", result="credentials") == 1
    # The owner still resumes.
    t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx)
    s.send(b"after")
    assert s.recv_exactly(5, timeout=scaled(10)) == b"after"


def test_a_spent_secret_is_refused(server, tunnel_factory, client_ctx):
    a = Admin(server)
    t, s = broken_session(server, tunnel_factory, a)
    first = t.resume_secret
    t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx)
    t.cut()
    wait_until(lambda: detached(a) == 1, 10, what="the session detached again")
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx, secret=first)
    assert e.value.code == 2


def test_another_identity_is_refused(server_factory, tunnel_factory, client_ctx):
    srv = server_factory(tokens=[("test", token_digest(TOKEN)), ("other", token_digest(OTHER_TOKEN))])
    a = Admin(srv)
    t, _ = broken_session(srv, tunnel_factory, a)
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(srv.addr, token=OTHER_TOKEN.encode(), ctx=client_ctx)
    assert e.value.code == 2


def test_an_unknown_session_is_refused(server, tunnel_factory, client_ctx):
    a = Admin(server)
    t, _ = broken_session(server, tunnel_factory, a)
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx, session_id=os.urandom(16))
    assert e.value.code == 1
    assert "no such session" in e.value.welcome.text(bw.TAG_RESUME_REFUSED)
    assert a.metrics().counter("baton_session_resumes_total", result="unknown_session") == 1


def test_offsets_outside_what_is_kept_are_refused(server, tunnel_factory, client_ctx):
    a = Admin(server)
    t, _ = broken_session(server, tunnel_factory, a)
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(server.addr, token=TOKEN.encode(), ctx=client_ctx, received=t.bytes_in_plain + 1000)
    assert e.value.code == 3


def test_after_the_window_the_session_is_gone(server_factory, tunnel_factory, client_ctx):
    srv = server_factory(extra=resume_config(window_ms=1000))
    a = Admin(srv)
    t, _ = broken_session(srv, tunnel_factory, a)
    wait_until(lambda: a.metrics().counter("baton_sessions_expired_total") == 1, 10, what="the window's end")
    m = a.metrics()
    assert m.get("baton_sessions_detached") == 0 and m.get("baton_streams_active") == 0
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(srv.addr, token=TOKEN.encode(), ctx=client_ctx)
    assert e.value.code == 1


def test_beyond_max_detached_a_break_ends_the_session(server_factory, tunnel_factory, client_ctx):
    srv = server_factory(extra=resume_config(max_detached=0))
    a = Admin(srv)
    t = tunnel_factory(srv, resume=True)
    t.cut()
    wait_until(lambda: a.metrics().counter("baton_session_breaks_total", result="max_detached") == 1, 10,
               what="the break counted")
    with pytest.raises(bw.ResumeRefused) as e:
        t.resume(srv.addr, token=TOKEN.encode(), ctx=client_ctx)
    assert e.value.code == 1


def test_received_beyond_what_was_sent_is_a_protocol_error(server, tunnel_factory):
    t = tunnel_factory(server, resume=True)
    t.streams[1].send(bw.received_message(1 << 40))
    fr, _ = t.read_until(lambda f: f.type == bw.TYPE_GO_AWAY, scaled(10))
    assert fr.length == bw.GOAWAY_PROTOCOL_ERROR
    assert t.wait_closed(scaled(10))


def test_a_drain_meets_a_detached_session(server_factory, tunnel_factory, client_ctx):
    """The pod starts draining while a session is detached: the resume is
    accepted, DRAIN (queued in the session while it was detached) arrives,
    the open stream finishes, and the process exits after it; a new session
    is refused meanwhile (REJECT 4)."""
    # delay_ms: the listener keeps accepting (resumes; REJECT 4 for new sessions) while endpoints go.
    srv = server_factory(extra="drain:\n  delay_ms: 3000\n  spread_ms: 0\n  grace_ms: 20000\n")
    a = Admin(srv)
    t, s = broken_session(srv, tunnel_factory, a)
    r = a.request("POST", "/drain")
    assert r.status == 200, r
    t.resume(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    m = t.next_control(scaled(10))
    assert m.type == bw.MSG_DRAIN, m
    s.send(b"after the resume")
    assert s.recv_exactly(16, timeout=scaled(10)) == b"after the resume"
    assert srv.proc.poll() is None, "exited with a stream open"
    with pytest.raises(bw.Rejected):
        tunnel_factory(srv)
    s.close_write()
    assert s.recv_all(scaled(10)) == b""
    assert srv.wait_exit(scaled(10)) == 0


def test_many_sessions_cut_at_once_all_resume(client_ctx, relay):
    """Every connection through the relay is reset at once; each session
    resumes and its stream carries on."""
    n = 100
    a = Admin(relay.server)  # the relay's target: the `server` fixture
    tunnels, streams = [], []
    try:
        for i in range(n):
            t = bw.Tunnel.connect(relay.addr, token=TOKEN.encode(), ctx=client_ctx, resume=True, timeout=scaled(10))
            tunnels.append(t)
            s = t.open_stream("echo")
            s.send(b"%d before" % i)
            streams.append(s)
        for i, s in enumerate(streams):
            assert s.recv_exactly(len(b"%d before" % i), timeout=scaled(10)) == b"%d before" % i
        relay.reset()
        wait_until(lambda: detached(a) == n, 20, what="every session detached")
        for t in tunnels:
            t.resume(relay.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        for i, s in enumerate(streams):
            s.send(b"%d after" % i)
            assert s.recv_exactly(len(b"%d after" % i), timeout=scaled(10)) == b"%d after" % i
        m = a.metrics()
        assert m.counter("baton_session_resumes_total", result="resumed") == n
        assert m.get("baton_sessions_detached") == 0
        assert relay.connections == 2 * n
    finally:
        for t in tunnels:
            t.close()


def restart(server_factory, old):
    new = server_factory(successor_of=old)
    assert new.ready["takeover"] is True, new.ready
    assert old.wait_exit(scaled(10)) == 0
    return new


def test_a_detached_session_resumes_in_the_new_process(server_factory, tunnel_factory, client_ctx):
    """Broken, then the server hot-restarts: the detached session (its
    streams, upstream connections, kept bytes and credential) moves to the
    new process, where the client resumes it."""
    srv = server_factory()
    t, s = broken_session(srv, tunnel_factory, Admin(srv))
    srv = restart(server_factory, srv)
    a = Admin(srv)
    assert detached(a) == 1
    t.resume(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    s.send(b"in the new process")
    assert s.recv_exactly(18, timeout=scaled(10)) == b"in the new process"
    assert a.metrics().counter("baton_session_resumes_total", result="resumed") == 1


def test_a_resumable_session_stays_resumable_across_a_hot_restart(server_factory, tunnel_factory, client_ctx):
    """Attached during the restart (the connection moves as always), broken
    after it: the new process resumes it, sending again what was in flight."""
    srv = server_factory()
    t = tunnel_factory(srv, resume=True)
    s = t.open_stream("echo")
    s.send(b"x" * 100000)
    assert s.recv_exactly(100000, timeout=scaled(10)) == b"x" * 100000
    srv = restart(server_factory, srv)
    a = Admin(srv)
    s.send(b"y" * 100000)
    assert s.recv_exactly(100000, timeout=scaled(10)) == b"y" * 100000
    t.cut()
    wait_until(lambda: detached(a) == 1, 10, what="the session detached in the new process")
    t.resume(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    s.send(b"z" * 1000)
    assert s.recv_exactly(1000, timeout=scaled(10)) == b"z" * 1000
