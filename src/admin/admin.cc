#include "admin/admin.h"

#include <httplib.h>
#include <mbedtls/sha256.h>
#include <spdlog/spdlog.h>
#include <pthread.h>
#include <sys/socket.h>

#include <csignal>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <map>
#include <optional>
#include <set>

#include "util/json.h"
#include "util/text.h"

namespace baton::admin {

namespace {

using util::Json;
std::string dump(const Json& j) { return util::json_text(j); }

// A count kept as a double (gauges) is shown as an integer when it is one.
std::optional<int64_t> whole(double v) {
  if (v < 9e15 && v > -9e15 && v == double(int64_t(v))) return int64_t(v);
  return std::nullopt;
}

Json number(double v) {
  if (auto w = whole(v)) return *w;
  return v;
}

std::string num(double v) {
  if (auto w = whole(v)) return std::to_string(*w);
  char b[64];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

double gauge(const Snapshot& s, const proxy::Series& which) {
  for (const auto& [k, v] : s.gauges)
    if (k == which) return v;
  return 0;
}

}  // namespace

Snapshot take_snapshot(const proxy::Server& server) {
  Snapshot s;
  s.metrics = server.metrics_snapshot();
  s.gauges = server.gauges();
  s.state = server.state();
  s.epoch = server.epoch();
  uint64_t now = uv_now(server.loop());
  s.uptime_ms = now - server.started_ms();
  s.pid = int(getpid());
  s.server_id = server.server_id();
  s.listen = server.listen_address();
  std::map<std::string, uint64_t> active = server.streams_by_route();
  for (const config::Route& r : server.config().routes) {
    RouteStats rs;
    rs.name = r.name;
    rs.upstream = r.upstream.to_string();
    rs.streams_active = active[r.name];
    s.routes.push_back(rs);
  }
  s.limits = server.config().limits;
  s.drain_grace_ms = server.config().drain.grace_ms;
  s.drain_elapsed_ms = server.drain_started_ms() ? now - server.drain_started_ms() : 0;
  s.drain_phase = server.drain_phase();
  s.tunnels_active = server.serving_tunnels();
  s.tunnels_total = server.tunnel_count();
  return s;
}

std::string render_prometheus(const Snapshot& s) {
  // Every series by family, then each family once with HELP and TYPE, in
  // the order they are declared (proxy/metrics.h). Families with no series
  // yet are still announced (with no samples), so dashboards and alerts can
  // reference them from the start.
  std::map<proxy::Fam, std::vector<std::pair<std::string, std::string>>> lines;
  for (const auto& [k, v] : s.metrics.counters) lines[k.fam].emplace_back(k.text(), num(double(v)));
  for (const auto& [k, v] : s.gauges) lines[k.fam].emplace_back(k.text(), num(v));
  lines[proxy::Fam::uptime_seconds].emplace_back("baton_uptime_seconds", num(double(s.uptime_ms) / 1000.0));
  std::string out;
  for (const proxy::FamilyInfo& f : proxy::kFamilies) {
    const std::string fam(f.name);
    out += "# HELP " + fam + " " + std::string(f.help) + "\n# TYPE " + fam + " " + std::string(f.type) + "\n";
    if (f.type == "histogram") {
      proxy::Series key;
      key.fam = f.fam;
      auto it = s.metrics.histograms.find(key);
      proxy::Histogram h = it == s.metrics.histograms.end() ? proxy::Histogram{} : it->second;
      uint64_t cum = 0;
      for (size_t i = 0; i < proxy::Histogram::kBounds.size(); ++i) {
        cum += h.counts[i];
        char le[32];
        std::snprintf(le, sizeof le, "%g", proxy::Histogram::kBounds[i]);
        out += fam + "_bucket{le=\"" + le + "\"} " + num(double(cum)) + "\n";
      }
      cum += h.counts.back();
      out += fam + "_bucket{le=\"+Inf\"} " + num(double(cum)) + "\n";
      char sum[64];
      std::snprintf(sum, sizeof sum, "%.9g", h.sum);
      out += fam + "_sum " + sum + "\n" + fam + "_count " + num(double(cum)) + "\n";
      continue;
    }
    for (const auto& [series, value] : lines[f.fam]) out += series + " " + value + "\n";
  }
  return out;
}

namespace {

Json drain_json(const Snapshot& s) {
  Json o;
  o["draining"] = s.state == proxy::ServeState::draining;
  o["state"] = proxy::to_str(s.state);
  o["phase"] = proxy::to_str(s.drain_phase);
  o["grace_ms"] = s.drain_grace_ms;
  o["elapsed_ms"] = s.drain_elapsed_ms;
  o["tunnels_left"] = s.tunnels_active;
  o["streams_left"] = number(gauge(s, proxy::series<proxy::Fam::streams_active>()));
  return o;
}

Json stats_json(const Snapshot& s) {
  const proxy::Metrics& m = s.metrics;
  // {label value: count} of a family with one label.
  auto counters_by = [&](proxy::Fam fam) {
    Json o = Json::object();
    for (const auto& [k, v] : m.counters)
      if (k.fam == fam) o[k.values[0]] = v;
    return o;
  };
  Json o;
  o["version"] = BATON_VERSION;
  o["pid"] = s.pid;
  o["server_id"] = s.server_id;
  o["epoch"] = s.epoch;
  o["uptime_s"] = number(double(s.uptime_ms) / 1000.0);
  o["state"] = proxy::to_str(s.state);
  o["ready"] = s.state == proxy::ServeState::serving;
  o["listen"] = s.listen;
  o["drain"] = drain_json(s);
  o["tunnels"] = {{"active", s.tunnels_active},
                  {"handshaking", number(gauge(s, proxy::series<proxy::Fam::tunnels_handshaking>()))},
                  {"queued", number(gauge(s, proxy::series<proxy::Fam::tunnels_queued>()))},
                  {"connections", s.tunnels_total},
                  {"total", counters_by(proxy::Fam::tunnels_total)}};
  o["streams"] = {{"active", number(gauge(s, proxy::series<proxy::Fam::streams_active>()))}};
  Json routes = Json::array();
  for (const RouteStats& r : s.routes) {
    auto c = [&](const char* result) { return m.get(proxy::series<proxy::Fam::streams_total>(r.name, result)); };
    auto bytes = [&](const char* dir) {
      return m.get(proxy::series<proxy::Fam::bytes_total>(r.name, dir));
    };
    routes.push_back({{"name", r.name},
                      {"upstream", r.upstream},
                      {"streams_active", r.streams_active},
                      {"streams_opened", c("opened")},
                      {"connect_failed", c("connect_failed")},
                      {"bytes_up", bytes("up")},
                      {"bytes_down", bytes("down")}});
  }
  o["routes"] = std::move(routes);
  Json limits = Json::object();
  auto limit = [&](const char* name, double limit_value, double used) {
    limits[name] = {{"limit", number(limit_value)},
                    {"used", number(used)},
                    {"ratio", number(limit_value > 0 ? used / limit_value : 0)}};
  };
  const config::Limits& l = s.limits;
  limit("max_tunnels", l.max_tunnels, double(s.tunnels_active));
  limit("max_concurrent_handshakes", l.max_concurrent_handshakes, gauge(s, proxy::series<proxy::Fam::tunnels_handshaking>()));
  limit("max_queued_handshakes", l.max_queued_handshakes, gauge(s, proxy::series<proxy::Fam::tunnels_queued>()));
  limit("max_streams_per_tunnel", l.max_streams_per_tunnel,
        gauge(s, proxy::series<proxy::Fam::limit_usage_ratio>("max_streams_per_tunnel")) *
            l.max_streams_per_tunnel);
  double fd_ratio = gauge(s, proxy::series<proxy::Fam::limit_usage_ratio>("open_files"));
  double fds = gauge(s, proxy::series<proxy::Fam::process_open_fds>());
  limit("open_files", fd_ratio > 0 ? fds / fd_ratio : 0, fds);
  o["limits"] = std::move(limits);
  o["warn_percent"] = l.warn_percent;
  o["overload_rejections"] = counters_by(proxy::Fam::overload_rejections_total);
  o["handoff"] = counters_by(proxy::Fam::handoff_tunnels_total);
  o["process"] = {{"resident_bytes", number(gauge(s, proxy::series<proxy::Fam::process_resident_bytes>()))}, {"open_fds", number(fds)}};
  return o;
}

}  // namespace

std::string render_drain_json(const Snapshot& s) { return dump(drain_json(s)); }
std::string render_stats_json(const Snapshot& s) { return dump(stats_json(s)); }

Admin::Admin(uv_loop_t* loop, proxy::Server& server) : loop_(loop), server_(server) {
  async_ = new uv_async_t;
  uv_async_init(loop_, async_, async_cb);
  async_->data = this;
  uv_unref(reinterpret_cast<uv_handle_t*>(async_));  // the admin never keeps the loop alive
}

Admin::~Admin() {
  stop();
  uv_close(reinterpret_cast<uv_handle_t*>(async_), [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
}

void Admin::async_cb(uv_async_t* a) {
  auto* self = static_cast<Admin*>(a->data);
  std::deque<std::shared_ptr<Job>> jobs;
  {
    std::lock_guard<std::mutex> g(self->mu_);
    jobs.swap(self->jobs_);
  }
  for (auto& j : jobs) {
    j->fn();
    std::lock_guard<std::mutex> g(j->m);
    j->done = true;
    j->cv.notify_all();
  }
}

void Admin::post(std::function<void()> fn) {
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return;
    jobs_.push_back(std::move(job));
  }
  uv_async_send(async_);
}

bool Admin::on_loop(std::function<void()> fn, uint32_t timeout_ms) {
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return false;
    jobs_.push_back(job);
  }
  uv_async_send(async_);
  std::unique_lock<std::mutex> lk(job->m);
  return job->cv.wait_for(lk, std::chrono::milliseconds(timeout_ms), [&] { return job->done; });
}

// cpp-httplib's server with its connection handling replaced: it binds the
// socket and gives it to the listener's Gate, whose workers call back into
// the server's own request processing (parsing, routing, handlers, the
// answer) with the request complete in memory (docs/design.md "The admin's
// request gate").
class Admin::HttpServer : public httplib::Server {
 public:
  bool handle(httplib::Stream& strm, bool close, bool& closed) { return process_request(strm, close, closed, nullptr); }
  // The socket bind_to_port made (listening), handed to the gate; this
  // server's own accept loop (listen_after_bind) never runs.
  int release_socket() { return svr_sock_.exchange(INVALID_SOCKET); }
};

namespace {

// Settings both listeners share. Time limits and keep-alive are the gate's
// (admin/gate.h); cpp-httplib only parses, routes and renders.
void configure(httplib::Server& srv) {
  srv.set_payload_max_length(4096);
  // Only for the Keep-Alive header cpp-httplib writes: the gate applies both.
  srv.set_keep_alive_timeout(1);
  srv.set_keep_alive_max_count(100);
  srv.set_socket_options([](socket_t sock) {
    int one = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(sock, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  });
}

}  // namespace

std::unique_ptr<Gate> Admin::make_gate(HttpServer& srv, const char* listener, uint32_t workers, uint32_t reserved,
                                       Gate::Priority priority) {
  GateLimits limits;
  limits.workers = workers;
  limits.reserved_workers = reserved;
  std::string name = listener;
  auto report = [this, name](const std::array<uint64_t, kCloseReasons>& n) {
    // The metrics are loop state: the increments ride a job, nobody waits.
    std::vector<std::pair<proxy::Series, uint64_t>> inc;
    for (size_t r = 0; r < n.size(); ++r)
      if (n[r])
        inc.emplace_back(proxy::series<proxy::Fam::admin_requests_rejected_total>(name, to_str(CloseReason(r))),
                         n[r]);
    post([this, inc] {
      for (const auto& [series, v] : inc) server_.metrics().inc(series, v);
    });
  };
  return std::make_unique<Gate>(
      name, limits,
      [&srv](httplib::Stream& strm, bool close, bool& closed) { return srv.handle(strm, close, closed); },
      std::move(priority), std::move(report));
}

void Admin::add_gate_gauges(Snapshot& s) {
  auto add = [&s](const char* listener, const Gate* g) {
    if (!g) return;
    Admission::Counts n = g->counts();
    for (auto [state, v] : {std::pair<const char*, uint32_t>{"reading", n.reading},
                            {"slow", n.slow},
                            {"handling", n.handling},
                            {"writing", n.writing}})
      s.gauges.emplace_back(proxy::series<proxy::Fam::admin_connections>(listener, state),
                            double(v));
  };
  const Gate *admin, *lifecycle;
  {
    std::lock_guard<std::mutex> g(mu_);  // start_lifecycle may set one while requests run
    admin = gate_.get();
    lifecycle = lifecycle_gate_.get();
  }
  add("admin", admin);
  add("lifecycle", lifecycle);
}

std::string Admin::serve(HttpServer& srv, Gate& gate, const config::HostPort& listen, const char* what,
                         std::string& address) {
  std::string host = listen.host;
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  int port = listen.port;
  if (port == 0) {
    port = srv.bind_to_any_port(host);
    if (port <= 0) return std::string(what) + ": cannot listen on " + listen.to_string();
  } else if (!srv.bind_to_port(host, port)) {
    return std::string(what) + ": cannot listen on " + listen.to_string() + ": " + std::strerror(errno);
  }
  address = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  // The HTTP threads never take a process signal: they go to the loop
  // thread, whose libuv handlers turn them into events. (The threads inherit
  // the mask; the loop thread gets its own back at once.)
  sigset_t block, old;
  sigemptyset(&block);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD, SIGPIPE}) sigaddset(&block, sig);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  std::string error = gate.start(srv.release_socket());
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return error.empty() ? "" : std::string(what) + ": " + error;
}

std::string Admin::start(const config::HostPort& listen) {
  http_ = std::make_unique<HttpServer>();
  configure(*http_);
  // Probes must answer within 1 s whatever other clients do: they go ahead
  // of other requests, and 2 of the 8 workers take nothing else.
  auto gate = make_gate(*http_, "admin", 8, 2, [](const RequestFrame& f) {
    return (f.method == "GET" || f.method == "HEAD") && (f.path == "/healthz" || f.path == "/readyz");
  });
  {
    std::lock_guard<std::mutex> g(mu_);
    gate_ = std::move(gate);
  }
  routes();
  return serve(*http_, *gate_, listen, "admin", address_);
}

std::string Admin::start_lifecycle(const config::Lifecycle& lc, uint32_t grace_ms) {
  if (!lc.listen) return "";
  lifecycle_ = std::make_unique<HttpServer>();
  configure(*lifecycle_);
  // GET /drain with the token holds its worker until the drain is over: it
  // may use 3 of the 4 workers; every other answer here is immediate.
  auto gate = make_gate(*lifecycle_, "lifecycle", 4, 1, [](const RequestFrame& f) {
    return !(f.path == "/drain" && (f.method == "GET" || f.method == "HEAD"));
  });
  {
    std::lock_guard<std::mutex> g(mu_);
    lifecycle_gate_ = std::move(gate);
  }
  lifecycle_routes(lc, grace_ms);
  return serve(*lifecycle_, *lifecycle_gate_, *lc.listen, "lifecycle", lifecycle_address_);
}

void Admin::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (lifecycle_gate_) lifecycle_gate_->stop();
  if (gate_) gate_->stop();
  // Requests still waiting time out on their own (they hold the job alive).
  std::lock_guard<std::mutex> g(mu_);
  jobs_.clear();
}

