// A whole tunnel handed over mid-stream, in memory (ARCHITECTURE principle
// 9): a client end and a server end (TLS record layer + yamux session each,
// the server with upstream bridges) talk through two byte queues; at chosen
// steps the server is exported into a proxy::TunnelState, carried through the
// handoff codec (alone and in a batch with renumbered fds), rebuilt, and the
// conversation goes on. converse() returns what crossed the wires, so a run
// with hand-overs can be compared with its twin without.
//
// Used by tests/unit/handoff_codec_test.cc (GoogleTest) and by the fuzz
// target tests/fuzz/handoff_midstream_fuzz.cc, where the fuzzer's input is
// the dice; the EXPECT_* checks come from GoogleTest or from
// tests/fuzz/expect_shim.h.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../fuzz/null_handler.h"
#include "handoff/codec.h"
#include "mux/session.h"
#include "proxy/link_core.h"
#include "proxy/state.h"
#include "tls/context.h"
#include "tls/record.h"
#include "util/bytes.h"

namespace handoff_world {

using namespace baton;
using namespace baton;
using handoff::Batch;
using handoff::BatchError;
using handoff::BatchResult;
using handoff::Header;
using handoff::MsgType;
using handoff::ParseStatus;
using proxy::BridgePhase;
using proxy::BridgeState;
using proxy::LinkPhase;
using proxy::TunnelState;
using util::ByteQueue;


using V = std::vector<uint8_t>;

// Where two byte vectors first differ (for messages that must not print megabytes).
inline std::string diff(const V& a, const V& b) {
  auto m = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return "sizes " + std::to_string(a.size()) + " and " + std::to_string(b.size()) + ", first difference at " +
         std::to_string(m.first - a.begin());
}

inline V take_front(ByteQueue& q, size_t n) {
  V v(std::min(n, q.size()));
  q.peek(v);
  q.pop(v.size());
  return v;
}

// The bytes of every stream are a function of (seed, stream, direction,
// offset), so a receiver checks each byte without a copy of what was sent.
inline uint8_t pattern(uint32_t seed, uint32_t id, uint32_t dir, uint64_t pos) {
  uint64_t x = (uint64_t(seed) << 40) ^ (uint64_t(id) << 2) ^ dir ^ (pos * 0x9E3779B97F4A7C15ull);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return uint8_t(x);
}
inline V pattern_bytes(uint32_t seed, uint32_t id, uint32_t dir, uint64_t pos, size_t n) {
  V v(n);
  for (size_t i = 0; i < n; ++i) v[i] = pattern(seed, id, dir, pos + i);
  return v;
}
constexpr uint32_t kUp = 0;    // client -> server -> upstream
constexpr uint32_t kDown = 1;  // upstream -> server -> client

struct Fnv {
  uint64_t h = 1469598103934665603ull;
  uint64_t n = 0;
  void add(std::span<const uint8_t> b) {
    for (uint8_t c : b) h = (h ^ c) * 1099511628211ull;
    n += b.size();
  }
  bool operator==(const Fnv&) const = default;
};

// What the world outside the two processes knows about a stream: how much
// each end handed over and how much arrived.
struct Truth {
  uint64_t up_target = 0, down_target = 0;
  uint64_t up_sent = 0;        // accepted by the client's write()
  uint64_t up_delivered = 0;   // reached the upstream (kernel took it)
  uint64_t down_produced = 0;  // read from the upstream by the server
  uint64_t down_received = 0;  // consumed by the client
  bool reset = false;
  bool client_closed = false, server_closed = false;
  bool upstream_shutdown = false;
};

struct World {
  uint32_t seed = 0;
  uint64_t now = 5'000'000;
  std::map<uint32_t, Truth> streams;
  std::map<uint32_t, uint64_t> server_pings, client_pings;  // outstanding: value -> sent_at
  std::vector<std::string> events;                          // ping answers, in order
  uint32_t next_server_ping = 1, next_client_ping = 0x10000;  // ping values (the clock and dice are injected too)
  ByteQueue wire_up, wire_down;                             // bytes in the kernel, both ways
  Fnv hash_up, hash_down;                                   // everything that went on the wire
  bool broken = false;
  void fail(const std::string& what) {
    if (!broken) ADD_FAILURE() << "seed " << seed << ": " << what;
    broken = true;
  }
  // A ping answer: for an outstanding ping, sent at that time.
  void answered(std::map<uint32_t, uint64_t>& pings, const std::string& who, uint32_t value, uint64_t sent_at) {
    auto it = pings.find(value);
    if (it == pings.end() || it->second != sent_at) fail(who + ": wrong ping answer");
    else pings.erase(it);
    events.push_back(who + " pong " + std::to_string(value));
  }
};

using fuzz::NullHandler;  // shared with the fuzz targets

// Opens records from `in` and feeds their plaintext to `ses`.
inline void receive_records(World& w, tls::RecordLayer& rec, mux::Session& ses, V& scratch, std::span<const uint8_t> in) {
  while (!w.broken) {
    tls::Opened o = rec.open(in, scratch);
    in = in.subspan(o.used);
    if (o.status == tls::OpenStatus::data) {
      if (o.plaintext.empty()) continue;
      mux::ConsumeResult r = ses.consume(o.plaintext);
      if (r.status != mux::ConsumeStatus::ok) w.fail(std::string("yamux: ") + (r.error ? r.error : "?"));
      continue;
    }
    if (o.status != tls::OpenStatus::need_more) w.fail(std::string("TLS: ") + o.reason);
    if (!in.empty()) w.fail("TLS left input");
    return;
  }
}

// Seals up to `max` bytes of session output into records.
inline void seal_some(mux::Session& ses, tls::RecordLayer& rec, size_t max) {
  size_t n = std::min(max, ses.output().size());
  if (n == 0) return;
  V v = take_front(ses.output(), n);
  rec.seal(v);
}

// ---------------------------------------------------------------------------
// The client: not exported, an ordinary in-memory peer.
class ClientEnd final : public mux::SessionHandler {
 public:
  ClientEnd(World& w, tls::RecordState rs) : w_(w), rec_(std::move(rs)), ses_(mux::Role::client, *this) {}

