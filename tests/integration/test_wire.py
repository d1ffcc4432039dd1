"""The wire contract (docs/protocol.md sections 2-5), checked byte by byte with the
independent client in baton_wire.py against a real `baton serve`."""

import os
import struct

import pytest

import baton_wire as bw
from conftest import SERVER_ID, TOKEN, echo_roundtrip, expect_go_away_protocol_error, scaled, try_send

# --- session start ---------------------------------------------------------

def test_welcome_fields_literal(server, tunnel_factory):
    t = tunnel_factory(server, hello=False)
    t.hello(token=TOKEN.encode(), client_id="wire-test")
    # The server's first frame on stream 1 accepts it: ACK flag set, no RST.
    fr, before = t.read_until(lambda f: f.stream_id == 1, scaled(10))
    assert fr.flags & bw.FLAG_ACK, fr
    assert not fr.flags & (bw.FLAG_RST | bw.FLAG_FIN), fr
    assert fr.raw[0] == 0x00 and fr.type in (bw.TYPE_DATA, bw.TYPE_WINDOW_UPDATE), fr
    assert fr.raw[4:8] == b"\x00\x00\x00\x01"

    msg = t.next_control(scaled(10))
    raw = msg.raw
    assert raw[0] == 0x02, "expected WELCOME (0x02), got %s" % raw.hex(" ")
    assert struct.unpack(">H", raw[1:3])[0] == len(raw) - 3
    # walk the fields by hand: tag u8 | length u16 | value
    fields = {}
    i = 3
    while i < len(raw):
        tag = raw[i]
        ln = struct.unpack(">H", raw[i + 1:i + 3])[0]
        fields.setdefault(tag, raw[i + 3:i + 3 + ln])
        i += 3 + ln
    assert i == len(raw)
    assert len(fields[0x05]) == 16, "session_id must be 16 bytes: %r" % fields.get(0x05)
    assert fields[0x06] == SERVER_ID.encode()
    assert fields[0x07] == b"\x00\x00\x3a\x98"  # heartbeat_ms u32 = 15000

    t2 = tunnel_factory(server)
    assert t2.session_id != fields[0x05], "two sessions got the same session_id"
    assert len(t2.session_id) == 16


def test_control_stream_syn_on_data_frame(server, tunnel_factory):
    """Stream 1 may be opened by a Data frame carrying SYN and the HELLO."""
    t = tunnel_factory(server, syn_with_data=True)
    assert len(t.session_id) == 16
    assert echo_roundtrip(t, b"x" * 1000) == b"x" * 1000


def test_bad_token_reject_literal_then_go_away_then_close(server, tunnel_factory):
    t = tunnel_factory(server, hello=False)
    t.hello(token=b"not-the-token")
    msg = t.next_control(scaled(10))
    raw = msg.raw
    assert raw[0] == 0x03, "expected REJECT (0x03): %s" % raw.hex(" ")
    assert struct.unpack(">H", raw[1:3])[0] == len(raw) - 3
    assert b"\x09\x00\x02\x00\x02" in raw[3:], "no code field 09 0002 0002 in %s" % raw.hex(" ")
    assert msg.u16(bw.TAG_CODE) == 2
    # frame order: the Data frame with the REJECT comes before the Go Away
    frames = []
    while True:
        try:
            frames.append(t.read_frame(scaled(10)))
        except EOFError:
            break
    types = [f.type for f in frames]
    assert bw.TYPE_GO_AWAY in types, frames
    ga = types.index(bw.TYPE_GO_AWAY)
    data_on_1 = [i for i, f in enumerate(frames) if f.type == bw.TYPE_DATA and f.stream_id == 1 and f.length]
    assert data_on_1 and data_on_1[-1] < ga, frames
    assert frames[ga].raw[:8] == b"\x00\x03\x00\x00\x00\x00\x00\x00", frames[ga]
    assert t.wait_closed(scaled(10))


