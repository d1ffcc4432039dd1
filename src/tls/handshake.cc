#include "tls/handshake.h"

#include <mbedtls/platform_util.h>
#include <mbedtls/ssl_ciphersuites.h>

#include <cstring>

#include "tls/cert_names.h"
#include "util/bytes.h"

namespace baton::tls {

const char* to_str(HandshakeStatus s) {
  switch (s) {
    case HandshakeStatus::awaiting_peer: return "awaiting_peer";
    case HandshakeStatus::done: return "done";
    case HandshakeStatus::failed: return "failed";
  }
  return "?";
}

ClientSession::ClientSession() { mbedtls_ssl_session_init(&s_); }
ClientSession::~ClientSession() { mbedtls_ssl_session_free(&s_); }

namespace {
// mbedTLS's key export callback receives the config's pointer, not the
// connection's; the configuration is shared, so the handshake being stepped
// is recorded here. The loop is single-threaded per Context.
thread_local Handshake* g_stepping = nullptr;

const char* alert_name(uint8_t a) {
  switch (a) {
    case 0: return "close_notify";
    case 10: return "unexpected_message";
    case 20: return "bad_record_mac";
    case 22: return "record_overflow";
    case 40: return "handshake_failure";
    case 42: return "bad_certificate";
    case 43: return "unsupported_certificate";
    case 44: return "certificate_revoked";
    case 45: return "certificate_expired";
    case 46: return "certificate_unknown";
    case 47: return "illegal_parameter";
    case 48: return "unknown_ca";
    case 49: return "access_denied";
    case 50: return "decode_error";
    case 51: return "decrypt_error";
    case 70: return "protocol_version";
    case 71: return "insufficient_security";
    case 80: return "internal_error";
    case 86: return "inappropriate_fallback";
    case 90: return "user_canceled";
    case 100: return "no_renegotiation";
    case 109: return "missing_extension";
    case 110: return "unsupported_extension";
    case 112: return "unrecognized_name";
    case 116: return "certificate_required";
    case 120: return "no_application_protocol";
  }
  return "unknown";
}

constexpr const char* kNeedsClientCert = "the server requires a client certificate (--cert/--key)";
}  // namespace

Handshake::Handshake(Context& ctx, const std::string& server_name, ClientSession* resume)
    : ctx_(ctx), ssl_(std::make_unique<mbedtls_ssl_context>()) {
  mbedtls_ssl_init(ssl_.get());
  mbedtls_ssl_conf_export_keys_ext_cb(ctx.conf(), export_keys_cb, nullptr);
  int ret = mbedtls_ssl_setup(ssl_.get(), ctx.conf());
  if (ctx.side() == Side::client) {
    server_name_ = server_name;
    name_is_ip_ = is_ip_literal(server_name);
  }
  // mbedTLS checks a DNS name itself (and sends it as SNI); an IP literal is
  // checked in verify_cb, since mbedTLS 2.28 cannot match iPAddress names.
  if (ret == 0 && ctx.side() == Side::client && !server_name.empty() && !name_is_ip_)
    ret = mbedtls_ssl_set_hostname(ssl_.get(), server_name.c_str());
  if (ret == 0 && resume && resume->valid) (void)mbedtls_ssl_set_session(ssl_.get(), resume->get());
  if (ret != 0) {
    status_ = HandshakeStatus::failed;
    error_ = "TLS setup: " + mbedtls_error_text(ret);
  }
  mbedtls_ssl_set_bio(ssl_.get(), this, send_cb, recv_cb, nullptr);
  if (ctx.side() == Side::client) mbedtls_ssl_set_verify(ssl_.get(), verify_cb, this);
}

// Called for each certificate of the server's chain, the server's own last
// (depth 0), with what mbedTLS found wrong with it in *flags. Certificates
// are verified only in a full handshake: a client that sees no call knows
// the session was resumed.
int Handshake::verify_cb(void* p, mbedtls_x509_crt* crt, int depth, uint32_t* flags) {
  auto* h = static_cast<Handshake*>(p);
  h->full_handshake_seen_ = true;
  if (depth != 0 || h->server_name_.empty()) return 0;
  if (h->name_is_ip_ && !cert_names(*crt, h->server_name_)) *flags |= MBEDTLS_X509_BADCERT_CN_MISMATCH;
  // The certificate lives only as long as this call: say now what it names.
  if (*flags & MBEDTLS_X509_BADCERT_CN_MISMATCH) h->name_error_ = name_mismatch_error(*crt, h->server_name_);
  return 0;
}

bool Handshake::client_cert_missing() const {
  // ssl->client_auth: set by mbedTLS when the server's flight held a CertificateRequest.
  return ctx_.side() == Side::client && ssl_ && ssl_->client_auth && !ctx_.has_own_cert();
}

std::string Handshake::peer_close_reason() const {
  if (status_ != HandshakeStatus::done && client_cert_missing())
    return std::string(kNeedsClientCert) + ": it asked for one, none is configured, and it closed the connection";
  return "";
}

std::string Handshake::failure_text(int ret) const {
  std::string lib = mbedtls_error_text(ret);
  if (ctx_.side() == Side::server) {
    if (ret == MBEDTLS_ERR_SSL_BAD_HS_PROTOCOL_VERSION) return "client offered no TLS 1.2: " + lib;
    if (ret == MBEDTLS_ERR_SSL_NO_CLIENT_CERTIFICATE) return "client sent no certificate, and one is required: " + lib;
    return lib;
  }
  std::string why = lib;
  if (ret == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED) {
    uint32_t flags = mbedtls_ssl_get_verify_result(ssl_.get());
    why.clear();
    if (flags & MBEDTLS_X509_BADCERT_CN_MISMATCH)
      why = name_error_.empty() ? "server certificate does not name " + server_name_ : name_error_;
    if (uint32_t rest = flags & ~uint32_t(MBEDTLS_X509_BADCERT_CN_MISMATCH)) {
      char info[512] = "";
      int n = mbedtls_x509_crt_verify_info(info, sizeof info, "", rest);
      std::string text;  // one line per problem: joined with "; "
      for (char c : std::string_view(info, n > 0 ? size_t(n) : 0)) {
        if (c != '\n') text += c;
        else if (!text.empty() && text.back() != ' ') text += "; ";
      }
      while (!text.empty() && (text.back() == ' ' || text.back() == ';')) text.pop_back();
      if (!why.empty()) why += "; ";
      why += "server certificate did not verify: " + (text.empty() ? lib : text);
    }
    if (why.empty()) why = "server certificate did not verify: " + lib;
  } else if (ret == MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE && ssl_->in_msg && ssl_->in_msgtype == MBEDTLS_SSL_MSG_ALERT &&
             ssl_->in_msglen >= 2) {
    uint8_t a = ssl_->in_msg[1];
    why = "the server ended the handshake with alert " + std::string(alert_name(a)) + " (" + std::to_string(a) + ")";
  }
  if (client_cert_missing()) return std::string(kNeedsClientCert) + ": it asked for one and none is configured; " + why;
  return why;
}

Handshake::~Handshake() {
  if (ssl_) mbedtls_ssl_free(ssl_.get());
  mbedtls_platform_zeroize(key_block_.data(), key_block_.size());
}

int Handshake::send_cb(void* p, const unsigned char* buf, size_t len) {
  static_cast<Handshake*>(p)->out_.append({buf, len});
  return int(len);
}

int Handshake::recv_cb(void* p, unsigned char* buf, size_t len) {
  auto* h = static_cast<Handshake*>(p);
  if (h->in_.empty()) return MBEDTLS_ERR_SSL_WANT_READ;
  size_t n = h->in_.peek({buf, len});
  h->in_.pop(n);
  return int(n);
}

int Handshake::export_keys_cb(void*, const unsigned char*, const unsigned char* kb, size_t maclen, size_t keylen,
                              size_t ivlen, const unsigned char*, const unsigned char*, mbedtls_tls_prf_types) {
  Handshake* h = g_stepping;
  if (!h || maclen != 0 || keylen > 32 || ivlen > 12) return 0;  // not an AEAD suite: finish() refuses it
  std::memcpy(h->key_block_.data(), kb, 2 * keylen + 2 * ivlen);
  h->keylen_ = keylen;
  h->ivlen_ = ivlen;
  h->keys_exported_ = true;
  return 0;
}

void Handshake::feed(std::span<const uint8_t> in) { in_.append(in); }

HandshakeStatus Handshake::step() {
  if (status_ != HandshakeStatus::awaiting_peer) return status_;
  g_stepping = this;
  uint64_t tickets_before = tickets_opened();
  int ret = mbedtls_ssl_handshake(ssl_.get());
  if (tickets_opened() != tickets_before) resumed_ = true;
  g_stepping = nullptr;
  if (ret == MBEDTLS_ERR_SSL_WANT_READ || ret == MBEDTLS_ERR_SSL_WANT_WRITE) return status_;
  if (ret != 0) {
    status_ = HandshakeStatus::failed;
    error_ = failure_text(ret);
    // TLS 1.2 (RFC 5246 7.4.6): a server that will not go on without a
    // client certificate answers an empty one with a fatal
    // handshake_failure; mbedTLS 2.28 just stops. Without the alert a
    // client cannot tell this from a server that crashed.
    if (ret == MBEDTLS_ERR_SSL_NO_CLIENT_CERTIFICATE)
      (void)mbedtls_ssl_send_alert_message(ssl_.get(), MBEDTLS_SSL_ALERT_LEVEL_FATAL,
                                           MBEDTLS_SSL_ALERT_MSG_HANDSHAKE_FAILURE);
    return status_;
  }
  const char* suite_name = mbedtls_ssl_get_ciphersuite(ssl_.get());
  peer_.suite_name = suite_name ? suite_name : "";
  Cipher cipher;
  int suite_id = suite_name ? mbedtls_ssl_get_ciphersuite_id(suite_name) : 0;
  if (!keys_exported_ || !cipher_of_suite(uint16_t(suite_id), cipher) || keylen_ != key_length(cipher) ||
      ivlen_ != fixed_iv_length(cipher)) {
    status_ = HandshakeStatus::failed;
    error_ = "negotiated suite is not an allowed AEAD suite";
    return status_;
  }
  if (ctx_.side() == Side::server && ctx_.verifies_client_certs()) {
    const mbedtls_x509_crt* peer = mbedtls_ssl_get_peer_cert(ssl_.get());
    if (peer && mbedtls_ssl_get_verify_result(ssl_.get()) != 0) {
      // VERIFY_OPTIONAL lets a bad certificate through; a presented certificate must verify.
      status_ = HandshakeStatus::failed;
      error_ = "client certificate did not verify";
      return status_;
    }
  }
  if (const mbedtls_x509_crt* peer = mbedtls_ssl_get_peer_cert(ssl_.get())) {
    char subject[256];
    if (mbedtls_x509_dn_gets(subject, sizeof subject, &peer->subject) > 0) peer_.cert_subject = subject;
  }
  const char* alpn = mbedtls_ssl_get_alpn_protocol(ssl_.get());
  peer_.alpn = alpn ? alpn : "";
  peer_.resumed = ctx_.side() == Side::client ? !full_handshake_seen_ : resumed_;
  status_ = HandshakeStatus::done;
  return status_;
}

RecordState Handshake::finish() {
  RecordState st;
  int suite_id = mbedtls_ssl_get_ciphersuite_id(mbedtls_ssl_get_ciphersuite(ssl_.get()));
  st.suite = uint16_t(suite_id);
  st.side = ctx_.side();
  const uint8_t* client_key = key_block_.data();
  const uint8_t* server_key = client_key + keylen_;
  const uint8_t* client_iv = server_key + keylen_;
  const uint8_t* server_iv = client_iv + ivlen_;
  bool server = ctx_.side() == Side::server;
  std::memcpy(st.read.key.data(), server ? client_key : server_key, keylen_);
  std::memcpy(st.write.key.data(), server ? server_key : client_key, keylen_);
  std::memcpy(st.read.iv.data(), server ? client_iv : server_iv, ivlen_);
  std::memcpy(st.write.iv.data(), server ? server_iv : client_iv, ivlen_);
  // The context's own counters: the Finished messages used sequence number 0
  // of the new epoch, so application data normally starts at 1.
  st.read.seq = util::load_u64(ssl_->in_ctr);
  st.write.seq = util::load_u64(ssl_->cur_out_ctr);
  st.partial_input = std::move(in_);
  // The last flight may still be unwritten (or in flight: moving a ByteQueue
  // keeps its chunks where they are).
  st.output = std::move(out_);
  mbedtls_platform_zeroize(key_block_.data(), key_block_.size());
  mbedtls_ssl_free(ssl_.get());
  ssl_.reset();
  return st;
}

void Handshake::save_session(ClientSession& out) {
  if (ssl_ && mbedtls_ssl_get_session(ssl_.get(), out.get()) == 0) out.valid = true;
}

}  // namespace baton::tls
