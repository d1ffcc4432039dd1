#include "tls/record.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#include "util/bytes.h"

namespace baton::tls {

using util::load_u16;
using util::store_u16;
using util::store_u64;

bool cipher_of_suite(uint16_t id, Cipher& out) {
  switch (id) {
    case suite::ecdhe_ecdsa_aes128_gcm_sha256:
    case suite::ecdhe_rsa_aes128_gcm_sha256: out = Cipher::aes128_gcm; return true;
    case suite::ecdhe_ecdsa_aes256_gcm_sha384:
    case suite::ecdhe_rsa_aes256_gcm_sha384: out = Cipher::aes256_gcm; return true;
    case suite::ecdhe_ecdsa_chacha20_poly1305:
    case suite::ecdhe_rsa_chacha20_poly1305: out = Cipher::chacha20_poly1305; return true;
    default: return false;
  }
}

size_t key_length(Cipher c) { return c == Cipher::aes128_gcm ? 16 : 32; }
size_t fixed_iv_length(Cipher c) { return c == Cipher::chacha20_poly1305 ? 12 : 4; }

const char* to_str(Cipher c) {
  switch (c) {
    case Cipher::aes128_gcm: return "AES-128-GCM";
    case Cipher::aes256_gcm: return "AES-256-GCM";
    case Cipher::chacha20_poly1305: return "CHACHA20-POLY1305";
  }
  return "?";
}

const char* to_str(OpenStatus s) {
  switch (s) {
    case OpenStatus::data: return "data";
    case OpenStatus::need_more: return "need_more";
    case OpenStatus::closed: return "closed";
    case OpenStatus::fatal: return "fatal";
  }
  return "?";
}

namespace {

// The EVP_CIPHER of each suite, fetched once per process (OpenSSL 3 looks a
// cipher up in its provider on every implicit fetch; an explicit one is
// reused by every context).
const EVP_CIPHER* evp_cipher(Cipher c) {
  static EVP_CIPHER* const aes128 = EVP_CIPHER_fetch(nullptr, "AES-128-GCM", nullptr);
  static EVP_CIPHER* const aes256 = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
  static EVP_CIPHER* const chacha = EVP_CIPHER_fetch(nullptr, "ChaCha20-Poly1305", nullptr);
  switch (c) {
    case Cipher::aes128_gcm: return aes128;
    case Cipher::aes256_gcm: return aes256;
    case Cipher::chacha20_poly1305: return chacha;
  }
  return nullptr;
}

}  // namespace

std::string record_ciphers_ready() {
  for (Cipher c : {Cipher::aes128_gcm, Cipher::aes256_gcm, Cipher::chacha20_poly1305})
    if (!evp_cipher(c)) return std::string("OpenSSL's libcrypto does not provide ") + to_str(c);
  return "";
}

// The cipher contexts of this thread, shared by every record layer the
// thread runs: per cipher and direction, kSlots contexts, each keyed for one
// layer; a layer that has none gets the least recently used one, re-keyed.
// So a tunnel holds no cipher context of its own: an idle one costs only its
// RecordState, not the 2.3 KiB of two OpenSSL 3 contexts, and busy tunnels
// (up to kSlots at a time) keep theirs keyed. Re-keying costs about 0.14 us
// (AES-128-GCM; ChaCha20 0.04 us). OpenSSL, not mbedTLS, does the bulk
// cryptography: its AES-GCM is about twenty times faster than mbedTLS 2.28's
// here (docs/design.md, "Record cryptography").
namespace {

constexpr size_t kSlots = 32;  // fits the uint8_t slot hints of RecordLayer

struct Keyed {
  EVP_CIPHER_CTX* ctx = nullptr;
  uint64_t owner = 0;  // the record layer whose key is loaded (0: none)
  uint64_t used = 0;   // ThreadCiphers::clock at the last use
};

struct ThreadCiphers {
  Keyed slots[3][2][kSlots];  // [Cipher][0 open, 1 seal][slot]
  uint64_t clock = 0;
  ThreadCiphers() = default;
  ThreadCiphers(const ThreadCiphers&) = delete;
  ThreadCiphers& operator=(const ThreadCiphers&) = delete;
  ~ThreadCiphers() {
    for (auto& c : slots)
      for (auto& d : c)
        for (Keyed& k : d) EVP_CIPHER_CTX_free(k.ctx);  // cleanses the key schedule
  }
};

thread_local ThreadCiphers t_ciphers;
std::atomic<uint64_t> g_next_layer_id{1};

// A context for (c, seal) keyed with `key` for layer `id`, or nullptr if
// OpenSSL fails. `hint`: the layer's slot. Only this function gives a slot
// an owner, and it points the owner's hint at it, so a context holding the
// layer's key is at the hint or nowhere: a miss re-keys the least recently
// used one.
EVP_CIPHER_CTX* keyed(Cipher c, bool seal, uint64_t id, const uint8_t* key, uint8_t& hint) {
  Keyed* set = t_ciphers.slots[size_t(c)][seal ? 1 : 0];
  uint64_t now = ++t_ciphers.clock;
  if (set[hint].owner == id && set[hint].ctx) {
    set[hint].used = now;
    return set[hint].ctx;
  }
  Keyed* victim = &set[0];
  for (Keyed& k : std::span<Keyed>(set, kSlots))
    if (k.used < victim->used) victim = &k;
  hint = uint8_t(victim - set);
  Keyed& k = *victim;
  bool fresh = !k.ctx;
  if (fresh && !(k.ctx = EVP_CIPHER_CTX_new())) return nullptr;
  k.owner = 0;
  if (EVP_CipherInit_ex2(k.ctx, fresh ? evp_cipher(c) : nullptr, key, nullptr, fresh ? int(seal) : -1, nullptr) != 1) {
    EVP_CIPHER_CTX_free(k.ctx);
    k.ctx = nullptr;
    k.used = 0;
    return nullptr;
  }
  k.owner = id;
  k.used = now;
  return k.ctx;
}

// A layer is gone (or its state moved out): no context keeps its key. Its
// contexts, if any, are at its hints (see keyed).
void forget(Cipher c, uint64_t id, const uint8_t hints[2]) {
  for (int seal = 0; seal < 2; ++seal) {
    Keyed& k = t_ciphers.slots[size_t(c)][seal][hints[seal]];
    if (k.owner != id) continue;
    EVP_CIPHER_CTX_free(k.ctx);  // cleanses the key schedule
    k = Keyed{};
  }
}

// RFC 5288 (GCM: salt || explicit seq) and RFC 7905 (ChaCha: iv XOR seq).
void make_nonce(Cipher c, const DirectionState& d, uint8_t out[12]) {
  if (c == Cipher::chacha20_poly1305) {
    std::memcpy(out, d.iv.data(), 12);
    uint8_t s[8];
    store_u64(s, d.seq);
    for (int i = 0; i < 8; ++i) out[4 + i] ^= s[i];
  } else {
    std::memcpy(out, d.iv.data(), 4);
    store_u64(out + 4, d.seq);
  }
}

bool aead_seal(EVP_CIPHER_CTX* ctx, const uint8_t nonce[12], const uint8_t aad[13], const uint8_t* in, size_t n,
               uint8_t* out, uint8_t* tag) {
  int len = 0, fin = 0;
  return EVP_CipherInit_ex2(ctx, nullptr, nullptr, nonce, -1, nullptr) == 1 &&
         EVP_CipherUpdate(ctx, nullptr, &len, aad, 13) == 1 && EVP_CipherUpdate(ctx, out, &len, in, int(n)) == 1 &&
         EVP_CipherFinal_ex(ctx, out + len, &fin) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, int(kTagSize), tag) == 1;
}

bool aead_open(EVP_CIPHER_CTX* ctx, const uint8_t nonce[12], const uint8_t aad[13], const uint8_t* in, size_t n,
               const uint8_t* tag, uint8_t* out) {
  int len = 0, fin = 0;
  return EVP_CipherInit_ex2(ctx, nullptr, nullptr, nonce, -1, nullptr) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, int(kTagSize), const_cast<uint8_t*>(tag)) == 1 &&
         EVP_CipherUpdate(ctx, nullptr, &len, aad, 13) == 1 && EVP_CipherUpdate(ctx, out, &len, in, int(n)) == 1 &&
         EVP_CipherFinal_ex(ctx, out + len, &fin) == 1;
}

}  // namespace

