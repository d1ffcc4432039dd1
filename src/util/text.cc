#include "util/text.h"

#include <cstdio>

namespace baton::util {

namespace {

// Printable ASCII other than the backslash: the common case, copied as it is.
inline bool plain_ascii(unsigned char c) { return c >= 0x20 && c < 0x7f && c != '\\'; }

void append_hex_byte(unsigned char c, std::string& out) {
  static const char kHex[] = "0123456789abcdef";
  out += "\\x";
  out += kHex[c >> 4];
  out += kHex[c & 0xf];
}

void append_escaped_code_point(int32_t cp, std::string& out) {
  switch (cp) {
    case '\n': out += "\\n"; return;
    case '\r': out += "\\r"; return;
    case '\t': out += "\\t"; return;
    default: break;
  }
  if (cp < 0x80) {
    append_hex_byte(static_cast<unsigned char>(cp), out);
    return;
  }
  char b[16];
  std::snprintf(b, sizeof b, "\\u{%04x}", unsigned(cp));
  out += b;
}

// The escaping of printable() (backslashes and double quotes as asked) and
// of append_log_safe() (neither).
void escape(std::string_view s, bool backslash, bool dquote, std::string& out) {
  out.reserve(out.size() + s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (plain_ascii(c) && !(dquote && c == '"')) {
      out += char(c);
      ++i;
      continue;
    }
    if (c == '\\') {
      out += backslash ? "\\\\" : "\\";
      ++i;
      continue;
    }
    if (c == '"') {  // only with dquote
      out += "\\\"";
      ++i;
      continue;
    }
    const size_t start = i;
    const int32_t cp = next_code_point(s, i);
    if (cp < 0) {
      append_hex_byte(c, out);
    } else if (is_unsafe_code_point(cp)) {
      append_escaped_code_point(cp, out);
    } else {
      out.append(s.substr(start, i - start));
    }
  }
}

}  // namespace

int32_t next_code_point(std::string_view s, size_t& i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  size_t n;
  int32_t cp;
  int32_t min;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 1, cp = c & 0x1f, min = 0x80;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 2, cp = c & 0x0f, min = 0x800;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 3, cp = c & 0x07, min = 0x10000;
  } else {  // a continuation byte, 0xc0/0xc1 (always overlong), or 0xf5..0xff
    ++i;
    return -1;
  }
  if (s.size() - i <= n) {
    ++i;
    return -1;
  }
  for (size_t k = 1; k <= n; ++k) {
    const unsigned char d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xc0) != 0x80) {
      ++i;
      return -1;
    }
    cp = cp << 6 | (d & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
    ++i;
    return -1;
  }
  i += n + 1;
  return cp;
}

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    if (next_code_point(s, i) < 0) return false;
  }
  return true;
}

bool is_unsafe_code_point(int32_t cp) {
  if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)) return true;
  if (cp == 0x2028 || cp == 0x2029) return true;
  if (cp == 0x200e || cp == 0x200f) return true;
  if (cp >= 0x202a && cp <= 0x202e) return true;
  if (cp >= 0x2066 && cp <= 0x2069) return true;
  return false;
}

std::string printable(std::string_view s) {
  std::string out;
  escape(s, true, false, out);
  return out;
}

std::string quoted(std::string_view s) {
  std::string out = "\"";
  escape(s, true, true, out);
  out += '"';
  return out;
}

void append_log_safe(std::string_view s, std::string& out) { escape(s, false, false, out); }

std::string log_safe(std::string_view s) {
  std::string out;
  escape(s, false, false, out);
  return out;
}

std::string to_valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    if (next_code_point(s, i) < 0) out += "\xef\xbf\xbd";
    else out.append(s.substr(start, i - start));
  }
  return out;
}

}  // namespace baton::util
