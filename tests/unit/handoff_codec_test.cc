// The hot-restart state codec (src/handoff/codec.h).
//
// 1. ARCHITECTURE principle 9: two endpoints talk in memory (TLS record layer
//    + yamux session each, the server with upstream bridges); at random
//    points the server is exported into a proxy::TunnelState, carried through
//    the codec (alone and in a batch with renumbered fds), rebuilt, and the
//    conversation goes on. Every byte stream must arrive whole, and the run
//    must be byte-for-byte the same as a twin run without hand-overs.
// 2. Malformed input: truncations, flipped bytes, each validation rule, counts
//    and lengths that would allocate gigabytes.
// 3. The small messages of the handoff protocol.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../common/handoff_world.h"
#include "../fuzz/null_handler.h"
#include "handoff/codec.h"
#include "mux/session.h"
#include "proxy/bridge.h"
#include "proxy/link.h"
#include "proxy/state.h"
#include "tls/context.h"
#include "tls/record.h"
#include "util/bytes.h"

// ---- largest allocation, to show that absurd counts allocate nothing -------
// (std::string and std::vector go through operator new; ByteQueue uses malloc,
// but the codec appends to a queue only after checking the bytes are there.)
namespace {
std::atomic<bool> g_track_alloc{false};
std::atomic<size_t> g_largest_alloc{0};
}  // namespace

