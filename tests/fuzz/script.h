// Byte scripts: how the stateful fuzz targets read their input as a sequence
// of operations, and how the seed generator (seeds.cc) writes such inputs.
//
// Every byte string is a valid script: reading past the end gives zeros and
// empty spans, so libFuzzer mutates freely and a cut script just ends early.
// Integers are big-endian, as on the wire.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

namespace baton::fuzz {

// Aborts (a libFuzzer crash with the input saved) when a property is broken.
inline void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz: property broken: %s\n", what);
  std::abort();
}

class ScriptReader {
 public:
  explicit ScriptReader(std::span<const uint8_t> in) : in_(in) {}
  bool done() const { return in_.empty(); }
  uint8_t u8() { return uint8_t(take(1)); }
  uint16_t u16() { return uint16_t(take(2)); }
  uint32_t u32() { return uint32_t(take(4)); }
  uint64_t u64() { return take(8); }
  // Up to n bytes (fewer at the end of the script).
  std::span<const uint8_t> bytes(size_t n) {
    auto b = in_.first(n < in_.size() ? n : in_.size());
    in_ = in_.subspan(b.size());
    return b;
  }

 private:
  uint64_t take(size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) {
      v = v << 8 | (in_.empty() ? 0 : in_[0]);
      if (!in_.empty()) in_ = in_.subspan(1);
    }
    return v;
  }
  std::span<const uint8_t> in_;
};

class ScriptWriter {
 public:
  ScriptWriter& u8(uint8_t v) { return put(v, 1); }
  ScriptWriter& u16(uint16_t v) { return put(v, 2); }
  ScriptWriter& u32(uint32_t v) { return put(v, 4); }
  ScriptWriter& u64(uint64_t v) { return put(v, 8); }
  ScriptWriter& bytes(std::span<const uint8_t> b) {
    out_.insert(out_.end(), b.begin(), b.end());
    return *this;
  }
  const std::vector<uint8_t>& out() const { return out_; }

 private:
  ScriptWriter& put(uint64_t v, size_t n) {
    for (size_t i = n; i-- > 0;) out_.push_back(uint8_t(v >> (8 * i)));
    return *this;
  }
  std::vector<uint8_t> out_;
};

// mux_session_fuzz: byte 0 is a set of mode bits, then operations, each an
// op byte (taken modulo op_count) and its arguments.
namespace session_script {
constexpr uint8_t kServer = 0x01;           // the session under test is the server (else the client)
constexpr uint8_t kPair = 0x02;             // two honest sessions talk (else the script is the peer)
constexpr uint8_t kAutoAccept = 0x04;       // the handler accepts every stream the peer opens
constexpr uint8_t kAutoRead = 0x08;         // the handler consumes inbound bytes as they arrive
constexpr uint8_t kResetFromCallback = 0x10;  // the handler resets every third stream it hears of
constexpr uint8_t kSmallLimits = 0x20;      // 4 streams, 100-byte frames, 2 pings, 3 ping replies
constexpr uint8_t kCloseOnFin = 0x40;       // the handler half-closes a stream when the peer does
enum Op : uint8_t {
  feed = 0,      // u16 n, n raw bytes to consume() (solo) | u8 side, u16 n: deliver n wire bytes (pair)
  frame = 1,     // solo: u8 type, u8 flags, u8 stream, u32 length, u16 split: one frame in two consume() calls
  open = 2,      // [u8 side]
  accept = 3,    // [u8 side] u8 stream
  write = 4,     // [u8 side] u8 stream, u16 n
  close_write = 5,  // [u8 side] u8 stream
  reset = 6,     // [u8 side] u8 stream
  consumed = 7,  // [u8 side] u8 stream, u16 n
  set_window = 8,  // [u8 side] u8 stream, u32 window
  ping = 9,      // [u8 side]
  go_away = 10,  // [u8 side] u8 code
  drain = 11,    // solo: u16 n output bytes taken by the owner (0: all)
  take_inbound = 12,  // solo: u8 stream
  rebuild = 13,  // [u8 side]: take_state() into a new Session (what the handoff does)
  op_count = 14,
};
// `stream` bytes: below 0x80 pick an existing stream (index modulo the count);
// 0x80..0xef name the next id the peer may open (+0 right parity, +1 wrong);
// 0xf0..0xff are the raw ids 0..15.
constexpr uint8_t kNextRemote = 0x80;
constexpr uint8_t kRawId = 0xf0;
}  // namespace session_script

// tls_record_fuzz: byte 0 picks the suite (modulo 6), byte 1 the starting
// sequence number (low 2 bits: 0 -> 1, 1 -> 2^64-4, 2 -> a u64 that follows),
// then operations.
namespace record_script {
enum Op : uint8_t {
  raw = 0,      // u16 n, n bytes appended to the wire as they are
  seal = 1,     // u8 type, u16 n, u8 fill: the peer seals n plaintext bytes (fill 0: taken from the script)
  alert = 2,    // u8 level, u8 description: the peer seals an alert record
  deliver = 3,  // u16 n: the opener reads n wire bytes
  corrupt = 4,  // u16 position, u8 mask: flips bits of an undelivered wire byte
  rebuild = 5,  // take_state() into a new RecordLayer
  preload = 6,  // u16 n: n wire bytes go into the state's partial_input (bytes a handshake read past Finished)
  op_count = 7,
};
}  // namespace record_script

}  // namespace baton::fuzz
