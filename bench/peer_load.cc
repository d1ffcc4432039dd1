// peer_load: the request/response, handshake and reload load of
// bench/peers.py. One program for every target: plain TLS to HAProxy,
// stunnel and nginx (each forwarding to the echo upstream), the baton
// protocol to `baton serve` (TLS, HELLO/WELCOME, then one yamux stream with
// the route preamble per connection, docs/protocol.md 1-4). Both are the
// project's own code (tls::Handshake, tls::RecordLayer, mux::Session) on one
// libuv loop, so the client-side cost of a connection is the same for every
// target apart from baton's 12-byte frame headers.
//
//   peer_load rr --proto tls|baton --server IP:PORT --ca FILE [common]
//             [--conns 16] [--size 1024] [--warmup-s 0.5] [--seconds 2]
//     --conns connections, each: write --size bytes, read the echo, check
//     it, repeat at once. After the warm-up, for --seconds: round trips per
//     second and the latency distribution. Prints one JSON line
//     {"mode":"rr","rtts":N,"per_s":R,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,"max_us":..,
//      "errors":E,"target_cpu_s":C,"per_core_s":N/C,"client_cpu_s":..,"suite":..}
//
//   peer_load handshakes ... [--resume 0|1] [--concurrency 8] [--warmup-s 0.3] [--seconds 2]
//     --concurrency connections at a time, each: connect, TLS handshake
//     (baton: also HELLO and WELCOME), close_notify, close, and the next one.
//     --resume 1 first makes one full handshake and offers its session (a
//     ticket, or the session id where the server issues no ticket) on every
//     later one; "resumed" counts the handshakes the server did resume.
//     {"mode":"handshakes","count":N,"per_s":R,"resumed":K,"failed":F,
//      "target_cpu_s":C,"per_core_s":N/C,"client_cpu_s":..}
//
//   peer_load reload ... [--conns 16] [--interval-ms 10] [--dialers 2] [--dial-interval-ms 10]
//     Load to keep going while the target reloads: --conns persistent
//     connections, each sending a --size request every --interval-ms once
//     its previous answer is in, and --dialers that each open a new
//     connection (resumed), make one round trip and close it, every
//     --dial-interval-ms. A persistent connection that breaks is an error
//     and is replaced. Prints {"event":"ready",...} when every persistent
//     connection has made a round trip; then SIGUSR1 prints the window since
//     the last one:
//     {"window":K,"seconds":S,"rtts":N,"max_rtt_us":..,"p99_rtt_us":..,
//      "errors":E,"refused":F,"reconnects":R,"new_ok":C,"new_max_us":..,"samples":[...]}
//     max_rtt_us, the longest pause, includes requests still unanswered at
//     the report. errors: established connections that broke or answered
//     wrongly (persistent or new); refused: connections that failed before
//     their TLS handshake finished (refused, reset, timed out). SIGTERM or
//     SIGINT prints the last window and {"event":"done"} and exits 0.
//
// common: [--server-name localhost] [--route echo] [--suite NAME] [--group x25519|p256]
//         [--target-pids P,Q,..] [--timeout-s 20]; token in BATON_TOKEN (baton).
// --target-pids: the processes whose utime+stime during the measured window
// give target_cpu_s (nginx and HAProxy: master and worker). Exit 1 when the
// load cannot start (a connection or handshake fails before the measurement,
// more than 50 failed handshakes), 2 on a usage error.
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "client_context.h"
#include "control.h"
#include "config/config.h"
#include "mux/control.h"
#include "mux/session.h"
#include "net/listener.h"
#include "net/tcp.h"
#include "tls/handshake.h"
#include "tls/record.h"
#include "util/json.h"

