// libFuzzer target for the TLS 1.2 record layer's open path (src/tls/record.h),
// driven by a byte script (tests/fuzz/script.h, record_script).
//
// Two RecordLayers share fixed keys, as after a handshake: the peer (client
// side) seals records of any content type and size the script asks for, the
// opener (server side) opens what the script delivers in pieces of its
// choosing. The script may also put raw bytes on the wire, flip bits of
// undelivered bytes, move wire bytes into the opener's partial_input (bytes
// a handshake read past its Finished) and rebuild the opener from its
// exported state (what the handoff does).
//
// Properties, beyond "no crash, no leak, no undefined behaviour":
//   - open() takes at most its input, makes progress on every call, and
//     need_more means everything was taken; plaintext lies in the scratch
//     buffer and is at most 2^14 bytes; a fatal result names its reason;
//   - after close_notify every later call is `closed` and swallows its input;
//   - while the wire holds only what the peer sealed (no raw bytes, no
//     flipped bits), every record comes out exactly as a model of RFC 5246
//     and docs/protocol.md says: application data intact and in order, warning
//     alerts ignored, close_notify closes, a fatal alert ends without an
//     alert of our own, a handshake message is refused as renegotiation,
//     anything else is unexpected, and nothing opens at sequence 2^64-1.
//
// Build and run: tests/fuzz/run.sh SECONDS tls_record. Seeds:
// tests/fuzz/corpus/tls_record/ (tests/fuzz/run.sh --regen-corpus).
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <vector>

#include "script.h"
#include "tls/record.h"

using namespace baton;
using fuzz::require;
namespace rs = fuzz::record_script;
using V = std::vector<uint8_t>;

namespace {

constexpr uint16_t kSuites[] = {
    tls::suite::ecdhe_ecdsa_aes128_gcm_sha256, tls::suite::ecdhe_rsa_aes128_gcm_sha256,
    tls::suite::ecdhe_ecdsa_aes256_gcm_sha384, tls::suite::ecdhe_rsa_aes256_gcm_sha384,
    tls::suite::ecdhe_ecdsa_chacha20_poly1305, tls::suite::ecdhe_rsa_chacha20_poly1305,
};

// Fixed keys: client-to-server and server-to-client differ.
tls::RecordState make_state(tls::Side side, uint16_t suite, uint64_t seq) {
  tls::Cipher c{};
  require(tls::cipher_of_suite(suite, c), "a docs/protocol.md suite");
  tls::RecordState st;
  st.suite = suite;
  st.side = side;
  tls::DirectionState c2s, s2c;
  for (size_t i = 0; i < tls::key_length(c); ++i) c2s.key[i] = uint8_t(i + 1), s2c.key[i] = uint8_t(i + 101);
  for (size_t i = 0; i < tls::fixed_iv_length(c); ++i) c2s.iv[i] = uint8_t(i + 51), s2c.iv[i] = uint8_t(i + 151);
  c2s.seq = s2c.seq = seq;
  st.write = side == tls::Side::client ? c2s : s2c;
  st.read = side == tls::Side::client ? s2c : c2s;
  return st;
}

// What opening a record the peer sealed must give.
struct Expected {
  tls::OpenStatus status = tls::OpenStatus::data;
  V plaintext;
  uint8_t alert = 0;
  bool send_alert = false;
  bool alert_warning = false;
};

Expected fatal(uint8_t alert, bool send_alert = true) {
  Expected e;
  e.status = tls::OpenStatus::fatal;
  e.alert = alert;
  e.send_alert = send_alert;
  return e;
}

Expected model(uint8_t type, std::span<const uint8_t> plain, uint64_t seq) {
  if (seq == UINT64_MAX) return fatal(tls::alert::internal_error);
  Expected e;
  switch (tls::ContentType(type)) {
    case tls::ContentType::application_data: e.plaintext.assign(plain.begin(), plain.end()); return e;
    case tls::ContentType::alert:
      if (plain.size() != 2) return fatal(tls::alert::decode_error);
      if (plain[1] == tls::alert::close_notify) {
        e.status = tls::OpenStatus::closed;
        return e;
      }
      if (plain[0] == 1 && plain[1] != tls::alert::no_renegotiation) return e;  // warning: ignored
      return fatal(plain[1], false);
    case tls::ContentType::handshake:
      if (plain.empty()) return fatal(tls::alert::unexpected_message);
      e = fatal(tls::alert::no_renegotiation);
      e.alert_warning = true;
      return e;
    default: return fatal(tls::alert::unexpected_message);
  }
}

class Harness {
 public:
  Harness(uint16_t suite, uint64_t seq)
      : peer_(make_state(tls::Side::client, suite, seq)),
        opener_(std::make_unique<tls::RecordLayer>(make_state(tls::Side::server, suite, seq))) {}

  void raw(std::span<const uint8_t> b) {
    tainted_ = true;
    wire_.insert(wire_.end(), b.begin(), b.end());
  }
  void seal(uint8_t type, std::span<const uint8_t> plain) {
    expected_.push_back(model(type, plain, peer_.state().write.seq));
    peer_.seal_record(tls::ContentType(type), plain);
    V out = peer_.output().to_vector();
    peer_.output().pop(out.size());
    wire_.insert(wire_.end(), out.begin(), out.end());
  }
  void corrupt(uint16_t pos, uint8_t mask) {
    if (wire_.empty()) return;
    tainted_ = true;
    wire_[pos % wire_.size()] ^= uint8_t(mask | 1);
  }
  void rebuild() { opener_ = std::make_unique<tls::RecordLayer>(opener_->take_state()); }
  void preload(size_t n) {
    n = std::min(n, wire_.size());
    tls::RecordState st = opener_->take_state();
    st.partial_input.append(std::span(wire_).first(n));
    wire_.erase(wire_.begin(), wire_.begin() + ptrdiff_t(n));
    opener_ = std::make_unique<tls::RecordLayer>(std::move(st));
    preloaded_ = true;
  }

