#include "client/status_http.h"

#include <unistd.h>

#include "baton/client.h"
#include "net/listener.h"
#include "net/tcp.h"
#include "util/json.h"

namespace baton::client {

std::string status_json(const ClientStatus& s) {
  using util::Json;
  const ClientCounters& c = s.counters;
  Json o = {{"state", s.state},
            {"session", s.session},
            {"server", s.server},
            {"server_id", s.server_id},
            {"resumed", s.resumed},
            {"session_age_ms", s.session_age_ms},
            {"dialing", s.dialing},
            {"old_sessions", s.old_sessions},
            {"streams", s.streams},
            {"waiting", s.waiting},
            {"waiting_limit", s.waiting_limit},
            {"limits",
             {{"stream_open_rate", s.server_open_rate},
              {"stream_open_burst", s.server_open_burst},
              {"max_streams", s.server_max_streams}}},
            {"pacing", {{"rate", s.open_rate}, {"burst", s.open_burst}}},
            {"resume",
             {{"resumable", s.resumable},
              {"window_ms", s.resume_window_ms},
              {"kept_bytes", s.resume_kept_bytes},
              {"detached_for_ms", s.detached_for_ms}}},
            {"counters",
             {{"sessions_opened", c.sessions_opened},
              {"reconnects", c.reconnects},
              {"full_handshakes", c.full_handshakes},
              {"resumed_handshakes", c.resumed_handshakes},
              {"drains_followed", c.drains_followed},
              {"failed_tries", c.failed_tries},
              {"streams_replayed", c.streams_replayed},
              {"opens_deferred", c.opens_deferred},
              {"opens_refused", c.opens_refused},
              {"opens_retried", c.opens_retried},
              {"waiting_expired", c.waiting_expired},
              {"waiting_overflow", c.waiting_overflow},
              {"sessions_detached", c.sessions_detached},
              {"sessions_resumed", c.sessions_resumed},
              {"resumes_refused", c.resumes_refused},
              {"resumes_expired", c.resumes_expired},
              {"resume_replayed_bytes", c.resume_replayed_bytes}}}};
  // server_id came from the server: printable() already (client.cc).
  return util::json_text(o) + "\n";
}

bool parse_request_line(const std::string& head, std::string& method, std::string& path) {
  size_t eol = head.find("\r\n");
  std::string line = head.substr(0, eol);
  size_t sp1 = line.find(' ');
  if (sp1 == std::string::npos || sp1 == 0) return false;
  size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos || line.compare(sp2 + 1, 7, "HTTP/1.") != 0) return false;
  method = line.substr(0, sp1);
  path = line.substr(sp1 + 1, sp2 - sp1 - 1);
  if (size_t q = path.find('?'); q != std::string::npos) path.resize(q);
  return !path.empty() && path[0] == '/';
}

// One connection: reads the head, answers once, closes after the write.
struct StatusHttp::Conn : net::TcpHandler {
  StatusHttp& owner;
  net::Tcp* tcp;
  uv_timer_t* timer;
  std::string head;
  util::ByteQueue out;
  bool answered = false;

  Conn(StatusHttp& o, net::Tcp* t) : owner(o), tcp(t), timer(new uv_timer_t) {
    uv_timer_init(o.loop_, timer);
    timer->data = this;
    uv_timer_start(timer, [](uv_timer_t* t) { static_cast<Conn*>(t->data)->finish(); }, kTimeoutMs, 0);
    tcp->set_handler(this);
    tcp->start_read();
  }
  ~Conn() override {
    uv_close(reinterpret_cast<uv_handle_t*>(timer), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    if (tcp) tcp->close();
  }

  void finish() { owner.done(this); }  // deletes this

  void answer(int code, const char* reason, const std::string& body, bool head_only) {
    answered = true;
    tcp->stop_read();
    std::string r = "HTTP/1.1 " + std::to_string(code) + " " + reason +
                    "\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nConnection: close\r\n"
                    "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
    if (!head_only) r += body;
    out.append({reinterpret_cast<const uint8_t*>(r.data()), r.size()});
    tcp->write_from(out);
  }

  void on_read(std::span<const uint8_t> data) override {
    if (answered) return;
    head.append(reinterpret_cast<const char*>(data.data()), data.size());
    size_t end = head.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (head.size() > kMaxRequest) answer(431, "Request Header Fields Too Large", "{\"error\":\"request too large\"}\n", false);
      return;
    }
    std::string method, path;
    if (!parse_request_line(head, method, path)) {
      answer(400, "Bad Request", "{\"error\":\"bad request line\"}\n", false);
      return;
    }
    auto it = owner.routes_.find(path);
    if (it == owner.routes_.end()) {
      answer(404, "Not Found", "{\"error\":\"unknown path\",\"paths\":[\"/status\"]}\n", method == "HEAD");
      return;
    }
    if (method != "GET" && method != "HEAD") {
      answer(405, "Method Not Allowed", "{\"error\":\"only GET\"}\n", false);
      return;
    }
    answer(200, "OK", it->second(), method == "HEAD");
  }
  void on_read_end(int) override {
    if (!answered) finish();
  }
  void on_written(size_t n, int err) override {
    out.pop(std::min(n, out.size()));
    if (err || out.empty()) {
      if (!err) tcp->shutdown();
      finish();
    } else {
      tcp->write_from(out);
    }
  }
};

StatusHttp::StatusHttp(uv_loop_t* loop, Routes routes) : loop_(loop), routes_(std::move(routes)) {}

StatusHttp::~StatusHttp() { stop(); }

std::string StatusHttp::start(const std::string& host, uint16_t port) {
  listener_ = net::Listener::create(loop_, [this](int fd) { accept(fd); });
  std::string err = listener_->bind(host, port, 64);
  if (!err.empty()) {
    listener_->close();
    listener_ = nullptr;
  }
  return err;
}

std::string StatusHttp::address() const { return listener_ ? listener_->local_address() : ""; }

void StatusHttp::stop() {
  if (listener_) {
    listener_->close();
    listener_ = nullptr;
  }
  conns_.clear();
}

void StatusHttp::accept(int fd) {
  if (conns_.size() >= kMaxConnections) {
    ::close(fd);
    return;
  }
  net::Tcp* tcp = net::Tcp::create(loop_, nullptr);
  if (tcp->open_fd(fd) != 0) {
    ::close(fd);
    tcp->close();
    return;
  }
  auto c = std::make_unique<Conn>(*this, tcp);
  Conn* p = c.get();
  conns_[p] = std::move(c);
}

void StatusHttp::done(Conn* c) { conns_.erase(c); }

}  // namespace baton::client
