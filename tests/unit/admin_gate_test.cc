// The admin listeners' request framing and admission rules (admin/request_frame.h,
// admin/admission.h), without sockets: bytes in, verdicts out, a fake clock.
#include <gtest/gtest.h>

#include <string>

#include "admin/admission.h"
#include "admin/request_frame.h"

using namespace baton::admin;
using Status = RequestFrame::Status;

namespace {

RequestFrame frame(const std::string& b) { return frame_request(b, 16384, 4096); }

}  // namespace

TEST(RequestFrame, HeadArrivesInPieces) {
  std::string req = "GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
  for (size_t n = 0; n < req.size(); ++n) EXPECT_EQ(frame(req.substr(0, n)).status, Status::incomplete) << n;
  RequestFrame f = frame(req);
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.head_bytes, req.size());
  EXPECT_EQ(f.body_bytes, 0u);
  EXPECT_FALSE(f.body_refused);
  EXPECT_EQ(f.method, "GET");
  EXPECT_EQ(f.path, "/healthz");
}

TEST(RequestFrame, PipelinedRequestsFrameOneAtATime) {
  std::string a = "GET /a HTTP/1.1\r\n\r\n", b = "POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz";
  RequestFrame f = frame(a + b);
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.head_bytes + f.body_bytes, a.size());
  f = frame(b + a);
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.body_bytes, 3u);
  EXPECT_EQ(f.head_bytes + f.body_bytes, b.size());
  EXPECT_EQ(f.path, "/b");
}

TEST(RequestFrame, BodyIsAwaitedUpToTheLimit) {
  std::string head = "POST /drain HTTP/1.1\r\ncontent-LENGTH:  4096 \r\n\r\n";
  EXPECT_EQ(frame(head + std::string(4095, 'x')).status, Status::incomplete);
  RequestFrame f = frame(head + std::string(4096, 'x'));
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.body_bytes, 4096u);
}

TEST(RequestFrame, LargeOrChunkedOrBadBodiesAreRefusedAtTheHead) {
  RequestFrame f = frame("POST /drain HTTP/1.1\r\nContent-Length: 4097\r\n\r\n");
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_TRUE(f.body_refused);
  EXPECT_EQ(f.discard_bytes, 4097u);
  EXPECT_EQ(f.body_bytes, 0u);
  f = frame("POST /drain HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_TRUE(f.body_refused);
  EXPECT_EQ(f.discard_bytes, 0u);
  f = frame("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello");
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_TRUE(f.body_refused);
  f = frame("POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n");
  EXPECT_TRUE(f.body_refused);
  // the first Content-Length decides (as cpp-httplib reads it)
  f = frame("POST /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 9000\r\n\r\nab");
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.body_bytes, 2u);
}

TEST(RequestFrame, HeadTooLarge) {
  std::string big = "GET / HTTP/1.1\r\nX: " + std::string(20000, 'z');
  EXPECT_EQ(frame_request(big, 16384, 4096).status, Status::head_too_large);
  EXPECT_EQ(frame_request(big.substr(0, 16383), 16384, 4096).status, Status::incomplete);
  // the end of the head must lie within the limit
  std::string just = "GET / HTTP/1.1\r\nX: " + std::string(100, 'z') + "\r\n\r\n";
  EXPECT_EQ(frame_request(just, just.size(), 0).status, Status::complete);
  EXPECT_EQ(frame_request(just, just.size() - 1, 0).status, Status::head_too_large);
}

TEST(RequestFrame, BareLineFeedsEndTheHeadToo) {
  RequestFrame f = frame("GET /readyz HTTP/1.1\nHost: a\n\n");
  EXPECT_EQ(f.status, Status::complete);
  EXPECT_EQ(f.path, "/readyz");
}

// ---------------------------------------------------------------------------

namespace {

AdmissionLimits limits() {
  AdmissionLimits l;
  l.idle_ms = 1000;
  l.request_deadline_ms = 2000;
  l.answer_deadline_ms = 2000;
  l.slow_after_ms = 250;
  l.max_slow_per_client = 2;
  l.max_connections = 4;
  return l;
}

}  // namespace

TEST(Admission, SilentConnectionIsIdleAfterOneSecond) {
  Admission a(limits());
  EXPECT_FALSE(a.admit(1, "10.0.0.1", 0));
  EXPECT_EQ(a.next_deadline(), 1000u);
  EXPECT_TRUE(a.expire(999).empty());
  auto v = a.expire(1000);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].id, 1u);
  EXPECT_EQ(v[0].reason, CloseReason::idle);
  EXPECT_EQ(a.size(), 0u);
}

TEST(Admission, TrickledRequestMeetsItsTotalDeadline) {
  Admission a(limits());
  EXPECT_FALSE(a.admit(1, "10.0.0.1", 0));
  // a byte every 500 ms: each read is prompt, the request never ends
  for (uint64_t t = 0; t < 2000; t += 500) {
    a.received(1);
    EXPECT_TRUE(a.expire(t).empty()) << t;
  }
  EXPECT_EQ(a.counts().slow, 1u);
  EXPECT_EQ(a.next_deadline(), 2000u);
  auto v = a.expire(2000);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].reason, CloseReason::deadline);
  EXPECT_EQ(a.slow_from("10.0.0.1"), 0u);
}

