// baton: the sidecar (`serve`), the client (`connect`) and their tools.
#include <arpa/inet.h>
#include <httplib.h>
#include <mbedtls/sha256.h>
#include <signal.h>
#include <sys/resource.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <uv.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>
#include <thread>
#include <chrono>

#include "baton/client.h"
#include "config/config.h"
#include "admin/admin.h"
#include "drain/drainer.h"
#include "handoff/child.h"
#include "handoff/parent.h"
#include "handoff/test_hook.h"
#include "proxy/server.h"
#include "tls/context.h"
#include "tls/dev_certs.h"
#include "client/status_http.h"
#include "util/bytes.h"
#include "util/json.h"
#include "util/log_format.h"

namespace {

constexpr int kExitOk = 0, kExitFailure = 1, kExitUsage = 2, kExitRejected = 3;

const char* kUsage = R"(baton )" BATON_VERSION R"( - TLS tunnel sidecar with hot restart

usage:
  baton serve -c FILE [--log-level L] [--log-format text|json]
      Terminate client tunnels as configured in FILE. Prints one JSON line
      {"event":"ready",...} to stdout once listening; logs go to stderr.
  baton connect --server HOST:PORT [--server ...] --forward LISTEN=ROUTE [--forward ...]
                [--token T | --token-file F] [--ca FILE] [--cert FILE --key FILE]
                [--server-name NAME] [--client-id ID] [--max-reconnects N]
                [--connect-timeout-ms MS] [--dead-after-ms MS] [--status-listen HOST:PORT]
                [--max-waiting N] [--log-level L] [--log-format F]
      Open a tunnel and forward each local connection on LISTEN to ROUTE.
      The token may also come from the BATON_TOKEN environment variable.
      Reconnects (rotating through the --server list, with backoff) when the
      session ends and follows DRAIN; --max-reconnects N gives up after N
      failed tries in a row (default 0: never). Prints {"event":"ready",...},
      then {"event":"session",...} for every session that comes up.
      --connect-timeout-ms (default 10000): dial + TLS + WELCOME, and how long
      a local connection waits (for a session, or for the server's stream
      open rate) before it is reset.
      --max-waiting N (default 4096): local connections waiting at once;
      one more is reset at once.
      --dead-after-ms (default 10000): TCP keepalive/TCP_USER_TIMEOUT bound.
      --server-name (default: the host of --server): the name the server's
      certificate must hold; an IP address is matched against its IP names.
      --status-listen: GET /status there answers the client's state as JSON.
  baton check -c FILE [--strict]
      Validate a configuration and load its TLS files. Certificates that
      peers will refuse (expired, not yet valid, weak) or that expire within
      14 days are warnings; --strict makes them exit 1.
  baton certs --out DIR [--name DNS]... [--ip ADDR]...
      Write a development CA, server and client certificates and a ticket key.
  baton drain [-c FILE | --admin HOST:PORT] [--wait]
      Start a running baton's drain (POST /drain): clients are told to move,
      open streams finish, then it exits. --wait returns when it is done or
      has exited since (for a preStop hook): exit 0; exit 1 if still draining
      after grace + 10 s, or if no baton answers at the address at all.
  baton status [-c FILE | --admin HOST:PORT] [--json]
      Show a running baton's state, tunnels, routes and limits, read from its
      admin API (GET /stats) at admin.listen of FILE, --admin, or 127.0.0.1:9901.
      --json prints the /stats answer as it came.
  baton hash-token           Read a token on stdin, print the sha256 hex for the config.
  baton version

exit status: 0 ok, 1 failure (status: admin API unreachable or in error; check --strict:
a certificate warning), 2 usage or configuration error, 3 rejected by the server
)";

bool setup_logging(const std::string& level, const std::string& format) {
  auto logger = std::make_shared<spdlog::logger>("baton", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    std::fprintf(stderr, "baton: unknown log level \"%s\" (expected trace, debug, info, warn, error)\n", level.c_str());
    return false;
  }
  logger->set_level(lvl);
  // Both formats escape control characters and invalid UTF-8 (util/log_format.h).
  auto formatter = baton::util::make_log_formatter(format);
  if (!formatter) {
    std::fprintf(stderr, "baton: unknown log format \"%s\" (expected text or json)\n", format.c_str());
    return false;
  }
  logger->set_formatter(std::move(formatter));
  spdlog::set_default_logger(logger);
  return true;
}

struct Args {
  std::vector<std::string> v;
  size_t i = 0;
  bool more() const { return i < v.size(); }
  // Value of an option: "--opt VALUE" or "--opt=VALUE".
  bool take(const std::string& name, std::string& out, bool& error) {
    const std::string& a = v[i];
    if (a == name) {
      if (i + 1 >= v.size()) {
        std::fprintf(stderr, "baton: %s needs a value\n", name.c_str());
        error = true;
        return true;
      }
      out = v[i + 1];
      i += 2;
      return true;
    }
    if (a.rfind(name + "=", 0) == 0) {
      out = a.substr(name.size() + 1);
      ++i;
      return true;
    }
    return false;
  }
};

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "baton: %s\n(see 'baton help')\n", msg.c_str());
  return kExitUsage;
}

std::string json_string(const std::string& s) { return baton::util::json_quote(s); }

std::string client_status_json(const baton::ClientStatus& s) { return baton::client::status_json(s); }

// Milliseconds since the Unix epoch, for event lines read by other programs.
uint64_t unix_time_ms() {
  return uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count());
}

void print_line(const std::string& s) {
  std::fputs((s + "\n").c_str(), stdout);
  std::fflush(stdout);
}

