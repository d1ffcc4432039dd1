// Listener: a listening TCP socket that hands accepted connections to a callback.
#pragma once

#include <uv.h>

#include <functional>
#include <string>

namespace baton::net {

// The listener accepts with accept4() itself (not libuv's stream accept), so
// that running out of descriptors is handled here: accepting pauses (100 ms,
// doubling up to 1.6 s) while pending connections wait in the kernel's queue,
// on_pause fires once per episode, and accepting resumes by itself; no busy
// loop, no connection dropped by the listener.
class Listener {
 public:
  // Called once per accepted connection with its fd (non-blocking, CLOEXEC);
  // the callee owns it.
  using AcceptFn = std::function<void(int fd)>;
  // Out of descriptors (paused = true, with the error) and accepting again (false).
  using PauseFn = std::function<void(bool paused, int err)>;
  static Listener* create(uv_loop_t* loop, AcceptFn on_accept, PauseFn on_pause = nullptr);
  // Binds and listens on host:port (host must be an IP literal or "localhost").
  // Returns "" or an error naming the address.
  [[nodiscard]] std::string bind(const std::string& host, uint16_t port, int backlog = 4096);
  // Adopts a listening socket (hot restart). Takes ownership of fd.
  [[nodiscard]] std::string adopt(int fd);
  std::string local_address() const;
  int fd() const { return fd_; }
  bool paused() const { return paused_; }
  // Stops listening, closes the socket and frees the object once libuv is done.
  void close();

 private:
  Listener(uv_loop_t* loop, AcceptFn f, PauseFn p) : loop_(loop), on_accept_(std::move(f)), on_pause_(std::move(p)) {}
  std::string start(int fd);
  static void poll_cb(uv_poll_t* p, int status, int events);
  static void timer_cb(uv_timer_t* t);
  void accept_some();

  uv_loop_t* loop_;
  int fd_ = -1;
  uv_poll_t* poll_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  AcceptFn on_accept_;
  PauseFn on_pause_;
  bool paused_ = false;
  uint32_t pause_ms_ = 0;
  bool closing_ = false;
};

// Resolves an IP literal (v4 or v6, optionally "[v6]") or "localhost" into
// a socket address without DNS. False if `host` is a name.
bool parse_ip(const std::string& host, uint16_t port, sockaddr_storage& out);

// Asynchronous name resolution through uv_getaddrinfo. The callback gets the
// first address (or an error code). cancel() guarantees it is never called.
class Resolve {
 public:
  using DoneFn = std::function<void(int status, const sockaddr* addr)>;
  // Starts resolving; IP literals complete on the next loop turn without DNS.
  static Resolve* start(uv_loop_t* loop, const std::string& host, uint16_t port, DoneFn done);
  void cancel();

 private:
  static void getaddrinfo_cb(uv_getaddrinfo_t* req, int status, addrinfo* res);
  uv_getaddrinfo_t req_;
  uint16_t port_ = 0;
  DoneFn done_;
  bool cancelled_ = false;
};

}  // namespace baton::net
