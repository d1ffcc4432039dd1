// Certificate and key files: read safely, parsed, and checked for what
// makes peers refuse them (docs/security.md "Certificates").
//
// Reading goes through util::read_regular_file, so a directory, a FIFO or a
// device given as tls.cert is refused with a message instead of reaching
// mbedtls_pk_load_file (which asks malloc for SIZE_MAX + 1 bytes when
// ftell fails on a directory). Checking is a pure function of the parsed
// certificates and the time, so it is unit-tested with any clock.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

namespace baton::tls {

// Where a file came from, for messages. Each message reads
// "ORIGIN: PATH: what is wrong", or "PATH: what is wrong" without an origin.
struct FileRef {
  std::string path;
  std::string origin;  // e.g. "baton.yaml:4:9: tls.cert" or "--cert"; may be empty
  std::string what;    // what the file should hold, e.g. "the server certificate chain"
  std::string prefix() const;  // "ORIGIN: PATH" or "PATH"
};

// Certificates (PEM, one or more, or one DER) from f.path appended to
// `chain`. Returns "" or an error naming the file. `partial_ok`: a bundle in
// which some certificates do not parse is accepted when at least one does
// (a system CA bundle); otherwise every one must parse.
[[nodiscard]] std::string load_certificates(mbedtls_x509_crt* chain, const FileRef& f, bool partial_ok = false);

// A private key (PEM or DER, unencrypted) from f.path. The file's bytes are
// zeroed once parsed. Returns "" or an error naming the file.
[[nodiscard]] std::string load_private_key(mbedtls_pk_context* key, const FileRef& f);

// What the certificates of one file are for: it decides which problems
// matter and how the messages say why.
enum class CertUse : uint8_t {
  own_chain,  // a server's chain, or a client's certificate for mTLS: peers verify it
  trust,      // CAs we verify peers against (tls.client_ca, baton connect --ca)
};

// The problems that make TLS peers refuse a certificate, one sentence each,
// for the certificates of `chain` (every one in the file):
//   - expired (notAfter before `now`), or not yet valid (notBefore after it);
//   - expiring within `soon_s` seconds (0: not checked);
//   - a weak key: RSA under 2048 bits, an EC key on a curve under 256 bits;
//   - a signature with SHA-1 or MD5 (or older), unless self-signed (the
//     signature of a trust anchor is never checked).
// mbedTLS's default verification profile (baton connect, a baton server
// verifying client certificates) and OpenSSL at its default security level
// refuse all of these. `now` is unix seconds.
[[nodiscard]] std::vector<std::string> certificate_problems(const mbedtls_x509_crt* chain, int64_t now, CertUse use,
                                                            int64_t soon_s = 0);

// Unix seconds of an X.509 time (UTC).
[[nodiscard]] int64_t unix_time(const mbedtls_x509_time& t);
// The earliest notAfter among the certificates of `chain` (0 for an empty
// chain): when the first of them stops being accepted.
[[nodiscard]] int64_t earliest_not_after(const mbedtls_x509_crt* chain);
// "2020-02-01 00:00:00 UTC"
[[nodiscard]] std::string utc_text(int64_t unix_seconds);

}  // namespace baton::tls
