// Development certificates for the demo and tests, written with mbedTLS's
// x509write (no openssl needed): a CA, a server certificate signed by it, a
// client certificate signed by it, and a session-ticket key.
#pragma once

#include <string>
#include <vector>

namespace baton::tls {

struct DevCertOptions {
  std::string out_dir;                                   // created if missing (mode 0700)
  std::vector<std::string> server_names{"localhost"};    // DNS SANs of the server certificate
  std::vector<std::string> server_ips{"127.0.0.1", "::1"};  // IP SANs
  std::string client_name = "baton-client";              // client certificate CN
  unsigned valid_days = 365;
};

// Writes ca.crt, ca.key, server.crt, server.key, client.crt, client.key
// (PEM, keys ECDSA P-256, mode 0600 for keys) and ticket.key (64 hex chars
// and a newline, mode 0600) into out_dir. Returns "" on success, else an error text.
[[nodiscard]] std::string write_dev_certs(const DevCertOptions& opts);

}  // namespace baton::tls
