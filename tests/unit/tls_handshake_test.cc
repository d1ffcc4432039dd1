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
  EXPECT_EQ(c.error(), "server certificate does not name not-the-server.example (it names DNS localhost, "
                       "IP 127.0.0.1, IP ::1)");
}

namespace {
// Records the SNI each server handshake received ("" when none).
struct SniLog {
  std::vector<std::string> names;
  static int cb(void* p, mbedtls_ssl_context*, const unsigned char* name, size_t len) {
    static_cast<SniLog*>(p)->names.emplace_back(reinterpret_cast<const char*>(name), len);
    return 0;
  }
};
}  // namespace

// mbedTLS 2.28 matches only DNS names; the dev certificate's iPAddress names
// verify through tls/cert_names, and an IP literal is never sent as SNI.
TEST(Handshake, ServerNameThatIsAnIpAddress) {
  auto sctx = server_ctx();
  auto cctx = client_ctx();
  SniLog sni;
  mbedtls_ssl_conf_sni(sctx->conf(), SniLog::cb, &sni);
  for (const char* ip : {"127.0.0.1", "::1", "[::1]"}) {
    Handshake s(*sctx), c(*cctx, ip);
    pump(c, s);
    EXPECT_EQ(c.step(), HandshakeStatus::done) << ip << ": " << c.error();
    EXPECT_EQ(s.step(), HandshakeStatus::done) << ip << ": " << s.error();
  }
  EXPECT_TRUE(sni.names.empty()) << sni.names.front();
  {
    Handshake s(*sctx), c(*cctx, "localhost");
    pump(c, s);
    EXPECT_EQ(c.step(), HandshakeStatus::done) << c.error();
    EXPECT_EQ(sni.names, std::vector<std::string>{"localhost"});
  }
  for (const char* ip : {"127.0.0.2", "10.0.0.1", "::2"}) {
    Handshake s(*sctx), c(*cctx, ip);
    pump(c, s);
    EXPECT_EQ(c.step(), HandshakeStatus::failed) << ip;
    EXPECT_EQ(c.error(), std::string("server certificate does not name ") + ip +
                             " (it names DNS localhost, IP 127.0.0.1, IP ::1)");
    EXPECT_EQ(s.step(), HandshakeStatus::failed) << ip;  // the client's alert
  }
}

// Both problems are named: a certificate from another CA that does not name
// the address either.
TEST(Handshake, UntrustedCertificateIsNamedAsSuch) {
  fs::path other = Certs::dir / "other-ca";
  DevCertOptions o;
  o.out_dir = other.string();
  ASSERT_EQ(write_dev_certs(o), "");
  ClientTlsOptions co;
  co.ca_file = (other / "ca.crt").string();
  std::string err;
  auto cctx = Context::make_client(co, err);
  ASSERT_TRUE(cctx) << err;
  auto sctx = server_ctx();
  {
    Handshake s(*sctx), c(*cctx, "127.0.0.1");
    pump(c, s);
    EXPECT_EQ(c.step(), HandshakeStatus::failed);
    EXPECT_EQ(c.error().find("server certificate did not verify: "), 0u) << c.error();
    EXPECT_NE(c.error().find("not correctly signed by the trusted CA"), std::string::npos) << c.error();
  }
  {
    Handshake s(*sctx), c(*cctx, "10.9.9.9");
    pump(c, s);
    EXPECT_EQ(c.step(), HandshakeStatus::failed);
    EXPECT_EQ(c.error().find("server certificate does not name 10.9.9.9 (it names DNS localhost, IP 127.0.0.1, "
                             "IP ::1); server certificate did not verify: "),
              0u)
        << c.error();
  }
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
    // The server says why (handshake_failure), and the client says what it lacks.
    EXPECT_EQ(c.step(), HandshakeStatus::failed);
    EXPECT_TRUE(c.client_cert_missing());
    EXPECT_EQ(c.error(), "the server requires a client certificate (--cert/--key): it asked for one and none is "
                         "configured; the server ended the handshake with alert handshake_failure (40)");
  }
  {
    auto cctx = client_ctx(true);
    Handshake s(*sctx), c(*cctx, "localhost");
    pump(c, s);
    ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
    EXPECT_NE(s.peer().cert_subject.find("baton-client"), std::string::npos) << s.peer().cert_subject;
  }
}

// A server that just closes the connection (no alert: mbedTLS 2.28, or
// another implementation) after asking for a certificate the client lacks.
TEST(Handshake, ClientCertificateRequestedThenConnectionClosed) {
  auto sctx = server_ctx({}, true, true);
  auto cctx = client_ctx(false);
  Handshake s(*sctx), c(*cctx, "localhost");
  // ClientHello -> server flight with CertificateRequest -> the client's
  // flight with an empty Certificate; the server's answer is dropped.
  ASSERT_EQ(c.step(), HandshakeStatus::awaiting_peer);
  s.feed(c.output().to_vector());
  c.output().clear();
  ASSERT_EQ(s.step(), HandshakeStatus::awaiting_peer);
  EXPECT_EQ(c.peer_close_reason(), "");  // nothing asked yet
  c.feed(s.output().to_vector());
  s.output().clear();
  ASSERT_EQ(c.step(), HandshakeStatus::awaiting_peer);
  s.feed(c.output().to_vector());
  EXPECT_EQ(s.step(), HandshakeStatus::failed);
  EXPECT_FALSE(s.output().empty());  // the alert, never delivered here
  EXPECT_EQ(c.peer_close_reason(), "the server requires a client certificate (--cert/--key): it asked for one, "
                                   "none is configured, and it closed the connection");
}

// An optional client certificate: the server asks, the client has none, the
// handshake succeeds and nothing blames the certificate.
TEST(Handshake, OptionalClientCertificateMissingIsFine) {
  auto sctx = server_ctx({}, true, false);
  auto cctx = client_ctx(false);
  Handshake s(*sctx), c(*cctx, "localhost");
  pump(c, s);
  ASSERT_EQ(c.step(), HandshakeStatus::done) << c.error();
  ASSERT_EQ(s.step(), HandshakeStatus::done) << s.error();
  EXPECT_TRUE(c.client_cert_missing());
  EXPECT_EQ(c.peer_close_reason(), "");
  // Without mTLS the server asks for nothing.
  auto plain = server_ctx();
  Handshake s2(*plain), c2(*cctx, "localhost");
  pump(c2, s2);
  ASSERT_EQ(c2.step(), HandshakeStatus::done) << c2.error();
  EXPECT_FALSE(c2.client_cert_missing());
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
