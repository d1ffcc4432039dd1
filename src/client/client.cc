#include "baton/client.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <list>
#include <optional>
#include <random>
#include <unordered_map>

#include "config/config.h"
#include "mux/control.h"
#include "net/listener.h"
#include "net/tcp.h"
#include "proxy/bridge.h"
#include "proxy/link.h"
#include "tls/context.h"
#include "util/bytes.h"
#include "util/text.h"

namespace baton {

using proxy::Link;
using proxy::LinkPhase;

namespace {

constexpr uint32_t kBackoffInitialMs = 100;
constexpr double kBackoffFactor = 1.5;
constexpr uint32_t kBackoffCapMs = 5000;
// REJECT 4 (draining) answers retried at once before backing off.
constexpr size_t kImmediateDrainRetries = 3;
// A refused open is sent again after a pause drawn from [d/2, d], d starting
// here and doubling per refusal of the same connection, capped.
constexpr uint32_t kRefusedBackoffInitialMs = 50;
constexpr uint32_t kRefusedBackoffCapMs = 1000;
// Marker pings (see ClientLink::mark) in flight at once. The server answers a
// flood of more than 64 pings in one read with a protocol error, and the
// session keeps 16 pending pings at most (heartbeats need some too).
constexpr size_t kMaxMarkers = 8;
// A marker unanswered this long no longer holds back opens (they go out
// unmarked: a refusal of theirs resets the local connection).
constexpr uint64_t kMarkerPatienceMs = 1000;
// Marker ping values have this bit set; heartbeat pings count up from 1.
constexpr uint32_t kMarkerBit = 0x80000000u;

// Where one dial goes.
struct Target {
  config::HostPort hp;
  std::string name;  // TLS server name
  std::string str() const { return hp.to_string(); }
};

// The client's side of one session: sends HELLO, waits for WELCOME, pings.
class ClientLink : public Link {
 public:
  ClientLink(Client::Impl& owner, net::Tcp* tcp, tls::Context& ctx, const proxy::LinkLimits& limits,
             const Target& target, tls::ClientSession* session)
      : Link(owner_loop(owner), tcp, ctx, mux::Role::client, limits, target.name, session),
        target(target),
        owner_(owner) {}

  static uv_loop_t* owner_loop(Client::Impl& o);
  uint32_t heartbeat_ms = 0;
  Target target;
  uint64_t n = 0;                // session number once ready
  std::string server_id;         // from WELCOME
  uint64_t ready_ms = 0;         // uv_now() at WELCOME
  bool draining = false;         // DRAIN received: takes no new streams
  std::optional<mux::Reject> reject;  // REJECT received before WELCOME
  bool resumed() const { return peer_info().resumed; }

  // --- session resume (docs/protocol.md 9) ---
  mux::SessionId session_id{};
  std::optional<mux::ResumeSecret> resume_secret;  // the latest (WELCOME, RESUMED); never logged
  uint32_t resume_window_ms = 0;
  std::string resume_address;   // from WELCOME: reaches this same server directly
  // A setup session: the detached session its HELLO asks to resume.
  ClientLink* resume_of = nullptr;
  bool resumable_session() const { return resume_secret.has_value(); }
  bool detached() const { return phase() == LinkPhase::detached; }
  using Link::can_resume_from;
  using Link::core_log;
  using Link::set_resume_window;
  // Hands this detached session's connection over to `setup` and back.
  void take_over_from(ClientLink& setup, uint64_t server_received) { setup.hand_session_to(*this, server_received); }
  // Takes new streams.
  bool usable() {
    return phase() == LinkPhase::serving && !draining && !session().go_away_received();
  }

  // --- open pacing (the server's limits from WELCOME, docs/protocol.md 3) ---
  //
  // The server refuses a stream beyond a token bucket (stream_open_rate per
  // second, stream_open_burst at once, full when the session starts) or
  // beyond max_streams open data streams. The client keeps its own bucket at
  // the same rate but half the size: the other half absorbs SYNs that reach
  // the server closer together than they were sent (burst / 2 / rate: 1 s at
  // the defaults). An older server announces nothing: no pacing; what it
  // refuses is sent again after a backoff (Client::Impl::came_back).
  uint32_t server_rate = 0, server_burst = 0, server_max_streams = 0;
  uint32_t pace_rate = 0, pace_burst = 0;
  void set_limits(const mux::Welcome& w, uint64_t now) {
    server_rate = w.stream_open_rate.value_or(0);
    server_burst = w.stream_open_burst.value_or(0);
    server_max_streams = w.max_streams.value_or(0);
    pace_rate = server_rate;
    pace_burst = server_rate ? std::max<uint32_t>(1, (server_burst ? server_burst : server_rate) / 2) : 0;
    tokens_ = pace_burst;
    tokens_ms_ = now;
  }
  // Data streams open (the control stream not counted), as the server counts them.
  size_t data_streams() const { return session().stream_count() > 0 ? session().stream_count() - 1 : 0; }
  enum class Hold : uint8_t { none, streams, rate };
  // What keeps a new stream from being opened now; for Hold::rate, *at is
  // when the next token comes.
  Hold hold(uint64_t now, uint64_t* at) {
    if (server_max_streams && data_streams() >= server_max_streams) return Hold::streams;
    if (!pace_rate) return Hold::none;
    refill(now);
    if (tokens_ >= 1.0) return Hold::none;
    *at = now + uint64_t(std::ceil((1.0 - tokens_) * 1000.0 / pace_rate));
    return Hold::rate;
  }
  void take_token() {
    if (pace_rate) tokens_ -= 1.0;
  }
  // The server refused a stream: its bucket is empty now (or its streams
  // full), so ours is too.
  void refused() { tokens_ = std::min(tokens_, 0.0); }

