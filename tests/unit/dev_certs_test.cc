#include "tls/dev_certs.h"

#include <gtest/gtest.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tls/ticket.h"

namespace fs = std::filesystem;
using baton::tls::DevCertOptions;
using baton::tls::write_dev_certs;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "baton-dev-certs-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (p) path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Crt {
  mbedtls_x509_crt c;
  Crt() { mbedtls_x509_crt_init(&c); }
  ~Crt() { mbedtls_x509_crt_free(&c); }
};

struct Pk {
  mbedtls_pk_context k;
  Pk() { mbedtls_pk_init(&k); }
  ~Pk() { mbedtls_pk_free(&k); }
};

mode_t mode_of(const std::string& p) {
  struct stat st{};
  if (::stat(p.c_str(), &st) != 0) return 0;
  return st.st_mode & 07777;
}

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool raw_contains(const mbedtls_x509_crt& c, const std::vector<unsigned char>& needle) {
  const unsigned char* b = c.raw.p;
  const unsigned char* e = c.raw.p + c.raw.len;
  return std::search(b, e, needle.begin(), needle.end()) != e;
}

std::string serial_of(const mbedtls_x509_crt& c) { return std::string(reinterpret_cast<const char*>(c.serial.p), c.serial.len); }

// Generates once per test into a fresh directory below the temp dir, so that
// "created if missing" is exercised too.
class DevCertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    dir_ = tmp_.path() + "/certs";
    DevCertOptions o;
    o.out_dir = dir_;
    ASSERT_EQ(write_dev_certs(o), "");
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&ca_.c, f("ca.crt").c_str()), 0);
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&server_.c, f("server.crt").c_str()), 0);
    ASSERT_EQ(mbedtls_x509_crt_parse_file(&client_.c, f("client.crt").c_str()), 0);
  }
  std::string f(const char* name) const { return dir_ + "/" + name; }

  TempDir tmp_;
  std::string dir_;
  Crt ca_, server_, client_;
};

TEST_F(DevCertsTest, WritesEveryFileWithTheRightModes) {
  EXPECT_EQ(mode_of(dir_), 0700u);
  for (const char* k : {"ca.key", "server.key", "client.key", "ticket.key"}) EXPECT_EQ(mode_of(f(k)), 0600u) << k;
  for (const char* c : {"ca.crt", "server.crt", "client.crt"}) EXPECT_EQ(mode_of(f(c)), 0644u) << c;
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_NE(e.path().extension(), ".tmp") << "temporary file left behind: " << e.path();
}

TEST_F(DevCertsTest, CaIsACaWithCertSignUsage) {
  EXPECT_EQ(ca_.c.version, 3);
  EXPECT_EQ(ca_.c.ca_istrue, 1);
  EXPECT_EQ(mbedtls_x509_crt_check_key_usage(&ca_.c, MBEDTLS_X509_KU_KEY_CERT_SIGN), 0);
  EXPECT_EQ(mbedtls_x509_crt_check_key_usage(&ca_.c, MBEDTLS_X509_KU_CRL_SIGN), 0);
  EXPECT_EQ(mbedtls_pk_get_type(&ca_.c.pk), MBEDTLS_PK_ECKEY);
  EXPECT_EQ(mbedtls_pk_get_bitlen(&ca_.c.pk), 256u);
  // Self-signed: verifies against itself.
  uint32_t flags = 0;
  EXPECT_EQ(mbedtls_x509_crt_verify(&ca_.c, &ca_.c, nullptr, nullptr, &flags, nullptr, nullptr), 0) << flags;
}

TEST_F(DevCertsTest, ServerCertChainsToCaForLocalhost) {
  uint32_t flags = 0;
  EXPECT_EQ(mbedtls_x509_crt_verify(&server_.c, &ca_.c, nullptr, "localhost", &flags, nullptr, nullptr), 0) << flags;
  EXPECT_EQ(flags, 0u);
  EXPECT_EQ(server_.c.ca_istrue, 0);
  EXPECT_EQ(mbedtls_x509_crt_check_key_usage(&server_.c, MBEDTLS_X509_KU_DIGITAL_SIGNATURE), 0);
  EXPECT_NE(mbedtls_x509_crt_check_key_usage(&server_.c, MBEDTLS_X509_KU_KEY_CERT_SIGN), 0);
  EXPECT_EQ(mbedtls_x509_crt_check_extended_key_usage(&server_.c, MBEDTLS_OID_SERVER_AUTH,
                                                      MBEDTLS_OID_SIZE(MBEDTLS_OID_SERVER_AUTH)),
            0);
  EXPECT_NE(mbedtls_x509_crt_check_extended_key_usage(&server_.c, MBEDTLS_OID_CLIENT_AUTH,
                                                      MBEDTLS_OID_SIZE(MBEDTLS_OID_CLIENT_AUTH)),
            0);
}

