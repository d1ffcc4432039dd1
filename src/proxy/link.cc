#include "proxy/link.h"

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <algorithm>

#include "mux/control.h"
#include "proxy/bridge.h"

namespace baton::proxy {

const char* to_str(LinkPhase p) {
  switch (p) {
    case LinkPhase::awaiting_handshake: return "awaiting_handshake";
    case LinkPhase::awaiting_hello: return "awaiting_hello";
    case LinkPhase::serving: return "serving";
    case LinkPhase::detached: return "detached";
    case LinkPhase::flushing: return "flushing";
    case LinkPhase::closed: return "closed";
  }
  return "?";
}

namespace {
thread_local uint8_t g_scratch[tls::kScratchSize];
}  // namespace

Link::EntryGuard::~EntryGuard() {
  if (--l_->depth_ > 0) return;
  l_->graveyard_.clear();
  if (l_->phase() == LinkPhase::closed) delete l_;
}

Link::Link(uv_loop_t* loop, net::Tcp* tcp, tls::Context& tls_ctx, mux::Role role, const LinkLimits& limits,
           const std::string& server_name, tls::ClientSession* resume)
    : loop_(loop), tcp_(tcp), timer_(new uv_timer_t), tls_ctx_(tls_ctx), client_session_(resume), role_(role),
      limits_(limits), core_(role, *this, limits.max_streams, uv_now(loop)) {
  tcp_->set_handler(this);
  tcp_->set_read_size(256 * 1024);
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  handshake_ = std::make_unique<tls::Handshake>(tls_ctx_, server_name, resume);
  peer_ = tcp_->peer_address();
}

Link::~Link() {
  // Bridges first: their Tcp handles must close before the session that owns
  // the queues their writes point into goes away.
  close_bridges();
  if (tcp_) tcp_->close(true);
  if (timer_) uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
}

void Link::start() {
  EntryGuard g(this);
  tcp_->start_read();
  if (role_ == mux::Role::client) handshake_input({});
  rearm_timer();
}

util::ByteQueue& Link::out_queue() { return core_.record() ? core_.record()->output() : handshake_->output(); }

void Link::pump_write() {
  if (!tcp_ || tcp_->writing() || write_failed_) return;
  util::ByteQueue& q = out_queue();
  // Direct writes while nothing waits for a write to complete: a closing
  // link finishes, and a congested one wakes its bridges, in on_written.
  if (phase() < LinkPhase::flushing && !was_congested_) core_.counters().bytes_out += tcp_->write_now(q);
  if (!q.empty()) tcp_->write_from(q);
}

bool Link::congested() const {
  return core_.record() && core_.record()->state().output.size() >= limits_.output_high_water;
}

size_t Link::output_budget() const {
  if (!core_.record() || phase() != LinkPhase::serving) return 0;
  const size_t session_out = core_.session()->output().size();
  size_t queued = core_.record()->state().output.size() + session_out;
  size_t budget = queued >= limits_.output_high_water ? 0 : limits_.output_high_water - queued;
  const ResumeLog& log = core_.resume_log();
  if (log.keeping()) {
    // Kept for a resume: what the client has not proved it received, and
    // what is queued to be sent (docs/protocol.md 9.1).
    const size_t held = log.kept() + session_out;
    budget = std::min<size_t>(budget, held >= limits_.resume_buffer_bytes ? 0 : limits_.resume_buffer_bytes - held);
  }
  return budget;
}

void Link::flush() {
  if (phase() == LinkPhase::closed) return;
  if (core_.secured()) {
    piggyback_receipt();
    core_.seal();
    if (congested()) was_congested_ = true;
    if (core_.record()->broken() && phase() < LinkPhase::flushing) {
      spdlog::error("tunnel {}: the record cipher failed; closing", peer_);
      cut("tls_error", "record cipher failed");
      return;
    }
  }
  pump_write();
  // Past the high-water mark, output grows only through frames that need a
  // reply (SYNs to refuse, pings). Cut a peer that makes it grow to 4x the
  // mark while its socket takes nothing more. One that reads is not cut for
  // a burst that outpaces a loop iteration: every read of that burst is
  // handled before the write in flight completes, so the queue can be long
  // while the kernel still takes each write whole.
  if (core_.record() && phase() < LinkPhase::flushing &&
      core_.record()->state().output.size() > 4ull * limits_.output_high_water && tcp_ && tcp_->unsent() > 0) {
    spdlog::warn("tunnel {}: peer is not reading ({} bytes queued for it); closing", peer_,
                 core_.record()->state().output.size());
    cut("not_reading", "peer is not reading");
  }
}

void Link::on_read(std::span<const uint8_t> data) {
  EntryGuard g(this);
  core_.received(data.size(), uv_now(loop_));
  if (phase() == LinkPhase::awaiting_handshake) handshake_input(data);
  else if (phase() == LinkPhase::awaiting_hello || phase() == LinkPhase::serving) record_input(data);
}

void Link::on_read_end(int err) {
  EntryGuard g(this);
  if (phase() >= LinkPhase::flushing || phase() == LinkPhase::detached) return;
  // TCP FIN without close_notify, or a reset: nothing more can be said.
  if (try_detach(err ? "connection error" : "peer closed the connection")) return;
  close(err ? "connection error" : "peer closed the connection", false);
  if (phase() == LinkPhase::flushing) finish_close();
}

void Link::on_written(size_t n, int err) {
  EntryGuard g(this);
  if (err) {
    if (phase() < LinkPhase::flushing) {
      // The peer went away (a reset answering our write, typically a
      // window update crossing its close). What it sent before still sits
      // in the receive queue: its streams' FINs and its close_notify finish
      // drained streams instead of cutting them.
      write_failed_ = true;
      if (tcp_) tcp_->read_pending();
      if (phase() == LinkPhase::detached || try_detach("write to peer failed")) return;
      if (phase() < LinkPhase::flushing) close("write to peer failed", false);
    }
    if (phase() == LinkPhase::detached) return;
    finish_close();
    return;
  }
  out_queue().pop(n);
  core_.counters().bytes_out += n;
  pump_write();
  if (phase() == LinkPhase::flushing && out_queue().empty()) {
    finish_close();
    return;
  }
  if (was_congested_ && core_.record() && core_.record()->state().output.size() <= limits_.output_high_water / 2) {
    was_congested_ = false;
    wake_bridges();
    flush();
  }
}

void Link::handshake_input(std::span<const uint8_t> data) {
  if (!data.empty()) handshake_->feed(data);
  tls::HandshakeStatus st = handshake_->step();
  if (st == tls::HandshakeStatus::failed) {
    spdlog::info("tunnel {}: TLS handshake failed: {}", peer_, handshake_->error());
    on_handshake_failed();
    close("TLS handshake failed", false);
    return;
  }
  if (st == tls::HandshakeStatus::done) {
    become_secure();
    return;
  }
  pump_write();
}

void Link::become_secure() {
  if (client_session_) handshake_->save_session(*client_session_);
  tls::PeerInfo peer = handshake_->peer();
  core_.secure(handshake_->finish(), peer);
  handshake_.reset();
  spdlog::debug("tunnel {}: TLS established ({}{})", peer_, peer.suite_name, peer.resumed ? ", resumed" : "");
  on_secure();
  // Records that arrived right behind the Finished message.
  if (phase() == LinkPhase::awaiting_hello || phase() == LinkPhase::serving) record_input({});
  flush();
}

void Link::record_input(std::span<const uint8_t> data) {
  InputResult r = core_.input(data, g_scratch);
  switch (r.status) {
    case InputStatus::ok: break;
    case InputStatus::protocol_error:
      spdlog::info("tunnel {}: yamux protocol error: {}", peer_, r.reason);
      cut("protocol_error", "protocol error");  // Go Away(1) is already queued
      return;
    case InputStatus::closed:
      peer_closed_cleanly_ = true;
      close("peer sent close_notify", false);
      return;
    case InputStatus::tls_error:
      spdlog::info("tunnel {}: TLS record error: {}", peer_, r.reason);
      if (try_detach("TLS record error")) return;
      cut("tls_error", r.reason);  // the alert, if one is due, is sealed
      return;
  }
  if (hand_to_ && phase() == LinkPhase::awaiting_hello) {
    // Nothing of the setup session goes out after this: its last frame
    // (the server's RESUMED) is sealed already, and what it queued since
    // (a window update for the bytes just read) would land in the resumed
    // session's stream. It is dropped with the setup link.
    Link* old = hand_to_;
    hand_to_ = nullptr;
    old->resume_from(*this, hand_received_);
    return;
  }
  if (phase() == LinkPhase::awaiting_hello || phase() == LinkPhase::serving) on_input();
  flush();
}

void Link::close_bridges() {
  auto bridges = std::move(bridges_);
  bridges_.clear();
  // docs/protocol.md 6: after Go Away the peer processes no new stream, and a
  // clean close (close_notify) comes after everything it did send: streams
  // it has not ACKed by then were never processed.
  bool refused = peer_closed_cleanly_ && core_.session() && core_.session()->go_away_received();
  for (auto& [id, b] : bridges)
    if (!(refused && b->try_replay())) b->link_closing();
  for (auto& [id, b] : bridges) graveyard_.push_back(std::move(b));
  if (depth_ == 0) graveyard_.clear();
}

void Link::close(const char* reason, bool go_away, mux::GoAwayCode code) {
  EntryGuard g(this);
  if (phase() >= LinkPhase::flushing) return;
  spdlog::debug("tunnel {}: closing: {}", peer_, reason);
  on_closed(reason);
  close_bridges();
  mux::Session* ses = core_.session();
  if (ses && go_away && !ses->go_away_sent() && !ses->failed()) ses->go_away(code);
  // Closing from here on: flush() must not see the link as open, or its
  // "peer is not reading" check would close it again, recursively, as long
  // as the peer's queue is over the mark (a stack overflow).
  core_.set_phase(LinkPhase::flushing);
  flush();
  if (core_.record()) {
    core_.record()->seal_alert(tls::alert::close_notify, false);
  }
  if (tcp_) tcp_->stop_read();
  flush_deadline_ms_ = uv_now(loop_) + limits_.flush_timeout_ms;
  pump_write();
  if (!tcp_ || (!tcp_->writing() && out_queue().empty())) finish_close();
  else rearm_timer();
}

void Link::cut(const char* label, const char* why, bool go_away, mux::GoAwayCode code) {
  on_cut(label);
  close(why, go_away, code);
}

void Link::finish_close(bool reset) {
  if (phase() == LinkPhase::closed) return;
  core_.set_phase(LinkPhase::closed);
  if (tcp_) {
    tcp_->close(reset);
    tcp_ = nullptr;
  }
  uv_timer_stop(timer_);
}

void Link::rearm_timer() {
  if (phase() == LinkPhase::closed) return;
  uint64_t deadline = 0;
  switch (phase()) {
    case LinkPhase::awaiting_handshake:
    case LinkPhase::awaiting_hello: deadline = core_.started_ms() + limits_.handshake_timeout_ms; break;
    case LinkPhase::serving: deadline = core_.last_rx_ms() + limits_.idle_timeout_ms; break;
    case LinkPhase::detached: deadline = detached_ms_ + limits_.resume_window_ms; break;
    case LinkPhase::flushing: deadline = flush_deadline_ms_; break;
    case LinkPhase::closed: return;
  }
  // A closing link only waits for its last bytes: role deadlines (drain
  // grace, heartbeats) are over, and a past one would re-fire at once forever.
  uint64_t role = phase() < LinkPhase::flushing ? role_deadline() : 0;
  if (role && role < deadline) deadline = role;
  uint64_t now = uv_now(loop_);
  uv_timer_start(timer_, timer_cb, deadline > now ? deadline - now : 0, 0);
}

void Link::timer_cb(uv_timer_t* t) {
  Link* l = static_cast<Link*>(t->data);
  EntryGuard g(l);
  uint64_t now = uv_now(l->loop_);
  switch (l->phase()) {
    case LinkPhase::awaiting_handshake:
    case LinkPhase::awaiting_hello:
      if (now >= l->core_.started_ms() + l->limits_.handshake_timeout_ms) {
        spdlog::info("tunnel {}: handshake timeout ({} ms)", l->peer_, l->limits_.handshake_timeout_ms);
        if (l->phase() == LinkPhase::awaiting_handshake) l->on_handshake_failed();
        l->cut("handshake_timeout", "handshake timeout");
        return;
      }
      break;
    case LinkPhase::serving:
      if (now >= l->core_.last_rx_ms() + l->limits_.idle_timeout_ms) {
        spdlog::info("tunnel {}: idle timeout ({} ms)", l->peer_, l->limits_.idle_timeout_ms);
        if (l->try_detach("idle timeout")) return;
        l->cut("idle_timeout", "idle timeout", true);
        return;
      }
      break;
    case LinkPhase::detached:
      if (now >= l->detached_ms_ + l->limits_.resume_window_ms) {
        spdlog::info("tunnel {}: not resumed within {} ms; its streams are reset", l->peer_,
                     l->limits_.resume_window_ms);
        l->on_detach_expired();
        l->close("resume window ended", false);
        return;
      }
      break;
    case LinkPhase::flushing:
      if (now >= l->flush_deadline_ms_) {
        // The peer did not take the last bytes (it is not reading, or reads
        // slower than a trickle): the stream is truncated either way, so
        // reset rather than leave an orphaned socket holding the rest.
        size_t unsent = (l->core_.record() || l->handshake_ ? l->out_queue().size() : 0) + (l->tcp_ ? l->tcp_->unsent() : 0);
        spdlog::info("tunnel {}: {} bytes not taken within {} ms of closing; resetting the connection", l->peer_,
                     unsent, l->limits_.flush_timeout_ms);
        l->on_flush_timeout();
        l->finish_close(true);
        return;
      }
      break;
    case LinkPhase::closed: return;
  }
  uint64_t role = l->phase() < LinkPhase::flushing ? l->role_deadline() : 0;
  if (role && now >= role) l->on_role_deadline();
  l->rearm_timer();
}

bool Link::resumable() const {
  const mux::Session* s = core_.session();
  return phase() == LinkPhase::serving && core_.resume_log().keeping() && s && !s->go_away_sent() &&
         !s->go_away_received() && !s->failed() && !peer_closed_cleanly_;
}

bool Link::try_detach(const char* why) {
  if (!resumable() || !on_break(why)) return false;
  detach(why);
  return true;
}

void Link::detach(const char* why) {
  EntryGuard g(this);
  spdlog::info("tunnel {}: connection lost ({}); session kept {} ms for a resume ({} bytes kept)", peer_, why,
               limits_.resume_window_ms, core_.resume_log().kept());
  if (tcp_) {
    tcp_->close(true);  // the peer is gone or going: nothing it has not taken will reach it here
    tcp_ = nullptr;
  }
  handshake_.reset();
  core_.detach();
  write_failed_ = false;
  was_congested_ = false;
  detached_ms_ = uv_now(loop_);
  rearm_timer();
}

void Link::hand_session_to(Link& old, uint64_t peer_received) {
  hand_to_ = &old;
  hand_received_ = peer_received;
  core_.hold_input();
}

void Link::resume_from(Link& setup, uint64_t peer_received) {
  EntryGuard g(this);
  if (!core_.attach(setup.core_.release_record(), peer_received)) return;  // precondition: can_resume_from
  tcp_ = setup.tcp_;
  setup.tcp_ = nullptr;
  tcp_->set_handler(this);
  // The setup link ends without a word: the connection is this session's now.
  setup.core_.set_phase(LinkPhase::closed);
  uv_timer_stop(setup.timer_);
  peer_ = tcp_->peer_address();
  core_.received(0, uv_now(loop_));
  tcp_->start_read();
  // The replay is sealed already; what the bridges write now follows it.
  wake_bridges();
  flush();
  rearm_timer();
  on_reattached();
  // The peer's records that came behind the setup session's last one.
  if (phase() == LinkPhase::serving && core_.record() && core_.record()->has_input()) record_input({});
}

void Link::write_control(const std::vector<uint8_t>& msg) {
  size_t n = session().write(1, msg);
  // The control stream's window is 256 KiB and a handful of small messages
  // go on it; a peer that never returns credit loses them.
  if (n < msg.size()) spdlog::warn("tunnel {}: control stream window exhausted", peer_);
}

void Link::send_control(const std::vector<uint8_t>& msg) {
  write_control(msg);
  flush();
}

void Link::write_receipt(uint64_t now) {
  last_receipt_ms_ = now;
  std::vector<uint8_t> msg;
  mux::encode(mux::Received{core_.resume_log().take_receipt()}, msg);
  write_control(msg);
}

// A receipt rides on output that goes anyway (one more frame in the same
// record, no write of its own) once anything arrived and kPiggybackMs
// passed: what the peer keeps for a resume, and what a hot restart moves,
// stays near what is in flight instead of a second's worth of traffic.
void Link::piggyback_receipt() {
  ResumeLog& log = core_.resume_log();
  if (phase() != LinkPhase::serving || !log.keeping() || core_.session()->output().empty() ||
      !log.receipt_due(true))
    return;
  const uint64_t now = uv_now(loop_);
  if (now < last_receipt_ms_ + kPiggybackMs && !log.receipt_due()) return;
  write_receipt(now);  // sealed by the flush under way
}

void Link::send_receipt_if_due() {
  ResumeLog& log = core_.resume_log();
  if (phase() != LinkPhase::serving || !log.keeping()) return;
  const uint64_t now = uv_now(loop_);
  if (!log.receipt_due() && !(log.receipt_due(true) && now >= last_receipt_ms_ + 1000)) return;
  write_receipt(now);
  flush();
}

bool Link::take_receipt(uint64_t offset) {
  ResumeLog& log = core_.resume_log();
  const bool was_full = output_budget() == 0;
  if (log.acknowledge(offset) == ResumeLog::Ack::beyond_sent) {
    spdlog::info("tunnel {}: RECEIVED {} is beyond the {} bytes sent", peer_, offset, log.sent());
    cut("protocol_error", "RECEIVED beyond what was sent", true, mux::GoAwayCode::protocol_error);
    return false;
  }
  if (was_full && output_budget() > 0) wake_bridges();
  return true;
}

// A bridge may finish (and be removed) while it catches up: walk ids.
void Link::wake_bridges() {
  std::vector<uint32_t> ids;
  ids.reserve(bridges_.size());
  for (auto& [id, b] : bridges_) ids.push_back(id);
  for (uint32_t id : ids)
    if (Bridge* b = bridge(id)) b->link_decongested();
}

void Link::add_bridge(uint32_t id, std::unique_ptr<Bridge> b) {
  core_.counters().streams_opened++;
  bridges_[id] = std::move(b);
}

Bridge* Link::bridge(uint32_t id) {
  auto it = bridges_.find(id);
  return it == bridges_.end() ? nullptr : it->second.get();
}

void Link::remove_bridge(uint32_t id) {
  auto it = bridges_.find(id);
  if (it == bridges_.end()) return;
  graveyard_.push_back(std::move(it->second));
  bridges_.erase(it);
  if (core_.session() && core_.session()->go_away_received() && bridges_.empty() && phase() == LinkPhase::serving)
    close("peer sent Go Away and its last stream ended", false);
  else if (bridges_.empty() && phase() == LinkPhase::serving)
    on_last_bridge_gone();
}

// --- mux::SessionHandler ---

void Link::on_stream_opened(uint32_t id) { on_peer_stream(id); }

void Link::on_stream_data(uint32_t id) {
  if (id == 1) on_control_data();
  else if (Bridge* b = bridge(id)) b->stream_data();
}

void Link::on_stream_fin(uint32_t id) {
  if (id == 1) close("control stream closed by peer", true);
  else if (Bridge* b = bridge(id)) b->stream_fin();
}

void Link::on_stream_reset(uint32_t id) {
  core_.counters().streams_reset++;
  if (id == 1) {
    close("control stream reset by peer", true);
    return;
  }
  if (Bridge* b = bridge(id)) {
    // After Go Away the peer resets new streams unprocessed (docs/protocol.md 6),
    // and at any time those beyond its limits (peer_refused).
    if (!(core_.session() && (core_.session()->go_away_received() || peer_refused(id)) && b->try_replay())) {
      if (b->on_reset) b->on_reset(*b, "client");
      b->stream_gone(true);
    }
    remove_bridge(id);
  }
}

void Link::on_stream_writable(uint32_t id) {
  if (Bridge* b = bridge(id)) b->stream_writable();
}

void Link::on_stream_closed(uint32_t id) {
  if (Bridge* b = bridge(id)) {
    b->stream_gone(false);
    remove_bridge(id);
  }
}

void Link::on_go_away(mux::GoAwayCode code) {
  spdlog::debug("tunnel {}: peer sent Go Away ({})", peer_, uint32_t(code));
  if (bridges_.empty()) close("peer sent Go Away", false);
}

}  // namespace baton::proxy