  void on_stream_opened(uint32_t id) override {  // the server opened it
    if (!w_.streams.count(id)) w_.fail("client: unknown server stream " + std::to_string(id));
    live_.insert(id);
    ses_.accept(id);
  }
  void on_stream_data(uint32_t) override {}
  void on_stream_fin(uint32_t) override {}
  void on_stream_reset(uint32_t id) override {
    if (!w_.streams[id].reset) w_.fail("client: unexpected reset of " + std::to_string(id));
    live_.erase(id);
  }
  void on_stream_writable(uint32_t) override {}
  void on_stream_closed(uint32_t id) override {
    w_.streams[id].client_closed = true;
    live_.erase(id);
  }
  void on_ping_answered(uint32_t value, uint64_t sent_at) override { w_.answered(w_.client_pings, "client", value, sent_at); }
  void on_go_away(mux::GoAwayCode) override { w_.fail("client: Go Away"); }

  void open(uint64_t up, uint64_t down) {
    uint32_t id = ses_.open();
    if (id == 0) return w_.fail("client: open failed");
    Truth& t = w_.streams[id];
    t.up_target = up;
    t.down_target = down;
    live_.insert(id);
  }
  void write(uint32_t id, size_t max) {
    Truth& t = w_.streams[id];
    if (!live_.count(id) || fin_.count(id)) return;
    size_t n = size_t(std::min<uint64_t>(max, t.up_target - t.up_sent));
    if (n == 0) return;
    V v = pattern_bytes(w_.seed, id, kUp, t.up_sent, n);
    t.up_sent += ses_.write(id, v);
  }
  void consume(uint32_t id, size_t max) {
    const ByteQueue* in = ses_.inbound(id);
    size_t n = std::min(max, in->size());
    if (n == 0) return;
    V v(n);
    in->peek(v);
    Truth& t = w_.streams[id];
    if (v != pattern_bytes(w_.seed, id, kDown, t.down_received, n)) w_.fail("client: wrong bytes on stream " + std::to_string(id));
    t.down_received += n;
    ses_.consumed(id, n);
  }
  void maybe_fin(uint32_t id) {
    const Truth& t = w_.streams[id];
    if (id == 1 || !live_.count(id) || fin_.count(id) || t.up_sent != t.up_target) return;
    fin_.insert(id);
    ses_.close_write(id);
  }
  void ping() {
    uint32_t value = w_.next_client_ping++;
    if (ses_.ping(value, w_.now)) w_.client_pings[value] = w_.now;
  }
  void seal(size_t max) { seal_some(ses_, rec_, max); }
  void transmit(size_t max) {
    V v = take_front(rec_.output(), max);
    w_.hash_up.add(v);
    w_.wire_up.append(v);
  }
  void receive(size_t max) {
    V v = take_front(w_.wire_down, max);
    receive_records(w_, rec_, ses_, scratch_, v);
  }
  // Ids of live streams (a copy: callbacks change the set).
  std::vector<uint32_t> streams() const { return {live_.begin(), live_.end()}; }
  bool quiet() { return ses_.output().empty() && rec_.output().empty(); }
  const mux::Session& session() const { return ses_; }

