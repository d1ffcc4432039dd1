// Child: the new process's side of a hot restart (see parent.h for the
// sequence). It builds its Server from the old process's state (ticket keys,
// counters, epoch + 1), accepts on the inherited listener, adopts each batch
// of tunnels without starting any I/O, acknowledges it, and starts them all
// when the old process commits.
//
// If the old process aborts, the adopted tunnels are let go quietly (the old
// process still holds and resumes them) and done(false) fires. If the old
// process disappears without a word after handing over tunnels, it cannot
// resume them, so this process starts them and carries on.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "handoff/channel.h"
#include "proxy/server.h"

namespace baton::handoff {

enum class ChildPhase : uint8_t {
  awaiting_server_state = 0,
  awaiting_tunnels = 1,  // listening; batches arrive until commit
  done = 2,
  failed = 3,
};
const char* to_str(ChildPhase p);

struct ChildResult {
  bool ok = false;
  std::string error;
  int old_pid = 0;
  uint64_t tunnels = 0;   // adopted and started
  uint64_t batches = 0;
  uint64_t elapsed_ms = 0;
  // Not ok because the old process went away (its end of the socket closed,
  // no abort) before handing anything over: nobody serves any more, so the
  // caller may start fresh instead of failing.
  bool old_gone = false;
  // Not ok because the process on the socket belongs to another user.
  bool foreign = false;
  // abandon() was called. If ok all the same, the old process had committed
  // before it read our abort (or went away): the tunnels are this process's.
  bool abandoned = false;
};

class Child {
 public:
  using MakeServer = std::function<std::unique_ptr<proxy::Server>(const std::vector<tls::TicketKey>& inherited, std::string& error)>;
  // Takes `fd`, connected to the old process's handoff socket.
  // `timeout_ms` bounds every wait for the old process.
  Child(uv_loop_t* loop, int fd, uint32_t timeout_ms, MakeServer make_server, std::function<void(const ChildResult&)> done);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  // After done(ok): the server, serving every adopted tunnel.
  std::unique_ptr<proxy::Server> take_server() { return std::move(server_); }
  ChildPhase phase() const { return phase_; }

  // The caller wants out (SIGTERM or SIGINT during the takeover). Before any
  // tunnel has arrived: abort and done(false) at once. After: stop accepting,
  // send abort, take no further batch, and keep what was adopted until the
  // old process answers, because its commit may already be on the way:
  //   its abort  -> it resumed everything: let go, done(false)
  //   commit     -> the tunnels are ours: start them, done(ok)
  //   silence    -> it is gone and cannot resume them: start them, done(ok)
  // result.abandoned tells the caller to stop (drain) once it has them.
  void abandon(const std::string& why);

 private:
  void on_message(Message& m);
  void on_closed(const std::string& why);
  void handle_server_state(Message& m);
  void handle_batch(Message& m);
  void handle_commit(Message& m);
  void finish(bool ok, const std::string& error);
  void give_up(const std::string& why, bool tell_peer);
  static void timer_cb(uv_timer_t* t);

  uv_loop_t* loop_;
  Channel* channel_;
  uv_timer_t* timer_;
  uint32_t timeout_ms_;
  MakeServer make_server_;
  std::function<void(const ChildResult&)> done_;
  std::unique_ptr<proxy::Server> server_;
  std::vector<proxy::Tunnel*> adopted_;  // not started until commit
  ChildPhase phase_ = ChildPhase::awaiting_server_state;
  bool abandoning_ = false;  // abort sent, waiting for the old process's answer
  std::string abandon_why_;
  ChildResult result_;
  proxy::Metrics base_metrics_;  // the old process's metrics when this one took them
  uint64_t started_ms_;
};

}  // namespace baton::handoff
