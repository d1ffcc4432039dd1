"""An independent client for the baton tunnel protocol, version 1.

Written from the protocol text only (docs/protocol.md, first the shared
PROTOCOL.md; no code shared with the C++ implementation), so that the
integration tests check the wire contract and not one implementation against
itself.

Layers, each usable on its own:

* yamux frame codec: ``encode_header`` / ``decode_header`` / ``frame_bytes``
  (section 2).
* control-message TLV codec: ``encode_message`` / ``decode_message`` and the
  HELLO / WELCOME / REJECT / DRAIN helpers (section 3).
* route preamble: ``encode_preamble`` (section 4).
* session resume (section 9): ``Tunnel.connect(..., resume=True)`` keeps what
  it sends until the server's RECEIVED proves it arrived, reports what it
  received, and ``Tunnel.resume(addr)`` carries the session on over a new
  connection after ``cut()`` (or with the old connection left silently
  open).
* ``Tunnel``: TLS 1.2 (Python ``ssl`` / OpenSSL through memory BIOs, so that one
  thread may read while another writes) plus a yamux session with streams,
  windows, pings and Go Away. A background reader thread dispatches incoming
  frames to streams and also records every frame (header and raw bytes) in a
  queue that tests can drain with ``read_frame(timeout)`` for byte-literal
  assertions. ``send_frame`` / ``send_raw`` write anything, including illegal
  frames, for negative tests.

Everything blocks with explicit timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import collections
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

# ---------------------------------------------------------------------------
# Section 2: yamux framing
# ---------------------------------------------------------------------------

HEADER_SIZE = 12
VERSION = 0
INITIAL_WINDOW = 256 * 1024

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
TYPE_NAMES = {0: "Data", 1: "WindowUpdate", 2: "Ping", 3: "GoAway"}

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GOAWAY_NORMAL = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

CONTROL_STREAM_ID = 1

_HEADER = struct.Struct(">BBHII")


def encode_header(type_: int, flags: int, stream_id: int, length: int, version: int = VERSION) -> bytes:
    """The 12-byte header: version u8 | type u8 | flags u16 | stream_id u32 | length u32."""
    return _HEADER.pack(version, type_, flags, stream_id, length)


def decode_header(b: bytes) -> Tuple[int, int, int, int, int]:
    """Returns (version, type, flags, stream_id, length)."""
    if len(b) < HEADER_SIZE:
        raise ValueError("short header: %d bytes" % len(b))
    return _HEADER.unpack_from(b, 0)


def frame_bytes(type_: int, flags: int, stream_id: int, length: Optional[int] = None, body: bytes = b"",
                version: int = VERSION) -> bytes:
    """A whole frame. For Data, length defaults to len(body); for the other
    types `length` carries the increment / opaque value / code."""
    if length is None:
        length = len(body)
    return encode_header(type_, flags, stream_id, length, version) + body


def data_frame(stream_id: int, body: bytes, flags: int = 0) -> bytes:
    return frame_bytes(TYPE_DATA, flags, stream_id, len(body), body)


def window_update_frame(stream_id: int, increment: int, flags: int = 0) -> bytes:
    return frame_bytes(TYPE_WINDOW_UPDATE, flags, stream_id, increment)


def ping_frame(value: int, flags: int = FLAG_SYN) -> bytes:
    return frame_bytes(TYPE_PING, flags, 0, value)


def go_away_frame(code: int) -> bytes:
    return frame_bytes(TYPE_GO_AWAY, 0, 0, code)


@dataclass
class Frame:
    version: int
    type: int
    flags: int
    stream_id: int
    length: int
    body: bytes = b""  # Data body (empty for other types, or when bodies are not captured)
    raw: bytes = b""  # the exact bytes received: header (+ body if captured)

    @property
    def header(self) -> bytes:
        return self.raw[:HEADER_SIZE]

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def __repr__(self) -> str:
        fl = "|".join(n for f, n in ((FLAG_SYN, "SYN"), (FLAG_ACK, "ACK"), (FLAG_FIN, "FIN"), (FLAG_RST, "RST"))
                      if self.flags & f) or "0"
        return "Frame(%s v=%d flags=%s sid=%d len=%d raw=%s)" % (
            TYPE_NAMES.get(self.type, "type%d" % self.type), self.version, fl, self.stream_id, self.length,
            self.header.hex(" "))


# ---------------------------------------------------------------------------
# Section 3: control messages
# ---------------------------------------------------------------------------

MSG_HELLO = 0x01
MSG_WELCOME = 0x02
MSG_REJECT = 0x03
MSG_DRAIN = 0x04
MSG_RESUMED = 0x05
MSG_RECEIVED = 0x06

TAG_VERSION = 0x01
TAG_TOKEN = 0x02
TAG_CLIENT_ID = 0x03
TAG_SESSION_ID = 0x05
TAG_SERVER_ID = 0x06
TAG_HEARTBEAT_MS = 0x07
TAG_CODE = 0x09
TAG_REASON = 0x0A
TAG_GRACE_MS = 0x0B
TAG_RECONNECT_HINT = 0x0C
TAG_RETRY_AFTER_MS = 0x0D
TAG_RESUME_CAPABLE = 0x11
TAG_RESUME_SECRET = 0x12
TAG_RESUME_WINDOW_MS = 0x13
TAG_RESUME_ADDRESS = 0x14
TAG_RESUME_SESSION_ID = 0x15
TAG_RECEIVED = 0x16
TAG_RESUME_REFUSED = 0x17
TAG_RESUME_REFUSED_CODE = 0x18
RECEIPT_EVERY = 64 * 1024

REJECT_UNSUPPORTED_VERSION = 1
REJECT_UNAUTHORIZED = 2
REJECT_OVERLOADED = 3
REJECT_DRAINING = 4


def encode_field(tag: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("field too long")
    return struct.pack(">BH", tag, len(value)) + value


def encode_message(type_: int, fields: List[Tuple[int, bytes]]) -> bytes:
    body = b"".join(encode_field(t, v) for t, v in fields)
    if len(body) > 0xFFFF:
        raise ValueError("message too long")
    return struct.pack(">BH", type_, len(body)) + body


def decode_fields(body: bytes) -> List[Tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(body):
        if i + 3 > len(body):
            raise ValueError("truncated field header at %d" % i)
        tag, ln = struct.unpack_from(">BH", body, i)
        i += 3
        if i + ln > len(body):
            raise ValueError("field 0x%02x overruns message" % tag)
        out.append((tag, body[i:i + ln]))
        i += ln
    return out


def decode_message(buf: bytes) -> Optional[Tuple[int, List[Tuple[int, bytes]], int]]:
    """Decodes one message from the front of buf: (type, fields, bytes used),
    or None if buf does not hold a whole message yet."""
    if len(buf) < 3:
        return None
    type_, ln = struct.unpack_from(">BH", buf, 0)
    if len(buf) < 3 + ln:
        return None
    return type_, decode_fields(bytes(buf[3:3 + ln])), 3 + ln


def hello_message(token: Optional[bytes] = b"", client_id: Optional[Union[str, bytes]] = "pytest",
                  version: Optional[int] = 1, extra_fields: Optional[List[Tuple[int, bytes]]] = None) -> bytes:
    """client_id: a str is sent UTF-8 encoded, bytes as they are (e.g. invalid UTF-8)."""
    fields = []
    if version is not None:
        fields.append((TAG_VERSION, struct.pack(">H", version)))
    if token is not None:
        if isinstance(token, str):
            token = token.encode()
        fields.append((TAG_TOKEN, token))
    if client_id is not None:
        fields.append((TAG_CLIENT_ID, client_id.encode() if isinstance(client_id, str) else bytes(client_id)))
    fields.extend(extra_fields or [])
    return encode_message(MSG_HELLO, fields)


@dataclass
class ControlMessage:
    type: int
    fields: List[Tuple[int, bytes]]
    raw: bytes

    def get(self, tag: int) -> Optional[bytes]:
        for t, v in self.fields:
            if t == tag:
                return v
        return None

    def u16(self, tag: int) -> Optional[int]:
        v = self.get(tag)
        if v is None:
            return None
        if len(v) != 2:
            raise ValueError("field 0x%02x: expected 2 bytes, got %d" % (tag, len(v)))
        return struct.unpack(">H", v)[0]

    def u32(self, tag: int) -> Optional[int]:
        v = self.get(tag)
        if v is None:
            return None
        if len(v) != 4:
            raise ValueError("field 0x%02x: expected 4 bytes, got %d" % (tag, len(v)))
        return struct.unpack(">I", v)[0]

    def text(self, tag: int) -> Optional[str]:
        v = self.get(tag)
        return None if v is None else v.decode("utf-8")

    def u64(self, tag: int) -> Optional[int]:
        v = self.get(tag)
        if v is None:
            return None
        if len(v) != 8:
            raise ValueError("field 0x%02x: expected 8 bytes, got %d" % (tag, len(v)))
        return struct.unpack(">Q", v)[0]


def received_message(offset: int) -> bytes:
    return encode_message(MSG_RECEIVED, [(TAG_RECEIVED, struct.pack(">Q", offset))])


# ---------------------------------------------------------------------------
# Section 4: route preamble
# ---------------------------------------------------------------------------

def encode_preamble(route) -> bytes:
    if isinstance(route, str):
        route = route.encode("ascii")
    if not 1 <= len(route) <= 255:
        raise ValueError("route name must be 1..255 bytes")
    return bytes([len(route)]) + route


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------

SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"]
CURVES = ["P-256", "X25519"]


def server_listener(cert: str, key: str) -> Tuple[ssl.SSLContext, socket.socket]:
    """For test servers that speak the protocol themselves: a TLS 1.2 server
    context with this certificate and a socket listening on 127.0.0.1:0."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    return ctx, lsock


