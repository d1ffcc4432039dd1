// GoogleTest's EXPECT_* and ADD_FAILURE for code shared between the unit
// tests and the fuzz targets (tests/common/handoff_world.h): under libFuzzer
// a failed expectation prints what it can and aborts, so the fuzzer saves the
// input as a crash. Include before the shared header, never with gtest.h.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace fuzz_expect {

class Failure {
 public:
  Failure(const char* file, int line, const char* what) { msg_ << file << ":" << line << ": " << what << " "; }
  [[noreturn]] ~Failure() {
    std::fprintf(stderr, "property broken: %s\n", msg_.str().c_str());
    std::abort();
  }
  template <class T>
  Failure& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }

 private:
  std::ostringstream msg_;
};

}  // namespace fuzz_expect

#define FUZZ_EXPECT_(cond, text) \
  if (cond) {                    \
  } else                         \
    ::fuzz_expect::Failure(__FILE__, __LINE__, text)
#define EXPECT_TRUE(c) FUZZ_EXPECT_((c), #c)
#define EXPECT_FALSE(c) FUZZ_EXPECT_(!(c), "!" #c)
#define EXPECT_EQ(a, b) FUZZ_EXPECT_((a) == (b), #a " == " #b)
#define EXPECT_NE(a, b) FUZZ_EXPECT_((a) != (b), #a " != " #b)
#define EXPECT_LE(a, b) FUZZ_EXPECT_((a) <= (b), #a " <= " #b)
#define EXPECT_GE(a, b) FUZZ_EXPECT_((a) >= (b), #a " >= " #b)
#define EXPECT_GT(a, b) FUZZ_EXPECT_((a) > (b), #a " > " #b)
#define ADD_FAILURE() ::fuzz_expect::Failure(__FILE__, __LINE__, "failure:")
