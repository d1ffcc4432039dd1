// Tunnel: the server side of one client's session (PROTOCOL.md sections 3-4).
// Link does TLS, yamux and relaying; Tunnel adds HELLO/WELCOME/REJECT on the
// control stream, authentication and route lookup.
#pragma once

#include <array>
#include <string>

#include "proxy/link.h"

namespace baton::proxy {

class Server;

class Tunnel : public Link {
 public:
  Tunnel(Server& server, net::Tcp* tcp);
  ~Tunnel() override;

  const std::array<uint8_t, 16>& session_id() const { return session_id_; }
  const std::string& client_id() const { return client_id_; }

 protected:
  void on_secure() override;
  void on_control_data() override;
  void on_peer_stream(uint32_t id) override;
  void on_closed(const char* reason) override;

 private:
  void handle_hello(const struct HelloView& h);
  void reject(uint16_t code, const std::string& reason);
  void send_control(const std::vector<uint8_t>& msg);

  Server& server_;
  std::array<uint8_t, 16> session_id_{};
  std::string client_id_;
  bool control_open_ = false;
  bool counted_ = false;
};

}  // namespace baton::proxy