def client_context(ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None,
                   ciphers: Optional[str] = None, curve: Optional[str] = None, alpn: Optional[List[str]] = None,
                   min_version=ssl.TLSVersion.TLSv1_2, max_version=ssl.TLSVersion.TLSv1_2,
                   verify: bool = True) -> ssl.SSLContext:
    """A client SSLContext; TLS 1.2 only by default (section 1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify and ca:
        ctx.load_verify_locations(ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    if curve:
        set_groups(ctx, curve)
    if cert:
        ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _libssl():
    import ctypes
    import ctypes.util
    for name in ("libssl.so.3", ctypes.util.find_library("ssl")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                pass
    raise RuntimeError("libssl not found")


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Restricts the key-exchange groups the client offers (e.g. "X25519",
    "P-256"). Python's SSLContext.set_ecdh_curve cannot name X25519, so this
    calls SSL_CTX_set1_groups_list on the context's SSL_CTX through ctypes,
    after checking that the pointer really is that context."""
    import ctypes
    lib = _libssl()
    if not ssl.OPENSSL_VERSION.startswith("OpenSSL 3"):
        raise RuntimeError("set_groups needs OpenSSL 3: %s" % ssl.OPENSSL_VERSION)
    # PySSLContext: PyObject_HEAD (refcount, type) then SSL_CTX *ctx
    ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_timeout.restype = ctypes.c_long
    lib.SSL_CTX_get_timeout.argtypes = [ctypes.c_void_p]
    saved = ctx.verify_mode
    for mode in (ssl.CERT_NONE, ssl.CERT_REQUIRED):  # prove ptr is ctx's SSL_CTX before writing through it
        chk = ctx.check_hostname
        ctx.check_hostname = False
        ctx.verify_mode = mode
        ok = lib.SSL_CTX_get_verify_mode(ptr) == {ssl.CERT_NONE: 0, ssl.CERT_REQUIRED: 3}[mode]
        ctx.verify_mode = saved
        ctx.check_hostname = chk
        if not ok:
            raise RuntimeError("could not locate SSL_CTX in SSLContext")
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    SSL_CTRL_SET_GROUPS_LIST = 92
    if lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise ValueError("unknown group list %r" % groups)


