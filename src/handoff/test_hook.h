#pragma once
// Fault injection for the integration tests (tests/integration/test_hot_restart.py):
// when the environment variable `env` names `step`, this process stops itself
// (SIGSTOP) there, so a test can act (kill -9 the other process, ...) at exactly
// that point and then SIGCONT or kill it. No effect otherwise.
//   BATON_TEST_HANDOFF_STOP_AT        the new process: hello, listening, batch
//                                     (the first, not handled), ack (the first sent)
//   BATON_TEST_HANDOFF_PARENT_STOP_AT the old process: hello (received, not
//                                     handled), listening (likewise), batch
//                                     (the first batch sent), commit (every
//                                     batch acknowledged, commit not sent)
//   BATON_TEST_STOP_AT                sidecar/common.cc: signals_off (on the way
//                                     out, SIGTERM and SIGINT just ignored)

#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdlib>
#include <cstring>

namespace baton::handoff {

inline void test_stop_at(const char* env, const char* step) {
  const char* at = std::getenv(env);
  if (at && std::strcmp(at, step) == 0) {
    spdlog::warn("handoff: stopping at step {} ({})", step, env);
    std::raise(SIGSTOP);
  }
}

}  // namespace baton::handoff
