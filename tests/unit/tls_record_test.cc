#include <gtest/gtest.h>
#include <mbedtls/chachapoly.h>
#include <mbedtls/gcm.h>

#include <cstring>
#include <memory>
#include <random>

#include "tls/record.h"
#include "util/bytes.h"

using namespace baton::tls;
using baton::util::as_bytes;
using baton::util::to_hex;

namespace {

std::vector<uint8_t> hex(std::string_view h) {
  std::vector<uint8_t> v(h.size() / 2);
  EXPECT_TRUE(baton::util::from_hex(h, v));
  return v;
}

struct Keys {
  uint16_t suite;
  std::vector<uint8_t> key, iv;
};

// Directions: client writes with `c2s`, server writes with `s2c`.
RecordState make_state(Side side, const Keys& c2s, const Keys& s2c, uint64_t seq = 1) {
  RecordState st;
  st.suite = c2s.suite;
  st.side = side;
  const Keys& w = side == Side::client ? c2s : s2c;
  const Keys& r = side == Side::client ? s2c : c2s;
  std::copy(w.key.begin(), w.key.end(), st.write.key.begin());
  std::copy(w.iv.begin(), w.iv.end(), st.write.iv.begin());
  std::copy(r.key.begin(), r.key.end(), st.read.key.begin());
  std::copy(r.iv.begin(), r.iv.end(), st.read.iv.begin());
  st.read.seq = st.write.seq = seq;
  return st;
}

std::vector<uint8_t> range_bytes(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(start + i);
  return v;
}

Keys kat_keys(uint16_t suite) {
  Cipher c;
  EXPECT_TRUE(cipher_of_suite(suite, c));
  return {suite, range_bytes(key_length(c)),
          fixed_iv_length(c) == 4 ? hex("a0a1a2a3") : hex("a0a1a2a3a4a5a6a7a8a9aaab")};
}

// Feeds `in` to `r` and collects all application plaintext until need_more.
struct Collected {
  std::vector<uint8_t> data;
  Opened last;
};
Collected open_all(RecordLayer& r, std::span<const uint8_t> in) {
  static std::vector<uint8_t> scratch(kScratchSize);
  Collected c;
  while (true) {
    Opened o = r.open(in, scratch);
    in = in.subspan(o.used);
    c.last = o;
    if (o.status == OpenStatus::data) {
      c.data.insert(c.data.end(), o.plaintext.begin(), o.plaintext.end());
      continue;
    }
    return c;
  }
}

}  // namespace

// Vectors computed with an independent implementation (pyca/cryptography's
// AESGCM and ChaCha20Poly1305, records built per RFC 5246/5288/7905) from key
// bytes 00 01 02.., salt a0a1a2a3 (GCM) or IV a0..ab (ChaCha), sequence 1.
struct Kat {
  uint16_t suite;
  const char* data_record;   // "baton known answer", seq 1, application_data
  const char* alert_record;  // warning close_notify, seq 7
};
static const Kat kKats[] = {
    {suite::ecdhe_ecdsa_aes128_gcm_sha256,
     "170303002a00000000000000012410689d02a41c3ee81b2837ba6ae711748021eb2fb6e13503cfea2e8a4608f0bb05",
     "150303001a00000000000000073db7983af62d1740db71e71f40ced38a9994"},
    {suite::ecdhe_rsa_aes256_gcm_sha384,
     "170303002a0000000000000001d2cecce10254adda74adc34a1a057efd2868083066d1b704176094e006f8bb3efd07",
     "150303001a0000000000000007717bb7f71987b512b520ee0225859e7bbb5a"},
    {suite::ecdhe_ecdsa_chacha20_poly1305,
     "17030300221014b89c815d28837be7071732cb6d0d756f92a97ad442b01b303ca0b2fa88144cf9",
     "1503030012f2809647f305324d971bbbf7620519d1b9e0"},
};

TEST(RecordKat, SealMatchesIndependentImplementation) {
  for (const Kat& k : kKats) {
    Keys keys = kat_keys(k.suite);
    RecordLayer client(make_state(Side::client, keys, keys));
    client.seal(as_bytes("baton known answer"));
    EXPECT_EQ(to_hex(client.output().to_vector()), k.data_record) << k.suite;
    RecordState st = make_state(Side::client, keys, keys, 7);
    RecordLayer c7(std::move(st));
    c7.seal_alert(alert::close_notify, false);
    EXPECT_EQ(to_hex(c7.output().to_vector()), k.alert_record) << k.suite;
    EXPECT_TRUE(c7.state().close_notify_sent);
    EXPECT_EQ(c7.state().write.seq, 8u);
  }
}

