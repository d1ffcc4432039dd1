// Certificate and key files (tls/cert_files.h): what cannot be read is
// refused with a message naming it, and what peers will refuse (expired,
// not yet valid, weak keys, SHA-1) is found, with any clock.
#include "tls/cert_files.h"

#include <gtest/gtest.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/rsa.h>
#include <mbedtls/x509_crt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "tls/context.h"
#include "tls/dev_certs.h"

using namespace baton::tls;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "baton-cert-files-XXXXXX").string();
    if (char* p = ::mkdtemp(tmpl.data())) path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Rng {
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  Rng() {
    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);
    EXPECT_EQ(mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, nullptr, 0), 0);
  }
  ~Rng() {
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
  }
};

struct Key {
  mbedtls_pk_context pk;
  Key() { mbedtls_pk_init(&pk); }
  ~Key() { mbedtls_pk_free(&pk); }
};

std::unique_ptr<Key> ec_key(Rng& rng, mbedtls_ecp_group_id grp) {
  auto k = std::make_unique<Key>();
  EXPECT_EQ(mbedtls_pk_setup(&k->pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)), 0);
  EXPECT_EQ(mbedtls_ecp_gen_key(grp, mbedtls_pk_ec(k->pk), mbedtls_ctr_drbg_random, &rng.drbg), 0);
  return k;
}

std::unique_ptr<Key> rsa_key(Rng& rng, unsigned bits) {
  auto k = std::make_unique<Key>();
  EXPECT_EQ(mbedtls_pk_setup(&k->pk, mbedtls_pk_info_from_type(MBEDTLS_PK_RSA)), 0);
  EXPECT_EQ(mbedtls_rsa_gen_key(mbedtls_pk_rsa(k->pk), mbedtls_ctr_drbg_random, &rng.drbg, bits, 65537), 0);
  return k;
}

// A PEM certificate for `subject` (its key `key`) signed by `issuer_key` as `issuer`.
std::string make_cert(Rng& rng, Key& key, const char* subject, Key& issuer_key, const char* issuer,
                      mbedtls_md_type_t md, const char* not_before, const char* not_after) {
  mbedtls_x509write_cert w;
  mbedtls_x509write_crt_init(&w);
  mbedtls_x509write_crt_set_version(&w, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(&w, md);
  mbedtls_x509write_crt_set_subject_key(&w, &key.pk);
  mbedtls_x509write_crt_set_issuer_key(&w, &issuer_key.pk);
  EXPECT_EQ(mbedtls_x509write_crt_set_subject_name(&w, subject), 0);
  EXPECT_EQ(mbedtls_x509write_crt_set_issuer_name(&w, issuer), 0);
  mbedtls_mpi serial;
  mbedtls_mpi_init(&serial);
  mbedtls_mpi_lset(&serial, 7);
  EXPECT_EQ(mbedtls_x509write_crt_set_serial(&w, &serial), 0);
  mbedtls_mpi_free(&serial);
  EXPECT_EQ(mbedtls_x509write_crt_set_validity(&w, not_before, not_after), 0);
  std::vector<unsigned char> buf(8192);
  EXPECT_EQ(mbedtls_x509write_crt_pem(&w, buf.data(), buf.size(), mbedtls_ctr_drbg_random, &rng.drbg), 0);
  mbedtls_x509write_crt_free(&w);
  return std::string(reinterpret_cast<const char*>(buf.data()));
}

struct Chain {
  mbedtls_x509_crt crt;
  Chain() { mbedtls_x509_crt_init(&crt); }
  explicit Chain(const std::string& pem) : Chain() { add(pem); }
  ~Chain() { mbedtls_x509_crt_free(&crt); }
  void add(const std::string& pem) {
    ASSERT_EQ(mbedtls_x509_crt_parse(&crt, reinterpret_cast<const unsigned char*>(pem.c_str()), pem.size() + 1), 0);
  }
};

// 2024-01-01 00:00:00 UTC and 2025-01-01 00:00:00 UTC.
constexpr int64_t k2024 = 1704067200;
constexpr int64_t k2025 = 1735689600;

bool any_contains(const std::vector<std::string>& v, const std::string& part) {
  for (const std::string& s : v)
    if (s.find(part) != std::string::npos) return true;
  return false;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += x + "\n";
  return s;
}

}  // namespace

TEST(CertFiles, UnixTimeAndText) {
  mbedtls_x509_time t{2024, 1, 1, 0, 0, 0};
  EXPECT_EQ(unix_time(t), k2024);
  t = {2020, 2, 29, 12, 30, 15};
  EXPECT_EQ(unix_time(t), 1582979415);
  EXPECT_EQ(utc_text(k2025), "2025-01-01 00:00:00 UTC");
}

