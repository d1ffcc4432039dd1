#include "proxy/server.h"

#include <mbedtls/sha256.h>
#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

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

std::unique_ptr<Server> Server::create(uv_loop_t* loop, const config::Config& cfg, std::string& error,
                                       const std::vector<tls::TicketKey>& inherited_ticket_keys) {
  std::unique_ptr<Server> s(new Server(loop, cfg));
  tls::ServerTlsOptions o;
  o.cert_file = cfg.tls.cert_file;
  o.key_file = cfg.tls.key_file;
  o.client_ca_file = cfg.tls.client_ca_file;
  o.require_client_cert = cfg.tls.require_client_cert;
  o.ticket_lifetime_s = cfg.tls.ticket_lifetime_s;
  if (!cfg.tls.ticket_key_file.empty()) {
    error = tls::load_ticket_keys(cfg.tls.ticket_key_file, o.ticket_keys);
    if (!error.empty()) return nullptr;
  } else if (inherited_ticket_keys.empty()) {
    spdlog::warn("tls.ticket_key is not set: session tickets are valid for this process and its hot restarts only");
  }
  o.inherited_ticket_keys = inherited_ticket_keys;
  s->tls_ = tls::Context::make_server(o, error);
  if (!s->tls_) return nullptr;
  s->server_id_ = cfg.server_id;
  if (s->server_id_.empty()) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    s->server_id_ = host;
  }
  return s;
}

Server::~Server() {
  for (Tunnel* t : std::unordered_set<Tunnel*>(tunnels_)) delete t;
  if (listener_) listener_->close();
  release_listener();
}

int Server::listener_fd() const { return listener_ ? listener_->fd() : -1; }

std::string Server::adopt_listener(int fd) {
  auto l = net::Listener::create(loop_, [this](uv_stream_t* s) { on_accept(s); });
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
  ::close(fd);
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
  listener_ = net::Listener::create(loop_, [this](uv_stream_t* s) { on_accept(s); });
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

LinkLimits Server::link_limits() const {
  LinkLimits l;
  l.max_streams = cfg_.limits.max_streams_per_tunnel;
  l.handshake_timeout_ms = cfg_.limits.handshake_timeout_ms;
  l.idle_timeout_ms = cfg_.limits.idle_timeout_ms;
  l.output_high_water = cfg_.limits.tunnel_output_high_water;
  return l;
}

std::string Server::listen() {
  listener_ = net::Listener::create(loop_, [this](uv_stream_t* s) { on_accept(s); });
  std::string err = listener_->bind(cfg_.listen.host, cfg_.listen.port);
  if (!err.empty()) {
    listener_->close();
    listener_ = nullptr;
  }
  return err;
}

std::string Server::listen_address() const { return listener_ ? listener_->local_address() : ""; }

void Server::on_accept(uv_stream_t* server) {
  net::Tcp* tcp = net::Tcp::create(loop_, nullptr);
  if (uv_accept(server, tcp->stream()) != 0) {
    tcp->close();
    return;
  }
  counters_.tunnels_accepted++;
  if (stopping_ || tunnels_.size() >= cfg_.limits.max_tunnels) {
    // Refused before any TLS work: an overloaded server spends nothing on it.
    counters_.tunnels_refused_limit++;
    spdlog::warn("refusing connection from {}: max_tunnels ({}) reached", tcp->peer_address(), cfg_.limits.max_tunnels);
    tcp->close();
    return;
  }
  uv_tcp_nodelay(tcp->handle(), 1);
  auto* t = new Tunnel(*this, tcp);
  tunnels_.insert(t);
  t->start();
}

void Server::forget(Tunnel* t) { tunnels_.erase(t); }

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
