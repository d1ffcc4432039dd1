#!/usr/bin/env python3
"""`make bench`, reconnect-storm part: 1,000 clients drained at once.

    bench/storm.py [BUILD_DIR]          (default build, already built)

Three `baton serve` replicas (A, B, C) share one ticket key, so a session
ticket from A resumes on B and C. `bench/storm` (build/bench/storm) starts
1,000 embedded baton::Clients, each with servers = [A, then B and C in a
per-client rotated order], so all of them are on A. Then it sends POST /drain
to A's admin API itself and times, with uv_hrtime() on both ends, how long
each client takes until its session 2 is ready on another replica, and
whether that handshake resumed the TLS session with the ticket.

Runs (each on fresh replicas):
  idle, spread 0      clients with no streams; A's drain.spread_ms = 0
                      (every DRAIN at once)
  active, spread 0    each client keeps one stream open (256 B echo every
                      second, on the old session through the drain: make
                      before break) and opens a one-shot stream every 2 s
                      (those after the drain go to the new session)
  (long               [BENCH_STORM_RUNS only] the long stream without the
                      one-shot streams)
  active, spread 1000 the same with the default drain.spread_ms (1 s)
Everything else is baton's default configuration (drain.delay_ms 5 s,
grace_ms 30 s, max_concurrent_handshakes 256, ...).

Targets: every client back; p99 from POST /drain to the new session < 2 s
(the issue's bar is a reconnect within 2 s of the shutdown notice; timing from
the POST is stricter, since it includes the spread); >= 95% of the new
sessions resumed; no stream failed.

Prints human lines, then `bench: <name> <value> <unit>` lines; also writes
BUILD_DIR/bench-run/storm/storm.json. Logs of every process stay in
BUILD_DIR/bench-run/storm/. Knobs: BENCH_STORM_CLIENTS (1000),
BENCH_STORM_RUNS ("idle:0 active:0 active:1000", i.e. MODE:SPREAD_MS),
BENCH_STORM_REPLICAS (3).
Exit status 0 when every measurement ran (targets met or not), 1 when
something broke.
"""

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import Paths, baton_config  # noqa: E402

PATHS = Paths("storm")
ROOT, BUILD, BATON, TOOLS, RUN = PATHS.root, PATHS.build, PATHS.baton, PATHS.tools, PATHS.run
CLIENTS = int(os.environ.get("BENCH_STORM_CLIENTS", "1000"))
RUNS = [(m.split(":")[0], int(m.split(":")[1]))
        for m in os.environ.get("BENCH_STORM_RUNS", "idle:0 active:0 active:1000").split()]
REPLICAS = int(os.environ.get("BENCH_STORM_REPLICAS", "3"))
TARGET_P99_MS = 2000
TARGET_RESUMED = 95.0
STORM_TIMEOUT_MS = 15000

procs = []


def die(msg):
    print("bench: FAILED: %s (logs in %s)" % (msg, RUN), file=sys.stderr)
    sys.exit(1)


def spawn(name, args, env=None):
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         stderr=open(RUN / ("%s.log" % name), "ab"), env=env)
    p.name = name
    p.buf = b""
    procs.append(p)
    return p


def read_json(p, want, timeout, echo=None):
    """JSON lines from p.stdout until want(obj); returns that object. Other
    lines go to `echo` (a file) if given."""
    deadline = time.monotonic() + timeout
    fd = p.stdout.fileno()
    while True:
        while b"\n" in p.buf:
            line, p.buf = p.buf.split(b"\n", 1)
            if echo:
                echo.write(line.decode(errors="replace") + "\n")
                echo.flush()
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and want(obj):
                return obj
        rem = deadline - time.monotonic()
        if rem <= 0:
            die("%s: no expected line within %.0f s" % (p.name, timeout))
        r, _, _ = select.select([fd], [], [], rem)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                die("%s exited (status %s)" % (p.name, p.wait()))
            p.buf += chunk


def stop(p, sig=signal.SIGINT):
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        stop(p)


def cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def replica_config(name, certs, digest, echo, spread_ms):
    cfg = RUN / ("%s.yaml" % name)
    baton_config(cfg, name, certs, digest, {"echo": echo}, handoff=RUN / ("%s.sock" % name),
                 drain={"spread_ms": spread_ms})
    return cfg


