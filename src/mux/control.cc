#include "mux/control.h"

#include <algorithm>
#include <cstring>

#include "util/bytes.h"
#include "util/text.h"

namespace baton::mux {

namespace {

constexpr size_t kMessageHeader = 3;  // type u8 | length u16
constexpr size_t kFieldHeader = 3;    // tag u8 | length u16
constexpr size_t kMaxLength = 0xffff;
constexpr size_t kMaxClientId = 128;
constexpr size_t kU32Field = kFieldHeader + 4;
constexpr size_t kU64Field = kFieldHeader + 8;
constexpr size_t kSecretField = kFieldHeader + sizeof(ResumeSecret);
constexpr size_t kSessionIdField = kFieldHeader + sizeof(SessionId);

// Builds one message. Fields are appended in the order given; a message whose
// fields would exceed the u16 length has its string values shortened so that
// the output is always well formed (the header documents the bound). A
// fixed-size field is never cut: a value of the wrong size is malformed.
class MessageWriter {
 public:
  MessageWriter(ControlType type, std::vector<uint8_t>& out) : out_(out), start_(out.size()) {
    out_.push_back(uint8_t(type));
    out_.push_back(0);
    out_.push_back(0);
  }
  ~MessageWriter() { util::store_u16(&out_[start_ + 1], uint16_t(out_.size() - start_ - kMessageHeader)); }

  // A fixed-size field: written whole, or not at all when the fields before
  // it took the room (the `keep` of str() prevents that).
  void fixed(uint8_t tag, const void* data, size_t n) {
    if (room() >= kFieldHeader + n) field(tag, data, n);
  }
  // A string field, cut if need be so that `keep` bytes remain for the
  // fields written after it.
  void str(uint8_t tag, const std::string& s, size_t keep = 0) {
    if (room() < kFieldHeader) return;
    const size_t avail = room() - kFieldHeader;
    field(tag, s.data(), std::min(s.size(), avail > keep ? avail - keep : 0));
  }
  void u16(uint8_t tag, uint16_t v) {
    uint8_t b[2];
    util::store_u16(b, v);
    fixed(tag, b, sizeof b);
  }
  void u32(uint8_t tag, uint32_t v) {
    uint8_t b[4];
    util::store_u32(b, v);
    fixed(tag, b, sizeof b);
  }
  void u64(uint8_t tag, uint64_t v) {
    uint8_t b[8];
    util::store_u64(b, v);
    fixed(tag, b, sizeof b);
  }

 private:
  size_t room() const { return kMaxLength - (out_.size() - start_ - kMessageHeader); }
  void field(uint8_t tag, const void* data, size_t n) {
    out_.push_back(tag);
    out_.push_back(uint8_t(n >> 8));
    out_.push_back(uint8_t(n));
    const auto* p = static_cast<const uint8_t*>(data);
    out_.insert(out_.end(), p, p + n);
  }

