// Control messages on stream 1 (docs/protocol.md section 3) and the route preamble
// (section 4). Pure codecs: no I/O, no state beyond the decoder's partial input.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "util/byte_queue.h"

namespace baton::mux {

enum class ControlType : uint8_t {
  hello = 0x01,
  welcome = 0x02,
  reject = 0x03,
  drain = 0x04,
  resumed = 0x05,   // session resume (docs/protocol.md 9)
  received = 0x06,  // session resume: receipt of the peer's session stream
};

namespace tag {
constexpr uint8_t version = 0x01;
constexpr uint8_t token = 0x02;
constexpr uint8_t client_id = 0x03;
constexpr uint8_t session_id = 0x05;
constexpr uint8_t server_id = 0x06;
constexpr uint8_t heartbeat_ms = 0x07;
constexpr uint8_t code = 0x09;
constexpr uint8_t reason = 0x0a;
constexpr uint8_t grace_ms = 0x0b;
constexpr uint8_t reconnect_hint = 0x0c;
constexpr uint8_t retry_after_ms = 0x0d;
// WELCOME, optional (an extension a version-1 client ignores): the server's
// limits on the client's data streams (docs/protocol.md 3 and 4).
constexpr uint8_t stream_open_rate = 0x0e;
constexpr uint8_t stream_open_burst = 0x0f;
constexpr uint8_t max_streams = 0x10;
// Session resume (docs/protocol.md 9), an extension a version-1 peer ignores.
constexpr uint8_t resume_capable = 0x11;
constexpr uint8_t resume_secret = 0x12;
constexpr uint8_t resume_window_ms = 0x13;
constexpr uint8_t resume_address = 0x14;
constexpr uint8_t resume_session_id = 0x15;
constexpr uint8_t received = 0x16;
constexpr uint8_t resume_refused = 0x17;
constexpr uint8_t resume_refused_code = 0x18;
}  // namespace tag

using SessionId = std::array<uint8_t, 16>;
using ResumeSecret = std::array<uint8_t, 32>;

// Why a server answered a resuming HELLO with a fresh session (docs/protocol.md 9.4).
enum class ResumeRefusedCode : uint16_t { unknown_session = 1, credentials = 2, offsets = 3, unavailable = 4 };

const char* to_str(ResumeRefusedCode c);  // unknown_session, credentials, offsets, unavailable

// A resuming HELLO's request: all three fields, or the HELLO is malformed.
struct ResumeRequest {
  SessionId session_id{};
  ResumeSecret secret{};
  uint64_t received = 0;  // bytes of the server's session stream the client received
};

enum class RejectCode : uint16_t { unsupported_version = 1, unauthorized = 2, overloaded = 3, draining = 4 };

struct Hello {
  std::optional<uint16_t> version;  // absent = malformed HELLO
  std::string token;                // bytes, may be empty
  std::string client_id;            // valid UTF-8 (decode checks it), <= 128 bytes; may hold control characters
  bool resume_capable = false;           // the client can resume this session
  std::optional<ResumeRequest> resume = std::nullopt;  // resume this session instead of starting one
};
// The strings of WELCOME, REJECT and DRAIN (server_id, reason,
// reconnect_hint) are decoded as sent, whatever the bytes: a receiver shows
// them only through util::printable() (baton connect does).
struct Welcome {
  std::array<uint8_t, 16> session_id{};
  std::string server_id;
  uint32_t heartbeat_ms = 0;
  // Optional (absent from an older server): streams the client may open per
  // second and at once (the server's token bucket), and data streams open at
  // once. Beyond them the server refuses a stream unprocessed (RST).
  std::optional<uint32_t> stream_open_rate = std::nullopt;
  std::optional<uint32_t> stream_open_burst = std::nullopt;
  std::optional<uint32_t> max_streams = std::nullopt;
  // Session resume (docs/protocol.md 9.2): present when the session is resumable.
  std::optional<ResumeSecret> resume_secret = std::nullopt;
  std::optional<uint32_t> resume_window_ms = std::nullopt;
  std::string resume_address{};  // empty = not sent
  // A resuming HELLO answered with this fresh session instead (9.4).
  std::optional<uint16_t> resume_refused_code = std::nullopt;
  std::string resume_refused{};  // why; sent with the code
};
// The session resumed (docs/protocol.md 9.4).
struct Resumed {
  uint64_t received = 0;  // bytes of the client's session stream the server received
  ResumeSecret secret{};  // for the next resume
  uint32_t window_ms = 0;
};
// Receipt of the peer's session stream (docs/protocol.md 9.1).
struct Received {
  uint64_t received = 0;
};
struct Reject {
  uint16_t code = 0;
  std::string reason;
  std::optional<uint32_t> retry_after_ms;
};
struct Drain {
  std::string reason;
  uint32_t grace_ms = 0;
  std::string reconnect_hint;  // empty = not sent
};

// Encoders append one whole message to out. Precondition for HELLO:
// client_id is valid UTF-8 (else the server refuses the HELLO as malformed). Fields go out in the order of the
// table in docs/protocol.md section 3; Hello.version, Reject.retry_after_ms,
// the optional Welcome limits and Drain.reconnect_hint are omitted when absent/empty, token, client_id, reason
// and server_id are always sent (possibly empty). Precondition: all fields fit
// the u16 message length (client_id <= 128 bytes, the strings short); if they
// do not, string values are cut so that the output stays well formed and
// every integer field still goes out whole.
void encode(const Hello& m, std::vector<uint8_t>& out);
void encode(const Welcome& m, std::vector<uint8_t>& out);
void encode(const Reject& m, std::vector<uint8_t>& out);
void encode(const Drain& m, std::vector<uint8_t>& out);
void encode(const Resumed& m, std::vector<uint8_t>& out);
void encode(const Received& m, std::vector<uint8_t>& out);

// One decoded message. Unknown message types come back with type set and no body
// (the caller ignores them); unknown field tags are skipped.
struct ControlMessage {
  uint8_t type = 0;
  std::optional<Hello> hello;
  std::optional<Welcome> welcome;
  std::optional<Reject> reject;
  std::optional<Drain> drain;
  std::optional<Resumed> resumed;
  std::optional<Received> received;
};

enum class DecodeStatus : uint8_t {
  message = 0,     // *msg is filled, `used` bytes were taken
  need_more = 1,   // not a whole message yet; nothing taken
  malformed = 2,   // a known field has the wrong size, client_id > 128 bytes or not valid UTF-8, or fields overrun the message
};

const char* to_str(DecodeStatus s);

struct DecodeResult {
  DecodeStatus status = DecodeStatus::need_more;
  size_t used = 0;
  const char* error = nullptr;  // static text when malformed
};

// Decodes at most one message from the front of `in`.
[[nodiscard]] DecodeResult decode(std::span<const uint8_t> in, ControlMessage& msg);
// The same for the bytes queued on a stream (nothing is taken from `in`; the
// caller pops `used`). Copies out the front message only, so working through
// a queue of many small messages costs time linear in its size.
[[nodiscard]] DecodeResult decode(const util::ByteQueue& in, ControlMessage& msg);

// Route preamble: length u8 (1..255) | name (ASCII).
enum class PreambleStatus : uint8_t { route = 0, need_more = 1, malformed = 2 };
const char* to_str(PreambleStatus s);
struct PreambleResult {
  PreambleStatus status = PreambleStatus::need_more;
  size_t used = 0;  // 1 + name length when status == route, else 0
  std::string route;
};
// Malformed: length 0, or a byte outside printable ASCII (0x21..0x7e). A
// truncated preamble is need_more even if the bytes so far are already bad.
[[nodiscard]] PreambleResult decode_preamble(std::span<const uint8_t> in);
// Precondition: route is 1..255 printable ASCII bytes (longer names are cut to 255).
void encode_preamble(const std::string& route, std::vector<uint8_t>& out);

}  // namespace baton::mux
