// libFuzzer target for the yamux session (src/mux/session.h), driven by a
// byte script (tests/fuzz/script.h, session_script) in one of two modes:
//
//   solo: the script is the peer of one Session (client or server role): it
//     feeds arbitrary bytes in chunks it chooses, or well-formed frames cut
//     in two, and it is also the owner: open, accept, write, close_write,
//     reset, consumed, set_recv_window, ping, go_away, taking output, taking
//     inbound bytes, rebuilding the session from its exported state;
//   pair: a client and a server Session, honest owners on both sides, joined
//     by two wires whose delivery the script paces. Output is taken after
//     every call, as Link::flush does.
//
// Properties, beyond "no crash, no leak, no undefined behaviour":
//   - every callback matches the state: opened/data/fin/writable/closed name
//     a live stream in the right phase (writable: ACKed or with credit),
//     reset/refused one that is gone;
//   - per stream, recv_window + inbound + unreturned credit is the window the
//     session granted: it never buffers more than it allowed the peer to send;
//     streams <= max_streams, pings <= max_pending_pings, a partial frame is
//     never bigger than the largest window granted;
//   - a protocol error is reported with a reason, leaves Go Away(1) as the
//     last frame of output and a dead session that ignores further input;
//   - one consume() writes at most its input plus two frames (the peer cannot
//     make the session amplify), not counting what the handler's own calls add;
//   - output parses as yamux: version 0, known types, stream 0 only for Ping
//     and Go Away, Data no longer than max_frame_data, SYNs of our parity in
//     increasing order; nothing after the Go Away(1) of a failed session;
//   - pair: neither side ever sees a protocol error, bytes arrive intact and
//     in order, and once the wires are empty everything written was received.
//
// Build and run: tests/fuzz/run.sh SECONDS mux_session. Seeds:
// tests/fuzz/corpus/mux_session/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "mux/frame.h"
#include "mux/session.h"
#include "script.h"

using namespace baton;
using fuzz::require;
namespace ss = fuzz::session_script;
using V = std::vector<uint8_t>;

namespace {

constexpr size_t kMaxDataFrame = 300000;  // above the initial window, so window violations are reachable

uint8_t pattern(bool from_server, uint32_t id, uint64_t off) {
  return uint8_t(off * 131 + id * 7 + (from_server ? 97 : 0) + (off >> 9));
}

mux::SessionLimits limits_of(uint8_t mode) {
  mux::SessionLimits l;
  if (mode & ss::kSmallLimits) {
    l.max_streams = 4;
    l.max_frame_data = 100;
    l.max_pending_pings = 2;
    l.max_ping_replies = 3;
  }
  return l;
}

bool is_local_id(mux::Role role, uint32_t id) { return (id & 1) == (role == mux::Role::client ? 1u : 0u); }

// Parses what a session writes, frame by frame, across arbitrary cuts.
class OutputChecker {
 public:
  OutputChecker(mux::Role role, const mux::SessionLimits& limits) : role_(role), limits_(limits) {}

  void take(std::span<const uint8_t> bytes) {
    buf_.insert(buf_.end(), bytes.begin(), bytes.end());
    size_t off = 0;
    while (buf_.size() - off >= mux::kHeaderSize) {
      mux::FrameHeader h = mux::decode_header(std::span(buf_).subspan(off));
      const bool data = h.type == uint8_t(mux::FrameType::data);
      if (data && buf_.size() - off - mux::kHeaderSize < h.length) break;
      require(h.version == mux::kVersion, "output: yamux version 0");
      require(h.type <= uint8_t(mux::FrameType::go_away), "output: known frame type");
      const bool stream_frame = data || h.type == uint8_t(mux::FrameType::window_update);
      require(stream_frame == (h.stream_id != 0), "output: stream 0 only for Ping and Go Away");
      if (data) require(h.length > 0 && h.length <= std::max<uint32_t>(limits_.max_frame_data, 1),
                        "output: Data frames of 1..max_frame_data bytes");
      if (stream_frame && (h.flags & mux::flag::syn)) {
        require(is_local_id(role_, h.stream_id), "output: SYN only for our own ids");
        require(h.stream_id > last_syn_, "output: SYN ids increase");
        last_syn_ = h.stream_id;
      }
      off += mux::kHeaderSize + (data ? h.length : 0);
    }
    buf_.erase(buf_.begin(), buf_.begin() + ptrdiff_t(off));
  }

