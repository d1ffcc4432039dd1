#!/usr/bin/env bash
# Runs every test: unit tests (GoogleTest via meson) and integration tests
# (pytest, real processes on loopback), first against the normal build, then
# against an ASan+UBSan build (BATON_SKIP_ASAN=1 skips it), then against a
# ThreadSanitizer build (BATON_SKIP_TSAN=1 skips it; suppressions with their
# reasons in tests/tsan.supp); then a short fuzz smoke run (tests/fuzz/run.sh,
# BATON_FUZZ_SECONDS, default 10; BATON_SKIP_FUZZ=1 skips it). Ends with one
# line "N passed, N failed" (run without root: and how many root-only tests
# were skipped; run as root, such a skip is a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ASAN_BUILD=${ASAN_BUILD:-build-asan}
TSAN_BUILD=${TSAN_BUILD:-build-tsan}
passed=0
failed=0
root_only_skipped=0
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
  env "$@" meson test -C "$dir" --no-rebuild --suite unit --print-errorlogs 2>&1 | tee "$log/$name-unit.txt" | grep -E '^ *[0-9]+/[0-9]+ |^(Ok|Fail|Timeout):'
  count_meson "$log/$name-unit.txt"
  [ -z "${after_unit:-}" ] || "$after_unit"
  echo "=== $name: integration tests"
  env "$@" BATON_BIN="$PWD/$dir/baton" /usr/bin/python3 -m pytest tests/integration -q -p no:cacheprovider > "$log/$name-integration.txt" 2>&1
  # Progress and printed results; on failure every failure's report
  # (assertion, the processes' stderr), up to 1,500 lines, then the summary.
  if grep -qE '^(FAILED|ERROR) ' "$log/$name-integration.txt"; then
    sed -n '/^=* FAILURES =*$/,$p;/^=* ERRORS =*$/,$p' "$log/$name-integration.txt" | head -1500
    grep -E '^(FAILED|ERROR) |passed|failed' "$log/$name-integration.txt" | tail -30
  else
    # The tests' own report lines ("[rollout] ...", "[test_drain_lb] ...") and the summary.
    grep -E '^\[[a-z_]+\] ' "$log/$name-integration.txt"
    tail -1 "$log/$name-integration.txt"
  fi
  count_pytest "$log/$name-integration.txt"
  # Not root: what only root can check was not checked (conftest.py root_only).
  local r
  r=$(grep -oE '^\[root-only\] [0-9]+' "$log/$name-integration.txt" | awk '{print $2}')
  if [ -n "$r" ]; then
    grep -E '^\[root-only\] ' "$log/$name-integration.txt"
    root_only_skipped=$((root_only_skipped + r))
  fi
}

# The ASan build starts once the release unit tests are done (one of them
# times a constant-time comparison: it runs on a quiet machine), at the
# lowest priority, beside the release integration suite, which waits on
# processes and sockets more than it computes; the ASan stage then runs make
# again in the foreground for whatever is left (or if this failed). The same
# for the TSan build beside the ASan suite and the fuzz targets beside the
# TSan suite.
start_asan_prebuild() {
  nice -n 19 make --no-print-directory test-needs-asan ASAN="$ASAN_BUILD" > "$log/asan-prebuild.txt" 2>&1 &
  asan_prebuild=$!
}
after_unit=
[ "${BATON_SKIP_ASAN:-0}" = 1 ] || after_unit=start_asan_prebuild

run_suite release "$BUILD"
after_unit=

if [ "${BATON_SKIP_ASAN:-0}" != 1 ]; then
  echo "=== building with AddressSanitizer + UndefinedBehaviorSanitizer ($ASAN_BUILD)"
  [ -z "${asan_prebuild:-}" ] || wait "$asan_prebuild" || true
  if make --no-print-directory test-needs-asan ASAN="$ASAN_BUILD" > "$log/asan-build.txt" 2>&1; then
    # The ThreadSanitizer build starts now, at the lowest priority, beside
    # the ASan suite, which leaves about half of the two cores idle (it
    # waits on processes and sockets): the TSan stage then finds most of
    # its build done. The stage below runs make again in the foreground,
    # so whatever this one did not finish (or if it failed) is built there.
    if [ "${BATON_SKIP_TSAN:-0}" != 1 ]; then
      nice -n 19 make --no-print-directory test-needs-tsan TSAN="$TSAN_BUILD" > "$log/tsan-prebuild.txt" 2>&1 &
      tsan_prebuild=$!
    fi
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
  [ -z "${tsan_prebuild:-}" ] || wait "$tsan_prebuild" || true
  if make --no-print-directory test-needs-tsan TSAN="$TSAN_BUILD" > "$log/tsan-build.txt" 2>&1; then
    # The admin HTTP threads and the event loop share a process; any report
    # fails the test that started the process (conftest.py _teardown).
    # BATON_TEST_TSAN=1 skips the two tests that signal a process the moment
    # it is ready: TSan itself sometimes loses such a signal (test_cli.py).
    if [ "${BATON_SKIP_FUZZ:-0}" != 1 ]; then
      nice -n 19 tests/fuzz/run.sh --build > "$log/fuzz-prebuild.txt" 2>&1 &
      fuzz_prebuild=$!
    fi
    run_suite tsan "$TSAN_BUILD" \
      TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp:second_deadlock_stack=1" \
      BATON_TEST_BIG_BYTES=$((64 << 20)) BATON_TEST_SANITIZED=1 BATON_TEST_TSAN=1
  else
    tail -30 "$log/tsan-build.txt"
    failed=$((failed + 1))
  fi
fi

if [ "${BATON_SKIP_FUZZ:-0}" != 1 ]; then
  # Every libFuzzer target for BATON_FUZZ_SECONDS (default 10) each, two at
  # a time (7 targets: about 40 s, plus a minute to build them the first
  # time); one pass or fail per target. `make fuzz` runs them longer.
  [ -z "${fuzz_prebuild:-}" ] || wait "$fuzz_prebuild" || true
  fuzz_seconds=${BATON_FUZZ_SECONDS:-10}
  echo "=== fuzz: every target, ${fuzz_seconds} s each, two at a time (tests/fuzz/run.sh)"
  FUZZ_JOBS=${FUZZ_JOBS:-2} tests/fuzz/run.sh "$fuzz_seconds" > "$log/fuzz.txt" 2>&1
  fuzz_status=$?
  grep -E '^fuzz: [a-z_]+: (ok|FAILED)' "$log/fuzz.txt"
  fuzz_ok=$(grep -cE '^fuzz: [a-z_]+: ok' "$log/fuzz.txt")
  fuzz_failed=$(grep -cE '^fuzz: [a-z_]+: FAILED' "$log/fuzz.txt")
  passed=$((passed + fuzz_ok))
  failed=$((failed + fuzz_failed))
  if [ "$fuzz_status" -ne 0 ]; then
    tail -60 "$log/fuzz.txt"
    echo "fuzz: FAILED (crashing inputs in ${FUZZ_BUILD:-build-fuzz}/artifacts/, logs in ${FUZZ_BUILD:-build-fuzz}/logs/)"
    # A build failure or a run that printed no verdict still counts.
    [ "$fuzz_failed" -gt 0 ] || failed=$((failed + 1))
  fi
fi

echo
if [ "$root_only_skipped" -gt 0 ]; then
  echo "test summary: $passed passed, $failed failed (not root: $root_only_skipped root-only tests skipped)"
else
  echo "test summary: $passed passed, $failed failed"
fi
rm -rf "$log"
[ "$failed" -eq 0 ]
