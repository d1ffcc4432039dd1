// Link: one TLS connection carrying one yamux session; the part of a tunnel
// that is the same on the server and the client.
//
//   peer TCP <-> Tcp <-> (Handshake | RecordLayer) <-> mux::Session <-> Bridges
//
// A Link owns its Tcp, its handshake or record layer, its session and one
// Bridge per data stream. The role-specific part (server: HELLO and routes;
// client: HELLO and local forwarders) derives from it and implements the
// virtual hooks.
//
// Lifetime: libuv callbacks enter through Link methods; a Link that decides
// to die marks itself dead and is deleted when the outermost callback
// returns (EntryGuard), never in the middle of its own call stack.
#pragma once

#include <uv.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mux/session.h"
#include "net/tcp.h"
#include "proxy/link_core.h"
#include "proxy/state.h"
#include "tls/handshake.h"
#include "tls/record.h"

namespace baton::proxy {

class Bridge;

// What the link is waiting for (ARCHITECTURE principle 3).

struct LinkLimits {
  uint32_t max_streams = 1024;
  uint32_t handshake_timeout_ms = 10000;
  uint32_t idle_timeout_ms = 300000;
  // Queued TLS bytes to the peer before bridges stop feeding the session.
  // Bridges write only within what is left of it, so legitimate output stays
  // near this mark; output above 4x it can only come from a peer that keeps
  // sending frames needing replies (SYNs to refuse, pings) without reading,
  // and that tunnel is closed.
  uint32_t output_high_water = 1 << 20;
  // How long a closing link waits for the peer to take its last bytes; then
  // the connection is reset (an orphaned socket would otherwise hold up to
  // the kernel's send buffer for minutes for a peer that reads nothing).
  uint32_t flush_timeout_ms = 2000;
  // Session resume (docs/protocol.md 9): how long a detached session waits
  // for its client, and the bytes kept for it (sent, not proved received,
  // plus queued) beyond which bridges stop feeding the session.
  uint32_t resume_window_ms = 30000;
  uint32_t resume_buffer_bytes = 1u << 20;
};

class Link : public net::TcpHandler, public mux::SessionHandler {
 public:
  // Takes ownership of `tcp` (connected). `tls_ctx` outlives the link.
  Link(uv_loop_t* loop, net::Tcp* tcp, tls::Context& tls_ctx, mux::Role role, const LinkLimits& limits,
       const std::string& server_name = "", tls::ClientSession* resume = nullptr);
  ~Link() override;

  // Starts reading (and, as a client, sends the ClientHello).
  void start();
  // Ends the link: resets bridges, optionally sends Go Away, then close_notify,
  // flushes and closes TCP. Safe to call more than once and from any hook.
  void close(const char* reason, bool go_away = true, mux::GoAwayCode code = mux::GoAwayCode::normal);

  LinkPhase phase() const { return core_.phase(); }
  mux::Session& session() { return *core_.session(); }
  const mux::Session& session() const { return *core_.session(); }
  uv_loop_t* loop() const { return loop_; }
  const std::string& peer() const { return peer_; }
  // This end's address of the TCP connection ("" once closed).
  std::string local_address() const { return tcp_ ? tcp_->local_address() : ""; }
  const LinkCounters& counters() const { return core_.counters(); }
  const LinkLimits& limits() const { return limits_; }
  // uv_now() of the last bytes received from the peer.
  uint64_t last_rx_ms() const { return core_.last_rx_ms(); }
  bool congested() const;  // TLS output above the high-water mark
  // Bytes bridges may still write into the session before the link is congested.
  size_t output_budget() const;
  size_t bridge_count() const { return bridges_.size(); }
  // Session resume (docs/protocol.md 9): bytes kept for the peer.
  size_t resume_kept() const { return core_.resume_log().kept(); }
  // uv_now() when the connection broke (phase detached).
  uint64_t detached_ms() const { return detached_ms_; }

  // Seals what the session queued and writes. Called by bridges after they
  // wrote into the session; cheap when there is nothing to do.
  void flush();

  // Bridges register here; the link owns them.
  void add_bridge(uint32_t id, std::unique_ptr<Bridge> b);
  Bridge* bridge(uint32_t id);
  // Drops the bridge object (its Tcp must already be closed).
  void remove_bridge(uint32_t id);

  // Handoff, old process: true when the link can move (TLS done, not closing).
  // A detached session moves too (in a state layout that carries one).
  bool exportable() const {
    return phase() == LinkPhase::awaiting_hello || phase() == LinkPhase::serving || phase() == LinkPhase::detached;
  }
  // Starts I/O on a link built from exported state (see the protected constructor).
  void start_adopted();
  // Handoff, adopting process, handoff called off: lets go of the sockets
  // without a word to any peer (another process still holds them) and marks
  // the link closed; the caller deletes it.
  void abandon();