 private:
  mux::Role role_;
  mux::SessionLimits limits_;
  V buf_;
  uint32_t last_syn_ = 0;
};

struct Flow {
  uint64_t written = 0;  // bytes this side wrote on the stream
  uint64_t read = 0;     // bytes this side consumed from it
};

// One side: the Session, the handler that checks its callbacks, and what its
// owner keeps track of.
class Endpoint : public mux::SessionHandler {
 public:
  Endpoint(mux::Role role, uint8_t mode, bool check_data)
      : role_(role), mode_(mode), check_data_(check_data), limits_(limits_of(mode)),
        s_(std::make_unique<mux::Session>(role, *this, limits_)), out_(role, limits_) {}
  // The session holds a reference to its handler: an Endpoint stays where it was built.
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  mux::Session& s() { return *s_; }
  bool server() const { return role_ == mux::Role::server; }
  std::map<uint32_t, Flow> flows;

  // A stream id from a script byte (see session_script).
  uint32_t pick(uint8_t b) const {
    const auto& streams = s_->state().streams;
    if (b < ss::kNextRemote && !streams.empty()) {
      auto it = streams.begin();
      std::advance(it, b % streams.size());
      return it->first;
    }
    if (b >= ss::kRawId || b < ss::kNextRemote) return b & 0x0f;
    uint32_t next = uint32_t(s_->state().remote_next_id);
    return next + (b & 3);  // next, wrong parity, one ahead (out of order), wrong parity
  }

  mux::ConsumeResult consume(std::span<const uint8_t> in) {
    const size_t before = s_->output().size();
    const bool was_failed = s_->failed();
    reaction_bytes_ = 0;
    mux::ConsumeResult r = s_->consume(in);
    const size_t grown = s_->output().size() - before - reaction_bytes_;
    require(grown <= in.size() + 2 * mux::kHeaderSize, "consume() writes at most its input plus two frames");
    if (was_failed) {
      require(r.status == mux::ConsumeStatus::already_failed && grown == 0, "a failed session ignores input");
    } else if (r.status == mux::ConsumeStatus::protocol_error) {
      require(s_->failed() && s_->go_away_sent() && r.error && *r.error, "a protocol error kills the session, with a reason");
      V out = s_->output().to_vector();
      uint8_t go_away[mux::kHeaderSize];
      mux::encode_header({mux::kVersion, uint8_t(mux::FrameType::go_away), 0, 0,
                          uint32_t(mux::GoAwayCode::protocol_error)}, go_away);
      require(out.size() >= sizeof go_away && std::equal(go_away, go_away + sizeof go_away, out.end() - sizeof go_away),
              "a protocol error ends the output with Go Away(1)");
      output_at_failure_ = out.size();
    } else {
      require(r.status == mux::ConsumeStatus::ok && !s_->failed(), "consume() is ok or a protocol error");
    }
    return r;
  }

  // The owner reads up to n inbound bytes of a stream (checking them in pair mode).
  void read(uint32_t id, size_t n) {
    const util::ByteQueue* in = s_->inbound(id);
    require(in != nullptr, "inbound() is never null");
    V got(std::min(n, in->size()));
    in->peek(got);
    Flow& f = flows[id];
    if (check_data_)
      for (size_t i = 0; i < got.size(); ++i)
        require(got[i] == pattern(!server(), id, f.read + i), "bytes arrive intact and in order");
    f.read += got.size();
    s_->consumed(id, got.size());
  }

  void write(uint32_t id, size_t n) {
    Flow& f = flows[id];
    V data(n);
    for (size_t i = 0; i < n; ++i) data[i] = pattern(server(), id, f.written + i);
    const size_t before = s_->send_window(id);
    const size_t taken = s_->write(id, data);
    require(taken <= before && taken <= n, "write() stays within the send window");
    f.written += taken;
  }

  void set_window(uint32_t id, uint32_t w) {
    s_->set_recv_window(id, w);
    max_window_ = std::max<uint64_t>(max_window_, w);
  }
  void take_inbound(uint32_t id) {
    took_inbound_ = true;
    (void)s_->take_inbound(id);
  }
  void rebuild() { s_ = std::make_unique<mux::Session>(s_->take_state(), *this, limits_); }

  // Hands the output to the checker; n == 0: all of it.
  V take_output(size_t n = 0) {
    V v(n == 0 ? s_->output().size() : std::min(n, s_->output().size()));
    s_->output().peek(v);
    s_->output().pop(v.size());
    out_.take(v);
    output_at_failure_ -= std::min(output_at_failure_, v.size());
    return v;
  }

