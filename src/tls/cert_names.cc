#include "tls/cert_names.h"

#include <arpa/inet.h>
#include <mbedtls/asn1.h>
#include <mbedtls/oid.h>

#include <cstring>

#include "util/text.h"

namespace baton::tls {

namespace {

constexpr int kSanDns = MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_DNS_NAME;
constexpr int kSanIp = MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_IP_ADDRESS;
constexpr int kSanUri = MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER;
constexpr int kSanEmail = MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_RFC822_NAME;

bool has_san_extension(const mbedtls_x509_crt& crt) { return crt.ext_types & MBEDTLS_X509_EXT_SUBJECT_ALT_NAME; }

char lower(unsigned char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : char(c); }

bool equal_nocase(const unsigned char* a, std::string_view b) {
  for (size_t i = 0; i < b.size(); ++i)
    if (lower(a[i]) != lower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

// A certificate's DNS name (dNSName or CN) against the name dialed.
bool dns_matches(const mbedtls_x509_buf& cert_name, std::string_view name) {
  if (cert_name.len == name.size() && equal_nocase(cert_name.p, name)) return true;
  // "*.rest" names "label.rest": the dialed name's first label is replaced.
  if (cert_name.len < 3 || cert_name.p[0] != '*' || cert_name.p[1] != '.') return false;
  size_t dot = name.find('.');
  if (dot == std::string_view::npos || dot == 0) return false;
  std::string_view rest = name.substr(dot);  // ".rest"
  return rest.size() == cert_name.len - 1 && equal_nocase(cert_name.p + 1, rest);
}

// A name from the peer's certificate, escaped (util::printable): it ends up in logs.
std::string text_of(const mbedtls_x509_buf& b) {
  return util::printable(std::string_view(reinterpret_cast<const char*>(b.p), b.len));
}

std::string ip_text(const mbedtls_x509_buf& b) {
  char s[INET6_ADDRSTRLEN] = "";
  if (b.len == 4 && inet_ntop(AF_INET, b.p, s, sizeof s)) return s;
  if (b.len == 16 && inet_ntop(AF_INET6, b.p, s, sizeof s)) return s;
  return "(" + std::to_string(b.len) + "-byte address)";
}

}  // namespace

std::vector<uint8_t> ip_literal_bytes(std::string_view name) {
  if (name.size() >= 2 && name.front() == '[' && name.back() == ']') name = name.substr(1, name.size() - 2);
  name = name.substr(0, name.find('%'));
  if (name.empty() || name.size() >= INET6_ADDRSTRLEN) return {};
  std::string s(name);
  uint8_t buf[16];
  if (s.find(':') == std::string::npos) {
    if (inet_pton(AF_INET, s.c_str(), buf) == 1) return {buf, buf + 4};
  } else if (inet_pton(AF_INET6, s.c_str(), buf) == 1) {
    return {buf, buf + 16};
  }
  return {};
}

bool cert_names(const mbedtls_x509_crt& crt, std::string_view name) {
  if (name.empty()) return false;
  std::vector<uint8_t> ip = ip_literal_bytes(name);
  if (!ip.empty()) {
    for (const mbedtls_x509_sequence* s = &crt.subject_alt_names; s; s = s->next)
      if (s->buf.p && s->buf.tag == kSanIp && s->buf.len == ip.size() && std::memcmp(s->buf.p, ip.data(), ip.size()) == 0)
        return true;
    return false;
  }
  if (has_san_extension(crt)) {
    for (const mbedtls_x509_sequence* s = &crt.subject_alt_names; s; s = s->next)
      if (s->buf.p && s->buf.tag == kSanDns && dns_matches(s->buf, name)) return true;
    return false;
  }
  for (const mbedtls_x509_name* n = &crt.subject; n; n = n->next)
    if (n->oid.p && MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) == 0 && dns_matches(n->val, name)) return true;
  return false;
}

std::string describe_cert_names(const mbedtls_x509_crt& crt) {
  std::string out;
  auto add = [&](const std::string& s) {
    if (!out.empty()) out += ", ";
    out += s;
  };
  if (has_san_extension(crt)) {
    for (const mbedtls_x509_sequence* s = &crt.subject_alt_names; s; s = s->next) {
      if (!s->buf.p) continue;
      switch (s->buf.tag) {
        case kSanDns: add("DNS " + text_of(s->buf)); break;
        case kSanIp: add("IP " + ip_text(s->buf)); break;
        case kSanUri: add("URI " + text_of(s->buf)); break;
        case kSanEmail: add("email " + text_of(s->buf)); break;
        default: add("another kind of name"); break;
      }
    }
  } else {
    for (const mbedtls_x509_name* n = &crt.subject; n; n = n->next)
      if (n->oid.p && MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) == 0) add("CN " + text_of(n->val));
  }
  return out.empty() ? "no names" : out;
}

std::string name_mismatch_error(const mbedtls_x509_crt& crt, std::string_view name) {
  return "server certificate does not name " + std::string(name) + " (it names " + describe_cert_names(crt) + ")";
}

}  // namespace baton::tls
