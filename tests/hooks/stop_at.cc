// baton-test-hooks only: the fault injection points of src/handoff/test_hook.h.
#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdlib>
#include <cstring>

#include "handoff/test_hook.h"

namespace baton::handoff {

void test_point(TestPoint p) {
  const char* env = "BATON_TEST_HANDOFF_STOP_AT";
  const char* step = "";
  switch (p) {
    case TestPoint::child_hello: step = "hello"; break;
    case TestPoint::child_listening: step = "listening"; break;
    case TestPoint::child_batch: step = "batch"; break;
    case TestPoint::child_ack: step = "ack"; break;
    case TestPoint::parent_hello: env = "BATON_TEST_HANDOFF_PARENT_STOP_AT", step = "hello"; break;
    case TestPoint::parent_listening: env = "BATON_TEST_HANDOFF_PARENT_STOP_AT", step = "listening"; break;
    case TestPoint::parent_batch: env = "BATON_TEST_HANDOFF_PARENT_STOP_AT", step = "batch"; break;
    case TestPoint::parent_commit: env = "BATON_TEST_HANDOFF_PARENT_STOP_AT", step = "commit"; break;
    case TestPoint::signals_off: env = "BATON_TEST_STOP_AT", step = "signals_off"; break;
  }
  const char* at = std::getenv(env);
  if (at && std::strcmp(at, step) == 0) {
    spdlog::warn("handoff: stopping at step {} ({})", step, env);
    std::raise(SIGSTOP);
  }
}

uint16_t test_state_version_override() {
  const char* v = std::getenv("BATON_TEST_HANDOFF_STATE_VERSION");
  return v ? uint16_t(std::atoi(v)) : 0;
}

}  // namespace baton::handoff
