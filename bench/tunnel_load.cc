// tunnel_load: a load generator for hot-restart tests and benchmarks.
//
//   tunnel_load --server HOST:PORT --ca FILE --server-name NAME --route echo
//               [--tunnels 200] [--streams 5] [--size 1024] [--churn 0|1] [--interval-ms 0]
//               [--active N] [--connect-concurrency 50] [--timeout-ms 10000] [--client-id PREFIX]
//               [--resume 0|1]
//   --resume 0: the clients do not ask for session resume (default 1: they do).
//   --active N: only the first N tunnels open streams (the others stay idle).
//   The token comes from the BATON_TOKEN environment variable.
//
// One libuv loop, one thread. Opens --tunnels baton::Client sessions (at most
// --connect-concurrency handshakes at a time); once a session is ready it
// opens --streams streams with Client::open_stream(). Each stream is a
// loopback TCP pair: one end goes to open_stream(), the other stays here as
// the stream's "app socket". Every stream runs request/response against the
// route (an echo upstream): write --size random bytes, read exactly --size
// bytes back, compare, record the round trip, repeat -- at once, or after
// --interval-ms (paced load: round trips then measure the path, not a queue).
// A mismatch, EOF or error on an app socket, a rejected or closed session is
// an error. Each tunnel's local TCP address is recorded when it becomes ready
// and checked at every report: a change means a reconnect ("port_changes").
//
// --churn 1 adds a connector that, one after the other and forever, opens a
// new Client, waits for it to be ready, does one 64-byte request/response on
// one stream and stops it ("churn_ok"; a reject, close, error or
// --timeout-ms without success counts in "churn_failures").
//
// stdout, one JSON object a line:
//   {"event":"ready","tunnels":N,"streams":M,"open_s":T}
//     every tunnel is ready and every stream (M in all) has completed at
//     least one round trip. If that does not happen within --timeout-ms, or a
//     tunnel or stream fails before it, the tool prints
//     {"event":"failed","error":"..."} (and the same on stderr) and exits 1.
// Then commands on stdin, one a line:
//   mark NAME  ends the current window (the first is "start", opened at the
//              ready line) and prints
//     {"window":"start","seconds":S,"rtts":N,"p50_us":..,"p99_us":..,"max_us":..,
//      "tunnel_max_p50_us":..,"tunnel_max_p99_us":..,
//      "errors":E,"port_changes":P,"churn_ok":C,"churn_failures":F,"stalled_streams":K}
//              tunnel_max_*: over tunnels, each tunnel's longest round trip
//              in the window (the pause its client saw).
//              max_us includes the age of requests still outstanding at the
//              mark; stalled_streams counts streams whose request has been
//              outstanding for more than 1 s at the mark. NAME opens the next window.
//   back       the network is about to come back: prints {"event":"back_armed"},
//              then, once every ready tunnel completed a round trip after it,
//              {"event":"back","tunnels":N,"p50_ms":..,"p99_ms":..,"max_ms":..}
//              (from `back` to each tunnel's first round trip completed).
//   quit       (or EOF on stdin, SIGTERM, SIGINT) prints the last window's
//              line, then
//     {"event":"done","rtts_total":..,"errors_total":..,"error_samples":[...],
//      "port_changes_total":..,"churn_ok_total":..,"churn_failures_total":..,
//      "detached_total":..,"resumed_total":..,"sessions_lost_total":..,"resume_failed_total":..,
//      "resume_pause_p50_ms":..,"resume_pause_p99_ms":..,"resume_pause_max_ms":..,
//      "churn_failure_samples":[...]}
//              stops every client (Go Away, close_notify) and exits 0, errors
//              or not: the caller judges the numbers.
// error_samples holds the first 20 error descriptions (port changes
// included), churn_failure_samples the first 20 churn failure reasons.
// Logs of the project's classes (warnings and up) go to stderr.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spdlog/sinks/stdout_sinks.h>
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
#include <memory>
#include <string>
#include <utility>
#include <deque>
#include <vector>

#include "baton/client.h"
#include "util/json.h"

namespace {

constexpr size_t kMaxSamples = 20;
constexpr size_t kChurnSize = 64;
constexpr uint64_t kStallNs = 1000000000ull;  // 1 s
constexpr uint64_t kChurnRetryMs = 100;       // pause after a failed churn attempt
constexpr uint64_t kReapAfterMs = 5000;       // a stopped client is deleted this long after stop()

struct Options {
  std::string server;
  std::string ca_file;
  std::string server_name;
  std::string token;
  std::string route = "echo";
  std::string client_id = "tunnel-load";
  size_t tunnels = 200;
  size_t streams = 5;
  size_t size = 1024;
  bool churn = false;
  bool resume = true;  // the clients ask for session resume (docs/protocol.md 9)
  uint64_t interval_ms = 0;  // pause between a response and the next request (0: none)
  size_t active = SIZE_MAX;  // only the first `active` tunnels open streams; the rest stay idle
  size_t connect_concurrency = 50;
  uint64_t timeout_ms = 10000;
};

using baton::util::json_quote;

void print_line(const std::string& line) {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// splitmix64: cheap and good enough to make every request different.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  void fill(uint8_t* p, size_t n) {
    while (n >= 8) {
      uint64_t v = next();
      std::memcpy(p, &v, 8);
      p += 8;
      n -= 8;
    }
    if (n) {
      uint64_t v = next();
      std::memcpy(p, &v, n);
    }
  }
};

