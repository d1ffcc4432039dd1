#!/usr/bin/env python3
"""`make bench`, peer part: baton side by side with HAProxy, stunnel and nginx.

    bench/peers.py [BUILD_DIR]          (default build, already built)

Every target terminates TLS 1.2 with the same ECDSA P-256 certificate (from
`baton certs`), the same suite and the same ECDHE group, with one worker /
thread / loop, in front of the same upstreams (bench_upstream's echo and
sink). The client side is the same for all: the project's own TLS code
(bench_push, peer_load, idle_tunnels), speaking plain TLS to the peers and
the baton protocol to baton. Figures (bench/README.md says how each is
measured):

  - single-connection throughput (pre-sealed client, so that only the
    target does crypto while the clock runs), AES128-GCM and ChaCha20;
  - 1 KiB request/response, 16 connections: rate, p50, p99;
  - new TLS handshakes per second, full and resumed (baton: up to WELCOME);
  - RSS per idle connection, 10,000 connections (fewer if the descriptor
    limit does not allow a peer its upstream connections);
  - reload under load: errors, refused connections, the longest pause, how
    long the old process lives (baton hot restart, HAProxy master-worker
    reload, i.e. a new process with -sf, `nginx -s reload`, stunnel SIGHUP);
  - the AEAD speed on this machine (aead_bench) as baton's throughput
    ceiling: OpenSSL's, which baton's record layer runs on, and mbedTLS's,
    issue 7's reference (the record layer ran on mbedTLS before).
Rates are also given per second of the target's own CPU time (utime + stime
of its processes during the measurement), because client, target and
upstream share the cores. The order of the targets rotates between passes;
figures are medians over the passes. In each pass the request/response
windows of all targets run back to back, BENCH_PEERS_RR_ROUNDS rounds, the
pass's order and then the reverse; their figures are medians over all
windows of all passes.

Output: a report on stdout, `bench: peers_<name> <value> <unit>` lines, the
markdown table with machine, versions and commands in
bench/results/YYYY-MM-DD-peers.md and its chart in YYYY-MM-DD-peers.png
(gnuplot), raw data in BUILD_DIR/bench-run/peers/peers.json.

Knobs (environment): BENCH_PEERS_TARGETS ("baton haproxy stunnel nginx"),
BENCH_PEERS_PASSES (3), BENCH_PEERS_BYTES (throughput transfer, 128MiB),
BENCH_PEERS_SECONDS (each handshake-rate measurement, 1),
BENCH_PEERS_RR_SECONDS (each request/response window, 4: a p99 over 1 s
moves with every host hiccup), BENCH_PEERS_RR_ROUNDS (request/response
windows per target, suite and pass, 2: one window's p99 moves by +-10%
with the host, more than the targets differ),
BENCH_PEERS_IDLE (10000), BENCH_PEERS_RELOAD_WATCH_S (how long the old
process is watched, 2), BENCH_PEERS_GROUP (x25519 or p256),
BENCH_PEERS_RESULTS (where the markdown and PNG go; "" skips them).
Exit status 0 when every measurement ran (targets met or not), 1 when
something broke. Every process started here is stopped on exit.
"""

import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import (Broken, Paths, Procs, alive, baton_config, children, cpu_s, free_port,  # noqa: E402
                   port_open, rss_kib, run_main, start_time, wait_for)
from procs import bench_setup  # noqa: E402

PATHS = Paths("peers")
ROOT, BUILD, BATON, TOOLS, RUN = PATHS.root, PATHS.build, PATHS.baton, PATHS.tools, PATHS.run

TARGETS = os.environ.get("BENCH_PEERS_TARGETS", "baton haproxy stunnel nginx").split()
PASSES = int(os.environ.get("BENCH_PEERS_PASSES", "3"))
BYTES = os.environ.get("BENCH_PEERS_BYTES", "128MiB")
SECONDS = float(os.environ.get("BENCH_PEERS_SECONDS", "1"))
RR_SECONDS = float(os.environ.get("BENCH_PEERS_RR_SECONDS", "4"))
RR_ROUNDS = int(os.environ.get("BENCH_PEERS_RR_ROUNDS", "2"))
IDLE = int(os.environ.get("BENCH_PEERS_IDLE", "10000"))
RELOAD_WATCH_S = float(os.environ.get("BENCH_PEERS_RELOAD_WATCH_S", "2"))
GROUP = os.environ.get("BENCH_PEERS_GROUP", "x25519")
RESULTS = os.environ.get("BENCH_PEERS_RESULTS", str(ROOT / "bench" / "results"))

SUITES = {"aes": "ECDHE-ECDSA-AES128-GCM-SHA256", "chacha": "ECDHE-ECDSA-CHACHA20-POLY1305"}
AEAD_NAME = {"aes": "AES-128-GCM", "chacha": "CHACHA20-POLY1305"}
AEAD_LIB = {"openssl": "OpenSSL", "mbedtls": "mbedTLS"}
SUITE_LABEL = {"aes": "AES128-GCM", "chacha": "ChaCha20-Poly1305"}
OPENSSL_GROUP = {"x25519": "X25519", "p256": "P-256"}
NGINX_GROUP = {"x25519": "X25519", "p256": "prime256v1"}
RR_CONNS = 16
HS_CONCURRENCY = 8
RELOAD_CONNS = 16
RELOAD_BEFORE_S = 1.0   # load before the reload (the reference window)
RELOAD_WINDOW_S = 2.0   # the reload window lasts at least this long
LABEL = {"baton": "baton", "haproxy": "HAProxy", "stunnel": "stunnel", "nginx": "nginx"}

