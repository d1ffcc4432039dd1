// Tcp: one libuv TCP handle with the close rule built in (ARCHITECTURE
// principle 7). The object is heap-allocated; close() detaches the owner and
// the object frees itself in the close callback, so an owner can forget it
// right after close().
//
// Output: the owner keeps its bytes in a ByteQueue it owns (the TLS record
// state's output, a yamux stream's inbound queue) and calls write_from(q).
// The bytes stay in the owner's queue while the write is in flight; when it
// completes, on_written(n) tells the owner to drop n bytes. At most one write
// is in flight, so a queue is never referenced twice.
#pragma once

#include <uv.h>

#include <cstdint>
#include <span>
#include <string>

#include "util/byte_queue.h"

namespace baton::net {

class TcpHandler {
 public:
  virtual ~TcpHandler() = default;
  // Data read; the span is valid only during the call.
  virtual void on_read(std::span<const uint8_t> data) = 0;
  // The peer half-closed (EOF) or reading failed (err < 0, a UV_* code).
  virtual void on_read_end(int err) = 0;
  // A write_from() completed: `n` bytes may be dropped (err < 0: write failed, nothing written).
  virtual void on_written(size_t n, int err) = 0;
  // connect() finished (0 or a UV_* code).
  virtual void on_connected(int status) { (void)status; }
};

class Tcp {
 public:
  static Tcp* create(uv_loop_t* loop, TcpHandler* handler);

  uv_tcp_t* handle() { return &tcp_; }
  uv_stream_t* stream() { return reinterpret_cast<uv_stream_t*>(&tcp_); }
  void set_handler(TcpHandler* h) { handler_ = h; }

  // Adopts an already connected or listening socket. Returns 0 or a UV_* code.
  int open_fd(int fd);
  // Starts a non-blocking connect; on_connected reports the outcome.
  int connect(const sockaddr* addr);

  // Largest read handed to on_read (default 64 KiB, at most 256 KiB).
  void set_read_size(size_t n);
  void start_read();
  void stop_read();
  // Reads what the socket holds now (non-blocking, at most 64 reads) and
  // hands it to on_read, then on_read_end at EOF or on an error. For a peer
  // that went away while we wrote to it: what it sent before (a FIN frame,
  // close_notify) is still in the receive queue, and still counts.
  void read_pending();
  bool reading() const { return reading_; }

  // Writes up to the first 16 chunks of q. Precondition: !writing(), !q.empty().
  void write_from(const util::ByteQueue& q);
  // Writes what the socket takes right now from the first 16 chunks of q
  // (one send or sendmsg, no loop round trip) and returns how many bytes it took: the
  // caller drops them at once; no on_written reports them. 0 when the socket
  // takes nothing now or the write fails: write_from() then waits for room,
  // or reports the error through on_written. Precondition: !writing().
  //
  // Why: libuv 1.44 re-arms the descriptor in epoll (one epoll_ctl) after
  // every uv_write that completes at once, and calls back only in the next
  // loop iteration: two syscalls and a deferred callback per request and per
  // answer on a request/response tunnel (docs/design.md, "Writes").
  [[nodiscard]] size_t write_some(const util::ByteQueue& q);
  // write_some() until q is empty or the socket takes no more, dropping
  // what was taken from q; returns how many bytes that was. For owners whose
  // queue holds only bytes to send (a queue whose bytes wait for something
  // else, like a stream's window credit, uses write_some).
  size_t write_now(util::ByteQueue& q);
  bool writing() const { return writing_; }
  // Bytes of the write in flight the kernel has not taken yet; 0 when no
  // write is in flight. Above 0, the socket's send buffer is full.
  size_t unsent() const;
  // Half-closes the sending side (shutdown(SHUT_WR)) now, or right after the
  // write in flight completes. Done synchronously, so shutdown_done() tells
  // exactly whether the peer was sent FIN (handoff depends on it).
  void shutdown();
  bool shutdown_done() const { return shutdown_done_; }
  // Handoff: stops all I/O and gives the connection up without ending it.
  // Returns a duplicate of the socket (owned by the caller; -1 on failure)
  // and sets `written` to how many bytes of the write in flight the kernel
  // already took (the owner drops them; the rest was never sent). The object
  // then frees itself as after close(); the handler gets no more calls.
  [[nodiscard]] int release(size_t& written);
  // Closes the handle; the handler gets no more calls. With reset, the peer
  // gets a TCP RST instead of FIN (SO_LINGER 0).
  void close(bool reset = false);
  bool closing() const { return closing_; }

  // The OS fd (for handoff and socket options), or -1.
  int fd() const;
  std::string peer_address() const;
  std::string local_address() const;

 private:
  explicit Tcp(TcpHandler* h) : handler_(h) {}
  static void alloc_cb(uv_handle_t*, size_t, uv_buf_t* buf);
  static void read_cb(uv_stream_t* s, ssize_t n, const uv_buf_t* buf);
  static void write_cb(uv_write_t* req, int status);
  static void connect_cb(uv_connect_t* req, int status);
  void do_shutdown();
  static void close_cb(uv_handle_t* h);

  uv_tcp_t tcp_;
  TcpHandler* handler_;
  uv_write_t write_req_;
  size_t write_len_ = 0;
  uint32_t read_size_ = 64 * 1024;
  bool writing_ = false;
  bool reading_ = false;
  bool closing_ = false;
  bool shutdown_pending_ = false;
  bool shutdown_done_ = false;
};

// Formats a socket address as "host:port" ("[v6]:port").
std::string format_address(const sockaddr* sa);

}  // namespace baton::net
