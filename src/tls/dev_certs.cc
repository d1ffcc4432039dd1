#include "tls/dev_certs.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/asn1write.h>
#include <mbedtls/bignum.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/x509_crt.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <new>

#include "util/bytes.h"

namespace baton::tls {

namespace {

std::string mbed_error(const char* what, int code) {
  char buf[160];
  mbedtls_strerror(code, buf, sizeof buf);
  char hex[16];
  std::snprintf(hex, sizeof hex, "-0x%04x", unsigned(-code));
  return std::string(what) + ": " + buf + " (" + hex + ")";
}

// Owns the mbedTLS objects of one run so that every exit path frees them.
struct Rng {
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  Rng() {
    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);
  }
  ~Rng() {
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
  }
};

struct Key {
  mbedtls_pk_context pk;
  Key() { mbedtls_pk_init(&pk); }
  ~Key() { mbedtls_pk_free(&pk); }
};

struct CertWriter {
  mbedtls_x509write_cert crt;
  mbedtls_mpi serial;
  CertWriter() {
    mbedtls_x509write_crt_init(&crt);
    mbedtls_mpi_init(&serial);
  }
  ~CertWriter() {
    mbedtls_mpi_free(&serial);
    mbedtls_x509write_crt_free(&crt);
  }
};

std::string generate_key(Rng& rng, Key& key) {
  int rc = mbedtls_pk_setup(&key.pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY));
  if (rc != 0) return mbed_error("setting up a key", rc);
  rc = mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(key.pk), mbedtls_ctr_drbg_random, &rng.drbg);
  if (rc != 0) return mbed_error("generating a P-256 key", rc);
  return "";
}

// "YYYYMMDDhhmmss" in UTC, as x509write wants it.
std::string x509_time(time_t t) {
  struct tm tm;
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d%H%M%S", &tm);
  return buf;
}

// Writes a file through a temporary name and a rename, so a reader never sees
// half a key and an existing file of the same name keeps its content until
// the new one is complete.
std::string write_file(const std::string& path, std::string_view data, mode_t mode) {
  std::string tmp = path + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return "cannot create " + tmp + ": " + std::strerror(errno);
  std::string err;
  if (::fchmod(fd, mode) != 0) err = "cannot set the mode of " + tmp + ": " + std::strerror(errno);
  size_t off = 0;
  while (err.empty() && off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) err = "cannot write " + tmp + ": " + std::strerror(errno);
    else off += size_t(n);
  }
  if (err.empty() && ::fsync(fd) != 0) err = "cannot write " + tmp + ": " + std::strerror(errno);
  if (::close(fd) != 0 && err.empty()) err = "cannot write " + tmp + ": " + std::strerror(errno);
  if (err.empty() && ::rename(tmp.c_str(), path.c_str()) != 0)
    err = "cannot rename " + tmp + " to " + path + ": " + std::strerror(errno);
  if (!err.empty()) ::unlink(tmp.c_str());
  return err;
}

std::string write_key_pem(Key& key, const std::string& path) {
  unsigned char buf[1024];
  int rc = mbedtls_pk_write_key_pem(&key.pk, buf, sizeof buf);
  if (rc != 0) return mbed_error(("encoding " + path).c_str(), rc);
  std::string pem(reinterpret_cast<const char*>(buf));
  mbedtls_platform_zeroize(buf, sizeof buf);
  std::string err = write_file(path, pem, 0600);
  mbedtls_platform_zeroize(pem.data(), pem.size());
  return err;
}