 private:
  World& w_;
  tls::RecordLayer rec_;
  mux::Session ses_;
  std::set<uint32_t> live_, fin_;
  V scratch_ = V(tls::kScratchSize);
};

// ---------------------------------------------------------------------------
// The server: proxy::LinkCore (record layer, session, phase, counters: what
// proxy::Link runs) plus bridges and tunnel fields as plain data, so it is
// exported and adopted as proxy::Tunnel is.
class ServerEnd final : public mux::SessionHandler {
 public:
  static constexpr uint32_t kMaxDataStreams = 1024;  // proxy::LinkLimits' default

  ServerEnd(World& w, tls::RecordState rs) : w_(w), core_(mux::Role::server, *this, kMaxDataStreams, w.now) {
    core_.secure(std::move(rs), {true, "baton/1", "CN=edge-" + std::to_string(w.seed) + ",O=baton",
                                 "TLS-ECDHE-ECDSA-WITH-AES"});
    core_.set_phase(LinkPhase::serving);
    t_.fd = 900;
    for (size_t i = 0; i < t_.session_id.size(); ++i) t_.session_id[i] = uint8_t(w.seed * 31 + i);
    t_.client_id = "client-" + std::to_string(w.seed);
    t_.counted = true;
  }

  // Tunnel::adopt: rebuild from the state, then drop the bytes the old
  // process's upstream writes had already handed to the kernel.
  ServerEnd(World& w, TunnelState&& st) : w_(w), core_(st, *this, kMaxDataStreams, w.now) {
    for (BridgeState& b : st.bridges) bridges_.emplace(b.id, std::move(b));
    st.bridges.clear();
    t_ = std::move(st);  // the tunnel fields (the core took its own)
    flush_in_flight();
  }

  // Link::export_link: the fd as it is (nothing in flight: 0 bytes written).
  TunnelState export_state() {
    TunnelState st;
    st.fd = t_.fd;
    core_.export_into(st, 0, w_.now);
    st.session_id = t_.session_id;
    st.client_id = t_.client_id;
    st.control_open = t_.control_open;
    st.counted = t_.counted;
    for (auto& [id, b] : bridges_) st.bridges.push_back(std::move(b));
    bridges_.clear();
    return st;
  }

  // The upstream writes in flight complete: their bytes leave the inbound queues.
  void flush_in_flight() {
    for (uint32_t id : bridge_ids()) complete(id);
  }

  void on_stream_opened(uint32_t id) override {
    if (!w_.streams.count(id)) w_.fail("server: unknown stream " + std::to_string(id));
    if (id == 1) return;  // the control stream has no bridge
    BridgeState b;
    b.id = id;
    b.phase = BridgePhase::awaiting_preamble;
    bridges_.emplace(id, std::move(b));
  }
  void on_stream_data(uint32_t) override {}
  void on_stream_fin(uint32_t id) override {
    auto it = bridges_.find(id);
    if (it != bridges_.end()) it->second.peer_fin = true;
  }
  void on_stream_reset(uint32_t id) override { w_.fail("server: unexpected reset of " + std::to_string(id)); }
  void on_stream_writable(uint32_t) override {}
  void on_stream_closed(uint32_t id) override {
    // Both FINs, every inbound byte consumed: the upstream has all of it and its FIN.
    w_.streams[id].server_closed = true;
    w_.streams[id].upstream_shutdown = true;
    bridges_.erase(id);
  }
  void on_ping_answered(uint32_t value, uint64_t sent_at) override { w_.answered(w_.server_pings, "server", value, sent_at); }
  void on_go_away(mux::GoAwayCode) override { w_.fail("server: Go Away"); }

