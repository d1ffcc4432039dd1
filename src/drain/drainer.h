// Drainer: what `baton serve` does when its pod goes away (docs/protocol.md 6,
// docs/operations.md "Drain").
//
//   start      readiness 503 at once; new tunnels get REJECT 4 (draining)
//   notifying  DRAIN (reason, grace, reconnect hint) + Go Away to every live
//              tunnel, spread evenly over drain.spread_ms so thousands of
//              clients do not reconnect in the same millisecond; streams
//              already open go on, new ones are reset
//   delay      the listener keeps accepting for drain.delay_ms (the endpoint
//              is removed asynchronously), then closes
//   waiting    each tunnel closes when its last stream ends, or at grace
//   done       no tunnel left after the delay, or drain.grace_ms since start:
//              on_done fires (the caller exits)
//
// Triggers: POST /drain, `baton drain`, SIGTERM. Starting twice is a no-op.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>

#include "config/config.h"
#include "proxy/server.h"

namespace baton::drain {

using proxy::DrainPhase;  // declared with the server, which reports it

class Drainer {
 public:
  // `on_done(why)` runs once, on the loop, when the drain is over.
  // `server` must outlive the drainer: the drainer registers itself with it
  // (Server::set_on_tunnel_gone) and takes that back when destroyed.
  Drainer(uv_loop_t* loop, proxy::Server& server, const config::Drain& settings,
          std::function<void(const std::string& why)> on_done);
  ~Drainer();
  Drainer(const Drainer&) = delete;
  Drainer& operator=(const Drainer&) = delete;

  void start(const std::string& trigger);
  // Stops the timer (the process is exiting some other way).
  void stop();
  DrainPhase phase() const { return phase_; }

 private:
  static void tick_cb(uv_timer_t* t);
  void tick();
  // When tick() must run next, in ms since the start (> elapsed): the next
  // notice, the end of drain.delay_ms, or the end of grace. A tunnel that
  // ends calls tick() through the server's on_tunnel_gone.
  uint64_t next_deadline(uint64_t elapsed) const;
  void finish(const std::string& why);

  uv_loop_t* loop_;
  proxy::Server& server_;
  config::Drain settings_;
  std::function<void(const std::string&)> on_done_;
  uv_timer_t* timer_;
  DrainPhase phase_ = DrainPhase::idle;
  uint64_t started_ms_ = 0;
  size_t to_notify_ = 0;   // tunnels serving when the drain started
  size_t notified_ = 0;
  bool listener_closed_ = false;
};

}  // namespace baton::drain