TEST_F(DevCertsTest, ServerCertRejectsOtherNames) {
  uint32_t flags = 0;
  EXPECT_NE(mbedtls_x509_crt_verify(&server_.c, &ca_.c, nullptr, "example.com", &flags, nullptr, nullptr), 0);
  EXPECT_TRUE(flags & MBEDTLS_X509_BADCERT_CN_MISMATCH);
}

TEST_F(DevCertsTest, ServerSanHoldsDnsNameAndIps) {
  bool found_dns = false;
  for (const mbedtls_x509_sequence* s = &server_.c.subject_alt_names; s; s = s->next) {
    if (s->buf.tag == (MBEDTLS_ASN1_CONTEXT_SPECIFIC | 2) &&
        std::string(reinterpret_cast<const char*>(s->buf.p), s->buf.len) == "localhost")
      found_dns = true;
  }
  EXPECT_TRUE(found_dns);
  // iPAddress [7] OCTET STRING: tag 0x87, length, address bytes.
  EXPECT_TRUE(raw_contains(server_.c, {0x87, 0x04, 127, 0, 0, 1}));
  std::vector<unsigned char> v6{0x87, 0x10};
  v6.insert(v6.end(), 15, 0);
  v6.push_back(1);
  EXPECT_TRUE(raw_contains(server_.c, v6));
}

TEST_F(DevCertsTest, ClientCertChainsToCaWithClientAuth) {
  uint32_t flags = 0;
  EXPECT_EQ(mbedtls_x509_crt_verify(&client_.c, &ca_.c, nullptr, nullptr, &flags, nullptr, nullptr), 0) << flags;
  EXPECT_EQ(mbedtls_x509_crt_check_extended_key_usage(&client_.c, MBEDTLS_OID_CLIENT_AUTH,
                                                      MBEDTLS_OID_SIZE(MBEDTLS_OID_CLIENT_AUTH)),
            0);
  EXPECT_NE(mbedtls_x509_crt_check_extended_key_usage(&client_.c, MBEDTLS_OID_SERVER_AUTH,
                                                      MBEDTLS_OID_SIZE(MBEDTLS_OID_SERVER_AUTH)),
            0);
  char dn[256];
  ASSERT_GT(mbedtls_x509_dn_gets(dn, sizeof dn, &client_.c.subject), 0);
  EXPECT_NE(std::string(dn).find("CN=baton-client"), std::string::npos) << dn;
}

TEST_F(DevCertsTest, KeysParseAndMatchCertificates) {
  const std::pair<const char*, mbedtls_x509_crt*> pairs[] = {
      {"ca.key", &ca_.c}, {"server.key", &server_.c}, {"client.key", &client_.c}};
  for (const auto& [name, crt] : pairs) {
    Pk key;
    ASSERT_EQ(mbedtls_pk_parse_keyfile(&key.k, f(name).c_str(), nullptr), 0) << name;
    EXPECT_EQ(mbedtls_pk_get_type(&key.k), MBEDTLS_PK_ECKEY) << name;
    EXPECT_EQ(mbedtls_pk_check_pair(&crt->pk, &key.k), 0) << name;
  }
  Pk server_key;
  ASSERT_EQ(mbedtls_pk_parse_keyfile(&server_key.k, f("server.key").c_str(), nullptr), 0);
  EXPECT_NE(mbedtls_pk_check_pair(&client_.c.pk, &server_key.k), 0);
}

