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
#include <memory>
#include <string>
#include <vector>

#include "handoff/channel.h"
#include "handoff/codec.h"
#include "handoff/parent_logic.h"
#include "proxy/server.h"

namespace baton::handoff {

struct ParentOptions {
  std::string socket_path;
  uint32_t step_timeout_ms = 5000;  // longest wait for any answer of the new process
  uint32_t drain_grace_ms = 30000;  // for tunnels the new process cannot take
  std::string reconnect_hint;
};

class ServerParentHost;

// The I/O around ParentLogic (parent_logic.h): the handoff socket, its
// channel, a timer for the logic's deadlines and an idle handle for "after
// the next poll". Every decision is the logic's.
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
  ParentPhase phase() const { return logic_->phase(); }
  const HandoffStats& stats() const { return logic_->stats(); }
  // Calls a handoff in progress off (a drain starts: it is never handed
  // over): the new process is told why, every exported tunnel resumes here.
  // No effect when idle or committed.
  void cancel(const std::string& why);

 private:
  static void accept_cb(uv_poll_t* p, int status, int events);
  void on_accept();
  void on_message(Message& m);
  void apply(Step s);
  void rearm();
  static void timer_cb(uv_timer_t* t);
  static void idle_cb(uv_idle_t* h);
  void stop_listening();

  uv_loop_t* loop_;
  proxy::Server& server_;
  ParentOptions opts_;
  std::function<void(const HandoffStats&)> on_handed_over_;
  std::unique_ptr<ServerParentHost> host_;
  std::unique_ptr<ParentLogic> logic_;
  int listen_fd_ = -1;
  uv_poll_t* listen_poll_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  // Runs before each poll (and keeps that poll from blocking): "the loop
  // polled once more" for a pending commit (its second run), and the pump
  // after a handshake ended (outside the tunnel's own callback).
  uv_idle_t* idle_ = nullptr;
  int idle_runs_ = 0;
  bool tunnels_changed_ = false;
  Channel* channel_ = nullptr;
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
