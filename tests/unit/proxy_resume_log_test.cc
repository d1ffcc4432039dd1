// ResumeLog (docs/protocol.md 9.1): the offsets, what is kept, and the
// property the protocol rests on: two yamux sessions whose connection is cut
// at random points, in the middle of frames, and resumed by re-sending each
// side's kept bytes from the other's received offset, deliver every stream's
// bytes and FIN exactly once, in order, with no protocol error.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "mux/session.h"
#include "proxy/resume_log.h"

using namespace baton;
using proxy::ResumeLog;
using util::ByteQueue;

namespace {

using V = std::vector<uint8_t>;

ByteQueue queue_of(const V& v) {
  ByteQueue q;
  q.append(v);
  return q;
}
V bytes(size_t n, uint8_t first) {
  V v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(first + i);
  return v;
}

TEST(ResumeLog, CountsAndKeepsWhatWasSent) {
  ResumeLog log;
  log.start_keeping();
  log.sent_bytes(queue_of(bytes(100, 0)));
  log.sent_bytes(queue_of(bytes(50, 100)));
  EXPECT_EQ(log.sent(), 150u);
  EXPECT_EQ(log.kept(), 150u);
  EXPECT_EQ(log.acked(), 0u);
  EXPECT_EQ(log.acknowledge(120), ResumeLog::Ack::ok);
  EXPECT_EQ(log.acked(), 120u);
  EXPECT_EQ(log.kept(), 30u);
  EXPECT_EQ(log.acknowledge(100), ResumeLog::Ack::stale);  // a report below an earlier one
  EXPECT_EQ(log.kept(), 30u);
  EXPECT_EQ(log.acknowledge(120), ResumeLog::Ack::ok);     // the same again: nothing to drop
  EXPECT_EQ(log.acknowledge(151), ResumeLog::Ack::beyond_sent);
  EXPECT_EQ(log.kept(), 30u);
}

TEST(ResumeLog, ReplaysFromThePeersOffsetAndKeepsWhatItReplays) {
  ResumeLog log;
  log.start_keeping();
  log.sent_bytes(queue_of(bytes(200, 0)));
  ASSERT_EQ(log.acknowledge(50), ResumeLog::Ack::ok);
  ByteQueue out;
  EXPECT_FALSE(log.replay_from(49, out));   // less than the peer reported
  EXPECT_FALSE(log.replay_from(201, out));  // more than was sent
  EXPECT_TRUE(out.empty());
  ASSERT_TRUE(log.replay_from(80, out));
  EXPECT_EQ(out.to_vector(), bytes(120, 80));
  EXPECT_EQ(log.acked(), 80u);  // the peer proved it has 80
  EXPECT_EQ(log.kept(), 120u);  // the replayed bytes are still unproved
  ByteQueue again;
  ASSERT_TRUE(log.replay_from(200, again));  // everything arrived: nothing to send
  EXPECT_TRUE(again.empty());
  EXPECT_EQ(log.kept(), 0u);
}

TEST(ResumeLog, ReceiptIsDueEvery64KiBOrWhenAsked) {
  ResumeLog log;
  log.start_keeping();
  EXPECT_FALSE(log.receipt_due(true));
  log.received_bytes(1000);
  EXPECT_FALSE(log.receipt_due());
  EXPECT_TRUE(log.receipt_due(true));
  log.received_bytes(ResumeLog::kReceiptEvery - 1000);
  EXPECT_TRUE(log.receipt_due());
  EXPECT_EQ(log.take_receipt(), ResumeLog::kReceiptEvery);
  EXPECT_FALSE(log.receipt_due(true));
}

TEST(ResumeLog, NotKeepingCountsAndKeepsNothing) {
  ResumeLog fresh;
  fresh.sent_bytes(queue_of(bytes(10, 0)));
  EXPECT_EQ(fresh.kept(), 0u);  // a new log does not keep
  EXPECT_EQ(fresh.sent(), 0u);
  ResumeLog log;
  log.start_keeping();
  log.sent_bytes(queue_of(bytes(10, 0)));
  log.stop_keeping();
  EXPECT_EQ(log.kept(), 0u);
  log.sent_bytes(queue_of(bytes(10, 0)));
  log.received_bytes(1 << 20);
  EXPECT_EQ(log.kept(), 0u);
  EXPECT_FALSE(log.receipt_due(true));
}

TEST(ResumeLog, StateRoundTrip) {
  ResumeLog log;
  log.start_keeping();
  log.sent_bytes(queue_of(bytes(300, 7)));
  ASSERT_EQ(log.acknowledge(100), ResumeLog::Ack::ok);
  log.received_bytes(70000);
  (void)log.take_receipt();
  log.received_bytes(5);
  ResumeLog moved(log.take_state());
  EXPECT_EQ(moved.sent(), 300u);
  EXPECT_EQ(moved.acked(), 100u);
  EXPECT_EQ(moved.received(), 70005u);
  EXPECT_TRUE(moved.receipt_due(true));
  EXPECT_FALSE(moved.receipt_due());
  ByteQueue out;
  ASSERT_TRUE(moved.replay_from(100, out));
  EXPECT_EQ(out.to_vector(), bytes(200, 107));
}

// ---------------------------------------------------------------------------
// Two sessions, a connection that breaks, resume by replay.

uint8_t pattern(uint32_t id, bool up, uint64_t i) { return uint8_t(i * 31 + id * 7 + (up ? 3 : 11)); }

struct Flow {
  uint64_t target = 0;    // bytes to send
  uint64_t written = 0;   // taken by the session
  uint64_t received = 0;  // read by the other end, checked
  bool fin_sent = false;
  bool fin_seen = false;
};

struct End : mux::SessionHandler {
  End(mux::Role role, std::map<uint32_t, Flow>& up, std::map<uint32_t, Flow>& down, bool& broken)
      : ses(role, *this), mine(role == mux::Role::client ? up : down), theirs(role == mux::Role::client ? down : up),
        up_(role == mux::Role::client), broken_(broken) {
    log.start_keeping();
  }