  // The control stream: accept it, read what the client sent.
  void control(size_t max) {
    if (!core_.session()->has_stream(1)) return;
    core_.session()->accept(1);
    t_.control_open = true;
    const ByteQueue* in = core_.session()->inbound(1);
    size_t n = std::min(max, in->size());
    if (n == 0) return;
    V v(n);
    in->peek(v);
    Truth& t = w_.streams[1];
    if (v != pattern_bytes(w_.seed, 1, kUp, t.up_delivered, n)) w_.fail("server: wrong control bytes");
    t.up_delivered += n;
    core_.session()->consumed(1, n);
  }
  // A bridge moves on: preamble read -> upstream dialled -> relaying.
  void advance(uint32_t id) {
    BridgeState& b = bridges_.at(id);
    if (b.phase == BridgePhase::awaiting_preamble) {
      b.phase = BridgePhase::awaiting_upstream;
      b.route = "route-" + std::to_string(id % 5);
    } else if (b.phase == BridgePhase::awaiting_upstream) {
      b.phase = BridgePhase::relaying;
      b.fd = int(100000 + id);
      core_.session()->accept(id);
    }
  }
  // The upstream sends up to `max` bytes; they wait in `pending` for window.
  void produce(uint32_t id, size_t max) {
    BridgeState& b = bridges_.at(id);
    Truth& t = w_.streams[id];
    if (b.phase != BridgePhase::relaying || b.tcp_eof) return;
    size_t n = size_t(std::min<uint64_t>(max, t.down_target - t.down_produced));
    b.pending.append(pattern_bytes(w_.seed, id, kDown, t.down_produced, n));
    t.down_produced += n;
    if (t.down_produced == t.down_target) b.tcp_eof = true;
  }
  void write(uint32_t id, size_t max) {
    BridgeState& b = bridges_.at(id);
    if (b.phase != BridgePhase::relaying) return;
    if (!b.pending.empty() && !b.fin_sent) {
      V v(std::min(max, b.pending.size()));
      b.pending.peek(v);
      size_t n = core_.session()->write(id, v);
      b.pending.pop(n);
      b.bytes_down += n;
    }
    if (b.tcp_eof && b.pending.empty() && !b.fin_sent) {
      b.fin_sent = true;
      core_.session()->close_write(id);  // may close the stream and erase the bridge
    }
  }
  // Starts an upstream write of up to `max` more inbound bytes (the kernel
  // takes them; they leave the inbound queue when the write completes).
  void deliver(uint32_t id, size_t max) {
    BridgeState& b = bridges_.at(id);
    if (b.phase != BridgePhase::relaying) return;
    const ByteQueue* in = core_.session()->inbound(id);
    size_t n = std::min<size_t>(max, in->size() - b.upstream_written);
    if (n == 0) return;
    V v(size_t(b.upstream_written) + n);
    in->peek(v);
    Truth& t = w_.streams[id];
    if (!std::equal(v.begin() + ptrdiff_t(b.upstream_written), v.end(),
                    pattern_bytes(w_.seed, id, kUp, t.up_delivered, n).begin()))
      w_.fail("server: wrong bytes on stream " + std::to_string(id));
    t.up_delivered += n;
    b.upstream_written += n;
    b.bytes_up += n;
  }
  void complete(uint32_t id) {
    BridgeState& b = bridges_.at(id);
    uint64_t n = b.upstream_written;
    if (n == 0) return;
    b.upstream_written = 0;
    core_.session()->consumed(id, size_t(n));  // may close the stream and erase the bridge
  }
  void maybe_shutdown(uint32_t id) {
    BridgeState& b = bridges_.at(id);
    if (b.peer_fin && !b.shutdown_done && b.upstream_written == 0 && core_.session()->inbound(id)->empty() &&
        b.phase == BridgePhase::relaying) {
      b.shutdown_done = true;
      w_.streams[id].upstream_shutdown = true;
    }
  }
  void open(uint64_t up, uint64_t down) {
    uint32_t id = core_.session()->open();
    if (id == 0) return w_.fail("server: open failed");
    Truth& t = w_.streams[id];
    t.up_target = up;
    t.down_target = down;
    BridgeState b;
    b.id = id;
    b.phase = BridgePhase::relaying;
    b.route = "reverse";
    b.fd = int(100000 + id);
    bridges_.emplace(id, std::move(b));
  }
  void reset(uint32_t id) {
    w_.streams[id].reset = true;
    core_.session()->reset(id);
    bridges_.erase(id);
  }
  void ping() {
    uint32_t value = w_.next_server_ping++;
    if (core_.session()->ping(value, w_.now)) w_.server_pings[value] = w_.now;
  }
  void seal(size_t max) { seal_some(*core_.session(), *core_.record(), max); }
  void seal_all() { core_.seal(); }
  void transmit(size_t max) {
    V v = take_front(core_.record()->output(), max);
    core_.counters().bytes_out += v.size();
    w_.hash_down.add(v);
    w_.wire_down.append(v);
  }
  void receive(size_t max) {
    V v = take_front(w_.wire_up, max);
    if (v.empty()) return;
    core_.received(v.size(), w_.now);
    proxy::InputResult r = core_.input(v, scratch_);
    if (r.status != proxy::InputStatus::ok) w_.fail(std::string("server: ") + r.reason);
  }