void* operator new(size_t n) {
  if (g_track_alloc.load(std::memory_order_relaxed)) {
    size_t cur = g_largest_alloc.load(std::memory_order_relaxed);
    while (n > cur && !g_largest_alloc.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
    }
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// noinline: GCC would otherwise see free() meet operator new and warn.
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, size_t) noexcept { std::free(p); }


namespace {

using namespace handoff_world;

class HandoffMidStream : public ::testing::TestWithParam<uint16_t> {};

// ARCHITECTURE principle 9, the whole tunnel: two hand-overs per conversation
// at random points, and the conversation is the same as without them.
TEST_P(HandoffMidStream, ExportCarryAdoptKeepTalking) {
  Stats stats;
  for (uint32_t seed = 1; seed <= 16; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    Outcome moved = converse(GetParam(), seed, true, &stats);
    Outcome twin = converse(GetParam(), seed, false, nullptr);
    EXPECT_EQ(moved.handoffs, 2);
    EXPECT_TRUE(moved.up == twin.up) << "client -> server bytes differ from the run without handoff";
    EXPECT_TRUE(moved.down == twin.down) << "server -> client bytes differ from the run without handoff";
    EXPECT_EQ(moved.events, twin.events);
    EXPECT_EQ(moved.delivered, twin.delivered);
    EXPECT_GT(moved.down.n, 0u);
  }
  // The random points caught the tunnel with every kind of state in flight.
  std::cout << "[          ] " << stats.str() << "\n";
  EXPECT_EQ(stats.exports, 32);
  for (int n : {stats.tls_partial, stats.tls_output, stats.mux_partial, stats.inbound, stats.pings,
                stats.ping_replies, stats.in_flight, stats.pending, stats.preamble, stats.upstream,
                stats.awaiting_accept, stats.half_closed})
    EXPECT_GT(n, 0) << stats.str();
  // The exporting core (proxy::LinkCore::export_into, what Link::export_link
  // runs) seals the frames its session queued: only record output travels.
  // The codec's carriage of a session's output is checked by rich_state().
  EXPECT_EQ(stats.mux_output, 0) << stats.str();
}

INSTANTIATE_TEST_SUITE_P(Suites, HandoffMidStream,
                         ::testing::Values(tls::suite::ecdhe_ecdsa_aes128_gcm_sha256,
                                           tls::suite::ecdhe_rsa_aes256_gcm_sha384,
                                           tls::suite::ecdhe_ecdsa_chacha20_poly1305));

// ===========================================================================
// Malformed input
// ===========================================================================

// A state with a bit of everything, small enough to try every byte.
TunnelState rich_state() {
  TunnelState t;
  t.phase = LinkPhase::serving;
  t.fd = 10;
  tls::RecordState& r = t.record;
  r.suite = tls::suite::ecdhe_ecdsa_chacha20_poly1305;
  for (size_t i = 0; i < 32; ++i) r.read.key[i] = uint8_t(i), r.write.key[i] = uint8_t(100 + i);
  for (size_t i = 0; i < 12; ++i) r.read.iv[i] = uint8_t(50 + i), r.write.iv[i] = uint8_t(150 + i);
  r.read.seq = 77;
  r.write.seq = 0x0102030405060708ull;
  r.partial_input.append(V{0x17, 0x03, 0x03, 0x00, 0x40, 'a', 'b', 'c'});
  r.output.append(V(30, 0xAB));
  mux::SessionState& s = t.session;
  s.next_local_id = 4;
  s.remote_next_id = 9;
  s.remote_ids_ahead = {13, 17};
  s.ping_replies_queued = 2;
  s.go_away_code = mux::GoAwayCode::normal;
  s.partial_input.append(V{0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 9, 'x'});
  s.output.append(V{0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1});
  auto stream = [&](uint32_t id, mux::StreamPhase p, std::string in) {
    mux::StreamState& st = s.streams[id];
    st.id = id;
    st.phase = p;
    st.inbound.append(util::as_bytes(in));
    st.recv_window = st.recv_window_max - uint32_t(in.size());
    return &st;
  };
  stream(1, mux::StreamPhase::open, "hello");
  stream(2, mux::StreamPhase::awaiting_ack, "")->local_fin = true;
  mux::StreamState* s5 = stream(5, mux::StreamPhase::awaiting_accept, "0123456789");
  s5->remote_fin = true;
  s5->send_window = 12;
  stream(7, mux::StreamPhase::open, "")->unacked_credit = 3;
  s.pings = {{9, 1234}, {10, 5678}};
  t.peer_info = {true, "baton/1", "CN=edge-7,O=baton", "TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256"};
  t.counters = {1, 2, 3, 4};
  t.idle_ms = 500;
  t.age_ms = 60000;
  for (size_t i = 0; i < 16; ++i) t.session_id[i] = uint8_t(0xC0 + i);
  t.client_id = "edge-7";
  t.control_open = true;
  t.counted = true;
  auto bridge = [&](uint32_t id, BridgePhase p, int fd, std::string route) {
    BridgeState b;
    b.id = id;
    b.phase = p;
    b.fd = fd;
    b.route = std::move(route);
    t.bridges.push_back(std::move(b));
    return &t.bridges.back();
  };
  bridge(2, BridgePhase::relaying, 11, "api")->pending.append(util::as_bytes("xyz"));
  BridgeState* b5 = bridge(5, BridgePhase::relaying, 12, "api");
  b5->upstream_written = 4;
  b5->bytes_up = 1ull << 40;
  b5->peer_fin = true;
  bridge(7, BridgePhase::awaiting_upstream, -1, "db");
  bridge(9, BridgePhase::awaiting_preamble, -1, "");
  bridge(11, BridgePhase::done, -1, "gone")->tcp_eof = true;
  t.resume.offered = true;
  for (size_t i = 0; i < 32; ++i) t.resume.secret[i] = uint8_t(0x5A ^ i);
  t.resume.identity = "token fleet";
  t.resume.log.keeping = true;
  t.resume.log.sent = 90000;
  t.resume.log.received = 70000;
  t.resume.log.reported = 65536;
  t.resume.log.kept.append(V(40, 0x3C));
  return t;
}

// rich_state() with its connection gone: detached (docs/protocol.md 9).
TunnelState detached_state() {
  TunnelState t = rich_state();
  t.phase = LinkPhase::detached;
  t.fd = -1;
  t.record = tls::RecordState{};
  t.resume.detached_ms = 4200;
  return t;
}

V encode(const TunnelState& t) {
  V v;
  handoff::encode_tunnel(t, v);
  return v;
}

// decode -> encode -> decode -> encode: the second encoding equals the first.
void expect_fixed_point(std::span<const uint8_t> in, const char* what, size_t pos) {
  TunnelState a;
  if (!handoff::decode_tunnel(in, a).empty()) return;
  V e1 = encode(a);
  TunnelState b;
  std::string err = handoff::decode_tunnel(e1, b);
  ASSERT_EQ(err, "") << what << " at " << pos;
  ASSERT_TRUE(encode(b) == e1) << what << " at " << pos;
}

std::string decode_error(const TunnelState& t) {
  V v = encode(t);
  TunnelState out;
  return handoff::decode_tunnel(v, out);
}

TEST(HandoffCodec, RichStateRoundTrips) {
  TunnelState t = rich_state();
  V enc = encode(t);
  TunnelState d;
  ASSERT_EQ(handoff::decode_tunnel(enc, d), "");
  EXPECT_TRUE(encode(d) == enc);
  // Spot checks of what came back.
  EXPECT_EQ(d.fd, 0);  // an index when decoded alone
  EXPECT_EQ(d.record.write.seq, 0x0102030405060708ull);
  EXPECT_EQ(d.record.partial_input.to_vector(), t.record.partial_input.to_vector());
  EXPECT_EQ(d.session.streams.size(), 4u);
  EXPECT_EQ(d.session.streams.at(5).inbound.to_vector(), t.session.streams.at(5).inbound.to_vector());
  EXPECT_EQ(d.session.streams.at(5).phase, mux::StreamPhase::awaiting_accept);
  EXPECT_EQ(d.session.pings.size(), 2u);
  EXPECT_EQ(d.session.pings[1].sent_at_ms, 5678u);
  EXPECT_EQ(d.peer_info.cert_subject, "CN=edge-7,O=baton");
  EXPECT_EQ(d.session_id, t.session_id);
  ASSERT_EQ(d.bridges.size(), 5u);
  EXPECT_EQ(d.bridges[0].fd, 1);
  EXPECT_EQ(d.bridges[1].fd, 2);
  EXPECT_EQ(d.bridges[1].bytes_up, 1ull << 40);
  EXPECT_EQ(d.bridges[2].fd, -1);
  EXPECT_EQ(d.bridges[4].phase, BridgePhase::done);
  EXPECT_EQ(handoff::fd_count(t), 3u);
  EXPECT_GE(handoff::encoded_size(t), enc.size());
}

TEST(HandoffCodec, EveryTruncationOfATunnelIsRefused) {
  V enc = encode(rich_state());
  for (size_t n = 0; n < enc.size(); ++n) {
    TunnelState out;
    EXPECT_NE(handoff::decode_tunnel(std::span(enc).first(n), out), "") << "prefix of " << n;
  }
}

TEST(HandoffCodec, EveryTruncationOfABatchIsRefused) {
  Batch b;
  b.seq = 3;
  b.tunnels.push_back(rich_state());
  b.tunnels.push_back(small_tunnel(20, 21));
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  ASSERT_EQ(fds, (std::vector<int>{10, 11, 12, 20, 21}));
  auto body = std::span<const uint8_t>(msg).subspan(handoff::kHeaderSize);
  {
    Batch ok;
    ASSERT_EQ(handoff::decode_batch(body, fds, ok).error, BatchError::none);
    ASSERT_EQ(ok.tunnels.size(), 2u);
  }
  for (size_t n = 0; n < body.size(); ++n) {
    Batch out;
    BatchResult r = handoff::decode_batch(body.first(n), fds, out);
    EXPECT_EQ(r.error, BatchError::malformed) << "prefix of " << n;
    EXPECT_FALSE(r.message.empty());
    EXPECT_TRUE(out.tunnels.empty());
  }
}

TEST(HandoffCodec, FlippedBytesAreRefusedOrReencodeConsistently) {
  V enc = encode(rich_state());
  int accepted = 0;
  for (size_t pos = 0; pos < enc.size(); ++pos) {
    for (uint8_t mask : {0x01, 0x02, 0x10, 0x80, 0xFF}) {
      V v = enc;
      v[pos] ^= mask;
      TunnelState out;
      if (handoff::decode_tunnel(v, out).empty()) ++accepted;
      expect_fixed_point(v, "flip", pos);
    }
  }
  EXPECT_GT(accepted, 0);  // key bytes, counters, payload bytes: anything goes there
}

TEST(HandoffCodec, FlippedBytesInABatchKeepDescriptorsAccountedFor) {
  Batch b;
  b.tunnels.push_back(rich_state());
  b.tunnels.push_back(small_tunnel(20, 21));
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  V body(msg.begin() + handoff::kHeaderSize, msg.end());
  for (size_t pos = 0; pos < body.size(); ++pos) {
    for (uint8_t mask : {0x01, 0x80, 0xFF}) {
      V v = body;
      v[pos] ^= mask;
      Batch out;
      BatchResult r = handoff::decode_batch(v, fds, out);
      if (r.error != BatchError::none) {
        EXPECT_TRUE(out.tunnels.empty()) << pos;
        continue;
      }
      // Accepted: every fd is claimed exactly once, and the batch re-encodes stably.
      std::vector<int> claimed;
      for (const TunnelState& t : out.tunnels)
        for (int fd : fds_of(t)) claimed.push_back(fd);
      std::sort(claimed.begin(), claimed.end());
      ASSERT_EQ(claimed, fds) << pos;
      V m2;
      std::vector<int> f2;
      handoff::encode_batch(out, m2, f2);
      Batch again;
      ASSERT_EQ(handoff::decode_batch(std::span(m2).subspan(handoff::kHeaderSize), f2, again).error, BatchError::none);
      V m3;
      std::vector<int> f3;
      handoff::encode_batch(again, m3, f3);
      ASSERT_TRUE(m2 == m3) << pos;
      ASSERT_EQ(f2, f3) << pos;
    }
  }
}

TEST(HandoffCodec, TrailingBytesAreRefused) {
  V enc = encode(rich_state());
  enc.push_back(0);
  TunnelState out;
  EXPECT_NE(handoff::decode_tunnel(enc, out).find("trailing"), std::string::npos);
}

TEST(HandoffCodec, ValidationRules) {
  auto refused = [](const TunnelState& t, const char* needle) {
    std::string err = decode_error(t);
    EXPECT_NE(err.find(needle), std::string::npos) << "expected \"" << needle << "\", got \"" << err << "\"";
  };
  ASSERT_EQ(decode_error(rich_state()), "");
  TunnelState t;

  t = rich_state(); t.record.suite = 0x009C;  // TLS_RSA_WITH_AES_128_GCM_SHA256: no ECDHE
  refused(t, "cipher suite");
  t = rich_state(); t.record.suite = 0xC013;  // CBC
  refused(t, "cipher suite");
  t = rich_state(); t.record.side = tls::Side::client;
  refused(t, "TLS side");
  t = rich_state(); t.session.role = mux::Role::client;
  refused(t, "yamux role");
  t = rich_state(); t.session.next_local_id = 3;
  refused(t, "even");
  t = rich_state(); t.session.next_local_id = 0;
  refused(t, "even");
  t = rich_state(); t.session.remote_next_id = 8;
  refused(t, "odd");
  t = rich_state(); t.session.remote_ids_ahead = {17, 13};
  refused(t, "increasing");
  t = rich_state(); t.session.remote_ids_ahead = {7};
  refused(t, "above the next id");
  t = rich_state(); t.session.go_away_code = mux::GoAwayCode(3);
  refused(t, "go away code");
  t = rich_state(); t.session.ping_replies_queued = 1025;
  refused(t, "ping replies");
  t = rich_state(); t.phase = LinkPhase::awaiting_handshake;
  refused(t, "cannot be handed over");
  t = rich_state(); t.phase = LinkPhase::flushing;
  refused(t, "cannot be handed over");
  t = rich_state(); t.phase = LinkPhase::closed;
  refused(t, "cannot be handed over");
  t = rich_state(); t.fd = -1;
  refused(t, "without a socket");

  // Streams.
  t = rich_state(); t.session.streams.at(5).phase = mux::StreamPhase(3);
  refused(t, "stream phase");
  t = rich_state(); t.session.streams.at(7).id = 3;  // written in map order: 1, 2, 5, 3
  refused(t, "ascending");
  t = rich_state(); t.session.streams.at(5).id = 2;  // 1, 2, 2, 7
  refused(t, "ascending");
  t = rich_state(); t.session.streams.at(1).id = 0;
  refused(t, "nonzero");
  t = rich_state(); t.session.streams.at(7).recv_window = t.session.streams.at(7).recv_window_max + 1;
  refused(t, "windows inconsistent");
  t = rich_state(); t.session.streams.at(5).recv_window_max = 9;  // holds 10 inbound bytes
  t.session.streams.at(5).recv_window = 0;
  refused(t, "windows inconsistent");
  t = rich_state(); t.session.streams.at(7).unacked_credit = t.session.streams.at(7).recv_window_max + 1;
  refused(t, "windows inconsistent");

  // Bridges.
  t = rich_state(); t.bridges[0].id = 1;  // the control stream has no bridge
  refused(t, "bridge stream id 1");
  t = rich_state(); t.bridges[0].id = 0;
  refused(t, "bridge stream id 0");
  t = rich_state(); t.bridges[3].id = 2;
  refused(t, "repeated");
  t = rich_state(); t.bridges[2].phase = BridgePhase(4);
  refused(t, "bridge phase");
  t = rich_state(); t.bridges[0].fd = -1;  // relaying without a socket
  refused(t, "a socket goes with relaying");
  t = rich_state(); t.bridges[2].fd = 13;  // awaiting_upstream with one
  refused(t, "a socket goes with relaying");
  t = rich_state(); t.bridges[4].fd = 13;  // done with one
  refused(t, "a socket goes with relaying");
  t = rich_state(); t.bridges[1].upstream_written = 11;  // stream 5 holds 10
  refused(t, "more written than was queued");
  t = rich_state(); t.bridges[0].upstream_written = 1;  // stream 2 holds nothing
  refused(t, "more written than was queued");
  t = rich_state(); t.bridges[1].upstream_written = 10;
  EXPECT_EQ(decode_error(t), "");

  // Lengths at and over their limits.
  t = rich_state();
  t.record.partial_input.clear();
  t.record.partial_input.append(V(tls::kHeaderSize + tls::kMaxCiphertext, 1));
  EXPECT_EQ(decode_error(t), "");
  t.record.partial_input.append(V{1});
  refused(t, "TLS partial input");
  t = rich_state(); t.client_id = std::string(4096, 'c');
  EXPECT_EQ(decode_error(t), "");
  t.client_id += 'c';
  refused(t, "client id");
  t = rich_state(); t.bridges[0].route = std::string(5000, 'r');
  refused(t, "route");
  t = rich_state(); t.session.pings.resize(1025);
  refused(t, "ping count");
}

TEST(HandoffCodec, NonBooleanFlagIsRefused) {
  TunnelState t = rich_state();
  V enc = encode(t);
  // Version 1 layout: phase 1, fd 2, suite 2, side 1, read 52, write 52, then close_notify_received.
  constexpr size_t kCloseNotifyReceived = 110;
  ASSERT_EQ(enc[kCloseNotifyReceived], 0);
  enc[kCloseNotifyReceived] = 2;
  TunnelState out;
  EXPECT_NE(handoff::decode_tunnel(enc, out).find("expected 0 or 1"), std::string::npos);
}

// Offsets in the encoding of an empty tunnel (version 1 layout, see
// put_tunnel): each length or count field is set to an absurd value.
TunnelState empty_tunnel(int fd = 5) {
  TunnelState t;
  t.phase = LinkPhase::serving;
  t.fd = fd;
  t.record.suite = tls::suite::ecdhe_ecdsa_aes128_gcm_sha256;
  t.session.next_local_id = 2;
  return t;
}
constexpr size_t kEmptyTunnelSize = 325;  // state version 3 (74 bytes of resume state)

// The one buffered state random runs seldom catch: the server is skipping the
// body of a Data frame for a stream it reset, and only part of that body has
// arrived (SessionState::partial_input holds the skip marker).
TEST(HandoffCodec, SkippedFrameBodySurvivesTheMove) {
  NullHandler nh;
  mux::Session client(mux::Role::client, nh);
  auto server = std::make_unique<mux::Session>(mux::Role::server, nh);
  uint32_t id = client.open();
  ASSERT_EQ(server->consume(take_front(client.output(), SIZE_MAX)).status, mux::ConsumeStatus::ok);
  server->reset(id);
  ASSERT_EQ(client.write(id, V(1000, 7)), 1000u);
  ASSERT_TRUE(client.ping(99, 1));
  V wire = take_front(client.output(), SIZE_MAX);  // Data header, 1000 bytes, Ping
  ASSERT_EQ(server->consume(std::span(wire).first(mux::kHeaderSize + 400)).status, mux::ConsumeStatus::ok);
  ASSERT_EQ(server->state().partial_input.size(), mux::kHeaderSize);  // the marker, no body bytes

  TunnelState st = empty_tunnel();
  st.session = server->take_state();
  server.reset();
  V enc = encode(st);
  TunnelState back;
  ASSERT_EQ(handoff::decode_tunnel(enc, back), "");
  mux::Session adopted(std::move(back.session), nh);
  ASSERT_EQ(adopted.consume(std::span(wire).subspan(mux::kHeaderSize + 400)).status, mux::ConsumeStatus::ok);
  EXPECT_EQ(adopted.stream_count(), 0u);
  EXPECT_TRUE(adopted.state().partial_input.empty());
  // The RST queued before the move, then the answer to the Ping behind the skipped body.
  V out = adopted.output().to_vector();
  V rst = {0, 1, 0, 8, 0, 0, 0, uint8_t(id), 0, 0, 0, 0};
  V pong = {0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 99};
  V expect = rst;
  expect.insert(expect.end(), pong.begin(), pong.end());
  EXPECT_EQ(out, expect);
}

TEST(HandoffCodec, OversizeCountsAndLengthsAllocateNothing) {
  V base = encode(empty_tunnel());
  ASSERT_EQ(base.size(), kEmptyTunnelSize) << "the layout changed: update the offsets below";
  struct Field {
    size_t at;
    const char* name;
  };
  const Field fields[] = {
      {112, "TLS partial input"}, {116, "TLS output"},          {133, "client ids ahead count"},
      {148, "yamux partial input"}, {152, "yamux output"},      {156, "stream count"},
      {160, "ping count"},        {165, "ALPN"},                {169, "certificate subject"},
      {173, "suite name"},        {241, "client id"},           {247, "bridge count"},
      {284, "resume identity"},   {313, "resume kept bytes"},
  };
  for (const Field& f : fields) {
    ASSERT_EQ(util::load_u32(&base[f.at]), 0u) << f.name;
    for (uint32_t n : {0xFFFFFFFFu, 0x80000000u, 64u << 20, 1u << 20, 4097u, 1000u}) {
      V v = base;
      util::store_u32(&v[f.at], n);
      TunnelState out;
      g_largest_alloc = 0;
      g_track_alloc = true;
      std::string err = handoff::decode_tunnel(v, out);
      g_track_alloc = false;
      EXPECT_NE(err.find(f.name), std::string::npos) << f.name << " = " << n << ": " << err;
      EXPECT_LT(g_largest_alloc.load(), size_t(4096)) << f.name << " = " << n;
    }
  }

  // The same in a batch: tunnel count and tunnel length.
  Batch b;
  b.tunnels.push_back(empty_tunnel());
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  V body(msg.begin() + handoff::kHeaderSize, msg.end());
  for (size_t at : {size_t(6), size_t(10)}) {  // seq 4, version 2, count 4, length 4
    for (uint32_t n : {0xFFFFFFFFu, 1u << 20, 1000u}) {
      V v = body;
      util::store_u32(&v[at], n);
      Batch out;
      g_largest_alloc = 0;
      g_track_alloc = true;
      BatchResult r = handoff::decode_batch(v, fds, out);
      g_track_alloc = false;
      EXPECT_EQ(r.error, BatchError::malformed) << at << " = " << n;
      EXPECT_LT(g_largest_alloc.load(), size_t(4096)) << at << " = " << n;
    }
  }

  // Counters in server_state and commit.
  V cm;
  handoff::encode_commit({}, cm);
  V cbody(cm.begin() + handoff::kHeaderSize, cm.end());
  util::store_u32(cbody.data(), 0xFFFFFFFFu);
  handoff::Commit c;
  EXPECT_NE(handoff::decode_commit(cbody, c).find("counter count"), std::string::npos);
  V ss;
  handoff::encode_server_state({}, ss);
  V sbody(ss.begin() + handoff::kHeaderSize, ss.end());
  util::store_u32(&sbody[12], 0xFFFFFFFFu);  // pid 4, epoch 8, counters
  handoff::ServerStateMsg sm;
  EXPECT_NE(handoff::decode_server_state(sbody, sm).find("counter count"), std::string::npos);
}

// Two empty tunnels in a batch; the offsets of their fd indices in the body.
struct TwoTunnels {
  V body;
  std::vector<int> fds;
  static constexpr size_t kFirstFd = 4 + 2 + 4 + 4 + 1;
  static constexpr size_t kSecondFd = kFirstFd + kEmptyTunnelSize + 4;
  TwoTunnels() {
    Batch b;
    b.seq = 9;
    b.tunnels.push_back(empty_tunnel(40));
    b.tunnels.push_back(empty_tunnel(41));
    V msg;
    handoff::encode_batch(b, msg, fds);
    body.assign(msg.begin() + handoff::kHeaderSize, msg.end());
  }
  BatchResult decode(const V& v, std::vector<int> with, Batch& out) const { return handoff::decode_batch(v, with, out); }
};

TEST(HandoffCodec, BatchDescriptorRules) {
  TwoTunnels tt;
  ASSERT_EQ(tt.fds, (std::vector<int>{40, 41}));
  ASSERT_EQ(util::load_u16(&tt.body[TwoTunnels::kFirstFd]), 0);
  ASSERT_EQ(util::load_u16(&tt.body[TwoTunnels::kSecondFd]), 1);
  {
    Batch out;
    ASSERT_EQ(tt.decode(tt.body, {7, 8}, out).error, BatchError::none);
    ASSERT_EQ(out.tunnels.size(), 2u);
    EXPECT_EQ(out.seq, 9u);
    EXPECT_EQ(out.tunnels[0].fd, 7);  // mapped to the receiver's numbers
    EXPECT_EQ(out.tunnels[1].fd, 8);
  }
  auto refused = [&](const V& body, std::vector<int> fds, const char* needle) {
    Batch out;
    BatchResult r = tt.decode(body, fds, out);
    EXPECT_EQ(r.error, BatchError::malformed) << needle;
    EXPECT_NE(r.message.find(needle), std::string::npos) << "expected \"" << needle << "\", got \"" << r.message << "\"";
    EXPECT_TRUE(out.tunnels.empty());  // no state claims an fd: the caller closes them all
  };
  V v = tt.body;
  util::store_u16(&v[TwoTunnels::kSecondFd], 0);
  refused(v, {7, 8}, "used twice");
  util::store_u16(&v[TwoTunnels::kSecondFd], 2);
  refused(v, {7, 8}, "invalid");
  util::store_u16(&v[TwoTunnels::kSecondFd], 0xFFFF);
  refused(v, {7, 8}, "without a socket");
  refused(tt.body, {7}, "invalid");                    // one fd short
  refused(tt.body, {}, "invalid");
  refused(tt.body, {7, 8, 9}, "came with no tunnel");  // one too many
  V trailing = tt.body;
  trailing.push_back(0);
  refused(trailing, {7, 8}, "trailing");
  // The tunnel length must match what the tunnel holds.
  for (uint32_t len : {uint32_t(kEmptyTunnelSize - 1), uint32_t(kEmptyTunnelSize + 1)}) {
    V l = tt.body;
    util::store_u32(&l[10], len);
    Batch out;
    EXPECT_EQ(tt.decode(l, {7, 8}, out).error, BatchError::malformed) << len;
    EXPECT_TRUE(out.tunnels.empty());
  }
}

// A process that reads only version 1 (an older baton taking over from this
// one) gets the layout it knows: ids spent out of order become "every id up to
// the highest spent", which refuses nothing a conforming peer still sends
// except the few ids of an open race, and loses nothing else.
TEST(HandoffCodec, VersionOneCarriesTheHighestSpentId) {
  Batch b;
  b.seq = 5;
  b.state_version = 1;
  b.tunnels.push_back(rich_state());  // remote_next_id 9, ahead {13, 17}
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  Batch out;
  BatchResult r = handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out);
  ASSERT_EQ(r.error, BatchError::none) << r.message;
  EXPECT_EQ(out.state_version, 1);
  ASSERT_EQ(out.tunnels.size(), 1u);
  EXPECT_EQ(out.tunnels[0].session.remote_next_id, 19u);
  EXPECT_TRUE(out.tunnels[0].session.remote_ids_ahead.empty());
  // Version 2 keeps them exactly.
  b.state_version = 2;
  msg.clear();
  fds.clear();
  handoff::encode_batch(b, msg, fds);
  Batch out2;
  ASSERT_EQ(handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out2).error, BatchError::none);
  EXPECT_EQ(out2.tunnels[0].session.remote_next_id, 9u);
  EXPECT_EQ(out2.tunnels[0].session.remote_ids_ahead, (std::vector<uint32_t>{13, 17}));
  // A fresh session (no client stream yet) is version 1's "0".
  TunnelState fresh = rich_state();
  fresh.session.remote_next_id = 1;
  fresh.session.remote_ids_ahead.clear();
  V one;
  handoff::encode_tunnel(fresh, one, 1);
  TunnelState back;
  ASSERT_EQ(handoff::decode_tunnel(one, back, 1), "");
  EXPECT_EQ(back.session.remote_next_id, 1u);
}

