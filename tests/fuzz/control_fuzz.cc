// libFuzzer target for the control message codec (src/mux/control.h,
// docs/protocol.md section 3). Byte 0 says what the rest of the input is:
//
//   even: the control stream. The bytes are queued on a ByteQueue in chunks
//     (sizes from byte 1, as frames would deliver them) and decoded message by
//     message the way Tunnel::on_control_data does: decode(queue), pop `used`,
//     until need_more or malformed. The span decoder, given the same bytes,
//     must agree at every step.
//   odd: a message to encode: its type and field values come from the
//     script, strings up to 70000 bytes (beyond what a u16 length holds).
//
// Properties, beyond "no crash, no leak, no undefined behaviour":
//   - a message takes 3..input bytes, need_more only for a truncated one,
//     malformed always names the problem and takes nothing;
//   - a decoded HELLO's client_id is at most 128 bytes of valid UTF-8;
//   - every decoded message of a known type re-encodes to bytes that decode
//     again and re-encode to the very same bytes (round trip);
//   - an encoder always writes exactly one well-formed message: integer
//     fields (and a HELLO's client_id) always whole, strings prefixes of the
//     values given, all equal when they fit.
//
// Build and run: tests/fuzz/run.sh SECONDS control. Seeds:
// tests/fuzz/corpus/control/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mux/control.h"
#include "script.h"
#include "util/byte_queue.h"
#include "util/text.h"

using namespace baton;
using fuzz::require;
using V = std::vector<uint8_t>;

