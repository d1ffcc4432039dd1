#include "mux/session.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace baton::mux {

namespace {

constexpr uint32_t kMaxU32 = std::numeric_limits<uint32_t>::max();

constexpr const char* kErrVersion = "frame with a yamux version other than 0";
constexpr const char* kErrType = "frame of an unknown type";
constexpr const char* kErrStreamZero = "Data or Window Update on stream 0";
constexpr const char* kErrSessionFrameOnStream = "Ping or Go Away on a stream other than 0";
constexpr const char* kErrParity = "SYN with a stream id of the wrong parity";
constexpr const char* kErrDuplicate = "SYN for a stream that is open";
constexpr const char* kErrReuse = "SYN reuses a stream id";
constexpr const char* kErrWindow = "Data beyond the receive window";
constexpr const char* kErrOverflow = "Window Update overflows the send window";
constexpr const char* kErrPingFlood = "too many Ping requests without their replies being sent";

// The client opens odd ids, the server even ones, so the peer's ids have the
// other parity.
bool is_remote_id(Role role, uint32_t id) { return role == Role::server ? (id & 1) == 1 : (id & 1) == 0; }

}  // namespace

const char* to_str(StreamPhase p) {
  switch (p) {
    case StreamPhase::awaiting_ack: return "awaiting_ack";
    case StreamPhase::awaiting_accept: return "awaiting_accept";
    case StreamPhase::open: return "open";
  }
  return "unknown";
}

const char* to_str(ConsumeStatus s) {
  switch (s) {
    case ConsumeStatus::ok: return "ok";
    case ConsumeStatus::protocol_error: return "protocol_error";
    case ConsumeStatus::already_failed: return "already_failed";
  }
  return "unknown";
}

Session::Session(Role role, SessionHandler& handler, SessionLimits limits) : handler_(handler), limits_(limits) {
  st_.role = role;
  st_.next_local_id = role == Role::client ? 1 : 2;
  st_.remote_next_id = role == Role::client ? 2 : 1;
}

Session::Session(SessionState state, SessionHandler& handler, SessionLimits limits)
    : st_(std::move(state)), handler_(handler), limits_(limits) {}

StreamState* Session::find(uint32_t id) {
  auto it = st_.streams.find(id);
  return it == st_.streams.end() ? nullptr : &it->second;
}

void Session::emit(FrameType type, uint16_t flags, uint32_t id, uint32_t length) {
  // After a protocol error only the Go Away that reports it goes out.
  if (st_.failed) return;
  uint8_t b[kHeaderSize];
  encode_header(FrameHeader{kVersion, uint8_t(type), flags, id, length}, b);
  st_.output.append(b);
}

ConsumeResult Session::fail(const char* why) {
  emit(FrameType::go_away, 0, 0, uint32_t(GoAwayCode::protocol_error));
  st_.failed = true;
  st_.go_away_sent = true;
  st_.go_away_code = GoAwayCode::protocol_error;
  st_.partial_input.clear();
  return {ConsumeStatus::protocol_error, why};
}

const char* Session::check_header(const FrameHeader& h) const {
  if (h.version != kVersion) return kErrVersion;
  if (h.type > uint8_t(FrameType::go_away)) return kErrType;
  const bool stream_frame = h.type == uint8_t(FrameType::data) || h.type == uint8_t(FrameType::window_update);
  if (stream_frame && h.stream_id == 0) return kErrStreamZero;
  if (!stream_frame && h.stream_id != 0) return kErrSessionFrameOnStream;
  return nullptr;
}

const char* Session::check_syn(uint32_t id) const {
  if (!is_remote_id(st_.role, id)) return kErrParity;
  if (st_.streams.count(id) != 0) return kErrDuplicate;
  if (!remote_id_unused(id)) return kErrReuse;
  return nullptr;
}

bool Session::remote_id_unused(uint32_t id) const {
  if (!is_remote_id(st_.role, id) || id < st_.remote_next_id) return false;
  return !std::binary_search(st_.remote_ids_ahead.begin(), st_.remote_ids_ahead.end(), id);
}