  void on_stream_opened(uint32_t id) override { ses.accept(id); }
  void on_stream_data(uint32_t) override {}
  void on_stream_fin(uint32_t id) override { theirs[id].fin_seen = true; }
  void on_stream_reset(uint32_t) override { broken_ = true; ADD_FAILURE() << "a stream was reset"; }
  void on_stream_writable(uint32_t) override {}
  void on_stream_closed(uint32_t) override {}

  void write_some(std::mt19937& rng) {
    for (auto& [id, f] : mine) {
      if (!ses.has_stream(id) || f.fin_sent) continue;
      size_t n = size_t(std::min<uint64_t>(f.target - f.written, rng() % 40000));
      V v(n);
      for (size_t i = 0; i < n; ++i) v[i] = pattern(id, up_, f.written + i);
      f.written += ses.write(id, v);
      if (f.written == f.target && rng() % 2) {
        ses.close_write(id);
        f.fin_sent = true;
      }
    }
  }
  void read_some(std::mt19937& rng) {
    for (auto& [id, f] : theirs) {
      const ByteQueue* in = ses.inbound(id);
      size_t n = std::min<size_t>(in->size(), rng() % 50000);
      if (n == 0) continue;
      V v(n);
      in->peek(v);
      for (size_t i = 0; i < n; ++i)
        if (v[i] != pattern(id, !up_, f.received + i)) {
          broken_ = true;
          ADD_FAILURE() << "stream " << id << ": wrong byte at " << f.received + i;
          return;
        }
      f.received += n;
      ses.consumed(id, n);
    }
  }
  // Session output -> the log -> the wire.
  void transmit(ByteQueue& wire) {
    ByteQueue& out = ses.output();
    if (out.empty()) return;
    log.sent_bytes(out);
    wire.append(out);
    out.clear();
  }
  void deliver(ByteQueue& wire, size_t max) {
    size_t n = std::min(max, wire.size());
    if (n == 0) return;
    V v(n);
    wire.peek(v);
    wire.pop(n);
    log.received_bytes(n);
    mux::ConsumeResult r = ses.consume(v);
    if (r.status != mux::ConsumeStatus::ok) {
      broken_ = true;
      ADD_FAILURE() << "protocol error: " << (r.error ? r.error : "?");
    }
  }