namespace {

using namespace baton;

struct Options {
  std::string mode;
  std::string proto = "tls";
  std::string server;
  std::string ca_file;
  std::string server_name = "localhost";
  std::string route = "echo";
  std::string suite;
  std::string group;
  std::string token;
  std::vector<int> target_pids;
  size_t conns = 16;
  size_t size = 1024;
  size_t concurrency = 8;
  size_t dialers = 2;
  bool resume = false;
  double warmup_s = 0.5;
  double seconds = 2;
  uint32_t interval_ms = 10;
  uint32_t dial_interval_ms = 10;
  uint32_t timeout_s = 20;
};

constexpr size_t kMaxFailures = 50;
constexpr size_t kMaxSamples = 10;
constexpr uint32_t kTickMs = 50;      // housekeeping: timeouts and retries (rr, handshakes)
constexpr uint32_t kRetryMs = 10;     // a failed connection's slot waits this long

double self_cpu_s() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// utime + stime of the processes, in seconds (a process that is gone counts 0).
double target_cpu_s(const std::vector<int>& pids) {
  static const double hz = double(sysconf(_SC_CLK_TCK));
  double ticks = 0;
  for (int pid : pids) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    size_t p = s.rfind(')');
    if (p == std::string::npos) continue;
    std::istringstream in(s.substr(p + 2));
    std::string field;
    for (int i = 0; i < 13 && in >> field; ++i)
      if (i == 11 || i == 12) ticks += std::atof(field.c_str());  // fields 14 and 15 of proc(5)
  }
  return ticks / hz;
}

// Nearest-rank percentile of sorted v (q in (0, 1]).
double pct(const std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  size_t rank = size_t(q * double(v.size()) + 0.999999);
  return v[std::min(v.size(), std::max<size_t>(rank, 1)) - 1];
}

// What a connection is waiting for (ARCHITECTURE principle 3).
enum class ConnPhase : uint8_t {
  awaiting_connect = 0,
  awaiting_handshake = 1,
  awaiting_welcome = 2,  // baton: HELLO sent
  ready = 3,             // requests may be sent
  flushing_close = 4,    // close_notify queued; closed once written
  down = 5,
};

class Conn;

class ConnOwner {
 public:
  virtual ~ConnOwner() = default;
  virtual void on_ready(Conn& c) = 0;
  virtual void on_data(Conn& c, std::span<const uint8_t> data) = 0;
  // The connection failed or the server ended it; `c` is deleted later.
  virtual void on_down(Conn& c, const std::string& why) = 0;
};

struct Env {
  uv_loop_t* loop = nullptr;
  tls::Context* ctx = nullptr;
  const Options* o = nullptr;
  sockaddr_storage addr{};
  std::vector<Conn*> dead;  // deleted by the reaper after the callback that retired them
};

// One client connection: TCP, TLS and, for baton, a yamux session with the
// control stream and one data stream. Sans-IO cores, libuv I/O.
class Conn final : public net::TcpHandler, public mux::SessionHandler {
 public:
  // `offer`: a saved session to resume (may be shared, read only); `save`:
  // where to save this connection's session; `open_stream`: baton only,
  // open the data stream after WELCOME (handshake loads stop at WELCOME).
  Conn(Env& env, ConnOwner& owner, tls::ClientSession* offer, tls::ClientSession* save, bool open_stream)
      : env_(env), owner_(owner), offer_(offer), save_(save), open_stream_(open_stream),
        baton_(env.o->proto == "baton") {}

  void start() {
    t_start = uv_hrtime();
    tcp_ = net::Tcp::create(env_.loop, this);
    int err = tcp_->connect(reinterpret_cast<const sockaddr*>(&env_.addr));
    if (err) on_connected(err);
  }

  // Sends application bytes (tls) or stream bytes (baton). Precondition: ready.
  void send(std::span<const uint8_t> d) {
    if (phase_ != ConnPhase::ready) return;
    if (!baton_) {
      rl_->seal(d);
    } else {
      size_t n = session_->write(data_id_, d);
      if (n != d.size()) {  // 1 KiB requests never fill a 256 KiB window that is answered
        down("stream send window exhausted");
        return;
      }
      flush_session();
    }
    pump();
  }

  // close_notify, then close once it is written; the owner hears nothing more.
  void finish() {
    if (phase_ == ConnPhase::down || phase_ == ConnPhase::flushing_close) return;
    if (!rl_) {
      retire();
      return;
    }
    phase_ = ConnPhase::flushing_close;
    if (!rl_->state().close_notify_sent) rl_->seal_alert(tls::alert::close_notify, false);
    pump();
  }

