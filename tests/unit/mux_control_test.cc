#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "mux/control.h"

using namespace baton::mux;

namespace {

using V = std::vector<uint8_t>;

V cat(std::initializer_list<V> parts) {
  V out;
  for (const V& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
V str(const std::string& s) { return V(s.begin(), s.end()); }

template <typename M>
V enc(const M& m) {
  V out;
  encode(m, out);
  return out;
}

DecodeResult dec(const V& in, ControlMessage& msg) { return decode(in, msg); }

// A message with the given type and raw body.
V message(uint8_t type, const V& body) {
  return cat({{type, uint8_t(body.size() >> 8), uint8_t(body.size())}, body});
}
V field(uint8_t tag, const V& value) {
  return cat({{tag, uint8_t(value.size() >> 8), uint8_t(value.size())}, value});
}

const V kHelloBytes = {0x01, 0x00, 0x0f,                     // HELLO, 15 bytes of fields
                       0x01, 0x00, 0x02, 0x00, 0x01,         // version 1
                       0x02, 0x00, 0x02, 't', 'k',           // token "tk"
                       0x03, 0x00, 0x02, 'c', '1'};          // client_id "c1"

const V kWelcomeBytes = {0x02, 0x00, 0x22,                                   // WELCOME, 34
                         0x05, 0x00, 0x10, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                         0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,     // session_id
                         0x06, 0x00, 0x05, 'p', 'o', 'd', '-', 'a',          // server_id
                         0x07, 0x00, 0x04, 0x00, 0x00, 0x3a, 0x98};          // heartbeat 15000

const V kRejectBytes = {0x03, 0x00, 0x18,                                      // REJECT, 24
                        0x09, 0x00, 0x02, 0x00, 0x02,                          // code 2
                        0x0a, 0x00, 0x09, 'b', 'a', 'd', ' ', 't', 'o', 'k', 'e', 'n',
                        0x0d, 0x00, 0x04, 0x00, 0x00, 0x13, 0x88};             // retry 5000

const V kDrainBytes = {0x04, 0x00, 0x28,                                       // DRAIN, 40
                       0x0a, 0x00, 0x0e, 'r', 'o', 'l', 'l', 'i', 'n', 'g', '_', 'u', 'p', 'd', 'a', 't', 'e',
                       0x0b, 0x00, 0x04, 0x00, 0x00, 0x75, 0x30,               // grace 30000
                       0x0c, 0x00, 0x0d, '1', '0', '.', '0', '.', '0', '.', '1', ':', '7', '4', '4', '3'};

Hello sample_hello() { return Hello{uint16_t(1), "tk", "c1"}; }
Welcome sample_welcome() {
  Welcome w;
  for (size_t i = 0; i < 16; ++i) w.session_id[i] = uint8_t(i);
  w.server_id = "pod-a";
  w.heartbeat_ms = 15000;
  return w;
}
Reject sample_reject() { return Reject{2, "bad token", 5000u}; }
Drain sample_drain() { return Drain{"rolling_update", 30000, "10.0.0.1:7443"}; }

void expect_malformed(const V& in) {
  ControlMessage m;
  DecodeResult r = decode(in, m);
  EXPECT_EQ(r.status, DecodeStatus::malformed);
  EXPECT_EQ(r.used, 0u);
  EXPECT_NE(r.error, nullptr);
}

}  // namespace

// ---- literal bytes -------------------------------------------------------

TEST(MuxControl, HelloLiteral) {
  EXPECT_EQ(enc(sample_hello()), kHelloBytes);
  ControlMessage m;
  DecodeResult r = dec(kHelloBytes, m);
  ASSERT_EQ(r.status, DecodeStatus::message);
  EXPECT_EQ(r.used, kHelloBytes.size());
  EXPECT_EQ(r.error, nullptr);
  EXPECT_EQ(m.type, 0x01);
  ASSERT_TRUE(m.hello);
  EXPECT_FALSE(m.welcome || m.reject || m.drain);
  EXPECT_EQ(m.hello->version, 1);
  EXPECT_EQ(m.hello->token, "tk");
  EXPECT_EQ(m.hello->client_id, "c1");
}

TEST(MuxControl, WelcomeLiteral) {
  EXPECT_EQ(enc(sample_welcome()), kWelcomeBytes);
  ControlMessage m;
  DecodeResult r = dec(kWelcomeBytes, m);
  ASSERT_EQ(r.status, DecodeStatus::message);
  EXPECT_EQ(r.used, kWelcomeBytes.size());
  EXPECT_EQ(m.type, 0x02);
  ASSERT_TRUE(m.welcome);
  EXPECT_FALSE(m.hello || m.reject || m.drain);
  EXPECT_EQ(m.welcome->session_id, sample_welcome().session_id);
  EXPECT_EQ(m.welcome->server_id, "pod-a");
  EXPECT_EQ(m.welcome->heartbeat_ms, 15000u);
}

TEST(MuxControl, RejectLiteral) {
  EXPECT_EQ(enc(sample_reject()), kRejectBytes);
  ControlMessage m;
  DecodeResult r = dec(kRejectBytes, m);
  ASSERT_EQ(r.status, DecodeStatus::message);
  EXPECT_EQ(r.used, kRejectBytes.size());
  EXPECT_EQ(m.type, 0x03);
  ASSERT_TRUE(m.reject);
  EXPECT_FALSE(m.hello || m.welcome || m.drain);
  EXPECT_EQ(m.reject->code, 2);
  EXPECT_EQ(m.reject->reason, "bad token");
  EXPECT_EQ(m.reject->retry_after_ms, 5000u);
}

TEST(MuxControl, RejectWithoutRetryOmitsTheField) {
  Reject r{uint16_t(RejectCode::unsupported_version), "v", std::nullopt};
  const V want = {0x03, 0x00, 0x09, 0x09, 0x00, 0x02, 0x00, 0x01, 0x0a, 0x00, 0x01, 'v'};
  EXPECT_EQ(enc(r), want);
  ControlMessage m;
  ASSERT_EQ(dec(want, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.reject);
  EXPECT_EQ(m.reject->code, 1);
  EXPECT_FALSE(m.reject->retry_after_ms);
}

TEST(MuxControl, DrainLiteral) {
  EXPECT_EQ(enc(sample_drain()), kDrainBytes);
  ControlMessage m;
  DecodeResult r = dec(kDrainBytes, m);
  ASSERT_EQ(r.status, DecodeStatus::message);
  EXPECT_EQ(r.used, kDrainBytes.size());
  EXPECT_EQ(m.type, 0x04);
  ASSERT_TRUE(m.drain);
  EXPECT_FALSE(m.hello || m.welcome || m.reject);
  EXPECT_EQ(m.drain->reason, "rolling_update");
  EXPECT_EQ(m.drain->grace_ms, 30000u);
  EXPECT_EQ(m.drain->reconnect_hint, "10.0.0.1:7443");
}

TEST(MuxControl, DrainWithoutHintOmitsTheField) {
  Drain d{"x", 1, ""};
  const V want = {0x04, 0x00, 0x0b, 0x0a, 0x00, 0x01, 'x', 0x0b, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01};
  EXPECT_EQ(enc(d), want);
  ControlMessage m;
  ASSERT_EQ(dec(want, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.drain);
  EXPECT_EQ(m.drain->reconnect_hint, "");
}

TEST(MuxControl, HelloEmptyStringsAreSentWithLengthZero) {
  const V want = {0x01, 0x00, 0x0b, 0x01, 0x00, 0x02, 0x00, 0x01, 0x02, 0x00, 0x00, 0x03, 0x00, 0x00};
  EXPECT_EQ(enc(Hello{uint16_t(1), "", ""}), want);
}

TEST(MuxControl, EncodeAppendsToExistingBytes) {
  V out = {0xee};
  encode(sample_hello(), out);
  encode(sample_drain(), out);
  EXPECT_EQ(out, cat({{0xee}, kHelloBytes, kDrainBytes}));
}

// ---- decoding rules ------------------------------------------------------

TEST(MuxControl, HelloWithoutVersionDecodesWithEmptyVersion) {
  const V in = message(0x01, field(0x02, str("secret")));
  ControlMessage m;
  ASSERT_EQ(dec(in, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.hello);
  EXPECT_FALSE(m.hello->version);
  EXPECT_EQ(m.hello->token, "secret");
  EXPECT_EQ(m.hello->client_id, "");
  // The encoder omits an absent version.
  EXPECT_EQ(enc(Hello{std::nullopt, "secret", ""}), cat({message(0x01, cat({field(0x02, str("secret")), field(0x03, {})}))}));
}

TEST(MuxControl, EmptyMessagesDecodeToDefaults) {
  for (uint8_t type = 1; type <= 4; ++type) {
    ControlMessage m;
    DecodeResult r = dec({type, 0x00, 0x00}, m);
    ASSERT_EQ(r.status, DecodeStatus::message) << int(type);
    EXPECT_EQ(r.used, 3u);
    EXPECT_EQ(m.type, type);
  }
  ControlMessage m;
  ASSERT_EQ(dec({0x02, 0, 0}, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.welcome);
  EXPECT_EQ(m.welcome->heartbeat_ms, 0u);
  EXPECT_EQ(m.welcome->session_id, (std::array<uint8_t, 16>{}));
}

TEST(MuxControl, UnknownFieldTagsAreSkipped) {
  // Tag 0x7f is unknown everywhere; 0x07 (heartbeat_ms) means nothing in HELLO
  // and is skipped even with a size that would be wrong in WELCOME.
  const V in = message(0x01, cat({field(0x7f, str("whatever")), field(0x01, {0x00, 0x01}), field(0x07, {0x01}),
                                  field(0xff, {}), field(0x03, str("me")), field(0x80, V(300, 0xab))}));
  ControlMessage m;
  DecodeResult r = dec(in, m);
  ASSERT_EQ(r.status, DecodeStatus::message);
  EXPECT_EQ(r.used, in.size());
  ASSERT_TRUE(m.hello);
  EXPECT_EQ(m.hello->version, 1);
  EXPECT_EQ(m.hello->client_id, "me");

  const V w = message(0x02, cat({field(0x01, {1}), field(0x09, {1, 2, 3}), field(0x07, {0, 0, 0, 9})}));
  ASSERT_EQ(dec(w, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.welcome);
  EXPECT_EQ(m.welcome->heartbeat_ms, 9u);
  const V rj = message(0x03, cat({field(0x0b, {1}), field(0x09, {0, 3})}));
  ASSERT_EQ(dec(rj, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.reject);
  EXPECT_EQ(m.reject->code, 3);
  const V dr = message(0x04, cat({field(0x0d, {1}), field(0x09, {}), field(0x0b, {0, 0, 1, 0})}));
  ASSERT_EQ(dec(dr, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.drain);
  EXPECT_EQ(m.drain->grace_ms, 256u);
}

TEST(MuxControl, UnknownMessageTypeComesBackWithoutBody) {
  for (uint8_t type : {uint8_t(0x00), uint8_t(0x07), uint8_t(0x42), uint8_t(0xff)}) {
    // The body is not even parsed: a "field" overrunning it is not malformed.
    const V in = cat({message(type, {0x01, 0xff, 0xff, 0x00}), kHelloBytes});
    ControlMessage m;
    m.hello = Hello{};  // decode must clear what the caller left in msg
    DecodeResult r = dec(in, m);
    ASSERT_EQ(r.status, DecodeStatus::message);
    EXPECT_EQ(r.used, 7u);
    EXPECT_EQ(m.type, type);
    EXPECT_FALSE(m.hello || m.welcome || m.reject || m.drain || m.resumed || m.received);
  }
}

TEST(MuxControl, DecodesOneMessageAtATime) {
  const V in = cat({kHelloBytes, kWelcomeBytes, message(0x99, {}), kRejectBytes, kDrainBytes});
  std::span<const uint8_t> rest(in);
  std::vector<uint8_t> types;
  while (!rest.empty()) {
    ControlMessage m;
    DecodeResult r = decode(rest, m);
    ASSERT_EQ(r.status, DecodeStatus::message);
    types.push_back(m.type);
    rest = rest.subspan(r.used);
  }
  EXPECT_EQ(types, (std::vector<uint8_t>{1, 2, 0x99, 3, 4}));
}

// The control stream's inbound queue, decoded as Tunnel::on_control_data does:
// the same results as the span decoder, message by message, whatever the
// chunks. (Copying the whole queue for every message, as the tunnel did,
// made a queue of tiny messages quadratic: 0.2 s of CPU for 256 KiB.)
TEST(MuxControl, DecodesFromAQueueOneMessageAtATime) {
  const V in = cat({kHelloBytes, kWelcomeBytes, message(0x99, {}), kRejectBytes, kDrainBytes});
  for (size_t cut : {size_t(1), size_t(2), size_t(3), size_t(20), in.size() - 1}) {
    baton::util::ByteQueue q;
    q.append(std::span(in).first(cut));
    q.append(std::span(in).subspan(cut));
    std::vector<uint8_t> types;
    while (!q.empty()) {
      ControlMessage m;
      DecodeResult r = decode(q, m);
      ASSERT_EQ(r.status, DecodeStatus::message);
      types.push_back(m.type);
      q.pop(r.used);
    }
    EXPECT_EQ(types, (std::vector<uint8_t>{1, 2, 0x99, 3, 4}));
  }
  baton::util::ByteQueue q;
  q.append(std::span(kHelloBytes).first(kHelloBytes.size() - 1));
  ControlMessage m;
  EXPECT_EQ(decode(q, m).status, DecodeStatus::need_more);
  q.clear();
  q.append(message(0x01, field(0x03, V(129, 'x'))));
  EXPECT_EQ(decode(q, m).status, DecodeStatus::malformed);
  EXPECT_EQ(decode(baton::util::ByteQueue{}, m).status, DecodeStatus::need_more);
}

TEST(MuxControl, DuplicateFieldLastOneWins) {
  const V in = message(0x02, cat({field(0x07, {0, 0, 0, 1}), field(0x07, {0, 0, 0, 2})}));
  ControlMessage m;
  ASSERT_EQ(dec(in, m).status, DecodeStatus::message);
  EXPECT_EQ(m.welcome->heartbeat_ms, 2u);
}

TEST(MuxControl, ClientIdOf128BytesIsFine) {
  const V in = message(0x01, cat({field(0x01, {0, 1}), field(0x03, V(128, 'x'))}));
  ControlMessage m;
  ASSERT_EQ(dec(in, m).status, DecodeStatus::message);
  EXPECT_EQ(m.hello->client_id, std::string(128, 'x'));
}

// ---- malformed -----------------------------------------------------------

TEST(MuxControl, MalformedVersionSize) {
  expect_malformed(message(0x01, field(0x01, {})));
  expect_malformed(message(0x01, field(0x01, {1})));
  expect_malformed(message(0x01, field(0x01, {0, 0, 1})));
}

TEST(MuxControl, MalformedClientIdTooLong) { expect_malformed(message(0x01, field(0x03, V(129, 'x')))); }

TEST(MuxControl, MalformedSessionIdSize) {
  expect_malformed(message(0x02, field(0x05, V(15, 1))));
  expect_malformed(message(0x02, field(0x05, V(17, 1))));
  expect_malformed(message(0x02, field(0x05, {})));
}

TEST(MuxControl, MalformedHeartbeatSize) {
  expect_malformed(message(0x02, field(0x07, {0, 0, 1})));
  expect_malformed(message(0x02, field(0x07, {0, 0, 0, 0, 1})));
}

TEST(MuxControl, MalformedCodeSize) {
  expect_malformed(message(0x03, field(0x09, {1})));
  expect_malformed(message(0x03, field(0x09, {0, 0, 1})));
}

TEST(MuxControl, MalformedRetryAfterSize) {
  expect_malformed(message(0x03, field(0x0d, {0, 1})));
  expect_malformed(message(0x03, field(0x0d, {0, 0, 0, 0, 1})));
}

TEST(MuxControl, MalformedGraceSize) {
  expect_malformed(message(0x04, field(0x0b, {})));
  expect_malformed(message(0x04, field(0x0b, {0, 0, 0, 0, 0})));
}

TEST(MuxControl, MalformedFieldHeaderOverrunsMessage) {
  for (uint8_t type = 1; type <= 4; ++type) {
    expect_malformed(message(type, {0x7f}));
    expect_malformed(message(type, {0x7f, 0x00}));
    expect_malformed(message(type, cat({field(0x7f, {}), {0x7f, 0x00}})));
  }
}

TEST(MuxControl, MalformedFieldValueOverrunsMessage) {
  for (uint8_t type = 1; type <= 4; ++type) {
    expect_malformed(message(type, {0x7f, 0x00, 0x01}));
    expect_malformed(message(type, {0x0a, 0x00, 0x05, 'a', 'b', 'c', 'd'}));
    expect_malformed(message(type, {0x0a, 0xff, 0xff}));
  }
  // The overrun is judged against the message length, not the input size:
  // bytes of the next message do not complete a field.
  const V in = cat({{0x01, 0x00, 0x04, 0x02, 0x00, 0x05, 'a'}, V(10, 'b')});
  expect_malformed(in);
}

TEST(MuxControl, MalformedAfterValidFields) {
  expect_malformed(cat({message(0x02, cat({field(0x06, str("p")), field(0x07, {0, 0, 0})}))}));
}

// ---- truncation ----------------------------------------------------------

TEST(MuxControl, NeedMoreForEveryTruncation) {
  for (const V& full : {kHelloBytes, kWelcomeBytes, kRejectBytes, kDrainBytes, message(0x42, {1, 2, 3}),
                        message(0x01, {})}) {
    for (size_t n = 0; n < full.size(); ++n) {
      ControlMessage m;
      DecodeResult r = decode(std::span<const uint8_t>(full.data(), n), m);
      EXPECT_EQ(r.status, DecodeStatus::need_more) << "type " << int(full[0]) << " len " << n;
      EXPECT_EQ(r.used, 0u);
    }
    ControlMessage m;
    DecodeResult r = decode(full, m);
    EXPECT_EQ(r.status, DecodeStatus::message);
    EXPECT_EQ(r.used, full.size());
  }
}

TEST(MuxControl, NeedMoreEvenWhenTheBodySoFarIsBad) {
  // A malformed field is only judged once the whole message is there.
  const V full = message(0x01, field(0x01, {0, 0, 1}));
  for (size_t n = 0; n < full.size(); ++n) {
    ControlMessage m;
    EXPECT_EQ(decode(std::span<const uint8_t>(full.data(), n), m).status, DecodeStatus::need_more);
  }
  expect_malformed(full);
}

// ---- round trips ---------------------------------------------------------

namespace {
std::string random_string(std::mt19937& rng, size_t max) {
  std::string s(rng() % (max + 1), '\0');
  for (char& c : s) c = char(rng());
  return s;
}
// Random valid UTF-8 of at most `max` bytes (a client_id must be UTF-8), any code point but surrogates.
std::string random_utf8(std::mt19937& rng, size_t max) {
  std::string s;
  const size_t want = rng() % (max + 1);
  while (true) {
    uint32_t cp = rng() % 4 == 0 ? rng() % 0x80 : rng() % 0x110000;
    if (cp >= 0xd800 && cp <= 0xdfff) continue;
    std::string c;
    if (cp < 0x80) {
      c = {char(cp)};
    } else if (cp < 0x800) {
      c = {char(0xc0 | cp >> 6), char(0x80 | (cp & 0x3f))};
    } else if (cp < 0x10000) {
      c = {char(0xe0 | cp >> 12), char(0x80 | ((cp >> 6) & 0x3f)), char(0x80 | (cp & 0x3f))};
    } else {
      c = {char(0xf0 | cp >> 18), char(0x80 | ((cp >> 12) & 0x3f)), char(0x80 | ((cp >> 6) & 0x3f)),
           char(0x80 | (cp & 0x3f))};
    }
    if (s.size() + c.size() > want) return s;
    s += c;
  }
}
}  // namespace

TEST(MuxControl, RandomRoundTrips) {
  std::mt19937 rng(42);
  for (int i = 0; i < 300; ++i) {
    ControlMessage m;
    Hello h{rng() % 2 ? std::optional<uint16_t>(uint16_t(rng())) : std::nullopt, random_string(rng, 300),
            random_utf8(rng, 128)};
    V b = enc(h);
    ASSERT_EQ(decode(b, m).status, DecodeStatus::message);
    ASSERT_TRUE(m.hello);
    EXPECT_EQ(m.hello->version, h.version);
    EXPECT_EQ(m.hello->token, h.token);
    EXPECT_EQ(m.hello->client_id, h.client_id);

    Welcome w;
    for (auto& x : w.session_id) x = uint8_t(rng());
    w.server_id = random_string(rng, 100);
    w.heartbeat_ms = uint32_t(rng());
    b = enc(w);
    ASSERT_EQ(decode(b, m).status, DecodeStatus::message);
    ASSERT_TRUE(m.welcome);
    EXPECT_EQ(m.welcome->session_id, w.session_id);
    EXPECT_EQ(m.welcome->server_id, w.server_id);
    EXPECT_EQ(m.welcome->heartbeat_ms, w.heartbeat_ms);

    Reject r{uint16_t(rng()), random_string(rng, 200),
             rng() % 2 ? std::optional<uint32_t>(uint32_t(rng())) : std::nullopt};
    b = enc(r);
    ASSERT_EQ(decode(b, m).status, DecodeStatus::message);
    ASSERT_TRUE(m.reject);
    EXPECT_EQ(m.reject->code, r.code);
    EXPECT_EQ(m.reject->reason, r.reason);
    EXPECT_EQ(m.reject->retry_after_ms, r.retry_after_ms);

    Drain d{random_string(rng, 50), uint32_t(rng()), random_string(rng, 60)};
    b = enc(d);
    ASSERT_EQ(decode(b, m).status, DecodeStatus::message);
    ASSERT_TRUE(m.drain);
    EXPECT_EQ(m.drain->reason, d.reason);
    EXPECT_EQ(m.drain->grace_ms, d.grace_ms);
    EXPECT_EQ(m.drain->reconnect_hint, d.reconnect_hint);
  }
}

TEST(MuxControl, OversizedStringsStillEncodeWellFormed) {
  Reject r{3, std::string(70000, 'r'), 7u};
  V b = enc(r);
  ASSERT_LE(b.size(), 3u + 0xffff);
  EXPECT_EQ(size_t(b[1] << 8 | b[2]), b.size() - 3);
  ControlMessage m;
  ASSERT_EQ(decode(b, m).status, DecodeStatus::message);
  EXPECT_EQ(m.reject->code, 3);
  EXPECT_FALSE(m.reject->reason.empty());
}

// Found by tests/fuzz/control_fuzz.cc: a string that left 1..3 bytes of
// room made the encoder cut the integer field after it (a 1-byte grace_ms),
// and the message decoded as malformed. Strings are cut now, integers never.
TEST(MuxControl, OversizedStringsNeverCutTheIntegersAfterThem) {
  for (size_t n = 65520; n <= 65535; ++n) {
    ControlMessage m;
    Drain d{std::string(n, 'r'), 30000, "10.0.0.7:7443"};
    ASSERT_EQ(decode(enc(d), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.drain->grace_ms, 30000u);
    EXPECT_EQ(m.drain->reason, std::string(m.drain->reason.size(), 'r'));
    Welcome w{{}, std::string(n, 's'), 15000};
    ASSERT_EQ(decode(enc(w), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.welcome->heartbeat_ms, 15000u);
    Reject r{3, std::string(n, 'x'), 250u};
    ASSERT_EQ(decode(enc(r), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.reject->code, 3);
    EXPECT_EQ(m.reject->retry_after_ms, std::optional<uint32_t>(250u));
    Hello h{1, std::string(n, 't'), "edge"};
    ASSERT_EQ(decode(enc(h), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.hello->version, std::optional<uint16_t>(1));
    EXPECT_EQ(m.hello->client_id, "edge");
  }
}

TEST(MuxControl, EnumValuesMatchTheProtocol) {
  EXPECT_EQ(uint8_t(ControlType::hello), 0x01);
  EXPECT_EQ(uint8_t(ControlType::welcome), 0x02);
  EXPECT_EQ(uint8_t(ControlType::reject), 0x03);
  EXPECT_EQ(uint8_t(ControlType::drain), 0x04);
  EXPECT_EQ(uint8_t(ControlType::resumed), 0x05);
  EXPECT_EQ(uint8_t(ControlType::received), 0x06);
  EXPECT_EQ(uint16_t(ResumeRefusedCode::unknown_session), 1);
  EXPECT_EQ(uint16_t(ResumeRefusedCode::credentials), 2);
  EXPECT_EQ(uint16_t(ResumeRefusedCode::offsets), 3);
  EXPECT_EQ(uint16_t(ResumeRefusedCode::unavailable), 4);
  EXPECT_EQ(uint16_t(RejectCode::unsupported_version), 1);
  EXPECT_EQ(uint16_t(RejectCode::unauthorized), 2);
  EXPECT_EQ(uint16_t(RejectCode::overloaded), 3);
  EXPECT_EQ(uint16_t(RejectCode::draining), 4);
  EXPECT_STREQ(to_str(DecodeStatus::malformed), "malformed");
  EXPECT_STREQ(to_str(PreambleStatus::route), "route");
}

// ---- route preamble ------------------------------------------------------

TEST(MuxPreamble, Literal) {
  V out;
  encode_preamble("web", out);
  EXPECT_EQ(out, (V{0x03, 'w', 'e', 'b'}));
  out.push_back('X');  // first relayed byte stays with the stream
  PreambleResult r = decode_preamble(out);
  EXPECT_EQ(r.status, PreambleStatus::route);
  EXPECT_EQ(r.used, 4u);
  EXPECT_EQ(r.route, "web");
}

TEST(MuxPreamble, NeedMoreForEveryTruncation) {
  V full;
  encode_preamble("db.primary:5432", full);
  for (size_t n = 0; n < full.size(); ++n) {
    PreambleResult r = decode_preamble(std::span<const uint8_t>(full.data(), n));
    EXPECT_EQ(r.status, PreambleStatus::need_more) << n;
    EXPECT_EQ(r.used, 0u);
  }
  EXPECT_EQ(decode_preamble(full).route, "db.primary:5432");
}

TEST(MuxPreamble, LengthZeroIsMalformed) {
  EXPECT_EQ(decode_preamble(V{0x00}).status, PreambleStatus::malformed);
  EXPECT_EQ(decode_preamble(V{0x00, 'a'}).status, PreambleStatus::malformed);
}

TEST(MuxPreamble, NonPrintableBytesAreMalformed) {
  for (uint8_t bad : {uint8_t(0x00), uint8_t(0x09), uint8_t(0x20), uint8_t(0x7f), uint8_t(0x80), uint8_t(0xff)}) {
    PreambleResult r = decode_preamble(V{0x03, 'a', bad, 'c'});
    EXPECT_EQ(r.status, PreambleStatus::malformed) << int(bad);
    EXPECT_EQ(r.used, 0u);
    EXPECT_EQ(decode_preamble(V{0x01, bad}).status, PreambleStatus::malformed) << int(bad);
  }
}

TEST(MuxPreamble, EdgesOfPrintableAsciiAreFine) {
  PreambleResult r = decode_preamble(V{0x02, 0x21, 0x7e});
  EXPECT_EQ(r.status, PreambleStatus::route);
  EXPECT_EQ(r.route, "!~");
}

TEST(MuxPreamble, LongestName) {
  const std::string name(255, 'n');
  V out;
  encode_preamble(name, out);
  ASSERT_EQ(out.size(), 256u);
  EXPECT_EQ(out[0], 255);
  PreambleResult r = decode_preamble(out);
  EXPECT_EQ(r.status, PreambleStatus::route);
  EXPECT_EQ(r.used, 256u);
  EXPECT_EQ(r.route, name);
  // Longer names are cut, never wrapped into a bogus length byte.
  V cut;
  encode_preamble(std::string(300, 'n'), cut);
  EXPECT_EQ(cut, out);
}

// docs/protocol.md 3: client_id is UTF-8. Bytes that are not (issue 17 item
// 6: ff fe c0 af) make the HELLO malformed, which the server answers with
// REJECT 1; valid UTF-8 passes whatever it holds (control characters are
// escaped where it is written, not refused here).
TEST(MuxControl, ClientIdMustBeUtf8) {
  for (const std::string& bad : {std::string("\xff\xfe\xc0\xaf"), std::string("edge\xc3"), std::string("\xed\xa0\x80")}) {
    const V in = message(0x01, cat({field(0x01, {0, 1}), field(0x03, str(bad))}));
    ControlMessage m;
    DecodeResult r = dec(in, m);
    ASSERT_EQ(r.status, DecodeStatus::malformed);
    EXPECT_EQ(r.used, 0u);
    EXPECT_STREQ(r.error, "HELLO client_id is not valid UTF-8");
    EXPECT_FALSE(m.hello);
  }
  for (const std::string& ok : {std::string("edge\n2024 forged\x1b[2J\0", 21), std::string("h\xc3\xa9 \xe2\x82\xac")}) {
    const V in = message(0x01, cat({field(0x01, {0, 1}), field(0x03, str(ok))}));
    ControlMessage m;
    ASSERT_EQ(dec(in, m).status, DecodeStatus::message);
    EXPECT_EQ(m.hello->client_id, ok);
  }
}

// The server's strings reach a client as sent: the client escapes them (util::printable) before showing them.
TEST(MuxControl, ServerStringsAreNotCheckedForUtf8) {
  const V in = message(0x04, cat({field(0x0a, str("bye\n\xff")), field(0x0b, {0, 0, 0, 1})}));
  ControlMessage m;
  ASSERT_EQ(dec(in, m).status, DecodeStatus::message);
  EXPECT_EQ(m.drain->reason, "bye\n\xff");
}

// docs/protocol.md 3: WELCOME may carry the server's stream limits, three
// optional u32 fields after heartbeat_ms (tags 0x0e, 0x0f, 0x10, unused by
// any message before). A WELCOME without them (an older server) decodes as
// before, with the limits absent; an older client skips them as unknown tags.
TEST(MuxControl, WelcomeStreamLimitsLiteral) {
  Welcome w = sample_welcome();
  w.stream_open_rate = 200;
  w.stream_open_burst = 400;
  w.max_streams = 1024;
  const V limits = cat({field(0x0e, {0x00, 0x00, 0x00, 0xc8}), field(0x0f, {0x00, 0x00, 0x01, 0x90}),
                        field(0x10, {0x00, 0x00, 0x04, 0x00})});
  const V want = message(0x02, cat({V(kWelcomeBytes.begin() + 3, kWelcomeBytes.end()), limits}));
  EXPECT_EQ(enc(w), want);
  ControlMessage m;
  ASSERT_EQ(dec(want, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.welcome);
  EXPECT_EQ(m.welcome->heartbeat_ms, 15000u);
  EXPECT_EQ(m.welcome->stream_open_rate, std::optional<uint32_t>(200));
  EXPECT_EQ(m.welcome->stream_open_burst, std::optional<uint32_t>(400));
  EXPECT_EQ(m.welcome->max_streams, std::optional<uint32_t>(1024));

  ASSERT_EQ(dec(kWelcomeBytes, m).status, DecodeStatus::message);  // an older server
  EXPECT_FALSE(m.welcome->stream_open_rate || m.welcome->stream_open_burst || m.welcome->max_streams);
  EXPECT_EQ(enc(sample_welcome()), kWelcomeBytes);  // absent limits are not sent
}

TEST(MuxControl, WelcomeStreamLimitsOfTheWrongSizeAreMalformed) {
  for (uint8_t tag : {0x0e, 0x0f, 0x10}) {
    const V in = message(0x02, cat({V(kWelcomeBytes.begin() + 3, kWelcomeBytes.end()), field(tag, {0, 1})}));
    ControlMessage m;
    DecodeResult r = dec(in, m);
    EXPECT_EQ(r.status, DecodeStatus::malformed) << int(tag);
    EXPECT_FALSE(m.welcome);
  }
}

// The string before them is cut, never the limits.
TEST(MuxControl, WelcomeStreamLimitsSurviveAnOversizedServerId) {
  for (size_t n = 65500; n <= 65535; ++n) {
    Welcome w{{}, std::string(n, 's'), 15000};
    w.stream_open_rate = 7;
    w.stream_open_burst = 8;
    w.max_streams = 9;
    ControlMessage m;
    ASSERT_EQ(decode(enc(w), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.welcome->heartbeat_ms, 15000u);
    EXPECT_EQ(m.welcome->stream_open_rate, std::optional<uint32_t>(7));
    EXPECT_EQ(m.welcome->stream_open_burst, std::optional<uint32_t>(8));
    EXPECT_EQ(m.welcome->max_streams, std::optional<uint32_t>(9));
  }
}

// ---- session resume (docs/protocol.md 9) ----------------------------------

namespace {

ResumeSecret secret_of(uint8_t b) {
  ResumeSecret s;
  s.fill(b);
  return s;
}

TEST(MuxControlResume, ResumingHelloLiteral) {
  Hello h = sample_hello();
  h.resume_capable = true;
  h.resume = ResumeRequest{};
  h.resume->session_id.fill(0x5a);
  h.resume->secret = secret_of(0xc3);
  h.resume->received = 0x0102030405060708ull;
  const V want = message(0x01, cat({field(0x01, {0, 1}), field(0x02, str("tk")), field(0x03, str("c1")),
                                    field(0x11, {1}), field(0x15, V(16, 0x5a)), field(0x12, V(32, 0xc3)),
                                    field(0x16, {1, 2, 3, 4, 5, 6, 7, 8})}));
  EXPECT_EQ(enc(h), want);
  ControlMessage m;
  ASSERT_EQ(dec(want, m).status, DecodeStatus::message);
  EXPECT_TRUE(m.hello->resume_capable);
  ASSERT_TRUE(m.hello->resume);
  EXPECT_EQ(m.hello->resume->session_id, h.resume->session_id);
  EXPECT_EQ(m.hello->resume->secret, h.resume->secret);
  EXPECT_EQ(m.hello->resume->received, 0x0102030405060708ull);
}

TEST(MuxControlResume, PlainHelloHasNoResumeFields) {
  EXPECT_EQ(enc(sample_hello()), kHelloBytes);
  ControlMessage m;
  ASSERT_EQ(dec(kHelloBytes, m).status, DecodeStatus::message);
  EXPECT_FALSE(m.hello->resume_capable);
  EXPECT_FALSE(m.hello->resume);
}

TEST(MuxControlResume, ResumingHelloNeedsAllThreeFields) {
  const V sid = field(0x15, V(16, 1)), sec = field(0x12, V(32, 2)), rcv = field(0x16, V(8, 3));
  for (const V& body : {sid, sec, rcv, cat({sid, sec}), cat({sid, rcv}), cat({sec, rcv})}) {
    ControlMessage m;
    DecodeResult r = dec(message(0x01, cat({field(0x01, {0, 1}), body})), m);
    EXPECT_EQ(r.status, DecodeStatus::malformed);
    EXPECT_NE(std::string(r.error).find("HELLO resume fields without"), std::string::npos) << r.error;
  }
  ControlMessage m;
  ASSERT_EQ(dec(message(0x01, cat({field(0x01, {0, 1}), rcv, sec, sid})), m).status, DecodeStatus::message);
  EXPECT_TRUE(m.hello->resume);
}

TEST(MuxControlResume, ResumeFieldsOfTheWrongSizeAreMalformed) {
  for (const V& f : {field(0x11, {}), field(0x11, {1, 1}), field(0x15, V(15, 1)), field(0x12, V(33, 1)),
                     field(0x16, V(7, 1))})
    expect_malformed(message(0x01, f));
  for (const V& f : {field(0x12, V(31, 1)), field(0x13, V(2, 1)), field(0x18, V(4, 1))})
    expect_malformed(message(0x02, f));
  expect_malformed(message(0x05, cat({field(0x16, V(8, 0)), field(0x12, V(16, 0)), field(0x13, V(4, 0))})));
  expect_malformed(message(0x06, field(0x16, V(4, 0))));
}

TEST(MuxControlResume, WelcomeOffersAndRefusals) {
  Welcome w{{}, "pod-a", 15000};
  w.resume_secret = secret_of(0x11);
  w.resume_window_ms = 30000;
  w.resume_address = "10.0.0.7:7443";
  w.resume_refused_code = uint16_t(ResumeRefusedCode::unknown_session);
  w.resume_refused = "no such session here";
  ControlMessage m;
  ASSERT_EQ(dec(enc(w), m).status, DecodeStatus::message);
  EXPECT_EQ(m.welcome->resume_secret, std::optional<ResumeSecret>(secret_of(0x11)));
  EXPECT_EQ(m.welcome->resume_window_ms, std::optional<uint32_t>(30000));
  EXPECT_EQ(m.welcome->resume_address, "10.0.0.7:7443");
  EXPECT_EQ(m.welcome->resume_refused_code, std::optional<uint16_t>(1));
  EXPECT_EQ(m.welcome->resume_refused, "no such session here");
  // Without them: the bytes of a version-1 WELCOME.
  Welcome plain{{}, "pod-a", 15000};
  ASSERT_EQ(dec(enc(plain), m).status, DecodeStatus::message);
  EXPECT_FALSE(m.welcome->resume_secret || m.welcome->resume_window_ms || m.welcome->resume_refused_code);
  EXPECT_TRUE(m.welcome->resume_address.empty());
}

TEST(MuxControlResume, ResumeFieldsSurviveAnOversizedServerId) {
  for (size_t n = 65400; n <= 65535; n += 7) {
    Welcome w{{}, std::string(n, 's'), 15000};
    w.resume_secret = secret_of(0x22);
    w.resume_window_ms = 30000;
    w.resume_address = "host:1";
    w.resume_refused_code = 3;
    w.resume_refused = "offsets";
    ControlMessage m;
    ASSERT_EQ(decode(enc(w), m).status, DecodeStatus::message) << n;
    EXPECT_EQ(m.welcome->resume_secret, std::optional<ResumeSecret>(secret_of(0x22))) << n;
    EXPECT_EQ(m.welcome->resume_window_ms, std::optional<uint32_t>(30000)) << n;
    EXPECT_EQ(m.welcome->resume_refused_code, std::optional<uint16_t>(3)) << n;
    Hello h{1, std::string(n, 't'), "edge"};
    h.resume_capable = true;
    h.resume = ResumeRequest{{}, secret_of(0x33), 77};
    ASSERT_EQ(decode(enc(h), m).status, DecodeStatus::message) << n;
    ASSERT_TRUE(m.hello->resume) << n;
    EXPECT_EQ(m.hello->resume->secret, secret_of(0x33));
    EXPECT_EQ(m.hello->resume->received, 77u);
    EXPECT_EQ(m.hello->client_id, "edge");
  }
}

TEST(MuxControlResume, ResumedAndReceivedLiterals) {
  Resumed r{0x1122334455667788ull, secret_of(0x44), 30000};
  const V want = message(0x05, cat({field(0x16, {0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88}),
                                    field(0x12, V(32, 0x44)), field(0x13, {0, 0, 0x75, 0x30})}));
  EXPECT_EQ(enc(r), want);
  ControlMessage m;
  ASSERT_EQ(dec(want, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.resumed);
  EXPECT_EQ(m.resumed->received, r.received);
  EXPECT_EQ(m.resumed->secret, r.secret);
  EXPECT_EQ(m.resumed->window_ms, 30000u);
  const V rcv = message(0x06, field(0x16, {0, 0, 0, 0, 0, 1, 0, 0}));
  EXPECT_EQ(enc(Received{65536}), rcv);
  ASSERT_EQ(dec(rcv, m).status, DecodeStatus::message);
  ASSERT_TRUE(m.received);
  EXPECT_EQ(m.received->received, 65536u);
  // Each needs its fields; unknown ones are skipped.
  for (const V& bad : {message(0x05, cat({field(0x12, V(32, 0)), field(0x13, V(4, 0))})),
                       message(0x05, cat({field(0x16, V(8, 0)), field(0x13, V(4, 0))})),
                       message(0x05, cat({field(0x16, V(8, 0)), field(0x12, V(32, 0))})),
                       message(0x06, field(0x42, V(8, 0)))})
    expect_malformed(bad);
  ASSERT_EQ(dec(message(0x06, cat({field(0x42, {9}), field(0x16, V(8, 0))})), m).status, DecodeStatus::message);
}

}  // namespace