  std::vector<uint8_t>& out_;
  size_t start_;
};

struct Field {
  uint8_t tag;
  std::span<const uint8_t> value;
};

std::string to_string(std::span<const uint8_t> v) { return std::string(util::as_chars(v)); }

// Walks the fields of one message body, calling take(field) for each; take
// returns an error text for a known field of the wrong size.
template <typename Take>
const char* for_each_field(std::span<const uint8_t> body, Take take) {
  while (!body.empty()) {
    if (body.size() < kFieldHeader) return "control field header overruns the message";
    const size_t n = util::load_u16(&body[1]);
    if (n > body.size() - kFieldHeader) return "control field overruns the message";
    const char* err = take(Field{body[0], body.subspan(kFieldHeader, n)});
    if (err) return err;
    body = body.subspan(kFieldHeader + n);
  }
  return nullptr;
}

const char* take_u16(const Field& f, uint16_t& out, const char* err) {
  if (f.value.size() != 2) return err;
  out = util::load_u16(f.value.data());
  return nullptr;
}

const char* take_u32(const Field& f, uint32_t& out, const char* err) {
  if (f.value.size() != 4) return err;
  out = util::load_u32(f.value.data());
  return nullptr;
}

const char* take_u64(const Field& f, uint64_t& out, const char* err) {
  if (f.value.size() != 8) return err;
  out = util::load_u64(f.value.data());
  return nullptr;
}

template <size_t N>
const char* take_bytes(const Field& f, std::array<uint8_t, N>& out, const char* err) {
  if (f.value.size() != N) return err;
  std::memcpy(out.data(), f.value.data(), N);
  return nullptr;
}

const char* decode_hello(std::span<const uint8_t> body, Hello& m) {
  // A resuming HELLO names the session, the secret and the offset: all three.
  std::optional<SessionId> session;
  std::optional<ResumeSecret> secret;
  std::optional<uint64_t> received;
  const char* err = for_each_field(body, [&](const Field& f) -> const char* {
    switch (f.tag) {
      case tag::version: {
        uint16_t v = 0;
        if (const char* err = take_u16(f, v, "HELLO version is not 2 bytes")) return err;
        m.version = v;
        return nullptr;
      }
      case tag::token: m.token = to_string(f.value); return nullptr;
      case tag::client_id:
        if (f.value.size() > kMaxClientId) return "HELLO client_id is longer than 128 bytes";
        // docs/protocol.md 3 says UTF-8; what is not cannot be shown or logged faithfully.
        if (!util::valid_utf8(util::as_chars(f.value))) return "HELLO client_id is not valid UTF-8";
        m.client_id = to_string(f.value);
        return nullptr;
      case tag::resume_capable:
        if (f.value.size() != 1) return "HELLO resume_capable is not 1 byte";
        m.resume_capable = f.value[0] != 0;
        return nullptr;
      case tag::resume_session_id:
        return take_bytes(f, session.emplace(), "HELLO resume_session_id is not 16 bytes");
      case tag::resume_secret: return take_bytes(f, secret.emplace(), "HELLO resume_secret is not 32 bytes");
      case tag::received: return take_u64(f, received.emplace(), "HELLO received is not 8 bytes");
      default: return nullptr;
    }
  });
  if (err) return err;
  if (session || secret || received) {
    if (!session) return "HELLO resume fields without resume_session_id";
    if (!secret) return "HELLO resume fields without resume_secret";
    if (!received) return "HELLO resume fields without received";
    m.resume = ResumeRequest{*session, *secret, *received};
  }
  return nullptr;
}

const char* decode_welcome(std::span<const uint8_t> body, Welcome& m) {
  return for_each_field(body, [&](const Field& f) -> const char* {
    switch (f.tag) {
      case tag::session_id:
        if (f.value.size() != m.session_id.size()) return "WELCOME session_id is not 16 bytes";
        std::memcpy(m.session_id.data(), f.value.data(), m.session_id.size());
        return nullptr;
      case tag::server_id: m.server_id = to_string(f.value); return nullptr;
      case tag::heartbeat_ms: return take_u32(f, m.heartbeat_ms, "WELCOME heartbeat_ms is not 4 bytes");
      case tag::stream_open_rate:
        return take_u32(f, m.stream_open_rate.emplace(), "WELCOME stream_open_rate is not 4 bytes");
      case tag::stream_open_burst:
        return take_u32(f, m.stream_open_burst.emplace(), "WELCOME stream_open_burst is not 4 bytes");
      case tag::max_streams: return take_u32(f, m.max_streams.emplace(), "WELCOME max_streams is not 4 bytes");
      case tag::resume_secret:
        return take_bytes(f, m.resume_secret.emplace(), "WELCOME resume_secret is not 32 bytes");
      case tag::resume_window_ms:
        return take_u32(f, m.resume_window_ms.emplace(), "WELCOME resume_window_ms is not 4 bytes");
      case tag::resume_address: m.resume_address = to_string(f.value); return nullptr;
      case tag::resume_refused: m.resume_refused = to_string(f.value); return nullptr;
      case tag::resume_refused_code:
        return take_u16(f, m.resume_refused_code.emplace(), "WELCOME resume_refused_code is not 2 bytes");
      default: return nullptr;
    }
  });
}

const char* decode_reject(std::span<const uint8_t> body, Reject& m) {
  return for_each_field(body, [&](const Field& f) -> const char* {
    switch (f.tag) {
      case tag::code: return take_u16(f, m.code, "REJECT code is not 2 bytes");
      case tag::reason: m.reason = to_string(f.value); return nullptr;
      case tag::retry_after_ms: {
        uint32_t v = 0;
        if (const char* err = take_u32(f, v, "REJECT retry_after_ms is not 4 bytes")) return err;
        m.retry_after_ms = v;
        return nullptr;
      }
      default: return nullptr;
    }
  });
}

const char* decode_drain(std::span<const uint8_t> body, Drain& m) {
  return for_each_field(body, [&](const Field& f) -> const char* {
    switch (f.tag) {
      case tag::reason: m.reason = to_string(f.value); return nullptr;
      case tag::grace_ms: return take_u32(f, m.grace_ms, "DRAIN grace_ms is not 4 bytes");
      case tag::reconnect_hint: m.reconnect_hint = to_string(f.value); return nullptr;
      default: return nullptr;
    }
  });
}

const char* decode_resumed(std::span<const uint8_t> body, Resumed& m) {
  bool received = false, secret = false, window = false;
  const char* err = for_each_field(body, [&](const Field& f) -> const char* {
    switch (f.tag) {
      case tag::received: received = true; return take_u64(f, m.received, "RESUMED received is not 8 bytes");
      case tag::resume_secret: secret = true; return take_bytes(f, m.secret, "RESUMED resume_secret is not 32 bytes");
      case tag::resume_window_ms:
        window = true;
        return take_u32(f, m.window_ms, "RESUMED resume_window_ms is not 4 bytes");
      default: return nullptr;
    }
  });
  if (err) return err;
  if (!received) return "RESUMED without received";
  if (!secret) return "RESUMED without resume_secret";
  if (!window) return "RESUMED without resume_window_ms";
  return nullptr;
}

const char* decode_received(std::span<const uint8_t> body, Received& m) {
  bool received = false;
  const char* err = for_each_field(body, [&](const Field& f) -> const char* {
    if (f.tag != tag::received) return nullptr;
    received = true;
    return take_u64(f, m.received, "RECEIVED received is not 8 bytes");
  });
  if (err) return err;
  return received ? nullptr : "RECEIVED without received";
}

}  // namespace

void encode(const Hello& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::hello, out);
  if (m.version) w.u16(tag::version, *m.version);
  const size_t resume = (m.resume_capable ? kFieldHeader + 1 : 0) +
                        (m.resume ? kSessionIdField + kSecretField + kU64Field : 0);
  w.str(tag::token, m.token, kFieldHeader + std::min(m.client_id.size(), kMaxClientId) + resume);
  w.str(tag::client_id, m.client_id, resume);
  if (m.resume_capable) {
    const uint8_t one = 1;
    w.fixed(tag::resume_capable, &one, 1);
  }
  if (m.resume) {
    w.fixed(tag::resume_session_id, m.resume->session_id.data(), m.resume->session_id.size());
    w.fixed(tag::resume_secret, m.resume->secret.data(), m.resume->secret.size());
    w.u64(tag::received, m.resume->received);
  }
}

