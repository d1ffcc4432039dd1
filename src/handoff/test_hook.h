// Fault injection for the integration tests, present only in the test
// build `baton-test-hooks` (tests/hooks/stop_at.cc). The shipped `baton`
// links the weak definitions in test_hook.cc, which do nothing: it reads no
// BATON_TEST_* variable and never stops itself.
//
// In baton-test-hooks, when the environment variable of a TestPoint names its
// step, the process stops itself (SIGSTOP) there, so a test can act (kill -9 the other
// process, send a signal, ...) at exactly that point, then SIGCONT it:
//   BATON_TEST_HANDOFF_STOP_AT        the new process: hello, listening, batch
//                                     (the first, not handled), ack (the first sent)
//   BATON_TEST_HANDOFF_PARENT_STOP_AT the old process: hello (received, not
//                                     handled), listening (likewise), batch
//                                     (the first batch sent), commit (every
//                                     batch acknowledged, commit not sent)
//   BATON_TEST_STOP_AT                sidecar/common.cc: signals_off (on the way
//                                     out, SIGTERM and SIGINT just ignored)
// and BATON_TEST_HANDOFF_STATE_VERSION is the tunnel state version the old
// process claims to write (a newer one than the new process reads).
//
// Every step and failure of the hand-over itself is unit-tested without
// these (tests/unit/handoff_logic_test.cc); the hooks serve the few
// end-to-end tests with real processes and signals.
#pragma once

#include <cstdint>

namespace baton::handoff {

enum class TestPoint : uint8_t {
  child_hello, child_listening, child_batch, child_ack,
  parent_hello, parent_listening, parent_batch, parent_commit,
  signals_off,
};
void test_point(TestPoint p);
uint16_t test_state_version_override();  // 0: none

}  // namespace baton::handoff
