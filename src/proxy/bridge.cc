#include "proxy/bridge.h"

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <algorithm>

#include "mux/control.h"
#include "proxy/link.h"

namespace baton::proxy {

const char* to_str(BridgePhase p) {
  switch (p) {
    case BridgePhase::awaiting_preamble: return "awaiting_preamble";
    case BridgePhase::awaiting_upstream: return "awaiting_upstream";
    case BridgePhase::relaying: return "relaying";
    case BridgePhase::done: return "done";
  }
  return "?";
}

Bridge::Bridge(Link& link, uint32_t id)
    : link_(link), id_(id), phase_(BridgePhase::awaiting_preamble), opened_ms_(uv_now(link.loop())) {}

Bridge::Bridge(Link& link, uint32_t id, net::Tcp* local, const std::string& route, util::ByteQueue sent_before,
               bool local_eof)
    : link_(link), id_(id), phase_(BridgePhase::relaying), tcp_(local), route_(route),
      pending_(std::move(sent_before)), tcp_eof_(local_eof), local_side_(true), replayable_(true) {
  tcp_->set_handler(this);
  if (pending_.empty() && !tcp_eof_) tcp_->start_read();
  else pump_to_stream();
}

size_t Bridge::write_stream(std::span<const uint8_t> data) {
  size_t n = link_.session().write(id_, data);
  if (replayable_ && n) {
    if (!link_.session().awaiting_ack(id_) || sent_.size() + n > kMaxReplayBytes) {
      replayable_ = false;
      sent_.clear();
    } else {
      sent_.append(data.first(n));
    }
  }
  return n;
}

namespace {

// Finishes a TCP connection whose stream ended while its session is going
// away: writes what the peer sent, shuts the sending side down, discards
// what the local side still sends, and closes once it has closed too, or
// after kLingerTimeoutMs (then with a reset). Frees itself.
class Linger : public net::TcpHandler {
 public:
  static constexpr uint64_t kLingerTimeoutMs = 10000;

  static void start(uv_loop_t* loop, net::Tcp* tcp, util::ByteQueue rest, bool write_in_flight) {
    auto* l = new Linger(loop, tcp, std::move(rest));
    l->tcp_->set_handler(l);
    l->tcp_->start_read();
    if (!write_in_flight) l->pump();
  }

