// libFuzzer target for the yamux frame header codec (src/mux/frame.h) and the
// header rules of docs/protocol.md section 2 as a fresh Session applies them.
//
// The input is read as consecutive 12-byte headers. For each:
//   - decode_header reads the fields big-endian, independently recomputed
//     here, and encode_header gives back the very same 12 bytes;
//   - a fresh client and a fresh server Session, fed that header (and as much
//     of a Data body as follows in the input), report a protocol error exactly when the header
//     breaks a rule a first frame can break (version, type, stream 0 only for
//     Ping and Go Away, SYN parity, the initial window) and otherwise do what
//     the frame asks: answer a Ping, note a Go Away, open a stream.
//
// Build and run: tests/fuzz/run.sh SECONDS mux_frame. Seeds:
// tests/fuzz/corpus/mux_frame/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "mux/frame.h"
#include "mux/session.h"
#include "null_handler.h"
#include "script.h"

using namespace baton;
using fuzz::NullHandler;
using fuzz::require;

namespace {

uint64_t be(std::span<const uint8_t> b) {
  uint64_t v = 0;
  for (uint8_t x : b) v = v << 8 | x;
  return v;
}

// Whether a fresh session must refuse `h` as its first frame.
bool breaks_a_rule(mux::Role role, const mux::FrameHeader& h) {
  if (h.version != mux::kVersion || h.type > uint8_t(mux::FrameType::go_away)) return true;
  const bool stream_frame = h.type <= uint8_t(mux::FrameType::window_update);
  if (stream_frame != (h.stream_id != 0)) return true;
  if (!stream_frame || !(h.flags & mux::flag::syn)) return false;
  const bool remote_parity = (h.stream_id & 1) == (role == mux::Role::server ? 1u : 0u);
  if (!remote_parity) return true;
  if (h.type == uint8_t(mux::FrameType::window_update))
    return h.length > std::numeric_limits<uint32_t>::max() - mux::kInitialWindow;
  return h.length > mux::kInitialWindow;
}

void check_session(mux::Role role, const mux::FrameHeader& h, std::span<const uint8_t> frame) {
  NullHandler handler;
  mux::Session s(role, handler);
  mux::ConsumeResult r = s.consume(frame);
  const bool error = breaks_a_rule(role, h);
  require((r.status == mux::ConsumeStatus::protocol_error) == error, "a first frame fails exactly when it breaks a rule");
  if (error) return;
  std::vector<uint8_t> out = s.output().to_vector();
  switch (mux::FrameType(h.type)) {
    case mux::FrameType::ping:
      if (h.flags & mux::flag::syn) {
        std::vector<uint8_t> ack(mux::kHeaderSize);
        mux::encode_header({mux::kVersion, uint8_t(mux::FrameType::ping), mux::flag::ack, 0, h.length}, ack);
        require(out == ack, "a Ping SYN is answered by a Ping ACK with its value");
      } else {
        require(out.empty(), "an unexpected Ping ACK is ignored");
      }
      break;
    case mux::FrameType::go_away:
      require(s.go_away_received() && s.state().go_away_code == mux::GoAwayCode(h.length) && out.empty(),
              "a Go Away is noted with its code");
      break;
    case mux::FrameType::window_update:
      if (h.flags & mux::flag::syn)
        require(s.has_stream(h.stream_id) == !(h.flags & mux::flag::rst), "a Window Update SYN opens the stream");
      else
        require(!s.has_stream(h.stream_id) && out.empty(), "a Window Update for an unknown stream is ignored");
      break;
    case mux::FrameType::data:
      if (!(h.flags & mux::flag::syn)) require(s.stream_count() == 0 && out.empty(), "Data for an unknown stream is dropped");
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> in(data, size);
  for (size_t off = 0; off + mux::kHeaderSize <= in.size(); off += mux::kHeaderSize) {
    std::span<const uint8_t> b = in.subspan(off, mux::kHeaderSize);
    mux::FrameHeader h = mux::decode_header(b);
    require(h.version == b[0] && h.type == b[1] && h.flags == be(b.subspan(2, 2)) &&
                h.stream_id == be(b.subspan(4, 4)) && h.length == be(b.subspan(8, 4)),
            "decode_header reads the fields big-endian");
    uint8_t again[mux::kHeaderSize];
    mux::encode_header(h, again);
    require(std::equal(b.begin(), b.end(), again), "encode_header(decode_header(b)) == b");
    require(mux::to_str(mux::FrameType(h.type)) != nullptr, "to_str names every type");
    // The frame alone: its header and as much of a Data body as the input holds.
    size_t body = h.type == uint8_t(mux::FrameType::data) ? h.length : 0;
    std::span<const uint8_t> frame = in.subspan(off, std::min(in.size() - off, mux::kHeaderSize + body));
    check_session(mux::Role::client, h, frame);
    check_session(mux::Role::server, h, frame);
  }
  return 0;
}