TEST(RecordKat, OpenIndependentRecords) {
  for (const Kat& k : kKats) {
    Keys keys = kat_keys(k.suite);
    RecordLayer server(make_state(Side::server, keys, keys));
    auto rec = hex(k.data_record);
    Collected c = open_all(server, rec);
    EXPECT_EQ(std::string(c.data.begin(), c.data.end()), "baton known answer");
    EXPECT_EQ(c.last.status, OpenStatus::need_more);
    EXPECT_EQ(server.state().read.seq, 2u);
    RecordLayer s7(make_state(Side::server, keys, keys, 7));
    auto alert_rec = hex(k.alert_record);
    EXPECT_EQ(open_all(s7, alert_rec).last.status, OpenStatus::closed);
    EXPECT_TRUE(s7.state().close_notify_received);
  }
}

class RecordPair : public ::testing::TestWithParam<uint16_t> {
 protected:
  Keys c2s() {
    Cipher c;
    EXPECT_TRUE(cipher_of_suite(GetParam(), c));
    return {GetParam(), range_bytes(key_length(c), 10), range_bytes(fixed_iv_length(c), 50)};
  }
  Keys s2c() {
    Cipher c;
    EXPECT_TRUE(cipher_of_suite(GetParam(), c));
    return {GetParam(), range_bytes(key_length(c), 90), range_bytes(fixed_iv_length(c), 130)};
  }
};

TEST_P(RecordPair, RandomFragmentsRoundTrip) {
  std::mt19937 rng(GetParam());
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  std::vector<uint8_t> sent, got;
  for (int i = 0; i < 200; ++i) {
    std::vector<uint8_t> msg(rng() % 40000);
    for (auto& b : msg) b = uint8_t(rng());
    client.seal(msg);
    sent.insert(sent.end(), msg.begin(), msg.end());
    // Deliver the wire bytes in random fragments, as TCP may.
    auto wire = client.output().to_vector();
    client.output().clear();
    size_t pos = 0;
    while (pos < wire.size()) {
      size_t n = std::min<size_t>(wire.size() - pos, 1 + rng() % 20000);
      Collected c = open_all(server, std::span(wire).subspan(pos, n));
      ASSERT_EQ(c.last.status, OpenStatus::need_more) << c.last.reason;
      got.insert(got.end(), c.data.begin(), c.data.end());
      pos += n;
    }
  }
  EXPECT_EQ(got, sent);
  EXPECT_EQ(client.state().write.seq, server.state().read.seq);
}

// ARCHITECTURE principle 9: export the state at a random point mid-record,
// import it into a fresh object, keep going, compare with an uninterrupted run.
TEST_P(RecordPair, ExportImportMidStream) {
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    std::mt19937 rng(seed * 7919 + GetParam());
    std::vector<uint8_t> payload(300000);
    for (auto& b : payload) b = uint8_t(rng());
    RecordLayer sender(make_state(Side::client, c2s(), s2c()));
    // Records of random sizes so that cut points fall inside records.
    size_t pos = 0;
    while (pos < payload.size()) {
      size_t n = std::min<size_t>(payload.size() - pos, 1 + rng() % kMaxPlaintext);
      sender.seal(std::span(payload).subspan(pos, n));
      pos += n;
    }
    auto wire = sender.output().to_vector();
    size_t cut = rng() % wire.size();

    auto receiver = std::make_unique<RecordLayer>(make_state(Side::server, c2s(), s2c()));
    std::vector<uint8_t> got;
    Collected a = open_all(*receiver, std::span(wire).first(cut));
    ASSERT_EQ(a.last.status, OpenStatus::need_more);
    got = a.data;
    // Move: copy the plain state, destroy the original, rebuild.
    RecordState exported = receiver->state();
    receiver.reset();
    RecordLayer imported(std::move(exported));
    Collected b = open_all(imported, std::span(wire).subspan(cut));
    ASSERT_EQ(b.last.status, OpenStatus::need_more) << b.last.reason;
    got.insert(got.end(), b.data.begin(), b.data.end());
    ASSERT_EQ(got, payload) << "seed " << seed << " cut " << cut;
    // The imported side can also write: the sender's peer reads it.
    imported.seal(as_bytes("reply"));
    RecordLayer sender_reader(make_state(Side::client, c2s(), s2c()));
    EXPECT_EQ(open_all(sender_reader, imported.output().to_vector()).data, std::vector<uint8_t>(as_bytes("reply").begin(), as_bytes("reply").end()));
  }
}

