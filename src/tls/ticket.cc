#include "tls/ticket.h"

#include <mbedtls/sha256.h>

#include <cstring>
#include <ctime>

#include "util/bytes.h"
#include "util/file.h"

namespace baton::tls {

std::string load_ticket_keys(const std::string& path, std::vector<TicketKey>& out) {
  std::vector<unsigned char> bytes;
  std::string problem = util::read_regular_file(path, 1u << 20, bytes);
  if (!problem.empty()) return path + ": " + problem + " (expected a ticket key file: lines of 64 hex digits)";
  std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  unsigned lineno = 0;
  out.clear();
  std::string error;
  while (!text.empty() && error.empty()) {
    ++lineno;
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
    size_t start = line.find_first_not_of(" \t");
    if (start == std::string_view::npos || line[start] == '#') continue;
    TicketKey k;
    if (!util::from_hex(line.substr(start), k))
      error = path + ":" + std::to_string(lineno) + ": expected 64 hex digits (a 32-byte ticket key)";
    else
      out.push_back(k);
  }
  util::wipe(bytes);
  if (!error.empty()) return error;
  if (out.empty()) return path + ": no ticket key in file (expected lines of 64 hex digits)";
  return "";
}

TicketSealer::TicketSealer(const std::vector<TicketKey>& keys, uint32_t lifetime_s, mbedtls_ctr_drbg_context* rng)
    : lifetime_s_(lifetime_s), rng_(rng) {
  for (const TicketKey& k : keys) {
    Key* key = new Key;
    // The name identifies the key without revealing it.
    uint8_t digest[32];
    mbedtls_sha256_ret(k.data(), k.size(), digest, 0);
    std::memcpy(key->name.data(), digest, 4);
    mbedtls_gcm_init(&key->gcm);
    (void)mbedtls_gcm_setkey(&key->gcm, MBEDTLS_CIPHER_ID_AES, k.data(), 256);
    keys_.push_back(key);
  }
}

TicketSealer::~TicketSealer() {
  for (Key* k : keys_) {
    mbedtls_gcm_free(&k->gcm);
    delete k;
  }
}

void TicketSealer::install(mbedtls_ssl_config* conf) { mbedtls_ssl_conf_session_tickets_cb(conf, write_cb, parse_cb, this); }

namespace {
thread_local uint64_t g_tickets_opened = 0;
constexpr size_t kName = 4, kNonce = 12, kTag = 16, kTime = 8;
}

int TicketSealer::write_cb(void* p, const mbedtls_ssl_session* s, unsigned char* start, const unsigned char* end,
                           size_t* tlen, uint32_t* lifetime) {
  auto* self = static_cast<TicketSealer*>(p);
  Key* key = self->keys_.front();
  size_t room = size_t(end - start);
  if (room < kName + kNonce + kTime + kTag) return MBEDTLS_ERR_SSL_BUFFER_TOO_SMALL;
  unsigned char* nonce = start + kName;
  unsigned char* plain = nonce + kNonce;
  size_t max_session = room - kName - kNonce - kTime - kTag;
  size_t session_len = 0;
  int ret = mbedtls_ssl_session_save(s, plain + kTime, max_session, &session_len);
  if (ret != 0) return ret;
  std::memcpy(start, key->name.data(), kName);
  if ((ret = mbedtls_ctr_drbg_random(self->rng_, nonce, kNonce)) != 0) return ret;
  util::store_u64(plain, uint64_t(std::time(nullptr)));
  size_t plain_len = kTime + session_len;
  ret = mbedtls_gcm_crypt_and_tag(&key->gcm, MBEDTLS_GCM_ENCRYPT, plain_len, nonce, kNonce, start, kName, plain,
                                  plain, kTag, plain + plain_len);
  if (ret != 0) return ret;
  *tlen = kName + kNonce + plain_len + kTag;
  *lifetime = self->lifetime_s_;
  return 0;
}

int TicketSealer::parse_cb(void* p, mbedtls_ssl_session* s, unsigned char* buf, size_t len) {
  auto* self = static_cast<TicketSealer*>(p);
  if (len < kName + kNonce + kTime + kTag) return MBEDTLS_ERR_SSL_BAD_INPUT_DATA;
  Key* key = nullptr;
  for (Key* k : self->keys_)
    if (std::memcmp(k->name.data(), buf, kName) == 0) key = k;
  if (!key) return MBEDTLS_ERR_SSL_INVALID_MAC;  // unknown key: full handshake
  unsigned char* nonce = buf + kName;
  unsigned char* ct = nonce + kNonce;
  size_t ct_len = len - kName - kNonce - kTag;
  if (mbedtls_gcm_auth_decrypt(&key->gcm, ct_len, nonce, kNonce, buf, kName, ct + ct_len, kTag, ct, ct) != 0)
    return MBEDTLS_ERR_SSL_INVALID_MAC;
  uint64_t issued = util::load_u64(ct);
  uint64_t now = uint64_t(std::time(nullptr));
  if (now < issued || now - issued > self->lifetime_s_) return MBEDTLS_ERR_SSL_SESSION_TICKET_EXPIRED;
  int ret = mbedtls_ssl_session_load(s, ct + kTime, ct_len - kTime);
  if (ret == 0) ++g_tickets_opened;
  return ret;
}

uint64_t tickets_opened() { return g_tickets_opened; }

}  // namespace baton::tls