  // --- refusals (docs/protocol.md 4) ---
  //
  // The server refuses a stream at its SYN, before it reads any of its
  // bytes; it resets a stream it processed (unknown route, upstream refused)
  // only after reading the preamble. It handles frames in order and answers
  // a Ping where it stands, so a Ping sent right after a batch of SYNs and
  // before their preambles splits the two: an RST that comes before the
  // Ping's answer is a refusal. mark() sends that Ping; with kMaxMarkers in
  // flight the caller waits for an answer (may_mark), and past
  // kMarkerPatienceMs sends the batch unmarked (its refusals then reset the
  // local connections, as before).
  bool may_mark(uint64_t now) const {
    return markers_.size() < kMaxMarkers || now >= markers_.front().sent_ms + kMarkerPatienceMs;
  }
  uint64_t marker_patience_end() const { return markers_.empty() ? 0 : markers_.front().sent_ms + kMarkerPatienceMs; }
  void mark(std::vector<uint32_t> ids, uint64_t now) {
    if (markers_.size() >= kMaxMarkers) return;
    uint32_t value = kMarkerBit | (++marker_seq_ & ~kMarkerBit);
    if (!session().ping(value, now)) return;
    for (uint32_t id : ids) unanswered_[id] = value;
    markers_.push_back({value, now, std::move(ids)});
  }

 protected:
  void on_secure() override;
  void on_control_data() override;
  void on_peer_stream(uint32_t id) override { session().reset(id); }
  void on_closed(const char* reason) override;
  // The next ping, or the moment the session counts as dead (2 heartbeats
  // of silence). No deadline once closing: a past one would spin the timer.
  uint64_t role_deadline() const override {
    if (phase() != LinkPhase::serving || !heartbeat_ms) return 0;
    // Only with 2 pings out can the silence deadline act (else it could be
    // in the past and re-fire until the next ping).
    if (session().pending_pings().size() < 2) return next_ping_ms_;
    return std::min(next_ping_ms_, last_rx_ms() + 2 * uint64_t(heartbeat_ms));
  }
  void on_role_deadline() override;
  void on_last_bridge_gone() override;
  void on_handshake_failed() override {
    if (const tls::Handshake* h = handshake()) handshake_error_ = h->error();
  }
  bool peer_refused(uint32_t id) const override { return unanswered_.count(id) != 0; }
  void on_ping_answered(uint32_t value, uint64_t sent_at_ms) override;
  bool on_break(const char* why) override;
  void on_detach_expired() override;
  void on_reattached() override;
  void on_input() override {
    if (resumable_session()) send_receipt_if_due();
  }

 private:
  struct Marker {
    uint32_t value;
    uint64_t sent_ms;
    std::vector<uint32_t> ids;  // streams whose SYN went right before it
  };
  std::deque<Marker> markers_;
  std::unordered_map<uint32_t, uint32_t> unanswered_;  // stream id -> its marker, until answered
  uint32_t marker_seq_ = 0;
  double tokens_ = 0;
  uint64_t tokens_ms_ = 0;
  void refill(uint64_t now) {
    if (now > tokens_ms_) tokens_ = std::min<double>(pace_burst, tokens_ + double(now - tokens_ms_) * pace_rate / 1000.0);
    tokens_ms_ = now;
  }

  // Why the session ended, as precisely as the TLS layer knows it.
  std::string close_reason(const char* reason) const;

  Client::Impl& owner_;
  std::string handshake_error_;  // the TLS handshake failed: why
  uint64_t next_ping_ms_ = 0;
  uint32_t ping_seq_ = 0;
};

}  // namespace

struct Client::Impl {
  uv_loop_t* loop;
  ClientOptions opts;
  ClientEvents events;
  std::unique_ptr<tls::Context> tls;
  tls::ClientSession resume;  // ticket from the last session, offered on every dial
  std::vector<config::HostPort> servers;
  size_t cur = 0;  // index into servers of the next (or current) dial

  ClientLink* active = nullptr;        // the ready session new streams go to
  ClientLink* pending = nullptr;       // a session being set up (TLS, HELLO)
  std::vector<ClientLink*> old;        // replaced sessions whose streams are finishing
  net::Tcp* dialing = nullptr;
  net::Resolve* resolve = nullptr;
  Target dial_target;
  uv_timer_t* retry_timer = nullptr;   // backoff wait, or TCP connect timeout while dialing
  bool retry_waiting = false;
  uv_timer_t* wait_timer = nullptr;    // expiry of waiting local connections, the next token, a retry
  uv_idle_t* pump_idle = nullptr;      // opens waiting connections once per loop iteration (schedule_pump)

  struct Waiting {
    net::Tcp* tcp;
    std::string route;
    uint64_t deadline;
    util::ByteQueue sent;  // a replayed stream: bytes to send first
    bool eof = false;      // ... and the local side had half-closed
    uint64_t since = 0;       // uv_now() when it (last) joined the queue
    uint64_t not_before = 0;  // a refused open: not sent again before
    uint32_t refusals = 0;    // times the server refused it
    bool fresh = false;       // a new local connection (max_waiting counts these)
  };
  // In arrival order, replays and refused opens first. A list: entries
  // backing off stay where they are while later ones are taken.
  std::list<Waiting> waiting;
  size_t fresh_waiting = 0;      // of them, new local connections (Waiting::fresh)
  uint64_t paced_at = 0;         // uv_now() when pump() last held an open back (opens_deferred)
  uint64_t pump_again_at = 0;    // pump() held opens back until then (0: until an event)
  uint64_t overflow_logged_ms = 0;

  std::vector<std::pair<net::Listener*, std::string>> listeners;
  bool ready_sent = false;
  bool stopped = false;
  bool ever_ready = false;
  uint32_t failures = 0;          // consecutive failed tries (reset by WELCOME)
  uint32_t initial_failures = 0;  // transport failures before the first session
  uint32_t resume_tries = 0;      // dials since the active session detached
  uint64_t resume_replay_ = 0;    // bytes the resume under way sends again
  ClientCounters counters;
  std::mt19937_64 rng{std::random_device{}()};