namespace {

void send_json(httplib::Response& res, int status, const Json& body) {
  res.status = status;
  res.set_content(dump(body) + "\n", "application/json");
}

Json error_json(const std::string& what) { return {{"error", what}}; }

}  // namespace

void Admin::routes() {
  auto json = send_json;
  auto unavailable = [](httplib::Response& res) {
    send_json(res, 503, error_json("the event loop did not answer within 1 s"));
  };
  // A snapshot from the loop; false if it did not answer in time. The job
  // owns what it writes: after a timeout the loop may still run it.
  auto snapshot = [this](Snapshot& out) {
    auto box = std::make_shared<Snapshot>();
    if (!on_loop([this, box] { *box = take_snapshot(server_); })) return false;
    out = std::move(*box);
    return true;
  };

  http_->Get("/healthz", [this, json, unavailable](const httplib::Request&, httplib::Response& res) {
    if (on_loop([] {})) json(res, 200, {{"status", "ok"}});
    else unavailable(res);
  });
  http_->Get("/readyz", [this, json, unavailable](const httplib::Request&, httplib::Response& res) {
    auto box = std::make_shared<std::pair<proxy::ServeState, bool>>(proxy::ServeState::starting, false);
    if (!on_loop([this, box] { *box = {server_.state(), server_.ready()}; })) return unavailable(res);
    proxy::ServeState st = box->first;
    bool ready = box->second;
    json(res, ready ? 200 : 503, {{"ready", ready}, {"state", proxy::to_str(st)}});
  });
  http_->Get("/stats", [snapshot, json, unavailable](const httplib::Request&, httplib::Response& res) {
    Snapshot s;
    if (!snapshot(s)) return unavailable(res);
    json(res, 200, stats_json(s));
  });
  http_->Get("/metrics", [this, snapshot, unavailable](const httplib::Request&, httplib::Response& res) {
    Snapshot s;
    if (!snapshot(s)) return unavailable(res);
    add_gate_gauges(s);
    res.status = 200;
    res.set_content(render_prometheus(s), "text/plain; version=0.0.4; charset=utf-8");
  });
  http_->Get("/drain", [snapshot, json, unavailable](const httplib::Request&, httplib::Response& res) {
    Snapshot s;
    if (!snapshot(s)) return unavailable(res);
    json(res, 200, drain_json(s));
  });
  auto post_drain = [this, json, unavailable](httplib::Response& res) {
    auto box = std::make_shared<Snapshot>();
    if (!on_loop([this, box] {
          server_.start_drain();
          *box = take_snapshot(server_);
        }))
      return unavailable(res);
    json(res, 200, drain_json(*box));
  };
  http_->Post("/drain", [post_drain](const httplib::Request&, httplib::Response& res) { post_drain(res); });
  // POST /drain carries no body: answer it before httplib tries to read one
  // (`curl -X POST` sends no Content-Length, which httplib would refuse).
  http_->set_pre_routing_handler(httplib::Server::HandlerWithResponse(
      [post_drain, json](const httplib::Request& req, httplib::Response& res) {
        // The size limit applies to Content-Length only: refuse chunked bodies
        // before httplib reads them into memory.
        if (req.has_header("Transfer-Encoding")) {  // the gate closes the connection after this
          json(res, 413, error_json("request bodies must have a Content-Length (at most 4096 bytes)"));
          return httplib::Server::HandlerResponse::Handled;
        }
        if (req.method != "POST" || req.path != "/drain" || req.has_header("Content-Length"))
          return httplib::Server::HandlerResponse::Unhandled;
        post_drain(res);
        return httplib::Server::HandlerResponse::Handled;
      }));
  // Everything else: 405 on a known path with another method, 404 otherwise.
  static const std::set<std::string> kPaths = {"/healthz", "/readyz", "/stats", "/metrics", "/drain"};
  http_->set_error_handler(httplib::Server::HandlerWithResponse([json](const httplib::Request& req,
                                                                       httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;  // our own 503 answers
    if (res.status == 404 && kPaths.count(req.path)) res.status = 405;
    std::string what = res.status == 405   ? "method not allowed"
                       : res.status == 404 ? "not found"
                       : res.status == 413 ? "request too large"
                                           : "bad request";
    // The path is the client's: made printable before it is sent back.
    json(res, res.status, {{"error", what}, {"path", util::printable(req.path.substr(0, 200))}});
    return httplib::Server::HandlerResponse::Handled;
  }));
}

