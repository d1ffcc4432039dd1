// Server: `baton serve`. One libuv loop; the tunnel listener, the TLS
// context, the route table and the set of live tunnels.
#pragma once

#include <uv.h>

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "config/config.h"
#include "net/listener.h"
#include "proxy/link.h"
#include "proxy/metrics.h"
#include "proxy/state.h"
#include "tls/context.h"

namespace baton::proxy {

class Tunnel;

// What the server is doing, for readiness (GET /readyz) and logs.
enum class ServeState : uint8_t {
  starting = 0,      // listeners not up yet (or a takeover in progress)
  serving = 1,
  handing_over = 2,  // a new process is taking the listener and tunnels
  draining = 3,      // POST /drain: new tunnels get REJECT 4, live ones got DRAIN
};
const char* to_str(ServeState s);

// Where a drain is (src/drain drives it; /drain, /stats and baton_drain_state
// report it). Declared here because the server reports it.
enum class DrainPhase : uint8_t {
  idle = 0,
  notifying = 1,  // sending DRAIN notices, spread over spread_ms
  waiting = 2,    // every tunnel told; waiting for their streams to end
  done = 3,
};
const char* to_str(DrainPhase p);

// One gauge value of a snapshot: series name (with labels) and value.


class Server {
 public:
  // Loads TLS material; returns nullptr and sets error on failure.
  // `inherited_ticket_keys`: the previous process's keys (hot restart).
  static std::unique_ptr<Server> create(uv_loop_t* loop, const config::Config& cfg, std::string& error,
                                        const std::vector<tls::TicketKey>& inherited_ticket_keys = {});
  ~Server();

  // Binds the tunnel listener. Returns "" or an error.
  [[nodiscard]] std::string listen();
  std::string listen_address() const;
  // Stops accepting and closes every tunnel (Go Away, close_notify).
  void stop();

  ServeState state() const { return state_; }
  void set_state(ServeState s);
  // Drain (POST /drain): readiness goes 503, new tunnels are rejected with
  // REJECT 4, live tunnels get DRAIN (docs/protocol.md 6). Idempotent.
  void start_drain();
  uint64_t drain_started_ms() const { return drain_started_ms_; }
  // The drain controller (src/drain) takes over start_drain() when installed;
  // it reports its phase here for /drain, /stats and metrics.
  void set_drain_handler(std::function<void()> fn) { drain_handler_ = std::move(fn); }
  // Called (on the loop) each time a tunnel is gone from the server.
  void set_on_tunnel_gone(std::function<void()> fn) { on_tunnel_gone_ = std::move(fn); }
  // Called each time a tunnel leaves its TLS handshake (done, failed or
  // closed), possibly from inside that tunnel's callback.
  void set_on_handshake_settled(std::function<void()> fn) { on_handshake_settled_ = std::move(fn); }
  void set_drain_phase(DrainPhase phase) { drain_phase_ = phase; }
  DrainPhase drain_phase() const { return drain_phase_; }
  // Serving tunnels not yet told to drain.
  std::vector<Tunnel*> tunnels_to_drain() const;

  // Counters plus the bytes of streams still open (so byte counters move
  // smoothly instead of jumping when a stream ends).
  Metrics metrics_snapshot() const;
  // Gauges computed now: active tunnels and streams, state, epoch, RSS,
  // how full each limit is.
  std::vector<Gauge> gauges() const;
  uint64_t started_ms() const { return started_ms_; }

  // Admission (called by tunnels).
  size_t serving_tunnels() const { return serving_; }
  size_t active_streams() const;
  // Open data streams per configured route.
  std::map<std::string, uint64_t> streams_by_route() const;
  void tunnel_serving(bool on) { on ? ++serving_ : --serving_; }
  // Session resume (docs/protocol.md 9): sessions offered resume, by
  // session_id, and how many are detached now (resume.max_detached).
  void register_session(Tunnel* t);
  void forget_session(Tunnel* t);
  Tunnel* find_session(const std::array<uint8_t, 16>& id) const;
  void tunnel_detached(bool on) { on ? ++detached_ : --detached_; }
  bool may_detach() const { return detached_ < cfg_.resume.max_detached; }
  size_t detached_sessions() const { return detached_; }
  // A tunnel left its TLS handshake (done, failed or closed): the next queued one starts.
  void handshake_finished(Tunnel* t);
  // /readyz: serving and holding an open listener (never "ready" while the
  // listener is closed: a handoff in progress, a drain, a failed resume).
  bool ready() const { return state_ == ServeState::serving && listener_ != nullptr; }
  bool accepting_paused() const { return listener_ && listener_->paused(); }