static void make_aad(uint64_t seq, uint8_t type, size_t plain_len, uint8_t aad[13]) {
  store_u64(aad, seq);
  aad[8] = type;
  aad[9] = 3;
  aad[10] = 3;
  store_u16(aad + 11, uint16_t(plain_len));
}

RecordLayer::RecordLayer(RecordState state)
    : st_(std::move(state)), cipher_(Cipher::aes128_gcm), id_(g_next_layer_id.fetch_add(1)) {
  (void)cipher_of_suite(st_.suite, cipher_);
}

RecordLayer::~RecordLayer() { forget(cipher_, id_, slot_hint_); }

RecordState RecordLayer::take_state() {
  forget(cipher_, id_, slot_hint_);
  return std::move(st_);
}

static Opened need_more(size_t used) {
  Opened o;
  o.used = used;
  return o;
}

static Opened fatal(uint8_t alert, const char* reason) {
  Opened o;
  o.status = OpenStatus::fatal;
  o.alert = alert;
  o.send_alert = true;
  o.reason = reason;
  return o;
}

static Opened cipher_failed() {
  Opened o = fatal(alert::internal_error, "the record cipher failed");
  o.send_alert = false;  // nothing can be sealed any more
  return o;
}

Opened RecordLayer::open(std::span<const uint8_t> in, std::span<uint8_t> scratch) {
  if (broken_) return cipher_failed();
  if (st_.close_notify_received) {
    Opened o;
    o.status = OpenStatus::closed;
    o.used = in.size();  // bytes after close_notify are ignored (RFC 5246 7.2.1)
    return o;
  }
  size_t have = st_.partial_input.size();
  if (have == 0) {
    // Fast path: a whole record sits in `in`; open it in place, no copy.
    if (in.size() >= kHeaderSize) {
      size_t len = load_u16(in.data() + 3);
      if (len > kMaxCiphertext) return fatal(alert::record_overflow, "record longer than 2^14+2048");
      if (in.size() >= kHeaderSize + len) {
        Opened o = open_record(in.data(), kHeaderSize + len, scratch);
        if (o.status != OpenStatus::fatal) o.used = kHeaderSize + len;
        return o;
      }
    }
    st_.partial_input.append(in);
    Opened o;
    o.used = in.size();
    return o;
  }
  // Slow path: complete the partial record from `in`.
  size_t used = 0;
  if (have < kHeaderSize) {
    size_t take = std::min(kHeaderSize - have, in.size());
    st_.partial_input.append(in.first(take));
    used += take;
    have += take;
    if (have < kHeaderSize) return need_more(used);
  }
  uint8_t hdr[kHeaderSize];
  st_.partial_input.peek(hdr);
  size_t len = load_u16(hdr + 3);
  if (len > kMaxCiphertext) return fatal(alert::record_overflow, "record longer than 2^14+2048");
  size_t want = kHeaderSize + len;
  // partial_input may hold more than one record (bytes the handshake read
  // past its Finished): then nothing is taken from `in` yet.
  size_t take = have >= want ? 0 : std::min(want - have, in.size() - used);
  st_.partial_input.append(in.subspan(used, take));
  used += take;
  if (st_.partial_input.size() < want) return need_more(used);
  // The record is whole: copy it behind the plaintext area of scratch.
  std::span<uint8_t> rec = scratch.subspan(kMaxPlaintext, want);
  st_.partial_input.peek(rec);
  st_.partial_input.pop(want);
  Opened o = open_record(rec.data(), want, scratch);
  if (o.status != OpenStatus::fatal) o.used = used;
  return o;
}