TEST_F(DevCertsTest, ValidNowAndSerialsDiffer) {
  for (const mbedtls_x509_crt* c : {&ca_.c, &server_.c, &client_.c}) {
    EXPECT_EQ(mbedtls_x509_time_is_future(&c->valid_from), 0);
    EXPECT_EQ(mbedtls_x509_time_is_past(&c->valid_to), 0);
    EXPECT_GE(c->valid_to.year, c->valid_from.year + 1);
  }
  EXPECT_NE(serial_of(ca_.c), serial_of(server_.c));
  EXPECT_NE(serial_of(server_.c), serial_of(client_.c));
  EXPECT_GE(server_.c.serial.len, 15u);
}

TEST_F(DevCertsTest, TicketKeyIs64HexAndLoads) {
  std::string t = slurp(f("ticket.key"));
  ASSERT_EQ(t.size(), 65u);
  EXPECT_EQ(t.back(), '\n');
  for (size_t i = 0; i < 64; ++i) EXPECT_TRUE(std::isxdigit(static_cast<unsigned char>(t[i]))) << i;
  std::vector<baton::tls::TicketKey> keys;
  EXPECT_EQ(baton::tls::load_ticket_keys(f("ticket.key"), keys), "");
  EXPECT_EQ(keys.size(), 1u);
}

TEST_F(DevCertsTest, RegeneratingReplacesEverything) {
  std::string old_ca = slurp(f("ca.crt"));
  std::string old_ticket = slurp(f("ticket.key"));
  DevCertOptions o;
  o.out_dir = dir_;
  ASSERT_EQ(write_dev_certs(o), "");
  EXPECT_NE(slurp(f("ca.crt")), old_ca);
  EXPECT_NE(slurp(f("ticket.key")), old_ticket);
  EXPECT_EQ(mode_of(f("server.key")), 0600u);
}

TEST(DevCerts, CustomNamesAndIps) {
  TempDir tmp;
  DevCertOptions o;
  o.out_dir = tmp.path();
  o.server_names = {"baton.example", "*.baton.example"};
  o.server_ips = {"10.1.2.3"};
  o.client_name = "fleet-7";
  o.valid_days = 2;
  ASSERT_EQ(write_dev_certs(o), "");
  Crt ca, server;
  ASSERT_EQ(mbedtls_x509_crt_parse_file(&ca.c, (tmp.path() + "/ca.crt").c_str()), 0);
  ASSERT_EQ(mbedtls_x509_crt_parse_file(&server.c, (tmp.path() + "/server.crt").c_str()), 0);
  uint32_t flags = 0;
  EXPECT_EQ(mbedtls_x509_crt_verify(&server.c, &ca.c, nullptr, "baton.example", &flags, nullptr, nullptr), 0);
  EXPECT_EQ(mbedtls_x509_crt_verify(&server.c, &ca.c, nullptr, "pod.baton.example", &flags, nullptr, nullptr), 0);
  EXPECT_NE(mbedtls_x509_crt_verify(&server.c, &ca.c, nullptr, "localhost", &flags, nullptr, nullptr), 0);
  EXPECT_TRUE(raw_contains(server.c, {0x87, 0x04, 10, 1, 2, 3}));
  EXPECT_FALSE(raw_contains(server.c, {0x87, 0x04, 127, 0, 0, 1}));
}

TEST(DevCerts, ReportsBadInput) {
  TempDir tmp;
  DevCertOptions o;
  o.out_dir = tmp.path();
  o.server_ips = {"127.0.0.300"};
  EXPECT_NE(write_dev_certs(o).find("127.0.0.300"), std::string::npos);

  o = DevCertOptions{};
  o.out_dir = tmp.path();
  o.client_name = "a,b=c";
  EXPECT_NE(write_dev_certs(o), "");

  o = DevCertOptions{};
  o.out_dir = tmp.path();
  o.valid_days = 0;
  EXPECT_NE(write_dev_certs(o), "");

  o = DevCertOptions{};
  o.out_dir = tmp.path();
  o.server_names.clear();
  o.server_ips.clear();
  EXPECT_NE(write_dev_certs(o), "");

  // out_dir is a regular file.
  std::ofstream(tmp.path() + "/file") << "x";
  o = DevCertOptions{};
  o.out_dir = tmp.path() + "/file";
  EXPECT_NE(write_dev_certs(o).find("not a directory"), std::string::npos);

  o = DevCertOptions{};
  EXPECT_NE(write_dev_certs(o), "");
}

}  // namespace
