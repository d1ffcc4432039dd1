#include "admin/gate.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

namespace baton::admin {

namespace {

uint64_t now_ms() {
  return uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

void address_of(const sockaddr_storage& ss, std::string& ip, int& port) {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    port = ntohs(a->sin6_port);
  }
  ip = buf;
}

// Closes after reading what the client already sent, so that the kernel
// sends FIN rather than RST and a last answer is not thrown away with it.
void close_socket(int fd) {
  char sink[4096];
  for (int i = 0; i < 16; ++i)
    if (recv(fd, sink, sizeof sink, MSG_DONTWAIT) <= 0) break;
  ::close(fd);
}

// Sends what the socket takes now. False on a failed socket.
bool send_some(int fd, const std::string& out, size_t& off) {
  while (off < out.size()) {
    ssize_t n = send(fd, out.data() + off, out.size() - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      off += size_t(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return true;
    } else {
      return false;
    }
  }
  return true;
}

// The answer a rejected request gets, if its client is still listening
// (best effort: one non-blocking send).
std::string rejection_answer(CloseReason r, const GateLimits& l) {
  int status = 0;
  const char* text = "";
  std::string body;
  switch (r) {
    case CloseReason::deadline:
      status = 408, text = "Request Timeout";
      body = "{\"error\":\"request not complete within " + std::to_string(l.admission.request_deadline_ms) + " ms\"}";
      break;
    case CloseReason::per_client:
      status = 429, text = "Too Many Requests";
      body = "{\"error\":\"too many slow connections from this address (at most " +
             std::to_string(l.admission.max_slow_per_client) + ")\"}";
      break;
    case CloseReason::capacity:
      status = 503, text = "Service Unavailable";
      body = "{\"error\":\"too many connections (at most " + std::to_string(l.admission.max_connections) + ")\"}";
      break;
    case CloseReason::head_too_large:
      status = 431, text = "Request Header Fields Too Large";
      body = "{\"error\":\"request head over " + std::to_string(l.max_head_bytes) + " bytes\"}";
      break;
    case CloseReason::idle:
    case CloseReason::answer_deadline:
      return "";
  }
  body += "\n";
  return "HTTP/1.1 " + std::to_string(status) + " " + text +
         "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

}  // namespace

struct Gate::Conn {
  uint64_t id = 0;
  int fd = -1;
  std::string peer_ip, local_ip;
  int peer_port = 0, local_port = 0;
  std::string in;            // received and not yet handled
  RequestFrame frame;        // of the request at the start of `in`, once complete
  bool discarding = false;   // dropping a refused body before the handler answers 413
  size_t discard_left = 0;
  bool eof = false;          // the client half-closed (or reset: `broken`)
  bool broken = false;       // the socket failed: close without another word
  bool close_after = false;  // no further request on this connection
  uint32_t requests_left = 0;
  std::string out;           // the answer, and how much of it is written
  size_t out_off = 0;
  bool keep = false;         // after the answer, await the next request
  uint32_t watched = 0;      // epoll events registered (0: not in epoll)
};

// One request, complete in memory, as cpp-httplib's processing reads it;
// the answer goes to memory, never straight to a client that may not read.
class RequestStream final : public httplib::Stream {
 public:
  RequestStream(const std::string& in, size_t len, std::string& out, const std::string& peer_ip, int peer_port,
                const std::string& local_ip, int local_port, int fd)
      : in_(in.data(), len), out_(out), peer_ip_(peer_ip), local_ip_(local_ip), peer_port_(peer_port),
        local_port_(local_port), fd_(fd) {}

  bool is_readable() const override { return pos_ < in_.size(); }
  bool is_writable() const override { return true; }
  ssize_t read(char* ptr, size_t size) override {
    if (pos_ >= in_.size()) {
      read_past_end_ = true;  // beyond what the framing gave this request
      return 0;
    }
    size_t n = std::min(size, in_.size() - pos_);
    std::memcpy(ptr, in_.data() + pos_, n);
    pos_ += n;
    return ssize_t(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    out_.append(ptr, size);
    return ssize_t(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    ip = peer_ip_;
    port = peer_port_;
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    ip = local_ip_;
    port = local_port_;
  }
  socket_t socket() const override { return fd_; }

  // The handler read exactly the framed request: the next one starts after it.
  bool consumed_exactly() const { return pos_ == in_.size() && !read_past_end_; }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  bool read_past_end_ = false;
  std::string& out_;
  const std::string& peer_ip_;
  const std::string& local_ip_;
  int peer_port_, local_port_;
  int fd_;
};

Gate::Gate(std::string name, const GateLimits& limits, Handle handle, Priority priority, Report report)
    : name_(std::move(name)),
      limits_(limits),
      handle_(std::move(handle)),
      priority_(std::move(priority)),
      report_(std::move(report)),
      admission_(limits.admission) {}

Gate::~Gate() { stop(); }

std::string Gate::start(int listen_fd) {
  listen_fd_ = listen_fd;
  // cpp-httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG,
  // compiled into the library): a burst of connections would have SYNs
  // dropped, and a probe would wait 1 s for its retransmit.
  if (listen(listen_fd_, 1024) != 0) return name_ + ": listen: " + std::strerror(errno);
  fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0) return name_ + ": " + std::strerror(errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev) != 0) return name_ + ": " + std::strerror(errno);
  ev.data.u64 = 1;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev) != 0) return name_ + ": " + std::strerror(errno);
  io_thread_ = std::thread([this] { io_main(); });
  for (uint32_t i = 0; i < std::max<uint32_t>(limits_.workers, 1); ++i)
    workers_.emplace_back([this] { worker_main(); });
  return "";
}

void Gate::wake() {
  uint64_t one = 1;
  ssize_t n = ::write(wake_fd_, &one, sizeof one);
  (void)n;  // EAGAIN: the counter is already non-zero, the thread wakes anyway
}

void Gate::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  work_cv_.notify_all();
  if (wake_fd_ >= 0) wake();
  if (io_thread_.joinable()) io_thread_.join();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  // Every thread is gone: what is left is ours.
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  for (auto& [id, c] : conns_) ::close(c->fd);
  conns_.clear();
  for (auto* q : {&priority_queue_, &other_queue_})
    for (auto& c : *q) ::close(c->fd);
  priority_queue_.clear();
  other_queue_.clear();
  for (auto& c : returned_) ::close(c->fd);
  returned_.clear();
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  epoll_fd_ = wake_fd_ = -1;
}

