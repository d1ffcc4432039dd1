#include "mux/frame.h"

#include "util/bytes.h"

namespace baton::mux {

void encode_header(const FrameHeader& h, std::span<uint8_t> out) {
  out[0] = h.version;
  out[1] = h.type;
  util::store_u16(&out[2], h.flags);
  util::store_u32(&out[4], h.stream_id);
  util::store_u32(&out[8], h.length);
}

FrameHeader decode_header(std::span<const uint8_t> in) {
  FrameHeader h;
  h.version = in[0];
  h.type = in[1];
  h.flags = util::load_u16(&in[2]);
  h.stream_id = util::load_u32(&in[4]);
  h.length = util::load_u32(&in[8]);
  return h;
}

const char* to_str(FrameType t) {
  switch (t) {
    case FrameType::data: return "data";
    case FrameType::window_update: return "window_update";
    case FrameType::ping: return "ping";
    case FrameType::go_away: return "go_away";
  }
  return "unknown";
}

}  // namespace baton::mux