  void deliver(size_t n) {
    if (failed_) return;
    static V scratch(tls::kScratchSize);
    n = std::min(n, wire_.size());
    std::span<const uint8_t> in = std::span(wire_).first(n);
    if (closed_) {
      tls::Opened o = opener_->open(in, scratch);
      require(o.status == tls::OpenStatus::closed && o.used == in.size(), "after close_notify, input is swallowed");
      return drop(n);
    }
    // Every record is at least a header: a bound on the calls this may take.
    size_t calls = (in.size() + opener_->state().partial_input.size()) / tls::kHeaderSize + 2;
    while (true) {
      require(calls-- > 0, "open() makes progress");
      tls::Opened o = opener_->open(in, scratch);
      require(o.used <= in.size(), "open() takes at most its input");
      in = in.subspan(o.used);
      if (o.status == tls::OpenStatus::need_more) {
        require(in.empty(), "need_more takes the whole input");
        require(preloaded_ || opener_->state().partial_input.size() < tls::kHeaderSize + tls::kMaxCiphertext,
                "a partial record is shorter than the longest record");
        break;
      }
      check(o, scratch);
      if (o.status == tls::OpenStatus::fatal) failed_ = true;
      if (o.status == tls::OpenStatus::closed) closed_ = true;
      if (o.status != tls::OpenStatus::data) break;
    }
    drop(n - in.size());
  }

 private:
  void drop(size_t n) { wire_.erase(wire_.begin(), wire_.begin() + ptrdiff_t(n)); }

  void check(const tls::Opened& o, std::span<const uint8_t> scratch) {
    if (o.status == tls::OpenStatus::data) {
      require(o.plaintext.size() <= tls::kMaxPlaintext, "plaintext of at most 2^14 bytes");
      require(o.plaintext.empty() || (o.plaintext.data() >= scratch.data() &&
                                      o.plaintext.data() + o.plaintext.size() <= scratch.data() + scratch.size()),
              "plaintext lies in the scratch buffer");
    }
    if (o.status == tls::OpenStatus::fatal) require(o.reason && *o.reason, "a fatal result names its reason");
    if (tainted_) return;
    require(!expected_.empty(), "only records the peer sealed come out");
    const Expected e = std::move(expected_.front());
    expected_.pop_front();
    require(o.status == e.status, "each record opens as the model says");
    if (o.status == tls::OpenStatus::data)
      require(std::equal(o.plaintext.begin(), o.plaintext.end(), e.plaintext.begin(), e.plaintext.end()),
              "application data arrives intact and in order");
    if (o.status == tls::OpenStatus::fatal)
      require(o.alert == e.alert && o.send_alert == e.send_alert && o.alert_warning == e.alert_warning,
              "a fatal record gives the alert the model says");
  }

  tls::RecordLayer peer_;
  std::unique_ptr<tls::RecordLayer> opener_;
  V wire_;
  std::deque<Expected> expected_;
  bool tainted_ = false;    // the wire holds bytes the peer did not seal
  bool preloaded_ = false;  // partial_input may hold several records
  bool closed_ = false;
  bool failed_ = false;
};

uint8_t content_type(uint8_t b) {
  switch (b % 8) {
    case 4: return uint8_t(tls::ContentType::alert);
    case 5: return uint8_t(tls::ContentType::handshake);
    case 6: return uint8_t(tls::ContentType::change_cipher_spec);
    case 7: return uint8_t(b >> 3);  // anything, mostly not a TLS type
    default: return uint8_t(tls::ContentType::application_data);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::ScriptReader r({data, size});
  const uint16_t suite = kSuites[r.u8() % std::size(kSuites)];
  uint64_t seq = 1;
  switch (r.u8() & 3) {
    case 1: seq = UINT64_MAX - 3; break;
    case 2: seq = r.u64(); break;
    case 3: seq = 0; break;
  }
  Harness h(suite, seq);
  V plain;
  while (!r.done()) {
    switch (r.u8() % rs::op_count) {
      case rs::raw: h.raw(r.bytes(r.u16())); break;
      case rs::seal: {
        const uint8_t type = content_type(r.u8());
        const size_t n = r.u16() % (tls::kMaxPlaintext + 1);
        const uint8_t fill = r.u8();
        if (fill == 0) {
          auto b = r.bytes(n);
          plain.assign(b.begin(), b.end());
        } else {
          plain.resize(n);
          for (size_t i = 0; i < n; ++i) plain[i] = uint8_t(fill * (i + 1));
        }
        h.seal(type, plain);
        break;
      }
      case rs::alert: {
        const uint8_t a[2] = {r.u8(), r.u8()};
        h.seal(uint8_t(tls::ContentType::alert), a);
        break;
      }
      case rs::deliver: h.deliver(r.u16()); break;
      case rs::corrupt: {
        const uint16_t pos = r.u16();
        h.corrupt(pos, r.u8());
        break;
      }
      case rs::rebuild: h.rebuild(); break;
      case rs::preload: h.preload(r.u16()); break;
    }
  }
  h.deliver(SIZE_MAX);
  return 0;
}
