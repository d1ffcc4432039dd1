"""Threaded TCP upstreams on 127.0.0.1 (port 0) for the integration tests.

EchoServer    echoes bytes; on EOF it half-closes its side after echoing all.
SinkServer    reads and counts/hashes everything, never writes.
SourceServer  writes a deterministic pattern (PatternStream) up to `limit`
              bytes, counting what the kernel accepted; never reads.
ScriptedServer  runs a function(conn, record) per connection.
BlackHole     a listener whose accept queue is full: connects to it hang
              (a local stand-in for an unreachable host).
closed_port() a bound, not listening socket: connects to it are refused.

Each accepted connection gets a ConnRecord (bytes in/out, sha256 of input,
EOF seen, events) so tests can wait on what the upstream saw.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import struct
import threading
import time
from typing import Callable, List, Optional


class PatternStream:
    """An endless byte stream from a random block whose length (1 MiB + 7)
    is odd, so that lost, duplicated or reordered chunks never line up."""

    def __init__(self, seed: int = 1234, block: int = (1 << 20) + 7):
        rnd = random.Random(seed)
        self.block = rnd.randbytes(block)
        self.n = block
        self.doubled = self.block + self.block

    def at(self, offset: int, length: int) -> bytes:
        """length bytes starting at absolute offset (length <= block size)."""
        o = offset % self.n
        if length <= self.n:
            return self.doubled[o:o + length]
        out = bytearray()
        while len(out) < length:
            take = min(self.n, length - len(out))
            out += self.at(offset + len(out), take)
        return bytes(out)


class ConnRecord:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = 0
        self.sent = 0
        self.sha_in = hashlib.sha256()
        self.data_in: Optional[bytearray] = None  # filled if the server keeps input
        self.eof = threading.Event()  # the peer half-closed (recv returned b"")
        self.done = threading.Event()  # the handler returned
        self.error: Optional[BaseException] = None
        self.events: List[tuple] = []  # (monotonic time, what)
        self.lock = threading.Lock()
        self.go = threading.Event()  # set by a test to let a scripted handler go on

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))


class _Base:
    keep_input = False

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1024)
        self.addr = self.lsock.getsockname()
        self.addr_str = "%s:%d" % self.addr
        self.conns: List[ConnRecord] = []
        self.cond = threading.Condition()
        self._closed = False
        self._threads: List[threading.Thread] = []

    def start(self):
        t = threading.Thread(target=self._accept_loop, daemon=True, name="%s-accept" % type(self).__name__)
        t.start()
        return self

    def _accept_loop(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rec = ConnRecord(s)
            if self.keep_input:
                rec.data_in = bytearray()
            with self.cond:
                self.conns.append(rec)
                self.cond.notify_all()
            t = threading.Thread(target=self._run, args=(rec,), daemon=True)
            t.start()

    def _run(self, rec: ConnRecord):
        try:
            self.handle(rec)
        except (OSError, ValueError) as e:
            rec.error = e
        finally:
            rec.done.set()
            try:
                rec.sock.close()
            except OSError:
                pass
            with self.cond:
                self.cond.notify_all()

    def handle(self, rec: ConnRecord):
        raise NotImplementedError

    def read_some(self, rec: ConnRecord, n: int = 65536) -> bytes:
        b = rec.sock.recv(n)
        if b:
            with rec.lock:
                rec.received += len(b)
                rec.sha_in.update(b)
                if rec.data_in is not None:
                    rec.data_in += b
        else:
            rec.note("eof")
            rec.eof.set()
        return b

    def write(self, rec: ConnRecord, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            n = rec.sock.send(mv)
            with rec.lock:
                rec.sent += n
            mv = mv[n:]

    def wait_conns(self, n: int, timeout: float = 10.0) -> List[ConnRecord]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.conns) < n:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise TimeoutError("upstream: %d of %d connections after %ss" % (len(self.conns), n, timeout))
                self.cond.wait(rem)
            return list(self.conns)

    def close(self):
        self._closed = True
        try:
            self.lsock.close()
        except OSError:
            pass
        for rec in list(self.conns):
            try:
                rec.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                rec.sock.close()
            except OSError:
                pass


class EchoServer(_Base):
    def handle(self, rec):
        while True:
            b = self.read_some(rec, 256 * 1024)
            if not b:
                rec.sock.shutdown(socket.SHUT_WR)
                rec.note("shut_wr")
                return
            self.write(rec, b)


class SinkServer(_Base):
    def __init__(self, keep_input: bool = False):
        super().__init__()
        self.keep_input = keep_input

    def handle(self, rec):
        while self.read_some(rec, 256 * 1024):
            pass


class SourceServer(_Base):
    """Writes PatternStream bytes (chunks of `chunk`) up to `limit`, then closes."""

    def __init__(self, limit: int = 512 << 20, chunk: int = 64 * 1024, seed: int = 1234):
        super().__init__()
        self.limit = limit
        self.chunk = chunk
        self.pattern = PatternStream(seed)

    def handle(self, rec):
        while rec.sent < self.limit:
            n = min(self.chunk, self.limit - rec.sent)
            self.write(rec, self.pattern.at(rec.sent, n))
        rec.note("all_sent")
        rec.sock.shutdown(socket.SHUT_WR)
        # wait for the peer to go away before closing (no RST on unread data)
        while self.read_some(rec):
            pass


class ScriptedServer(_Base):
    """script(server, rec) runs per connection; use server.read_some / write / read_all."""

    def __init__(self, script: Callable, keep_input: bool = True):
        super().__init__()
        self.script = script
        self.keep_input = keep_input

    def handle(self, rec):
        self.script(self, rec)

    def read_all(self, rec: ConnRecord) -> None:
        while self.read_some(rec, 256 * 1024):
            pass


def abort(sock: socket.socket) -> None:
    """Closes with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_port() -> socket.socket:
    """A socket bound to a loopback port and not listening: connecting to it
    is refused. Keep it open for as long as the port must stay refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


class BlackHole:
    """A listening socket (backlog 0) whose accept queue is filled by one
    connection of its own and never accepted from. The kernel then drops
    every further SYN, so a connect to it neither succeeds nor fails: it
    hangs until the connecting side gives up, like a connect to an
    unreachable host, without sending anything off this machine."""

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        self.addr = self.lsock.getsockname()
        self.addr_str = "%s:%d" % self.addr
        self.fillers: List[socket.socket] = []
        for _ in range(8):  # connect until one hangs: then the queue is full
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.connect_ex(self.addr)
            _, w, _ = select.select([], [c], [], 0.5)
            if not w:
                c.close()  # this one hangs: the queue is full
                return
            self.fillers.append(c)
        self.close()
        raise RuntimeError("BlackHole: the accept queue of %s never filled" % self.addr_str)

    def start(self):
        return self

    def close(self):
        for c in self.fillers:
            c.close()
        self.lsock.close()
