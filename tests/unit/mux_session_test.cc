#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "mux/session.h"

using namespace baton::mux;
using baton::util::ByteQueue;

namespace {

using V = std::vector<uint8_t>;

// ---- frames built by hand, byte by byte, independent of frame.cc -----------

V hdr(uint8_t type, uint16_t flags, uint32_t id, uint32_t len, uint8_t version = 0) {
  return {version,
          type,
          uint8_t(flags >> 8), uint8_t(flags),
          uint8_t(id >> 24), uint8_t(id >> 16), uint8_t(id >> 8), uint8_t(id),
          uint8_t(len >> 24), uint8_t(len >> 16), uint8_t(len >> 8), uint8_t(len)};
}
V data(uint32_t id, uint16_t flags, const V& body) {
  V v = hdr(0, flags, id, uint32_t(body.size()));
  v.insert(v.end(), body.begin(), body.end());
  return v;
}
V wu(uint16_t flags, uint32_t id, uint32_t len) { return hdr(1, flags, id, len); }
V ping(uint16_t flags, uint32_t value) { return hdr(2, flags, 0, value); }
V go_away_frame(uint32_t code) { return hdr(3, 0, 0, code); }
V cat(std::initializer_list<V> parts) {
  V out;
  for (const V& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
V bytes(size_t n, uint8_t seed = 0) {
  V v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(seed + i * 7 + (i >> 8));
  return v;
}

constexpr uint16_t SYN = flag::syn, ACK = flag::ack, FIN = flag::fin, RST = flag::rst;
const V kGoAwayProtocolError = {0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01};

V take(Session& s) {
  V v = s.output().to_vector();
  s.output().pop(v.size());
  return v;
}

// Records every callback as text; `hook` runs after recording, for tests
// that call back into the session from a callback.
struct Recorder : SessionHandler {
  std::vector<std::string> ev;
  std::function<void(const std::string&, uint32_t)> hook;
  void add(const std::string& what, uint32_t id) {
    ev.push_back(what + " " + std::to_string(id));
    if (hook) hook(what, id);
  }
  void on_stream_opened(uint32_t id) override { add("opened", id); }
  void on_stream_data(uint32_t id) override { add("data", id); }
  void on_stream_fin(uint32_t id) override { add("fin", id); }
  void on_stream_reset(uint32_t id) override { add("reset", id); }
  void on_stream_writable(uint32_t id) override { add("writable", id); }
  void on_stream_closed(uint32_t id) override { add("closed", id); }
  void on_ping_answered(uint32_t value, uint64_t sent_at_ms) override {
    add("pong " + std::to_string(sent_at_ms), value);
  }
  void on_go_away(GoAwayCode code) override { add("go_away", uint32_t(code)); }
  void on_ids_given_up(uint32_t n) override { add("given_up", n); }
  std::vector<std::string> drain() { return std::exchange(ev, {}); }
};

using Events = std::vector<std::string>;

struct Side {
  Recorder h;
  Session s;
  explicit Side(Role r, SessionLimits l = {}) : s(r, h, l) {}
  ConsumeResult feed(const V& v) { return s.consume(v); }
  void feed_ok(const V& v) {
    ConsumeResult r = s.consume(v);
    ASSERT_EQ(r.status, ConsumeStatus::ok) << (r.error ? r.error : "");
  }
  std::string inbound(uint32_t id) {
    V v = s.inbound(id)->to_vector();
    return std::string(v.begin(), v.end());
  }
  const StreamState& st(uint32_t id) { return s.state().streams.at(id); }
};

V str(const std::string& s) { return V(s.begin(), s.end()); }

void expect_state_eq(const SessionState& a, const SessionState& b) {
  EXPECT_EQ(a.role, b.role);
  EXPECT_EQ(a.next_local_id, b.next_local_id);
  EXPECT_EQ(a.remote_next_id, b.remote_next_id);
  EXPECT_EQ(a.remote_ids_ahead, b.remote_ids_ahead);
  EXPECT_EQ(a.go_away_sent, b.go_away_sent);
  EXPECT_EQ(a.go_away_received, b.go_away_received);
  EXPECT_EQ(a.failed, b.failed);
  EXPECT_EQ(a.go_away_code, b.go_away_code);
  EXPECT_EQ(a.ping_replies_queued, b.ping_replies_queued);
  EXPECT_EQ(a.partial_input.to_vector(), b.partial_input.to_vector());
  EXPECT_EQ(a.output.to_vector(), b.output.to_vector());
  ASSERT_EQ(a.streams.size(), b.streams.size());
  for (auto ia = a.streams.begin(), ib = b.streams.begin(); ia != a.streams.end(); ++ia, ++ib) {
    EXPECT_EQ(ia->first, ib->first);
    const StreamState& x = ia->second;
    const StreamState& y = ib->second;
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.phase, y.phase);
    EXPECT_EQ(x.local_fin, y.local_fin);
    EXPECT_EQ(x.remote_fin, y.remote_fin);
    EXPECT_EQ(x.send_window, y.send_window);
    EXPECT_EQ(x.recv_window, y.recv_window);
    EXPECT_EQ(x.recv_window_max, y.recv_window_max);
    EXPECT_EQ(x.unacked_credit, y.unacked_credit);
    EXPECT_EQ(x.inbound.to_vector(), y.inbound.to_vector());
  }
  ASSERT_EQ(a.pings.size(), b.pings.size());
  for (size_t i = 0; i < a.pings.size(); ++i) {
    EXPECT_EQ(a.pings[i].value, b.pings[i].value);
    EXPECT_EQ(a.pings[i].sent_at_ms, b.pings[i].sent_at_ms);
  }
}

}  // namespace

// ============================================================================
// Opening and accepting
// ============================================================================

TEST(MuxSession, ClientOpensOddIdsWithWindowUpdateSyn) {
  Side c(Role::client);
  EXPECT_EQ(c.s.open(), 1u);
  EXPECT_EQ(c.s.open(), 3u);
  EXPECT_EQ(c.s.open(), 5u);
  EXPECT_EQ(take(c.s), cat({{0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0},
                            {0, 1, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0},
                            {0, 1, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0}}));
  EXPECT_EQ(c.st(1).phase, StreamPhase::awaiting_ack);
  EXPECT_EQ(c.s.send_window(1), kInitialWindow);
  EXPECT_EQ(c.st(1).recv_window, kInitialWindow);
  EXPECT_EQ(c.s.stream_count(), 3u);
  EXPECT_TRUE(c.h.ev.empty());
}

TEST(MuxSession, ServerOpensEvenIds) {
  Side s(Role::server);
  EXPECT_EQ(s.s.open(), 2u);
  EXPECT_EQ(s.s.open(), 4u);
  EXPECT_EQ(take(s.s), cat({wu(SYN, 2, 0), wu(SYN, 4, 0)}));
}

TEST(MuxSession, PeerSynThenAcceptSendsAck) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1"}));
  EXPECT_TRUE(s.s.has_stream(1));
  EXPECT_EQ(s.st(1).phase, StreamPhase::awaiting_accept);
  EXPECT_EQ(s.s.state().remote_next_id, 3u);
  EXPECT_TRUE(take(s.s).empty());
  s.s.accept(1);
  EXPECT_EQ(take(s.s), (V{0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(s.st(1).phase, StreamPhase::open);
  s.s.accept(1);  // no-op now
  EXPECT_TRUE(take(s.s).empty());
  s.s.accept(77);  // unknown: no-op
  EXPECT_TRUE(take(s.s).empty());
}

TEST(MuxSession, AckMakesStreamOpenAndWritable) {
  Side c(Role::client);
  ASSERT_EQ(c.s.open(), 1u);
  take(c.s);
  c.feed_ok(wu(ACK, 1, 0));
  EXPECT_EQ(c.h.drain(), (Events{"writable 1"}));
  EXPECT_EQ(c.st(1).phase, StreamPhase::open);
  c.feed_ok(wu(ACK, 1, 0));  // a second ACK means nothing
  EXPECT_TRUE(c.h.drain().empty());
}

TEST(MuxSession, AckOnDataFrame) {
  Side c(Role::client);
  ASSERT_EQ(c.s.open(), 1u);
  c.feed_ok(data(1, ACK, str("hi")));
  EXPECT_EQ(c.h.drain(), (Events{"writable 1", "data 1"}));
  EXPECT_EQ(c.st(1).phase, StreamPhase::open);
  EXPECT_EQ(c.inbound(1), "hi");
  c.feed_ok(data(1, 0, {}));  // empty Data: no event
  EXPECT_TRUE(c.h.drain().empty());
}

TEST(MuxSession, DataMayFlowBeforeAckAndBeforeAccept) {
  Side c(Role::client), s(Role::server);
  uint32_t id = c.s.open();
  ASSERT_EQ(c.s.write(id, str("early")), 5u);
  EXPECT_EQ(take(c.s), cat({wu(SYN, 1, 0), data(1, 0, str("early"))}));
  s.feed_ok(cat({wu(SYN, 1, 0), data(1, 0, str("early"))}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1"}));
  EXPECT_EQ(s.inbound(1), "early");
  EXPECT_EQ(s.st(1).phase, StreamPhase::awaiting_accept);
  EXPECT_EQ(s.st(1).recv_window, kInitialWindow - 5);
}

TEST(MuxSession, SynOnDataFrameWithPayload) {
  Side s(Role::server);
  s.feed_ok(data(1, SYN, str("hello")));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1"}));
  EXPECT_EQ(s.inbound(1), "hello");
  EXPECT_EQ(s.st(1).phase, StreamPhase::awaiting_accept);
  EXPECT_EQ(s.st(1).recv_window, kInitialWindow - 5);
  EXPECT_EQ(s.s.send_window(1), kInitialWindow);
}

TEST(MuxSession, SynDataWithFin) {
  Side s(Role::server);
  s.feed_ok(data(1, SYN | FIN, str("x")));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1", "fin 1"}));
  EXPECT_TRUE(s.st(1).remote_fin);
}

TEST(MuxSession, SynWindowUpdateWithLengthGrantsBiggerSendWindow) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 1000));
  EXPECT_EQ(s.s.send_window(1), kInitialWindow + 1000);
  EXPECT_EQ(s.h.drain(), (Events{"opened 1"}));
}

TEST(MuxSession, WriteOnAwaitingAcceptStreamAcceptsFirst) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 3, 0));
  ASSERT_EQ(s.s.write(3, str("abc")), 3u);
  EXPECT_EQ(take(s.s), cat({wu(ACK, 3, 0), data(3, 0, str("abc"))}));
  EXPECT_EQ(s.st(3).phase, StreamPhase::open);
}