  ConnPhase phase() const { return phase_; }
  bool secured() const { return secured_; }  // the TLS handshake finished
  bool resumed() const { return resumed_; }
  const std::string& suite() const { return suite_; }

  uint64_t t_start = 0;  // uv_hrtime() at start()
  size_t slot = 0;       // the owner's bookkeeping

 private:
  // net::TcpHandler
  void on_connected(int status) override {
    if (status != 0) {
      down(std::string("connect: ") + uv_strerror(status));
      return;
    }
    hs_ = std::make_unique<tls::Handshake>(*env_.ctx, env_.o->server_name, offer_);
    phase_ = ConnPhase::awaiting_handshake;
    tcp_->start_read();
    step_handshake();
  }

  void on_read(std::span<const uint8_t> data) override {
    if (phase_ == ConnPhase::down || phase_ == ConnPhase::flushing_close) return;
    if (hs_) {
      hs_->feed(data);
      step_handshake();
      return;
    }
    open_records(data);
  }

  void on_read_end(int err) override {
    if (phase_ == ConnPhase::flushing_close) retire();
    else down(err ? std::string("read: ") + uv_strerror(err) : "the server closed the connection");
  }

  void on_written(size_t n, int err) override {
    if (phase_ == ConnPhase::down) return;
    if (err) {
      if (phase_ == ConnPhase::flushing_close) retire();
      else down(std::string("write: ") + uv_strerror(err));
      return;
    }
    output().pop(n);
    pump();
  }

  // mux::SessionHandler (baton)
  void on_stream_opened(uint32_t id) override { session_->reset(id); }
  void on_stream_data(uint32_t id) override {
    if (id == 1) control();
    else if (id == data_id_) stream_data();
  }
  void on_stream_fin(uint32_t id) override {
    down(id == 1 ? "the server closed the control stream" : "the server closed the data stream");
  }
  void on_stream_reset(uint32_t id) override {
    down(id == 1 ? "the server reset the control stream" : "the server reset the data stream");
  }
  void on_stream_writable(uint32_t) override {}
  void on_stream_closed(uint32_t) override {}

  util::ByteQueue& output() { return hs_ ? hs_->output() : rl_->output(); }

  // Direct writes first, like baton's links: a uv_write that completes at
  // once costs an epoll_ctl and a deferred callback per request.
  void pump() {
    if (!tcp_ || tcp_->writing()) return;
    util::ByteQueue& q = output();
    tcp_->write_now(q);
    if (!q.empty()) tcp_->write_from(q);
    else if (phase_ == ConnPhase::flushing_close) retire();
  }

  void step_handshake() {
    tls::HandshakeStatus st = hs_->step();
    if (st == tls::HandshakeStatus::failed) {
      down("TLS handshake: " + hs_->error());
      return;
    }
    if (st == tls::HandshakeStatus::done) {
      if (save_) hs_->save_session(*save_);
      resumed_ = hs_->peer().resumed;
      suite_ = hs_->peer().suite_name;
      rl_ = std::make_unique<tls::RecordLayer>(hs_->finish());
      hs_.reset();
      secured_ = true;
      secure();
      if (phase_ == ConnPhase::down) return;
      open_records({});  // records that came right behind the server's Finished
      if (phase_ == ConnPhase::down) return;
    }
    pump();
  }

  void secure() {
    if (!baton_) {
      phase_ = ConnPhase::ready;
      owner_.on_ready(*this);
      return;
    }
    session_ = std::make_unique<mux::Session>(mux::Role::client, *this);
    uint32_t id = session_->open();  // 1: the control stream
    (void)session_->write(id, bench::hello_message(env_.o->token, "peer-load"));
    phase_ = ConnPhase::awaiting_welcome;
    flush_session();
  }