def test_hello_version_2_rejected_code_1(server, tunnel_factory):
    t = tunnel_factory(server, hello=False)
    t.hello(token=TOKEN.encode(), version=2)
    msg = t.next_control(scaled(10))
    assert msg.raw[0] == 0x03, msg.raw.hex(" ")
    assert b"\x09\x00\x02\x00\x01" in msg.raw[3:], msg.raw.hex(" ")
    t.wait_go_away(scaled(10))
    assert t.wait_closed(scaled(10))


def test_unknown_hello_fields_are_ignored(server, tunnel_factory):
    t = tunnel_factory(server, hello=False)
    raw = bw.hello_message(TOKEN.encode(), "x", 1, extra_fields=[(0x7e, b"future stuff")])
    t.hello(raw_message=raw)
    t.wait_welcome(scaled(10))
    assert echo_roundtrip(t) == b"hello baton"


def test_data_stream_before_hello_is_reset(server, tunnel_factory):
    t = tunnel_factory(server, hello=False)
    t.open_control()  # stream 1 SYN, no HELLO yet
    s = t.open_stream("echo")
    assert s.id == 3
    fr, _ = t.read_until(lambda f: f.stream_id == 3, scaled(10))
    assert fr.flags & bw.FLAG_RST, fr
    assert fr.raw[4:8] == b"\x00\x00\x00\x03"
    # the session still starts normally afterwards
    t.hello(token=TOKEN.encode())
    t.wait_welcome(scaled(10))
    assert echo_roundtrip(t, b"after") == b"after"


# --- streams ---------------------------------------------------------------

def test_unknown_route_rst_then_tunnel_keeps_working(server, tunnel_factory):
    t = tunnel_factory(server)
    s = t.open_stream("no-such-route")
    fr, _ = t.read_until(lambda f: f.stream_id == s.id, scaled(10))
    assert fr.raw[0] == 0x00 and fr.raw[1] in (0x00, 0x01), fr  # version 0, Data or Window Update
    flags = struct.unpack(">H", fr.raw[2:4])[0]
    assert flags & 0x0008, "expected the RST flag (0x8), got %s" % fr.raw[:12].hex(" ")
    assert not flags & 0x0002, "an unknown route must not be ACKed first: %s" % fr.raw[:12].hex(" ")
    assert fr.raw[4:8] == struct.pack(">I", s.id)
    # the same tunnel still works
    data = os.urandom(100_000)
    assert echo_roundtrip(t, data) == data
    assert t.go_away is None and not t.closed


def test_failed_upstream_connect_rst(server_factory, tunnel_factory):
    # a port with nothing listening: bind, take the port, close
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    srv = server_factory(routes={"dead": dead})
    t = tunnel_factory(srv)
    st = t.open_stream("dead")
    assert st.wait_acked(scaled(10)) is False
    assert st.reset
    assert t.ping(7).length == 7  # the tunnel is alive


def test_stream_ack_and_echo_several_streams(server, tunnel_factory):
    t = tunnel_factory(server)
    streams = [t.open_stream("echo") for _ in range(5)]
    assert [s.id for s in streams] == [3, 5, 7, 9, 11]
    payloads = [os.urandom(50_000 + i) for i in range(5)]
    for s, p in zip(streams, payloads):
        assert s.wait_acked(scaled(10))
        s.send(p)
        s.close_write()
    for s, p in zip(streams, payloads):
        assert s.recv_all(scaled(10)) == p


def test_ping_ack_same_value(server, tunnel_factory):
    t = tunnel_factory(server)
    for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        fr = t.ping(value, scaled(10))
        assert fr.raw == b"\x00\x02\x00\x02\x00\x00\x00\x00" + struct.pack(">I", value), fr.raw.hex(" ")