def negotiated_group(sslobj: ssl.SSLObject) -> Optional[str]:
    """The key-exchange group of an established connection ("X25519",
    "prime256v1"), read with SSL_get_negotiated_group."""
    import ctypes
    lib = _libssl()
    inner = sslobj._sslobj  # _ssl._SSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl
    ptr = ctypes.c_void_p.from_address(id(inner) + 3 * ctypes.sizeof(ctypes.c_void_p)).value
    lib.SSL_get_version.restype = ctypes.c_char_p
    lib.SSL_get_version.argtypes = [ctypes.c_void_p]
    if lib.SSL_get_version(ptr).decode() != sslobj.version():
        raise RuntimeError("could not locate SSL in SSLObject")
    lib.SSL_ctrl.restype = ctypes.c_long
    lib.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    SSL_CTRL_GET_NEGOTIATED_GROUP = 134
    nid = lib.SSL_ctrl(ptr, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
    lib.OBJ_nid2sn.restype = ctypes.c_char_p
    lib.OBJ_nid2sn.argtypes = [ctypes.c_int]
    try:
        crypto = ctypes.CDLL("libcrypto.so.3")
        crypto.OBJ_nid2sn.restype = ctypes.c_char_p
        crypto.OBJ_nid2sn.argtypes = [ctypes.c_int]
        sn = crypto.OBJ_nid2sn(nid)
    except OSError:
        sn = None
    return sn.decode() if sn else str(nid)


class WireError(Exception):
    pass


class Rejected(WireError):
    def __init__(self, msg: ControlMessage):
        self.message = msg
        self.code = msg.u16(TAG_CODE)
        self.reason = msg.text(TAG_REASON)
        super().__init__("REJECT code=%s reason=%r" % (self.code, self.reason))


class ResumeRefused(WireError):
    """The server answered a resuming HELLO with a fresh session (WELCOME
    with resume_refused); .welcome is that WELCOME."""

    def __init__(self, msg: ControlMessage):
        self.welcome = msg
        self.code = msg.u16(TAG_RESUME_REFUSED_CODE)
        super().__init__("resume refused (code %s): %s" % (self.code, msg.text(TAG_RESUME_REFUSED)))


class StreamReset(WireError):
    pass


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# ---------------------------------------------------------------------------
# Streams and the session
# ---------------------------------------------------------------------------

class Stream:
    """One yamux stream. Reads and writes block with timeouts.

    Window accounting: `send_window` is what the peer allows us to send; the
    receive side grants the peer new window as the application consumes data
    (`recv`), in one Window Update when at least half the window was consumed,
    like hashicorp/yamux. `auto_window=False` stops granting (a reader that
    stops reading)."""

    def __init__(self, tunnel: "Tunnel", stream_id: int, recv_window: int = INITIAL_WINDOW):
        self.tunnel = tunnel
        self.id = stream_id
        self.cond = threading.Condition(tunnel._lock)
        self.send_window = INITIAL_WINDOW
        self.recv_window_max = recv_window
        self.recv_window = INITIAL_WINDOW  # what the peer may still send before our next grant
        self.consumed_ungranted = 0
        self.auto_window = True
        self.buf = collections.deque()
        self.buffered = 0
        self.received_total = 0
        self.acked = False
        self.remote_fin = False
        self.reset = False
        self.local_fin = False
        self.window_updates: List[int] = []  # increments received, in order

    # -- receive ---------------------------------------------------------
    def _on_data(self, body: bytes) -> None:  # called with the lock held
        if body:
            self.buf.append(body)
            self.buffered += len(body)
            self.received_total += len(body)
            self.recv_window -= len(body)
        self.cond.notify_all()

    def recv(self, max_bytes: int = 1 << 20, timeout: Optional[float] = 10.0) -> bytes:
        """Up to max_bytes; b"" at FIN (after all data). Raises StreamReset on
        RST, TimeoutError when nothing arrives in time."""
        dl = _deadline(timeout)
        with self.cond:
            while not self.buf:
                if self.remote_fin:
                    return b""
                if self.reset:
                    raise StreamReset("stream %d was reset" % self.id)
                if self.tunnel.closed and not self.buf:
                    raise ConnectionError("tunnel closed (stream %d)" % self.id)
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("stream %d: no data within %ss" % (self.id, timeout))
                self.cond.wait(rem)
            out = []
            n = 0
            while self.buf and n < max_bytes:
                chunk = self.buf[0]
                take = min(len(chunk), max_bytes - n)
                out.append(chunk[:take])
                if take == len(chunk):
                    self.buf.popleft()
                else:
                    self.buf[0] = chunk[take:]
                n += take
            self.buffered -= n
            self.consumed_ungranted += n
            grant = self._grant_locked()
        if grant:
            self.tunnel.send_frame(TYPE_WINDOW_UPDATE, 0, self.id, grant)
        return b"".join(out)

    def _grant_locked(self) -> int:
        if not self.auto_window or self.reset or self.remote_fin:
            return 0
        if self.consumed_ungranted >= self.recv_window_max // 2:
            g = self.consumed_ungranted
            self.consumed_ungranted = 0
            self.recv_window += g
            return g
        return 0

    def recv_exactly(self, n: int, timeout: Optional[float] = 10.0) -> bytes:
        dl = _deadline(timeout)
        out = bytearray()
        while len(out) < n:
            chunk = self.recv(n - len(out), timeout=_remaining(dl))
            if not chunk:
                raise EOFError("stream %d: FIN after %d of %d bytes" % (self.id, len(out), n))
            out += chunk
        return bytes(out)

    def recv_all(self, timeout: Optional[float] = 10.0) -> bytes:
        """Everything until FIN."""
        dl = _deadline(timeout)
        out = bytearray()
        while True:
            chunk = self.recv(1 << 20, timeout=_remaining(dl))
            if not chunk:
                return bytes(out)
            out += chunk

    def grant(self, increment: int) -> None:
        """Sends a Window Update of `increment` (a bigger window)."""
        with self.cond:
            self.recv_window += increment
        self.tunnel.send_frame(TYPE_WINDOW_UPDATE, 0, self.id, increment)

    # -- send ------------------------------------------------------------
    def send(self, data: bytes, timeout: Optional[float] = 10.0, respect_window: bool = True) -> None:
        """Sends data in Data frames, never beyond the peer's window unless
        respect_window is False (for protocol-error tests)."""
        dl = _deadline(timeout)
        mv = memoryview(data)
        max_frame = self.tunnel.max_frame
        while len(mv):
            with self.cond:
                if respect_window:
                    while self.send_window <= 0:
                        if self.reset:
                            raise StreamReset("stream %d was reset" % self.id)
                        if self.tunnel.closed:
                            raise ConnectionError("tunnel closed")
                        rem = _remaining(dl)
                        if rem == 0.0:
                            raise TimeoutError("stream %d: send window stayed 0 for %ss" % (self.id, timeout))
                        self.cond.wait(rem)
                    n = min(len(mv), self.send_window, max_frame)
                else:
                    n = min(len(mv), max_frame)
                if self.reset:
                    raise StreamReset("stream %d was reset" % self.id)
                self.send_window -= n
            self.tunnel.send_frame(TYPE_DATA, 0, self.id, n, bytes(mv[:n]))
            mv = mv[n:]

    def close_write(self, via_window_update: bool = False) -> None:
        """Half-close: FIN on an empty Data frame, or on a Window Update of 0
        (what hashicorp/yamux sends)."""
        with self.cond:
            self.local_fin = True
        self.tunnel.send_frame(TYPE_WINDOW_UPDATE if via_window_update else TYPE_DATA, FLAG_FIN, self.id, 0)

    def send_rst(self) -> None:
        with self.cond:
            self.reset = True
            self.cond.notify_all()
        self.tunnel.send_frame(TYPE_WINDOW_UPDATE, FLAG_RST, self.id, 0)

    def wait_acked(self, timeout: float = 10.0) -> bool:
        """True once the peer ACKed; False if it was reset first. TimeoutError otherwise."""
        dl = _deadline(timeout)
        with self.cond:
            while not self.acked and not self.reset:
                if self.tunnel.closed:
                    raise ConnectionError("tunnel closed before stream %d was accepted" % self.id)
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("stream %d: neither ACK nor RST within %ss" % (self.id, timeout))
                self.cond.wait(rem)
            return self.acked and not self.reset

    def wait_reset(self, timeout: float = 10.0) -> None:
        dl = _deadline(timeout)
        with self.cond:
            while not self.reset:
                if self.tunnel.closed:
                    raise ConnectionError("tunnel closed before stream %d was reset" % self.id)
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("stream %d: no RST within %ss" % (self.id, timeout))
                self.cond.wait(rem)

    def wait_send_window(self, at_least: int, timeout: float = 10.0) -> int:
        dl = _deadline(timeout)
        with self.cond:
            while self.send_window < at_least:
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("stream %d: send window %d < %d after %ss" %
                                       (self.id, self.send_window, at_least, timeout))
                self.cond.wait(rem)
            return self.send_window


class Tunnel:
    """A TLS connection carrying a yamux session.

    Construct with Tunnel.connect(...) (TLS + control stream + HELLO + WELCOME)
    or Tunnel.open_tls(...) (TLS only; the test drives the rest by hand).
    """

    def __init__(self, sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, capture: bool = True, capture_bodies: bool = True,
                 auto_pong: bool = True):
        self.sock = sock
        self.ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._ssl_lock = threading.Lock()  # guards the SSLObject and its BIOs
        self._send_lock = threading.Lock()  # keeps records in order on the socket
        self._lock = threading.RLock()  # guards session state; Stream conditions share it
        self.cond = threading.Condition(self._lock)
        self.streams: Dict[int, Stream] = {}
        self.next_id = 1
        self.max_frame = 64 * 1024
        self.capture = capture
        self.capture_bodies = capture_bodies
        self.auto_pong = auto_pong
        self.frames: "queue.Queue[Frame]" = queue.Queue()
        self.pongs: Dict[int, Frame] = {}
        self.go_away: Optional[Frame] = None
        self.closed = False
        self.close_reason: Optional[str] = None
        self.bytes_in_plain = 0
        self.bytes_in_raw = 0  # TLS bytes received (records, headers and tags included)
        self.control_buf = bytearray()
        self.control_msgs: "queue.Queue[ControlMessage]" = queue.Queue()
        self.welcome: Optional[ControlMessage] = None
        self.on_frame: Optional[Callable[[Frame], None]] = None
        self._reading = threading.Event()
        self._reading.set()
        self._plain = bytearray()
        self._reader: Optional[threading.Thread] = None
        # Session resume (section 9): offsets of both session streams, and
        # the bytes of ours the server has not yet reported received.
        self.resume_keeping = False
        self.sent_total = 0
        self.kept = bytearray()  # our stream's bytes [kept_base, sent_total)
        self.kept_base = 0
        self.reported = 0  # our last RECEIVED
        self.receipts = 0  # RECEIVEDs from the server
        self.resume_secret: Optional[bytes] = None
        self.connections = 1

    # -- construction ----------------------------------------------------
    @classmethod
    def open_tls(cls, addr: Tuple[str, int], ctx: Optional[ssl.SSLContext] = None, server_name: str = "localhost",
                 session: Optional[ssl.SSLSession] = None, timeout: float = 10.0, **kw) -> "Tunnel":
        """TCP connect + TLS handshake; starts the reader thread. Raises
        ssl.SSLError / ConnectionError if the server refuses."""
        sock, sslobj, incoming, outgoing = cls._tls_connection(addr, ctx, server_name, session, timeout)
        t = cls(sock, sslobj, incoming, outgoing, **kw)
        t._reader = threading.Thread(target=t._read_loop, name="baton-wire-reader", daemon=True)
        t._reader.start()
        return t

    @staticmethod
    def _tls_connection(addr, ctx, server_name, session, timeout):
        if ctx is None:
            ctx = client_context()
        sock = socket.create_connection(addr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False,
                              server_hostname=server_name if ctx.check_hostname or server_name else None,
                              session=session)
        try:
            dl = _deadline(timeout)
            while True:
                try:
                    sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
                sock.settimeout(max(0.001, _remaining(dl)))
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    raise TimeoutError("TLS handshake timed out")
                if not data:
                    raise ConnectionError("server closed the connection during the TLS handshake")
                incoming.write(data)
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
        except BaseException:
            # Flush an alert if OpenSSL produced one, then close.
            try:
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
            except OSError:
                pass
            sock.close()
            raise
        sock.settimeout(None)
        return sock, sslobj, incoming, outgoing

    @classmethod
    def connect(cls, addr: Tuple[str, int], token=b"", client_id: str = "pytest", ctx: Optional[ssl.SSLContext] = None,
                server_name: str = "localhost", session: Optional[ssl.SSLSession] = None, timeout: float = 10.0,
                syn_with_data: bool = False, resume: bool = False, **kw) -> "Tunnel":
        """Full session start: TLS, stream 1 SYN, HELLO, WELCOME. Raises
        Rejected on REJECT. With resume, asks for a resumable session
        (section 9.2) and keeps what it sends from the first byte."""
        t = cls.open_tls(addr, ctx=ctx, server_name=server_name, session=session, timeout=timeout, **kw)
        try:
            t.resume_keeping = resume
            t.hello(token=token, client_id=client_id, syn_with_data=syn_with_data, resume_capable=resume)
            w = t.wait_welcome(timeout)
            t.resume_secret = w.get(TAG_RESUME_SECRET)
            if t.resume_secret is None:
                with t._send_lock:
                    t.resume_keeping = False
                    t.kept.clear()
        except BaseException:
            t.close()
            raise
        return t

    def hello(self, token=b"", client_id: Optional[str] = "pytest", version: Optional[int] = 1,
              syn_with_data: bool = False, raw_message: Optional[bytes] = None,
              resume_capable: bool = False) -> Stream:
        """Opens the control stream (id 1) and sends HELLO."""
        extra = [(TAG_RESUME_CAPABLE, b"\x01")] if resume_capable else None
        msg = raw_message if raw_message is not None else hello_message(token, client_id, version, extra)
        with self._lock:
            s = self.streams.get(1)
        if s is not None:  # control stream already opened with open_control()
            s.send(msg)
            return s
        with self._lock:
            assert self.next_id == 1, "control stream must be the first stream"
            s = Stream(self, 1)
            self.streams[1] = s
            self.next_id = 3
        if syn_with_data:
            s.send_window -= len(msg)
            self.send_frame(TYPE_DATA, FLAG_SYN, 1, len(msg), msg)
        else:
            self.send_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
            s.send(msg)
        return s

    def open_control(self) -> Stream:
        """Opens stream 1 (Window Update SYN) without sending HELLO."""
        with self._lock:
            assert self.next_id == 1, "control stream must be the first stream"
            s = Stream(self, 1)
            self.streams[1] = s
            self.next_id = 3
        self.send_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
        return s

    def next_control(self, timeout: float = 10.0) -> ControlMessage:
        """The next control message received on stream 1."""
        dl = _deadline(timeout)
        while True:
            try:
                return self.control_msgs.get(timeout=min(0.05, _remaining(dl) or 0.0) or 0.001)
            except queue.Empty:
                if self.closed and self.control_msgs.empty():
                    raise ConnectionError("tunnel closed before a control message (%s)" % self.close_reason)
                if _remaining(dl) == 0.0:
                    raise TimeoutError("no control message within %ss" % timeout)

    def wait_welcome(self, timeout: float = 10.0) -> ControlMessage:
        dl = _deadline(timeout)
        while True:
            m = self.next_control(_remaining(dl))
            if m.type == MSG_WELCOME:
                self.welcome = m
                return m
            if m.type == MSG_REJECT:
                raise Rejected(m)
            # DRAIN or unknown message types before WELCOME: keep waiting

    @property
    def session_id(self) -> Optional[bytes]:
        return self.welcome.get(TAG_SESSION_ID) if self.welcome else None

    # -- sending ---------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Arbitrary plaintext bytes through TLS (one or more records)."""
        with self._send_lock:
            self.sent_total += len(data)
            if not self.resume_keeping:
                self._send_uncounted(data)
                return
            self.kept += data
            try:
                self._send_uncounted(data)
            except (OSError, ssl.SSLError):
                # A resumable session outlives its connection: what could not
                # go is kept, and resume() sends it (section 9).
                pass

    def _send_uncounted(self, data: bytes) -> None:  # _send_lock held
        with self._ssl_lock:
            view = memoryview(data)
            while len(view):
                n = self.ssl.write(view[:16384])
                view = view[n:]
            enc = self._out.read()
        self.sock.sendall(enc)

    def send_frame(self, type_: int, flags: int, stream_id: int, length: Optional[int] = None, body: bytes = b"",
                   version: int = VERSION) -> None:
        self.send_raw(frame_bytes(type_, flags, stream_id, length, body, version))

    def open_stream(self, route: Optional[str] = None, stream_id: Optional[int] = None, syn_with_data: bool = False,
                    recv_window: int = INITIAL_WINDOW, extra: bytes = b"") -> Stream:
        """Opens a stream (SYN) and writes the route preamble (+ extra) as its
        first bytes. Does not wait for the ACK (see Stream.wait_acked)."""
        with self._lock:
            if stream_id is None:
                stream_id = self.next_id
                self.next_id += 2
            s = Stream(self, stream_id, recv_window)
            self.streams[stream_id] = s
        first = (encode_preamble(route) if route is not None else b"") + extra
        if syn_with_data and first:
            s.send_window -= len(first)
            self.send_frame(TYPE_DATA, FLAG_SYN, stream_id, len(first), first)
        else:
            self.send_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0)
            if first:
                try:
                    s.send(first)
                except StreamReset:
                    pass  # refused right after the SYN: the caller sees it in wait_acked()
        return s

    def ping(self, value: int, timeout: float = 10.0) -> Frame:
        """Ping SYN; returns the Ping ACK frame that carries `value`."""
        self.send_frame(TYPE_PING, FLAG_SYN, 0, value)
        dl = _deadline(timeout)
        with self.cond:
            while value not in self.pongs:
                if self.closed:
                    raise ConnectionError("tunnel closed while waiting for ping ACK")
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("no ping ACK for %d within %ss" % (value, timeout))
                self.cond.wait(rem)
            return self.pongs.pop(value)

    def send_go_away(self, code: int = GOAWAY_NORMAL) -> None:
        self.send_frame(TYPE_GO_AWAY, 0, 0, code)

    # -- receiving -------------------------------------------------------
    def pause_reading(self) -> None:
        """Stops reading the socket (after the record being processed): the
        peer's writes then back up in the kernel buffers."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def _read_loop(self) -> None:
        reason = "eof"
        try:
            while True:
                self._reading.wait()
                try:
                    data = self.sock.recv(256 * 1024)
                except OSError as e:
                    reason = "socket error: %s" % e
                    break
                if not data:
                    reason = "eof"
                    break
                self.bytes_in_raw += len(data)
                plain = []
                with self._ssl_lock:
                    self._in.write(data)
                    try:
                        while True:
                            chunk = self.ssl.read(256 * 1024)
                            if not chunk:
                                break
                            plain.append(chunk)
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLZeroReturnError:
                        reason = "close_notify"
                        data = None
                    except ssl.SSLError as e:
                        reason = "tls error: %s" % e
                        data = None
                for p in plain:
                    self._on_plain(p)
                if data is None:
                    break
        except Exception as e:  # a decoding bug must not hang the tests silently
            reason = "reader crashed: %r" % e
            raise
        finally:
            with self.cond:
                self.closed = True
                self.close_reason = reason
                for s in self.streams.values():
                    s.cond.notify_all()
                self.cond.notify_all()

    def _on_plain(self, data: bytes) -> None:
        self.bytes_in_plain += len(data)
        try:
            self._parse_plain(data)
        finally:
            if self.resume_keeping and self.bytes_in_plain - self.reported >= RECEIPT_EVERY:
                self.reported = self.bytes_in_plain
                threading.Thread(target=self._send_receipt, args=(self.reported,), daemon=True).start()

    def send_receipt(self) -> int:
        """RECEIVED for everything received so far (section 9.1: a client
        sends one at least once per heartbeat interval); returns the offset."""
        offset = self.reported = self.bytes_in_plain
        with self._lock:
            s = self.streams[CONTROL_STREAM_ID]
        s.send(received_message(offset))
        return offset

    def _send_receipt(self, offset: int) -> None:
        try:
            with self._lock:
                s = self.streams.get(CONTROL_STREAM_ID)
            if s is not None:
                s.send(received_message(offset), timeout=30.0)
        except (OSError, ssl.SSLError, ValueError, WireError, TimeoutError):
            pass

    def _parse_plain(self, data: bytes) -> None:
        self._plain += data
        buf = self._plain
        off = 0
        while len(buf) - off >= HEADER_SIZE:
            version, type_, flags, sid, length = _HEADER.unpack_from(buf, off)
            body_len = length if type_ == TYPE_DATA else 0
            if len(buf) - off < HEADER_SIZE + body_len:
                break
            raw_end = off + HEADER_SIZE + body_len
            body = bytes(buf[off + HEADER_SIZE:raw_end]) if body_len else b""
            raw = bytes(buf[off:raw_end]) if (self.capture_bodies or not body_len) else bytes(buf[off:off + HEADER_SIZE])
            off = raw_end
            fr = Frame(version, type_, flags, sid, length, body, raw)
            self._dispatch(fr)
        del buf[:off]

    def _dispatch(self, fr: Frame) -> None:
        if self.capture:
            if self.capture_bodies or fr.type != TYPE_DATA:
                self.frames.put(fr)
            else:
                self.frames.put(Frame(fr.version, fr.type, fr.flags, fr.stream_id, fr.length, b"", fr.raw))
        if self.on_frame:
            self.on_frame(fr)
        with self.cond:
            if fr.type == TYPE_PING:
                if fr.flags & FLAG_ACK:
                    self.pongs[fr.length] = fr
                    self.cond.notify_all()
                elif fr.flags & FLAG_SYN and self.auto_pong:
                    threading.Thread(target=self._safe_send, args=(ping_frame(fr.length, FLAG_ACK),),
                                     daemon=True).start()
                return
            if fr.type == TYPE_GO_AWAY:
                self.go_away = fr
                self.cond.notify_all()
                return
            if fr.type not in (TYPE_DATA, TYPE_WINDOW_UPDATE):
                return
            s = self.streams.get(fr.stream_id)
            if s is None:
                if fr.flags & FLAG_SYN:  # server-opened stream: not in version 1's client role; refuse
                    s = Stream(self, fr.stream_id)
                    self.streams[fr.stream_id] = s
                else:
                    return
            if fr.flags & FLAG_ACK:
                s.acked = True
            if fr.type == TYPE_WINDOW_UPDATE:
                s.send_window += fr.length
                s.window_updates.append(fr.length)
            else:
                s._on_data(fr.body)
                if fr.stream_id == CONTROL_STREAM_ID:
                    self._on_control_bytes(s)
            if fr.flags & FLAG_FIN:
                s.remote_fin = True
            if fr.flags & FLAG_RST:
                s.reset = True
            s.cond.notify_all()
            self.cond.notify_all()

    def _on_control_bytes(self, s: Stream) -> None:  # lock held
        while s.buf:
            chunk = s.buf.popleft()
            s.buffered -= len(chunk)
            s.consumed_ungranted += len(chunk)
            self.control_buf += chunk
        g = s._grant_locked()
        if g:
            threading.Thread(target=self._safe_send, args=(window_update_frame(1, g),), daemon=True).start()
        while True:
            r = decode_message(self.control_buf)
            if r is None:
                break
            type_, fields, used = r
            raw = bytes(self.control_buf[:used])
            del self.control_buf[:used]
            m = ControlMessage(type_, fields, raw)
            if type_ == MSG_RECEIVED and self.resume_keeping:
                self._on_receipt(m.u64(TAG_RECEIVED))
                continue
            self.control_msgs.put(m)

    def _on_receipt(self, offset: int) -> None:
        with self._send_lock:
            self.receipts += 1
            if offset > self.sent_total:
                raise ValueError("RECEIVED %d beyond the %d bytes sent" % (offset, self.sent_total))
            drop = offset - self.kept_base
            if drop > 0:
                del self.kept[:drop]
                self.kept_base = offset

    def _safe_send(self, data: bytes) -> None:
        try:
            self.send_raw(data)
        except (OSError, ssl.SSLError, ValueError):
            pass

    def read_frame(self, timeout: float = 10.0) -> Frame:
        """The next frame received (all frames, in order, including those the
        session also dispatched to streams). TimeoutError if none in time,
        EOFError if the connection closed and no frame is left."""
        dl = _deadline(timeout)
        while True:
            try:
                return self.frames.get(timeout=min(0.05, _remaining(dl)) or 0.001)
            except queue.Empty:
                if self.closed and self.frames.empty():
                    raise EOFError("connection closed (%s)" % self.close_reason)
                if _remaining(dl) == 0.0:
                    raise TimeoutError("no frame within %ss" % timeout)

    def read_until(self, pred: Callable[[Frame], bool], timeout: float = 10.0) -> Tuple[Frame, List[Frame]]:
        """Reads frames until pred(frame); returns (that frame, frames before it)."""
        dl = _deadline(timeout)
        seen = []
        while True:
            fr = self.read_frame(_remaining(dl))
            if pred(fr):
                return fr, seen
            seen.append(fr)

    def drain_frames(self) -> List[Frame]:
        out = []
        while True:
            try:
                out.append(self.frames.get_nowait())
            except queue.Empty:
                return out

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once the server closed the connection (TCP EOF / close_notify /
        reset), False if still open after timeout."""
        dl = _deadline(timeout)
        with self.cond:
            while not self.closed:
                rem = _remaining(dl)
                if rem == 0.0:
                    return False
                self.cond.wait(rem)
            return True

    def wait_go_away(self, timeout: float = 10.0) -> Frame:
        dl = _deadline(timeout)
        with self.cond:
            while self.go_away is None:
                if self.closed:
                    raise ConnectionError("closed without Go Away (%s)" % self.close_reason)
                rem = _remaining(dl)
                if rem == 0.0:
                    raise TimeoutError("no Go Away within %ss" % timeout)
                self.cond.wait(rem)
            return self.go_away

    # -- session resume (section 9) -------------------------------------
    def cut(self, reset: bool = True) -> None:
        """The connection breaks under the session: a TCP reset (or, with
        reset=False, a FIN without close_notify). The session stays here."""
        # The reader first (SHUT_RD sends nothing): a close while another
        # thread sits in recv() would not release the socket until that returns.
        self._stop_reader()
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.sock.close()

    def abandon(self) -> None:
        """Stops using the connection without a word to the server (a NAT
        rebinding: the server sees nothing): reading stops here (SHUT_RD
        sends nothing), the socket stays open until resume() drops it."""
        self._stop_reader()

    def _stop_reader(self) -> None:
        if self._reader is not None and self._reader.is_alive():
            try:
                self.sock.shutdown(socket.SHUT_RD)  # wakes the reader's recv; nothing goes to the peer
            except OSError:
                pass
            self._reading.set()
            self._reader.join(5)

    def resume(self, addr: Tuple[str, int], token=b"", client_id: str = "pytest", ctx: Optional[ssl.SSLContext] = None,
               server_name: str = "localhost", session: Optional[ssl.SSLSession] = None, timeout: float = 10.0,
               secret: Optional[bytes] = None, received: Optional[int] = None,
               session_id: Optional[bytes] = None) -> ControlMessage:
        """Resumes this session over a new connection (section 9.4): HELLO
        with the session id, secret and our received offset, then RESUMED,
        then our kept bytes from the server's offset. Returns RESUMED.
        secret / received / session_id override what is sent (negative
        tests). Raises ResumeRefused when the server starts a fresh session
        instead (the new connection is closed then), Rejected on REJECT."""
        assert self.resume_secret is not None, "not a resumable session"
        self._stop_reader()  # what we received is settled before we say how much
        sock, sslobj, incoming, outgoing = self._tls_connection(addr, ctx, server_name, session, timeout)
        sid = session_id if session_id is not None else self.session_id
        rcv = received if received is not None else self.bytes_in_plain
        fields = [(TAG_RESUME_CAPABLE, b"\x01"), (TAG_RESUME_SESSION_ID, sid),
                  (TAG_RESUME_SECRET, secret if secret is not None else self.resume_secret),
                  (TAG_RECEIVED, struct.pack(">Q", rcv))]
        hello = hello_message(token, client_id, 1, fields)
        setup = frame_bytes(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + frame_bytes(TYPE_DATA, 0, 1, len(hello), hello)

        def send(data: bytes) -> None:
            sslobj.write(data)
            sock.sendall(outgoing.read())

        send(setup)
        # The setup session: frames up to RESUMED (which ends its record) or WELCOME.
        plain = bytearray()
        control = bytearray()
        answer: Optional[ControlMessage] = None
        after: List[bytes] = []  # plaintext records after RESUMED: the resumed session's
        dl = _deadline(timeout)
        try:
            while answer is None:
                sock.settimeout(max(0.001, _remaining(dl) or 0.001))
                try:
                    data = sock.recv(256 * 1024)
                except socket.timeout:
                    raise TimeoutError("no answer to the resuming HELLO within %ss" % timeout)
                if not data:
                    raise ConnectionError("server closed the connection before answering the resuming HELLO")
                incoming.write(data)
                while True:
                    try:
                        rec = sslobj.read(256 * 1024)  # one record's plaintext
                    except ssl.SSLWantReadError:
                        break
                    if not rec:
                        break
                    if answer is not None:
                        after.append(rec)
                        continue
                    plain += rec
                    while len(plain) >= HEADER_SIZE:
                        version, type_, flags, sid_, length = _HEADER.unpack_from(plain, 0)
                        body_len = length if type_ == TYPE_DATA else 0
                        if len(plain) < HEADER_SIZE + body_len:
                            break
                        body = bytes(plain[HEADER_SIZE:HEADER_SIZE + body_len])
                        del plain[:HEADER_SIZE + body_len]
                        if type_ == TYPE_DATA and sid_ == CONTROL_STREAM_ID:
                            control += body
                    while answer is None:
                        r = decode_message(control)
                        if r is None:
                            break
                        type_, fields_, used = r
                        m = ControlMessage(type_, fields_, bytes(control[:used]))
                        del control[:used]
                        if type_ == MSG_REJECT:
                            raise Rejected(m)
                        if type_ in (MSG_RESUMED, MSG_WELCOME):
                            answer = m
                    if answer is not None and answer.type == MSG_RESUMED and (plain or control):
                        raise WireError("RESUMED is not the last frame of its record (%d bytes follow)" %
                                        (len(plain) + len(control)))
        except BaseException:
            sock.close()
            raise
        if answer.type == MSG_WELCOME:
            sock.close()
            raise ResumeRefused(answer)
        # The old connection is done with (closed already after cut()).
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass
        offset = answer.u64(TAG_RECEIVED)
        with self._send_lock:
            if offset < self.kept_base or offset > self.sent_total:
                sock.close()
                raise WireError("RESUMED offset %d outside the %d..%d kept" % (offset, self.kept_base, self.sent_total))
            del self.kept[:offset - self.kept_base]
            self.kept_base = offset
            with self._ssl_lock:
                self.sock, self.ssl, self._in, self._out = sock, sslobj, incoming, outgoing
            self.resume_secret = answer.get(TAG_RESUME_SECRET)
            self.connections += 1
            with self.cond:
                self.closed = False
                self.close_reason = None
            sock.settimeout(None)
            self._send_uncounted(bytes(self.kept))  # sent again, still kept until RECEIVED
        for rec in after:
            self._on_plain(rec)
        self._reading.set()
        self._reader = threading.Thread(target=self._read_loop, name="baton-wire-reader", daemon=True)
        self._reader.start()
        return answer

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reading.set()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Plain-socket helpers used by tests
# ---------------------------------------------------------------------------

def wait_socket_closed(sock: socket.socket, timeout: float) -> Optional[float]:
    """Reads and discards from sock until EOF or a reset; returns the time
    (monotonic) the close was seen, or None if still open after timeout."""
    dl = _deadline(timeout)
    while True:
        rem = _remaining(dl)
        if rem == 0.0:
            return None
        r, _, _ = select.select([sock], [], [], rem)
        if not r:
            continue
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic()
        except OSError:
            return time.monotonic()
        if not data:
            return time.monotonic()


def tls10_client_hello() -> bytes:
    """A hand-made TLS 1.0 ClientHello record (record version 3.1, client
    version 3.1, classic CBC suites, no extensions beyond what 1.0 knows)."""
    suites = [0xC013, 0xC014, 0x002F, 0x0035, 0x000A]
    body = b"\x03\x01" + os.urandom(32) + b"\x00"  # client_version 1.0, random, empty session id
    body += struct.pack(">H", 2 * len(suites)) + b"".join(struct.pack(">H", s) for s in suites)
    body += b"\x01\x00"  # compression methods: null
    # extensions: supported_groups (secp256r1), ec_point_formats (uncompressed)
    ext = struct.pack(">HHH", 0x000A, 4, 2) + struct.pack(">H", 23)
    ext += struct.pack(">HHB", 0x000B, 2, 1) + b"\x00"
    body += struct.pack(">H", len(ext)) + ext
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def client_hello(ctx: ssl.SSLContext, server_name: str = "localhost") -> bytes:
    """The bytes of the first flight a client with `ctx` sends (its
    ClientHello record), for tests that deliver it slowly or in part."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if not hello.startswith(b"\x16\x03"):
        raise RuntimeError("not a TLS handshake record: %r" % hello[:8])
    return hello