  struct Dialer : net::TcpHandler {
    Impl* impl;
    void on_read(std::span<const uint8_t>) override {}
    void on_read_end(int) override {}
    void on_written(size_t, int) override {}
    void on_connected(int status) override { impl->connected(status); }
  } dialer;

  // --- timers ---

  uv_timer_t* make_timer() {
    auto* t = new uv_timer_t;
    uv_timer_init(loop, t);
    t->data = this;
    return t;
  }
  static void free_timer(uv_timer_t*& t) {
    if (!t) return;
    uv_timer_stop(t);
    uv_close(reinterpret_cast<uv_handle_t*>(t), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    t = nullptr;
  }
  static void retry_cb(uv_timer_t* t) { static_cast<Impl*>(t->data)->retry_fired(); }
  static void wait_cb(uv_timer_t* t) {
    auto* i = static_cast<Impl*>(t->data);
    i->expire_waiting();
    i->pump();
  }
  // Opens what can be opened, once the current callbacks are over: the
  // local connections accepted in one loop iteration go out as one batch
  // (SYNs, one marker ping, preambles).
  void schedule_pump() {
    if (!stopped && pump_idle) uv_idle_start(pump_idle, [](uv_idle_t* h) {
      uv_idle_stop(h);
      static_cast<Impl*>(h->data)->pump();
    });
  }

  // --- giving up ---

  void shutdown_all(const char* why) {
    stopped = true;
    close_listeners();
    free_timer(retry_timer);
    free_timer(wait_timer);
    if (pump_idle) {
      uv_idle_stop(pump_idle);
      uv_close(reinterpret_cast<uv_handle_t*>(pump_idle), [](uv_handle_t* h) { delete reinterpret_cast<uv_idle_t*>(h); });
      pump_idle = nullptr;
    }
    retry_waiting = false;
    for (Waiting& w : waiting) w.tcp->close(true);
    waiting.clear();
    fresh_waiting = 0;
    if (resolve) {
      resolve->cancel();
      resolve = nullptr;
    }
    if (dialing) {
      dialing->close();
      dialing = nullptr;
    }
    std::vector<ClientLink*> links = old;
    old.clear();
    if (active) links.push_back(active);
    if (pending) links.push_back(pending);
    active = pending = nullptr;
    for (ClientLink* l : links) l->close(why, true);
  }

  void fail(const std::string& err) {
    if (stopped) return;
    shutdown_all("client giving up");
    if (events.on_closed) events.on_closed(err);
  }

  void close_listeners() {
    for (auto& [l, r] : listeners) l->close();
    listeners.clear();
  }

  // --- dialing ---

  bool dial_in_progress() const { return resolve || dialing || pending; }

  Target target_of(const config::HostPort& hp) const {
    return Target{hp, opts.server_name.empty() ? hp.host : opts.server_name};
  }

  void dial(const Target& t) {
    if (stopped) return;
    retry_waiting = false;
    uv_timer_stop(retry_timer);
    dial_target = t;
    spdlog::debug("dialing {}", t.str());
    uv_timer_start(retry_timer, retry_cb, opts.connect_timeout_ms, 0);
    resolve = net::Resolve::start(loop, t.hp.host, t.hp.port, [this](int status, const sockaddr* addr) {
      resolve = nullptr;
      if (status != 0) {
        attempt_failed("cannot resolve " + dial_target.str() + ": " + uv_strerror(status), true);
        return;
      }
      dialer.impl = this;
      dialing = net::Tcp::create(loop, &dialer);
      int err = dialing->connect(addr);
      if (err) connected(err);
    });
  }

  void set_socket_options(net::Tcp* tcp) {
    uv_tcp_nodelay(tcp->handle(), 1);
    if (opts.dead_after_ms == 0) return;
    int fd = tcp->fd();
    if (fd < 0) return;
    int on = 1;
    int idle = std::max(1, int(opts.dead_after_ms * 2 / 5 / 1000));
    int intvl = std::max(1, int(opts.dead_after_ms / 5 / 1000));
    int cnt = 3;
    unsigned int user_timeout = opts.dead_after_ms;
    (void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
  }

  void connected(int status) {
    net::Tcp* tcp = dialing;
    dialing = nullptr;
    uv_timer_stop(retry_timer);
    if (status != 0) {
      tcp->close();
      attempt_failed("cannot connect to " + dial_target.str() + ": " + uv_strerror(status), true);
      return;
    }
    set_socket_options(tcp);
    proxy::LinkLimits limits;
    limits.handshake_timeout_ms = opts.connect_timeout_ms;
    limits.idle_timeout_ms = UINT32_MAX / 2;  // the client relies on heartbeats instead
    limits.resume_buffer_bytes = opts.resume_buffer_bytes;
    pending = new ClientLink(*this, tcp, *tls, limits, dial_target, &resume);
    pending->start();
  }

  // The next address to dial: while resuming, the server's resume_address
  // (it reaches the server that holds the session) on every other try.
  Target next_target() {
    if (active && active->detached() && !active->resume_address.empty() && resume_tries++ % 2 == 0) {
      if (auto hp = config::parse_host_port(active->resume_address, false)) {
        Target t = target_of(*hp);
        // The certificate is the same server's: the name it was checked
        // against before, unless the operator set one.
        t.name = active->target.name;
        return t;
      }
    }
    return target_of(servers[cur]);
  }

  void retry_fired() {
    if (stopped) return;
    if (retry_waiting) {
      retry_waiting = false;
      dial(next_target());
      return;
    }
    // TCP connect (or resolve) took longer than connect_timeout_ms.
    if (resolve) {
      resolve->cancel();
      resolve = nullptr;
    } else if (dialing) {
      dialing->close();
      dialing = nullptr;
    } else {
      return;
    }
    attempt_failed("cannot connect to " + dial_target.str() + ": timed out", true);
  }

  uint32_t backoff_ms(uint32_t k) {
    double base = kBackoffInitialMs * std::pow(kBackoffFactor, std::min<uint32_t>(k, 30));
    uint64_t cap = uint64_t(std::min<double>(base, kBackoffCapMs));
    return uint32_t(std::uniform_int_distribution<uint64_t>(0, cap)(rng));
  }

  void schedule_retry(uint32_t delay_ms) {
    if (stopped || dial_in_progress()) return;
    retry_waiting = true;
    uv_timer_start(retry_timer, retry_cb, delay_ms, 0);
  }

  // A try ended before WELCOME. `transport`: TCP/TLS level, not a REJECT.
  void attempt_failed(const std::string& err, bool transport, std::optional<uint32_t> delay = std::nullopt) {
    if (stopped) return;
    counters.failed_tries++;
    failures++;
    if (transport && !ever_ready && ++initial_failures >= servers.size()) {
      fail(err);
      return;
    }
    // --max-reconnects N: the Nth failed try in a row is the last one.
    if (opts.max_reconnects && failures >= opts.max_reconnects) {
      fail(err + " (gave up after " + std::to_string(failures) + " failed tries in a row, --max-reconnects " +
           std::to_string(opts.max_reconnects) + ")");
      return;
    }
    cur = (cur + 1) % servers.size();
    uint32_t d = delay ? *delay : backoff_ms(failures - 1);
    spdlog::info("{}; next try at {} in {} ms", err, servers[cur].to_string(), d);
    schedule_retry(d);
  }

  // --- session events (from ClientLink) ---

  void welcomed(ClientLink* l, const mux::Welcome& w) {
    if (l != pending) {  // cannot happen: only a pending link awaits WELCOME
      l->close("unexpected WELCOME", true);
      return;
    }
    pending = nullptr;
    ever_ready = true;
    failures = 0;
    initial_failures = 0;
    if (active && active->detached()) {
      // docs/protocol.md 9.4: a resume refused (or a server that does not
      // resume): this connection is a fresh session and the kept one ends,
      // its local connections reset.
      ClientLink* kept = active;
      active = nullptr;
      l->resume_of = nullptr;
      counters.resumes_refused++;
      std::string why = w.resume_refused.empty() ? "the server does not resume sessions" : w.resume_refused;
      if (w.resume_refused_code) why += " (" + std::string(mux::to_str(mux::ResumeRefusedCode(*w.resume_refused_code))) + ")";
      spdlog::warn("session {}: resume refused by {}: {}; its {} streams are reset, a fresh session starts", kept->n,
                   l->target.str(), why, kept->bridge_count());
      if (events.on_resume_failed) events.on_resume_failed(kept->n, "resume refused: " + why);
      kept->close("resume refused", false);
      if (stopped) return;
    }
    counters.sessions_opened++;
    if (counters.sessions_opened > 1) counters.reconnects++;
    if (l->resumed()) counters.resumed_handshakes++;
    else counters.full_handshakes++;
    l->n = counters.sessions_opened;
    l->server_id = w.server_id;
    l->ready_ms = uv_now(loop);
    l->set_limits(w, l->ready_ms);
    if (l->pace_rate)
      spdlog::debug("session {}: server limits {} streams/s, {} at once, {} open; opening at most {}/s, {} at once",
                    l->n, l->server_rate, l->server_burst, l->server_max_streams, l->pace_rate, l->pace_burst);
    if (active) {
      ClientLink* prev = active;
      old.push_back(prev);
      active = l;
      if (prev->bridge_count() == 0) prev->close("replaced by a new session", true);
    } else {
      active = l;
    }
    // The next reconnect starts at the server in use.
    for (size_t i = 0; i < servers.size(); ++i)
      if (servers[i].host == l->target.hp.host && servers[i].port == l->target.hp.port) cur = i;

    if (!ready_sent) {
      for (const ClientForward& f : opts.forwards) {
        auto hp = config::parse_host_port(f.listen, true);
        auto* lis = net::Listener::create(loop, [this, route = f.route](int fd) { accept_local(fd, route); });
        std::string err = hp ? lis->bind(hp->host, hp->port) : "bad forward address " + f.listen;
        if (!err.empty()) {
          lis->close();
          fail(err);
          return;
        }
        listeners.emplace_back(lis, f.route);
      }
      ready_sent = true;
      ClientReady r;
      r.session_id = w.session_id;
      r.server_id = w.server_id;
      r.heartbeat_ms = w.heartbeat_ms;
      for (auto& [lis, route] : listeners) r.forwards.emplace_back(lis->local_address(), route);
      if (events.on_ready) events.on_ready(r);
      if (stopped) return;
    }
    ClientSessionInfo info;
    info.n = l->n;
    info.server = l->target.str();
    info.server_id = w.server_id;
    info.session_id = w.session_id;
    info.heartbeat_ms = w.heartbeat_ms;
    info.resumed = l->resumed();
    info.counters = counters;
    if (events.on_session) events.on_session(info);
    if (stopped) return;
    pump();
  }

  // --- session resume (docs/protocol.md 9) ---

  // The active session's connection broke: true keeps the session (it
  // detaches) and a resume starts at once.
  bool link_broke(ClientLink* l, const char* why) {
    if (stopped || l != active || !opts.resume || !l->resumable_session()) return false;
    counters.sessions_detached++;
    resume_tries = 0;
    failures = 0;
    spdlog::warn("session {} to {}: connection lost ({}); resuming it (the server keeps it {} ms, {} streams wait)",
                 l->n, l->target.str(), why, l->resume_window_ms, l->bridge_count());
    if (events.on_detached) events.on_detached(l->n, why, l->resume_window_ms);
    if (stopped) return true;
    // After the link has detached (this runs inside its break).
    uv_timer_stop(retry_timer);
    retry_waiting = true;
    uv_timer_start(retry_timer, retry_cb, 0, 0);
    return true;
  }

  // RESUMED on setup session `l`: the kept session carries on over l's connection.
  void resumed(ClientLink* l, const mux::Resumed& m) {
    ClientLink* kept = l->resume_of;
    if (l != pending || !kept || kept != active || !kept->detached()) {
      // We asked for no resume (or gave it up: the window ended meanwhile).
      l->close("RESUMED for a session no longer kept", true);
      return;
    }
    if (!kept->can_resume_from(m.received)) {
      spdlog::warn("session {}: RESUMED from offset {}, outside the {}..{} kept here; a fresh session follows",
                   kept->n, m.received, kept->core_log().acked(), kept->core_log().sent());
      l->close("RESUMED offset out of range", true, mux::GoAwayCode::protocol_error);
      return;
    }
    pending = nullptr;
    l->resume_of = nullptr;
    kept->resume_secret = m.secret;
    kept->resume_window_ms = m.window_ms;
    kept->set_resume_window(m.window_ms);
    kept->target = l->target;
    resume_replay_ = kept->core_log().sent() - m.received;
    kept->take_over_from(*l, m.received);
  }

  // The kept session is attached again (after resumed()).
  void reattached(ClientLink* l) {
    failures = 0;
    counters.sessions_resumed++;
    counters.resume_replayed_bytes += resume_replay_;
    const uint64_t paused = uv_now(loop) - l->detached_ms();
    spdlog::info("session {} resumed on a new connection to {} after {} ms; {} bytes sent again", l->n,
                 l->target.str(), paused, resume_replay_);
    if (events.on_resumed) events.on_resumed(l->n, l->target.str(), paused, resume_replay_);
    if (stopped) return;
    schedule_pump();  // local connections that waited for the session
  }

  // The resume window of the kept session ended (close follows).
  void resume_expired(ClientLink* l) {
    counters.resumes_expired++;
    if (pending && pending->resume_of == l) pending->resume_of = nullptr;
    spdlog::warn("session {}: not resumed within {} ms; its {} streams are reset", l->n, l->resume_window_ms,
                 l->bridge_count());
    if (events.on_resume_failed)
      events.on_resume_failed(l->n, "not resumed within " + std::to_string(l->resume_window_ms) + " ms");
  }

  void rejected(ClientLink* l, const mux::Reject& r) {
    l->reject = r;
    if (r.code != 3 && r.code != 4) {
      if (events.on_reject) events.on_reject(r.code, r.reason);
    }
  }

  void drained(ClientLink* l, const mux::Drain& d) {
    if (l != active || l->draining) {
      spdlog::info("DRAIN from {} ({}) on a replaced session: ignored", l->target.str(), d.reason);
      return;
    }
    l->draining = true;
    counters.drains_followed++;
    Target t = l->target;
    if (!d.reconnect_hint.empty()) {
      if (auto hp = config::parse_host_port(d.reconnect_hint, false)) t = target_of(*hp);
      else spdlog::warn("DRAIN from {}: bad reconnect_hint \"{}\", ignored", l->target.str(), d.reconnect_hint);
    }
    spdlog::info("DRAIN from {} ({}, grace {} ms): moving to {}{}", l->target.str(), d.reason, d.grace_ms,
                 t.str(), dial_in_progress() ? " (a dial is already under way)" : "");
    if (events.on_drain) events.on_drain(l->n, d.reason, d.grace_ms, t.str());
    if (!dial_in_progress()) dial(t);
  }

  void link_idle(ClientLink* l) {
    if (std::find(old.begin(), old.end(), l) != old.end()) l->close("replaced session finished its streams", true);
  }

  void link_closed(ClientLink* l, const std::string& reason) {
    if (l == pending) {
      pending = nullptr;
      if (stopped) return;
      if (l->reject) {
        const mux::Reject& r = *l->reject;
        if (r.code == 3) {
          std::optional<uint32_t> d;
          if (r.retry_after_ms) d = *r.retry_after_ms;
          attempt_failed("REJECT 3 (overloaded) from " + l->target.str() + ": " + r.reason, false, d);
        } else if (r.code == 4) {
          // At once to the next server. Behind a load balancer (one address)
          // the next try most likely lands on another replica, so the first
          // few go at once too; past that (everything draining) back off.
          std::optional<uint32_t> d;
          if (failures <= std::max<size_t>(servers.size(), kImmediateDrainRetries)) d = 0u;
          attempt_failed("REJECT 4 (draining) from " + l->target.str() + ": " + r.reason, false, d);
        } else {
          fail("rejected by server: code " + std::to_string(r.code) + ": " + r.reason);
        }
        return;
      }
      attempt_failed("session to " + l->target.str() + " failed: " + reason, true);
      return;
    }
    if (l == active) {
      active = nullptr;
      if (pending && pending->resume_of == l) pending->resume_of = nullptr;
      if (stopped) return;
      if (l->draining) {
        // docs/protocol.md 6: a drained session closes when its last stream ends,
        // at once if it had none, possibly before the replacement is ready.
        // That is the move going as planned, not a lost session: new local
        // connections wait for the replacement already being dialed.
        spdlog::info("session {} to {} closed after DRAIN ({}) before its replacement was ready; "
                     "new connections wait for it", l->n, l->target.str(), reason);
      } else {
        spdlog::info("session {} to {} ended: {}", l->n, l->target.str(), reason);
        if (events.on_session_lost) events.on_session_lost(l->n, reason);
        if (stopped) return;
      }
      if (!dial_in_progress() && !retry_waiting) {
        if (!l->draining) cur = (cur + 1) % servers.size();
        schedule_retry(backoff_ms(0));
      }
      return;
    }
    auto it = std::find(old.begin(), old.end(), l);
    if (it != old.end()) {
      old.erase(it);
      spdlog::debug("replaced session {} to {} closed: {}", l->n, l->target.str(), reason);
    }
  }

  // --- local connections ---

  void accept_local(int fd, const std::string& route) {
    net::Tcp* tcp = net::Tcp::create(loop, nullptr);
    if (tcp->open_fd(fd) != 0) {
      ::close(fd);
      tcp->close();
      return;
    }
    submit(tcp, route);
  }

  // A new local connection to relay: it joins the queue and goes out with
  // the next batch (this loop iteration), or waits for a session, the open
  // pacing or a free stream, at most connect_timeout_ms.
  void submit(net::Tcp* tcp, const std::string& route) {
    if (stopped) {
      tcp->close(true);
      return;
    }
    uint64_t now = uv_now(loop);
    if (fresh_waiting >= opts.max_waiting) {
      counters.waiting_overflow++;
      if (now >= overflow_logged_ms + 1000) {
        overflow_logged_ms = now;
        spdlog::warn("local connection reset: {} are already waiting (max_waiting; {} reset so far)",
                     fresh_waiting, counters.waiting_overflow);
      }
      tcp->close(true);
      return;
    }
    Waiting w{tcp, route, now + opts.connect_timeout_ms, {}, false};
    w.fresh = true;
    enqueue(std::move(w), false);
  }

  void enqueue(Waiting w, bool front) {
    w.since = uv_now(loop);
    if (w.fresh) ++fresh_waiting;
    if (active && !active->usable() && !active->draining && !dial_in_progress() && !retry_waiting) {
      // The server said Go Away without DRAIN: replace the session as for a
      // drain. (After DRAIN a replacement is already under way, or a retry
      // to the next server is scheduled: leave that alone.)
      dial(active->target);
    }
    if (front) waiting.push_front(std::move(w));
    else waiting.push_back(std::move(w));
    schedule_pump();
  }

  // Takes an entry out of the queue (the caller opens or resets it).
  Waiting take(std::list<Waiting>::iterator it) {
    Waiting w = std::move(*it);
    waiting.erase(it);
    if (w.fresh) --fresh_waiting;
    return w;
  }

  // A stream of `link` came back unprocessed (Bridge::try_replay): after Go
  // Away it goes to the next session (a replay, with a new wait); refused at
  // its SYN (docs/protocol.md 4) it goes again after a backoff, within the
  // local connection's first deadline.
  void came_back(ClientLink* link, Waiting w) {
    uint64_t now = uv_now(loop);
    if (link->session().go_away_received()) {
      counters.streams_replayed++;
      w.deadline = now + opts.connect_timeout_ms;
      w.not_before = 0;
      w.refusals = 0;  // a new session, a new bucket
      enqueue(std::move(w), true);
      return;
    }
    counters.opens_refused++;
    link->refused();
    w.refusals++;
    uint32_t d = std::min<uint64_t>(kRefusedBackoffCapMs, uint64_t(kRefusedBackoffInitialMs) << std::min<uint32_t>(w.refusals - 1, 16));
    w.not_before = now + std::uniform_int_distribution<uint32_t>(d / 2, d)(rng);
    spdlog::debug("stream to {} refused by the server at its SYN (refusal {}); again in {} ms", w.route, w.refusals,
                  w.not_before - now);
    enqueue(std::move(w), true);
  }

  // Opens streams for waiting connections while the active session takes
  // them: its open pacing and stream limit allow, and a marker ping can
  // follow their SYNs. One batch: every SYN, then the marker, then each
  // stream's preamble and bytes.
  void pump() {
    if (stopped) return;
    pump_again_at = 0;
    ClientLink* link = active;
    if (link && link->usable() && !waiting.empty()) {
      Link::EntryGuard g(link);
      uint64_t now = uv_now(loop);
      struct Opened {
        Waiting w;
        uint32_t id;
      };
      std::vector<Opened> batch;
      bool held = false;
      if (!link->may_mark(now)) {
        // Too many markers in flight: the next answer (or the patience) brings the batch.
        held = true;
        pump_again_at = link->marker_patience_end();
      }
      for (auto it = waiting.begin(); !held && it != waiting.end();) {
        if (it->not_before > now) {
          ++it;
          continue;
        }
        uint64_t at = 0;
        ClientLink::Hold h = link->hold(now, &at);
        if (h != ClientLink::Hold::none) {
          held = true;
          if (h == ClientLink::Hold::rate) pump_again_at = at;  // Hold::streams: a bridge's end brings it
          break;
        }
        uint32_t id = link->session().open();
        if (id == 0) {  // this side's own stream limit: likewise
          held = true;
          break;
        }
        link->take_token();
        Waiting w = take(it++);
        if (paced_at && w.since <= paced_at && w.not_before <= paced_at) counters.opens_deferred++;
        if (w.refusals) counters.opens_retried++;
        batch.push_back({std::move(w), id});
      }
      if (held) paced_at = now;
      if (!batch.empty()) {
        std::vector<uint32_t> ids;
        ids.reserve(batch.size());
        for (const Opened& o : batch) ids.push_back(o.id);
        link->mark(std::move(ids), now);
        for (Opened& o : batch) start_stream(link, std::move(o.w), o.id);
        link->flush();
      }
    }
    rearm_wait_timer();
  }

  // Stream `id` (its SYN sent) for `w`: the preamble, then `w.sent` (a replay or
  // retry), then the local connection's bytes.
  void start_stream(ClientLink* link, Waiting w, uint32_t id) {
    std::vector<uint8_t> pre;
    mux::encode_preamble(w.route, pre);
    (void)link->session().write(id, pre);  // fits: a new stream has a 256 KiB window
    uv_tcp_nodelay(w.tcp->handle(), 1);
    auto b = std::make_unique<proxy::Bridge>(*link, id, w.tcp, w.route, std::move(w.sent), w.eof);
    b->on_replay = [this, link, deadline = w.deadline, refusals = w.refusals](
                       net::Tcp* local, const std::string& r, util::ByteQueue bytes, bool local_eof) {
      Waiting back{local, r, deadline, std::move(bytes), local_eof};
      back.refusals = refusals;
      came_back(link, std::move(back));
    };
    // A stream that ends frees a place under the server's max_streams.
    b->on_finished = [this](proxy::Bridge&) { schedule_pump(); };
    link->add_bridge(id, std::move(b));
  }

  void rearm_wait_timer() {
    if (!wait_timer) return;
    if (waiting.empty()) {
      uv_timer_stop(wait_timer);
      return;
    }
    uint64_t now = uv_now(loop);
    uint64_t first = UINT64_MAX;
    for (const Waiting& w : waiting) {
      first = std::min(first, w.deadline);
      if (w.not_before > now) first = std::min(first, w.not_before);
    }
    if (pump_again_at) first = std::min(first, pump_again_at);
    uint64_t d = first > now ? first - now : 0;
    uv_timer_start(wait_timer, wait_cb, d, 0);
  }

  void expire_waiting() {
    uint64_t now = uv_now(loop);
    size_t n = 0;
    for (auto it = waiting.begin(); it != waiting.end();) {
      if (it->deadline > now) {
        ++it;
        continue;
      }
      Waiting w = take(it++);
      w.tcp->close(true);
      ++n;
    }
    counters.waiting_expired += n;
    if (n && active && active->usable())
      spdlog::warn("{} local connection(s) reset: not opened within {} ms (the server's stream limits)", n,
                   opts.connect_timeout_ms);
    else if (n)
      spdlog::warn("{} local connection(s) reset: no session within {} ms", n, opts.connect_timeout_ms);
    rearm_wait_timer();
  }
};

namespace {

uv_loop_t* ClientLink::owner_loop(Client::Impl& o) { return o.loop; }

void ClientLink::on_secure() {
  // Offsets count from the session's first byte (docs/protocol.md 9.2): keep
  // until WELCOME says whether the session is resumable.
  if (owner_.opts.resume) resume_log().start_keeping();
  uint32_t id = session().open();  // 1: the control stream
  mux::Hello h;
  h.version = 1;
  h.token = owner_.opts.token;
  h.client_id = owner_.opts.client_id;
  h.resume_capable = owner_.opts.resume;
  // A detached session: this connection's HELLO asks to resume it.
  if (owner_.active && owner_.active->detached()) resume_of = owner_.active;
  if (resume_of && resume_of->detached() && resume_of->resume_secret) {
    mux::ResumeRequest r;
    r.session_id = resume_of->session_id;
    r.secret = *resume_of->resume_secret;
    r.received = resume_of->resume_log().received();
    h.resume = r;
  }
  std::vector<uint8_t> msg;
  mux::encode(h, msg);
  (void)session().write(id, msg);
  flush();
}

void ClientLink::on_control_data() {
  const util::ByteQueue* in = session().inbound(1);
  while (in && !in->empty() && phase() < LinkPhase::flushing) {
    mux::ControlMessage m;
    mux::DecodeResult r = mux::decode(*in, m);
    if (r.status == mux::DecodeStatus::need_more) return;
    if (r.status == mux::DecodeStatus::malformed) {
      close("malformed control message from server", true, mux::GoAwayCode::protocol_error);
      return;
    }
    session().consumed(1, r.used);
    // The server's strings are shown (logs, events), never interpreted raw: escaped once, here.
    if (m.welcome) m.welcome->server_id = util::printable(m.welcome->server_id);
    if (m.reject) m.reject->reason = util::printable(m.reject->reason);
    if (m.drain) {
      m.drain->reason = util::printable(m.drain->reason);
      m.drain->reconnect_hint = util::printable(m.drain->reconnect_hint);
    }
    if (m.welcome && phase() == LinkPhase::awaiting_hello) {
      set_phase(LinkPhase::serving);
      heartbeat_ms = m.welcome->heartbeat_ms;
      if (heartbeat_ms) next_ping_ms_ = uv_now(loop()) + heartbeat_ms;
      session_id = m.welcome->session_id;
      m.welcome->resume_address = util::printable(m.welcome->resume_address);
      m.welcome->resume_refused = util::printable(m.welcome->resume_refused);
      if (owner_.opts.resume && m.welcome->resume_secret) {
        resume_secret = m.welcome->resume_secret;
        resume_window_ms = m.welcome->resume_window_ms.value_or(0);
        resume_address = m.welcome->resume_address;
        set_resume_window(resume_window_ms);
      } else {
        resume_log().stop_keeping();
      }
      rearm_timer();
      EntryGuard g(this);
      owner_.welcomed(this, *m.welcome);
    } else if (m.resumed && phase() == LinkPhase::awaiting_hello) {
      // docs/protocol.md 9.4: the last frame of this setup session.
      EntryGuard g(this);
      owner_.resumed(this, *m.resumed);
      return;
    } else if (m.received && phase() == LinkPhase::serving) {
      if (resumable_session() && !take_receipt(m.received->received)) return;
    } else if (m.reject) {
      owner_.rejected(this, *m.reject);
      close("rejected by server", false);
      return;
    } else if (m.drain) {
      EntryGuard g(this);
      owner_.drained(this, *m.drain);
    }
    in = session().inbound(1);
  }
}

// docs/protocol.md 5: a ping every heartbeat_ms; dead after 2 unanswered pings.
// Counted from the last bytes received, so a peer that went silent right
// after answering is found 2 heartbeats later, not 3.
void ClientLink::on_role_deadline() {
  if (phase() != LinkPhase::serving || !heartbeat_ms) return;
  uint64_t now = uv_now(loop());
  if (now >= next_ping_ms_) {
    (void)session().ping(++ping_seq_, now);
    flush();
    next_ping_ms_ = now + heartbeat_ms;
  }
  if (now >= last_rx_ms() + 2 * uint64_t(heartbeat_ms) && session().pending_pings().size() >= 2) {
    // A dead path: the session is kept for a resume when it can be.
    if (try_detach("heartbeat lost: 2 pings unanswered")) return;
    close("heartbeat lost: 2 pings unanswered", true);
    return;
  }
}

bool ClientLink::on_break(const char* why) { return owner_.link_broke(this, why); }

void ClientLink::on_detach_expired() { owner_.resume_expired(this); }

void ClientLink::on_reattached() {
  // Pings start over from the resume.
  if (heartbeat_ms) next_ping_ms_ = uv_now(loop()) + heartbeat_ms;
  owner_.reattached(this);
}

void ClientLink::on_last_bridge_gone() { owner_.link_idle(this); }

void ClientLink::on_ping_answered(uint32_t value, uint64_t) {
  if (!(value & kMarkerBit)) return;
  auto it = std::find_if(markers_.begin(), markers_.end(), [&](const Marker& m) { return m.value == value; });
  if (it == markers_.end()) return;
  // Answers come in order; one that overtook an earlier marker's (a peer
  // answering from another thread) ends that one's window too: fewer
  // streams count as refused, never more.
  for (auto m = markers_.begin(); m != std::next(it); ++m)
    for (uint32_t id : m->ids) unanswered_.erase(id);
  markers_.erase(markers_.begin(), std::next(it));
  owner_.schedule_pump();  // opens held back for a marker
}

std::string ClientLink::close_reason(const char* reason) const {
  if (!handshake_error_.empty()) return std::string(reason) + ": " + handshake_error_;
  // The server closed the connection mid-handshake without an alert.
  if (phase() == LinkPhase::awaiting_handshake)
    if (const tls::Handshake* h = handshake())
      if (std::string why = h->peer_close_reason(); !why.empty()) return why;
  return reason;
}

void ClientLink::on_closed(const char* reason) { owner_.link_closed(this, close_reason(reason)); }

}  // namespace

Client::Client(uv_loop_t* loop, ClientOptions options, ClientEvents events) : impl_(std::make_unique<Impl>()) {
  impl_->loop = loop;
  impl_->opts = std::move(options);
  impl_->events = std::move(events);
}

Client::~Client() {
  stop();
}

std::string Client::start() {
  Impl& i = *impl_;
  std::vector<std::string> addrs;
  if (!i.opts.server.empty()) addrs.push_back(i.opts.server);
  for (const std::string& s : i.opts.servers) addrs.push_back(s);
  if (addrs.empty()) return "no server address";
  for (const std::string& s : addrs) {
    auto hp = config::parse_host_port(s, false);
    if (!hp) return "bad --server address \"" + s + "\": expected host:port";
    i.servers.push_back(*hp);
  }
  if (i.opts.max_waiting == 0) return "max_waiting must be at least 1";
  for (const ClientForward& f : i.opts.forwards) {
    if (!config::parse_host_port(f.listen, true)) return "bad forward address \"" + f.listen + "\": expected host:port";
    if (f.route.empty() || f.route.size() > 255) return "bad route name \"" + f.route + "\"";
  }
  if (i.opts.client_id.empty()) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    i.opts.client_id = host;
  }
  if (i.opts.client_id.size() > 128 || !util::valid_utf8(i.opts.client_id))
    return "bad client id " + util::quoted(i.opts.client_id) + ": at most 128 bytes of UTF-8 (docs/protocol.md 3)";
  tls::ClientTlsOptions t;
  t.ca_file = i.opts.ca_file;
  t.cert_file = i.opts.cert_file;
  t.key_file = i.opts.key_file;
  std::string err;
  i.tls = tls::Context::make_client(t, err);
  if (!i.tls) return err;
  for (const std::string& w : i.tls->warnings()) spdlog::warn("{}", w);
  i.retry_timer = i.make_timer();
  i.wait_timer = i.make_timer();
  i.pump_idle = new uv_idle_t;
  uv_idle_init(i.loop, i.pump_idle);
  i.pump_idle->data = &i;
  i.dial(i.target_of(i.servers[0]));
  return "";
}

void Client::stop() {
  Impl& i = *impl_;
  if (i.stopped) return;
  i.shutdown_all("client stopping");
}

bool Client::open_stream(int fd, const std::string& route) {
  if (impl_->stopped) {
    ::close(fd);
    return false;
  }
  net::Tcp* tcp = net::Tcp::create(impl_->loop, nullptr);
  if (tcp->open_fd(fd) != 0) {
    tcp->close();
    return false;
  }
  impl_->submit(tcp, route);
  return true;
}

std::string Client::local_address() const { return impl_->active ? impl_->active->local_address() : ""; }

size_t Client::stream_count() const {
  size_t n = impl_->active ? impl_->active->bridge_count() : 0;
  for (ClientLink* l : impl_->old) n += l->bridge_count();
  return n;
}

size_t Client::waiting_count() const { return impl_->waiting.size(); }

const ClientCounters& Client::counters() const { return impl_->counters; }

ClientStatus Client::status() const {
  const Impl& i = *impl_;
  ClientStatus s;
  ClientLink* a = i.active;
  if (a) {
    s.session = a->n;
    s.server = a->target.str();
    s.server_id = a->server_id;
    s.resumed = a->resumed();
    s.session_age_ms = uv_now(i.loop) - a->ready_ms;
  }
  if (a && a->usable()) s.state = "connected";
  else if (a && a->detached()) s.state = "detached";
  else if (a) s.state = "moving";
  else s.state = "connecting";
  if (i.pending) s.dialing = i.pending->target.str();
  else if (i.resolve || i.dialing) s.dialing = i.dial_target.str();
  s.old_sessions = i.old.size();
  s.streams = stream_count();
  s.waiting = i.waiting.size();
  s.waiting_limit = i.opts.max_waiting;
  if (a) {
    s.server_open_rate = a->server_rate;
    s.server_open_burst = a->server_burst;
    s.server_max_streams = a->server_max_streams;
    s.open_rate = a->pace_rate;
    s.open_burst = a->pace_burst;
    s.resumable = a->resumable_session();
    s.resume_window_ms = a->resume_window_ms;
    s.resume_kept_bytes = a->resume_kept();
    if (a->detached()) s.detached_for_ms = uv_now(i.loop) - a->detached_ms();
  }
  s.counters = i.counters;
  return s;
}

}  // namespace baton