// The handshake hands over every byte it read past the Finished message as
// partial_input: that may be several whole records (a client that pipelines
// its first frames). Each must come out, in order.
TEST_P(RecordPair, SeveralRecordsLeftInPartialInput) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  client.seal(as_bytes("first"));
  client.seal(as_bytes("second"));
  client.seal(as_bytes("third"));
  auto wire = client.output().to_vector();
  RecordState st = make_state(Side::server, c2s(), s2c());
  st.partial_input.append(std::span(wire).first(wire.size() - 3));  // the third one incomplete
  RecordLayer server(std::move(st));
  Collected a = open_all(server, {});
  EXPECT_EQ(a.last.status, OpenStatus::need_more);
  EXPECT_EQ(std::string(a.data.begin(), a.data.end()), "firstsecond");
  Collected b = open_all(server, std::span(wire).last(3));
  EXPECT_EQ(std::string(b.data.begin(), b.data.end()), "third");
  EXPECT_EQ(server.state().read.seq, client.state().write.seq);
}

TEST_P(RecordPair, TamperedRecordIsBadRecordMac) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  client.seal(as_bytes("hello"));
  auto wire = client.output().to_vector();
  wire[wire.size() - 3] ^= 1;
  Collected c = open_all(server, wire);
  EXPECT_EQ(c.last.status, OpenStatus::fatal);
  EXPECT_EQ(c.last.alert, alert::bad_record_mac);
  EXPECT_TRUE(c.last.send_alert);
  EXPECT_TRUE(c.data.empty());
}

TEST_P(RecordPair, WrongSequenceIsBadRecordMac) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c(), 2));
  client.seal(as_bytes("hello"));
  EXPECT_EQ(open_all(server, client.output().to_vector()).last.alert, alert::bad_record_mac);
}

TEST_P(RecordPair, OversizedRecordIsRecordOverflow) {
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  uint8_t hdr[5] = {23, 3, 3, 0x48, 0x01};  // 18433 > 2^14 + 2048
  Collected c = open_all(server, hdr);
  EXPECT_EQ(c.last.status, OpenStatus::fatal);
  EXPECT_EQ(c.last.alert, alert::record_overflow);
  // Also when the header arrives a byte at a time.
  RecordLayer s2(make_state(Side::server, c2s(), s2c()));
  for (int i = 0; i < 4; ++i) ASSERT_EQ(open_all(s2, std::span(hdr + i, 1)).last.status, OpenStatus::need_more);
  EXPECT_EQ(open_all(s2, std::span(hdr + 4, 1)).last.alert, alert::record_overflow);
}

TEST_P(RecordPair, PlaintextOver16KiBIsRecordOverflow) {
  // A record whose ciphertext is within 2^14+2048 but whose plaintext exceeds 2^14.
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  std::vector<uint8_t> rec(5 + 16384 + 100, 0);
  rec[0] = 23; rec[1] = 3; rec[2] = 3;
  baton::util::store_u16(rec.data() + 3, uint16_t(rec.size() - 5));
  EXPECT_EQ(open_all(server, rec).last.alert, alert::record_overflow);
}

TEST_P(RecordPair, WrongVersionIsProtocolVersion) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  client.seal(as_bytes("hello"));
  auto wire = client.output().to_vector();
  wire[2] = 1;
  EXPECT_EQ(open_all(server, wire).last.alert, alert::protocol_version);
}

TEST_P(RecordPair, RenegotiationGetsNoRenegotiationWarning) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  uint8_t client_hello[] = {1, 0, 0, 2, 3, 3};  // handshake type 1 (ClientHello), truncated body
  client.seal_record(ContentType::handshake, client_hello);
  Collected c = open_all(server, client.output().to_vector());
  EXPECT_EQ(c.last.status, OpenStatus::fatal);
  EXPECT_EQ(c.last.alert, alert::no_renegotiation);
  EXPECT_TRUE(c.last.alert_warning);
  // The alert the server sends is a well-formed warning the client can read.
  server.seal_alert(alert::no_renegotiation, false);
  auto out = server.output().to_vector();
  RecordLayer reader(make_state(Side::client, c2s(), s2c()));
  Collected r = open_all(reader, out);
  EXPECT_EQ(r.last.status, OpenStatus::fatal);  // no_renegotiation ends the connection for the reader too
  EXPECT_EQ(r.last.alert, alert::no_renegotiation);
  EXPECT_FALSE(r.last.send_alert);
}