TEST(MuxSession, CloseWriteOnAwaitingAcceptStreamAcceptsFirst) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 3, 0));
  s.s.close_write(3);
  EXPECT_EQ(take(s.s), cat({wu(ACK, 3, 0), wu(FIN, 3, 0)}));
}

TEST(MuxSession, ClientAcceptsServerStreams) {
  Side c(Role::client);
  c.feed_ok(wu(SYN, 2, 0));
  c.feed_ok(wu(SYN, 4, 0));
  EXPECT_EQ(c.h.drain(), (Events{"opened 2", "opened 4"}));
  c.s.accept(4);
  EXPECT_EQ(take(c.s), wu(ACK, 4, 0));
}

TEST(MuxSession, AcceptAndWriteFromInsideOnStreamOpened) {
  Side s(Role::server);
  s.h.hook = [&](const std::string& what, uint32_t id) {
    if (what == "opened") {
      s.s.accept(id);
      EXPECT_EQ(s.s.write(id, str("welcome")), 7u);
    }
  };
  s.feed_ok(cat({data(1, SYN, str("q")), data(1, 0, str("r"))}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1", "data 1"}));
  EXPECT_EQ(take(s.s), cat({wu(ACK, 1, 0), data(1, 0, str("welcome"))}));
  EXPECT_EQ(s.inbound(1), "qr");
}

TEST(MuxSession, ResetFromInsideOnStreamOpenedDropsTheSynPayload) {
  Side s(Role::server);
  s.h.hook = [&](const std::string& what, uint32_t id) {
    if (what == "opened") s.s.reset(id);
  };
  s.feed_ok(cat({data(1, SYN | FIN, bytes(100)), data(1, 0, bytes(50)), ping(SYN, 9)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1"}));
  EXPECT_EQ(take(s.s), cat({wu(RST, 1, 0), ping(ACK, 9)}));
  EXPECT_FALSE(s.s.has_stream(1));
  EXPECT_TRUE(s.s.state().partial_input.empty());
}

// ============================================================================
// Writing, frame splitting, flow control
// ============================================================================

TEST(MuxSession, WriteSplitsIntoMaxFrameData) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  take(c.s);
  V payload = bytes(40000);
  ASSERT_EQ(c.s.write(id, payload), 40000u);
  V want = cat({hdr(0, 0, 1, 16384), V(payload.begin(), payload.begin() + 16384), hdr(0, 0, 1, 16384),
                V(payload.begin() + 16384, payload.begin() + 32768), hdr(0, 0, 1, 7232),
                V(payload.begin() + 32768, payload.end())});
  EXPECT_EQ(take(c.s), want);
  EXPECT_EQ(c.s.send_window(id), kInitialWindow - 40000);
}

TEST(MuxSession, WriteHonoursSmallerMaxFrameData) {
  SessionLimits l;
  l.max_frame_data = 3;
  Side c(Role::client, l);
  uint32_t id = c.s.open();
  take(c.s);
  ASSERT_EQ(c.s.write(id, str("abcdefg")), 7u);
  EXPECT_EQ(take(c.s), cat({data(1, 0, str("abc")), data(1, 0, str("def")), data(1, 0, str("g"))}));
  EXPECT_EQ(c.s.write(id, {}), 0u);
  EXPECT_TRUE(take(c.s).empty());
}

TEST(MuxSession, SenderStopsExactlyAtTheWindowUntilWindowUpdate) {
  Side c(Role::client), s(Role::server);
  uint32_t id = c.s.open();
  s.feed_ok(take(c.s));
  s.s.accept(id);
  c.feed_ok(take(s.s));
  c.h.drain();

  V payload = bytes(300000, 3);
  ASSERT_EQ(c.s.write(id, payload), size_t(kInitialWindow));
  EXPECT_EQ(c.s.send_window(id), 0u);
  EXPECT_EQ(c.s.write(id, payload), 0u);
  V out = take(c.s);
  EXPECT_EQ(out.size(), kInitialWindow + 16 * kHeaderSize);  // 16 frames of 16 KiB
  for (size_t f = 0; f < 16; ++f) {
    V h(out.begin() + ptrdiff_t(f * (16384 + 12)), out.begin() + ptrdiff_t(f * (16384 + 12) + 12));
    EXPECT_EQ(h, hdr(0, 0, 1, 16384)) << f;
  }
  s.feed_ok(out);
  EXPECT_EQ(s.st(id).recv_window, 0u);
  EXPECT_EQ(s.s.inbound(id)->size(), size_t(kInitialWindow));

  // One more byte would be beyond the window.
  Side s2(Role::server);
  s2.feed_ok(cat({wu(SYN, 1, 0), out}));
  ConsumeResult r = s2.feed(data(1, 0, {0}));
  EXPECT_EQ(r.status, ConsumeStatus::protocol_error);

  s.s.consumed(id, kInitialWindow);
  EXPECT_EQ(take(s.s), wu(0, 1, kInitialWindow));
  c.feed_ok(wu(0, 1, kInitialWindow));
  EXPECT_EQ(c.h.drain(), (Events{"writable 1"}));
  EXPECT_EQ(c.s.send_window(id), kInitialWindow);
  EXPECT_EQ(c.s.write(id, V(payload.begin() + kInitialWindow, payload.end())), 300000u - kInitialWindow);
}

TEST(MuxSession, WritableOnlyWhenTheWindowGrowsFromZero) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  c.feed_ok(wu(ACK, id, 0));
  c.h.drain();
  c.feed_ok(wu(0, id, 10));  // window was not empty
  EXPECT_TRUE(c.h.drain().empty());
  EXPECT_EQ(c.s.send_window(id), kInitialWindow + 10);
  ASSERT_EQ(c.s.write(id, bytes(kInitialWindow + 10)), size_t(kInitialWindow + 10));
  c.feed_ok(wu(0, id, 0));  // zero increment
  EXPECT_TRUE(c.h.drain().empty());
  c.feed_ok(wu(0, id, 5));
  EXPECT_EQ(c.h.drain(), (Events{"writable 1"}));
  c.feed_ok(wu(0, id, 5));
  EXPECT_TRUE(c.h.drain().empty());
}

TEST(MuxSession, WindowUpdateThresholdIsHalfTheWindow) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  s.s.accept(1);
  take(s.s);
  s.feed_ok(data(1, 0, bytes(100000)));
  s.feed_ok(data(1, 0, bytes(100000)));
  EXPECT_EQ(s.st(1).recv_window, kInitialWindow - 200000);
  s.s.consumed(1, 131071);
  EXPECT_TRUE(take(s.s).empty());
  EXPECT_EQ(s.st(1).unacked_credit, 131071u);
  s.s.consumed(1, 1);
  EXPECT_EQ(take(s.s), (V{0, 1, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0}));  // increment 131072
  EXPECT_EQ(s.st(1).unacked_credit, 0u);
  EXPECT_EQ(s.st(1).recv_window, kInitialWindow - 200000 + 131072);
  s.s.consumed(1, 68928);
  EXPECT_TRUE(take(s.s).empty());
  EXPECT_EQ(s.st(1).unacked_credit, 68928u);
  EXPECT_EQ(s.s.inbound(1)->size(), 0u);
  s.s.consumed(1, 10);  // nothing left: no-op
  EXPECT_EQ(s.st(1).unacked_credit, 68928u);
  // Invariant: window + queued + unacked = max.
  const StreamState& st = s.st(1);
  EXPECT_EQ(st.recv_window + st.inbound.size() + st.unacked_credit, st.recv_window_max);
}

TEST(MuxSession, ConsumedPopsInboundInOrder) {
  Side s(Role::server);
  s.feed_ok(data(1, SYN, str("abcdef")));
  s.s.consumed(1, 2);
  EXPECT_EQ(s.inbound(1), "cdef");
  s.feed_ok(data(1, 0, str("gh")));
  EXPECT_EQ(s.inbound(1), "cdefgh");
  s.s.consumed(1, 100);  // clamped to what is queued
  EXPECT_EQ(s.inbound(1), "");
  EXPECT_EQ(s.st(1).unacked_credit, 8u);
}

TEST(MuxSession, SetRecvWindowSendsTheDifference) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  s.s.accept(1);
  take(s.s);
  s.s.set_recv_window(1, 1024 * 1024);
  EXPECT_EQ(take(s.s), (V{0, 1, 0, 0, 0, 0, 0, 1, 0, 0x0c, 0, 0}));  // 786432
  EXPECT_EQ(s.st(1).recv_window_max, 1024u * 1024);
  EXPECT_EQ(s.st(1).recv_window, 1024u * 1024);
  s.s.set_recv_window(1, 1000);  // never shrinks
  s.s.set_recv_window(1, 1024 * 1024);
  s.s.set_recv_window(9, 1 << 24);  // unknown
  EXPECT_TRUE(take(s.s).empty());
  // The peer may now send the whole MiB.
  s.feed_ok(data(1, 0, bytes(1024 * 1024)));
  EXPECT_EQ(s.st(1).recv_window, 0u);
  // The threshold follows the new size: 512 KiB.
  s.s.consumed(1, 512 * 1024 - 1);
  EXPECT_TRUE(take(s.s).empty());
  s.s.consumed(1, 1);
  EXPECT_EQ(take(s.s), wu(0, 1, 512 * 1024));
}

TEST(MuxSession, WindowUpdateAddsToSendWindowUpToTheU32Limit) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  c.feed_ok(wu(0, id, 0xffffffffu - kInitialWindow));
  EXPECT_EQ(c.s.send_window(id), 0xffffffffu);
  EXPECT_EQ(c.feed(wu(0, id, 1)).status, ConsumeStatus::protocol_error);
}

