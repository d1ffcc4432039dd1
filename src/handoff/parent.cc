#include "handoff/parent.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "handoff/test_hook.h"
#include "proxy/tunnel.h"

namespace baton::handoff {

namespace {

bool make_address(const std::string& path, sockaddr_un& addr, std::string& error) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    error = "handoff socket path \"" + path + "\" is empty or longer than " + std::to_string(sizeof addr.sun_path - 1) + " bytes";
    return false;
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return true;
}

// mkdir -p with mode 0700 for the directories it creates.
std::string make_dirs(const std::string& dir) {
  if (dir.empty()) return "";
  struct stat st;
  if (stat(dir.c_str(), &st) == 0) return S_ISDIR(st.st_mode) ? "" : dir + " is not a directory";
  size_t slash = dir.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    std::string err = make_dirs(dir.substr(0, slash));
    if (!err.empty()) return err;
  }
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return "cannot create " + dir + ": " + std::strerror(errno);
  return "";
}

}  // namespace

int connect_handoff(const std::string& path, std::string& error) {
  sockaddr_un addr;
  if (!make_address(path, addr, error)) return -1;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    error = std::string("socket: ") + std::strerror(errno);
    return -1;
  }
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    ::close(fd);
    if (e != ENOENT && e != ECONNREFUSED) error = "cannot connect to handoff socket " + path + ": " + std::strerror(e);
    return -1;
  }
  return fd;
}

bool old_process_alive(const std::string& path, uint32_t wait_ms, std::string& reason) {
  std::string error;
  int fd = connect_handoff(path, error);
  if (fd < 0) {
    reason = error;
    return !error.empty();  // nobody listens: gone; any other failure: assume it is there
  }
  // An exiting process still completes a connect until its listener is
  // closed, then resets it: wait for what comes.
  pollfd p{fd, POLLIN, 0};
  int n = ::poll(&p, 1, int(wait_ms));
  bool alive = true;
  if (n == 0) {
    reason = "it accepts a new process (idle)";
  } else {
    uint8_t buf[4096];
    ssize_t got = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got <= 0) {
      alive = false;  // closed or reset without a word: it is going away
    } else {
      Header h;
      std::string perr;
      reason = "it refused a new process";
      if (parse_header({buf, size_t(got)}, h, perr) == ParseStatus::ok && h.type == MsgType::refuse &&
          size_t(got) >= kHeaderSize + h.body_length) {
        if (std::string why = reason_of({buf + kHeaderSize, h.body_length}); !why.empty()) reason += ": " + why;
      }
    }
  }
  ::close(fd);
  return alive;
}

// ParentHost over the server (parent_logic.h).
class ServerParentHost final : public ParentHost {
 public:
  ServerParentHost(proxy::Server& server, const ParentOptions& opts) : server_(server), opts_(opts) {}

