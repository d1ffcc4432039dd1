// Admin: the operator's HTTP API (docs/operations.md), cpp-httplib on a
// thread of its own.
//
//   GET  /healthz   200 while the event loop answers within 1 s, else 503
//   GET  /readyz    200 while serving; 503 starting, handing over, draining
//   GET  /stats     JSON snapshot (process, tunnels, streams, routes, limits)
//   GET  /metrics   Prometheus text format 0.0.4
//   POST /drain     starts the drain (idempotent); GET /drain: its state
//
// The lifecycle listener (optional, lifecycle.listen; may face the pod
// network): GET /drain with the header X-Baton-Token whose sha256 is
// lifecycle.token_sha256 starts the drain and answers only when the drain is
// over (or the process exits, or grace + 5 s): a kubelet preStop httpGet hook
// of the application container. Anything else there: 401 / 404 / 405.
//
// Threading (ARCHITECTURE principle 7): the HTTP threads never touch loop
// state. A request posts a job through a uv_async_t and waits (at most 1 s)
// for the loop to run it; the job copies what the answer needs (a Snapshot)
// and the rendering happens back on the HTTP thread.
//
// Connections (both listeners): an admin::Gate (admin/gate.h) accepts and
// reads every request without blocking on one I/O thread, closes requests
// not complete within 2 s, bounds slow connections per source address (4)
// and connections per listener (128), and hands complete requests to
// workers that run cpp-httplib's routing, probes first (docs/operations.md
// "Limits of the admin API").
#pragma once

#include <uv.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "admin/gate.h"
#include "config/config.h"
#include "proxy/metrics.h"
#include "proxy/server.h"


namespace baton::admin {

struct RouteStats {
  std::string name;
  std::string upstream;
  uint64_t streams_active = 0;
};

// Everything an answer needs, copied on the loop thread.
struct Snapshot {
  proxy::Metrics metrics;
  std::vector<proxy::Gauge> gauges;
  proxy::ServeState state = proxy::ServeState::starting;
  uint64_t epoch = 0;
  uint64_t uptime_ms = 0;
  int pid = 0;
  std::string server_id;
  std::string listen;
  std::vector<RouteStats> routes;
  config::Limits limits;
  uint32_t drain_grace_ms = 0;
  uint64_t drain_elapsed_ms = 0;  // since POST /drain (0 when not draining)
  proxy::DrainPhase drain_phase = proxy::DrainPhase::idle;
  uint64_t tunnels_active = 0;
  uint64_t tunnels_total = 0;     // including handshakes and closing ones
};

// Takes a snapshot of `server` (loop thread only).
Snapshot take_snapshot(const proxy::Server& server);
// Renderings (any thread).
std::string render_prometheus(const Snapshot& s);
std::string render_stats_json(const Snapshot& s);
std::string render_drain_json(const Snapshot& s);

class Admin {
 public:
  // Loop thread. `server` must outlive the admin (or call stop() first).
  Admin(uv_loop_t* loop, proxy::Server& server);
  ~Admin();
  Admin(const Admin&) = delete;
  Admin& operator=(const Admin&) = delete;

  // Binds host:port (port 0: any) with SO_REUSEPORT, so the new process of a
  // hot restart can bind while the old one still answers, then starts the
  // HTTP threads (its Gate). Returns "" or an error.
  [[nodiscard]] std::string start(const config::HostPort& listen);
  // Starts the lifecycle listener (see above). Returns "" or an error.
  [[nodiscard]] std::string start_lifecycle(const config::Lifecycle& lc, uint32_t grace_ms);
  // "host:port" actually bound.
  const std::string& address() const { return address_; }
  const std::string& lifecycle_address() const { return lifecycle_address_; }
  // Loop thread: closes both listeners and their connections and joins
  // the HTTP threads (a request waiting for the loop gives up within 1 s).
  void stop();

 private:
  struct Job {
    std::function<void()> fn;
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
  };
  class HttpServer;
  // HTTP thread: runs fn on the loop, waiting at most timeout_ms. False on timeout/stop.
  bool on_loop(std::function<void()> fn, uint32_t timeout_ms = 1000);
  // Any thread: runs fn on the loop some time later; nobody waits. Dropped
  // once stopping.
  void post(std::function<void()> fn);
  // The gate of a listener named `listener` ("admin", "lifecycle") serving `srv`.
  std::unique_ptr<Gate> make_gate(HttpServer& srv, const char* listener, uint32_t workers, uint32_t reserved,
                                  Gate::Priority priority);
  // The admin's own gauges (connections of both listeners), appended to a snapshot.
  void add_gate_gauges(Snapshot& s);
  static void async_cb(uv_async_t* a);
  void routes();
  void lifecycle_routes(const config::Lifecycle& lc, uint32_t grace_ms);
  // Binds `srv` (SO_REUSEPORT) and starts `gate` on its socket with process
  // signals blocked; "" or an error naming `what` and the address.
  std::string serve(HttpServer& srv, Gate& gate, const config::HostPort& listen, const char* what,
                    std::string& address);

  uv_loop_t* loop_;
  proxy::Server& server_;
  uv_async_t* async_ = nullptr;
  std::unique_ptr<HttpServer> http_;
  std::unique_ptr<Gate> gate_;
  std::string address_;
  std::unique_ptr<HttpServer> lifecycle_;
  std::unique_ptr<Gate> lifecycle_gate_;
  std::string lifecycle_address_;
  std::condition_variable stop_cv_;  // wakes lifecycle requests waiting for the drain (with mu_)
  std::mutex mu_;
  std::deque<std::shared_ptr<Job>> jobs_;
  bool stopping_ = false;
};

}  // namespace baton::admin
