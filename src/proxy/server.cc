#include "proxy/server.h"

#include <mbedtls/sha256.h>
#include <spdlog/spdlog.h>
#include <dirent.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "proxy/tunnel.h"
#include "tls/ticket.h"
#include "util/bytes.h"

namespace baton::proxy {

namespace {
// Whether listening socket `fd` is bound to host:port (port 0: any port).
bool same_address(int fd, const std::string& host, uint16_t port) {
  sockaddr_storage want, have;
  socklen_t len = sizeof have;
  if (!net::parse_ip(host, port, want) || getsockname(fd, reinterpret_cast<sockaddr*>(&have), &len) != 0) return false;
  if (want.ss_family != have.ss_family) return false;
  if (want.ss_family == AF_INET) {
    auto* w = reinterpret_cast<sockaddr_in*>(&want);
    auto* h = reinterpret_cast<sockaddr_in*>(&have);
    return w->sin_addr.s_addr == h->sin_addr.s_addr && (port == 0 || w->sin_port == h->sin_port);
  }
  auto* w = reinterpret_cast<sockaddr_in6*>(&want);
  auto* h = reinterpret_cast<sockaddr_in6*>(&have);
  return std::memcmp(&w->sin6_addr, &h->sin6_addr, sizeof w->sin6_addr) == 0 && (port == 0 || w->sin6_port == h->sin6_port);
}
}  // namespace

const char* to_str(ServeState s) {
  switch (s) {
    case ServeState::starting: return "starting";
    case ServeState::serving: return "serving";
    case ServeState::handing_over: return "handing_over";
    case ServeState::draining: return "draining";
  }
  return "?";
}

const char* to_str(DrainPhase p) {
  switch (p) {
    case DrainPhase::idle: return "idle";
    case DrainPhase::notifying: return "notifying";
    case DrainPhase::waiting: return "waiting";
    case DrainPhase::done: return "done";
  }
  return "?";
}

Server::Server(uv_loop_t* loop, const config::Config& cfg) : loop_(loop), cfg_(cfg) {
  started_ms_ = uv_now(loop_);
  tick_ = new uv_timer_t;
  uv_timer_init(loop_, tick_);
  tick_->data = this;
  uv_timer_start(tick_, tick_cb, 1000, 1000);
  uv_unref(reinterpret_cast<uv_handle_t*>(tick_));  // never what keeps the loop alive
}

std::unique_ptr<Server> Server::create(uv_loop_t* loop, const config::Config& cfg, std::string& error,
                                       const std::vector<tls::TicketKey>& inherited_ticket_keys) {
  std::unique_ptr<Server> s(new Server(loop, cfg));
  tls::ServerTlsOptions o;
  o.cert_file = cfg.tls.cert_file;
  o.key_file = cfg.tls.key_file;
  o.client_ca_file = cfg.tls.client_ca_file;
  o.require_client_cert = cfg.tls.require_client_cert;
  o.ticket_lifetime_s = cfg.tls.ticket_lifetime_s;
  o.cert_origin = cfg.tls.cert_origin;
  o.key_origin = cfg.tls.key_origin;
  o.client_ca_origin = cfg.tls.client_ca_origin;
  if (!cfg.tls.ticket_key_file.empty()) {
    error = tls::load_ticket_keys(cfg.tls.ticket_key_file, o.ticket_keys);
    if (!error.empty()) {
      if (!cfg.tls.ticket_key_origin.empty()) error = cfg.tls.ticket_key_origin + ": " + error;
      return nullptr;
    }
  } else if (inherited_ticket_keys.empty()) {
    spdlog::warn("tls.ticket_key is not set: session tickets are valid for this process and its hot restarts only");
  }
  o.inherited_ticket_keys = inherited_ticket_keys;
  s->tls_ = tls::Context::make_server(o, error);
  if (!s->tls_) return nullptr;
  for (const std::string& w : s->tls_->warnings()) spdlog::warn("{}", w);
  s->server_id_ = cfg.server_id;
  if (s->server_id_.empty()) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    s->server_id_ = host;
  }
  return s;
}