  void check_state() const {
    const mux::SessionState& st = s_->state();
    require(st.streams.size() <= limits_.max_streams, "streams <= max_streams");
    require(st.pings.size() <= limits_.max_pending_pings, "pings <= max_pending_pings");
    require(!st.failed || st.partial_input.empty(), "a failed session keeps no partial frame");
    require(!st.failed || st.output.size() <= output_at_failure_, "nothing follows the Go Away(1) of a failure");
    require(st.partial_input.size() <= mux::kHeaderSize + max_window_, "a partial frame fits the largest window");
    for (const auto& [id, x] : st.streams) {
      require(x.id == id, "stream key == stream id");
      const uint64_t sum = uint64_t(x.recv_window) + x.inbound.size() + x.unacked_credit;
      require(took_inbound_ ? sum <= x.recv_window_max : sum == x.recv_window_max,
              "recv_window + inbound + unreturned credit == the window granted");
    }
  }

  // --- SessionHandler: every event checked against the state.
  void on_stream_opened(uint32_t id) override {
    const mux::StreamState* st = stream(id);
    require(st && st->phase == mux::StreamPhase::awaiting_accept && !is_local_id(role_, id),
            "on_stream_opened: a peer's stream awaiting accept");
    if ((mode_ & ss::kResetFromCallback) && id % 3 == 0) return react([&] { s_->reset(id); });
    if (mode_ & ss::kAutoAccept) react([&] { s_->accept(id); });
  }
  void on_stream_data(uint32_t id) override {
    const mux::StreamState* st = stream(id);
    require(st && !st->inbound.empty(), "on_stream_data: a live stream with inbound bytes");
    if ((mode_ & ss::kResetFromCallback) && id % 3 == 1) return react([&] { s_->reset(id); });
    if (mode_ & ss::kAutoRead) react([&] { read(id, SIZE_MAX); });
  }
  void on_stream_fin(uint32_t id) override {
    const mux::StreamState* st = stream(id);
    require(st && st->remote_fin, "on_stream_fin: a live stream, remote_fin set");
    if (mode_ & ss::kCloseOnFin) react([&] { s_->close_write(id); });
  }
  void on_stream_reset(uint32_t id) override { require(!s_->has_stream(id), "on_stream_reset: the stream is gone"); }
  void on_stream_writable(uint32_t id) override {
    const mux::StreamState* st = stream(id);
    // Data may flow before the ACK: writable means credit, not an ACK.
    require(st && (st->send_window > 0 || st->phase != mux::StreamPhase::awaiting_ack),
            "on_stream_writable: a live stream, ACKed or with credit");
  }
  void on_stream_closed(uint32_t id) override {
    const mux::StreamState* st = stream(id);
    require(st && st->local_fin && st->remote_fin && st->inbound.empty(),
            "on_stream_closed: FIN both ways, inbound drained");
  }
  void on_stream_refused(uint32_t id, bool) override {
    require(!s_->has_stream(id), "on_stream_refused: no stream ever existed");
  }
  void on_go_away(mux::GoAwayCode) override { require(s_->go_away_received(), "on_go_away: go_away_received"); }

 private:
  const mux::StreamState* stream(uint32_t id) const {
    auto it = s_->state().streams.find(id);
    return it == s_->state().streams.end() ? nullptr : &it->second;
  }
  // Runs an owner call from inside a callback; its output does not count
  // against consume()'s amplification bound.
  template <typename F>
  void react(F f) {
    const size_t before = s_->output().size();
    f();
    reaction_bytes_ += s_->output().size() - before;
  }

