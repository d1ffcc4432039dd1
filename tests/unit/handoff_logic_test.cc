// The hand-over logic without I/O (src/handoff/parent_logic.h,
// child_logic.h): both sides driven through every step and every failure
// with fake hosts, the time given by the test, no socket, timer or signal.
// Messages are the real encodings; where both logics run, each reads what
// the other wrote.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "handoff/child_logic.h"
#include "handoff/codec.h"
#include "handoff/parent_logic.h"

// The hand-over's plain data (tunnel state, codec, logic) builds without the
// TLS library: its headers stay behind tls/handshake.h and tls/context.h.
#if defined(MBEDTLS_SSL_H) || defined(MBEDTLS_X509_CRT_H)
#error "a hand-over header pulls in mbedTLS"
#endif

namespace baton::handoff {
namespace {

constexpr uint32_t kStep = 5000;
constexpr uint32_t kUid = 1000;

bool fd_open(int fd) { return fcntl(fd, F_GETFD) != -1; }

// A tunnel's state: its client connection is /dev/null (a state needs a
// socket fd to decode; no I/O happens here).
proxy::TunnelState tunnel(const std::string& id, size_t output_bytes = 0) {
  proxy::TunnelState t;
  t.phase = proxy::LinkPhase::serving;
  t.client_id = id;
  t.record.suite = tls::suite::ecdhe_rsa_aes256_gcm_sha384;
  t.record.read.seq = t.record.write.seq = 1;
  t.session.next_local_id = 2;
  t.session.remote_next_id = 1;
  t.fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  EXPECT_GE(t.fd, 0);
  if (output_bytes) t.record.output.append(std::vector<uint8_t>(output_bytes, 'x'));
  return t;
}

// A message as the channel would deliver it.
struct Msg {
  Header h;
  std::vector<uint8_t> body;
  std::vector<int> fds;
};

Msg parse(const Outgoing& o) {
  Msg m;
  std::string err;
  EXPECT_EQ(parse_header(o.bytes, m.h, err), ParseStatus::ok) << err;
  m.body.assign(o.bytes.begin() + kHeaderSize, o.bytes.end());
  m.fds = o.fds;
  return m;
}

Msg make(MsgType type, std::vector<uint8_t> bytes) {
  Outgoing o;
  o.type = type;
  o.bytes = std::move(bytes);
  return parse(o);
}

Msg hello_msg(uint16_t min_v = kMinStateVersion, uint16_t max_v = kStateVersion) {
  Hello h;
  h.pid = 42;
  h.min_state_version = min_v;
  h.max_state_version = max_v;
  std::vector<uint8_t> b;
  encode_hello(h, b);
  return make(MsgType::hello, b);
}
Msg listening_msg() {
  std::vector<uint8_t> b;
  encode_listening(b);
  return make(MsgType::listening, b);
}
Msg ack_msg(uint32_t seq, uint32_t adopted, const std::string& reason = "") {
  BatchAck a;
  a.seq = seq;
  a.adopted = adopted;
  a.reason = reason;
  std::vector<uint8_t> b;
  encode_batch_ack(a, b);
  return make(MsgType::batch_ack, b);
}
Msg abort_msg(const std::string& why) {
  std::vector<uint8_t> b;
  encode_abort(why, b);
  return make(MsgType::abort, b);
}

std::vector<MsgType> types(const Step& s) {
  std::vector<MsgType> t;
  for (const Outgoing& o : s.send) t.push_back(o.type);
  return t;
}

std::string reason_of(const Outgoing& o) {
  Msg m = parse(o);
  std::string r;
  EXPECT_EQ(decode_reason(m.body, r), "");
  return r;
}

// ---------------------------------------------------------------------------
// The old process's server, as ParentHost.

class FakeParentHost : public ParentHost {
 public:
  bool is_draining = false;
  bool handing_over = false;
  bool accepting = true;
  bool listener_released = false;
  int listener = 99;  // never touched by the logic
  std::deque<proxy::TunnelState> movable;
  size_t in_handshake = 0;
  std::vector<std::string> resumed, resumed_drained;  // client ids
  size_t drained_here = 0;
  proxy::Metrics m;

  ~FakeParentHost() override {
    for (auto& t : movable) proxy::close_fds(t);
  }
  bool draining() const override { return is_draining; }
  void begin_handoff() override { handing_over = true; }
  void end_handoff() override {
    handing_over = false;
    accepting = true;
  }
  ServerStateMsg server_state(int& fd) override {
    ServerStateMsg s;
    s.epoch = 7;
    s.metrics = m;
    fd = listener;
    return s;
  }
  void stop_accepting() override { accepting = false; }
  bool export_next(proxy::TunnelState& out, uint16_t) override {
    if (movable.empty()) return false;
    out = std::move(movable.front());
    movable.pop_front();
    return true;
  }
  bool any_exportable(uint16_t) const override { return !movable.empty(); }
  size_t handshaking() const override { return in_handshake; }
  size_t close_handshaking(const std::string&) override {
    size_t n = in_handshake;
    in_handshake = 0;
    return n;
  }
  bool resume(proxy::TunnelState& st, bool drain) override {
    (drain ? resumed_drained : resumed).push_back(st.client_id);
    proxy::close_fds(st);  // a real host adopts them
    return true;
  }
  size_t drain_exportable() override {
    size_t n = movable.size();
    drained_here += n;
    for (auto& t : movable) proxy::close_fds(t);
    movable.clear();
    return n;
  }
  proxy::Metrics& metrics() override { return m; }
  void release_listener() override { listener_released = true; }

