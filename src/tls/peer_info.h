// What a finished TLS handshake learned about the peer, as plain data: it
// travels in a tunnel's handed-over state (proxy/state.h) without pulling
// the TLS library's headers into it.
#pragma once

#include <string>

namespace baton::tls {

struct PeerInfo {
  bool resumed = false;
  std::string alpn;          // negotiated ALPN or ""
  std::string cert_subject;  // verified client/server certificate subject, or ""
  std::string suite_name;
};

}  // namespace baton::tls
