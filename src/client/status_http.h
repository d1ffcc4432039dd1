// StatusHttp: a small HTTP/1.1 endpoint on the loop thread for `baton connect
// --status-listen` (docs/client.md). Answers GET with a body the owner renders
// at request time; every connection gets one answer and is closed.
//
// Bounded: at most kMaxConnections at once (more are closed at accept), a
// request head of at most kMaxRequest bytes (else 431), and kTimeoutMs to send
// the head (else closed). Only GET and HEAD; 404 for paths it does not know.
#pragma once

#include <uv.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

namespace baton {
struct ClientStatus;
namespace net {
class Listener;
}
}  // namespace baton

namespace baton::client {

class StatusHttp {
 public:
  static constexpr size_t kMaxConnections = 32;
  static constexpr size_t kMaxRequest = 8192;
  static constexpr uint32_t kTimeoutMs = 2000;

  // path -> renders the JSON body (loop thread).
  using Routes = std::map<std::string, std::function<std::string()>>;

  StatusHttp(uv_loop_t* loop, Routes routes);
  ~StatusHttp();
  StatusHttp(const StatusHttp&) = delete;
  StatusHttp& operator=(const StatusHttp&) = delete;

  // Binds host:port (port 0: any). Returns "" or an error naming the address.
  [[nodiscard]] std::string start(const std::string& host, uint16_t port);
  // "host:port" bound.
  std::string address() const;
  void stop();

  struct Conn;

 private:
  void accept(int fd);
  friend struct Conn;
  void done(Conn* c);

  uv_loop_t* loop_;
  Routes routes_;
  net::Listener* listener_ = nullptr;
  std::map<Conn*, std::unique_ptr<Conn>> conns_;
};

// Parses the request line of an HTTP/1.x head: method and path (query cut).
// False if `head` is not a request line this endpoint understands.
bool parse_request_line(const std::string& head, std::string& method, std::string& path);

// The body of GET /status (docs/client.md): one JSON object and a newline.
std::string status_json(const ClientStatus& s);

}  // namespace baton::client
