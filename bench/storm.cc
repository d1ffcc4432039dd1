// storm: a reconnect storm. N embedded baton::Clients are all on one replica
// (the first of --servers); that replica is drained at once (POST /drain on
// its admin address, sent by this program); every client follows DRAIN
// (docs/protocol.md section 6) and reconnects. The tool measures how long each
// takes to be back, and how.
//
//   storm --servers A,B[,C...] --ca FILE --server-name NAME --admin HOST:PORT
//         [--clients 1000] [--route echo] [--rotate 1] [--long 0|1] [--interval-ms 1000]
//         [--short-interval-ms 0] [--size 256] [--connect-concurrency 100]
//         [--warmup-ms 1000] [--timeout-ms 15000] [--settle-ms 1000] [--start-timeout-ms 60000]
//         [--label NAME]
//   The token comes from the BATON_TOKEN environment variable. --admin is the
//   admin API of the first server (the one drained).
//
// Every client has `servers` = the first address, then the others; with
// --rotate 1 client i lists the others rotated by i, so a client that moves
// on from the drained replica lands on B, C, ... in turn (no load balancer on
// loopback). One libuv loop, one thread.
//
// Traffic (optional): --long 1 gives each client one stream for the whole
// run, through the route (an echo upstream): --size bytes, wait for the echo,
// compare, pause --interval-ms, repeat. It was opened on the first session,
// so during the drain it runs on the old session while the new one comes up
// (make before break). --short-interval-ms M makes each client also open a
// new one-shot stream every M ms (first one at a random offset): one
// request/response, then close. Those opened after the drain go to the new
// session (or wait for it, or are replayed by the client if the server reset
// them unprocessed); none may fail. Streams are loopback TCP pairs handed to
// Client::open_stream(). No local forwarders, so no listener per client.
//
// Timeline: all clients ready on the first server (each on session 1), long
// streams warm (one round trip each), then --warmup-ms of traffic, then t0 =
// uv_hrtime() and the POST /drain is sent (asynchronously: the loop goes on
// serving the clients while the admin API answers). For each client:
//   notice: when the client has acted on DRAIN (ClientCounters.drains_followed
//           went up; sampled once per loop iteration, in a check handle, so
//           it may be late by one iteration's worth of work);
//   back:   when session 2 is ready (on_session n == 2).
// The storm ends when every client is back, or --timeout-ms after t0; the
// traffic then runs --settle-ms more, and the report is printed.
//
// stdout: human-readable lines, then ONE JSON line (the last line):
//   {"event":"done", "label", "clients", "open_s", "on_first", "drain_http_status", "drain_http_ms",
//    "back", "all_back_ms" (-1: not all back), "notices", "back_ms":{n,p50,p99,max}, "notice_ms":{p50,p99,max}, "reconnect_ms":{p50,p99,max},
//    "resumed", "full", "resumed_share", "landed":{"ADDR":n,...}, "failed_tries", "reject_draining",
//    "reject_overloaded", "connect_failures", "session_failures", "other_failures", "extra_sessions",
//    "old_lost_before_new", "new_lost", "closed", "streams_replayed",
//    "long":{streams, errors, before_max_ms:{p50,p99,max}, storm_max_ms:{p50,p99,max}, rtts},
//    "short":{before_ok, before_failed, storm_opened, storm_ok, storm_failed, storm_ms:{p50,p99,max}},
//    "multi_try_clients", "multi_try_samples":[...] (clients with more than one failed try after the drain),
//    "error_samples":[...], "retry_samples":[...], "warnings", "cpu_s"}
// or, when the clients could not be set up, {"event":"failed","error":...} and exit 1.
// Percentiles are nearest-rank over the clients concerned (back_ms: over the
// clients that came back; `back` says how many).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "baton/client.h"
#include "util/json.h"

namespace {

constexpr size_t kMaxSamples = 20;
constexpr uint64_t kShortTimeoutNs = 15000000000ull;  // a one-shot stream with no answer after 15 s failed

struct Options {
  std::vector<std::string> servers;
  std::string ca_file, server_name, token, admin;
  std::string route = "echo";
  std::string label = "storm";
  size_t clients = 1000;
  bool rotate = true;
  bool long_stream = false;
  uint64_t interval_ms = 1000;
  uint64_t short_interval_ms = 0;
  size_t size = 256;
  size_t connect_concurrency = 100;
  uint64_t warmup_ms = 1000;
  uint64_t timeout_ms = 15000;
  uint64_t settle_ms = 1000;
  uint64_t start_timeout_ms = 60000;
};

void print_line(const std::string& line) {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// Nearest-rank percentile of sorted v (q in (0, 1]).
double pct(const std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  size_t rank = size_t(q * double(v.size()) + 0.999999);
  if (rank < 1) rank = 1;
  return v[std::min(v.size(), rank) - 1];
}

std::string dist_json(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  char b[160];
  std::snprintf(b, sizeof b, "{\"n\":%zu,\"p50\":%.1f,\"p99\":%.1f,\"max\":%.1f}", v.size(), pct(v, 0.5), pct(v, 0.99),
                v.empty() ? 0.0 : v.back());
  return b;
}

std::string dist_text(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  char b[160];
  std::snprintf(b, sizeof b, "p50 %.1f / p99 %.1f / max %.1f ms (n=%zu)", pct(v, 0.5), pct(v, 0.99),
                v.empty() ? 0.0 : v.back(), v.size());
  return b;
}

// Counts the client library's log lines about failed tries (the only place
// that tells a REJECT 4 from a REJECT 3 or a refused connection), keeps a
// few samples, and passes warnings and errors on to stderr.
struct Tally {
  uint64_t reject_draining = 0, reject_overloaded = 0, connect_failures = 0, session_failures = 0, other = 0;
  uint64_t warnings = 0;
  std::vector<std::string> samples;
};

class CountingSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  Tally tally;

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string s(msg.payload.data(), msg.payload.size());
    if (msg.level >= spdlog::level::warn) {
      if (++tally.warnings <= 50) std::fprintf(stderr, "storm: client log: %s\n", s.c_str());
    }
    if (s.find("next try at") == std::string::npos) return;
    if (s.find("REJECT 4") != std::string::npos) ++tally.reject_draining;
    else if (s.find("REJECT 3") != std::string::npos) ++tally.reject_overloaded;
    else if (s.find("cannot connect") != std::string::npos) ++tally.connect_failures;
    else if (s.find("failed:") != std::string::npos) ++tally.session_failures;
    else ++tally.other;
    if (tally.samples.size() < kMaxSamples) tally.samples.push_back(s);
  }
  void flush_() override {}
};

struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  void fill(uint8_t* p, size_t n) {
    while (n) {
      uint64_t v = next();
      size_t k = std::min<size_t>(n, 8);
      std::memcpy(p, &v, k);
      p += k;
      n -= k;
    }
  }
};

class Storm;

// One stream's app socket doing request/response: a long stream (repeats,
// lives until the end) or a one-shot stream (one round trip, then closed).
// Deleted in its close callback.
struct Conv {
  Storm* st = nullptr;
  size_t client = 0;
  bool is_long = false;
  bool in_storm = false;  // one-shot opened after t0
  uv_tcp_t app{};
  uv_write_t wreq{};
  std::vector<uint8_t> req, resp;
  size_t got = 0;
  bool awaiting = false, writing = false, dead = false, open = false;
  uint64_t t_open = 0, t_sent = 0, rtts = 0;

  bool start(uv_loop_t* loop, int fd);
  void send_request();
  void fail(const std::string& why);
  void close();
  static void alloc_cb(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void read_cb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);
  static void write_cb(uv_write_t* w, int status);
};

struct Cl {
  size_t i = 0;
  std::unique_ptr<baton::Client> client;
  bool started = false, ready = false, failed = false;
  uint64_t t_notice = 0, t_back = 0;  // uv_hrtime()
  bool resumed2 = false;
  std::string server2;
  baton::ClientCounters base;  // at t0
  Conv* lng = nullptr;
  bool long_warm = false;
  double long_before_max_ms = 0, long_storm_max_ms = 0;
  uv_timer_t pace{};  // next request of the long stream
  uv_timer_t shot{};  // next one-shot stream
};

enum class Phase { starting, warm, storm, settle, done };

class Storm {
 public:
  Options o;
  uv_loop_t* loop = nullptr;
  Rng rng{0};
  std::shared_ptr<CountingSink> sink;
  int listen_fd = -1;
  sockaddr_in listen_addr{};
  std::vector<Cl> cls;
  Phase phase = Phase::starting;
  bool quitting = false;
  size_t next_client = 0, connecting = 0, ready = 0, long_warm = 0, back = 0;
  uint64_t t_start = 0, t_ready = 0, t0 = 0, t_http = 0, t_all_back = 0;
  size_t on_first = 0;
  int http_status = 0;
  std::string http_body, http_error;
  Tally tally_at_t0;

  // events
  uint64_t extra_sessions = 0, old_lost_before_new = 0, new_lost = 0, closed = 0, early_sessions = 0;
  uint64_t long_errors = 0, long_rtts = 0;
  uint64_t short_before_ok = 0, short_before_failed = 0, short_storm_opened = 0, short_storm_ok = 0,
           short_storm_failed = 0;
  std::vector<double> short_storm_ms;
  std::vector<std::string> errors;
  std::unordered_set<Conv*> shorts;
  std::vector<size_t> awaiting_notice;

  uv_timer_t start_deadline{}, phase_timer{}, sweeper{};
  uv_check_t checker{};
  uv_signal_t sigterm{}, sigint{};

  struct Http {
    uv_tcp_t tcp{};
    uv_connect_t creq{};
    uv_write_t wreq{};
    std::string out, in;
    bool open = false, done = false;
  } http;

  int run();
  [[noreturn]] void fatal(const std::string& why);
  void error(const std::string& what) {
    if (errors.size() < kMaxSamples) errors.push_back(what);
  }
  bool make_pair(int& app_fd, int& relay_fd, std::string& err);
  Conv* open_conv(size_t ci, bool is_long);

  void launch();
  void start_client(size_t i);
  void on_session(size_t i, const baton::ClientSessionInfo& s);
  void on_lost(size_t i, uint64_t n, const std::string& reason);
  void on_failed(size_t i, const std::string& why);
  void check_all_ready();
  void begin_storm();
  void http_start();
  void http_finish(const std::string& err);
  void check_notices();
  void storm_over();
  void finish(const std::string& why);

  void conv_rtt(Conv* c, uint64_t ns);
  void conv_failed(Conv* c, const std::string& why);
  void schedule_shot(size_t ci, uint64_t delay_ms);
  void fire_shot(size_t ci);
};

// --- Conv ---

bool Conv::start(uv_loop_t* loop, int fd) {
  uv_tcp_init(loop, &app);
  app.data = this;
  open = true;
  int err = uv_tcp_open(&app, fd);
  if (err) {
    ::close(fd);
    fail(std::string("uv_tcp_open: ") + uv_strerror(err));
    return false;
  }
  uv_tcp_nodelay(&app, 1);
  err = uv_read_start(reinterpret_cast<uv_stream_t*>(&app), alloc_cb, read_cb);
  if (err) {
    fail(std::string("read_start: ") + uv_strerror(err));
    return false;
  }
  send_request();
  return !dead;
}

void Conv::send_request() {
  st->rng.fill(req.data(), req.size());
  got = 0;
  awaiting = true;
  writing = true;
  t_sent = uv_hrtime();
  uv_buf_t b = uv_buf_init(reinterpret_cast<char*>(req.data()), unsigned(req.size()));
  int err = uv_write(&wreq, reinterpret_cast<uv_stream_t*>(&app), &b, 1, write_cb);
  if (err) {
    writing = false;
    fail(std::string("write: ") + uv_strerror(err));
  }
}