void Admin::lifecycle_routes(const config::Lifecycle& lc, uint32_t grace_ms) {
  auto json = send_json;
  auto count = [this](const char* result) {
    proxy::Series s = proxy::series<proxy::Fam::lifecycle_requests_total>(result);
    (void)on_loop([this, s] { server_.metrics().inc(s); });
  };
  std::array<uint8_t, 32> want = lc.token_sha256;
  lifecycle_->Get("/drain", [this, json, count, want, grace_ms](const httplib::Request& req, httplib::Response& res) {
    std::string token = req.get_header_value("X-Baton-Token");
    std::array<uint8_t, 32> got{};
    mbedtls_sha256_ret(reinterpret_cast<const unsigned char*>(token.data()), token.size(), got.data(), 0);
    uint8_t diff = 0;
    for (size_t i = 0; i < got.size(); ++i) diff |= uint8_t(got[i] ^ want[i]);
    if (token.empty() || diff != 0) {
      count("unauthorized");
      spdlog::warn("lifecycle: GET /drain from {} refused: {} X-Baton-Token", req.remote_addr,
                   token.empty() ? "no" : "wrong");
      return json(res, 401, error_json("missing or wrong X-Baton-Token"));
    }
    count("drain");
    spdlog::info("lifecycle: GET /drain from {}: draining, answering when done", req.remote_addr);
    auto box = std::make_shared<Snapshot>();
    if (!on_loop([this, box] {
          server_.start_drain();
          *box = take_snapshot(server_);
        }))
      return json(res, 200, {{"drained", true}, {"phase", "exiting"}});
    // Blocks this worker until the drain is over: the kubelet holds the
    // application container's TERM until the hook returns.
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(uint64_t(grace_ms) + 5000);
    Snapshot s = *box;
    while (s.drain_phase != proxy::DrainPhase::done) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        stop_cv_.wait_for(lk, std::chrono::milliseconds(100), [this] { return stopping_; });
        if (stopping_) return json(res, 200, {{"drained", true}, {"phase", "exiting"}});
      }
      if (std::chrono::steady_clock::now() >= until)
        return json(res, 504, {{"drained", false}, {"error", "drain not over after grace + 5 s"}, {"drain", drain_json(s)}});
      auto next = std::make_shared<Snapshot>();
      if (!on_loop([this, next] { *next = take_snapshot(server_); })) continue;  // busy or exiting: look again
      s = std::move(*next);
    }
    json(res, 200, {{"drained", true}, {"phase", "done"}});
  });
  lifecycle_->set_pre_routing_handler(httplib::Server::HandlerWithResponse(
      [json](const httplib::Request& req, httplib::Response& res) {
        if (req.has_header("Transfer-Encoding")) {  // the gate closes the connection after this
          json(res, 413, error_json("request bodies are not accepted here"));
          return httplib::Server::HandlerResponse::Handled;
        }
        return httplib::Server::HandlerResponse::Unhandled;
      }));
  lifecycle_->set_error_handler(httplib::Server::HandlerWithResponse([json](const httplib::Request& req,
                                                                            httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 404 && req.path == "/drain") res.status = 405;
    json(res, res.status, error_json(res.status == 405 ? "only GET /drain" : "only GET /drain here"));
    return httplib::Server::HandlerResponse::Handled;
  }));
}

}  // namespace baton::admin