// --- handoff ---

namespace baton::proxy {

void close_fds(TunnelState& st) {
  if (st.fd >= 0) ::close(st.fd);
  st.fd = -1;
  for (BridgeState& b : st.bridges) {
    if (b.fd >= 0) ::close(b.fd);
    b.fd = -1;
  }
}

Link::Link(uv_loop_t* loop, tls::Context& tls_ctx, mux::Role role, const LinkLimits& limits, TunnelState& st,
           std::string& error)
    : loop_(loop), tcp_(nullptr), timer_(new uv_timer_t), tls_ctx_(tls_ctx), client_session_(nullptr), role_(role),
      limits_(limits), core_(role, *this, limits.max_streams, uv_now(loop)) {
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  if (st.phase == LinkPhase::detached) {
    // A session waiting for its resume: no connection to adopt.
    const uint64_t now = uv_now(loop_);
    detached_ms_ = now > st.resume.detached_ms ? now - st.resume.detached_ms : 0;
    peer_ = "(detached)";
  } else {
    tcp_ = net::Tcp::create(loop_, this);
    int err = tcp_->open_fd(st.fd);
    if (err != 0) {
      error = std::string("cannot adopt the client socket: ") + uv_strerror(err);
      close_fds(st);
      core_.set_phase(LinkPhase::closed);
      return;
    }
    st.fd = -1;
    tcp_->set_read_size(256 * 1024);
    peer_ = tcp_->peer_address();
  }
  core_ = LinkCore(st, *this, limits_.max_streams, uv_now(loop_));
  for (BridgeState& bs : st.bridges) {
    std::string berr;
    auto b = std::make_unique<Bridge>(*this, bs, berr);
    if (!berr.empty()) {
      // One stream cannot be adopted: it is reset, the tunnel goes on.
      spdlog::warn("tunnel {}: stream {}: {}", peer_, bs.id, berr);
      if (session().has_stream(bs.id)) session().reset(bs.id);
      continue;
    }
    bridges_[bs.id] = std::move(b);
  }
  st.bridges.clear();
}

void Link::start_adopted() {
  EntryGuard g(this);
  if (phase() == LinkPhase::closed) return;
  if (tcp_) tcp_->start_read();
  std::vector<uint32_t> ids;
  for (auto& [id, b] : bridges_) ids.push_back(id);
  for (uint32_t id : ids)
    if (Bridge* b = bridge(id)) b->start_adopted();
  if (congested()) was_congested_ = true;
  flush();
  rearm_timer();
}

void Link::abandon() {
  for (auto& [id, b] : bridges_) b->abandon();
  bridges_.clear();
  graveyard_.clear();
  if (tcp_) tcp_->close(false);
  tcp_ = nullptr;
  core_.set_phase(LinkPhase::closed);
  uv_timer_stop(timer_);
}

bool Link::export_link(TunnelState& out) {
  size_t written = 0;
  if (tcp_) {
    tcp_->stop_read();
    int fd = tcp_->release(written);
    if (fd < 0) {
      tcp_->start_read();
      return false;
    }
    tcp_ = nullptr;
    out.fd = fd;
  } else {
    out.fd = -1;  // detached
    const uint64_t now = uv_now(loop_);
    out.resume.detached_ms = now - std::min(now, detached_ms_);
  }
  for (auto& [id, b] : bridges_) {
    BridgeState bs;
    b->export_state(bs);
    out.bridges.push_back(std::move(bs));
  }
  bridges_.clear();
  graveyard_.clear();
  core_.export_into(out, written, uv_now(loop_));
  uv_timer_stop(timer_);
  return true;
}

}  // namespace baton::proxy
