// `baton connect`: the client. Opens a tunnel to the server (reconnecting,
// following DRAIN), forwards each local connection on a --forward address to
// its route, prints event lines on stdout and answers GET /status on
// --status-listen.
#include <signal.h>
#include <spdlog/spdlog.h>
#include <uv.h>

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "baton/client.h"
#include "client/status_http.h"
#include "config/config.h"
#include "sidecar/cli.h"
#include "util/bytes.h"

namespace baton::cli {

int run_connect(ConnectOptions opts) {
  ClientOptions& o = opts.client;
  for (const std::string& s : opts.servers) {
    if (o.server.empty()) o.server = s;
    else o.servers.push_back(s);
  }
  for (const std::string& fwd : opts.forwards) {
    size_t eq = fwd.rfind('=');
    if (eq == std::string::npos) return usage_error("--forward expects LISTEN=ROUTE, got \"" + fwd + "\"");
    o.forwards.push_back({fwd.substr(0, eq), fwd.substr(eq + 1)});
  }
  const std::string& token_file = opts.token_file;
  const std::string& status_listen = opts.status_listen;
  if (o.server.empty()) return usage_error("connect needs --server HOST:PORT");
  if (o.forwards.empty()) return usage_error("connect needs at least one --forward LISTEN=ROUTE");
  if (o.cert_file.empty() != o.key_file.empty()) return usage_error("--cert and --key go together");
  if (!token_file.empty()) {
    FILE* f = std::fopen(token_file.c_str(), "r");
    if (!f) return usage_error("cannot read --token-file " + token_file);
    char buf[4096];
    size_t n = std::fread(buf, 1, sizeof buf, f);
    std::fclose(f);
    o.token.assign(buf, n);
    while (!o.token.empty() && (o.token.back() == '\n' || o.token.back() == '\r')) o.token.pop_back();
  }
  if (!setup_logging(opts.log.level.empty() ? "info" : opts.log.level,
                     opts.log.format.empty() ? "text" : opts.log.format))
    return kExitUsage;
  signal(SIGPIPE, SIG_IGN);
  disable_core_dumps();

  uv_loop_t* loop = uv_default_loop();
  start_threadpool_without_signals(loop);
  int exit_code = kExitOk;
  Signals sig;
  Client* client_ptr = nullptr;
  std::unique_ptr<client::StatusHttp> status_http;
  ClientEvents ev;
  ev.on_ready = [&](const ClientReady& r) {
    Event e{{"event", "ready"}, {"forwards", Event::array()}};
    for (auto& [addr, route] : r.forwards) {
      e["forwards"].push_back({{"listen", addr}, {"route", route}});
      spdlog::info("forwarding {} -> route \"{}\"", addr, route);
    }
    spdlog::info("tunnel up (server \"{}\", heartbeat {} ms)", r.server_id, r.heartbeat_ms);
    e["session_id"] = util::to_hex(r.session_id);
    e["server_id"] = r.server_id;
    if (status_http) e["status"] = status_http->address();
    print_event(e);
  };
  ev.on_session = [&](const ClientSessionInfo& si) {
    if (si.n > 1)
      spdlog::info("session {} up to {} (server \"{}\", {})", si.n, si.server, si.server_id,
                   si.resumed ? "resumed" : "full handshake");
    print_event({{"event", "session"},
                 {"n", si.n},
                 {"server", si.server},
                 {"server_id", si.server_id},
                 {"session_id", util::to_hex(si.session_id)},
                 {"resumed", si.resumed},
                 {"reconnects", si.counters.reconnects},
                 {"resumed_handshakes", si.counters.resumed_handshakes},
                 {"drains_followed", si.counters.drains_followed},
                 {"streams_replayed", si.counters.streams_replayed},
                 {"time_ms", unix_time_ms()}});
  };
  ev.on_session_lost = [&](uint64_t n, const std::string& why) {
    spdlog::warn("session {} lost: {}; reconnecting", n, why);
    print_event({{"event", "session_lost"}, {"n", n}, {"reason", why}, {"time_ms", unix_time_ms()}});
  };
  ev.on_drain = [&](uint64_t n, const std::string& reason, uint32_t grace_ms, const std::string& target) {
    print_event({{"event", "drain"},
                 {"n", n},
                 {"reason", reason},
                 {"grace_ms", grace_ms},
                 {"target", target},
                 {"time_ms", unix_time_ms()}});
  };
  ev.on_detached = [&](uint64_t n, const std::string& why, uint32_t window_ms) {
    print_event({{"event", "detached"}, {"n", n}, {"reason", why}, {"window_ms", window_ms}, {"time_ms", unix_time_ms()}});
  };
  ev.on_resumed = [&](uint64_t n, const std::string& server, uint64_t paused_ms, uint64_t replayed) {
    print_event({{"event", "resumed"},
                 {"n", n},
                 {"server", server},
                 {"paused_ms", paused_ms},
                 {"replayed_bytes", replayed},
                 {"time_ms", unix_time_ms()}});
  };
  ev.on_resume_failed = [&](uint64_t n, const std::string& why) {
    print_event({{"event", "resume_failed"}, {"n", n}, {"reason", why}, {"time_ms", unix_time_ms()}});
  };
  ev.on_reject = [&](uint16_t code, const std::string& reason) {
    static const char* names[] = {"?", "unsupported version", "unauthorized", "overloaded", "draining"};
    spdlog::error("rejected by server: code {} ({}): {}", code, code < 5 ? names[code] : "?", reason);
    exit_code = kExitRejected;
  };
  ev.on_closed = [&](const std::string& why) {
    if (exit_code == kExitOk) {
      spdlog::error("tunnel closed: {}", why);
      exit_code = kExitFailure;
    }
    if (status_http) status_http->stop();
    sig.stop();
  };
  Client client(loop, o, ev);
  client_ptr = &client;
  if (!status_listen.empty()) {
    auto hp = config::parse_host_port(status_listen, true);
    if (!hp) return usage_error("--status-listen expects HOST:PORT, got \"" + status_listen + "\"");
    status_http = std::make_unique<client::StatusHttp>(
        loop, client::StatusHttp::Routes{{"/status", [&]() { return client::status_json(client.status()); }}});
    std::string serr = status_http->start(hp->host, hp->port);
    if (!serr.empty()) {
      spdlog::error("--status-listen: {}", serr);
      return kExitUsage;
    }
    spdlog::info("status at http://{}/status", status_http->address());
  }
  std::string e = client.start();
  if (!e.empty()) {
    spdlog::error("{}", e);
    return kExitUsage;
  }
  sig.start(loop, [&](int) {
    spdlog::info("stopping");
    client_ptr->stop();
    if (status_http) status_http->stop();
    sig.stop();
  });
  uv_run(loop, UV_RUN_DEFAULT);
  return exit_code;
}

}  // namespace baton::cli
