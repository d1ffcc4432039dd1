#!/usr/bin/env bash
# `make bench`: baton's benchmark suite, on loopback, in one run.
#
#   bench/run.sh [BUILD_DIR]        (BUILD_DIR defaults to build, already built)
#
# What it measures (the issue's "Done when"):
#   1. single-stream throughput through the tunnel:
#        bench_load -> baton connect (forwarder) -> TLS -> baton serve -> sink
#   2. the ceiling: the AEAD on 16 KiB records, one thread (aead_bench), for
#      the suite the tunnel negotiated (read from the server's debug log):
#      mbedTLS's, the issue's reference (the record layer ran on mbedTLS when
#      the target was set), and OpenSSL's, which the record layer runs on now
#      (docs/design.md, "Record cryptography")
#   3. their ratio (target >= 80% of the mbedTLS ceiling; the share of
#      OpenSSL's is printed too)
#   3b. the sidecar under test alone: bench_push, a client whose whole
#      transfer is sealed before the clock starts (a client on another
#      machine), -> TLS -> baton serve -> sink; ratio to the AEAD's open speed
#   4. 1 KiB request/response latency through the tunnel to an echo upstream
#   5. sidecar RSS per idle tunnel with 10,000 tunnels (target <= 4 KiB)
#   6. HAProxy's RSS per idle TLS connection, 10,000 connections, and the ratio
# Human-readable lines first, then a block of `bench: <name> <value> <unit>`
# lines (also written as JSON to BUILD_DIR/bench-run/results.json). Logs of
# every process stay in BUILD_DIR/bench-run/.
#
# Knobs (environment): BENCH_BYTES (per throughput run, default 512MiB),
# BENCH_RUNS (5, the median counts), BENCH_RTTS (20000), BENCH_TUNNELS (10000),
# BENCH_CONCURRENCY (handshakes in flight, 200), BENCH_SKIP_HAPROXY=1.
#
# Exit status: 0 when every measurement ran (whether or not targets are met),
# 1 when something broke. Every process started here is stopped on exit.
set -euo pipefail