TEST_P(RecordPair, ChangeCipherSpecIsUnexpected) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  uint8_t one = 1;
  client.seal_record(ContentType::change_cipher_spec, std::span(&one, 1));
  EXPECT_EQ(open_all(server, client.output().to_vector()).last.alert, alert::unexpected_message);
}

TEST_P(RecordPair, CloseNotifyEndsInputAndLaterBytesAreIgnored) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  client.seal(as_bytes("last words"));
  client.seal_alert(alert::close_notify, false);
  auto wire = client.output().to_vector();
  wire.push_back(0xff);  // garbage after close_notify
  Collected c = open_all(server, wire);
  EXPECT_EQ(std::string(c.data.begin(), c.data.end()), "last words");
  EXPECT_EQ(c.last.status, OpenStatus::closed);
  // The garbage byte is still unread; the next call swallows it.
  Collected after = open_all(server, std::span(wire).last(1));
  EXPECT_EQ(after.last.status, OpenStatus::closed);
  EXPECT_EQ(after.last.used, 1u);
}

TEST_P(RecordPair, PeerFatalAlertEndsWithoutReply) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  client.seal_alert(alert::internal_error, true);
  Collected c = open_all(server, client.output().to_vector());
  EXPECT_EQ(c.last.status, OpenStatus::fatal);
  EXPECT_FALSE(c.last.send_alert);
  EXPECT_EQ(c.last.alert, alert::internal_error);
}

TEST_P(RecordPair, EmptyRecordsAreAllowed) {
  RecordLayer client(make_state(Side::client, c2s(), s2c()));
  RecordLayer server(make_state(Side::server, c2s(), s2c()));
  client.seal_record(ContentType::application_data, {});
  client.seal(as_bytes("x"));
  Collected c = open_all(server, client.output().to_vector());
  EXPECT_EQ(c.data.size(), 1u);
  EXPECT_EQ(server.state().read.seq, client.state().write.seq);
}

INSTANTIATE_TEST_SUITE_P(Suites, RecordPair,
                         ::testing::Values(suite::ecdhe_ecdsa_aes128_gcm_sha256, suite::ecdhe_ecdsa_aes256_gcm_sha384,
                                           suite::ecdhe_ecdsa_chacha20_poly1305));

