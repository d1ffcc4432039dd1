// Server: `baton serve`. One libuv loop; the tunnel listener, the TLS
// context, the route table and the set of live tunnels.
#pragma once

#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "config/config.h"
#include "net/listener.h"
#include "proxy/link.h"
#include "proxy/state.h"
#include "tls/context.h"

namespace baton::proxy {

class Tunnel;

struct ServerCounters {
  uint64_t tunnels_accepted = 0;
  uint64_t tunnels_refused_limit = 0;  // closed before TLS: max_tunnels reached
  uint64_t tunnels_established = 0;    // WELCOME sent
  uint64_t tunnels_rejected = 0;       // REJECT sent
  uint64_t handshake_failures = 0;
};

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

  const config::Config& config() const { return cfg_; }
  tls::Context& tls() { return *tls_; }
  uv_loop_t* loop() const { return loop_; }
  LinkLimits link_limits() const;
  ServerCounters& counters() { return counters_; }
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
  size_t handshaking_tunnels() const;
  size_t draining_tunnels() const;
  // Closes every tunnel still in its TLS handshake; returns how many.
  size_t close_handshaking(const char* reason);
  // Adopts an exported tunnel without starting it. nullptr + error if not.
  Tunnel* adopt(TunnelState& st, std::string& error);
  uint64_t epoch() const { return epoch_; }
  void set_epoch(uint64_t e) { epoch_ = e; }
  void set_counters(const ServerCounters& c) { counters_ = c; }

 private:
  Server(uv_loop_t* loop, const config::Config& cfg) : loop_(loop), cfg_(cfg) {}
  void on_accept(uv_stream_t* server);

  uv_loop_t* loop_;
  config::Config cfg_;
  std::string server_id_;
  std::unique_ptr<tls::Context> tls_;
  net::Listener* listener_ = nullptr;
  std::unordered_set<Tunnel*> tunnels_;
  ServerCounters counters_;
  bool stopping_ = false;
  int spare_listener_fd_ = -1;  // kept while a handoff is in progress
  uint64_t epoch_ = 0;
};

}  // namespace baton::proxy