class Tool;

// One app socket doing request/response. Tunnel streams live until exit;
// the churn connector's stream deletes itself when its handle is closed.
struct Stream {
  Tool* tool = nullptr;
  bool churn = false;
  size_t tunnel = 0, index = 0;
  uv_tcp_t app{};
  uv_write_t wreq{};
  std::vector<uint8_t> req, resp;
  size_t got = 0;
  bool awaiting = false;  // a request is outstanding (response not complete)
  bool writing = false;   // the request's write has not completed
  bool dead = false;      // failed or closed: no more events count
  bool open = false;      // `app` was initialised
  uint64_t t_sent = 0;    // uv_hrtime() when the request was written
  uint64_t rtts = 0;

  std::string name() const {
    if (churn) return "churn stream";
    return "tunnel " + std::to_string(tunnel) + " stream " + std::to_string(index);
  }
  bool start(uv_loop_t* loop, int fd);
  void send_request();
  void fail(const std::string& why);
  void close();  // quietly
  static void alloc_cb(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void read_cb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);
  static void write_cb(uv_write_t* w, int status);
  static void close_cb(uv_handle_t* h);
};

struct Tunnel {
  size_t index = 0;
  std::unique_ptr<baton::Client> client;
  std::string local;  // local_address() when it became ready
  bool connecting = false;
  bool ready = false;
  bool failed = false;  // rejected or closed: counted once
  uint32_t win_max_us = 0;  // longest round trip of this tunnel in the current window
  bool back_done = false;   // `back`: this tunnel's first round trip since is timed
  std::vector<std::unique_ptr<Stream>> streams;
};

struct Window {
  std::string name;
  uint64_t t0 = 0;
  std::vector<uint32_t> us;
  uint64_t errors = 0, port_changes = 0, churn_ok = 0, churn_failures = 0;
};

class Tool {
 public:
  Options o;
  uv_loop_t* loop = nullptr;
  Rng rng{0};
  int listen_fd = -1;
  sockaddr_in listen_addr{};
  std::vector<Tunnel> tunnels;
  size_t next_tunnel = 0, connecting = 0, tunnels_ready = 0, streams_warm = 0;
  bool ready = false, quitting = false;
  uint64_t t_start = 0;
  Window win;
  uint64_t rtts_total = 0, errors_total = 0, port_changes_total = 0, churn_ok_total = 0, churn_failures_total = 0;
  // Session resume (the load's tunnels): connections that broke and kept
  // their session, resumes, sessions lost (not resumed) and resumes that
  // failed (refused or window ended: the tunnel's streams were reset).
  uint64_t detached_total = 0, resumed_total = 0, sessions_lost_total = 0, resume_failed_total = 0;
  std::vector<uint32_t> resume_pause_ms;
  std::vector<std::string> error_samples, churn_samples;

  // stdin
  union {
    uv_pipe_t pipe;
    uv_tty_t tty;
  } in{};
  bool in_open = false;
  std::string in_buf;

  uv_timer_t deadline{}, reaper{}, pacer{};
  std::deque<std::pair<uint64_t, Stream*>> paced;  // (due uv_now ms, stream) for --interval-ms
  size_t active_streams() const { return std::min(o.active, tunnels.size()) * o.streams; }
  void next_request(Stream* s) {
    if (o.interval_ms == 0) s->send_request();
    else paced.emplace_back(uv_now(loop) + o.interval_ms, s);
  }
  uv_signal_t sigterm{}, sigint{};

  // churn connector
  struct {
    std::unique_ptr<baton::Client> client;
    Stream* stream = nullptr;
    uint64_t gen = 0;
    bool active = false;
    uv_timer_t timeout{}, next{};
  } ch;
  std::vector<std::pair<uint64_t, std::unique_ptr<baton::Client>>> graveyard;  // (delete at, client)

  int run();
  void fatal(const std::string& why);
  bool make_pair(int& app_fd, int& relay_fd, std::string& err);
  baton::ClientOptions client_options(const std::string& id) const;

  void launch();
  void start_tunnel(size_t i);
  void tunnel_ready(size_t i);
  void tunnel_failed(size_t i, const std::string& why);

