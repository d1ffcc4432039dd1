#!/usr/bin/env bash
# Builds the handoff decoder fuzzer (clang++, libFuzzer + ASan + UBSan) in its
# own directory and runs it over the checked-in seed corpus.
#
#   tests/fuzz/run.sh [SECONDS] [libFuzzer flags...]   build if needed, run SECONDS (default 60)
#   tests/fuzz/run.sh --build                          build only
#   tests/fuzz/run.sh --regen-corpus                   rewrite tests/fuzz/corpus/handoff_decoder/
#                                                      from tests/fuzz/handoff_corpus.cc
#
# Inputs the fuzzer finds go to $FUZZ_BUILD/corpus, never to the seeds;
# crashes go to $FUZZ_BUILD/artifacts/. Replay one with
#   build-fuzz/handoff_decoder_fuzz build-fuzz/artifacts/crash-<sha1>
# Environment: FUZZ_BUILD (default build-fuzz), CXX_FUZZ (default clang++).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${FUZZ_BUILD:-build-fuzz}
CXX_FUZZ=${CXX_FUZZ:-clang++}
SEEDS=tests/fuzz/corpus/handoff_decoder
# The codec and the cores it reads and writes; nothing that touches libuv or sockets.
SRCS=(src/handoff/codec.cc src/proxy/metrics.cc src/tls/record.cc src/mux/session.cc src/mux/frame.cc
      src/util/byte_queue.cc src/util/bytes.cc)
FLAGS=(-std=c++20 -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Werror -Iinclude -Isrc
       -fsanitize=address,undefined -fno-sanitize-recover=undefined)
LIBS=(-lmbedcrypto)

stale() {  # true if $1 is missing or older than a source or header it may include
  [ ! -x "$1" ] || [ -n "$(find src include tests/fuzz -newer "$1" \( -name '*.cc' -o -name '*.h' \) -print -quit)" ]
}

build() {  # name extra-flags...
  local name=$1
  shift
  mkdir -p "$OUT"
  if stale "$OUT/$name"; then
    echo "fuzz: building $OUT/$name ($CXX_FUZZ)"
    "$CXX_FUZZ" "${FLAGS[@]}" "$@" "tests/fuzz/$name.cc" "${SRCS[@]}" "${LIBS[@]}" -o "$OUT/$name"
  fi
}

case "${1:-}" in
  --build)
    build handoff_decoder_fuzz -fsanitize=fuzzer
    exit 0
    ;;
  --regen-corpus)
    build handoff_corpus
    mkdir -p "$SEEDS"
    "$OUT/handoff_corpus" "$SEEDS"
    exit 0
    ;;
esac

seconds=${1:-60}
[ $# -gt 0 ] && shift
build handoff_decoder_fuzz -fsanitize=fuzzer
mkdir -p "$OUT/corpus" "$OUT/artifacts"
echo "fuzz: handoff_decoder_fuzz for ${seconds}s over $SEEDS (+ $OUT/corpus)"
# -malloc_limit_mb: inputs are at most 8 KiB, so any allocation near this size
# is a length or count the codec failed to bound.
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  "$OUT/handoff_decoder_fuzz" -max_total_time="$seconds" -max_len=8192 -timeout=10 -malloc_limit_mb=64 \
  -print_final_stats=1 -artifact_prefix="$OUT/artifacts/" "$@" "$OUT/corpus" "$SEEDS"
