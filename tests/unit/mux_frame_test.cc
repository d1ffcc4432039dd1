#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <random>
#include <string>

#include "mux/frame.h"

using namespace baton::mux;

namespace {
using Bytes12 = std::array<uint8_t, kHeaderSize>;

Bytes12 encoded(const FrameHeader& h) {
  Bytes12 b{};
  encode_header(h, b);
  return b;
}
}  // namespace

TEST(MuxFrame, ConstantsMatchTheProtocol) {
  EXPECT_EQ(kHeaderSize, 12u);
  EXPECT_EQ(kVersion, 0);
  EXPECT_EQ(kInitialWindow, 262144u);
  EXPECT_EQ(uint8_t(FrameType::data), 0);
  EXPECT_EQ(uint8_t(FrameType::window_update), 1);
  EXPECT_EQ(uint8_t(FrameType::ping), 2);
  EXPECT_EQ(uint8_t(FrameType::go_away), 3);
  EXPECT_EQ(flag::syn, 0x1);
  EXPECT_EQ(flag::ack, 0x2);
  EXPECT_EQ(flag::fin, 0x4);
  EXPECT_EQ(flag::rst, 0x8);
  EXPECT_EQ(uint32_t(GoAwayCode::normal), 0u);
  EXPECT_EQ(uint32_t(GoAwayCode::protocol_error), 1u);
  EXPECT_EQ(uint32_t(GoAwayCode::internal_error), 2u);
}

TEST(MuxFrame, EncodeWindowUpdateSyn) {
  // What hashicorp/yamux sends to open stream 3.
  Bytes12 want{0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00};
  EXPECT_EQ(encoded({0, uint8_t(FrameType::window_update), flag::syn, 3, 0}), want);
}

TEST(MuxFrame, EncodeDataBigEndian) {
  Bytes12 want{0x00, 0x00, 0x00, 0x06, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0};
  EXPECT_EQ(encoded({0, uint8_t(FrameType::data), flag::ack | flag::fin, 0x12345678, 0x9abcdef0}), want);
}

TEST(MuxFrame, EncodePingAndGoAway) {
  Bytes12 ping{0x00, 0x02, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef};
  EXPECT_EQ(encoded({0, uint8_t(FrameType::ping), flag::ack, 0, 0xdeadbeef}), ping);
  Bytes12 go_away{0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01};
  EXPECT_EQ(encoded({0, uint8_t(FrameType::go_away), 0, 0, 1}), go_away);
}

TEST(MuxFrame, EncodeWritesExactly12Bytes) {
  std::array<uint8_t, 16> buf;
  buf.fill(0xaa);
  encode_header({0, 1, 0xffff, 0xffffffff, 0xffffffff}, buf);
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(buf[i], i < 2 ? (i == 0 ? 0 : 1) : 0xff) << i;
  for (size_t i = 12; i < 16; ++i) EXPECT_EQ(buf[i], 0xaa) << i;
}

TEST(MuxFrame, DecodeKnownBytes) {
  const uint8_t in[] = {0x00, 0x00, 0x00, 0x0c, 0xff, 0xff, 0xff, 0xfe, 0x00, 0x04, 0x00, 0x00, 0x99};
  FrameHeader h = decode_header(in);
  EXPECT_EQ(h.version, 0);
  EXPECT_EQ(h.type, 0);
  EXPECT_EQ(h.flags, flag::fin | flag::rst);
  EXPECT_EQ(h.stream_id, 0xfffffffeu);
  EXPECT_EQ(h.length, 0x40000u);
}

TEST(MuxFrame, DecodeKeepsUnknownVersionTypeAndFlags) {
  const uint8_t in[] = {0x01, 0x07, 0x80, 0x10, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x01, 0x00};
  FrameHeader h = decode_header(in);
  EXPECT_EQ(h.version, 1);
  EXPECT_EQ(h.type, 7);
  EXPECT_EQ(h.flags, 0x8010);
  EXPECT_EQ(h.stream_id, 1u);
  EXPECT_EQ(h.length, 256u);
}

TEST(MuxFrame, RandomRoundTrip) {
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    FrameHeader h;
    h.version = uint8_t(rng());
    h.type = uint8_t(rng());
    h.flags = uint16_t(rng());
    h.stream_id = uint32_t(rng());
    h.length = uint32_t(rng());
    Bytes12 b = encoded(h);
    FrameHeader d = decode_header(b);
    EXPECT_EQ(d.version, h.version);
    EXPECT_EQ(d.type, h.type);
    EXPECT_EQ(d.flags, h.flags);
    EXPECT_EQ(d.stream_id, h.stream_id);
    EXPECT_EQ(d.length, h.length);
    EXPECT_EQ(encoded(d), b);
  }
}

TEST(MuxFrame, DefaultHeaderIsVersion0DataOnStream0) {
  EXPECT_EQ(encoded(FrameHeader{}), Bytes12{});
}

TEST(MuxFrame, ToStr) {
  EXPECT_STREQ(to_str(FrameType::data), "data");
  EXPECT_STREQ(to_str(FrameType::window_update), "window_update");
  EXPECT_STREQ(to_str(FrameType::ping), "ping");
  EXPECT_STREQ(to_str(FrameType::go_away), "go_away");
  EXPECT_STREQ(to_str(FrameType(9)), "unknown");
}
