// aead_bench: the ceiling for the tunnel's data path. Seals and opens TLS 1.2
// application records of 16 KiB (RFC 5246 6.2.3.3 nonces and additional data)
// single-threaded with two libraries:
// - openssl: OpenSSL's EVP AEADs, the way tls/record.cc calls them (one
//   context per direction keyed once; per record: nonce, AAD, data, tag).
//   This is what baton's record layer runs on: its ceiling.
// - mbedtls: mbedtls_gcm_crypt_and_tag / _auth_decrypt and
//   mbedtls_chachapoly_encrypt_and_tag / _auth_decrypt, which the record
//   layer used before (docs/design.md, "Record cryptography"): shown for
//   reference.
// Nothing of baton is linked in: this measures the libraries alone.
//
// usage: aead_bench [--seconds S] [--record BYTES] [--cipher NAME]... [--lib openssl|mbedtls]...
// Prints a human table on stderr and one JSON object per library and cipher on stdout:
//   {"lib":"openssl","cipher":"AES-128-GCM","record":16384,"seal_mib_s":..,"open_mib_s":..,"seal_open_mib_s":..}
// seal_open_mib_s is one thread doing both (1 / (1/seal + 1/open)).
#include <mbedtls/chachapoly.h>
#include <mbedtls/gcm.h>
#include <openssl/evp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

enum class Cipher { aes128_gcm, aes256_gcm, chacha20_poly1305 };

struct CipherInfo {
  Cipher c;
  const char* name;
  size_t key_len;
};

const CipherInfo kCiphers[] = {
    {Cipher::aes128_gcm, "AES-128-GCM", 16},
    {Cipher::aes256_gcm, "AES-256-GCM", 32},
    {Cipher::chacha20_poly1305, "CHACHA20-POLY1305", 32},
};

constexpr size_t kTag = 16;

void store_u64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i) {
    p[i] = uint8_t(v);
    v >>= 8;
  }
}

enum class Lib { openssl, mbedtls };
const char* lib_name(Lib l) { return l == Lib::openssl ? "openssl" : "mbedtls"; }

// One keyed AEAD, built like tls/record.cc's RecordLayer::Aead (openssl) or
// like the record layer's former mbedTLS one.
class Aead {
 public:
  Aead(Lib lib, Cipher c, const uint8_t* key, size_t key_len, const uint8_t* iv, bool seal) : lib_(lib), c_(c) {
    std::memcpy(iv_, iv, 12);
    bool ok;
    if (lib_ == Lib::openssl) {
      const char* name = c == Cipher::aes128_gcm ? "AES-128-GCM" : c == Cipher::aes256_gcm ? "AES-256-GCM"
                                                                                               : "ChaCha20-Poly1305";
      evp_ = EVP_CIPHER_fetch(nullptr, name, nullptr);
      ctx_ = EVP_CIPHER_CTX_new();
      ok = evp_ && ctx_ && EVP_CipherInit_ex2(ctx_, evp_, key, nullptr, seal ? 1 : 0, nullptr) == 1;
    } else if (c_ == Cipher::chacha20_poly1305) {
      mbedtls_chachapoly_init(&chacha_);
      ok = mbedtls_chachapoly_setkey(&chacha_, key) == 0;
    } else {
      mbedtls_gcm_init(&gcm_);
      ok = mbedtls_gcm_setkey(&gcm_, MBEDTLS_CIPHER_ID_AES, key, unsigned(key_len * 8)) == 0;
    }
    if (!ok) {
      std::fprintf(stderr, "aead_bench: %s: cannot key the cipher\n", lib_name(lib_));
      std::exit(1);
    }
  }
  ~Aead() {
    if (lib_ == Lib::openssl) {
      EVP_CIPHER_CTX_free(ctx_);
      EVP_CIPHER_free(evp_);
    } else if (c_ == Cipher::chacha20_poly1305) {
      mbedtls_chachapoly_free(&chacha_);
    } else {
      mbedtls_gcm_free(&gcm_);
    }
  }
  Aead(const Aead&) = delete;
  Aead& operator=(const Aead&) = delete;