Admission::Counts Gate::counts() const {
  Admission::Counts n;
  n.reading = count_reading_.load(std::memory_order_relaxed);
  n.slow = count_slow_.load(std::memory_order_relaxed);
  n.handling = count_handling_.load(std::memory_order_relaxed);
  n.writing = count_writing_.load(std::memory_order_relaxed);
  return n;
}

// ---------------------------------------------------------------------------
// I/O thread
// ---------------------------------------------------------------------------

void Gate::io_main() {
  epoll_event evs[64];
  for (;;) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopping_) break;
    }
    uint64_t now = now_ms();
    uint64_t next = admission_.next_deadline();
    if (accept_paused_until_) next = std::min(next, accept_paused_until_);
    int timeout = -1;
    if (next != std::numeric_limits<uint64_t>::max())
      timeout = next <= now ? 0 : int(std::min<uint64_t>(next - now + 1, 60000));
    int n = epoll_wait(epoll_fd_, evs, 64, timeout);
    now = now_ms();
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.u64 == 0) {
        uint64_t v;
        while (::read(wake_fd_, &v, sizeof v) > 0) {
        }
        continue;
      }
      if (evs[i].data.u64 == 1) {
        accept_new(now);
        continue;
      }
      auto it = conns_.find(evs[i].data.u64);
      if (it != conns_.end()) on_event(*it->second, evs[i].events, now);
    }
    if (accept_paused_until_ && now >= accept_paused_until_) {
      accept_paused_until_ = 0;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = 1;
      epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
    }
    take_back(now);
    for (const Admission::Verdict& v : admission_.expire(now)) close_conn(v.id, v.reason, true);
    publish();
  }
}

void Gate::accept_new(uint64_t now) {
  // At most a batch per turn, so that the connections already here are
  // read and timed between two batches of a flood.
  for (int i = 0; i < 64; ++i) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      admit(fd, now);
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      // Out of descriptors: the connection waits in the backlog; look again
      // in 100 ms instead of spinning on a listener that stays readable.
      epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
      accept_paused_until_ = now + 100;
    }
    return;
  }
}