  const config::Config& config() const { return cfg_; }
  tls::Context& tls() { return *tls_; }
  uv_loop_t* loop() const { return loop_; }
  LinkLimits link_limits() const;
  Metrics& metrics() { return metrics_; }
  const Metrics& metrics() const { return metrics_; }
  size_t tunnel_count() const { return tunnels_.size(); }
  const std::string& server_id() const { return server_id_; }

  // Token check: constant time over every configured token. Returns the
  // token's name or "" when none matches.
  std::string authenticate(const std::string& token) const;

  void forget(Tunnel* t);

  // --- hot restart (src/handoff drives these) ---
  // The tunnel listener's socket, or -1.
  int listener_fd() const;
  // Accepts on a listening socket passed by the previous process. The socket
  // is used only if it is bound to the configured address; otherwise it is
  // closed and the configured address is bound. Returns "" or an error.
  [[nodiscard]] std::string adopt_listener(int fd);
  // Old process: stops accepting but keeps a duplicate of the listening
  // socket, so resume_accepting() can undo it if the handoff fails.
  void stop_accepting();
  void resume_accepting();
  // Old process, handoff committed: drops the kept duplicate.
  void release_listener();
  // Tunnels that could move now, and tunnels still in their TLS handshake.
  std::vector<Tunnel*> exportable_tunnels() const;
  // True while `t` is one of this server's tunnels (not yet deleted).
  bool has_tunnel(const Tunnel* t) const { return tunnels_.count(const_cast<Tunnel*>(t)) != 0; }
  size_t handshaking_tunnels() const;
  size_t draining_tunnels() const;
  // Closes every tunnel still in its TLS handshake; returns how many.
  size_t close_handshaking(const char* reason);
  // Adopts an exported tunnel without starting it. nullptr + error if not.
  Tunnel* adopt(TunnelState& st, std::string& error);
  uint64_t epoch() const { return epoch_; }
  void set_epoch(uint64_t e) { epoch_ = e; }
  void set_metrics(const Metrics& m) { metrics_ = m; }

 private:
  Server(uv_loop_t* loop, const config::Config& cfg);
  void on_accept(int fd);
  void on_accept_paused(bool paused, int err);
  net::Listener* make_listener();
  void start_handshake(Tunnel* t);
  static void tick_cb(uv_timer_t* t);
  void check_limits();

  uv_loop_t* loop_;
  config::Config cfg_;
  std::string server_id_;
  std::unique_ptr<tls::Context> tls_;
  net::Listener* listener_ = nullptr;
  std::unordered_set<Tunnel*> tunnels_;
  std::deque<Tunnel*> handshake_queue_;  // accepted, waiting for a handshake slot
  size_t handshaking_ = 0;               // tunnels holding a slot
  size_t serving_ = 0;                   // WELCOME sent, not closed
  size_t detached_ = 0;                  // resumable sessions whose connection broke
  std::unordered_map<std::string, Tunnel*> sessions_;  // session_id bytes -> tunnel offering resume
  uint64_t queue_refusal_logged_ms_ = 0;
  uint64_t queue_refusals_unlogged_ = 0;
  Metrics metrics_;
  ServeState state_ = ServeState::starting;
  uint64_t started_ms_ = 0;
  uint64_t drain_started_ms_ = 0;
  std::function<void()> drain_handler_;
  std::function<void()> on_tunnel_gone_;
  std::function<void()> on_handshake_settled_;
  DrainPhase drain_phase_ = DrainPhase::idle;
  uv_timer_t* tick_ = nullptr;           // once a second: limit warnings
  std::map<std::string, bool> warned_;   // limit -> above the warning threshold
  bool stopping_ = false;
  int spare_listener_fd_ = -1;  // kept while a handoff is in progress
  uint64_t epoch_ = 0;
};

}  // namespace baton::proxy
