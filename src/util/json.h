// JSON text helpers shared by the admin API and the tools that print JSON lines.
#pragma once

#include <string>
#include <string_view>

namespace baton::util {

// `s` as a JSON string literal, quotes included, that is valid JSON and
// valid UTF-8 whatever bytes `s` holds (RFC 8259): '"' and '\' escaped,
// control characters (U+0000..U+001F, and DEL, C1, U+2028/U+2029 and the
// bidirectional formatting characters of util/text.h) as \uXXXX, each byte
// that is not part of valid UTF-8 replaced by U+FFFD. Valid text round-trips:
// a JSON parser gives back exactly `s`.
std::string json_quote(std::string_view s);

// The same without the quotes, appended to `out`.
void append_json_escaped(std::string_view s, std::string& out);

}  // namespace baton::util