def run(idx, mode, spread_ms, certs, token, digest, echo):
    label = "%s-spread%d" % (mode, spread_ms)
    names = ["%s-%s" % (chr(ord("a") + k), label) for k in range(REPLICAS)]
    reps = []
    for k, name in enumerate(names):
        # Only A is drained; B and C keep the default spread.
        cfg = replica_config(name, certs, digest, echo, spread_ms if k == 0 else 1000)
        p = spawn("serve-%s" % name, [BATON, "serve", "-c", cfg, "--no-takeover"])
        reps.append((p, read_json(p, lambda o: o.get("event") == "ready", 20)))
    addrs = [r["listen"] for _, r in reps]
    args = [TOOLS / "storm", "--servers", ",".join(addrs), "--admin", reps[0][1]["admin"],
            "--ca", certs / "ca.crt", "--server-name", "localhost", "--route", "echo",
            "--clients", CLIENTS, "--label", label, "--timeout-ms", STORM_TIMEOUT_MS,
            "--warmup-ms", 2000, "--settle-ms", 1000]
    if mode in ("active", "long"):
        args += ["--long", 1, "--interval-ms", 1000, "--size", 256]
    if mode == "active":
        args += ["--short-interval-ms", 2000]
    elif mode not in ("idle", "long"):
        die("unknown mode %r in BENCH_STORM_RUNS (idle, long or active)" % mode)
    cpu0 = [cpu_s(p.pid) for p, _ in reps]
    t0 = time.monotonic()
    st = spawn("storm-%s" % label, args, env=dict(os.environ, BATON_TOKEN=token))
    with open(RUN / ("storm-%s.out" % label), "w") as out:
        res = read_json(st, lambda o: o.get("event") in ("done", "failed"), 120, echo=out)
    if res["event"] == "failed":
        die("storm (%s): %s" % (label, res.get("error")))
    st.wait(30)
    wall = time.monotonic() - t0
    cpu = [round(cpu_s(p.pid) - c, 2) for (p, _), c in zip(reps, cpu0)]
    for p, _ in reps:
        stop(p)
    log_a = (RUN / ("serve-%s.log" % names[0])).read_text(errors="replace")
    res["server_reject_draining"] = log_a.count("REJECT 4")
    res["mode"], res["spread_ms"], res["wall_s"] = mode, spread_ms, round(wall, 1)
    res["replica_cpu_s"] = dict(zip(names, cpu))
    res["replicas"] = dict(zip(addrs, names))
    return res