  mux::Role role_;
  uint8_t mode_;
  bool check_data_;
  mux::SessionLimits limits_;
  std::unique_ptr<mux::Session> s_;
  OutputChecker out_;
  size_t reaction_bytes_ = 0;
  uint64_t max_window_ = mux::kInitialWindow;
  bool took_inbound_ = false;
  size_t output_at_failure_ = 0;  // output bytes up to the Go Away(1), while not taken
};

// The owner operations both modes share. False if `op` is not one of them.
bool owner_op(uint8_t op, Endpoint& ep, fuzz::ScriptReader& r, uint32_t& ping_value) {
  switch (op) {
    case ss::open: (void)ep.s().open(); return true;
    case ss::accept: ep.s().accept(ep.pick(r.u8())); return true;
    case ss::write: {
      uint32_t id = ep.pick(r.u8());
      ep.write(id, r.u16());
      return true;
    }
    case ss::close_write: ep.s().close_write(ep.pick(r.u8())); return true;
    case ss::reset: ep.s().reset(ep.pick(r.u8())); return true;
    case ss::consumed: {
      uint32_t id = ep.pick(r.u8());
      ep.read(id, r.u16());
      return true;
    }
    case ss::set_window: {
      uint32_t id = ep.pick(r.u8());
      ep.set_window(id, r.u32());
      return true;
    }
    case ss::ping:
      ++ping_value;
      (void)ep.s().ping(ping_value, ping_value);
      return true;
    case ss::go_away: ep.s().go_away(mux::GoAwayCode(r.u8() % 4)); return true;
    case ss::rebuild: ep.rebuild(); return true;
    default: return false;
  }
}

void append_frame(V& out, uint8_t type_byte, uint8_t flag_byte, uint32_t id, uint32_t length) {
  const uint8_t type = type_byte & 0x80 ? type_byte & 0x7f : type_byte & 0x03;
  const uint8_t version = type_byte & 0x40 ? 1 : 0;
  uint16_t flags = flag_byte & 0x0f;
  if (flag_byte & 0x80) flags |= 0x10;  // an undefined flag bit
  if (type == uint8_t(mux::FrameType::data)) length = uint32_t(length % (kMaxDataFrame + 1));
  uint8_t h[mux::kHeaderSize];
  mux::encode_header({version, type, flags, id, length}, h);
  out.insert(out.end(), h, h + sizeof h);
  if (type == uint8_t(mux::FrameType::data))
    for (uint32_t i = 0; i < length; ++i) out.push_back(pattern(false, id, i));
}

void run_solo(uint8_t mode, fuzz::ScriptReader& r) {
  Endpoint ep(mode & ss::kServer ? mux::Role::server : mux::Role::client, mode, false);
  uint32_t ping_value = 0;
  while (!r.done()) {
    const uint8_t op = r.u8() % ss::op_count;
    switch (op) {
      case ss::feed: {
        uint16_t n = r.u16();
        (void)ep.consume(r.bytes(n));
        break;
      }
      case ss::frame: {
        uint8_t type = r.u8(), flags = r.u8();
        uint32_t id = ep.pick(r.u8());
        uint32_t length = r.u32();
        uint16_t split = r.u16();
        V f;
        append_frame(f, type, flags, id, length);
        const size_t cut = split % (f.size() + 1);
        if (ep.consume(std::span(f).first(cut)).status == mux::ConsumeStatus::ok)
          (void)ep.consume(std::span(f).subspan(cut));
        break;
      }
      case ss::drain: (void)ep.take_output(r.u16()); break;
      case ss::take_inbound: ep.take_inbound(ep.pick(r.u8())); break;
      default: (void)owner_op(op, ep, r, ping_value); break;
    }
    ep.check_state();
  }
  (void)ep.take_output();
}

// Pair mode: wires[i] holds what endpoint i has still to read.
struct Pair {
  Endpoint ep[2];
  V wire[2];
  explicit Pair(uint8_t mode)
      : ep{Endpoint(mux::Role::client, mode, true), Endpoint(mux::Role::server, mode, true)} {}

  void flush() {
    for (int i = 0; i < 2; ++i) {
      V out = ep[i].take_output();
      wire[1 - i].insert(wire[1 - i].end(), out.begin(), out.end());
    }
  }
  void deliver(int i, size_t n) {
    n = std::min(n, wire[i].size());
    V chunk(wire[i].begin(), wire[i].begin() + ptrdiff_t(n));
    wire[i].erase(wire[i].begin(), wire[i].begin() + ptrdiff_t(n));
    mux::ConsumeResult res = ep[i].consume(chunk);
    require(res.status == mux::ConsumeStatus::ok, "two honest sessions never see a protocol error");
  }
};

void run_pair(uint8_t mode, fuzz::ScriptReader& r) {
  // Endpoint is not movable (the session holds a reference to it): built in place.
  auto p = std::make_unique<Pair>(mode);
  uint32_t ping_value = 0;
  while (!r.done()) {
    const uint8_t op = r.u8() % ss::op_count;
    const int side = r.u8() & 1;
    if (op == ss::feed) p->deliver(side, r.u16());
    else (void)owner_op(op, p->ep[side], r, ping_value);
    p->flush();
    p->ep[0].check_state();
    p->ep[1].check_state();
  }
  // Let everything in flight arrive (reading as the handlers do).
  for (int round = 0; round < 64 && !(p->wire[0].empty() && p->wire[1].empty()); ++round) {
    p->deliver(0, SIZE_MAX);
    p->deliver(1, SIZE_MAX);
    p->flush();
  }
  for (int i = 0; i < 2; ++i) {
    Endpoint& a = p->ep[i];
    Endpoint& b = p->ep[1 - i];
    for (const auto& [id, f] : a.flows) {
      if (!a.s().has_stream(id) || !b.s().has_stream(id)) continue;
      const uint64_t arrived = b.flows[id].read + b.s().inbound(id)->size();
      require(p->wire[1 - i].size() > 0 || arrived == f.written, "everything written arrives once the wire is empty");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::ScriptReader r({data, size});
  const uint8_t mode = r.u8();
  if (mode & ss::kPair) run_pair(mode, r);
  else run_solo(mode, r);
  return 0;
}