  // Keeps the link alive across a callback (see class comment).
  class EntryGuard {
   public:
    explicit EntryGuard(Link* l) : l_(l) { ++l_->depth_; }
    ~EntryGuard();
   private:
    Link* l_;
  };

 protected:
  // Handoff, adopting process: rebuilds a link from `st`, taking ownership of
  // its fds (they are -1 in `st` afterwards). No I/O happens until
  // start_adopted(). On failure `error` is set and the link is closed (the
  // caller deletes it); every fd is closed then.
  Link(uv_loop_t* loop, tls::Context& tls_ctx, mux::Role role, const LinkLimits& limits, TunnelState& st,
       std::string& error);
  // Handoff, old process: stops all I/O and moves the link into `out` (the
  // sockets duplicated, unsent bytes as bytes). Precondition: exportable()
  // and not inside one of the link's callbacks. Returns false (link
  // untouched) when the socket cannot be duplicated. Afterwards the link is
  // closed with nothing attached; the caller deletes it.
  [[nodiscard]] bool export_link(TunnelState& out);
  const std::map<uint32_t, std::unique_ptr<Bridge>>& bridges() const { return bridges_; }
  // Ends every bridge now. A role's destructor calls it, so that bridge
  // hooks into the role run while the role still exists.
  void end_bridges() { close_bridges(); }

  // Role hooks.
  virtual void on_secure() = 0;                              // handshake done (RecordLayer ready)
  virtual void on_control_data() = 0;                        // inbound bytes on stream 1
  virtual void on_peer_stream(uint32_t id) = 0;              // peer opened a stream other than 1
  virtual void on_closed(const char* reason) { (void)reason; }  // the link is going away
  // Deadline of the role (0 = none), in uv_now() ms; the link arms one timer
  // for the earliest of this, its own handshake/idle deadlines.
  virtual uint64_t role_deadline() const { return 0; }
  virtual void on_role_deadline() {}
  // The last data stream of the link ended.
  virtual void on_last_bridge_gone() {}
  // A batch of the peer's records was handled (the link is still open).
  virtual void on_input() {}
  // The session refused a stream: max_streams reached.
  virtual void on_streams_limit() {}
  // The peer reset stream `id` (no Go Away received): true when the role
  // knows the peer refused it without processing any of it (the client:
  // docs/protocol.md 4, refused streams); the bridge is then offered
  // Bridge::try_replay() as after Go Away.
  virtual bool peer_refused(uint32_t id) const { (void)id; return false; }
  // The TLS handshake failed or timed out (close follows).
  virtual void on_handshake_failed() {}
  // A closing link's last bytes were not taken within flush_timeout_ms: the
  // connection is reset (the link logs how many bytes were dropped).
  virtual void on_flush_timeout() {}
  // The session gave up `n` unused peer stream ids (mux::SessionHandler::on_ids_given_up).
  virtual void on_stream_ids_given_up(uint32_t n) { (void)n; }
  // The link is about to be cut because of what the peer did or did not do.
  // `reason` is one of a fixed set of static strings (metric label values,
  // never peer data): protocol_error, tls_error, not_reading,
  // handshake_timeout, idle_timeout. close() follows.
  virtual void on_cut(const char* reason) { (void)reason; }
  // close() because of the peer, counted through on_cut(label) first.
  void cut(const char* label, const char* why, bool go_away = false,
           mux::GoAwayCode code = mux::GoAwayCode::normal);

  void set_phase(LinkPhase p) { core_.set_phase(p); }
  // The peer's resume window (a client learns it from WELCOME or RESUMED).
  void set_resume_window(uint32_t ms) { limits_.resume_window_ms = ms; }