// Precondition: remote_id_unused(id). In-order ids (the common case) only
// move remote_next_id; an id ahead of it waits in the sorted list until the
// gap below it closes.
void Session::spend_remote_id(uint32_t id) {
  auto& ahead = st_.remote_ids_ahead;
  if (id == st_.remote_next_id) {
    st_.remote_next_id += 2;
  } else {
    ahead.insert(std::lower_bound(ahead.begin(), ahead.end(), id), id);
    if (ahead.size() > limits_.max_ids_ahead) {
      // Give up the unused ids below the lowest one remembered.
      const uint64_t given_up = (uint64_t(ahead.front()) - st_.remote_next_id) / 2;
      st_.remote_next_id = uint64_t(ahead.front()) + 2;
      ahead.erase(ahead.begin());
      handler_.on_ids_given_up(uint32_t(std::min<uint64_t>(given_up, kMaxU32)));
    }
  }
  size_t n = 0;
  while (n < ahead.size() && ahead[n] == st_.remote_next_id) {
    st_.remote_next_id += 2;
    ++n;
  }
  if (n) ahead.erase(ahead.begin(), ahead.begin() + std::ptrdiff_t(n));
}

bool Session::refuse_syn(uint32_t id) {
  if (!st_.go_away_sent && st_.streams.size() < limits_.max_streams) return false;
  // The id is spent even though the stream never existed: the peer must not reuse it.
  spend_remote_id(id);
  emit(FrameType::window_update, flag::rst, id, 0);
  handler_.on_stream_refused(id, st_.go_away_sent);
  return true;
}

StreamState& Session::create_remote_stream(uint32_t id) {
  spend_remote_id(id);
  StreamState& s = st_.streams.try_emplace(id).first->second;
  s.id = id;
  s.phase = StreamPhase::awaiting_accept;
  return s;
}

ConsumeResult Session::consume(std::span<const uint8_t> in) {
  if (st_.failed) return {ConsumeStatus::already_failed, "the session failed earlier"};
  // Ping ACKs still in output() were not taken by the owner yet; once output()
  // is empty they all went out and the flood counter starts again.
  if (st_.output.empty()) st_.ping_replies_queued = 0;

  while (true) {
    FrameHeader h;
    size_t body_have = 0;  // body bytes of this frame already held in partial_input
    bool resumed = false;  // the header was validated by an earlier consume()
    const size_t pending = st_.partial_input.size();
    uint8_t hb[kHeaderSize];
    if (pending >= kHeaderSize) {
      if (in.empty()) return {};
      st_.partial_input.peek(hb);
      h = decode_header(hb);
      body_have = pending - kHeaderSize;
      resumed = true;
    } else {
      const size_t need = kHeaderSize - pending;
      if (in.size() < need) {
        st_.partial_input.append(in);
        return {};
      }
      st_.partial_input.peek(hb);
      std::memcpy(hb + pending, in.data(), need);
      st_.partial_input.clear();
      in = in.subspan(need);
      h = decode_header(hb);
      if (const char* err = check_header(h)) return fail(err);
      const char* err = nullptr;
      switch (FrameType(h.type)) {
        case FrameType::data: break;
        case FrameType::window_update: err = handle_window_update(h); break;
        case FrameType::ping: err = handle_ping(h); break;
        case FrameType::go_away: handle_go_away(h); break;
      }
      if (err) return fail(err);
      if (h.type != uint8_t(FrameType::data)) continue;
    }

    if (resumed && h.stream_id == 0) {  // the skip marker (see SessionState::partial_input)
      st_.partial_input.clear();
      skip_body(h.length, in);
      continue;
    }
    // A resumed frame is classified again: between consume() calls the owner
    // may have reset the stream, sent Go Away or grown the window, so the
    // verdict can change, but only towards discarding or leniency.
    const char* err = nullptr;
    const DataVerdict verdict = classify_data(h, err);
    if (verdict == DataVerdict::error) return fail(err);
    if (verdict == DataVerdict::discard) {
      st_.partial_input.clear();
      skip_body(uint32_t(h.length - body_have), in);
      continue;
    }
    const size_t need = h.length - body_have;
    if (in.size() < need) {
      if (!resumed) st_.partial_input.append(hb);
      st_.partial_input.append(in);
      return {};
    }
    util::ByteQueue queued;
    std::span<const uint8_t> direct;
    if (body_have > 0) {
      st_.partial_input.append(in.first(need));
      st_.partial_input.pop(kHeaderSize);
      queued = std::move(st_.partial_input);
      st_.partial_input.clear();
    } else {
      st_.partial_input.clear();
      direct = in.first(need);
    }
    in = in.subspan(need);
    deliver_data(h, direct, queued);
  }
}

void Session::skip_body(uint32_t remaining, std::span<const uint8_t>& in) {
  const size_t n = std::min<size_t>(remaining, in.size());
  in = in.subspan(n);
  remaining -= uint32_t(n);
  if (remaining == 0) return;
  uint8_t b[kHeaderSize];
  encode_header(FrameHeader{kVersion, uint8_t(FrameType::data), 0, 0, remaining}, b);
  st_.partial_input.append(b);
}

