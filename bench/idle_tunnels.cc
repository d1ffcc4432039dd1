// idle_tunnels: opens many idle connections from one process and one libuv
// loop, then holds them, so that the server's memory per idle connection can
// be measured from outside (bench/run.sh reads the server's VmRSS).
//
//   --mode baton  each connection is a baton tunnel: TLS 1.2, HELLO on the
//                 control stream, wait for WELCOME (docs/protocol.md 1-3). Built
//                 from the project's own proxy::Link, like src/client's
//                 ClientLink, with one shared tls::Context.
//   --mode tls    TLS handshake only (for HAProxy or any TLS terminator);
//                 the first connection also sends a record through the
//                 server to its echo backend and checks the echo
//                 (--probe-echo), to prove the path works end to end.
//
// --suite and --group narrow what the client offers (bench/client_context.h),
// so that every target of bench/peers.py negotiates the same.
//
// Handshakes are cheap after the first: one connection is opened alone, its
// session ticket is shared by all later connections (tls::ClientSession), and
// at most --concurrency handshakes are in flight at once.
//
// stdout gets one JSON line when every connection is established:
//   {"event":"ready","mode":..,"count":N,"failed":F,"open_s":T,"per_s":R,"resumed":K,"suite":S}
// (resumed is -1 where the tool cannot tell: in baton mode the server's debug
// log says it). Then the connections stay open until SIGTERM/SIGINT or
// --hold-s. Progress and errors go to stderr. Exit 1 if the connections cannot
// be opened within --timeout-s or more than --max-failures attempts fail.
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <uv.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "client_context.h"
#include "control.h"
#include "config/config.h"
#include "mux/control.h"
#include "net/listener.h"
#include "net/tcp.h"
#include "proxy/link.h"
#include "tls/context.h"
#include "tls/handshake.h"
#include "tls/record.h"
#include "util/byte_queue.h"
#include "util/bytes.h"

namespace {

using namespace baton;

struct Options {
  std::string mode = "baton";
  std::string server;
  std::string ca_file;
  std::string server_name = "localhost";
  std::string token;
  std::string client_id = "bench-idle";
  std::string suite;  // "": every suite docs/protocol.md allows
  std::string group;
  size_t count = 10000;
  size_t concurrency = 200;
  size_t max_failures = 50;
  uint32_t timeout_s = 150;
  uint32_t hold_s = 600;
  bool probe_echo = false;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Watches the server's plaintext handshake flight (before ChangeCipherSpec)
// for a Certificate message: present in a full handshake, absent in a
// resumed one.
struct HandshakeScan {
  std::vector<uint8_t> rec;
  std::vector<uint8_t> msgs;
  bool ccs = false;
  bool saw_certificate = false;

  void feed(std::span<const uint8_t> in) {
    if (ccs) return;
    rec.insert(rec.end(), in.begin(), in.end());
    size_t off = 0;
    while (rec.size() - off >= 5) {
      size_t len = util::load_u16(&rec[off + 3]);
      if (rec.size() - off < 5 + len) break;
      uint8_t type = rec[off];
      if (type == 20) {
        ccs = true;
        break;
      }
      if (type == 22) msgs.insert(msgs.end(), rec.begin() + long(off) + 5, rec.begin() + long(off + 5 + len));
      off += 5 + len;
    }
    rec.erase(rec.begin(), rec.begin() + long(off));
    size_t m = 0;
    while (msgs.size() - m >= 4) {
      size_t len = size_t(msgs[m + 1]) << 16 | size_t(msgs[m + 2]) << 8 | msgs[m + 3];
      if (msgs.size() - m < 4 + len) break;
      if (msgs[m] == 11) saw_certificate = true;
      m += 4 + len;
    }
    msgs.erase(msgs.begin(), msgs.begin() + long(m));
    if (ccs) {
      rec.clear();
      msgs.clear();
    }
  }
};

class Tool;

// --- baton mode: a client tunnel that stops after WELCOME ---

class IdleLink final : public proxy::Link {
 public:
  IdleLink(Tool& tool, net::Tcp* tcp, tls::Context& ctx, const proxy::LinkLimits& limits,
           const std::string& server_name, tls::ClientSession* resume, uv_loop_t* loop)
      : Link(loop, tcp, ctx, mux::Role::client, limits, server_name, resume), tool_(tool) {}

 protected:
  void on_secure() override;
  void on_control_data() override;
  void on_peer_stream(uint32_t id) override { session().reset(id); }
  void on_closed(const char* reason) override;

 private:
  Tool& tool_;
  bool welcomed_ = false;
};

// --- tls mode: a handshake, then silence ---

class TlsConn final : public net::TcpHandler {
 public:
  TlsConn(Tool& tool, bool probe) : tool_(tool), probe_(probe) {}
  void start(const sockaddr* addr);

