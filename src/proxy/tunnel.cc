#include "proxy/tunnel.h"

#include <spdlog/spdlog.h>

#include "mux/control.h"
#include "proxy/bridge.h"
#include "proxy/server.h"
#include "util/bytes.h"

namespace baton::proxy {

struct HelloView {
  const mux::Hello& m;
};

Tunnel::Tunnel(Server& server, net::Tcp* tcp)
    : Link(server.loop(), tcp, server.tls(), mux::Role::server, server.link_limits()), server_(server) {}

Tunnel::~Tunnel() { server_.forget(this); }

void Tunnel::on_secure() {
  if (!peer_info().cert_subject.empty())
    spdlog::debug("tunnel {}: client certificate {}", peer(), peer_info().cert_subject);
}

void Tunnel::on_closed(const char* reason) {
  if (counted_) spdlog::info("tunnel {} ({}): closed: {}", peer(), client_id_, reason);
}

void Tunnel::on_peer_stream(uint32_t id) {
  if (id == 1 && !control_open_ && phase() == LinkPhase::awaiting_hello) {
    control_open_ = true;
    session().accept(1);
    return;
  }
  if (phase() != LinkPhase::serving || session().go_away_sent()) {
    // PROTOCOL.md 3: any other stream before WELCOME is reset; 6: after DRAIN too.
    session().reset(id);
    return;
  }
  auto b = std::make_unique<Bridge>(*this, id);
  b->on_preamble = [this](Bridge& br, const std::string& route) { route_stream(br, route); };
  add_bridge(id, std::move(b));
}

void Tunnel::route_stream(Bridge& br, const std::string& route) {
  const config::Route* r = server_.config().find_route(route);
  if (!r) {
    spdlog::debug("tunnel {}: stream {}: unknown route \"{}\"", peer(), br.id(), route);
    session().reset(br.id());
    br.stream_gone(true);
    remove_bridge(br.id());
    flush();
    return;
  }
  br.connect(route, r->upstream.host, r->upstream.port, server_.config().limits.upstream_connect_timeout_ms);
}

Tunnel::Tunnel(Server& server, TunnelState& st, std::string& error)
    : Link(server.loop(), server.tls(), mux::Role::server, server.link_limits(), st, error), server_(server),
      session_id_(st.session_id), client_id_(st.client_id), control_open_(st.control_open), counted_(st.counted) {
  for (auto& [id, b] : bridges()) b->on_preamble = [this](Bridge& br, const std::string& route) { route_stream(br, route); };
}

void Tunnel::drain(const std::string& reason, uint32_t grace_ms, const std::string& reconnect_hint) {
  EntryGuard g(this);
  if (phase() >= LinkPhase::flushing || draining()) return;
  if (phase() != LinkPhase::serving) {
    close("draining", true);
    return;
  }
  mux::Drain d;
  d.reason = reason;
  d.grace_ms = grace_ms;
  d.reconnect_hint = reconnect_hint;
  std::vector<uint8_t> msg;
  mux::encode(d, msg);
  send_control(msg);
  session().go_away(mux::GoAwayCode::normal);
  drain_deadline_ms_ = uv_now(loop()) + grace_ms;
  spdlog::info("tunnel {} ({}): draining ({}, grace {} ms, {} streams)", peer(), client_id_, reason, grace_ms,
               bridge_count());
  if (bridge_count() == 0) {
    close("drained", false);
    return;
  }
  flush();
  rearm_timer();
}

void Tunnel::on_role_deadline() {
  if (draining()) close("drain grace period over", false);
}

void Tunnel::on_last_bridge_gone() {
  if (draining()) close("drained: last stream ended", false);
}

Tunnel* Tunnel::adopt(Server& server, TunnelState& st, std::string& error) {
  auto* t = new Tunnel(server, st, error);
  if (!error.empty()) {
    delete t;
    return nullptr;
  }
  return t;
}

bool Tunnel::export_state(Tunnel* t, TunnelState& out) {
  if (!t->export_link(out)) return false;
  out.session_id = t->session_id_;
  out.client_id = t->client_id_;
  out.control_open = t->control_open_;
  out.counted = t->counted_;
  delete t;
  return true;
}

void Tunnel::send_control(const std::vector<uint8_t>& msg) {
  size_t n = session().write(1, msg);
  // The control stream's window is 256 KiB and the server sends a handful of
  // small messages; a peer that never returns credit loses them.
  if (n < msg.size()) spdlog::warn("tunnel {}: control stream window exhausted", peer());
  flush();
}

void Tunnel::reject(uint16_t code, const std::string& reason) {
  server_.counters().tunnels_rejected++;
  spdlog::info("tunnel {}: REJECT {} ({})", peer(), code, reason);
  mux::Reject r;
  r.code = code;
  r.reason = reason;
  std::vector<uint8_t> msg;
  mux::encode(r, msg);
  send_control(msg);
  close("rejected", true, mux::GoAwayCode::normal);
}

void Tunnel::on_control_data() {
  const util::ByteQueue* in = session().inbound(1);
  while (in && !in->empty() && phase() < LinkPhase::flushing) {
    std::vector<uint8_t> buf = in->to_vector();
    mux::ControlMessage m;
    mux::DecodeResult r = mux::decode(buf, m);
    if (r.status == mux::DecodeStatus::need_more) return;
    if (r.status == mux::DecodeStatus::malformed) {
      spdlog::info("tunnel {}: malformed control message: {}", peer(), r.error ? r.error : "?");
      if (phase() == LinkPhase::awaiting_hello) reject(1, "malformed HELLO");
      else close("malformed control message", true, mux::GoAwayCode::protocol_error);
      return;
    }
    session().consumed(1, r.used);
    in = session().inbound(1);
    if (m.hello && phase() == LinkPhase::awaiting_hello) {
      handle_hello(HelloView{*m.hello});
      if (phase() != LinkPhase::serving) return;
    }
    // Anything else (unknown types, a second HELLO) is ignored, as PROTOCOL.md 3 says.
  }
}

void Tunnel::handle_hello(const HelloView& hv) {
  const mux::Hello& h = hv.m;
  client_id_ = h.client_id;
  if (!h.version || *h.version != 1) {
    reject(1, "unsupported protocol version");
    return;
  }
  const config::Config& cfg = server_.config();
  std::string token_name;
  if (!h.token.empty()) {
    token_name = server_.authenticate(h.token);
    if (token_name.empty()) {
      reject(2, "unauthorized");
      return;
    }
  } else if (cfg.require_token || peer_info().cert_subject.empty()) {
    reject(2, "unauthorized");
    return;
  }
  (void)mbedtls_ctr_drbg_random(server_.tls().rng(), session_id_.data(), session_id_.size());
  mux::Welcome w;
  w.session_id = session_id_;
  w.server_id = server_.server_id();
  w.heartbeat_ms = cfg.limits.heartbeat_ms;
  std::vector<uint8_t> msg;
  mux::encode(w, msg);
  set_phase(LinkPhase::serving);
  rearm_timer();
  counted_ = true;
  server_.counters().tunnels_established++;
  spdlog::info("tunnel {}: welcome client \"{}\" (token {}{}{}), session {}", peer(), client_id_,
               token_name.empty() ? "-" : token_name, peer_info().cert_subject.empty() ? "" : ", cert ",
               peer_info().cert_subject, util::to_hex(session_id_).substr(0, 8));
  send_control(msg);
}

}  // namespace baton::proxy