  // Session resume (docs/protocol.md 9).
  ResumeLog& resume_log() { return core_.resume_log(); }
  const ResumeLog& core_log() const { return core_.resume_log(); }
  // True while a break of the connection would keep the session: it keeps
  // its resume log, serves, and neither side ended it (Go Away, close_notify).
  bool resumable() const;
  // The connection broke (`why`, static text): true keeps the session (the
  // link then detaches), false closes it as without resume. Asked only when
  // resumable().
  virtual bool on_break(const char* why) { (void)why; return false; }
  // Keeps the session and its bridges, drops the socket and the TLS state;
  // phase detached until resume_from() or the window's end (on_detach_expired,
  // then close).
  void detach(const char* why);
  // The resume window ended while detached; close follows.
  virtual void on_detach_expired() {}
  // Whether resume_from(peer_received) can replay from there.
  bool can_resume_from(uint64_t peer_received) const {
    const ResumeLog& l = core_.resume_log();
    return l.keeping() && peer_received >= l.acked() && peer_received <= l.sent();
  }
  // From this link's control stream handling (its setup session): the
  // record being read is the last of the setup session (docs/protocol.md
  // 9.4). Once it is read, `old` (detached, can_resume_from(peer_received))
  // carries on over this connection (resume_from) and this link is left
  // closed without a word; the caller's callback stack deletes it.
  void hand_session_to(Link& old, uint64_t peer_received);
  // The session carries on over a new connection (after resume_from).
  virtual void on_reattached() {}
  // A break: detaches if the session is resumable and the role keeps it.
  bool try_detach(const char* why);
  // docs/protocol.md 9.1: RECEIVED every 64 KiB of the peer's stream, and at
  // least once a second while anything arrived. Call after input.
  void send_receipt_if_due();
  // The peer's RECEIVED: drops what it proved it has. False when the offset
  // lies beyond what was sent: the link is cut (protocol error).
  bool take_receipt(uint64_t offset);
  // Writes a control message on stream 1 and flushes.
  void send_control(const std::vector<uint8_t>& msg);
  // Writes it without flushing (from inside a flush, or before one).
  void write_control(const std::vector<uint8_t>& msg);
  // Wakes the bridges after output room appeared (a receipt, a resume).
  void wake_bridges();
  void rearm_timer();
  const tls::Handshake* handshake() const { return handshake_.get(); }
  const tls::PeerInfo& peer_info() const { return core_.peer_info(); }
  tls::RecordLayer* record() { return core_.record(); }

 private:
  // net::TcpHandler
  void on_read(std::span<const uint8_t> data) override;
  void on_read_end(int err) override;
  void on_written(size_t n, int err) override;
  // mux::SessionHandler
  void on_stream_opened(uint32_t id) override;
  void on_stream_data(uint32_t id) override;
  void on_stream_fin(uint32_t id) override;
  void on_stream_reset(uint32_t id) override;
  void on_stream_writable(uint32_t id) override;
  void on_stream_closed(uint32_t id) override;
  void on_go_away(mux::GoAwayCode code) override;
  void on_ids_given_up(uint32_t n) override { on_stream_ids_given_up(n); }
  void on_stream_refused(uint32_t id, bool after_go_away) override {
    (void)id;
    if (!after_go_away) on_streams_limit();
  }

  void handshake_input(std::span<const uint8_t> data);
  void record_input(std::span<const uint8_t> data);
  void become_secure();
  // Closes TCP; `reset` aborts it (RST, the kernel drops what it still holds).
  void finish_close(bool reset = false);
  void close_bridges();
  bool peer_closed_cleanly_ = false;  // close_notify received
  void pump_write();
  util::ByteQueue& out_queue();
  static void timer_cb(uv_timer_t* t);

  uv_loop_t* loop_;
  net::Tcp* tcp_;
  uv_timer_t* timer_;
  tls::Context& tls_ctx_;
  std::unique_ptr<tls::Handshake> handshake_;
  tls::ClientSession* client_session_;  // client: offered for resumption, then refreshed
  mux::Role role_;
  std::map<uint32_t, std::unique_ptr<Bridge>> bridges_;
  std::vector<std::unique_ptr<Bridge>> graveyard_;  // removed while their own call was on the stack
  LinkLimits limits_;
  LinkCore core_;  // record layer, session, phase, counters: what a hand-over moves
  std::string peer_;
  uint64_t flush_deadline_ms_ = 0;
  int depth_ = 0;
  bool was_congested_ = false;
  bool write_failed_ = false;  // the peer is gone: nothing more is written
  uint64_t detached_ms_ = 0;
  uint64_t last_receipt_ms_ = 0;
  static constexpr uint64_t kPiggybackMs = 50;
  void piggyback_receipt();
  void write_receipt(uint64_t now);  // RECEIVED with what arrived so far
  Link* hand_to_ = nullptr;  // hand_session_to(): the session this connection goes to
  uint64_t hand_received_ = 0;
  // Carries this detached session on over `setup`'s connection: its socket
  // and record layer, then this side's kept bytes from `peer_received`, then
  // the peer's records read past the setup session's last.
  void resume_from(Link& setup, uint64_t peer_received);
};

}  // namespace baton::proxy