# Targets (issue 7): each at most a quarter of... see the verdicts in main().
TARGET_IDLE_SHARE = 0.25
TARGET_CEILING_SHARE = 0.80
TARGET_OLD_GONE_MS = 1000

procs = Procs(RUN)


def aead_row(aead, lib, cipher):
    """aead_bench's figures for one library and cipher (AEAD_NAME's names)."""
    return aead["%s %s" % (lib, cipher)]


def ceiling(aead, lib, s):
    """Open speed (MiB/s) of suite s's AEAD in lib on 16 KiB records."""
    return aead_row(aead, lib, AEAD_NAME[s])["open_mib_s"]


class Target:
    """One TLS terminator: started fresh, its processes, reloaded, stopped."""
    name = ""
    proto = "tls"
    reload_how = ""
    stop_signal = signal.SIGTERM

    def __init__(self, env):
        self.env = env  # certs, upstream addresses, token
        self.p = None
        self.known = set()  # every pid of ours seen, to stop leftovers

    def pids(self):
        if not self.p:
            return []
        ps = [self.p.pid] + children(self.p.pid)
        self.known.update((p, start_time(p)) for p in ps)
        return ps

    def workers(self):
        """The processes that serve connections and go away on reload."""
        return self.pids()

    def stop(self):
        if self.p:
            self.pids()
            procs.stop(self.p, self.stop_signal)
            for pid, started in self.known:  # a worker its master left behind (same pid and start time)
                if alive(pid) and start_time(pid) == started:
                    os.kill(pid, signal.SIGKILL)
            self.p = None
            self.known = set()

    def free_ports(self):
        """A peer listens on two free loopback ports: to the echo and to the sink."""
        self.echo_port, self.sink_port = free_port(), free_port()
        self.echo_addr = "127.0.0.1:%d" % self.echo_port
        self.sink_addr = "127.0.0.1:%d" % self.sink_port

    def wait_listening(self, what):
        for port in (self.echo_port, self.sink_port):
            wait_for(lambda: port_open(port) or (self.p.poll() is not None and
                                                  _raise("%s exited (log: %s)" % (what, RUN / (what + ".log")))),
                     15, "%s listening on 127.0.0.1:%d" % (what, port))

    def after_reload(self):
        pass


def _raise(msg):
    raise Broken(msg)


class MasterWorker(Target):
    """A master process whose worker serves; a reload replaces the worker."""

    def start(self):
        self.p = procs.spawn(self.name, self.command())
        self.wait_listening(self.name)
        wait_for(lambda: children(self.p.pid), 10, "%s's worker" % self.name)

    def workers(self):
        return children(self.p.pid)

    def reload(self):
        self.old = self.workers()
        self.signal_reload()
        return self.old

    def after_reload(self):
        wait_for(lambda: set(children(self.p.pid)) - set(self.old), 15, "%s's new worker" % self.name)


class Baton(Target):
    name = "baton"
    proto = "baton"
    stop_signal = signal.SIGINT  # SIGTERM would drain first (drain.delay_ms, 5 s)
    reload_how = "hot restart: a second `baton serve` with the same config takes over sockets and tunnels"

    def __init__(self, env):
        super().__init__(env)
        self.epoch = 0
        self.cfg = RUN / "baton.yaml"
        self.config_text = baton_config(self.cfg, "bench-peers", env["certs"], env["digest"],
                                        {"echo": env["echo"], "sink": env["sink"]},
                                        handoff=RUN / "baton-handoff.sock",
                                        limits={"max_tunnels": 20000, "idle_timeout_ms": 600000,
                                                "handshake_timeout_ms": 60000})

    def command(self):
        return [BATON, "serve", "-c", self.cfg, "--log-level", "warn"]

    def start(self):
        self.epoch += 1
        self.p = procs.spawn("baton-%d" % self.epoch, self.command())
        ready = procs.read_json(self.p, lambda o: o.get("event") == "ready", 20)
        self.echo_addr = self.sink_addr = ready["listen"]

    def reload(self):
        old = self.p
        self.epoch += 1
        self.p = procs.spawn("baton-%d" % self.epoch, self.command())
        self.old = old
        return [old.pid]

    def after_reload(self):
        procs.read_json(self.p, lambda o: o.get("event") == "ready", 30)
        procs.stop(self.old)


