// The old process's side of a hot restart as logic without I/O
// (docs/hot-restart.md; the sequence is in parent.h). It takes what
// happened (a connection, a decoded message, the channel closing, the time)
// and returns a Step: the messages to write and what becomes of the
// channel. It reaches the tunnels through ParentHost, a narrow interface:
// the server in production (parent.cc), a fake in the unit tests
// (tests/unit/handoff_logic_test.cc), which drive it through every step and
// every failure without a socket, a timer or a signal.
//
// Model: Envoy's HotRestartingParent::Internal.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "handoff/codec.h"
#include "handoff/step.h"
#include "proxy/metrics.h"
#include "proxy/state.h"

namespace baton::handoff {

enum class ParentPhase : uint8_t {
  idle = 0,                // listening on the handoff socket, no new process connected
  awaiting_hello = 1,
  awaiting_listening = 2,
  transferring = 3,
  committed = 4,           // done: this process only lets its leftovers end
};
const char* to_str(ParentPhase p);

struct HandoffStats {
  uint64_t tunnels_sent = 0;      // adopted by the new process
  uint64_t tunnels_drained = 0;   // the new process could not take them
  uint64_t tunnels_resumed = 0;   // came back here when the handoff was called off
  uint64_t batches = 0;
  uint64_t started_ms = 0;        // at the connection
  uint64_t committed_ms = 0;
};

// What the logic needs of the server whose tunnels move.
class ParentHost {
 public:
  virtual ~ParentHost() = default;
  virtual bool draining() const = 0;  // a drain is never handed over
  virtual void begin_handoff() = 0;   // readiness shows handing_over
  // The handoff is off: serving again (a drain keeps its state), accepting again.
  virtual void end_handoff() = 0;
  // This process's state for the new one; listener_fd: the listening
  // socket to send along (still owned here), or -1.
  virtual ServerStateMsg server_state(int& listener_fd) = 0;
  virtual void stop_accepting() = 0;
  // The next tunnel that can move in state layout `state_version` (serving
  // or awaiting HELLO, not draining; detached too from version 3),
  // exported: its Tunnel is gone, `out` owns its fds. False when none is
  // left. A tunnel that cannot be exported stays and drains (the host).
  virtual bool export_next(proxy::TunnelState& out, uint16_t state_version) = 0;
  virtual bool any_exportable(uint16_t state_version) const = 0;
  virtual size_t handshaking() const = 0;  // tunnels still in their TLS handshake
  virtual size_t close_handshaking(const std::string& why) = 0;
  // A state back into a tunnel of this process, started; drained at once
  // when `drain` (the new process did not take it). False: it could not be
  // rebuilt (its fds are closed).
  virtual bool resume(proxy::TunnelState& st, bool drain) = 0;
  // Drains every tunnel that could have moved (make before break); how many.
  virtual size_t drain_exportable() = 0;
  virtual proxy::Metrics& metrics() = 0;
  virtual void release_listener() = 0;  // committed: the new process has it
};

struct ParentLogicOptions {
  uint32_t step_timeout_ms = 5000;        // longest wait for any answer of the new process
  uint16_t state_version_override = 0;    // tests only (test_hook.h)
  uint32_t my_uid = 0;                    // a new process of this uid (or root) may take over
  uint32_t my_pid = 0;
};

class ParentLogic {
 public:
  static constexpr size_t kWindow = 4;  // batches in flight
  static constexpr size_t kBatchBytes = 8u << 20;

  ParentLogic(ParentHost& host, ParentLogicOptions opts);
  ~ParentLogic();  // closes the fds of states still held (nothing is committed)
  ParentLogic(const ParentLogic&) = delete;
  ParentLogic& operator=(const ParentLogic&) = delete;

  // A process connected to the handoff socket: accepted (the channel opens;
  // phase awaiting_hello), or refused with a reason, sent in a refuse
  // message before the close unless the process is another user's (it gets
  // no word).
  struct Admission {
    bool accepted = false;
    bool tell = false;
    std::string why;
  };
  Admission on_connection(uint32_t uid, uint32_t pid, uint64_t now);
  Step on_message(const Header& h, std::span<const uint8_t> body, uint64_t now);
  Step on_closed(const std::string& why, uint64_t now);
  Step on_deadline(uint64_t now);  // next_deadline() came
  // A tunnel finished (or gave up) its TLS handshake: what waited for it may go.
  Step on_tunnels_changed(uint64_t now);
  Step on_poll_passed(uint64_t now);  // after Step::commit_after_poll
  Step cancel(const std::string& why, uint64_t now);  // a drain starts: never handed over

  uint64_t next_deadline() const;  // kNoDeadline: nothing to time
  ParentPhase phase() const { return phase_; }
  bool commit_pending() const { return commit_pending_; }
  const HandoffStats& stats() const { return stats_; }
  uint32_t child_pid() const { return child_pid_; }
  const std::string& last_error() const { return last_error_; }  // why the last handoff was called off

 private:
  Step handle_hello(std::span<const uint8_t> body, uint64_t now);
  Step handle_listening(uint64_t now);
  Step handle_batch_ack(std::span<const uint8_t> body, uint64_t now);
  void pump(Step& s, uint64_t now);
  void send_batch(Step& s, std::vector<proxy::TunnelState> tunnels, uint64_t now);
  void commit(Step& s, uint64_t now);
  Step abort(const std::string& why, bool tell_peer);
  void drain_local(const std::string& why);
  void count(const char* result, uint64_t n);

  ParentHost& host_;
  ParentLogicOptions opts_;
  ParentPhase phase_ = ParentPhase::idle;
  uint32_t child_pid_ = 0;
  uint16_t state_version_ = kStateVersion;  // the tunnel state layout the new process reads (its hello)
  bool child_takes_tunnels_ = true;  // false once it refused some: the rest are drained here
  bool commit_pending_ = false;      // waiting for on_poll_passed
  uint32_t next_seq_ = 1;
  uint64_t deadline_ = kNoDeadline;  // of the current step
  uint64_t handshake_cutoff_ = kNoDeadline;  // tunnels still in their handshake then are closed
  std::map<uint32_t, std::vector<proxy::TunnelState>> in_flight_;  // sent, not acknowledged
  std::vector<proxy::TunnelState> acked_;  // adopted by the new process, copies kept until commit
  std::vector<proxy::TunnelState> held_;   // exported, waiting for room in the window (at most one)
  HandoffStats stats_;
  std::string last_error_;
};

}  // namespace baton::handoff
