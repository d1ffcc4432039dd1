"""Backpressure: a client that stops reading must stall the upstream, not
grow the sidecar's memory; when it reads again everything arrives in order."""

import time


import baton_wire as bw
from conftest import SANITIZED, scaled

SOURCE_LIMIT = 512 << 20  # the source would push this much if nothing held it back
# The sidecar may grow by at most 64 MiB over its baseline (more under ASan,
# whose allocator keeps freed memory in quarantine and adds redzones).
RSS_BOUND_KIB = (256 << 10) if SANITIZED else (64 << 10)


def wait_source_stalled(rec, quiet: float = 1.5, timeout: float = 60.0) -> int:
    """Waits until the source's sent-byte counter stops advancing for `quiet`
    seconds (its send() blocks), or it has sent everything. Returns the count."""
    deadline = time.monotonic() + scaled(timeout)
    last = -1
    last_change = time.monotonic()
    while True:
        cur = rec.sent
        now = time.monotonic()
        if cur != last:
            last, last_change = cur, now
        elif now - last_change >= quiet:
            return cur
        if cur >= SOURCE_LIMIT:
            return cur
        assert now < deadline, "source never stalled (sent %d bytes)" % cur
        rec.done.wait(0.1)  # paces the poll; returns early if the source finished


def read_and_verify(stream: bw.Stream, pattern, nbytes: int, timeout: float = 60.0) -> int:
    """Reads nbytes from the stream and compares them with the source pattern, in order."""
    deadline = time.monotonic() + scaled(timeout)
    off = 0
    while off < nbytes:
        rem = deadline - time.monotonic()
        assert rem > 0, "only %d of %d bytes arrived" % (off, nbytes)
        chunk = stream.recv(min(1 << 20, nbytes - off), timeout=rem)
        assert chunk, "stream ended after %d bytes" % off
        assert chunk == pattern.at(off, len(chunk)), "bytes %d..%d differ from what the source sent" % (
            off, off + len(chunk))
        off += len(chunk)
    return off


def _baseline(server, tunnel):
    # warm up: one small echo so that lazily allocated buffers exist
    s = tunnel.open_stream("echo")
    assert s.wait_acked(scaled(10))
    s.send(b"w" * 100_000)
    s.close_write()
    assert len(s.recv_all(scaled(10))) == 100_000
    return server.rss_kib()


def test_client_stops_reading_socket_big_window(server_factory, upstream_factory, echo_server, tunnel_factory):
    """The client grants a 1 GiB window and then stops reading the TLS socket
    at all: only the sidecar's tunnel_output_high_water can hold the source back."""
    src = upstream_factory("source", limit=SOURCE_LIMIT)
    srv = server_factory(routes={"src": src, "echo": echo_server})
    t = tunnel_factory(srv, capture=False)
    base = _baseline(srv, t)

    s = t.open_stream("src")
    assert s.wait_acked(scaled(10))
    s.auto_window = False
    s.grant(1 << 30)
    t.pause_reading()
    rec = src.wait_conns(1)[0]
    sent = wait_source_stalled(rec)
    rss = srv.rss_kib()
    print("stalled after %d bytes from the source; sidecar RSS %d -> %d KiB" % (sent, base, rss))
    assert sent < SOURCE_LIMIT, "the sidecar swallowed all %d bytes the source sent" % sent
    assert rss - base <= RSS_BOUND_KIB, "sidecar RSS grew by %d KiB (baseline %d KiB) with %d bytes in flight" % (
        rss - base, base, sent)
    # a while later it still holds
    rec.done.wait(1.0)  # observe for another second (returns early only if the source finished)
    assert rec.sent - sent < 4 << 20, "source kept going while the client was not reading"
    assert srv.rss_kib() - base <= RSS_BOUND_KIB

    # read again: everything in order
    t.resume_reading()
    want = min(sent + (16 << 20), SOURCE_LIMIT)
    read_and_verify(s, src.pattern, want)
    assert rec.sent > sent, "source did not resume after the client read again"
    s.send_rst()


def test_client_stops_consuming_stream(server_factory, upstream_factory, echo_server, tunnel_factory):
    """The client keeps reading frames but stops consuming one stream (no Window
    Updates): the server must stop at the 256 KiB window, hold the source back,
    and not grow."""
    src = upstream_factory("source", limit=SOURCE_LIMIT)
    srv = server_factory(routes={"src": src, "echo": echo_server})
    t = tunnel_factory(srv, capture=False)
    base = _baseline(srv, t)

    s = t.open_stream("src")
    s.auto_window = False
    assert s.wait_acked(scaled(10))
    rec = src.wait_conns(1)[0]
    sent = wait_source_stalled(rec)
    assert sent < SOURCE_LIMIT
    t.ping(1, scaled(10))  # everything the server sent before this is in
    assert s.received_total == bw.INITIAL_WINDOW, "server sent %d bytes into a %d-byte window" % (
        s.received_total, bw.INITIAL_WINDOW)
    assert srv.rss_kib() - base <= RSS_BOUND_KIB
    # the tunnel still serves other streams meanwhile
    e = t.open_stream("echo")
    assert e.wait_acked(scaled(10))
    e.send(b"side")
    e.close_write()
    assert e.recv_all(scaled(10)) == b"side"

    s.auto_window = True
    read_and_verify(s, src.pattern, 32 << 20)
    assert rec.sent > sent
    s.send_rst()


def test_connect_forwarder_slow_local_reader(server_factory, upstream_factory, connect_factory, echo_server):
    """Through `baton connect`: the local TCP client stops reading; neither
    process grows without bound and the data is intact when reading resumes."""
    import socket
    src = upstream_factory("source", limit=SOURCE_LIMIT)
    srv = server_factory(routes={"src": src, "echo": echo_server})
    client = connect_factory(srv, forwards=[("127.0.0.1:0", "src")])
    base_srv, base_cli = srv.rss_kib(), client.rss_kib()
    sock = socket.create_connection(client.forward_addr("src"), timeout=scaled(10))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rec = src.wait_conns(1)[0]
    sent = wait_source_stalled(rec)
    print("stalled after %d bytes; RSS serve %d -> %d KiB, connect %d -> %d KiB" % (
        sent, base_srv, srv.rss_kib(), base_cli, client.rss_kib()))
    assert sent < SOURCE_LIMIT, "%d bytes were absorbed" % sent
    assert srv.rss_kib() - base_srv <= RSS_BOUND_KIB
    assert client.rss_kib() - base_cli <= RSS_BOUND_KIB
    off = 0
    want = 16 << 20
    sock.settimeout(scaled(30))
    while off < want:
        b = sock.recv(1 << 20)
        assert b, "EOF after %d bytes" % off
        assert b == src.pattern.at(off, len(b)), "mismatch at %d" % off
        off += len(b)
    sock.close()
