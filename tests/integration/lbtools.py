"""Shared by the load-balancer tests (test_drain_lb.py, rollout/): HAProxy
as a stand-in for a Kubernetes Service, a request/response load generator
driving many local connections from one thread, and small statistics."""

from __future__ import annotations

import csv
import io
import math
import os
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from conftest import scaled, wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


class HAProxy:
    """haproxy -db (foreground) with a generated config; shows in the failure
    report like a baton process (conftest.pytest_runtest_makereport)."""

    kind = "haproxy"

    def __init__(self, workdir: Path, sock_dir: Path, servers: List[str], backend_options: List[str] = (),
                 bind_host: str = "127.0.0.1", bind_port: int = 0):
        """servers: `server ...` lines of the backend "replicas";
        backend_options: lines before them (e.g. health checks). bind_port 0:
        a free port on bind_host."""
        self.workdir = workdir
        self.stats_sock = str(sock_dir / "haproxy.sock")
        self.stderr_path = workdir / "haproxy.stderr"
        self.proc: Optional[subprocess.Popen] = None
        self.servers_lines = list(servers)
        self.backend_options = list(backend_options)
        self.bind_host = bind_host
        self.bind_port = bind_port
        self.config_text = ""
        self.addr = None

    def config(self, port: int) -> str:
        lines = [
            "global",
            "    maxconn 4096",
            "    nbthread 1",
            "    stats socket %s mode 600 level admin" % self.stats_sock,
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    timeout check 1s",
            "    retries 3",
            "    option redispatch",
            "frontend tunnels",
            "    bind %s:%d" % (self.bind_host, port),
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
        ]
        lines += ["    " + x for x in self.backend_options + self.servers_lines]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        for attempt in range(5 if self.bind_port == 0 else 1):
            port = self.bind_port or free_port(self.bind_host)
            self.config_text = self.config(port)
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(self.config_text)
            with open(self.stderr_path, "ab") as err:
                self.proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=err)
            # The stats socket answers once every listener is bound; haproxy
            # exits at once if it cannot bind the frontend (port taken since).
            try:
                wait_until(lambda: self.proc.poll() is not None or self._stats_answers(), 10,
                           interval=0.02, what="haproxy's stats socket")
            except AssertionError:
                self.stop()
                raise
            if self.proc.poll() is None:
                self.addr = (self.bind_host, port)
                return
            self.proc = None
        raise AssertionError("haproxy did not start:\n" + self.stderr_text())

    def _stats_answers(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def command(self, cmd: str) -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(scaled(5))
        try:
            s.connect(self.stats_sock)
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
            return out.decode()
        finally:
            s.close()

    def set_server(self, name: str, *commands: str) -> None:
        """Runtime API `set server replicas/NAME ...` commands, e.g.
        set_server("ep1", "addr 10.0.0.5 port 7443", "state ready")."""
        for c in commands:
            out = self.command("set server replicas/%s %s" % (name, c)).strip()
            if out and not out.startswith(("IP changed", "no need to change")):
                raise AssertionError("haproxy: set server replicas/%s %s: %s" % (name, c, out))

    def servers(self) -> Dict[str, dict]:
        """`show stat` rows of the backend's servers, by name."""
        text = self.command("show stat").lstrip("# ")
        return {r["svname"]: r for r in csv.DictReader(io.StringIO(text))
                if r["pxname"] == "replicas" and r["svname"] not in ("BACKEND", "FRONTEND")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stderr_text(self, tail: int = 20000) -> str:
        try:
            return self.stderr_path.read_bytes()[-tail:].decode("utf-8", "replace")
        except OSError:
            return ""

    def describe(self) -> str:
        st = self.proc.poll() if self.proc else None
        return "returncode: %s\nconfig:\n%s" % (st, self.config_text)



class _Conn:
    __slots__ = ("client", "long", "sock", "payload", "got", "deadline", "state", "next_at", "t0", "opened")

    def __init__(self, client: int, long: bool, sock: socket.socket, now: float):
        self.opened = now
        self.client = client
        self.long = long
        self.sock = sock
        self.payload = b""
        self.got = bytearray()
        self.deadline = 0.0
        self.state = "idle"  # idle (long, between round trips) | busy | closing (long, retiring)
        self.next_at = 0.0
        self.t0 = 0.0


class Load:
    """Per client: one long-lived connection doing round trips (request,
    then its exact echo) every long_gap_s, and a new short connection every
    short_every_s (request, half-close, the exact echo, then EOF). Every
    error, short or wrong echo, or round trip over request_timeout_s is
    recorded in `failures`. long_max_s: a long-lived connection older than
    this is closed after its round trip (half-close, then the echo side's
    EOF) and a new one opened, like an HTTP client's keep-alive limit;
    None: only retire() closes them."""

    def __init__(self, addrs: List[tuple], long_gap_s: float = 0.05, short_every_s: float = 0.5,
                 request_timeout_s: float = 5.0, long_max_s: Optional[float] = None):
        self.addrs = addrs
        self.long_gap_s = long_gap_s
        self.short_every_s = short_every_s
        self.request_timeout_s = scaled(request_timeout_s)
        self.long_max_s = long_max_s
        self.rotated = 0
        n = len(addrs)
        self.sel = selectors.DefaultSelector()
        self.rnd = random.Random(7)
        self.lock = threading.Lock()
        self.failures: List[str] = []
        self.long_ok = [0] * n
        self.short_ok = [0] * n
        self.long_conn: List[Optional[_Conn]] = [None] * n
        self.next_short = [0.0] * n
        self.retire_wanted: set = set()
        self.retired_at: Dict[int, float] = {}  # client -> when its old long connection got EOF
        self.latencies: List[float] = []
        self.seq = 0
        self.t_start = 0.0
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lb-load")

    # -- public --

    def start(self):
        now = time.monotonic()
        self.t_start = now
        for i in range(len(self.addrs)):
            self._open_long(i, now)
            self.next_short[i] = now + self.rnd.uniform(0, self.short_every_s)
        self.thread.start()

    def stop(self):
        self.stop_ev.set()
        self.thread.join(scaled(30))
        assert not self.thread.is_alive(), "load thread did not stop"
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()

    def retire(self, clients):
        """Close these clients' long-lived connections (each after its round
        trip in flight: half-close, then the echo side's EOF) and open new ones."""
        with self.lock:
            self.retire_wanted |= set(clients)

    def counts(self):
        with self.lock:
            return list(self.long_ok), list(self.short_ok)

    def failed(self) -> List[str]:
        with self.lock:
            return list(self.failures)

    # -- loop --

    def _fail(self, c: _Conn, what: str):
        msg = "t=%.3fs client %d %s: %s (sent %d bytes, got %d)" % (
            time.monotonic() - self.t_start, c.client, "long" if c.long else "short", what, len(c.payload), len(c.got))
        with self.lock:
            self.failures.append(msg)
        self._close(c)

    def _close(self, c: _Conn):
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        if c.long and self.long_conn[c.client] is c:
            self.long_conn[c.client] = None

    def _connect(self, i: int, long: bool) -> Optional[_Conn]:
        try:
            s = socket.create_connection(self.addrs[i], timeout=self.request_timeout_s)
        except OSError as e:
            with self.lock:
                self.failures.append("client %d: connect to %s: %r" % (i, self.addrs[i], e))
            return None
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(i, long, s, time.monotonic())
        self.sel.register(s, selectors.EVENT_READ, c)
        return c

    def _payload(self, c: _Conn) -> bytes:
        self.seq += 1
        head = b"c%d-%s-%d|" % (c.client, b"L" if c.long else b"S", self.seq)
        return head + self.rnd.randbytes(64 + self.rnd.randrange(64))

    def _send(self, c: _Conn, now: float) -> bool:
        c.payload = self._payload(c)
        c.got = bytearray()
        c.t0 = now
        c.deadline = now + self.request_timeout_s
        c.state = "busy"
        try:
            n = c.sock.send(c.payload)
            if n != len(c.payload):
                self._fail(c, "sent only %d bytes" % n)
                return False
            if not c.long:
                c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._fail(c, "send: %r" % e)
            return False
        return True

    def _open_long(self, i: int, now: float):
        c = self._connect(i, True)
        if c is not None:
            self.long_conn[i] = c
            self._send(c, now)

    def _readable(self, c: _Conn, now: float):
        try:
            b = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, "recv: %r" % e)
            return
        if c.state == "closing":
            if b:
                self._fail(c, "bytes after half-close: %r" % b[:40])
                return
            with self.lock:
                self.retired_at[c.client] = now
            self._close(c)
            self._open_long(c.client, now)
            return
        if not b:
            if not c.long and bytes(c.got) == c.payload:
                self._ok(c, now)
                self._close(c)
            else:
                self._fail(c, "EOF before the whole echo" if len(c.got) < len(c.payload) else "wrong echo")
            return
        c.got += b
        if len(c.got) > len(c.payload) or bytes(c.got) != c.payload[:len(c.got)]:
            at = next((k for k in range(min(len(c.got), len(c.payload))) if c.got[k] != c.payload[k]),
                      len(c.payload))
            self._fail(c, "wrong echo from byte %d of %r" % (at, c.payload[:24]))
            return
        if c.long and len(c.got) == len(c.payload):
            self._ok(c, now)
            c.state = "idle"
            c.next_at = now + self.long_gap_s

    def _ok(self, c: _Conn, now: float):
        with self.lock:
            if c.long:
                self.long_ok[c.client] += 1
            else:
                self.short_ok[c.client] += 1
            self.latencies.append(now - c.t0)

    def _run(self):
        while not self.stop_ev.is_set():
            for key, _ in self.sel.select(0.005):
                self._readable(key.data, time.monotonic())
            now = time.monotonic()
            with self.lock:
                retire = self.retire_wanted
                self.retire_wanted = set()
            for i in range(len(self.addrs)):
                c = self.long_conn[i]
                if c is None:
                    continue
                aged = self.long_max_s is not None and now - c.opened >= self.long_max_s
                if aged and c.state == "idle":
                    self.rotated += 1
                if i in retire or aged:
                    if c.state == "idle":
                        c.state = "closing"
                        c.deadline = now + self.request_timeout_s
                        try:
                            c.sock.shutdown(socket.SHUT_WR)
                        except OSError as e:
                            self._fail(c, "shutdown: %r" % e)
                    elif i in retire:
                        with self.lock:
                            self.retire_wanted.add(i)  # after the round trip in flight
                elif c.state == "idle" and now >= c.next_at:
                    self._send(c, now)
            for i in range(len(self.addrs)):
                if now >= self.next_short[i]:
                    self.next_short[i] = now + self.short_every_s
                    c = self._connect(i, False)
                    if c is not None:
                        self._send(c, now)
            for key in list(self.sel.get_map().values()):
                c = key.data
                if c.state != "idle" and now > c.deadline:
                    self._fail(c, "no answer within %.1f s" % self.request_timeout_s)


def pct(values: List[float], p: float) -> float:
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100.0 * len(v)) - 1))]


def cpu_seconds(pids: List[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


