// What the `baton` commands share: logging, configuration loading, event
// lines, process limits and signals (sidecar/cli.h).
#include <pthread.h>
#include <signal.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "handoff/test_hook.h"
#include "util/json.h"
#include "sidecar/cli.h"
#include "util/log_format.h"

namespace baton::cli {

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "baton: %s\n(see 'baton help')\n", msg.c_str());
  return kExitUsage;
}

bool setup_logging(const std::string& level, const std::string& format) {
  auto logger = std::make_shared<spdlog::logger>("baton", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    std::fprintf(stderr, "baton: unknown log level \"%s\" (expected trace, debug, info, warn, error)\n", level.c_str());
    return false;
  }
  logger->set_level(lvl);
  // Both formats escape control characters and invalid UTF-8 (util/log_format.h).
  auto formatter = util::make_log_formatter(format);
  if (!formatter) {
    std::fprintf(stderr, "baton: unknown log format \"%s\" (expected text or json)\n", format.c_str());
    return false;
  }
  logger->set_formatter(std::move(formatter));
  spdlog::set_default_logger(logger);
  return true;
}

int load_config(const std::string& path, config::Config& out) {
  auto r = config::load_file(path);
  if (auto* e = std::get_if<config::ConfigError>(&r)) {
    std::fprintf(stderr, "%s\n", e->to_string().c_str());
    return kExitUsage;
  }
  out = std::get<config::Config>(r);
  return kExitOk;
}

void print_event(const Event& e) {
  std::string line = util::json_text(e) + "\n";
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);
}

uint64_t unix_time_ms() {
  return uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count());
}

// A tunnel is one fd plus one per stream, and a handoff briefly holds two
// copies of each.
void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// Only the soft limit: an operator debugging a crash can raise it on the
// running process (prlimit --pid PID --core=unlimited).
void disable_core_dumps() {
  rlimit rl;
  if (getrlimit(RLIMIT_CORE, &rl) == 0 && rl.rlim_cur != 0) {
    rl.rlim_cur = 0;
    setrlimit(RLIMIT_CORE, &rl);
  }
}

// libuv's threadpool (uv_getaddrinfo for upstreams) starts its threads on
// first use, and they inherit the mask of the thread that starts them.
// Otherwise a SIGTERM can be delivered to a pool thread and reach the loop
// only after the loop has gone on for a while (in a hot restart, possibly
// past the commit it was meant to prevent).
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

void Signals::start(uv_loop_t* loop, std::function<void(int)> f) {
  fn = std::move(f);
  for (uv_signal_t* s : {&term, &intr}) {
    uv_signal_init(loop, s);
    s->data = this;
  }
  auto cb = [](uv_signal_t* s, int signum) { static_cast<Signals*>(s->data)->fn(signum); };
  uv_signal_start(&term, cb, SIGTERM);
  uv_signal_start(&intr, cb, SIGINT);
}

// Closing the last handle of a signal makes libuv restore its default action
// (SIG_DFL), so SIG_IGN goes in after the close, with both signals blocked
// meanwhile: one arriving in between stays pending and is discarded once
// ignored.
void Signals::stop() {
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
  handoff::test_point(handoff::TestPoint::signals_off);
}

}  // namespace baton::cli