Session::DataVerdict Session::classify_data(const FrameHeader& h, const char*& error) {
  const uint32_t id = h.stream_id;
  if (h.flags & flag::syn) {
    if ((error = check_syn(id))) return DataVerdict::error;
    if (h.length > kInitialWindow) {
      error = kErrWindow;
      return DataVerdict::error;
    }
    return refuse_syn(id) ? DataVerdict::discard : DataVerdict::deliver;
  }
  StreamState* s = find(id);
  // Unknown: a stream we reset or closed while the peer was still sending.
  if (!s) return DataVerdict::discard;
  if (h.flags & flag::rst) {
    remote_reset(id);
    return DataVerdict::discard;
  }
  if (h.length > s->recv_window) {
    error = kErrWindow;
    return DataVerdict::error;
  }
  if (h.length > 0 && s->remote_fin) {
    // The peer broke this stream only: reset it, keep the session.
    emit(FrameType::window_update, flag::rst, id, 0);
    st_.streams.erase(id);
    handler_.on_stream_reset(id);
    return DataVerdict::discard;
  }
  return DataVerdict::deliver;
}

void Session::deliver_data(const FrameHeader& h, std::span<const uint8_t> direct, util::ByteQueue& queued) {
  const uint32_t id = h.stream_id;
  if (h.flags & flag::syn) {
    create_remote_stream(id);
    handler_.on_stream_opened(id);
  }
  // Callbacks may reset the stream: look it up again after each one.
  StreamState* s = find(id);
  if (!s) return;
  if (h.flags & flag::rst) {  // only with SYN; without it classify_data handled RST
    remote_reset(id);
    return;
  }
  bool writable = false;
  if ((h.flags & flag::ack) && s->phase == StreamPhase::awaiting_ack) {
    s->phase = StreamPhase::open;
    writable = true;
  }
  if (h.length > 0) {
    s->recv_window -= h.length;
    if (!direct.empty()) s->inbound.append(direct);
    else if (s->inbound.empty()) s->inbound = std::move(queued);
    else s->inbound.append(queued);
  }
  if (writable) handler_.on_stream_writable(id);
  if (h.length > 0 && find(id)) handler_.on_stream_data(id);
  if (h.flags & flag::fin) remote_fin(id);
}

const char* Session::handle_window_update(const FrameHeader& h) {
  const uint32_t id = h.stream_id;
  if (h.flags & flag::syn) {
    if (const char* err = check_syn(id)) return err;
    if (h.length > kMaxU32 - kInitialWindow) return kErrOverflow;
    if (refuse_syn(id)) return nullptr;
    create_remote_stream(id).send_window = kInitialWindow + h.length;
    handler_.on_stream_opened(id);
    if (!find(id)) return nullptr;
    if (h.flags & flag::rst) {
      remote_reset(id);
      return nullptr;
    }
    if (h.flags & flag::fin) remote_fin(id);
    return nullptr;
  }
  StreamState* s = find(id);
  if (!s) return nullptr;
  if (h.flags & flag::rst) {
    remote_reset(id);
    return nullptr;
  }
  if (h.length > kMaxU32 - s->send_window) return kErrOverflow;
  bool writable = false;
  if ((h.flags & flag::ack) && s->phase == StreamPhase::awaiting_ack) {
    s->phase = StreamPhase::open;
    writable = true;
  }
  if (h.length > 0) {
    if (s->send_window == 0) writable = true;
    s->send_window += h.length;
  }
  if (writable) handler_.on_stream_writable(id);
  if (h.flags & flag::fin) remote_fin(id);
  return nullptr;
}

const char* Session::handle_ping(const FrameHeader& h) {
  if (h.flags & flag::syn) {
    if (st_.ping_replies_queued >= limits_.max_ping_replies) return kErrPingFlood;
    ++st_.ping_replies_queued;
    emit(FrameType::ping, flag::ack, 0, h.length);
  } else if (h.flags & flag::ack) {
    auto it = std::find_if(st_.pings.begin(), st_.pings.end(), [&](const PendingPing& p) { return p.value == h.length; });
    if (it == st_.pings.end()) return nullptr;  // late answer to a ping we gave up on
    const PendingPing p = *it;
    st_.pings.erase(it);
    handler_.on_ping_answered(p.value, p.sent_at_ms);
  }
  return nullptr;
}

