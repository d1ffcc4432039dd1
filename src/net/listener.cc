#include "net/listener.h"

#include <arpa/inet.h>

#include <cstring>

#include "net/tcp.h"

namespace baton::net {

bool parse_ip(const std::string& host_in, uint16_t port, sockaddr_storage& out) {
  std::memset(&out, 0, sizeof out);
  std::string host = host_in;
  if (host == "localhost") host = "127.0.0.1";
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  auto* in4 = reinterpret_cast<sockaddr_in*>(&out);
  if (uv_ip4_addr(host.c_str(), port, in4) == 0) return true;
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&out);
  if (uv_ip6_addr(host.c_str(), port, in6) == 0) return true;
  return false;
}

Listener* Listener::create(uv_loop_t* loop, AcceptFn on_accept) {
  Listener* l = new Listener(std::move(on_accept));
  uv_tcp_init(loop, &l->tcp_);
  l->tcp_.data = l;
  return l;
}

void Listener::connection_cb(uv_stream_t* server, int status) {
  if (status < 0) return;  // EMFILE and friends: the next accept may succeed
  static_cast<Listener*>(server->data)->on_accept_(server);
}

std::string Listener::bind(const std::string& host, uint16_t port, int backlog) {
  sockaddr_storage ss;
  std::string where = host + ":" + std::to_string(port);
  if (!parse_ip(host, port, ss)) return "listen address " + where + ": expected an IP address";
  int err = uv_tcp_bind(&tcp_, reinterpret_cast<sockaddr*>(&ss), 0);
  if (!err) err = uv_listen(reinterpret_cast<uv_stream_t*>(&tcp_), backlog, connection_cb);
  if (err) return "cannot listen on " + where + ": " + uv_strerror(err);
  return "";
}

std::string Listener::adopt(int fd) {
  int err = uv_tcp_open(&tcp_, fd);
  if (!err) err = uv_listen(reinterpret_cast<uv_stream_t*>(&tcp_), 1024, connection_cb);
  if (err) return std::string("cannot adopt listening socket: ") + uv_strerror(err);
  return "";
}

std::string Listener::local_address() const {
  sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getsockname(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return format_address(reinterpret_cast<sockaddr*>(&ss));
}

int Listener::fd() const {
  uv_os_fd_t fd;
  if (uv_fileno(reinterpret_cast<const uv_handle_t*>(&tcp_), &fd) != 0) return -1;
  return fd;
}

void Listener::close() {
  uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), [](uv_handle_t* h) { delete static_cast<Listener*>(h->data); });
}

Resolve* Resolve::start(uv_loop_t* loop, const std::string& host, uint16_t port, DoneFn done) {
  auto* r = new Resolve;
  r->port_ = port;
  r->done_ = std::move(done);
  r->req_.data = r;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  sockaddr_storage ss;
  // IP literals skip DNS but still complete asynchronously, so callers have
  // one code path (uv_getaddrinfo with AI_NUMERICHOST does no lookup).
  if (parse_ip(host, port, ss)) hints.ai_flags = AI_NUMERICHOST;
  std::string h = host == "localhost" ? "127.0.0.1" : host;
  if (h.size() > 2 && h.front() == '[') h = h.substr(1, h.size() - 2);
  int err = uv_getaddrinfo(loop, &r->req_, getaddrinfo_cb, h.c_str(), nullptr, &hints);
  if (err) {
    // Deliver the failure from the loop, never re-entrantly.
    r->cancelled_ = false;
    auto* t = new uv_timer_t;
    uv_timer_init(loop, t);
    t->data = r;
    uv_timer_start(t, [](uv_timer_t* t) {
      auto* r = static_cast<Resolve*>(t->data);
      if (!r->cancelled_) r->done_(UV_EAI_FAIL, nullptr);
      delete r;
      uv_close(reinterpret_cast<uv_handle_t*>(t), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    }, 0, 0);
  }
  return r;
}

void Resolve::cancel() { cancelled_ = true; }

void Resolve::getaddrinfo_cb(uv_getaddrinfo_t* req, int status, addrinfo* res) {
  auto* r = static_cast<Resolve*>(req->data);
  if (!r->cancelled_) {
    if (status != 0 || !res) {
      r->done_(status ? status : UV_EAI_NONAME, nullptr);
    } else {
      sockaddr_storage ss{};
      std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
      if (ss.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&ss)->sin_port = htons(r->port_);
      else reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port = htons(r->port_);
      r->done_(0, reinterpret_cast<sockaddr*>(&ss));
    }
  }
  uv_freeaddrinfo(res);
  delete r;
}

}  // namespace baton::net