  uint64_t counted(const char* result) const {
    return m.get(proxy::series<proxy::Fam::handoff_tunnels_total>(result));
  }
};

// Connects a new process to `l` and takes it to the transfer: hello, then
// listening. Returns the Step that answers listening (the first batches).
Step to_transfer(ParentLogic& l, uint64_t now = 0, Msg hello = hello_msg()) {
  EXPECT_TRUE(l.on_connection(kUid, 20, now).accepted);
  Step s = l.on_message(hello.h, hello.body, now);
  EXPECT_EQ(types(s), std::vector<MsgType>{MsgType::server_state});
  Msg m = listening_msg();
  return l.on_message(m.h, m.body, now);
}

ParentLogicOptions popts() {
  ParentLogicOptions o;
  o.step_timeout_ms = kStep;
  o.my_uid = kUid;
  o.my_pid = 10;
  return o;
}

// ---------------------------------------------------------------------------
// The new process's server, as ChildHost.

class FakeChildHost : public ChildHost {
 public:
  bool built = false;
  std::string build_error;
  uint64_t epoch = 0;
  int listener = -2;
  bool accepting = false;
  size_t limit = 1000, live = 0;
  std::set<std::string> refuse;  // client ids adopt() fails on
  std::vector<std::string> adopted, started, let_go;
  proxy::Metrics m;

  std::string build(const ServerStateMsg& s, int fd) override {
    if (!build_error.empty()) return build_error;
    built = true;
    epoch = s.epoch + 1;
    m = s.metrics;
    listener = fd;
    accepting = true;
    return "";
  }
  void stop_accepting() override { accepting = false; }
  void resume_accepting() override { accepting = true; }
  size_t room() const override { return live >= limit ? 0 : limit - live; }
  size_t max_tunnels() const override { return limit; }
  std::string adopt(proxy::TunnelState& st) override {
    proxy::close_fds(st);
    if (refuse.count(st.client_id)) return "cannot adopt " + st.client_id;
    adopted.push_back(st.client_id);
    ++live;
    return "";
  }
  void start_adopted() override {
    started.insert(started.end(), adopted.begin(), adopted.end());
    adopted.clear();
  }
  void let_go_adopted() override {
    let_go.insert(let_go.end(), adopted.begin(), adopted.end());
    live -= adopted.size();
    adopted.clear();
  }
  proxy::Metrics& metrics() override { return m; }
};

// ---------------------------------------------------------------------------
// Both logics, wired as the channel would: each Step's messages go to the
// other side, in order.

struct Pair {
  FakeParentHost ph;
  FakeChildHost ch;
  ParentLogic parent{ph, popts()};
  ChildLogic child{ch, kStep, 20, kUid};
  uint64_t now = 1000;
  std::deque<Msg> to_child, to_parent;
  bool parent_closed = false, child_closed = false;
  size_t batches_sent = 0, max_in_flight = 0, in_flight = 0;

