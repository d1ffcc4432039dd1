#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "util/byte_queue.h"
#include "util/bytes.h"

using namespace baton::util;

TEST(Bytes, BigEndianRoundTrip) {
  uint8_t b[8];
  store_u16(b, 0x1234);
  EXPECT_EQ(b[0], 0x12);
  EXPECT_EQ(load_u16(b), 0x1234);
  store_u32(b, 0xdeadbeef);
  EXPECT_EQ(b[0], 0xde);
  EXPECT_EQ(b[3], 0xef);
  EXPECT_EQ(load_u32(b), 0xdeadbeefu);
  store_u64(b, 0x0102030405060708ull);
  EXPECT_EQ(b[0], 1);
  EXPECT_EQ(b[7], 8);
  EXPECT_EQ(load_u64(b), 0x0102030405060708ull);
}

TEST(Bytes, Hex) {
  uint8_t v[3] = {0x00, 0xab, 0xff};
  EXPECT_EQ(to_hex(v), "00abff");
  uint8_t out[3];
  EXPECT_TRUE(from_hex("00ABff", out));
  EXPECT_EQ(0, memcmp(out, v, 3));
  EXPECT_FALSE(from_hex("00abf", out));
  EXPECT_FALSE(from_hex("00abfg", out));
}

TEST(Bytes, EqualConstantTime) {
  EXPECT_TRUE(equal_ct(as_bytes("abc"), as_bytes("abc")));
  EXPECT_FALSE(equal_ct(as_bytes("abc"), as_bytes("abd")));
  EXPECT_FALSE(equal_ct(as_bytes("abc"), as_bytes("ab")));
}

// The time equal_ct takes does not depend on where (or whether) the inputs
// differ. Measured on 4 KiB so that an early-exit comparison would differ by
// orders of magnitude; the bound is loose (x2) for a shared machine, and the
// same measurement of an early-exit comparison shows the method can tell.
namespace {
template <typename F>
double best_ns(F f, int rounds = 9, int iters = 2000) {
  double best = 1e18;
  for (int r = 0; r < rounds; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) f();
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters;
    best = std::min(best, ns);
  }
  return best;
}
}  // namespace

TEST(Bytes, EqualConstantTimeTakesTheSameTimeWhereverTheDifference) {
  std::vector<uint8_t> a(4096, 0x5a), same = a, first = a;
  first[0] ^= 1;
  volatile bool sink = false;
  double t_same = best_ns([&] { sink = equal_ct(a, same); });
  double t_first = best_ns([&] { sink = equal_ct(a, first); });
  EXPECT_GT(t_first / t_same, 0.5) << t_first << " ns vs " << t_same << " ns";
  EXPECT_LT(t_first / t_same, 2.0) << t_first << " ns vs " << t_same << " ns";
  // The control: a comparison that stops at the first difference (not
  // memcmp, which the sanitizers replace with a full scan).
  auto early_exit = [](const std::vector<uint8_t>& x, const std::vector<uint8_t>& y) {
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i] != y[i]) return false;
    return true;
  };
  double e_same = best_ns([&] { sink = early_exit(a, same); });
  double e_first = best_ns([&] { sink = early_exit(a, first); });
  EXPECT_LT(e_first / e_same, 0.5) << "early exit: " << e_first << " ns vs " << e_same << " ns";
  (void)sink;
}

TEST(ByteQueue, EmptyOwnsNothing) {
  ByteQueue q;
  EXPECT_TRUE(q.empty());
  EXPECT_TRUE(q.front().empty());
  EXPECT_EQ(sizeof(ByteQueue), 3 * sizeof(void*));
}

TEST(ByteQueue, RandomAppendPopMatchesReference) {
  std::mt19937 rng(7);
  ByteQueue q;
  std::vector<uint8_t> ref;
  uint8_t next = 0;
  for (int i = 0; i < 2000; ++i) {
    if (rng() % 2) {
      std::vector<uint8_t> d(rng() % 40000);
      for (auto& c : d) c = next++;
      q.append(d);
      ref.insert(ref.end(), d.begin(), d.end());
    } else if (!ref.empty()) {
      size_t n = rng() % (ref.size() + 1);
      q.pop(n);
      ref.erase(ref.begin(), ref.begin() + long(n));
    }
    ASSERT_EQ(q.size(), ref.size());
    if (!ref.empty()) {
      auto f = q.front();
      ASSERT_FALSE(f.empty());
      ASSERT_EQ(f[0], ref[0]);
    }
  }
  EXPECT_EQ(q.to_vector(), ref);
}

TEST(ByteQueue, FrontStaysValidAcrossAppend) {
  ByteQueue q;
  std::vector<uint8_t> a(100, 1), b(50000, 2);
  q.append(a);
  auto f = q.front();
  const uint8_t* p = f.data();
  q.append(b);
  EXPECT_EQ(q.front().data(), p);
  EXPECT_EQ(p[99], 1);
}

TEST(ByteQueue, PrepareCommit) {
  ByteQueue q;
  auto s = q.prepare(10);
  ASSERT_GE(s.size(), 1u);
  s[0] = 42;
  q.commit(1);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(q.front()[0], 42);
  std::span<const uint8_t> spans[4];
  EXPECT_EQ(q.front_spans(spans), 1u);
  q.pop(1);
  EXPECT_TRUE(q.empty());
}

TEST(ByteQueue, CopyAndMove) {
  ByteQueue q;
  q.append(as_bytes("hello"));
  ByteQueue c = q;
  ByteQueue m = std::move(q);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(c.to_vector(), m.to_vector());
  EXPECT_EQ(c.size(), 5u);
}