  void open_records(std::span<const uint8_t> data) {
    static uint8_t scratch[tls::kScratchSize];
    for (;;) {
      tls::Opened op = rl_->open(data, scratch);
      data = data.subspan(op.used);
      if (op.status == tls::OpenStatus::need_more) return;
      if (op.status == tls::OpenStatus::closed) {
        down("the server sent close_notify");
        return;
      }
      if (op.status == tls::OpenStatus::fatal) {
        down(std::string("TLS record: ") + op.reason);
        return;
      }
      if (!baton_) {
        if (phase_ == ConnPhase::ready) owner_.on_data(*this, op.plaintext);
      } else {
        mux::ConsumeResult r = session_->consume(op.plaintext);
        if (r.status != mux::ConsumeStatus::ok) {
          down(std::string("yamux: ") + (r.error ? r.error : mux::to_str(r.status)));
          return;
        }
        if (phase_ != ConnPhase::down) flush_session();  // Window Updates, Ping answers
      }
      if (phase_ == ConnPhase::down || phase_ == ConnPhase::flushing_close) return;
    }
  }

  void control() {
    mux::ControlMessage m;
    std::string error;
    while (phase_ == ConnPhase::awaiting_welcome || phase_ == ConnPhase::ready) {
      bench::ControlRead r = bench::next_control(*session_, m, error);
      if (r == bench::ControlRead::none) return;
      if (r == bench::ControlRead::malformed) {
        down(error);
        return;
      }
      if (m.reject) {
        down("REJECT " + std::to_string(m.reject->code) + ": " + m.reject->reason);
        return;
      }
      if (m.welcome && phase_ == ConnPhase::awaiting_welcome) {
        if (open_stream_) {
          data_id_ = session_->open();
          std::vector<uint8_t> pre;
          mux::encode_preamble(env_.o->route, pre);
          (void)session_->write(data_id_, pre);
          flush_session();
        }
        phase_ = ConnPhase::ready;
        owner_.on_ready(*this);
      }
    }
  }

  void stream_data() {
    while (phase_ == ConnPhase::ready) {
      const util::ByteQueue* in = session_->inbound(data_id_);
      if (in->empty()) return;
      std::span<const uint8_t> f = in->front();
      size_t n = f.size();
      owner_.on_data(*this, f);
      if (phase_ == ConnPhase::down) return;
      session_->consumed(data_id_, n);
    }
  }

  // Seals the session's frames as proxy::Link::flush does: straight from the
  // queue, no allocation, so the baton protocol costs the client only its
  // framing, not a copy the TLS path does not make.
  void flush_session() { rl_->seal_from(session_->output()); }

  // Closes without telling the owner (it asked for the end).
  void retire() {
    if (phase_ == ConnPhase::down) return;
    phase_ = ConnPhase::down;
    if (tcp_) tcp_->close();
    tcp_ = nullptr;
    env_.dead.push_back(this);
  }

  void down(const std::string& why) {
    if (phase_ == ConnPhase::down) return;
    bool told = phase_ != ConnPhase::flushing_close;
    retire();
    if (told) owner_.on_down(*this, why);
  }

  Env& env_;
  ConnOwner& owner_;
  tls::ClientSession* offer_;
  tls::ClientSession* save_;
  bool open_stream_;
  bool baton_;
  ConnPhase phase_ = ConnPhase::awaiting_connect;
  net::Tcp* tcp_ = nullptr;
  std::unique_ptr<tls::Handshake> hs_;
  std::unique_ptr<tls::RecordLayer> rl_;
  std::unique_ptr<mux::Session> session_;
  uint32_t data_id_ = 0;
  bool secured_ = false;
  bool resumed_ = false;
  std::string suite_;
};

// One place a connection lives in: a persistent connection, a handshake
// loop or a dialer.
struct Slot {
  bool persistent = true;
  Conn* conn = nullptr;
  bool ready = false;
  uint64_t sent_ns = 0;   // the request in flight was sent then (0: none)
  size_t got = 0;         // bytes of its answer so far
  uint64_t next_ns = 0;   // dialers and failed slots: start no connection before
};

// Statistics of one reload window (or of the whole rr / handshake run).
struct Window {
  uint64_t t0_ns = 0;
  std::vector<double> rtt_us;
  double max_rtt_us = 0;
  size_t errors = 0, refused = 0, reconnects = 0, new_ok = 0;
  double new_max_us = 0;
  std::vector<std::string> samples;
  void sample(const std::string& s) {
    if (samples.size() < kMaxSamples) samples.push_back(s);
  }
};

class Tool final : public ConnOwner {
 public:
  explicit Tool(Options o) : o_(std::move(o)) {}