  void from_parent(const Step& s) {
    for (const Outgoing& o : s.send) {
      if (o.type == MsgType::batch) ++batches_sent, max_in_flight = std::max(max_in_flight, ++in_flight);
      Msg m = parse(o);
      for (int& fd : m.fds) fd = dup(fd);  // SCM_RIGHTS: the new process gets copies
      to_child.push_back(std::move(m));
    }
    if (s.close != CloseChannel::no) parent_closed = true;
  }
  void from_child(const Step& s) {
    for (const Outgoing& o : s.send) {
      if (o.type == MsgType::batch_ack) --in_flight;
      to_parent.push_back(parse(o));
    }
    if (s.close != CloseChannel::no) child_closed = true;
  }
  void connect() {
    ASSERT_TRUE(parent.on_connection(kUid, 20, now).accepted);
    from_child(child.start(true, kUid, 10, now));
  }
  // Delivers one message; false when nothing is queued.
  bool step_child() {
    if (to_child.empty()) return false;
    Msg m = std::move(to_child.front());
    to_child.pop_front();
    from_child(child.on_message(m.h, m.body, m.fds, now));
    for (int fd : m.fds)
      if (fd >= 0) close(fd);  // the channel closes what the handler did not keep
    return true;
  }
  bool step_parent() {
    if (to_parent.empty()) return false;
    Msg m = std::move(to_parent.front());
    to_parent.pop_front();
    Step s = parent.on_message(m.h, m.body, now);
    bool poll = s.commit_after_poll;
    from_parent(s);
    if (poll) from_parent(parent.on_poll_passed(now));
    return true;
  }
  void run() {
    while (step_child() || step_parent()) {
    }
  }
};

// ---------------------------------------------------------------------------
// Together

TEST(HandoffLogic, EveryTunnelMovesAndTheOldProcessCommits) {
  Pair p;
  for (int i = 0; i < 10; ++i) p.ph.movable.push_back(tunnel("t" + std::to_string(i)));
  p.ph.m.inc(proxy::series<proxy::Fam::tunnels_total>("accepted"), 5);
  p.connect();
  EXPECT_TRUE(p.ph.handing_over);
  p.run();
  EXPECT_EQ(p.parent.phase(), ParentPhase::committed);
  EXPECT_EQ(p.child.phase(), ChildPhase::done);
  ASSERT_TRUE(p.child.result().ok) << p.child.result().error;
  EXPECT_EQ(p.child.result().tunnels, 10u);
  EXPECT_EQ(p.ch.started.size(), 10u);
  EXPECT_EQ(p.ch.started.front(), "t0");
  EXPECT_EQ(p.ch.epoch, 8u);
  EXPECT_EQ(p.ch.listener, -1) << "no fd rode with the test's messages (the listener number is the host's)";
  EXPECT_TRUE(p.ph.listener_released);
  EXPECT_FALSE(p.ph.accepting);
  EXPECT_EQ(p.parent.stats().tunnels_sent, 10u);
  EXPECT_EQ(p.ph.counted("sent"), 10u);
  EXPECT_EQ(p.ch.m.get(proxy::series<proxy::Fam::tunnels_total>("accepted")), 5u) << "counters continue in the new process";
  EXPECT_EQ(p.ch.m.get(proxy::series<proxy::Fam::handoff_tunnels_total>("received")), 10u);
  EXPECT_TRUE(p.parent_closed);
  EXPECT_TRUE(p.child_closed);
  EXPECT_EQ(p.parent.next_deadline(), kNoDeadline);
  EXPECT_EQ(p.child.next_deadline(), kNoDeadline);
}

TEST(HandoffLogic, NothingToMoveStillCommits) {
  Pair p;
  p.connect();
  p.run();
  EXPECT_EQ(p.parent.phase(), ParentPhase::committed);
  EXPECT_TRUE(p.child.result().ok);
  EXPECT_EQ(p.child.result().tunnels, 0u);
  EXPECT_EQ(p.child.result().batches, 0u);
}

TEST(HandoffLogic, BatchesHoldAtMost253FdsAndTheWindowIsFour) {
  rlimit rl{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
  if (rl.rlim_cur < 3000) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, 3000);
    ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
  }
  ASSERT_GE(rl.rlim_cur, 1500u) << "needs 1500 descriptors";
  Pair p;
  p.ch.limit = 2000;
  std::vector<int> fds;
  for (int i = 0; i < 1300; ++i) {
    p.ph.movable.push_back(tunnel("t" + std::to_string(i)));
    fds.push_back(p.ph.movable.back().fd);
  }
  p.connect();
  // hello, server_state, listening: then the first batches, no acks yet
  ASSERT_TRUE(p.step_parent());
  ASSERT_TRUE(p.step_child());
  ASSERT_TRUE(p.step_parent());
  EXPECT_EQ(p.to_child.size(), ParentLogic::kWindow);
  for (const Msg& m : p.to_child) EXPECT_LE(m.fds.size(), kMaxFdsPerMessage);
  p.run();
  EXPECT_EQ(p.batches_sent, 6u);  // ceil(1300 / 253)
  EXPECT_LE(p.max_in_flight, ParentLogic::kWindow);
  ASSERT_TRUE(p.child.result().ok);
  EXPECT_EQ(p.ch.started.size(), 1300u);
  // Committed: the old process's copies are closed.
  for (int fd : fds) ASSERT_FALSE(fd_open(fd)) << fd;
}

TEST(HandoffLogic, BatchesAreCutBySize) {
  Pair p;
  for (int i = 0; i < 20; ++i) p.ph.movable.push_back(tunnel("t" + std::to_string(i), 1 << 20));
  p.connect();
  p.run();
  ASSERT_TRUE(p.child.result().ok);
  EXPECT_EQ(p.ch.started.size(), 20u);
  EXPECT_GE(p.batches_sent, 3u);  // 8 MiB a batch at most
}

// ---------------------------------------------------------------------------
// Who may connect

TEST(ParentLogic, RefusesAnotherUserSilentlyAndABusyOrDrainingOneWithAReason) {
  FakeParentHost h;
  ParentLogic l(h, popts());
  auto a = l.on_connection(kUid + 1, 5, 0);
  EXPECT_FALSE(a.accepted);
  EXPECT_FALSE(a.tell);
  EXPECT_EQ(l.phase(), ParentPhase::idle);
  EXPECT_TRUE(l.on_connection(0, 5, 0).accepted) << "root may take over";
  a = l.on_connection(kUid, 6, 0);
  EXPECT_FALSE(a.accepted);
  EXPECT_TRUE(a.tell);
  EXPECT_NE(a.why.find("another new process"), std::string::npos);
  FakeParentHost h2;
  h2.is_draining = true;
  ParentLogic l2(h2, popts());
  a = l2.on_connection(kUid, 5, 0);
  EXPECT_FALSE(a.accepted);
  EXPECT_NE(a.why.find("draining"), std::string::npos);
  EXPECT_FALSE(h2.handing_over);
}

// ---------------------------------------------------------------------------
// The old process, at each step: the new process goes away, says abort,
// times out, or sends what does not belong.

enum class Failure { gone, abort, timeout, cancel, garbage };
enum class At { hello, listening, batch, partly_acked, commit_pending };
const char* name(Failure f) { return std::array{"gone", "abort", "timeout", "cancel", "garbage"}[size_t(f)]; }
const char* name(At a) {
  return std::array{"hello", "listening", "batch", "partly_acked", "commit_pending"}[size_t(a)];
}

class ParentFailure : public ::testing::TestWithParam<std::tuple<At, Failure>> {};

TEST_P(ParentFailure, EveryExportedTunnelComesBackAndTheListenerAcceptsAgain) {
  auto [at, failure] = GetParam();
  FakeParentHost h;
  std::vector<int> fds;
  for (int i = 0; i < 6; ++i) {
    // 3 MiB of unsent records each: two a batch (8 MiB), three batches.
    h.movable.push_back(tunnel("t" + std::to_string(i), 3 << 20));
    fds.push_back(h.movable.back().fd);
  }
  ParentLogic l(h, popts());
  uint64_t now = 100;
  ASSERT_TRUE(l.on_connection(kUid, 20, now).accepted);
  Msg hello = hello_msg();
  if (at != At::hello) {
    Step s = l.on_message(hello.h, hello.body, now);
    ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::server_state});
    ASSERT_EQ(s.send[0].fds, std::vector<int>{99}) << "the listener rides along";
  }
  if (at == At::batch || at == At::partly_acked || at == At::commit_pending) {
    Msg lm = listening_msg();
    Step s = l.on_message(lm.h, lm.body, now);
    EXPECT_FALSE(h.accepting);
    ASSERT_EQ(l.phase(), ParentPhase::transferring);
    ASSERT_GE(s.send.size(), 2u);
    if (at != At::batch) {
      for (size_t i = 0; i < s.send.size(); ++i) {
        if (at == At::partly_acked && i == 1) break;
        Msg am = ack_msg(s.send[i].seq, uint32_t(parse(s.send[i]).fds.size()));
        Step r = l.on_message(am.h, am.body, now);
        if (at == At::commit_pending && i + 1 == s.send.size()) {
          ASSERT_TRUE(r.commit_after_poll);
          ASSERT_TRUE(l.commit_pending());
        }
      }
    }
  }
  const ParentPhase before = l.phase();
  const uint64_t deadline = l.next_deadline();
  Step s;
  switch (failure) {
    case Failure::gone: s = l.on_closed("connection reset", now); break;
    case Failure::abort: {
      Msg m = abort_msg("SIGTERM");
      s = l.on_message(m.h, m.body, now);
      break;
    }
    case Failure::timeout:
      if (at == At::commit_pending) {
        EXPECT_EQ(deadline, kNoDeadline) << "a pending commit waits for the poll, not the clock";
        return;
      }
      ASSERT_EQ(deadline, now + kStep) << name(at);
      EXPECT_TRUE(l.on_deadline(deadline - 1).send.empty());
      EXPECT_EQ(l.phase(), before);
      s = l.on_deadline(deadline);
      break;
    case Failure::cancel: s = l.cancel("drain started", now); break;
    case Failure::garbage: {  // a message out of turn
      Msg m = at == At::hello ? listening_msg() : hello_msg();
      s = l.on_message(m.h, m.body, now);
      break;
    }
  }
  EXPECT_EQ(l.phase(), ParentPhase::idle) << name(at) << "/" << name(failure);
  EXPECT_TRUE(s.finished);
  if (failure == Failure::gone) {
    EXPECT_TRUE(s.send.empty());
    EXPECT_EQ(s.close, CloseChannel::now);
  } else {
    ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort}) << "the new process is told";
    EXPECT_EQ(s.close, CloseChannel::after_send);
    EXPECT_FALSE(reason_of(s.send[0]).empty());
  }
  EXPECT_FALSE(h.handing_over);
  EXPECT_TRUE(h.accepting);
  EXPECT_FALSE(h.listener_released);
  // Every tunnel: still here (never exported) or resumed, none drained.
  EXPECT_EQ(h.resumed.size() + h.movable.size(), 6u);
  EXPECT_TRUE(h.resumed_drained.empty());
  EXPECT_EQ(h.counted("resumed"), h.resumed.size());
  EXPECT_EQ(l.next_deadline(), kNoDeadline);
  if (at == At::commit_pending) {
    EXPECT_TRUE(l.on_poll_passed(now).send.empty()) << "called off: nothing is committed";
    EXPECT_EQ(l.phase(), ParentPhase::idle);
  }
  // A later restart can try anew.
  EXPECT_TRUE(l.on_connection(kUid, 21, now).accepted);
}

