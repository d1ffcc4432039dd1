// The hot-restart codec: the messages two baton processes exchange over the
// handoff socket and the tunnel state they carry (docs/hot-restart.md).
//
// Sans-IO (ARCHITECTURE principles 1 and 8): bytes in, messages out, and the
// reverse. File descriptors never appear in the bytes; a message says how
// many ride with it (SCM_RIGHTS on its first byte) and the tunnel state
// refers to them by index. Every decoder bounds every length before it
// allocates and refuses malformed input with an error, never a crash.
//
// Message: magic "BTNH" u32 | protocol version u16 | type u8 | fd count u8 |
//          body length u32 | body. All integers big-endian.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "proxy/metrics.h"
#include "proxy/state.h"
#include "tls/ticket_key.h"

namespace baton::handoff {

constexpr uint32_t kMagic = 0x42544e48;  // "BTNH"
constexpr uint16_t kProtocolVersion = 1;
// Versions of the tunnel state layout this build writes and reads. Version 2
// adds the peer stream ids spent out of order (mux::SessionState::
// remote_ids_ahead); a version-1 reader gets the highest spent id instead,
// every lower one counting as spent.
// Version 3 adds session resume (docs/protocol.md 9): each tunnel's resume
// state (credential, identity, offsets, kept bytes), and detached tunnels
// (no socket, no record state). An older reader gets no resume state (its
// sessions are not resumable) and no detached tunnel (they stay behind).
constexpr uint16_t kStateVersion = 3;
constexpr uint16_t kStateVersionResume = 3;
constexpr uint16_t kMinStateVersion = 1;
constexpr size_t kHeaderSize = 12;
constexpr size_t kMaxFdsPerMessage = 253;  // SCM_MAX_FD
constexpr uint32_t kMaxBody = 256u << 20;   // a batch of tunnels with their buffered bytes

enum class MsgType : uint8_t {
  hello = 1,         // new -> old: who I am, which state versions I read
  server_state = 2,  // old -> new: epoch, counters, ticket keys; the listener rides along
  listening = 3,     // new -> old: I accept on the listener now; you may stop
  batch = 4,         // old -> new: tunnels (state + fds)
  batch_ack = 5,     // new -> old: how many of the batch I adopted (the rest: why not)
  commit = 6,        // old -> new: I released everything acknowledged; start I/O
  abort = 7,         // either way: the handoff is off (reason)
  refuse = 8,        // reply to a message that cannot be handled (unknown type/version)
};
const char* to_str(MsgType t);

struct Hello {
  uint32_t pid = 0;
  uint16_t min_state_version = kMinStateVersion;
  uint16_t max_state_version = kStateVersion;
};

struct ServerStateMsg {
  uint32_t pid = 0;
  uint64_t epoch = 0;                 // the old process's restart epoch
  proxy::Metrics metrics;             // counters continue in the new process
  std::vector<tls::TicketKey> ticket_keys;
  bool has_listener = false;          // one fd rides with the message
};

struct BatchAck {
  uint32_t seq = 0;
  uint32_t adopted = 0;  // the first `adopted` tunnels of the batch; the rest were not taken
  std::string reason;    // why the rest were not taken
};

struct Commit {
  proxy::Metrics metrics;  // the old process's counters at the end
};

// A decoded message header.
struct Header {
  uint16_t version = 0;
  MsgType type{};
  uint8_t fd_count = 0;
  uint32_t body_length = 0;
};

enum class ParseStatus : uint8_t { ok = 0, need_more = 1, malformed = 2 };

// Parses a header from the front of `in` (needs kHeaderSize bytes). Checks the
// magic and the body limit; an unknown version or type parses fine (the
// caller refuses it explicitly).
[[nodiscard]] ParseStatus parse_header(std::span<const uint8_t> in, Header& out, std::string& error);

// Whole messages (header included), appended to `out`.
void encode_hello(const Hello& m, std::vector<uint8_t>& out);
void encode_server_state(const ServerStateMsg& m, std::vector<uint8_t>& out);
void encode_listening(std::vector<uint8_t>& out);
void encode_batch_ack(const BatchAck& m, std::vector<uint8_t>& out);
void encode_commit(const Commit& m, std::vector<uint8_t>& out);
void encode_abort(const std::string& reason, std::vector<uint8_t>& out);
void encode_refuse(const std::string& reason, std::vector<uint8_t>& out);

// Bodies. Each returns "" or what is wrong.
[[nodiscard]] std::string decode_hello(std::span<const uint8_t> body, Hello& out);
[[nodiscard]] std::string decode_server_state(std::span<const uint8_t> body, ServerStateMsg& out);
[[nodiscard]] std::string decode_batch_ack(std::span<const uint8_t> body, BatchAck& out);
[[nodiscard]] std::string decode_commit(std::span<const uint8_t> body, Commit& out);
[[nodiscard]] std::string decode_reason(std::span<const uint8_t> body, std::string& out);  // abort, refuse
// The reason an abort or refuse gives; "" when its body does not decode.
std::string reason_of(std::span<const uint8_t> body);

// A batch: seq, state version, tunnels. The tunnels' fds are numbered in
// the order they appear (client fd, then each relaying bridge's upstream fd);
// `fds` receives them in that order, to send with the message. The states'
// fds are left in place (the sender still owns them until the commit).
struct Batch {
  uint32_t seq = 0;
  uint16_t state_version = kStateVersion;
  std::vector<proxy::TunnelState> tunnels;
};
// Number of fds a tunnel needs in a batch.
size_t fd_count(const proxy::TunnelState& t);
// Encoded size of one tunnel (for batching by size): never less than the real size.
size_t encoded_size(const proxy::TunnelState& t);
// Precondition: the tunnels hold at most kMaxFdsPerMessage fds in all.
// `version_override` (tests only): the state version written in the message.
void encode_batch(const Batch& b, std::vector<uint8_t>& out, std::vector<int>& fds, uint16_t version_override = 0);

enum class BatchError : uint8_t { none = 0, malformed = 1, unknown_version = 2 };
struct BatchResult {
  BatchError error = BatchError::none;
  std::string message;
};
// Decodes a batch body; `fds` are the descriptors that came with it. On
// success each tunnel's fds are set from `fds` (every fd used exactly once;
// a count mismatch is malformed). On failure `out.tunnels` is empty and the
// caller still owns (and closes) every fd.
[[nodiscard]] BatchResult decode_batch(std::span<const uint8_t> body, std::span<const int> fds, Batch& out);

// One tunnel alone (unit tests and the fuzzer). fds are indices, not real.
// `version`: kMinStateVersion..kStateVersion.
void encode_tunnel(const proxy::TunnelState& t, std::vector<uint8_t>& out, uint16_t version = kStateVersion);
[[nodiscard]] std::string decode_tunnel(std::span<const uint8_t> in, proxy::TunnelState& out,
                                        uint16_t version = kStateVersion);

}  // namespace baton::handoff