void encode(const Welcome& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::welcome, out);
  w.fixed(tag::session_id, m.session_id.data(), m.session_id.size());
  const size_t limits = kU32Field * (size_t(m.stream_open_rate.has_value()) + m.stream_open_burst.has_value() +
                                     m.max_streams.has_value());
  const bool refused = m.resume_refused_code.has_value();
  // What follows the strings: always written whole (string fields shrink instead).
  const size_t refused_tail = refused ? kFieldHeader + 2 : 0;
  const size_t after_address = (refused ? kFieldHeader : 0) + refused_tail;
  const size_t resume = (m.resume_secret ? kSecretField : 0) + (m.resume_window_ms ? kU32Field : 0) +
                        (m.resume_address.empty() ? 0 : kFieldHeader) + after_address;
  w.str(tag::server_id, m.server_id, kU32Field + limits + resume);
  w.u32(tag::heartbeat_ms, m.heartbeat_ms);
  if (m.stream_open_rate) w.u32(tag::stream_open_rate, *m.stream_open_rate);
  if (m.stream_open_burst) w.u32(tag::stream_open_burst, *m.stream_open_burst);
  if (m.max_streams) w.u32(tag::max_streams, *m.max_streams);
  if (m.resume_secret) w.fixed(tag::resume_secret, m.resume_secret->data(), m.resume_secret->size());
  if (m.resume_window_ms) w.u32(tag::resume_window_ms, *m.resume_window_ms);
  if (!m.resume_address.empty()) w.str(tag::resume_address, m.resume_address, after_address);
  if (refused) {
    w.str(tag::resume_refused, m.resume_refused, refused_tail);
    w.u16(tag::resume_refused_code, *m.resume_refused_code);
  }
}

void encode(const Resumed& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::resumed, out);
  w.u64(tag::received, m.received);
  w.fixed(tag::resume_secret, m.secret.data(), m.secret.size());
  w.u32(tag::resume_window_ms, m.window_ms);
}

