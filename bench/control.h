// The bench clients' side of the HELLO / WELCOME exchange (docs/protocol.md
// 3), in one place for idle_tunnels, peer_load and bench_push: the HELLO
// bytes and the control stream read one message at a time. (baton's own
// client does the same in src/client/client.cc, the server in
// src/proxy/tunnel.cc.)
#pragma once

#include <string>
#include <vector>

#include "mux/control.h"
#include "mux/session.h"

namespace baton::bench {

inline constexpr uint32_t kControlStream = 1;

// HELLO, protocol version 1: the first bytes of the control stream.
inline std::vector<uint8_t> hello_message(const std::string& token, const std::string& client_id) {
  mux::Hello h;
  h.version = 1;
  h.token = token;
  h.client_id = client_id;
  std::vector<uint8_t> msg;
  mux::encode(h, msg);
  return msg;
}

enum class ControlRead { none, message, malformed };

// The next whole message queued on the control stream, taken from the queue
// (its window credit returned); `none` while it is still arriving.
inline ControlRead next_control(mux::Session& s, mux::ControlMessage& m, std::string& error) {
  const util::ByteQueue* in = s.inbound(kControlStream);
  if (!in || in->empty()) return ControlRead::none;
  m = mux::ControlMessage{};
  mux::DecodeResult r = mux::decode(*in, m);
  if (r.status == mux::DecodeStatus::need_more) return ControlRead::none;
  if (r.status == mux::DecodeStatus::malformed) {
    error = std::string("malformed control message: ") + (r.error ? r.error : "?");
    return ControlRead::malformed;
  }
  s.consumed(kControlStream, r.used);
  return ControlRead::message;
}

}  // namespace baton::bench
