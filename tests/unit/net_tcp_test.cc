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

}  // namespace

// What a peer sent before it reset the connection is still read: the
// assumption Link relies on when a write fails (docs/design.md, "Errors").
TEST(TcpReadPending, DataBeforeAResetIsReadThenTheError) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  Pair p;
  Recorder r;
  Tcp* t = Tcp::create(&loop, &r);
  ASSERT_EQ(t->open_fd(p.ours), 0);
  std::string last(32768, 'x');
  last += "FIN and close_notify would be here";
  send_all(p.theirs, last);
  linger lg{1, 0};  // close with a reset
  ASSERT_EQ(setsockopt(p.theirs, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  close(p.theirs);
  p.theirs = -1;
  await_peer_end(p.ours);
  t->read_pending();
  EXPECT_EQ(r.got, last);
  EXPECT_EQ(r.ends, 1);
  EXPECT_EQ(r.end_err, UV_ECONNRESET);
  t->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

TEST(TcpReadPending, StopsAtEofAndWhenNothingIsQueued) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  Pair p;
  Recorder r;
  Tcp* t = Tcp::create(&loop, &r);
  ASSERT_EQ(t->open_fd(p.ours), 0);
  t->read_pending();  // nothing queued: returns at once, no end
  EXPECT_EQ(r.got, "");
  EXPECT_EQ(r.ends, 0);
  send_all(p.theirs, "tail");
  shutdown(p.theirs, SHUT_WR);
  await_peer_end(p.ours);
  t->read_pending();
  EXPECT_EQ(r.got, "tail");
  EXPECT_EQ(r.ends, 1);
  EXPECT_EQ(r.end_err, 0);
  t->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}
