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
#include <cstring>

#include "handoff/test_hook.h"
#include "proxy/tunnel.h"

namespace baton::handoff {

const char* to_str(ParentPhase p) {
  switch (p) {
    case ParentPhase::idle: return "idle";
    case ParentPhase::awaiting_hello: return "awaiting_hello";
    case ParentPhase::awaiting_listening: return "awaiting_listening";
    case ParentPhase::transferring: return "transferring";
    case ParentPhase::committed: return "committed";
  }
  return "?";
}

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
        std::string why;
        if (decode_reason({buf + kHeaderSize, h.body_length}, why).empty()) reason += ": " + why;
      }
    }
  }
  ::close(fd);
  return alive;
}

Parent::Parent(uv_loop_t* loop, proxy::Server& server, ParentOptions opts,
               std::function<void(const HandoffStats&)> on_handed_over)
    : loop_(loop), server_(server), opts_(std::move(opts)), on_handed_over_(std::move(on_handed_over)) {
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  commit_idle_ = new uv_idle_t;
  uv_idle_init(loop_, commit_idle_);
  commit_idle_->data = this;
}

Parent::~Parent() {
  if (channel_) channel_->close();
  stop_listening();
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(commit_idle_), [](uv_handle_t* h) { delete reinterpret_cast<uv_idle_t*>(h); });
  for (auto& [seq, ts] : in_flight_)
    for (auto& t : ts) proxy::close_fds(t);
  for (auto& t : acked_) proxy::close_fds(t);
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
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || (cred.uid != getuid() && cred.uid != 0)) {
    spdlog::warn("handoff: refused a connection from uid {} pid {} (not this user or root)", cred.uid, cred.pid);
    ::close(fd);
    return;
  }
  // docs/operations.md "When lifecycle events meet": one handoff at a time,
  // and never out of a drain (a drain is not undone; the new process would
  // serve while this pod is going away).
  const bool draining = server_.state() == proxy::ServeState::draining;
  if (phase_ != ParentPhase::idle || draining) {
    const char* why = draining ? "this baton is draining (a drain is never undone): no hot restart"
                               : "another new process is taking over right now";
    spdlog::warn("handoff: pid {} connected; refused: {}", cred.pid, why);
    std::vector<uint8_t> msg;
    encode_refuse(why, msg);
    (void)!::write(fd, msg.data(), msg.size());
    ::close(fd);
    return;
  }
  child_pid_ = cred.pid;
  channel_ = Channel::create(loop_, fd, [this](Message& m) { on_message(m); },
                             [this](const std::string& why) { on_channel_closed(why); });
  phase_ = ParentPhase::awaiting_hello;
  server_.set_state(proxy::ServeState::handing_over);
  child_takes_tunnels_ = true;
  stop_commit_wait();
  stats_ = {};
  stats_.started_ms = uv_now(loop_);
  spdlog::info("handoff: new process {} connected", child_pid_);
  arm(opts_.step_timeout_ms);
}

void Parent::arm(uint32_t ms) { uv_timer_start(timer_, timer_cb, ms, 0); }

void Parent::timer_cb(uv_timer_t* t) {
  auto* p = static_cast<Parent*>(t->data);
  switch (p->phase_) {
    case ParentPhase::transferring:
      // While tunnels finish their handshakes, look again every few ms; the
      // step deadline is tracked by the ack timestamps.
      if (p->in_flight_.empty()) {
        p->pump();
        return;
      }
      p->abort("new process did not acknowledge a batch in time", true);
      return;
    case ParentPhase::awaiting_hello:
    case ParentPhase::awaiting_listening:
      p->abort(std::string("new process did not answer in time (") + to_str(p->phase_) + ")", true);
      return;
    default: return;
  }
}

