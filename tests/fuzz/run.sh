#!/usr/bin/env bash
# Builds the libFuzzer targets (clang++, libFuzzer + ASan + UBSan) in their own
# directory and runs each over its checked-in seed corpus.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...] [libFuzzer flags...]
#                        build what is stale, run each TARGET (default: all)
#                        for SECONDS (default 60); flags go to every run
#   tests/fuzz/run.sh --build [TARGET...]     build only
#   tests/fuzz/run.sh --list                  the targets
#   tests/fuzz/run.sh --regen-corpus          rewrite tests/fuzz/corpus/*/ from
#                                             handoff_corpus.cc and seeds.cc
#
# A run fails on a crash, a broken property (abort), undefined behaviour, a
# leak, an input that takes over 10 s (-timeout), more than 2 GiB resident
# (-rss_limit_mb) or one allocation over 64 MiB (-malloc_limit_mb: inputs are
# a few KiB, so such a size is a length the code failed to bound). Each target
# ends with one line, which scripts/test.sh counts:
#   fuzz: TARGET: ok, N inputs in S s (R/s), cov C, ft F, corpus K
#   fuzz: TARGET: FAILED (crash|leak|timeout|oom|...), input in DIR/artifacts/TARGET-...
# Exit status 0 when every target passed.
#
# Inputs the fuzzer finds go to $FUZZ_BUILD/corpus/TARGET/, never to the seeds;
# crashes to $FUZZ_BUILD/artifacts/, the whole libFuzzer output to
# $FUZZ_BUILD/logs/TARGET.log. Replay a crash with
#   build-fuzz/TARGET_fuzz build-fuzz/artifacts/TARGET-crash-<sha1>
# Environment: FUZZ_BUILD (default build-fuzz), CXX_FUZZ (default clang++),
# FUZZ_JOBS (targets run at once, default 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${FUZZ_BUILD:-build-fuzz}
CXX_FUZZ=${CXX_FUZZ:-clang++}
SEEDS=tests/fuzz/corpus
TARGETS=(handoff_decoder handoff_midstream mux_frame mux_session control preamble tls_record config)
# The sans-IO cores the targets feed; nothing that touches libuv or sockets.
SRCS=(src/handoff/codec.cc src/proxy/link_core.cc src/proxy/resume_log.cc src/proxy/metrics.cc src/tls/record.cc src/mux/session.cc src/mux/frame.cc
      src/mux/control.cc src/config/config.cc src/util/byte_queue.cc src/util/bytes.cc src/util/text.cc)
LIBS=(-lcrypto -lmbedcrypto -lyaml)
FLAGS=(-std=c++20 -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Werror -Iinclude -Isrc
       -fsanitize=address,undefined -fno-sanitize-recover=undefined)

max_len() {  # the largest input worth trying, per target
  case $1 in
    handoff_decoder|tls_record) echo 8192 ;;
    preamble) echo 512 ;;
    *) echo 4096 ;;
  esac
}

stale() {  # true if $1 is missing or older than a file its .d dependency list names
  [ -e "$1" ] && [ -e "$1.d" ] || return 0
  local deps
  deps=$(sed -e 's/^[^:]*://' -e 's/\\$//' "$1.d")
  # shellcheck disable=SC2086
  [ -n "$(find $deps -newer "$1" -print -quit 2>/dev/null)" ]
}

compile() {  # source object extra-flags...
  local src=$1 obj=$2
  shift 2
  stale "$obj" || return 0
  echo "fuzz: compiling $src"
  "$CXX_FUZZ" "${FLAGS[@]}" "$@" -MMD -MF "$obj.d" -c "$src" -o "$obj"
}

# The cores, instrumented for coverage, in one archive the targets link.
build_lib() {
  mkdir -p "$OUT/obj"
  local objs=() pids=() src obj status=0
  for src in "${SRCS[@]}"; do
    obj=$OUT/obj/$(basename "$src" .cc).o
    objs+=("$obj")
    compile "$src" "$obj" -fsanitize=fuzzer-no-link &
    pids+=($!)
    # Two at a time: the machine is shared.
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  [ $status -eq 0 ] || return 1
  if [ ! -e "$OUT/libcores.a" ] || [ -n "$(find "${objs[@]}" -newer "$OUT/libcores.a" -print -quit)" ]; then
    rm -f "$OUT/libcores.a"
    ar rcs "$OUT/libcores.a" "${objs[@]}"
  fi
}

# name [extra flags]: tests/fuzz/NAME.cc linked with the cores into $OUT/NAME.
build_exe() {
  local name=$1
  shift
  local obj=$OUT/obj/$name.o
  compile "tests/fuzz/$name.cc" "$obj" "$@" || return 1
  if [ ! -x "$OUT/$name" ] || [ "$obj" -nt "$OUT/$name" ] || [ "$OUT/libcores.a" -nt "$OUT/$name" ]; then
    echo "fuzz: linking $OUT/$name"
    "$CXX_FUZZ" "${FLAGS[@]}" "$@" "$obj" "$OUT/libcores.a" "${LIBS[@]}" -o "$OUT/$name" || return 1
  fi
}

