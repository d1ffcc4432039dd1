#include "proxy/tunnel.h"

#include <spdlog/spdlog.h>

#include "mux/control.h"
#include "proxy/bridge.h"
#include "proxy/server.h"
#include "util/bytes.h"
#include "util/text.h"

namespace baton::proxy {

struct HelloView {
  const mux::Hello& m;
};

Tunnel::Tunnel(Server& server, net::Tcp* tcp)
    : Link(server.loop(), tcp, server.tls(), mux::Role::server, server.link_limits()), server_(server) {
  accepted_ms_ = uv_now(server.loop());
  stream_tokens_ = server_.config().limits.stream_open_burst;
  stream_tokens_ms_ = accepted_ms_;
}

Tunnel::~Tunnel() {
  end_bridges();  // their on_finished hooks count bytes into this tunnel's server
  release_handshake_slot();
  set_counted(false);
  set_detached_counted(false);
  if (offers_resume_) server_.forget_session(this);
  server_.forget(this);
}

void Tunnel::start_handshake() {
  holds_handshake_slot_ = true;
  handshake_started_ns_ = uv_hrtime();
  start();
}

void Tunnel::release_handshake_slot() {
  if (!holds_handshake_slot_) return;
  holds_handshake_slot_ = false;
  server_.handshake_finished(this);
}

void Tunnel::set_counted(bool on) {
  if (counted_ == on) return;
  counted_ = on;
  server_.tunnel_serving(on);
}

void Tunnel::set_detached_counted(bool on) {
  if (detached_counted_ == on) return;
  detached_counted_ = on;
  server_.tunnel_detached(on);
}

void Tunnel::on_handshake_failed() {
  server_.metrics().inc(series<Fam::tunnels_total>("tls_failed"));
}

void Tunnel::on_flush_timeout() { server_.metrics().inc(series<Fam::flush_timeouts_total>()); }

void Tunnel::on_stream_ids_given_up(uint32_t n) { server_.metrics().inc(series<Fam::stream_ids_given_up_total>(), n); }

void Tunnel::on_cut(const char* reason) {
  server_.metrics().inc(series<Fam::tunnels_cut_total>(reason));
}

void Tunnel::on_streams_limit() {
  server_.metrics().inc(series<Fam::overload_rejections_total>("max_streams_per_tunnel"));
}

void Tunnel::add_live_bytes(Metrics& m) const {
  for (const auto& [id, b] : bridges()) {
    if (b->route().empty() || b->phase() == BridgePhase::done) continue;
    if (!server_.config().find_route(b->route())) continue;
    m.inc(series<Fam::bytes_total>(b->route(), "up"), b->bytes_up);
    m.inc(series<Fam::bytes_total>(b->route(), "down"), b->bytes_down);
  }
}

void Tunnel::count_routes(std::map<std::string, uint64_t>& m) const {
  for (const auto& [id, b] : bridges())
    if (!b->route().empty() && b->phase() != BridgePhase::done) m[b->route()]++;
}

void Tunnel::install_hooks(Bridge& b) {
  b.on_preamble = [this](Bridge& br, const std::string& route) { route_stream(br, route); };
  b.on_connect_result = [this](Bridge& br, int status, double seconds) {
    Metrics& m = server_.metrics();
    m.inc(series<Fam::streams_total>(br.route(), status == 0 ? "opened" : "connect_failed"));
    if (status == 0) m.observe(series<Fam::upstream_connect_seconds>(), seconds);
  };
  b.on_finished = [this](Bridge& br) {
    // Only configured routes become label values: a client cannot grow the metric set.
    if (br.route().empty() || !server_.config().find_route(br.route())) return;
    Metrics& m = server_.metrics();
    m.inc(series<Fam::bytes_total>(br.route(), "up"), br.bytes_up);
    m.inc(series<Fam::bytes_total>(br.route(), "down"), br.bytes_down);
  };
  b.on_reset = [this](Bridge& br, const char* reason) {
    const std::string route = server_.config().find_route(br.route()) ? br.route() : "(none)";
    server_.metrics().inc(series<Fam::stream_resets_total>(route, reason));
  };
}

void Tunnel::on_secure() {
  if (holds_handshake_slot_)
    server_.metrics().observe(series<Fam::handshake_seconds>(), double(uv_hrtime() - handshake_started_ns_) / 1e9);
  release_handshake_slot();
  if (!peer_info().cert_subject.empty())
    spdlog::debug("tunnel {}: client certificate {}", peer(), util::quoted(peer_info().cert_subject));
  // Offsets count from the session's first byte (docs/protocol.md 9.2): keep
  // until HELLO says whether the client resumes.
  if (server_.config().resume.enabled) resume_log().start_keeping();
}

bool Tunnel::on_break(const char* why) {
  if (!offers_resume_) return false;
  if (!server_.may_detach()) {
    server_.metrics().inc(series<Fam::session_breaks_total>("max_detached"));
    spdlog::info("tunnel {}: connection lost ({}); not kept: resume.max_detached ({}) sessions are detached", peer(),
                 why, server_.config().resume.max_detached);
    return false;
  }
  server_.metrics().inc(series<Fam::session_breaks_total>("detached"));
  set_detached_counted(true);
  return true;
}

void Tunnel::on_detach_expired() {
  server_.metrics().inc(series<Fam::sessions_expired_total>());
  set_detached_counted(false);
}

// The client's pings arrive every heartbeat: receipts go at least that often.
void Tunnel::on_input() {
  if (offers_resume_) send_receipt_if_due();
}

void Tunnel::on_closed(const char* reason) {
  if (counted_) spdlog::info("tunnel {} ({}): closed: {}", peer(), util::quoted(client_id_), reason);
  release_handshake_slot();
  set_counted(false);
  set_detached_counted(false);
}

void Tunnel::on_peer_stream(uint32_t id) {
  if (id == 1 && !control_open_ && phase() == LinkPhase::awaiting_hello) {
    control_open_ = true;
    session().accept(1);
    return;
  }
  if (phase() != LinkPhase::serving || session().go_away_sent()) {
    // docs/protocol.md 3: any other stream before WELCOME is reset; 6: after DRAIN too.
    session().reset(id);
    return;
  }
  // limits.stream_open_rate: a token bucket per tunnel.
  const config::Limits& lim = server_.config().limits;
  uint64_t now = uv_now(loop());
  stream_tokens_ = std::min<double>(lim.stream_open_burst,
                                    stream_tokens_ + double(now - stream_tokens_ms_) * lim.stream_open_rate / 1000.0);
  stream_tokens_ms_ = now;
  if (stream_tokens_ < 1.0) {
    server_.metrics().inc(series<Fam::overload_rejections_total>("stream_open_rate"));
    spdlog::debug("tunnel {}: stream {} refused: more than {} streams/s (limits.stream_open_rate)", peer(), id,
                  lim.stream_open_rate);
    // No flush() here: this runs inside Session::consume(), and the link
    // flushes once the whole read is consumed, so a flood of refused SYNs
    // gets its RSTs in full-size records, not one record per RST.
    session().reset(id);
    return;
  }
  stream_tokens_ -= 1.0;
  auto b = std::make_unique<Bridge>(*this, id);
  install_hooks(*b);
  add_bridge(id, std::move(b));
  // Its route preamble is due within limits.handshake_timeout_ms. A check
  // already armed comes earlier (streams opened before it are due first).
  if (!preamble_check_ms_) {
    preamble_check_ms_ = now + lim.handshake_timeout_ms;
    rearm_timer();
  }
}

void Tunnel::route_stream(Bridge& br, const std::string& route) {
  const config::Route* r = server_.config().find_route(route);
  if (!r) {
    spdlog::debug("tunnel {}: stream {}: unknown route {}", peer(), br.id(), util::quoted(route));
    server_.metrics().inc(series<Fam::streams_total>("(unknown)", "unknown_route"));
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
      session_id_(st.session_id), client_id_(st.client_id), control_open_(st.control_open) {
  accepted_ms_ = uv_now(server.loop());
  stream_tokens_ = server_.config().limits.stream_open_burst;
  stream_tokens_ms_ = accepted_ms_;
  for (auto& [id, b] : bridges()) {
    install_hooks(*b);
    // An adopted stream still waiting for its preamble starts its clock again.
    if (b->phase() == BridgePhase::awaiting_preamble)
      preamble_check_ms_ = accepted_ms_ + server_.config().limits.handshake_timeout_ms;
  }
  if (error.empty()) {
    set_counted(st.counted);
    // Session resume: the credential and identity travel with the session.
    offers_resume_ = st.resume.offered;
    resume_secret_ = st.resume.secret;
    identity_ = st.resume.identity;
    if (offers_resume_) server_.register_session(this);
    if (phase() == LinkPhase::detached) set_detached_counted(true);
  }
}

void Tunnel::drain(const std::string& reason, uint32_t grace_ms, const std::string& reconnect_hint) {
  EntryGuard g(this);
  if (phase() >= LinkPhase::flushing || draining()) return;
  // A detached session is drained too: DRAIN and Go Away wait in its
  // session for a resume (docs/protocol.md 9.4), within the grace.
  if (phase() != LinkPhase::serving && phase() != LinkPhase::detached) {
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
  spdlog::info("tunnel {} ({}): draining ({}, grace {} ms, {} streams)", peer(), util::quoted(client_id_), reason, grace_ms,
               bridge_count());
  if (bridge_count() == 0) {
    close("drained", false);
    return;
  }
  flush();
  rearm_timer();
}

uint64_t Tunnel::role_deadline() const {
  if (!drain_deadline_ms_ || (preamble_check_ms_ && preamble_check_ms_ < drain_deadline_ms_)) return preamble_check_ms_;
  return drain_deadline_ms_;
}

void Tunnel::on_role_deadline() {
  uint64_t now = uv_now(loop());
  if (draining() && now >= drain_deadline_ms_) {
    close("drain grace period over", false);
    return;
  }
  if (preamble_check_ms_ && now >= preamble_check_ms_) check_preambles(now);
}

// A stream opened but never named (its route preamble incomplete) would hold
// a stream slot for as long as the tunnel lives: the preamble gets the same
// limit as the tunnel's own handshake. Two looks: streams late at the first
// are reset at the second, one loop iteration later, so that a preamble
// already waiting in the socket while the loop was busy (the timer runs
// before the loop polls for input) is read first. Bridges are scanned only
// here, once per check, never when the timer is re-armed.
void Tunnel::check_preambles(uint64_t now) {
  const uint32_t limit = server_.config().limits.handshake_timeout_ms;
  const uint64_t cutoff = preamble_cutoff_ms_;  // set: this is the second look
  preamble_cutoff_ms_ = 0;
  std::vector<uint32_t> late;
  uint64_t next = 0;  // the earliest deadline of the streams that stay
  for (const auto& [id, b] : bridges()) {
    if (b->phase() != BridgePhase::awaiting_preamble) continue;
    const uint64_t due = b->opened_ms() + limit;
    if (cutoff ? due <= cutoff : due <= now) {
      late.push_back(id);
    } else if (!next || due < next) {
      next = due;
    }
  }
  if (!cutoff && !late.empty()) {  // first look: the second comes one loop iteration later
    preamble_cutoff_ms_ = now;
    preamble_check_ms_ = now + 1;
    return;
  }
  for (uint32_t id : late)
    if (Bridge* b = bridge(id)) b->preamble_timed_out(limit);
  preamble_check_ms_ = next;
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
  out.resume.offered = t->offers_resume_;
  out.resume.secret = t->resume_secret_;
  out.resume.identity = t->identity_;
  delete t;
  return true;
}

void Tunnel::reject(uint16_t code, const std::string& reason) {
  const char* result = code == 2 ? "auth_failed" : code == 3 ? "rejected_overload" : code == 4 ? "rejected_draining"
                                                                                                : "rejected";
  server_.metrics().inc(series<Fam::tunnels_total>(result));
  spdlog::info("tunnel {}: REJECT {} ({})", peer(), code, reason);
  mux::Reject r;
  r.code = code;
  r.reason = reason;
  if (code == 3) r.retry_after_ms = server_.config().limits.retry_after_ms;
  std::vector<uint8_t> msg;
  mux::encode(r, msg);
  send_control(msg);
  close("rejected", true, mux::GoAwayCode::normal);
}

void Tunnel::on_control_data() {
  const util::ByteQueue* in = session().inbound(1);
  while (in && !in->empty() && phase() < LinkPhase::flushing) {
    mux::ControlMessage m;
    mux::DecodeResult r = mux::decode(*in, m);
    if (r.status == mux::DecodeStatus::need_more) return;
    if (r.status == mux::DecodeStatus::malformed) {
      const std::string_view why = r.error ? r.error : "?";
      spdlog::info("tunnel {}: malformed control message: {}", peer(), why);
      // The client is told why: "malformed HELLO: client_id is not valid UTF-8".
      if (phase() == LinkPhase::awaiting_hello)
        reject(1, "malformed HELLO: " + std::string(why.starts_with("HELLO ") ? why.substr(6) : why));
      else cut("protocol_error", "malformed control message", true, mux::GoAwayCode::protocol_error);
      return;
    }
    session().consumed(1, r.used);
    in = session().inbound(1);
    if (m.hello && phase() == LinkPhase::awaiting_hello) {
      handle_hello(HelloView{*m.hello});
      if (phase() != LinkPhase::serving) return;
    } else if (m.received && phase() == LinkPhase::serving) {
      // Not a resumable session: ignored, like any unknown message.
      if (offers_resume_ && resume_log().keeping() && !take_receipt(m.received->received)) return;
    }
    // Anything else (unknown types, a second HELLO) is ignored, as docs/protocol.md 3 says.
  }
}

bool Tunnel::try_resume(const mux::ResumeRequest& r, const std::string& identity, std::string& refused,
                        mux::ResumeRefusedCode& code) {
  const config::Resume& rc = server_.config().resume;
  if (!rc.enabled) {
    code = mux::ResumeRefusedCode::unavailable;
    refused = "this server does not resume sessions";
    return false;
  }
  Tunnel* old = server_.find_session(r.session_id);
  if (!old || old == this || !(old->phase() == LinkPhase::serving || old->phase() == LinkPhase::detached)) {
    code = mux::ResumeRefusedCode::unknown_session;
    refused = "no such session here (expired, or held by another server)";
    return false;
  }
  // Both compared whatever the first says: the answer takes as long either way.
  const bool secret_ok = util::equal_ct(r.secret, old->resume_secret_);
  const bool identity_ok = util::equal_ct(util::as_bytes(identity), util::as_bytes(old->identity_));
  if (!secret_ok || !identity_ok) {
    code = mux::ResumeRefusedCode::credentials;
    refused = "the credentials do not match";
    return false;
  }
  if (!old->can_resume_from(r.received)) {
    code = mux::ResumeRefusedCode::offsets;
    refused = "offset " + std::to_string(r.received) + " is outside the " + std::to_string(old->resume_log().acked()) +
              ".." + std::to_string(old->resume_log().sent()) + " this server holds";
    return false;
  }
  // The old connection may still look alive here (a NAT rebinding leaves it
  // silently dead): it is dropped now.
  if (old->phase() == LinkPhase::serving) old->detach("the client resumed on a new connection");
  old->set_detached_counted(false);
  // A new secret: the one presented is spent.
  (void)mbedtls_ctr_drbg_random(server_.tls().rng(), old->resume_secret_.data(), old->resume_secret_.size());
  mux::Resumed m;
  m.received = old->resume_log().received();
  m.secret = old->resume_secret_;
  m.window_ms = rc.window_ms;
  std::vector<uint8_t> msg;
  mux::encode(m, msg);
  // RESUMED is the last frame of the setup session (docs/protocol.md 9.4):
  // sealed now, so it ends its record; the old session's bytes follow.
  send_control(msg);
  const uint64_t replay = old->resume_log().sent() - r.received;
  server_.metrics().inc(series<Fam::session_resumes_total>("resumed"));
  server_.metrics().inc(series<Fam::resume_replayed_bytes_total>(), replay);
  spdlog::info("tunnel {}: session {} ({}) resumed on a new connection; {} bytes sent again", peer(),
               util::to_hex(old->session_id()).substr(0, 8), util::quoted(old->client_id()), replay);
  hand_session_to(*old, r.received);
  return true;
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
  const std::string identity =
      !token_name.empty() ? "token " + token_name : "cert " + peer_info().cert_subject;
  std::string refused;
  mux::ResumeRefusedCode refused_code{};
  if (h.resume) {
    // docs/protocol.md 9.4: a resume adds no tunnel, so it is not held to
    // max_tunnels, and a draining server accepts it and then drains it.
    if (try_resume(*h.resume, identity, refused, refused_code)) return;
    server_.metrics().inc(series<Fam::session_resumes_total>(to_str(refused_code)));
    spdlog::info("tunnel {}: resume of session {} refused ({}); a fresh session starts", peer(),
                 util::to_hex(h.resume->session_id).substr(0, 8), refused);
  }
  if (server_.state() == ServeState::draining) {
    reject(4, "draining");
    return;
  }
  if (server_.serving_tunnels() >= cfg.limits.max_tunnels) {
    server_.metrics().inc(series<Fam::overload_rejections_total>("max_tunnels"));
    reject(3, "max_tunnels (" + std::to_string(cfg.limits.max_tunnels) + ") reached");
    return;
  }
  (void)mbedtls_ctr_drbg_random(server_.tls().rng(), session_id_.data(), session_id_.size());
  mux::Welcome w;
  w.session_id = session_id_;
  w.server_id = server_.server_id();
  w.heartbeat_ms = cfg.limits.heartbeat_ms;
  w.stream_open_rate = cfg.limits.stream_open_rate;  // docs/protocol.md 3: the client paces its opens to them
  w.stream_open_burst = cfg.limits.stream_open_burst;
  w.max_streams = cfg.limits.max_streams_per_tunnel;
  if (h.resume) {
    w.resume_refused_code = uint16_t(refused_code);
    w.resume_refused = refused;
  }
  identity_ = identity;
  if (h.resume_capable && cfg.resume.enabled && resume_log().keeping()) {
    offers_resume_ = true;
    (void)mbedtls_ctr_drbg_random(server_.tls().rng(), resume_secret_.data(), resume_secret_.size());
    w.resume_secret = resume_secret_;
    w.resume_window_ms = cfg.resume.window_ms;
    w.resume_address = cfg.resume.advertise;
    server_.register_session(this);
  } else {
    resume_log().stop_keeping();
  }
  std::vector<uint8_t> msg;
  mux::encode(w, msg);
  set_phase(LinkPhase::serving);
  rearm_timer();
  set_counted(true);
  server_.metrics().inc(series<Fam::tunnels_total>("established"));
  // Peer values (client_id, certificate subject) go through util::quoted: escaped, never raw.
  spdlog::info("tunnel {}: welcome client {} (token {}{}{}), session {}", peer(), util::quoted(client_id_),
               token_name.empty() ? "-" : token_name, peer_info().cert_subject.empty() ? "" : ", cert ",
               peer_info().cert_subject.empty() ? std::string() : util::quoted(peer_info().cert_subject),
               util::to_hex(session_id_).substr(0, 8));
  send_control(msg);
}

}  // namespace baton::proxy