TEST(HandoffCodec, ResumeStateAndDetachedTunnelsRideVersion3) {
  // A resumable session, attached: its credential, identity, offsets and kept bytes.
  TunnelState t = rich_state();
  TunnelState d;
  ASSERT_EQ(handoff::decode_tunnel(encode(t), d), "");
  EXPECT_TRUE(d.resume.offered);
  EXPECT_EQ(d.resume.secret, t.resume.secret);
  EXPECT_EQ(d.resume.identity, "token fleet");
  EXPECT_TRUE(d.resume.log.keeping);
  EXPECT_EQ(d.resume.log.sent, 90000u);
  EXPECT_EQ(d.resume.log.received, 70000u);
  EXPECT_EQ(d.resume.log.reported, 65536u);
  EXPECT_EQ(d.resume.log.kept.to_vector(), V(40, 0x3C));
  // Detached: no socket, no record state; the bridges keep theirs.
  TunnelState x = detached_state();
  Batch b;
  b.seq = 1;
  b.tunnels.push_back(detached_state());
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  EXPECT_EQ(fds, (std::vector<int>{11, 12}));
  Batch out;
  BatchResult r = handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out);
  ASSERT_EQ(r.error, BatchError::none) << r.message;
  ASSERT_EQ(out.tunnels.size(), 1u);
  const TunnelState& y = out.tunnels[0];
  EXPECT_EQ(y.phase, LinkPhase::detached);
  EXPECT_EQ(y.fd, -1);
  EXPECT_EQ(y.resume.detached_ms, 4200u);
  EXPECT_EQ(y.session.streams.size(), 4u);
  EXPECT_TRUE(y.record.output.empty());
  V again;
  handoff::encode_tunnel(y, again);
  TunnelState z;
  ASSERT_EQ(handoff::decode_tunnel(again, z), "");
  // Version 2 carries no resume state (its reader's sessions are not
  // resumable) and knows no detached phase.
  V two;
  handoff::encode_tunnel(rich_state(), two, 2);
  TunnelState w;
  ASSERT_EQ(handoff::decode_tunnel(two, w, 2), "");
  EXPECT_FALSE(w.resume.offered);
  EXPECT_FALSE(w.resume.log.keeping);
  EXPECT_TRUE(w.resume.log.kept.empty());
  TunnelState v;
  EXPECT_NE(handoff::decode_tunnel(encode(x), v, 2), "");
}

