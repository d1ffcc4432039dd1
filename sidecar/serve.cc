// `baton serve`: the sidecar's lifecycle. Take over from a running baton on
// the handoff socket (or start fresh), serve, hand over to the next process
// (hot restart), drain on request, exit. The rules where these events meet
// are in docs/operations.md, "When lifecycle events meet".
#include <signal.h>
#include <spdlog/spdlog.h>
#include <uv.h>

#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "admin/admin.h"
#include "config/config.h"
#include "drain/drainer.h"
#include "handoff/child.h"
#include "handoff/parent.h"
#include "proxy/server.h"
#include "sidecar/cli.h"
#include "util/text.h"

namespace baton::cli {

int run_serve(const ServeOptions& opts) {
  config::Config cfg;
  if (int rc = load_config(opts.config, cfg)) return rc;
  if (!opts.resume_advertise.empty()) {
    auto hp = config::parse_host_port(opts.resume_advertise, false);
    if (!hp) return usage_error("--resume-advertise: expected host:port (port 1..65535), got " + util::quoted(opts.resume_advertise));
    cfg.resume.advertise = hp->to_string();
  }
  if (!setup_logging(opts.log.level.empty() ? cfg.log_level : opts.log.level,
                     opts.log.format.empty() ? cfg.log_format : opts.log.format))
    return kExitUsage;
  signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  disable_core_dumps();

  uv_loop_t* loop = uv_default_loop();
  start_threadpool_without_signals(loop);
  std::string error;
  std::unique_ptr<proxy::Server> server;
  handoff::ChildResult takeover;
  // SIGTERM and SIGINT from the start: one that comes while this process is
  // taking over calls the takeover off (the old process keeps everything),
  // or, if the old one committed first, is acted on once this process
  // serves (docs/operations.md "When lifecycle events meet").
  Signals sig;
  int early_signal = 0;
  std::unique_ptr<handoff::Child> child;
  sig.start(loop, [&](int signum) {
    if (!early_signal) early_signal = signum;
    if (child)
      child->abandon(std::string("received ") + (signum == SIGTERM ? "SIGTERM" : "SIGINT") + " while taking over");
  });
  int hfd = opts.no_takeover ? -1 : handoff::connect_handoff(cfg.handoff_socket, error);
  if (hfd < 0 && !error.empty()) {
    spdlog::error("{} (use --no-takeover to start without taking over)", error);
    return kExitFailure;
  }
  if (hfd >= 0) {
    // A live baton answers on the handoff socket: take its listener and tunnels.
    spdlog::info("taking over from the baton on {}", cfg.handoff_socket);
    bool done = false;
    child = std::make_unique<handoff::Child>(
        loop, hfd, cfg.handoff_timeout_ms * 3,
        [&](const std::vector<tls::TicketKey>& keys, std::string& e) {
          return proxy::Server::create(loop, cfg, e, keys);
        },
        [&](const handoff::ChildResult& r) {
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
    } else if (std::string why; handoff::old_process_alive(cfg.handoff_socket, 1000, why)) {
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
    server = proxy::Server::create(loop, cfg, error);
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
  std::unique_ptr<handoff::Parent> parent;
  std::unique_ptr<admin::Admin> admin;
  std::unique_ptr<drain::Drainer> drainer;
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
      drainer.reset();  // before the server it watches (Drainer's lifetime rule, drain/drainer.h)
      server.reset();  // what is still closing is cut: the successor owns the listener and every live tunnel
    }
  };
  exit_timer.data = &check_exit;

  handoff::ParentOptions po;
  po.socket_path = cfg.handoff_socket;
  po.step_timeout_ms = cfg.handoff_timeout_ms;
  po.drain_grace_ms = cfg.drain.grace_ms;
  po.reconnect_hint = cfg.drain.reconnect_hint;
  parent = std::make_unique<handoff::Parent>(loop, *server, po, [&](const handoff::HandoffStats& st) {
    handed_over = true;
    handed_over_ms = uv_now(loop);
    print_event({{"event", "handed_over"},
                 {"pid", getpid()},
                 {"tunnels", st.tunnels_sent},
                 {"draining", st.tunnels_drained},
                 {"ms", st.committed_ms - st.started_ms}});
    uv_timer_start(&exit_timer, [](uv_timer_t* t) { (*static_cast<std::function<void()>*>(t->data))(); }, 0, 10);
  });
  error = parent->listen();
  if (!error.empty()) {
    spdlog::error("{}", error);
    return kExitFailure;
  }
  admin = std::make_unique<admin::Admin>(loop, *server);
  error = admin->start(cfg.admin);
  if (error.empty()) error = admin->start_lifecycle(cfg.lifecycle, cfg.drain.grace_ms);
  if (!error.empty()) {
    spdlog::error("{}", error);
    return kExitFailure;
  }
  if (cfg.lifecycle.listen) spdlog::info("lifecycle hook: GET http://{}/drain (X-Baton-Token)", admin->lifecycle_address());
  server->set_state(proxy::ServeState::serving);
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
  drainer = std::make_unique<drain::Drainer>(loop, *server, cfg.drain, [&](const std::string&) {
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
    if (signum == SIGTERM && drainer && drainer->phase() == drain::DrainPhase::idle && !handed_over) {
      drain_trigger = "SIGTERM";
      server->start_drain();
      return;
    }
    spdlog::info("received {}, closing {} tunnels now", signum == SIGTERM ? "SIGTERM" : "SIGINT", server->tunnel_count());
    stop_now();
  };
  Event ready{{"event", "ready"},
              {"listen", server->listen_address()},
              {"pid", getpid()},
              {"epoch", server->epoch()},
              {"takeover", hfd >= 0},
              {"tunnels", takeover.tunnels},
              {"admin", admin->address()}};
  if (cfg.lifecycle.listen) ready["lifecycle"] = admin->lifecycle_address();
  print_event(ready);
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

}  // namespace baton::cli