// SIGTERM / SIGINT handling on the loop.
struct Signals {
  uv_signal_t term, intr;
  std::function<void(int)> fn;
  void start(uv_loop_t* loop, std::function<void(int)> f) {
    fn = std::move(f);
    for (uv_signal_t* s : {&term, &intr}) {
      uv_signal_init(loop, s);
      s->data = this;
    }
    auto cb = [](uv_signal_t* s, int signum) { static_cast<Signals*>(s->data)->fn(signum); };
    uv_signal_start(&term, cb, SIGTERM);
    uv_signal_start(&intr, cb, SIGINT);
  }
  // The process is on its way out: a TERM or INT from now on (a kubelet's
  // TERM right after a drain ended by itself) must not turn a clean exit
  // into "killed by signal". Closing the last handle of a signal makes
  // libuv restore its default action (SIG_DFL), so SIG_IGN goes in after
  // the close, with both signals blocked meanwhile: one arriving in between
  // stays pending and is discarded once ignored.
  void stop() {
    sigset_t both, old;
    sigemptyset(&both);
    sigaddset(&both, SIGTERM);
    sigaddset(&both, SIGINT);
    pthread_sigmask(SIG_BLOCK, &both, &old);
    for (uv_signal_t* s : {&term, &intr})
      if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(s))) uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
    std::signal(SIGTERM, SIG_IGN);
    std::signal(SIGINT, SIG_IGN);
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    baton::handoff::test_stop_at("BATON_TEST_STOP_AT", "signals_off");
  }
};

// Process signals are taken by the loop thread only. libuv's threadpool
// (uv_getaddrinfo for upstreams) starts its threads on first use, and they
// inherit the mask of the thread that starts them: start the pool now, with
// the signals blocked. Otherwise a SIGTERM can be delivered to a pool thread
// and reach the loop only after the loop has gone on for a while (in a hot
// restart, possibly past the commit it was meant to prevent).
void start_threadpool_without_signals(uv_loop_t* loop) {
  sigset_t block, old;
  sigemptyset(&block);
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD, SIGPIPE}) sigaddset(&block, s);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  uv_work_t work;
  bool done = false;
  work.data = &done;
  if (uv_queue_work(loop, &work, [](uv_work_t*) {}, [](uv_work_t* w, int) { *static_cast<bool*>(w->data) = true; }) == 0)
    while (!done) uv_run(loop, UV_RUN_ONCE);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

int load_config(const std::string& path, baton::config::Config& out) {
  auto r = baton::config::load_file(path);
  if (auto* e = std::get_if<baton::config::ConfigError>(&r)) {
    std::fprintf(stderr, "%s\n", e->to_string().c_str());
    return kExitUsage;
  }
  out = std::get<baton::config::Config>(r);
  return kExitOk;
}

// Raises the soft descriptor limit to the hard one: a tunnel is one fd plus
// one per stream, and a handoff briefly holds two copies of each.
void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// No core files: a core of this process holds TLS keys, ticket keys and
// tokens, and secrets must not reach the disk (docs/security.md). Only the
// soft limit: an operator debugging a crash can raise it on the running
// process (prlimit --pid PID --core=unlimited).
void disable_core_dumps() {
  rlimit rl;
  if (getrlimit(RLIMIT_CORE, &rl) == 0 && rl.rlim_cur != 0) {
    rl.rlim_cur = 0;
    setrlimit(RLIMIT_CORE, &rl);
  }
}