  int run() {
    env_.loop = uv_default_loop();
    env_.o = &o_;
    auto hp = config::parse_host_port(o_.server, false);
    if (!hp || !net::parse_ip(hp->host, hp->port, env_.addr)) {
      std::fprintf(stderr, "peer_load: --server must be IP:PORT, got \"%s\"\n", o_.server.c_str());
      return 2;
    }
    std::string err;
    ctx_ = bench::make_client_context(o_.ca_file, o_.suite, o_.group, err);
    if (!ctx_) {
      std::fprintf(stderr, "peer_load: %s\n", err.c_str());
      return 2;
    }
    env_.ctx = ctx_.get();
    request_.resize(o_.size);
    std::mt19937 rng(12345);
    for (uint8_t& b : request_) b = uint8_t(rng());

    uv_check_init(env_.loop, &reaper_);
    reaper_.data = this;
    uv_check_start(&reaper_, [](uv_check_t* h) {
      auto* self = static_cast<Tool*>(h->data);
      for (Conn* c : self->env_.dead) delete c;
      self->env_.dead.clear();
    });
    uv_timer_init(env_.loop, &tick_);
    uv_timer_init(env_.loop, &phase_timer_);
    uv_timer_init(env_.loop, &deadline_);
    tick_.data = phase_timer_.data = deadline_.data = this;
    uv_timer_start(&tick_, [](uv_timer_t* t) { static_cast<Tool*>(t->data)->on_tick(); },
                   o_.mode == "reload" ? o_.interval_ms : kTickMs, o_.mode == "reload" ? o_.interval_ms : kTickMs);
    uv_timer_start(&deadline_, [](uv_timer_t* t) {
      auto* self = static_cast<Tool*>(t->data);
      self->fatal("the load did not start within " + std::to_string(self->o_.timeout_s) + " s");
    }, uint64_t(o_.timeout_s) * 1000, 0);
    for (auto [sig, h] : {std::pair{SIGTERM, &sigterm_}, std::pair{SIGINT, &sigint_}, std::pair{SIGUSR1, &sigusr1_}}) {
      uv_signal_init(env_.loop, h);
      h->data = this;
      uv_signal_start(h, [](uv_signal_t* s, int signum) {
        auto* self = static_cast<Tool*>(s->data);
        if (signum == SIGUSR1) self->report_window();
        else self->stop_reload();
      }, sig);
    }

    if (o_.mode == "rr") {
      slots_.resize(o_.conns);
    } else if (o_.mode == "handshakes") {
      slots_.resize(o_.concurrency);
      for (Slot& s : slots_) s.persistent = false;
    } else {
      slots_.resize(o_.conns + o_.dialers);
      for (size_t i = o_.conns; i < slots_.size(); ++i) slots_[i].persistent = false;
    }
    // Resumed handshakes (and reload's dialers) need a session first: one
    // full handshake alone, then every slot.
    if (o_.resume || o_.mode == "reload") {
      priming_ = true;
      auto* c = new Conn(env_, *this, nullptr, &session_, o_.mode != "handshakes");
      c->slot = SIZE_MAX;
      c->start();
    } else {
      launch_all();
    }
    return uv_run(env_.loop, UV_RUN_DEFAULT);
  }

 private:
  // --- ConnOwner ---
  void on_ready(Conn& c) override {
    if (c.slot == SIZE_MAX) {  // the priming connection
      suite_ = c.suite();
      c.finish();
      priming_ = false;
      launch_all();
      return;
    }
    if (suite_.empty()) suite_ = c.suite();
    Slot& s = slots_[c.slot];
    s.ready = true;
    if (o_.mode == "handshakes") {
      if (measuring_) {
        ++count_;
        if (c.resumed()) ++resumed_;
      }
      c.finish();
      s.conn = nullptr;
      start_slot(c.slot);
      return;
    }
    if (o_.mode == "rr" || !s.persistent) send_request(s);  // reload's persistent ones wait for the tick
    if (!started_ && std::all_of(slots_.begin(), slots_.begin() + long(o_.conns), [](const Slot& x) { return x.ready; }))
      all_ready();
  }