INSTANTIATE_TEST_SUITE_P(EveryStep, ParentFailure,
                         ::testing::Combine(::testing::Values(At::hello, At::listening, At::batch, At::partly_acked,
                                                              At::commit_pending),
                                            ::testing::Values(Failure::gone, Failure::abort, Failure::timeout,
                                                              Failure::cancel, Failure::garbage)),
                         [](const auto& info) {
                           return std::string(name(std::get<0>(info.param))) + "_" + name(std::get<1>(info.param));
                         });

TEST(ParentLogic, CommittedOrIdleIgnoresCancelCloseAndDeadline) {
  FakeParentHost h;
  ParentLogic l(h, popts());
  EXPECT_TRUE(l.cancel("x", 0).send.empty());
  EXPECT_TRUE(l.on_closed("x", 0).send.empty());
  EXPECT_TRUE(l.on_deadline(1u << 30).send.empty());
  Pair p;
  p.connect();
  p.run();
  ASSERT_EQ(p.parent.phase(), ParentPhase::committed);
  Step s = p.parent.cancel("drain", p.now);
  EXPECT_TRUE(s.send.empty());
  EXPECT_FALSE(s.finished);
  EXPECT_EQ(p.parent.phase(), ParentPhase::committed);
  EXPECT_FALSE(p.parent.on_connection(kUid, 30, p.now).accepted) << "one hand-over per process";
}

