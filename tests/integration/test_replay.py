"""A stream the client opens while the server's DRAIN is on the way is
refused by the server unprocessed (docs/protocol.md 6: after Go Away it resets
every new stream). `baton connect` sends such a stream again on the next
session, bytes and all, so the local application never sees it.

The race is made deterministic with a scripted server: a protocol-level peer
(Python ssl + the independent codec in baton_wire.py, written from
docs/protocol.md) that answers HELLO with WELCOME and, the moment the client's
first data stream has arrived with its bytes, sends DRAIN (hint: a real
`baton serve`) and Go Away, then refuses the stream. The replay lands on the
real sidecar and its echo upstream."""

import json
import socket
import ssl
import struct
import threading
import urllib.request

import pytest

import baton_wire as bw
from conftest import scaled, wait_until

REQUEST = b"request sent before the drain was seen" * 100  # several KiB, one write


class ScriptedServer:
    """One TLS connection, server side, driven by `mode`:

    rst       DRAIN + Go Away + RST of the data stream (unprocessed), in one
              write: the replay waits for the replacement session
    rst_late  DRAIN + Go Away; the RST only once the test says the
              replacement session is up: the replay goes straight to it
    close     DRAIN + Go Away, then TLS close_notify with the stream unanswered
    rst_only  RST the data stream with no Go Away (an ordinary refusal, e.g.
              an unknown route): the client must NOT replay it
    """

    def __init__(self, certs, mode, hint):
        self.mode, self.hint = mode, hint
        self.ctx, self.lsock = bw.server_listener(str(certs.server_crt), str(certs.server_key))
        self.addr = self.lsock.getsockname()
        self.received = b""     # bytes of the data stream (preamble included)
        self.refused = threading.Event()
        self.go_on = threading.Event()  # rst_late: send the RST now
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self._serve()
        except Exception as e:  # reported by the test
            self.error = e

    def _read_frame(self, tls, buf):
        while len(buf) < bw.HEADER_SIZE:
            chunk = tls.recv(65536)
            if not chunk:
                raise EOFError("client closed")
            buf += chunk
        ver, type_, flags, sid, length = bw.decode_header(buf[:bw.HEADER_SIZE])
        body_len = length if type_ == bw.TYPE_DATA else 0
        while len(buf) < bw.HEADER_SIZE + body_len:
            chunk = tls.recv(65536)
            if not chunk:
                raise EOFError("client closed")
            buf += chunk
        body = buf[bw.HEADER_SIZE:bw.HEADER_SIZE + body_len]
        return (type_, flags, sid, length, body), buf[bw.HEADER_SIZE + body_len:]

    def _serve(self):
        conn, _ = self.lsock.accept()
        conn.settimeout(scaled(20))
        tls = self.ctx.wrap_socket(conn, server_side=True)
        buf, control, data_sid = b"", b"", None
        want = len(bw.encode_preamble("echo")) + len(REQUEST)
        while True:
            (type_, flags, sid, length, body), buf = self._read_frame(tls, buf)
            if type_ == bw.TYPE_PING and flags & bw.FLAG_SYN:
                tls.sendall(bw.ping_frame(length, bw.FLAG_ACK))
            if sid == bw.CONTROL_STREAM_ID:
                if flags & bw.FLAG_SYN:
                    tls.sendall(bw.window_update_frame(1, 0, bw.FLAG_ACK))
                control += body
                if control and bw.decode_message(control):
                    welcome = bw.encode_message(bw.MSG_WELCOME, [
                        (bw.TAG_SESSION_ID, b"\x11" * 16), (bw.TAG_SERVER_ID, b"scripted"),
                        (bw.TAG_HEARTBEAT_MS, struct.pack(">I", 0))])
                    tls.sendall(bw.data_frame(1, welcome))
                    control = b""
                continue
            if sid and data_sid is None and flags & bw.FLAG_SYN:
                data_sid = sid
            if sid == data_sid:
                self.received += body
                if len(self.received) >= want:
                    break
        out = b""
        if self.mode in ("rst", "rst_late", "close"):
            drain = bw.encode_message(bw.MSG_DRAIN, [
                (bw.TAG_REASON, b"rolling_update"), (bw.TAG_GRACE_MS, struct.pack(">I", 30000)),
                (bw.TAG_RECONNECT_HINT, self.hint.encode())])
            out = bw.data_frame(1, drain) + bw.go_away_frame(bw.GOAWAY_NORMAL)
        if self.mode == "rst_late":
            tls.sendall(out)
            out = b""
            self.go_on.wait(scaled(20))
        if self.mode in ("rst", "rst_late", "rst_only"):
            out += bw.window_update_frame(data_sid, 0, bw.FLAG_RST)
        if out:
            tls.sendall(out)
        if self.mode != "close":
            self.refused.set()
            # keep the session up until the client closes it (it has no stream left)
            try:
                while True:
                    _, buf = self._read_frame(tls, buf)
            except (EOFError, OSError, ssl.SSLError):
                pass
        else:
            self.refused.set()
            try:
                tls.unwrap()  # close_notify
            except (OSError, ssl.SSLError):
                pass
        conn.close()

    def close(self):
        self.lsock.close()


def status(c):
    return json.load(urllib.request.urlopen("http://%s/status" % c.ready["status"], timeout=scaled(10)))


@pytest.fixture
def scripted(certs):
    made = []

    def make(mode, hint):
        s = ScriptedServer(certs, mode, hint)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("mode", ["rst", "rst_late", "close"])
def test_refused_stream_is_replayed_on_the_new_session(mode, server_factory, connect_factory, scripted):
    real = server_factory(server_id="srv-real")
    fake = scripted(mode, "%s:%d" % real.addr)
    c = connect_factory(fake, extra_args=["--status-listen", "127.0.0.1:0", "--log-level", "debug"])
    app = socket.create_connection(c.forward_addr("echo"), timeout=scaled(10))
    app.sendall(REQUEST)
    if mode == "rst_late":
        wait_until(lambda: status(c)["server_id"] == "srv-real", scaled(10), interval=0.01,
                   what="the replacement session")
        fake.go_on.set()
    got = b""
    while len(got) < len(REQUEST):
        chunk = app.recv(65536)
        assert chunk, "local connection closed after %d bytes: the refused stream was not replayed" % len(got)
        got += chunk
    assert got == REQUEST
    assert fake.refused.is_set() and fake.error is None, fake.error
    # the scripted server really had the whole request before refusing it
    assert fake.received.endswith(REQUEST)
    app.sendall(b"and more")  # the replayed stream keeps relaying
    assert app.recv(100) == b"and more"
    app.close()
    st = status(c)
    assert st["counters"]["streams_replayed"] == 1, st
    assert st["server_id"] == "srv-real" and st["state"] == "connected", st
    assert st["counters"]["drains_followed"] == 1, st


def test_refused_stream_without_go_away_is_not_replayed(server_factory, connect_factory, scripted):
    real = server_factory(server_id="srv-real")
    fake = scripted("rst_only", "%s:%d" % real.addr)
    c = connect_factory(fake, extra_args=["--status-listen", "127.0.0.1:0", "--log-level", "debug"])
    app = socket.create_connection(c.forward_addr("echo"), timeout=scaled(10))
    app.sendall(REQUEST)
    with pytest.raises(ConnectionResetError):
        while app.recv(65536):  # a reset, not a clean EOF and not an echo
            pass
    app.close()
    assert fake.error is None, fake.error
    st = status(c)
    assert st["counters"]["streams_replayed"] == 0, st
    assert st["server_id"] == "scripted", st
