#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tls/context.h"
#include "tls/dev_certs.h"
#include "tls/handshake.h"
#include "util/bytes.h"

using namespace baton::tls;
namespace fs = std::filesystem;

namespace {

class Certs : public ::testing::Environment {
 public:
  static inline fs::path dir;
  void SetUp() override {
    dir = fs::temp_directory_path() / ("baton-hs-test-" + std::to_string(getpid()));
    DevCertOptions o;
    o.out_dir = dir.string();
    ASSERT_EQ(write_dev_certs(o), "");
  }
  void TearDown() override { fs::remove_all(dir); }
};
const auto* g_env = ::testing::AddGlobalTestEnvironment(new Certs);

std::string p(const char* f) { return (Certs::dir / f).string(); }

std::unique_ptr<Context> server_ctx(std::vector<TicketKey> keys = {}, bool mtls = false, bool require = false) {
  ServerTlsOptions o;
  o.cert_file = p("server.crt");
  o.key_file = p("server.key");
  o.ticket_keys = std::move(keys);
  if (mtls) {
    o.client_ca_file = p("ca.crt");
    o.require_client_cert = require;
  }
  std::string err;
  auto c = Context::make_server(o, err);
  EXPECT_TRUE(c) << err;
  return c;
}

std::unique_ptr<Context> client_ctx(bool with_cert = false) {
  ClientTlsOptions o;
  o.ca_file = p("ca.crt");
  if (with_cert) {
    o.cert_file = p("client.crt");
    o.key_file = p("client.key");
  }
  std::string err;
  auto c = Context::make_client(o, err);
  EXPECT_TRUE(c) << err;
  return c;
}

// Moves bytes between the two handshakes until neither makes progress.
void pump(Handshake& c, Handshake& s) {
  for (int i = 0; i < 50; ++i) {
    HandshakeStatus cs = c.step(), ss = s.step();
    bool moved = false;
    if (!c.output().empty()) {
      s.feed(c.output().to_vector());
      c.output().clear();
      moved = true;
    }
    if (!s.output().empty()) {
      c.feed(s.output().to_vector());
      s.output().clear();
      moved = true;
    }
    if (!moved && cs != HandshakeStatus::awaiting_peer && ss != HandshakeStatus::awaiting_peer) return;
    if (!moved && i > 2) return;
  }
}

std::vector<uint8_t> open_all(RecordLayer& r, std::span<const uint8_t> in) {
  static std::vector<uint8_t> scratch(kScratchSize);
  std::vector<uint8_t> out;
  while (true) {
    Opened o = r.open(in, scratch);
    in = in.subspan(o.used);
    if (o.status != OpenStatus::data) {
      EXPECT_EQ(o.status, OpenStatus::need_more) << o.reason;
      return out;
    }
    out.insert(out.end(), o.plaintext.begin(), o.plaintext.end());
  }
}

}  // namespace

TEST(Handshake, FullHandshakeThenRecordsBothWays) {
  auto sctx = server_ctx();
  auto cctx = client_ctx();
  Handshake s(*sctx);
  Handshake c(*cctx, "localhost");
  pump(c, s);
  ASSERT_EQ(c.step(), HandshakeStatus::done) << c.error();
  ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
  EXPECT_FALSE(s.peer().resumed);
  EXPECT_FALSE(c.peer().resumed);
  EXPECT_EQ(s.peer().suite_name.find("TLS-ECDHE-ECDSA"), 0u) << s.peer().suite_name;
  RecordState cs = c.finish(), ss = s.finish();
  EXPECT_EQ(cs.suite, ss.suite);
  EXPECT_EQ(cs.write.key, ss.read.key);
  EXPECT_EQ(cs.read.key, ss.write.key);
  EXPECT_EQ(cs.write.iv, ss.read.iv);
  // Application data starts at sequence 1 in each direction (Finished was 0).
  EXPECT_EQ(cs.write.seq, 1u);
  EXPECT_EQ(ss.read.seq, 1u);
  EXPECT_EQ(ss.write.seq, 1u);
  EXPECT_TRUE(cs.output.empty());
  RecordLayer cr(std::move(cs)), sr(std::move(ss));
  cr.seal(baton::util::as_bytes("ping"));
  EXPECT_EQ(open_all(sr, cr.output().to_vector()), std::vector<uint8_t>({'p', 'i', 'n', 'g'}));
  sr.seal(baton::util::as_bytes("pong"));
  EXPECT_EQ(open_all(cr, sr.output().to_vector()), std::vector<uint8_t>({'p', 'o', 'n', 'g'}));
}

TEST(Handshake, WrongServerNameFails) {
  auto sctx = server_ctx();
  auto cctx = client_ctx();
  Handshake s(*sctx);
  Handshake c(*cctx, "not-the-server.example");
  pump(c, s);
  EXPECT_EQ(c.step(), HandshakeStatus::failed);
  EXPECT_NE(c.error(), "");
}