  void on_data(Conn& c, std::span<const uint8_t> d) override {
    Slot& s = slots_[c.slot];
    if (s.sent_ns == 0 || s.got + d.size() > request_.size() ||
        std::memcmp(request_.data() + s.got, d.data(), d.size()) != 0) {
      win_.errors++;
      win_.sample("the echo differs from the request");
      c.finish();
      replace(c.slot);
      return;
    }
    s.got += d.size();
    if (s.got < request_.size()) return;
    uint64_t now = uv_hrtime();
    double us = double(now - s.sent_ns) / 1e3;
    s.sent_ns = 0;
    if (!s.persistent) {  // a reload dialer: one round trip on a new connection
      win_.new_ok++;
      win_.new_max_us = std::max(win_.new_max_us, double(now - c.t_start) / 1e3);
      c.finish();
      s.conn = nullptr;
      s.ready = false;
      s.next_ns = c.t_start + uint64_t(o_.dial_interval_ms) * 1000000;
      return;
    }
    if (measuring_ || o_.mode == "reload") {
      win_.rtt_us.push_back(us);
      win_.max_rtt_us = std::max(win_.max_rtt_us, us);
    }
    if (o_.mode == "rr") send_request(s);
  }

  void on_down(Conn& c, const std::string& why) override {
    if (c.slot == SIZE_MAX) fatal("the first connection failed: " + why);
    Slot& s = slots_[c.slot];
    s.conn = nullptr;
    s.ready = false;
    s.sent_ns = 0;
    if (!c.secured()) {
      ++failed_;
      win_.refused++;
      win_.sample("refused: " + why);
      if (!started_ || o_.mode == "handshakes")
        std::fprintf(stderr, "peer_load: connection failed: %s\n", why.c_str());
      if (failed_ > kMaxFailures && o_.mode != "reload") fatal(std::to_string(failed_) + " connections failed");
    } else {
      win_.errors++;
      win_.sample(why);
      if (!started_ && o_.mode != "handshakes") fatal("a connection broke before the load started: " + why);
    }
    if (s.persistent) win_.reconnects++;
    s.next_ns = uv_hrtime() + uint64_t(kRetryMs) * 1000000;
  }

  // --- slots ---
  void launch_all() {
    for (size_t i = 0; i < slots_.size(); ++i) start_slot(i);
    if (o_.mode == "handshakes") all_ready();
  }

  void start_slot(size_t i) {
    Slot& s = slots_[i];
    s.got = 0;
    s.sent_ns = 0;
    s.ready = false;
    s.next_ns = 0;
    bool offer = o_.mode == "reload" || (o_.mode == "handshakes" && o_.resume);
    s.conn = new Conn(env_, *this, offer ? &session_ : nullptr, nullptr, o_.mode != "handshakes");
    s.conn->slot = i;
    s.conn->start();
  }

  void replace(size_t i) {
    slots_[i].conn = nullptr;
    slots_[i].ready = false;
    if (slots_[i].persistent) win_.reconnects++;
    slots_[i].next_ns = uv_hrtime() + uint64_t(kRetryMs) * 1000000;
  }

  void send_request(Slot& s) {
    s.got = 0;
    s.sent_ns = uv_hrtime();
    s.conn->send(request_);
  }

