// yamux frame header codec (docs/protocol.md section 2). Pure functions, no state.
#pragma once

#include <cstdint>
#include <span>

namespace baton::mux {

constexpr size_t kHeaderSize = 12;
constexpr uint8_t kVersion = 0;
constexpr uint32_t kInitialWindow = 256 * 1024;

enum class FrameType : uint8_t { data = 0, window_update = 1, ping = 2, go_away = 3 };

namespace flag {
constexpr uint16_t syn = 0x1;
constexpr uint16_t ack = 0x2;
constexpr uint16_t fin = 0x4;
constexpr uint16_t rst = 0x8;
}  // namespace flag

enum class GoAwayCode : uint32_t { normal = 0, protocol_error = 1, internal_error = 2 };

struct FrameHeader {
  uint8_t version = kVersion;
  uint8_t type = 0;  // raw: may hold an unknown value after decode
  uint16_t flags = 0;
  uint32_t stream_id = 0;
  uint32_t length = 0;
};

// Writes exactly kHeaderSize bytes to out (out.size() >= kHeaderSize).
void encode_header(const FrameHeader& h, std::span<uint8_t> out);
// Reads kHeaderSize bytes from in (in.size() >= kHeaderSize). No validation.
FrameHeader decode_header(std::span<const uint8_t> in);

const char* to_str(FrameType t);

}  // namespace baton::mux