T_START=$(date +%s.%N)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-build}
[[ $BUILD = /* ]] || BUILD="$ROOT/$BUILD"
BATON="$BUILD/baton"
TOOLS="$BUILD/bench"
RUN="$BUILD/bench-run"

BYTES=${BENCH_BYTES:-512MiB}
RUNS=${BENCH_RUNS:-5}
RTTS=${BENCH_RTTS:-20000}
TUNNELS=${BENCH_TUNNELS:-10000}
CONCURRENCY=${BENCH_CONCURRENCY:-200}
TARGET_RATIO=80   # percent of the AEAD ceiling
TARGET_IDLE=4     # KiB per idle tunnel

say() { printf '%s\n' "$*"; }

# --- process bookkeeping: everything started here is stopped on exit ---
PIDS=()
declare -A PNAME PLOG PSTOPPED
# spawn NAME OUT LOG CMD...: starts CMD in the background; sets LAST_PID.
spawn() {
  local name=$1 out=$2 log=$3
  shift 3
  "$@" > "$out" 2> "$log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  PNAME[$LAST_PID]=$name
  PLOG[$LAST_PID]=$log
}
stop_pid() {  # pid: SIGTERM, up to 3 s, then SIGKILL
  local p=$1 i
  PSTOPPED[$p]=1
  kill -0 "$p" 2>/dev/null || { wait "$p" 2>/dev/null || true; return 0; }
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 30); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
  local p
  printf 'bench: FAILED: %s\n' "$*" >&2
  # Name every process of ours that ended on its own, with the end of its log.
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do
    [ -n "${PSTOPPED[$p]:-}" ] && continue
    kill -0 "$p" 2>/dev/null && continue
    printf 'bench: %s (pid %s) exited unexpectedly; end of %s:\n' "${PNAME[$p]}" "$p" "${PLOG[$p]}" >&2
    tail -n 8 "${PLOG[$p]}" 2>/dev/null | sed 's/^/    /' >&2 || true
    if grep -q 'received SIGTERM' "${PLOG[$p]}" 2>/dev/null; then
      printf 'bench: (%s was sent SIGTERM from outside this script)\n' "${PNAME[$p]}" >&2
    fi
  done
  printf 'bench: logs are in %s\n' "$RUN" >&2
  exit 1
}

for f in "$BATON" "$TOOLS/aead_bench" "$TOOLS/bench_upstream" "$TOOLS/bench_load" "$TOOLS/bench_push" "$TOOLS/idle_tunnels"; do
  [ -x "$f" ] || die "$f is missing: build first (ninja -C $BUILD)"
done
command -v python3 >/dev/null || die "python3 is needed (scripts/deps.sh installs it)"

rm -rf "$RUN"
mkdir -p "$RUN"

# The tools raise their own soft limit; haproxy and baton inherit this one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# json FILE EXPR: evaluates EXPR with d = the first JSON object line of FILE.
json() {
  python3 - "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        d = json.loads(line)
        print(eval(sys.argv[2], {}, {"d": d}))
        break
else:
    sys.exit(1)
PY
}
# calc EXPR: floating-point arithmetic.
calc() { python3 -c "print($1)"; }

# wait_ready PID FILE TIMEOUT_S: waits until FILE holds a line with "ready".
wait_ready() {
  local pid=$1 file=$2 t=$3 i
  for i in $(seq $((t * 20))); do
    grep -q '"ready"' "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || die "${PNAME[$pid]} exited before it was ready"
    sleep 0.05
  done
  tail -n 20 "${PLOG[$pid]}" >&2 || true
  die "${PNAME[$pid]} was not ready within $t s"
}
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }  # utime + stime
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() {  # port timeout_s
  local i
  for i in $(seq $(($2 * 20))); do
    python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
    sleep 0.05
  done
  return 1
}

say "baton benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(uname -r), build $BUILD)"
say "  $("$BATON" version)"
# Other people's processes on the same cores make every number here noisy.
IDLE_PCT=$(python3 - <<'PY'
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return v[3] + v[4], sum(v)
i0, t0 = snap(); time.sleep(1); i1, t1 = snap()
print(round(100.0 * (i1 - i0) / max(1, t1 - t0)))
PY
)
say "  CPU idle before the run: $IDLE_PCT%$( [ "$IDLE_PCT" -lt 85 ] && echo " -- WARNING: the machine is busy, expect noisy numbers")"

# --- setup: certificates, token, upstreams ---
"$BATON" certs --out "$RUN/certs" > "$RUN/certs.log" 2>&1 || die "baton certs failed (see $RUN/certs.log)"
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
DIGEST=$(printf %s "$TOKEN" | "$BATON" hash-token)

spawn bench_upstream "$RUN/upstream.out" "$RUN/upstream.log" "$TOOLS/bench_upstream"
UPSTREAM_PID=$LAST_PID
wait_ready "$UPSTREAM_PID" "$RUN/upstream.out" 10
ECHO=$(json "$RUN/upstream.out" 'd["echo"]')
SINK=$(json "$RUN/upstream.out" 'd["sink"]')

write_config() {  # file server_id handoff_socket
  cat > "$1" <<YAML
server_id: $2
listen: 127.0.0.1:0
tls:
  cert: $RUN/certs/server.crt
  key: $RUN/certs/server.key
  ticket_key: $RUN/certs/ticket.key
auth:
  tokens:
    - name: bench
      sha256: $DIGEST
routes:
  echo: $ECHO
  sink: $SINK
limits:
  max_tunnels: 20000
  idle_timeout_ms: 600000
  handshake_timeout_ms: 60000
admin:
  listen: 127.0.0.1:0
handoff:
  socket: $3
YAML
}

# start_serve NAME LOG_LEVEL: starts `baton serve`; sets SERVE_PID and SERVE_ADDR.
start_serve() {
  write_config "$RUN/$1.yaml" "bench-$1" "$RUN/$1-handoff.sock"
  spawn "baton serve ($1)" "$RUN/$1.out" "$RUN/$1.log" "$BATON" serve -c "$RUN/$1.yaml" --log-level "$2"
  SERVE_PID=$LAST_PID
  wait_ready "$SERVE_PID" "$RUN/$1.out" 15
  SERVE_ADDR=$(json "$RUN/$1.out" 'd["listen"]')
}

# --- 1. AEAD ceiling ---
say ""
say "== AEAD, 16 KiB records, one thread (the ceiling): OpenSSL (the record layer's) and mbedTLS (reference) =="
"$TOOLS/aead_bench" --seconds 0.5 > "$RUN/aead.out" 2> "$RUN/aead.log" || die "aead_bench failed"
sed 's/^/  /' "$RUN/aead.log"
aead() {  # lib cipher field
  python3 - "$RUN/aead.out" "$1" "$2" "$3" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["lib"] == sys.argv[2] and d["cipher"] == sys.argv[3]:
        print(d[sys.argv[4]])
PY
}

cipher_of() {  # suite name -> the aead_bench cipher name, or nothing
  case "$1" in
    *AES-128-GCM*) echo AES-128-GCM ;;
    *AES-256-GCM*) echo AES-256-GCM ;;
    *CHACHA20-POLY1305*) echo CHACHA20-POLY1305 ;;
  esac
}

# --- 2. the tunnel: serve + connect ---
start_serve data debug
spawn "baton connect" "$RUN/connect.out" "$RUN/connect.log" env BATON_TOKEN="$TOKEN" "$BATON" connect \
  --server "$SERVE_ADDR" --ca "$RUN/certs/ca.crt" --server-name localhost \
  --forward 127.0.0.1:0=sink --forward 127.0.0.1:0=echo --client-id bench
CONNECT_PID=$LAST_PID
wait_ready "$CONNECT_PID" "$RUN/connect.out" 15
FWD_SINK=$(json "$RUN/connect.out" '[f["listen"] for f in d["forwards"] if f["route"] == "sink"][0]')
FWD_ECHO=$(json "$RUN/connect.out" '[f["listen"] for f in d["forwards"] if f["route"] == "echo"][0]')

# The suite: the server's debug line "TLS established (SUITE...)", or else one
# probe tunnel opened with the same client configuration as `baton connect`.
SUITE=$(sed -n 's/.*TLS established (\([^),]*\).*/\1/p' "$RUN/data.log" | head -n 1)
if [ -z "$SUITE" ]; then
  env BATON_TOKEN="$TOKEN" timeout 30 "$TOOLS/idle_tunnels" --mode baton --server "$SERVE_ADDR" \
    --ca "$RUN/certs/ca.crt" --server-name localhost --count 1 --hold-s 0 > "$RUN/suite-probe.out" 2> "$RUN/suite-probe.log" || true
  SUITE=$(json "$RUN/suite-probe.out" 'd["suite"]' 2>/dev/null || true)
fi
CIPHER=$(cipher_of "$SUITE")
[ -n "$CIPHER" ] || die "cannot tell which cipher suite the tunnel negotiated (got \"$SUITE\")"
SEAL=$(aead mbedtls "$CIPHER" seal_mib_s)
OPEN=$(aead mbedtls "$CIPHER" open_mib_s)
CEILING=$(calc "min($SEAL, $OPEN)")
OSSL_CEILING=$(calc "min($(aead openssl "$CIPHER" seal_mib_s), $(aead openssl "$CIPHER" open_mib_s))")

say ""
say "== single-stream throughput: bench_load -> baton connect -> TLS ($SUITE) -> baton serve -> sink =="
"$TOOLS/bench_load" throughput --connect "$FWD_SINK" --bytes 64MiB > "$RUN/tput-warmup.out" 2> "$RUN/tput.log" \
  || die "warm-up transfer through the tunnel failed (see $RUN/connect.log, $RUN/data.log)"
TPUTS=()
TOTAL_MIB=0 TOTAL_WALL=0 SERVE_CPU=0 CONNECT_CPU=0 UPSTREAM_CPU=0 SENDER_CPU_S=0
for i in $(seq "$RUNS"); do
  c0=$(cpu_ticks "$SERVE_PID") c1=$(cpu_ticks "$CONNECT_PID") c2=$(cpu_ticks "$UPSTREAM_PID")
  "$TOOLS/bench_load" throughput --connect "$FWD_SINK" --bytes "$BYTES" > "$RUN/tput-$i.out" 2>> "$RUN/tput.log" \
    || die "transfer $i through the tunnel failed (see $RUN/tput.log, $RUN/connect.log, $RUN/data.log)"
  SERVE_CPU=$((SERVE_CPU + $(cpu_ticks "$SERVE_PID") - c0))
  CONNECT_CPU=$((CONNECT_CPU + $(cpu_ticks "$CONNECT_PID") - c1))
  UPSTREAM_CPU=$((UPSTREAM_CPU + $(cpu_ticks "$UPSTREAM_PID") - c2))
  t=$(json "$RUN/tput-$i.out" 'd["mib_s"]')
  s=$(json "$RUN/tput-$i.out" 'd["sink_mib_s"]')
  sec=$(json "$RUN/tput-$i.out" 'd["seconds"]')
  TOTAL_MIB=$(calc "$TOTAL_MIB + $(json "$RUN/tput-$i.out" 'd["bytes"]') / 1048576.0")
  TOTAL_WALL=$(calc "$TOTAL_WALL + $sec")
  SENDER_CPU_S=$(calc "$SENDER_CPU_S + $(json "$RUN/tput-$i.out" 'd["cpu_seconds"]')")
  say "  run $i: $BYTES in $sec s: $t MiB/s at the sender (acknowledged), $s MiB/s at the sink"
  TPUTS+=("$t")
done
TPUT=$(calc "sorted([${TPUTS[*]/%/,}])[len([${TPUTS[*]/%/,}]) // 2]")
TPUT_MAX=$(calc "max([${TPUTS[*]/%/,}])")
"$TOOLS/bench_load" throughput --connect "$SINK" --bytes "$BYTES" > "$RUN/tput-direct.out" 2>> "$RUN/tput.log" \
  || die "direct transfer to the sink failed"
DIRECT=$(json "$RUN/tput-direct.out" 'd["mib_s"]')
# CPU per byte of each process: what it would move with a core of its own.
HZ=$(getconf CLK_TCK)
SERVE_EFF=$(calc "round($TOTAL_MIB / ($SERVE_CPU / $HZ), 1) if $SERVE_CPU else 0")
CONNECT_EFF=$(calc "round($TOTAL_MIB / ($CONNECT_CPU / $HZ), 1) if $CONNECT_CPU else 0")
SERVE_BUSY=$(calc "round(100.0 * $SERVE_CPU / $HZ / $TOTAL_WALL)")
CONNECT_BUSY=$(calc "round(100.0 * $CONNECT_CPU / $HZ / $TOTAL_WALL)")
UPSTREAM_BUSY=$(calc "round(100.0 * $UPSTREAM_CPU / $HZ / $TOTAL_WALL)")
SENDER_BUSY=$(calc "round(100.0 * $SENDER_CPU_S / $TOTAL_WALL)")
# The most this machine could carry if all four processes kept every core busy.
CPU_PER_MIB=$(calc "($SERVE_CPU + $CONNECT_CPU + $UPSTREAM_CPU) / $HZ / $TOTAL_MIB + $SENDER_CPU_S / $TOTAL_MIB")
MACHINE_BOUND=$(calc "round($(nproc) / $CPU_PER_MIB, 1)")
RATIO=$(calc "round(100.0 * $TPUT / $CEILING, 1)")
VERDICT_RATIO=$(python3 -c "print('PASS' if $RATIO >= $TARGET_RATIO else 'FAIL')")
say "  median: $TPUT MiB/s through the tunnel, best $TPUT_MAX (plain loopback TCP without tunnel: $DIRECT MiB/s)"
say "  mbedTLS ceiling: $CIPHER seal $SEAL, open $OPEN MiB/s -> min $CEILING MiB/s (seal and open run in different processes)"
say "  tunnel / mbedTLS ceiling = $RATIO% (target >= $TARGET_RATIO%): $VERDICT_RATIO"
say "  tunnel / OpenSSL ceiling ($OSSL_CEILING MiB/s, what the record layer runs on) = $(calc "round(100.0 * $TPUT / $OSSL_CEILING, 1)")%"
say "  CPU during the runs: baton connect $CONNECT_BUSY% of a core ($CONNECT_EFF MiB per CPU-second, sealing at $SEAL),"
say "                       baton serve $SERVE_BUSY% of a core ($SERVE_EFF MiB per CPU-second, opening at $OPEN),"
say "                       sender $SENDER_BUSY%, sink $UPSTREAM_BUSY%"
say "  all four processes need $(calc "round(1000 * $CPU_PER_MIB, 2)") CPU-ms per MiB: $(nproc) fully busy cores would carry at most $MACHINE_BOUND MiB/s"
TARGET_MIB=$(calc "round($CEILING * $TARGET_RATIO / 100.0, 1)")
if python3 -c "import sys; sys.exit(0 if $TARGET_MIB > $MACHINE_BOUND else 1)"; then
  say "  note: the target ($TARGET_MIB MiB/s) is above what this machine can carry with sender, both sidecars and sink"
  say "        sharing $(nproc) cores; tunnel / machine bound = $(calc "round(100.0 * $TPUT / $MACHINE_BOUND, 1)")%"
fi

# --- 2b. the sidecar under test alone ---
# bench_push seals its whole transfer before its clock starts, so while it
# runs only `baton serve` does crypto: the client's sealing is off this
# machine's budget, as with a client on another machine. Same serve, same sink.
say ""
say "== sidecar under test: pre-sealed client (bench_push) -> TLS -> baton serve -> sink =="
push() {  # OUT BYTES
  env BATON_TOKEN="$TOKEN" "$TOOLS/bench_push" --server "$SERVE_ADDR" --ca "$RUN/certs/ca.crt" \
    --server-name localhost --route sink --bytes "$2" > "$1" 2>> "$RUN/push.log"
}
push "$RUN/push-warmup.out" 64MiB || die "warm-up pre-sealed transfer failed (see $RUN/push.log, $RUN/data.log)"
PUSH_SUITE=$(json "$RUN/push-warmup.out" 'd["suite"]')
PUSH_CIPHER=$(cipher_of "$PUSH_SUITE")
[ -n "$PUSH_CIPHER" ] || die "cannot tell which cipher suite bench_push negotiated (got \"$PUSH_SUITE\")"
PUSH_OPEN=$(aead mbedtls "$PUSH_CIPHER" open_mib_s)
PUSH_OSSL_OPEN=$(aead openssl "$PUSH_CIPHER" open_mib_s)
PUSH_TPUTS=()
PUSH_MIB=0 PUSH_WALL=0 PUSH_SERVE_CPU=0 PUSH_UPSTREAM_CPU=0 PUSH_CPU_S=0
for i in $(seq "$RUNS"); do
  c0=$(cpu_ticks "$SERVE_PID") c2=$(cpu_ticks "$UPSTREAM_PID")
  push "$RUN/push-$i.out" "$BYTES" \
    || die "pre-sealed transfer $i failed (see $RUN/push.log, $RUN/data.log)"
  # The server is idle while bench_push seals: its ticks are the transfer's.
  PUSH_SERVE_CPU=$((PUSH_SERVE_CPU + $(cpu_ticks "$SERVE_PID") - c0))
  PUSH_UPSTREAM_CPU=$((PUSH_UPSTREAM_CPU + $(cpu_ticks "$UPSTREAM_PID") - c2))
  t=$(json "$RUN/push-$i.out" 'd["mib_s"]')
  s=$(json "$RUN/push-$i.out" 'd["sink_mib_s"]')
  sec=$(json "$RUN/push-$i.out" 'd["seconds"]')
  PUSH_MIB=$(calc "$PUSH_MIB + $(json "$RUN/push-$i.out" 'd["bytes"]') / 1048576.0")
  PUSH_WALL=$(calc "$PUSH_WALL + $sec")
  PUSH_CPU_S=$(calc "$PUSH_CPU_S + $(json "$RUN/push-$i.out" 'd["cpu_seconds"]')")
  say "  run $i: $BYTES in $sec s: $t MiB/s at the client (acknowledged), $s MiB/s at the sink (sealed beforehand in $(json "$RUN/push-$i.out" 'd["seal_seconds"]') s)"
  PUSH_TPUTS+=("$t")
done
PUSH_TPUT=$(calc "sorted([${PUSH_TPUTS[*]/%/,}])[len([${PUSH_TPUTS[*]/%/,}]) // 2]")
PUSH_TPUT_MAX=$(calc "max([${PUSH_TPUTS[*]/%/,}])")
PUSH_SERVE_EFF=$(calc "round($PUSH_MIB / ($PUSH_SERVE_CPU / $HZ), 1) if $PUSH_SERVE_CPU else 0")
PUSH_SERVE_BUSY=$(calc "round(100.0 * $PUSH_SERVE_CPU / $HZ / $PUSH_WALL)")
PUSH_UPSTREAM_BUSY=$(calc "round(100.0 * $PUSH_UPSTREAM_CPU / $HZ / $PUSH_WALL)")
PUSH_BUSY=$(calc "round(100.0 * $PUSH_CPU_S / $PUSH_WALL)")
PUSH_RATIO=$(calc "round(100.0 * $PUSH_TPUT / $PUSH_OPEN, 1)")
VERDICT_PUSH=$(python3 -c "print('PASS' if $PUSH_RATIO >= $TARGET_RATIO else 'FAIL')")
say "  median: $PUSH_TPUT MiB/s through baton serve, best $PUSH_TPUT_MAX ($PUSH_SUITE)"
say "  mbedTLS ceiling: $PUSH_CIPHER open $PUSH_OPEN MiB/s (the only crypto on this path while the clock runs)"
say "  sidecar / mbedTLS open ceiling = $PUSH_RATIO% (target >= $TARGET_RATIO%): $VERDICT_PUSH"
say "  sidecar / OpenSSL open ceiling ($PUSH_OSSL_OPEN MiB/s, what the record layer runs on) = $(calc "round(100.0 * $PUSH_TPUT / $PUSH_OSSL_OPEN, 1)")%"
say "  CPU during the runs: baton serve $PUSH_SERVE_BUSY% of a core ($PUSH_SERVE_EFF MiB per CPU-second),"
say "                       bench_push $PUSH_BUSY%, sink $PUSH_UPSTREAM_BUSY%"

say ""
say "== 1 KiB request/response latency: bench_load -> baton connect -> TLS -> baton serve -> echo =="
"$TOOLS/bench_load" latency --connect "$FWD_ECHO" --size 1024 --count "$RTTS" --warmup 2000 \
  > "$RUN/lat.out" 2> "$RUN/lat.log" || die "latency run through the tunnel failed (see $RUN/lat.log)"
"$TOOLS/bench_load" latency --connect "$ECHO" --size 1024 --count "$RTTS" --warmup 2000 \
  > "$RUN/lat-direct.out" 2>> "$RUN/lat.log" || die "direct latency run failed"
P50=$(json "$RUN/lat.out" 'd["p50_us"]')
P99=$(json "$RUN/lat.out" 'd["p99_us"]')
say "  tunnel: $(json "$RUN/lat.out" '"p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f us over %d round trips" % (d["p50_us"], d["p90_us"], d["p99_us"], d["p999_us"], d["max_us"], d["count"])')"
say "  direct: $(json "$RUN/lat-direct.out" '"p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f us (no tunnel, for reference)" % (d["p50_us"], d["p90_us"], d["p99_us"], d["p999_us"], d["max_us"])')"

# On a VM, waking a process on another vCPU costs tens of microseconds, which
# dominates the numbers above. The same with every process on one CPU shows
# the cost of the software path alone.
LAT1_P50="" LAT1_P99=""
if command -v taskset >/dev/null; then
  ALL_CPUS="0-$(($(nproc) - 1))"
  for p in "$SERVE_PID" "$CONNECT_PID" "$UPSTREAM_PID"; do taskset -a -pc 0 "$p" > /dev/null; done
  taskset -c 0 "$TOOLS/bench_load" latency --connect "$FWD_ECHO" --size 1024 --count "$RTTS" --warmup 2000 \
    > "$RUN/lat-1cpu.out" 2>> "$RUN/lat.log" || die "latency run through the tunnel (one CPU) failed"
  taskset -c 0 "$TOOLS/bench_load" latency --connect "$ECHO" --size 1024 --count "$RTTS" --warmup 2000 \
    > "$RUN/lat-1cpu-direct.out" 2>> "$RUN/lat.log" || die "direct latency run (one CPU) failed"
  for p in "$SERVE_PID" "$CONNECT_PID" "$UPSTREAM_PID"; do taskset -a -pc "$ALL_CPUS" "$p" > /dev/null; done
  LAT1_P50=$(json "$RUN/lat-1cpu.out" 'd["p50_us"]')
  LAT1_P99=$(json "$RUN/lat-1cpu.out" 'd["p99_us"]')
  say "  all on one CPU: tunnel p50 $LAT1_P50  p99 $LAT1_P99 us; direct p50 $(json "$RUN/lat-1cpu-direct.out" 'd["p50_us"]')  p99 $(json "$RUN/lat-1cpu-direct.out" 'd["p99_us"]') us"
fi

stop_pid "$CONNECT_PID"
stop_pid "$SERVE_PID"

# --- 3. idle tunnels on a fresh sidecar (no heap left over from the data tests) ---
# idle_baton NAME CONCURRENCY: sets IDLE_PER, IDLE_RSS0, IDLE_RSS1, IDLE_OPEN_S, IDLE_PER_S.
idle_baton() {
  start_serve "$1" debug
  sleep 0.2
  IDLE_RSS0=$(rss_kib "$SERVE_PID")
  spawn "idle_tunnels (baton)" "$RUN/$1-tool.out" "$RUN/$1-tool.log" env BATON_TOKEN="$TOKEN" \
    "$TOOLS/idle_tunnels" --mode baton --server "$SERVE_ADDR" --ca "$RUN/certs/ca.crt" --server-name localhost \
    --count "$TUNNELS" --concurrency "$2" --timeout-s 150
  IDLE_PID=$LAST_PID
  wait_ready "$IDLE_PID" "$RUN/$1-tool.out" 160
  sleep 1  # let the last WELCOMEs' writes complete
  IDLE_RSS1=$(rss_kib "$SERVE_PID")
  lost=$(grep -c 'an open connection closed' "$RUN/$1-tool.log" || true)
  [ "$lost" = 0 ] || say "  WARNING: $lost tunnels closed before the RSS was read (see $RUN/$1-tool.log, $RUN/$1.log)"
  IDLE_OPEN_S=$(json "$RUN/$1-tool.out" 'd["open_s"]')
  IDLE_PER_S=$(json "$RUN/$1-tool.out" 'd["per_s"]')
  IDLE_FAILED=$(json "$RUN/$1-tool.out" 'd["failed"]')
  IDLE_RESUMED=$(grep -c 'TLS established (.*resumed' "$RUN/$1.log" || true)
  IDLE_WELCOMED=$(grep -c 'welcome client' "$RUN/$1.log" || true)
  IDLE_PER=$(calc "round(($IDLE_RSS1 - $IDLE_RSS0) / $TUNNELS, 2)")
  stop_pid "$IDLE_PID"
  stop_pid "$SERVE_PID"
}

say ""
say "== $TUNNELS idle tunnels (TLS + HELLO/WELCOME, $CONCURRENCY handshakes in flight) =="
idle_baton idle "$CONCURRENCY"
RSS0=$IDLE_RSS0 RSS1=$IDLE_RSS1 OPEN_S=$IDLE_OPEN_S PER_TUNNEL=$IDLE_PER
VERDICT_IDLE=$(python3 -c "print('PASS' if $PER_TUNNEL <= $TARGET_IDLE else 'FAIL')")
say "  opened in $OPEN_S s ($IDLE_PER_S/s, $IDLE_FAILED failed attempts); server: $IDLE_WELCOMED WELCOMEs, $IDLE_RESUMED resumed handshakes"
say "  sidecar VmRSS: $RSS0 KiB before, $RSS1 KiB with $TUNNELS idle tunnels"
say "  RSS per idle tunnel: $PER_TUNNEL KiB (target <= $TARGET_IDLE KiB): $VERDICT_IDLE"
# The same with few handshakes in flight: without the heap that $CONCURRENCY
# concurrent handshakes (mbedTLS's 16 KiB record buffers) leave fragmented.
idle_baton idle-slow 16
IDLE_SLOW_PER=$IDLE_PER
say "  with 16 handshakes in flight instead: $IDLE_PER KiB per idle tunnel ($IDLE_RSS1 KiB total, opened in $IDLE_OPEN_S s)"

# --- 4. the same for HAProxy: idle TLS connections ---
HA_PER="" HA_RSS1="" HA_RATIO=""
if [ "${BENCH_SKIP_HAPROXY:-0}" != 1 ]; then
  command -v haproxy >/dev/null || die "haproxy is not installed (scripts/deps.sh installs it)"
  say ""
  say "== HAProxy $(haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p'): $TUNNELS idle TLS connections (handshake only) =="
  cat "$RUN/certs/server.crt" "$RUN/certs/server.key" > "$RUN/haproxy.pem"
  HA_PORT=$(free_port)
  # The backend connection waits for the first client byte (inspect-delay):
  # baton's idle tunnels hold no upstream connection either, and 10,000
  # frontend plus 10,000 backend sockets would not fit the 20,000-fd limit.
  # `no strict-limits`: maxconn 20000 asks for 40,000 fds, more than the hard
  # limit here; haproxy then warns and runs with what it gets.
  cat > "$RUN/haproxy.cfg" <<CFG
global
  maxconn 20000
  no strict-limits
  nbthread 1
  tune.ssl.default-dh-param 2048
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend tls_in
  bind 127.0.0.1:$HA_PORT ssl crt $RUN/haproxy.pem
  tcp-request inspect-delay 10m
  tcp-request content accept if { req.len gt 0 }
  default_backend echo
backend echo
  server echo $ECHO
CFG
  haproxy -c -f "$RUN/haproxy.cfg" > "$RUN/haproxy-check.log" 2>&1 || { cat "$RUN/haproxy-check.log" >&2; die "haproxy rejected its configuration"; }
  spawn haproxy "$RUN/haproxy.out" "$RUN/haproxy.log" haproxy -db -f "$RUN/haproxy.cfg"
  HA_PID=$LAST_PID
  wait_port "$HA_PORT" 10 || die "haproxy is not listening on 127.0.0.1:$HA_PORT"
  sleep 0.2
  HA_RSS0=$(rss_kib "$HA_PID")
  spawn "idle_tunnels (tls)" "$RUN/idle-haproxy.out" "$RUN/idle-haproxy.log" \
    "$TOOLS/idle_tunnels" --mode tls --probe-echo --server "127.0.0.1:$HA_PORT" --ca "$RUN/certs/ca.crt" \
    --server-name localhost --count "$TUNNELS" --concurrency "$CONCURRENCY" --timeout-s 150
  IDLE_PID=$LAST_PID
  wait_ready "$IDLE_PID" "$RUN/idle-haproxy.out" 160
  sleep 1
  HA_RSS1=$(rss_kib "$HA_PID")
  lost=$(grep -c 'an open connection closed' "$RUN/idle-haproxy.log" || true)
  [ "$lost" = 0 ] || say "  WARNING: $lost connections closed before the RSS was read (see $RUN/idle-haproxy.log)"
  HA_OPEN_S=$(json "$RUN/idle-haproxy.out" 'd["open_s"]')
  HA_RESUMED=$(json "$RUN/idle-haproxy.out" 'd["resumed"]')
  HA_SUITE=$(json "$RUN/idle-haproxy.out" 'd["suite"]')
  HA_PER=$(calc "round(($HA_RSS1 - $HA_RSS0) / $TUNNELS, 2)")
  HA_RATIO=$(calc "round($PER_TUNNEL / $HA_PER, 3)")
  say "  opened in $HA_OPEN_S s, $HA_RESUMED resumed handshakes ($HA_SUITE); a probe record was echoed through haproxy"
  say "  haproxy VmRSS: $HA_RSS0 KiB before, $HA_RSS1 KiB with $TUNNELS idle TLS connections"
  say "  RSS per idle TLS connection: $HA_PER KiB; baton / haproxy = $HA_RATIO"
  stop_pid "$IDLE_PID"
  stop_pid "$HA_PID"
fi

WALL=$(calc "round($(date +%s.%N) - $T_START, 1)")

# --- the machine-readable block ---
say ""
RESULTS=(
  "negotiated_suite $SUITE -"
  "aead_aes128gcm_seal $(aead mbedtls AES-128-GCM seal_mib_s) MiB/s"
  "aead_aes128gcm_open $(aead mbedtls AES-128-GCM open_mib_s) MiB/s"
  "aead_aes256gcm_seal $(aead mbedtls AES-256-GCM seal_mib_s) MiB/s"
  "aead_aes256gcm_open $(aead mbedtls AES-256-GCM open_mib_s) MiB/s"
  "aead_chacha20poly1305_seal $(aead mbedtls CHACHA20-POLY1305 seal_mib_s) MiB/s"
  "aead_chacha20poly1305_open $(aead mbedtls CHACHA20-POLY1305 open_mib_s) MiB/s"
  "aead_openssl_aes128gcm_open $(aead openssl AES-128-GCM open_mib_s) MiB/s"
  "aead_openssl_chacha20poly1305_open $(aead openssl CHACHA20-POLY1305 open_mib_s) MiB/s"
  "aead_ceiling $CEILING MiB/s"
  "aead_ceiling_openssl $OSSL_CEILING MiB/s"
  "tunnel_throughput_e2e $TPUT MiB/s"
  "tunnel_throughput_e2e_best $TPUT_MAX MiB/s"
  "loopback_throughput $DIRECT MiB/s"
  "ratio_e2e $RATIO %"
  "ratio_e2e_verdict $VERDICT_RATIO >=${TARGET_RATIO}%"
  "serve_mib_per_cpu_second $SERVE_EFF MiB/s"
  "connect_mib_per_cpu_second $CONNECT_EFF MiB/s"
  "machine_cpu_bound $MACHINE_BOUND MiB/s"
  "tunnel_throughput_sidecar $PUSH_TPUT MiB/s"
  "tunnel_throughput_sidecar_best $PUSH_TPUT_MAX MiB/s"
  "sidecar_ceiling_open $PUSH_OPEN MiB/s"
  "sidecar_ceiling_open_openssl $PUSH_OSSL_OPEN MiB/s"
  "ratio_sidecar $PUSH_RATIO %"
  "ratio_sidecar_verdict $VERDICT_PUSH >=${TARGET_RATIO}%"
  "serve_cpu_sidecar $PUSH_SERVE_BUSY %"
  "serve_mib_per_cpu_second_sidecar $PUSH_SERVE_EFF MiB/s"
  "latency_1k_p50 $P50 us"
  "latency_1k_p99 $P99 us"
)
[ -z "$LAT1_P50" ] || RESULTS+=("latency_1k_p50_one_cpu $LAT1_P50 us" "latency_1k_p99_one_cpu $LAT1_P99 us")
RESULTS+=(
  "idle_tunnels $TUNNELS count"
  "idle_rss_per_tunnel $PER_TUNNEL KiB"
  "idle_rss_per_tunnel_verdict $VERDICT_IDLE <=${TARGET_IDLE}KiB"
  "idle_rss_per_tunnel_16_in_flight $IDLE_SLOW_PER KiB"
  "idle_sidecar_rss $RSS1 KiB"
  "idle_open_time $OPEN_S s"
)
if [ -n "$HA_PER" ]; then
  RESULTS+=(
    "haproxy_idle_rss_per_conn $HA_PER KiB"
    "haproxy_idle_rss $HA_RSS1 KiB"
    "idle_baton_vs_haproxy $HA_RATIO ratio"
  )
fi
RESULTS+=("cpu_idle_at_start $IDLE_PCT %" "wall_time $WALL s")
for r in "${RESULTS[@]}"; do
  name=${r%% *}
  rest=${r#* }
  value=${rest% *}
  unit=${rest##* }
  printf 'bench: %s %s %s\n' "$name" "${value// /_}" "$unit"
done
printf '%s\n' "${RESULTS[@]}" | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    name, rest = line.rstrip("\n").split(" ", 1)
    value, unit = rest.rsplit(" ", 1)
    try:
        value = float(value)
    except ValueError:
        pass
    out[name] = {"value": value, "unit": unit}
json.dump(out, open(sys.argv[1], "w"), indent=1)
' "$RUN/results.json"