void Conv::alloc_cb(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* c = static_cast<Conv*>(h->data);
  static char scratch[65536];
  if (c->awaiting && c->got < c->resp.size())
    *buf = uv_buf_init(reinterpret_cast<char*>(c->resp.data() + c->got), unsigned(c->resp.size() - c->got));
  else
    *buf = uv_buf_init(scratch, sizeof scratch);
}

void Conv::read_cb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* c = static_cast<Conv*>(s->data);
  if (c->dead || c->st->quitting) return;
  if (nread < 0) {
    c->fail(nread == UV_EOF         ? std::string("app socket EOF (the tunnel closed the stream)")
            : nread == UV_ECONNRESET ? std::string("app socket reset (the tunnel reset the stream)")
                                     : std::string("app socket read error: ") + uv_strerror(int(nread)));
    return;
  }
  if (nread == 0) return;
  if (!c->awaiting || buf->base != reinterpret_cast<char*>(c->resp.data() + c->got)) {
    c->fail("unexpected data (" + std::to_string(nread) + " bytes) with no request outstanding");
    return;
  }
  c->got += size_t(nread);
  if (c->got < c->resp.size()) return;
  uint64_t ns = uv_hrtime() - c->t_sent;
  c->awaiting = false;
  if (std::memcmp(c->req.data(), c->resp.data(), c->req.size()) != 0) {
    c->fail("echo mismatch");
    return;
  }
  ++c->rtts;
  c->st->conv_rtt(c, ns);  // a one-shot stream is closed there
}

void Conv::write_cb(uv_write_t* w, int status) {
  auto* c = static_cast<Conv*>(w->handle->data);
  c->writing = false;
  if (c->dead || c->st->quitting) return;
  if (status < 0) c->fail(std::string("app socket write error: ") + uv_strerror(status));
}

void Conv::fail(const std::string& why) {
  if (dead) return;
  Storm* s = st;
  close();
  s->conv_failed(this, why);  // `this` lives until the close callback
}

void Conv::close() {
  if (dead) return;
  dead = true;
  awaiting = false;
  if (!is_long) st->shorts.erase(this);
  else if (st->cls[client].lng == this) st->cls[client].lng = nullptr;
  if (open)
    uv_close(reinterpret_cast<uv_handle_t*>(&app), [](uv_handle_t* h) { delete static_cast<Conv*>(h->data); });
  else
    delete this;
}

// --- Storm ---

void Storm::fatal(const std::string& why) {
  std::fprintf(stderr, "storm: %s\n", why.c_str());
  print_line("{\"event\":\"failed\",\"label\":" + baton::util::json_quote(o.label) + ",\"error\":" + baton::util::json_quote(why) + "}");
  std::_Exit(1);
}

bool Storm::make_pair(int& app_fd, int& relay_fd, std::string& err) {
  int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c < 0) {
    err = std::string("socket: ") + std::strerror(errno);
    return false;
  }
  if (connect(c, reinterpret_cast<sockaddr*>(&listen_addr), sizeof listen_addr) != 0) {
    err = std::string("loopback connect: ") + std::strerror(errno);
    ::close(c);
    return false;
  }
  int a = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (a < 0) {
    err = std::string("loopback accept: ") + std::strerror(errno);
    ::close(c);
    return false;
  }
  app_fd = c;
  relay_fd = a;
  return true;
}

// Opens a stream on client ci and sends its first request; nullptr if that
// failed (counted).
Conv* Storm::open_conv(size_t ci, bool is_long) {
  auto* c = new Conv;
  c->st = this;
  c->client = ci;
  c->is_long = is_long;
  c->in_storm = phase >= Phase::storm;
  c->req.resize(o.size);
  c->resp.resize(o.size);
  c->t_open = uv_hrtime();
  if (is_long) cls[ci].lng = c;
  else shorts.insert(c);
  if (!is_long && c->in_storm) ++short_storm_opened;
  int app_fd = -1, relay_fd = -1;
  std::string err;
  if (!make_pair(app_fd, relay_fd, err)) {
    c->fail(err);
    return nullptr;
  }
  if (!cls[ci].client->open_stream(relay_fd, o.route)) {
    ::close(app_fd);
    c->fail("open_stream refused (client stopped)");
    return nullptr;
  }
  if (!c->start(loop, app_fd)) return nullptr;
  return c;
}

void Storm::conv_rtt(Conv* c, uint64_t ns) {
  Cl& cl = cls[c->client];
  double ms = double(ns) / 1e6;
  if (c->is_long) {
    ++long_rtts;
    if (phase >= Phase::storm) cl.long_storm_max_ms = std::max(cl.long_storm_max_ms, ms);
    else if (phase == Phase::warm) cl.long_before_max_ms = std::max(cl.long_before_max_ms, ms);
    if (!cl.long_warm) {
      cl.long_warm = true;
      ++long_warm;
      check_all_ready();
    }
    // Next request after the pause (by then the write callback has run too).
    uv_timer_start(&cl.pace, [](uv_timer_t* t) {
      Cl* pc = static_cast<Cl*>(t->data);
      Conv* lc = pc->lng;
      if (lc && !lc->dead && !lc->awaiting && !lc->writing && !lc->st->quitting) lc->send_request();
    }, o.interval_ms, 0);
    return;
  }
  // one-shot: from open to answer (includes waiting for a session)
  double total_ms = double(uv_hrtime() - c->t_open) / 1e6;
  if (c->in_storm) {
    ++short_storm_ok;
    short_storm_ms.push_back(total_ms);
  } else {
    ++short_before_ok;
  }
  c->close();
}