 private:
  void on_connected(int status) override;
  void on_read(std::span<const uint8_t> data) override;
  void on_read_end(int err) override;
  void on_written(size_t n, int err) override;
  util::ByteQueue& queue() { return hs_ ? hs_->output() : rl_ ? rl_->output() : out_; }
  void pump();
  void step();
  void fail(const std::string& why);

  Tool& tool_;
  bool probe_;
  net::Tcp* tcp_ = nullptr;
  std::unique_ptr<tls::Handshake> hs_;
  std::unique_ptr<tls::RecordLayer> rl_;  // only while probing
  util::ByteQueue out_;
  HandshakeScan scan_;
  std::string echoed_;
  bool counted_ = false;  // reported to the tool as established
  bool dead_ = false;
};

// Dials a TCP connection, then hands it to an IdleLink.
struct Dial final : net::TcpHandler {
  Tool* tool = nullptr;
  net::Tcp* tcp = nullptr;
  void on_read(std::span<const uint8_t>) override {}
  void on_read_end(int) override {}
  void on_written(size_t, int) override {}
  void on_connected(int status) override;
};

const char kProbe[] = "baton-bench probe: echo me";

class Tool {
 public:
  Options o;
  uv_loop_t* loop = nullptr;
  std::unique_ptr<tls::Context> ctx;
  tls::ClientSession resume;  // the ticket every later connection offers
  sockaddr_storage addr{};
  size_t started = 0, established = 0, failed = 0, in_flight = 0, resumed = 0, lost = 0;
  bool primed = false;  // the first connection is up: its ticket can be shared
  std::string suite;    // negotiated by the first connection
  bool ready = false;
  double t0 = 0, t_ready = 0;
  uv_timer_t progress{}, deadline{}, hold{};
  uv_signal_t sigterm{}, sigint{};

  void launch() {
    if (ready) return;
    size_t want = o.count;
    while (started < want && in_flight < (primed ? o.concurrency : 1)) {
      ++started;
      ++in_flight;
      if (o.mode == "tls") {
        auto* c = new TlsConn(*this, o.probe_echo && started == 1);
        c->start(reinterpret_cast<sockaddr*>(&addr));
      } else {
        auto* d = new Dial;
        d->tool = this;
        d->tcp = net::Tcp::create(loop, d);
        int err = d->tcp->connect(reinterpret_cast<sockaddr*>(&addr));
        if (err) d->on_connected(err);
      }
    }
  }

  void connected(Dial* d, int status) {
    net::Tcp* tcp = d->tcp;
    delete d;
    if (status != 0) {
      tcp->close();
      attempt_failed(std::string("connect: ") + uv_strerror(status));
      return;
    }
    proxy::LinkLimits limits;
    limits.handshake_timeout_ms = o.timeout_s * 1000;
    limits.idle_timeout_ms = UINT32_MAX / 2;  // hold forever; the server's own idle timeout is configured long
    auto* l = new IdleLink(*this, tcp, *ctx, limits, o.server_name, &resume, loop);
    l->start();
  }

  void attempt_ok(bool was_resumed) {
    --in_flight;
    ++established;
    if (was_resumed) ++resumed;
    primed = true;
    if (established == o.count) all_ready();
    else launch();
  }

  void attempt_failed(const std::string& why) {
    --in_flight;
    ++failed;
    std::fprintf(stderr, "idle_tunnels: connection failed: %s\n", why.c_str());
    if (failed > o.max_failures) {
      std::fprintf(stderr, "idle_tunnels: %zu failures, giving up (%zu of %zu open)\n", failed, established, o.count);
      std::fflush(stderr);
      std::_Exit(1);
    }
    --started;  // try again
    launch();
  }

  void connection_lost(const char* reason) {
    ++lost;
    if (lost <= 10) std::fprintf(stderr, "idle_tunnels: an open connection closed: %s\n", reason);
  }

  void all_ready() {
    ready = true;
    t_ready = now_s();
    double open_s = t_ready - t0;
    uv_timer_stop(&deadline);
    uv_timer_stop(&progress);
    std::printf(
        "{\"event\":\"ready\",\"mode\":\"%s\",\"count\":%zu,\"failed\":%zu,\"open_s\":%.3f,\"per_s\":%.0f,"
        "\"resumed\":%lld,\"suite\":\"%s\",\"pid\":%d}\n",
        o.mode.c_str(), established, failed, open_s, double(established) / open_s,
        o.mode == "tls" ? static_cast<long long>(resumed) : -1LL, suite.c_str(), int(getpid()));
    std::fflush(stdout);
    std::fprintf(stderr, "idle_tunnels: %zu %s connections open in %.2f s; holding them (SIGTERM ends)\n", established,
                 o.mode.c_str(), open_s);
    uv_timer_start(&hold, [](uv_timer_t*) { std::_Exit(0); }, uint64_t(o.hold_s) * 1000, 0);
  }

