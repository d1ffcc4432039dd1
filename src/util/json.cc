#include "util/json.h"

#include <cstdio>

#include "util/text.h"

namespace baton::util {

void append_json_escaped(std::string_view s, std::string& out) {
  out.reserve(out.size() + s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += char(c);
      ++i;
      continue;
    }
    const size_t start = i;
    const int32_t cp = next_code_point(s, i);
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp < 0) {
      out += "\xef\xbf\xbd";  // U+FFFD for a byte that is not UTF-8
    } else if (is_unsafe_code_point(cp)) {
      char b[16];
      std::snprintf(b, sizeof b, "\\u%04x", unsigned(cp));  // all of them are in the BMP
      out += b;
    } else {
      out.append(s.substr(start, i - start));
    }
  }
}

std::string json_quote(std::string_view s) {
  std::string o = "\"";
  append_json_escaped(s, o);
  return o + "\"";
}

}  // namespace baton::util