void Storm::conv_failed(Conv* c, const std::string& why) {
  if (quitting) return;
  std::string what = "client " + std::to_string(c->client) + (c->is_long ? " long stream: " : " one-shot stream: ") + why;
  if (c->is_long) {
    ++long_errors;
    if (phase == Phase::starting) fatal(what);
  } else if (c->in_storm) {
    ++short_storm_failed;
  } else {
    ++short_before_failed;
  }
  error(what);
}

void Storm::schedule_shot(size_t ci, uint64_t delay_ms) {
  uv_timer_start(&cls[ci].shot, [](uv_timer_t* t) {
    Cl* cl = static_cast<Cl*>(t->data);
    Storm* s = static_cast<Storm*>(t->loop->data);
    s->fire_shot(cl->i);
  }, delay_ms, 0);
}

void Storm::fire_shot(size_t ci) {
  if (quitting || cls[ci].failed) return;
  open_conv(ci, false);
  schedule_shot(ci, o.short_interval_ms);
}

void Storm::launch() {
  while (!quitting && next_client < cls.size() && connecting < o.connect_concurrency) start_client(next_client++);
}

void Storm::start_client(size_t i) {
  Cl& cl = cls[i];
  cl.started = true;
  ++connecting;
  baton::ClientOptions co;
  co.server = o.servers[0];
  size_t others = o.servers.size() - 1;
  for (size_t k = 0; k < others; ++k) co.servers.push_back(o.servers[1 + (k + (o.rotate ? i : 0)) % others]);
  co.server_name = o.server_name;
  co.token = o.token;
  co.client_id = "storm-" + std::to_string(i);
  co.ca_file = o.ca_file;
  baton::ClientEvents ev;
  ev.on_session = [this, i](const baton::ClientSessionInfo& s) { on_session(i, s); };
  ev.on_session_lost = [this, i](uint64_t n, const std::string& reason) { on_lost(i, n, reason); };
  ev.on_reject = [this, i](uint16_t code, const std::string& reason) {
    on_failed(i, "REJECT " + std::to_string(code) + " (" + reason + ")");
  };
  ev.on_closed = [this, i](const std::string& err) { on_failed(i, "client closed: " + err); };
  cl.client = std::make_unique<baton::Client>(loop, std::move(co), std::move(ev));
  std::string err = cl.client->start();
  if (!err.empty()) fatal("client " + std::to_string(i) + ": " + err);
}

void Storm::on_session(size_t i, const baton::ClientSessionInfo& s) {
  if (quitting) return;
  Cl& cl = cls[i];
  if (s.n == 1) {
    cl.ready = true;
    --connecting;
    ++ready;
    if (s.server == o.servers[0]) ++on_first;
    else error("client " + std::to_string(i) + ": first session on " + s.server + ", not " + o.servers[0]);
    if (o.long_stream) open_conv(i, true);
    if (o.short_interval_ms) schedule_shot(i, rng.next() % o.short_interval_ms);
    launch();
    check_all_ready();
    return;
  }
  if (phase < Phase::storm) {
    ++early_sessions;
    error("client " + std::to_string(i) + ": session " + std::to_string(s.n) + " before the drain (on " + s.server + ")");
    return;
  }
  if (s.n == 2) {
    cl.t_back = uv_hrtime();
    cl.resumed2 = s.resumed;
    cl.server2 = s.server;
    ++back;
    if (back == cls.size() && phase == Phase::storm) storm_over();
  } else {
    ++extra_sessions;
    error("client " + std::to_string(i) + ": session " + std::to_string(s.n) + " on " + s.server + " (another reconnect)");
  }
}

void Storm::on_lost(size_t i, uint64_t n, const std::string& reason) {
  if (quitting) return;
  Cl& cl = cls[i];
  if (phase < Phase::storm) {
    fatal("client " + std::to_string(i) + ": session " + std::to_string(n) + " lost before the drain: " + reason);
  }
  if (n == 1 && cl.t_back == 0) {
    // The old session ended before the new one was ready: harmless for an
    // idle client (nothing to carry), counted to show it.
    ++old_lost_before_new;
    return;
  }
  ++new_lost;
  error("client " + std::to_string(i) + ": session " + std::to_string(n) + " lost: " + reason);
}

void Storm::on_failed(size_t i, const std::string& why) {
  if (quitting) return;
  Cl& cl = cls[i];
  if (cl.failed) return;
  cl.failed = true;
  if (phase == Phase::starting) fatal("client " + std::to_string(i) + ": " + why);
  ++closed;
  error("client " + std::to_string(i) + ": " + why);
}

void Storm::check_all_ready() {
  if (phase != Phase::starting || ready < cls.size() || (o.long_stream && long_warm < cls.size())) return;
  t_ready = uv_hrtime();
  uv_timer_stop(&start_deadline);
  phase = Phase::warm;
  char b[200];
  std::snprintf(b, sizeof b, "storm[%s]: %zu clients ready in %.2f s, %zu of them on %s; %s%s", o.label.c_str(),
                cls.size(), double(t_ready - t_start) / 1e9, on_first, o.servers[0].c_str(),
                o.long_stream ? "long streams warm; " : "", "warming up");
  print_line(b);
  uv_timer_start(&phase_timer, [](uv_timer_t* t) { static_cast<Storm*>(t->data)->begin_storm(); }, o.warmup_ms, 0);
}

void Storm::begin_storm() {
  for (Cl& cl : cls) {
    cl.base = cl.client->counters();
    awaiting_notice.push_back(cl.i);
  }
  tally_at_t0 = sink->tally;
  phase = Phase::storm;
  uv_check_start(&checker, [](uv_check_t* c) { static_cast<Storm*>(c->data)->check_notices(); });
  uv_timer_start(&phase_timer, [](uv_timer_t* t) {
    auto* s = static_cast<Storm*>(t->data);
    print_line("storm[" + s->o.label + "]: timed out: " + std::to_string(s->back) + " of " +
               std::to_string(s->cls.size()) + " clients back after --timeout-ms " + std::to_string(s->o.timeout_ms));
    s->storm_over();
  }, o.timeout_ms, 0);
  t0 = uv_hrtime();
  http_start();
}

