// The benchmark clients' TLS context: the project's client tls::Context,
// optionally narrowed to one cipher suite and one ECDHE group, so that every
// target of a comparison (baton, HAProxy, stunnel, nginx) negotiates exactly
// the same thing whatever its own preference order is.
#pragma once

#include <memory>
#include <string>

#include "tls/context.h"

namespace baton::bench {

// `suite`: an OpenSSL-style name of one of docs/protocol.md's six suites
// (ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-ECDSA-CHACHA20-POLY1305, ...), or ""
// for all six. `group`: "x25519", "p256" or "" for the default list; the
// chosen group is offered first, then the certificate curves (P-256, P-384),
// so the server must be told to use the group too (baton's own order puts
// X25519 first; with "p256" X25519 is not offered at all).
// Returns nullptr and sets `error` on an unknown name or an unreadable CA.
// The narrowed lists live in static storage: one narrowed context per process.
std::unique_ptr<tls::Context> make_client_context(const std::string& ca_file, const std::string& suite,
                                                  const std::string& group, std::string& error);

}  // namespace baton::bench