class HAProxy(MasterWorker):
    name = "haproxy"
    reload_how = "master-worker (-W) reload, SIGUSR2: a new worker, the old one gets -sf (soft stop)"

    def __init__(self, env):
        super().__init__(env)
        pem = RUN / "haproxy.pem"
        pem.write_text((env["certs"] / "server.crt").read_text() + (env["certs"] / "server.key").read_text())
        self.free_ports()
        self.cfg = RUN / "haproxy.cfg"
        # The backend connection waits for the client's first byte
        # (inspect-delay), as baton's idle tunnels hold no upstream
        # connection; `no strict-limits`: maxconn asks for more descriptors
        # than the hard limit, haproxy runs with what it gets.
        self.cfg.write_text("""global
  nbthread 1
  maxconn 20000
  no strict-limits
  ssl-default-bind-ciphers {ciphers}
  ssl-default-bind-curves {group}
  ssl-default-bind-options ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.2
  stats socket {run}/haproxy.sock mode 600 expose-fd listeners level admin
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend echo_in
  bind 127.0.0.1:{ep} ssl crt {pem}
  tcp-request inspect-delay 10m
  tcp-request content accept if {{ req.len gt 0 }}
  default_backend echo
frontend sink_in
  bind 127.0.0.1:{sp} ssl crt {pem}
  default_backend sink
backend echo
  server echo {echo}
backend sink
  server sink {sink}
""".format(ciphers=":".join(SUITES.values()), group=OPENSSL_GROUP[GROUP], run=RUN, ep=self.echo_port,
           sp=self.sink_port, pem=pem, echo=env["echo"], sink=env["sink"]))
        self.config_text = self.cfg.read_text()
        check = subprocess.run(["haproxy", "-c", "-f", self.cfg], capture_output=True, text=True)
        if check.returncode != 0:
            raise Broken("haproxy rejected its configuration:\n" + check.stdout + check.stderr)

    def command(self):
        return ["haproxy", "-W", "-db", "-f", self.cfg]

    def signal_reload(self):
        os.kill(self.p.pid, signal.SIGUSR2)


class Stunnel(Target):
    name = "stunnel"
    reload_how = "SIGHUP: the same process re-reads its configuration (no new process)"

    def __init__(self, env):
        super().__init__(env)
        self.free_ports()
        self.cfg = RUN / "stunnel.conf"
        section = """[{name}]
accept = 127.0.0.1:{port}
connect = {up}
cert = {c}/server.crt
key = {c}/server.key
sslVersionMin = TLSv1.2
sslVersionMax = TLSv1.2
ciphers = {ciphers}
curves = {group}
"""
        self.cfg.write_text("""foreground = yes
pid =
syslog = no
debug = warning
""" + "".join(section.format(name=n, port=p, up=u, c=env["certs"], ciphers=":".join(SUITES.values()),
                                group=OPENSSL_GROUP[GROUP])
              for n, p, u in (("echo", self.echo_port, env["echo"]), ("sink", self.sink_port, env["sink"]))))
        self.config_text = self.cfg.read_text()

    def command(self):
        return ["stunnel4", self.cfg]

    def start(self):
        self.p = procs.spawn("stunnel", self.command())
        self.wait_listening("stunnel")

    def reload(self):
        os.kill(self.p.pid, signal.SIGHUP)
        return []


class Nginx(MasterWorker):
    name = "nginx"
    reload_how = "`nginx -s reload`: the master starts a new worker, the old one shuts down gracefully"

    def __init__(self, env):
        super().__init__(env)
        self.free_ports()
        self.prefix = RUN / "nginx"
        self.prefix.mkdir(exist_ok=True)
        self.cfg = self.prefix / "nginx.conf"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.cfg.write_text("""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {hard};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {conns}; }}
stream {{
  ssl_certificate {c}/server.crt;
  ssl_certificate_key {c}/server.key;
  ssl_protocols TLSv1.2;
  ssl_ciphers {ciphers};
  ssl_ecdh_curve {group};
  proxy_timeout 10m;
  server {{ listen 127.0.0.1:{ep} ssl; proxy_pass {echo}; }}
  server {{ listen 127.0.0.1:{sp} ssl; proxy_pass {sink}; }}
}}
""".format(hard=hard, prefix=self.prefix, conns=hard - 64, c=env["certs"], ciphers=":".join(SUITES.values()),
           group=NGINX_GROUP[GROUP], ep=self.echo_port, sp=self.sink_port, echo=env["echo"], sink=env["sink"]))
        self.config_text = self.cfg.read_text()
        self.base = ["nginx", "-p", self.prefix, "-c", self.cfg, "-e", self.prefix / "error.log"]

    def command(self):
        return self.base

    def signal_reload(self):
        r = subprocess.run([str(a) for a in self.base + ["-s", "reload"]], capture_output=True, text=True)
        if r.returncode != 0:
            raise Broken("nginx -s reload failed: " + r.stderr)


KINDS = {"baton": Baton, "haproxy": HAProxy, "stunnel": Stunnel, "nginx": Nginx}


# --- measurements ---

def client_env(env):
    return dict(os.environ, BATON_TOKEN=env["token"])


def common(t, env, suite):
    return ["--server-name", "localhost", "--ca", env["certs"] / "ca.crt", "--suite", SUITES[suite],
            "--group", GROUP]


def settle(pids, timeout=5.0):
    """Waits until the processes stop using CPU (two quiet 100 ms samples)."""
    quiet, last = 0, cpu_s(pids)
    deadline = time.monotonic() + timeout
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_s(pids)
        quiet = quiet + 1 if now - last < 0.005 else 0
        last = now


def measure_idle(t, env, n, tag):
    settle(t.pids())
    rss0 = rss_kib(t.pids())
    mode = "baton" if t.proto == "baton" else "tls"
    args = [TOOLS / "idle_tunnels", "--mode", mode, "--server", t.echo_addr, "--count", n, "--concurrency", 100,
            "--timeout-s", 150] + common(t, env, "aes")
    if mode == "tls":
        args.append("--probe-echo")
    tool = procs.spawn("idle-%s" % tag, args, env=client_env(env))
    ready = procs.read_json(tool, lambda o: o.get("event") == "ready", 170)
    settle(t.pids())
    rss1 = rss_kib(t.pids())
    lost = (RUN / ("idle-%s.log" % tag)).read_text().count("an open connection closed")
    procs.stop(tool)
    if lost:
        raise Broken("%s: %d idle connections closed before the RSS was read (see %s)" %
                     (t.name, lost, RUN / ("idle-%s.log" % tag)))
    return {"rss0_kib": rss0, "rss1_kib": rss1, "per_conn_kib": (rss1 - rss0) / n, "open_s": ready["open_s"],
            "count": n}