TEST(ParentLogic, RefusedBatchDrainsItsTunnelsAndTheRestHere) {
  FakeParentHost h;
  for (int i = 0; i < 8; ++i) h.movable.push_back(tunnel("t" + std::to_string(i), 3 << 20));
  ParentLogic l(h, popts());
  Step s = to_transfer(l);
  Msg m;
  ASSERT_EQ(s.send.size(), ParentLogic::kWindow);  // 2 tunnels a batch: the window is full
  // The first batch: one of two taken (the new process reached max_tunnels).
  m = ack_msg(s.send[0].seq, 1, "max_tunnels (1) reached");
  Step r = l.on_message(m.h, m.body, 0);
  EXPECT_TRUE(r.send.empty()) << "no further batch once the new process refused some";
  EXPECT_EQ(h.resumed_drained, std::vector<std::string>{"t1"});
  EXPECT_TRUE(h.movable.empty()) << "what was never sent drains here (make before break)";
  EXPECT_EQ(h.drained_here, 0u) << "all were exported already (window 4 x 2)";
  // The other batches in flight: refused entirely.
  for (size_t i = 1; i < s.send.size(); ++i) {
    m = ack_msg(s.send[i].seq, 0, "max_tunnels (1) reached");
    r = l.on_message(m.h, m.body, 0);
  }
  EXPECT_TRUE(r.commit_after_poll);
  r = l.on_poll_passed(0);
  ASSERT_EQ(types(r), std::vector<MsgType>{MsgType::commit});
  EXPECT_EQ(l.stats().tunnels_sent, 1u);
  EXPECT_EQ(l.stats().tunnels_drained, 7u);
  EXPECT_EQ(h.counted("drained"), 7u);
  EXPECT_EQ(h.resumed_drained.size(), 7u);
}

TEST(ParentLogic, NewProcessThatCannotReadTheStateGetsNoTunnels) {
  FakeParentHost h;
  for (int i = 0; i < 3; ++i) h.movable.push_back(tunnel("t" + std::to_string(i)));
  ParentLogic l(h, popts());
  Step s = to_transfer(l, 0, hello_msg(kStateVersion + 1, kStateVersion + 1));  // reads only a newer layout
  EXPECT_TRUE(s.send.empty());
  EXPECT_EQ(h.drained_here, 3u);
  ASSERT_TRUE(s.commit_after_poll);
  ASSERT_EQ(types(l.on_poll_passed(0)), std::vector<MsgType>{MsgType::commit});
  EXPECT_EQ(l.stats().tunnels_drained, 3u);
}

TEST(ParentLogic, MalformedOrUnknownAcknowledgementCallsItOff) {
  for (int variant = 0; variant < 4; ++variant) {
    FakeParentHost h;
    h.movable.push_back(tunnel("a"));
    ParentLogic l(h, popts());
    Step s = to_transfer(l);
    Msg m;
    ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::batch});
    if (variant == 0) m = ack_msg(s.send[0].seq + 1, 1);  // unknown batch
    if (variant == 1) m = ack_msg(s.send[0].seq, 2);      // more than it held
    if (variant == 2) {
      m = ack_msg(s.send[0].seq, 1);
      m.body.resize(2);  // cut short
    }
    if (variant == 3) {
      m = ack_msg(s.send[0].seq, 1);
      m.h.version = kProtocolVersion + 1;
    }
    Step r = l.on_message(m.h, m.body, 0);
    ASSERT_EQ(types(r), std::vector<MsgType>{MsgType::abort}) << variant;
    EXPECT_EQ(h.resumed, std::vector<std::string>{"a"}) << variant;
    EXPECT_EQ(l.phase(), ParentPhase::idle);
  }
}

TEST(ParentLogic, MalformedHelloCallsItOff) {
  FakeParentHost h;
  ParentLogic l(h, popts());
  ASSERT_TRUE(l.on_connection(kUid, 20, 0).accepted);
  Msg m = hello_msg();
  m.body.resize(1);
  Step s = l.on_message(m.h, m.body, 0);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_NE(reason_of(s.send[0]).find("malformed hello"), std::string::npos);
}

