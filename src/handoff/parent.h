// Parent: the old process's side of a hot restart (docs/hot-restart.md).
//
// It listens on the handoff socket (mode 0600 in a directory of its own) and
// accepts one new baton at a time, from the same uid or root (SO_PEERCRED).
// Then, step by step, each step bounded by a timeout:
//
//   awaiting_hello      <- hello (the new process's pid and state versions)
//   awaiting_listening  -> server_state + the listening socket
//                       <- listening: both processes accept now; this one stops
//   transferring        -> batches of exported tunnels (<= 253 fds each),
//                          up to kWindow batches unacknowledged
//                       <- batch_ack per batch: the first `adopted` are taken;
//                          the rest come back here and are drained
//                          (docs/protocol.md 6), and so is everything not sent yet
//                       tunnels in their TLS handshake finish it first and go
//                          in a later batch; after half the step timeout the
//                          ones still in it are closed (the client reconnects)
//   committed           -> commit once every tunnel is acknowledged: the old
//                          copies of the sockets are closed, the new process
//                          starts I/O, on_handed_over fires
//
// Until commit nothing is lost: if the new process dies, says abort, sends
// something malformed or a step times out, every exported tunnel is adopted
// back into this process (the same code path the new process uses), the
// listener accepts again, and a later restart can try anew.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "handoff/channel.h"
#include "handoff/codec.h"
#include "proxy/server.h"
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

struct ParentOptions {
  std::string socket_path;
  uint32_t step_timeout_ms = 5000;  // longest wait for any answer of the new process
  uint32_t drain_grace_ms = 30000;  // for tunnels the new process cannot take
  std::string reconnect_hint;
  uint16_t state_version_override = 0;  // tests only (BATON_TEST_HANDOFF_STATE_VERSION)
};

struct HandoffStats {
  uint64_t tunnels_sent = 0;      // adopted by the new process
  uint64_t tunnels_drained = 0;   // the new process could not take them
  uint64_t batches = 0;
  uint64_t started_ms = 0;        // uv_now at hello
  uint64_t committed_ms = 0;
};

class Parent {
 public:
  // on_handed_over: the handoff committed; the caller lets the remaining
  // (draining or closing) tunnels end and exits.
  Parent(uv_loop_t* loop, proxy::Server& server, ParentOptions opts, std::function<void(const HandoffStats&)> on_handed_over);
  ~Parent();
  Parent(const Parent&) = delete;
  Parent& operator=(const Parent&) = delete;

  // Creates the socket: its directory (0700) if missing, a stale socket
  // file replaced, the socket chmod 0600. Returns "" or an error.
  [[nodiscard]] std::string listen();
  ParentPhase phase() const { return phase_; }
  const HandoffStats& stats() const { return stats_; }
  // Calls a handoff in progress off (a drain starts: it is never handed
  // over): the new process is told why, every exported tunnel resumes here.
  // No effect when idle or committed.
  void cancel(const std::string& why);

 private:
  static void accept_cb(uv_poll_t* p, int status, int events);
  void on_accept();
  void on_message(Message& m);
  void on_channel_closed(const std::string& why);
  void handle_hello(Message& m);
  void handle_listening();
  void handle_batch_ack(Message& m);
  void pump();
  void send_batch(std::vector<proxy::TunnelState> tunnels);
  void commit();
  void abort(const std::string& why, bool tell_peer);
  void drain_local(const std::string& why);
  void arm(uint32_t ms);
  static void timer_cb(uv_timer_t* t);
  static void commit_idle_cb(uv_idle_t* h);
  void stop_commit_wait();
  void stop_listening();

  static constexpr size_t kWindow = 4;         // batches in flight
  static constexpr size_t kBatchBytes = 8u << 20;

  uv_loop_t* loop_;
  proxy::Server& server_;
  ParentOptions opts_;
  std::function<void(const HandoffStats&)> on_handed_over_;
  int listen_fd_ = -1;
  uv_poll_t* listen_poll_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  // Every tunnel acknowledged: the commit waits for one poll of the loop
  // (see pump()), counted by this idle handle's runs.
  uv_idle_t* commit_idle_ = nullptr;
  int commit_idle_runs_ = 0;
  bool commit_ready_ = false;
  Channel* channel_ = nullptr;
  ParentPhase phase_ = ParentPhase::idle;
  int child_pid_ = 0;
  uint16_t state_version_ = kStateVersion;  // the tunnel state layout the new process reads (its hello)
  bool child_takes_tunnels_ = true;  // false once it refused some: the rest are drained here
  uint32_t next_seq_ = 1;
  uint64_t transfer_started_ms_ = 0;
  std::map<uint32_t, std::vector<proxy::TunnelState>> in_flight_;  // sent, not acknowledged
  std::vector<proxy::TunnelState> acked_;  // adopted by the new process, copies kept until commit
  HandoffStats stats_;
};

// Connects to a live baton's handoff socket. Returns the fd, or -1 with
// `error` empty when nobody listens there (no socket file, or connection
// refused), or -1 with `error` set for anything else.
int connect_handoff(const std::string& path, std::string& error);

// After a handoff connection closed without a word (the refusal of a busy or
// draining old process can be lost that way): is the old process still
// there? Connects again and waits up to wait_ms: a refusal (its reason goes
// to `reason`) or a connection held open mean alive; nobody listening, or a
// close or reset without a word (a process on its way out), mean gone.
[[nodiscard]] bool old_process_alive(const std::string& path, uint32_t wait_ms, std::string& reason);

}  // namespace baton::handoff
