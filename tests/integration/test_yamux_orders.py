"""Frame orders and timings that a real yamux library produces and baton's own
client does not (docs/protocol.md sections 2 and 4), sent byte by byte with
the wire client in baton_wire.py against a real `baton serve`.

hashicorp/yamux sends each SYN from the goroutine that opened the stream (so
SYNs race and arrive out of id order), opens with a Window Update carrying SYN
and half-closes with a zero-length Window Update carrying FIN, writes Data
before the ACK, and a send-then-shutdown client puts SYN, Data and FIN in one
burst. Every case checks both directions: no byte lost, none after FIN, FIN
only after the last byte. tests/integration/test_interop_go.py drives the same
behaviours through hashicorp/yamux itself."""

import hashlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import baton_wire as bw
import upstreams
from conftest import echo_roundtrip, scaled, wait_until


def payload(stream_id: int, n: int) -> bytes:
    """Deterministic bytes per stream, so a byte delivered on the wrong stream shows."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (stream_id, i)).digest()
        i += 1
    return bytes(out[:n])


def read_to_fin(s: bw.Stream, timeout: float) -> bytes:
    """Every byte up to the FIN; fails on RST or when nothing comes for `timeout`."""
    got = bytearray()
    while True:
        b = s.recv(1 << 20, timeout=timeout)
        if not b:
            return bytes(got)
        got += b


def open_burst(t: bw.Tunnel, ids, route: str, bodies, fin: bool = True, syn_on_data: bool = False,
               rst: bool = False):
    """SYNs for `ids` in the order given, each stream's preamble and body and
    (if fin) a FIN on a zero-length Window Update (if rst, an RST instead),
    all in one TLS write: the server sees every frame before it can answer
    any of them."""
    pre = bw.encode_preamble(route)
    wire = bytearray()
    streams = []
    for sid, body in zip(ids, bodies):
        s = bw.Stream(t, sid)
        with t._lock:
            t.streams[sid] = s
            t.next_id = max(t.next_id, sid + 2)
        first = pre + body
        assert len(first) <= bw.INITIAL_WINDOW
        s.send_window -= len(first)
        if syn_on_data:
            flags = bw.FLAG_SYN | (bw.FLAG_FIN if fin else 0)
            wire += bw.frame_bytes(bw.TYPE_DATA, flags, sid, None, first)
        else:
            wire += bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_SYN, sid, 0)
            for off in range(0, len(first), 16384):
                wire += bw.frame_bytes(bw.TYPE_DATA, 0, sid, None, first[off:off + 16384])
            if fin:
                wire += bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_FIN, sid, 0)
        if rst:
            wire += bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_RST, sid, 0)
            s.reset = True
        if fin:
            s.local_fin = True
        streams.append(s)
    t.send_raw(bytes(wire))
    return streams


def echo_all(streams, bodies, timeout: float):
    with ThreadPoolExecutor(max_workers=min(64, len(streams))) as ex:
        results = list(ex.map(lambda s: read_to_fin(s, timeout), streams))
    bad = [(s.id, len(got), len(body)) for s, got, body in zip(streams, results, bodies) if got != body]
    assert not bad, "streams whose echo differs (id, got, sent): %s" % bad[:10]


def test_200_concurrent_opens_out_of_order_64k_then_fin_at_once(server, tunnel_factory):
    """The issue's first case: SYNs in a shuffled order, Data before any ACK,
    FIN right behind the last byte; every byte comes back, then FIN."""
    for run in range(3):
        t = tunnel_factory(server)
        ids = [3 + 2 * i for i in range(200)]
        random.Random(run).shuffle(ids)
        bodies = [payload(i, 64 * 1024) for i in ids]
        streams = open_burst(t, ids, "echo", bodies)
        echo_all(streams, bodies, scaled(30))
        assert all(s.acked and not s.reset for s in streams)
        # The tunnel is intact: a later stream (above every id used) still works.
        assert echo_roundtrip(t, b"after") == b"after"
        t.close()


def test_syn_on_data_with_fin_in_the_same_frame(server, tunnel_factory):
    """SYN, preamble, body and FIN in one Data frame; out of id order too."""
    t = tunnel_factory(server)
    ids = [9, 5, 7, 3]
    bodies = [payload(i, 1000) for i in ids]
    streams = open_burst(t, ids, "echo", bodies, syn_on_data=True)
    echo_all(streams, bodies, scaled(10))


@pytest.mark.parametrize("size", [0, 1, 1000, 200_000])
def test_send_then_shutdown_before_the_upstream_answers(server, tunnel_factory, size):
    """What `printf ... | nc -N`, an HTTP/1.0 client or any send-then-shutdown
    RPC does: SYN, Data, FIN in one burst, before the upstream connect has even
    started. The upstream gets every byte then EOF; the echo comes back whole
    and only then FIN."""
    t = tunnel_factory(server)
    body = payload(3, size)
    (s,) = open_burst(t, [3], "echo", [body])
    assert read_to_fin(s, scaled(10)) == body


def test_fin_before_the_preamble_is_complete_resets_at_once(server_factory, tunnel_factory, echo_server):
    """A stream that ends before naming its route can never be routed: it is
    reset at once (malformed_preamble), not after the preamble timeout."""
    srv = server_factory(limits={"handshake_timeout_ms": 30000})
    t = tunnel_factory(srv)
    s = bw.Stream(t, 3)
    with t._lock:
        t.streams[3] = s
        t.next_id = 5
    started = time.monotonic()
    t.send_raw(bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_SYN, 3, 0) +
               bw.frame_bytes(bw.TYPE_DATA, 0, 3, None, b"\x04ec") +
               bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_FIN, 3, 0))
    s.wait_reset(scaled(5))
    assert time.monotonic() - started < scaled(5)
    assert echo_server.conns == []
    assert echo_roundtrip(t, b"still fine") == b"still fine"
    m = srv_metrics(srv)
    assert m.counter("baton_stream_resets_total", route="(none)", reason="malformed_preamble") == 1


def srv_metrics(srv):
    from conftest import Admin
    return Admin(srv).metrics()


def test_rst_while_the_upstream_connect_is_in_flight(server_factory, tunnel_factory):
    """RST before the upstream answers: the connect is abandoned, nothing is
    sent there, the tunnel goes on."""
    hole = upstreams.BlackHole()
    echo = upstreams.EchoServer().start()
    try:
        srv = server_factory(routes={"hole": hole.addr_str, "echo": echo})
        t = tunnel_factory(srv)
        open_burst(t, [3], "hole", [b"never sent"], fin=False, rst=True)
        # The same immediately behind a connect that would succeed.
        open_burst(t, [5], "echo", [b"x" * 100], fin=False, rst=True)
        assert echo_roundtrip(t, b"alive") == b"alive"
        # No stream is left behind on the server, and nothing reached the echo.
        wait_until(lambda: Admin_stats(srv)["streams"]["active"] == 0, scaled(10), what="streams gone")
        # (the round trip's own connection got its 5 bytes, nothing else any)
        assert sorted(c.received for c in echo.conns)[-1:] == [5] and sum(c.received for c in echo.conns) == 5
    finally:
        hole.close()
        echo.close()


def Admin_stats(srv):
    from conftest import Admin
    return Admin(srv).get_json("/stats")


@pytest.mark.parametrize("on_syn", [False, True], ids=["after_syn", "on_syn"])
def test_window_update_granting_more_than_256k(server_factory, tunnel_factory, upstream_factory, on_syn):
    """A receiver may grant any window (hashicorp/yamux's MaxStreamWindowSize),
    on the SYN itself or later: the server sends up to it, never beyond, and
    every byte arrives in order."""
    size = 16 << 20
    big = 8 << 20
    src = upstream_factory("source", limit=size)
    srv = server_factory(routes={"src": src})
    t = tunnel_factory(srv)
    if on_syn:
        s = bw.Stream(t, 3, recv_window=big)
        s.recv_window = big
        with t._lock:
            t.streams[3] = s
            t.next_id = 5
        pre = bw.encode_preamble("src")
        s.send_window -= len(pre)
        t.send_raw(bw.frame_bytes(bw.TYPE_WINDOW_UPDATE, bw.FLAG_SYN, 3, big - bw.INITIAL_WINDOW) +
                   bw.frame_bytes(bw.TYPE_DATA, 0, 3, None, pre))
    else:
        s = t.open_stream("src", recv_window=big)
        s.grant(big - bw.INITIAL_WINDOW)  # the bigger window, before any byte
    s.close_write(via_window_update=True)
    h = hashlib.sha256()
    n = 0
    while True:
        b = s.recv(1 << 20, timeout=scaled(20))
        if not b:
            break
        h.update(b)
        n += len(b)
        assert s.recv_window >= 0, "the server sent beyond the granted window"
    assert n == size
    assert h.hexdigest() == hashlib.sha256(upstreams.PatternStream(1234).at(0, size)).hexdigest()


def test_slow_readers_on_both_sides(server_factory, tunnel_factory, upstream_factory):
    """The client reads slower than the upstream writes and the upstream reads
    slower than the client writes: flow control holds both, nothing is lost."""
    size = 3 << 20

    def slow_echo(up, rec):
        while True:
            b = up.read_some(rec, 8192)
            if not b:
                rec.sock.shutdown(__import__("socket").SHUT_WR)
                return
            up.write(rec, b)
            time.sleep(0.0005)

    up = upstream_factory("scripted", script=slow_echo, keep_input=False)
    srv = server_factory(routes={"slow": up})
    t = tunnel_factory(srv)
    s = t.open_stream("slow")
    body = payload(3, size)
    got = bytearray()
    err = []

    def reader():
        try:
            while True:
                b = s.recv(16384, timeout=scaled(30))
                if not b:
                    return
                got.extend(b)
                if len(got) % (256 * 1024) < 16384:
                    time.sleep(0.02)
        except Exception as e:  # noqa: BLE001
            err.append(e)

    th = threading.Thread(target=reader)
    th.start()
    s.send(body, timeout=scaled(60))
    s.close_write(via_window_update=True)
    th.join(scaled(90))
    assert not err, err
    assert bytes(got) == body


def test_data_and_fin_from_the_upstream_before_the_stream_is_read(server_factory, tunnel_factory, upstream_factory):
    """The upstream answers and closes at once while the client has not read
    anything yet (its window full): the FIN waits for the last byte."""
    answer = payload(7, 600_000)

    def script(up, rec):
        up.write(rec, answer)
        rec.sock.shutdown(__import__("socket").SHUT_WR)
        up.read_all(rec)

    up = upstream_factory("scripted", script=script)
    srv = server_factory(routes={"talk": up})
    t = tunnel_factory(srv)
    s = t.open_stream("talk")
    s.auto_window = False
    wait_until(lambda: s.received_total >= bw.INITIAL_WINDOW, scaled(10), what="first window")
    assert not s.remote_fin, "FIN came before the bytes behind the full window"
    s.auto_window = True
    s.close_write(via_window_update=True)
    assert read_to_fin(s, scaled(10)) == answer