// ============================================================================
// FIN, close, RST
// ============================================================================

TEST(MuxSession, FinBothDirectionsClosesBothSides) {
  Side c(Role::client), s(Role::server);
  uint32_t id = c.s.open();
  s.feed_ok(take(c.s));
  s.s.accept(id);
  c.feed_ok(take(s.s));
  c.h.drain();
  s.h.drain();

  c.s.close_write(id);
  EXPECT_EQ(take(c.s), (V{0, 1, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(c.s.write(id, str("late")), 0u);
  c.s.close_write(id);  // once only
  EXPECT_TRUE(take(c.s).empty());
  s.feed_ok(wu(FIN, 1, 0));
  EXPECT_EQ(s.h.drain(), (Events{"fin 1"}));
  EXPECT_TRUE(s.st(1).remote_fin);
  ASSERT_EQ(s.s.write(id, str("reply")), 5u);
  s.s.close_write(id);
  EXPECT_EQ(s.h.drain(), (Events{"closed 1"}));  // nothing queued inbound: closed at once
  EXPECT_FALSE(s.s.has_stream(id));
  EXPECT_EQ(take(s.s), cat({data(1, 0, str("reply")), wu(FIN, 1, 0)}));

  c.feed_ok(cat({data(1, 0, str("reply")), wu(FIN, 1, 0)}));
  EXPECT_EQ(c.h.drain(), (Events{"data 1", "fin 1"}));
  EXPECT_TRUE(c.s.has_stream(id));  // "reply" not consumed yet
  c.s.consumed(id, 3);
  EXPECT_TRUE(c.h.drain().empty());
  c.s.consumed(id, 2);
  EXPECT_EQ(c.h.drain(), (Events{"closed 1"}));
  EXPECT_FALSE(c.s.has_stream(id));
  EXPECT_EQ(c.s.stream_count(), 0u);
  EXPECT_TRUE(take(c.s).empty());  // no credit after the peer's FIN
}

TEST(MuxSession, FinOnDataFrameFiresAfterData) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  s.h.drain();
  s.feed_ok(data(1, FIN, str("bye")));
  EXPECT_EQ(s.h.drain(), (Events{"data 1", "fin 1"}));
  EXPECT_EQ(s.inbound(1), "bye");
}

TEST(MuxSession, FinReceivedAfterLocalFinWithEmptyInboundClosesAtOnce) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  c.s.close_write(id);
  take(c.s);
  c.feed_ok(wu(ACK | FIN, id, 0));
  EXPECT_EQ(c.h.drain(), (Events{"writable 1", "fin 1", "closed 1"}));
  EXPECT_FALSE(c.s.has_stream(id));
}

TEST(MuxSession, ConsumeFromInsideOnStreamFinCloses) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  c.s.close_write(id);
  c.h.hook = [&](const std::string& what, uint32_t sid) {
    if (what == "fin") c.s.consumed(sid, c.s.inbound(sid)->size());
  };
  c.feed_ok(cat({data(id, FIN, str("abc")), wu(0, id, 5), ping(SYN, 1)}));
  EXPECT_EQ(c.h.drain(), (Events{"data 1", "fin 1", "closed 1"}));
  EXPECT_FALSE(c.s.has_stream(id));
}

TEST(MuxSession, DuplicateFinIsIgnored) {
  Side s(Role::server);
  s.feed_ok(cat({wu(SYN, 1, 0), wu(FIN, 1, 0), wu(FIN, 1, 0), data(1, FIN, {})}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "fin 1"}));
}

TEST(MuxSession, DataAfterFinResetsOnlyThatStream) {
  Side s(Role::server);
  s.feed_ok(cat({wu(SYN, 1, 0), wu(SYN, 3, 0), data(1, FIN, str("a"))}));
  s.h.drain();
  take(s.s);
  // A 40000-byte body after FIN, split so the body has to be skipped across calls.
  V bad = data(1, 0, bytes(40000));
  V after = cat({data(3, 0, str("ok")), ping(SYN, 5)});
  s.feed_ok(V(bad.begin(), bad.begin() + 100));
  EXPECT_EQ(s.h.drain(), (Events{"reset 1"}));
  EXPECT_EQ(take(s.s), wu(RST, 1, 0));
  EXPECT_FALSE(s.s.has_stream(1));
  EXPECT_EQ(s.s.state().partial_input.size(), kHeaderSize);  // only the skip marker
  s.feed_ok(cat({V(bad.begin() + 100, bad.end()), after}));
  EXPECT_EQ(s.h.drain(), (Events{"data 3"}));
  EXPECT_EQ(take(s.s), ping(ACK, 5));
  EXPECT_EQ(s.inbound(3), "ok");
  EXPECT_FALSE(s.s.failed());
}

