// Tunnel: the server side of one client's session (docs/protocol.md sections 3-4).
// Link does TLS, yamux and relaying; Tunnel adds HELLO/WELCOME/REJECT on the
// control stream, authentication and route lookup.
#pragma once

#include <array>
#include <map>
#include <string>

#include "mux/control.h"
#include "proxy/link.h"
#include "proxy/metrics.h"

namespace baton::proxy {

class Server;

class Tunnel : public Link {
 public:
  Tunnel(Server& server, net::Tcp* tcp);
  ~Tunnel() override;

  // Handoff: a tunnel rebuilt from exported state (see Link). Returns nullptr
  // and sets `error` if it cannot be adopted (its fds are closed then). The
  // tunnel does no I/O until start_adopted().
  static Tunnel* adopt(Server& server, TunnelState& st, std::string& error);
  // Handoff, old process: moves the tunnel into `out`; on success the tunnel
  // is deleted. Precondition: exportable().
  [[nodiscard]] static bool export_state(Tunnel* t, TunnelState& out);

  // docs/protocol.md 6: sends DRAIN and Go Away(0); streams already open go on;
  // the tunnel closes when the last one ends or after grace_ms.
  void drain(const std::string& reason, uint32_t grace_ms, const std::string& reconnect_hint);
  bool draining() const { return drain_deadline_ms_ != 0; }

  const std::array<uint8_t, 16>& session_id() const { return session_id_; }
  // Starts the TLS handshake (the server grants a handshake slot first).
  void start_handshake();
  uint64_t accepted_ms() const { return accepted_ms_; }
  // Adds the bytes relayed so far by streams still open to `m`'s byte counters.
  void add_live_bytes(Metrics& m) const;
  // Adds this tunnel's open streams per route to `m`.
  void count_routes(std::map<std::string, uint64_t>& m) const;
  const std::string& client_id() const { return client_id_; }
  // Session resume (docs/protocol.md 9): the session's latest secret and the
  // identity that authenticated it ("token NAME" or "cert SUBJECT").
  bool offers_resume() const { return offers_resume_; }

 protected:
  void on_secure() override;
  void on_control_data() override;
  void on_peer_stream(uint32_t id) override;
  void on_closed(const char* reason) override;
  // The drain's grace period, or the next look at route preambles.
  uint64_t role_deadline() const override;
  void on_streams_limit() override;
  void on_handshake_failed() override;
  void on_flush_timeout() override;
  void on_stream_ids_given_up(uint32_t n) override;
  void on_cut(const char* reason) override;
  void on_role_deadline() override;
  void check_preambles(uint64_t now);
  void on_last_bridge_gone() override;
  bool on_break(const char* why) override;
  void on_detach_expired() override;
  void on_input() override;

 private:
  Tunnel(Server& server, TunnelState& st, std::string& error);
  void route_stream(Bridge& b, const std::string& route);
  void install_hooks(Bridge& b);
  void release_handshake_slot();
  void set_counted(bool on);
  void handle_hello(const struct HelloView& h);
  void reject(uint16_t code, const std::string& reason);
  // A resuming HELLO (docs/protocol.md 9.4): true when this connection now
  // carries that session (this tunnel is done); false with `refused` and
  // `code` set when a fresh session is to be started instead.
  bool try_resume(const mux::ResumeRequest& r, const std::string& identity, std::string& refused,
                  mux::ResumeRefusedCode& code);
  void set_detached_counted(bool on);

  Server& server_;
  std::array<uint8_t, 16> session_id_{};
  std::string client_id_;
  bool control_open_ = false;
  bool counted_ = false;
  // Session resume: offered in WELCOME; the credential and identity it is bound to.
  bool offers_resume_ = false;
  bool detached_counted_ = false;
  mux::ResumeSecret resume_secret_{};
  std::string identity_;
  uint64_t drain_deadline_ms_ = 0;
  // Route preambles (check_preambles): when to look next (0: no stream waits
  // for one), and the first look's time while a second look is pending.
  uint64_t preamble_check_ms_ = 0;
  uint64_t preamble_cutoff_ms_ = 0;
  uint64_t accepted_ms_ = 0;
  uint64_t handshake_started_ns_ = 0;
  bool holds_handshake_slot_ = false;
  // Stream-open token bucket (limits.stream_open_rate / _burst); starts full,
  // and full again after a hot restart.
  double stream_tokens_ = 0;
  uint64_t stream_tokens_ms_ = 0;
};

}  // namespace baton::proxy
