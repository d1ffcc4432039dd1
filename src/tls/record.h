// The TLS 1.2 application-data record layer (RFC 5246 section 6.2, AEAD only).
//
// mbedTLS runs the handshake; once both Finished messages have been exchanged
// this layer takes over with the keys mbedTLS exported and the sequence
// numbers its context held, and seals and opens with OpenSSL's EVP AEADs.
// All of it is RecordState, a plain struct that the hot-restart codec moves
// to another process; the cipher contexts are the thread's, keyed from it.
//
// Sans-IO: ciphertext in through open(), plaintext out through its result;
// plaintext in through seal(), records out through output().
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "util/byte_queue.h"

namespace baton::tls {

// IANA ids of the suites docs/protocol.md allows.
namespace suite {
constexpr uint16_t ecdhe_ecdsa_aes128_gcm_sha256 = 0xC02B;
constexpr uint16_t ecdhe_rsa_aes128_gcm_sha256 = 0xC02F;
constexpr uint16_t ecdhe_ecdsa_aes256_gcm_sha384 = 0xC02C;
constexpr uint16_t ecdhe_rsa_aes256_gcm_sha384 = 0xC030;
constexpr uint16_t ecdhe_ecdsa_chacha20_poly1305 = 0xCCA9;
constexpr uint16_t ecdhe_rsa_chacha20_poly1305 = 0xCCA8;
}  // namespace suite

enum class Cipher : uint8_t { aes128_gcm = 0, aes256_gcm = 1, chacha20_poly1305 = 2 };
// The cipher of a suite id; false if the suite is not one docs/protocol.md allows.
[[nodiscard]] bool cipher_of_suite(uint16_t suite_id, Cipher& out);
size_t key_length(Cipher c);     // 16 or 32
size_t fixed_iv_length(Cipher c);  // 4 (GCM salt) or 12 (ChaCha20-Poly1305)
const char* to_str(Cipher c);
// Empty when OpenSSL's libcrypto provides every record cipher, else why not.
// Checked once at start-up, before any tunnel exists.
std::string record_ciphers_ready();

enum class Side : uint8_t { client = 0, server = 1 };

enum class ContentType : uint8_t { change_cipher_spec = 20, alert = 21, handshake = 22, application_data = 23 };

namespace alert {
constexpr uint8_t close_notify = 0;
constexpr uint8_t unexpected_message = 10;
constexpr uint8_t bad_record_mac = 20;
constexpr uint8_t record_overflow = 22;
constexpr uint8_t handshake_failure = 40;
constexpr uint8_t decode_error = 50;
constexpr uint8_t protocol_version = 70;
constexpr uint8_t internal_error = 80;
constexpr uint8_t no_renegotiation = 100;
}  // namespace alert

constexpr size_t kMaxPlaintext = 16384;
constexpr size_t kHeaderSize = 5;
constexpr size_t kTagSize = 16;
constexpr size_t kExplicitNonceGcm = 8;
// RFC 5246 6.2.3: ciphertext may exceed the plaintext limit by at most 2048.
constexpr size_t kMaxCiphertext = kMaxPlaintext + 2048;
// Worst-case bytes a sealed record adds to its plaintext.
constexpr size_t kMaxOverhead = kHeaderSize + kExplicitNonceGcm + kTagSize;
// Size of the scratch buffer open() needs: room for a plaintext and, behind
// it, a whole record reassembled from pieces.
constexpr size_t kScratchSize = kMaxPlaintext + kHeaderSize + kMaxCiphertext;

struct DirectionState {
  std::array<uint8_t, 32> key{};  // key_length(cipher) bytes used
  std::array<uint8_t, 12> iv{};   // fixed_iv_length(cipher) bytes used
  uint64_t seq = 0;               // sequence number of the next record
};

struct RecordState {
  uint16_t suite = 0;
  Side side = Side::server;
  DirectionState read;
  DirectionState write;
  bool close_notify_received = false;
  bool close_notify_sent = false;
  util::ByteQueue partial_input;  // the start of a record whose end has not arrived
  util::ByteQueue output;         // sealed records not yet written to the socket
};

enum class OpenStatus : uint8_t {
  data = 0,       // one application_data record opened: plaintext (maybe empty)
  need_more = 1,  // all input taken, the record is incomplete (kept in partial_input)
  closed = 2,     // close_notify received: orderly end of the peer's stream
  fatal = 3,      // the connection must end; send_alert tells whether to send an alert first
};
const char* to_str(OpenStatus s);

struct Opened {
  OpenStatus status = OpenStatus::need_more;
  size_t used = 0;                          // bytes of the input taken
  std::span<const uint8_t> plaintext;       // with status data: points into the scratch buffer
  uint8_t alert = 0;                        // with fatal: alert description to send (if send_alert)
  bool send_alert = false;                  // with fatal: false when the peer sent a fatal alert itself
  bool alert_warning = false;               // with fatal: send at warning level (no_renegotiation)
  const char* reason = "";                  // static text for logs
};

class RecordLayer {
 public:
  // Precondition: cipher_of_suite(state.suite) holds (the handshake and the
  // handoff codec check it). A layer owns no cipher context: the thread's
  // shared ones are keyed from the state for each record (record.cc). So a
  // layer is used on one thread, the one that destroys it.
  explicit RecordLayer(RecordState state);
  ~RecordLayer();
  RecordLayer(const RecordLayer&) = delete;
  RecordLayer& operator=(const RecordLayer&) = delete;

