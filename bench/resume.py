#!/usr/bin/env python3
"""`make bench`, session-resume part: what a network break costs clients.

    bench/resume.py [BUILD_DIR]          (default build, already built)

For 1,000 tunnels (the embeddable client, bench/tunnel_load; one stream
each, 1 KiB request/response every 100 ms through bench_upstream's echo)
to `baton serve`, with the kernel breaking the connections (`ss -K`: every
TCP connection to the tunnel port is aborted on both ends, as a middlebox
reset does; loopback, no relay in the path):

  1. reset cut: every connection is reset at once and the network stays up.
     Time from the cut to each tunnel's first round trip completed after it
     (p50 / p99 / max over tunnels), and resumes per second (all tunnels
     resumed / time from the cut to the last resume, as the server counts
     them).
  2. a path that comes back: the server is stopped (SIGSTOP: nothing
     answers), every connection is reset, BENCH_RESUME_OUTAGE_MS (1000)
     pass while the clients redial (their connects wait in the kernel's
     backlog, their handshakes unanswered), then the server continues. Time
     from then to each tunnel's first round trip: every resume arrives at
     once.
  3. what a session keeps for a resume: baton_resume_kept_bytes per tunnel
     (sent, not yet proved received: what a detached session holds, plus
     whatever its upstreams send while detached, at most resume.buffer_bytes)
     and the server's RSS per tunnel.

Targets (a user's expectations): after a reset cut every one of 1,000
tunnels carries traffic again within 1 s (p99); after the path comes back,
within 1 s (p99); every tunnel resumed both times, none lost, no stream error.

Prints human lines, then `bench: <name> <value> <unit>` lines; also writes
BUILD_DIR/bench-run/resume.json. Knobs: BENCH_RESUME_TUNNELS (1000),
BENCH_RESUME_OUTAGE_MS (1000). Exit status 0 when every measurement ran, 1
when something broke. Needs root (ss -K destroys sockets of other processes).
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import (Broken, Paths, Procs, baton_config, bench_setup, print_results, rss_kib, run_main,  # noqa: E402
                   start_run, wait_for)

PATHS = Paths("resume")
ROOT, BUILD, BATON, TOOLS, RUN = PATHS.root, PATHS.build, PATHS.baton, PATHS.tools, PATHS.run
TUNNELS = int(os.environ.get("BENCH_RESUME_TUNNELS", "1000"))
OUTAGE_MS = int(os.environ.get("BENCH_RESUME_OUTAGE_MS", "1000"))
INTERVAL_MS = 100
TARGET_CUT_P99_MS = 1000
TARGET_BACK_P99_MS = 1000

procs = Procs(RUN)


def metrics(admin):
    text = urllib.request.urlopen("http://%s/metrics" % admin, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def resumed(m):
    return m.get('baton_session_resumes_total{result="resumed"}', 0)


def kill_connections(port):
    """Aborts every TCP connection to or from the tunnel port, both ends."""
    r = subprocess.run(["ss", "-K", "-t", "( sport = :%d or dport = :%d )" % (port, port)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise Broken("ss -K: %s" % r.stderr.strip())


def main():
    # tunnel_load 3 descriptors a tunnel, baton 2
    need = 6 * TUNNELS + 1024
    limit = start_run(PATHS, ("bench_upstream", "tunnel_load"), need)
    if limit < need:
        raise Broken("descriptor limit %d is below what %d tunnels need" % (limit, TUNNELS))
    setup = bench_setup(procs, PATHS)
    certs, token, digest, echo = setup["certs"], setup["token"], setup["digest"], setup["echo"]
    cfg = RUN / "serve.yaml"
    baton_config(cfg, "bench-resume", certs, digest, {"echo": echo},
                 limits={"max_tunnels": TUNNELS + 100, "idle_timeout_ms": 600000, "handshake_timeout_ms": 60000})
    srv = procs.spawn("serve", [BATON, "serve", "-c", cfg, "--no-takeover"])
    ready = procs.read_json(srv, lambda o: o.get("event") == "ready", 20)
    admin = ready["admin"]
    port = int(ready["listen"].rsplit(":", 1)[1])
    env = dict(os.environ, BATON_TOKEN=token)
    load = procs.spawn("load", [TOOLS / "tunnel_load", "--server", ready["listen"], "--ca", certs / "ca.crt",
                                "--server-name", "localhost", "--route", "echo", "--tunnels", TUNNELS,
                                "--streams", 1, "--size", 1024, "--interval-ms", INTERVAL_MS,
                                "--connect-concurrency", 100, "--timeout-ms", 300000],
                       stdin=subprocess.PIPE, env=env)
    r = procs.read_json(load, lambda o: "event" in o, 300)
    if r.get("event") != "ready":
        raise Broken("tunnel_load: %s" % r)
    time.sleep(1)  # pacing: let the load settle (not synchronization)
    m = metrics(admin)
    kept = m.get("baton_resume_kept_bytes", 0)
    rss = rss_kib([srv.pid])

    def command(line, want, timeout=60):
        load.stdin.write((line + "\n").encode())
        load.stdin.flush()
        return procs.read_json(load, want, timeout)

    # 1. reset cut
    command("back", lambda o: o.get("event") == "back_armed")
    t_cut = time.monotonic()
    kill_connections(port)
    cut = procs.read_json(load, lambda o: o.get("event") == "back", 120)
    wait_for(lambda: resumed(metrics(admin)) >= TUNNELS, 120, "every tunnel resumed after the reset", step=0.005)
    cut_resume_s = time.monotonic() - t_cut
    time.sleep(1)  # pacing

    # 2. the server stops answering, the connections break, the path comes back
    srv.send_signal(signal.SIGSTOP)
    try:
        kill_connections(port)
        time.sleep(OUTAGE_MS / 1000)  # the outage itself (the thing measured, not synchronization)
        command("back", lambda o: o.get("event") == "back_armed")
    finally:
        srv.send_signal(signal.SIGCONT)
    t_up = time.monotonic()
    back = procs.read_json(load, lambda o: o.get("event") == "back", 120)
    wait_for(lambda: resumed(metrics(admin)) >= 2 * TUNNELS, 120, "every tunnel resumed after the outage",
             step=0.005)
    back_resume_s = time.monotonic() - t_up
    done = command("quit", lambda o: o.get("event") == "done", 120)
    load.wait(60)

    print("baton session-resume benchmark (%s, %d cores): %d tunnels, one stream each, 1 KiB request/response "
          "every %d ms; connections reset by the kernel (ss -K)" % (
              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.cpu_count(), TUNNELS, INTERVAL_MS))
    print("  reset cut: first round trip after the cut p50 %.1f / p99 %.1f / max %.1f ms; all %d resumed in %.2f s "
          "(%.0f resumes/s)" % (cut["p50_ms"], cut["p99_ms"], cut["max_ms"], TUNNELS, cut_resume_s,
                                TUNNELS / cut_resume_s))
    print("  server silent for %d ms, then back: first round trip after it p50 %.1f / p99 %.1f / max %.1f ms; all "
          "resumed %.2f s after it (%.0f resumes/s)" % (OUTAGE_MS, back["p50_ms"], back["p99_ms"], back["max_ms"],
                                                       back_resume_s, TUNNELS / back_resume_s))
    print("  kept for a resume: %.0f bytes per session (sent, not yet proved received); server RSS %.1f KiB per "
          "tunnel" % (kept / TUNNELS, rss / TUNNELS))
    print("  client: %d detached, %d resumed, %d lost, %d resume failures, %d stream errors; resume pause "
          "(break -> resumed) p50 %d / p99 %d ms" % (done["detached_total"], done["resumed_total"],
                                                    done["sessions_lost_total"], done["resume_failed_total"],
                                                    done["errors_total"], done["resume_pause_p50_ms"],
                                                    done["resume_pause_p99_ms"]))
    ok_all = (done["resumed_total"] == 2 * TUNNELS and done["sessions_lost_total"] == 0 and
              done["resume_failed_total"] == 0 and done["errors_total"] == 0)
    lines = [
        ("resume_cut_first_rtt_p50", round(cut["p50_ms"], 1), "ms"),
        ("resume_cut_first_rtt_p99", round(cut["p99_ms"], 1), "ms"),
        ("resume_cut_first_rtt_max", round(cut["max_ms"], 1), "ms"),
        ("resume_cut_resumes_per_s", round(TUNNELS / cut_resume_s), "1/s"),
        ("resume_back_first_rtt_p50", round(back["p50_ms"], 1), "ms"),
        ("resume_back_first_rtt_p99", round(back["p99_ms"], 1), "ms"),
        ("resume_back_first_rtt_max", round(back["max_ms"], 1), "ms"),
        ("resume_back_resumes_per_s", round(TUNNELS / back_resume_s), "1/s"),
        ("resume_kept_bytes_per_session", round(kept / TUNNELS), "B"),
        ("resume_rss_per_tunnel", round(rss / TUNNELS, 1), "KiB"),
        ("resume_resumed", done["resumed_total"], "count"),
        ("resume_errors", done["errors_total"] + done["sessions_lost_total"] + done["resume_failed_total"], "count"),
        ("resume_cut_p99_verdict", "PASS" if cut["p99_ms"] < TARGET_CUT_P99_MS else "FAIL",
         "<%dms" % TARGET_CUT_P99_MS),
        ("resume_back_p99_verdict", "PASS" if back["p99_ms"] < TARGET_BACK_P99_MS else "FAIL",
         "<%dms" % TARGET_BACK_P99_MS),
        ("resume_all_resumed_verdict", "PASS" if ok_all else "FAIL", "all %d twice, 0 errors" % TUNNELS),
    ]
    print_results(lines, RUN / "resume.json")
    return 0


if __name__ == "__main__":
    run_main(main, procs)
