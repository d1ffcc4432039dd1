"""Fixtures for baton's integration tests: real processes on 127.0.0.1.

Environment:
  BATON_BIN             the binary (default: <repo>/build/baton)
  BATON_TEST_BIG_BYTES  size of the big-stream test (default 1 GiB)
  BATON_TEST_LOG_LEVEL  --log-level passed to `baton serve` (default: not passed)
  BATON_TEST_TIMEOUT_SCALE  multiply upper-bound timeouts (default 1, or 4 with BATON_TEST_SANITIZED=1)
  BATON_TEST_SANITIZED  1 for an ASan/UBSan binary: longer timeouts, looser RSS bound
  BATON_TEST_ADMIN_PORT0  1 (default): generated configs add `admin: listen: 127.0.0.1:0`
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baton_wire as bw  # noqa: E402
import upstreams  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
BATON_BIN = os.environ.get("BATON_BIN", str(REPO_ROOT / "build" / "baton"))
# The same build with the fault injection points of src/handoff/test_hook.h
# (the shipped binary has none: test_test_hooks.py checks). A server whose
# environment names one (BATON_TEST_*STOP_AT, BATON_TEST_HANDOFF_STATE_VERSION)
# runs this one.
BATON_HOOKS_BIN = os.environ.get("BATON_HOOKS_BIN", str(Path(BATON_BIN).parent / "baton-test-hooks"))
HOOK_VARIABLES = ("BATON_TEST_HANDOFF_STOP_AT", "BATON_TEST_HANDOFF_PARENT_STOP_AT", "BATON_TEST_STOP_AT",
                  "BATON_TEST_HANDOFF_STATE_VERSION")
SANITIZED = os.environ.get("BATON_TEST_SANITIZED", "0") == "1"  # set by scripts/test.sh for the ASan build
TIMEOUT_SCALE = float(os.environ.get("BATON_TEST_TIMEOUT_SCALE", "4" if SANITIZED else "1"))
BIG_BYTES = int(os.environ.get("BATON_TEST_BIG_BYTES", str(1 << 30)))

TOKEN = "integration-test-token-7f3a"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
SERVER_ID = "test-server"
# The admin HTTP listener defaults to 127.0.0.1:9901; several servers run at
# once in these tests (and a demo may run beside them), so ask for port 0.
ADMIN_PORT_0 = os.environ.get("BATON_TEST_ADMIN_PORT0", "1") == "1"


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


IS_ROOT = os.geteuid() == 0

# Sanitized runs: every process the tests start (servers, clients, one-shot
# commands, those under the hot-restarter, bench tools) writes its sanitizer
# reports to a file here (log_path, inherited through the environment)
# instead of its stderr; a test after which a report appears fails
# (_sanitizer_reports below).
SANITIZER_LOG_DIR = None
if SANITIZED:
    SANITIZER_LOG_DIR = tempfile.mkdtemp(prefix="baton-sanitizer-")
    for _var in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS", "LSAN_OPTIONS"):
        _cur = os.environ.get(_var, "")
        os.environ[_var] = (_cur + ":" if _cur else "") + "log_path=%s/%s" % (
            SANITIZER_LOG_DIR, _var.split("_")[0].lower())


@pytest.fixture(autouse=True)
def _sanitizer_reports():
    if SANITIZER_LOG_DIR is None:
        yield
        return
    before = set(os.listdir(SANITIZER_LOG_DIR))
    yield
    new = sorted(set(os.listdir(SANITIZER_LOG_DIR)) - before)
    if new:
        texts = []
        for name in new:
            with open(os.path.join(SANITIZER_LOG_DIR, name), errors="replace") as f:
                texts.append("%s:\n%s" % (name, f.read()[:6000]))
        pytest.fail("sanitizer report from a process this test started (%s):\n%s" % (
            ", ".join(new), "\n".join(texts)), pytrace=False)
ROOT_ONLY_SKIPPED = []  # (test, reason): root-only tests skipped because this run is not root


# The ThreadSanitizer pass (BATON_TEST_TSAN=1) looks for races between
# threads. baton's threads are the admin API's (its gate's I/O thread and
# workers, which hand jobs to the loop) and libuv's pool (the client's
# getaddrinfo); everything else runs on the one event loop. These modules
# drive only the loop's single-threaded paths -- wire parsing, yamux flow
# control, TLS records, the resume protocol, certificate files, manifests --
# which the release and ASan+UBSan passes run in full; the TSan pass skips
# them (saying so) to keep CI under its 30 minutes. Every module that starts
# the admin API's threads under load, signals, drains, hot restarts or runs
# baton connect's dials stays in the TSan pass. When TLS handshakes move off
# the loop (issue 22), test_tls and test_hostile must come back to it.
TSAN = os.environ.get("BATON_TEST_TSAN", "0") == "1"
TSAN_SINGLE_THREADED = {
    "test_hostile", "test_yamux_orders", "test_wire", "test_peer_input", "test_interop_go", "test_replay",
    "test_backpressure", "test_tls", "test_cert_files", "test_resume", "test_k8s_manifests", "test_open_burst",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TSAN and item.module.__name__ in TSAN_SINGLE_THREADED:
            item.add_marker(pytest.mark.skip(reason="TSan pass: this module drives only the event loop's "
                                                    "single-threaded paths (conftest.py TSAN_SINGLE_THREADED)"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (the 1 GiB stream)")
    config.addinivalue_line("markers", "root_only(reason): needs root (another uid, a network namespace); "
                                       "skipped without root, and a skip while root fails the run")


def pytest_runtest_setup(item):
    m = item.get_closest_marker("root_only")
    if m is not None and not IS_ROOT:
        reason = m.args[0] if m.args else "needs root"
        ROOT_ONLY_SKIPPED.append((item.nodeid, reason))
        pytest.skip("root-only, not running as root: " + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the stderr of every baton process the test started.
    A root-only test that skips while the run is root fails instead: what it
    checks is then simply not checked."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and IS_ROOT and item.get_closest_marker("root_only") is not None:
        rep.outcome = "failed"
        rep.longrepr = "a root-only test was skipped although this run is root: %s" % (
            rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr)
    if rep.failed:
        for proc in getattr(item, "_baton_procs", []):
            rep.sections.append(("%s stderr (%s)" % (proc.kind, proc.stderr_path), proc.stderr_text(tail=20000)))
            extra = proc.describe()
            if extra:
                rep.sections.append(("%s state" % proc.kind, extra))


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """Reads one line from proc.stdout (a pipe) within timeout and parses it."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise TimeoutError("no ready line within %ss (got %r)" % (timeout, buf))
        r, _, _ = select.select([fd], [], [], rem)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError("process exited (status %s) before its ready line (got %r)" % (proc.wait(5), buf))
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    try:
        obj = json.loads(line)
    except ValueError:
        raise AssertionError("ready line is not JSON: %r" % line)
    return obj, rest