TEST(ParentLogic, HandshakesInProgressAreWaitedForThenClosedAtHalfTheStep) {
  FakeParentHost h;
  h.movable.push_back(tunnel("a"));
  h.in_handshake = 2;
  ParentLogic l(h, popts());
  Step s = to_transfer(l, 1000);
  Msg m;
  m = ack_msg(s.send[0].seq, 1);
  s = l.on_message(m.h, m.body, 1000);
  EXPECT_FALSE(s.commit_after_poll) << "two tunnels still in their handshake";
  EXPECT_EQ(l.next_deadline(), 1000u + kStep / 2);
  // One finishes its handshake and becomes movable: it goes at once.
  h.in_handshake = 1;
  h.movable.push_back(tunnel("b"));
  s = l.on_tunnels_changed(1200);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::batch});
  m = ack_msg(s.send[0].seq, 1);
  s = l.on_message(m.h, m.body, 1300);
  EXPECT_FALSE(s.commit_after_poll);
  // The other never finishes: closed at the cutoff (it reconnects).
  EXPECT_TRUE(l.on_deadline(1000 + kStep / 2 - 1).send.empty());
  EXPECT_EQ(h.in_handshake, 1u);
  s = l.on_deadline(1000 + kStep / 2);
  EXPECT_EQ(h.in_handshake, 0u);
  ASSERT_TRUE(s.commit_after_poll);
  ASSERT_EQ(types(l.on_poll_passed(1000 + kStep / 2)), std::vector<MsgType>{MsgType::commit});
  EXPECT_EQ(l.stats().tunnels_sent, 2u);
}

TEST(ParentLogic, ATunnelThatBecameMovableBeforeThePollGoesBeforeTheCommit) {
  FakeParentHost h;
  ParentLogic l(h, popts());
  Step s = to_transfer(l);
  Msg m;
  ASSERT_TRUE(s.commit_after_poll);
  h.movable.push_back(tunnel("late"));
  s = l.on_poll_passed(0);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::batch});
  EXPECT_EQ(l.phase(), ParentPhase::transferring);
  m = ack_msg(s.send[0].seq, 1);
  s = l.on_message(m.h, m.body, 0);
  ASSERT_TRUE(s.commit_after_poll);
  ASSERT_EQ(types(l.on_poll_passed(0)), std::vector<MsgType>{MsgType::commit});
}

TEST(ParentLogic, AStateVersionTheNewProcessCannotReadIsNeverSentAndDrainsHere) {
  Pair p;
  ParentLogicOptions o = popts();
  o.state_version_override = 99;
  ParentLogic parent(p.ph, o);
  for (int i = 0; i < 3; ++i) p.ph.movable.push_back(tunnel("t" + std::to_string(i)));
  ASSERT_TRUE(parent.on_connection(kUid, 20, 0).accepted);
  Step cs = p.child.start(true, kUid, 10, 0);
  std::deque<Msg> to_parent, to_child;
  for (auto& o2 : cs.send) to_parent.push_back(parse(o2));
  bool committed = false;
  while (!to_parent.empty() || !to_child.empty()) {
    if (!to_parent.empty()) {
      Msg m = to_parent.front();
      to_parent.pop_front();
      Step s = parent.on_message(m.h, m.body, 0);
      if (s.commit_after_poll) s = parent.on_poll_passed(0);
      for (auto& o2 : s.send) {
        committed = committed || o2.type == MsgType::commit;
        to_child.push_back(parse(o2));
      }
    }
    if (!to_child.empty()) {
      Msg m = to_child.front();
      to_child.pop_front();
      for (int& fd : m.fds) fd = dup(fd);
      Step s = p.child.on_message(m.h, m.body, m.fds, 0);
      for (int fd : m.fds)
        if (fd >= 0) close(fd);
      for (auto& o2 : s.send) to_parent.push_back(parse(o2));
    }
  }
  EXPECT_TRUE(committed);
  EXPECT_TRUE(p.child.result().ok);
  EXPECT_EQ(p.child.result().tunnels, 0u);
  EXPECT_EQ(parent.stats().batches, 0u);
  EXPECT_EQ(p.ph.drained_here, 3u) << "drained in the old process (make before break)";
}

// ---------------------------------------------------------------------------
// The new process

Msg server_state_msg(bool with_listener = true) {
  ServerStateMsg s;
  s.epoch = 3;
  s.has_listener = with_listener;
  std::vector<uint8_t> b;
  encode_server_state(s, b);
  Msg m = make(MsgType::server_state, b);
  if (with_listener) m.fds.push_back(open("/dev/null", O_RDONLY | O_CLOEXEC));
  return m;
}

Msg batch_msg(uint32_t seq, std::vector<std::string> ids, uint16_t version = 0) {
  Batch b;
  b.seq = seq;
  for (auto& id : ids) b.tunnels.push_back(tunnel(id));
  std::vector<uint8_t> bytes;
  std::vector<int> fds;
  encode_batch(b, bytes, fds, version);
  Msg m = make(MsgType::batch, bytes);
  m.fds = fds;  // as received: the message owns them
  return m;
}

Msg commit_msg() {
  Commit c;
  std::vector<uint8_t> b;
  encode_commit(c, b);
  return make(MsgType::commit, b);
}

BatchAck ack_of(const Step& s) {
  EXPECT_EQ(types(s), std::vector<MsgType>{MsgType::batch_ack});
  BatchAck a;
  if (s.send.empty()) return a;
  Msg m = parse(s.send[0]);
  EXPECT_EQ(decode_batch_ack(m.body, a), "");
  return a;
}