  // Opens at most one record from partial_input followed by `in`. `scratch`
  // must hold kScratchSize bytes; the returned plaintext lives there until
  // the next call. Call again with in.subspan(used) until need_more.
  [[nodiscard]] Opened open(std::span<const uint8_t> in, std::span<uint8_t> scratch);
  // Keeps `in` unopened, behind partial_input: open({}) takes its records
  // later (records that belong to whoever this layer is handed to next).
  void keep_input(std::span<const uint8_t> in) { st_.partial_input.append(in); }
  // Whole or partial records kept (keep_input, or read past a handshake).
  bool has_input() const { return !st_.partial_input.empty(); }

  // Seals `data` as application_data records of at most kMaxPlaintext bytes
  // each and appends them to output(). Precondition: !close_notify_sent.
  void seal(std::span<const uint8_t> data);
  // Seals all of q (a yamux session's output) as application_data records
  // of up to kMaxPlaintext bytes, full-size where q allows: small frames
  // (window updates, acks) share a record instead of each taking one. q is
  // empty afterwards. Precondition: !close_notify_sent.
  void seal_from(util::ByteQueue& q);
  // Seals one record of the given type (data.size() <= kMaxPlaintext).
  void seal_record(ContentType type, std::span<const uint8_t> data);
  // Seals an alert; a close_notify also sets close_notify_sent.
  void seal_alert(uint8_t description, bool fatal);

  // True once the cipher failed (OpenSSL could not set up a context or seal
  // a record): nothing more is sealed, open() reports fatal; the owner
  // closes the connection. Not expected outside memory exhaustion.
  bool broken() const { return broken_; }

  util::ByteQueue& output() { return st_.output; }
  const RecordState& state() const { return st_; }
  // Moves the state out for handoff; the layer must not be used afterwards.
  RecordState take_state();
  Cipher cipher() const { return cipher_; }

 private:
  Opened open_record(const uint8_t* rec, size_t len, std::span<uint8_t> scratch);
  RecordState st_;
  Cipher cipher_;
  bool broken_ = false;
  uint64_t id_;  // names this layer's key in the thread's cipher contexts
  // [open, seal]: the slot of the thread's contexts that holds this layer's
  // key, if any does (a context keyed for a layer is only ever at its hint).
  uint8_t slot_hint_[2] = {0, 0};
};

}  // namespace baton::tls
