"""The processes of one benchmark run (bench/peers.py): started with their
stderr in a log file, read as JSON lines from their stdout with a deadline,
and all stopped at the end, whatever happened.

    procs = Procs(run_dir)
    try:
        p = procs.spawn("upstream", [tool])
        ready = procs.read_json(p, lambda o: o.get("event") == "ready", 10)
    finally:
        procs.stop_all()

A broken step raises Broken; the caller prints it and exits 1.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class Broken(Exception):
    """Something a measurement needs did not work (the run is not valid)."""


class Paths:
    """Where a benchmark script finds the build and keeps its run: argv[1]
    (default build, relative to the repository) and BUILD/bench-run/NAME."""

    def __init__(self, name):
        self.root = Path(__file__).resolve().parents[1]
        build = Path(sys.argv[1] if len(sys.argv) > 1 else "build")
        self.build = build if build.is_absolute() else self.root / build
        self.baton = self.build / "baton"
        self.tools = self.build / "bench"
        self.run = self.build / "bench-run" / name


def run_main(main, procs):
    """Runs main(), stops every process of procs whatever happened, and exits
    with main's status: 1 when a step broke (Broken, printed), 130 on Ctrl-C."""
    rc = 1
    try:
        rc = main()
    except Broken as e:
        print("bench: FAILED: %s (logs in %s)" % (e, procs.run_dir), file=sys.stderr)
    except KeyboardInterrupt:
        rc = 130
    finally:
        procs.stop_all()
    sys.exit(rc)


class Procs:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.started = []

    def spawn(self, name, args, env=None, stdin=None):
        """Starts args; stdout is a pipe for read_json, stderr goes to RUN/NAME.log."""
        log = open(self.run_dir / ("%s.log" % name), "ab")
        p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=log, stdin=stdin, env=env)
        log.close()
        p.name = name
        p.pending = b""
        self.started.append(p)
        return p

    def read_json(self, p, want, timeout):
        """JSON lines of p's stdout until want(obj) holds; returns that object."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in p.pending:
                line, p.pending = p.pending.split(b"\n", 1)
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("event") == "failed":
                    raise Broken("%s failed: %s" % (p.name, obj.get("error")))
                if want(obj):
                    return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise Broken("%s: no expected output within %.0f s (log: %s)" %
                             (p.name, timeout, self.run_dir / ("%s.log" % p.name)))
            ready, _, _ = select.select([p.stdout], [], [], left)
            if ready:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise Broken("%s exited with status %s (log: %s)" %
                                 (p.name, p.wait(), self.run_dir / ("%s.log" % p.name)))
                p.pending += chunk

    def run_json(self, name, args, timeout, env=None):
        """Runs args to its end; returns the last JSON object it printed."""
        p = self.spawn(name, args, env=env)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise Broken("%s did not finish within %.0f s" % (name, timeout))
        objs = []
        for line in out.splitlines():
            try:
                objs.append(json.loads(line))
            except ValueError:
                pass
        if p.returncode != 0 or not objs:
            raise Broken("%s exited with status %s (log: %s)" %
                         (name, p.returncode, self.run_dir / ("%s.log" % name)))
        return objs[-1]

    def stop(self, p, sig=signal.SIGTERM, timeout=5):
        """Signals p and waits for it (SIGKILL after timeout)."""
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in self.started:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.started:
            self.stop(p)


def baton_config(path, server_id, certs, digest, routes, handoff=None, admin=True, limits=None, drain=None):
    """Writes a `baton serve` configuration for a benchmark and returns its
    text: a loopback listener on port 0, the certificate, key and ticket key
    that `baton certs` wrote to certs, one token (its SHA-256 digest), routes
    {name: address}, optional limits and drain settings {key: value}, the
    admin API on a free loopback port unless admin is false, and the handoff
    socket if given."""
    y = ["server_id: %s" % server_id, "listen: 127.0.0.1:0", "tls:"]
    y += ["  %s: %s" % (k, Path(certs) / f) for k, f in (("cert", "server.crt"), ("key", "server.key"),
                                                         ("ticket_key", "ticket.key"))]
    y += ["auth:", "  tokens:", "    - name: bench", "      sha256: %s" % digest, "routes:"]
    y += ["  %s: %s" % kv for kv in routes.items()]
    for section, values in (("limits", limits), ("drain", drain)):
        if values:
            y.append("%s:" % section)
            y += ["  %s: %s" % kv for kv in values.items()]
    if admin:
        y += ["admin:", "  listen: 127.0.0.1:0"]
    if handoff:
        y += ["handoff:", "  socket: %s" % handoff]
    text = "\n".join(y) + "\n"
    Path(path).write_text(text)
    return text


def bench_setup(procs, paths):
    """What every baton benchmark starts with: certificates and ticket key
    (`baton certs`) in RUN/certs, a random token and its digest, and one
    bench_upstream (echo and sink). Returns them as a dict."""
    certs = paths.run / "certs"
    subprocess.run([paths.baton, "certs", "--out", certs], check=True, stdout=subprocess.DEVNULL)
    token = os.urandom(16).hex()
    digest = subprocess.run([paths.baton, "hash-token"], input=token.encode(), capture_output=True,
                            check=True).stdout.decode().strip()
    up = procs.spawn("upstream", [paths.tools / "bench_upstream"])
    ready = procs.read_json(up, lambda o: o.get("event") == "ready", 10)
    return {"certs": certs, "token": token, "digest": digest, "echo": ready["echo"], "sink": ready["sink"]}


def proc_stat(pid):
    """Fields 3.. of /proc/PID/stat (state first), or None when pid is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def start_time(pid):
    """When pid started (clock ticks after boot): with the pid, names a process."""
    st = proc_stat(pid)
    return int(st[19]) if st else None


def cpu_s(pids):
    """utime + stime of the processes, in seconds (gone ones count 0)."""
    ticks = 0
    for pid in pids:
        st = proc_stat(pid)
        if st:
            ticks += int(st[11]) + int(st[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    """Live child processes of pid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and int(st[1]) == pid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return sorted(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_run(paths, tools, fds):
    """A benchmark's start: checks that the baton binary and `tools` (names
    in BUILD/bench) are built, empties its run directory, and raises the
    descriptor limit towards `fds` (to the hard limit, or beyond it as root).
    Returns the soft limit now in force."""
    import resource
    for f in [paths.baton] + [paths.tools / t for t in tools]:
        if not os.access(f, os.X_OK):
            raise Broken("%s is missing: build first" % f)
    shutil.rmtree(paths.run, ignore_errors=True)
    paths.run.mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, fds)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # raising the hard limit needs root
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def print_results(lines, path):
    """Prints `bench: <name> <value> <unit>` for each (name, value, unit)
    after an empty line, and writes them to path as JSON {name: {value, unit}}."""
    print()
    for name, value, unit in lines:
        print("bench: %s %s %s" % (name, value, unit))
    with open(path, "w") as f:
        json.dump({name: {"value": value, "unit": unit} for name, value, unit in lines}, f, indent=1)


def wait_for(check, timeout, what, step=0.01):
    """Polls check() until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Broken("%s: not within %.0f s" % (what, timeout))
        time.sleep(step)


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