// The record layer seals and opens with OpenSSL; mbedTLS (which runs the
// handshake and sealed the Finished messages) is a second, independent
// implementation on the same machine. Records of every length class,
// sealed by one and opened by the other, in both directions.
namespace {

struct MbedAead {
  Cipher c;
  mbedtls_gcm_context gcm;
  mbedtls_chachapoly_context chacha;
  MbedAead(Cipher cipher, const std::vector<uint8_t>& key) : c(cipher) {
    mbedtls_gcm_init(&gcm);
    mbedtls_chachapoly_init(&chacha);
    if (c == Cipher::chacha20_poly1305) EXPECT_EQ(mbedtls_chachapoly_setkey(&chacha, key.data()), 0);
    else EXPECT_EQ(mbedtls_gcm_setkey(&gcm, MBEDTLS_CIPHER_ID_AES, key.data(), unsigned(key.size() * 8)), 0);
  }
  ~MbedAead() {
    mbedtls_gcm_free(&gcm);
    mbedtls_chachapoly_free(&chacha);
  }
};

void mbed_nonce_aad(Cipher c, const std::vector<uint8_t>& iv, uint64_t seq, size_t len, uint8_t nonce[12],
                    uint8_t aad[13]) {
  uint8_t s[8];
  for (int i = 0; i < 8; ++i) s[i] = uint8_t(seq >> (56 - 8 * i));
  std::memset(nonce, 0, 12);
  std::memcpy(nonce, iv.data(), iv.size());
  for (int i = 0; i < 8; ++i) nonce[4 + i] = c == Cipher::chacha20_poly1305 ? uint8_t(nonce[4 + i] ^ s[i]) : s[i];
  std::memcpy(aad, s, 8);
  aad[8] = uint8_t(ContentType::application_data);
  aad[9] = 3;
  aad[10] = 3;
  aad[11] = uint8_t(len >> 8);
  aad[12] = uint8_t(len);
}

// One application_data record sealed by mbedTLS.
std::vector<uint8_t> mbed_seal(MbedAead& a, const std::vector<uint8_t>& iv, uint64_t seq,
                               const std::vector<uint8_t>& plain) {
  uint8_t nonce[12], aad[13];
  mbed_nonce_aad(a.c, iv, seq, plain.size(), nonce, aad);
  size_t explicit_len = a.c == Cipher::chacha20_poly1305 ? 0 : kExplicitNonceGcm;
  std::vector<uint8_t> rec(kHeaderSize + explicit_len + plain.size() + kTagSize);
  size_t body = rec.size() - kHeaderSize;
  rec[0] = uint8_t(ContentType::application_data);
  rec[1] = rec[2] = 3;
  rec[3] = uint8_t(body >> 8);
  rec[4] = uint8_t(body);
  std::memcpy(rec.data() + kHeaderSize, nonce + 4, explicit_len);
  uint8_t* ct = rec.data() + kHeaderSize + explicit_len;
  int ret = a.c == Cipher::chacha20_poly1305
                ? mbedtls_chachapoly_encrypt_and_tag(&a.chacha, plain.size(), nonce, aad, 13, plain.data(), ct,
                                                     ct + plain.size())
                : mbedtls_gcm_crypt_and_tag(&a.gcm, MBEDTLS_GCM_ENCRYPT, plain.size(), nonce, 12, aad, 13,
                                            plain.data(), ct, kTagSize, ct + plain.size());
  EXPECT_EQ(ret, 0);
  return rec;
}

// Opens one record (header included) with mbedTLS; false if it does not authenticate.
bool mbed_open(MbedAead& a, const std::vector<uint8_t>& iv, uint64_t seq, std::span<const uint8_t> rec,
               std::vector<uint8_t>& plain) {
  size_t explicit_len = a.c == Cipher::chacha20_poly1305 ? 0 : kExplicitNonceGcm;
  size_t n = rec.size() - kHeaderSize - explicit_len - kTagSize;
  uint8_t nonce[12], aad[13];
  mbed_nonce_aad(a.c, iv, seq, n, nonce, aad);
  if (explicit_len) std::memcpy(nonce + 4, rec.data() + kHeaderSize, explicit_len);
  const uint8_t* ct = rec.data() + kHeaderSize + explicit_len;
  plain.resize(n);
  int ret = a.c == Cipher::chacha20_poly1305
                ? mbedtls_chachapoly_auth_decrypt(&a.chacha, n, nonce, aad, 13, ct + n, ct, plain.data())
                : mbedtls_gcm_auth_decrypt(&a.gcm, n, nonce, 12, aad, 13, ct + n, kTagSize, ct, plain.data());
  return ret == 0;
}

}  // namespace

TEST_P(RecordPair, AgreesWithMbedTls) {
  Cipher c;
  ASSERT_TRUE(cipher_of_suite(GetParam(), c));
  Keys k = c2s();
  std::mt19937 rng(GetParam() * 31 + 7);
  // Lengths around the AES block, the GCM/ChaCha internal strides and the limit.
  std::vector<size_t> lengths = {0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1024, 4095, 4096, 4097, 16383, 16384};
  for (int i = 0; i < 40; ++i) lengths.push_back(rng() % (kMaxPlaintext + 1));
  MbedAead mbed(c, k.key);

  // OpenSSL seals, mbedTLS opens.
  RecordLayer sender(make_state(Side::client, k, s2c(), 1000));
  uint64_t seq = 1000;
  for (size_t n : lengths) {
    std::vector<uint8_t> plain(n);
    for (auto& b : plain) b = uint8_t(rng());
    sender.seal_record(ContentType::application_data, plain);
    auto wire = sender.output().to_vector();
    sender.output().clear();
    std::vector<uint8_t> got;
    ASSERT_TRUE(mbed_open(mbed, k.iv, seq, wire, got)) << "length " << n;
    EXPECT_EQ(got, plain) << "length " << n;
    ++seq;
  }

  // mbedTLS seals, OpenSSL opens; then one flipped tag bit is refused.
  RecordLayer receiver(make_state(Side::server, k, s2c(), 5000));
  seq = 5000;
  for (size_t n : lengths) {
    std::vector<uint8_t> plain(n);
    for (auto& b : plain) b = uint8_t(rng());
    auto rec = mbed_seal(mbed, k.iv, seq++, plain);
    Collected got = open_all(receiver, rec);
    ASSERT_EQ(got.last.status, OpenStatus::need_more) << "length " << n << ": " << got.last.reason;
    EXPECT_EQ(got.data, plain) << "length " << n;
  }
  auto rec = mbed_seal(mbed, k.iv, seq, range_bytes(100));
  rec.back() ^= 1;
  Collected bad = open_all(receiver, rec);
  EXPECT_EQ(bad.last.status, OpenStatus::fatal);
  EXPECT_EQ(bad.last.alert, alert::bad_record_mac);
}