  bool draining() const override { return server_.state() == proxy::ServeState::draining; }
  void begin_handoff() override { server_.set_state(proxy::ServeState::handing_over); }
  void end_handoff() override {
    // A drain that called the handoff off keeps its own state (and closes
    // the listener itself after drain.delay_ms).
    if (server_.state() != proxy::ServeState::draining) server_.set_state(proxy::ServeState::serving);
    server_.resume_accepting();
  }
  ServerStateMsg server_state(int& listener_fd) override {
    ServerStateMsg s;
    s.epoch = server_.epoch();
    s.metrics = server_.metrics();
    s.ticket_keys = server_.tls().ticket_keys();
    listener_fd = server_.listener_fd();
    return s;
  }
  void stop_accepting() override { server_.stop_accepting(); }
  // Walks a list of the exportable tunnels taken once, not a new list per
  // tunnel (that was quadratic: 10,000 tunnels, 50 million steps). A tunnel
  // on the list may have ended or changed since: each is checked again. At
  // the list's end it is taken again once, for tunnels that became
  // exportable meanwhile (a handshake that finished).
  bool export_next(proxy::TunnelState& out, uint16_t state_version) override {
    for (int pass = 0; pass < 2; ++pass) {
      while (next_ < listed_.size()) {
        proxy::Tunnel* t = listed_[next_++];
        if (!server_.has_tunnel(t) || !movable(t, state_version)) continue;
        if (proxy::Tunnel::export_state(t, out)) return true;
        spdlog::warn("handoff: a tunnel could not be exported (no descriptors left?); it stays here and drains");
        t->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
      }
      if (pass == 1) break;
      listed_ = server_.exportable_tunnels();
      next_ = 0;
    }
    return false;
  }
  bool any_exportable(uint16_t state_version) const override {
    for (proxy::Tunnel* t : server_.exportable_tunnels())
      if (movable(t, state_version)) return true;
    return false;
  }
  // A detached session (no socket, no TLS state) moves only in a layout
  // that carries one; in an older one it stays here.
  static bool movable(const proxy::Tunnel* t, uint16_t state_version) {
    if (!t->exportable() || t->draining()) return false;
    return state_version >= kStateVersionResume || t->phase() != proxy::LinkPhase::detached;
  }
  size_t handshaking() const override { return server_.handshaking_tunnels(); }
  size_t close_handshaking(const std::string& why) override { return server_.close_handshaking(why.c_str()); }
  bool resume(proxy::TunnelState& st, bool drain) override {
    std::string err;
    proxy::Tunnel* t = server_.adopt(st, err);
    if (!t) {
      spdlog::error("handoff: could not resume a tunnel here: {}", err);
      return false;
    }
    t->start_adopted();
    if (drain) t->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
    return true;
  }
  size_t drain_exportable() override {
    size_t n = 0;
    for (proxy::Tunnel* t : server_.exportable_tunnels()) {
      if (t->draining()) continue;
      t->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
      ++n;
    }
    return n;
  }
  proxy::Metrics& metrics() override { return server_.metrics(); }
  void release_listener() override { server_.release_listener(); }

 private:
  proxy::Server& server_;
  const ParentOptions& opts_;
  std::vector<proxy::Tunnel*> listed_;  // export_next's list, from next_ on
  size_t next_ = 0;
};

Parent::Parent(uv_loop_t* loop, proxy::Server& server, ParentOptions opts,
               std::function<void(const HandoffStats&)> on_handed_over)
    : loop_(loop), server_(server), opts_(std::move(opts)), on_handed_over_(std::move(on_handed_over)) {
  host_ = std::make_unique<ServerParentHost>(server_, opts_);
  ParentLogicOptions lo;
  lo.step_timeout_ms = opts_.step_timeout_ms;
  lo.my_uid = uint32_t(getuid());
  lo.my_pid = uint32_t(getpid());
  lo.state_version_override = test_state_version_override();  // 0 but in baton-test-hooks
  logic_ = std::make_unique<ParentLogic>(*host_, lo);
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  idle_ = new uv_idle_t;
  uv_idle_init(loop_, idle_);
  idle_->data = this;
  server_.set_on_handshake_settled([this] {
    // Possibly inside the tunnel's own callback, where nothing may be
    // exported: look after the next poll.
    if (logic_->phase() != ParentPhase::transferring) return;
    tunnels_changed_ = true;
    uv_idle_start(idle_, idle_cb);
  });
}

Parent::~Parent() {
  server_.set_on_handshake_settled(nullptr);
  if (channel_) channel_->close();
  stop_listening();
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(idle_), [](uv_handle_t* h) { delete reinterpret_cast<uv_idle_t*>(h); });
}