TEST(CertFiles, ValidCertificateHasNoProblems) {
  Rng rng;
  auto k = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  Chain c(make_cert(rng, *k, "CN=ok", *k, "CN=ok", MBEDTLS_MD_SHA256, "20240101000000", "20250101000000"));
  EXPECT_TRUE(certificate_problems(&c.crt, k2024 + 86400, CertUse::own_chain).empty());
  EXPECT_TRUE(certificate_problems(&c.crt, k2024 + 86400, CertUse::trust, 14 * 86400).empty());
  EXPECT_EQ(earliest_not_after(&c.crt), k2025);
}

TEST(CertFiles, ExpiredNotYetValidAndSoon) {
  Rng rng;
  auto k = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  Chain c(make_cert(rng, *k, "CN=server", *k, "CN=server", MBEDTLS_MD_SHA256, "20240101000000", "20250101000000"));
  auto p = certificate_problems(&c.crt, k2025 + 1, CertUse::own_chain);
  ASSERT_EQ(p.size(), 1u) << joined(p);
  EXPECT_EQ(p[0], "certificate \"CN=server\" expired on 2025-01-01 00:00:00 UTC: TLS peers, baton among them, refuse it");
  p = certificate_problems(&c.crt, k2024 - 1, CertUse::own_chain);
  ASSERT_EQ(p.size(), 1u) << joined(p);
  EXPECT_TRUE(any_contains(p, "is not valid before 2024-01-01 00:00:00 UTC")) << joined(p);
  p = certificate_problems(&c.crt, k2025 - 3 * 86400, CertUse::own_chain, 14 * 86400);
  ASSERT_EQ(p.size(), 1u) << joined(p);
  EXPECT_TRUE(any_contains(p, "expires on 2025-01-01 00:00:00 UTC, in 3 days")) << joined(p);
  p = certificate_problems(&c.crt, k2025 + 1, CertUse::trust);
  EXPECT_TRUE(any_contains(p, "peer certificates that chain to it are refused")) << joined(p);
}

TEST(CertFiles, WeakKeysAndSignatures) {
  Rng rng;
  auto ca = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  auto rsa1024 = rsa_key(rng, 1024);
  auto p192 = ec_key(rng, MBEDTLS_ECP_DP_SECP192R1);
  auto good = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  Chain chain;
  chain.add(make_cert(rng, *rsa1024, "CN=rsa", *ca, "CN=ca", MBEDTLS_MD_SHA256, "20240101000000", "20250101000000"));
  chain.add(make_cert(rng, *p192, "CN=p192", *ca, "CN=ca", MBEDTLS_MD_SHA256, "20240101000000", "20250101000000"));
  chain.add(make_cert(rng, *good, "CN=sha1", *ca, "CN=ca", MBEDTLS_MD_SHA1, "20240101000000", "20250101000000"));
  // Self-signed with SHA-1: a trust anchor's own signature is never checked.
  chain.add(make_cert(rng, *ca, "CN=ca", *ca, "CN=ca", MBEDTLS_MD_SHA1, "20240101000000", "20250101000000"));
  auto p = certificate_problems(&chain.crt, k2024 + 86400, CertUse::own_chain);
  ASSERT_EQ(p.size(), 3u) << joined(p);
  EXPECT_TRUE(any_contains(p, "certificate \"CN=rsa\" has a weak key: RSA with 1024 bits (at least 2048 needed)"))
      << joined(p);
  EXPECT_TRUE(any_contains(p, "certificate \"CN=p192\" has a weak key: EC on secp192r1, a 192-bit curve")) << joined(p);
  EXPECT_TRUE(any_contains(p, "certificate \"CN=sha1\" is signed with SHA-1")) << joined(p);
  EXPECT_FALSE(any_contains(p, "CN=ca")) << joined(p);
}

TEST(CertFiles, EarliestNotAfterOfAChain) {
  Rng rng;
  auto k = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  Chain chain;
  chain.add(make_cert(rng, *k, "CN=a", *k, "CN=a", MBEDTLS_MD_SHA256, "20240101000000", "20300101000000"));
  chain.add(make_cert(rng, *k, "CN=b", *k, "CN=b", MBEDTLS_MD_SHA256, "20240101000000", "20250101000000"));
  EXPECT_EQ(earliest_not_after(&chain.crt), k2025);
  Chain empty;
  EXPECT_EQ(earliest_not_after(&empty.crt), 0);
  EXPECT_TRUE(certificate_problems(&empty.crt, k2024, CertUse::own_chain).empty());
}

