// Text that came from a peer, made safe to write: UTF-8 validation and the
// escaping every log line, label and JSON string goes through
// (docs/security.md "Peer input in logs and metrics").
//
// A peer's bytes (a HELLO client_id, a certificate subject, a DRAIN reason
// received by `baton connect`) must never reach a log as raw control
// characters (a "\n" would forge a line, an ESC drives the terminal) or as
// invalid UTF-8 (it makes a JSON log line invalid).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace baton::util {

// True if `s` is well-formed UTF-8 (RFC 3629): no overlong forms, no
// surrogates (U+D800..U+DFFF), nothing above U+10FFFF, no truncated
// sequence. The empty string is valid. Control characters are valid UTF-8.
[[nodiscard]] bool valid_utf8(std::string_view s);

// Decodes the code point at s[i] and advances i past it. An invalid or
// truncated sequence yields -1 and advances i by one byte (the maximal
// subpart rule of Unicode 3.9 is not needed: every byte of a bad sequence
// is then reported on its own). Precondition: i < s.size().
[[nodiscard]] int32_t next_code_point(std::string_view s, size_t& i);

// True for code points that move or hide text on a terminal or in a log
// viewer although they are valid UTF-8: C0 and C1 controls, DEL, the line
// and paragraph separators U+2028/U+2029, and the bidirectional formatting
// characters (U+200E, U+200F, U+202A..U+202E, U+2066..U+2069), which can
// make a line read differently from what it holds.
[[nodiscard]] bool is_unsafe_code_point(int32_t cp);

// `s` for a log line, as one line of valid UTF-8 without control
// characters. Printable ASCII and other valid UTF-8 pass unchanged; a
// backslash becomes "\\"; \n \r \t become "\n" "\r" "\t"; any other unsafe
// code point below U+0080 becomes "\xNN", above it "\u{XXXX}" (e.g. U+2028 ->
// "\u{2028}"); each byte that is not part of valid UTF-8 becomes "\xNN". The
// escaping is reversible: a literal backslash in `s` is always doubled.
// Use it for every peer value written to a log.
[[nodiscard]] std::string printable(std::string_view s);

// printable(s) between double quotes, with a double quote inside escaped
// as \": for values a log line quotes ("client \"edge-7\"").
[[nodiscard]] std::string quoted(std::string_view s);

// The log formatters' last line of defence (util/log_format.h): `s` with
// only what printable() escapes for safety replaced (unsafe code points and
// invalid bytes), backslashes left as they are, so that a message whose
// values already went through printable() is not escaped twice. Appends to `out`.
void append_log_safe(std::string_view s, std::string& out);
[[nodiscard]] std::string log_safe(std::string_view s);

// `s` with every byte that is not part of valid UTF-8 replaced by U+FFFD
// (the replacement character), everything else unchanged: for outputs that
// must be UTF-8 but have an escaping of their own (Prometheus label values).
[[nodiscard]] std::string to_valid_utf8(std::string_view s);

}  // namespace baton::util