// POST /drain to the drained server's admin API, on the loop.
void Storm::http_start() {
  size_t colon = o.admin.rfind(':');
  sockaddr_in addr{};
  if (colon == std::string::npos ||
      uv_ip4_addr(o.admin.substr(0, colon).c_str(), std::atoi(o.admin.c_str() + colon + 1), &addr) != 0) {
    http_finish("bad --admin address " + o.admin);
    return;
  }
  uv_tcp_init(loop, &http.tcp);
  http.tcp.data = this;
  http.open = true;
  http.out = "POST /drain HTTP/1.1\r\nHost: " + o.admin + "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
  http.creq.data = this;
  int err = uv_tcp_connect(&http.creq, &http.tcp, reinterpret_cast<const sockaddr*>(&addr), [](uv_connect_t* r, int st) {
    auto* s = static_cast<Storm*>(r->data);
    if (st != 0) {
      s->http_finish(std::string("connect: ") + uv_strerror(st));
      return;
    }
    uv_buf_t b = uv_buf_init(s->http.out.data(), unsigned(s->http.out.size()));
    int e = uv_write(&s->http.wreq, reinterpret_cast<uv_stream_t*>(&s->http.tcp), &b, 1, [](uv_write_t* w, int st2) {
      if (st2 != 0) static_cast<Storm*>(w->handle->data)->http_finish(std::string("write: ") + uv_strerror(st2));
    });
    if (e) {
      s->http_finish(std::string("write: ") + uv_strerror(e));
      return;
    }
    uv_read_start(
        reinterpret_cast<uv_stream_t*>(&s->http.tcp),
        [](uv_handle_t*, size_t, uv_buf_t* buf) {
          static char b2[4096];
          *buf = uv_buf_init(b2, sizeof b2);
        },
        [](uv_stream_t* st3, ssize_t n, const uv_buf_t* buf) {
          auto* s2 = static_cast<Storm*>(st3->data);
          if (n < 0) {
            s2->http_finish(n == UV_EOF ? "" : std::string("read: ") + uv_strerror(int(n)));
            return;
          }
          s2->http.in.append(buf->base, size_t(n));
          // Done once the headers and Content-Length bytes of body are in.
          size_t he = s2->http.in.find("\r\n\r\n");
          if (he == std::string::npos) return;
          size_t cl = s2->http.in.find("Content-Length:");
          if (cl == std::string::npos) cl = s2->http.in.find("content-length:");
          if (cl != std::string::npos && cl < he) {
            size_t want = size_t(std::atol(s2->http.in.c_str() + cl + 15));
            if (s2->http.in.size() >= he + 4 + want) s2->http_finish("");
          }
        });
  });
  if (err) http_finish(std::string("connect: ") + uv_strerror(err));
}

void Storm::http_finish(const std::string& err) {
  if (http.done) return;
  http.done = true;
  t_http = uv_hrtime();
  http_error = err;
  if (http.in.size() > 12 && http.in.compare(0, 5, "HTTP/") == 0) http_status = std::atoi(http.in.c_str() + 9);
  size_t he = http.in.find("\r\n\r\n");
  if (he != std::string::npos) http_body = http.in.substr(he + 4);
  while (!http_body.empty() && (http_body.back() == '\n' || http_body.back() == '\r')) http_body.pop_back();
  if (http.open && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&http.tcp)))
    uv_close(reinterpret_cast<uv_handle_t*>(&http.tcp), nullptr);
  char b[120];
  std::snprintf(b, sizeof b, "storm[%s]: POST /drain answered %d after %.1f ms", o.label.c_str(), http_status,
                double(t_http - t0) / 1e6);
  print_line(std::string(b) + (err.empty() ? "" : " (" + err + ")") + ": " + http_body);
  if (http_status != 200) error("POST /drain: status " + std::to_string(http_status) + " " + err + " " + http_body);
}

void Storm::check_notices() {
  uint64_t now = uv_hrtime();
  for (size_t k = 0; k < awaiting_notice.size();) {
    Cl& cl = cls[awaiting_notice[k]];
    if (cl.client && cl.client->counters().drains_followed > cl.base.drains_followed) {
      cl.t_notice = now;
      awaiting_notice[k] = awaiting_notice.back();
      awaiting_notice.pop_back();
    } else {
      ++k;
    }
  }
  if (awaiting_notice.empty()) uv_check_stop(&checker);
}

void Storm::storm_over() {
  if (phase != Phase::storm) return;
  phase = Phase::settle;
  t_all_back = uv_hrtime();
  check_notices();
  uv_check_stop(&checker);
  uv_timer_start(&phase_timer, [](uv_timer_t* t) { static_cast<Storm*>(t->data)->finish("done"); }, o.settle_ms, 0);
}