  void nonce(uint64_t seq, uint8_t out[12]) const {
    std::memcpy(out, iv_, 12);
    uint8_t s[8];
    store_u64(s, seq);
    if (c_ == Cipher::chacha20_poly1305) {
      for (int i = 0; i < 8; ++i) out[4 + i] ^= s[i];
    } else {
      std::memcpy(out + 4, s, 8);
    }
  }
  static void aad(uint64_t seq, size_t len, uint8_t out[13]) {
    store_u64(out, seq);
    out[8] = 23;  // application_data
    out[9] = 3;
    out[10] = 3;
    out[11] = uint8_t(len >> 8);
    out[12] = uint8_t(len);
  }
  // Seals `n` bytes of `in` into out[0..n) with the tag at out[n..n+16).
  bool seal(uint64_t seq, const uint8_t* in, size_t n, uint8_t* out) {
    uint8_t nc[12], ad[13];
    nonce(seq, nc);
    aad(seq, n, ad);
    if (lib_ == Lib::openssl) {
      int len = 0, fin = 0;
      return EVP_CipherInit_ex2(ctx_, nullptr, nullptr, nc, -1, nullptr) == 1 &&
             EVP_CipherUpdate(ctx_, nullptr, &len, ad, 13) == 1 && EVP_CipherUpdate(ctx_, out, &len, in, int(n)) == 1 &&
             EVP_CipherFinal_ex(ctx_, out + len, &fin) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_GET_TAG, int(kTag), out + n) == 1;
    }
    if (c_ == Cipher::chacha20_poly1305)
      return mbedtls_chachapoly_encrypt_and_tag(&chacha_, n, nc, ad, 13, in, out, out + n) == 0;
    return mbedtls_gcm_crypt_and_tag(&gcm_, MBEDTLS_GCM_ENCRYPT, n, nc, 12, ad, 13, in, out, kTag, out + n) == 0;
  }
  bool open(uint64_t seq, const uint8_t* in, size_t n, uint8_t* out) {
    uint8_t nc[12], ad[13];
    nonce(seq, nc);
    aad(seq, n, ad);
    if (lib_ == Lib::openssl) {
      int len = 0, fin = 0;
      return EVP_CipherInit_ex2(ctx_, nullptr, nullptr, nc, -1, nullptr) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_SET_TAG, int(kTag), const_cast<uint8_t*>(in + n)) == 1 &&
             EVP_CipherUpdate(ctx_, nullptr, &len, ad, 13) == 1 && EVP_CipherUpdate(ctx_, out, &len, in, int(n)) == 1 &&
             EVP_CipherFinal_ex(ctx_, out + len, &fin) == 1;
    }
    if (c_ == Cipher::chacha20_poly1305)
      return mbedtls_chachapoly_auth_decrypt(&chacha_, n, nc, ad, 13, in + n, in, out) == 0;
    return mbedtls_gcm_auth_decrypt(&gcm_, n, nc, 12, ad, 13, in + n, kTag, in, out) == 0;
  }

 private:
  Lib lib_;
  Cipher c_;
  uint8_t iv_[12];
  EVP_CIPHER* evp_ = nullptr;
  EVP_CIPHER_CTX* ctx_ = nullptr;
  mbedtls_gcm_context gcm_;
  mbedtls_chachapoly_context chacha_;
};

