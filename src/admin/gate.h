// Gate: how one admin listener (admin.listen or lifecycle.listen) takes its
// connections, so that slow or many clients cannot keep the probes from
// being answered (docs/design.md "The admin's request gate";
// docs/operations.md "Limits of the admin API").
//
//   I/O thread: epoll over the listening socket (bound by cpp-httplib, whose
//     own accept loop is not run) and every connection, non-blocking:
//     accepts, reads each request until complete (RequestFrame), applies
//     Admission's deadlines and bounds, writes what a handler answered
//     when the client was not ready to take it all at once
//   workers: run cpp-httplib's request processing (routing, handlers) on a
//     complete request in memory and render the answer into memory; they
//     never wait on a client. Priority requests (the probes) are taken
//     first, and `reserved` workers take nothing else.
//
// Threads: the I/O thread alone owns the listening socket, the connections
// that wait on their client and the Admission; a worker owns the
// connection it handles until it gives it back (through mu_). None touches
// the event loop: handlers do that through Admin::on_loop (ARCHITECTURE
// principle 7).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "admin/admission.h"
#include "admin/request_frame.h"

namespace httplib {
class Stream;
}

namespace baton::admin {

struct GateLimits {
  AdmissionLimits admission;
  size_t max_head_bytes = 16384;
  size_t max_body_bytes = 4096;            // the handler refuses more (413)
  size_t max_discard_bytes = 4u << 20;     // a refused body up to this is read and dropped before the 413
  uint32_t workers = 8;
  uint32_t reserved_workers = 2;           // take priority requests only
  uint32_t keep_alive_max_requests = 100;
};

class Gate {
 public:
  // Runs the HTTP processing of one request (cpp-httplib's
  // Server::process_request) on `stream`; false when the connection cannot
  // go on. `close` asks for "Connection: close"; `closed` is set when the
  // request asked for it.
  using Handle = std::function<bool(httplib::Stream& stream, bool close, bool& closed)>;
  // Whether a request goes ahead of others (and may use the reserve).
  using Priority = std::function<bool(const RequestFrame&)>;
  // Rejections since the last report, by CloseReason (I/O thread; must not block).
  using Report = std::function<void(const std::array<uint64_t, kCloseReasons>&)>;

  Gate(std::string name, const GateLimits& limits, Handle handle, Priority priority, Report report);
  ~Gate();
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;

  // Takes the bound, listening socket `listen_fd` (owned from here, also on
  // error), sets its backlog to 1024 and starts the I/O thread and the
  // workers (with the caller's signal mask). "" or an error.
  [[nodiscard]] std::string start(int listen_fd);
  // Closes the listening socket and every connection, and joins the
  // threads. A worker in a handler finishes it first. Idempotent.
  void stop();

  // Connections by state, as of the I/O thread's last turn (any thread).
  Admission::Counts counts() const;

 private:
  struct Conn;
  using ConnPtr = std::unique_ptr<Conn>;

  void io_main();
  void worker_main();
  void wake();
  // I/O thread:
  void accept_new(uint64_t now_ms);
  void admit(int fd, uint64_t now_ms);
  void take_back(uint64_t now_ms);
  void on_event(Conn& c, uint32_t events, uint64_t now_ms);
  void read_request(Conn& c, uint64_t now_ms);
  void after_input(Conn& c, uint64_t now_ms);
  void flush(Conn& c, uint64_t now_ms);
  void dispatch(Conn& c);
  void watch(Conn& c, uint32_t events);
  // Closes a connection the I/O thread holds; `reason` (none: the client
  // left or failed) is counted unless idle; `answer`: tell a client in the
  // middle of a request why (408, 429, 503, 431).
  void close_conn(uint64_t id, std::optional<CloseReason> reason, bool answer);
  void publish();
  void report_rejections();  // the counts so far, to `report_` (batched per turn)
  // Workers:
  void handle(Conn& c);

  std::string name_;
  GateLimits limits_;
  Handle handle_;
  Priority priority_;
  Report report_;

  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  std::thread io_thread_;
  std::vector<std::thread> workers_;

  // Shared between threads (mu_): connections given back by the workers,
  // and the queues of complete requests.
  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::vector<ConnPtr> returned_;
  std::deque<ConnPtr> priority_queue_;
  std::deque<ConnPtr> other_queue_;
  uint32_t busy_other_ = 0;
  bool stopping_ = false;

  // I/O thread only.
  Admission admission_;
  std::unordered_map<uint64_t, ConnPtr> conns_;  // waiting on their client
  uint64_t next_id_ = 2;                         // epoll data 0: wake_fd_, 1: listen_fd_
  uint64_t accept_paused_until_ = 0;             // out of descriptors: retry then
  std::array<uint64_t, kCloseReasons> rejected_{};

  std::atomic<uint32_t> count_reading_{0}, count_slow_{0}, count_handling_{0}, count_writing_{0};
};

}  // namespace baton::admin
