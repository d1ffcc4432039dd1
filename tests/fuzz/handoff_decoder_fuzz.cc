// libFuzzer target for the hot-restart codec (src/handoff/codec.h).
//
// The input goes to every decoder: as a whole message (header, then the body
// handed to the decoder its type names, with as many fake fds as the header
// announces), and as a bare body to each body decoder and to decode_tunnel.
// Properties, beyond "no crash, no leak, no undefined behaviour":
//   - whatever decodes re-encodes to bytes that decode again and re-encode to
//     the very same bytes (round trip);
//   - a batch that decodes claims every fd exactly once; one that fails
//     claims none;
//   - a tunnel state the codec accepts is safe to rebuild the protocol cores
//     from (RecordLayer, mux::Session) and drive for a few steps: the codec is
//     the only check between another process's bytes and those constructors.
//
// Build and run: tests/fuzz/run.sh [SECONDS]. Seed corpus:
// tests/fuzz/corpus/handoff_decoder/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "handoff/codec.h"
#include "mux/frame.h"
#include "mux/session.h"
#include "null_handler.h"
#include "tls/record.h"

using namespace baton;
using fuzz::NullHandler;
using V = std::vector<uint8_t>;

namespace {

void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "handoff fuzz: property broken: %s\n", what);
  std::abort();
}

// Receiver-side descriptor numbers (never real fds: nothing is closed).
const std::vector<int>& fake_fds() {
  static const std::vector<int> fds = [] {
    std::vector<int> v;
    for (int i = 0; i < int(handoff::kMaxFdsPerMessage); ++i) v.push_back(1000 + i);
    return v;
  }();
  return fds;
}

std::span<const uint8_t> body_of(const V& msg) {
  handoff::Header h;
  std::string err;
  require(handoff::parse_header(msg, h, err) == handoff::ParseStatus::ok, "encoded header parses");
  require(h.version == handoff::kProtocolVersion, "encoded header version");
  require(size_t(h.body_length) == msg.size() - handoff::kHeaderSize, "encoded body length");
  return std::span<const uint8_t>(msg).subspan(handoff::kHeaderSize);
}

void put_frame(V& out, mux::FrameType type, uint16_t flags, uint32_t id, uint32_t length) {
  uint8_t b[mux::kHeaderSize];
  mux::encode_header({mux::kVersion, uint8_t(type), flags, id, length}, b);
  out.insert(out.end(), b, b + sizeof b);
}

// Rebuilds the cores from an accepted state and drives them a little.
void exercise(proxy::TunnelState t) {
  static V scratch(tls::kScratchSize);
  NullHandler handler;
  mux::Session ses(std::move(t.session), handler);
  // A detached tunnel has no record state (no connection): the session alone.
  std::optional<tls::RecordLayer> rec;
  if (t.phase != proxy::LinkPhase::detached) rec.emplace(std::move(t.record));

  // Whatever partial_input holds is opened first (forged records fail to
  // authenticate, but framing and lengths are checked before that).
  for (int i = 0; rec && i < 4; ++i) {
    tls::Opened o = rec->open({}, scratch);
    if (o.status != tls::OpenStatus::data) break;
    if (!o.plaintext.empty()) (void)ses.consume(o.plaintext);
  }

  // Peer frames touching every stream: credit, one byte of data, then a ping.
  std::vector<uint32_t> ids;
  for (const auto& [id, s] : ses.state().streams) ids.push_back(id);
  V frames;
  for (uint32_t id : ids) {
    put_frame(frames, mux::FrameType::window_update, 0, id, 1);
    put_frame(frames, mux::FrameType::data, 0, id, 1);
    frames.push_back(0x5a);
  }
  put_frame(frames, mux::FrameType::ping, mux::flag::syn, 0, 7);
  (void)ses.consume(frames);

  // The owner's side: drain, write, half-close; open, ping, go away.
  static const V payload(100, 0x42);
  for (uint32_t id : ids) {
    ses.consumed(id, ses.inbound(id)->size());
    (void)ses.write(id, payload);
    ses.close_write(id);
  }
  (void)ses.open();
  (void)ses.ping(9, 1);
  ses.go_away(mux::GoAwayCode::normal);

  // Frames become records, as Link::flush does.
  if (!rec) return;
  while (!ses.output().empty() && !rec->state().close_notify_sent) {
    V chunk(std::min(ses.output().size(), tls::kMaxPlaintext));
    ses.output().peek(chunk);
    ses.output().pop(chunk.size());
    rec->seal(chunk);
  }
  rec->seal_alert(tls::alert::close_notify, false);
}

// Two properties the codec once lacked (found by this fuzzer): always checked now.
bool strict() { return true; }

// mux::SessionState::partial_input: fewer than 12 bytes, or a Data header
// that passed validation followed by less than its body, or the skip marker
// (exactly one header: Data, flags 0, stream 0, length > 0). mux::Session
// trusts it (a resumed header is not validated again), so the codec must
// refuse anything else.
bool partial_frame_ok(const mux::SessionState& s) {
  if (s.partial_input.size() < mux::kHeaderSize) return true;
  uint8_t b[mux::kHeaderSize];
  s.partial_input.peek(b);
  mux::FrameHeader h = mux::decode_header(b);
  if (h.version != mux::kVersion || h.type != uint8_t(mux::FrameType::data)) return false;
  if (h.stream_id == 0) return s.partial_input.size() == mux::kHeaderSize && h.flags == 0 && h.length > 0;
  return s.partial_input.size() - mux::kHeaderSize < h.length;
}

