// Channel: the I/O shell of the handoff protocol, one end of a connected
// Unix stream socket inside a libuv loop (ARCHITECTURE principle 8: the
// socket is here, the messages are in codec.h, the decisions in parent.h
// and child.h).
//
// Sending: whole encoded messages; the fds that ride with a message go as
// SCM_RIGHTS on its first byte. Receiving: bytes and fds are collected, and
// each complete message is handed over with as many fds as its header
// announces. An fd that arrives without a message claiming it is closed.
#pragma once

#include <uv.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "handoff/codec.h"

namespace baton::handoff {

struct Message {
  Header header;
  std::vector<uint8_t> body;
  // Owned by the handler: it sets the ones it keeps to -1; the channel
  // closes the rest when the handler returns.
  std::vector<int> fds;
};

class Channel {
 public:
  using OnMessage = std::function<void(Message& m)>;
  using OnClosed = std::function<void(const std::string& why)>;

  // Takes ownership of `fd` (a connected AF_UNIX stream socket; made
  // non-blocking). Callbacks run in the loop; after on_closed or close() no
  // more callbacks come.
  static Channel* create(uv_loop_t* loop, int fd, OnMessage on_message, OnClosed on_closed);

  // Queues a message. The fds are not owned by the channel: the caller keeps
  // them open until the message is out (the peer's answer proves it) or the
  // channel is closed.
  void send(std::vector<uint8_t> bytes, std::vector<int> fds = {});
  size_t queued_bytes() const { return out_bytes_; }
  // Closes once everything queued is written (or at once if nothing is).
  void close_when_sent();
  // Closes the socket (unsent messages are dropped, received fds not yet
  // handed over are closed) and frees the object once libuv is done.
  void close();
  // Peer credentials of the socket (SO_PEERCRED).
  bool peer_uid(uint32_t& uid, int& pid) const;

 private:
  Channel(int fd, OnMessage m, OnClosed c) : fd_(fd), on_message_(std::move(m)), on_closed_(std::move(c)) {}
  static void poll_cb(uv_poll_t* p, int status, int events);
  void update_events();
  void do_write(bool from_send = false);
  void do_read();
  void fail(const std::string& why);
  void fail_after_reading(const std::string& why);
  void deliver();

  struct Out {
    std::vector<uint8_t> bytes;
    std::vector<int> fds;
    size_t offset = 0;
  };
  struct InFd {
    int fd;
    uint64_t arrived_end;  // stream offset just after the bytes it came with
  };

  int fd_;
  uv_poll_t poll_;
  OnMessage on_message_;
  OnClosed on_closed_;
  std::deque<Out> out_;
  size_t out_bytes_ = 0;
  std::vector<uint8_t> in_;     // received, not yet handed over
  uint64_t in_base_ = 0;        // stream offset of in_[0]
  std::deque<InFd> in_fds_;
  int events_ = 0;
  bool closed_ = false;
  // A write error seen inside send(): reported from the next poll callback,
  // never from send() itself (its caller may be in the middle of a loop
  // over state the error handler tears down).
  std::string deferred_error_;
  bool delivering_ = false;
  uint64_t delivered_ = 0;  // messages handed to on_message (do_read returns after any)
  bool reading_rest_ = false;  // fail_after_reading: read on to the end
  bool close_when_sent_ = false;
};

}  // namespace baton::handoff
