// The new process's side of a hot restart as logic without I/O (see
// parent_logic.h for the idea, parent.h for the sequence). It reaches the
// server it builds through ChildHost: the real one in child.cc, a fake in
// tests/unit/handoff_logic_test.cc.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "handoff/codec.h"
#include "handoff/step.h"
#include "proxy/metrics.h"
#include "proxy/state.h"

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

// What the logic needs of the server it builds and fills.
class ChildHost {
 public:
  virtual ~ChildHost() = default;
  // Builds the server from the old process's state (ticket keys, counters,
  // epoch + 1) and listens: on `listener_fd` (taken) or anew when -1.
  // Returns "" or why it cannot.
  [[nodiscard]] virtual std::string build(const ServerStateMsg& s, int listener_fd) = 0;
  virtual void stop_accepting() = 0;
  virtual void resume_accepting() = 0;
  // How many more tunnels the limits allow (max_tunnels), and the limit.
  virtual size_t room() const = 0;
  virtual size_t max_tunnels() const = 0;
  // A tunnel rebuilt from its state, no I/O yet. "" or why not (its fds are
  // closed then).
  [[nodiscard]] virtual std::string adopt(proxy::TunnelState& st) = 0;
  virtual void start_adopted() = 0;   // committed: every adopted tunnel starts I/O
  virtual void let_go_adopted() = 0;  // called off: the old process still holds their sockets
  virtual proxy::Metrics& metrics() = 0;
};

class ChildLogic {
 public:
  ChildLogic(ChildHost& host, uint32_t timeout_ms, uint32_t my_pid, uint32_t my_uid);

  // The channel is open; the old process is (uid, pid) by SO_PEERCRED
  // (known false: could not tell).
  Step start(bool peer_known, uint32_t peer_uid, uint32_t peer_pid, uint64_t now);
  // fds: those that came with the message; the logic sets the ones it keeps to -1.
  Step on_message(const Header& h, std::span<const uint8_t> body, std::vector<int>& fds, uint64_t now);
  Step on_closed(const std::string& why, uint64_t now);
  Step on_deadline(uint64_t now);
  // The caller wants out (SIGTERM or SIGINT during the takeover). Before any
  // tunnel has arrived: abort and finish at once. After: stop accepting,
  // send abort, take no further batch, and keep what was adopted until the
  // old process answers, because its commit may already be on the way:
  //   its abort  -> it resumed everything: let go, not ok
  //   commit     -> the tunnels are ours: start them, ok
  //   silence    -> it is gone and cannot resume them: start them, ok
  // result().abandoned tells the caller to stop (drain) once it has them.
  Step abandon(const std::string& why, uint64_t now);

  uint64_t next_deadline() const { return phase_ >= ChildPhase::done ? kNoDeadline : deadline_; }
  ChildPhase phase() const { return phase_; }
  const ChildResult& result() const { return result_; }  // final once phase() >= done
  size_t adopted() const { return adopted_; }

 private:
  Step handle_server_state(std::span<const uint8_t> body, std::vector<int>& fds, uint64_t now);
  Step handle_batch(std::span<const uint8_t> body, std::vector<int>& fds);
  Step handle_commit(std::span<const uint8_t> body, uint64_t now);
  Step take_over(uint64_t now);
  Step give_up(const std::string& why, bool tell_peer, uint64_t now);
  void finish(Step& s, bool ok, const std::string& error, uint64_t now);

  ChildHost& host_;
  uint32_t timeout_ms_;
  uint32_t my_pid_, my_uid_;
  ChildPhase phase_ = ChildPhase::awaiting_server_state;
  bool abandoning_ = false;  // abort sent, waiting for the old process's answer
  std::string abandon_why_;
  size_t adopted_ = 0;       // built, not started until commit
  ChildResult result_;
  proxy::Metrics base_metrics_;  // the old process's metrics when this one took them
  uint64_t started_ms_ = 0;
  uint64_t deadline_ = kNoDeadline;
};

}  // namespace baton::handoff
