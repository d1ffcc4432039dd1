#include "tls/cert_names.h"

#include <gtest/gtest.h>
#include <mbedtls/x509_crt.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tls/dev_certs.h"

using namespace baton::tls;
namespace fs = std::filesystem;

namespace {

struct Crt {
  mbedtls_x509_crt c;
  Crt() { mbedtls_x509_crt_init(&c); }
  ~Crt() { mbedtls_x509_crt_free(&c); }
};

// Certificates from tls/dev_certs: the defaults (DNS localhost, IP 127.0.0.1
// and ::1) and a set with wildcards, other addresses and a DNS name that
// looks like an IP address.
class CertNames : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("baton-cert-names-" + std::to_string(getpid()));
    DevCertOptions d;
    d.out_dir = (dir_ / "default").string();
    ASSERT_EQ(write_dev_certs(d), "");
    DevCertOptions o;
    o.out_dir = (dir_ / "other").string();
    o.server_names = {"baton.example", "*.pods.baton.example", "127.0.0.9"};
    o.server_ips = {"10.1.2.3", "fd00::7"};
    ASSERT_EQ(write_dev_certs(o), "");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }
  void SetUp() override {
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&def_.c, (dir_ / "default/server.crt").c_str()), 0);
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&other_.c, (dir_ / "other/server.crt").c_str()), 0);
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&ca_.c, (dir_ / "default/ca.crt").c_str()), 0);
  }
  // mbedTLS's verdict on a DNS name (chain checked against the CA that signed it).
  static bool mbedtls_names(const mbedtls_x509_crt& crt, const fs::path& ca_file, const std::string& name) {
    Crt ca;
    EXPECT_EQ(mbedtls_x509_crt_parse_file(&ca.c, ca_file.c_str()), 0);
    uint32_t flags = 0;
    (void)mbedtls_x509_crt_verify(const_cast<mbedtls_x509_crt*>(&crt), &ca.c, nullptr, name.c_str(), &flags, nullptr,
                                  nullptr);
    return !(flags & MBEDTLS_X509_BADCERT_CN_MISMATCH);
  }

  static inline fs::path dir_;
  Crt def_, other_, ca_;
};

}  // namespace

TEST(IpLiteral, ParsesBothFamiliesOnly) {
  EXPECT_EQ(ip_literal_bytes("127.0.0.1"), (std::vector<uint8_t>{127, 0, 0, 1}));
  std::vector<uint8_t> v6_loopback(16, 0);
  v6_loopback[15] = 1;
  EXPECT_EQ(ip_literal_bytes("::1"), v6_loopback);
  EXPECT_EQ(ip_literal_bytes("[::1]"), v6_loopback);
  EXPECT_EQ(ip_literal_bytes("0:0:0:0:0:0:0:1"), v6_loopback);
  EXPECT_EQ(ip_literal_bytes("fe80::1%eth0").size(), 16u);
  for (const char* not_ip : {"", "localhost", "127.1", "127.0.0.256", "1.2.3.4.example", "[127.0.0.1", "::g", "[]"})
    EXPECT_FALSE(is_ip_literal(not_ip)) << not_ip;
}

TEST_F(CertNames, IpLiteralMatchesIpAddressNames) {
  EXPECT_TRUE(cert_names(def_.c, "127.0.0.1"));
  EXPECT_TRUE(cert_names(def_.c, "::1"));
  EXPECT_TRUE(cert_names(def_.c, "[::1]"));
  EXPECT_TRUE(cert_names(def_.c, "0:0:0:0:0:0:0:1"));
  EXPECT_FALSE(cert_names(def_.c, "127.0.0.2"));
  EXPECT_FALSE(cert_names(def_.c, "10.0.0.1"));
  EXPECT_FALSE(cert_names(def_.c, "::2"));
  EXPECT_TRUE(cert_names(other_.c, "10.1.2.3"));
  EXPECT_TRUE(cert_names(other_.c, "fd00:0::7"));
  EXPECT_FALSE(cert_names(other_.c, "127.0.0.1"));
  // An IPv4 address is not its IPv4-mapped IPv6 form.
  EXPECT_FALSE(cert_names(other_.c, "::ffff:10.1.2.3"));
}

TEST_F(CertNames, IpLiteralNeverMatchesDnsNameOrCn) {
  // "127.0.0.9" is in other's certificate as a dNSName only (RFC 6125 6.2:
  // an IP address is matched against iPAddress names alone).
  EXPECT_FALSE(cert_names(other_.c, "127.0.0.9"));
}

TEST_F(CertNames, DnsNamesAndWildcards) {
  EXPECT_TRUE(cert_names(def_.c, "localhost"));
  EXPECT_TRUE(cert_names(def_.c, "LocalHost"));
  EXPECT_FALSE(cert_names(def_.c, "localhost.example"));
  EXPECT_FALSE(cert_names(def_.c, ""));
  EXPECT_TRUE(cert_names(other_.c, "baton.example"));
  EXPECT_TRUE(cert_names(other_.c, "a.pods.baton.example"));
  EXPECT_TRUE(cert_names(other_.c, "A.PODS.Baton.Example"));
  EXPECT_FALSE(cert_names(other_.c, "pods.baton.example"));
  EXPECT_FALSE(cert_names(other_.c, "a.b.pods.baton.example"));
  EXPECT_FALSE(cert_names(other_.c, ".pods.baton.example"));
  EXPECT_FALSE(cert_names(other_.c, "x.baton.example"));
}

// For DNS names mbedTLS decides in the handshake and these functions only
// explain: both must agree, or the error would contradict the refusal.
TEST_F(CertNames, DnsVerdictAgreesWithMbedtls) {
  for (const char* n : {"baton.example", "BATON.example", "a.pods.baton.example", "pods.baton.example",
                        "a.b.pods.baton.example", "x.baton.example", "localhost", "example"})
    EXPECT_EQ(cert_names(other_.c, n), mbedtls_names(other_.c, dir_ / "other/ca.crt", n)) << n;
  for (const char* n : {"localhost", "LOCALHOST", "localhost.", "host"})
    EXPECT_EQ(cert_names(def_.c, n), mbedtls_names(def_.c, dir_ / "default/ca.crt", n)) << n;
}

TEST_F(CertNames, CnOnlyWithoutSubjectAltNames) {
  // The dev CA has no SubjectAltName extension: its CN is its name.
  EXPECT_TRUE(cert_names(ca_.c, "baton dev CA"));
  EXPECT_FALSE(cert_names(ca_.c, "baton"));
  EXPECT_EQ(describe_cert_names(ca_.c), "CN baton dev CA");
}

TEST_F(CertNames, DescribeAndMismatchErrorListEveryName) {
  EXPECT_EQ(describe_cert_names(def_.c), "DNS localhost, IP 127.0.0.1, IP ::1");
  EXPECT_EQ(describe_cert_names(other_.c),
            "DNS baton.example, DNS *.pods.baton.example, DNS 127.0.0.9, IP 10.1.2.3, IP fd00::7");
  EXPECT_EQ(name_mismatch_error(def_.c, "127.0.0.2"),
            "server certificate does not name 127.0.0.2 (it names DNS localhost, IP 127.0.0.1, IP ::1)");
}