def test_full_window_without_waiting_and_window_updates(server, tunnel_factory):
    """Exactly 256 KiB of stream bytes (preamble included) sent at once, with no
    wait for any Window Update, is accepted; the echo comes back and the
    server returns Window Updates as it flows."""
    t = tunnel_factory(server)
    pre = bw.encode_preamble("echo")
    payload = os.urandom(bw.INITIAL_WINDOW - len(pre))
    s = t.open_stream(None)
    first = pre + payload
    assert len(first) == 256 * 1024
    for off in range(0, len(first), 16384):
        t.send_frame(bw.TYPE_DATA, 0, s.id, None, first[off:off + 16384])
    with s.cond:
        s.send_window -= len(first)
    got = s.recv_exactly(len(payload), scaled(20))
    assert got == payload
    assert s.wait_send_window(1, scaled(10)) > 0, "no Window Update after the full window was consumed"
    assert s.window_updates and sum(s.window_updates) >= 128 * 1024, s.window_updates
    # and the stream keeps flowing under window control
    more = os.urandom(1 << 20)
    import threading
    th = threading.Thread(target=s.send, args=(more,), kwargs={"timeout": scaled(30)})
    th.start()
    back = s.recv_exactly(len(more), scaled(30))
    th.join()
    assert back == more
    s.close_write()
    assert s.recv(timeout=scaled(10)) == b""
    assert t.go_away is None


def test_server_respects_client_window(server_factory, upstream_factory, tunnel_factory):
    """The server never sends more than the 256 KiB initial window before the client grants more."""
    src = upstream_factory("source", limit=8 << 20)
    srv = server_factory(routes={"src": src})
    t = tunnel_factory(srv, capture_bodies=False)
    s = t.open_stream("src")
    s.auto_window = False
    assert s.wait_acked(scaled(10))
    # wait until the window is used up (or the server overshoots)
    deadline = scaled(10)
    import time
    end = time.monotonic() + deadline
    with s.cond:
        while s.received_total < bw.INITIAL_WINDOW and time.monotonic() < end:
            s.cond.wait(0.1)
    assert s.received_total == bw.INITIAL_WINDOW
    # the server must now be silent on this stream: a ping round trip proves
    # everything it sent before the ping ACK has been processed
    t.ping(42, scaled(10))
    assert s.received_total == bw.INITIAL_WINDOW
    s.grant(1000)
    with s.cond:
        end = time.monotonic() + scaled(10)
        while s.received_total < bw.INITIAL_WINDOW + 1000 and time.monotonic() < end:
            s.cond.wait(0.1)
    t.ping(43, scaled(10))
    assert s.received_total == bw.INITIAL_WINDOW + 1000
    data = s.recv_exactly(bw.INITIAL_WINDOW + 1000, scaled(5))
    assert data == src.pattern.at(0, len(data))


def test_client_fin_and_upstream_eof(server, tunnel_factory, echo_server):
    t = tunnel_factory(server)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    s.send(b"abc")
    assert s.recv_exactly(3, scaled(10)) == b"abc"
    s.close_write()
    assert s.recv(timeout=scaled(10)) == b""  # FIN came back: the echo saw EOF and closed
    rec = echo_server.wait_conns(1)[0]
    assert rec.eof.wait(scaled(5))
    fr = [f for f in t.drain_frames() if f.stream_id == s.id and f.flags & bw.FLAG_FIN]
    assert fr and not fr[0].flags & bw.FLAG_RST


# --- protocol errors: Go Away code 1 ---------------------------------------

def test_data_beyond_window_go_away_1(server_factory, upstream_factory, tunnel_factory):
    sink = upstream_factory("sink")
    srv = server_factory(routes={"sink": sink})
    t = tunnel_factory(srv)
    s = t.open_stream(None)
    body = bw.encode_preamble("sink") + os.urandom(bw.INITIAL_WINDOW + 1 - len(bw.encode_preamble("sink")))
    assert len(body) == bw.INITIAL_WINDOW + 1
    # one Data frame one byte larger than the whole initial window
    try_send(t.send_frame, bw.TYPE_DATA, 0, s.id, None, body)
    expect_go_away_protocol_error(t)


def test_unknown_frame_type_go_away_1(server, tunnel_factory):
    t = tunnel_factory(server)
    t.send_raw(bytes.fromhex("00 04 00 00 00 00 00 00 00 00 00 00"))
    expect_go_away_protocol_error(t)