def measure_throughput(t, env, suite, tag):
    pids = t.pids()
    c0 = cpu_s(pids)
    r = procs.run_json("push-%s" % tag,
                       [TOOLS / "bench_push", "--proto", t.proto, "--server", t.sink_addr, "--route", "sink",
                        "--bytes", BYTES] + common(t, env, suite), 120, env=client_env(env))
    cpu = cpu_s(pids) - c0
    mib = r["bytes"] / 1048576.0
    check_suite(t, r["suite"], suite)
    return {"mib_s": r["mib_s"], "per_core": mib / cpu if cpu > 0 else None, "target_cpu_s": cpu,
            "suite": r["suite"]}


def check_suite(t, got, suite):
    want = "CHACHA20" if suite == "chacha" else "AES-128-GCM"
    if want not in got:
        raise Broken("%s negotiated %s instead of %s" % (t.name, got, SUITES[suite]))


def peer_load(t, env, mode, suite, tag, extra):
    r = procs.run_json("load-%s" % tag,
                       [TOOLS / "peer_load", mode, "--proto", t.proto, "--server", t.echo_addr,
                        "--target-pids", ",".join(str(p) for p in t.pids())] + common(t, env, suite) + extra,
                       60, env=client_env(env))
    check_suite(t, r["suite"], suite)
    return r


def measure_rr(t, env, suite, tag):
    r = peer_load(t, env, "rr", suite, tag, ["--conns", RR_CONNS, "--size", 1024, "--warmup-s", 0.3,
                                             "--seconds", RR_SECONDS])
    if r["errors"] or r["refused"]:
        raise Broken("%s: %d errors, %d refused connections during the request/response run" %
                     (t.name, r["errors"], r["refused"]))
    return r


def measure_handshakes(t, env, resume, tag):
    return peer_load(t, env, "handshakes", "aes", tag, ["--resume", int(resume), "--concurrency", HS_CONCURRENCY,
                                                        "--warmup-s", 0.3, "--seconds", SECONDS])


def measure_reload(t, env, tag):
    load = procs.spawn("reload-%s" % tag,
                       [TOOLS / "peer_load", "reload", "--proto", t.proto, "--server", t.echo_addr, "--conns",
                        RELOAD_CONNS, "--interval-ms", 10, "--dialers", 2, "--dial-interval-ms", 10]
                       + common(t, env, "aes"), env=client_env(env))
    procs.read_json(load, lambda o: o.get("event") == "ready", 30)

    def window():
        load.send_signal(signal.SIGUSR1)
        return procs.read_json(load, lambda o: "window" in o, 10)

    time.sleep(RELOAD_BEFORE_S)  # pacing: the reference window
    before = window()
    t0 = time.monotonic()
    old = t.reload()
    gone_ms = None
    if old:
        deadline = t0 + RELOAD_WATCH_S
        while time.monotonic() < deadline:
            if not any(alive(p) for p in old):
                gone_ms = 1000 * (time.monotonic() - t0)
                break
            time.sleep(0.005)
    t.after_reload()
    rest = RELOAD_WINDOW_S - (time.monotonic() - t0)
    if rest > 0:
        time.sleep(rest)  # pacing: the reload window is at least RELOAD_WINDOW_S long
    during = window()
    load.send_signal(signal.SIGTERM)
    procs.read_json(load, lambda o: o.get("event") == "done", 10)
    load.wait(10)
    still = [p for p in old if alive(p)]
    return {"before": before, "during": during, "in_place": not old, "old_gone_ms": gone_ms,
            "old_alive_after_window": len(still), "errors": during["errors"], "refused": during["refused"],
            "pause_ms": during["max_rtt_us"] / 1000, "pause_before_ms": before["max_rtt_us"] / 1000,
            "new_max_ms": during["new_max_us"] / 1000, "samples": during["samples"]}


def measure_target(t, env, pass_no):
    tag = "%s-%d" % (t.name, pass_no)
    out = {}
    t.start()
    out["idle"] = measure_idle(t, env, env["idle_n"], tag)
    t.stop()
    t.start()  # a fresh process: no 10,000 closes in its first measurement
    for s in SUITES:
        out["tput_" + s] = measure_throughput(t, env, s, "%s-%s" % (tag, s))
    out["hs_full"] = measure_handshakes(t, env, False, "hs-full-" + tag)
    out["hs_resumed"] = measure_handshakes(t, env, True, "hs-resumed-" + tag)
    out["reload"] = measure_reload(t, env, tag)
    t.stop()
    return out


def measure_rr_block(targets, order, env, pass_no):
    """The request/response windows of every target, back to back (RR_ROUNDS
    rounds, the pass's order and then the reverse; in each round, for each
    suite, one window per target): the host's share of the CPU drifts over
    minutes, so windows seconds apart compare the targets under the same
    conditions, where windows a whole target's measurements apart (20 s each)
    did not. Every target runs meanwhile, idle but for the one measured.
    Returns {target: {"rr_<suite>": [one result per round]}}."""
    out = {name: {"rr_" + s: [] for s in SUITES} for name in order}
    for name in order:
        targets[name].start()
    try:
        for rnd in range(RR_ROUNDS):
            for s in SUITES:
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    out[name]["rr_" + s].append(
                        measure_rr(targets[name], env, s, "rr-%s-%d-%d-%s" % (name, pass_no, rnd + 1, s)))
    finally:
        for name in order:
            targets[name].stop()
    return out