struct ChildRig {
  FakeChildHost h;
  ChildLogic l{h, kStep, 20, kUid};
  Step deliver(Msg m, uint64_t now = 0) {
    Step s = l.on_message(m.h, m.body, m.fds, now);
    for (int fd : m.fds)
      if (fd >= 0) close(fd);  // the channel closes what the handler did not keep
    return s;
  }
  void to_tunnels() {
    ASSERT_EQ(types(l.start(true, kUid, 10, 0)), std::vector<MsgType>{MsgType::hello});
    Msg ss = server_state_msg();
    int lfd = ss.fds[0];
    Step s = deliver(ss);
    ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::listening});
    EXPECT_EQ(h.listener, lfd) << "the inherited listener is the host's";
    close(lfd);
    ASSERT_EQ(l.phase(), ChildPhase::awaiting_tunnels);
  }
};

TEST(ChildLogic, RefusesToTakeOverFromAnotherUser) {
  ChildRig r;
  Step s = r.l.start(true, kUid + 1, 10, 0);
  EXPECT_TRUE(s.send.empty()) << "no hello to a stranger";
  EXPECT_TRUE(s.finished);
  EXPECT_TRUE(r.l.result().foreign);
  EXPECT_FALSE(r.l.result().ok);
  ChildRig unknown;
  EXPECT_TRUE(unknown.l.start(false, 0, 0, 0).finished);
  EXPECT_TRUE(unknown.l.result().foreign);
}

TEST(ChildLogic, OldProcessGoneBeforeHandingAnythingOverLetsTheCallerStartFresh) {
  ChildRig r;
  (void)r.l.start(true, kUid, 10, 0);
  Step s = r.l.on_closed("connection reset", 0);
  EXPECT_TRUE(s.finished);
  EXPECT_FALSE(r.l.result().ok);
  EXPECT_TRUE(r.l.result().old_gone);
  ChildRig r2;
  r2.to_tunnels();
  (void)r2.l.on_closed("eof", 0);
  EXPECT_TRUE(r2.l.result().ok) << "listening, nothing adopted: this process serves";
  EXPECT_EQ(r2.l.result().tunnels, 0u);
}

TEST(ChildLogic, OldProcessGoneAfterHandingOverTunnelsStartsThem) {
  ChildRig r;
  r.to_tunnels();
  EXPECT_EQ(ack_of(r.deliver(batch_msg(1, {"a", "b"}))).adopted, 2u);
  Step s = r.l.on_closed("eof", 0);
  EXPECT_TRUE(s.finished);
  EXPECT_TRUE(r.l.result().ok) << "it cannot resume them: this process carries on";
  EXPECT_EQ(r.h.started, (std::vector<std::string>{"a", "b"}));
}

TEST(ChildLogic, AbortFromTheOldProcessLetsGoOfEverything) {
  for (bool after_batch : {false, true}) {
    ChildRig r;
    r.to_tunnels();
    if (after_batch) (void)r.deliver(batch_msg(1, {"a"}));
    Step s = r.deliver(abort_msg("drain started"));
    EXPECT_TRUE(s.send.empty()) << "no answer to an abort";
    EXPECT_TRUE(s.finished);
    EXPECT_FALSE(r.l.result().ok);
    EXPECT_NE(r.l.result().error.find("drain started"), std::string::npos);
    EXPECT_TRUE(r.h.started.empty());
    EXPECT_EQ(r.h.let_go.size(), after_batch ? 1u : 0u);
  }
}

TEST(ChildLogic, TimeoutAtEachStepAbortsAndLetsGo) {
  for (int step = 0; step < 3; ++step) {
    ChildRig r;
    (void)r.l.start(true, kUid, 10, 0);
    uint64_t now = 0;
    if (step >= 1) {
      now = 100;
      Msg ss = server_state_msg(false);
      (void)r.deliver(ss, now);
    }
    if (step == 2) {
      now = 200;
      (void)r.deliver(batch_msg(1, {"a"}), now);
    }
    EXPECT_EQ(r.l.next_deadline(), now + kStep) << step;
    EXPECT_TRUE(r.l.on_deadline(now + kStep - 1).send.empty());
    Step s = r.l.on_deadline(now + kStep);
    ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort}) << step;
    EXPECT_TRUE(s.finished);
    EXPECT_FALSE(r.l.result().ok);
    EXPECT_EQ(r.h.let_go.size(), step == 2 ? 1u : 0u);
    EXPECT_EQ(r.l.next_deadline(), kNoDeadline);
  }
}

TEST(ChildLogic, MalformedServerStateOrAFailedBuildAborts) {
  ChildRig r;
  (void)r.l.start(true, kUid, 10, 0);
  Msg m = server_state_msg(false);
  m.body.resize(3);
  Step s = r.deliver(m);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_FALSE(r.h.built);
  ChildRig r2;
  r2.h.build_error = "cannot listen: address in use";
  (void)r2.l.start(true, kUid, 10, 0);
  s = r2.deliver(server_state_msg(false));
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_EQ(r2.l.result().error, "cannot listen: address in use");
}

TEST(ChildLogic, UnexpectedMessagesAndVersionsAbort) {
  ChildRig r;
  (void)r.l.start(true, kUid, 10, 0);
  Step s = r.deliver(commit_msg());  // before the server state
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  ChildRig r2;
  r2.to_tunnels();
  Msg m = commit_msg();
  m.h.version = kProtocolVersion + 1;
  s = r2.deliver(m);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_NE(r2.l.result().error.find("protocol version"), std::string::npos);
}