  void record_rtt(Stream* s, uint64_t ns);
  void stream_failed(Stream* s, const std::string& why);
  void error(const std::string& what);
  void check_ready();

  void churn_start();
  void churn_ready(uint64_t gen);
  void churn_end(bool ok, const std::string& why);

  void start_stdin();
  void on_input(const char* p, size_t n);
  void command(const std::string& line);
  void report(bool final_window);
  void mark(const std::string& name);
  void quit();
  // `back`: the network is about to come back (the caller restores it after
  // the "back_armed" line). Each tunnel's first round trip completed after
  // this moment is timed; once every ready tunnel has one, one line:
  //   {"event":"back","tunnels":N,"p50_ms":..,"p99_ms":..,"max_ms":..}
  uint64_t back_ns = 0;
  std::vector<uint64_t> back_lat_ns;
  void arm_back();
  void back_rtt(Tunnel& tn, uint64_t now);
  void retire(std::unique_ptr<baton::Client> c);
};

// --- Stream ---

bool Stream::start(uv_loop_t* loop, int fd) {
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

void Stream::send_request() {
  tool->rng.fill(req.data(), req.size());
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

void Stream::alloc_cb(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* s = static_cast<Stream*>(h->data);
  static char scratch[65536];
  if (s->awaiting && s->got < s->resp.size()) {
    *buf = uv_buf_init(reinterpret_cast<char*>(s->resp.data() + s->got), unsigned(s->resp.size() - s->got));
  } else {
    *buf = uv_buf_init(scratch, sizeof scratch);
  }
}

void Stream::read_cb(uv_stream_t* st, ssize_t nread, const uv_buf_t* buf) {
  auto* s = static_cast<Stream*>(st->data);
  if (s->dead || s->tool->quitting) return;
  if (nread < 0) {
    s->fail(nread == UV_EOF         ? std::string("app socket EOF (the tunnel closed the stream)")
            : nread == UV_ECONNRESET ? std::string("app socket reset (the tunnel reset the stream)")
                                     : std::string("app socket read error: ") + uv_strerror(int(nread)));
    return;
  }
  if (nread == 0) return;
  if (!s->awaiting || buf->base != reinterpret_cast<char*>(s->resp.data() + s->got)) {
    s->fail("unexpected data (" + std::to_string(nread) + " bytes) with no request outstanding");
    return;
  }
  s->got += size_t(nread);
  if (s->got < s->resp.size()) return;
  uint64_t ns = uv_hrtime() - s->t_sent;
  s->awaiting = false;
  if (std::memcmp(s->req.data(), s->resp.data(), s->req.size()) != 0) {
    size_t at = 0;
    while (at < s->req.size() && s->req[at] == s->resp[at]) ++at;
    s->fail("echo mismatch at byte " + std::to_string(at) + " of " + std::to_string(s->req.size()) + " (round trip " +
            std::to_string(s->rtts + 1) + ")");
    return;
  }
  ++s->rtts;
  s->tool->record_rtt(s, ns);  // may close a churn stream
  if (!s->dead && !s->writing && !s->churn) s->tool->next_request(s);
}

void Stream::write_cb(uv_write_t* w, int status) {
  auto* s = static_cast<Stream*>(w->handle->data);
  s->writing = false;
  if (s->dead || s->tool->quitting) return;
  if (status < 0) {
    s->fail(std::string("app socket write error: ") + uv_strerror(status));
    return;
  }
  if (!s->awaiting && !s->churn) s->tool->next_request(s);  // the echo came back before the write completed
}

void Stream::fail(const std::string& why) {
  if (dead) return;
  close();
  tool->stream_failed(this, why);  // may delete a churn stream's owner link: `this` stays valid until close_cb
}

void Stream::close() {
  if (dead) return;
  dead = true;
  awaiting = false;
  if (open && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&app)))
    uv_close(reinterpret_cast<uv_handle_t*>(&app), close_cb);
  else if (!open && churn)
    delete this;
}

void Stream::close_cb(uv_handle_t* h) {
  auto* s = static_cast<Stream*>(h->data);
  if (s->churn) delete s;
}

// --- Tool ---

void Tool::fatal(const std::string& why) {
  std::fprintf(stderr, "tunnel_load: %s\n", why.c_str());
  print_line("{\"event\":\"failed\",\"error\":" + json_quote(why) + "}");
  std::exit(1);
}

baton::ClientOptions Tool::client_options(const std::string& id) const {
  baton::ClientOptions co;
  co.server = o.server;
  co.server_name = o.server_name;
  co.token = o.token;
  co.client_id = id;
  co.ca_file = o.ca_file;
  co.connect_timeout_ms = uint32_t(std::min<uint64_t>(o.timeout_ms, UINT32_MAX));
  co.resume = o.resume;
  return co;
}

