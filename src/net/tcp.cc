#include "net/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>

namespace baton::net {

namespace {
// One read buffer for the whole loop: an idle connection owns none, and a
// busy one only keeps what its owner could not process yet.
constexpr size_t kReadBuffer = 256 * 1024;
thread_local uint8_t g_read_buffer[kReadBuffer];

struct ConnectReq {
  uv_connect_t req;
  Tcp* tcp;
};
}  // namespace

Tcp* Tcp::create(uv_loop_t* loop, TcpHandler* handler) {
  Tcp* t = new Tcp(handler);
  uv_tcp_init(loop, &t->tcp_);
  t->tcp_.data = t;
  return t;
}

int Tcp::open_fd(int fd) { return uv_tcp_open(&tcp_, fd); }

int Tcp::connect(const sockaddr* addr) {
  auto* r = new ConnectReq;
  r->tcp = this;
  int err = uv_tcp_connect(&r->req, &tcp_, addr, connect_cb);
  if (err) delete r;
  return err;
}

void Tcp::connect_cb(uv_connect_t* req, int status) {
  auto* r = reinterpret_cast<ConnectReq*>(req);
  Tcp* t = r->tcp;
  delete r;
  if (status == UV_ECANCELED || t->closing_) return;
  uv_tcp_nodelay(&t->tcp_, 1);
  t->handler_->on_connected(status);
}

void Tcp::alloc_cb(uv_handle_t* h, size_t, uv_buf_t* buf) {
  // A read callback never re-enters the loop, so the shared buffer is free
  // whenever libuv asks for one.
  *buf = uv_buf_init(reinterpret_cast<char*>(g_read_buffer), static_cast<Tcp*>(h->data)->read_size_);
}

void Tcp::set_read_size(size_t n) { read_size_ = uint32_t(std::min(n, kReadBuffer)); }

void Tcp::read_cb(uv_stream_t* s, ssize_t n, const uv_buf_t*) {
  Tcp* t = static_cast<Tcp*>(s->data);
  if (t->closing_ || n == 0) return;
  if (n < 0) {
    uv_read_stop(s);
    t->reading_ = false;
    t->handler_->on_read_end(n == UV_EOF ? 0 : int(n));
    return;
  }
  t->handler_->on_read({g_read_buffer, size_t(n)});
}

void Tcp::read_pending() {
  int fd = this->fd();
  for (int i = 0; i < 64 && fd >= 0 && !closing_; ++i) {
    ssize_t n = ::recv(fd, g_read_buffer, read_size_, MSG_DONTWAIT);
    if (n > 0) {
      handler_->on_read({g_read_buffer, size_t(n)});
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    stop_read();
    handler_->on_read_end(n == 0 ? 0 : uv_translate_sys_error(errno));
    return;
  }
}

void Tcp::start_read() {
  if (reading_ || closing_) return;
  if (uv_read_start(stream(), alloc_cb, read_cb) == 0) reading_ = true;
}

void Tcp::stop_read() {
  if (!reading_) return;
  uv_read_stop(stream());
  reading_ = false;
}

// The first (up to) 16 chunks of q as libuv buffers; returns how many, and
// their total length in `len`.
static unsigned front_bufs(const util::ByteQueue& q, uv_buf_t (&bufs)[16], size_t& len) {
  std::span<const uint8_t> spans[16];
  size_t n = q.front_spans(spans);
  len = 0;
  for (size_t i = 0; i < n; ++i) {
    bufs[i] = uv_buf_init(const_cast<char*>(reinterpret_cast<const char*>(spans[i].data())), unsigned(spans[i].size()));
    len += spans[i].size();
  }
  return unsigned(n);
}

void Tcp::write_from(const util::ByteQueue& q) {
  uv_buf_t bufs[16];
  unsigned n = front_bufs(q, bufs, write_len_);
  write_req_.data = this;
  int err = uv_write(&write_req_, stream(), bufs, n, write_cb);
  if (err) {
    // Report asynchronously-shaped: the owner handles it like a failed write.
    write_len_ = 0;
    handler_->on_written(0, err);
    return;
  }
  writing_ = true;
}

size_t Tcp::write_some(const util::ByteQueue& q) {
  if (closing_ || writing_ || q.empty()) return 0;
  int fd = this->fd();
  if (fd < 0) return 0;
  // send/sendmsg rather than libuv's write/writev: a socket call skips the
  // file layer (about 60 ns of a 2 us loopback send here), and nothing of
  // libuv's is in the way while no uv_write is in flight.
  uv_buf_t bufs[16];
  size_t len;
  unsigned n = front_bufs(q, bufs, len);
  // On Unix, libuv lays uv_buf_t out as struct iovec (its own writev relies on it).
  static_assert(sizeof(uv_buf_t) == sizeof(iovec) && offsetof(uv_buf_t, base) == offsetof(iovec, iov_base) &&
                offsetof(uv_buf_t, len) == offsetof(iovec, iov_len));
  msghdr m{};
  m.msg_iov = reinterpret_cast<iovec*>(bufs);
  m.msg_iovlen = n;
  for (;;) {
    ssize_t r = n == 1 ? ::send(fd, bufs[0].base, bufs[0].len, MSG_DONTWAIT | MSG_NOSIGNAL)
                       : ::sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r > 0) return size_t(r);
    // Errors other than a full buffer show up again on the queued write,
    // which reports them through on_written.
    if (r < 0 && errno == EINTR) continue;
    return 0;
  }
}

size_t Tcp::write_now(util::ByteQueue& q) {
  size_t total = 0;
  while (!q.empty()) {
    size_t n = write_some(q);
    if (n == 0) break;
    q.pop(n);
    total += n;
  }
  return total;
}

size_t Tcp::unsent() const {
  // libuv lowers write_queue_size as the kernel takes bytes of the request.
  return writing_ ? uv_stream_get_write_queue_size(reinterpret_cast<const uv_stream_t*>(&tcp_)) : 0;
}

void Tcp::write_cb(uv_write_t* req, int status) {
  Tcp* t = static_cast<Tcp*>(req->data);
  t->writing_ = false;
  if (t->closing_) return;
  size_t n = status == 0 ? t->write_len_ : 0;
  t->write_len_ = 0;
  if (status == 0 && t->shutdown_pending_) t->do_shutdown();
  t->handler_->on_written(n, status);
}

void Tcp::shutdown() {
  if (closing_ || shutdown_pending_ || shutdown_done_) return;
  if (writing_) {
    shutdown_pending_ = true;  // write_cb does it
    return;
  }
  do_shutdown();
}

void Tcp::do_shutdown() {
  shutdown_pending_ = false;
  shutdown_done_ = true;
  int fd = this->fd();
  if (fd >= 0) (void)::shutdown(fd, SHUT_WR);
}

int Tcp::release(size_t& written) {
  written = 0;
  if (closing_) return -1;
  if (writing_) {
    // libuv lowers write_queue_size as the kernel takes bytes of the request.
    size_t left = uv_stream_get_write_queue_size(stream());
    written = write_len_ > left ? write_len_ - left : 0;
  }
  int fd = this->fd();
  int copy = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
  if (copy < 0) {
    written = 0;
    return -1;  // nothing changed: the caller keeps using the connection
  }
  closing_ = true;
  reading_ = false;
  // A plain close: the duplicate keeps the connection open, so the peer sees nothing.
  uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), close_cb);
  return copy;
}

void Tcp::close(bool reset) {
  if (closing_) return;
  closing_ = true;
  reading_ = false;
  if (reset && uv_tcp_close_reset(&tcp_, close_cb) == 0) return;
  uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), close_cb);
}

void Tcp::close_cb(uv_handle_t* h) { delete static_cast<Tcp*>(h->data); }

int Tcp::fd() const {
  uv_os_fd_t fd;
  if (uv_fileno(reinterpret_cast<const uv_handle_t*>(&tcp_), &fd) != 0) return -1;
  return fd;
}

std::string format_address(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    std::string s = host;
    s += ':';
    s += std::to_string(ntohs(in->sin_port));
    return s;
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    std::string s = "[";
    s += host;
    s += "]:";
    s += std::to_string(ntohs(in6->sin6_port));
    return s;
  }
  return "?";
}

std::string Tcp::peer_address() const {
  sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getpeername(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return format_address(reinterpret_cast<sockaddr*>(&ss));
}

std::string Tcp::local_address() const {
  sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getsockname(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return format_address(reinterpret_cast<sockaddr*>(&ss));
}

}  // namespace baton::net