Server::~Server() {
  handshake_queue_.clear();
  for (Tunnel* t : std::unordered_set<Tunnel*>(tunnels_)) delete t;
  if (listener_) listener_->close();
  release_listener();
  uv_close(reinterpret_cast<uv_handle_t*>(tick_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
}

net::Listener* Server::make_listener() {
  return net::Listener::create(
      loop_, [this](int fd) { on_accept(fd); }, [this](bool paused, int err) { on_accept_paused(paused, err); });
}

void Server::on_accept_paused(bool paused, int err) {
  if (paused) {
    metrics_.inc(series<Fam::overload_rejections_total>("fd_exhausted"));
    spdlog::error("accept: {} ({} tunnels open); pausing new connections until descriptors are free", uv_strerror(err),
                  tunnels_.size());
  } else {
    spdlog::warn("accept: descriptors available again; accepting");
  }
}

int Server::listener_fd() const { return listener_ ? listener_->fd() : -1; }

std::string Server::adopt_listener(int fd) {
  auto l = make_listener();
  std::string err = l->adopt(fd);
  if (err.empty()) {
    // A new configuration may name another address: then bind that instead.
    std::string have = l->local_address();
    if (same_address(fd, cfg_.listen.host, cfg_.listen.port)) {
      listener_ = l;
      return "";
    }
    spdlog::info("listen address changed ({} -> {}): binding the new one", have, cfg_.listen.to_string());
    l->close();
    return listen();
  }
  l->close();
  return listen();
}

void Server::stop_accepting() {
  if (!listener_) return;
  int fd = listener_->fd();
  spare_listener_fd_ = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
  listener_->close();
  listener_ = nullptr;
}

void Server::resume_accepting() {
  if (listener_ || spare_listener_fd_ < 0 || stopping_) return;
  int fd = spare_listener_fd_;
  spare_listener_fd_ = -1;
  listener_ = make_listener();
  std::string err = listener_->adopt(fd);
  if (!err.empty()) {
    spdlog::error("cannot accept again after a failed handoff: {}", err);
    listener_->close();
    listener_ = nullptr;
  }
}

void Server::release_listener() {
  if (spare_listener_fd_ >= 0) ::close(spare_listener_fd_);
  spare_listener_fd_ = -1;
}

std::vector<Tunnel*> Server::exportable_tunnels() const {
  std::vector<Tunnel*> out;
  for (Tunnel* t : tunnels_)
    if (t->exportable()) out.push_back(t);
  return out;
}

size_t Server::handshaking_tunnels() const {
  size_t n = 0;
  for (Tunnel* t : tunnels_)
    if (t->phase() == LinkPhase::awaiting_handshake) ++n;
  return n;
}

size_t Server::close_handshaking(const char* reason) {
  std::vector<Tunnel*> hs;
  for (Tunnel* t : tunnels_)
    if (t->phase() == LinkPhase::awaiting_handshake) hs.push_back(t);
  for (Tunnel* t : hs) t->close(reason, false);
  return hs.size();
}

size_t Server::draining_tunnels() const {
  size_t n = 0;
  for (Tunnel* t : tunnels_)
    if (t->draining() && t->phase() < LinkPhase::flushing) ++n;
  return n;
}

Tunnel* Server::adopt(TunnelState& st, std::string& error) {
  Tunnel* t = Tunnel::adopt(*this, st, error);
  if (t) tunnels_.insert(t);
  return t;
}

void Server::register_session(Tunnel* t) {
  const auto& id = t->session_id();
  sessions_[std::string(id.begin(), id.end())] = t;
}

void Server::forget_session(Tunnel* t) {
  const auto& id = t->session_id();
  auto it = sessions_.find(std::string(id.begin(), id.end()));
  if (it != sessions_.end() && it->second == t) sessions_.erase(it);
}

Tunnel* Server::find_session(const std::array<uint8_t, 16>& id) const {
  auto it = sessions_.find(std::string(id.begin(), id.end()));
  return it == sessions_.end() ? nullptr : it->second;
}

LinkLimits Server::link_limits() const {
  LinkLimits l;
  l.resume_window_ms = cfg_.resume.window_ms;
  l.resume_buffer_bytes = cfg_.resume.buffer_bytes;
  l.max_streams = cfg_.limits.max_streams_per_tunnel;
  l.handshake_timeout_ms = cfg_.limits.handshake_timeout_ms;
  l.idle_timeout_ms = cfg_.limits.idle_timeout_ms;
  l.output_high_water = cfg_.limits.tunnel_output_high_water;
  return l;
}

std::string Server::listen() {
  listener_ = make_listener();
  std::string err = listener_->bind(cfg_.listen.host, cfg_.listen.port);
  if (!err.empty()) {
    listener_->close();
    listener_ = nullptr;
  }
  return err;
}

std::string Server::listen_address() const { return listener_ ? listener_->local_address() : ""; }

void Server::on_accept(int fd) {
  net::Tcp* tcp = net::Tcp::create(loop_, nullptr);
  if (tcp->open_fd(fd) != 0) {
    ::close(fd);
    tcp->close();
    return;
  }
  metrics_.inc(series<Fam::tunnels_total>("accepted"));
  if (stopping_) {
    tcp->close();
    return;
  }
  uv_tcp_nodelay(tcp->handle(), 1);
  auto* t = new Tunnel(*this, tcp);
  tunnels_.insert(t);
  const config::Limits& l = cfg_.limits;
  if (handshaking_ < l.max_concurrent_handshakes) {
    start_handshake(t);
  } else if (handshake_queue_.size() < l.max_queued_handshakes) {
    // TLS handshakes are the expensive part: a reconnect storm waits here
    // instead of starving live tunnels of CPU.
    handshake_queue_.push_back(t);
  } else {
    metrics_.inc(series<Fam::overload_rejections_total>("handshake_queue"));
    // A reconnect storm refuses thousands: one line a second at most, with the count.
    ++queue_refusals_unlogged_;
    uint64_t now = uv_now(loop_);
    if (now - queue_refusal_logged_ms_ >= 1000) {
      spdlog::warn("refused {} connection(s): {} handshakes running and {} queued (limits.max_queued_handshakes)",
                   queue_refusals_unlogged_, handshaking_, handshake_queue_.size());
      queue_refusal_logged_ms_ = now;
      queue_refusals_unlogged_ = 0;
    }
    delete t;
  }
}

void Server::start_handshake(Tunnel* t) {
  ++handshaking_;
  t->start_handshake();
}

void Server::handshake_finished(Tunnel* t) {
  (void)t;
  if (handshaking_ > 0) --handshaking_;
  uint64_t now = uv_now(loop_);
  while (!handshake_queue_.empty() && handshaking_ < cfg_.limits.max_concurrent_handshakes) {
    Tunnel* next = handshake_queue_.front();
    handshake_queue_.pop_front();
    if (now - next->accepted_ms() >= cfg_.limits.handshake_timeout_ms) {
      metrics_.inc(series<Fam::tunnels_total>("tls_failed"));
      metrics_.inc(series<Fam::tunnels_cut_total>("handshake_timeout"));
      delete next;  // waited longer than a handshake may take: the client has likely given up
      continue;
    }
    start_handshake(next);
  }
  if (on_handshake_settled_) on_handshake_settled_();
}

void Server::set_state(ServeState s) {
  if (state_ == s) return;
  spdlog::debug("server state: {} -> {}", to_str(state_), to_str(s));
  state_ = s;
}

void Server::start_drain() {
  if (state_ == ServeState::draining) return;
  set_state(ServeState::draining);
  drain_started_ms_ = uv_now(loop_);
  if (drain_handler_) {
    drain_handler_();
    return;
  }
  drain_phase_ = DrainPhase::waiting;
  size_t n = 0;
  for (Tunnel* t : std::unordered_set<Tunnel*>(tunnels_)) {
    if (t->phase() != LinkPhase::serving) continue;
    t->drain("drain", cfg_.drain.grace_ms, cfg_.drain.reconnect_hint);
    ++n;
  }
  spdlog::info("draining: {} tunnels told to move (grace {} ms); new tunnels are rejected", n, cfg_.drain.grace_ms);
}

std::map<std::string, uint64_t> Server::streams_by_route() const {
  std::map<std::string, uint64_t> m;
  for (Tunnel* t : tunnels_) t->count_routes(m);
  return m;
}

std::vector<Tunnel*> Server::tunnels_to_drain() const {
  std::vector<Tunnel*> out;
  for (Tunnel* t : tunnels_)
    // A detached session too: DRAIN waits in it for its resume.
    if ((t->phase() == LinkPhase::serving || t->phase() == LinkPhase::detached) && !t->draining()) out.push_back(t);
  return out;
}

size_t Server::active_streams() const {
  size_t n = 0;
  for (Tunnel* t : tunnels_) n += t->bridge_count();
  return n;
}

Metrics Server::metrics_snapshot() const {
  Metrics m = metrics_;
  for (Tunnel* t : tunnels_) t->add_live_bytes(m);
  return m;
}

namespace {
// Through a descriptor opened once, so it still works when descriptors run out.
uint64_t resident_bytes() {
  static int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  char buf[128];
  ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return 0;
  buf[n] = 0;
  unsigned long size = 0, rss = 0;
  if (std::sscanf(buf, "%lu %lu", &size, &rss) != 2) return 0;
  return uint64_t(rss) * uint64_t(sysconf(_SC_PAGESIZE));
}

// Counts /proc/self/fd through a descriptor opened once: when descriptors
// run out is exactly when this must still work.
size_t open_fds() {
  static int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return 0;
  if (lseek(dir, 0, SEEK_SET) != 0) return 0;
  size_t n = 0;
  alignas(8) char buf[8192];
  while (true) {
    long got = syscall(SYS_getdents64, dir, buf, sizeof buf);
    if (got <= 0) break;
    for (long off = 0; off < got;) {
      auto* d = reinterpret_cast<const struct dirent64*>(buf + off);
      if (d->d_name[0] != '.') ++n;
      off += d->d_reclen;
    }
  }
  return n > 1 ? n - 1 : 0;  // not counting the directory's own descriptor
}
}  // namespace

std::vector<Gauge> Server::gauges() const {
  const config::Limits& l = cfg_.limits;
  size_t max_streams = 0, kept = 0;  // one walk over the tunnels for both
  for (Tunnel* t : tunnels_) {
    max_streams = std::max(max_streams, t->bridge_count());
    kept += t->resume_kept();
  }
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  double fd_limit = rl.rlim_cur == RLIM_INFINITY ? 1e9 : double(rl.rlim_cur);
  std::vector<Gauge> g;
  g.emplace_back(series<Fam::tunnels_active>(), double(serving_));
  g.emplace_back(series<Fam::tunnels_handshaking>(), double(handshaking_));
  g.emplace_back(series<Fam::tunnels_queued>(), double(handshake_queue_.size()));
  g.emplace_back(series<Fam::streams_active>(), double(active_streams()));
  g.emplace_back(series<Fam::sessions_detached>(), double(detached_));
  g.emplace_back(series<Fam::resume_kept_bytes>(), double(kept));
  // 0 serving, 1 notifying clients, 2 waiting for streams to end, 3 done
  double drain = 0;
  if (state_ == ServeState::draining)
    drain = drain_phase_ == DrainPhase::notifying ? 1 : drain_phase_ == DrainPhase::done ? 3 : 2;
  g.emplace_back(series<Fam::drain_state>(), drain);
  g.emplace_back(series<Fam::ready>(), ready() ? 1.0 : 0.0);
  g.emplace_back(series<Fam::restart_epoch>(), double(epoch_));
  g.emplace_back(series<Fam::process_resident_bytes>(), double(resident_bytes()));
  const size_t fds = open_fds();  // one scan of /proc/self/fd for both gauges
  g.emplace_back(series<Fam::process_open_fds>(), double(fds));
  g.emplace_back(series<Fam::limit_usage_ratio>("max_tunnels"), double(serving_) / l.max_tunnels);
  g.emplace_back(series<Fam::limit_usage_ratio>("max_concurrent_handshakes"),
                 double(handshaking_) / l.max_concurrent_handshakes);
  g.emplace_back(series<Fam::limit_usage_ratio>("max_queued_handshakes"),
                 l.max_queued_handshakes ? double(handshake_queue_.size()) / l.max_queued_handshakes : 0.0);
  g.emplace_back(series<Fam::limit_usage_ratio>("max_streams_per_tunnel"),
                 double(max_streams) / l.max_streams_per_tunnel);
  g.emplace_back(series<Fam::limit_usage_ratio>("open_files"), double(fds) / fd_limit);
  for (const tls::CertExpiry& e : tls_->expiries())
    g.emplace_back(series<Fam::tls_certificate_expiry_seconds>(e.cert), double(e.not_after));
  return g;
}

void Server::tick_cb(uv_timer_t* t) { static_cast<Server*>(t->data)->check_limits(); }

void Server::check_limits() {
  const double warn = cfg_.limits.warn_percent / 100.0;
  for (const Gauge& g : gauges()) {
    if (g.first.fam != Fam::limit_usage_ratio) continue;
    const std::string limit(g.first.label("limit"));
    bool& above = warned_[limit];
    if (!above && g.second >= warn) {
      above = true;
      spdlog::warn("limit {} is {:.0f}% used (warning at {}%)", limit, g.second * 100, cfg_.limits.warn_percent);
    } else if (above && g.second < warn * 0.9) {
      above = false;  // re-armed once clearly below
    }
  }
}

void Server::forget(Tunnel* t) {
  tunnels_.erase(t);
  // A tunnel that held a handshake slot has reported its end already
  // (handshake_finished, from ~Tunnel); one still queued for a slot ends here.
  for (auto it = handshake_queue_.begin(); it != handshake_queue_.end(); ++it)
    if (*it == t) {
      handshake_queue_.erase(it);
      if (on_handshake_settled_) on_handshake_settled_();
      break;
    }
  if (on_tunnel_gone_) on_tunnel_gone_();
}

void Server::stop() {
  stopping_ = true;
  if (listener_) {
    listener_->close();
    listener_ = nullptr;
  }
  for (Tunnel* t : std::unordered_set<Tunnel*>(tunnels_)) t->close("server stopping", true);
}

std::string Server::authenticate(const std::string& token) const {
  uint8_t digest[32];
  mbedtls_sha256_ret(reinterpret_cast<const unsigned char*>(token.data()), token.size(), digest, 0);
  std::string found;
  // Compare against every token so the time taken does not depend on which matched.
  for (const config::Token& t : cfg_.tokens)
    if (util::equal_ct(digest, t.sha256)) found = t.name;
  return found;
}

}  // namespace baton::proxy
