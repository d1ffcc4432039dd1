// Handshake: mbedTLS runs one TLS 1.2 handshake over memory buffers.
//
// Sans-IO: bytes from the peer go in with feed(), step() advances as far as
// the input allows, bytes for the peer collect in output(). mbedTLS reads
// exactly one record at a time, so input it has not read when the handshake
// ends (a client's first application records, sent right behind its
// Finished) is handed to the record layer by finish(). After finish() the
// mbedtls_ssl_context is freed: a live tunnel keeps only RecordState.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <mbedtls/ssl.h>

#include "tls/context.h"
#include "tls/peer_info.h"
#include "tls/record.h"
#include "util/byte_queue.h"

namespace baton::tls {

enum class HandshakeStatus : uint8_t {
  awaiting_peer = 0,  // needs more input (flush output() first)
  done = 1,           // finished: call finish()
  failed = 2,         // flush output() (it may hold an alert), then close
};
const char* to_str(HandshakeStatus s);

// What a client keeps to resume a session with a ticket next time.
class ClientSession {
 public:
  ClientSession();
  ~ClientSession();
  ClientSession(const ClientSession&) = delete;
  ClientSession& operator=(const ClientSession&) = delete;
  mbedtls_ssl_session* get() { return &s_; }
  bool valid = false;

 private:
  mbedtls_ssl_session s_;
};

class Handshake {
 public:
  // Client side: server_name is the name the server's certificate must hold
  // (tls/cert_names.h): a DNS name is also sent as SNI; an IP literal
  // ("127.0.0.1", "::1") is matched against the certificate's iPAddress
  // SubjectAltNames and not sent (RFC 6066 3 forbids IP literals in SNI).
  // Empty: the certificate's chain is verified, its name is not. resume
  // (optional) offers a saved session ticket.
  Handshake(Context& ctx, const std::string& server_name = "", ClientSession* resume = nullptr);
  ~Handshake();
  Handshake(const Handshake&) = delete;
  Handshake& operator=(const Handshake&) = delete;

  // Takes all of `in` (buffered until mbedTLS asks for it).
  void feed(std::span<const uint8_t> in);
  // Runs the handshake as far as the buffered input allows.
  [[nodiscard]] HandshakeStatus step();
  util::ByteQueue& output() { return out_; }
  size_t buffered_input() const { return in_.size(); }

  // When failed: what went wrong, for logs (no secrets). A client names the
  // cause where it can: "server certificate does not name 127.0.0.2 (it
  // names DNS localhost, IP 127.0.0.1)", "server certificate did not
  // verify: ...", the alert the server sent, "the server requires a client
  // certificate (--cert/--key): ...".
  const std::string& error() const { return error_; }
  // Client side: the server asked for a certificate (CertificateRequest) and
  // this side has none. A handshake the server then ends failed for that
  // reason (unless require_client_cert is off, in which case it succeeds).
  bool client_cert_missing() const;
  // Client side, while not done: why a server that closed the connection
  // (TCP end, no alert) most likely did, or "" when nothing points anywhere.
  std::string peer_close_reason() const;
  // When done: whether the client presented a certificate that verified (server side).
  const PeerInfo& peer() const { return peer_; }

  // When done: the record state (keys, sequence numbers, unread input, and
  // output() not yet written), ready for RecordLayer. Frees the mbedTLS
  // context. Call once.
  RecordState finish();
  // Client side, when done: saves the session for resumption.
  void save_session(ClientSession& out);

 private:
  static int send_cb(void* p, const unsigned char* buf, size_t len);
  static int verify_cb(void* p, mbedtls_x509_crt* crt, int depth, uint32_t* flags);
  std::string failure_text(int ret) const;
  static int recv_cb(void* p, unsigned char* buf, size_t len);
  static int export_keys_cb(void* p, const unsigned char* ms, const unsigned char* kb, size_t maclen,
                            size_t keylen, size_t ivlen, const unsigned char client_random[32],
                            const unsigned char server_random[32], mbedtls_tls_prf_types prf);
  friend struct ExportHook;

  Context& ctx_;
  std::unique_ptr<mbedtls_ssl_context> ssl_;
  util::ByteQueue in_;
  util::ByteQueue out_;
  HandshakeStatus status_ = HandshakeStatus::awaiting_peer;
  std::string error_;
  PeerInfo peer_;
  // Key block as exported by mbedTLS: client key, server key, client IV, server IV.
  std::array<uint8_t, 2 * 32 + 2 * 12> key_block_{};
  size_t keylen_ = 0, ivlen_ = 0;
  bool keys_exported_ = false;
  bool resumed_ = false;             // server: a ticket was opened
  bool full_handshake_seen_ = false;  // client: the server's certificate was verified
  std::string server_name_;           // client: the name the certificate must hold
  bool name_is_ip_ = false;           // client: server_name_ is an IP literal (matched here, not by mbedTLS)
  std::string name_error_;            // client: the certificate did not name server_name_, and what it names
};

}  // namespace baton::tls