void Storm::finish(const std::string& why) {
  if (phase == Phase::done) return;
  if (phase == Phase::storm) storm_over();
  phase = Phase::done;
  uint64_t now = uv_hrtime();
  // Long streams: a request still outstanding counts with its age so far.
  std::vector<double> long_before, long_storm;
  size_t long_alive = 0;
  for (Cl& cl : cls) {
    if (!o.long_stream) break;
    if (cl.lng && !cl.lng->dead) {
      ++long_alive;
      if (cl.lng->awaiting) cl.long_storm_max_ms = std::max(cl.long_storm_max_ms, double(now - cl.lng->t_sent) / 1e6);
    }
    long_before.push_back(cl.long_before_max_ms);
    long_storm.push_back(cl.long_storm_max_ms);
  }
  // One-shot streams still unanswered at the end count as failed.
  for (Conv* c : shorts)
    if (c->in_storm && c->awaiting && now - c->t_open > kShortTimeoutNs) ++short_storm_failed;

  std::vector<double> back_ms, notice_ms, reconnect_ms;
  std::map<std::string, uint64_t> landed;
  uint64_t multi_try_clients = 0;
  std::vector<std::string> multi_try_samples;
  uint64_t resumed = 0, full = 0, failed_tries = 0, replayed = 0, resumed_ctr = 0, full_ctr = 0, notices = 0;
  for (Cl& cl : cls) {
    const baton::ClientCounters& c = cl.client->counters();
    failed_tries += c.failed_tries - cl.base.failed_tries;
    replayed += c.streams_replayed - cl.base.streams_replayed;
    resumed_ctr += c.resumed_handshakes - cl.base.resumed_handshakes;
    full_ctr += c.full_handshakes - cl.base.full_handshakes;
    if (cl.t_notice) {
      ++notices;
      notice_ms.push_back(double(cl.t_notice - t0) / 1e6);
    }
    uint64_t tries = c.failed_tries - cl.base.failed_tries;
    if (tries > 1) {
      // A client that needed more than one failed try after the drain (one
      // REJECT 4 from the drained server is the norm without reconnect_hint).
      ++multi_try_clients;
      if (multi_try_samples.size() < kMaxSamples) {
        size_t others = o.servers.size() - 1;
        multi_try_samples.push_back(
            "client " + std::to_string(cl.i) + ": " + std::to_string(tries) + " failed tries after the drain, " +
            std::to_string(c.streams_replayed - cl.base.streams_replayed) + " streams replayed, session 2 on " +
            (cl.server2.empty() ? std::string("(none)") : cl.server2) + " (next after the first in its list: " +
            o.servers[1 + (o.rotate ? cl.i : 0) % others] + ")");
      }
    }
    if (!cl.t_back) continue;
    back_ms.push_back(double(cl.t_back - t0) / 1e6);
    if (cl.t_notice) reconnect_ms.push_back(double(cl.t_back - std::min(cl.t_back, cl.t_notice)) / 1e6);
    if (cl.resumed2) ++resumed;
    else ++full;
    ++landed[cl.server2];
  }
  Tally t = sink->tally;
  t.reject_draining -= tally_at_t0.reject_draining;
  t.reject_overloaded -= tally_at_t0.reject_overloaded;
  t.connect_failures -= tally_at_t0.connect_failures;
  t.session_failures -= tally_at_t0.session_failures;
  t.other -= tally_at_t0.other;
  double share = back ? 100.0 * double(resumed) / double(back) : 0;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  double cpu_s = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;

  // --- human lines ---
  char b[400];
  print_line("storm[" + o.label + "]: " + why);
  if (back == cls.size())
    std::snprintf(b, sizeof b, "  back on a new session: %zu of %zu clients; all back %.1f ms after POST /drain", back,
                  cls.size(), double(t_all_back - t0) / 1e6);
  else
    std::snprintf(b, sizeof b, "  back on a new session: %zu of %zu clients; NOT all back", back, cls.size());
  print_line(b);
  print_line("  time from POST /drain to session 2 ready: " + dist_text(back_ms));
  print_line("  time from POST /drain to DRAIN acted on: " + dist_text(notice_ms));
  print_line("  time from DRAIN acted on to session 2 ready: " + dist_text(reconnect_ms));
  std::snprintf(b, sizeof b, "  handshakes of the new sessions: %llu resumed, %llu full (%.1f%% resumed)",
                static_cast<unsigned long long>(resumed), static_cast<unsigned long long>(full), share);
  print_line(b);
  std::string land = "  landed on:";
  for (auto& [srv, n] : landed) land += " " + srv + " " + std::to_string(n);
  print_line(land);
  std::snprintf(b, sizeof b,
                "  failed tries %llu (REJECT 4 draining %llu, REJECT 3 overloaded %llu, connect %llu, session %llu, "
                "other %llu); extra sessions %llu; new sessions lost %llu; clients closed %llu; "
                "old session ended before the new was ready %llu",
                static_cast<unsigned long long>(failed_tries), static_cast<unsigned long long>(t.reject_draining),
                static_cast<unsigned long long>(t.reject_overloaded), static_cast<unsigned long long>(t.connect_failures),
                static_cast<unsigned long long>(t.session_failures), static_cast<unsigned long long>(t.other),
                static_cast<unsigned long long>(extra_sessions), static_cast<unsigned long long>(new_lost),
                static_cast<unsigned long long>(closed), static_cast<unsigned long long>(old_lost_before_new));
  print_line(b);
  if (o.long_stream) {
    print_line("  long streams (" + std::to_string(long_alive) + " alive of " + std::to_string(cls.size()) +
               ", errors " + std::to_string(long_errors) + "), each one's longest round trip:");
    print_line("    before the drain: " + dist_text(long_before));
    print_line("    drain to end:     " + dist_text(long_storm));
  }
  if (o.short_interval_ms) {
    std::snprintf(b, sizeof b,
                  "  one-shot streams: before the drain %llu ok, %llu failed; after it %llu opened, %llu ok, %llu "
                  "failed, %llu replayed by the client",
                  static_cast<unsigned long long>(short_before_ok), static_cast<unsigned long long>(short_before_failed),
                  static_cast<unsigned long long>(short_storm_opened), static_cast<unsigned long long>(short_storm_ok),
                  static_cast<unsigned long long>(short_storm_failed), static_cast<unsigned long long>(replayed));
    print_line(b);
    print_line("    open -> answer after the drain: " + dist_text(short_storm_ms));
  }
  if (multi_try_clients)
    print_line("  clients with more than one failed try after the drain: " + std::to_string(multi_try_clients));
  for (const std::string& e : multi_try_samples) print_line("    " + e);
  for (const std::string& e : errors) print_line("  error: " + e);

  // --- the JSON line ---
  std::string j = "{\"event\":\"done\",\"label\":" + baton::util::json_quote(o.label) + ",\"why\":" + baton::util::json_quote(why);
  std::snprintf(b, sizeof b,
                ",\"clients\":%zu,\"open_s\":%.3f,\"on_first\":%zu,\"drain_http_status\":%d,\"drain_http_ms\":%.1f,"
                "\"back\":%zu,\"all_back_ms\":%.1f,\"notices\":%llu",
                cls.size(), double(t_ready - t_start) / 1e9, on_first, http_status, double(t_http - t0) / 1e6, back,
                back == cls.size() ? double(t_all_back - t0) / 1e6 : -1.0, static_cast<unsigned long long>(notices));
  j += b;
  j += ",\"back_ms\":" + dist_json(back_ms) + ",\"notice_ms\":" + dist_json(notice_ms) +
       ",\"reconnect_ms\":" + dist_json(reconnect_ms);
  std::snprintf(b, sizeof b,
                ",\"resumed\":%llu,\"full\":%llu,\"resumed_share\":%.2f,\"resumed_handshakes\":%llu,"
                "\"full_handshakes\":%llu",
                static_cast<unsigned long long>(resumed), static_cast<unsigned long long>(full), share,
                static_cast<unsigned long long>(resumed_ctr), static_cast<unsigned long long>(full_ctr));
  j += b;
  j += ",\"landed\":{";
  bool first = true;
  for (auto& [srv, n] : landed) {
    j += (first ? "" : ",") + baton::util::json_quote(srv) + ":" + std::to_string(n);
    first = false;
  }
  j += "}";
  std::snprintf(b, sizeof b,
                ",\"failed_tries\":%llu,\"reject_draining\":%llu,\"reject_overloaded\":%llu,\"connect_failures\":%llu,"
                "\"session_failures\":%llu,\"other_failures\":%llu,\"extra_sessions\":%llu,\"early_sessions\":%llu,"
                "\"old_lost_before_new\":%llu,\"new_lost\":%llu,\"closed\":%llu,\"streams_replayed\":%llu",
                static_cast<unsigned long long>(failed_tries), static_cast<unsigned long long>(t.reject_draining),
                static_cast<unsigned long long>(t.reject_overloaded), static_cast<unsigned long long>(t.connect_failures),
                static_cast<unsigned long long>(t.session_failures), static_cast<unsigned long long>(t.other),
                static_cast<unsigned long long>(extra_sessions), static_cast<unsigned long long>(early_sessions),
                static_cast<unsigned long long>(old_lost_before_new), static_cast<unsigned long long>(new_lost),
                static_cast<unsigned long long>(closed), static_cast<unsigned long long>(replayed));
  j += b;
  if (o.long_stream) {
    std::snprintf(b, sizeof b, ",\"long\":{\"streams\":%zu,\"alive\":%zu,\"errors\":%llu,\"rtts\":%llu,", cls.size(),
                  long_alive, static_cast<unsigned long long>(long_errors), static_cast<unsigned long long>(long_rtts));
    j += b;
    j += "\"before_max_ms\":" + dist_json(long_before) + ",\"storm_max_ms\":" + dist_json(long_storm) + "}";
  }
  if (o.short_interval_ms) {
    std::snprintf(b, sizeof b,
                  ",\"short\":{\"before_ok\":%llu,\"before_failed\":%llu,\"storm_opened\":%llu,\"storm_ok\":%llu,"
                  "\"storm_failed\":%llu,",
                  static_cast<unsigned long long>(short_before_ok), static_cast<unsigned long long>(short_before_failed),
                  static_cast<unsigned long long>(short_storm_opened), static_cast<unsigned long long>(short_storm_ok),
                  static_cast<unsigned long long>(short_storm_failed));
    j += b;
    j += "\"storm_ms\":" + dist_json(short_storm_ms) + "}";
  }
  j += ",\"multi_try_clients\":" + std::to_string(multi_try_clients) + ",\"multi_try_samples\":[";
  for (size_t k = 0; k < multi_try_samples.size(); ++k) j += (k ? "," : "") + baton::util::json_quote(multi_try_samples[k]);
  j += "]";
  j += ",\"error_samples\":[";
  for (size_t k = 0; k < errors.size(); ++k) j += (k ? "," : "") + baton::util::json_quote(errors[k]);
  j += "],\"retry_samples\":[";
  for (size_t k = 0; k < t.samples.size(); ++k) j += (k ? "," : "") + baton::util::json_quote(t.samples[k]);
  std::snprintf(b, sizeof b, "],\"warnings\":%llu,\"cpu_s\":%.2f}", static_cast<unsigned long long>(t.warnings), cpu_s);
  j += b;
  print_line(j);

  // --- stop everything; the loop ends when the last handle is closed ---
  quitting = true;
  std::vector<Conv*> live(shorts.begin(), shorts.end());
  for (Conv* c : live) c->close();
  for (Cl& cl : cls) {
    if (cl.lng) cl.lng->close();
    if (cl.client) cl.client->stop();
    uv_close(reinterpret_cast<uv_handle_t*>(&cl.pace), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&cl.shot), nullptr);
  }
  for (uv_handle_t* h : {reinterpret_cast<uv_handle_t*>(&start_deadline), reinterpret_cast<uv_handle_t*>(&phase_timer),
                         reinterpret_cast<uv_handle_t*>(&sweeper), reinterpret_cast<uv_handle_t*>(&checker),
                         reinterpret_cast<uv_handle_t*>(&sigterm), reinterpret_cast<uv_handle_t*>(&sigint)})
    if (!uv_is_closing(h)) uv_close(h, nullptr);
  if (http.open && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&http.tcp)))
    uv_close(reinterpret_cast<uv_handle_t*>(&http.tcp), nullptr);
}

