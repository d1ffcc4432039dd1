// Big-endian loads and stores, and small byte-span helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace baton::util {

using Bytes = std::span<const uint8_t>;
using MutBytes = std::span<uint8_t>;

inline uint16_t load_u16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}
inline uint64_t load_u64(const uint8_t* p) { return uint64_t(load_u32(p)) << 32 | load_u32(p + 4); }

inline void store_u16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v >> 8); p[1] = uint8_t(v); }
inline void store_u32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24); p[1] = uint8_t(v >> 16); p[2] = uint8_t(v >> 8); p[3] = uint8_t(v);
}
inline void store_u64(uint8_t* p, uint64_t v) { store_u32(p, uint32_t(v >> 32)); store_u32(p + 4, uint32_t(v)); }

inline Bytes as_bytes(std::string_view s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }
inline std::string_view as_chars(Bytes b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }

// Lower-case hex of `b`.
std::string to_hex(Bytes b);
// Parses exactly 2*out.size() hex digits (either case) into out; false on any bad digit or length.
[[nodiscard]] bool from_hex(std::string_view hex, MutBytes out);

// Constant-time equality of two equal-length spans (false if lengths differ).
[[nodiscard]] bool equal_ct(Bytes a, Bytes b);

}  // namespace baton::util