Opened RecordLayer::open_record(const uint8_t* rec, size_t len, std::span<uint8_t> scratch) {
  uint8_t type = rec[0];
  if (rec[1] != 3 || rec[2] != 3) return fatal(alert::protocol_version, "record version is not TLS 1.2");
  size_t body = len - kHeaderSize;
  size_t explicit_len = cipher_ == Cipher::chacha20_poly1305 ? 0 : kExplicitNonceGcm;
  if (body < explicit_len + kTagSize) return fatal(alert::bad_record_mac, "record shorter than nonce and tag");
  size_t plain_len = body - explicit_len - kTagSize;
  if (plain_len > kMaxPlaintext) return fatal(alert::record_overflow, "plaintext longer than 2^14");
  if (st_.read.seq == UINT64_MAX) return fatal(alert::internal_error, "read sequence number exhausted");

  EVP_CIPHER_CTX* ctx = keyed(cipher_, false, id_, st_.read.key.data(), slot_hint_[0]);
  if (!ctx) {
    broken_ = true;
    return cipher_failed();
  }
  uint8_t nonce[12];
  make_nonce(cipher_, st_.read, nonce);
  // GCM: the nonce's explicit part travels in the record; the sender chooses
  // it. mbedTLS uses the sequence number, but any value is valid.
  if (explicit_len) std::memcpy(nonce + 4, rec + kHeaderSize, explicit_len);
  uint8_t aad[13];
  make_aad(st_.read.seq, type, plain_len, aad);
  const uint8_t* ct = rec + kHeaderSize + explicit_len;
  uint8_t* out = scratch.data();
  if (!aead_open(ctx, nonce, aad, ct, plain_len, ct + plain_len, out))
    return fatal(alert::bad_record_mac, "record authentication failed");
  st_.read.seq++;

  Opened o;
  switch (ContentType(type)) {
    case ContentType::application_data:
      o.status = OpenStatus::data;
      o.plaintext = {out, plain_len};
      return o;
    case ContentType::alert: {
      if (plain_len != 2) return fatal(alert::decode_error, "alert record of wrong length");
      if (out[1] == alert::close_notify) {
        st_.close_notify_received = true;
        o.status = OpenStatus::closed;
        return o;
      }
      if (out[0] == 1 && out[1] != alert::no_renegotiation) {
        // Warning alerts other than close_notify carry no action for us.
        o.status = OpenStatus::data;
        o.plaintext = {};
        return o;
      }
      o.status = OpenStatus::fatal;
      o.send_alert = false;
      o.reason = "peer sent a fatal alert";
      o.alert = out[1];
      return o;
    }
    case ContentType::handshake: {
      // After the handshake the only handshake messages a peer can send are
      // a ClientHello / HelloRequest (renegotiation). docs/protocol.md: refuse it.
      Opened f = fatal(alert::no_renegotiation, "renegotiation attempt");
      f.alert_warning = true;
      if (plain_len == 0) return fatal(alert::unexpected_message, "empty handshake record");
      return f;
    }
    default:
      return fatal(alert::unexpected_message, "unexpected record type after handshake");
  }
}