// subjectAltName ::= SEQUENCE OF GeneralName; dNSName is [2] IA5String,
// iPAddress is [7] OCTET STRING (4 or 16 bytes). mbedTLS 2.28 has no writer
// for it, so the DER is built here (asn1write writes backwards from the end).
std::string san_der(const std::vector<std::string>& names, const std::vector<std::string>& ips,
                    std::vector<unsigned char>& der) {
  size_t cap = 16;
  for (const auto& n : names) cap += n.size() + 8;
  cap += ips.size() * 24;
  std::vector<unsigned char> buf(cap);
  unsigned char* start = buf.data();
  unsigned char* p = start + buf.size();
  size_t len = 0;
  int rc;
  auto add = [&](int r) {
    if (r < 0) rc = r;
    else len += size_t(r);
    return r >= 0;
  };
  rc = 0;
  for (size_t i = ips.size(); i-- > 0;) {
    unsigned char addr[16];
    size_t alen;
    if (inet_pton(AF_INET, ips[i].c_str(), addr) == 1) alen = 4;
    else if (inet_pton(AF_INET6, ips[i].c_str(), addr) == 1) alen = 16;
    else return "\"" + ips[i] + "\" is not an IPv4 or IPv6 address";
    if (!add(mbedtls_asn1_write_raw_buffer(&p, start, addr, alen)) || !add(mbedtls_asn1_write_len(&p, start, alen)) ||
        !add(mbedtls_asn1_write_tag(&p, start, MBEDTLS_ASN1_CONTEXT_SPECIFIC | 7)))
      return mbed_error("encoding subjectAltName", rc);
  }
  for (size_t i = names.size(); i-- > 0;) {
    const auto& n = names[i];
    if (!add(mbedtls_asn1_write_raw_buffer(&p, start, reinterpret_cast<const unsigned char*>(n.data()), n.size())) ||
        !add(mbedtls_asn1_write_len(&p, start, n.size())) ||
        !add(mbedtls_asn1_write_tag(&p, start, MBEDTLS_ASN1_CONTEXT_SPECIFIC | 2)))
      return mbed_error("encoding subjectAltName", rc);
  }
  if (!add(mbedtls_asn1_write_len(&p, start, len)) ||
      !add(mbedtls_asn1_write_tag(&p, start, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)))
    return mbed_error("encoding subjectAltName", rc);
  der.assign(p, p + len);
  return "";
}

// extKeyUsage ::= SEQUENCE OF KeyPurposeId (also missing from 2.28's writer).
std::string set_ext_key_usage(mbedtls_x509write_cert* crt, const char* oid, size_t oid_len) {
  unsigned char buf[32];
  unsigned char* p = buf + sizeof buf;
  size_t len = 0;
  int rc = mbedtls_asn1_write_oid(&p, buf, oid, oid_len);
  if (rc < 0) return mbed_error("encoding extendedKeyUsage", rc);
  len += size_t(rc);
  if ((rc = mbedtls_asn1_write_len(&p, buf, len)) < 0) return mbed_error("encoding extendedKeyUsage", rc);
  len += size_t(rc);
  if ((rc = mbedtls_asn1_write_tag(&p, buf, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)) < 0)
    return mbed_error("encoding extendedKeyUsage", rc);
  len += size_t(rc);
  rc = mbedtls_x509write_crt_set_extension(crt, MBEDTLS_OID_EXTENDED_KEY_USAGE,
                                           MBEDTLS_OID_SIZE(MBEDTLS_OID_EXTENDED_KEY_USAGE), 0, p, len);
  return rc == 0 ? "" : mbed_error("adding extendedKeyUsage", rc);
}

// basicConstraints written here rather than with the library helper so that
// it is critical for the CA, as RFC 5280 4.2.1.9 requires and OpenSSL's strict
// mode checks.
std::string set_basic_constraints(mbedtls_x509write_cert* crt, bool is_ca) {
  unsigned char buf[16];
  unsigned char* p = buf + sizeof buf;
  size_t len = 0;
  int rc;
  if (is_ca) {
    if ((rc = mbedtls_asn1_write_int(&p, buf, 0)) < 0) return mbed_error("encoding basicConstraints", rc);  // pathlen 0
    len += size_t(rc);
    if ((rc = mbedtls_asn1_write_bool(&p, buf, 1)) < 0) return mbed_error("encoding basicConstraints", rc);
    len += size_t(rc);
  }
  if ((rc = mbedtls_asn1_write_len(&p, buf, len)) < 0) return mbed_error("encoding basicConstraints", rc);
  len += size_t(rc);
  if ((rc = mbedtls_asn1_write_tag(&p, buf, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)) < 0)
    return mbed_error("encoding basicConstraints", rc);
  len += size_t(rc);
  rc = mbedtls_x509write_crt_set_extension(crt, MBEDTLS_OID_BASIC_CONSTRAINTS,
                                           MBEDTLS_OID_SIZE(MBEDTLS_OID_BASIC_CONSTRAINTS), is_ca ? 1 : 0, p, len);
  return rc == 0 ? "" : mbed_error("adding basicConstraints", rc);
}

