#include "baton/client.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include "config/config.h"
#include "mux/control.h"
#include "net/listener.h"
#include "net/tcp.h"
#include "proxy/bridge.h"
#include "proxy/link.h"
#include "tls/context.h"
#include "util/bytes.h"

namespace baton {

using proxy::Link;
using proxy::LinkPhase;

namespace {

// The client's side of one session: sends HELLO, waits for WELCOME, pings.
class ClientLink : public Link {
 public:
  ClientLink(Client::Impl& owner, net::Tcp* tcp, tls::Context& ctx, const proxy::LinkLimits& limits,
             const std::string& server_name, tls::ClientSession* session)
      : Link(owner_loop(owner), tcp, ctx, mux::Role::client, limits, server_name, session), owner_(owner) {}

  static uv_loop_t* owner_loop(Client::Impl& o);
  uint32_t heartbeat_ms = 0;

 protected:
  void on_secure() override;
  void on_control_data() override;
  void on_peer_stream(uint32_t id) override { session().reset(id); }
  void on_closed(const char* reason) override;
  uint64_t role_deadline() const override { return next_ping_ms_; }
  void on_role_deadline() override;

 private:
  Client::Impl& owner_;
  uint64_t next_ping_ms_ = 0;
  uint32_t ping_seq_ = 0;
};

}  // namespace

struct Client::Impl {
  uv_loop_t* loop;
  ClientOptions opts;
  ClientEvents events;
  std::unique_ptr<tls::Context> tls;
  tls::ClientSession resume;  // ticket from the last session, offered on the next dial
  config::HostPort server;
  std::string server_name;
  ClientLink* link = nullptr;
  net::Tcp* dialing = nullptr;
  net::Resolve* resolve = nullptr;
  std::vector<std::pair<net::Listener*, std::string>> listeners;
  bool ready_sent = false;
  bool stopped = false;

  struct Dialer : net::TcpHandler {
    Impl* impl;
    void on_read(std::span<const uint8_t>) override {}
    void on_read_end(int) override {}
    void on_written(size_t, int) override {}
    void on_connected(int status) override { impl->connected(status); }
  } dialer;

  void fail(const std::string& err) {
    if (stopped) return;
    stopped = true;
    close_listeners();
    if (events.on_closed) events.on_closed(err);
  }

  void close_listeners() {
    for (auto& [l, r] : listeners) l->close();
    listeners.clear();
  }

  void dial() {
    resolve = net::Resolve::start(loop, server.host, server.port, [this](int status, const sockaddr* addr) {
      resolve = nullptr;
      if (status != 0) {
        fail("cannot resolve " + server.to_string() + ": " + uv_strerror(status));
        return;
      }
      dialer.impl = this;
      dialing = net::Tcp::create(loop, &dialer);
      int err = dialing->connect(addr);
      if (err) connected(err);
    });
  }

  void connected(int status) {
    net::Tcp* tcp = dialing;
    dialing = nullptr;
    if (status != 0) {
      tcp->close();
      fail("cannot connect to " + server.to_string() + ": " + uv_strerror(status));
      return;
    }
    proxy::LinkLimits limits;
    limits.handshake_timeout_ms = opts.connect_timeout_ms;
    limits.idle_timeout_ms = UINT32_MAX / 2;  // the client relies on heartbeats instead
    link = new ClientLink(*this, tcp, *tls, limits, server_name, &resume);
    link->start();
  }

  void welcomed(const mux::Welcome& w) {
    ClientReady r;
    r.session_id = w.session_id;
    r.server_id = w.server_id;
    r.heartbeat_ms = w.heartbeat_ms;
    if (!ready_sent) {
      for (const ClientForward& f : opts.forwards) {
        auto hp = config::parse_host_port(f.listen, true);
        auto* l = net::Listener::create(loop, [this, route = f.route](int fd) { accept_local(fd, route); });
        std::string err = hp ? l->bind(hp->host, hp->port) : "bad forward address " + f.listen;
        if (!err.empty()) {
          l->close();
          fail(err);
          return;
        }
        listeners.emplace_back(l, f.route);
      }
    }
    for (auto& [l, route] : listeners) r.forwards.emplace_back(l->local_address(), route);
    ready_sent = true;
    if (events.on_ready) events.on_ready(r);
  }

  void accept_local(int fd, const std::string& route) {
    net::Tcp* tcp = net::Tcp::create(loop, nullptr);
    if (tcp->open_fd(fd) != 0) {
      ::close(fd);
      tcp->close();
      return;
    }
    if (!relay(tcp, route)) tcp->close(true);
  }

