#include "handoff/codec.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>

#include "util/bytes.h"

namespace baton::handoff {

const char* to_str(MsgType t) {
  switch (t) {
    case MsgType::hello: return "hello";
    case MsgType::server_state: return "server_state";
    case MsgType::listening: return "listening";
    case MsgType::batch: return "batch";
    case MsgType::batch_ack: return "batch_ack";
    case MsgType::commit: return "commit";
    case MsgType::abort: return "abort";
    case MsgType::refuse: return "refuse";
  }
  return "unknown";
}

namespace {

// Limits a decoder enforces before it allocates anything.
constexpr uint32_t kMaxString = 4096;
constexpr uint32_t kMaxQueue = 64u << 20;
constexpr uint32_t kMaxStreams = 1u << 20;
constexpr uint32_t kMaxTunnelsPerBatch = 1u << 20;
constexpr uint16_t kNoFd = 0xFFFF;
constexpr uint32_t kMaxSeries = 1u << 20;
constexpr uint32_t kMaxSeriesName = 1024;

class Writer {
 public:
  explicit Writer(std::vector<uint8_t>& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(v); }
  void boolean(bool v) { u8(v ? 1 : 0); }
  void u16(uint16_t v) { u8(uint8_t(v >> 8)); u8(uint8_t(v)); }
  void u32(uint32_t v) { u16(uint16_t(v >> 16)); u16(uint16_t(v)); }
  void u64(uint64_t v) { u32(uint32_t(v >> 32)); u32(uint32_t(v)); }
  void bytes(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void str(const std::string& s) {
    u32(uint32_t(s.size()));
    bytes({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
  }
  void queue(const util::ByteQueue& q) {
    u32(uint32_t(q.size()));
    size_t at = out_.size();
    out_.resize(at + q.size());
    q.peek({out_.data() + at, q.size()});
  }
  size_t size() const { return out_.size(); }
  void patch_u32(size_t at, uint32_t v) { util::store_u32(out_.data() + at, v); }

 private:
  std::vector<uint8_t>& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool ok() const { return err_.empty(); }
  const std::string& error() const { return err_; }
  void fail(const std::string& what) {
    if (err_.empty()) err_ = what + " (at byte " + std::to_string(pos_) + ")";
  }
  bool need(size_t n, const char* what) {
    if (!ok()) return false;
    if (in_.size() - pos_ < n) {
      fail(std::string("truncated ") + what);
      return false;
    }
    return true;
  }
  uint8_t u8(const char* what) {
    if (!need(1, what)) return 0;
    return in_[pos_++];
  }
  bool boolean(const char* what) {
    uint8_t v = u8(what);
    if (v > 1) fail(std::string(what) + ": expected 0 or 1");
    return v == 1;
  }
  uint16_t u16(const char* what) {
    if (!need(2, what)) return 0;
    uint16_t v = util::load_u16(&in_[pos_]);
    pos_ += 2;
    return v;
  }
  uint32_t u32(const char* what) {
    if (!need(4, what)) return 0;
    uint32_t v = util::load_u32(&in_[pos_]);
    pos_ += 4;
    return v;
  }
  uint64_t u64(const char* what) {
    uint64_t hi = u32(what);
    return (hi << 32) | u32(what);
  }
  void bytes(std::span<uint8_t> out, const char* what) {
    if (!need(out.size(), what)) return;
    std::copy_n(&in_[pos_], out.size(), out.begin());
    pos_ += out.size();
  }
  std::string str(const char* what, uint32_t max = kMaxString) {
    uint32_t n = u32(what);
    if (!ok()) return {};
    if (n > max) {
      fail(std::string(what) + ": " + std::to_string(n) + " bytes is over the limit of " + std::to_string(max));
      return {};
    }
    if (!need(n, what)) return {};
    std::string s(reinterpret_cast<const char*>(&in_[pos_]), n);
    pos_ += n;
    return s;
  }
  void queue(util::ByteQueue& q, const char* what, uint32_t max = kMaxQueue) {
    uint32_t n = u32(what);
    if (!ok()) return;
    if (n > max) {
      fail(std::string(what) + ": " + std::to_string(n) + " bytes is over the limit of " + std::to_string(max));
      return;
    }
    if (!need(n, what)) return;
    q.clear();
    q.append(in_.subspan(pos_, n));
    pos_ += n;
  }
  // Bounded element count: each element takes at least min_size bytes, so a
  // count larger than the rest of the input is refused before allocating.
  uint32_t count(const char* what, uint32_t max, size_t min_size) {
    uint32_t n = u32(what);
    if (!ok()) return 0;
    if (n > max || size_t(n) * min_size > in_.size() - pos_) {
      fail(std::string(what) + ": count " + std::to_string(n) + " is impossible here");
      return 0;
    }
    return n;
  }
  size_t remaining() const { return in_.size() - pos_; }
  size_t pos() const { return pos_; }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  std::string err_;
};

void begin(std::vector<uint8_t>& out, MsgType type, uint8_t fds, size_t& body_at) {
  Writer w(out);
  w.u32(kMagic);
  w.u16(kProtocolVersion);
  w.u8(uint8_t(type));
  w.u8(fds);
  w.u32(0);
  body_at = out.size();
}

void finish(std::vector<uint8_t>& out, size_t body_at) {
  util::store_u32(out.data() + body_at - 4, uint32_t(out.size() - body_at));
}

void put_metrics(Writer& w, const proxy::Metrics& m) {
  w.u32(uint32_t(m.counters.size()));
  // Series travel as their Prometheus text: the receiving build maps them
  // back to its declared families (a family it does not know is dropped).
  for (const auto& [k, v] : m.counters) {
    w.str(k.text());
    w.u64(v);
  }
  w.u32(uint32_t(m.histograms.size()));
  for (const auto& [k, h] : m.histograms) {
    w.str(k.text());
    w.u8(uint8_t(h.counts.size()));
    for (uint64_t c : h.counts) w.u64(c);
    uint64_t bits;
    std::memcpy(&bits, &h.sum, sizeof bits);
    w.u64(bits);
  }
}

void get_metrics(Reader& r, proxy::Metrics& m) {
  uint32_t n = r.count("counter count", kMaxSeries, 12);
  for (uint32_t i = 0; i < n && r.ok(); ++i) {
    std::string k = r.str("counter name", kMaxSeriesName);
    uint64_t v = r.u64("counter value");
    if (!r.ok()) break;
    if (std::optional<proxy::Series> s = proxy::Series::parse(k)) m.counters[*s] = v;
  }
  uint32_t nh = r.count("histogram count", kMaxSeries, 13);
  for (uint32_t i = 0; i < nh && r.ok(); ++i) {
    std::string k = r.str("histogram name", kMaxSeriesName);
    uint8_t nb = r.u8("bucket count");
    if (r.ok() && nb != proxy::Histogram{}.counts.size()) {
      // Other bucket bounds (another build): the histogram cannot continue here.
      r.fail("histogram " + k + ": " + std::to_string(nb) + " buckets, this build has " +
             std::to_string(proxy::Histogram{}.counts.size()));
      return;
    }
    proxy::Histogram h;
    for (uint64_t& c : h.counts) c = r.u64("bucket");
    uint64_t bits = r.u64("histogram sum");
    std::memcpy(&h.sum, &bits, sizeof bits);
    if (r.ok() && !(h.sum >= 0)) r.fail("histogram " + k + ": sum is negative or not a number");
    if (!r.ok()) break;
    if (std::optional<proxy::Series> s = proxy::Series::parse(k)) m.histograms[*s] = h;
  }
}

std::string finish_read(Reader& r) {
  if (r.ok() && r.remaining() != 0) r.fail(std::to_string(r.remaining()) + " unexpected trailing bytes");
  return r.error();
}

// --- tunnel state, versions 1 and 2 ---

void put_direction(Writer& w, const tls::DirectionState& d) {
  w.bytes(d.key);
  w.bytes(d.iv);
  w.u64(d.seq);
}

void put_tunnel(Writer& w, const proxy::TunnelState& t, uint16_t& next_fd, uint16_t version) {
  auto fd_ref = [&](int fd) -> uint16_t { return fd >= 0 ? next_fd++ : kNoFd; };
  // Precondition: a detached tunnel only in a version that carries one.
  const bool detached = t.phase == proxy::LinkPhase::detached;
  w.u8(uint8_t(t.phase));
  w.u16(fd_ref(t.fd));
  // TLS (none while detached: the connection is gone)
  if (!detached) {
    const tls::RecordState& rs = t.record;
    w.u16(rs.suite);
    w.u8(uint8_t(rs.side));
    put_direction(w, rs.read);
    put_direction(w, rs.write);
    w.boolean(rs.close_notify_received);
    w.boolean(rs.close_notify_sent);
    w.queue(rs.partial_input);
    w.queue(rs.output);
  }
  // yamux
  const mux::SessionState& ss = t.session;
  w.u8(uint8_t(ss.role));
  w.u32(ss.next_local_id);
  if (version >= 2) {
    w.u64(ss.remote_next_id);
    w.u32(uint32_t(ss.remote_ids_ahead.size()));
    for (uint32_t id : ss.remote_ids_ahead) w.u32(id);
  } else {
    // Version 1 knew only "every id up to this one is spent".
    uint64_t highest = ss.remote_next_id >= 2 ? ss.remote_next_id - 2 : 0;
    if (!ss.remote_ids_ahead.empty()) highest = std::max<uint64_t>(highest, ss.remote_ids_ahead.back());
    w.u32(uint32_t(std::min<uint64_t>(highest, 0xffffffffu)));
  }
  w.boolean(ss.go_away_sent);
  w.boolean(ss.go_away_received);
  w.boolean(ss.failed);
  w.u32(uint32_t(ss.go_away_code));
  w.u32(ss.ping_replies_queued);
  w.queue(ss.partial_input);
  w.queue(ss.output);
  w.u32(uint32_t(ss.streams.size()));
  for (const auto& [id, s] : ss.streams) {
    w.u32(s.id);
    w.u8(uint8_t(s.phase));
    w.boolean(s.local_fin);
    w.boolean(s.remote_fin);
    w.u32(s.send_window);
    w.u32(s.recv_window);
    w.u32(s.recv_window_max);
    w.u32(s.unacked_credit);
    w.queue(s.inbound);
  }
  w.u32(uint32_t(ss.pings.size()));
  for (const mux::PendingPing& p : ss.pings) {
    w.u32(p.value);
    w.u64(p.sent_at_ms);
  }
  // peer and tunnel
  w.boolean(t.peer_info.resumed);
  w.str(t.peer_info.alpn);
  w.str(t.peer_info.cert_subject);
  w.str(t.peer_info.suite_name);
  w.u64(t.counters.bytes_in);
  w.u64(t.counters.bytes_out);
  w.u64(t.counters.streams_opened);
  w.u64(t.counters.streams_reset);
  w.u64(t.idle_ms);
  w.u64(t.age_ms);
  w.bytes(t.session_id);
  w.str(t.client_id);
  w.boolean(t.control_open);
  w.boolean(t.counted);
  // bridges
  w.u32(uint32_t(t.bridges.size()));
  for (const proxy::BridgeState& b : t.bridges) {
    w.u32(b.id);
    w.u8(uint8_t(b.phase));
    w.u16(fd_ref(b.fd));
    w.str(b.route);
    w.queue(b.pending);
    w.boolean(b.tcp_eof);
    w.boolean(b.fin_sent);
    w.boolean(b.peer_fin);
    w.boolean(b.shutdown_done);
    w.u64(b.bytes_up);
    w.u64(b.bytes_down);
    w.u64(b.upstream_written);
  }
  if (version >= kStateVersionResume) {
    const proxy::ResumeState& rz = t.resume;
    w.boolean(rz.offered);
    w.bytes(rz.secret);
    w.str(rz.identity);
    w.boolean(rz.log.keeping);
    w.u64(rz.log.sent);
    w.u64(rz.log.received);
    w.u64(rz.log.reported);
    w.queue(rz.log.kept);
    w.u64(rz.detached_ms);
  }
}

void get_direction(Reader& r, tls::DirectionState& d) {
  r.bytes(d.key, "key");
  r.bytes(d.iv, "iv");
  d.seq = r.u64("sequence number");
}

void get_record(Reader& r, tls::RecordState& rs);
void get_session(Reader& r, proxy::TunnelState& t, uint16_t version);

// Reads one tunnel. fd fields receive the index from the message (kNoFd -> -1).
void get_tunnel(Reader& r, proxy::TunnelState& t, uint16_t version) {
  auto fd_index = [](uint16_t v) { return v == kNoFd ? -1 : int(v); };
  uint8_t phase = r.u8("tunnel phase");
  const bool detached = version >= kStateVersionResume && phase == uint8_t(proxy::LinkPhase::detached);
  if (phase != uint8_t(proxy::LinkPhase::awaiting_hello) && phase != uint8_t(proxy::LinkPhase::serving) && !detached)
    r.fail("tunnel phase " + std::to_string(phase) + " cannot be handed over");
  t.phase = proxy::LinkPhase(phase);
  t.fd = fd_index(r.u16("tunnel fd"));
  if (r.ok() && t.fd < 0 && !detached) r.fail("tunnel without a socket");
  if (r.ok() && t.fd >= 0 && detached) r.fail("detached tunnel with a socket");
  if (!detached) get_record(r, t.record);
  get_session(r, t, version);
}

void get_record(Reader& r, tls::RecordState& rs) {
  rs.suite = r.u16("cipher suite");
  tls::Cipher cipher;
  if (r.ok() && !tls::cipher_of_suite(rs.suite, cipher)) r.fail("cipher suite " + std::to_string(rs.suite) + " is not allowed");
  uint8_t side = r.u8("TLS side");
  if (r.ok() && side != uint8_t(tls::Side::server)) r.fail("TLS side must be server");
  rs.side = tls::Side::server;
  get_direction(r, rs.read);
  get_direction(r, rs.write);
  rs.close_notify_received = r.boolean("close_notify_received");
  rs.close_notify_sent = r.boolean("close_notify_sent");
  // A partial record is shorter than the longest record.
  r.queue(rs.partial_input, "TLS partial input", uint32_t(tls::kHeaderSize + tls::kMaxCiphertext));
  r.queue(rs.output, "TLS output");
}

void get_session(Reader& r, proxy::TunnelState& t, uint16_t version) {
  auto fd_index = [](uint16_t v) { return v == kNoFd ? -1 : int(v); };
  mux::SessionState& ss = t.session;
  uint8_t role = r.u8("yamux role");
  if (r.ok() && role != uint8_t(mux::Role::server)) r.fail("yamux role must be server");
  ss.role = mux::Role::server;
  ss.next_local_id = r.u32("next stream id");
  if (r.ok() && (ss.next_local_id == 0 || ss.next_local_id % 2 != 0)) r.fail("server stream ids must be even and nonzero");
  if (version >= 2) {
    ss.remote_next_id = r.u64("next client stream id");
    if (r.ok() && (ss.remote_next_id % 2 == 0 || ss.remote_next_id > 0x100000001ull))
      r.fail("next client stream id must be odd and at most 2^32+1");
    uint32_t nahead = r.count("client ids ahead count", mux::SessionLimits{}.max_ids_ahead, 4);
    uint64_t prev = ss.remote_next_id;
    for (uint32_t i = 0; i < nahead && r.ok(); ++i) {
      uint32_t id = r.u32("client id ahead");
      if (r.ok() && (id % 2 == 0 || id <= prev)) r.fail("client ids ahead must be odd, increasing, above the next id");
      prev = id;
      ss.remote_ids_ahead.push_back(id);
    }
  } else {
    uint32_t highest = r.u32("highest client stream id");
    if (r.ok() && highest % 2 == 0 && highest != 0) r.fail("client stream ids must be odd");
    ss.remote_next_id = highest == 0 ? 1 : uint64_t(highest) + 2;
  }
  ss.go_away_sent = r.boolean("go_away_sent");
  ss.go_away_received = r.boolean("go_away_received");
  ss.failed = r.boolean("failed");
  uint32_t code = r.u32("go away code");
  if (r.ok() && code > 2) r.fail("go away code " + std::to_string(code) + " unknown");
  ss.go_away_code = mux::GoAwayCode(code);
  ss.ping_replies_queued = r.u32("ping replies queued");
  if (r.ok() && ss.ping_replies_queued > mux::SessionLimits{}.max_ping_replies) r.fail("ping replies queued: too many");
  r.queue(ss.partial_input, "yamux partial input", kMaxQueue);
  if (r.ok() && ss.partial_input.size() >= mux::kHeaderSize) {
    // The session trusts a held header (it was validated when it arrived):
    // only a Data header with body still to come, or the skip marker
    // (Data, flags 0, stream 0, bytes left to skip), can be held.
    uint8_t hb[mux::kHeaderSize];
    ss.partial_input.peek(hb);
    mux::FrameHeader h = mux::decode_header(hb);
    size_t body = ss.partial_input.size() - mux::kHeaderSize;
    bool data = h.version == mux::kVersion && h.type == uint8_t(mux::FrameType::data);
    bool skip = data && h.stream_id == 0 && h.flags == 0 && h.length > 0 && body == 0;
    bool partial = data && h.stream_id != 0 && body < h.length;
    if (!skip && !partial) r.fail("yamux partial input is not a partial Data frame");
  }
  r.queue(ss.output, "yamux output");
  uint32_t nstreams = r.count("stream count", kMaxStreams, 26);
  uint32_t last_id = 0;
  for (uint32_t i = 0; i < nstreams && r.ok(); ++i) {
    mux::StreamState s;
    s.id = r.u32("stream id");
    if (r.ok() && (s.id == 0 || s.id <= last_id)) r.fail("stream ids must be nonzero and ascending");
    last_id = s.id;
    uint8_t sp = r.u8("stream phase");
    if (r.ok() && sp > uint8_t(mux::StreamPhase::open)) r.fail("stream phase " + std::to_string(sp) + " unknown");
    s.phase = mux::StreamPhase(sp);
    s.local_fin = r.boolean("local_fin");
    s.remote_fin = r.boolean("remote_fin");
    s.send_window = r.u32("send window");
    s.recv_window = r.u32("receive window");
    s.recv_window_max = r.u32("receive window size");
    s.unacked_credit = r.u32("unacknowledged credit");
    r.queue(s.inbound, "stream inbound bytes");
    if (r.ok() && (s.recv_window > s.recv_window_max || s.inbound.size() > s.recv_window_max ||
                   s.unacked_credit > s.recv_window_max))
      r.fail("stream " + std::to_string(s.id) + ": windows inconsistent");
    if (r.ok()) ss.streams.emplace(s.id, std::move(s));
  }
  uint32_t npings = r.count("ping count", mux::SessionLimits{}.max_pending_pings, 12);
  for (uint32_t i = 0; i < npings && r.ok(); ++i) {
    mux::PendingPing p;
    p.value = r.u32("ping value");
    p.sent_at_ms = r.u64("ping time");
    ss.pings.push_back(p);
  }

  t.peer_info.resumed = r.boolean("resumed");
  t.peer_info.alpn = r.str("ALPN");
  t.peer_info.cert_subject = r.str("certificate subject");
  t.peer_info.suite_name = r.str("suite name");
  t.counters.bytes_in = r.u64("bytes_in");
  t.counters.bytes_out = r.u64("bytes_out");
  t.counters.streams_opened = r.u64("streams_opened");
  t.counters.streams_reset = r.u64("streams_reset");
  t.idle_ms = r.u64("idle time");
  t.age_ms = r.u64("age");
  r.bytes(t.session_id, "session id");
  t.client_id = r.str("client id");
  t.control_open = r.boolean("control_open");
  t.counted = r.boolean("counted");

  uint32_t nbridges = r.count("bridge count", kMaxStreams, 40);
  std::set<uint32_t> ids;
  for (uint32_t i = 0; i < nbridges && r.ok(); ++i) {
    proxy::BridgeState b;
    b.id = r.u32("bridge stream id");
    if (r.ok() && (b.id <= 1 || !ids.insert(b.id).second)) r.fail("bridge stream id " + std::to_string(b.id) + " invalid or repeated");
    uint8_t bp = r.u8("bridge phase");
    if (r.ok() && bp > uint8_t(proxy::BridgePhase::done)) r.fail("bridge phase " + std::to_string(bp) + " unknown");
    b.phase = proxy::BridgePhase(bp);
    b.fd = fd_index(r.u16("bridge fd"));
    if (r.ok() && (b.phase == proxy::BridgePhase::relaying) != (b.fd >= 0))
      r.fail("bridge " + std::to_string(b.id) + ": a socket goes with relaying, and only with it");
    b.route = r.str("route");
    r.queue(b.pending, "bridge pending bytes");
    b.tcp_eof = r.boolean("tcp_eof");
    b.fin_sent = r.boolean("fin_sent");
    b.peer_fin = r.boolean("peer_fin");
    b.shutdown_done = r.boolean("shutdown_done");
    b.bytes_up = r.u64("bytes_up");
    b.bytes_down = r.u64("bytes_down");
    b.upstream_written = r.u64("upstream_written");
    if (r.ok()) {
      auto it = ss.streams.find(b.id);
      size_t inbound = it == ss.streams.end() ? 0 : it->second.inbound.size();
      if (b.upstream_written > inbound) r.fail("bridge " + std::to_string(b.id) + ": more written than was queued");
    }
    if (r.ok()) t.bridges.push_back(std::move(b));
  }
  if (version >= kStateVersionResume) {
    proxy::ResumeState& rz = t.resume;
    rz.offered = r.boolean("resume offered");
    r.bytes(rz.secret, "resume secret");
    rz.identity = r.str("resume identity");
    rz.log.keeping = r.boolean("resume keeping");
    rz.log.sent = r.u64("resume sent");
    rz.log.received = r.u64("resume received");
    rz.log.reported = r.u64("resume reported");
    r.queue(rz.log.kept, "resume kept bytes");
    rz.detached_ms = r.u64("detached for");
    if (r.ok() && rz.log.kept.size() > rz.log.sent) r.fail("resume: more kept than was sent");
    if (r.ok() && rz.log.reported > rz.log.received) r.fail("resume: more reported than was received");
    if (r.ok() && t.phase == proxy::LinkPhase::detached && !(rz.offered && rz.log.keeping))
      r.fail("a detached tunnel that is not resumable");
  }
}

}  // namespace

ParseStatus parse_header(std::span<const uint8_t> in, Header& out, std::string& error) {
  if (in.size() < kHeaderSize) return ParseStatus::need_more;
  if (util::load_u32(in.data()) != kMagic) {
    error = "not a baton handoff message (bad magic)";
    return ParseStatus::malformed;
  }
  out.version = util::load_u16(in.data() + 4);
  out.type = MsgType(in[6]);
  out.fd_count = in[7];
  out.body_length = util::load_u32(in.data() + 8);
  if (out.fd_count > kMaxFdsPerMessage) {
    error = "message announces " + std::to_string(out.fd_count) + " descriptors (at most 253)";
    return ParseStatus::malformed;
  }
  if (out.body_length > kMaxBody) {
    error = "message body of " + std::to_string(out.body_length) + " bytes is over the limit";
    return ParseStatus::malformed;
  }
  return ParseStatus::ok;
}

void encode_hello(const Hello& m, std::vector<uint8_t>& out) {
  size_t at;
  begin(out, MsgType::hello, 0, at);
  Writer w(out);
  w.u32(m.pid);
  w.u16(m.min_state_version);
  w.u16(m.max_state_version);
  finish(out, at);
}

std::string decode_hello(std::span<const uint8_t> body, Hello& out) {
  Reader r(body);
  out.pid = r.u32("pid");
  out.min_state_version = r.u16("min state version");
  out.max_state_version = r.u16("max state version");
  if (r.ok() && out.min_state_version > out.max_state_version) r.fail("state versions: min above max");
  return finish_read(r);
}

void encode_server_state(const ServerStateMsg& m, std::vector<uint8_t>& out) {
  size_t at;
  begin(out, MsgType::server_state, m.has_listener ? 1 : 0, at);
  Writer w(out);
  w.u32(m.pid);
  w.u64(m.epoch);
  put_metrics(w, m.metrics);
  w.u8(uint8_t(m.ticket_keys.size()));
  for (const tls::TicketKey& k : m.ticket_keys) w.bytes(k);
  w.boolean(m.has_listener);
  finish(out, at);
}

std::string decode_server_state(std::span<const uint8_t> body, ServerStateMsg& out) {
  Reader r(body);
  out.pid = r.u32("pid");
  out.epoch = r.u64("epoch");
  get_metrics(r, out.metrics);
  uint8_t n = r.u8("ticket key count");
  if (r.ok() && n > tls::kMaxTicketKeys) r.fail("too many ticket keys");
  for (uint8_t i = 0; i < n && r.ok(); ++i) {
    tls::TicketKey k;
    r.bytes(k, "ticket key");
    out.ticket_keys.push_back(k);
  }
  out.has_listener = r.boolean("has_listener");
  return finish_read(r);
}

void encode_listening(std::vector<uint8_t>& out) {
  size_t at;
  begin(out, MsgType::listening, 0, at);
  finish(out, at);
}

void encode_batch_ack(const BatchAck& m, std::vector<uint8_t>& out) {
  size_t at;
  begin(out, MsgType::batch_ack, 0, at);
  Writer w(out);
  w.u32(m.seq);
  w.u32(m.adopted);
  w.str(m.reason.substr(0, kMaxString));
  finish(out, at);
}

std::string decode_batch_ack(std::span<const uint8_t> body, BatchAck& out) {
  Reader r(body);
  out.seq = r.u32("seq");
  out.adopted = r.u32("adopted");
  out.reason = r.str("reason");
  return finish_read(r);
}

void encode_commit(const Commit& m, std::vector<uint8_t>& out) {
  size_t at;
  begin(out, MsgType::commit, 0, at);
  Writer w(out);
  put_metrics(w, m.metrics);
  finish(out, at);
}

std::string decode_commit(std::span<const uint8_t> body, Commit& out) {
  Reader r(body);
  get_metrics(r, out.metrics);
  return finish_read(r);
}

static void encode_reason(MsgType t, const std::string& reason, std::vector<uint8_t>& out) {
  size_t at;
  begin(out, t, 0, at);
  Writer w(out);
  w.str(reason.substr(0, kMaxString));
  finish(out, at);
}

void encode_abort(const std::string& reason, std::vector<uint8_t>& out) { encode_reason(MsgType::abort, reason, out); }
void encode_refuse(const std::string& reason, std::vector<uint8_t>& out) { encode_reason(MsgType::refuse, reason, out); }

std::string decode_reason(std::span<const uint8_t> body, std::string& out) {
  Reader r(body);
  out = r.str("reason");
  return finish_read(r);
}

std::string reason_of(std::span<const uint8_t> body) {
  std::string reason;
  if (!decode_reason(body, reason).empty()) return {};
  return reason;
}

size_t fd_count(const proxy::TunnelState& t) {
  size_t n = t.fd >= 0 ? 1 : 0;
  for (const proxy::BridgeState& b : t.bridges) n += b.fd >= 0 ? 1 : 0;
  return n;
}

size_t encoded_size(const proxy::TunnelState& t) {
  size_t n = 512 + t.record.partial_input.size() + t.record.output.size() + t.session.partial_input.size() +
             t.session.output.size() + t.client_id.size() + t.peer_info.cert_subject.size() +
             t.peer_info.alpn.size() + t.peer_info.suite_name.size() + 12 * t.session.pings.size() +
             4 * t.session.remote_ids_ahead.size();
  for (const auto& [id, s] : t.session.streams) n += 32 + s.inbound.size();
  for (const proxy::BridgeState& b : t.bridges) n += 64 + b.route.size() + b.pending.size();
  n += 96 + t.resume.identity.size() + t.resume.log.kept.size();
  return n;
}

void encode_batch(const Batch& b, std::vector<uint8_t>& out, std::vector<int>& fds, uint16_t version_override) {
  size_t nfds = 0;
  for (const proxy::TunnelState& t : b.tunnels) nfds += fd_count(t);
  size_t at;
  begin(out, MsgType::batch, uint8_t(std::min(nfds, kMaxFdsPerMessage)), at);
  Writer w(out);
  w.u32(b.seq);
  const uint16_t written = version_override ? version_override : b.state_version;
  // A test's unknown version still carries a layout this build knows.
  const uint16_t version = written >= kMinStateVersion && written <= kStateVersion ? written : kStateVersion;
  w.u16(written);
  w.u32(uint32_t(b.tunnels.size()));
  uint16_t next_fd = 0;
  for (const proxy::TunnelState& t : b.tunnels) {
    size_t len_at = w.size();
    w.u32(0);
    put_tunnel(w, t, next_fd, version);
    w.patch_u32(len_at, uint32_t(w.size() - len_at - 4));
    if (t.fd >= 0) fds.push_back(t.fd);
    for (const proxy::BridgeState& br : t.bridges)
      if (br.fd >= 0) fds.push_back(br.fd);
  }
  finish(out, at);
}

BatchResult decode_batch(std::span<const uint8_t> body, std::span<const int> fds, Batch& out) {
  BatchResult res;
  Reader r(body);
  out.seq = r.u32("seq");
  out.state_version = r.u16("state version");
  if (r.ok() && (out.state_version < kMinStateVersion || out.state_version > kStateVersion)) {
    res.error = BatchError::unknown_version;
    res.message = "tunnel state version " + std::to_string(out.state_version) + " (this build reads versions " +
                  std::to_string(kMinStateVersion) + ".." + std::to_string(kStateVersion) + ")";
    return res;
  }
  uint32_t n = r.count("tunnel count", kMaxTunnelsPerBatch, 64);
  std::vector<bool> used(fds.size(), false);
  auto take = [&](int& index) {
    if (index < 0) return;
    if (size_t(index) >= fds.size() || used[size_t(index)]) {
      r.fail("descriptor index " + std::to_string(index) + " invalid or used twice");
      return;
    }
    used[size_t(index)] = true;
    index = fds[size_t(index)];
  };
  for (uint32_t i = 0; i < n && r.ok(); ++i) {
    uint32_t len = r.u32("tunnel length");
    if (!r.need(len, "tunnel")) break;
    size_t start = r.pos();
    proxy::TunnelState t;
    get_tunnel(r, t, out.state_version);
    if (r.ok() && r.pos() - start != len) r.fail("tunnel length does not match its contents");
    take(t.fd);
    for (proxy::BridgeState& b : t.bridges) take(b.fd);
    if (r.ok()) out.tunnels.push_back(std::move(t));
  }
  if (r.ok() && std::find(used.begin(), used.end(), false) != used.end())
    r.fail(std::to_string(std::count(used.begin(), used.end(), false)) + " descriptors came with no tunnel to use them");
  std::string err = finish_read(r);
  if (!err.empty()) {
    // The fds stay with the caller; the states must not claim them.
    out.tunnels.clear();
    res.error = BatchError::malformed;
    res.message = err;
  }
  return res;
}

void encode_tunnel(const proxy::TunnelState& t, std::vector<uint8_t>& out, uint16_t version) {
  Writer w(out);
  uint16_t next_fd = 0;
  put_tunnel(w, t, next_fd, version);
}

std::string decode_tunnel(std::span<const uint8_t> in, proxy::TunnelState& out, uint16_t version) {
  Reader r(in);
  get_tunnel(r, out, version);
  return finish_read(r);
}

}  // namespace baton::handoff