  std::vector<uint32_t> bridge_ids() const {
    std::vector<uint32_t> ids;
    for (const auto& [id, b] : bridges_) ids.push_back(id);
    return ids;
  }
  bool has_bridge(uint32_t id) const { return bridges_.count(id) != 0; }
  bool quiet() const { return core_.session()->output().empty() && core_.record()->state().output.empty(); }
  const mux::Session& session() const { return *core_.session(); }

 private:
  World& w_;
  proxy::LinkCore core_;
  std::map<uint32_t, BridgeState> bridges_;
  TunnelState t_;  // tunnel fields only (core and bridges live above)
  V scratch_ = V(tls::kScratchSize);
};

// ---------------------------------------------------------------------------

struct KeyPair {
  tls::RecordState client, server;
};
inline KeyPair make_keys(uint16_t suite, uint32_t seed) {
  std::mt19937_64 rng(seed * 1000003ull + suite);
  tls::Cipher c;
  EXPECT_TRUE(tls::cipher_of_suite(suite, c));
  tls::DirectionState up, down;
  for (tls::DirectionState* d : {&up, &down}) {
    for (size_t i = 0; i < tls::key_length(c); ++i) d->key[i] = uint8_t(rng());
    for (size_t i = 0; i < tls::fixed_iv_length(c); ++i) d->iv[i] = uint8_t(rng());
    d->seq = 1 + (rng() >> 20);  // sequence numbers with high bits set
  }
  KeyPair k;
  k.client.suite = k.server.suite = suite;
  k.client.side = tls::Side::client;
  k.server.side = tls::Side::server;
  k.client.write = k.server.read = up;
  k.client.read = k.server.write = down;
  return k;
}

// What a state carried at an export, counted over many exports: the test
// proves its random points hit every kind of buffered state.
struct Stats {
  int exports = 0, tls_partial = 0, tls_output = 0, mux_partial = 0, mux_skip = 0, mux_output = 0, inbound = 0,
      pings = 0, ping_replies = 0, in_flight = 0, pending = 0, preamble = 0, upstream = 0, awaiting_accept = 0,
      half_closed = 0, server_stream = 0;
  void add(const TunnelState& st) {
    ++exports;
    tls_partial += !st.record.partial_input.empty();
    tls_output += !st.record.output.empty();
    const mux::SessionState& s = st.session;
    mux_partial += !s.partial_input.empty();
    if (s.partial_input.size() == mux::kHeaderSize) {
      V h = s.partial_input.to_vector();
      mux_skip += h[1] == 0 && util::load_u32(&h[4]) == 0;
    }
    mux_output += !s.output.empty();
    pings += !s.pings.empty();
    ping_replies += s.ping_replies_queued > 0;
    bool in = false, acc = false, half = false, even = false;
    for (const auto& [id, ss] : s.streams) {
      in |= !ss.inbound.empty();
      acc |= ss.phase == mux::StreamPhase::awaiting_accept;
      half |= ss.local_fin != ss.remote_fin;
      even |= id % 2 == 0;
    }
    inbound += in;
    awaiting_accept += acc;
    half_closed += half;
    server_stream += even;
    bool fl = false, pe = false, pre = false, up = false;
    for (const BridgeState& b : st.bridges) {
      fl |= b.upstream_written > 0;
      pe |= !b.pending.empty();
      pre |= b.phase == BridgePhase::awaiting_preamble;
      up |= b.phase == BridgePhase::awaiting_upstream;
    }
    in_flight += fl;
    pending += pe;
    preamble += pre;
    upstream += up;
  }
  std::string str() const {
    return "exports " + std::to_string(exports) + ": tls_partial " + std::to_string(tls_partial) + ", tls_output " +
           std::to_string(tls_output) + ", mux_partial " + std::to_string(mux_partial) + " (skip " +
           std::to_string(mux_skip) + "), mux_output " + std::to_string(mux_output) + ", inbound " +
           std::to_string(inbound) + ", pings " + std::to_string(pings) + ", ping_replies " +
           std::to_string(ping_replies) + ", in_flight " + std::to_string(in_flight) + ", pending " +
           std::to_string(pending) + ", preamble " + std::to_string(preamble) + ", upstream " +
           std::to_string(upstream) + ", awaiting_accept " + std::to_string(awaiting_accept) + ", half_closed " +
           std::to_string(half_closed) + ", server_stream " + std::to_string(server_stream);
  }
};

// A second, small tunnel for batches: waiting for HELLO, one bridge dialling,
// one relaying.
inline TunnelState small_tunnel(int fd, int bridge_fd) {
  TunnelState t;
  t.phase = LinkPhase::awaiting_hello;
  t.fd = fd;
  t.record.suite = tls::suite::ecdhe_rsa_aes256_gcm_sha384;
  t.record.read.seq = t.record.write.seq = 1;
  t.session.next_local_id = 2;
  t.session.remote_next_id = 7;
  BridgeState a;
  a.id = 3;
  a.phase = BridgePhase::awaiting_upstream;
  a.route = "db";
  t.bridges.push_back(std::move(a));
  BridgeState b;
  b.id = 5;
  b.phase = BridgePhase::relaying;
  b.route = "api";
  b.fd = bridge_fd;
  b.pending.append(util::as_bytes("queued"));
  t.bridges.push_back(std::move(b));
  return t;
}

// The fds a batch must carry for `t`, in order.
inline std::vector<int> fds_of(const TunnelState& t) {
  std::vector<int> v;
  if (t.fd >= 0) v.push_back(t.fd);
  for (const BridgeState& b : t.bridges)
    if (b.fd >= 0) v.push_back(b.fd);
  return v;
}

// Carries a state through the codec every way the handoff uses it and
// returns what the new process decodes. `epoch` numbers the receiver's fds.
inline TunnelState carry(World& w, TunnelState st, int epoch) {
  V enc;
  handoff::encode_tunnel(st, enc);
  EXPECT_GE(handoff::encoded_size(st), enc.size());
  EXPECT_EQ(handoff::fd_count(st), fds_of(st).size());

  // Alone: decode, encode again: the same bytes.
  {
    TunnelState alone;
    std::string err = handoff::decode_tunnel(enc, alone);
    if (!err.empty()) w.fail("decode_tunnel: " + err);
    V again;
    handoff::encode_tunnel(alone, again);
    if (again != enc) w.fail("re-encoded tunnel differs: " + diff(enc, again));
    // The cores rebuilt from the decoded state give every field back.
    NullHandler nh;
    tls::RecordLayer rec(std::move(alone.record));
    mux::Session ses(std::move(alone.session), nh);
    alone.record = rec.take_state();
    alone.session = ses.take_state();
    V rebuilt;
    handoff::encode_tunnel(alone, rebuilt);
    if (rebuilt != enc) w.fail("state taken from rebuilt cores differs: " + diff(enc, rebuilt));
  }

  // In a batch, followed by a second, small tunnel; the receiver gets other fd numbers.
  Batch b;
  b.seq = uint32_t(epoch * 7);
  b.tunnels.push_back(std::move(st));
  b.tunnels.push_back(small_tunnel(901, 902));
  std::vector<int> sent_fds;
  V msg;
  handoff::encode_batch(b, msg, sent_fds);
  std::vector<int> expect_fds = fds_of(b.tunnels[0]);
  for (int fd : fds_of(b.tunnels[1])) expect_fds.push_back(fd);
  EXPECT_EQ(sent_fds, expect_fds);

  Header h;
  std::string err;
  EXPECT_EQ(handoff::parse_header(msg, h, err), ParseStatus::ok) << err;
  EXPECT_EQ(h.type, MsgType::batch);
  EXPECT_EQ(h.version, handoff::kProtocolVersion);
  EXPECT_EQ(h.fd_count, sent_fds.size());
  EXPECT_EQ(h.body_length, msg.size() - handoff::kHeaderSize);

  // SCM_RIGHTS gives the receiver other numbers for the same sockets.
  std::map<int, int> renumber;
  std::vector<int> recv_fds;
  for (size_t i = 0; i < sent_fds.size(); ++i) {
    recv_fds.push_back(int(epoch * 200000 + i));
    renumber[sent_fds[i]] = recv_fds.back();
  }
  renumber[-1] = -1;
  Batch got;
  BatchResult res = handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), recv_fds, got);
  if (res.error != BatchError::none) {
    w.fail("decode_batch: " + res.message);
    return {};
  }
  EXPECT_EQ(got.seq, b.seq);
  EXPECT_EQ(got.state_version, handoff::kStateVersion);
  if (got.tunnels.size() != 2) {
    w.fail("decode_batch: " + std::to_string(got.tunnels.size()) + " tunnels");
    return {};
  }
  for (size_t k = 0; k < 2; ++k) {
    const TunnelState& a = b.tunnels[k];
    const TunnelState& z = got.tunnels[k];
    EXPECT_EQ(z.fd, renumber.at(a.fd));
    EXPECT_EQ(z.bridges.size(), a.bridges.size());
    for (size_t j = 0; j < std::min(a.bridges.size(), z.bridges.size()); ++j) {
      EXPECT_EQ(z.bridges[j].id, a.bridges[j].id);
      EXPECT_EQ(z.bridges[j].fd, renumber.at(a.bridges[j].fd)) << "bridge " << a.bridges[j].id;
    }
  }
  // Apart from the fd numbers (indices in both encodings), the same bytes.
  V via_batch;
  handoff::encode_tunnel(got.tunnels[0], via_batch);
  if (via_batch != enc) w.fail("tunnel carried in a batch differs: " + diff(enc, via_batch));
  return std::move(got.tunnels[0]);
}