  void on_tick() {
    uint64_t now = uv_hrtime();
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (priming_) break;
      if (!s.conn) {
        if (now >= s.next_ns) start_slot(i);
        continue;
      }
      // A connection that has not become ready in time counts as refused.
      if (!s.ready && now - s.conn->t_start > uint64_t(o_.timeout_s) * 1000000000ull) {
        Conn* c = s.conn;
        c->finish();
        on_down(*c, "no handshake within " + std::to_string(o_.timeout_s) + " s");
        continue;
      }
      if (o_.mode == "reload" && s.persistent && s.ready && s.sent_ns == 0) send_request(s);
    }
  }

  // --- phases ---
  void all_ready() {
    started_ = true;
    uv_timer_stop(&deadline_);
    if (o_.mode == "reload") {
      win_ = Window{};
      win_.t0_ns = uv_hrtime();
      std::printf("{\"event\":\"ready\",\"conns\":%zu,\"dialers\":%zu,\"suite\":%s}\n", o_.conns, o_.dialers,
                  util::json_quote(suite_).c_str());
      std::fflush(stdout);
      return;
    }
    uv_timer_start(&phase_timer_, [](uv_timer_t* t) { static_cast<Tool*>(t->data)->start_measuring(); },
                   uint64_t(o_.warmup_s * 1000), 0);
  }

  void start_measuring() {
    win_ = Window{};
    count_ = resumed_ = 0;
    measuring_ = true;
    t0_ns_ = uv_hrtime();
    cpu0_ = target_cpu_s(o_.target_pids);
    self0_ = self_cpu_s();
    uv_timer_start(&phase_timer_, [](uv_timer_t* t) { static_cast<Tool*>(t->data)->finish_run(); },
                   uint64_t(o_.seconds * 1000), 0);
  }

  void finish_run() {
    measuring_ = false;
    double secs = double(uv_hrtime() - t0_ns_) / 1e9;
    double cpu = target_cpu_s(o_.target_pids) - cpu0_;
    double self = self_cpu_s() - self0_;
    if (o_.mode == "rr") {
      std::vector<double>& v = win_.rtt_us;
      std::sort(v.begin(), v.end());
      std::printf(
          "{\"mode\":\"rr\",\"proto\":\"%s\",\"suite\":%s,\"conns\":%zu,\"size\":%zu,\"seconds\":%.3f,\"rtts\":%zu,"
          "\"per_s\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,"
          "\"errors\":%zu,\"refused\":%zu,\"target_cpu_s\":%.3f,\"per_core_s\":%.1f,\"client_cpu_s\":%.3f}\n",
          o_.proto.c_str(), util::json_quote(suite_).c_str(), o_.conns, o_.size, secs, v.size(),
          double(v.size()) / secs, pct(v, 0.5), pct(v, 0.9), pct(v, 0.99), pct(v, 0.999), v.empty() ? 0.0 : v.back(),
          win_.errors, win_.refused, cpu, cpu > 0 ? double(v.size()) / cpu : 0.0, self);
    } else {
      std::printf(
          "{\"mode\":\"handshakes\",\"proto\":\"%s\",\"suite\":%s,\"resume\":%d,\"concurrency\":%zu,\"seconds\":%.3f,"
          "\"count\":%zu,\"per_s\":%.1f,\"resumed\":%zu,\"failed\":%zu,\"target_cpu_s\":%.3f,\"per_core_s\":%.1f,"
          "\"client_cpu_s\":%.3f}\n",
          o_.proto.c_str(), util::json_quote(suite_).c_str(), o_.resume ? 1 : 0, o_.concurrency, secs, count_,
          double(count_) / secs, resumed_, win_.refused + win_.errors, cpu, cpu > 0 ? double(count_) / cpu : 0.0,
          self);
    }
    std::fflush(stdout);
    std::_Exit(0);  // the kernel closes the connections
  }

  void report_window() {
    if (o_.mode != "reload" || !started_) return;
    uint64_t now = uv_hrtime();
    for (const Slot& s : slots_)  // an answer still awaited is a pause too
      if (s.persistent && s.sent_ns) win_.max_rtt_us = std::max(win_.max_rtt_us, double(now - s.sent_ns) / 1e3);
    std::sort(win_.rtt_us.begin(), win_.rtt_us.end());
    std::string samples = "[";
    for (size_t i = 0; i < win_.samples.size(); ++i) samples += (i ? "," : "") + util::json_quote(win_.samples[i]);
    samples += "]";
    std::printf(
        "{\"window\":%zu,\"seconds\":%.3f,\"rtts\":%zu,\"max_rtt_us\":%.1f,\"p99_rtt_us\":%.1f,\"errors\":%zu,"
        "\"refused\":%zu,\"reconnects\":%zu,\"new_ok\":%zu,\"new_max_us\":%.1f,\"samples\":%s}\n",
        ++windows_, double(now - win_.t0_ns) / 1e9, win_.rtt_us.size(), win_.max_rtt_us, pct(win_.rtt_us, 0.99),
        win_.errors, win_.refused, win_.reconnects, win_.new_ok, win_.new_max_us, samples.c_str());
    std::fflush(stdout);
    win_ = Window{};
    win_.t0_ns = now;
  }

  void stop_reload() {
    report_window();
    std::printf("{\"event\":\"done\"}\n");
    std::fflush(stdout);
    std::_Exit(0);
  }

  [[noreturn]] void fatal(const std::string& why) {
    std::fprintf(stderr, "peer_load: %s\n", why.c_str());
    std::printf("{\"event\":\"failed\",\"error\":%s}\n", util::json_quote(why).c_str());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  }

  Options o_;
  Env env_;
  std::unique_ptr<tls::Context> ctx_;
  tls::ClientSession session_;  // offered by resumed handshakes and reload's connections
  std::vector<uint8_t> request_;
  std::vector<Slot> slots_;
  Window win_;
  std::string suite_;
  bool priming_ = false;
  bool started_ = false;
  bool measuring_ = false;
  size_t count_ = 0, resumed_ = 0, failed_ = 0, windows_ = 0;
  uint64_t t0_ns_ = 0;
  double cpu0_ = 0, self0_ = 0;
  uv_check_t reaper_{};
  uv_timer_t tick_{}, phase_timer_{}, deadline_{};
  uv_signal_t sigterm_{}, sigint_{}, sigusr1_{};
};