void Session::handle_go_away(const FrameHeader& h) {
  st_.go_away_received = true;
  st_.go_away_code = GoAwayCode(h.length);
  handler_.on_go_away(st_.go_away_code);
}

void Session::remote_reset(uint32_t id) {
  st_.streams.erase(id);
  handler_.on_stream_reset(id);
}

void Session::remote_fin(uint32_t id) {
  StreamState* s = find(id);
  if (!s || s->remote_fin) return;
  s->remote_fin = true;
  handler_.on_stream_fin(id);
  maybe_close(id);
}

void Session::maybe_close(uint32_t id) {
  StreamState* s = find(id);
  if (!s || !s->local_fin || !s->remote_fin || !s->inbound.empty()) return;
  handler_.on_stream_closed(id);
  st_.streams.erase(id);
}

uint32_t Session::open() {
  if (st_.failed || st_.go_away_sent || st_.go_away_received) return 0;
  if (st_.streams.size() >= limits_.max_streams) return 0;
  const uint32_t id = st_.next_local_id;
  if (id == 0) return 0;  // the id space is used up
  st_.next_local_id = id > kMaxU32 - 2 ? 0 : id + 2;
  StreamState& s = st_.streams.try_emplace(id).first->second;
  s.id = id;
  s.phase = StreamPhase::awaiting_ack;
  emit(FrameType::window_update, flag::syn, id, 0);
  return id;
}

void Session::accept(uint32_t id) {
  StreamState* s = find(id);
  if (!s || s->phase != StreamPhase::awaiting_accept) return;
  s->phase = StreamPhase::open;
  emit(FrameType::window_update, flag::ack, id, 0);
}

size_t Session::write(uint32_t id, std::span<const uint8_t> data) {
  StreamState* s = find(id);
  if (!s || st_.failed || s->local_fin) return 0;
  accept(id);
  const size_t n = std::min<size_t>(data.size(), s->send_window);
  const size_t max_frame = std::max<uint32_t>(limits_.max_frame_data, 1);
  for (size_t off = 0; off < n;) {
    const size_t k = std::min(max_frame, n - off);
    emit(FrameType::data, 0, id, uint32_t(k));
    st_.output.append(data.subspan(off, k));
    off += k;
  }
  s->send_window -= uint32_t(n);
  return n;
}

void Session::close_write(uint32_t id) {
  StreamState* s = find(id);
  if (!s || s->local_fin) return;
  accept(id);
  s->local_fin = true;
  emit(FrameType::window_update, flag::fin, id, 0);
  maybe_close(id);
}

void Session::reset(uint32_t id) {
  if (!find(id)) return;
  emit(FrameType::window_update, flag::rst, id, 0);
  st_.streams.erase(id);
}

const util::ByteQueue* Session::inbound(uint32_t id) const {
  static const util::ByteQueue empty;
  auto it = st_.streams.find(id);
  return it == st_.streams.end() ? &empty : &it->second.inbound;
}

void Session::consumed(uint32_t id, size_t n) {
  StreamState* s = find(id);
  if (!s) return;
  n = std::min(n, s->inbound.size());
  if (n == 0) return;
  s->inbound.pop(n);
  s->unacked_credit += uint32_t(n);
  // After the peer's FIN no more Data comes, so credit would be wasted bytes.
  if (!s->remote_fin && s->unacked_credit >= s->recv_window_max / 2) {
    emit(FrameType::window_update, 0, id, s->unacked_credit);
    s->recv_window += s->unacked_credit;
    s->unacked_credit = 0;
  }
  maybe_close(id);
}

void Session::set_recv_window(uint32_t id, uint32_t window) {
  StreamState* s = find(id);
  if (!s || window <= s->recv_window_max) return;
  const uint32_t delta = window - s->recv_window_max;
  s->recv_window_max = window;
  s->recv_window += delta;
  emit(FrameType::window_update, 0, id, delta);
}

bool Session::ping(uint32_t value, uint64_t now_ms) {
  if (st_.failed || st_.pings.size() >= limits_.max_pending_pings) return false;
  st_.pings.push_back({value, now_ms});
  emit(FrameType::ping, flag::syn, 0, value);
  return true;
}

void Session::go_away(GoAwayCode code) {
  if (st_.go_away_sent || st_.failed) return;
  st_.go_away_sent = true;
  emit(FrameType::go_away, 0, 0, uint32_t(code));
}

uint32_t Session::send_window(uint32_t id) const {
  auto it = st_.streams.find(id);
  return it == st_.streams.end() ? 0 : it->second.send_window;
}

}  // namespace baton::mux
