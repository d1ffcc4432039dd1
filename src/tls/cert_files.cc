#include "tls/cert_files.h"

#include <mbedtls/ecp.h>
#include <mbedtls/platform_util.h>

#include <cstring>
#include <ctime>

#include "tls/context.h"
#include "util/file.h"
#include "util/text.h"

namespace baton::tls {

namespace {

// Certificate bundles (a system CA bundle is ~200 KiB) and keys are small;
// anything bigger is the wrong file.
constexpr size_t kMaxFile = 16u << 20;

// Reads f.path and NUL-terminates it the way mbedtls_pk_load_file does:
// the NUL counts in `len` only for PEM (mbedTLS takes a buffer ending in NUL
// as PEM, anything else as DER).
std::string read_for_mbedtls(const FileRef& f, std::vector<unsigned char>& buf, size_t& len) {
  std::string problem = util::read_regular_file(f.path, kMaxFile, buf);
  if (problem.empty() && buf.empty()) problem = "is empty";
  if (!problem.empty()) return f.prefix() + ": " + problem + " (expected " + f.what + ", PEM)";
  len = buf.size();
  buf.push_back(0);
  if (std::strstr(reinterpret_cast<const char*>(buf.data()), "-----BEGIN ") != nullptr) ++len;
  return "";
}

std::string subject_of(const mbedtls_x509_crt* c) {
  char buf[512];
  int n = mbedtls_x509_dn_gets(buf, sizeof buf, &c->subject);
  if (n <= 0) return "(no subject)";
  return util::quoted(std::string_view(buf, size_t(n)));
}

bool self_signed(const mbedtls_x509_crt* c) {
  return c->issuer_raw.len == c->subject_raw.len &&
         std::memcmp(c->issuer_raw.p, c->subject_raw.p, c->issuer_raw.len) == 0;
}

const char* weak_digest(mbedtls_md_type_t md) {
  switch (md) {
    case MBEDTLS_MD_MD2: return "MD2";
    case MBEDTLS_MD_MD4: return "MD4";
    case MBEDTLS_MD_MD5: return "MD5";
    case MBEDTLS_MD_SHA1: return "SHA-1";
    case MBEDTLS_MD_RIPEMD160: return "RIPEMD-160";
    default: return nullptr;
  }
}

std::string days_text(int64_t seconds) {
  const int64_t days = seconds / 86400;
  if (days >= 2) return std::to_string(days) + " days";
  const int64_t hours = seconds / 3600;
  if (hours >= 2) return std::to_string(hours) + " hours";
  return std::to_string(seconds / 60) + " minutes";
}

}  // namespace

std::string FileRef::prefix() const { return origin.empty() ? path : origin + ": " + path; }

std::string load_certificates(mbedtls_x509_crt* chain, const FileRef& f, bool partial_ok) {
  std::vector<unsigned char> buf;
  size_t len = 0;
  if (std::string e = read_for_mbedtls(f, buf, len); !e.empty()) return e;
  int ret = mbedtls_x509_crt_parse(chain, buf.data(), len);
  if (ret < 0 || (ret > 0 && !partial_ok))
    return f.prefix() + ": cannot load " + f.what + ": " +
           (ret > 0 ? std::to_string(ret) + " certificate(s) in the file do not parse" : mbedtls_error_text(ret));
  return "";
}

std::string load_private_key(mbedtls_pk_context* key, const FileRef& f) {
  std::vector<unsigned char> buf;
  size_t len = 0;
  if (std::string e = read_for_mbedtls(f, buf, len); !e.empty()) return e;
  int ret = mbedtls_pk_parse_key(key, buf.data(), len, nullptr, 0);
  util::wipe(buf);
  if (ret != 0) return f.prefix() + ": cannot load " + f.what + ": " + mbedtls_error_text(ret);
  return "";
}

int64_t unix_time(const mbedtls_x509_time& t) {
  // Days from the civil date (Howard Hinnant's algorithm): no time zone involved.
  int64_t y = t.year, m = t.mon, d = t.day;
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const int64_t yoe = y - era * 400;
  const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  const int64_t days = era * 146097 + doe - 719468;
  return days * 86400 + int64_t(t.hour) * 3600 + int64_t(t.min) * 60 + t.sec;
}

std::string utc_text(int64_t s) {
  const time_t tt = time_t(s);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char b[64];
  std::strftime(b, sizeof b, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return b;
}

int64_t earliest_not_after(const mbedtls_x509_crt* chain) {
  int64_t best = 0;
  for (const mbedtls_x509_crt* c = chain; c && c->raw.p; c = c->next) {
    const int64_t t = unix_time(c->valid_to);
    if (best == 0 || t < best) best = t;
  }
  return best;
}

std::vector<std::string> certificate_problems(const mbedtls_x509_crt* chain, int64_t now, CertUse use,
                                              int64_t soon_s) {
  std::vector<std::string> out;
  const char* refused = use == CertUse::own_chain
                            ? "TLS peers, baton among them, refuse it"
                            : "peer certificates that chain to it are refused";
  for (const mbedtls_x509_crt* c = chain; c && c->raw.p; c = c->next) {
    const std::string who = "certificate " + subject_of(c);
    const int64_t from = unix_time(c->valid_from), to = unix_time(c->valid_to);
    if (to < now) {
      out.push_back(who + " expired on " + utc_text(to) + ": " + refused);
    } else if (from > now) {
      out.push_back(who + " is not valid before " + utc_text(from) + " (is the clock right?): " + refused +
                    " until then");
    } else if (soon_s > 0 && to - now < soon_s) {
      out.push_back(who + " expires on " + utc_text(to) + ", in " + days_text(to - now) + ": renew it");
    }
    const size_t bits = mbedtls_pk_get_bitlen(&c->pk);
    switch (mbedtls_pk_get_type(&c->pk)) {
      case MBEDTLS_PK_RSA:
      case MBEDTLS_PK_RSA_ALT:
      case MBEDTLS_PK_RSASSA_PSS:
        if (bits < 2048)
          out.push_back(who + " has a weak key: RSA with " + std::to_string(bits) + " bits (at least 2048 needed): " +
                        refused);
        break;
      case MBEDTLS_PK_ECKEY:
      case MBEDTLS_PK_ECKEY_DH:
      case MBEDTLS_PK_ECDSA:
        if (bits < 256) {
          const mbedtls_ecp_curve_info* ci = mbedtls_ecp_curve_info_from_grp_id(mbedtls_pk_ec(c->pk)->grp.id);
          out.push_back(who + " has a weak key: EC on " + (ci ? std::string(ci->name) + ", " : std::string()) +
                        "a " + std::to_string(bits) + "-bit curve (at least 256 needed): " + refused);
        }
        break;
      default: break;
    }
    if (const char* md = weak_digest(c->sig_md); md && !self_signed(c))
      out.push_back(who + " is signed with " + md + " (SHA-256 or better needed): " + refused);
  }
  return out;
}

}  // namespace baton::tls
