// Context: one mbedtls_ssl_config with its credentials, shared by every
// handshake of one side. docs/protocol.md section 1 fixes what it allows: TLS 1.2
// only, ECDHE on P-256 or X25519, the six AEAD suites, no renegotiation,
// session tickets, ALPN "baton/1" accepted.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#include "tls/record.h"
#include "tls/ticket.h"

namespace baton::tls {

struct ServerTlsOptions {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;  // empty: no client certificates
  // Where each file was named, for messages ("baton.yaml:4:9: tls.cert";
  // tls/cert_files.h FileRef::origin). Empty: messages name the path only.
  std::string cert_origin, key_origin, client_ca_origin;
  bool require_client_cert = false;
  std::vector<TicketKey> ticket_keys;  // empty: one random key for this process
  std::vector<TicketKey> inherited_ticket_keys;  // from the previous process (handoff): opened, and seal when ticket_keys is empty
  uint32_t ticket_lifetime_s = 86400;
};

struct ClientTlsOptions {
  std::string ca_file;    // empty: the system bundle /etc/ssl/certs/ca-certificates.crt
  std::string cert_file;  // optional client certificate (mTLS)
  std::string key_file;
  std::string ca_origin, cert_origin, key_origin;  // as in ServerTlsOptions, e.g. "--cert"
};

// A certificate file's earliest notAfter, for the
// baton_tls_certificate_expiry_seconds{cert=NAME} gauge.
struct CertExpiry {
  std::string cert;       // "server", "client_ca" (server side); "client", "ca" (client side)
  int64_t not_after = 0;  // unix seconds
};

// Certificates expiring within this long get a warning at load.
constexpr int64_t kCertExpirySoon_s = 14 * 86400;

class Context {
 public:
  // Return nullptr and set `error` (naming the file and mbedTLS's reason) on failure.
  // A path that is not a readable regular file (a directory, a FIFO, a
  // device) is an error too. Certificates that load but that peers will
  // refuse (expired, not yet valid, weak keys or signatures;
  // tls/cert_files.h) or that expire within kCertExpirySoon_s are not: they
  // come back in warnings(), for the caller to log. The system CA bundle a
  // client uses without ca_file is not checked.
  static std::unique_ptr<Context> make_server(const ServerTlsOptions& o, std::string& error);
  static std::unique_ptr<Context> make_client(const ClientTlsOptions& o, std::string& error);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  mbedtls_ssl_config* conf() { return &conf_; }
  Side side() const { return side_; }
  bool verifies_client_certs() const { return has_client_ca_; }
  // A certificate of its own is configured (always on a server; mTLS on a client).
  bool has_own_cert() const { return has_own_cert_; }
  mbedtls_ctr_drbg_context* rng() { return &drbg_; }
  // Server: the session ticket keys in use (the first seals), for handoff.
  const std::vector<TicketKey>& ticket_keys() const { return ticket_keys_; }
  // One sentence per problem found in the certificate files at load, each
  // starting with the file's origin and path.
  const std::vector<std::string>& warnings() const { return warnings_; }
  // The earliest notAfter of each certificate file loaded (own chain first).
  const std::vector<CertExpiry>& expiries() const { return expiries_; }

 private:
  explicit Context(Side side);
  std::string init_common();
  Side side_;
  bool has_client_ca_ = false;
  bool has_own_cert_ = false;
  mbedtls_entropy_context entropy_;
  mbedtls_ctr_drbg_context drbg_;
  mbedtls_ssl_config conf_;
  mbedtls_x509_crt cert_;
  mbedtls_pk_context key_;
  mbedtls_x509_crt ca_;
  std::unique_ptr<TicketSealer> tickets_;
  std::vector<TicketKey> ticket_keys_;
  std::vector<std::string> warnings_;
  std::vector<CertExpiry> expiries_;
};

// mbedTLS's message for an error code, e.g. "X509 - Certificate verification failed".
std::string mbedtls_error_text(int code);

}  // namespace baton::tls
