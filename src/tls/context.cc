#include "tls/context.h"

#include "tls/record.h"

#include <algorithm>
#include <ctime>

#include "tls/cert_files.h"

#include <mbedtls/error.h>

#include <array>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace baton::tls {

std::string mbedtls_error_text(int code) {
  char buf[160];
  mbedtls_strerror(code, buf, sizeof buf);
  return std::string(buf) + " (-0x" + [&] {
    char h[16];
    snprintf(h, sizeof h, "%04x", unsigned(-code));
    return std::string(h);
  }() + ")";
}

namespace {
// Server preference order (mbedTLS servers pick by their own order). The
// record layer runs on OpenSSL (tls/record.h): with AES and carry-less
// multiply instructions its AES-GCM is the fastest suite (5.3 GB/s sealing
// 16 KiB records on one x86-64 core, ChaCha20-Poly1305 4.5, aead_bench);
// without them ChaCha20-Poly1305 is, by far, so it goes first.
const int kSuitesAesFirst[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,  MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,  MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    0};
const int kSuitesChachaFirst[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,  MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,  MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    0};

bool aes_in_hardware() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul");
#elif defined(__aarch64__)
  unsigned long hw = getauxval(AT_HWCAP);
  return (hw & HWCAP_AES) && (hw & HWCAP_PMULL);
#else
  return false;
#endif
}

const mbedtls_ecp_group_id kCurves[] = {MBEDTLS_ECP_DP_CURVE25519, MBEDTLS_ECP_DP_SECP256R1,
                                        // Peer certificates may be signed on P-384.
                                        MBEDTLS_ECP_DP_SECP384R1, MBEDTLS_ECP_DP_NONE};
const char* kAlpn[] = {"baton/1", nullptr};
}  // namespace

Context::Context(Side side) : side_(side) {
  mbedtls_entropy_init(&entropy_);
  mbedtls_ctr_drbg_init(&drbg_);
  mbedtls_ssl_config_init(&conf_);
  mbedtls_x509_crt_init(&cert_);
  mbedtls_pk_init(&key_);
  mbedtls_x509_crt_init(&ca_);
}

Context::~Context() {
  tickets_.reset();
  mbedtls_ssl_config_free(&conf_);
  mbedtls_x509_crt_free(&cert_);
  mbedtls_pk_free(&key_);
  mbedtls_x509_crt_free(&ca_);
  mbedtls_ctr_drbg_free(&drbg_);
  mbedtls_entropy_free(&entropy_);
}