// Layers own no cipher context: the thread's shared ones (32 per cipher and
// direction, record.cc) are keyed for the layers that used them last and
// re-keyed for others. 48 tunnels with their own keys (more than the slots),
// records interleaved one by one, layers replaced (handoff) and destroyed in
// between: every record must open with its own tunnel's key.
TEST_P(RecordPair, InterleavedLayersKeepTheirOwnKeys) {
  Cipher c;
  ASSERT_TRUE(cipher_of_suite(GetParam(), c));
  struct Tunnel {
    std::unique_ptr<RecordLayer> client, server;
    std::vector<uint8_t> sent, got;
  };
  std::vector<Tunnel> ts(48);
  for (size_t i = 0; i < ts.size(); ++i) {
    Keys up{GetParam(), range_bytes(key_length(c), uint8_t(i * 17)), range_bytes(fixed_iv_length(c), uint8_t(i))};
    Keys down{GetParam(), range_bytes(key_length(c), uint8_t(i * 17 + 100)), range_bytes(fixed_iv_length(c), 9)};
    ts[i].client = std::make_unique<RecordLayer>(make_state(Side::client, up, down));
    ts[i].server = std::make_unique<RecordLayer>(make_state(Side::server, up, down));
  }
  std::mt19937 rng(GetParam());
  for (int round = 0; round < 3000; ++round) {
    // Mostly a hot few (kept keyed), sometimes any (evictions).
    Tunnel& t = ts[rng() % (round % 4 ? 6 : ts.size())];
    std::vector<uint8_t> msg(rng() % 3000);
    for (auto& b : msg) b = uint8_t(rng());
    t.client->seal(msg);
    t.sent.insert(t.sent.end(), msg.begin(), msg.end());
    // Another tunnel's record in between: the shared contexts switch keys.
    Tunnel& o = ts[rng() % ts.size()];
    o.client->seal(as_bytes("x"));
    o.sent.push_back('x');
    for (Tunnel* p : {&t, &o}) {
      Collected got = open_all(*p->server, p->client->output().to_vector());
      p->client->output().clear();
      ASSERT_EQ(got.last.status, OpenStatus::need_more) << got.last.reason << " round " << round;
      p->got.insert(p->got.end(), got.data.begin(), got.data.end());
    }
    if (round % 37 == 0) {  // the server side moves to a new layer (hot restart), the old one is destroyed
      RecordState st = t.server->take_state();
      t.server = std::make_unique<RecordLayer>(std::move(st));
    }
    if (round % 53 == 0) {  // a layer destroyed mid-run must not disturb the others
      RecordState st = o.client->state();
      o.client.reset();
      o.client = std::make_unique<RecordLayer>(std::move(st));
    }
  }
  for (Tunnel& t : ts) {
    EXPECT_EQ(t.got, t.sent);
    EXPECT_FALSE(t.server->broken());
  }
}

TEST(RecordSuites, OnlyAeadSuitesAreAccepted) {
  Cipher c;
  EXPECT_FALSE(cipher_of_suite(0x009C, c));  // TLS_RSA_WITH_AES_128_GCM_SHA256 (no ECDHE)
  EXPECT_FALSE(cipher_of_suite(0xC013, c));  // ECDHE-RSA-AES128-SHA (CBC)
  EXPECT_TRUE(cipher_of_suite(0xCCA8, c));
  EXPECT_EQ(c, Cipher::chacha20_poly1305);
}