TEST(ChildLogic, TakesWhatItsLimitsAllowAndSaysWhyNotTheRest) {
  ChildRig r;
  r.h.limit = 3;
  r.to_tunnels();
  EXPECT_EQ(ack_of(r.deliver(batch_msg(1, {"a", "b"}))).adopted, 2u);
  BatchAck a = ack_of(r.deliver(batch_msg(2, {"c", "d", "e"})));
  EXPECT_EQ(a.seq, 2u);
  EXPECT_EQ(a.adopted, 1u);
  EXPECT_EQ(a.reason, "max_tunnels (3) reached");
  r.h.refuse.insert("f");
  a = ack_of(r.deliver(batch_msg(3, {"f"})));
  EXPECT_EQ(a.adopted, 0u);
  (void)r.deliver(commit_msg());
  EXPECT_TRUE(r.l.result().ok);
  EXPECT_EQ(r.h.started, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(r.l.result().tunnels, 3u);
}

TEST(ChildLogic, BatchInANewerStateVersionIsRefusedNotFatal) {
  ChildRig r;
  r.to_tunnels();
  BatchAck a = ack_of(r.deliver(batch_msg(1, {"a"}, 99)));
  EXPECT_EQ(a.adopted, 0u);
  EXPECT_FALSE(a.reason.empty());
  EXPECT_EQ(r.l.phase(), ChildPhase::awaiting_tunnels);
  EXPECT_EQ(ack_of(r.deliver(batch_msg(2, {"b"}))).adopted, 1u);
}

TEST(ChildLogic, AbandonBeforeAnyTunnelEndsAtOnce) {
  ChildRig r;
  (void)r.l.start(true, kUid, 10, 0);
  Step s = r.l.abandon("SIGTERM", 0);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_TRUE(s.finished);
  EXPECT_TRUE(r.l.result().abandoned);
  EXPECT_FALSE(r.l.result().ok);
}

enum class Answer { abort, commit, silence };

class ChildAbandon : public ::testing::TestWithParam<Answer> {};

TEST_P(ChildAbandon, KeepsWhatItAdoptedUntilTheOldProcessAnswers) {
  ChildRig r;
  r.to_tunnels();
  (void)r.deliver(batch_msg(1, {"a", "b"}));
  Step s = r.l.abandon("SIGTERM", 0);
  ASSERT_EQ(types(s), std::vector<MsgType>{MsgType::abort});
  EXPECT_FALSE(s.finished);
  EXPECT_FALSE(r.h.accepting) << "stops accepting at once";
  EXPECT_TRUE(r.l.abandon("again", 0).send.empty());
  // A batch sent before the old process read the abort: not acknowledged.
  EXPECT_TRUE(r.deliver(batch_msg(2, {"c"})).send.empty());
  EXPECT_EQ(r.h.adopted.size(), 2u);
  switch (GetParam()) {
    case Answer::abort:
      s = r.deliver(abort_msg("new process gave up: SIGTERM"));
      EXPECT_FALSE(r.l.result().ok);
      EXPECT_EQ(r.h.let_go.size(), 2u);
      EXPECT_TRUE(r.h.started.empty());
      break;
    case Answer::commit:
      s = r.deliver(commit_msg());
      EXPECT_TRUE(r.l.result().ok) << "the commit crossed our abort: the tunnels are ours";
      EXPECT_TRUE(r.h.accepting);
      EXPECT_EQ(r.h.started.size(), 2u);
      break;
    case Answer::silence:
      s = r.l.on_closed("eof", 0);
      EXPECT_TRUE(r.l.result().ok) << "gone: it cannot resume them";
      EXPECT_TRUE(r.h.accepting);
      EXPECT_EQ(r.h.started.size(), 2u);
      break;
  }
  EXPECT_TRUE(s.finished);
  EXPECT_TRUE(r.l.result().abandoned);
}

INSTANTIATE_TEST_SUITE_P(EveryAnswer, ChildAbandon, ::testing::Values(Answer::abort, Answer::commit, Answer::silence),
                         [](const auto& info) {
                           switch (info.param) {
                             case Answer::abort: return std::string("abort");
                             case Answer::commit: return std::string("commit");
                             case Answer::silence: return std::string("silence");
                           }
                           return std::string("?");
                         });

TEST(HandoffLogic, AbandonAgainstTheRealParentResumesEverythingThere) {
  Pair p;
  for (int i = 0; i < 4; ++i) p.ph.movable.push_back(tunnel("t" + std::to_string(i), 3 << 20));
  p.connect();
  // hello -> server_state -> listening -> batches; the new process takes one
  ASSERT_TRUE(p.step_parent());
  ASSERT_TRUE(p.step_child());
  ASSERT_TRUE(p.step_parent());
  ASSERT_TRUE(p.step_child());
  p.from_child(p.child.abandon("SIGTERM", p.now));
  p.run();
  EXPECT_EQ(p.parent.phase(), ParentPhase::idle);
  EXPECT_FALSE(p.child.result().ok);
  EXPECT_TRUE(p.child.result().abandoned);
  EXPECT_EQ(p.ph.resumed.size(), 4u) << "every exported tunnel is back in the old process";
  EXPECT_EQ(p.ch.let_go.size(), 2u);
  EXPECT_TRUE(p.ch.started.empty());
}

}  // namespace
}  // namespace baton::handoff