namespace {

constexpr size_t kMaxFields = 0xffff;  // a message's fields fit a u16 length

template <typename M>
V encoded(const M& m) {
  V out;
  mux::encode(m, out);
  return out;
}

// Encodes whichever body the message holds (none for an unknown type).
V encode_any(const mux::ControlMessage& m) {
  if (m.hello) return encoded(*m.hello);
  if (m.welcome) return encoded(*m.welcome);
  if (m.reject) return encoded(*m.reject);
  if (m.drain) return encoded(*m.drain);
  return {};
}

mux::ControlMessage decode_whole(const V& bytes) {
  mux::ControlMessage m;
  mux::DecodeResult r = mux::decode(bytes, m);
  require(r.status == mux::DecodeStatus::message && r.used == bytes.size(), "an encoded message decodes whole");
  return m;
}

void round_trip(const mux::ControlMessage& m) {
  V e1 = encode_any(m);
  if (e1.empty()) return;
  require(encode_any(decode_whole(e1)) == e1, "encode(decode(encode(message))) == encode(message)");
}

void control_stream(fuzz::ScriptReader& r) {
  const uint8_t chunk_seed = r.u8();
  V all;
  util::ByteQueue q;
  for (size_t i = 0; !r.done(); ++i) {
    auto chunk = r.bytes(1 + (chunk_seed * (i + 1)) % 97);
    q.append(chunk);
    all.insert(all.end(), chunk.begin(), chunk.end());
  }
  std::span<const uint8_t> rest(all);
  while (true) {
    mux::ControlMessage from_queue, from_span;
    mux::DecodeResult a = mux::decode(q, from_queue);
    mux::DecodeResult b = mux::decode(rest, from_span);
    require(a.status == b.status && a.used == b.used, "queue and span decoders agree");
    require(encode_any(from_queue) == encode_any(from_span) && from_queue.type == from_span.type,
            "queue and span decoders read the same message");
    if (a.status == mux::DecodeStatus::need_more) {
      const bool truncated = rest.size() < 3 || rest.size() < 3 + size_t(rest[1] << 8 | rest[2]);
      require(a.used == 0 && truncated, "need_more only for a truncated message");
      return;
    }
    if (a.status == mux::DecodeStatus::malformed) {
      require(a.used == 0 && a.error && *a.error, "malformed takes nothing and says why");
      return;
    }
    require(a.used >= 3 && a.used <= rest.size(), "a message takes 3..input bytes");
    require(size_t(rest[1] << 8 | rest[2]) + 3 == a.used, "a message takes exactly its length");
    require(from_queue.type == rest[0], "the type is the first byte");
    if (from_queue.hello)
      require(from_queue.hello->client_id.size() <= 128 && util::valid_utf8(from_queue.hello->client_id),
              "client_id: <= 128 bytes of UTF-8");
    round_trip(from_queue);
    q.pop(a.used);
    rest = rest.subspan(a.used);
  }
}

// A string of `n` bytes: the script's next bytes, then a repeating pattern.
std::string text(fuzz::ScriptReader& r, size_t n) {
  auto head = r.bytes(std::min<size_t>(n, 16));
  std::string s(head.begin(), head.end());
  while (s.size() < n) s.push_back(char('a' + s.size() % 26));
  return s;
}
size_t length(fuzz::ScriptReader& r) {
  const uint8_t b = r.u8();
  return b < 0xf0 ? b : r.u32() % 70000;  // mostly short, sometimes beyond a message's room
}

bool is_prefix(const std::string& part, const std::string& whole) {
  return part.size() <= whole.size() && std::equal(part.begin(), part.end(), whole.begin());
}

void encoder(fuzz::ScriptReader& r) {
  V out;
  bool fits = false;
  mux::ControlMessage m;
  switch (r.u8() % 4) {
    case 0: {
      mux::Hello h;
      if (r.u8() & 1) h.version = r.u16();
      h.token = text(r, length(r));
      h.client_id = text(r, std::min<size_t>(length(r), 128));  // the encoder's precondition: <= 128 bytes...
      mux::encode(h, out);
      if (!util::valid_utf8(h.client_id)) {  // ...of UTF-8: else the decoder says the HELLO is malformed
        mux::ControlMessage bad;
        const mux::DecodeResult res = mux::decode(out, bad);
        require(res.status == mux::DecodeStatus::malformed && res.used == 0 && res.error,
                "a client_id that is not UTF-8 makes the HELLO malformed");
        return;
      }
      m = decode_whole(out);
      require(m.hello && m.hello->version == h.version && m.hello->client_id == h.client_id,
              "HELLO version and client_id survive");
      require(is_prefix(m.hello->token, h.token) && is_prefix(m.hello->client_id, h.client_id), "HELLO strings are cut, never changed");
      fits = 5 + 3 + h.token.size() + 3 + h.client_id.size() <= kMaxFields;
      if (fits) require(m.hello->token == h.token, "HELLO token survives when it fits");
      break;
    }
    case 1: {
      mux::Welcome w;
      for (auto& b : w.session_id) b = r.u8();
      w.server_id = text(r, length(r));
      w.heartbeat_ms = r.u32();
      const bool limits = r.u8() & 1;
      if (limits) {
        w.stream_open_rate = r.u32();
        w.stream_open_burst = r.u32();
        w.max_streams = r.u32();
      }
      mux::encode(w, out);
      m = decode_whole(out);
      require(m.welcome && m.welcome->session_id == w.session_id && m.welcome->heartbeat_ms == w.heartbeat_ms,
              "WELCOME session_id and heartbeat_ms survive");
      require(m.welcome->stream_open_rate == w.stream_open_rate && m.welcome->stream_open_burst == w.stream_open_burst &&
                  m.welcome->max_streams == w.max_streams,
              "WELCOME stream limits survive");
      require(is_prefix(m.welcome->server_id, w.server_id), "WELCOME server_id is cut, never changed");
      fits = 19 + 3 + w.server_id.size() + 7 + (limits ? 21 : 0) <= kMaxFields;
      if (fits) require(m.welcome->server_id == w.server_id, "WELCOME server_id survives when it fits");
      break;
    }
    case 2: {
      mux::Reject j;
      j.code = r.u16();
      j.reason = text(r, length(r));
      if (r.u8() & 1) j.retry_after_ms = r.u32();
      mux::encode(j, out);
      m = decode_whole(out);
      require(m.reject && m.reject->code == j.code && m.reject->retry_after_ms == j.retry_after_ms,
              "REJECT code and retry_after_ms survive");
      require(is_prefix(m.reject->reason, j.reason), "REJECT reason is cut, never changed");
      fits = 5 + 3 + j.reason.size() + 7 <= kMaxFields;
      if (fits) require(m.reject->reason == j.reason, "REJECT reason survives when it fits");
      break;
    }
    default: {
      mux::Drain d;
      d.reason = text(r, length(r));
      d.grace_ms = r.u32();
      d.reconnect_hint = text(r, length(r));
      mux::encode(d, out);
      m = decode_whole(out);
      require(m.drain && m.drain->grace_ms == d.grace_ms, "DRAIN grace_ms survives");
      require(is_prefix(m.drain->reason, d.reason) && is_prefix(m.drain->reconnect_hint, d.reconnect_hint),
              "DRAIN strings are cut, never changed");
      fits = 3 + d.reason.size() + 7 + 3 + d.reconnect_hint.size() <= kMaxFields;
      if (fits) require(m.drain->reason == d.reason && m.drain->reconnect_hint == d.reconnect_hint,
                        "DRAIN strings survive when they fit");
      break;
    }
  }
  require(out.size() <= 3 + kMaxFields, "an encoded message fits its u16 length");
  round_trip(m);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::ScriptReader r({data, size});
  if (r.u8() & 1) encoder(r);
  else control_stream(r);
  return 0;
}