TEST(HandoffCodec, ResumeStateRules) {
  auto error_of = [](const TunnelState& t) {
    TunnelState out;
    return handoff::decode_tunnel(encode(t), out);
  };
  TunnelState more_kept = rich_state();
  more_kept.resume.log.kept.append(V(100000, 1));
  EXPECT_NE(error_of(more_kept).find("more kept than was sent"), std::string::npos);
  TunnelState reported = rich_state();
  reported.resume.log.reported = reported.resume.log.received + 1;
  EXPECT_NE(error_of(reported).find("more reported than was received"), std::string::npos);
  TunnelState not_resumable = detached_state();
  not_resumable.resume.offered = false;
  EXPECT_NE(error_of(not_resumable).find("not resumable"), std::string::npos);
  TunnelState with_socket = detached_state();
  with_socket.fd = 10;
  EXPECT_NE(error_of(with_socket).find("detached tunnel with a socket"), std::string::npos);
}

TEST(HandoffCodec, UnknownStateVersionIsReportedAsSuch) {
  for (uint16_t version : {uint16_t(handoff::kStateVersion + 1), uint16_t(0xFFFF)}) {
    Batch b;
    b.seq = 4;
    b.tunnels.push_back(rich_state());
    V msg;
    std::vector<int> fds;
    handoff::encode_batch(b, msg, fds, version);
    ASSERT_EQ(fds.size(), 3u);
    Batch out;
    BatchResult r = handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out);
    EXPECT_EQ(r.error, BatchError::unknown_version);
    EXPECT_NE(r.message.find(std::to_string(version)), std::string::npos) << r.message;
    EXPECT_EQ(out.state_version, version);
    EXPECT_TRUE(out.tunnels.empty());  // the caller still owns every fd
  }
  // Version 0 (never written): also unknown.
  Batch b;
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  util::store_u16(&msg[handoff::kHeaderSize + 4], 0);
  Batch out;
  EXPECT_EQ(handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out).error,
            BatchError::unknown_version);
}

