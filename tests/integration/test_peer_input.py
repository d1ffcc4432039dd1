"""What a peer sends never reaches a log, /stats or /metrics raw (issue 17
item 6; docs/security.md "Peer input in logs and metrics").

- A HELLO client_id with a newline, ESC, NUL, C1 or bidi characters (valid
  UTF-8) is accepted and written escaped: no forged log line, no raw control
  byte, in both log formats; a JSON log line always parses and is UTF-8.
- A client_id that is not UTF-8 (ff fe c0 af), or longer than 128 bytes, is
  a malformed HELLO: REJECT 1 with a reason that says why
  (docs/protocol.md 3), counted as baton_tunnels_total{result="rejected"}.
- /stats is valid JSON and /metrics parses after all of it.
- `baton connect` escapes what a server sends (WELCOME server_id, REJECT
  reason, DRAIN reason and reconnect_hint) in its logs and JSON events.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import threading

import pytest

import baton_wire as bw
from conftest import TOKEN, Admin, echo_roundtrip, scaled, wait_until

FORGED = "2099-01-01T00:00:00.000 error FORGED by the client"

# Valid UTF-8: accepted, escaped when written.
ACCEPTED_IDS = [
    "nl\n" + FORGED,
    "cr\r" + FORGED,
    "esc\x1b[2J\x1b]0;pwned\x07",
    "nul\x00byte",
    "del\x7f c1\u0085 ls\u2028 rlo\u202etxt.exe",
    'quote" backslash\\n',
]
# Not UTF-8, or too long: REJECT 1.
REJECTED_IDS = [
    (b"\xff\xfe\xc0\xaf", "malformed HELLO: client_id is not valid UTF-8"),
    (b"ok\xc3", "malformed HELLO: client_id is not valid UTF-8"),
    (b"\xed\xa0\x80", "malformed HELLO: client_id is not valid UTF-8"),  # a surrogate
    (b"x" * 129, "malformed HELLO: client_id is longer than 128 bytes"),
]

LINE_START = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (trace|debug|info|warning|warn|error|critical) ")


def raw_stderr(proc) -> bytes:
    proc._stderr.flush()
    return proc.stderr_path.read_bytes()


def assert_no_raw_control_bytes(data: bytes, where: str):
    bad = sorted({b for b in data if (b < 0x20 and b != 0x0A) or b == 0x7F})
    assert not bad, "%s holds raw control bytes %s" % (where, [hex(b) for b in bad])
    text = data.decode("utf-8")  # strict: raises on invalid UTF-8
    for ch in ("\u0085", "\u2028", "\u2029", "\u202e"):
        assert ch not in text, "%s holds %r raw" % (where, ch)
    return text


def run_accepted(srv, client_ctx):
    """Every accepted id gets a session and an echo."""
    for cid in ACCEPTED_IDS:
        with bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), client_id=cid, ctx=client_ctx,
                               timeout=scaled(10)) as t:
            assert echo_roundtrip(t, b"peer input") == b"peer input"
    wait_until(lambda: raw_stderr(srv).count(b"closed: ") >= len(ACCEPTED_IDS), 10, what="every tunnel closed")


def run_rejected(srv, client_ctx):
    """Every rejected id gets REJECT 1 and a reason that says why."""
    for cid, reason in REJECTED_IDS:
        with pytest.raises(bw.Rejected) as e:
            bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), client_id=cid, ctx=client_ctx, timeout=scaled(10))
        assert e.value.code == 1, e.value
        assert e.value.reason == reason, e.value


def check_admin(srv):
    a = Admin(srv)
    r = a.request("GET", "/stats")
    assert r.status == 200, r
    json.loads(r.body.decode("utf-8"))
    m = a.metrics()  # parsed by prometheus_client
    assert m.counter("baton_tunnels_total", result="rejected") == len(REJECTED_IDS)
    assert m.counter("baton_tunnels_total", result="established") == len(ACCEPTED_IDS)


def check_text_lines(data: bytes) -> str:
    lines = data.split(b"\n")
    assert lines[-1] == b"", "stderr does not end with a newline"
    for line in lines[:-1]:
        assert not line.startswith(FORGED.encode()), "a forged log line: %r" % line
        assert LINE_START.match(line), "a line that baton did not start: %r" % line
    return assert_no_raw_control_bytes(data, "server stderr")


def test_client_ids_in_text_logs_are_escaped(server_factory, client_ctx):
    srv = server_factory(extra_args=["--log-level", "debug"])
    run_accepted(srv, client_ctx)
    check_text_lines(raw_stderr(srv))
    run_rejected(srv, client_ctx)
    check_admin(srv)
    srv.stop()
    text = check_text_lines(raw_stderr(srv))
    # The escaped forms, each inside the quoted client id of its welcome line.
    assert '"nl\\n' + FORGED + '"' in text, text[-3000:]
    assert '"cr\\r' + FORGED + '"' in text
    assert '"esc\\x1b[2J\\x1b]0;pwned\\x07"' in text
    assert '"nul\\x00byte"' in text
    assert '"del\\x7f c1\\u{0085} ls\\u{2028} rlo\\u{202e}txt.exe"' in text
    assert '"quote\\" backslash\\\\n"' in text
    assert text.count("malformed control message: HELLO client_id is not valid UTF-8") == 3


def check_json_lines(data: bytes) -> list:
    msgs = []
    for line in data.split(b"\n")[:-1]:
        obj = json.loads(line.decode("utf-8"))  # every line: UTF-8 and one JSON object
        assert set(obj) == {"time", "level", "msg"}, obj
        msg = obj["msg"]
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in msg), msg
        msgs.append(msg)
    assert_no_raw_control_bytes(data, "server stderr")
    return msgs


def test_client_ids_in_json_logs_are_valid_json(server_factory, client_ctx):
    srv = server_factory(extra_args=["--log-level", "debug", "--log-format", "json"])
    run_accepted(srv, client_ctx)
    check_json_lines(raw_stderr(srv))
    run_rejected(srv, client_ctx)
    check_admin(srv)
    srv.stop()
    msgs = check_json_lines(raw_stderr(srv))
    # Decoded, the message is the text format's message: the escapes, not the bytes.
    welcome = [m for m in msgs if "welcome client" in m]
    assert len(welcome) == len(ACCEPTED_IDS), welcome
    assert any('"nl\\n' + FORGED + '"' in m for m in welcome), welcome
    assert any('"nul\\x00byte"' in m for m in welcome), welcome


class ScriptedServer:
    """One TLS connection at a time, server side: answers HELLO with
    WELCOME + DRAIN, or REJECT, every string field full of what a log must
    not print raw."""

    SERVER_ID = b"evil\n" + FORGED.encode() + b"\x1b[31m\xff"
    REASON = b"bye\n" + FORGED.encode() + b"\x00\x1b]0;t\x07\xc0\xaf"
    HINT = b"host\n" + FORGED.encode() + b":1\xfe"

    def __init__(self, certs, mode):
        self.mode = mode
        self.ctx, self.lsock = bw.server_listener(str(certs.server_crt), str(certs.server_key))
        self.addr = self.lsock.getsockname()
        self.served = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self):
        self.lsock.close()

    def _run(self):
        try:
            conn, _ = self.lsock.accept()
            conn.settimeout(scaled(20))
            tls = self.ctx.wrap_socket(conn, server_side=True)
            self._serve(tls)
        except Exception as e:  # reported by the test
            self.error = e

    def _serve(self, tls):
        buf, control = b"", b""
        while True:
            while len(buf) < bw.HEADER_SIZE:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            _, type_, flags, sid, length = bw.decode_header(buf[:bw.HEADER_SIZE])
            n = length if type_ == bw.TYPE_DATA else 0
            while len(buf) < bw.HEADER_SIZE + n:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            body, buf = buf[bw.HEADER_SIZE:bw.HEADER_SIZE + n], buf[bw.HEADER_SIZE + n:]
            if type_ == bw.TYPE_PING and flags & bw.FLAG_SYN:
                tls.sendall(bw.ping_frame(length, bw.FLAG_ACK))
            if sid != bw.CONTROL_STREAM_ID:
                continue
            if flags & bw.FLAG_SYN:
                tls.sendall(bw.window_update_frame(1, 0, bw.FLAG_ACK))
            control += body
            if not (control and bw.decode_message(control)):
                continue
            if self.mode == "reject":
                reject = bw.encode_message(bw.MSG_REJECT, [(bw.TAG_CODE, struct.pack(">H", 2)),
                                                           (bw.TAG_REASON, self.REASON)])
                tls.sendall(bw.data_frame(1, reject) + bw.go_away_frame(bw.GOAWAY_NORMAL))
            else:
                welcome = bw.encode_message(bw.MSG_WELCOME, [
                    (bw.TAG_SESSION_ID, b"\x11" * 16), (bw.TAG_SERVER_ID, self.SERVER_ID),
                    (bw.TAG_HEARTBEAT_MS, struct.pack(">I", 0))])
                drain = bw.encode_message(bw.MSG_DRAIN, [
                    (bw.TAG_REASON, self.REASON), (bw.TAG_GRACE_MS, struct.pack(">I", 30000)),
                    (bw.TAG_RECONNECT_HINT, self.HINT)])
                tls.sendall(bw.data_frame(1, welcome) + bw.data_frame(1, drain) + bw.go_away_frame(bw.GOAWAY_NORMAL))
            self.served.set()
            control = b""


def connect_args(baton_bin, certs, addr, fmt):
    return [baton_bin, "connect", "--server", "%s:%d" % addr, "--forward", "127.0.0.1:0=echo", "--token", TOKEN,
            "--ca", str(certs.ca_crt), "--server-name", "localhost", "--log-level", "debug", "--log-format", fmt]


def check_client_stderr(data: bytes, fmt: str) -> str:
    assert_no_raw_control_bytes(data, "baton connect stderr")
    for line in data.split(b"\n")[:-1]:
        if fmt == "json":
            json.loads(line.decode("utf-8"))
        else:
            assert LINE_START.match(line), "a line that baton did not start: %r" % line
    return data.decode("utf-8")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_connect_escapes_what_the_server_sends_in_reject(baton_bin, certs, fmt):
    srv = ScriptedServer(certs, "reject")
    try:
        r = subprocess.run(connect_args(baton_bin, certs, srv.addr, fmt), capture_output=True, timeout=scaled(30))
    finally:
        srv.close()
    assert srv.error is None, srv.error
    assert r.returncode == 3, r
    text = check_client_stderr(r.stderr, fmt)
    assert "rejected by server: code 2" in text, text
    assert FORGED in text  # as part of the escaped reason, never at the start of a line
    if fmt == "text":
        assert "bye\\n" + FORGED + "\\x00\\x1b]0;t\\x07\\xc0\\xaf" in text, text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_connect_escapes_what_the_server_sends_in_welcome_and_drain(baton_bin, certs, tmp_path, fmt):
    srv = ScriptedServer(certs, "welcome")
    err_path = tmp_path / "connect.stderr"
    with open(err_path, "wb") as err:
        p = subprocess.Popen(connect_args(baton_bin, certs, srv.addr, fmt), stdout=subprocess.PIPE, stderr=err,
                             stdin=subprocess.DEVNULL)
        try:
            ready = json.loads(p.stdout.readline().decode("utf-8"))
            assert ready["event"] == "ready", ready
            assert ready["server_id"] == "evil\\n" + FORGED + "\\x1b[31m\\xff", ready
            events = [json.loads(p.stdout.readline().decode("utf-8")) for _ in range(2)]  # session, drain
            assert [e["event"] for e in events] == ["session", "drain"], events
            assert events[0]["server_id"] == ready["server_id"], events
            drain = events[1]
            assert "\n" not in drain["reason"] and "\x00" not in drain["reason"], drain
            assert drain["reason"] == "bye\\n" + FORGED + "\\x00\\x1b]0;t\\x07\\xc0\\xaf", drain
            wait_until(lambda: b"bad reconnect_hint" in err_path.read_bytes(), 10, what="the bad hint logged")
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(scaled(10))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            srv.close()
    assert srv.error is None, srv.error
    text = check_client_stderr(err_path.read_bytes(), fmt)
    assert "DRAIN from" in text, text
    if fmt == "text":
        assert "host\\n" + FORGED + ":1\\xfe" in text, text


@pytest.mark.parametrize("cid", [b"x" * 129, b"\xff\xfe\xc0\xaf"])
def test_connect_refuses_a_client_id_the_server_would_reject(baton_bin, certs, cid):
    """The server would answer REJECT 1: baton connect says so before dialing."""
    args = [baton_bin.encode(), b"connect", b"--server", b"127.0.0.1:9", b"--forward", b"127.0.0.1:0=echo",
            b"--token", TOKEN.encode(), b"--ca", str(certs.ca_crt).encode(), b"--client-id", cid]
    r = subprocess.run(args, capture_output=True, timeout=scaled(30))
    assert r.returncode == 2, r
    assert b"bad client id" in r.stderr and b"at most 128 bytes of UTF-8" in r.stderr, r.stderr
    assert_no_raw_control_bytes(r.stderr, "baton connect stderr")


def test_admin_error_answers_are_valid_json_for_any_path(server):
    """The admin API echoes the request path in its 404: percent-decoded, it
    may hold any byte. It is made printable (util::printable: a byte that is
    not UTF-8 shows as \\xff, a control character as its escape) before it is
    encoded, so the answer stays valid JSON and UTF-8 with nothing raw in it."""
    r = Admin(server).request("GET", "/%ff%fe%c0%af%0a%1b%22%5c")
    assert r.status == 404, r
    body = json.loads(r.body.decode("utf-8"))  # strict UTF-8, then JSON
    assert body["error"] == "not found", body
    assert body["path"].startswith("/\\xff\\xfe\\xc0\\xaf\\n"), body
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in body["path"]), body
