// The shipped definitions: nothing happens (see test_hook.h). Weak, so that
// the test build's strong ones (tests/hooks/stop_at.cc) take their place.
#include "handoff/test_hook.h"

namespace baton::handoff {

__attribute__((weak)) void test_point(TestPoint) {}
__attribute__((weak)) uint16_t test_state_version_override() { return 0; }

}  // namespace baton::handoff