struct Outcome {
  Fnv up, down;
  std::vector<std::string> events;
  std::map<uint32_t, uint64_t> delivered;  // per stream: bytes that reached the other side, both ways
  int handoffs = 0;
};

constexpr int kSteps = 900;

// One conversation. With `handoff`, the server is exported and adopted at two
// random points; without, the same points only seal what the session queued
// (what export does) and complete the upstream writes in flight (what
// adoption does), so both runs must be byte-identical.
// `rng`: the dice (a std::mt19937 in the unit test, the fuzzer's input in
// tests/fuzz/handoff_midstream_fuzz.cc); the server is handed over at steps
// export_a and export_b of `steps`.
template <class Rng>
Outcome converse_with(uint16_t suite, uint32_t seed, bool handoff, Stats* stats, Rng rng, int steps, int export_a,
                      int export_b) {
  World w;
  w.seed = seed;
  auto amount = [&] { return size_t(1 + (rng() % 4 == 0 ? rng() % 40000 : rng() % 3000)); };
  // Stream lengths: some beyond the 256 KiB window, so credit runs out and comes back.
  auto size = [&] { return uint64_t(rng() % 3 == 0 ? rng() % 800000 : rng() % 100000); };

  KeyPair keys = make_keys(suite, seed);
  ClientEnd client(w, std::move(keys.client));
  auto server = std::make_unique<ServerEnd>(w, std::move(keys.server));
  client.open(1000 + rng() % 20000, 0);  // stream 1: control
  int opened = 1, server_opened = 0, resets = 0;
  Outcome out;

  auto pick = [&](const std::vector<uint32_t>& ids) -> uint32_t { return ids.empty() ? 0 : ids[rng() % ids.size()]; };

  for (int step = 0; step < steps && !w.broken; ++step) {
    w.now += rng() % 7;
    if (step == export_a || step == export_b) {
      if (handoff) {
        TunnelState st = server->export_state();
        if (stats) stats->add(st);
        server.reset();
        TunnelState adopted = carry(w, std::move(st), ++out.handoffs);
        server = std::make_unique<ServerEnd>(w, std::move(adopted));
      } else {
        server->seal_all();  // what export does: the session's queued frames become records
        server->flush_in_flight();
      }
    }
    switch (rng() % 22) {
      case 0:
        if (opened < 9 && client.streams().size() < 7) {
          client.open(size(), size());
          ++opened;
        }
        break;
      case 1: case 2: case 3: {
        uint32_t id = pick(client.streams());
        if (id) client.write(id, amount());
        break;
      }
      case 4: case 5: {
        uint32_t id = pick(client.streams());
        if (id) client.consume(id, amount());
        break;
      }
      case 6: client.seal(amount()); break;
      case 7: client.transmit(amount()); break;
      case 8: case 9: server->receive(amount()); break;
      case 10: {
        uint32_t id = pick(server->bridge_ids());
        if (id) server->advance(id);
        break;
      }
      case 11: case 12: {
        uint32_t id = pick(server->bridge_ids());
        if (!id) break;
        server->produce(id, amount());
        server->write(id, amount());
        break;
      }
      case 13: case 14: {
        uint32_t id = pick(server->bridge_ids());
        if (!id) break;
        if (rng() % 2) server->deliver(id, amount());
        else server->complete(id);
        if (server->has_bridge(id)) server->maybe_shutdown(id);
        break;
      }
      case 15: server->seal(amount()); break;
      case 16: server->transmit(amount()); break;
      case 17: client.receive(amount()); break;
      case 18:
        if (rng() % 2) server->ping();
        else client.ping();
        break;
      case 19: server->control(amount()); break;
      case 20: {
        uint32_t r = rng() % 40;
        if (r == 0 && server_opened < 2) {
          server->open(rng() % 60000, rng() % 60000);
          ++server_opened;
        } else if (r <= 3 && resets < 3) {
          uint32_t id = pick(server->bridge_ids());
          if (id) {
            server->reset(id);
            ++resets;
          }
        }
        break;
      }
      case 21: {
        uint32_t id = pick(client.streams());
        if (id) client.maybe_fin(id);
        break;
      }
    }
  }

  // Drain: everything flows until every stream is closed and the wires are empty.
  constexpr size_t kAll = SIZE_MAX;
  for (int round = 0; round < 20000 && !w.broken; ++round) {
    w.now += 10;
    for (uint32_t id : client.streams()) {
      client.write(id, kAll);
      client.consume(id, kAll);
      client.maybe_fin(id);
    }
    client.seal(kAll);
    client.transmit(kAll);
    server->receive(kAll);
    server->control(kAll);
    for (uint32_t id : server->bridge_ids()) {
      if (!server->has_bridge(id)) continue;
      server->advance(id);
      server->advance(id);
      server->produce(id, kAll);
      server->write(id, kAll);
      if (!server->has_bridge(id)) continue;
      server->deliver(id, kAll);
      server->complete(id);
      if (server->has_bridge(id)) server->maybe_shutdown(id);
    }
    server->seal(kAll);
    server->transmit(kAll);
    client.receive(kAll);
    bool done = w.wire_up.empty() && w.wire_down.empty() && client.quiet() && server->quiet() &&
                client.session().stream_count() == 1 && server->session().stream_count() == 1 &&
                server->bridge_ids().empty() && w.server_pings.empty() && w.client_pings.empty();
    if (done) break;
  }

  // Every byte arrived exactly once, in order (the pattern checks did the
  // order and content; the counts do loss and duplication).
  EXPECT_FALSE(w.broken);
  EXPECT_TRUE(w.wire_up.empty() && w.wire_down.empty()) << "seed " << seed << ": wires not drained";
  EXPECT_EQ(client.session().stream_count(), 1u) << "seed " << seed;
  EXPECT_EQ(server->session().stream_count(), 1u) << "seed " << seed;
  EXPECT_TRUE(w.server_pings.empty()) << "seed " << seed << ": server pings unanswered";
  EXPECT_TRUE(w.client_pings.empty()) << "seed " << seed << ": client pings unanswered";
  for (const auto& [id, t] : w.streams) {
    if (id == 1) {
      EXPECT_EQ(t.up_sent, t.up_target) << "seed " << seed;
      EXPECT_EQ(t.up_delivered, t.up_sent) << "seed " << seed << " control stream";
    } else if (t.reset) {
      EXPECT_LE(t.up_delivered, t.up_sent) << "seed " << seed << " stream " << id;
      EXPECT_LE(t.down_received, t.down_produced) << "seed " << seed << " stream " << id;
    } else {
      EXPECT_EQ(t.up_sent, t.up_target) << "seed " << seed << " stream " << id;
      EXPECT_EQ(t.up_delivered, t.up_sent) << "seed " << seed << " stream " << id;
      EXPECT_EQ(t.down_produced, t.down_target) << "seed " << seed << " stream " << id;
      EXPECT_EQ(t.down_received, t.down_produced) << "seed " << seed << " stream " << id;
      EXPECT_TRUE(t.client_closed && t.server_closed) << "seed " << seed << " stream " << id;
      EXPECT_TRUE(t.upstream_shutdown) << "seed " << seed << " stream " << id;
    }
    out.delivered[id] = t.up_delivered + t.down_received;
  }
  out.up = w.hash_up;
  out.down = w.hash_down;
  out.events = w.events;
  return out;
}

inline Outcome converse(uint16_t suite, uint32_t seed, bool handoff, Stats* stats) {
  std::mt19937 points(seed ^ 0x5eed);
  const int export_a = 40 + int(points() % (kSteps / 2));
  const int export_b = export_a + 1 + int(points() % (kSteps - 1 - export_a));
  return converse_with(suite, seed, handoff, stats, std::mt19937(seed * 65537u + suite), kSteps, export_a, export_b);
}

}  // namespace handoff_world
