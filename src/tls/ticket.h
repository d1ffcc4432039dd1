// Session tickets (RFC 5077) sealed with keys from configuration, so that
// every replica and every restarted process accepts the same tickets.
//
// mbedtls_ssl_ticket generates its own random keys and rotates them by
// itself, which is exactly what a fleet must not do; so baton installs its own
// write/parse callbacks: ticket = key_name(4) | nonce(12) | AES-256-GCM(
// issued_at u64 | mbedtls_ssl_session_save bytes) | tag(16).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/gcm.h>
#include <mbedtls/ssl.h>

#include "tls/ticket_key.h"

namespace baton::tls {

// Reads a ticket key file: one or more lines of 64 hex digits (blank lines and
// lines starting with '#' skipped). The first key seals new tickets; all keys
// open tickets (rotation). Returns "" or an error naming file:line.
[[nodiscard]] std::string load_ticket_keys(const std::string& path, std::vector<TicketKey>& out);

// Tickets opened successfully by this thread so far (a resumed handshake
// opens exactly one); lets a handshake tell it was resumed.
uint64_t tickets_opened();

class TicketSealer {
 public:
  // `keys` non-empty. `rng` must outlive the sealer (nonces).
  TicketSealer(const std::vector<TicketKey>& keys, uint32_t lifetime_s, mbedtls_ctr_drbg_context* rng);
  ~TicketSealer();
  TicketSealer(const TicketSealer&) = delete;
  TicketSealer& operator=(const TicketSealer&) = delete;

  // Installs the callbacks on a server configuration.
  void install(mbedtls_ssl_config* conf);

 private:
  struct Key {
    std::array<uint8_t, 4> name;
    mbedtls_gcm_context gcm;
  };
  static int write_cb(void* p, const mbedtls_ssl_session* s, unsigned char* start, const unsigned char* end,
                      size_t* tlen, uint32_t* lifetime);
  static int parse_cb(void* p, mbedtls_ssl_session* s, unsigned char* buf, size_t len);
  std::vector<Key*> keys_;
  uint32_t lifetime_s_;
  mbedtls_ctr_drbg_context* rng_;
};

}  // namespace baton::tls