TEST(MuxSession, LocalResetSendsRstAndErasesWithoutCallback) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  take(c.s);
  c.s.reset(id);
  EXPECT_EQ(take(c.s), (V{0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_FALSE(c.s.has_stream(id));
  EXPECT_TRUE(c.h.ev.empty());
  c.s.reset(id);  // unknown now: nothing
  EXPECT_TRUE(take(c.s).empty());
  // Late frames for it are discarded silently.
  c.feed_ok(cat({wu(ACK, 1, 0), data(1, 0, bytes(300)), wu(FIN, 1, 0), wu(0, 1, 99)}));
  EXPECT_TRUE(c.h.ev.empty());
  EXPECT_TRUE(take(c.s).empty());
}

TEST(MuxSession, RemoteResetBothWays) {
  Side c(Role::client), s(Role::server);
  uint32_t a = c.s.open(), b = c.s.open();
  s.feed_ok(take(c.s));
  s.h.drain();
  c.s.reset(a);
  s.feed_ok(take(c.s));
  EXPECT_EQ(s.h.drain(), (Events{"reset 1"}));
  EXPECT_FALSE(s.s.has_stream(a));
  s.s.reset(b);
  EXPECT_EQ(take(s.s), wu(RST, 3, 0));
  c.feed_ok(wu(RST, 3, 0));
  EXPECT_EQ(c.h.drain(), (Events{"reset 3"}));
  EXPECT_EQ(c.s.stream_count(), 0u);
  EXPECT_EQ(s.s.stream_count(), 0u);
}

TEST(MuxSession, RstOnDataFrameDropsTheBody) {
  Side s(Role::server);
  s.feed_ok(cat({data(1, SYN, str("x")), data(1, RST, bytes(500)), ping(SYN, 3)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1", "reset 1"}));
  EXPECT_EQ(take(s.s), ping(ACK, 3));
  EXPECT_FALSE(s.s.has_stream(1));
}

TEST(MuxSession, ResetFromInsideOnStreamDataSkipsFin) {
  Side s(Role::server);
  s.h.hook = [&](const std::string& what, uint32_t id) {
    if (what == "data") s.s.reset(id);
  };
  s.feed_ok(cat({data(1, SYN | FIN, str("x")), data(1, 0, str("more")), wu(0, 1, 5)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1"}));
  EXPECT_EQ(take(s.s), wu(RST, 1, 0));
}

TEST(MuxSession, ConsumedFromInsideOnStreamDataReturnsCredit) {
  Side s(Role::server);
  s.h.hook = [&](const std::string& what, uint32_t id) {
    if (what == "data") s.s.consumed(id, s.s.inbound(id)->size());
  };
  s.feed_ok(wu(SYN, 1, 0));
  s.s.accept(1);
  take(s.s);
  for (int i = 0; i < 8; ++i) s.feed_ok(data(1, 0, bytes(16384)));
  EXPECT_EQ(take(s.s), wu(0, 1, 131072));
  EXPECT_EQ(s.st(1).recv_window, kInitialWindow);
}

TEST(MuxSession, UnknownStreamOperationsAreHarmless) {
  Side s(Role::server);
  EXPECT_EQ(s.s.write(5, str("x")), 0u);
  s.s.close_write(5);
  s.s.reset(5);
  s.s.consumed(5, 3);
  s.s.set_recv_window(5, 1 << 20);
  EXPECT_EQ(s.s.send_window(5), 0u);
  ASSERT_NE(s.s.inbound(5), nullptr);
  EXPECT_TRUE(s.s.inbound(5)->empty());
  EXPECT_TRUE(take(s.s).empty());
  EXPECT_TRUE(s.h.ev.empty());
}

// ============================================================================
// Ping and Go Away
// ============================================================================

TEST(MuxSession, PingAndAnswer) {
  Side c(Role::client), s(Role::server);
  ASSERT_TRUE(c.s.ping(0xdeadbeef, 1234));
  EXPECT_EQ(take(c.s), (V{0, 2, 0, 1, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef}));
  ASSERT_EQ(c.s.pending_pings().size(), 1u);
  EXPECT_EQ(c.s.pending_pings()[0].sent_at_ms, 1234u);
  s.feed_ok(ping(SYN, 0xdeadbeef));
  EXPECT_EQ(take(s.s), (V{0, 2, 0, 2, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef}));
  EXPECT_TRUE(s.h.ev.empty());
  c.feed_ok(ping(ACK, 0xdeadbeef));
  EXPECT_EQ(c.h.drain(), (Events{"pong 1234 3735928559"}));
  EXPECT_TRUE(c.s.pending_pings().empty());
  c.feed_ok(ping(ACK, 0xdeadbeef));  // answered already: ignored
  c.feed_ok(ping(ACK, 42));          // never asked: ignored
  c.feed_ok(ping(0, 42));            // neither flag: ignored
  EXPECT_TRUE(c.h.ev.empty());
  EXPECT_TRUE(take(c.s).empty());
}

TEST(MuxSession, PingsAreMatchedByValue) {
  Side c(Role::client);
  ASSERT_TRUE(c.s.ping(1, 10));
  ASSERT_TRUE(c.s.ping(2, 20));
  ASSERT_TRUE(c.s.ping(3, 30));
  c.feed_ok(cat({ping(ACK, 2), ping(ACK, 3)}));
  EXPECT_EQ(c.h.drain(), (Events{"pong 20 2", "pong 30 3"}));
  ASSERT_EQ(c.s.pending_pings().size(), 1u);
  EXPECT_EQ(c.s.pending_pings()[0].value, 1u);
}

TEST(MuxSession, PendingPingsAreBounded) {
  SessionLimits l;
  l.max_pending_pings = 2;
  Side c(Role::client, l);
  EXPECT_TRUE(c.s.ping(1, 0));
  EXPECT_TRUE(c.s.ping(2, 0));
  EXPECT_FALSE(c.s.ping(3, 0));
  EXPECT_EQ(take(c.s), cat({ping(SYN, 1), ping(SYN, 2)}));
  c.feed_ok(ping(ACK, 1));
  EXPECT_TRUE(c.s.ping(3, 0));
}

TEST(MuxSession, PingFloodIsAProtocolError) {
  SessionLimits l;
  l.max_ping_replies = 3;
  Side s(Role::server, l);
  s.feed_ok(cat({ping(SYN, 1), ping(SYN, 2), ping(SYN, 3)}));
  ConsumeResult r = s.feed(ping(SYN, 4));  // three replies still sit in output()
  EXPECT_EQ(r.status, ConsumeStatus::protocol_error);
  ASSERT_NE(r.error, nullptr);
  EXPECT_EQ(take(s.s), cat({ping(ACK, 1), ping(ACK, 2), ping(ACK, 3), kGoAwayProtocolError}));
  EXPECT_TRUE(s.s.failed());
  EXPECT_EQ(s.s.state().go_away_code, GoAwayCode::protocol_error);
  EXPECT_EQ(s.feed(ping(SYN, 5)).status, ConsumeStatus::already_failed);
  EXPECT_TRUE(take(s.s).empty());
}

TEST(MuxSession, PingRepliesTakenByTheOwnerDoNotCount) {
  SessionLimits l;
  l.max_ping_replies = 3;
  Side s(Role::server, l);
  for (uint32_t i = 0; i < 100; ++i) {
    s.feed_ok(cat({ping(SYN, i), ping(SYN, i + 1000)}));
    EXPECT_EQ(take(s.s), cat({ping(ACK, i), ping(ACK, i + 1000)}));
  }
  EXPECT_FALSE(s.s.failed());
}

TEST(MuxSession, GoAwaySentOnceAndBlocksOpen) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  take(c.s);
  c.s.go_away(GoAwayCode::normal);
  EXPECT_EQ(take(c.s), (V{0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}));
  EXPECT_TRUE(c.s.go_away_sent());
  c.s.go_away(GoAwayCode::internal_error);
  EXPECT_TRUE(take(c.s).empty());
  EXPECT_EQ(c.s.open(), 0u);
  // Existing streams keep working.
  EXPECT_EQ(c.s.write(id, str("still")), 5u);
  c.feed_ok(data(id, ACK, str("here")));
  EXPECT_EQ(c.inbound(id), "here");
}

TEST(MuxSession, GoAwayCodesOnTheWire) {
  Side s(Role::server);
  s.s.go_away(GoAwayCode::internal_error);
  EXPECT_EQ(take(s.s), go_away_frame(2));
}

TEST(MuxSession, GoAwayReceived) {
  Side c(Role::client), s(Role::server);
  uint32_t id = c.s.open();
  s.feed_ok(take(c.s));
  s.s.go_away(GoAwayCode::normal);
  c.feed_ok(take(s.s));
  EXPECT_EQ(c.h.drain(), (Events{"go_away 0"}));
  EXPECT_TRUE(c.s.go_away_received());
  EXPECT_EQ(c.s.state().go_away_code, GoAwayCode::normal);
  EXPECT_EQ(c.s.open(), 0u);
  // The old stream continues in both directions.
  ASSERT_EQ(c.s.write(id, str("x")), 1u);
  s.feed_ok(take(c.s));
  EXPECT_EQ(s.inbound(id), "x");
  ASSERT_EQ(s.s.write(id, str("y")), 1u);
  c.feed_ok(take(s.s));
  EXPECT_EQ(c.inbound(id), "y");

  Side c2(Role::client);
  c2.feed_ok(go_away_frame(2));
  EXPECT_EQ(c2.h.drain(), (Events{"go_away 2"}));
  EXPECT_EQ(c2.s.state().go_away_code, GoAwayCode::internal_error);
}

TEST(MuxSession, SynAfterGoAwaySentIsReset) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  s.s.go_away(GoAwayCode::normal);
  take(s.s);
  s.h.drain();
  s.feed_ok(wu(SYN, 3, 0));
  EXPECT_EQ(take(s.s), (V{0, 1, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0}));
  EXPECT_FALSE(s.s.has_stream(3));
  EXPECT_TRUE(s.h.ev.empty());
  EXPECT_EQ(s.s.state().remote_next_id, 5u);
  // A Data SYN is refused the same way; its body is skipped, even split.
  V syn_data = data(5, SYN, bytes(1000));
  s.feed_ok(V(syn_data.begin(), syn_data.begin() + 20));
  EXPECT_EQ(take(s.s), wu(RST, 5, 0));
  s.feed_ok(cat({V(syn_data.begin() + 20, syn_data.end()), data(5, 0, bytes(10)), data(1, 0, str("old"))}));
  EXPECT_TRUE(take(s.s).empty());
  EXPECT_EQ(s.h.drain(), (Events{"data 1"}));
  EXPECT_EQ(s.s.state().remote_next_id, 7u);
  // The spent id cannot come back.
  EXPECT_EQ(s.feed(wu(SYN, 3, 0)).status, ConsumeStatus::protocol_error);
}

TEST(MuxSession, MaxStreamsRefusesWithRst) {
  SessionLimits l;
  l.max_streams = 2;
  Side s(Role::server, l);
  s.feed_ok(cat({wu(SYN, 1, 0), wu(SYN, 3, 0), wu(SYN, 5, 0), data(7, SYN, bytes(300)), ping(SYN, 1)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "opened 3"}));
  EXPECT_EQ(take(s.s), cat({wu(RST, 5, 0), wu(RST, 7, 0), ping(ACK, 1)}));
  EXPECT_EQ(s.s.stream_count(), 2u);
  EXPECT_EQ(s.s.open(), 0u);  // our own opens count too
  EXPECT_FALSE(s.s.failed());
  s.s.reset(1);
  take(s.s);
  s.feed_ok(wu(SYN, 9, 0));
  EXPECT_EQ(s.h.drain(), (Events{"opened 9"}));
  EXPECT_TRUE(take(s.s).empty());
}

// ============================================================================
// Protocol errors, each on its own
// ============================================================================

namespace {

// Feeds `setup` (must be fine), then `bad` followed by a Ping that must not be
// answered. Checks the Go Away(1) bytes, the status and that the session is dead.
void expect_protocol_error(Role role, const V& setup, const V& bad, SessionLimits l = {}) {
  Side s(role, l);
  if (!setup.empty()) s.feed_ok(setup);
  take(s.s);
  s.h.drain();
  ConsumeResult r = s.feed(cat({bad, ping(SYN, 77)}));
  EXPECT_EQ(r.status, ConsumeStatus::protocol_error);
  ASSERT_NE(r.error, nullptr);
  EXPECT_GT(std::string(r.error).size(), 5u);
  EXPECT_EQ(take(s.s), kGoAwayProtocolError);
  EXPECT_TRUE(s.s.failed());
  EXPECT_TRUE(s.s.go_away_sent());
  EXPECT_EQ(s.s.state().go_away_code, GoAwayCode::protocol_error);
  EXPECT_TRUE(s.h.ev.empty());
  EXPECT_TRUE(s.s.state().partial_input.empty());
  // Dead from now on.
  EXPECT_EQ(s.feed(ping(SYN, 1)).status, ConsumeStatus::already_failed);
  EXPECT_EQ(s.feed({}).status, ConsumeStatus::already_failed);
  EXPECT_EQ(s.s.open(), 0u);
  EXPECT_FALSE(s.s.ping(1, 0));
  s.s.go_away(GoAwayCode::normal);
  EXPECT_TRUE(take(s.s).empty());
}

}  // namespace

TEST(MuxSessionError, UnsupportedVersion) {
  expect_protocol_error(Role::server, {}, hdr(1, SYN, 1, 0, /*version=*/1));
  expect_protocol_error(Role::server, {}, hdr(2, SYN, 0, 0, /*version=*/0xff));
}

TEST(MuxSessionError, UnknownFrameType) {
  expect_protocol_error(Role::server, {}, hdr(4, 0, 1, 0));
  expect_protocol_error(Role::server, {}, hdr(0xff, 0, 0, 0));
}

TEST(MuxSessionError, DataOnStreamZero) {
  expect_protocol_error(Role::server, {}, hdr(0, 0, 0, 0));
  expect_protocol_error(Role::server, {}, data(0, 0, bytes(5)));
  expect_protocol_error(Role::client, {}, data(0, SYN, {}));
}

TEST(MuxSessionError, WindowUpdateOnStreamZero) {
  expect_protocol_error(Role::server, {}, wu(0, 0, 5));
  expect_protocol_error(Role::server, {}, wu(SYN, 0, 0));
}

TEST(MuxSessionError, PingOnAStream) {
  expect_protocol_error(Role::server, {}, hdr(2, SYN, 1, 7));
  expect_protocol_error(Role::client, {}, hdr(2, ACK, 2, 7));
}

TEST(MuxSessionError, GoAwayOnAStream) { expect_protocol_error(Role::server, {}, hdr(3, 0, 1, 0)); }

TEST(MuxSessionError, SynWithWrongParity) {
  expect_protocol_error(Role::server, {}, wu(SYN, 2, 0));
  expect_protocol_error(Role::server, {}, data(4, SYN, str("x")));
  expect_protocol_error(Role::client, {}, wu(SYN, 1, 0));
  expect_protocol_error(Role::client, {}, data(3, SYN, {}));
}

TEST(MuxSessionError, SynReusingAnOlderId) {
  expect_protocol_error(Role::server, cat({wu(SYN, 1, 0), wu(SYN, 3, 0), wu(SYN, 5, 0)}), wu(SYN, 3, 0));
  expect_protocol_error(Role::server, cat({wu(SYN, 5, 0), wu(SYN, 3, 0), wu(RST, 3, 0)}), data(3, SYN, str("b")));
  // Reset and forgotten, the id is still spent, in order or out of it.
  expect_protocol_error(Role::server, cat({wu(SYN, 1, 0), wu(RST, 1, 0)}), wu(SYN, 1, 0));
  expect_protocol_error(Role::server, cat({wu(SYN, 5, 0), wu(RST, 5, 0)}), wu(SYN, 5, 0));
  expect_protocol_error(Role::client, cat({wu(SYN, 2, 0), wu(SYN, 4, 0), wu(FIN | RST, 2, 0)}), wu(SYN, 2, 0));
}

// yamux forbids reusing an id but never required increasing order:
// hashicorp/yamux allocates ids under a lock and sends each SYN from the
// opening goroutine, so SYNs race. docs/protocol.md section 2.
TEST(MuxSession, SynsOutOfIdOrderAreAccepted) {
  Side s(Role::server);
  s.feed_ok(cat({wu(SYN, 5, 0), wu(SYN, 1, 0), data(9, SYN, str("nine")), wu(SYN | FIN, 3, 0), data(7, SYN, str("x"))}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 5", "opened 1", "opened 9", "data 9", "opened 3", "fin 3", "opened 7",
                                 "data 7"}));
  EXPECT_EQ(s.s.stream_count(), 5u);
  EXPECT_EQ(s.inbound(9), "nine");
  // All five spent: the gaps closed, nothing is remembered one by one.
  EXPECT_EQ(s.s.state().remote_next_id, 11u);
  EXPECT_TRUE(s.s.state().remote_ids_ahead.empty());
  for (uint32_t id : {1u, 3u, 5u, 7u, 9u}) EXPECT_FALSE(s.s.remote_id_unused(id)) << id;
  EXPECT_TRUE(s.s.remote_id_unused(11));
  EXPECT_FALSE(s.s.remote_id_unused(12));  // our parity
}

TEST(MuxSession, SynsInEveryOrderOfAWindowAreAccepted) {
  // Every permutation of four racing SYNs, as a goroutine scheduler may send them.
  std::vector<uint32_t> ids = {1, 3, 5, 7};
  do {
    Side s(Role::server);
    V in;
    for (uint32_t id : ids) in = cat({in, wu(SYN, id, 0), data(id, 0, str("p")), wu(FIN, id, 0)});
    s.feed_ok(in);
    EXPECT_EQ(s.s.stream_count(), 4u);
    EXPECT_EQ(s.s.state().remote_next_id, 9u);
    EXPECT_TRUE(s.s.state().remote_ids_ahead.empty());
    for (uint32_t id : ids) EXPECT_EQ(s.inbound(id), "p");
  } while (std::next_permutation(ids.begin(), ids.end()));
}

// One SYN on the highest id must not make every later id a "reuse", and a
// stream opened before the control stream must not spend id 1.
TEST(MuxSession, HighestIdAndEarlyStreamsSpendOnlyThemselves) {
  Side s(Role::server);
  s.feed_ok(cat({wu(SYN, 0xFFFFFFFFu, 0), wu(SYN, 3, 0)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 4294967295", "opened 3"}));
  EXPECT_EQ(s.s.state().remote_ids_ahead, (std::vector<uint32_t>{3, 0xFFFFFFFFu}));
  s.feed_ok(cat({wu(SYN, 1, 0), wu(SYN, 5, 0)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "opened 5"}));
  EXPECT_EQ(s.s.state().remote_next_id, 7u);
  EXPECT_EQ(s.s.state().remote_ids_ahead, (std::vector<uint32_t>{0xFFFFFFFFu}));
  EXPECT_EQ(s.feed(wu(SYN, 0xFFFFFFFFu, 0)).status, ConsumeStatus::protocol_error);  // open: a duplicate
  // The client role: even ids, the highest one too.
  Side c(Role::client);
  c.feed_ok(cat({wu(SYN, 0xFFFFFFFEu, 0), wu(SYN, 2, 0)}));
  EXPECT_EQ(c.s.stream_count(), 2u);
  EXPECT_EQ(c.s.state().remote_next_id, 4u);
  // Every id spent up to the top: the id space is used up, nothing wraps.
  SessionState st;
  st.role = Role::server;
  st.next_local_id = 2;
  st.remote_next_id = 0xFFFFFFFFu;
  Recorder h2;
  Session top(std::move(st), h2);
  ASSERT_EQ(top.consume(wu(SYN, 0xFFFFFFFFu, 0)).status, ConsumeStatus::ok);
  EXPECT_EQ(top.state().remote_next_id, 0x100000001ull);
  EXPECT_FALSE(top.remote_id_unused(0xFFFFFFFFu));
  EXPECT_FALSE(top.remote_id_unused(1));
}

// "Never used" has bounded memory: beyond max_ids_ahead ids spent out of
// order, the lowest unused ids are given up (counted), and only they.
TEST(MuxSession, IdsAheadAreBoundedAndTheOldestGapIsGivenUp) {
  SessionLimits l;
  l.max_ids_ahead = 3;
  l.max_streams = 100;
  Side s(Role::server, l);
  s.feed_ok(cat({wu(SYN, 5, 0), wu(SYN, 9, 0), wu(SYN, 13, 0)}));
  EXPECT_EQ(s.s.state().remote_ids_ahead, (std::vector<uint32_t>{5, 9, 13}));
  s.h.drain();
  // A fourth: ids 1 and 3 (below 5, the lowest remembered) are given up.
  s.feed_ok(wu(SYN, 17, 0));
  EXPECT_EQ(s.h.drain(), (Events{"given_up 2", "opened 17"}));
  EXPECT_EQ(s.s.state().remote_next_id, 7u);
  EXPECT_EQ(s.s.state().remote_ids_ahead, (std::vector<uint32_t>{9, 13, 17}));
  EXPECT_FALSE(s.s.remote_id_unused(1));
  EXPECT_FALSE(s.s.remote_id_unused(3));
  EXPECT_TRUE(s.s.remote_id_unused(7));
  EXPECT_TRUE(s.s.remote_id_unused(11));
  // The ones not given up still open; then the gaps close.
  s.feed_ok(cat({wu(SYN, 7, 0), wu(SYN, 11, 0), wu(SYN, 15, 0)}));
  EXPECT_EQ(s.s.state().remote_next_id, 19u);
  EXPECT_TRUE(s.s.state().remote_ids_ahead.empty());
  EXPECT_EQ(s.feed(wu(SYN, 3, 0)).status, ConsumeStatus::protocol_error);
}

// A SYN refused (Go Away sent, max_streams) spends its id out of order too.
TEST(MuxSession, RefusedSynsSpendTheirIdsOutOfOrder) {
  SessionLimits l;
  l.max_streams = 1;
  Side s(Role::server, l);
  s.feed_ok(cat({wu(SYN, 3, 0), wu(SYN, 1, 0)}));  // 1 is refused: one stream at most
  EXPECT_EQ(s.h.drain(), (Events{"opened 3"}));
  EXPECT_EQ(take(s.s), wu(RST, 1, 0));
  EXPECT_EQ(s.s.state().remote_next_id, 5u);
  EXPECT_EQ(s.feed(wu(SYN, 1, 0)).status, ConsumeStatus::protocol_error);
}

TEST(MuxSessionError, SynForAnOpenStream) {
  expect_protocol_error(Role::server, wu(SYN, 1, 0), wu(SYN, 1, 0));
  expect_protocol_error(Role::server, wu(SYN, 1, 0), data(1, SYN, str("x")));
}

TEST(MuxSessionError, DataBeyondTheWindow) {
  expect_protocol_error(Role::server, wu(SYN, 1, 0), data(1, 0, bytes(kInitialWindow + 1)));
  expect_protocol_error(Role::server, {}, data(1, SYN, bytes(kInitialWindow + 1)));
  // Partly used window, no credit returned yet.
  expect_protocol_error(Role::server, data(1, SYN, bytes(200000)), data(1, 0, bytes(kInitialWindow - 200000 + 1)));
  // The header alone is enough: the body is never buffered.
  expect_protocol_error(Role::server, wu(SYN, 1, 0), hdr(0, 0, 1, 0x7fffffff));
}

TEST(MuxSessionError, DataExactlyFillingTheWindowIsFine) {
  Side s(Role::server);
  s.feed_ok(data(1, SYN, bytes(kInitialWindow)));
  EXPECT_EQ(s.st(1).recv_window, 0u);
  EXPECT_FALSE(s.s.failed());
}

TEST(MuxSessionError, WindowUpdateOverflow) {
  {
    Side c(Role::client);
    uint32_t id = c.s.open();
    take(c.s);
    ConsumeResult r = c.feed(cat({wu(ACK, id, 0xffffffffu - kInitialWindow + 1), ping(SYN, 1)}));
    EXPECT_EQ(r.status, ConsumeStatus::protocol_error);
    EXPECT_EQ(take(c.s), kGoAwayProtocolError);
    EXPECT_TRUE(c.h.ev.empty());  // not even the ACK took effect
  }
  expect_protocol_error(Role::server, wu(SYN, 1, 0), wu(0, 1, 0xffffffffu));
  expect_protocol_error(Role::server, {}, wu(SYN, 1, 0xffffffffu - kInitialWindow + 1));
  expect_protocol_error(Role::server, wu(SYN, 1, 100), wu(0, 1, 0xffffffffu - kInitialWindow - 100 + 1));
}

TEST(MuxSessionError, FramesBeforeTheErrorAreProcessed) {
  Side s(Role::server);
  ConsumeResult r = s.feed(cat({data(1, SYN, str("ok")), ping(SYN, 4), hdr(9, 0, 0, 0), data(1, 0, str("no"))}));
  EXPECT_EQ(r.status, ConsumeStatus::protocol_error);
  EXPECT_STREQ(r.error, "frame of an unknown type");
  EXPECT_EQ(s.h.drain(), (Events{"opened 1", "data 1"}));
  EXPECT_EQ(take(s.s), cat({ping(ACK, 4), kGoAwayProtocolError}));
  EXPECT_EQ(s.inbound(1), "ok");
}

TEST(MuxSessionError, ErrorInAHeaderSplitAcrossCalls) {
  Side s(Role::server);
  V bad = hdr(7, 0, 0, 0);
  for (size_t i = 0; i + 1 < bad.size(); ++i) s.feed_ok({bad[i]});
  EXPECT_EQ(s.feed({bad.back()}).status, ConsumeStatus::protocol_error);
  EXPECT_EQ(take(s.s), kGoAwayProtocolError);
}

TEST(MuxSessionError, ProtocolErrorAfterOwnGoAwayStillReportsCode1) {
  Side s(Role::server);
  s.s.go_away(GoAwayCode::normal);
  EXPECT_EQ(s.feed(hdr(5, 0, 0, 0)).status, ConsumeStatus::protocol_error);
  EXPECT_EQ(take(s.s), cat({go_away_frame(0), kGoAwayProtocolError}));
}

// ============================================================================
// Unknown streams and partial input
// ============================================================================

TEST(MuxSession, UnknownStreamDataIsSkippedWithoutBuffering) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  s.h.drain();
  V in = cat({data(99, 0, bytes(100000)), wu(FIN, 99, 0), wu(0, 98, 10), data(1, 0, str("after")), ping(SYN, 8)});
  // Chunks of 1..5000 bytes; partial_input never holds more than a header.
  std::mt19937 rng(3);
  for (size_t off = 0; off < in.size();) {
    size_t n = std::min<size_t>(in.size() - off, 1 + rng() % 5000);
    s.feed_ok(V(in.begin() + ptrdiff_t(off), in.begin() + ptrdiff_t(off + n)));
    EXPECT_LE(s.s.state().partial_input.size(), kHeaderSize + 5);  // at most "after" is buffered
    off += n;
  }
  EXPECT_EQ(s.h.drain(), (Events{"data 1"}));
  EXPECT_EQ(s.inbound(1), "after");
  EXPECT_EQ(take(s.s), ping(ACK, 8));
  EXPECT_TRUE(s.s.state().partial_input.empty());
}

TEST(MuxSession, HugeUnknownStreamBodyIsSkipped) {
  Side s(Role::server);
  s.feed_ok(hdr(0, 0, 3, 0xffffffffu));
  V chunk(1 << 20, 0x5a);
  uint64_t left = 0xffffffffu;
  // 4 GiB would take long; check the marker counts down, then finish with the
  // exact remainder plus a frame.
  for (int i = 0; i < 8; ++i) {
    s.feed_ok(chunk);
    left -= chunk.size();
    ASSERT_EQ(s.s.state().partial_input.to_vector(), hdr(0, 0, 0, uint32_t(left)));
  }
  // Jump ahead: the skip marker is plain state.
  SessionState st = s.s.state();
  st.partial_input.clear();
  st.partial_input.append(hdr(0, 0, 0, 3));
  Recorder h;
  Session s2(std::move(st), h);
  ASSERT_EQ(s2.consume(cat({{1, 2, 3}, ping(SYN, 6)})).status, ConsumeStatus::ok);
  EXPECT_EQ(take(s2), ping(ACK, 6));
  EXPECT_TRUE(s2.state().partial_input.empty());
}

TEST(MuxSession, FrameForAStreamResetBetweenConsumeCallsIsDropped) {
  Side s(Role::server);
  s.feed_ok(wu(SYN, 1, 0));
  V f = data(1, 0, bytes(50000));
  s.feed_ok(V(f.begin(), f.begin() + 30000));  // buffered: the stream is known
  EXPECT_EQ(s.s.state().partial_input.size(), 30000u);
  s.s.reset(1);
  s.feed_ok(V(f.begin() + 30000, f.begin() + 30001));  // now it is skipped
  EXPECT_EQ(s.s.state().partial_input.to_vector(), hdr(0, 0, 0, 50000 - (30000 - 12) - 1));
  s.feed_ok(cat({V(f.begin() + 30001, f.end()), ping(SYN, 2)}));
  EXPECT_EQ(s.h.drain(), (Events{"opened 1"}));
  EXPECT_EQ(take(s.s), cat({wu(RST, 1, 0), ping(ACK, 2)}));
}

TEST(MuxSession, GoAwayBetweenPartsOfADataSynRefusesIt) {
  Side s(Role::server);
  V f = data(1, SYN, bytes(100));
  s.feed_ok(V(f.begin(), f.begin() + 50));
  s.s.go_away(GoAwayCode::normal);
  s.feed_ok(V(f.begin() + 50, f.end()));
  EXPECT_TRUE(s.h.ev.empty());
  EXPECT_EQ(take(s.s), cat({go_away_frame(0), wu(RST, 1, 0)}));
  EXPECT_TRUE(s.s.state().partial_input.empty());
}

namespace {

// Everything a peer can throw at a server, valid throughout.
V server_script() {
  return cat({wu(SYN, 1, 0),
              data(1, 0, bytes(70000, 1)),
              ping(SYN, 11),
              data(3, SYN, bytes(5000, 2)),
              wu(SYN, 5, 4096),
              data(1, ACK, bytes(33, 3)),
              data(99, 0, bytes(20000, 4)),  // unknown stream
              wu(0, 98, 7),
              data(3, FIN, bytes(17, 5)),
              data(3, 0, bytes(40, 6)),  // after FIN: stream 3 is reset
              wu(RST, 5, 0),
              data(5, 0, bytes(300, 7)),  // 5 is gone now
              data(7, SYN | FIN, {}),
              wu(0, 1, 1000),
              data(9, SYN, bytes(kInitialWindow, 8)),
              ping(ACK, 1),
              data(1, FIN, bytes(12, 9)),
              go_away_frame(0),
              data(11, SYN, bytes(3, 10))});
}

struct Outcome {
  Events ev;
  V out;
  SessionState st;
};

Outcome run_server_script(const std::vector<size_t>& cuts) {
  Side s(Role::server);
  s.h.hook = [&](const std::string& what, uint32_t id) {
    if (what == "opened" && id % 3 == 0) s.s.accept(id);
    if (what == "data" && id == 9) s.s.consumed(id, 1000);
  };
  V in = server_script();
  size_t prev = 0;
  for (size_t c : cuts) {
    s.feed_ok(V(in.begin() + ptrdiff_t(prev), in.begin() + ptrdiff_t(c)));
    prev = c;
  }
  s.feed_ok(V(in.begin() + ptrdiff_t(prev), in.end()));
  return {s.h.ev, take(s.s), s.s.state()};
}

}  // namespace

TEST(MuxSession, ByteAtATimeEqualsBulk) {
  Outcome bulk = run_server_script({});
  EXPECT_EQ(bulk.ev, (Events{"opened 1", "data 1", "opened 3", "data 3", "opened 5", "data 1", "data 3", "fin 3",
                             "reset 3", "reset 5", "opened 7", "fin 7", "opened 9", "data 9", "data 1", "fin 1",
                             "go_away 0", "opened 11", "data 11"}));
  EXPECT_EQ(bulk.out, cat({ping(ACK, 11), wu(ACK, 3, 0), wu(RST, 3, 0), wu(ACK, 9, 0)}));
  const size_t n = server_script().size();
  std::vector<size_t> every;
  for (size_t i = 1; i < n; ++i) every.push_back(i);
  Outcome bytewise = run_server_script(every);
  EXPECT_EQ(bytewise.ev, bulk.ev);
  EXPECT_EQ(bytewise.out, bulk.out);
  expect_state_eq(bytewise.st, bulk.st);
  std::mt19937 rng(9);
  for (int round = 0; round < 30; ++round) {
    std::vector<size_t> cuts;
    for (size_t i = 1 + rng() % 20; i < n; i += 1 + rng() % (round % 2 ? 40 : 30000)) cuts.push_back(i);
    Outcome o = run_server_script(cuts);
    EXPECT_EQ(o.ev, bulk.ev) << round;
    EXPECT_EQ(o.out, bulk.out) << round;
    expect_state_eq(o.st, bulk.st);
  }
}

// ============================================================================
// State export and rebuild
// ============================================================================

TEST(MuxSession, RebuiltSessionContinuesByteIdentically) {
  Side s(Role::server);
  V f = data(3, SYN, bytes(3000));
  s.feed_ok(cat({wu(SYN, 1, 0), V(f.begin(), f.begin() + 100)}));
  s.s.accept(1);
  ASSERT_TRUE(s.s.ping(5, 99));
  ASSERT_EQ(s.s.write(1, bytes(500)), 500u);
  s.h.drain();

  Recorder h2;
  Session copy(SessionState(s.s.state()), h2);
  expect_state_eq(copy.state(), s.s.state());
  V rest = cat({V(f.begin() + 100, f.end()), ping(ACK, 5), wu(FIN, 1, 0)});
  ASSERT_EQ(s.s.consume(rest).status, ConsumeStatus::ok);
  ASSERT_EQ(copy.consume(rest).status, ConsumeStatus::ok);
  s.s.close_write(1);
  copy.close_write(1);
  EXPECT_EQ(h2.ev, (Events{"opened 3", "data 3", "pong 99 5", "fin 1", "closed 1"}));
  EXPECT_EQ(h2.ev, s.h.ev);
  EXPECT_EQ(take(copy), take(s.s));
  expect_state_eq(copy.state(), s.s.state());
}

TEST(MuxSession, LocalIdsRunOutWithoutWrapping) {
  SessionState st;
  st.role = Role::client;
  st.next_local_id = 0xffffffffu;
  Recorder h;
  Session c(std::move(st), h);
  EXPECT_EQ(c.open(), 0xffffffffu);
  EXPECT_EQ(c.open(), 0u);
  SessionState st2;
  st2.role = Role::server;
  st2.next_local_id = 0xfffffffeu;
  Session s(std::move(st2), h);
  EXPECT_EQ(s.open(), 0xfffffffeu);
  EXPECT_EQ(s.open(), 0u);
}

TEST(MuxSession, ToStr) {
  EXPECT_STREQ(to_str(StreamPhase::awaiting_ack), "awaiting_ack");
  EXPECT_STREQ(to_str(StreamPhase::awaiting_accept), "awaiting_accept");
  EXPECT_STREQ(to_str(StreamPhase::open), "open");
  EXPECT_STREQ(to_str(ConsumeStatus::ok), "ok");
  EXPECT_STREQ(to_str(ConsumeStatus::protocol_error), "protocol_error");
  EXPECT_STREQ(to_str(ConsumeStatus::already_failed), "already_failed");
}

TEST(MuxSession, IdleSessionOwnsNoBuffers) {
  Side c(Role::client);
  uint32_t id = c.s.open();
  c.feed_ok(cat({wu(ACK, id, 0), data(id, 0, str("x"))}));
  c.s.consumed(id, 1);
  take(c.s);
  const SessionState& st = c.s.state();
  EXPECT_TRUE(st.output.empty());
  EXPECT_TRUE(st.partial_input.empty());
  EXPECT_TRUE(st.streams.at(id).inbound.empty());
  EXPECT_EQ(st.streams.at(id).inbound.front().size(), 0u);
  EXPECT_LE(sizeof(StreamState), 64u);
}

// ============================================================================
// Two endpoints in memory: many streams, random sizes, every byte checked
// ============================================================================

namespace {

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// How many bytes the opener (or acceptor) of stream `id` sends, and their values.
uint64_t total_len(uint32_t id, bool from_client, uint64_t max) {
  uint64_t h = mix(id * 2 + (from_client ? 1 : 0));
  switch (h % 5) {
    case 0: return 0;
    case 1: return h % 64;
    default: return (h >> 8) % max;
  }
}
uint8_t payload(uint32_t id, bool from_client, uint64_t off) {
  return uint8_t((off * 0x9e3779b1u + id * 0x85ebca77u + (from_client ? 0x1234567u : 0)) >> 24);
}

struct AppStream {
  uint64_t sent = 0, send_total = 0;
  uint64_t received = 0, recv_total = 0;
  bool fin_sent = false, fin_received = false, closed = false, reset = false;
};

struct Peer final : SessionHandler {
  Peer(Role r, SessionLimits l, uint64_t max_len) : role(r), limits(l), max_len(max_len) {
    s = std::make_unique<Session>(r, *this, l);
  }
  Role role;
  SessionLimits limits;
  uint64_t max_len;
  std::unique_ptr<Session> s;
  std::map<uint32_t, AppStream> app;
  Events log;
  bool is_client() const { return role == Role::client; }

  AppStream& track(uint32_t id) {
    AppStream& a = app[id];
    a.send_total = total_len(id, is_client(), max_len);
    a.recv_total = total_len(id, !is_client(), max_len);
    return a;
  }
  void note(const char* what, uint32_t id) { log.push_back(std::string(what) + " " + std::to_string(id)); }

  void on_stream_opened(uint32_t id) override {
    note("opened", id);
    track(id);
    if (id % 3 != 0) s->accept(id);
  }
  void on_stream_data(uint32_t id) override {
    log.push_back("data " + std::to_string(id) + " " + std::to_string(s->inbound(id)->size()));
    if (id % 4 == 1) read(id, SIZE_MAX);  // some streams read from inside the callback
  }
  void on_stream_fin(uint32_t id) override {
    note("fin", id);
    AppStream& a = app.at(id);
    a.fin_received = true;
    EXPECT_EQ(a.received + s->inbound(id)->size(), a.recv_total) << id;
  }
  void on_stream_reset(uint32_t id) override {
    note("reset", id);
    app.at(id).reset = true;
  }
  void on_stream_writable(uint32_t id) override { note("writable", id); }
  void on_stream_closed(uint32_t id) override {
    note("closed", id);
    AppStream& a = app.at(id);
    a.closed = true;
    EXPECT_TRUE(a.fin_sent && a.fin_received) << id;
    EXPECT_EQ(a.received, a.recv_total) << id;
    EXPECT_EQ(a.sent, a.send_total) << id;
  }
  void on_ping_answered(uint32_t value, uint64_t sent_at_ms) override {
    log.push_back("pong " + std::to_string(value) + " " + std::to_string(sent_at_ms));
  }
  void on_go_away(GoAwayCode code) override { note("go_away", uint32_t(code)); }

  // Reads up to max bytes, checking every one of them.
  void read(uint32_t id, size_t max) {
    const ByteQueue* q = s->inbound(id);
    size_t n = std::min(max, q->size());
    if (n == 0) return;
    V buf(n);
    q->peek(buf);
    AppStream& a = app.at(id);
    for (size_t i = 0; i < n; ++i) {
      if (buf[i] != payload(id, !is_client(), a.received + i)) {
        ADD_FAILURE() << "stream " << id << " byte " << a.received + i;
        break;
      }
    }
    a.received += n;
    s->consumed(id, n);
  }
  void write_some(uint32_t id, size_t max) {
    AppStream& a = app.at(id);
    size_t n = size_t(std::min<uint64_t>(max, a.send_total - a.sent));
    V buf(n);
    for (size_t i = 0; i < n; ++i) buf[i] = payload(id, is_client(), a.sent + i);
    a.sent += s->write(id, buf);
    if (a.sent == a.send_total && !a.fin_sent) {
      a.fin_sent = true;
      s->close_write(id);
    }
  }
  std::vector<uint32_t> live() const {
    std::vector<uint32_t> v;
    for (auto& [id, a] : app)
      if (!a.closed && !a.reset && s->has_stream(id)) v.push_back(id);
    return v;
  }
  // What the exported states held, to prove the rebuild tests cover the hard cases.
  struct RebuildStats {
    size_t rebuilds = 0, partial_header = 0, partial_body = 0, skipping = 0, with_inbound = 0, with_output = 0,
           awaiting = 0, pings = 0;
  };
  static RebuildStats& stats() {
    static RebuildStats st;
    return st;
  }
  void rebuild() {
    RebuildStats& st = stats();
    const SessionState& old = s->state();
    ++st.rebuilds;
    const size_t partial = old.partial_input.size();
    if (partial > 0 && partial < kHeaderSize) ++st.partial_header;
    if (partial > kHeaderSize) ++st.partial_body;
    if (partial == kHeaderSize) {
      V h = old.partial_input.to_vector();
      if (h[1] == 0 && h[4] == 0 && h[5] == 0 && h[6] == 0 && h[7] == 0) ++st.skipping;
    }
    if (!old.output.empty()) ++st.with_output;
    if (!old.pings.empty()) ++st.pings;
    for (auto& [id, ss] : old.streams) {
      if (!ss.inbound.empty()) {
        ++st.with_inbound;
        break;
      }
    }
    for (auto& [id, ss] : old.streams) {
      if (ss.phase != StreamPhase::open) {
        ++st.awaiting;
        break;
      }
    }
    SessionState copy = s->state();
    s.reset();  // the copy must not share anything with the old object
    s = std::make_unique<Session>(std::move(copy), *this, limits);
  }
};

enum class Feed { bulk, bytewise, chunks };

struct Pump {
  Pump(uint64_t seed, uint32_t want_client, uint32_t want_server, uint64_t max_len, Feed feed = Feed::bulk)
      : rng(seed), c(Role::client, limits(), max_len), s(Role::server, limits(), max_len),
        want_c(want_client), want_s(want_server), feed(feed) {}
  static SessionLimits limits() {
    SessionLimits l;
    l.max_frame_data = 5000;
    l.max_pending_pings = 4;
    return l;
  }
  std::mt19937_64 rng;
  Peer c, s;
  V c2s, s2c;
  uint32_t want_c, want_s, opened_c = 0, opened_s = 0;
  Feed feed;
  uint64_t steps = 0;
  std::mt19937 feed_rng{1};
  size_t reset_odds = 300;  // a reset action resets a stream once in this many

  size_t rnd(size_t n) { return size_t(rng() % n); }

  void transfer(Peer& from, Peer& to, V& wire, size_t max) {
    ByteQueue& out = from.s->output();
    size_t n = std::min(max, out.size());
    if (n == 0) return;
    V buf(n);
    out.peek(buf);
    out.pop(n);
    wire.insert(wire.end(), buf.begin(), buf.end());
    std::span<const uint8_t> rest(buf);
    while (!rest.empty()) {
      size_t k = feed == Feed::bulk ? rest.size() : feed == Feed::bytewise ? 1 : 1 + feed_rng() % 300;
      k = std::min(k, rest.size());
      ConsumeResult r = to.s->consume(rest.first(k));
      ASSERT_EQ(r.status, ConsumeStatus::ok) << (r.error ? r.error : "");
      rest = rest.subspan(k);
    }
  }

  bool done() const {
    if (opened_c < want_c || opened_s < want_s) return false;
    if (!c.s->output().empty() || !s.s->output().empty()) return false;
    for (const Peer* p : {&c, &s})
      for (auto& [id, a] : p->app)
        if (!a.closed && !a.reset) return false;
    return c.s->stream_count() == 0 && s.s->stream_count() == 0;
  }

  void step() {
    ++steps;
    const bool client = rnd(2) == 0;
    Peer& p = client ? c : s;
    Peer& q = client ? s : c;
    const size_t action = rnd(20);
    if (action == 0) {
      uint32_t& opened = client ? opened_c : opened_s;
      if (opened < (client ? want_c : want_s)) {
        uint32_t id = p.s->open();
        ASSERT_NE(id, 0u);
        ++opened;
        p.track(id);
      }
    } else if (action <= 6) {
      auto ids = p.live();
      if (ids.empty()) return;
      uint32_t id = ids[rnd(ids.size())];
      if (!p.app[id].fin_sent) p.write_some(id, rnd(4) == 0 ? 1 + rnd(100) : 1 + rnd(90000));
    } else if (action <= 10) {
      auto ids = p.live();
      if (ids.empty()) return;
      uint32_t id = ids[rnd(ids.size())];
      p.read(id, rnd(3) == 0 ? SIZE_MAX : 1 + rnd(70000));
    } else if (action == 11) {
      auto ids = p.live();
      if (!ids.empty()) p.s->accept(ids[rnd(ids.size())]);
    } else if (action == 12) {
      if (rnd(reset_odds) != 0) return;
      auto ids = p.live();
      if (ids.empty()) return;
      uint32_t id = ids[rnd(ids.size())];
      p.s->reset(id);
      p.app[id].reset = true;
    } else if (action == 13) {
      (void)p.s->ping(uint32_t(rng()), steps);
    } else {
      const size_t kind = rnd(6);
      transfer(p, q, client ? c2s : s2c, kind == 0 ? SIZE_MAX : kind == 1 ? 1 + rnd(30) : 1 + rnd(40000));
    }
  }

  // Runs to the end; `rebuild_at` lists steps after which one side is rebuilt from its exported state.
  void run(const std::vector<std::pair<uint64_t, bool>>& rebuild_at = {}) {
    size_t next = 0;
    while (!done()) {
      step();
      if (::testing::Test::HasFatalFailure()) return;
      while (next < rebuild_at.size() && rebuild_at[next].first == steps) {
        (rebuild_at[next].second ? c : s).rebuild();
        ++next;
      }
      ASSERT_LT(steps, 3000000u) << "the conversation does not finish";
    }
  }
};

}  // namespace

TEST(MuxSessionPump, ManyStreamsAllBytesArrive) {
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    Pump p(seed, 24, 10, 600000);
    p.run();
    if (HasFatalFailure()) return;
    size_t closed = 0, reset = 0;
    uint64_t bytes_checked = 0;
    for (const Peer* peer : {&p.c, &p.s})
      for (auto& [id, a] : peer->app) {
        closed += a.closed;
        reset += a.reset;
        if (a.closed) bytes_checked += a.received;
      }
    EXPECT_EQ(p.c.app.size(), 34u);
    EXPECT_EQ(p.s.app.size(), 34u);
    EXPECT_GT(closed, 60u) << seed;
    EXPECT_LE(reset, 8u) << seed;
    EXPECT_GT(bytes_checked, 5000000u) << seed;
    EXPECT_FALSE(p.c.s->failed());
    EXPECT_FALSE(p.s.s->failed());
    EXPECT_TRUE(p.c.s->pending_pings().size() <= 4);
  }
}

TEST(MuxSessionPump, FeedingByteAtATimeOrInPiecesChangesNothing) {
  for (uint64_t seed = 11; seed <= 13; ++seed) {
    Pump bulk(seed, 8, 4, 120000, Feed::bulk);
    bulk.run();
    Pump bytewise(seed, 8, 4, 120000, Feed::bytewise);
    bytewise.run();
    Pump chunks(seed, 8, 4, 120000, Feed::chunks);
    chunks.run();
    if (HasFatalFailure()) return;
    for (const Pump* o : {&bytewise, &chunks}) {
      EXPECT_EQ(o->steps, bulk.steps);
      EXPECT_TRUE(o->c2s == bulk.c2s) << seed;
      EXPECT_TRUE(o->s2c == bulk.s2c) << seed;
      EXPECT_EQ(o->c.log, bulk.c.log);
      EXPECT_EQ(o->s.log, bulk.s.log);
    }
  }
}

// ARCHITECTURE principle 9: export at random points, rebuild, keep talking,
// compare the byte streams with an uninterrupted run.
TEST(MuxSessionPump, ExportMidStreamAndContinue) {
  for (uint64_t seed = 21; seed <= 28; ++seed) {
    Pump straight(seed, 12, 6, 300000, seed % 2 ? Feed::bulk : Feed::chunks);
    straight.reset_odds = 20;
    straight.run();
    if (HasFatalFailure()) return;
    std::mt19937_64 pick(seed * 1000);
    std::vector<std::pair<uint64_t, bool>> at;
    for (int i = 0; i < 25; ++i) at.push_back({1 + pick() % straight.steps, pick() % 2 == 0});
    std::sort(at.begin(), at.end());
    Pump rebuilt(seed, 12, 6, 300000, seed % 2 ? Feed::bulk : Feed::chunks);
    rebuilt.reset_odds = 20;
    rebuilt.run(at);
    if (HasFatalFailure()) return;
    EXPECT_EQ(rebuilt.steps, straight.steps) << seed;
    EXPECT_TRUE(rebuilt.c2s == straight.c2s) << seed;
    EXPECT_TRUE(rebuilt.s2c == straight.s2c) << seed;
    EXPECT_EQ(rebuilt.c.log, straight.c.log) << seed;
    EXPECT_EQ(rebuilt.s.log, straight.s.log) << seed;
    expect_state_eq(rebuilt.c.s->state(), straight.c.s->state());
    expect_state_eq(rebuilt.s.s->state(), straight.s.s->state());
  }
}

// The same, but rebuilding at every single step of a small conversation, so
// every intermediate state (partial headers, partial bodies, skip markers,
// streams awaiting accept or ack, pending pings) goes through a copy.
TEST(MuxSessionPump, ExportAtEveryStep) {
  for (uint64_t seed = 31; seed <= 45; ++seed) {
    Pump straight(seed, 5, 3, 50000, Feed::chunks);
    straight.reset_odds = 10;
    straight.run();
    if (HasFatalFailure()) return;
    std::vector<std::pair<uint64_t, bool>> at;
    for (uint64_t i = 1; i <= straight.steps; ++i) at.push_back({i, i % 2 == 0});
    Pump rebuilt(seed, 5, 3, 50000, Feed::chunks);
    rebuilt.reset_odds = 10;
    rebuilt.run(at);
    if (HasFatalFailure()) return;
    EXPECT_TRUE(rebuilt.c2s == straight.c2s) << seed;
    EXPECT_TRUE(rebuilt.s2c == straight.s2c) << seed;
    EXPECT_EQ(rebuilt.c.log, straight.c.log) << seed;
    EXPECT_EQ(rebuilt.s.log, straight.s.log) << seed;
  }
  const Peer::RebuildStats& st = Peer::stats();
  std::printf("rebuilds %zu: partial header %zu, partial body %zu, skipping %zu, inbound %zu, output %zu, "
              "awaiting %zu, pings %zu\n", st.rebuilds, st.partial_header, st.partial_body, st.skipping,
              st.with_inbound, st.with_output, st.awaiting, st.pings);
  EXPECT_GT(st.partial_header, 0u);
  EXPECT_GT(st.partial_body, 0u);
  EXPECT_GT(st.skipping, 0u);
  EXPECT_GT(st.with_inbound, 0u);
  EXPECT_GT(st.with_output, 0u);
  EXPECT_GT(st.awaiting, 0u);
  EXPECT_GT(st.pings, 0u);
}

// Robustness: a valid conversation with a few bytes changed must end in either
// "ok" or one protocol error (and "already_failed" after it), with the flow
// control invariant intact and nothing buffered beyond what windows allow.
TEST(MuxSessionPump, MutatedInputKeepsInvariants) {
  Pump p(51, 6, 2, 80000);
  p.run();
  if (HasFatalFailure()) return;
  ASSERT_GT(p.c2s.size(), 10000u);
  // Where the frame headers are, so that most mutations hit them.
  std::vector<size_t> headers;
  for (size_t off = 0; off + kHeaderSize <= p.c2s.size();) {
    headers.push_back(off);
    const uint8_t* h = &p.c2s[off];
    const uint32_t len = uint32_t(h[8]) << 24 | uint32_t(h[9]) << 16 | uint32_t(h[10]) << 8 | h[11];
    off += kHeaderSize + (h[1] == 0 ? len : 0);
  }
  std::mt19937 rng(5);
  size_t failures = 0;
  for (int round = 0; round < 400; ++round) {
    V in = p.c2s;
    for (size_t m = 1 + rng() % 3; m > 0; --m) {
      const size_t at = rng() % 4 == 0 ? rng() % in.size() : headers[rng() % headers.size()] + rng() % kHeaderSize;
      in[at] = uint8_t(rng() % 2 ? rng() : in[at] ^ (1u << (rng() % 8)));
    }
    Recorder h;
    Session s(Role::server, h);
    h.hook = [&](const std::string& what, uint32_t id) {
      if (what == "opened") {
        if (id % 7 == 0) return s.reset(id);
        s.accept(id);
        s.set_recv_window(id, 1u << 26);
      }
      if (what == "data") s.consumed(id, s.inbound(id)->size());
      if (what == "fin" && id % 2) s.close_write(id);
    };
    bool failed = false;
    std::span<const uint8_t> rest(in);
    while (!rest.empty()) {
      size_t k = std::min<size_t>(rest.size(), 1 + rng() % 3000);
      ConsumeResult r = s.consume(rest.first(k));
      rest = rest.subspan(k);
      if (failed) {
        ASSERT_EQ(r.status, ConsumeStatus::already_failed);
      } else if (r.status == ConsumeStatus::protocol_error) {
        failed = true;
        ++failures;
        ASSERT_NE(r.error, nullptr);
        V out = take(s);
        ASSERT_GE(out.size(), kHeaderSize);
        EXPECT_EQ(V(out.end() - 12, out.end()), kGoAwayProtocolError);
      } else {
        ASSERT_EQ(r.status, ConsumeStatus::ok);
      }
      for (auto& [id, st] : s.state().streams)
        ASSERT_EQ(uint64_t(st.recv_window) + st.inbound.size() + st.unacked_credit, st.recv_window_max) << id;
      ASSERT_LE(s.state().partial_input.size(), kHeaderSize + (1u << 26));
      take(s);
    }
  }
  std::printf("mutated %zu-byte conversation 400 times: %zu protocol errors\n", p.c2s.size(), failures);
  EXPECT_GT(failures, 50u);  // most mutations are caught
  EXPECT_LT(failures, 400u);  // and some are harmless
}