void RecordLayer::seal(std::span<const uint8_t> data) {
  while (!data.empty()) {
    size_t n = std::min(data.size(), kMaxPlaintext);
    seal_record(ContentType::application_data, data.first(n));
    data = data.subspan(n);
  }
}

void RecordLayer::seal_from(util::ByteQueue& q) {
  thread_local uint8_t coalesce[kMaxPlaintext];
  while (!q.empty()) {
    size_t n = std::min(q.size(), kMaxPlaintext);
    std::span<const uint8_t> front = q.front();
    if (front.size() >= n) {
      seal_record(ContentType::application_data, front.first(n));
    } else {
      q.peek({coalesce, n});
      seal_record(ContentType::application_data, {coalesce, n});
    }
    q.pop(n);
  }
}

void RecordLayer::seal_record(ContentType type, std::span<const uint8_t> data) {
  if (broken_) return;
  size_t explicit_len = cipher_ == Cipher::chacha20_poly1305 ? 0 : kExplicitNonceGcm;
  size_t total = kHeaderSize + explicit_len + data.size() + kTagSize;
  std::span<uint8_t> rec = st_.output.prepare_contiguous(total);
  rec[0] = uint8_t(type);
  rec[1] = 3;
  rec[2] = 3;
  store_u16(rec.data() + 3, uint16_t(total - kHeaderSize));
  uint8_t nonce[12];
  make_nonce(cipher_, st_.write, nonce);
  if (explicit_len) std::memcpy(rec.data() + kHeaderSize, nonce + 4, explicit_len);
  uint8_t aad[13];
  make_aad(st_.write.seq, uint8_t(type), data.size(), aad);
  uint8_t* ct = rec.data() + kHeaderSize + explicit_len;
  EVP_CIPHER_CTX* ctx = keyed(cipher_, true, id_, st_.write.key.data(), slot_hint_[1]);
  if (!ctx || !aead_seal(ctx, nonce, aad, data.data(), data.size(), ct, ct + data.size())) {
    // Nothing half-sealed leaves: the buffer may hold plaintext by now.
    OPENSSL_cleanse(rec.data(), rec.size());
    broken_ = true;
    return;
  }
  st_.write.seq++;
  st_.output.commit(total);
}

void RecordLayer::seal_alert(uint8_t description, bool is_fatal) {
  if (st_.close_notify_sent) return;
  uint8_t a[2] = {uint8_t(is_fatal ? 2 : 1), description};
  seal_record(ContentType::alert, a);
  if (description == alert::close_notify || is_fatal) st_.close_notify_sent = true;
}

}  // namespace baton::tls