build_targets() {  # target...
  build_lib || return 1
  local t
  for t in "$@"; do build_exe "${t}_fuzz" -fsanitize=fuzzer || return 1; done
}

is_target() {
  local t
  for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
  return 1
}

# The stat:: lines and the last status line of a libFuzzer log, as one summary.
summary() {  # target log seconds
  local runs rate cov ft corp
  runs=$(awk '/^stat::number_of_executed_units/ {print $2}' "$2")
  rate=$(awk '/^stat::average_exec_per_sec/ {print $2}' "$2")
  cov=$(grep -oE 'cov: [0-9]+' "$2" | tail -1 | awk '{print $2}')
  ft=$(grep -oE 'ft: [0-9]+' "$2" | tail -1 | awk '{print $2}')
  corp=$(grep -oE 'corp: [0-9]+' "$2" | tail -1 | awk '{print $2}')
  echo "fuzz: $1: ok, ${runs:-?} inputs in ${3} s (${rate:-?}/s), cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}"
}

failure_kind() {  # log
  if grep -q 'ERROR: libFuzzer: timeout' "$1"; then echo timeout
  elif grep -qE 'ERROR: libFuzzer: (out-of-memory|malloc)' "$1"; then echo oom
  elif grep -q 'ERROR: LeakSanitizer' "$1"; then echo leak
  elif grep -q 'property broken' "$1"; then echo "property broken: $(grep -m1 -o 'property broken: .*' "$1" | cut -d' ' -f3-)"
  elif grep -q 'runtime error:' "$1"; then echo "undefined behaviour"
  elif grep -q 'ERROR: AddressSanitizer' "$1"; then echo "$(grep -m1 -oE 'AddressSanitizer: [a-z-]+' "$1")"
  else echo crash
  fi
}

run_target() {  # target seconds libFuzzer-flags...
  local t=$1 seconds=$2
  shift 2
  local corpus=$OUT/corpus/$t log=$OUT/logs/$t.log
  mkdir -p "$corpus" "$OUT/artifacts" "$OUT/logs"
  echo "fuzz: $t for ${seconds}s over $SEEDS/$t (+ $corpus)"
  UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
    "$OUT/${t}_fuzz" -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=64 -detect_leaks=1 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t-" "$@" \
    "$corpus" "$SEEDS/$t" > "$log" 2>&1
  local rc=$?
  grep -E '^stat::' "$log"
  if [ $rc -eq 0 ]; then
    summary "$t" "$log" "$seconds"
    return 0
  fi
  tail -40 "$log"
  local artifact
  artifact=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -1 | cut -d' ' -f5)
  echo "fuzz: $t: FAILED ($(failure_kind "$log")), input in ${artifact:-?}; log $log"
  return 1
}

case "${1:-}" in
  --list)
    printf '%s\n' "${TARGETS[@]}"
    exit 0
    ;;
  --build)
    shift
    [ $# -gt 0 ] || set -- "${TARGETS[@]}"
    build_targets "$@"
    exit
    ;;
  --regen-corpus)
    build_lib && build_exe handoff_corpus && build_exe seeds || exit 1
    for t in "${TARGETS[@]}"; do rm -rf "${SEEDS:?}/$t"; done
    mkdir -p "$SEEDS/handoff_decoder"
    "$OUT/handoff_corpus" "$SEEDS/handoff_decoder" && "$OUT/seeds" "$SEEDS" || exit 1
    # The configuration files the repository ships are config seeds as they are.
    cp sidecar/baton.example.yaml "$SEEDS/config/baton.example.yaml"
    cp k8s/base/baton.yaml "$SEEDS/config/k8s_base.yaml"
    exit 0
    ;;
esac

seconds=60
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
chosen=()
flags=()
for a in "$@"; do
  if is_target "${a%_fuzz}"; then chosen+=("${a%_fuzz}"); else flags+=("$a"); fi
done
[ ${#chosen[@]} -gt 0 ] || chosen=("${TARGETS[@]}")

build_targets "${chosen[@]}" || { echo "fuzz: build FAILED"; exit 1; }
failed=0
# FUZZ_JOBS targets at a time (default 1); each one's output is printed whole,
# in target order, once it has ended.
jobs=${FUZZ_JOBS:-1}
outdir=$(mktemp -d)
pids=()
started=()
finish_one() {  # waits for the oldest running target and prints its output
  wait "${pids[0]}" || failed=$((failed + 1))
  cat "$outdir/${started[0]}.out"
  pids=("${pids[@]:1}")
  started=("${started[@]:1}")
}
for t in "${chosen[@]}"; do
  run_target "$t" "$seconds" "${flags[@]}" > "$outdir/$t.out" 2>&1 &
  pids+=($!)
  started+=("$t")
  [ ${#pids[@]} -lt "$jobs" ] || finish_one
done
while [ ${#pids[@]} -gt 0 ]; do finish_one; done
rm -rf "$outdir"
echo "fuzz: ${#chosen[@]} targets, $failed failed"
[ $failed -eq 0 ]