std::string Parent::listen() {
  sockaddr_un addr;
  std::string error;
  if (!make_address(opts_.socket_path, addr, error)) return error;
  size_t slash = opts_.socket_path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    error = make_dirs(opts_.socket_path.substr(0, slash));
    if (!error.empty()) return "handoff socket: " + error;
  }
  struct stat st;
  if (lstat(opts_.socket_path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return "handoff socket path " + opts_.socket_path + " exists and is not a socket";
    unlink(opts_.socket_path.c_str());  // a stale socket, or the previous process's (it no longer accepts)
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return std::string("socket: ") + std::strerror(errno);
  mode_t old = umask(0177);
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  umask(old);
  if (rc != 0 || chmod(opts_.socket_path.c_str(), 0600) != 0 || ::listen(fd, 4) != 0) {
    error = "cannot listen on handoff socket " + opts_.socket_path + ": " + std::strerror(errno);
    ::close(fd);
    return error;
  }
  listen_fd_ = fd;
  listen_poll_ = new uv_poll_t;
  uv_poll_init(loop_, listen_poll_, fd);
  listen_poll_->data = this;
  uv_poll_start(listen_poll_, UV_READABLE, accept_cb);
  return "";
}

void Parent::stop_listening() {
  if (listen_poll_) {
    uv_close(reinterpret_cast<uv_handle_t*>(listen_poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
    listen_poll_ = nullptr;
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

void Parent::accept_cb(uv_poll_t* p, int status, int) {
  if (status == 0) static_cast<Parent*>(p->data)->on_accept();
}

void Parent::on_accept() {
  int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) return;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    ::close(fd);
    return;
  }
  ParentLogic::Admission a = logic_->on_connection(cred.uid, uint32_t(cred.pid), uv_now(loop_));
  if (!a.accepted) {
    if (a.tell) {
      spdlog::warn("handoff: pid {} connected; refused: {}", cred.pid, a.why);
      std::vector<uint8_t> msg;
      encode_refuse(a.why, msg);
      (void)!::write(fd, msg.data(), msg.size());
    } else {
      spdlog::warn("handoff: refused a connection from uid {} pid {} ({})", cred.uid, cred.pid, a.why);
    }
    ::close(fd);
    return;
  }
  channel_ = Channel::create(loop_, fd, [this](Message& m) { on_message(m); },
                             [this](const std::string& why) {
                               channel_ = nullptr;
                               apply(logic_->on_closed(why, uv_now(loop_)));
                             });
  rearm();
}

void Parent::on_message(Message& m) {
  if (m.header.type == MsgType::hello && logic_->phase() == ParentPhase::awaiting_hello)
    test_point(TestPoint::parent_hello);
  if (m.header.type == MsgType::listening && logic_->phase() == ParentPhase::awaiting_listening)
    test_point(TestPoint::parent_listening);
  apply(logic_->on_message(m.header, m.body, uv_now(loop_)));
}

void Parent::apply(Step s) {
  for (Outgoing& o : s.send) {
    if (!channel_) break;
    channel_->send(std::move(o.bytes), std::move(o.fds));
    if (o.type == MsgType::batch && o.seq == 1) test_point(TestPoint::parent_batch);
  }
  if (channel_ && s.close != CloseChannel::no) {
    if (s.close == CloseChannel::after_send) channel_->close_when_sent();
    else channel_->close();
    channel_ = nullptr;
  }
  if (s.commit_after_poll) {
    // Commit only after one more poll of the loop, not inside this callback:
    // a SIGTERM that came with the last acknowledgement (its libuv handler
    // writes a pipe that the next poll reads) starts its drain, and so calls
    // the handoff off, before anything is committed. The idle handle runs
    // before each poll: commit on its second run. (Not a timer: after a long
    // callback uv_now is stale, and a short timer fires before the poll.)
    idle_runs_ = 0;
    uv_idle_start(idle_, idle_cb);
  }
  if (logic_->phase() == ParentPhase::committed) stop_listening();
  rearm();
  if (s.finished && logic_->phase() == ParentPhase::committed && on_handed_over_) on_handed_over_(logic_->stats());
}

void Parent::rearm() {
  uint64_t d = logic_->next_deadline();
  if (d == kNoDeadline) {
    uv_timer_stop(timer_);
    return;
  }
  uint64_t now = uv_now(loop_);
  uv_timer_start(timer_, timer_cb, d > now ? d - now : 0, 0);
}

void Parent::timer_cb(uv_timer_t* t) {
  auto* p = static_cast<Parent*>(t->data);
  p->apply(p->logic_->on_deadline(uv_now(p->loop_)));
}

void Parent::idle_cb(uv_idle_t* h) {
  auto* p = static_cast<Parent*>(h->data);
  if (p->logic_->commit_pending()) {
    if (++p->idle_runs_ < 2) return;  // the first run comes before the poll we wait for
    uv_idle_stop(h);
    p->tunnels_changed_ = false;
    test_point(TestPoint::parent_commit);
    p->apply(p->logic_->on_poll_passed(uv_now(p->loop_)));
    return;
  }
  uv_idle_stop(h);
  if (!p->tunnels_changed_) return;
  p->tunnels_changed_ = false;
  p->apply(p->logic_->on_tunnels_changed(uv_now(p->loop_)));
}

void Parent::cancel(const std::string& why) { apply(logic_->cancel(why, uv_now(loop_))); }

}  // namespace baton::handoff