enum class Kind { ca, server, client };

struct CertSpec {
  Kind kind;
  std::string subject;  // "CN=...,O=baton"
  Key* subject_key;
  Key* issuer_key;
  std::string issuer;
  std::string not_before, not_after;
  const DevCertOptions* opts;
};

std::string make_cert(Rng& rng, const CertSpec& s, const std::string& path) {
  CertWriter w;
  mbedtls_x509write_cert* crt = &w.crt;
  mbedtls_x509write_crt_set_version(crt, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(crt, MBEDTLS_MD_SHA256);
  mbedtls_x509write_crt_set_subject_key(crt, &s.subject_key->pk);
  mbedtls_x509write_crt_set_issuer_key(crt, &s.issuer_key->pk);
  int rc;
  if ((rc = mbedtls_x509write_crt_set_subject_name(crt, s.subject.c_str())) != 0)
    return mbed_error(("subject name \"" + s.subject + "\"").c_str(), rc);
  if ((rc = mbedtls_x509write_crt_set_issuer_name(crt, s.issuer.c_str())) != 0)
    return mbed_error(("issuer name \"" + s.issuer + "\"").c_str(), rc);

  // 16 random bytes, top bit clear so the INTEGER is positive, never zero.
  unsigned char serial[16];
  if ((rc = mbedtls_ctr_drbg_random(&rng.drbg, serial, sizeof serial)) != 0) return mbed_error("serial number", rc);
  serial[0] = static_cast<unsigned char>((serial[0] & 0x7f) | 0x01);
  if ((rc = mbedtls_mpi_read_binary(&w.serial, serial, sizeof serial)) != 0) return mbed_error("serial number", rc);
  if ((rc = mbedtls_x509write_crt_set_serial(crt, &w.serial)) != 0) return mbed_error("serial number", rc);

  if ((rc = mbedtls_x509write_crt_set_validity(crt, s.not_before.c_str(), s.not_after.c_str())) != 0)
    return mbed_error("validity", rc);
  if (auto e = set_basic_constraints(crt, s.kind == Kind::ca); !e.empty()) return e;
  if ((rc = mbedtls_x509write_crt_set_subject_key_identifier(crt)) != 0) return mbed_error("subjectKeyIdentifier", rc);
  if ((rc = mbedtls_x509write_crt_set_authority_key_identifier(crt)) != 0)
    return mbed_error("authorityKeyIdentifier", rc);

  unsigned int usage = s.kind == Kind::ca ? (MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN)
                                          : MBEDTLS_X509_KU_DIGITAL_SIGNATURE;
  if ((rc = mbedtls_x509write_crt_set_key_usage(crt, usage)) != 0) return mbed_error("keyUsage", rc);

  if (s.kind == Kind::server) {
    std::vector<unsigned char> san;
    if (auto e = san_der(s.opts->server_names, s.opts->server_ips, san); !e.empty()) return e;
    rc = mbedtls_x509write_crt_set_extension(crt, MBEDTLS_OID_SUBJECT_ALT_NAME,
                                             MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0, san.data(), san.size());
    if (rc != 0) return mbed_error("subjectAltName", rc);
    if (auto e = set_ext_key_usage(crt, MBEDTLS_OID_SERVER_AUTH, MBEDTLS_OID_SIZE(MBEDTLS_OID_SERVER_AUTH));
        !e.empty())
      return e;
  } else if (s.kind == Kind::client) {
    if (auto e = set_ext_key_usage(crt, MBEDTLS_OID_CLIENT_AUTH, MBEDTLS_OID_SIZE(MBEDTLS_OID_CLIENT_AUTH));
        !e.empty())
      return e;
  }

  std::vector<unsigned char> pem(4096);
  if ((rc = mbedtls_x509write_crt_pem(crt, pem.data(), pem.size(), mbedtls_ctr_drbg_random, &rng.drbg)) != 0)
    return mbed_error(("writing " + path).c_str(), rc);
  return write_file(path, reinterpret_cast<const char*>(pem.data()), 0644);
}

// A value that goes into a subject name string: mbedTLS splits on ',' and '='.
bool plain_name(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;  // ub-common-name
  for (unsigned char c : s)
    if (c < 0x20 || c > 0x7e || c == ',' || c == '=' || c == '\\' || c == '+' || c == '"') return false;
  return true;
}

bool dns_name(const std::string& s) {
  if (s.empty() || s.size() > 253) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
              (c == '*' && i == 0);
    if (!ok) return false;
  }
  return true;
}