void Parent::on_message(Message& m) {
  if (m.header.version != kProtocolVersion) {
    abort("new process speaks handoff protocol version " + std::to_string(m.header.version), true);
    return;
  }
  switch (m.header.type) {
    case MsgType::hello:
      if (phase_ == ParentPhase::awaiting_hello) return handle_hello(m);
      break;
    case MsgType::listening:
      if (phase_ == ParentPhase::awaiting_listening) {
        test_stop_at("BATON_TEST_HANDOFF_PARENT_STOP_AT", "listening");
        return handle_listening();
      }
      break;
    case MsgType::batch_ack:
      if (phase_ == ParentPhase::transferring) return handle_batch_ack(m);
      break;
    case MsgType::abort:
    case MsgType::refuse: {
      std::string reason;
      (void)decode_reason(m.body, reason);
      // Answered with an abort of our own: a new process that called the
      // takeover off (Child::abandon) tells "resumed here" from "gone".
      abort("new process gave up: " + reason, true);
      return;
    }
    default: break;
  }
  abort(std::string("unexpected ") + to_str(m.header.type) + " message in phase " + to_str(phase_), true);
}

void Parent::on_channel_closed(const std::string& why) {
  channel_ = nullptr;
  if (phase_ == ParentPhase::committed || phase_ == ParentPhase::idle) return;
  abort(why, false);
}

void Parent::handle_hello(Message& m) {
  test_stop_at("BATON_TEST_HANDOFF_PARENT_STOP_AT", "hello");
  Hello h;
  std::string err = decode_hello(m.body, h);
  if (!err.empty()) {
    abort("malformed hello: " + err, true);
    return;
  }
  // The newest layout both read: an older new process (a downgrade) still
  // takes the tunnels in the layout it knows.
  uint16_t v = std::min(kStateVersion, h.max_state_version);
  if (v < kMinStateVersion) v = kStateVersion;
  if (opts_.state_version_override) v = opts_.state_version_override;
  state_version_ = v;
  if (v < h.min_state_version || v > h.max_state_version) {
    spdlog::warn("handoff: new process reads tunnel state versions {}..{}, this one writes {}: its tunnels will be drained",
                 h.min_state_version, h.max_state_version, v);
    child_takes_tunnels_ = false;
  }
  ServerStateMsg s;
  s.pid = uint32_t(getpid());
  s.epoch = server_.epoch();
  s.metrics = server_.metrics();
  s.ticket_keys = server_.tls().ticket_keys();
  int lfd = server_.listener_fd();
  s.has_listener = lfd >= 0;
  std::vector<uint8_t> msg;
  encode_server_state(s, msg);
  std::vector<int> fds;
  if (lfd >= 0) fds.push_back(lfd);
  channel_->send(std::move(msg), std::move(fds));
  phase_ = ParentPhase::awaiting_listening;
  arm(opts_.step_timeout_ms);
}

void Parent::handle_listening() {
  // The new process accepts on the same socket now: stop here. Connections
  // queued in the kernel stay there for it; none is refused.
  server_.stop_accepting();
  phase_ = ParentPhase::transferring;
  transfer_started_ms_ = uv_now(loop_);
  if (!child_takes_tunnels_) drain_local("the new process cannot read this process's tunnel state");
  pump();
}