void Gate::admit(int fd, uint64_t now) {
  auto c = std::make_unique<Conn>();
  c->id = next_id_++;
  c->fd = fd;
  c->requests_left = std::max<uint32_t>(limits_.keep_alive_max_requests, 1);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) address_of(ss, c->peer_ip, c->peer_port);
  len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) address_of(ss, c->local_ip, c->local_port);
  std::optional<Admission::Verdict> v = admission_.admit(c->id, c->peer_ip, now);
  if (v && v->id == c->id) {  // full of connections being answered: not this one
    ++rejected_[size_t(CloseReason::capacity)];
    close_socket(fd);
    return;
  }
  uint64_t id = c->id;
  Conn& conn = *c;
  conns_.emplace(id, std::move(c));
  if (v) close_conn(v->id, v->reason, true);
  watch(conn, EPOLLIN);
  // A client usually sends its request with the connect: read it now, so
  // that a prompt request is dispatched before anything else can happen.
  read_request(conn, now);
}

void Gate::take_back(uint64_t now) {
  std::vector<ConnPtr> back;
  {
    std::lock_guard<std::mutex> g(mu_);
    back.swap(returned_);
  }
  for (ConnPtr& cp : back) {
    if (cp->broken || (cp->out_off == cp->out.size() && !cp->keep)) {
      admission_.remove(cp->id);
      close_socket(cp->fd);
      continue;
    }
    uint64_t id = cp->id;
    Conn& c = *cp;
    conns_.emplace(id, std::move(cp));
    if (c.out_off < c.out.size()) {
      admission_.awaiting_client_read(id, now);
      watch(c, EPOLLOUT);
      continue;
    }
    flush(c, now);  // written by the worker: on to the next request
  }
}

void Gate::watch(Conn& c, uint32_t events) {
  if (c.watched == events) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = c.id;
  int op = c.watched == 0 ? EPOLL_CTL_ADD : events == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
  if (epoll_ctl(epoll_fd_, op, c.fd, &ev) != 0 && events != 0) c.broken = true;
  c.watched = events;
}

void Gate::on_event(Conn& c, uint32_t events, uint64_t now) {
  if (c.out_off < c.out.size()) {
    if (events & (EPOLLERR | EPOLLHUP)) return close_conn(c.id, std::nullopt, false);
    return flush(c, now);
  }
  read_request(c, now);
}

