// Cert names: whether a certificate names the server a client dialed.
//
// mbedTLS 2.28 matches a name against the subject CN and the dNSName
// SubjectAltNames only, so a certificate for an IP address (an iPAddress
// SubjectAltName, RFC 5280 4.2.1.6) never verifies there. The client
// handshake uses these functions for IP literals, and for the error that
// names what a certificate holds when the name does not match.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <mbedtls/x509_crt.h>

namespace baton::tls {

// The 4 (IPv4) or 16 (IPv6) bytes of an IP literal, as an iPAddress
// SubjectAltName holds them; empty when `name` is not an IP literal (a DNS
// name). Accepts dotted-quad IPv4 and IPv6 text, with or without brackets
// ("[::1]") and a zone ("fe80::1%eth0"; the zone does not take part).
std::vector<uint8_t> ip_literal_bytes(std::string_view name);
inline bool is_ip_literal(std::string_view name) { return !ip_literal_bytes(name).empty(); }

// Whether `crt` names `name`:
//  - an IP literal matches an iPAddress SubjectAltName with the same bytes
//    (never a dNSName or the CN: RFC 6125 6.2);
//  - a DNS name matches a dNSName SubjectAltName, case-insensitively, where
//    a leading "*." in the certificate stands for exactly one label
//    ("*.example.com" names "a.example.com", not "example.com" nor
//    "a.b.example.com"); only when the certificate has no SubjectAltName
//    extension at all, the subject CN instead. These are mbedTLS 2.28's own
//    rules for DNS names, so its verdict and this one agree.
// An empty name matches nothing.
bool cert_names(const mbedtls_x509_crt& crt, std::string_view name);

// What `crt` names, for an error message: its SubjectAltNames in order, each
// with its kind ("DNS localhost, IP 127.0.0.1, IP ::1"); the CN when it has
// no SubjectAltName extension ("CN server.example"); "no names" otherwise.
std::string describe_cert_names(const mbedtls_x509_crt& crt);

// "server certificate does not name 127.0.0.2 (it names DNS localhost, IP 127.0.0.1)".
std::string name_mismatch_error(const mbedtls_x509_crt& crt, std::string_view name);

}  // namespace baton::tls
