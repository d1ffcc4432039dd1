// baton tunnel client, for programs that embed it (and for `baton connect`).
//
// A Client runs inside the caller's libuv loop. It dials the sidecar, runs
// TLS 1.2 and the HELLO exchange (PROTOCOL.md sections 1-3), then serves
// local forwarders: every TCP connection accepted on a forwarder's address
// becomes one stream to the forwarder's route. open_stream() gives the same
// to a program that already holds a connected socket.
//
// Threading: every call must come from the loop's thread.
#pragma once

#include <uv.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace baton {

struct ClientForward {
  std::string listen;  // "127.0.0.1:9000"; port 0 picks a free port
  std::string route;   // route name on the sidecar
};

struct ClientOptions {
  std::string server;       // "host:port" of the sidecar's tunnel listener
  std::string server_name;  // certificate name to verify; default: the host of `server`
  std::string token;        // sent in HELLO; never logged
  std::string client_id;    // shown in the sidecar's logs; default: the host name
  std::string ca_file;      // CA that signed the sidecar's certificate; default: system bundle
  std::string cert_file;    // optional client certificate (mTLS)
  std::string key_file;
  std::vector<ClientForward> forwards;
  uint32_t connect_timeout_ms = 10000;  // TCP + TLS + WELCOME
};

struct ClientReady {
  std::array<uint8_t, 16> session_id{};
  std::string server_id;
  uint32_t heartbeat_ms = 0;
  std::vector<std::pair<std::string, std::string>> forwards;  // bound address, route
};

struct ClientEvents {
  std::function<void(const ClientReady&)> on_ready;  // WELCOME received, forwarders listening
  // REJECT received: code per PROTOCOL.md (1 version, 2 unauthorized, 3 overloaded, 4 draining).
  std::function<void(uint16_t code, const std::string& reason)> on_reject;
  // The session ended (after on_ready) or could not be established; `error` says why.
  std::function<void(const std::string& error)> on_closed;
};

class Client {
 public:
  Client(uv_loop_t* loop, ClientOptions options, ClientEvents events);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Validates options, loads TLS material and starts dialing. Returns "" or
  // an error (bad address, unreadable CA file, ...).
  [[nodiscard]] std::string start();
  // Closes forwarders and the session (Go Away, close_notify).
  void stop();

  // Relays an already connected TCP socket `fd` over a new stream to `route`.
  // Takes ownership of fd. False if no session is established.
  bool open_stream(int fd, const std::string& route);

  // Streams currently open on the session.
  size_t stream_count() const;
  // Local "host:port" of the tunnel's TCP connection ("" when none). A hot
  // restart of the sidecar leaves it unchanged: the connection is the same.
  std::string local_address() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace baton
