#include "net/listener.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

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

Listener* Listener::create(uv_loop_t* loop, AcceptFn on_accept, PauseFn on_pause) {
  return new Listener(loop, std::move(on_accept), std::move(on_pause));
}

std::string Listener::bind(const std::string& host, uint16_t port, int backlog) {
  sockaddr_storage ss;
  std::string where = host + ":" + std::to_string(port);
  if (!parse_ip(host, port, ss)) return "listen address " + where + ": expected an IP address";
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return "cannot listen on " + where + ": " + std::strerror(errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  socklen_t len = ss.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd, backlog) != 0) {
    std::string err = "cannot listen on " + where + ": " + std::strerror(errno);
    ::close(fd);
    return err;
  }
  return start(fd);
}

std::string Listener::adopt(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
    std::string err = std::string("cannot adopt listening socket: ") + std::strerror(errno);
    ::close(fd);
    return err;
  }
  return start(fd);
}

std::string Listener::start(int fd) {
  fd_ = fd;
  poll_ = new uv_poll_t;
  int err = uv_poll_init(loop_, poll_, fd);
  if (err) {
    delete poll_;
    poll_ = nullptr;
    return std::string("cannot watch listening socket: ") + uv_strerror(err);
  }
  poll_->data = this;
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  uv_poll_start(poll_, UV_READABLE, poll_cb);
  return "";
}

void Listener::poll_cb(uv_poll_t* p, int status, int) {
  auto* l = static_cast<Listener*>(p->data);
  if (status == 0 && !l->closing_) l->accept_some();
}

void Listener::accept_some() {
  // A bounded number per wake-up keeps one busy listener from starving the loop.
  for (int i = 0; i < 128 && !closing_; ++i) {
    int fd = accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      if (paused_ || pause_ms_) {
        paused_ = false;
        pause_ms_ = 0;
        if (on_pause_) on_pause_(false, 0);
      }
      on_accept_(fd);
      continue;
    }
    int e = errno;
    if (e == EAGAIN || e == EWOULDBLOCK) return;
    if (e == EINTR || e == ECONNABORTED || e == EPROTO) continue;
    if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
      // Pending connections stay queued in the kernel; try again later.
      bool first = pause_ms_ == 0;
      pause_ms_ = first ? 100 : std::min<uint32_t>(pause_ms_ * 2, 1600);
      paused_ = true;
      uv_poll_stop(poll_);
      uv_timer_start(timer_, timer_cb, pause_ms_, 0);
      if (first && on_pause_) on_pause_(true, -e);
      return;
    }
    return;  // anything else: wait for the next readiness
  }
}

void Listener::timer_cb(uv_timer_t* t) {
  auto* l = static_cast<Listener*>(t->data);
  if (l->closing_) return;
  uv_poll_start(l->poll_, UV_READABLE, poll_cb);
  l->accept_some();  // still out of descriptors: pauses again, longer
}

std::string Listener::local_address() const {
  sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (fd_ < 0 || getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return format_address(reinterpret_cast<sockaddr*>(&ss));
}

void Listener::close() {
  if (closing_) return;
  closing_ = true;
  if (!poll_) {
    if (fd_ >= 0) ::close(fd_);
    delete this;
    return;
  }
  // Freed when both handles are closed; the socket closes after its watcher.
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) {
    auto* l = static_cast<Listener*>(h->data);
    ::close(l->fd_);
    delete reinterpret_cast<uv_poll_t*>(h);
    delete l;
  });
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
