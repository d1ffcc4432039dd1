"""A fault injector for tests: a TCP relay between a client and a server on
loopback that forwards every connection and, on demand, breaks them the
ways networks do:

* ``reset()``: every relayed connection is reset on both sides at once
  (what each side had in flight through the relay is lost);
* ``hold(direction)``: bytes in one direction ("up": client to server,
  "down": server to client) stop being forwarded and are kept in the relay
  (a black hole); ``reset()`` then drops them, ``release()`` sends them on;
* ``blackhole_then_reset(ms)``: both directions held for ms, then reset;
* ``cut_after(direction, n)``: n more bytes are forwarded in that direction,
  then both sides are reset, so the cut falls at a chosen byte (inside a TLS
  record, inside a frame);
* ``down()`` / ``up()``: the network is gone: every relayed connection is
  reset and new ones are refused (reset at once) until ``up()``.

Counts what it forwarded and what it dropped. Everything it starts is
stopped by close()."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

DIRECTIONS = ("up", "down")


class _Pair:
    def __init__(self, relay: "FaultRelay", client: socket.socket, server: socket.socket):
        self.relay = relay
        self.sock = {"up": (client, server), "down": (server, client)}  # direction -> (src, dst)
        self.held: Dict[str, bytearray] = {"up": bytearray(), "down": bytearray()}
        self.dead = False
        self.threads = [threading.Thread(target=self._pump, args=(d,), daemon=True) for d in DIRECTIONS]
        for t in self.threads:
            t.start()

    def _pump(self, direction: str) -> None:
        src, dst = self.sock[direction]
        r = self.relay
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with r.lock:
                if self.dead:
                    if data:
                        r.dropped[direction] += len(data)
                    return
                if not data:
                    # An orderly close passes through as one.
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if r.holding[direction]:
                    self.held[direction] += data
                    r.held[direction] += len(data)
                    r.cond.notify_all()
                    continue
                budget = r.budget[direction]
                if budget is not None and len(data) >= budget:
                    data, rest = data[:budget], data[budget:]
                    r.dropped[direction] += len(rest)
                    r.budget[direction] = 0
                    cut = True
                else:
                    if budget is not None:
                        r.budget[direction] = budget - len(data)
                    cut = False
            try:
                dst.sendall(data)
            except OSError:
                pass
            with r.lock:
                r.forwarded[direction] += len(data)
                r.cond.notify_all()
            if cut:
                r._reset_all()
                return

    def flush_held(self) -> None:  # relay lock held
        for d in DIRECTIONS:
            if self.held[d]:
                try:
                    self.sock[d][1].sendall(bytes(self.held[d]))
                    self.relay.forwarded[d] += len(self.held[d])
                except OSError:
                    pass
                self.held[d].clear()

    def kill(self) -> None:  # relay lock held
        if self.dead:
            return
        self.dead = True
        for d in DIRECTIONS:
            self.relay.dropped[d] += len(self.held[d])
            self.held[d].clear()
        for s in (self.sock["up"][0], self.sock["up"][1]):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes the pump reading it; sends nothing
            except OSError:
                pass

    def close_sockets(self) -> None:
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(5)
        for s in (self.sock["up"][0], self.sock["up"][1]):
            try:
                s.close()  # SO_LINGER 0: a reset
            except OSError:
                pass


class FaultRelay:
    def __init__(self, target: Tuple[str, int], host: str = "127.0.0.1"):
        self.target = target
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.holding = {"up": False, "down": False}
        self.budget: Dict[str, Optional[int]] = {"up": None, "down": None}
        self.forwarded = {"up": 0, "down": 0}
        self.held = {"up": 0, "down": 0}  # bytes ever held
        self.dropped = {"up": 0, "down": 0}
        self.connections = 0
        self.resets = 0
        self.refusing = False
        self.refused = 0
        self._pairs: List[_Pair] = []
        self._dead: List[_Pair] = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(4096)  # a thousand clients may dial at once
        self.addr = self.lsock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            if self.refusing:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                with self.lock:
                    self.refused += 1
                continue
            try:
                up = socket.create_connection(self.target, timeout=10)
                up.settimeout(None)
            except OSError:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            for s in (conn, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self._pairs.append(_Pair(self, conn, up))
                self.cond.notify_all()

    # -- faults ------------------------------------------------------------
    def hold(self, direction: str) -> None:
        with self.lock:
            self.holding[direction] = True

    def release(self) -> None:
        """Stops holding and sends on what was held, in order."""
        with self.lock:
            for p in self._pairs:
                if not p.dead:
                    p.flush_held()
            self.holding = {"up": False, "down": False}

    def _reset_all(self) -> None:
        with self.lock:
            pairs, self._pairs = self._pairs, []
            for p in pairs:
                p.kill()
            self.resets += 1
            self.holding = {"up": False, "down": False}
            self.budget = {"up": None, "down": None}
            self._dead += pairs
            self.cond.notify_all()
        for p in pairs:
            p.close_sockets()

    def reset(self) -> None:
        """Resets every relayed connection on both sides; held bytes are lost."""
        self._reset_all()

    def down(self) -> None:
        """The network goes away: resets everything, refuses new connections."""
        self.refusing = True
        self._reset_all()

    def up(self) -> None:
        """The network is back: new connections are relayed again."""
        self.refusing = False

    def blackhole_then_reset(self, ms: int) -> None:
        self.hold("up")
        self.hold("down")
        time.sleep(ms / 1000.0)  # the fault itself lasts this long (not synchronisation)
        self._reset_all()

    def cut_after(self, direction: str, n: int) -> None:
        """Forwards n more bytes in `direction`, then resets both sides."""
        with self.lock:
            self.budget[direction] = n
        if n == 0:
            self._reset_all()

    # -- waiting -------------------------------------------------------------
    def wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise AssertionError("fault relay: timed out after %ss waiting for %s" % (timeout, what))
                self.cond.wait(rem)

    def close(self) -> None:
        self._stop = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        try:
            self.lsock.close()
        except OSError:
            pass
        self._reset_all()