int Storm::run() {
  loop = uv_default_loop();
  loop->data = this;
  t_start = uv_hrtime();
  rng.s = t_start ^ (uint64_t(getpid()) << 32);

  listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  listen_addr.sin_family = AF_INET;
  listen_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof listen_addr;
  if (listen_fd < 0 || bind(listen_fd, reinterpret_cast<sockaddr*>(&listen_addr), sizeof listen_addr) != 0 ||
      listen(listen_fd, 4096) != 0 || getsockname(listen_fd, reinterpret_cast<sockaddr*>(&listen_addr), &len) != 0)
    fatal(std::string("loopback listener: ") + std::strerror(errno));

  cls.resize(o.clients);  // never resized again: the timers live in it
  for (size_t i = 0; i < cls.size(); ++i) {
    cls[i].i = i;
    uv_timer_init(loop, &cls[i].pace);
    uv_timer_init(loop, &cls[i].shot);
    cls[i].pace.data = &cls[i];
    cls[i].shot.data = &cls[i];
  }
  for (uv_timer_t* t : {&start_deadline, &phase_timer, &sweeper}) {
    uv_timer_init(loop, t);
    t->data = this;
  }
  uv_check_init(loop, &checker);
  checker.data = this;
  uv_timer_start(&start_deadline, [](uv_timer_t* t) {
    auto* s = static_cast<Storm*>(t->data);
    s->fatal("not ready within --start-timeout-ms " + std::to_string(s->o.start_timeout_ms) + ": " +
             std::to_string(s->ready) + "/" + std::to_string(s->cls.size()) + " clients on a session, " +
             std::to_string(s->long_warm) + " long streams warm");
  }, o.start_timeout_ms, 0);
  // One-shot streams that never get an answer fail after 15 s.
  uv_timer_start(&sweeper, [](uv_timer_t* t) {
    auto* s = static_cast<Storm*>(t->data);
    uint64_t now = uv_hrtime();
    std::vector<Conv*> late;
    for (Conv* c : s->shorts)
      if (!c->dead && now - c->t_open > kShortTimeoutNs) late.push_back(c);
    for (Conv* c : late) c->fail("no answer within 15 s");
  }, 1000, 1000);
  for (uv_signal_t* sg : {&sigterm, &sigint}) {
    uv_signal_init(loop, sg);
    sg->data = this;
  }
  auto on_signal = [](uv_signal_t* sg, int signum) {
    auto* s = static_cast<Storm*>(sg->data);
    if (s->phase == Phase::starting) s->fatal(signum == SIGTERM ? "interrupted by SIGTERM" : "interrupted by SIGINT");
    s->finish(signum == SIGTERM ? "interrupted by SIGTERM" : "interrupted by SIGINT");
  };
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);

  launch();
  uv_run(loop, UV_RUN_DEFAULT);
  ::close(listen_fd);
  for (Cl& cl : cls) cl.client.reset();
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  return 0;
}

