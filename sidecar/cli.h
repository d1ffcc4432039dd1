// The `baton` command line: one options struct and one run function per
// command (sidecar/main.cc parses the arguments with CLI11 into these), and
// what the commands share (sidecar/common.cc).
//
//   serve.cc    baton serve      the sidecar: takeover, serving, handoff, drain
//   connect.cc  baton connect    the client
//   admin_client.cc baton status, baton drain   (the admin API, from outside)
//   tools.cc    baton check, baton certs, baton hash-token
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "baton/client.h"
#include "config/config.h"
#include "util/json.h"

namespace baton::cli {

// Exit statuses (the usage text and docs/operations.md list them).
constexpr int kExitOk = 0, kExitFailure = 1, kExitUsage = 2, kExitRejected = 3;

struct LogOptions {
  std::string level;   // "" = the configuration's (serve) or info
  std::string format;  // "" = the configuration's (serve) or text
};

struct ServeOptions {
  std::string config;
  bool no_takeover = false;
  std::string resume_advertise;  // overrides resume.advertise
  LogOptions log;
};

struct ConnectOptions {
  ClientOptions client;
  std::vector<std::string> servers;   // the first is ClientOptions::server
  std::vector<std::string> forwards;  // LISTEN=ROUTE
  std::string token_file;
  std::string status_listen;
  LogOptions log;
};

struct CheckOptions {
  std::string config;
  bool strict = false;
};

struct CertsOptions {
  std::string out_dir;
  std::vector<std::string> names, ips;
};

struct AdminClientOptions {  // status and drain
  std::string config;
  std::string admin;
  bool json = false;  // status --json
  bool wait = false;  // drain --wait
};

int run_serve(const ServeOptions& o);
int run_connect(ConnectOptions o);
int run_check(const CheckOptions& o);
int run_certs(const CertsOptions& o);
int run_hash_token();
int run_status(const AdminClientOptions& o);
int run_drain(const AdminClientOptions& o);

// --- shared (common.cc) ------------------------------------------------------

// Prints "baton: MSG" and the pointer to `baton help`; returns kExitUsage.
int usage_error(const std::string& msg);
// The stderr logger in `format` (text or json) at `level`; false (and a
// message) for an unknown level or format.
bool setup_logging(const std::string& level, const std::string& format);
// Loads and validates FILE; prints the error (file:line:column) and returns
// kExitUsage, or kExitOk.
int load_config(const std::string& path, config::Config& out);
// An event line: one JSON object (members in the order given) on one line of
// stdout, flushed; read by other programs (the tests, the hot-restarter).
// Bytes that are not UTF-8 become U+FFFD.
using Event = util::Json;  // util/json.h
void print_event(const Event& e);
// Milliseconds since the Unix epoch, for event lines.
uint64_t unix_time_ms();
// The soft descriptor limit raised to the hard one; core files off (a core
// holds keys and tokens: docs/security.md).
void raise_fd_limit();
void disable_core_dumps();
// Process signals are taken by the loop thread only: starts libuv's
// threadpool now with them blocked (its threads inherit the mask).
void start_threadpool_without_signals(uv_loop_t* loop);

// SIGTERM and SIGINT as events on the loop. `fn` may be replaced while
// running (serve does, once it serves).
struct Signals {
  uv_signal_t term, intr;
  std::function<void(int)> fn;
  void start(uv_loop_t* loop, std::function<void(int)> f);
  // The process is on its way out: TERM and INT are ignored from now on, so
  // a late one (a kubelet's, right after a drain ended by itself) cannot
  // turn a clean exit into "killed by signal".
  void stop();
};

}  // namespace baton::cli
