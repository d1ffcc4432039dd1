#include "proxy/server.h"

#include <mbedtls/sha256.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "proxy/tunnel.h"
#include "tls/ticket.h"
#include "util/bytes.h"

namespace baton::proxy {

std::unique_ptr<Server> Server::create(uv_loop_t* loop, const config::Config& cfg, std::string& error) {
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
  } else {
    spdlog::warn("tls.ticket_key is not set: session tickets are valid for this process only");
  }
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