// The crash of issue 17 item 8: a directory as tls.cert reached
// mbedtls_pk_load_file, which asked malloc for SIZE_MAX + 1 bytes.
TEST(CertFiles, DirectoryFifoEmptyAndMissingAreRefusedByName) {
  TempDir d;
  mbedtls_x509_crt crt;
  mbedtls_x509_crt_init(&crt);
  FileRef dir{d.path(), "baton.yaml:4:9: tls.cert", "the server certificate chain"};
  EXPECT_EQ(load_certificates(&crt, dir),
            "baton.yaml:4:9: tls.cert: " + d.path() + ": is a directory, not a file (expected the server certificate chain, PEM)");
  ASSERT_EQ(::mkfifo((d / "fifo").c_str(), 0600), 0);
  FileRef fifo{d / "fifo", "", "the server certificate chain"};
  EXPECT_EQ(load_certificates(&crt, fifo),
            d / "fifo" + ": is a FIFO, not a regular file (expected the server certificate chain, PEM)");
  std::ofstream(d / "empty");
  FileRef empty{d / "empty", "", "the client certificate"};
  EXPECT_EQ(load_certificates(&crt, empty), d / "empty" + ": is empty (expected the client certificate, PEM)");
  std::ofstream(d / "junk") << "not a certificate";
  FileRef junk{d / "junk", "", "the client certificate"};
  EXPECT_EQ(load_certificates(&crt, junk).rfind(d / "junk" + ": cannot load the client certificate: ", 0), 0u);
  mbedtls_x509_crt_free(&crt);

  mbedtls_pk_context key;
  mbedtls_pk_init(&key);
  FileRef keydir{d.path(), "baton.yaml:5:8: tls.key", "the server private key"};
  EXPECT_EQ(load_private_key(&key, keydir),
            "baton.yaml:5:8: tls.key: " + d.path() + ": is a directory, not a file (expected the server private key, PEM)");
  mbedtls_pk_free(&key);
}

TEST(CertFiles, ContextNamesTheOriginAndWarns) {
  TempDir d;
  DevCertOptions o;
  o.out_dir = d / "certs";
  ASSERT_EQ(write_dev_certs(o), "");
  ServerTlsOptions so;
  so.cert_file = d.path();  // a directory
  so.cert_origin = "baton.yaml:4:9: tls.cert";
  so.key_file = d / "certs/server.key";
  std::string error;
  EXPECT_EQ(Context::make_server(so, error), nullptr);
  EXPECT_EQ(error.rfind("baton.yaml:4:9: tls.cert: " + d.path() + ": is a directory", 0), 0u) << error;

  so.cert_file = d / "certs/server.crt";
  so.client_ca_file = d / "certs/ca.crt";
  auto ctx = Context::make_server(so, error);
  ASSERT_TRUE(ctx) << error;
  EXPECT_TRUE(ctx->warnings().empty()) << joined(ctx->warnings());
  ASSERT_EQ(ctx->expiries().size(), 2u);
  EXPECT_EQ(ctx->expiries()[0].cert, "server");
  EXPECT_EQ(ctx->expiries()[1].cert, "client_ca");
  const int64_t in_a_year = int64_t(::time(nullptr)) + 365 * 86400;
  EXPECT_NEAR(double(ctx->expiries()[0].not_after), double(in_a_year), 7200.0);

  ClientTlsOptions co;
  co.ca_file = d / "certs";  // a directory
  EXPECT_EQ(Context::make_client(co, error), nullptr);
  EXPECT_NE(error.find(": is a directory"), std::string::npos) << error;
  co.ca_file = d / "certs/ca.crt";
  co.cert_file = d / "certs";
  co.key_file = d / "certs/client.key";
  EXPECT_EQ(Context::make_client(co, error), nullptr);
  EXPECT_EQ(error.rfind(d / "certs" + ": is a directory, not a file (expected the client certificate, PEM)", 0), 0u)
      << error;
}

TEST(CertFiles, ContextWarnsAboutAnExpiredServerCertificate) {
  TempDir d;
  Rng rng;
  auto k = ec_key(rng, MBEDTLS_ECP_DP_SECP256R1);
  std::ofstream(d / "old.crt") << make_cert(rng, *k, "CN=localhost", *k, "CN=localhost", MBEDTLS_MD_SHA256,
                                            "20190101000000", "20200201000000");
  std::vector<unsigned char> der(4096);
  int n = mbedtls_pk_write_key_pem(&k->pk, der.data(), der.size());
  ASSERT_EQ(n, 0);
  std::ofstream(d / "old.key") << reinterpret_cast<const char*>(der.data());
  ServerTlsOptions so;
  so.cert_file = d / "old.crt";
  so.cert_origin = "b.yaml:4:9: tls.cert";
  so.key_file = d / "old.key";
  std::string error;
  auto ctx = Context::make_server(so, error);
  ASSERT_TRUE(ctx) << error;  // a warning, not an error: a hot restart must not fail on it
  ASSERT_EQ(ctx->warnings().size(), 1u) << joined(ctx->warnings());
  EXPECT_EQ(ctx->warnings()[0], "b.yaml:4:9: tls.cert: " + d / "old.crt" +
                                    ": certificate \"CN=localhost\" expired on 2020-02-01 00:00:00 UTC: TLS peers, "
                                    "baton among them, refuse it");
  ASSERT_EQ(ctx->expiries().size(), 1u);
  EXPECT_EQ(ctx->expiries()[0].not_after, 1580515200);
}