# --- report ---

def med(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return "{:,.{d}f}".format(v, d=digits)


def build_rows(results, aead):
    """(label, key, better, digits, {target: median}) for every figure."""
    def col(fn):
        return {t: med([fn(r) for r in results[t]]) for t in results}

    def col_rr(s, key):  # over every request/response window of every pass
        return {t: med([w[key] for r in results[t] for w in r["rr_" + s]]) for t in results}

    rows = []
    for s in SUITES:
        lab = SUITE_LABEL[s]
        rows.append(("throughput, 1 connection, %s (MiB/s)" % lab, "tput_%s" % s, "high", 0,
                     col(lambda r: r["tput_" + s]["mib_s"])))
        rows.append(("  per target CPU-second (MiB)", "tput_%s_per_core" % s, "high", 0,
                     col(lambda r: r["tput_" + s]["per_core"])))
    for s in SUITES:
        lab = SUITE_LABEL[s]
        rows.append(("1 KiB request/response, 16 connections, %s (/s)" % lab, "rr_%s" % s, "high", 0,
                     col_rr(s, "per_s")))
        rows.append(("  per target CPU-second", "rr_%s_per_core" % s, "high", 0, col_rr(s, "per_core_s")))
        rows.append(("  p50 latency (us)", "rr_%s_p50" % s, "low", 0, col_rr(s, "p50_us")))
        rows.append(("  p99 latency (us)", "rr_%s_p99" % s, "low", 0, col_rr(s, "p99_us")))
    for k, lab in (("hs_full", "full"), ("hs_resumed", "resumed")):
        rows.append(("new TLS handshakes, %s (/s)" % lab, k, "high", 0, col(lambda r: r[k]["per_s"])))
        rows.append(("  per target CPU-second", k + "_per_core", "high", 0, col(lambda r: r[k]["per_core_s"])))
    rows.append(("  resumed share (%)", "hs_resumed_share", None, 0,
                 col(lambda r: 100.0 * r["hs_resumed"]["resumed"] / max(1, r["hs_resumed"]["count"]))))
    rows.append(("RSS per idle connection (KiB)", "idle_kib", "low", 1, col(lambda r: r["idle"]["per_conn_kib"])))
    rows.append(("reload under load: errors", "reload_errors", None, 0, col(lambda r: r["reload"]["errors"])))
    rows.append(("  refused connections", "reload_refused", None, 0, col(lambda r: r["reload"]["refused"])))
    rows.append(("  longest pause of a connection (ms)", "reload_pause", None, 1,
                 col(lambda r: r["reload"]["pause_ms"])))
    rows.append(("  longest new connection (ms)", "reload_new_max", None, 1,
                 col(lambda r: r["reload"]["new_max_ms"])))
    return rows


def old_process_text(results, t):
    rs = [r["reload"] for r in results[t]]
    if all(r["in_place"] for r in rs):
        return "same process"
    gone = [r["old_gone_ms"] for r in rs]
    if any(g is None for g in gone):
        return "> %g s (%d/%d passes)" % (RELOAD_WATCH_S, sum(g is None for g in gone), len(gone))
    return "%s ms" % fmt(med(gone))


def ratio(row, peers):
    _, _, better, _, vals = row
    b = vals.get("baton")
    pv = [vals[p] for p in peers if vals.get(p) is not None]
    if better is None or b is None or not pv:
        return None, None
    best = max(pv) if better == "high" else min(pv)
    return (b / best if best else None), best


def markdown(results, aead, rows, meta):
    targets = [t for t in TARGETS if t in results]
    peers = [t for t in targets if t != "baton"]
    out = []
    head = "| figure | " + " | ".join(LABEL[t] for t in targets) + (" | baton / best peer |" if peers else " |")
    out.append(head)
    out.append("|---" * (len(targets) + 1 + (1 if peers else 0)) + "|")
    for row in rows:
        label, key, better, digits, vals = row
        r, _ = ratio(row, peers)
        cells = [fmt(vals.get(t), digits) for t in targets]
        line = "| %s | %s |" % (label, " | ".join(cells))
        if peers:
            line += " %s |" % (("%.2f" % r) if r is not None else "-")
        out.append(line)
    line = "|   old process lives after the reload | " + " | ".join(old_process_text(results, t) for t in targets)
    out.append(line + (" | - |" if peers else " |"))
    if "baton" in results:
        for lib, what in (("openssl", "the record layer's"), ("mbedtls", "reference")):
            for s in SUITES:
                ceil = ceiling(aead, lib, s)
                tp = med([r["tput_" + s]["mib_s"] for r in results["baton"]])
                cells = ["%.0f%% of %.0f" % (100 * tp / ceil, ceil) if t == "baton" else "-" for t in targets]
                out.append("| baton throughput / %s %s open ceiling (MiB/s, %s) | %s |%s" %
                           (AEAD_LIB[lib], SUITE_LABEL[s], what, " | ".join(cells), " - |" if peers else ""))
    return "\n".join(out)


def verdicts(results, aead, rows):
    peers = [t for t in results if t != "baton"]
    if "baton" not in results or not peers:
        return []
    by = {row[1]: row for row in rows}
    v = []
    r, best = ratio(by["idle_kib"], peers)
    b = by["idle_kib"][4]["baton"]
    v.append(("idle_rss", b is not None and best is not None and b <= TARGET_IDLE_SHARE * best,
              "RSS per idle connection %.1f KiB <= 1/4 of the best peer's %.1f KiB" % (b, best)))
    b, best = by["rr_aes_p99"][4]["baton"], ratio(by["rr_aes_p99"], peers)[1]
    v.append(("rr_p99", b <= best, "1 KiB request/response p99 %.0f us <= best peer's %.0f us (AES128-GCM)" %
              (b, best)))
    b, best = by["hs_resumed_per_core"][4]["baton"], ratio(by["hs_resumed_per_core"], peers)[1]
    raw_b, raw_best = by["hs_resumed"][4]["baton"], ratio(by["hs_resumed"], peers)[1]
    v.append(("resumed_handshakes", b >= best,
              "resumed handshakes per target CPU-second %.0f >= best peer's %.0f (per wall second: %.0f vs %.0f)" %
              (b, best, raw_b, raw_best)))
    # Issue 7 states this target against mbedTLS's AEAD, which bounded the
    # record layer when it ran on mbedTLS; it runs on OpenSSL now, so the
    # text also gives the share of OpenSSL's ceiling and of the best peer.
    ceil = ceiling(aead, "mbedtls", "aes")
    tp = by["tput_aes"][4]["baton"]
    _, best_tp = ratio(by["tput_aes"], peers)
    v.append(("throughput", tp >= TARGET_CEILING_SHARE * ceil,
              "throughput %.0f MiB/s >= 80%% of the mbedTLS AES-128-GCM open ceiling %.0f MiB/s (%.0f%%; "
              "the record layer runs on OpenSSL: %.0f%% of its ceiling %.0f MiB/s, %.0f%% of the best peer's "
              "%.0f MiB/s)" % (tp, ceil, 100 * tp / ceil, 100 * tp / ceiling(aead, "openssl", "aes"),
                             ceiling(aead, "openssl", "aes"), 100 * tp / best_tp, best_tp)))
    rl = [r["reload"] for r in results["baton"]]
    ok = all(r["errors"] == 0 and r["refused"] == 0 and r["old_gone_ms"] is not None and
             r["old_gone_ms"] <= TARGET_OLD_GONE_MS for r in rl)
    v.append(("reload", ok, "hot restart in every pass: 0 errors, 0 refused, old process gone within 1 s "
              "(errors %s, refused %s, gone after %s ms)" %
              ([r["errors"] for r in rl], [r["refused"] for r in rl],
               [None if r["old_gone_ms"] is None else round(r["old_gone_ms"]) for r in rl])))
    return v


def chart_label(key):
    """A short x label from a row key: tput_aes_per_core -> throughput AES /CPU-s."""
    words = {"tput": "throughput", "rr": "1 KiB rr", "hs": "handshakes", "aes": "AES", "chacha": "ChaCha",
             "per": "/CPU-s", "core": "", "idle": "idle RSS", "kib": "", "p50": "p50", "p99": "p99"}
    return " ".join(w for w in (words.get(part, part) for part in key.split("_")) if w)


def chart(rows, results, png):
    """Each figure relative to the best peer (1 = best peer; higher is better)."""
    targets = [t for t in TARGETS if t in results]
    peers = [t for t in targets if t != "baton"]
    data = RUN / "chart.dat"
    lines = []
    for label, key, better, digits, vals in rows:
        if better is None or not peers:
            continue
        pv = [vals[p] for p in peers if vals.get(p)]
        if not pv:
            continue
        best = max(pv) if better == "high" else min(pv)
        rel = []
        for t in targets:
            x = vals.get(t)
            rel.append("%.3f" % ((x / best if better == "high" else best / x) if x else 0))
        lines.append('"%s" %s' % (chart_label(key), " ".join(rel)))
    data.write_text("\n".join(lines) + "\n")
    script = RUN / "chart.gp"
    plots = ", ".join("'%s' using %d:xtic(1) title '%s'" % (data, i + 2, LABEL[t]) if i == 0 else
                      "'' using %d title '%s'" % (i + 2, LABEL[t]) for i, t in enumerate(targets))
    script.write_text("""set terminal pngcairo size 1400,650 font 'sans,10'
set output '{png}'
set title 'baton and its peers, relative to the best peer (1 = best peer, higher is better; latency and RSS inverted)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -35 left
set yrange [0:*]
set grid ytics
set key top right
set bmargin 8
plot {plots}, 1 with lines dt 2 lc rgb 'black' notitle
""".format(png=png, plots=plots))
    r = subprocess.run(["gnuplot", str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Broken("gnuplot failed: " + r.stderr)


def versions():
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and "inetd" not in l]
        return lines[0].strip() if lines else "?"

    def pkg(name):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
        return r.stdout.strip() or "?"

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "baton": "%s (git %s%s)" % (first([BATON, "version"]), rev or "?", ", with uncommitted changes" if dirty else ""),
        "haproxy": first(["haproxy", "-v"]),
        "stunnel": first(["stunnel4", "-version"]),
        "nginx": first(["nginx", "-v"]),
        "mbedtls": "libmbedtls %s" % pkg("libmbedtls-dev"),
        "openssl": "libssl3 %s (HAProxy, stunnel, nginx)" % pkg("libssl3"),
    }


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "load_at_start": "%.2f %.2f %.2f" % os.getloadavg(),
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def main():
    t_start = time.monotonic()
    for f in (BATON, TOOLS / "bench_upstream", TOOLS / "bench_push", TOOLS / "peer_load", TOOLS / "idle_tunnels",
              TOOLS / "aead_bench"):
        if not os.access(f, os.X_OK):
            raise Broken("%s is missing: build first" % f)
    for t in TARGETS:
        if t not in KINDS:
            raise Broken("unknown target %s (BENCH_PEERS_TARGETS: %s)" % (t, " ".join(KINDS)))
    tools = {"haproxy": "haproxy", "stunnel": "stunnel4", "nginx": "nginx"}
    for t in TARGETS:
        if t in tools and not shutil.which(tools[t]):
            raise Broken("%s is not installed (scripts/deps.sh installs it)" % tools[t])
    if "nginx" in TARGETS and not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        raise Broken("nginx's stream module is not installed (libnginx-mod-stream; scripts/deps.sh installs it)")
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # nginx and stunnel hold two descriptors per idle connection (client and
    # upstream), and stunnel admits at most 125/256 of its descriptor limit
    # as clients: with a hard limit of 20,000 that is 9,765. Every target
    # gets the same count.
    idle_n = min(IDLE, hard * 125 // 256 - 50)

    env = bench_setup(procs, PATHS)
    env["idle_n"] = idle_n

    mach = machine()
    print("baton vs HAProxy, stunnel, nginx (%s, %d cores, %s, load %s)" %
          (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mach["cores"], mach["kernel"], mach["load_at_start"]))
    print("  every target: TLS 1.2, ECDSA P-256 certificate, group %s; %s and %s; one worker/thread/loop" %
          (GROUP, SUITES["aes"], SUITES["chacha"]))

    aead_out = subprocess.run([TOOLS / "aead_bench", "--seconds", "0.5"], capture_output=True, text=True, check=True)
    aead = {}
    for line in aead_out.stdout.splitlines():
        d = json.loads(line)
        aead["%s %s" % (d["lib"], d["cipher"])] = d
    for lib in ("openssl", "mbedtls"):
        print("  %s AEAD, 16 KiB records, one thread: " % AEAD_LIB[lib] + "; ".join(
            "%s seal %.0f / open %.0f MiB/s" % (c, aead_row(aead, lib, c)["seal_mib_s"],
                                                 aead_row(aead, lib, c)["open_mib_s"])
            for c in AEAD_NAME.values()))

    targets = {name: KINDS[name](env) for name in TARGETS}
    results = {name: [] for name in TARGETS}
    for i in range(PASSES):
        order = TARGETS[i % len(TARGETS):] + TARGETS[:i % len(TARGETS)]
        print("\n== pass %d of %d: %s ==" % (i + 1, PASSES, ", ".join(order)))
        for name in order:
            t0 = time.monotonic()
            r = measure_target(targets[name], env, i + 1)
            results[name].append(r)
            rl = r["reload"]
            print("  %-8s tput %5.0f / %5.0f MiB/s  hs %5.0f / %5.0f per CPU-s  "
                  "idle %5.1f KiB  reload: %d err, %d refused, pause %.1f ms, old %s  (%.0f s)" %
                  (name, r["tput_aes"]["mib_s"], r["tput_chacha"]["mib_s"],
                   r["hs_full"]["per_core_s"], r["hs_resumed"]["per_core_s"],
                   r["idle"]["per_conn_kib"], rl["errors"], rl["refused"], rl["pause_ms"],
                   "in place" if rl["in_place"] else
                   ("%.0f ms" % rl["old_gone_ms"] if rl["old_gone_ms"] is not None else "> %g s" % RELOAD_WATCH_S),
                   time.monotonic() - t0))
        t0 = time.monotonic()
        rr = measure_rr_block(targets, order, env, i + 1)
        for name in order:
            results[name][-1].update(rr[name])
            for a, c in zip(rr[name]["rr_aes"], rr[name]["rr_chacha"]):
                print("  %-8s rr %6.0f / %6.0f per s  p50 %4.0f / %4.0f us  p99 %4.0f / %4.0f us  (AES / ChaCha)" %
                      (name, a["per_s"], c["per_s"], a["p50_us"], c["p50_us"], a["p99_us"], c["p99_us"]))
        print("  request/response windows back to back (%.0f s)" % (time.monotonic() - t0))

    rows = build_rows(results, aead)
    table = markdown(results, aead, rows, mach)
    checks = verdicts(results, aead, rows)
    wall = time.monotonic() - t_start
    vers = versions()
    date = time.strftime("%Y-%m-%d", time.gmtime())

    print("\n" + table + "\n")
    for name, ok, text in checks:
        print("  %s: %s" % ("PASS" if ok else "FAIL", text))
    for t in TARGETS:
        if t != "baton":
            print("  %s reload: %s" % (LABEL[t], targets[t].reload_how))

    md = ["# baton vs HAProxy, stunnel and nginx, %s" % date, "",
          "Produced by `bench/peers.py` (`make bench`) in %.0f s. Medians of %d passes, the order of the targets "
          "rotated between passes; the request/response windows of all targets back to back in each pass, %d rounds "
          "(the pass's order, then the reverse), so those figures are medians of %d windows per target; one "
          "worker / thread / event loop each; TLS 1.2, ECDSA P-256 certificate, "
          "ECDHE %s; the client is the project's own TLS code for every target (plain TLS to the peers, the "
          "baton protocol to baton). Rates \"per target CPU-second\" divide by the target's own utime+stime "
          "during the measurement: client, target and upstream share %d cores. baton / best peer: best is the "
          "highest rate, the lowest latency or RSS. How each figure is measured: "
          "[bench/README.md](../README.md#peers-benchpeerspy)." % (wall, PASSES, RR_ROUNDS, PASSES * RR_ROUNDS, GROUP,
                                                                  mach["cores"]), "",
          "![chart](%s-peers.png)" % date, "", table, "",
          "Idle connections: %d per target (the descriptor hard limit is %d here and cannot be raised; stunnel "
          "admits at most 125/256 of it as clients, nginx and stunnel hold two per connection). "
          "Throughput: %s per pass, pre-sealed by the client, so that only the target does crypto while the "
          "clock runs. baton's record layer seals and opens with OpenSSL's EVP AEADs, like the peers (mbedTLS "
          "runs only its handshake); the last rows compare its throughput with the AEAD open speed on this "
          "machine, OpenSSL's and, for reference, mbedTLS 2.28's (issue 7's ceiling, from when the record layer "
          "ran on mbedTLS)." %
          (idle_n, mach["fd_limit"], BYTES), "", "## Targets (issue 7)", ""]
    md += ["- %s: %s" % ("met" if ok else "**not met**", text) for _, ok, text in checks]
    md += ["", "## Reload", ""]
    md += ["- %s: %s" % (LABEL[t], targets[t].reload_how) for t in TARGETS]
    md += ["", "Per pass (errors / refused / longest pause ms / old process gone after ms):", ""]
    for t in TARGETS:
        md.append("- %s: %s" % (LABEL[t], "; ".join(
            "%d / %d / %.1f / %s" % (r["reload"]["errors"], r["reload"]["refused"], r["reload"]["pause_ms"],
                                     "same process" if r["reload"]["in_place"] else
                                     ("%.0f" % r["reload"]["old_gone_ms"] if r["reload"]["old_gone_ms"] is not None
                                      else "alive after %g s" % RELOAD_WATCH_S))
            for r in results[t])))
        samples = sorted({s for r in results[t] for s in r["reload"]["samples"]})
        if samples:
            md.append("  (%s)" % "; ".join(samples[:4]))
    md += ["", "## Machine and versions", ""]
    md += ["- %s: %s" % (k, v) for k, v in mach.items()]
    md += ["- %s" % v for v in vers.values()]
    md += ["", "## Commands", "", "```",
           "make bench        # or: bench/peers.py BUILD_DIR, after ninja -C BUILD_DIR",
           "aead_bench --seconds 0.5"]
    for t in TARGETS:
        md.append("%-8s %s" % (t + ":", " ".join(str(a) for a in targets[t].command())))
    md += ["bench_push --proto tls|baton --server TARGET --route sink --bytes %s --suite SUITE --group %s" %
           (BYTES, GROUP),
           "peer_load rr --proto tls|baton --conns %d --size 1024 --warmup-s 0.3 --seconds %g --suite SUITE" %
           (RR_CONNS, RR_SECONDS),
           "peer_load handshakes --resume 0|1 --concurrency %d --warmup-s 0.3 --seconds %g" %
           (HS_CONCURRENCY, SECONDS),
           "idle_tunnels --mode tls|baton --count %d --concurrency 100" % idle_n,
           "peer_load reload --conns %d --interval-ms 10 --dialers 2 --dial-interval-ms 10; reload after %g s; "
           "window >= %g s; old process watched for %g s" % (RELOAD_CONNS, RELOAD_BEFORE_S, RELOAD_WINDOW_S,
                                                             RELOAD_WATCH_S),
           "```", "", "Configurations (paths are the run's temporary directory):", ""]
    for t in TARGETS:
        md += ["<details><summary>%s</summary>" % LABEL[t], "", "```", targets[t].config_text.rstrip(), "```", "",
               "</details>", ""]

    if RESULTS:
        res = Path(RESULTS)
        res.mkdir(parents=True, exist_ok=True)
        chart(rows, results, res / ("%s-peers.png" % date))
        (res / ("%s-peers.md" % date)).write_text("\n".join(md) + "\n")
        print("  saved %s and %s" % (res / ("%s-peers.md" % date), res / ("%s-peers.png" % date)))
    (RUN / "peers.md").write_text("\n".join(md) + "\n")

    lines = []
    for label, key, better, digits, vals in rows:
        for t, v in vals.items():
            if v is not None:
                lines.append(("peers_%s_%s" % (key, t), round(v, 2), better or "-"))
    for name, ok, _ in checks:
        lines.append(("peers_verdict_%s" % name, "PASS" if ok else "FAIL", "target"))
    lines.append(("peers_wall_time", round(time.monotonic() - t_start, 1), "s"))
    print()
    for name, value, unit in lines:
        print("bench: %s %s %s" % (name, value, unit))
    json.dump({"results": results, "aead": aead, "machine": mach, "versions": vers,
               "verdicts": [{"name": n, "met": ok, "text": x} for n, ok, x in checks]},
              open(RUN / "peers.json", "w"), indent=1, default=str)
    return 0


if __name__ == "__main__":
    run_main(main, procs)
