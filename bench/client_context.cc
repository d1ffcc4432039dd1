#include "client_context.h"

#include <mbedtls/ssl.h>
#include <mbedtls/ssl_ciphersuites.h>

namespace baton::bench {

namespace {

struct SuiteName {
  const char* name;
  int id;
};

const SuiteName kSuiteNames[] = {
    {"ECDHE-ECDSA-AES128-GCM-SHA256", MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
    {"ECDHE-RSA-AES128-GCM-SHA256", MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
    {"ECDHE-ECDSA-AES256-GCM-SHA384", MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384},
    {"ECDHE-RSA-AES256-GCM-SHA384", MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384},
    {"ECDHE-ECDSA-CHACHA20-POLY1305", MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256},
    {"ECDHE-RSA-CHACHA20-POLY1305", MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256},
};

// mbedTLS keeps pointers to these lists.
int g_suites[2] = {0, 0};
// The chosen group first. mbedTLS checks the server certificate's curve
// against the same list, so P-256 (the certificates of `baton certs`) and
// P-384 stay in it: the servers are configured to pick the chosen group.
mbedtls_ecp_group_id g_groups[4] = {MBEDTLS_ECP_DP_NONE, MBEDTLS_ECP_DP_NONE, MBEDTLS_ECP_DP_NONE,
                                    MBEDTLS_ECP_DP_NONE};

}  // namespace

std::unique_ptr<tls::Context> make_client_context(const std::string& ca_file, const std::string& suite,
                                                  const std::string& group, std::string& error) {
  if (!suite.empty()) {
    g_suites[0] = 0;
    for (const SuiteName& s : kSuiteNames)
      if (suite == s.name) g_suites[0] = s.id;
    if (g_suites[0] == 0) {
      error = "unknown cipher suite \"" + suite + "\" (an ECDHE AEAD suite, OpenSSL's name)";
      return nullptr;
    }
  }
  if (group == "x25519") {
    g_groups[0] = MBEDTLS_ECP_DP_CURVE25519;
    g_groups[1] = MBEDTLS_ECP_DP_SECP256R1;
    g_groups[2] = MBEDTLS_ECP_DP_SECP384R1;
  } else if (group == "p256") {
    g_groups[0] = MBEDTLS_ECP_DP_SECP256R1;
    g_groups[1] = MBEDTLS_ECP_DP_SECP384R1;
  } else if (!group.empty()) {
    error = "unknown group \"" + group + "\" (x25519 or p256)";
    return nullptr;
  }
  tls::ClientTlsOptions o;
  o.ca_file = ca_file;
  std::unique_ptr<tls::Context> ctx = tls::Context::make_client(o, error);
  if (!ctx) return nullptr;
  if (!suite.empty()) mbedtls_ssl_conf_ciphersuites(ctx->conf(), g_suites);
  if (!group.empty()) mbedtls_ssl_conf_curves(ctx->conf(), g_groups);
  return ctx;
}

}  // namespace baton::bench