TEST(HandoffCodec, EmptyBatchRoundTrips) {
  Batch b;
  b.seq = 0xFFFFFFFF;
  V msg;
  std::vector<int> fds;
  handoff::encode_batch(b, msg, fds);
  EXPECT_TRUE(fds.empty());
  Header h;
  std::string err;
  ASSERT_EQ(handoff::parse_header(msg, h, err), ParseStatus::ok);
  EXPECT_EQ(h.fd_count, 0);
  Batch out;
  ASSERT_EQ(handoff::decode_batch(std::span(msg).subspan(handoff::kHeaderSize), fds, out).error, BatchError::none);
  EXPECT_EQ(out.seq, 0xFFFFFFFFu);
  EXPECT_TRUE(out.tunnels.empty());
}

// ===========================================================================
// Message header
// ===========================================================================

V header_bytes(uint32_t magic, uint16_t version, uint8_t type, uint8_t fds, uint32_t body) {
  V v(handoff::kHeaderSize);
  util::store_u32(&v[0], magic);
  util::store_u16(&v[4], version);
  v[6] = type;
  v[7] = fds;
  util::store_u32(&v[8], body);
  return v;
}

TEST(HandoffHeader, ParsesAndRefuses) {
  Header h;
  std::string err;
  V ok = header_bytes(handoff::kMagic, 1, uint8_t(MsgType::batch), 253, handoff::kMaxBody);
  for (size_t n = 0; n < handoff::kHeaderSize; ++n)
    EXPECT_EQ(handoff::parse_header(std::span(ok).first(n), h, err), ParseStatus::need_more) << n;
  ASSERT_EQ(handoff::parse_header(ok, h, err), ParseStatus::ok) << err;
  EXPECT_EQ(h.version, 1);
  EXPECT_EQ(h.type, MsgType::batch);
  EXPECT_EQ(h.fd_count, 253);
  EXPECT_EQ(h.body_length, handoff::kMaxBody);

  err.clear();
  EXPECT_EQ(handoff::parse_header(header_bytes(0x42544e49, 1, 1, 0, 0), h, err), ParseStatus::malformed);
  EXPECT_NE(err.find("magic"), std::string::npos);
  err.clear();
  EXPECT_EQ(handoff::parse_header(header_bytes(0x48544e42, 1, 1, 0, 0), h, err), ParseStatus::malformed);  // byte-swapped
  for (uint8_t fds : {uint8_t(254), uint8_t(255)}) {
    err.clear();
    EXPECT_EQ(handoff::parse_header(header_bytes(handoff::kMagic, 1, 4, fds, 0), h, err), ParseStatus::malformed);
    EXPECT_NE(err.find("descriptors"), std::string::npos);
  }
  for (uint32_t body : {handoff::kMaxBody + 1, 0xFFFFFFFFu}) {
    err.clear();
    EXPECT_EQ(handoff::parse_header(header_bytes(handoff::kMagic, 1, 4, 0, body), h, err), ParseStatus::malformed);
    EXPECT_NE(err.find("over the limit"), std::string::npos);
  }
  // Unknown versions and types parse: the caller answers with refuse.
  EXPECT_EQ(handoff::parse_header(header_bytes(handoff::kMagic, 2, 99, 0, 7), h, err), ParseStatus::ok);
  EXPECT_EQ(h.version, 2);
  EXPECT_EQ(uint8_t(h.type), 99);
  EXPECT_STREQ(handoff::to_str(h.type), "unknown");
  // Bytes after the header are the body's business.
  V more = ok;
  more.push_back(1);
  EXPECT_EQ(handoff::parse_header(more, h, err), ParseStatus::ok);
}

