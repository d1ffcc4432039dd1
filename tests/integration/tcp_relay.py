"""A TCP relay on loopback for client tests: it forwards its first
connections to a target and accepts and at once closes the later ones,
counting them, so that a client's tries fail at a known place and can be
counted exactly."""

from __future__ import annotations

import select
import socket
import threading
from typing import List, Optional, Tuple


class TcpRelay:
    def __init__(self, target: Tuple[str, int], host: str = "127.0.0.1", forward: Optional[int] = 1):
        """forward: how many connections (the first ones) are relayed to
        target; None relays all of them."""
        self.target = target
        self.forward = forward
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(64)
        self.addr = self.lsock.getsockname()
        self.relayed = 0         # connections forwarded to target
        self.closed_at_once = 0  # connections accepted and closed without a byte
        self._pairs: List[Tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _take(self, conn: socket.socket) -> None:
        with self._lock:
            relay = self.forward is None or self.relayed < self.forward
            if relay:
                self.relayed += 1
            else:
                self.closed_at_once += 1
        if not relay:
            conn.close()
            return
        up = socket.create_connection(self.target, timeout=10)
        up.settimeout(None)
        with self._lock:
            self._pairs.append((conn, up))
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            return

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.lsock], [], [], 0.05)
            if r:
                conn, _ = self.lsock.accept()
                self._take(conn)

    def cut(self) -> None:
        """Ends every relayed connection (both sides see the end)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        """Stops accepting; connections still in the backlog are counted
        (and closed) first, so the counts are final afterwards."""
        self._stop.set()
        self._thread.join(10)
        self.lsock.setblocking(False)
        while True:
            try:
                conn, _ = self.lsock.accept()
            except (BlockingIOError, OSError):
                break
            self._take(conn)
        self.lsock.close()
        self.cut()
