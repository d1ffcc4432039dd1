#!/usr/bin/env python3
"""`make bench`, hot-restart part: what a hot restart costs clients.

    bench/restart.py [BUILD_DIR]          (default build, already built)

For 1,000 and 10,000 tunnels (one stream each, 1 KiB request/response every
--interval ms per tunnel, through bench_upstream's echo), hot-restart `baton
serve` once and report:
  - handoff duration: hello -> commit, as the old process measured it
    (and spawn of the new process -> old process gone, for reference);
  - the pause clients saw: each tunnel's longest round trip in the window
    around the restart, p50 / p99 / max over tunnels, against the same in a
    window of the same length before it;
  - RSS of the old process before and the new one after.
Targets: 10,000 tunnels handed over in under 500 ms; p99 client pause under
50 ms with 1,000 active tunnels.

Prints human lines, then `bench: <name> <value> <unit>` lines; also writes
BUILD_DIR/bench-run/restart.json. Knobs: BENCH_RESTART_TUNNELS ("1000 10000"),
BENCH_RESTART_INTERVAL_MS (100), BENCH_RESTART_WINDOW_S (2),
BENCH_RESTART_RESUME (1: clients ask for session resume, as baton connect
does; 0: they do not).
Exit status 0 when every measurement ran, 1 when something broke.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import (Broken, Paths, Procs, baton_config, bench_setup, print_results, rss_kib, run_main,  # noqa: E402
                   start_run)

PATHS = Paths("restart")
ROOT, BUILD, BATON, TOOLS, RUN = PATHS.root, PATHS.build, PATHS.baton, PATHS.tools, PATHS.run
COUNTS = [int(x) for x in os.environ.get("BENCH_RESTART_TUNNELS", "1000 10000").split()]
INTERVAL_MS = int(os.environ.get("BENCH_RESTART_INTERVAL_MS", "100"))
# 1: the clients ask for session resume (the default of baton connect), so
# every tunnel's resume state moves too; 0: protocol version 1 sessions.
RESUME = int(os.environ.get("BENCH_RESTART_RESUME", "1"))
WINDOW_S = float(os.environ.get("BENCH_RESTART_WINDOW_S", "2"))
TARGET_HANDOFF_MS = 500
TARGET_PAUSE_MS = 50

procs = Procs(RUN)


def run(n, active, certs, token, digest, echo):
    sock = RUN / ("handoff-%d.sock" % n)
    cfg = RUN / ("serve-%d.yaml" % n)
    baton_config(cfg, "bench-restart", certs, digest, {"echo": echo}, handoff=sock, admin=False,
                 limits={"max_tunnels": 20000, "idle_timeout_ms": 600000, "handshake_timeout_ms": 60000})
    old = procs.spawn("serve-%d-epoch0" % n, [BATON, "serve", "-c", cfg])
    ready = procs.read_json(old, lambda o: o.get("event") == "ready", 20)
    env = dict(os.environ, BATON_TOKEN=token)
    load = procs.spawn("load-%d" % n, [TOOLS / "tunnel_load", "--server", ready["listen"], "--ca", certs / "ca.crt",
                                 "--server-name", "localhost", "--route", "echo", "--tunnels", n, "--streams", 1,
                                 "--active", active, "--resume", RESUME,
                                 "--size", 1024, "--interval-ms", INTERVAL_MS, "--connect-concurrency", 200,
                                 "--timeout-ms", 300000], stdin=subprocess.PIPE, env=env)
    t0 = time.monotonic()
    r = procs.read_json(load, lambda o: "event" in o, 300)
    if r.get("event") != "ready":
        raise Broken("tunnel_load: %s" % r)
    open_s = time.monotonic() - t0

    def mark(name):
        load.stdin.write(("mark %s\n" % name).encode())
        load.stdin.flush()
        return procs.read_json(load, lambda o: "window" in o, 60)

    time.sleep(WINDOW_S)  # pacing: let the load settle (not synchronization)
    mark("before")
    time.sleep(WINDOW_S)
    old_rss = rss_kib([old.pid])
    before = mark("restart")
    t_spawn = time.monotonic()
    new = procs.spawn("serve-%d-epoch1" % n, [BATON, "serve", "-c", cfg])
    nready = procs.read_json(new, lambda o: o.get("event") == "ready", 60)
    handed = procs.read_json(old, lambda o: o.get("event") == "handed_over", 60)
    old.wait(30)
    t_gone = time.monotonic() - t_spawn
    new_rss = rss_kib([new.pid])
    # the restart window lasts as long as the "before" window
    rest = WINDOW_S - (time.monotonic() - t_spawn)
    if rest > 0:
        time.sleep(rest)
    during = mark("after")
    load.stdin.write(b"quit\n")
    load.stdin.flush()
    done = procs.read_json(load, lambda o: o.get("event") == "done", 120)
    load.wait(60)
    new.send_signal(signal.SIGTERM)
    new.wait(30)
    if nready.get("tunnels") != n:
        raise Broken("the new process took over %s of %d tunnels" % (nready.get("tunnels"), n))
    return {
        "tunnels": n, "active": active, "open_s": open_s, "handoff_ms": handed["ms"], "spawn_to_old_gone_ms": 1000 * t_gone,
        "moved": handed["tunnels"], "old_rss": old_rss, "new_rss": new_rss,
        "before": before, "during": during, "errors": done["errors_total"], "port_changes": done["port_changes_total"],
    }


def main():
    import resource
    # tunnel_load: 3 fds a tunnel; baton: 2 (+ copies during handoff)
    start_run(PATHS, ("bench_upstream", "tunnel_load"), 4 * max(COUNTS) + 4096)
    setup = bench_setup(procs, PATHS)
    certs, token, digest, echo = setup["certs"], setup["token"], setup["digest"], setup["echo"]

    print("baton hot-restart benchmark (%s, %d cores): one stream per tunnel, 1 KiB request/response every %d ms; "
          "clients %s session resume" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.cpu_count(),
                                         INTERVAL_MS, "ask for" if RESUME else "do not ask for"))
    # Each active tunnel costs baton two descriptors (client, upstream), and
    # tunnel_load three; the hard limit may be below what all-active needs
    # (raising it takes CAP_SYS_RESOURCE). Then only some tunnels carry traffic.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    results = []
    for n in COUNTS:
        active = min(n, max(0, (limit - 2048 - n) // 2))
        r = run(n, active, certs, token, digest, echo)
        results.append(r)
        b, d = r["before"], r["during"]
        print("\n== %d tunnels, %d of them with traffic (opened in %.1f s) ==" % (n, active, r["open_s"]))
        if active < n:
            print("  (descriptor hard limit %d: not every tunnel can carry a stream on this machine)" % limit)
        print("  handoff: %d tunnels moved in %d ms (hello -> commit); new process spawned -> old gone: %.0f ms" %
              (r["moved"], r["handoff_ms"], r["spawn_to_old_gone_ms"]))
        print("  longest round trip per tunnel, %.0f s windows:  p50 / p99 / max" % WINDOW_S)
        print("    before the restart: %7.1f / %7.1f / %7.1f ms" % (b["tunnel_max_p50_us"] / 1e3,
                                                                   b["tunnel_max_p99_us"] / 1e3, b["max_us"] / 1e3))
        print("    around the restart: %7.1f / %7.1f / %7.1f ms" % (d["tunnel_max_p50_us"] / 1e3,
                                                                   d["tunnel_max_p99_us"] / 1e3, d["max_us"] / 1e3))
        print("  round trips: %d before, %d around; errors %d, reconnects (port changes) %d" %
              (b["rtts"], d["rtts"], r["errors"], r["port_changes"]))
        print("  RSS: old %.1f MiB before, new %.1f MiB after" % (r["old_rss"] / 1024, r["new_rss"] / 1024))

    lines = []
    for r in results:
        n = r["tunnels"]
        lines += [
            ("restart_%d_handoff_ms" % n, r["handoff_ms"], "ms"),
            ("restart_%d_spawn_to_old_gone_ms" % n, round(r["spawn_to_old_gone_ms"], 1), "ms"),
            ("restart_%d_pause_p99_before" % n, round(r["before"]["tunnel_max_p99_us"] / 1e3, 2), "ms"),
            ("restart_%d_pause_p99_during" % n, round(r["during"]["tunnel_max_p99_us"] / 1e3, 2), "ms"),
            ("restart_%d_pause_max_before" % n, round(r["before"]["max_us"] / 1e3, 2), "ms"),
            ("restart_%d_pause_max_during" % n, round(r["during"]["max_us"] / 1e3, 2), "ms"),
            ("restart_%d_active_tunnels" % n, r["active"], "count"),
            ("restart_%d_errors" % n, r["errors"] + r["port_changes"], "count"),
            ("restart_%d_old_rss" % n, r["old_rss"], "KiB"),
            ("restart_%d_new_rss" % n, r["new_rss"], "KiB"),
        ]
        if n == 10000:
            lines.append(("restart_10000_handoff_verdict", "PASS" if r["handoff_ms"] < TARGET_HANDOFF_MS else "FAIL",
                          "<%dms" % TARGET_HANDOFF_MS))
        if n == 1000:
            lines.append(("restart_1000_pause_p99_verdict",
                          "PASS" if r["during"]["tunnel_max_p99_us"] < TARGET_PAUSE_MS * 1000 else "FAIL",
                          "<%dms" % TARGET_PAUSE_MS))
    print_results(lines, RUN / "restart.json")
    return 0


if __name__ == "__main__":
    run_main(main, procs)
