#!/usr/bin/env bash
# Runs every test: unit tests (GoogleTest via meson) and integration tests
# (pytest, real processes on loopback), first against the normal build, then
# against an ASan+UBSan build (BATON_SKIP_ASAN=1 skips it), then against a
# ThreadSanitizer build (BATON_SKIP_TSAN=1 skips it; suppressions with their
# reasons in tests/tsan.supp); then a short fuzz smoke run (tests/fuzz/run.sh,
# BATON_FUZZ_SECONDS, default 20; BATON_SKIP_FUZZ=1 skips it). Ends with one
# line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ASAN_BUILD=${ASAN_BUILD:-build-asan}
TSAN_BUILD=${TSAN_BUILD:-build-tsan}
passed=0
failed=0
log=$(mktemp -d)

count_meson() {  # adds meson test results from its log
  local out=$1
  local ok fail
  ok=$(grep -E '^Ok:' "$out" | awk '{print $2}' | tail -1)
  fail=$(grep -E '^(Fail|Unexpected Pass|Timeout):' "$out" | awk '{s+=$2} END {print s+0}')
  passed=$((passed + ${ok:-0}))
  failed=$((failed + ${fail:-0}))
  [ -n "$ok" ] || failed=$((failed + 1))
}

count_pytest() {  # adds pytest results from its summary line
  local out=$1 line p f e
  line=$(grep -E '(passed|failed|error)' "$out" | tail -1)
  p=$(echo "$line" | grep -oE '[0-9]+ passed' | awk '{print $1}')
  f=$(echo "$line" | grep -oE '[0-9]+ failed' | awk '{print $1}')
  e=$(echo "$line" | grep -oE '[0-9]+ error' | awk '{print $1}')
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0} + ${e:-0}))
  [ -n "$p$f$e" ] || failed=$((failed + 1))
}

run_suite() {  # name build-dir extra-env...
  local name=$1 dir=$2
  shift 2
  echo "=== $name: unit tests ($dir)"
  env "$@" meson test -C "$dir" --suite unit --print-errorlogs 2>&1 | tee "$log/$name-unit.txt" | grep -E '^ *[0-9]+/[0-9]+ |^(Ok|Fail|Timeout):'
  count_meson "$log/$name-unit.txt"
  echo "=== $name: integration tests"
  env "$@" BATON_BIN="$PWD/$dir/baton" /usr/bin/python3 -m pytest tests/integration -q -p no:cacheprovider 2>&1 | tee "$log/$name-integration.txt" | tail -40
  count_pytest "$log/$name-integration.txt"
}

run_suite release "$BUILD"

if [ "${BATON_SKIP_ASAN:-0}" != 1 ]; then
  echo "=== building with AddressSanitizer + UndefinedBehaviorSanitizer ($ASAN_BUILD)"
  if make --no-print-directory asan ASAN="$ASAN_BUILD" > "$log/asan-build.txt" 2>&1; then
    # Smaller transfers under ASan: the same paths, a fraction of the bytes.
    run_suite asan "$ASAN_BUILD" \
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      BATON_TEST_BIG_BYTES=$((64 << 20)) BATON_TEST_SANITIZED=1
  else
    tail -30 "$log/asan-build.txt"
    failed=$((failed + 1))
  fi
fi

if [ "${BATON_SKIP_TSAN:-0}" != 1 ]; then
  echo "=== building with ThreadSanitizer ($TSAN_BUILD)"
  if make --no-print-directory tsan TSAN="$TSAN_BUILD" > "$log/tsan-build.txt" 2>&1; then
    # The admin HTTP threads and the event loop share a process; any report
    # fails the test that started the process (conftest.py _teardown).
    # BATON_TEST_TSAN=1 skips the two tests that signal a process the moment
    # it is ready: TSan itself sometimes loses such a signal (test_cli.py).
    run_suite tsan "$TSAN_BUILD" \
      TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp:second_deadlock_stack=1" \
      BATON_TEST_BIG_BYTES=$((64 << 20)) BATON_TEST_SANITIZED=1 BATON_TEST_TSAN=1
  else
    tail -30 "$log/tsan-build.txt"
    failed=$((failed + 1))
  fi
fi

if [ "${BATON_SKIP_FUZZ:-0}" != 1 ]; then
  fuzz_seconds=${BATON_FUZZ_SECONDS:-20}
  echo "=== fuzz: handoff decoder, ${fuzz_seconds} s smoke run (tests/fuzz/run.sh)"
  if tests/fuzz/run.sh "$fuzz_seconds" > "$log/fuzz.txt" 2>&1; then
    passed=$((passed + 1))
    runs=$(grep -E '^stat::number_of_executed_units' "$log/fuzz.txt" | awk '{print $2}')
    rate=$(grep -E '^stat::average_exec_per_sec' "$log/fuzz.txt" | awk '{print $2}')
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log/fuzz.txt" | tail -1)
    echo "fuzz: ok, ${runs:-?} inputs (${rate:-?}/s), ${cov:-cov: ?}, no crash"
  else
    tail -40 "$log/fuzz.txt"
    echo "fuzz: FAILED (crashing input, if any, in ${FUZZ_BUILD:-build-fuzz}/artifacts/)"
    failed=$((failed + 1))
  fi
fi

echo
echo "test summary: $passed passed, $failed failed"
rm -rf "$log"
[ "$failed" -eq 0 ]
