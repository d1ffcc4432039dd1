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
#include "handoff/child_logic.h"
#include "proxy/server.h"

namespace baton::handoff {

class ServerChildHost;

// The I/O around ChildLogic (child_logic.h): the channel and a timer for
// the logic's deadline. Every decision is the logic's.
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
  std::unique_ptr<proxy::Server> take_server();
  ChildPhase phase() const { return logic_->phase(); }

  // The caller wants out (SIGTERM or SIGINT during the takeover): see
  // ChildLogic::abandon.
  void abandon(const std::string& why);

 private:
  void on_message(Message& m);
  void apply(Step s);
  void rearm();
  static void timer_cb(uv_timer_t* t);

  uv_loop_t* loop_;
  Channel* channel_;
  uv_timer_t* timer_;
  std::function<void(const ChildResult&)> done_;
  std::unique_ptr<ServerChildHost> host_;
  std::unique_ptr<ChildLogic> logic_;
};

}  // namespace baton::handoff