 private:
  Linger(uv_loop_t* loop, net::Tcp* tcp, util::ByteQueue rest) : tcp_(tcp), out_(std::move(rest)) {
    timer_ = new uv_timer_t;
    uv_timer_init(loop, timer_);
    timer_->data = this;
    uv_timer_start(timer_, [](uv_timer_t* t) { static_cast<Linger*>(t->data)->finish(true); }, kLingerTimeoutMs, 0);
  }
  void pump() {
    if (tcp_->writing()) return;
    if (!out_.empty()) {
      tcp_->write_from(out_);
      return;
    }
    if (!shut_) {
      shut_ = true;
      tcp_->shutdown();
    }
    if (peer_done_) finish(false);
  }
  void on_read(std::span<const uint8_t>) override {}  // the stream is over: nowhere to send it
  void on_read_end(int err) override {
    peer_done_ = true;
    if (err) finish(true);
    else if (shut_ && !tcp_->writing()) finish(false);
  }
  void on_written(size_t n, int err) override {
    if (err) {
      finish(true);
      return;
    }
    out_.pop(n);
    pump();
  }
  void finish(bool reset) {
    tcp_->close(reset);
    uv_timer_stop(timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    delete this;
  }

  net::Tcp* tcp_;
  uv_timer_t* timer_;
  util::ByteQueue out_;
  bool shut_ = false;
  bool peer_done_ = false;
};

}  // namespace

void Bridge::link_closing() {
  // Server side: the upstream's answer could not reach the client any more,
  // so the upstream is reset (the stream is cut).
  if (!local_side_ || phase_ != BridgePhase::relaying || !tcp_ || !peer_fin_ || exported_) {
    stream_gone(true);
    return;
  }
  // The write in flight (if any) points into the stream's inbound queue;
  // moving the queue keeps its chunks where they are.
  util::ByteQueue rest = link_.session().take_inbound(id_);
  net::Tcp* local = tcp_;
  tcp_ = nullptr;
  Linger::start(link_.loop(), local, std::move(rest), local->writing());
  stream_gone(false);
}

bool Bridge::try_replay() {
  if (phase_ != BridgePhase::relaying || !replayable_ || !on_replay || !tcp_) return false;
  net::Tcp* local = tcp_;
  tcp_ = nullptr;
  local->stop_read();
  local->set_handler(nullptr);
  util::ByteQueue bytes = std::move(sent_);
  bytes.append(pending_);
  bool eof = tcp_eof_;
  stream_gone(false);
  spdlog::debug("stream {} ({}): refused unprocessed by the server; {} bytes to send again on another session", id_,
                route_, bytes.size());
  on_replay(local, route_, std::move(bytes), eof);
  return true;
}

Bridge::~Bridge() { stream_gone(true); }

Bridge::Bridge(Link& link, BridgeState& st, std::string& error)
    : link_(link), id_(st.id), phase_(st.phase), route_(st.route), pending_(std::move(st.pending)),
      tcp_eof_(st.tcp_eof), fin_sent_(st.fin_sent), peer_fin_(st.peer_fin), shutdown_sent_(st.shutdown_done),
      adopted_written_(st.upstream_written), opened_ms_(uv_now(link.loop())) {
  bytes_up = st.bytes_up;
  bytes_down = st.bytes_down;
  if (phase_ == BridgePhase::done) {
    error = "the old process could not pass the upstream connection";
    return;
  }
  if (phase_ != BridgePhase::relaying) return;
  tcp_ = net::Tcp::create(link_.loop(), this);
  int err = tcp_->open_fd(st.fd);
  if (err != 0) {
    error = std::string("cannot adopt the upstream socket: ") + uv_strerror(err);
    ::close(st.fd);
    tcp_->close();
    tcp_ = nullptr;
    phase_ = BridgePhase::done;
  }
  st.fd = -1;
}

void Bridge::export_state(BridgeState& out) {
  out.id = id_;
  out.phase = phase_;
  out.route = route_;
  out.tcp_eof = tcp_eof_;
  out.fin_sent = fin_sent_;
  out.peer_fin = peer_fin_;
  out.bytes_up = bytes_up;
  out.bytes_down = bytes_down;
  out.upstream_written = adopted_written_;
  if (phase_ == BridgePhase::relaying && tcp_) {
    out.shutdown_done = tcp_->shutdown_done();
    size_t written = 0;
    int fd = tcp_->release(written);
    if (fd >= 0) {
      tcp_ = nullptr;
      out.fd = fd;
      out.upstream_written += written;
    }
  } else if (phase_ == BridgePhase::awaiting_upstream) {
    // The connect had not completed: nothing went to the upstream yet, so
    // the adopting process simply dials again.
    if (tcp_) {
      tcp_->close();
      tcp_ = nullptr;
    }
  }
  if (phase_ == BridgePhase::relaying && out.fd < 0) out.phase = BridgePhase::done;  // could not move: reset there
  out.pending = std::move(pending_);
  exported_ = true;
  stream_gone(true);
}

void Bridge::abandon() {
  if (tcp_) {
    tcp_->close(false);
    tcp_ = nullptr;
  }
  stream_gone(false);
}

void Bridge::start_adopted() {
  if (phase_ == BridgePhase::awaiting_preamble) {
    stream_data();
    return;
  }
  if (phase_ == BridgePhase::awaiting_upstream) {
    phase_ = BridgePhase::awaiting_preamble;
    if (on_preamble) on_preamble(*this, route_);
    return;
  }
  if (phase_ != BridgePhase::relaying) return;
  if (adopted_written_) {
    size_t n = size_t(adopted_written_);
    adopted_written_ = 0;
    bytes_up += n;
    link_.session().consumed(id_, n);
    if (phase_ != BridgePhase::relaying) return;
  }
  pump_to_tcp();
  if (pending_.empty() && !tcp_eof_) {
    if (!link_.congested()) tcp_->start_read();
  } else {
    pump_to_stream();
  }
}

void Bridge::stream_data() {
  if (phase_ == BridgePhase::awaiting_preamble) {
    const util::ByteQueue* in = link_.session().inbound(id_);
    if (!in) return;
    uint8_t buf[256];
    size_t n = in->peek(buf);
    mux::PreambleResult r = mux::decode_preamble({buf, n});
    if (r.status == mux::PreambleStatus::need_more) return;
    if (r.status == mux::PreambleStatus::malformed) {
      fail("malformed route preamble", "malformed_preamble");
      return;
    }
    link_.session().consumed(id_, r.used);
    phase_ = BridgePhase::awaiting_upstream;
    route_ = r.route;
    if (on_preamble) on_preamble(*this, r.route);
    return;
  }
  pump_to_tcp();
}

void Bridge::connect(const std::string& route, const std::string& host, uint16_t port, uint32_t timeout_ms) {
  route_ = route;
  phase_ = BridgePhase::awaiting_upstream;
  connect_started_ns_ = uv_hrtime();
  connect_timer_ = new uv_timer_t;
  uv_timer_init(link_.loop(), connect_timer_);
  connect_timer_->data = this;
  uv_timer_start(connect_timer_, [](uv_timer_t* t) {
    auto* b = static_cast<Bridge*>(t->data);
    Link::EntryGuard g(&b->link_);
    b->report_connect(UV_ETIMEDOUT);
    b->fail("upstream connect timeout");
  }, timeout_ms, 0);
  resolve_ = net::Resolve::start(link_.loop(), host, port, [this](int status, const sockaddr* addr) {
    Link::EntryGuard g(&link_);
    resolve_ = nullptr;
    if (status != 0) {
      report_connect(status);
      fail("upstream name resolution failed");
      return;
    }
    tcp_ = net::Tcp::create(link_.loop(), this);
    if (tcp_->connect(addr) != 0) fail("upstream connect failed");
  });
}

void Bridge::report_connect(int status) {
  if (on_connect_result) on_connect_result(*this, status, double(uv_hrtime() - connect_started_ns_) / 1e9);
}

void Bridge::stop_connect_timer() {
  if (!connect_timer_) return;
  uv_close(reinterpret_cast<uv_handle_t*>(connect_timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  connect_timer_ = nullptr;
}

void Bridge::on_connected(int status) {
  Link::EntryGuard g(&link_);
  stop_connect_timer();
  report_connect(status);
  if (status != 0) {
    spdlog::debug("stream {}: upstream for route {} refused: {}", id_, route_, uv_strerror(status));
    fail("upstream connect failed");
    return;
  }
  phase_ = BridgePhase::relaying;
  link_.session().accept(id_);
  tcp_->start_read();
  pump_to_tcp();
  link_.flush();
}

void Bridge::pump_to_tcp() {
  if (phase_ != BridgePhase::relaying || !tcp_ || tcp_->writing()) return;
  const util::ByteQueue* in = link_.session().inbound(id_);
  while (in && !in->empty()) {
    size_t n = tcp_->write_some(*in);
    if (n == 0) {
      tcp_->write_from(*in);
      return;
    }
    // Taken by the kernel at once: as in on_written, the window credit goes
    // back now (the caller flushes the link).
    bytes_up += n;
    link_.session().consumed(id_, n);
    if (phase_ != BridgePhase::relaying || !tcp_) return;
    in = link_.session().inbound(id_);
  }
  if (peer_fin_ && !shutdown_sent_) {
    shutdown_sent_ = true;
    tcp_->shutdown();
  }
}

void Bridge::on_written(size_t n, int err) {
  Link::EntryGuard g(&link_);
  if (err) {
    fail("write to upstream failed", "upstream_error");
    return;
  }
  bytes_up += n;
  // Window credit goes back only now that the bytes have left this process.
  link_.session().consumed(id_, n);
  if (phase_ == BridgePhase::done) {
    link_.flush();
    return;
  }
  pump_to_tcp();
  link_.flush();
}

void Bridge::stream_fin() {
  peer_fin_ = true;
  // The session reports a frame's data before its FIN, so a stream still
  // awaiting its preamble here ended without naming a route: it can never
  // be routed, and waiting for the preamble timeout would only hold a slot.
  if (phase_ == BridgePhase::awaiting_preamble && !local_side_) {
    fail("stream ended before its route preamble was complete", "malformed_preamble");
    return;
  }
  pump_to_tcp();
}

void Bridge::on_read(std::span<const uint8_t> data) {
  Link::EntryGuard g(&link_);
  if (phase_ != BridgePhase::relaying) return;
  bytes_down += data.size();
  size_t n = 0;
  if (pending_.empty()) {
    size_t budget = std::min(data.size(), link_.output_budget());
    n = budget ? write_stream(data.first(budget)) : 0;
  }
  if (n < data.size()) {
    // What the window or the link cannot take now waits here (at most one
    // read), and reading stops until stream_writable / link_decongested.
    pending_.append(data.subspan(n));
    tcp_->stop_read();
  }
  link_.flush();
}

void Bridge::on_read_end(int err) {
  Link::EntryGuard g(&link_);
  if (err) {
    fail("upstream connection error", "upstream_error");
    return;
  }
  tcp_eof_ = true;
  if (pending_.empty() && !fin_sent_) {
    fin_sent_ = true;
    link_.session().close_write(id_);
    link_.flush();
  }
}

void Bridge::pump_to_stream() {
  while (!pending_.empty()) {
    auto f = pending_.front();
    size_t budget = std::min(f.size(), link_.output_budget());
    size_t n = budget ? write_stream(f.first(budget)) : 0;
    pending_.pop(n);
    if (n < f.size()) break;
  }
  if (!pending_.empty()) return;
  if (tcp_eof_) {
    if (!fin_sent_) {
      fin_sent_ = true;
      link_.session().close_write(id_);
    }
  } else if (tcp_ && !link_.congested()) {
    tcp_->start_read();
  }
}

void Bridge::stream_writable() {
  if (phase_ != BridgePhase::relaying) return;
  if (replayable_ && !link_.session().awaiting_ack(id_)) {  // ACKed: the server has the stream
    replayable_ = false;
    sent_.clear();
  }
  pump_to_stream();
  link_.flush();
}

void Bridge::link_decongested() {
  if (phase_ != BridgePhase::relaying) return;
  pump_to_stream();
}

void Bridge::stream_gone(bool reset_tcp) {
  if (phase_ != BridgePhase::done && !exported_ && on_finished) on_finished(*this);
  phase_ = BridgePhase::done;
  stop_connect_timer();
  if (resolve_) {
    resolve_->cancel();
    resolve_ = nullptr;
  }
  if (tcp_) {
    tcp_->close(reset_tcp);
    tcp_ = nullptr;
  }
  pending_.clear();
}

void Bridge::preamble_timed_out(uint32_t timeout_ms) {
  if (phase_ != BridgePhase::awaiting_preamble) return;
  std::string why = "route preamble not complete within " + std::to_string(timeout_ms) + " ms";
  fail(why.c_str(), "preamble_timeout");
}

void Bridge::fail(const char* why, const char* reset_reason) {
  if (phase_ == BridgePhase::done) return;
  if (reset_reason && on_reset) on_reset(*this, reset_reason);
  spdlog::debug("stream {} ({}): reset: {}", id_, route_.empty() ? "?" : route_, why);
  if (link_.session().has_stream(id_)) link_.session().reset(id_);
  stream_gone(true);
  link_.remove_bridge(id_);
  link_.flush();
}

}  // namespace baton::proxy