def main():
    for f in (BATON, TOOLS / "bench_upstream", TOOLS / "storm"):
        if not os.access(f, os.X_OK):
            die("%s is missing: build first" % f)
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    certs = RUN / "certs"
    subprocess.run([BATON, "certs", "--out", certs], check=True, stdout=subprocess.DEVNULL)
    token = os.urandom(16).hex()
    digest = subprocess.run([BATON, "hash-token"], input=token.encode(), capture_output=True,
                            check=True).stdout.decode().strip()
    up = spawn("upstream", [TOOLS / "bench_upstream"])
    echo = read_json(up, lambda o: o.get("event") == "ready", 10)["echo"]

    t_start = time.monotonic()
    print("baton reconnect-storm benchmark (%s, %d cores, load average %.2f): %d clients on replica A of %d, "
          "A drained at once" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.cpu_count(),
                                 os.getloadavg()[0], CLIENTS, REPLICAS))
    results = []
    for k, (mode, spread) in enumerate(RUNS):
        r = run(k, mode, spread, certs, token, digest, echo)
        results.append(r)
        names = r["replicas"]
        print("\n== %s clients, drain.spread_ms %d (opened on A in %.1f s; run %.1f s) ==" %
              (mode, spread, r["open_s"], r["wall_s"]))
        b, n, rc = r["back_ms"], r["notice_ms"], r["reconnect_ms"]
        print("  back on a new session: %d of %d; POST /drain answered %s in %.1f ms" %
              (r["back"], r["clients"], r["drain_http_status"], r["drain_http_ms"]))
        print("  POST /drain -> session 2 ready: p50 %7.1f  p99 %7.1f  max %7.1f ms" % (b["p50"], b["p99"], b["max"]))
        print("  POST /drain -> DRAIN acted on:  p50 %7.1f  p99 %7.1f  max %7.1f ms" % (n["p50"], n["p99"], n["max"]))
        print("  DRAIN acted on -> session 2:    p50 %7.1f  p99 %7.1f  max %7.1f ms" % (rc["p50"], rc["p99"], rc["max"]))
        print("  new sessions' handshakes: %d resumed, %d full (%.1f%% resumed)" %
              (r["resumed"], r["full"], r["resumed_share"]))
        print("  landed on: %s" % ", ".join("%s %d" % (names.get(a, a).split("-")[0].upper(), c)
                                            for a, c in sorted(r["landed"].items(), key=lambda x: names.get(x[0], x[0]))))
        print("  failed tries: %d (REJECT 4 draining %d, REJECT 3 overloaded %d, connect %d, session %d, other %d); "
              "A logged %d REJECT 4" % (r["failed_tries"], r["reject_draining"], r["reject_overloaded"],
                                        r["connect_failures"], r["session_failures"], r["other_failures"],
                                        r["server_reject_draining"]))
        print("  extra reconnects %d, new sessions lost %d, clients given up %d, old session closed before the new "
              "one was ready %d" % (r["extra_sessions"], r["new_lost"], r["closed"], r["old_lost_before_new"]))
        if r.get("multi_try_clients"):
            print("  clients with more than one failed try after the drain: %d" % r["multi_try_clients"])
            for e in r["multi_try_samples"][:3]:
                print("    %s" % e)
        if "long" in r:
            lg = r["long"]
            print("  long streams: %d of %d alive, %d errors; longest round trip per stream: before p99 %.1f max %.1f ms, "
                  "from the drain p99 %.1f max %.1f ms" % (lg["alive"], lg["streams"], lg["errors"],
                                                           lg["before_max_ms"]["p99"], lg["before_max_ms"]["max"],
                                                           lg["storm_max_ms"]["p99"], lg["storm_max_ms"]["max"]))
        if "short" in r:
            sh = r["short"]
            print("  one-shot streams after the drain: %d opened, %d ok, %d failed (%d replayed by the client); "
                  "open -> answer p50 %.1f p99 %.1f max %.1f ms" % (sh["storm_opened"], sh["storm_ok"],
                                                                    sh["storm_failed"], r["streams_replayed"],
                                                                    sh["storm_ms"]["p50"], sh["storm_ms"]["p99"],
                                                                    sh["storm_ms"]["max"]))
        print("  CPU: storm %.1f s, replicas %s" % (r["cpu_s"], ", ".join(
            "%s %.1f s" % (k2.split("-")[0].upper(), v) for k2, v in r["replica_cpu_s"].items())))
        for e in r["error_samples"][:5]:
            print("  error: %s" % e)

    lines = []
    for r in results:
        p = "storm_%s_spread%d" % (r["mode"], r["spread_ms"])
        ok_back = r["back"] == r["clients"]
        ok_p99 = ok_back and r["back_ms"]["p99"] < TARGET_P99_MS
        ok_res = r["resumed_share"] >= TARGET_RESUMED
        stream_fail = r.get("long", {}).get("errors", 0) + r.get("short", {}).get("storm_failed", 0)
        lines += [
            (p + "_clients", r["clients"], "count"),
            (p + "_back", r["back"], "count"),
            (p + "_back_p50", r["back_ms"]["p50"], "ms"),
            (p + "_back_p99", r["back_ms"]["p99"], "ms"),
            (p + "_back_max", r["back_ms"]["max"], "ms"),
            (p + "_reconnect_after_notice_p99", r["reconnect_ms"]["p99"], "ms"),
            (p + "_resumed_share", r["resumed_share"], "%"),
            (p + "_failed_tries", r["failed_tries"], "count"),
            (p + "_reject_draining", r["reject_draining"], "count"),
            (p + "_stream_failures", stream_fail, "count"),
            (p + "_all_back_verdict", "PASS" if ok_back else "FAIL", "all"),
            (p + "_back_p99_verdict", "PASS" if ok_p99 else "FAIL", "<%dms" % TARGET_P99_MS),
            (p + "_resumed_verdict", "PASS" if ok_res else "FAIL", ">=%d%%" % TARGET_RESUMED),
        ]
        if r["mode"] != "idle":
            lines.append((p + "_streams_verdict", "PASS" if stream_fail == 0 else "FAIL", "0_failed"))
    lines.append(("storm_wall_time", round(time.monotonic() - t_start, 1), "s"))
    print()
    for name, value, unit in lines:
        print("bench: %s %s %s" % (name, value, unit))
    json.dump({"summary": {name: {"value": value, "unit": unit} for name, value, unit in lines},
               "runs": results}, open(RUN / "storm.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    rc = 1
    try:
        rc = main()
    finally:
        stop_all()
    sys.exit(rc)