class BatonProcess:
    kind = "baton"

    def __init__(self, args: List[str], workdir: Path, env: Optional[dict] = None, name: str = "baton",
                 preexec_fn: Optional[Callable[[], None]] = None):
        self.args = args
        self.workdir = workdir
        self.stderr_path = workdir / ("%s.stderr" % name)
        self.stdout_extra_path = workdir / ("%s.stdout" % name)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.ready: Optional[dict] = None
        self.exit_status: Optional[int] = None
        # The exit codes accepted when the teardown stops it with SIGINT.
        self.teardown_exit = (0,)
        self._drain_thread: Optional[threading.Thread] = None
        # Set by stop() when the process did not exit: describe_hang's finding.
        self.hang: Optional[dict] = None

    def wait_ready(self, timeout: float = 10.0) -> dict:
        obj, rest = read_json_line(self.proc, scaled(timeout))
        self.ready = obj
        # keep draining stdout so that the process never blocks on a full pipe
        out = open(self.stdout_extra_path, "wb")
        out.write(rest)

        def drain(fd=self.proc.stdout.fileno()):
            while True:
                try:
                    b = os.read(fd, 65536)
                except OSError:
                    break
                if not b:
                    break
                out.write(b)
                out.flush()
            out.close()

        self._drain_thread = threading.Thread(target=drain, daemon=True)
        self._drain_thread.start()
        return obj

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS for pid %d" % self.pid)

    def stop(self, sig=signal.SIGINT, timeout: float = 10.0) -> Optional[int]:
        """Signals the process (SIGINT: `baton serve` exits at once, where
        SIGTERM would drain first) and waits; SIGKILL if it does not exit. Returns
        the exit status of the signalled process (None if it had to be killed)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.exit_status = self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.hang = describe_hang(self.pid)
                self.proc.kill()
                self.proc.wait(10)
                self.exit_status = None
        else:
            self.exit_status = self.proc.returncode
        return self.exit_status

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(scaled(timeout))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            self._stderr.close()
        except OSError:
            pass
        # The stdout pipe too: the test node keeps this object for the whole
        # session, and a session of several hundred processes would otherwise
        # push the runner's descriptors past select()'s 1024. The reader
        # thread ends at the pipe's EOF first (the process is gone).
        if self.proc.poll() is not None and self.proc.stdout is not None:
            if self._drain_thread is not None:
                self._drain_thread.join(5)
            if self._drain_thread is None or not self._drain_thread.is_alive():
                try:
                    self.proc.stdout.close()
                except OSError:
                    pass

    def stderr_text(self, tail: int = 200000) -> str:
        try:
            self._stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-tail:].decode("utf-8", "replace")

    def describe(self) -> str:
        return "args: %s\nready: %s\nreturncode: %s" % (" ".join(map(str, self.args)), self.ready, self.proc.poll())


class ServerProcess(BatonProcess):
    kind = "baton serve"

    def __init__(self, config_path: Path, workdir: Path, config_text: str, name: str, env: Optional[dict] = None,
                 extra_args: Optional[List[str]] = None, preexec_fn: Optional[Callable[[], None]] = None):
        hooks = any(k in HOOK_VARIABLES for k in (env or {}))
        args = [BATON_HOOKS_BIN if hooks else BATON_BIN, "serve", "-c", str(config_path)] + list(extra_args or [])
        lvl = os.environ.get("BATON_TEST_LOG_LEVEL")
        if lvl:
            args += ["--log-level", lvl]
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        super().__init__(args, workdir, env=full_env, name=name, preexec_fn=preexec_fn)
        self.config_path = config_path
        self.config_text = config_text
        self.addr = None

    def wait_ready(self, timeout: float = 10.0) -> dict:
        obj = super().wait_ready(timeout)
        assert obj.get("event") == "ready", obj
        assert obj.get("pid") == self.pid, obj
        host, port = obj["listen"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, obj
        self.addr = (host, int(port))
        return obj

    def describe(self) -> str:
        return super().describe() + "\nconfig:\n" + self.config_text


class ConnectProcess(BatonProcess):
    kind = "baton connect"

    def __init__(self, args, workdir, env, name):
        super().__init__(args, workdir, env=env, name=name)
        self.forwards: List[tuple] = []

    def wait_ready(self, timeout: float = 10.0) -> dict:
        obj = super().wait_ready(timeout)
        assert obj.get("event") == "ready", obj
        for f in obj["forwards"]:
            host, port = f["listen"].rsplit(":", 1)
            self.forwards.append(((host, int(port)), f["route"]))
        return obj

    def events(self) -> List[dict]:
        """The JSON event lines printed after the ready line so far
        (session, drain, session_lost; docs/client.md)."""
        out = []
        try:
            text = self.stdout_extra_path.read_text()
        except OSError:
            return out
        for line in text.splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out

    def forward_addr(self, route: str = "echo"):
        for addr, r in self.forwards:
            if r == route:
                return addr
        raise KeyError(route)


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

DEFAULT_LIMITS = {
    "max_tunnels": 100,
    "max_streams_per_tunnel": 1024,
    "handshake_timeout_ms": 10000,
    "idle_timeout_ms": 300000,
    "upstream_connect_timeout_ms": 5000,
    "heartbeat_ms": 15000,
    "tunnel_output_high_water": 1048576,
}


def make_config(certs: "Certs", routes: Dict[str, str], handoff_socket: str, limits: Optional[dict] = None,
                mtls: bool = False, ticket_key: Optional[str] = None, require_token: bool = True,
                tokens: Optional[List[tuple]] = None, server_id: str = SERVER_ID,
                extra: str = "", handoff_timeout_ms: Optional[int] = None) -> str:
    lim = dict(DEFAULT_LIMITS)
    lim.update(limits or {})
    if tokens is None:
        tokens = [("test", TOKEN_SHA256)]
    lines = [
        "server_id: %s" % server_id,
        "listen: 127.0.0.1:0",
        "tls:",
        "  cert: %s" % certs.server_crt,
        "  key: %s" % certs.server_key,
    ]
    if mtls:
        lines += ["  client_ca: %s" % certs.ca_crt, "  require_client_cert: true"]
    if ticket_key is not None:
        lines.append("  ticket_key: %s" % ticket_key)
    lines += ["auth:", "  require_token: %s" % ("true" if require_token else "false"), "  tokens:"]
    for name, digest in tokens:
        lines += ["    - name: %s" % name, "      sha256: %s" % digest]
    lines.append("routes:")
    for name, addr in routes.items():
        lines.append("  %s: %s" % (name, addr))
    lines.append("limits:")
    for k, v in lim.items():
        lines.append("  %s: %s" % (k, v))
    lines += ["handoff:", "  socket: %s" % handoff_socket]
    if handoff_timeout_ms is not None:
        lines.append("  timeout_ms: %d" % handoff_timeout_ms)
    if ADMIN_PORT_0:
        lines += ["admin:", "  listen: 127.0.0.1:0"]
    text = "\n".join(lines) + "\n" + extra
    return text


@dataclass
class Certs:
    dir: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    ticket_key: Path


@pytest.fixture(scope="session")
def baton_bin() -> str:
    if not os.access(BATON_BIN, os.X_OK):
        pytest.fail("baton binary not found or not executable: %s (set BATON_BIN)" % BATON_BIN)
    return BATON_BIN


@pytest.fixture(scope="session")
def certs(baton_bin, tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    r = subprocess.run([baton_bin, "certs", "--out", str(d)], capture_output=True, timeout=scaled(60))
    assert r.returncode == 0, "baton certs failed: %r %r" % (r.stdout, r.stderr)
    c = Certs(d, d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "client.crt",
              d / "client.key", d / "ticket.key")
    for p in (c.ca_crt, c.ca_key, c.server_crt, c.server_key, c.client_crt, c.client_key, c.ticket_key):
        assert p.is_file(), "baton certs did not write %s" % p
    return c


@pytest.fixture
def short_tmp():
    """A short directory under /tmp (Unix socket paths are limited to 108 bytes)."""
    d = tempfile.mkdtemp(prefix="baton-it-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# upstreams
# ---------------------------------------------------------------------------

@pytest.fixture
def upstream_factory():
    """upstream_factory(kind, **kw) -> a started upstream (see upstreams.py).
    kind: "echo", "sink", "source", "scripted"."""
    made = []

    def make(kind: str, **kw):
        cls = {"echo": upstreams.EchoServer, "sink": upstreams.SinkServer, "source": upstreams.SourceServer,
               "scripted": upstreams.ScriptedServer}[kind]
        u = cls(**kw)
        u.start()
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


@pytest.fixture
def echo_server(upstream_factory):
    return upstream_factory("echo")


# ---------------------------------------------------------------------------
# baton serve / baton connect
# ---------------------------------------------------------------------------

@pytest.fixture
def server_factory(request, baton_bin, certs, echo_server, tmp_path, short_tmp):
    """server_factory(routes=None, limits=None, mtls=False, ticket_key=None, ...)
    -> a ready ServerProcess. routes default to {"echo": echo_server}; a route
    value may be an upstream object or a "host:port" string."""
    procs: List[ServerProcess] = []
    request.node._baton_procs = getattr(request.node, "_baton_procs", [])

    def start(routes=None, wait=True, env=None, successor_of: Optional[ServerProcess] = None, extra_args=None,
              preexec_fn=None, **kw) -> ServerProcess:
        """successor_of=P: a new process with P's config file: it takes over from P (hot restart).
        preexec_fn: run in the child before exec (e.g. to lower RLIMIT_NOFILE)."""
        n = len(procs)
        if successor_of is not None:
            path, text = successor_of.config_path, successor_of.config_text
        else:
            if routes is None:
                routes = {"echo": echo_server}
            routes = {k: (v if isinstance(v, str) else v.addr_str) for k, v in routes.items()}
            text = make_config(certs, routes, str(short_tmp / ("handoff%d.sock" % n)), **kw)
            path = tmp_path / ("server%d.yaml" % n)
            path.write_text(text)
        p = ServerProcess(path, tmp_path, text, name="server%d" % n, env=env, extra_args=extra_args,
                          preexec_fn=preexec_fn)
        procs.append(p)
        request.node._baton_procs.append(p)
        if wait:
            p.wait_ready()
        return p

    yield start
    _teardown(procs)


# A process that ended on one of these did not choose to: a crash, whoever
# started it and whatever the test expected of its exit code.
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)


LSAN_EXIT_HANGS = []  # (process, finding): see describe_hang


def _proc_read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def describe_hang(pid: int) -> dict:
    """What a process that does not exit is doing, read from /proc before it
    is killed: each thread's state, kernel wait channel and tracer.
    lsan_exit is True when every thread is stopped under a tracer that is the
    process's own child: LeakSanitizer's exit-time leak check (its
    StopTheWorld tracer is a clone of the process) that never finished, with
    every signal blocked meanwhile. The process's own code has returned from
    main by then."""
    lines, tracers, states = [], set(), []
    task_dir = "/proc/%d/task" % pid
    try:
        tids = sorted(os.listdir(task_dir), key=int)
    except OSError:
        return {"lsan_exit": False, "text": "no /proc entry"}
    for tid in tids:
        status = _proc_read("%s/%s/status" % (task_dir, tid))
        fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        tracer = int(fields.get("TracerPid", "0").strip() or 0)
        state = fields.get("State", "?").strip()
        wchan = _proc_read("%s/%s/wchan" % (task_dir, tid)).strip()
        name = fields.get("Name", "?").strip()
        lines.append("thread %s %s: %s, wait %s, tracer %d" % (tid, name, state, wchan or "-", tracer))
        tracers.add(tracer)
        states.append(state)
    # One tracer for all threads (the one that started the check may wait
    # for it untraced), and that tracer is the process's own child.
    traced = tracers - {0}
    untraced = sum(1 for t in tids if _proc_read("%s/%s/status" % (task_dir, t)).find("TracerPid:\t0\n") >= 0)
    lsan = False
    if len(traced) == 1 and untraced <= 1:
        tracer = next(iter(traced))
        stat = _proc_read("/proc/%d/stat" % tracer)
        if stat:
            tracer_parent = int(stat.rsplit(")", 1)[1].split()[1])
            lines.append("tracer %d: child of %d" % (tracer, tracer_parent))
            lsan = tracer_parent == pid
    return {"lsan_exit": lsan, "text": "; ".join(lines)}


class BigSender:
    """Sends `total` bytes on socket s from a thread, then shuts its write
    side: position-dependent chunks (never periodic), hashed as they go.
    sent[0] counts what sendall took; errors holds an OSError that ended it."""

    def __init__(self, s: socket.socket, total: int, chunk: int = 1 << 20):
        self.s, self.total, self.chunk = s, total, chunk
        self.sha = hashlib.sha256()
        self.sent = [0]
        self.errors: List[Exception] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            block = os.urandom(self.chunk)
            i = 0
            while self.sent[0] < self.total:
                chunk = (hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:])[:self.total - self.sent[0]]
                self.sha.update(chunk)
                self.s.sendall(chunk)
                self.sent[0] += len(chunk)
                i += 1
            self.s.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.errors.append(e)

    def start(self) -> "BigSender":
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def check_echoed(self, echo, n_back: int, sha_back) -> None:
        """After the echo came back (n_back bytes hashed into sha_back):
        everything went both ways, intact, through the echo upstream `echo`."""
        self.join(scaled(60))
        assert not self.errors, self.errors
        assert n_back == self.total, "got %d of %d bytes back" % (n_back, self.total)
        rec = echo.wait_conns(1)[0]
        assert rec.done.wait(scaled(10))
        assert rec.received == self.total
        assert rec.sha_in.hexdigest() == self.sha.hexdigest(), "client -> upstream direction corrupted"
        assert sha_back.hexdigest() == self.sha.hexdigest(), "upstream -> client direction corrupted"


def check_exit(what: str, status: Optional[int], allowed=(0,)) -> Optional[str]:
    """What is wrong with how a process ended, or None."""
    if status is None:
        return "%s did not exit on SIGINT (killed)" % what
    if status < 0 and -status in CRASH_SIGNALS:
        return "%s died of %s" % (what, signal.Signals(-status).name)
    if status not in allowed:
        return "%s exited %d (expected %s)" % (what, status, " or ".join(map(str, allowed)))
    return None


def _teardown(procs: List[BatonProcess]) -> None:
    """Stops every process still running (SIGINT: exits 0 at once) and fails
    the test if one does not exit 0, or any ended in a crash. A process that ended before (the test
    stopped or killed it, or it refused to start) is the test's to judge,
    except for a crash. A process a test left stopped (SIGSTOP) is let go on.
    Sanitizer reports are judged by _sanitizer_reports, from their files."""
    problems = []
    for p in procs:
        running = p.proc.poll() is None
        if running:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        status = p.stop() if running else p.proc.returncode
        p.kill()
        what = "%s pid %d (%s)" % (p.kind, p.pid, p.stderr_path)
        if running and status is None and p.hang and p.hang["lsan_exit"] and SANITIZED:
            # Not this process's doing: it had returned from main and the
            # sanitizer runtime's leak check hung (describe_hang). Reported in
            # the run's summary, not failed; any other hang fails.
            LSAN_EXIT_HANGS.append((what, p.hang["text"]))
            problem = None
        elif running:
            problem = check_exit(what, status, allowed=p.teardown_exit)
            if problem and p.hang:
                problem += " [%s]" % p.hang["text"]
        else:
            problem = check_exit(what, status, allowed=(status,))
        if problem:
            problems.append(problem)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


# --- breaking connections (fault_relay.py) ---------------------------------

class Via:
    """What connect_factory needs of a server: its address (the relay's)."""

    def __init__(self, addr):
        self.addr = addr


@pytest.fixture
def relay_to():
    """relay_to(server) -> a FaultRelay in front of it, closed at teardown."""
    made = []

    def make(server):
        from fault_relay import FaultRelay
        made.append(FaultRelay(server.addr))
        return made[-1]

    yield make
    for r in made:
        r.close()


def assert_stream_over(s):
    """The local connection was ended (reset or closed), not left hanging."""
    s.settimeout(scaled(10))
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass


@pytest.fixture
def spawn_tool():
    """spawn_tool(args, **popen_kw) -> Popen of a helper process (a bench
    tool, an upstream), killed at teardown if still running."""
    procs: List[subprocess.Popen] = []

    def spawn(args, **kw) -> subprocess.Popen:
        procs.append(subprocess.Popen([str(a) for a in args], **kw))
        return procs[-1]

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """A `baton serve` with the default config and route "echo"."""
    return server_factory()


@pytest.fixture
def connect_factory(request, baton_bin, certs, tmp_path):
    """connect_factory(server, forwards=[("127.0.0.1:0", "echo")], token=TOKEN,
    extra_args=[], wait=True) -> ConnectProcess."""
    procs: List[ConnectProcess] = []
    request.node._baton_procs = getattr(request.node, "_baton_procs", [])

    def start(server: ServerProcess, forwards=None, token: Optional[str] = TOKEN, extra_args=None, wait=True,
              ca=True, env_token: Optional[str] = None) -> ConnectProcess:
        n = len(procs)
        if forwards is None:
            forwards = [("127.0.0.1:0", "echo")]
        args = [baton_bin, "connect", "--server", "%s:%d" % server.addr]
        for listen, route in forwards:
            args += ["--forward", "%s=%s" % (listen, route)]
        if token is not None:
            args += ["--token", token]
        if ca:
            args += ["--ca", str(certs.ca_crt), "--server-name", "localhost"]
        args += list(extra_args or [])
        env = dict(os.environ)
        env.pop("BATON_TOKEN", None)
        if env_token is not None:
            env["BATON_TOKEN"] = env_token
        p = ConnectProcess(args, tmp_path, env, name="connect%d" % n)
        procs.append(p)
        request.node._baton_procs.append(p)
        if wait:
            p.wait_ready()
        return p

    yield start
    _teardown(procs)


@pytest.fixture
def client_ctx(certs):
    """A verifying TLS 1.2 client context trusting the dev CA."""
    return bw.client_context(ca=str(certs.ca_crt))


@pytest.fixture
def tunnel_factory(client_ctx):
    """tunnel_factory(server, token=TOKEN, ctx=None, hello=True, **kw) -> bw.Tunnel."""
    made = []

    def make(server: ServerProcess, token=TOKEN, ctx=None, hello=True, timeout=10.0, **kw) -> bw.Tunnel:
        ctx = ctx or client_ctx
        if hello:
            t = bw.Tunnel.connect(server.addr, token=token.encode() if isinstance(token, str) else token, ctx=ctx,
                                  timeout=scaled(timeout), **kw)
        else:
            t = bw.Tunnel.open_tls(server.addr, ctx=ctx, timeout=scaled(timeout), **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def echo_roundtrip(tunnel: bw.Tunnel, data: bytes = b"hello baton", route: str = "echo", timeout: float = 10.0):
    """Opens a stream to an echo route, sends data, half-closes, returns what came back before FIN."""
    s = tunnel.open_stream(route)
    assert s.wait_acked(scaled(timeout)), "stream %d to %r was reset" % (s.id, route)
    s.send(data)
    s.close_write()
    return s.recv_all(scaled(timeout))


GO_AWAY_PROTOCOL_ERROR = bytes.fromhex("00 03 00 00 00 00 00 00 00 00 00 01")


def expect_go_away_protocol_error(t: bw.Tunnel, timeout: float = 10.0):
    """The next Go Away is exactly 00 03 00 00 | 00 00 00 00 | 00 00 00 01, then the connection closes."""
    fr, _ = t.read_until(lambda f: f.type == bw.TYPE_GO_AWAY, scaled(timeout))
    assert fr.raw == GO_AWAY_PROTOCOL_ERROR, "Go Away bytes %s" % fr.raw.hex(" ")
    assert t.wait_closed(scaled(timeout)), "connection still open after Go Away"


def try_send(fn, *a, **kw):
    """Sends while the server may already be closing the connection."""
    try:
        fn(*a, **kw)
    except (OSError, ConnectionError):
        pass


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T for stopped, Z...), or "gone"."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def stream_echo(stream: bw.Stream, data: bytes, timeout: float = 10.0) -> None:
    """Sends data on a protocol stream to an echo route; asserts the same bytes come back."""
    stream.send(data)
    got = stream.recv_exactly(len(data), timeout=scaled(timeout))
    assert got == data


def socket_echo(s: socket.socket, data: bytes, timeout: float = 10.0) -> None:
    """Sends data on a plain socket to an echo peer and asserts the same bytes come back."""
    s.settimeout(scaled(timeout))
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        b = s.recv(65536)
        assert b, "connection closed after %d of %d bytes" % (len(got), len(data))
        got += b
    assert got == data


def http_request(hostport: str, method: str, path: str, headers: Optional[dict] = None):
    """One HTTP request to "host:port"; returns (status, body bytes)."""
    import http.client
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=scaled(10))
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    return r.status, body