  bool relay(net::Tcp* tcp, const std::string& route) {
    if (!link || link->phase() != LinkPhase::serving) return false;
    Link::EntryGuard g(link);
    uint32_t id = link->session().open();
    if (id == 0) return false;
    std::vector<uint8_t> pre;
    mux::encode_preamble(route, pre);
    (void)link->session().write(id, pre);  // fits: a new stream has a 256 KiB window
    uv_tcp_nodelay(tcp->handle(), 1);
    link->add_bridge(id, std::make_unique<proxy::Bridge>(*link, id, tcp));
    link->flush();
    return true;
  }

  void link_closed(const std::string& reason) {
    link = nullptr;
    fail(reason);
  }
};

namespace {

uv_loop_t* ClientLink::owner_loop(Client::Impl& o) { return o.loop; }

void ClientLink::on_secure() {
  uint32_t id = session().open();  // 1: the control stream
  mux::Hello h;
  h.version = 1;
  h.token = owner_.opts.token;
  h.client_id = owner_.opts.client_id;
  std::vector<uint8_t> msg;
  mux::encode(h, msg);
  (void)session().write(id, msg);
  flush();
}

void ClientLink::on_control_data() {
  const util::ByteQueue* in = session().inbound(1);
  while (in && !in->empty() && phase() < LinkPhase::flushing) {
    std::vector<uint8_t> buf = in->to_vector();
    mux::ControlMessage m;
    mux::DecodeResult r = mux::decode(buf, m);
    if (r.status == mux::DecodeStatus::need_more) return;
    if (r.status == mux::DecodeStatus::malformed) {
      close("malformed control message from server", true, mux::GoAwayCode::protocol_error);
      return;
    }
    session().consumed(1, r.used);
    in = session().inbound(1);
    if (m.welcome && phase() == LinkPhase::awaiting_hello) {
      set_phase(LinkPhase::serving);
      heartbeat_ms = m.welcome->heartbeat_ms;
      if (heartbeat_ms) next_ping_ms_ = uv_now(loop()) + heartbeat_ms;
      rearm_timer();
      owner_.welcomed(*m.welcome);
    } else if (m.reject) {
      if (owner_.events.on_reject) owner_.events.on_reject(m.reject->code, m.reject->reason);
      close("rejected by server", false);
      return;
    } else if (m.drain) {
      // Reconnect-before-break comes with drain support; for now, note it.
      spdlog::info("server is draining ({}), grace {} ms", m.drain->reason, m.drain->grace_ms);
    }
    in = session().inbound(1);
  }
}

void ClientLink::on_role_deadline() {
  uint64_t now = uv_now(loop());
  if (session().pending_pings().size() >= 2) {
    close("heartbeat lost: 2 pings unanswered", true);
    return;
  }
  (void)session().ping(++ping_seq_, now);
  flush();
  next_ping_ms_ = now + heartbeat_ms;
}

void ClientLink::on_closed(const char* reason) { owner_.link_closed(reason); }

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
  auto hp = config::parse_host_port(i.opts.server, false);
  if (!hp) return "bad --server address \"" + i.opts.server + "\": expected host:port";
  i.server = *hp;
  i.server_name = i.opts.server_name.empty() ? hp->host : i.opts.server_name;
  for (const ClientForward& f : i.opts.forwards) {
    if (!config::parse_host_port(f.listen, true)) return "bad forward address \"" + f.listen + "\": expected host:port";
    if (f.route.empty() || f.route.size() > 255) return "bad route name \"" + f.route + "\"";
  }
  if (i.opts.client_id.empty()) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    i.opts.client_id = host;
  }
  tls::ClientTlsOptions t;
  t.ca_file = i.opts.ca_file;
  t.cert_file = i.opts.cert_file;
  t.key_file = i.opts.key_file;
  std::string err;
  i.tls = tls::Context::make_client(t, err);
  if (!i.tls) return err;
  i.dial();
  return "";
}

void Client::stop() {
  Impl& i = *impl_;
  i.stopped = true;
  i.close_listeners();
  if (i.resolve) {
    i.resolve->cancel();
    i.resolve = nullptr;
  }
  if (i.dialing) {
    i.dialing->close();
    i.dialing = nullptr;
  }
  if (i.link) {
    ClientLink* l = i.link;
    i.link = nullptr;
    l->close("client stopping", true);
  }
}

bool Client::open_stream(int fd, const std::string& route) {
  net::Tcp* tcp = net::Tcp::create(impl_->loop, nullptr);
  if (tcp->open_fd(fd) != 0) {
    tcp->close();
    return false;
  }
  if (!impl_->relay(tcp, route)) {
    tcp->close(true);
    return false;
  }
  return true;
}

std::string Client::local_address() const { return impl_->link ? impl_->link->local_address() : ""; }

size_t Client::stream_count() const { return impl_->link ? impl_->link->bridge_count() : 0; }

}  // namespace baton
