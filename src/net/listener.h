// Listener: a listening TCP socket that hands accepted connections to a callback.
#pragma once

#include <uv.h>

#include <functional>
#include <string>

namespace baton::net {

class Listener {
 public:
  // Called once per accepted connection with the listening stream; the
  // callee calls uv_accept on a handle of its own (or accepts and drops).
  using AcceptFn = std::function<void(uv_stream_t* server)>;

  static Listener* create(uv_loop_t* loop, AcceptFn on_accept);
  // Binds and listens on host:port (host must be an IP literal or "localhost").
  // Returns "" or an error naming the address.
  [[nodiscard]] std::string bind(const std::string& host, uint16_t port, int backlog = 1024);
  // Adopts a listening socket (hot restart).
  [[nodiscard]] std::string adopt(int fd);
  std::string local_address() const;
  int fd() const;
  // Stops listening and frees the object once libuv is done with it.
  void close();

 private:
  explicit Listener(AcceptFn f) : on_accept_(std::move(f)) {}
  static void connection_cb(uv_stream_t* server, int status);
  uv_tcp_t tcp_;
  AcceptFn on_accept_;
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