  mux::Session ses;
  ResumeLog log;
  std::map<uint32_t, Flow>& mine;
  std::map<uint32_t, Flow>& theirs;
  bool up_;
  bool& broken_;
};

class ResumeByReplay : public ::testing::TestWithParam<uint32_t> {};

TEST_P(ResumeByReplay, EveryByteAndFinArrivesOnceAcrossCuts) {
  std::mt19937 rng(GetParam());
  std::map<uint32_t, Flow> up, down;  // client -> server, server -> client, per stream
  bool broken = false;
  End client(mux::Role::client, up, down, broken), server(mux::Role::server, up, down, broken);
  ByteQueue to_server, to_client;
  int cuts = 0;
  uint64_t lost = 0, replayed = 0;
  size_t most_kept = 0;

  for (int step = 0; step < 3000 && !broken; ++step) {
    switch (rng() % 12) {
      case 0:
        if (up.size() < 12) {
          uint32_t id = client.ses.open();
          ASSERT_NE(id, 0u);
          up[id].target = rng() % 300000;
          down[id].target = rng() % 300000;
        }
        break;
      case 1: client.write_some(rng); break;
      case 2: server.write_some(rng); break;
      case 3: client.read_some(rng); break;
      case 4: server.read_some(rng); break;
      case 5: client.transmit(to_server); break;
      case 6: server.transmit(to_client); break;
      case 7: server.deliver(to_server, rng() % 70000); break;
      case 8: client.deliver(to_client, rng() % 70000); break;
      case 9:  // RECEIVED, as each side would send it
        if (client.log.receipt_due(rng() % 4 == 0)) {
          ASSERT_NE(server.log.acknowledge(client.log.take_receipt()), ResumeLog::Ack::beyond_sent);
        }
        if (server.log.receipt_due(rng() % 4 == 0)) {
          ASSERT_NE(client.log.acknowledge(server.log.take_receipt()), ResumeLog::Ack::beyond_sent);
        }
        break;
      case 10: {
        if (rng() % 8) break;
        // The connection breaks: whatever is in flight, frames cut anywhere, is lost.
        lost += to_server.size() + to_client.size();
        to_server.clear();
        to_client.clear();
        ++cuts;
        // Resume: each side sends again from the other's received offset,
        // ahead of anything its session queues from now on.
        size_t before_s = to_server.size(), before_c = to_client.size();
        ASSERT_TRUE(client.log.replay_from(server.log.received(), to_server));
        ASSERT_TRUE(server.log.replay_from(client.log.received(), to_client));
        replayed += to_server.size() - before_s + to_client.size() - before_c;
        break;
      }
      default: {
        // An upstream's data for the stream's FIN.
        for (auto& [id, f] : up)
          if (f.written == f.target && !f.fin_sent && client.ses.has_stream(id)) {
            client.ses.close_write(id);
            f.fin_sent = true;
          }
        for (auto& [id, f] : down)
          if (f.written == f.target && !f.fin_sent && server.ses.has_stream(id)) {
            server.ses.close_write(id);
            f.fin_sent = true;
          }
        break;
      }
    }
    most_kept = std::max({most_kept, client.log.kept(), server.log.kept()});
  }
  // Everything flows to the end, still with cuts now and then.
  for (int round = 0; round < 20000 && !broken; ++round) {
    client.write_some(rng);
    server.write_some(rng);
    for (auto* flows : {&up, &down})
      for (auto& [id, f] : *flows)
        if (f.written == f.target && !f.fin_sent) {
          End& e = flows == &up ? client : server;
          if (e.ses.has_stream(id)) e.ses.close_write(id);
          f.fin_sent = true;
        }
    client.transmit(to_server);
    server.transmit(to_client);
    if (round % 50 == 7) {
      to_server.clear();
      to_client.clear();
      ++cuts;
      ASSERT_TRUE(client.log.replay_from(server.log.received(), to_server));
      ASSERT_TRUE(server.log.replay_from(client.log.received(), to_client));
    }
    server.deliver(to_server, SIZE_MAX);
    client.deliver(to_client, SIZE_MAX);
    client.read_some(rng);
    server.read_some(rng);
    if (client.log.receipt_due(true)) (void)server.log.acknowledge(client.log.take_receipt());
    if (server.log.receipt_due(true)) (void)client.log.acknowledge(server.log.take_receipt());
    bool done = to_server.empty() && to_client.empty() && client.ses.output().empty() && server.ses.output().empty();
    for (auto* flows : {&up, &down})
      for (auto& [id, f] : *flows) done = done && f.received == f.target && f.fin_seen;
    if (done) break;
  }
  ASSERT_FALSE(broken);
  for (auto* flows : {&up, &down})
    for (auto& [id, f] : *flows) {
      EXPECT_EQ(f.received, f.target) << "stream " << id << (flows == &up ? " up" : " down");
      EXPECT_TRUE(f.fin_seen) << "stream " << id << (flows == &up ? " up" : " down");
    }
  EXPECT_EQ(client.ses.stream_count() + server.ses.stream_count(), 0u) << "streams left open";
  EXPECT_GT(cuts, 0);
  EXPECT_GT(lost, 0u);
  EXPECT_GT(replayed, 0u);
  EXPECT_EQ(replayed, lost);  // exactly what the cuts lost is sent again: nothing twice
  // Receipts keep what each side holds far below everything sent.
  EXPECT_LT(most_kept, client.log.sent() + server.log.sent());
  std::cout << "[          ] seed " << GetParam() << ": " << up.size() << " streams, " << cuts << " cuts, " << lost
            << " bytes lost in flight, " << replayed << " sent again, at most " << most_kept << " kept\n";
}

INSTANTIATE_TEST_SUITE_P(Seeds, ResumeByReplay, ::testing::Values(1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u));

}  // namespace