def test_frame_version_1_go_away_1(server, tunnel_factory):
    t = tunnel_factory(server)
    t.send_raw(bytes.fromhex("01 02 00 01 00 00 00 00 00 00 00 05"))  # a Ping SYN with version 1
    expect_go_away_protocol_error(t)


def test_even_stream_id_go_away_1(server, tunnel_factory):
    t = tunnel_factory(server)
    t.send_raw(bytes.fromhex("00 01 00 01 00 00 00 02 00 00 00 00"))  # Window Update SYN on stream 2
    expect_go_away_protocol_error(t)


def test_stream_id_reuse_go_away_1(server, tunnel_factory):
    t = tunnel_factory(server)
    s = t.open_stream("echo")
    assert s.id == 3
    assert s.wait_acked(scaled(10))
    s.send(b"one")
    s.close_write()
    assert s.recv_all(scaled(10)) == b"one"  # stream 3 is finished both ways
    t.send_raw(bytes.fromhex("00 01 00 01 00 00 00 03 00 00 00 00"))  # SYN on stream 3 again
    expect_go_away_protocol_error(t)


def test_stream_id_reuse_while_open_go_away_1(server, tunnel_factory):
    t = tunnel_factory(server)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    t.send_raw(bytes.fromhex("00 01 00 01 00 00 00 03 00 00 00 00"))  # SYN on the open stream 3
    expect_go_away_protocol_error(t)


def test_protocol_error_does_not_affect_other_tunnels(server, tunnel_factory):
    good = tunnel_factory(server)
    bad = tunnel_factory(server)
    bad.send_raw(bytes.fromhex("00 09 00 00 00 00 00 00 00 00 00 00"))
    expect_go_away_protocol_error(bad)
    assert echo_roundtrip(good, b"still here") == b"still here"
    assert server.alive()


def test_fin_on_window_update_like_hashicorp(server, tunnel_factory):
    t = tunnel_factory(server)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    s.send(b"wu-fin")
    s.close_write(via_window_update=True)
    assert s.recv_all(scaled(10)) == b"wu-fin"


def test_frames_split_into_one_byte_records(server, tunnel_factory):
    """Frame and message boundaries need not match TLS record boundaries:
    everything sent one byte per TLS record."""
    t = tunnel_factory(server, hello=False)
    wire = (bw.window_update_frame(1, 0, bw.FLAG_SYN)
            + bw.data_frame(1, bw.hello_message(TOKEN.encode()))
            + bw.window_update_frame(3, 0, bw.FLAG_SYN)
            + bw.data_frame(3, bw.encode_preamble("echo") + b"tiny records")
            + bw.data_frame(3, b"", bw.FLAG_FIN))
    with t._lock:
        t.streams[1] = bw.Stream(t, 1)
        s = t.streams[3] = bw.Stream(t, 3)
        t.next_id = 5
    for i in range(len(wire)):
        t.send_raw(wire[i:i + 1])
    t.wait_welcome(scaled(10))
    assert s.recv_all(scaled(10)) == b"tiny records"


def test_many_frames_in_one_record(server, tunnel_factory):
    """Several whole frames (HELLO, SYN, preamble, data, FIN) in one TLS record."""
    t = tunnel_factory(server, hello=False)
    wire = (bw.window_update_frame(1, 0, bw.FLAG_SYN)
            + bw.data_frame(1, bw.hello_message(TOKEN.encode()))
            + bw.data_frame(3, bw.encode_preamble("echo") + b"one record", bw.FLAG_SYN)
            + bw.data_frame(3, b"", bw.FLAG_FIN))
    with t._lock:
        t.streams[1] = bw.Stream(t, 1)
        s = t.streams[3] = bw.Stream(t, 3)
        t.next_id = 5
    t.send_raw(wire)
    t.wait_welcome(scaled(10))
    # stream 3 was opened in the same record as HELLO, i.e. before WELCOME was
    # sent: the server resets it (docs/protocol.md 3) or, having processed HELLO
    # first, accepts it. Either way the session must go on.
    try:
        got = s.recv_all(scaled(10))
        assert got == b"one record"
    except bw.StreamReset:
        pass
    assert echo_roundtrip(t, b"next") == b"next"