# ---------------------------------------------------------------------------
# the admin API (/metrics parsed by prometheus_client's parser)
# ---------------------------------------------------------------------------

class Response:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        ct = self.headers.get("content-type", "")
        assert ct.startswith("application/json"), "content-type %r, body %r" % (ct, self.body[:200])
        return json.loads(self.body)

    def __repr__(self):
        return "Response(%d, %r)" % (self.status, self.body[:300])


class Metrics:
    """One /metrics answer, parsed: samples keyed by (sample name, labels)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Dict[Tuple[str, frozenset], float] = {}
        for f in self.families.values():
            for s in f.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.samples, "series %s appears twice" % (key,)
                self.samples[key] = s.value

    def get(self, name: str, default=None, **labels):
        return self.samples.get((name, frozenset(labels.items())), default)

    def counter(self, name: str, **labels) -> float:
        """A counter series; 0 if it has no sample yet (baton announces
        counter families before their first increment)."""
        return self.get(name, 0, **labels)

    def hist_count(self, family: str) -> float:
        return self.get(family + "_count")

    def monotonic_samples(self) -> Dict[Tuple[str, frozenset], float]:
        """Every sample that must never go down: counters and histogram parts."""
        out = {}
        for f in self.families.values():
            if f.type in ("counter", "histogram"):
                for s in f.samples:
                    out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


class Admin:
    """A client of one server's admin API. persistent=True reuses one HTTP/1.1
    keep-alive connection (needed while the server has no descriptor left to
    accept a new one)."""

    def __init__(self, srv, persistent: bool = False):
        host, port = srv.ready["admin"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, srv.ready
        self.addr = (host, int(port))
        self.persistent = persistent
        self.conn: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body=None, headers=None, **kw) -> Response:
        conn = self.conn if self.persistent and self.conn else http.client.HTTPConnection(*self.addr,
                                                                                          timeout=scaled(10))
        try:
            conn.request(method, path, body=body, headers=headers or {}, **kw)
            r = conn.getresponse()
            data = r.read()
        except BaseException:
            conn.close()
            self.conn = None
            raise
        if self.persistent:
            assert not r.will_close, "the admin server closed the keep-alive connection"
            self.conn = conn
        else:
            conn.close()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)

    def get_json(self, path: str, status: int = 200):
        r = self.request("GET", path)
        assert r.status == status, (path, r)
        return r.json()

    def metrics(self) -> Metrics:
        r = self.request("GET", "/metrics")
        assert r.status == 200, r
        ct = r.headers.get("content-type", "")
        assert ct.startswith("text/plain; version=0.0.4"), ct
        return Metrics(r.body.decode("utf-8"))

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls pred until true (bounded); raises AssertionError on timeout."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def pytest_terminal_summary(terminalreporter):
    """scripts/test.sh puts this line in its summary: a run without root
    did not check what only root can."""
    for what, text in LSAN_EXIT_HANGS:
        terminalreporter.write_line("[lsan_exit_hang] %s: LeakSanitizer's exit-time check never finished "
                                    "(killed; its leak check is lost): %s" % (what, text))
    if ROOT_ONLY_SKIPPED:
        terminalreporter.write_line("[root-only] %d tests skipped: not running as root (%s)" % (
            len(ROOT_ONLY_SKIPPED), ", ".join(n.split("::")[-1] for n, _ in ROOT_ONLY_SKIPPED)))