// ===========================================================================
// Small messages
// ===========================================================================

// Splits an encoded message; checks its header.
std::span<const uint8_t> body_of(const V& msg, MsgType type, uint8_t fds = 0) {
  Header h;
  std::string err;
  EXPECT_EQ(handoff::parse_header(msg, h, err), ParseStatus::ok) << err;
  EXPECT_EQ(h.version, handoff::kProtocolVersion);
  EXPECT_EQ(h.type, type);
  EXPECT_EQ(h.fd_count, fds);
  EXPECT_EQ(size_t(h.body_length), msg.size() - handoff::kHeaderSize);
  return std::span(msg).subspan(handoff::kHeaderSize);
}

// Every strict prefix of a body is refused, and so is one trailing byte.
template <typename M, typename F>
void expect_prefixes_refused(std::span<const uint8_t> body, F decode) {
  for (size_t n = 0; n < body.size(); ++n) {
    M m;
    EXPECT_NE(decode(body.first(n), m), "") << "prefix of " << n;
  }
  V more(body.begin(), body.end());
  more.push_back(0);
  M m;
  EXPECT_NE(decode(std::span<const uint8_t>(more), m), "") << "trailing byte";
}

TEST(HandoffMessages, Hello) {
  handoff::Hello h{4242, 1, 3};
  V msg;
  handoff::encode_hello(h, msg);
  auto body = body_of(msg, MsgType::hello);
  handoff::Hello d;
  ASSERT_EQ(handoff::decode_hello(body, d), "");
  EXPECT_EQ(d.pid, 4242u);
  EXPECT_EQ(d.min_state_version, 1);
  EXPECT_EQ(d.max_state_version, 3);
  expect_prefixes_refused<handoff::Hello>(body, handoff::decode_hello);
  V bad;
  handoff::encode_hello({1, 3, 2}, bad);
  EXPECT_NE(handoff::decode_hello(std::span(bad).subspan(handoff::kHeaderSize), d).find("min above max"),
            std::string::npos);
}