// A connected loopback TCP pair through our own listener.
bool Tool::make_pair(int& app_fd, int& relay_fd, std::string& err) {
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

void Tool::launch() {
  while (!quitting && next_tunnel < tunnels.size() && connecting < o.connect_concurrency) start_tunnel(next_tunnel++);
}

void Tool::start_tunnel(size_t i) {
  Tunnel& t = tunnels[i];
  t.index = i;
  t.connecting = true;
  ++connecting;
  baton::ClientEvents ev;
  ev.on_ready = [this, i](const baton::ClientReady&) { tunnel_ready(i); };
  ev.on_reject = [this, i](uint16_t code, const std::string& reason) {
    tunnel_failed(i, "rejected (code " + std::to_string(code) + ": " + reason + ")");
  };
  ev.on_closed = [this, i](const std::string& err) { tunnel_failed(i, "session closed: " + err); };
  ev.on_detached = [this](uint64_t, const std::string&, uint32_t) { ++detached_total; };
  ev.on_resumed = [this](uint64_t, const std::string&, uint64_t paused_ms, uint64_t) {
    ++resumed_total;
    resume_pause_ms.push_back(uint32_t(std::min<uint64_t>(paused_ms, UINT32_MAX)));
  };
  ev.on_session_lost = [this, i](uint64_t, const std::string& why) {
    ++sessions_lost_total;
    if (error_samples.size() < kMaxSamples) error_samples.push_back("tunnel " + std::to_string(i) + ": session lost: " + why);
  };
  ev.on_resume_failed = [this, i](uint64_t, const std::string& why) {
    ++resume_failed_total;
    if (error_samples.size() < kMaxSamples) error_samples.push_back("tunnel " + std::to_string(i) + ": " + why);
  };
  t.client = std::make_unique<baton::Client>(loop, client_options(o.client_id + "-" + std::to_string(i)), ev);
  std::string err = t.client->start();
  if (!err.empty()) fatal("tunnel " + std::to_string(i) + ": " + err);
}

void Tool::tunnel_ready(size_t i) {
  Tunnel& t = tunnels[i];
  if (quitting || t.ready || t.failed) return;
  t.ready = true;
  t.connecting = false;
  --connecting;
  ++tunnels_ready;
  t.local = t.client->local_address();
  size_t nstreams = t.index < o.active ? o.streams : 0;
  for (size_t k = 0; k < nstreams; ++k) {
    auto s = std::make_unique<Stream>();
    s->tool = this;
    s->tunnel = i;
    s->index = k;
    s->req.resize(o.size);
    s->resp.resize(o.size);
    Stream* sp = s.get();
    t.streams.push_back(std::move(s));
    int app_fd = -1, relay_fd = -1;
    std::string err;
    if (!make_pair(app_fd, relay_fd, err)) {
      sp->dead = true;
      stream_failed(sp, err);
      continue;
    }
    if (!t.client->open_stream(relay_fd, o.route)) {
      ::close(app_fd);
      sp->dead = true;
      stream_failed(sp, "open_stream failed (no session)");
      continue;
    }
    sp->start(loop, app_fd);
  }
  launch();
  if (nstreams == 0) check_ready();  // an idle tunnel may be the last one awaited
}

void Tool::tunnel_failed(size_t i, const std::string& why) {
  Tunnel& t = tunnels[i];
  if (quitting || t.failed) return;
  t.failed = true;
  if (t.connecting) {
    t.connecting = false;
    --connecting;
  }
  std::string what = "tunnel " + std::to_string(i) + ": " + why;
  if (!ready) fatal(what);
  error(what);
}

void Tool::error(const std::string& what) {
  ++win.errors;
  ++errors_total;
  if (error_samples.size() < kMaxSamples) error_samples.push_back(what);
}

void Tool::record_rtt(Stream* s, uint64_t ns) {
  if (s->churn) {
    if (s == ch.stream) churn_end(true, "");
    return;
  }
  uint32_t us = uint32_t(std::min<uint64_t>(ns / 1000, UINT32_MAX));
  win.us.push_back(us);
  Tunnel& tn = tunnels[s->tunnel];
  tn.win_max_us = std::max(tn.win_max_us, us);
  if (back_ns && !tn.back_done) back_rtt(tn, uv_hrtime());
  if (ready) ++rtts_total;
  if (s->rtts == 1) {
    ++streams_warm;
    check_ready();
  }
}

void Tool::stream_failed(Stream* s, const std::string& why) {
  if (quitting) return;
  if (s->churn) {
    if (s == ch.stream) churn_end(false, "stream: " + why);
    return;
  }
  std::string what = s->name() + ": " + why;
  if (!ready) fatal(what);
  error(what);
}

void Tool::check_ready() {
  if (ready || tunnels_ready < tunnels.size() || streams_warm < active_streams()) return;
  ready = true;
  uv_timer_stop(&deadline);
  double open_s = double(uv_hrtime() - t_start) / 1e9;
  char b[160];
  std::snprintf(b, sizeof b, "{\"event\":\"ready\",\"tunnels\":%zu,\"streams\":%zu,\"open_s\":%.3f}", tunnels.size(),
                active_streams(), open_s);
  print_line(b);
  win = Window{};
  win.name = "start";
  win.t0 = uv_hrtime();
  start_stdin();
  if (o.churn) churn_start();
}

// --- churn connector ---

void Tool::churn_start() {
  if (quitting) return;
  uint64_t gen = ++ch.gen;
  ch.active = true;
  baton::ClientEvents ev;
  ev.on_ready = [this, gen](const baton::ClientReady&) { churn_ready(gen); };
  ev.on_reject = [this, gen](uint16_t code, const std::string& reason) {
    if (gen == ch.gen && ch.active) churn_end(false, "rejected (code " + std::to_string(code) + ": " + reason + ")");
  };
  ev.on_closed = [this, gen](const std::string& err) {
    if (gen == ch.gen && ch.active) churn_end(false, "session closed: " + err);
  };
  ch.client = std::make_unique<baton::Client>(loop, client_options(o.client_id + "-churn-" + std::to_string(gen)), ev);
  uv_timer_start(
      &ch.timeout,
      [](uv_timer_t* t) {
        auto* tool = static_cast<Tool*>(t->data);
        if (tool->ch.active) tool->churn_end(false, "no round trip within --timeout-ms");
      },
      o.timeout_ms, 0);
  std::string err = ch.client->start();
  if (!err.empty()) churn_end(false, err);
}

void Tool::churn_ready(uint64_t gen) {
  if (gen != ch.gen || !ch.active || quitting) return;
  auto* s = new Stream;
  s->tool = this;
  s->churn = true;
  s->req.resize(kChurnSize);
  s->resp.resize(kChurnSize);
  ch.stream = s;
  int app_fd = -1, relay_fd = -1;
  std::string err;
  if (!make_pair(app_fd, relay_fd, err)) {
    churn_end(false, err);
    return;
  }
  if (!ch.client->open_stream(relay_fd, o.route)) {
    ::close(app_fd);
    churn_end(false, "open_stream failed (no session)");
    return;
  }
  s->start(loop, app_fd);
}

void Tool::churn_end(bool ok, const std::string& why) {
  if (!ch.active) return;
  ch.active = false;
  uv_timer_stop(&ch.timeout);
  if (ok) {
    ++win.churn_ok;
    ++churn_ok_total;
  } else {
    ++win.churn_failures;
    ++churn_failures_total;
    if (churn_samples.size() < kMaxSamples) churn_samples.push_back("attempt " + std::to_string(ch.gen) + ": " + why);
  }
  if (Stream* s = ch.stream) {
    ch.stream = nullptr;
    s->close();  // deleted in its close callback (or now, if never opened)
  }
  if (ch.client) {
    ch.client->stop();
    retire(std::move(ch.client));
  }
  // The next attempt starts from the loop, not from inside this client's callback.
  if (!quitting) uv_timer_start(&ch.next, [](uv_timer_t* t) { static_cast<Tool*>(t->data)->churn_start(); },
                                ok ? 0 : kChurnRetryMs, 0);
}

// A stopped client may still be flushing its Go Away: delete it later.
void Tool::retire(std::unique_ptr<baton::Client> c) {
  graveyard.emplace_back(uv_now(loop) + kReapAfterMs, std::move(c));
}

// --- stdin and reports ---

void Tool::start_stdin() {
  uv_handle_type kind = uv_guess_handle(0);
  auto* st = reinterpret_cast<uv_stream_t*>(&in);
  int err = 0;
  if (kind == UV_NAMED_PIPE) {
    uv_pipe_init(loop, &in.pipe, 0);
    err = uv_pipe_open(&in.pipe, 0);
  } else if (kind == UV_TTY) {
    err = uv_tty_init(loop, &in.tty, 0, 1);
  } else {
    // A file or /dev/null: read it now; EOF means quit.
    char b[4096];
    for (;;) {
      ssize_t n = ::read(0, b, sizeof b);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      on_input(b, size_t(n));
      if (quitting) return;
    }
    on_input(nullptr, 0);
    return;
  }
  if (err) fatal(std::string("cannot read stdin: ") + uv_strerror(err));
  in_open = true;
  st->data = this;
  err = uv_read_start(
      st,
      [](uv_handle_t*, size_t, uv_buf_t* buf) {
        static char b[4096];
        *buf = uv_buf_init(b, sizeof b);
      },
      [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
        auto* tool = static_cast<Tool*>(s->data);
        if (n < 0) tool->on_input(nullptr, 0);
        else if (n > 0) tool->on_input(buf->base, size_t(n));
      });
  if (err) fatal(std::string("cannot read stdin: ") + uv_strerror(err));
}

// n == 0 with p == nullptr: EOF.
void Tool::on_input(const char* p, size_t n) {
  if (quitting) return;
  if (!p) {
    if (!in_buf.empty()) command(in_buf);
    in_buf.clear();
    quit();
    return;
  }
  in_buf.append(p, n);
  size_t nl;
  while (!quitting && (nl = in_buf.find('\n')) != std::string::npos) {
    std::string line = in_buf.substr(0, nl);
    in_buf.erase(0, nl + 1);
    command(line);
  }
}

void Tool::command(const std::string& raw) {
  size_t b = raw.find_first_not_of(" \t\r");
  size_t e = raw.find_last_not_of(" \t\r");
  if (b == std::string::npos) return;
  std::string line = raw.substr(b, e - b + 1);
  std::string cmd = line.substr(0, line.find_first_of(" \t"));
  std::string arg;
  if (cmd.size() < line.size()) {
    arg = line.substr(cmd.size());
    arg = arg.substr(arg.find_first_not_of(" \t"));
  }
  if (cmd == "mark") mark(arg.empty() ? "unnamed" : arg);
  else if (cmd == "quit") quit();
  else if (cmd == "back") arm_back();
  else std::fprintf(stderr, "tunnel_load: unknown command \"%s\" (mark NAME | back | quit)\n", line.c_str());
}

void Tool::arm_back() {
  back_lat_ns.clear();
  for (Tunnel& t : tunnels) t.back_done = false;
  back_ns = uv_hrtime();
  print_line("{\"event\":\"back_armed\"}");
}

void Tool::back_rtt(Tunnel& tn, uint64_t now) {
  tn.back_done = true;
  back_lat_ns.push_back(now - back_ns);
  size_t live = 0;
  for (const Tunnel& t : tunnels) live += t.ready && !t.failed;
  if (back_lat_ns.size() < live) return;
  std::vector<uint64_t> v = back_lat_ns;
  std::sort(v.begin(), v.end());
  auto q = [&](double f) { return double(v[std::min(v.size() - 1, size_t(f * v.size()))]) / 1e6; };
  print_line(baton::util::json_text(baton::util::Json{{"event", "back"},
                                                      {"tunnels", v.size()},
                                                      {"p50_ms", q(0.5)},
                                                      {"p99_ms", q(0.99)},
                                                      {"max_ms", double(v.back()) / 1e6}}));
  back_ns = 0;
}

// Prints the current window's line (after checking the tunnels' addresses).
void Tool::report(bool) {
  uint64_t now = uv_hrtime();
  for (Tunnel& t : tunnels) {
    if (!t.ready || t.failed || !t.client) continue;
    std::string cur = t.client->local_address();
    if (cur != t.local) {
      ++win.port_changes;
      ++port_changes_total;
      if (error_samples.size() < kMaxSamples)
        error_samples.push_back("tunnel " + std::to_string(t.index) + ": local address changed " + t.local + " -> " +
                                (cur.empty() ? "(none)" : cur));
      t.local = cur;
    }
  }
  size_t stalled = 0;
  uint64_t max_us = 0;
  // Each tunnel's longest pause in the window (a request still outstanding
  // counts with its age so far): the client-side view of a restart.
  std::vector<uint32_t> tunnel_max;
  for (Tunnel& t : tunnels) {
    uint32_t tm = t.win_max_us;
    for (auto& s : t.streams) {
      if (s->dead || !s->awaiting) continue;
      uint64_t age = now - s->t_sent;
      if (age > kStallNs) ++stalled;
      max_us = std::max<uint64_t>(max_us, age / 1000);
      tm = std::max(tm, uint32_t(std::min<uint64_t>(age / 1000, UINT32_MAX)));
    }
    if (t.ready && !t.failed && !t.streams.empty()) tunnel_max.push_back(tm);
    t.win_max_us = 0;
  }
  uint64_t tp50 = 0, tp99 = 0;
  if (!tunnel_max.empty()) {
    std::sort(tunnel_max.begin(), tunnel_max.end());
    tp50 = tunnel_max[std::min(tunnel_max.size() - 1, tunnel_max.size() / 2)];
    tp99 = tunnel_max[std::min(tunnel_max.size() - 1, size_t(double(tunnel_max.size()) * 0.99))];
  }
  std::vector<uint32_t>& v = win.us;
  uint64_t p50 = 0, p99 = 0;
  if (!v.empty()) {
    std::sort(v.begin(), v.end());
    p50 = v[std::min(v.size() - 1, v.size() / 2)];
    p99 = v[std::min(v.size() - 1, size_t(double(v.size()) * 0.99))];
    max_us = std::max<uint64_t>(max_us, v.back());
  }
  char b[640];
  std::snprintf(b, sizeof b,
                ",\"seconds\":%.3f,\"rtts\":%zu,\"p50_us\":%llu,\"p99_us\":%llu,\"max_us\":%llu,"
                "\"tunnel_max_p50_us\":%llu,\"tunnel_max_p99_us\":%llu,\"errors\":%llu,"
                "\"port_changes\":%llu,\"churn_ok\":%llu,\"churn_failures\":%llu,\"stalled_streams\":%zu}",
                double(now - win.t0) / 1e9, v.size(), static_cast<unsigned long long>(p50),
                static_cast<unsigned long long>(p99), static_cast<unsigned long long>(max_us),
                static_cast<unsigned long long>(tp50), static_cast<unsigned long long>(tp99),
                static_cast<unsigned long long>(win.errors), static_cast<unsigned long long>(win.port_changes),
                static_cast<unsigned long long>(win.churn_ok), static_cast<unsigned long long>(win.churn_failures),
                stalled);
  print_line("{\"window\":" + json_quote(win.name) + b);
}

void Tool::mark(const std::string& name) {
  report(false);
  win = Window{};
  win.name = name;
  win.t0 = uv_hrtime();
}

void Tool::quit() {
  if (quitting) return;
  report(true);
  std::sort(resume_pause_ms.begin(), resume_pause_ms.end());
  auto pause_q = [&](double q) -> uint32_t {
    return resume_pause_ms.empty() ? 0 : resume_pause_ms[std::min(resume_pause_ms.size() - 1, size_t(q * resume_pause_ms.size()))];
  };
  baton::util::Json done = {{"event", "done"},
                            {"rtts_total", rtts_total},
                            {"errors_total", errors_total},
                            {"port_changes_total", port_changes_total},
                            {"churn_ok_total", churn_ok_total},
                            {"churn_failures_total", churn_failures_total},
                            {"detached_total", detached_total},
                            {"resumed_total", resumed_total},
                            {"sessions_lost_total", sessions_lost_total},
                            {"resume_failed_total", resume_failed_total},
                            {"resume_pause_p50_ms", pause_q(0.5)},
                            {"resume_pause_p99_ms", pause_q(0.99)},
                            {"resume_pause_max_ms", resume_pause_ms.empty() ? 0u : resume_pause_ms.back()},
                            {"error_samples", error_samples},
                            {"churn_failure_samples", churn_samples}};
  print_line(baton::util::json_text(done));
  quitting = true;

  // Stop everything; the loop ends when the last Go Away is flushed.
  if (in_open) {
    uv_read_stop(reinterpret_cast<uv_stream_t*>(&in));
    uv_close(reinterpret_cast<uv_handle_t*>(&in), nullptr);
    in_open = false;
  }
  for (uv_handle_t* h : {reinterpret_cast<uv_handle_t*>(&deadline), reinterpret_cast<uv_handle_t*>(&reaper),
                         reinterpret_cast<uv_handle_t*>(&pacer),
                         reinterpret_cast<uv_handle_t*>(&sigterm), reinterpret_cast<uv_handle_t*>(&sigint),
                         reinterpret_cast<uv_handle_t*>(&ch.timeout), reinterpret_cast<uv_handle_t*>(&ch.next)})
    if (!uv_is_closing(h)) uv_close(h, nullptr);
  if (ch.stream) {
    ch.stream->close();
    ch.stream = nullptr;
  }
  if (ch.client) ch.client->stop();
  for (Tunnel& t : tunnels) {
    if (t.client) t.client->stop();
    for (auto& s : t.streams) s->close();
  }
}

int Tool::run() {
  loop = uv_default_loop();
  t_start = uv_hrtime();
  uint64_t seed = t_start ^ (uint64_t(getpid()) << 32);
  rng.s = seed;

  listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  listen_addr.sin_family = AF_INET;
  listen_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof listen_addr;
  if (listen_fd < 0 || bind(listen_fd, reinterpret_cast<sockaddr*>(&listen_addr), sizeof listen_addr) != 0 ||
      listen(listen_fd, 4096) != 0 ||
      getsockname(listen_fd, reinterpret_cast<sockaddr*>(&listen_addr), &len) != 0)
    fatal(std::string("loopback listener: ") + std::strerror(errno));

  for (uv_timer_t* t : {&deadline, &reaper, &pacer, &ch.timeout, &ch.next}) {
    uv_timer_init(loop, t);
    t->data = this;
  }
  if (o.interval_ms)
    uv_timer_start(
        &pacer,
        [](uv_timer_t* t) {
          auto* tool = static_cast<Tool*>(t->data);
          uint64_t now = uv_now(tool->loop);
          while (!tool->paced.empty() && tool->paced.front().first <= now && !tool->quitting) {
            Stream* s = tool->paced.front().second;
            tool->paced.pop_front();
            if (!s->dead && !s->awaiting && !s->writing) s->send_request();
          }
        },
        1, 1);
  uv_timer_start(
      &deadline,
      [](uv_timer_t* t) {
        auto* tool = static_cast<Tool*>(t->data);
        tool->fatal("not ready within --timeout-ms " + std::to_string(tool->o.timeout_ms) + ": " +
                    std::to_string(tool->tunnels_ready) + "/" + std::to_string(tool->tunnels.size()) +
                    " tunnels ready, " + std::to_string(tool->streams_warm) + "/" +
                    std::to_string(tool->active_streams()) + " streams completed a round trip");
      },
      o.timeout_ms, 0);
  uv_timer_start(
      &reaper,
      [](uv_timer_t* t) {
        auto* tool = static_cast<Tool*>(t->data);
        uint64_t now = uv_now(tool->loop);
        auto& g = tool->graveyard;
        g.erase(std::remove_if(g.begin(), g.end(), [now](auto& e) { return e.first <= now; }), g.end());
      },
      1000, 1000);
  for (uv_signal_t* s : {&sigterm, &sigint}) {
    uv_signal_init(loop, s);
    s->data = this;
  }
  auto on_signal = [](uv_signal_t* s, int signum) {
    auto* tool = static_cast<Tool*>(s->data);
    if (!tool->ready) tool->fatal(std::string("interrupted by ") + (signum == SIGTERM ? "SIGTERM" : "SIGINT"));
    tool->quit();
  };
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);

  tunnels.resize(o.tunnels);
  launch();
  uv_run(loop, UV_RUN_DEFAULT);
  // Every handle is closed; the clients' links are gone. Delete the clients.
  ::close(listen_fd);
  for (Tunnel& t : tunnels) t.client.reset();
  ch.client.reset();
  graveyard.clear();
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  return 0;
}