int cmd_serve(Args& a) {
  std::string cfg_path, level, format;
  bool err = false, no_takeover = false;
  while (a.more() && !err) {
    if (a.v[a.i] == "--no-takeover") {
      no_takeover = true;
      ++a.i;
      continue;
    }
    if (a.take("-c", cfg_path, err) || a.take("--config", cfg_path, err) || a.take("--log-level", level, err) ||
        a.take("--log-format", format, err))
      continue;
    return usage_error("serve: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
  if (cfg_path.empty()) return usage_error("serve needs -c FILE");
  baton::config::Config cfg;
  if (int rc = load_config(cfg_path, cfg)) return rc;
  if (!setup_logging(level.empty() ? cfg.log_level : level, format.empty() ? cfg.log_format : format))
    return kExitUsage;
  signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  disable_core_dumps();

  uv_loop_t* loop = uv_default_loop();
  start_threadpool_without_signals(loop);
  std::string error;
  std::unique_ptr<baton::proxy::Server> server;
  baton::handoff::ChildResult takeover;
  // SIGTERM and SIGINT from the start: one that comes while this process is
  // taking over calls the takeover off (the old process keeps everything),
  // or, if the old one committed first, is acted on once this process
  // serves (docs/operations.md "When lifecycle events meet").
  Signals sig;
  int early_signal = 0;
  std::unique_ptr<baton::handoff::Child> child;
  sig.start(loop, [&](int signum) {
    if (!early_signal) early_signal = signum;
    if (child)
      child->abandon(std::string("received ") + (signum == SIGTERM ? "SIGTERM" : "SIGINT") + " while taking over");
  });
  int hfd = no_takeover ? -1 : baton::handoff::connect_handoff(cfg.handoff_socket, error);
  if (hfd < 0 && !error.empty()) {
    spdlog::error("{} (use --no-takeover to start without taking over)", error);
    return kExitFailure;
  }
  if (hfd >= 0) {
    // A live baton answers on the handoff socket: take its listener and tunnels.
    spdlog::info("taking over from the baton on {}", cfg.handoff_socket);
    bool done = false;
    child = std::make_unique<baton::handoff::Child>(
        loop, hfd, cfg.handoff_timeout_ms * 3,
        [&](const std::vector<baton::tls::TicketKey>& keys, std::string& e) {
          return baton::proxy::Server::create(loop, cfg, e, keys);
        },
        [&](const baton::handoff::ChildResult& r) {
          takeover = r;
          done = true;
        });
    while (!done && uv_run(loop, UV_RUN_ONCE)) {
    }
    if (takeover.foreign) {
      spdlog::error("{} (handoff.socket {}; use another path, or --no-takeover if the listen address is free)",
                    takeover.error, cfg.handoff_socket);
      child.reset();
      uv_run(loop, UV_RUN_NOWAIT);
      return kExitFailure;
    }
    if (!takeover.ok && takeover.abandoned) {
      spdlog::info("takeover called off: {}; the old process keeps serving", takeover.error);
      child.reset();
      uv_run(loop, UV_RUN_NOWAIT);
      return kExitOk;
    }
    if (!takeover.ok && !takeover.old_gone) {
      spdlog::error("takeover failed: {}; the old process keeps serving", takeover.error);
      child.reset();
      uv_run(loop, UV_RUN_NOWAIT);
      return kExitFailure;
    }
    if (takeover.ok) {
      server = child->take_server();
      child.reset();
      spdlog::info("took over {} tunnels from pid {} in {} ms (epoch {})", takeover.tunnels, takeover.old_pid,
                   takeover.elapsed_ms, server->epoch());
    } else if (std::string why; baton::handoff::old_process_alive(cfg.handoff_socket, 1000, why)) {
      // The connection closed without a word, but the old process is still
      // there and refused this one (its refusal is lost when it closes
      // before reading our hello). Starting fresh would be a second server.
      spdlog::error("takeover failed: {}; the old process is still there ({}): not starting a second server",
                    takeover.error, why);
      child.reset();
      uv_run(loop, UV_RUN_NOWAIT);
      return kExitFailure;
    } else {
      // The old process died before handing anything over (its tunnels died
      // with it): serve instead of leaving the port with nobody behind it.
      spdlog::warn("takeover failed: {}; the old process is gone, starting fresh", takeover.error);
      child.reset();
      uv_run(loop, UV_RUN_NOWAIT);
      hfd = -1;
    }
  }
  if (!server && early_signal) {
    spdlog::info("received {} while starting: not serving", early_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    return kExitOk;
  }
  if (!server) {
    server = baton::proxy::Server::create(loop, cfg, error);
    if (!server) {
      spdlog::error("{}", error);
      return kExitUsage;
    }
    error = server->listen();
    if (!error.empty()) {
      spdlog::error("{}", error);
      return kExitFailure;
    }
  }

  // Exit path after handing everything to a successor: let what stays here
  // (tunnels draining, tunnels closing) end, then leave.
  bool handed_over = false;
  uint64_t handed_over_ms = 0;
  uv_timer_t exit_timer;
  uv_timer_init(loop, &exit_timer);
  std::unique_ptr<baton::handoff::Parent> parent;
  std::unique_ptr<baton::admin::Admin> admin;
  std::unique_ptr<baton::drain::Drainer> drainer;
  std::function<void()> check_exit = [&]() {
    parent.reset();
    admin.reset();  // the successor answers on the admin port now
    if (drainer) drainer->stop();
    size_t left = server->tunnel_count(), draining = server->draining_tunnels();
    bool closing_too_long = draining == 0 && uv_now(loop) - handed_over_ms >= 500;
    if (left == 0 || closing_too_long) {
      if (left) spdlog::info("leaving {} closing tunnels behind", left);
      uv_timer_stop(&exit_timer);
      uv_close(reinterpret_cast<uv_handle_t*>(&exit_timer), nullptr);
      sig.stop();
      server.reset();  // what is still closing is cut: the successor owns the listener and every live tunnel
    }
  };
  exit_timer.data = &check_exit;

  baton::handoff::ParentOptions po;
  po.socket_path = cfg.handoff_socket;
  po.step_timeout_ms = cfg.handoff_timeout_ms;
  po.drain_grace_ms = cfg.drain.grace_ms;
  po.reconnect_hint = cfg.drain.reconnect_hint;
  if (const char* v = std::getenv("BATON_TEST_HANDOFF_STATE_VERSION")) po.state_version_override = uint16_t(std::atoi(v));
  parent = std::make_unique<baton::handoff::Parent>(loop, *server, po, [&](const baton::handoff::HandoffStats& st) {
    handed_over = true;
    handed_over_ms = uv_now(loop);
    print_line("{\"event\":\"handed_over\",\"pid\":" + std::to_string(getpid()) + ",\"tunnels\":" +
               std::to_string(st.tunnels_sent) + ",\"draining\":" + std::to_string(st.tunnels_drained) +
               ",\"ms\":" + std::to_string(st.committed_ms - st.started_ms) + "}");
    uv_timer_start(&exit_timer, [](uv_timer_t* t) { (*static_cast<std::function<void()>*>(t->data))(); }, 0, 10);
  });
  error = parent->listen();
  if (!error.empty()) {
    spdlog::error("{}", error);
    return kExitFailure;
  }
  admin = std::make_unique<baton::admin::Admin>(loop, *server);
  error = admin->start(cfg.admin);
  if (error.empty()) error = admin->start_lifecycle(cfg.lifecycle, cfg.drain.grace_ms);
  if (!error.empty()) {
    spdlog::error("{}", error);
    return kExitFailure;
  }
  if (cfg.lifecycle.listen) spdlog::info("lifecycle hook: GET http://{}/drain (X-Baton-Token)", admin->lifecycle_address());
  server->set_state(baton::proxy::ServeState::serving);
  spdlog::info("baton {} serving tunnels on {} as \"{}\" ({} routes, epoch {})", BATON_VERSION, server->listen_address(),
               server->server_id(), cfg.routes.size(), server->epoch());
  // Drain (POST /drain, `baton drain`, SIGTERM): tell every client to move,
  // let the streams finish, then exit.
  auto stop_now = [&]() {
    if (!server) return;
    drainer->stop();
    // A restart under way is called off first: the new process is told and
    // exits instead of starting what this one exported.
    if (parent) parent->cancel("this process is stopping at once");
    parent.reset();
    admin.reset();
    if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&exit_timer))) {
      uv_timer_stop(&exit_timer);
      uv_close(reinterpret_cast<uv_handle_t*>(&exit_timer), nullptr);
    }
    server->stop();
    sig.stop();
  };
  // A drain can end inside whatever started it: POST /drain (or the
  // lifecycle hook) to a process with no tunnels and drain.delay_ms 0 ends
  // within the admin's job on the loop. Stopping there would destroy the
  // admin under its own callback (and make its HTTP thread wait out the job:
  // 503). So the exit happens on the next loop iteration.
  uv_timer_t stop_timer;
  uv_timer_init(loop, &stop_timer);
  stop_timer.data = &stop_now;
  drainer = std::make_unique<baton::drain::Drainer>(loop, *server, cfg.drain, [&](const std::string&) {
    uv_timer_start(&stop_timer, [](uv_timer_t* t) { (*static_cast<decltype(stop_now)*>(t->data))(); }, 0, 0);
  });
  std::string drain_trigger = "POST /drain";
  server->set_drain_handler([&]() {
    // A drain is never handed over: a restart in progress is called off
    // first (docs/operations.md "When lifecycle events meet").
    if (parent) parent->cancel("a drain started (" + drain_trigger + "): this process drains instead");
    drainer->start(drain_trigger);
  });
  // Handlers before the ready line: whoever reads it may signal at once.
  // SIGTERM: drain, then exit. SIGINT, or SIGTERM again: exit at once.
  sig.fn = [&](int signum) {
    if (!server) return;
    if (signum == SIGTERM && drainer->phase() == baton::drain::DrainPhase::idle && !handed_over) {
      drain_trigger = "SIGTERM";
      server->start_drain();
      return;
    }
    spdlog::info("received {}, closing {} tunnels now", signum == SIGTERM ? "SIGTERM" : "SIGINT", server->tunnel_count());
    stop_now();
  };
  print_line("{\"event\":\"ready\",\"listen\":" + json_string(server->listen_address()) +
             ",\"pid\":" + std::to_string(getpid()) + ",\"epoch\":" + std::to_string(server->epoch()) +
             ",\"takeover\":" + (hfd >= 0 ? "true" : "false") + ",\"tunnels\":" + std::to_string(takeover.tunnels) +
             ",\"admin\":" + json_string(admin->address()) +
             (cfg.lifecycle.listen ? ",\"lifecycle\":" + json_string(admin->lifecycle_address()) : std::string()) + "}");
  if (early_signal) {
    // Came while taking over, after the old process had committed: this
    // process owns the tunnels, so the signal means what it always means.
    spdlog::info("acting on the {} that came during the takeover", early_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    sig.fn(early_signal);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  uv_close(reinterpret_cast<uv_handle_t*>(&stop_timer), nullptr);
  parent.reset();
  admin.reset();
  drainer.reset();
  server.reset();
  uv_run(loop, UV_RUN_DEFAULT);  // let the close callbacks run
  spdlog::info(handed_over ? "handed over, exiting" : "stopped");
  return kExitOk;
}

int cmd_connect(Args& a) {
  baton::ClientOptions o;
  std::string level = "info", format = "text", token_file, fwd, status_listen;
  bool err = false;
  while (a.more() && !err) {
    if (a.take("--forward", fwd, err) || a.take("-L", fwd, err)) {
      size_t eq = fwd.rfind('=');
      if (eq == std::string::npos) return usage_error("--forward expects LISTEN=ROUTE, got \"" + fwd + "\"");
      o.forwards.push_back({fwd.substr(0, eq), fwd.substr(eq + 1)});
      continue;
    }
    std::string srv, num;
    if (a.take("--server", srv, err)) {
      if (o.server.empty()) o.server = srv;
      else o.servers.push_back(srv);
      continue;
    }
    const char* num_flag = nullptr;
    uint32_t* num_dst = nullptr;
    uint32_t num_min = 0;
    if (a.take("--max-reconnects", num, err)) num_flag = "--max-reconnects", num_dst = &o.max_reconnects;
    else if (a.take("--connect-timeout-ms", num, err)) num_flag = "--connect-timeout-ms", num_dst = &o.connect_timeout_ms, num_min = 100;
    else if (a.take("--dead-after-ms", num, err)) num_flag = "--dead-after-ms", num_dst = &o.dead_after_ms;
    else if (a.take("--max-waiting", num, err)) num_flag = "--max-waiting", num_dst = &o.max_waiting, num_min = 1;
    if (num_flag) {
      char* end = nullptr;
      unsigned long v = std::strtoul(num.c_str(), &end, 10);
      if (num.empty() || *end || v > UINT32_MAX || v < num_min)
        return usage_error(std::string(num_flag) + " expects a number" + (num_min ? " >= " + std::to_string(num_min) : "") +
                           ", got \"" + num + "\"");
      *num_dst = uint32_t(v);
      continue;
    }
    if (a.take("--status-listen", status_listen, err)) continue;
    if (a.take("--token", o.token, err) ||
        a.take("--token-file", token_file, err) || a.take("--ca", o.ca_file, err) ||
        a.take("--cert", o.cert_file, err) || a.take("--key", o.key_file, err) ||
        a.take("--server-name", o.server_name, err) || a.take("--client-id", o.client_id, err) ||
        a.take("--log-level", level, err) || a.take("--log-format", format, err))
      continue;
    return usage_error("connect: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
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
  if (o.token.empty())
    if (const char* t = std::getenv("BATON_TOKEN")) o.token = t;
  if (!setup_logging(level, format)) return kExitUsage;
  signal(SIGPIPE, SIG_IGN);
  disable_core_dumps();

  uv_loop_t* loop = uv_default_loop();
  start_threadpool_without_signals(loop);
  int exit_code = kExitOk;
  Signals sig;
  baton::Client* client_ptr = nullptr;
  std::unique_ptr<baton::client::StatusHttp> status_http;
  baton::ClientEvents ev;
  ev.on_ready = [&](const baton::ClientReady& r) {
    std::string fw;
    for (auto& [addr, route] : r.forwards) {
      if (!fw.empty()) fw += ",";
      fw += "{\"listen\":" + json_string(addr) + ",\"route\":" + json_string(route) + "}";
      spdlog::info("forwarding {} -> route \"{}\"", addr, route);
    }
    spdlog::info("tunnel up (server \"{}\", heartbeat {} ms)", r.server_id, r.heartbeat_ms);
    print_line("{\"event\":\"ready\",\"forwards\":[" + fw + "],\"session_id\":\"" +
               baton::util::to_hex(r.session_id) + "\",\"server_id\":" + json_string(r.server_id) +
               (status_http ? ",\"status\":" + json_string(status_http->address()) : std::string()) + "}");
  };
  ev.on_session = [&](const baton::ClientSessionInfo& si) {
    if (si.n > 1)
      spdlog::info("session {} up to {} (server \"{}\", {})", si.n, si.server, si.server_id,
                   si.resumed ? "resumed" : "full handshake");
    print_line("{\"event\":\"session\",\"n\":" + std::to_string(si.n) + ",\"server\":" + json_string(si.server) +
               ",\"server_id\":" + json_string(si.server_id) + ",\"session_id\":\"" +
               baton::util::to_hex(si.session_id) + "\",\"resumed\":" + (si.resumed ? "true" : "false") +
               ",\"reconnects\":" + std::to_string(si.counters.reconnects) +
               ",\"resumed_handshakes\":" + std::to_string(si.counters.resumed_handshakes) +
               ",\"drains_followed\":" + std::to_string(si.counters.drains_followed) +
               ",\"streams_replayed\":" + std::to_string(si.counters.streams_replayed) +
               ",\"time_ms\":" + std::to_string(unix_time_ms()) + "}");
  };
  ev.on_session_lost = [&](uint64_t n, const std::string& why) {
    spdlog::warn("session {} lost: {}; reconnecting", n, why);
    print_line("{\"event\":\"session_lost\",\"n\":" + std::to_string(n) + ",\"reason\":" + json_string(why) +
               ",\"time_ms\":" + std::to_string(unix_time_ms()) + "}");
  };
  ev.on_drain = [&](uint64_t n, const std::string& reason, uint32_t grace_ms, const std::string& target) {
    print_line("{\"event\":\"drain\",\"n\":" + std::to_string(n) + ",\"reason\":" + json_string(reason) +
               ",\"grace_ms\":" + std::to_string(grace_ms) + ",\"target\":" + json_string(target) +
               ",\"time_ms\":" + std::to_string(unix_time_ms()) + "}");
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
  baton::Client client(loop, o, ev);
  client_ptr = &client;
  if (!status_listen.empty()) {
    auto hp = baton::config::parse_host_port(status_listen, true);
    if (!hp) return usage_error("--status-listen expects HOST:PORT, got \"" + status_listen + "\"");
    status_http = std::make_unique<baton::client::StatusHttp>(
        loop, baton::client::StatusHttp::Routes{{"/status", [&]() { return client_status_json(client.status()); }}});
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

int cmd_check(Args& a) {
  std::string cfg_path;
  bool err = false, strict = false;
  while (a.more() && !err) {
    if (a.take("-c", cfg_path, err) || a.take("--config", cfg_path, err)) continue;
    if (a.v[a.i] == "--strict") {
      strict = true;
      ++a.i;
      continue;
    }
    return usage_error("check: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
  if (cfg_path.empty()) return usage_error("check needs -c FILE");
  baton::config::Config cfg;
  if (int rc = load_config(cfg_path, cfg)) return rc;
  spdlog::set_level(spdlog::level::err);
  std::string error;
  uv_loop_t loop;
  uv_loop_init(&loop);
  auto server = baton::proxy::Server::create(&loop, cfg, error);
  // Certificates that load but that peers will refuse (docs/configuration.md "Certificate checks").
  std::vector<std::string> warnings;
  if (server) warnings = server->tls().warnings();
  server.reset();
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (!error.empty()) {
    // Errors about a file the configuration names start with file:line:column already.
    if (error.rfind(cfg_path + ":", 0) == 0) std::fprintf(stderr, "%s\n", error.c_str());
    else std::fprintf(stderr, "%s: %s\n", cfg_path.c_str(), error.c_str());
    return kExitUsage;
  }
  for (const std::string& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  std::printf("%s: ok (%zu routes, %zu tokens, listen %s)%s\n", cfg_path.c_str(), cfg.routes.size(),
              cfg.tokens.size(), cfg.listen.to_string().c_str(),
              warnings.empty() ? "" : (", " + std::to_string(warnings.size()) + " warning(s)").c_str());
  return strict && !warnings.empty() ? kExitFailure : kExitOk;
}

int cmd_certs(Args& a) {
  baton::tls::DevCertOptions o;
  std::vector<std::string> names, ips;
  std::string v;
  bool err = false;
  while (a.more() && !err) {
    if (a.take("--out", o.out_dir, err)) continue;
    if (a.take("--name", v, err)) { names.push_back(v); continue; }
    if (a.take("--ip", v, err)) { ips.push_back(v); continue; }
    return usage_error("certs: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
  if (o.out_dir.empty()) return usage_error("certs needs --out DIR");
  // Added to the defaults (localhost, 127.0.0.1, ::1), each name once.
  auto add = [](std::vector<std::string>& to, const std::vector<std::string>& more) {
    for (const std::string& m : more)
      if (std::find(to.begin(), to.end(), m) == to.end()) to.push_back(m);
  };
  add(o.server_names, names);
  add(o.server_ips, ips);
  std::string e = baton::tls::write_dev_certs(o);
  if (!e.empty()) {
    std::fprintf(stderr, "baton certs: %s\n", e.c_str());
    return kExitFailure;
  }
  std::printf("wrote ca.crt ca.key server.crt server.key client.crt client.key ticket.key to %s\n", o.out_dir.c_str());
  return kExitOk;
}

int cmd_hash_token() {
  std::string token((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
  if (token.empty()) return usage_error("hash-token: no token on stdin");
  uint8_t d[32];
  mbedtls_sha256_ret(reinterpret_cast<const unsigned char*>(token.data()), token.size(), d, 0);
  std::printf("%s\n", baton::util::to_hex(d).c_str());
  return kExitOk;
}


// --- baton status -----------------------------------------------------------
// A reader for the admin API's /stats JSON (docs/operations.md). None of the
// project's dependencies parses JSON and the document is small, so a minimal
// recursive-descent parser does; it checks bounds and nesting depth, since
// whatever answers on the address may not be baton.

struct Json {
  enum class Kind { null, boolean, number, string, array, object };
  Kind kind = Kind::null;
  bool b = false;
  double n = 0;
  std::string s;
  std::vector<Json> items;        // array elements, or object member values
  std::vector<std::string> keys;  // object member names, parallel to items

  // Member `key` of an object; a null value when absent or not an object.
  const Json& operator[](const std::string& key) const {
    static const Json none;
    if (kind == Kind::object)
      for (size_t i = 0; i < keys.size(); ++i)
        if (keys[i] == key) return items[i];
    return none;
  }
  double num(double dflt = 0) const { return kind == Kind::number ? n : dflt; }
  std::string str(const std::string& dflt = "") const { return kind == Kind::string ? s : dflt; }
  bool truthy() const { return kind == Kind::boolean && b; }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : t_(text) {}
  // Parses the whole text; false (and error()) if it is not one JSON value.
  bool parse(Json& out) {
    if (!value(out, 0)) return false;
    ws();
    if (i_ != t_.size()) return fail("trailing characters");
    return true;
  }
  const std::string& error() const { return error_; }

 private:
  bool fail(const char* what) {
    if (error_.empty()) error_ = std::string(what) + " at offset " + std::to_string(i_);
    return false;
  }
  void ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  bool lit(const char* w) {
    size_t n = std::strlen(w);
    if (t_.compare(i_, n, w) != 0) return fail("unexpected token");
    i_ += n;
    return true;
  }
  bool value(Json& v, int depth) {
    if (depth > 64) return fail("nested too deeply");
    ws();
    if (i_ >= t_.size()) return fail("unexpected end");
    char c = t_[i_];
    if (c == '{') return object(v, depth);
    if (c == '[') return array(v, depth);
    if (c == '"') {
      v.kind = Json::Kind::string;
      return string(v.s);
    }
    if (c == 't' || c == 'f') {
      v.kind = Json::Kind::boolean;
      v.b = c == 't';
      return lit(v.b ? "true" : "false");
    }
    if (c == 'n') return lit("null");
    return number(v);
  }
  bool object(Json& v, int depth) {
    v.kind = Json::Kind::object;
    ++i_;
    ws();
    if (i_ < t_.size() && t_[i_] == '}') return ++i_, true;
    for (;;) {
      ws();
      std::string key;
      if (i_ >= t_.size() || t_[i_] != '"' || !string(key)) return fail("expected a member name");
      ws();
      if (i_ >= t_.size() || t_[i_] != ':') return fail("expected ':'");
      ++i_;
      Json m;
      if (!value(m, depth + 1)) return false;
      v.keys.push_back(std::move(key));
      v.items.push_back(std::move(m));
      ws();
      if (i_ < t_.size() && t_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < t_.size() && t_[i_] == '}') return ++i_, true;
      return fail("expected ',' or '}'");
    }
  }
  bool array(Json& v, int depth) {
    v.kind = Json::Kind::array;
    ++i_;
    ws();
    if (i_ < t_.size() && t_[i_] == ']') return ++i_, true;
    for (;;) {
      Json item;
      if (!value(item, depth + 1)) return false;
      v.items.push_back(std::move(item));
      ws();
      if (i_ < t_.size() && t_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < t_.size() && t_[i_] == ']') return ++i_, true;
      return fail("expected ',' or ']'");
    }
  }
  bool hex4(uint32_t& out) {
    out = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      if (i_ >= t_.size()) return fail("short \\u escape");
      char c = t_[i_];
      int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (d < 0) return fail("bad \\u escape");
      out = out * 16 + uint32_t(d);
    }
    return true;
  }
  bool string(std::string& out) {
    ++i_;  // opening quote
    while (i_ < t_.size()) {
      char c = t_[i_++];
      if (c == '"') return true;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= t_.size()) break;
      char e = t_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp;
          if (!hex4(cp)) return false;
          if (cp >= 0xd800 && cp < 0xdc00 && t_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            uint32_t lo;
            if (!hex4(lo)) return false;
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          // UTF-8
          if (cp < 0x80) {
            out += char(cp);
          } else if (cp < 0x800) {
            out += char(0xc0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3f));
          } else if (cp < 0x10000) {
            out += char(0xe0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3f));
            out += char(0x80 | (cp & 0x3f));
          } else {
            out += char(0xf0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3f));
            out += char(0x80 | ((cp >> 6) & 0x3f));
            out += char(0x80 | (cp & 0x3f));
          }
          break;
        }
        default: return fail("bad escape");
      }
    }
    return fail("unterminated string");
  }
  bool number(Json& v) {
    size_t start = i_;
    while (i_ < t_.size() && std::strchr("+-0123456789.eE", t_[i_])) ++i_;
    if (start == i_) return fail("unexpected character");
    std::string tok = t_.substr(start, i_ - start);
    char* end = nullptr;
    v.kind = Json::Kind::number;
    v.n = std::strtod(tok.c_str(), &end);
    if (!end || *end) return fail("bad number");
    return true;
  }

  const std::string& t_;
  size_t i_ = 0;
  std::string error_;
};

std::string human_bytes(double b) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024 && u < 5) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%.0f B", b);
  else std::snprintf(buf, sizeof buf, "%.1f %s", b, units[u]);
  return buf;
}

std::string human_duration(double seconds) {
  uint64_t s = seconds > 0 ? uint64_t(seconds) : 0;
  char buf[48];
  if (s < 60 && seconds == double(s)) std::snprintf(buf, sizeof buf, "%lus", (unsigned long)s);
  else if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", seconds > 0 ? seconds : 0.0);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%lum%02lus", (unsigned long)(s / 60), (unsigned long)(s % 60));
  else if (s < 86400)
    std::snprintf(buf, sizeof buf, "%luh%02lum", (unsigned long)(s / 3600), (unsigned long)(s / 60 % 60));
  else std::snprintf(buf, sizeof buf, "%lud%02luh", (unsigned long)(s / 86400), (unsigned long)(s / 3600 % 24));
  return buf;
}

std::string count(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

// "accepted 3, established 2" from {"accepted":3,"established":2}; "none" if empty.
std::string counters_line(const Json& o) {
  std::string out;
  for (size_t i = 0; i < o.keys.size(); ++i) {
    if (!out.empty()) out += ", ";
    out += o.keys[i] + " " + count(o.items[i].num());
  }
  return out.empty() ? "none" : out;
}

// A table with a header row; align[c] is 'l' or 'r' for column c.
std::string table(const std::vector<std::vector<std::string>>& rows, const std::string& indent, const char* align) {
  std::vector<size_t> w;
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size(); ++c) {
      if (w.size() <= c) w.push_back(0);
      w[c] = std::max(w[c], r[c].size());
    }
  std::string out;
  for (const auto& r : rows) {
    std::string line = indent;
    for (size_t c = 0; c < r.size(); ++c) {
      if (c) line += "  ";
      std::string pad(w[c] - r[c].size(), ' ');
      bool left = c < std::strlen(align) && align[c] == 'l';
      line += left ? r[c] + pad : pad + r[c];
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// The human-readable rendering of /stats.
std::string render_status(const Json& st, const std::string& admin) {
  std::string o;
  auto row = [&](const std::string& label, const std::string& text) {
    o += label + std::string(label.size() < 11 ? 11 - label.size() : 1, ' ') + text + "\n";
  };
  row("process", "pid " + count(st["pid"].num()) + ", baton " + st["version"].str("?") + ", server_id \"" +
                     st["server_id"].str() + "\", epoch " + count(st["epoch"].num()) + ", up " +
                     human_duration(st["uptime_s"].num()));
  row("state", st["state"].str("?") + (st["ready"].truthy() ? " (ready)" : " (not ready)"));
  row("listen", st["listen"].str("-") + ", admin " + admin);
  const Json& d = st["drain"];
  if (d["draining"].truthy()) {
    row("drain", "draining for " + human_duration(d["elapsed_ms"].num() / 1000) + " of " +
                     human_duration(d["grace_ms"].num() / 1000) + " grace; " + count(d["tunnels_left"].num()) +
                     " tunnels and " + count(d["streams_left"].num()) + " streams left");
  } else {
    row("drain", "not draining (grace " + human_duration(d["grace_ms"].num() / 1000) + ")");
  }
  const Json& t = st["tunnels"];
  row("tunnels", count(t["active"].num()) + " active, " + count(t["handshaking"].num()) + " handshaking, " +
                     count(t["queued"].num()) + " queued (" + count(t["connections"].num()) + " connections)");
  row("  totals", counters_line(t["total"]));
  row("streams", count(st["streams"]["active"].num()) + " active");

  std::vector<const Json*> routes;
  const Json& route_list = st["routes"];
  if (route_list.kind == Json::Kind::array)
    for (const Json& r : route_list.items) routes.push_back(&r);
  std::stable_sort(routes.begin(), routes.end(), [](const Json* a, const Json* b) {
    return (*a)["bytes_up"].num() + (*a)["bytes_down"].num() > (*b)["bytes_up"].num() + (*b)["bytes_down"].num();
  });
  o += "\nroutes (by traffic)\n";
  std::vector<std::vector<std::string>> rows = {
      {"ROUTE", "UPSTREAM", "UP", "DOWN", "ACTIVE", "OPENED", "CONNECT FAILED"}};
  for (const Json* r : routes)
    rows.push_back({(*r)["name"].str(), (*r)["upstream"].str(), human_bytes((*r)["bytes_up"].num()),
                    human_bytes((*r)["bytes_down"].num()), count((*r)["streams_active"].num()),
                    count((*r)["streams_opened"].num()), count((*r)["connect_failed"].num())});
  o += table(rows, "  ", "llrrrrr");

  double warn = st["warn_percent"].num(80);
  o += "\nlimits (warning at " + count(warn) + "%)\n";
  rows = {{"LIMIT", "USED", "MAX", "USE", ""}};
  const Json& limits = st["limits"];
  for (size_t i = 0; i < limits.keys.size(); ++i) {
    const std::string& name = limits.keys[i];
    const Json& l = limits.items[i];
    double limit = l["limit"].num(), used = l["used"].num(), pct = l["ratio"].num() * 100;
    char p[16];
    std::snprintf(p, sizeof p, "%.0f%%", std::floor(pct));
    bool hot = limit > 0 && pct >= warn;
    rows.push_back({name, count(used), limit > 0 ? count(limit) : "-", limit > 0 ? p : "-", hot ? "<- high" : ""});
  }
  o += table(rows, "  ", "lrrrl");

  o += "\n";
  row("overload", "rejections: " + counters_line(st["overload_rejections"]));
  row("handoff", "tunnels: " + counters_line(st["handoff"]));
  const Json& pr = st["process"];
  row("resources", "rss " + human_bytes(pr["resident_bytes"].num()) + ", " + count(pr["open_fds"].num()) +
                       " open fds");
  return o;
}

// The admin API's address: --admin, or admin.listen of -c FILE (a wildcard
// address answers on loopback), or the default 127.0.0.1:9901. 0 or an exit code.
int admin_address(const std::string& cmd, const std::string& cfg_path, const std::string& admin_arg,
                  baton::config::HostPort& addr) {
  addr = baton::config::HostPort{"127.0.0.1", 9901};
  if (!admin_arg.empty()) {
    std::string s = admin_arg;
    if (s.rfind("http://", 0) == 0) s = s.substr(7);
    while (!s.empty() && s.back() == '/') s.pop_back();
    auto hp = baton::config::parse_host_port(s, false);
    if (!hp) return usage_error(cmd + ": --admin expects HOST:PORT (e.g. 127.0.0.1:9901), got \"" + admin_arg + "\"");
    addr = *hp;
  } else if (!cfg_path.empty()) {
    baton::config::Config cfg;
    if (int rc = load_config(cfg_path, cfg)) return rc;
    if (cfg.admin.port == 0)
      return usage_error(cmd + ": admin.listen in " + cfg_path +
                         " has port 0 (any free port); give the bound address with --admin HOST:PORT");
    addr = cfg.admin;
  }
  // A wildcard listen address answers on loopback.
  in_addr a4;
  in6_addr a6;
  if (inet_pton(AF_INET, addr.host.c_str(), &a4) == 1 && a4.s_addr == htonl(INADDR_ANY)) addr.host = "127.0.0.1";
  else if (inet_pton(AF_INET6, addr.host.c_str(), &a6) == 1 && IN6_IS_ADDR_UNSPECIFIED(&a6)) addr.host = "::1";
  return 0;
}

// `baton drain`: POST /drain; with --wait, until the process is gone or the
// drain is done (a preStop hook: the pod's SIGTERM then finds nothing left).
//
// What --wait can tell from outside: an admin API that answered (or took the
// connection) at the start and stops answering later means the process
// exited, its drain over: 0. One that never took a connection cannot be told
// from a wrong address, so that is an error (1), never "already drained".
int cmd_drain(Args& a) {
  std::string cfg_path, admin_arg;
  bool err = false, wait = false;
  while (a.more() && !err) {
    if (a.v[a.i] == "--wait") {
      wait = true;
      ++a.i;
      continue;
    }
    if (a.take("-c", cfg_path, err) || a.take("--config", cfg_path, err) || a.take("--admin", admin_arg, err))
      continue;
    return usage_error("drain: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
  baton::config::HostPort addr;
  if (int rc = admin_address("drain", cfg_path, admin_arg, addr)) return rc;
  const std::string where = addr.to_string();
  httplib::Client cli(addr.host, addr.port);
  cli.set_connection_timeout(2, 0);
  cli.set_read_timeout(5, 0);
  auto res = cli.Post("/drain", "", "application/json");
  if (!res) {
    httplib::Error e = res.error();
    if (e == httplib::Error::Connection || e == httplib::Error::ConnectionTimeout) {
      std::fprintf(stderr,
                   "baton drain: cannot reach the admin API at http://%s (%s): no baton serve answers there (not "
                   "running, already exited, or its admin.listen is another address); nothing was drained\n",
                   where.c_str(), e == httplib::Error::Connection ? "connection refused" : "connection timed out");
      return kExitFailure;
    }
    // It took the connection, then closed it without an answer: a process on
    // its way out (the drain that ends it may be another's).
    if (!wait) {
      std::fprintf(stderr, "baton drain: POST http://%s/drain got no answer (%s): the process may be exiting\n",
                   where.c_str(), httplib::to_string(e).c_str());
      return kExitFailure;
    }
  } else if (res->status != 200) {
    std::string body = res->body.substr(0, 300);
    while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
    // 503: the process is exiting, or its event loop is busy (the drain is
    // queued to it and starts when the loop gets there). --wait finds out.
    if (!wait || res->status != 503) {
      std::fprintf(stderr, "baton drain: POST http://%s/drain answered %d: %s\n", where.c_str(), res->status,
                   body.c_str());
      return kExitFailure;
    }
  } else {
    std::fputs(res->body.c_str(), stdout);
    std::fflush(stdout);
    if (!wait || res->body.find("\"phase\":\"done\"") != std::string::npos) return kExitOk;
  }
  // Bounded by the grace period the server reported, plus a margin for its exit.
  uint64_t grace_ms = 30000;
  size_t at = res ? res->body.find("\"grace_ms\":") : std::string::npos;
  if (at != std::string::npos) grace_ms = std::strtoull(res->body.c_str() + at + 11, nullptr, 10);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(grace_ms + 10000);
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = cli.Get("/drain");
    // Refused: nothing listens any more, the process is gone. (No answer or
    // a timeout is not proof of that: ask again.)
    if (!r && r.error() == httplib::Error::Connection) {
      std::fputs("{\"drained\":true,\"process\":\"gone\"}\n", stdout);
      return kExitOk;
    }
    if (r && r->status == 200 && r->body.find("\"phase\":\"done\"") != std::string::npos) {
      std::fputs(r->body.c_str(), stdout);
      return kExitOk;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // polling another process: no event to await
  }
  std::fprintf(stderr, "baton drain: still draining after %llu ms\n", static_cast<unsigned long long>(grace_ms + 10000));
  return kExitFailure;
}

int cmd_status(Args& a) {
  std::string cfg_path, admin_arg;
  bool err = false, json = false;
  while (a.more() && !err) {
    if (a.v[a.i] == "--json") {
      json = true;
      ++a.i;
      continue;
    }
    if (a.take("-c", cfg_path, err) || a.take("--config", cfg_path, err) || a.take("--admin", admin_arg, err))
      continue;
    return usage_error("status: unknown argument " + a.v[a.i]);
  }
  if (err) return kExitUsage;
  if (!cfg_path.empty() && !admin_arg.empty()) return usage_error("status: give -c FILE or --admin HOST:PORT, not both");

  baton::config::HostPort addr;
  if (int rc = admin_address("status", cfg_path, admin_arg, addr)) return rc;
  const std::string where = addr.to_string();

  httplib::Client cli(addr.host, addr.port);
  cli.set_connection_timeout(2, 0);
  cli.set_read_timeout(5, 0);  // the admin waits up to 1 s for the event loop
  cli.set_write_timeout(2, 0);
  auto res = cli.Get("/stats");
  if (!res) {
    httplib::Error e = res.error();
    std::string why = e == httplib::Error::Connection ? "cannot connect (is `baton serve` running with this admin.listen?)"
                      : e == httplib::Error::ConnectionTimeout ? "connection timed out"
                      : e == httplib::Error::Read ? "no answer"
                                                  : "request failed (" + httplib::to_string(e) + ")";
    std::fprintf(stderr, "baton status: admin API at http://%s unreachable: %s\n", where.c_str(), why.c_str());
    return kExitFailure;
  }
  if (res->status != 200) {
    std::string body = res->body.substr(0, 300);
    while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
    std::fprintf(stderr, "baton status: admin API at http://%s answered GET /stats with %d: %s\n", where.c_str(),
                 res->status, body.c_str());
    return kExitFailure;
  }
  if (json) {
    std::fwrite(res->body.data(), 1, res->body.size(), stdout);
    if (res->body.empty() || res->body.back() != '\n') std::fputc('\n', stdout);
    return kExitOk;
  }
  Json st;
  JsonParser parser(res->body);
  if (!parser.parse(st) || st.kind != Json::Kind::object) {
    std::fprintf(stderr, "baton status: admin API at http://%s: GET /stats is not a JSON object (%s)\n", where.c_str(),
                 parser.error().empty() ? "not an object" : parser.error().c_str());
    return kExitFailure;
  }
  std::fputs(render_status(st, where).c_str(), stdout);
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) a.v.push_back(argv[i]);
  std::string cmd = argc > 1 ? argv[1] : "help";
  if (cmd == "serve") return cmd_serve(a);
  if (cmd == "connect") return cmd_connect(a);
  if (cmd == "check") return cmd_check(a);
  if (cmd == "certs") return cmd_certs(a);
  if (cmd == "status") return cmd_status(a);
  if (cmd == "drain") return cmd_drain(a);
  if (cmd == "hash-token") return cmd_hash_token();
  if (cmd == "version" || cmd == "--version") {
    std::printf("baton %s (mbedTLS 2.28, libuv %s)\n", BATON_VERSION, uv_version_string());
    return kExitOk;
  }
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  std::fprintf(stderr, "baton: unknown command \"%s\"\n%s", cmd.c_str(), kUsage);
  return kExitUsage;
}