TEST(HandoffMessages, ServerState) {
  handoff::ServerStateMsg m;
  m.pid = 77;
  m.epoch = 0x1122334455667788ull;
  m.metrics.inc(proxy::series<proxy::Fam::tunnels_total>("accepted"), 1);
  m.metrics.inc(proxy::series<proxy::Fam::bytes_total>("a\"b", "up"), 0xFFFFFFFFFFFFFFFFull);
  m.metrics.observe(proxy::series<proxy::Fam::handshake_seconds>(), 0.003);
  m.metrics.observe(proxy::series<proxy::Fam::handshake_seconds>(), 7.5);
  for (int k = 0; k < 3; ++k) {
    tls::TicketKey key;
    for (size_t i = 0; i < key.size(); ++i) key[i] = uint8_t(k * 40 + i);
    m.ticket_keys.push_back(key);
  }
  m.has_listener = true;
  V msg;
  handoff::encode_server_state(m, msg);
  auto body = body_of(msg, MsgType::server_state, 1);
  handoff::ServerStateMsg d;
  ASSERT_EQ(handoff::decode_server_state(body, d), "");
  EXPECT_EQ(d.pid, 77u);
  EXPECT_EQ(d.epoch, m.epoch);
  EXPECT_EQ(d.metrics, m.metrics);
  EXPECT_EQ(d.metrics.histograms[proxy::series<proxy::Fam::handshake_seconds>()].count(), 2u);
  EXPECT_EQ(d.ticket_keys, m.ticket_keys);
  EXPECT_TRUE(d.has_listener);
  expect_prefixes_refused<handoff::ServerStateMsg>(body, handoff::decode_server_state);

  // Without a listener no fd rides along.
  m.has_listener = false;
  m.ticket_keys.clear();
  V m2;
  handoff::encode_server_state(m, m2);
  handoff::ServerStateMsg d2;
  ASSERT_EQ(handoff::decode_server_state(body_of(m2, MsgType::server_state, 0), d2), "");
  EXPECT_FALSE(d2.has_listener);
  EXPECT_TRUE(d2.ticket_keys.empty());

  // More ticket keys than a server keeps.
  m.ticket_keys.assign(tls::kMaxTicketKeys + 1, tls::TicketKey{});
  V m3;
  handoff::encode_server_state(m, m3);
  handoff::ServerStateMsg d3;
  EXPECT_NE(handoff::decode_server_state(body_of(m3, MsgType::server_state), d3).find("ticket keys"),
            std::string::npos);
  // A has_listener byte other than 0 and 1.
  V m4 = msg;
  m4.back() = 2;
  handoff::ServerStateMsg d4;
  EXPECT_NE(handoff::decode_server_state(std::span(m4).subspan(handoff::kHeaderSize), d4), "");
}