  int run() {
    loop = uv_default_loop();
    auto hp = config::parse_host_port(o.server, false);
    if (!hp || !net::parse_ip(hp->host, hp->port, addr)) {
      std::fprintf(stderr, "idle_tunnels: --server must be IP:PORT, got \"%s\"\n", o.server.c_str());
      return 2;
    }
    std::string err;
    ctx = bench::make_client_context(o.ca_file, o.suite, o.group, err);
    if (!ctx) {
      std::fprintf(stderr, "idle_tunnels: %s\n", err.c_str());
      return 2;
    }
    uv_timer_init(loop, &progress);
    uv_timer_init(loop, &deadline);
    uv_timer_init(loop, &hold);
    progress.data = deadline.data = hold.data = this;
    uv_timer_start(&progress, [](uv_timer_t* h) {
      auto* self = static_cast<Tool*>(h->data);
      std::fprintf(stderr, "idle_tunnels: %zu/%zu open, %zu in flight, %zu failed\n", self->established, self->o.count,
                   self->in_flight, self->failed);
    }, 2000, 2000);
    uv_timer_start(&deadline, [](uv_timer_t* h) {
      auto* self = static_cast<Tool*>(h->data);
      std::fprintf(stderr, "idle_tunnels: timeout: only %zu of %zu open after %u s\n", self->established,
                   self->o.count, self->o.timeout_s);
      std::fflush(stderr);
      std::_Exit(1);
    }, uint64_t(o.timeout_s) * 1000, 0);
    for (uv_signal_t* s : {&sigterm, &sigint}) {
      uv_signal_init(loop, s);
      uv_signal_start(s, [](uv_signal_t*, int) {
        std::fflush(stdout);
        std::fflush(stderr);
        std::_Exit(0);  // the kernel closes 10,000 sockets faster than we would
      }, s == &sigterm ? SIGTERM : SIGINT);
    }
    t0 = now_s();
    launch();
    return uv_run(loop, UV_RUN_DEFAULT);
  }
};

void Dial::on_connected(int status) { tool->connected(this, status); }

void IdleLink::on_secure() {
  if (tool_.suite.empty()) tool_.suite = peer_info().suite_name;
  uint32_t id = session().open();  // 1: the control stream
  (void)session().write(id, bench::hello_message(tool_.o.token, tool_.o.client_id));
  flush();
}

void IdleLink::on_control_data() {
  mux::ControlMessage m;
  std::string error;
  while (phase() < proxy::LinkPhase::flushing) {
    bench::ControlRead r = bench::next_control(session(), m, error);
    if (r == bench::ControlRead::none) return;
    if (r == bench::ControlRead::malformed) {
      close("malformed control message from server", true, mux::GoAwayCode::protocol_error);
      return;
    }
    if (m.welcome && !welcomed_) {
      welcomed_ = true;
      set_phase(proxy::LinkPhase::serving);
      rearm_timer();
      tool_.attempt_ok(false);
    } else if (m.reject) {
      std::fprintf(stderr, "idle_tunnels: REJECT code %u: %s\n", m.reject->code, m.reject->reason.c_str());
      close("rejected by server", false);
      return;
    }
  }
}

void IdleLink::on_closed(const char* reason) {
  if (welcomed_) tool_.connection_lost(reason);
  else tool_.attempt_failed(std::string("tunnel: ") + reason);
}

void TlsConn::start(const sockaddr* addr) {
  tcp_ = net::Tcp::create(tool_.loop, this);
  int err = tcp_->connect(addr);
  if (err) on_connected(err);
}

void TlsConn::on_connected(int status) {
  if (status != 0) {
    fail(std::string("connect: ") + uv_strerror(status));
    return;
  }
  hs_ = std::make_unique<tls::Handshake>(*tool_.ctx, tool_.o.server_name, &tool_.resume);
  tcp_->start_read();
  step();
}

void TlsConn::pump() {
  if (dead_ || tcp_->writing()) return;
  util::ByteQueue& q = queue();
  if (!q.empty()) tcp_->write_from(q);
}

void TlsConn::step() {
  tls::HandshakeStatus st = hs_->step();
  if (st == tls::HandshakeStatus::failed) {
    fail("TLS handshake: " + hs_->error());
    return;
  }
  if (st == tls::HandshakeStatus::done) {
    if (tool_.suite.empty()) tool_.suite = hs_->peer().suite_name;
    hs_->save_session(tool_.resume);
    tls::RecordState rs = hs_->finish();
    hs_.reset();
    if (probe_) {
      rl_ = std::make_unique<tls::RecordLayer>(std::move(rs));
      rl_->seal(util::as_bytes(kProbe));
    } else {
      out_ = std::move(rs.output);
      counted_ = true;
      tool_.attempt_ok(!scan_.saw_certificate);
    }
  }
  pump();
}

void TlsConn::on_read(std::span<const uint8_t> data) {
  if (dead_) return;
  if (hs_) {
    scan_.feed(data);
    hs_->feed(data);
    step();
    return;
  }
  if (!rl_ || counted_) return;  // idle: nothing is expected
  static uint8_t scratch[tls::kScratchSize];
  for (;;) {
    tls::Opened op = rl_->open(data, scratch);
    data = data.subspan(op.used);
    if (op.status == tls::OpenStatus::need_more) return;
    if (op.status != tls::OpenStatus::data) {
      fail(std::string("probe: ") + (op.status == tls::OpenStatus::closed ? "server closed" : op.reason));
      return;
    }
    echoed_.append(util::as_chars(op.plaintext));
    if (echoed_.size() >= sizeof kProbe - 1) {
      if (echoed_ != kProbe) {
        fail("probe: the echo differs from what was sent");
        return;
      }
      std::fprintf(stderr, "idle_tunnels: probe: a TLS record went through the server to the echo upstream and back\n");
      counted_ = true;
      tool_.attempt_ok(!scan_.saw_certificate);
      return;
    }
  }
}

void TlsConn::on_read_end(int err) {
  if (dead_) return;
  std::string why = err ? std::string("read: ") + uv_strerror(err) : "server closed the connection";
  if (!counted_) {
    fail(why);
    return;
  }
  dead_ = true;
  tcp_->close();
  tool_.connection_lost("server closed the connection");
}

void TlsConn::on_written(size_t n, int err) {
  if (dead_) return;
  if (err) {
    if (!counted_) fail(std::string("write: ") + uv_strerror(err));
    return;
  }
  queue().pop(n);
  pump();
}

void TlsConn::fail(const std::string& why) {
  if (dead_) return;
  dead_ = true;
  tcp_->close();
  if (counted_) tool_.connection_lost(why.c_str());
  else tool_.attempt_failed(why);
  // This object is left to leak: the Tcp frees itself, a failed attempt is
  // rare and the tool is short-lived.
}

void usage() {
  std::fprintf(stderr,
               "usage: idle_tunnels --server IP:PORT --ca FILE [--mode baton|tls] [--token T] [--server-name N]\n"
               "                    [--count 10000] [--concurrency 200] [--timeout-s 150] [--hold-s 600]\n"
               "                    [--max-failures 50] [--probe-echo] [--suite NAME] [--group x25519|p256]\n");
}

}  // namespace

int main(int argc, char** argv) {
  Tool tool;
  Options& o = tool.o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--probe-echo") {
      o.probe_echo = true;
      continue;
    }
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    std::string v = argv[++i];
    if (a == "--mode") o.mode = v;
    else if (a == "--server") o.server = v;
    else if (a == "--ca") o.ca_file = v;
    else if (a == "--server-name") o.server_name = v;
    else if (a == "--token") o.token = v;
    else if (a == "--client-id") o.client_id = v;
    else if (a == "--suite") o.suite = v;
    else if (a == "--group") o.group = v;
    else if (a == "--count") o.count = size_t(std::atol(v.c_str()));
    else if (a == "--concurrency") o.concurrency = size_t(std::atol(v.c_str()));
    else if (a == "--max-failures") o.max_failures = size_t(std::atol(v.c_str()));
    else if (a == "--timeout-s") o.timeout_s = uint32_t(std::atol(v.c_str()));
    else if (a == "--hold-s") o.hold_s = uint32_t(std::atol(v.c_str()));
    else {
      usage();
      return 2;
    }
  }
  if (o.server.empty() || (o.mode != "baton" && o.mode != "tls") || o.count == 0 || o.concurrency == 0 ||
      o.timeout_s == 0) {
    usage();
    return 2;
  }
  if (o.mode == "baton" && o.token.empty())
    if (const char* t = std::getenv("BATON_TOKEN")) o.token = t;

  // Logs of the project's classes go to stderr: stdout carries the ready line.
  auto logger = std::make_shared<spdlog::logger>("idle_tunnels", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  std::signal(SIGPIPE, SIG_IGN);

  // One fd per connection, plus a few.
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != RLIM_INFINITY && o.count + 32 > rl.rlim_cur) {
      std::fprintf(stderr, "idle_tunnels: --count %zu needs more open files than the limit %llu\n", o.count,
                   static_cast<unsigned long long>(rl.rlim_cur));
      return 2;
    }
  }
  return tool.run();
}