void Parent::pump() {
  if (phase_ != ParentPhase::transferring || !channel_) return;
  if (child_takes_tunnels_) {
    std::vector<proxy::Tunnel*> ready = server_.exportable_tunnels();
    std::vector<proxy::TunnelState> batch;
    size_t fds = 0, bytes = 0;
    for (size_t i = 0; i < ready.size() && in_flight_.size() < kWindow; ++i) {
      if (ready[i]->draining()) continue;
      proxy::TunnelState st;
      if (!proxy::Tunnel::export_state(ready[i], st)) {
        spdlog::warn("handoff: a tunnel could not be exported (no descriptors left?); it stays here and drains");
        ready[i]->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
        continue;
      }
      size_t n = fd_count(st), b = encoded_size(st);
      if (!batch.empty() && (fds + n > kMaxFdsPerMessage || bytes + b > kBatchBytes)) {
        send_batch(std::move(batch));
        batch.clear();
        fds = bytes = 0;
      }
      fds += n;
      bytes += b;
      batch.push_back(std::move(st));
    }
    if (!batch.empty()) send_batch(std::move(batch));
  }
  if (!in_flight_.empty()) {
    arm(opts_.step_timeout_ms);
    return;
  }
  bool more = child_takes_tunnels_ && !server_.exportable_tunnels().empty();
  size_t handshaking = server_.handshaking_tunnels();
  if (!more && handshaking == 0) {
    // Commit only after one more poll of the loop, not inside this callback:
    // a SIGTERM that came with the last acknowledgement (its libuv handler
    // writes a pipe that the next poll reads) starts its drain, and so calls
    // the handoff off, before anything is committed. An idle handle runs
    // before each poll (and keeps that poll from blocking): commit on its
    // second run. (Not a timer: after a long callback uv_now is stale, and a
    // short timer fires before the poll.)
    if (!commit_ready_) {
      if (!uv_is_active(reinterpret_cast<uv_handle_t*>(commit_idle_))) {
        commit_idle_runs_ = 0;
        uv_idle_start(commit_idle_, commit_idle_cb);
      }
      return;
    }
    commit_ready_ = false;
    commit();
    return;
  }
  stop_commit_wait();
  // Handshakes in progress: look again soon. They get half the step timeout
  // (a client stuck in its handshake must not hold the restart hostage, nor
  // make the new process give up); then they are closed and will reconnect.
  if (handshaking && uv_now(loop_) - transfer_started_ms_ >= opts_.step_timeout_ms / 2) {
    size_t n = server_.close_handshaking("hot restart: handshake not finished in time");
    spdlog::warn("handoff: closed {} tunnels still in their TLS handshake after {} ms", n, opts_.step_timeout_ms / 2);
  }
  arm(2);
}

void Parent::commit_idle_cb(uv_idle_t* h) {
  auto* p = static_cast<Parent*>(h->data);
  if (++p->commit_idle_runs_ < 2) return;  // the first run comes before the poll we wait for
  uv_idle_stop(h);
  p->commit_ready_ = true;
  p->pump();
}

void Parent::stop_commit_wait() {
  uv_idle_stop(commit_idle_);
  commit_ready_ = false;
}

void Parent::send_batch(std::vector<proxy::TunnelState> tunnels) {
  Batch b;
  b.seq = next_seq_++;
  b.state_version = state_version_;
  b.tunnels = std::move(tunnels);
  std::vector<uint8_t> msg;
  std::vector<int> fds;
  encode_batch(b, msg, fds, opts_.state_version_override);
  // In flight before the send: if the handoff fails, abort() resumes every
  // tunnel in in_flight_ (the Tunnel objects are gone; only the states remain).
  uint32_t seq = b.seq;
  in_flight_[seq] = std::move(b.tunnels);
  stats_.batches++;
  channel_->send(std::move(msg), std::move(fds));
  if (b.seq == 1) test_stop_at("BATON_TEST_HANDOFF_PARENT_STOP_AT", "batch");
}

void Parent::handle_batch_ack(Message& m) {
  BatchAck a;
  std::string err = decode_batch_ack(m.body, a);
  auto it = in_flight_.find(a.seq);
  if (!err.empty() || it == in_flight_.end() || a.adopted > it->second.size()) {
    abort(err.empty() ? "acknowledgement for an unknown batch" : "malformed acknowledgement: " + err, true);
    return;
  }
  std::vector<proxy::TunnelState> ts = std::move(it->second);
  in_flight_.erase(it);
  for (size_t i = 0; i < ts.size(); ++i) {
    if (i < a.adopted) {
      acked_.push_back(std::move(ts[i]));
      stats_.tunnels_sent++;
      server_.metrics().inc(proxy::series("baton_handoff_tunnels_total", {{"result", "sent"}}));
      continue;
    }
    // Not taken: back into this process, then drained (make before break).
    std::string aerr;
    proxy::Tunnel* t = server_.adopt(ts[i], aerr);
    if (!t) {
      spdlog::error("handoff: a tunnel refused by the new process could not be resumed here: {}", aerr);
      continue;
    }
    t->start_adopted();
    t->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
    stats_.tunnels_drained++;
    server_.metrics().inc(proxy::series("baton_handoff_tunnels_total", {{"result", "drained"}}));
  }
  if (a.adopted < ts.size()) {
    spdlog::warn("handoff: new process took {} of {} tunnels ({}); the rest drain here", a.adopted, ts.size(), a.reason);
    if (child_takes_tunnels_) {
      child_takes_tunnels_ = false;
      drain_local("the new process refused tunnels: " + a.reason);
    }
  }
  pump();
}

