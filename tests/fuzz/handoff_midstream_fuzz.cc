// libFuzzer target: a whole tunnel handed over mid-stream
// (tests/common/handoff_world.h). The input is the dice: which suite, how
// many steps, the two steps at which the server is exported, carried through
// the codec and adopted, and then every choice of the conversation (streams
// opened, bytes written and read, windows, pings, FINs, resets, upstream
// writes left in flight). Properties: no crash, no leak, no undefined
// behaviour; every check of the shared harness holds (streams arrive whole,
// pings are answered, the cores rebuilt from a state give it back); and the
// conversation with hand-overs is byte-for-byte the one without.
//
// Build and run: tests/fuzz/run.sh [SECONDS]. Seed corpus:
// tests/fuzz/corpus/handoff_midstream/.
#include "expect_shim.h"
// after the shim
#include "../common/handoff_world.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>

namespace {

// The fuzzer's bytes, four at a time; past the end, a generator seeded by
// all of them, so a short input still makes a whole conversation.
class ByteDice {
 public:
  ByteDice(const uint8_t* d, size_t n) : d_(d), n_(n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; ++i) h = (h ^ d[i]) * 16777619u;
    tail_.seed(h);
  }
  uint32_t operator()() {
    if (i_ + 4 <= n_) {
      uint32_t v;
      std::memcpy(&v, d_ + i_, 4);
      i_ += 4;
      return v;
    }
    return uint32_t(tail_());
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t i_ = 0;
  std::mt19937 tail_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace handoff_world;
  if (size < 6) return 0;
  static const uint16_t kSuites[] = {baton::tls::suite::ecdhe_ecdsa_aes128_gcm_sha256,
                                     baton::tls::suite::ecdhe_rsa_aes256_gcm_sha384,
                                     baton::tls::suite::ecdhe_ecdsa_chacha20_poly1305};
  const uint16_t suite = kSuites[data[0] % 3];
  const int steps = 40 + data[1] % 120;
  const int export_a = 1 + data[2] % (steps - 2);
  const int export_b = export_a + 1 + data[3] % (steps - 1 - export_a);
  const uint32_t seed = uint32_t(data[4]) | uint32_t(data[5]) << 8;
  Outcome moved = converse_with(suite, seed, true, nullptr, ByteDice(data + 6, size - 6), steps, export_a, export_b);
  Outcome twin = converse_with(suite, seed, false, nullptr, ByteDice(data + 6, size - 6), steps, export_a, export_b);
  EXPECT_EQ(moved.handoffs, 2);
  EXPECT_TRUE(moved.up == twin.up) << "client -> server bytes differ from the run without hand-overs";
  EXPECT_TRUE(moved.down == twin.down) << "server -> client bytes differ from the run without hand-overs";
  EXPECT_TRUE(moved.events == twin.events) << "ping answers differ";
  EXPECT_TRUE(moved.delivered == twin.delivered) << "bytes delivered per stream differ";
  return 0;
}