void usage() {
  std::fprintf(stderr,
               "usage: storm --servers A,B[,C...] --ca FILE --server-name NAME --admin HOST:PORT\n"
               "             [--clients 1000] [--route echo] [--rotate 1] [--long 0|1] [--interval-ms 1000]\n"
               "             [--short-interval-ms 0] [--size 256] [--connect-concurrency 100] [--warmup-ms 1000]\n"
               "             [--timeout-ms 15000] [--settle-ms 1000] [--start-timeout-ms 60000] [--label NAME]\n"
               "  token: BATON_TOKEN environment variable; --admin: the first server's admin API\n");
}

}  // namespace

int main(int argc, char** argv) {
  Storm st;
  Options& o = st.o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      usage();
      return 0;
    }
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    std::string v = argv[++i];
    if (a == "--servers") {
      o.servers.clear();
      size_t p = 0;
      while (p <= v.size()) {
        size_t c = v.find(',', p);
        if (c == std::string::npos) c = v.size();
        if (c > p) o.servers.push_back(v.substr(p, c - p));
        p = c + 1;
      }
    } else if (a == "--ca") o.ca_file = v;
    else if (a == "--server-name") o.server_name = v;
    else if (a == "--admin") o.admin = v;
    else if (a == "--route") o.route = v;
    else if (a == "--label") o.label = v;
    else if (a == "--clients") o.clients = size_t(std::atol(v.c_str()));
    else if (a == "--rotate") o.rotate = std::atoi(v.c_str()) != 0;
    else if (a == "--long") o.long_stream = std::atoi(v.c_str()) != 0;
    else if (a == "--interval-ms") o.interval_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--short-interval-ms") o.short_interval_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--size") o.size = size_t(std::atol(v.c_str()));
    else if (a == "--connect-concurrency") o.connect_concurrency = size_t(std::atol(v.c_str()));
    else if (a == "--warmup-ms") o.warmup_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--timeout-ms") o.timeout_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--settle-ms") o.settle_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--start-timeout-ms") o.start_timeout_ms = uint64_t(std::atoll(v.c_str()));
    else {
      usage();
      return 2;
    }
  }
  if (o.servers.size() < 2 || o.admin.empty() || o.clients == 0 || o.size == 0 || o.connect_concurrency == 0 ||
      o.timeout_ms == 0) {
    usage();
    return 2;
  }
  if (const char* t = std::getenv("BATON_TOKEN")) o.token = t;

  // The client library logs at info about every failed try; the sink counts
  // those and passes warnings on to stderr. stdout carries the report.
  st.sink = std::make_shared<CountingSink>();
  auto logger = std::make_shared<spdlog::logger>("storm", st.sink);
  logger->set_level(spdlog::level::info);
  spdlog::set_default_logger(logger);
  std::signal(SIGPIPE, SIG_IGN);

  // Per client: two tunnel connections during the storm, a long stream's
  // pair, a one-shot stream's pair.
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    size_t need = o.clients * (2 + (o.long_stream ? 2 : 0) + (o.short_interval_ms ? 4 : 0)) + 64;
    if (rl.rlim_cur != RLIM_INFINITY && need > rl.rlim_cur) {
      std::fprintf(stderr, "storm: %zu clients need about %zu open files; the limit is %llu\n", o.clients, need,
                   static_cast<unsigned long long>(rl.rlim_cur));
      return 2;
    }
  }
  return st.run();
}