struct Result {
  double seal_mib_s = 0;
  double open_mib_s = 0;
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Result run(Lib lib, const CipherInfo& ci, size_t record, double budget_s) {
  uint8_t key[32], iv[12];
  for (size_t i = 0; i < sizeof key; ++i) key[i] = uint8_t(i * 7 + 1);
  for (size_t i = 0; i < sizeof iv; ++i) iv[i] = uint8_t(i * 13 + 5);
  Aead sealer(lib, ci.c, key, ci.key_len, iv, true);
  Aead opener(lib, ci.c, key, ci.key_len, iv, false);

  // A ring of distinct records, larger than L2, so that opening does not
  // read the same hot 16 KiB over and over (the tunnel never does either).
  constexpr size_t kRing = 128;
  std::vector<uint8_t> plain(record);
  for (size_t i = 0; i < record; ++i) plain[i] = uint8_t(i * 31 + 3);
  std::vector<std::vector<uint8_t>> sealed(kRing, std::vector<uint8_t>(record + kTag));
  std::vector<uint8_t> out(record + kTag);

  Result r;
  // Seal: fresh sequence numbers, as a sender does. Warm up first.
  uint64_t seq = 1;
  for (size_t i = 0; i < kRing; ++i, ++seq)
    if (!sealer.seal(seq, plain.data(), record, sealed[i].data())) std::exit(1);
  uint64_t n = 0;
  auto t0 = Clock::now();
  double el = 0;
  do {
    for (int k = 0; k < 64; ++k, ++n) (void)sealer.seal(seq++, plain.data(), record, out.data());
    el = seconds_since(t0);
  } while (el < budget_s);
  r.seal_mib_s = double(n) * double(record) / el / (1024.0 * 1024.0);

  // Open: the ring sealed above (sequence numbers 1..kRing), tags checked.
  for (size_t i = 0; i < kRing; ++i)
    if (!opener.open(1 + i, sealed[i].data(), record, out.data())) {
      std::fprintf(stderr, "aead_bench: %s: open failed (self-check)\n", ci.name);
      std::exit(1);
    }
  if (std::memcmp(out.data(), plain.data(), record) != 0) {
    std::fprintf(stderr, "aead_bench: %s: round trip mismatch\n", ci.name);
    std::exit(1);
  }
  n = 0;
  t0 = Clock::now();
  bool ok = true;
  do {
    for (int k = 0; k < 64; ++k, ++n) {
      size_t i = n % kRing;
      ok &= opener.open(1 + i, sealed[i].data(), record, out.data());
    }
    el = seconds_since(t0);
  } while (el < budget_s);
  if (!ok) {
    std::fprintf(stderr, "aead_bench: %s: open failed\n", ci.name);
    std::exit(1);
  }
  r.open_mib_s = double(n) * double(record) / el / (1024.0 * 1024.0);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 0.5;
  size_t record = 16384;
  std::vector<std::string> only;
  std::vector<Lib> libs;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--record" && i + 1 < argc) record = size_t(std::atol(argv[++i]));
    else if (a == "--cipher" && i + 1 < argc) only.push_back(argv[++i]);
    else if (a == "--lib" && i + 1 < argc && (std::string(argv[i + 1]) == "openssl" || std::string(argv[i + 1]) == "mbedtls"))
      libs.push_back(std::string(argv[++i]) == "openssl" ? Lib::openssl : Lib::mbedtls);
    else {
      std::fprintf(stderr, "usage: aead_bench [--seconds S] [--record BYTES] [--cipher AES-128-GCM|AES-256-GCM|CHACHA20-POLY1305]...\n"
                           "                  [--lib openssl|mbedtls]...\n");
      return 2;
    }
  }
  if (seconds <= 0 || record == 0 || record > 16384) {
    std::fprintf(stderr, "aead_bench: need --seconds > 0 and 0 < --record <= 16384\n");
    return 2;
  }
  if (libs.empty()) libs = {Lib::openssl, Lib::mbedtls};
  std::fprintf(stderr, "%-8s %-18s %12s %12s %14s   (%zu-byte records, single thread)\n", "library", "cipher",
               "seal MiB/s", "open MiB/s", "both MiB/s", record);
  for (Lib lib : libs) {
    for (const CipherInfo& ci : kCiphers) {
      if (!only.empty()) {
        bool want = false;
        for (auto& o : only) want |= o == ci.name;
        if (!want) continue;
      }
      Result r = run(lib, ci, record, seconds);
      double both = 1.0 / (1.0 / r.seal_mib_s + 1.0 / r.open_mib_s);
      std::fprintf(stderr, "%-8s %-18s %12.1f %12.1f %14.1f\n", lib_name(lib), ci.name, r.seal_mib_s, r.open_mib_s,
                   both);
      std::printf("{\"lib\":\"%s\",\"cipher\":\"%s\",\"record\":%zu,\"seal_mib_s\":%.1f,\"open_mib_s\":%.1f,"
                  "\"seal_open_mib_s\":%.1f}\n",
                  lib_name(lib), ci.name, record, r.seal_mib_s, r.open_mib_s, both);
      std::fflush(stdout);
    }
  }
  return 0;
}
