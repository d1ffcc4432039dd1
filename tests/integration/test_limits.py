"""limits.*: tunnels, streams, handshake and idle timeouts."""

import socket

import pytest
import time

import baton_wire as bw
from conftest import echo_roundtrip, scaled


def test_max_tunnels_third_tunnel_gets_reject_overloaded(server_factory, tunnel_factory):
    """Beyond max_tunnels a client is told, never silently closed: REJECT 3
    (overloaded) with retry_after_ms, then Go Away; live tunnels go on."""
    srv = server_factory(limits={"max_tunnels": 2, "retry_after_ms": 1500})
    t1 = tunnel_factory(srv)
    t2 = tunnel_factory(srv)
    with pytest.raises(bw.Rejected) as e:
        tunnel_factory(srv)
    assert e.value.code == 3, e.value
    assert e.value.message.u32(0x0d) == 1500  # retry_after_ms
    # the two tunnels still work
    assert echo_roundtrip(t1, b"one") == b"one"
    assert echo_roundtrip(t2, b"two") == b"two"
    # when one goes away, a new tunnel is admitted (bounded retries: the server
    # learns about the close asynchronously)
    t1.close()
    deadline = time.monotonic() + scaled(10)
    while True:
        try:
            t3 = tunnel_factory(srv, timeout=scaled(3))
            break
        except (bw.Rejected, ConnectionError, OSError, EOFError, TimeoutError):
            if time.monotonic() > deadline:
                raise
    assert echo_roundtrip(t3, b"three") == b"three"


def test_max_streams_per_tunnel(server_factory, tunnel_factory):
    """max_streams_per_tunnel: 4 admits 4 concurrent data streams (the control
    stream does not count, docs/configuration.md); every stream beyond is RST,
    and the limit is a concurrency limit (a finished stream frees its slot)."""
    srv = server_factory(limits={"max_streams_per_tunnel": 4})
    t = tunnel_factory(srv)
    streams = [t.open_stream("echo") for _ in range(6)]
    accepted = [s.wait_acked(scaled(10)) for s in streams]
    n_ok = sum(accepted)
    assert n_ok == 4, "accepted %d of 6 concurrent streams with max_streams_per_tunnel 4" % n_ok
    assert accepted == [True] * n_ok + [False] * (6 - n_ok), accepted
    frames = t.drain_frames()
    for s in streams[n_ok:]:
        fr = [f for f in frames if f.stream_id == s.id]
        assert fr and fr[0].flags & bw.FLAG_RST and not fr[0].flags & bw.FLAG_ACK, fr
    live = streams[:n_ok]
    # the admitted ones still work
    for i, s in enumerate(live):
        s.send(b"s%d" % i)
        assert s.recv_exactly(2, scaled(10)) == b"s%d" % i
    # finish one completely, then a new stream fits again (bounded retries:
    # the server may see the end of the stream slightly after we do)
    live[0].close_write()
    assert live[0].recv(timeout=scaled(10)) == b""
    deadline = time.monotonic() + scaled(10)
    while True:
        s = t.open_stream("echo")
        if s.wait_acked(scaled(10)):
            break
        assert time.monotonic() < deadline, "no stream admitted after one of %d ended" % n_ok
    s.send(b"again")
    s.close_write()
    assert s.recv_all(scaled(10)) == b"again"
    assert t.go_away is None


def test_handshake_timeout_silent_tcp(server_factory):
    srv = server_factory(limits={"handshake_timeout_ms": 500})
    s = socket.create_connection(srv.addr, timeout=scaled(10))
    start = time.monotonic()
    closed_at = bw.wait_socket_closed(s, scaled(10))
    s.close()
    assert closed_at is not None, "silent connection still open after 10 s (handshake_timeout_ms 500)"
    elapsed = closed_at - start
    assert 0.4 <= elapsed <= scaled(5), "closed after %.3f s, expected about 0.5 s" % elapsed
    assert srv.alive()


def test_handshake_timeout_tls_but_no_hello(server_factory, certs):
    srv = server_factory(limits={"handshake_timeout_ms": 500})
    start = time.monotonic()
    t = bw.Tunnel.open_tls(srv.addr, ctx=bw.client_context(ca=str(certs.ca_crt)), timeout=scaled(10))
    try:
        assert t.wait_closed(scaled(10)), "TLS done but no HELLO: still open after 10 s"
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed <= scaled(5), "closed after %.3f s" % elapsed
    finally:
        t.close()


def test_handshake_timeout_does_not_hit_established_tunnels(server_factory, tunnel_factory):
    srv = server_factory(limits={"handshake_timeout_ms": 500})
    t = tunnel_factory(srv)
    # a full second later (twice the handshake timeout) the tunnel still works
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        t.ping(1, scaled(5))
        assert not t.wait_closed(0.2)
    assert echo_roundtrip(t, b"ok") == b"ok"


def test_idle_timeout_closes_silent_tunnel(server_factory, tunnel_factory):
    srv = server_factory(limits={"idle_timeout_ms": 1000, "heartbeat_ms": 300})
    t = tunnel_factory(srv, auto_pong=False)
    start = time.monotonic()
    assert t.wait_closed(scaled(10)), "silent tunnel still open 10 s after idle_timeout_ms 1000"
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= scaled(6), "closed after %.3f s, expected about 1 s" % elapsed
    assert srv.alive()


def test_idle_timeout_reset_by_traffic(server_factory, tunnel_factory):
    srv = server_factory(limits={"idle_timeout_ms": 1000, "heartbeat_ms": 300})
    t = tunnel_factory(srv)
    start = time.monotonic()
    while time.monotonic() - start < 2.5:  # 2.5 idle periods, pinging every 0.3 s
        t.ping(9, scaled(5))
        assert not t.wait_closed(0.3), "tunnel closed although it pinged every 0.3 s"
    assert echo_roundtrip(t, b"alive") == b"alive"