void Parent::drain_local(const std::string& why) {
  size_t n = 0;
  for (proxy::Tunnel* t : server_.exportable_tunnels()) {
    if (t->draining()) continue;
    t->drain("rolling_update", opts_.drain_grace_ms, opts_.reconnect_hint);
    ++n;
  }
  stats_.tunnels_drained += n;
  server_.metrics().inc(proxy::series("baton_handoff_tunnels_total", {{"result", "drained"}}), n);
  if (n) spdlog::info("handoff: draining {} tunnels here: {}", n, why);
}

void Parent::commit() {
  test_stop_at("BATON_TEST_HANDOFF_PARENT_STOP_AT", "commit");
  Commit c;
  c.metrics = server_.metrics();
  std::vector<uint8_t> msg;
  encode_commit(c, msg);
  channel_->send(std::move(msg));
  channel_->close_when_sent();
  channel_ = nullptr;
  // The new process owns them now.
  for (auto& t : acked_) proxy::close_fds(t);
  acked_.clear();
  server_.release_listener();
  stop_listening();
  uv_timer_stop(timer_);
  phase_ = ParentPhase::committed;
  stats_.committed_ms = uv_now(loop_);
  spdlog::info("handoff: committed to pid {}: {} tunnels moved in {} batches in {} ms, {} draining here", child_pid_,
               stats_.tunnels_sent, stats_.batches, stats_.committed_ms - stats_.started_ms, stats_.tunnels_drained);
  if (on_handed_over_) on_handed_over_(stats_);
}

void Parent::cancel(const std::string& why) { abort(why, true); }

void Parent::abort(const std::string& why, bool tell_peer) {
  if (phase_ == ParentPhase::committed || phase_ == ParentPhase::idle) return;
  spdlog::warn("handoff to pid {} failed in phase {}: {}; resuming everything here", child_pid_, to_str(phase_), why);
  if (channel_) {
    if (tell_peer) {
      std::vector<uint8_t> msg;
      encode_abort(why, msg);
      channel_->send(std::move(msg));
      channel_->close_when_sent();
    } else {
      channel_->close();
    }
    channel_ = nullptr;
  }
  uv_timer_stop(timer_);
  stop_commit_wait();
  // Everything exported comes back, through the same path as in a new process.
  size_t resumed = 0;
  std::vector<proxy::TunnelState> all = std::move(acked_);
  acked_.clear();
  for (auto& [seq, ts] : in_flight_)
    for (auto& t : ts) all.push_back(std::move(t));
  in_flight_.clear();
  for (proxy::TunnelState& st : all) {
    std::string err;
    proxy::Tunnel* t = server_.adopt(st, err);
    if (!t) {
      spdlog::error("handoff: could not resume a tunnel: {}", err);
      continue;
    }
    t->start_adopted();
    ++resumed;
  }
  if (resumed) server_.metrics().inc(proxy::series("baton_handoff_tunnels_total", {{"result", "resumed"}}), resumed);
  // A drain that called the handoff off keeps its own state (and closes the
  // listener itself after drain.delay_ms).
  if (server_.state() != proxy::ServeState::draining) server_.set_state(proxy::ServeState::serving);
  server_.resume_accepting();
  phase_ = ParentPhase::idle;
  spdlog::info("handoff: resumed {} tunnels; accepting again", resumed);
}

}  // namespace baton::handoff
