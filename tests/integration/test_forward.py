"""End to end through `baton connect` -> `baton serve` -> upstream, over real
TCP on 127.0.0.1: bulk data, many streams, half-close in both directions."""

import hashlib
import os
import socket
import threading
import time

import pytest

import baton_wire as bw
from conftest import BIG_BYTES, BigSender, scaled


def _connect(addr, timeout=10.0):
    s = socket.create_connection(addr, timeout=scaled(timeout))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_until_eof(sock, sha=None, limit=None, on_chunk=None):
    n = 0
    out = bytearray() if sha is None else None
    while True:
        b = sock.recv(1 << 20)
        if not b:
            return (bytes(out) if out is not None else n)
        if sha is not None:
            sha.update(b)
            n += len(b)
        else:
            out += b
        if on_chunk:
            on_chunk(len(b))


def test_100_concurrent_streams_1mib_each(server, connect_factory, echo_server):
    client = connect_factory(server)
    addr = client.forward_addr("echo")
    n_streams, size = 100, 1 << 20
    payloads = [os.urandom(size) for _ in range(n_streams)]
    results = [None] * n_streams
    errors = []
    start_gate = threading.Barrier(n_streams)

    def one(i):
        try:
            s = _connect(addr, timeout=60)
            s.settimeout(scaled(90))
            start_gate.wait(scaled(30))

            def sender():
                try:
                    s.sendall(payloads[i])
                    s.shutdown(socket.SHUT_WR)
                except OSError as e:
                    errors.append((i, "send", e))

            th = threading.Thread(target=sender)
            th.start()
            sha = hashlib.sha256()
            n = _recv_until_eof(s, sha)
            th.join(scaled(90))
            s.close()
            results[i] = (n, sha.hexdigest())
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append((i, "recv", e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(120))
    assert not any(t.is_alive() for t in threads), "some streams did not finish within 120 s"
    assert not errors, errors[:5]
    for i in range(n_streams):
        assert results[i] == (size, hashlib.sha256(payloads[i]).hexdigest()), "stream %d corrupted: %r" % (
            i, results[i])
    # each local connection became its own upstream connection
    conns = echo_server.wait_conns(n_streams, scaled(5))
    assert len(conns) == n_streams
    assert sorted(c.received for c in conns) == [size] * n_streams
    assert client.alive() and server.alive()


@pytest.mark.slow
def test_one_big_stream_echoed_intact(server_factory, upstream_factory, connect_factory):
    """BATON_TEST_BIG_BYTES (default 1 GiB) through one stream, written and read
    concurrently; sha256 checked at the upstream (client -> upstream) and at the
    client (upstream -> client)."""
    echo = upstream_factory("echo")
    srv = server_factory(routes={"echo": echo})
    client = connect_factory(srv)
    total = BIG_BYTES
    s = _connect(client.forward_addr("echo"))
    s.settimeout(scaled(120))
    t0 = time.monotonic()
    snd = BigSender(s, total, chunk=4 << 20).start()
    sha_in = hashlib.sha256()
    n = _recv_until_eof(s, sha_in)
    snd.join(scaled(60))
    elapsed = time.monotonic() - t0
    s.close()
    snd.check_echoed(echo, n, sha_in)
    print("big stream: %d bytes each way in %.1f s (%.0f MiB/s)" % (total, elapsed, total / elapsed / (1 << 20)))


def test_half_close_client_first(server_factory, upstream_factory, connect_factory):
    """(a) The client shuts its write side; the upstream sees EOF, then sends
    its remaining data and closes; the client gets all of it, then EOF."""
    request = os.urandom(300_000)
    response = os.urandom(700_000)

    def script(srv, rec):
        srv.read_all(rec)  # until EOF
        rec.note("got_eof")
        srv.write(rec, response)
        rec.sock.shutdown(socket.SHUT_WR)
        rec.note("sent_response")

    up = upstream_factory("scripted", script=script)
    srv = server_factory(routes={"hc": up})
    client = connect_factory(srv, forwards=[("127.0.0.1:0", "hc")])
    s = _connect(client.forward_addr("hc"))
    s.sendall(request)
    s.shutdown(socket.SHUT_WR)
    got = _recv_until_eof(s)
    s.close()
    rec = up.wait_conns(1)[0]
    assert rec.done.wait(scaled(10))
    assert bytes(rec.data_in) == request
    assert got == response
    names = [w for _, w in rec.events]
    assert names.index("eof") < names.index("sent_response")


def test_half_close_upstream_first(server_factory, upstream_factory, connect_factory):
    """(b) The upstream shuts its write side first; the client sees EOF but can
    still send, and the upstream receives it all."""
    greeting = os.urandom(200_000)
    upload = os.urandom(900_000)

    def script(srv, rec):
        srv.write(rec, greeting)
        rec.sock.shutdown(socket.SHUT_WR)
        rec.note("shut_wr")
        srv.read_all(rec)

    up = upstream_factory("scripted", script=script)
    srv = server_factory(routes={"hc": up})
    client = connect_factory(srv, forwards=[("127.0.0.1:0", "hc")])
    s = _connect(client.forward_addr("hc"))
    got = _recv_until_eof(s)  # EOF from the upstream's half-close
    assert got == greeting
    s.sendall(upload)  # our direction is still open
    s.shutdown(socket.SHUT_WR)
    rec = up.wait_conns(1)[0]
    assert rec.eof.wait(scaled(20)), "upstream never saw our EOF"
    assert bytes(rec.data_in) == upload
    s.close()


def test_half_close_with_wire_client(server_factory, upstream_factory, tunnel_factory):
    """The same two half-closes, one frame level down: FIN frames."""
    def script_a(srv, rec):
        srv.read_all(rec)
        srv.write(rec, b"after-eof:" + bytes(rec.data_in))
        rec.sock.shutdown(socket.SHUT_WR)

    def script_b(srv, rec):
        srv.write(rec, b"bye")
        rec.sock.shutdown(socket.SHUT_WR)
        srv.read_all(rec)

    a = upstream_factory("scripted", script=script_a)
    b = upstream_factory("scripted", script=script_b)
    srv = server_factory(routes={"a": a, "b": b})
    t = tunnel_factory(srv)

    sa = t.open_stream("a")
    assert sa.wait_acked(scaled(10))
    sa.send(b"question")
    sa.close_write()
    assert sa.recv_all(scaled(10)) == b"after-eof:question"
    fins = [f for f in t.drain_frames() if f.stream_id == sa.id and f.flags & bw.FLAG_FIN]
    assert len(fins) == 1 and not fins[0].flags & bw.FLAG_RST

    sb = t.open_stream("b")
    assert sb.wait_acked(scaled(10))
    assert sb.recv_all(scaled(10)) == b"bye"  # FIN received
    payload = os.urandom(600_000)  # more than the initial window: needs Window Updates after our FIN came in
    sb.send(payload, timeout=scaled(20))
    sb.close_write()
    rec = b.wait_conns(1)[0]
    assert rec.eof.wait(scaled(10))
    assert bytes(rec.data_in) == payload
    assert not sb.reset