std::string ensure_dir(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return dir + " exists and is not a directory";
    return "";
  }
  if (errno != ENOENT) return "cannot use " + dir + ": " + std::strerror(errno);
  std::error_code ec;
  auto parent = std::filesystem::path(dir).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return "cannot create " + parent.string() + ": " + ec.message();
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return "cannot create " + dir + ": " + std::strerror(errno);
  return "";
}

std::string write_dev_certs_impl(const DevCertOptions& o) {
  if (o.out_dir.empty()) return "no output directory given";
  if (o.valid_days == 0 || o.valid_days > 36500) return "valid_days must be 1..36500";
  if (o.server_names.empty() && o.server_ips.empty()) return "the server certificate needs at least one name or IP";
  for (const auto& n : o.server_names)
    if (!dns_name(n)) return "\"" + n + "\" is not a DNS name (letters, digits, '-', '.', a leading '*')";
  if (!plain_name(o.client_name))
    return "client name \"" + o.client_name + "\" must be 1..64 printable characters without , = + \\ \"";
  if (auto e = ensure_dir(o.out_dir); !e.empty()) return e;

  Rng rng;
  static const char kPers[] = "baton dev certs";
  int rc = mbedtls_ctr_drbg_seed(&rng.drbg, mbedtls_entropy_func, &rng.entropy,
                                 reinterpret_cast<const unsigned char*>(kPers), sizeof kPers - 1);
  if (rc != 0) return mbed_error("seeding the random generator", rc);

  Key ca_key, server_key, client_key;
  for (Key* k : {&ca_key, &server_key, &client_key})
    if (auto e = generate_key(rng, *k); !e.empty()) return e;

  time_t now = std::time(nullptr);
  std::string not_before = x509_time(now - 3600);
  std::string not_after = x509_time(now + time_t(o.valid_days) * 86400);
  const std::string ca_name = "CN=baton dev CA,O=baton";
  const std::string server_cn = o.server_names.empty() ? "baton-server" : o.server_names.front();
  std::filesystem::path dir(o.out_dir);
  auto out = [&](const char* f) { return (dir / f).string(); };

  if (auto e = write_key_pem(ca_key, out("ca.key")); !e.empty()) return e;
  if (auto e = write_key_pem(server_key, out("server.key")); !e.empty()) return e;
  if (auto e = write_key_pem(client_key, out("client.key")); !e.empty()) return e;

  CertSpec ca{Kind::ca, ca_name, &ca_key, &ca_key, ca_name, not_before, not_after, &o};
  CertSpec server{Kind::server, "CN=" + server_cn + ",O=baton", &server_key, &ca_key, ca_name, not_before, not_after, &o};
  CertSpec client{Kind::client, "CN=" + o.client_name + ",O=baton", &client_key, &ca_key, ca_name,
                  not_before, not_after, &o};
  if (auto e = make_cert(rng, ca, out("ca.crt")); !e.empty()) return e;
  if (auto e = make_cert(rng, server, out("server.crt")); !e.empty()) return e;
  if (auto e = make_cert(rng, client, out("client.crt")); !e.empty()) return e;

  uint8_t ticket[32];
  if ((rc = mbedtls_ctr_drbg_random(&rng.drbg, ticket, sizeof ticket)) != 0) return mbed_error("ticket key", rc);
  std::string hex = util::to_hex(util::Bytes(ticket, sizeof ticket)) + "\n";
  mbedtls_platform_zeroize(ticket, sizeof ticket);
  std::string err = write_file(out("ticket.key"), hex, 0600);
  mbedtls_platform_zeroize(hex.data(), hex.size());
  return err;
}

}  // namespace

std::string write_dev_certs(const DevCertOptions& opts) {
  try {
    return write_dev_certs_impl(opts);
  } catch (const std::bad_alloc&) {
    return "out of memory while writing development certificates";
  }
}

}  // namespace baton::tls