void usage() {
  std::fprintf(stderr,
               "usage: tunnel_load --server HOST:PORT --ca FILE --server-name NAME --route ROUTE\n"
               "                   [--tunnels 200] [--streams 5] [--size 1024] [--churn 0|1] [--resume 0|1] [--interval-ms 0] [--active N]\n"
               "                   [--connect-concurrency 50] [--timeout-ms 10000] [--client-id PREFIX]\n"
               "  token: BATON_TOKEN environment variable. stdin commands: mark NAME | quit\n");
}

}  // namespace

int main(int argc, char** argv) {
  Tool tool;
  Options& o = tool.o;
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
    if (a == "--server") o.server = v;
    else if (a == "--ca") o.ca_file = v;
    else if (a == "--server-name") o.server_name = v;
    else if (a == "--route") o.route = v;
    else if (a == "--client-id") o.client_id = v;
    else if (a == "--tunnels") o.tunnels = size_t(std::atol(v.c_str()));
    else if (a == "--streams") o.streams = size_t(std::atol(v.c_str()));
    else if (a == "--active") o.active = size_t(std::atol(v.c_str()));
    else if (a == "--size") o.size = size_t(std::atol(v.c_str()));
    else if (a == "--churn") o.churn = std::atoi(v.c_str()) != 0;
    else if (a == "--resume") o.resume = std::atoi(v.c_str()) != 0;
    else if (a == "--interval-ms") o.interval_ms = uint64_t(std::atoll(v.c_str()));
    else if (a == "--connect-concurrency") o.connect_concurrency = size_t(std::atol(v.c_str()));
    else if (a == "--timeout-ms") o.timeout_ms = uint64_t(std::atoll(v.c_str()));
    else {
      usage();
      return 2;
    }
  }
  if (o.server.empty() || o.route.empty() || o.tunnels == 0 || o.streams == 0 || o.size == 0 ||
      o.connect_concurrency == 0 || o.timeout_ms == 0) {
    usage();
    return 2;
  }
  if (const char* t = std::getenv("BATON_TOKEN")) o.token = t;

  // Logs of the project's classes go to stderr: stdout carries the JSON lines.
  auto logger = std::make_shared<spdlog::logger>("tunnel_load", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  // TUNNEL_LOAD_LOG=debug|info: more of the client's own log (default warn).
  const char* lvl = std::getenv("TUNNEL_LOAD_LOG");
  logger->set_level(lvl ? spdlog::level::from_str(lvl) : spdlog::level::warn);
  spdlog::set_default_logger(logger);
  std::signal(SIGPIPE, SIG_IGN);

  // Per tunnel: its TCP connection and two fds per stream (plus the churn pair).
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    size_t need = o.tunnels + std::min(o.active, o.tunnels) * 2 * o.streams + 64;
    if (rl.rlim_cur != RLIM_INFINITY && need > rl.rlim_cur) {
      std::fprintf(stderr, "tunnel_load: %zu tunnels x %zu streams need about %zu open files; the limit is %llu\n",
                   o.tunnels, o.streams, need, static_cast<unsigned long long>(rl.rlim_cur));
      return 2;
    }
  }
  return tool.run();
}