void Gate::read_request(Conn& c, uint64_t now) {
  char buf[16384];
  const size_t cap = limits_.max_head_bytes + limits_.max_body_bytes + 1;
  for (;;) {
    if (!c.discarding && c.in.size() >= cap) break;  // enough to frame (complete or too large)
    ssize_t r = recv(c.fd, buf, sizeof buf, 0);
    if (r > 0) {
      admission_.received(c.id);
      if (c.discarding) {
        c.discard_left -= std::min(c.discard_left, size_t(r));
        if (c.discard_left == 0) break;
      } else {
        c.in.append(buf, size_t(r));
      }
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    c.eof = true;
    if (r < 0) c.broken = true;
    break;
  }
  after_input(c, now);
}

void Gate::after_input(Conn& c, uint64_t now) {
  (void)now;
  if (c.broken) return close_conn(c.id, std::nullopt, false);
  if (c.discarding) {
    if (c.discard_left == 0 || c.eof) dispatch(c);
    return;
  }
  RequestFrame f = frame_request(c.in, limits_.max_head_bytes, limits_.max_body_bytes);
  if (f.status == RequestFrame::Status::head_too_large) return close_conn(c.id, CloseReason::head_too_large, true);
  if (f.status == RequestFrame::Status::incomplete) {
    if (c.eof) close_conn(c.id, std::nullopt, false);  // the client gave up
    return;
  }
  c.frame = f;
  if (c.eof) c.close_after = true;
  if (f.body_refused) {
    // The handler answers from the head alone (413, 400) and the connection
    // closes. A body of known length is read and dropped first, within the
    // request deadline, so a client still sending it reads the answer
    // instead of a reset.
    c.close_after = true;
    size_t have = c.in.size() - f.head_bytes;
    c.in.resize(f.head_bytes);
    if (f.discard_bytes > have && f.discard_bytes <= limits_.max_discard_bytes && !c.eof) {
      c.discarding = true;
      c.discard_left = f.discard_bytes - have;
      return;
    }
  }
  dispatch(c);
}

void Gate::flush(Conn& c, uint64_t now) {
  if (!send_some(c.fd, c.out, c.out_off)) return close_conn(c.id, std::nullopt, false);
  if (c.out_off < c.out.size()) return;  // EPOLLOUT again
  c.out.clear();
  c.out_off = 0;
  if (!c.keep) return close_conn(c.id, std::nullopt, false);
  admission_.awaiting_request(c.id, now);
  watch(c, EPOLLIN);
  if (c.broken) return close_conn(c.id, std::nullopt, false);
  if (!c.in.empty()) {  // pipelined: the next request may be here already
    admission_.received(c.id);
    after_input(c, now);
  }
}

void Gate::dispatch(Conn& c) {
  // A client that saw a refusal and asks for the metrics at once (the
  // accept loop can admit it in the same turn) finds the refusal counted:
  // the count's job is posted before any request that could read it.
  report_rejections();
  watch(c, 0);
  admission_.handling(c.id);
  c.discarding = false;
  bool first = priority_ && priority_(c.frame);
  auto it = conns_.find(c.id);
  ConnPtr cp = std::move(it->second);
  conns_.erase(it);
  {
    std::lock_guard<std::mutex> g(mu_);
    (first ? priority_queue_ : other_queue_).push_back(std::move(cp));
  }
  work_cv_.notify_all();
}

void Gate::close_conn(uint64_t id, std::optional<CloseReason> reason, bool answer) {
  admission_.remove(id);
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = *it->second;
  if (reason && *reason != CloseReason::idle) ++rejected_[size_t(*reason)];
  // Only a client in the middle of a request is told why; an idle
  // keep-alive connection would take the answer for its next request's.
  if (answer && reason && !c.broken && (!c.in.empty() || c.discarding) && c.out_off >= c.out.size()) {
    std::string a = rejection_answer(*reason, limits_);
    size_t off = 0;
    if (!a.empty()) (void)send_some(c.fd, a, off);
  }
  watch(c, 0);
  close_socket(c.fd);
  conns_.erase(it);
}

void Gate::publish() {
  Admission::Counts n = admission_.counts();
  count_reading_.store(n.reading, std::memory_order_relaxed);
  count_slow_.store(n.slow, std::memory_order_relaxed);
  count_handling_.store(n.handling, std::memory_order_relaxed);
  count_writing_.store(n.writing, std::memory_order_relaxed);
  report_rejections();
}

void Gate::report_rejections() {
  bool any = false;
  for (uint64_t v : rejected_) any = any || v != 0;
  if (!any) return;
  if (report_) report_(rejected_);
  rejected_ = {};
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

void Gate::worker_main() {
  const uint32_t workers = std::max<uint32_t>(limits_.workers, 1);
  const uint32_t max_other = workers > limits_.reserved_workers ? workers - limits_.reserved_workers : 1;
  for (;;) {
    ConnPtr c;
    bool other = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] {
        return stopping_ || !priority_queue_.empty() || (!other_queue_.empty() && busy_other_ < max_other);
      });
      if (stopping_) return;
      if (!priority_queue_.empty()) {
        c = std::move(priority_queue_.front());
        priority_queue_.pop_front();
      } else {
        c = std::move(other_queue_.front());
        other_queue_.pop_front();
        ++busy_other_;
        other = true;
      }
    }
    handle(*c);
    {
      std::lock_guard<std::mutex> g(mu_);
      if (other) --busy_other_;
      returned_.push_back(std::move(c));
    }
    if (other) work_cv_.notify_all();
    wake();
  }
}

void Gate::handle(Conn& c) {
  size_t len = c.frame.head_bytes + c.frame.body_bytes;
  bool close = c.close_after || c.requests_left <= 1;
  bool closed = false;
  bool ok;
  bool exact;
  {
    RequestStream s(c.in, len, c.out, c.peer_ip, c.peer_port, c.local_ip, c.local_port, c.fd);
    ok = handle_(s, close, closed);
    exact = s.consumed_exactly();
  }
  c.in.erase(0, len);
  --c.requests_left;
  // Go on only where the framing and the handler agree on where the next
  // request starts.
  c.keep = ok && !close && !closed && exact;
  c.out_off = 0;
  if (!send_some(c.fd, c.out, c.out_off)) c.broken = true;
}

}  // namespace baton::admin
