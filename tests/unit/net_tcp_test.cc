// net::Tcp on real loopback sockets and a real libuv loop.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <cstring>
#include <string>
#include <vector>

#include "net/tcp.h"
#include "util/byte_queue.h"

using baton::net::Tcp;
using baton::net::TcpHandler;

namespace {

// A connected pair: `ours` (non-blocking, for Tcp) and `theirs` (blocking).
struct Pair {
  int ours = -1, theirs = -1;
  Pair() {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    EXPECT_EQ(bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(listen(l, 1), 0);
    EXPECT_EQ(getsockname(l, reinterpret_cast<sockaddr*>(&a), &len), 0);
    theirs = socket(AF_INET, SOCK_STREAM, 0);
    EXPECT_EQ(connect(theirs, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    ours = accept(l, nullptr, nullptr);
    EXPECT_GE(ours, 0);
    close(l);
  }
  ~Pair() {
    if (theirs >= 0) close(theirs);
  }
};

struct Recorder : TcpHandler {
  std::string got;
  int ends = 0;
  int end_err = 1;
  void on_read(std::span<const uint8_t> d) override { got.append(reinterpret_cast<const char*>(d.data()), d.size()); }
  void on_read_end(int err) override {
    ++ends;
    end_err = err;
  }
  void on_written(size_t, int) override {}
};

void send_all(int fd, const std::string& s) {
  ASSERT_EQ(send(fd, s.data(), s.size(), 0), ssize_t(s.size()));
}

// Waits until the peer's end (FIN or RST) reached `fd`: everything the peer
// sent before it is queued by then (TCP delivers in order).
void await_peer_end(int fd) {
  pollfd pf{fd, POLLRDHUP, 0};
  ASSERT_EQ(poll(&pf, 1, 5000), 1) << "the peer's end never arrived";
}

// A libuv loop with a Tcp adopting `ours` of a fresh pair; the Tcp is
// closed and the loop run to completion at the end.
class TcpReadPending : public ::testing::Test {
 protected:
  void SetUp() override {
    uv_loop_init(&loop_);
    tcp_ = Tcp::create(&loop_, &rec_);
    ASSERT_EQ(tcp_->open_fd(pair_.ours), 0);
  }
  void TearDown() override {
    tcp_->close();
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  uv_loop_t loop_;
  Pair pair_;
  Recorder rec_;
  Tcp* tcp_ = nullptr;
};

}  // namespace

// What a peer sent before it reset the connection is still read: the
// assumption Link relies on when a write fails (docs/design.md, "Errors").
TEST_F(TcpReadPending, DataBeforeAResetIsReadThenTheError) {
  std::string last(32768, 'x');
  last += "FIN and close_notify would be here";
  send_all(pair_.theirs, last);
  linger lg{1, 0};  // close with a reset
  ASSERT_EQ(setsockopt(pair_.theirs, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  close(pair_.theirs);
  pair_.theirs = -1;
  await_peer_end(pair_.ours);
  tcp_->read_pending();
  EXPECT_EQ(rec_.got, last);
  EXPECT_EQ(rec_.ends, 1);
  EXPECT_EQ(rec_.end_err, UV_ECONNRESET);
}

TEST_F(TcpReadPending, StopsAtEofAndWhenNothingIsQueued) {
  tcp_->read_pending();  // nothing queued: returns at once, no end
  EXPECT_EQ(rec_.got, "");
  EXPECT_EQ(rec_.ends, 0);
  send_all(pair_.theirs, "tail");
  shutdown(pair_.theirs, SHUT_WR);
  await_peer_end(pair_.ours);
  tcp_->read_pending();
  EXPECT_EQ(rec_.got, "tail");
  EXPECT_EQ(rec_.ends, 1);
  EXPECT_EQ(rec_.end_err, 0);
}

// write_now sends what the socket takes and drops exactly that from the
// queue: a queue longer than the 16 chunks of one sendmsg goes out whole
// when the peer's buffer has room, and what the socket refuses stays queued
// once the peer stops reading.
using TcpWriteNow = TcpReadPending;  // the same pair and loop

TEST_F(TcpWriteNow, DropsWhatTheSocketTook) {
  baton::util::ByteQueue q;
  std::string sent;
  for (int i = 0; i < 20; ++i) sent += std::string(baton::util::ByteQueue::kChunk, char('a' + i));
  q.append({reinterpret_cast<const uint8_t*>(sent.data()), sent.size()});
  int big = 4 << 20;
  ASSERT_EQ(setsockopt(pair_.ours, SOL_SOCKET, SO_SNDBUF, &big, sizeof big), 0);
  ASSERT_EQ(setsockopt(pair_.theirs, SOL_SOCKET, SO_RCVBUF, &big, sizeof big), 0);
  EXPECT_EQ(tcp_->write_now(q), sent.size());
  EXPECT_TRUE(q.empty());
  std::string got(sent.size(), '\0');
  ASSERT_EQ(recv(pair_.theirs, got.data(), got.size(), MSG_WAITALL), ssize_t(got.size()));
  EXPECT_EQ(got, sent);

  // Nobody reads now: write_now stops at a full buffer and keeps the rest.
  int small = 4096;
  ASSERT_EQ(setsockopt(pair_.ours, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  std::string more(8 << 20, 'z');
  q.append({reinterpret_cast<const uint8_t*>(more.data()), more.size()});
  size_t taken = tcp_->write_now(q);
  EXPECT_LT(taken, more.size());
  EXPECT_EQ(q.size(), more.size() - taken);
}