std::string Context::init_common() {
  if (std::string e = record_ciphers_ready(); !e.empty()) return e;
  static const char pers[] = "baton";
  int ret = mbedtls_ctr_drbg_seed(&drbg_, mbedtls_entropy_func, &entropy_,
                                  reinterpret_cast<const unsigned char*>(pers), sizeof pers - 1);
  if (ret != 0) return "seeding the random generator: " + mbedtls_error_text(ret);
  ret = mbedtls_ssl_config_defaults(&conf_, side_ == Side::server ? MBEDTLS_SSL_IS_SERVER : MBEDTLS_SSL_IS_CLIENT,
                                    MBEDTLS_SSL_TRANSPORT_STREAM, MBEDTLS_SSL_PRESET_DEFAULT);
  if (ret != 0) return "TLS defaults: " + mbedtls_error_text(ret);
  mbedtls_ssl_conf_rng(&conf_, mbedtls_ctr_drbg_random, &drbg_);
  mbedtls_ssl_conf_min_version(&conf_, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_max_version(&conf_, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_ciphersuites(&conf_, aes_in_hardware() ? kSuitesAesFirst : kSuitesChachaFirst);
  mbedtls_ssl_conf_curves(&conf_, kCurves);
  mbedtls_ssl_conf_renegotiation(&conf_, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
  mbedtls_ssl_conf_legacy_renegotiation(&conf_, MBEDTLS_SSL_LEGACY_NO_RENEGOTIATION);
  ret = mbedtls_ssl_conf_alpn_protocols(&conf_, kAlpn);
  if (ret != 0) return "ALPN: " + mbedtls_error_text(ret);
  return "";
}

namespace {

std::string load_pair(mbedtls_x509_crt* crt, mbedtls_pk_context* key, const FileRef& cert, const FileRef& keyf) {
  if (std::string e = load_certificates(crt, cert); !e.empty()) return e;
  if (std::string e = load_private_key(key, keyf); !e.empty()) return e;
  if (mbedtls_pk_check_pair(&crt->pk, key) != 0)
    return keyf.prefix() + ": the private key does not match the certificate in " + cert.path;
  return "";
}

// Checks the certificates of one file now, and keeps its expiry for the metric.
void check_file(const mbedtls_x509_crt* chain, const FileRef& f, CertUse use, const char* metric_name,
                std::vector<std::string>& warnings, std::vector<CertExpiry>& expiries) {
  for (const std::string& p : certificate_problems(chain, int64_t(::time(nullptr)), use, kCertExpirySoon_s))
    warnings.push_back(f.prefix() + ": " + p);
  expiries.push_back({metric_name, earliest_not_after(chain)});
}

}  // namespace

std::unique_ptr<Context> Context::make_server(const ServerTlsOptions& o, std::string& error) {
  std::unique_ptr<Context> c(new Context(Side::server));
  if (!(error = c->init_common()).empty()) return nullptr;
  const FileRef cert{o.cert_file, o.cert_origin, "the server certificate chain"};
  const FileRef key{o.key_file, o.key_origin, "the server private key"};
  if (!(error = load_pair(&c->cert_, &c->key_, cert, key)).empty()) return nullptr;
  int ret = mbedtls_ssl_conf_own_cert(&c->conf_, &c->cert_, &c->key_);
  if (ret != 0) {
    error = "server certificate: " + mbedtls_error_text(ret);
    return nullptr;
  }
  c->has_own_cert_ = true;
  check_file(&c->cert_, cert, CertUse::own_chain, "server", c->warnings_, c->expiries_);
  if (!o.client_ca_file.empty()) {
    const FileRef ca{o.client_ca_file, o.client_ca_origin, "the CA certificates for client certificates"};
    if (!(error = load_certificates(&c->ca_, ca)).empty()) return nullptr;
    check_file(&c->ca_, ca, CertUse::trust, "client_ca", c->warnings_, c->expiries_);
    mbedtls_ssl_conf_ca_chain(&c->conf_, &c->ca_, nullptr);
    mbedtls_ssl_conf_authmode(&c->conf_, o.require_client_cert ? MBEDTLS_SSL_VERIFY_REQUIRED
                                                               : MBEDTLS_SSL_VERIFY_OPTIONAL);
    c->has_client_ca_ = true;
  } else {
    mbedtls_ssl_conf_authmode(&c->conf_, MBEDTLS_SSL_VERIFY_NONE);
  }
  std::vector<TicketKey> keys = o.ticket_keys;
  for (const TicketKey& k : o.inherited_ticket_keys)
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
  if (keys.empty()) {
    keys.emplace_back();
    (void)mbedtls_ctr_drbg_random(&c->drbg_, keys[0].data(), keys[0].size());
  }
  // Inherited keys pile up across restarts with rotated key files; the
  // oldest ones go (their tickets just mean a full handshake).
  if (keys.size() > kMaxTicketKeys) keys.resize(kMaxTicketKeys);
  c->ticket_keys_ = keys;
  c->tickets_ = std::make_unique<TicketSealer>(keys, o.ticket_lifetime_s, &c->drbg_);
  c->tickets_->install(&c->conf_);
  return c;
}

std::unique_ptr<Context> Context::make_client(const ClientTlsOptions& o, std::string& error) {
  std::unique_ptr<Context> c(new Context(Side::client));
  if (!(error = c->init_common()).empty()) return nullptr;
  const bool system_bundle = o.ca_file.empty();
  const FileRef ca{system_bundle ? "/etc/ssl/certs/ca-certificates.crt" : o.ca_file, o.ca_origin,
                   "the CA certificates that sign the server's certificate"};
  // Some certificates of a bundle may not parse; the rest are usable.
  if (!(error = load_certificates(&c->ca_, ca, true)).empty()) return nullptr;
  if (!system_bundle) check_file(&c->ca_, ca, CertUse::trust, "ca", c->warnings_, c->expiries_);
  mbedtls_ssl_conf_ca_chain(&c->conf_, &c->ca_, nullptr);
  mbedtls_ssl_conf_authmode(&c->conf_, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_session_tickets(&c->conf_, MBEDTLS_SSL_SESSION_TICKETS_ENABLED);
  if (!o.cert_file.empty()) {
    const FileRef cert{o.cert_file, o.cert_origin, "the client certificate"};
    const FileRef key{o.key_file, o.key_origin, "the client private key"};
    if (!(error = load_pair(&c->cert_, &c->key_, cert, key)).empty()) return nullptr;
    int ret = mbedtls_ssl_conf_own_cert(&c->conf_, &c->cert_, &c->key_);
    if (ret != 0) {
      error = "client certificate: " + mbedtls_error_text(ret);
      return nullptr;
    }
    c->has_own_cert_ = true;
    check_file(&c->cert_, cert, CertUse::own_chain, "client", c->warnings_, c->expiries_);
  }
  return c;
}

}  // namespace baton::tls