void encode(const Received& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::received, out);
  w.u64(tag::received, m.received);
}

void encode(const Reject& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::reject, out);
  w.u16(tag::code, m.code);
  w.str(tag::reason, m.reason, m.retry_after_ms ? kU32Field : 0);
  if (m.retry_after_ms) w.u32(tag::retry_after_ms, *m.retry_after_ms);
}

void encode(const Drain& m, std::vector<uint8_t>& out) {
  MessageWriter w(ControlType::drain, out);
  w.str(tag::reason, m.reason, kU32Field + (m.reconnect_hint.empty() ? 0 : kFieldHeader));
  w.u32(tag::grace_ms, m.grace_ms);
  if (!m.reconnect_hint.empty()) w.str(tag::reconnect_hint, m.reconnect_hint);
}

DecodeResult decode(std::span<const uint8_t> in, ControlMessage& msg) {
  if (in.size() < kMessageHeader) return {};
  const size_t length = util::load_u16(&in[1]);
  if (in.size() < kMessageHeader + length) return {};
  const auto body = in.subspan(kMessageHeader, length);
  const size_t used = kMessageHeader + length;
  msg = ControlMessage{};
  msg.type = in[0];
  const char* err = nullptr;
  switch (msg.type) {
    case uint8_t(ControlType::hello): err = decode_hello(body, msg.hello.emplace()); break;
    case uint8_t(ControlType::welcome): err = decode_welcome(body, msg.welcome.emplace()); break;
    case uint8_t(ControlType::reject): err = decode_reject(body, msg.reject.emplace()); break;
    case uint8_t(ControlType::drain): err = decode_drain(body, msg.drain.emplace()); break;
    case uint8_t(ControlType::resumed): err = decode_resumed(body, msg.resumed.emplace()); break;
    case uint8_t(ControlType::received): err = decode_received(body, msg.received.emplace()); break;
    default: break;  // unknown message type: the caller ignores it
  }
  if (err) {
    msg = ControlMessage{};
    return {DecodeStatus::malformed, 0, err};
  }
  return {DecodeStatus::message, used, nullptr};
}

DecodeResult decode(const util::ByteQueue& in, ControlMessage& msg) {
  uint8_t header[kMessageHeader];
  if (in.peek(header) < kMessageHeader) return {};
  const size_t total = kMessageHeader + util::load_u16(&header[1]);
  if (in.size() < total) return {};
  std::vector<uint8_t> message(total);
  in.peek(message);
  return decode(message, msg);
}

const char* to_str(ResumeRefusedCode c) {
  switch (c) {
    case ResumeRefusedCode::unknown_session: return "unknown_session";
    case ResumeRefusedCode::credentials: return "credentials";
    case ResumeRefusedCode::offsets: return "offsets";
    case ResumeRefusedCode::unavailable: return "unavailable";
  }
  return "unknown";
}

const char* to_str(DecodeStatus s) {
  switch (s) {
    case DecodeStatus::message: return "message";
    case DecodeStatus::need_more: return "need_more";
    case DecodeStatus::malformed: return "malformed";
  }
  return "unknown";
}

PreambleResult decode_preamble(std::span<const uint8_t> in) {
  PreambleResult r;
  if (in.empty()) return r;
  const size_t n = in[0];
  if (n == 0) {
    r.status = PreambleStatus::malformed;
    return r;
  }
  if (in.size() < 1 + n) return r;
  const auto name = in.subspan(1, n);
  if (!std::all_of(name.begin(), name.end(), [](uint8_t c) { return c >= 0x21 && c <= 0x7e; })) {
    r.status = PreambleStatus::malformed;
    return r;
  }
  r.status = PreambleStatus::route;
  r.used = 1 + n;
  r.route = to_string(name);
  return r;
}

void encode_preamble(const std::string& route, std::vector<uint8_t>& out) {
  const size_t n = std::min<size_t>(route.size(), 255);
  out.push_back(uint8_t(n));
  out.insert(out.end(), route.begin(), route.begin() + ptrdiff_t(n));
}

const char* to_str(PreambleStatus s) {
  switch (s) {
    case PreambleStatus::route: return "route";
    case PreambleStatus::need_more: return "need_more";
    case PreambleStatus::malformed: return "malformed";
  }
  return "unknown";
}

}  // namespace baton::mux