void usage() {
  std::fprintf(stderr,
               "usage: peer_load rr|handshakes|reload --proto tls|baton --server IP:PORT --ca FILE\n"
               "         [--server-name localhost] [--route echo] [--suite NAME] [--group x25519|p256]\n"
               "         [--target-pids P,Q] [--timeout-s 20] [--conns 16] [--size 1024] [--warmup-s 0.5]\n"
               "         [--seconds 2] [--resume 0|1] [--concurrency 8] [--interval-ms 10] [--dialers 2]\n"
               "         [--dial-interval-ms 10]       (token for baton: BATON_TOKEN)\n");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (argc < 2) {
    usage();
    return 2;
  }
  o.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    std::string v = argv[++i];
    if (a == "--proto") o.proto = v;
    else if (a == "--server") o.server = v;
    else if (a == "--ca") o.ca_file = v;
    else if (a == "--server-name") o.server_name = v;
    else if (a == "--route") o.route = v;
    else if (a == "--suite") o.suite = v;
    else if (a == "--group") o.group = v;
    else if (a == "--target-pids") {
      std::istringstream in(v);
      std::string p;
      while (std::getline(in, p, ','))
        if (!p.empty()) o.target_pids.push_back(std::atoi(p.c_str()));
    } else if (a == "--conns") o.conns = size_t(std::atol(v.c_str()));
    else if (a == "--size") o.size = size_t(std::atol(v.c_str()));
    else if (a == "--concurrency") o.concurrency = size_t(std::atol(v.c_str()));
    else if (a == "--dialers") o.dialers = size_t(std::atol(v.c_str()));
    else if (a == "--resume") o.resume = v == "1";
    else if (a == "--warmup-s") o.warmup_s = std::atof(v.c_str());
    else if (a == "--seconds") o.seconds = std::atof(v.c_str());
    else if (a == "--interval-ms") o.interval_ms = uint32_t(std::atol(v.c_str()));
    else if (a == "--dial-interval-ms") o.dial_interval_ms = uint32_t(std::atol(v.c_str()));
    else if (a == "--timeout-s") o.timeout_s = uint32_t(std::atol(v.c_str()));
    else {
      usage();
      return 2;
    }
  }
  if ((o.mode != "rr" && o.mode != "handshakes" && o.mode != "reload") || (o.proto != "tls" && o.proto != "baton") ||
      o.server.empty() || o.conns == 0 || o.size == 0 || o.concurrency == 0 || o.seconds <= 0 ||
      o.interval_ms == 0 || o.dial_interval_ms == 0 || o.timeout_s == 0 || o.route.empty() || o.route.size() > 255) {
    usage();
    return 2;
  }
  if (const char* t = std::getenv("BATON_TOKEN")) o.token = t;

  auto logger = std::make_shared<spdlog::logger>("peer_load", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  std::signal(SIGPIPE, SIG_IGN);
  return Tool(std::move(o)).run();
}