TEST(HandoffMessages, ListeningHasAnEmptyBody) {
  V msg;
  handoff::encode_listening(msg);
  EXPECT_EQ(msg.size(), handoff::kHeaderSize);
  EXPECT_TRUE(body_of(msg, MsgType::listening).empty());
}

TEST(HandoffMessages, BatchAck) {
  handoff::BatchAck a{12, 7, "stream 9: cannot adopt the upstream socket"};
  V msg;
  handoff::encode_batch_ack(a, msg);
  auto body = body_of(msg, MsgType::batch_ack);
  handoff::BatchAck d;
  ASSERT_EQ(handoff::decode_batch_ack(body, d), "");
  EXPECT_EQ(d.seq, 12u);
  EXPECT_EQ(d.adopted, 7u);
  EXPECT_EQ(d.reason, a.reason);
  expect_prefixes_refused<handoff::BatchAck>(body, handoff::decode_batch_ack);
}

TEST(HandoffMessages, Commit) {
  handoff::Commit c;
  c.metrics.inc(proxy::series<proxy::Fam::tunnels_total>("established"), 10);
  c.metrics.inc(proxy::series<proxy::Fam::streams_total>("echo", "opened"), 50);
  V msg;
  handoff::encode_commit(c, msg);
  auto body = body_of(msg, MsgType::commit);
  handoff::Commit d;
  ASSERT_EQ(handoff::decode_commit(body, d), "");
  EXPECT_EQ(d.metrics, c.metrics);
  expect_prefixes_refused<handoff::Commit>(body, handoff::decode_commit);

  // A histogram with another number of buckets (another build) is refused, not misread.
  V odd;
  {
    V tmp(4, 0);  // no counters
    util::store_u32(tmp.data(), 0);
    odd = tmp;
    uint8_t n[4];
    util::store_u32(n, 1);
    odd.insert(odd.end(), n, n + 4);
    util::store_u32(n, 1);
    odd.insert(odd.end(), n, n + 4);
    odd.push_back('h');
    odd.push_back(3);  // 3 buckets
    odd.insert(odd.end(), 8 * 4, 0);
  }
  handoff::Commit o;
  EXPECT_NE(handoff::decode_commit(odd, o).find("buckets"), std::string::npos);
}

TEST(Metrics, AddDeltaContinuesCountersAcrossARestart) {
  using proxy::Fam;
  using proxy::series;
  const proxy::Series a = series<Fam::tunnels_total>("accepted"), b = series<Fam::tunnels_total>("established");
  const proxy::Series h = series<Fam::handshake_seconds>();
  proxy::Metrics old_at_start, old_at_end, mine;
  old_at_start.inc(a, 5);
  old_at_start.observe(h, 0.001);
  old_at_end = old_at_start;
  old_at_end.inc(a, 3);
  old_at_end.inc(b, 2);
  old_at_end.observe(h, 2.0);
  mine = old_at_start;  // the new process starts from the old values...
  mine.inc(a, 1);       // ...counts its own...
  mine.add_delta(old_at_end, old_at_start);  // ...and adds what the old one counted meanwhile
  EXPECT_EQ(mine.get(a), 9u);
  EXPECT_EQ(mine.get(b), 2u);
  EXPECT_EQ(mine.histograms[h].count(), 2u);
  EXPECT_DOUBLE_EQ(mine.histograms[h].sum, 2.001);
}

TEST(HandoffMessages, AbortAndRefuse) {
  V msg;
  handoff::encode_abort("child failed to bind", msg);
  std::string reason;
  auto body = body_of(msg, MsgType::abort);
  ASSERT_EQ(handoff::decode_reason(body, reason), "");
  EXPECT_EQ(reason, "child failed to bind");
  expect_prefixes_refused<std::string>(body, handoff::decode_reason);

  V r;
  handoff::encode_refuse("unknown message type 99", r);
  ASSERT_EQ(handoff::decode_reason(body_of(r, MsgType::refuse), reason), "");
  EXPECT_EQ(reason, "unknown message type 99");

  // A reason over the limit is cut on the way out, so the peer can read it.
  V longer;
  handoff::encode_abort(std::string(10000, 'x'), longer);
  ASSERT_EQ(handoff::decode_reason(body_of(longer, MsgType::abort), reason), "");
  EXPECT_EQ(reason, std::string(4096, 'x'));
  V empty;
  handoff::encode_abort("", empty);
  ASSERT_EQ(handoff::decode_reason(body_of(empty, MsgType::abort), reason), "");
  EXPECT_EQ(reason, "");
}

TEST(HandoffMessages, TypeNames) {
  EXPECT_STREQ(handoff::to_str(MsgType::hello), "hello");
  EXPECT_STREQ(handoff::to_str(MsgType::server_state), "server_state");
  EXPECT_STREQ(handoff::to_str(MsgType::listening), "listening");
  EXPECT_STREQ(handoff::to_str(MsgType::batch), "batch");
  EXPECT_STREQ(handoff::to_str(MsgType::batch_ack), "batch_ack");
  EXPECT_STREQ(handoff::to_str(MsgType::commit), "commit");
  EXPECT_STREQ(handoff::to_str(MsgType::abort), "abort");
  EXPECT_STREQ(handoff::to_str(MsgType::refuse), "refuse");
}

}  // namespace