V encode_tunnel(const proxy::TunnelState& t) {
  V v;
  handoff::encode_tunnel(t, v);
  return v;
}

void fuzz_tunnel(std::span<const uint8_t> in) {
  proxy::TunnelState t;
  if (!handoff::decode_tunnel(in, t).empty()) return;
  V e1 = encode_tunnel(t);
  if (strict()) {
    require(handoff::encoded_size(t) >= e1.size(), "encoded_size is an upper bound");
    require(partial_frame_ok(t.session), "yamux partial_input is a frame a session can hold");
  }
  proxy::TunnelState t2;
  require(handoff::decode_tunnel(e1, t2).empty(), "decode(encode(tunnel))");
  require(encode_tunnel(t2) == e1, "encode(decode(encode(tunnel))) == encode(tunnel)");
  exercise(std::move(t2));
}

void fuzz_batch(std::span<const uint8_t> body, size_t nfds) {
  std::span<const int> fds(fake_fds().data(), nfds);
  handoff::Batch b;
  handoff::BatchResult r = handoff::decode_batch(body, fds, b);
  if (r.error != handoff::BatchError::none) {
    require(b.tunnels.empty(), "a refused batch hands out no state");
    require(!r.message.empty(), "a refused batch says why");
    return;
  }
  // Every fd claimed exactly once, in order of appearance.
  std::vector<int> claimed;
  for (const proxy::TunnelState& t : b.tunnels) {
    if (t.fd >= 0) claimed.push_back(t.fd);
    for (const proxy::BridgeState& br : t.bridges)
      if (br.fd >= 0) claimed.push_back(br.fd);
  }
  std::sort(claimed.begin(), claimed.end());
  require(claimed == std::vector<int>(fds.begin(), fds.end()), "every fd used exactly once");

  V m1;
  std::vector<int> f1;
  handoff::encode_batch(b, m1, f1);
  require(f1.size() == nfds, "re-encoded batch carries the same fds");
  handoff::Batch b2;
  require(handoff::decode_batch(body_of(m1), f1, b2).error == handoff::BatchError::none, "decode(encode(batch))");
  V m2;
  std::vector<int> f2;
  handoff::encode_batch(b2, m2, f2);
  require(m1 == m2 && f1 == f2, "encode(decode(encode(batch))) == encode(batch)");
}

// Body decoders of the small messages: decode, encode, decode, encode.
template <typename M, typename Decode, typename Encode>
void fuzz_small(std::span<const uint8_t> body, Decode decode, Encode encode) {
  M m;
  if (!decode(body, m).empty()) return;
  V e1;
  encode(m, e1);
  M m2;
  require(decode(body_of(e1), m2).empty(), "decode(encode(message))");
  V e2;
  encode(m2, e2);
  require(e1 == e2, "encode(decode(encode(message))) == encode(message)");
}

void fuzz_hello(std::span<const uint8_t> b) {
  fuzz_small<handoff::Hello>(b, handoff::decode_hello, handoff::encode_hello);
}
void fuzz_server_state(std::span<const uint8_t> b) {
  fuzz_small<handoff::ServerStateMsg>(b, handoff::decode_server_state, handoff::encode_server_state);
}
void fuzz_batch_ack(std::span<const uint8_t> b) {
  fuzz_small<handoff::BatchAck>(b, handoff::decode_batch_ack, handoff::encode_batch_ack);
}
void fuzz_commit(std::span<const uint8_t> b) {
  fuzz_small<handoff::Commit>(b, handoff::decode_commit, handoff::encode_commit);
}
void fuzz_reason(std::span<const uint8_t> b) {
  fuzz_small<std::string>(b, handoff::decode_reason,
                          [](const std::string& s, V& out) { handoff::encode_abort(s, out); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> in(data, size);

  // 1. A whole message, dispatched on its type as the handoff channel does.
  handoff::Header h;
  std::string err;
  if (handoff::parse_header(in, h, err) == handoff::ParseStatus::ok) {
    require(h.fd_count <= handoff::kMaxFdsPerMessage && h.body_length <= handoff::kMaxBody, "header limits");
    std::span<const uint8_t> rest = in.subspan(handoff::kHeaderSize);
    if (rest.size() >= h.body_length) {
      std::span<const uint8_t> body = rest.first(h.body_length);
      switch (h.type) {
        case handoff::MsgType::hello: fuzz_hello(body); break;
        case handoff::MsgType::server_state: fuzz_server_state(body); break;
        case handoff::MsgType::listening: break;
        case handoff::MsgType::batch: fuzz_batch(body, h.fd_count); break;
        case handoff::MsgType::batch_ack: fuzz_batch_ack(body); break;
        case handoff::MsgType::commit: fuzz_commit(body); break;
        case handoff::MsgType::abort:
        case handoff::MsgType::refuse: fuzz_reason(body); break;
      }
    }
    return 0;
  }

  // 2. A bare body, to every body decoder.
  fuzz_tunnel(in);
  for (size_t nfds : {0, 1, 2, 3, 5})
    if (nfds < fake_fds().size()) fuzz_batch(in, nfds);
  fuzz_hello(in);
  fuzz_server_state(in);
  fuzz_batch_ack(in);
  fuzz_commit(in);
  fuzz_reason(in);
  return 0;
}