TEST(Admission, KeepAliveRestartsTheClock) {
  Admission a(limits());
  EXPECT_FALSE(a.admit(1, "s", 0));
  a.received(1);
  a.handling(1);
  EXPECT_TRUE(a.expire(5000).empty());  // a handler has no client deadline
  a.awaiting_request(1, 5000);
  EXPECT_EQ(a.next_deadline(), 6000u);  // idle again, from the end of the answer
  a.received(1);
  EXPECT_TRUE(a.expire(6999).empty());
  EXPECT_EQ(a.expire(7000).at(0).reason, CloseReason::deadline);
}

TEST(Admission, SlowConnectionsAreBoundedPerSource) {
  Admission a(limits());  // 2 slow per source
  for (uint64_t id = 1; id <= 3; ++id) {
    EXPECT_FALSE(a.admit(id, "10.0.0.1", 0));
    a.received(id);
  }
  EXPECT_FALSE(a.admit(4, "10.0.0.2", 0));
  a.received(4);
  auto v = a.expire(250);
  ASSERT_EQ(v.size(), 1u);  // the third from 10.0.0.1, at once, long before its deadline
  EXPECT_EQ(v[0].id, 3u);
  EXPECT_EQ(v[0].reason, CloseReason::per_client);
  EXPECT_EQ(a.slow_from("10.0.0.1"), 2u);
  EXPECT_EQ(a.slow_from("10.0.0.2"), 1u);
  // a prompt request from the same source is never slow, so never refused
  EXPECT_FALSE(a.admit(5, "10.0.0.1", 300));
  a.received(5);
  a.handling(5);
  EXPECT_TRUE(a.expire(1000).empty());
  // once one of them is done, another may be slow
  a.remove(1);
  EXPECT_FALSE(a.admit(6, "10.0.0.1", 1000));
  a.received(6);
  EXPECT_TRUE(a.expire(1250).empty());
  EXPECT_EQ(a.slow_from("10.0.0.1"), 2u);
}

TEST(Admission, AClientThatDoesNotReadIsSlowAndMeetsTheAnswerDeadline) {
  Admission a(limits());
  EXPECT_FALSE(a.admit(1, "s", 0));
  a.received(1);
  a.handling(1);
  a.awaiting_client_read(1, 100);
  EXPECT_TRUE(a.expire(350).empty());
  EXPECT_EQ(a.counts().slow, 1u);
  EXPECT_EQ(a.expire(2100).at(0).reason, CloseReason::answer_deadline);
}

TEST(Admission, FullListenerEvictsTheLongestWaiting) {
  Admission a(limits());  // 4 connections
  EXPECT_FALSE(a.admit(1, "a", 0));
  EXPECT_FALSE(a.admit(2, "b", 10));
  EXPECT_FALSE(a.admit(3, "c", 20));
  EXPECT_FALSE(a.admit(4, "d", 30));
  a.handling(1);  // being answered: not a candidate
  auto v = a.admit(5, "e", 40);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, 2u);
  EXPECT_EQ(v->reason, CloseReason::capacity);
  EXPECT_EQ(a.size(), 4u);
  // every one in a handler: the newcomer is the one refused
  for (uint64_t id : {3, 4, 5}) a.handling(id);
  v = a.admit(6, "f", 50);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, 6u);
  EXPECT_EQ(a.size(), 4u);
}

TEST(Admission, FullListenerTakesRoomFromTheBusiestAddress) {
  Admission a(limits());  // 4 connections
  EXPECT_FALSE(a.admit(1, "probe", 0));  // the oldest, but its address holds one
  EXPECT_FALSE(a.admit(2, "flood", 10));
  EXPECT_FALSE(a.admit(3, "flood", 20));
  EXPECT_FALSE(a.admit(4, "other", 30));
  auto v = a.admit(5, "flood", 40);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, 2u);  // flood's longest-waiting one
  v = a.admit(6, "flood", 50);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, 3u);
  v = a.admit(7, "x", 60);  // flood holds 2 (5, 6), the others 1
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, 5u);
}

TEST(Admission, CountsByState) {
  Admission a(limits());
  EXPECT_FALSE(a.admit(1, "s", 0));
  EXPECT_FALSE(a.admit(2, "s", 0));
  EXPECT_FALSE(a.admit(3, "s", 0));
  a.received(2);
  a.handling(3);
  (void)a.expire(300);
  Admission::Counts n = a.counts();
  EXPECT_EQ(n.reading, 1u);
  EXPECT_EQ(n.slow, 1u);
  EXPECT_EQ(n.handling, 1u);
  EXPECT_EQ(n.writing, 0u);
}