// A ticket sealed by one process opens in another that has the same ticket
// key, and data right behind the client's Finished reaches the record layer.
TEST(Handshake, TicketResumesAcrossServersWithSameKey) {
  TicketKey key{};
  key[0] = 42;
  auto s1 = server_ctx({key});
  auto s2 = server_ctx({key});
  auto s3 = server_ctx({TicketKey{}});  // a different key
  auto cctx = client_ctx();
  ClientSession saved;
  {
    Handshake s(*s1), c(*cctx, "localhost");
    pump(c, s);
    ASSERT_EQ(c.step(), HandshakeStatus::done);
    c.save_session(saved);
    ASSERT_TRUE(saved.valid);
  }
  {
    Handshake s(*s2), c(*cctx, "localhost", &saved);
    // Drive the abbreviated handshake, but hold back the client's last flight.
    for (int i = 0; i < 10 && c.step() != HandshakeStatus::done; ++i) {
      s.feed(c.output().to_vector());
      c.output().clear();
      (void)s.step();
      c.feed(s.output().to_vector());
      s.output().clear();
    }
    ASSERT_EQ(c.step(), HandshakeStatus::done) << c.error();
    RecordState cs = c.finish();
    RecordLayer cr(std::move(cs));
    // Client Finished is still in the output; application data goes right behind it.
    cr.seal(baton::util::as_bytes("early"));
    s.feed(cr.output().to_vector());
    ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
    EXPECT_TRUE(s.peer().resumed);
    EXPECT_TRUE(c.peer().resumed);
    RecordState ss = s.finish();
    EXPECT_FALSE(ss.partial_input.empty());
    RecordLayer sr(std::move(ss));
    EXPECT_EQ(open_all(sr, {}), std::vector<uint8_t>({'e', 'a', 'r', 'l', 'y'}));
  }
  {
    Handshake s(*s3), c(*cctx, "localhost", &saved);
    pump(c, s);
    ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
    EXPECT_FALSE(s.peer().resumed);  // unknown key: full handshake, not a failure
  }
}

TEST(Handshake, ClientCertificateRequired) {
  auto sctx = server_ctx({}, true, true);
  {
    auto cctx = client_ctx(false);
    Handshake s(*sctx), c(*cctx, "localhost");
    pump(c, s);
    EXPECT_EQ(s.step(), HandshakeStatus::failed);
  }
  {
    auto cctx = client_ctx(true);
    Handshake s(*sctx), c(*cctx, "localhost");
    pump(c, s);
    ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
    EXPECT_NE(s.peer().cert_subject.find("baton-client"), std::string::npos) << s.peer().cert_subject;
  }
}

TEST(Handshake, OldProtocolVersionIsRefused) {
  auto sctx = server_ctx();
  auto cctx = client_ctx();
  mbedtls_ssl_conf_max_version(cctx->conf(), MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_1);
  mbedtls_ssl_conf_min_version(cctx->conf(), MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_1);
  Handshake s(*sctx), c(*cctx, "localhost");
  pump(c, s);
  EXPECT_EQ(s.step(), HandshakeStatus::failed);
}

TEST(Handshake, NonEcdheSuiteIsRefused) {
  auto sctx = server_ctx();
  auto cctx = client_ctx();
  static const int only_rsa_kx[] = {MBEDTLS_TLS_RSA_WITH_AES_128_GCM_SHA256, 0};
  mbedtls_ssl_conf_ciphersuites(cctx->conf(), only_rsa_kx);
  Handshake s(*sctx), c(*cctx, "localhost");
  pump(c, s);
  EXPECT_EQ(s.step(), HandshakeStatus::failed);
}

TEST(Handshake, GarbageIsAFailureNotACrash) {
  auto sctx = server_ctx();
  Handshake s(*sctx);
  std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  s.feed(baton::util::as_bytes(junk));
  EXPECT_EQ(s.step(), HandshakeStatus::failed);
}

TEST(TicketKeys, FileFormat) {
  fs::path f = Certs::dir / "keys.txt";
  {
    std::ofstream o(f);
    o << "# rotation: newest first\n" << std::string(64, 'a') << "\n\n" << std::string(64, 'B') << "\n";
  }
  std::vector<TicketKey> keys;
  EXPECT_EQ(load_ticket_keys(f.string(), keys), "");
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0][0], 0xaa);
  EXPECT_EQ(keys[1][31], 0xbb);
  {
    std::ofstream o(f);
    o << std::string(64, 'a') << "\nnot-hex\n";
  }
  std::string err = load_ticket_keys(f.string(), keys);
  EXPECT_NE(err.find(":2: expected 64 hex digits"), std::string::npos) << err;
  EXPECT_NE(load_ticket_keys((Certs::dir / "missing").string(), keys), "");
}
