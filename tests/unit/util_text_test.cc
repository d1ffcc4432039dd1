// Peer text made safe to write (util/text.h, util/log_format.h), JSON text
// (util/json.h: nlohmann-json, invalid UTF-8 replaced)
// and credential files read safely (util/file.h).
#include <gtest/gtest.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "util/file.h"
#include "util/json.h"
#include "util/log_format.h"
#include "util/text.h"

using namespace baton::util;
using namespace std::string_literals;

namespace {

// Every byte value, and the sequences the issue named.
const std::string kNasty = "a\nb\rc\td\x1b[31me\0f\x7fg\xff\xfe\xc0\xafh\\i\"j\xc2\x85k\xe2\x80\xa8l\xe2\x80\xaem"s;

bool has_control_or_invalid(const std::string& s) {
  if (!valid_utf8(s)) return true;
  size_t i = 0;
  while (i < s.size())
    if (is_unsafe_code_point(next_code_point(s, i))) return true;
  return false;
}

// A strict, independent JSON string-literal checker (RFC 8259): returns the
// decoded value, or nullopt if `lit` is not exactly one valid JSON string
// holding valid UTF-8.
std::optional<std::string> parse_json_string(const std::string& lit) {
  if (lit.size() < 2 || lit.front() != '"' || lit.back() != '"') return std::nullopt;
  if (!valid_utf8(lit)) return std::nullopt;
  std::string out;
  for (size_t i = 1; i + 1 < lit.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(lit[i]);
    if (c < 0x20 || c == '"') return std::nullopt;
    if (c != '\\') {
      out += char(c);
      continue;
    }
    if (++i >= lit.size() - 1) return std::nullopt;
    switch (lit[i]) {
      case '"': out += '"'; break;
      case '\\': out += '\\'; break;
      case '/': out += '/'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'u': {
        if (i + 4 >= lit.size() - 1) return std::nullopt;
        for (size_t k = 1; k <= 4; ++k)
          if (!std::isxdigit(static_cast<unsigned char>(lit[i + k]))) return std::nullopt;
        unsigned cp = unsigned(std::stoul(lit.substr(i + 1, 4), nullptr, 16));
        i += 4;
        if (cp >= 0xd800 && cp <= 0xdfff) return std::nullopt;  // json_quote never needs surrogates
        if (cp < 0x80) {
          out += char(cp);
        } else if (cp < 0x800) {
          out += char(0xc0 | cp >> 6), out += char(0x80 | (cp & 0x3f));
        } else {
          out += char(0xe0 | cp >> 12), out += char(0x80 | ((cp >> 6) & 0x3f)), out += char(0x80 | (cp & 0x3f));
        }
        break;
      }
      default: return std::nullopt;
    }
  }
  return out;
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "baton-text-XXXXXX").string();
    if (char* p = ::mkdtemp(tmpl.data())) path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace

TEST(Utf8, Valid) {
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_TRUE(valid_utf8("edge-7"));
  EXPECT_TRUE(valid_utf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80"));  // é € 😀
  EXPECT_TRUE(valid_utf8("a\nb\x1b\0"s));                                   // controls are UTF-8
  EXPECT_TRUE(valid_utf8("\xf4\x8f\xbf\xbf"));                               // U+10FFFF
}

TEST(Utf8, Invalid) {
  EXPECT_FALSE(valid_utf8("\xff\xfe\xc0\xaf"));    // the bytes of the issue
  EXPECT_FALSE(valid_utf8("\xc0\xaf"));            // overlong '/'
  EXPECT_FALSE(valid_utf8("\xe0\x80\xaf"));        // overlong, 3 bytes
  EXPECT_FALSE(valid_utf8("\xf0\x80\x80\xaf"));    // overlong, 4 bytes
  EXPECT_FALSE(valid_utf8("\xed\xa0\x80"));        // surrogate U+D800
  EXPECT_FALSE(valid_utf8("\xf4\x90\x80\x80"));    // above U+10FFFF
  EXPECT_FALSE(valid_utf8("\xc3"));                // truncated
  EXPECT_FALSE(valid_utf8("ab\xe2\x82"));          // truncated at the end
  EXPECT_FALSE(valid_utf8("\x80"));                // lone continuation byte
  EXPECT_FALSE(valid_utf8("\xc3\x28"));            // bad continuation
}

TEST(Printable, PlainTextUnchanged) {
  EXPECT_EQ(printable("edge-7.example:443 (fleet)"), "edge-7.example:443 (fleet)");
  EXPECT_EQ(printable("h\xc3\xa9llo \xe2\x82\xac"), "h\xc3\xa9llo \xe2\x82\xac");  // valid UTF-8 stays
  EXPECT_EQ(printable(""), "");
}

TEST(Printable, EscapesWhatForgesOrDrivesATerminal) {
  EXPECT_EQ(printable("a\nb"), "a\\nb");
  EXPECT_EQ(printable("a\r\tb"), "a\\r\\tb");
  EXPECT_EQ(printable("\x1b[31mred"), "\\x1b[31mred");
  EXPECT_EQ(printable("a\0b"s), "a\\x00b");
  EXPECT_EQ(printable("\x7f"), "\\x7f");
  EXPECT_EQ(printable("\xff\xfe\xc0\xaf"), "\\xff\\xfe\\xc0\\xaf");
  EXPECT_EQ(printable("\xc2\x85"), "\\u{0085}");                  // NEL (C1)
  EXPECT_EQ(printable("a\xe2\x80\xa8" "b"), "a\\u{2028}b");       // line separator
  EXPECT_EQ(printable("\xe2\x80\xae" "txt.exe"), "\\u{202e}txt.exe");  // right-to-left override
  EXPECT_EQ(printable("a\\nb"), "a\\\\nb");  // a literal backslash-n is not an escaped newline
  EXPECT_EQ(printable("say \"hi\""), "say \"hi\"");
}

TEST(Printable, QuotedEscapesQuotes) {
  EXPECT_EQ(baton::util::quoted("edge"), "\"edge\"");
  EXPECT_EQ(baton::util::quoted("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
}

TEST(Printable, NeverControlOrInvalidWhateverTheBytes) {
  std::string all;
  for (int c = 0; c < 256; ++c) all += char(c);
  for (const std::string& s : {all, kNasty}) {
    for (const std::string& out : {printable(s), baton::util::quoted(s), log_safe(s)}) {
      EXPECT_TRUE(valid_utf8(out)) << out;
      EXPECT_FALSE(has_control_or_invalid(out)) << out;
      EXPECT_EQ(out.find('\n'), std::string::npos);
    }
  }
  std::mt19937 rng(7);
  for (int round = 0; round < 2000; ++round) {
    std::string s(rng() % 40, '\0');
    for (char& c : s) c = char(rng());
    const std::string out = printable(s);
    ASSERT_TRUE(valid_utf8(out));
    ASSERT_FALSE(has_control_or_invalid(out));
  }
}

TEST(Printable, LogSafeLeavesBackslashesAlone) {
  // A message whose values went through printable() is not escaped twice.
  EXPECT_EQ(log_safe(printable("a\nb")), "a\\nb");
  EXPECT_EQ(log_safe("a\nb\\c"), "a\\nb\\c");
  std::string out = "x=";
  append_log_safe("\xff", out);
  EXPECT_EQ(out, "x=\\xff");
}

TEST(Utf8, ToValidReplacesOnlyBadBytes) {
  EXPECT_EQ(to_valid_utf8("ok \xc3\xa9"), "ok \xc3\xa9");
  EXPECT_EQ(to_valid_utf8("a\xff" "b"), "a\xef\xbf\xbd" "b");
  EXPECT_EQ(to_valid_utf8("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(to_valid_utf8("a\nb"), "a\nb");  // Prometheus escapes \n itself
}

TEST(Json, QuoteIsValidJsonAndUtf8WhateverTheBytes) {
  std::string all;
  for (int c = 0; c < 256; ++c) all += char(c);
  for (const std::string& s : {all, kNasty, "\xff\xfe\xc0\xaf"s, "\0"s, ""s}) {
    const std::string lit = json_quote(s);
    auto back = parse_json_string(lit);
    ASSERT_TRUE(back.has_value()) << lit;
    EXPECT_TRUE(valid_utf8(*back));
  }
  std::mt19937 rng(11);
  for (int round = 0; round < 2000; ++round) {
    std::string s(rng() % 40, '\0');
    for (char& c : s) c = char(rng() % 4 == 0 ? 0x80 + rng() % 0x80 : rng());
    ASSERT_TRUE(parse_json_string(json_quote(s)).has_value()) << json_quote(s);
  }
}

TEST(Json, ValidTextRoundTrips) {
  for (const std::string& s : {"plain"s, "a\"b\\c"s, "tab\tnl\ncr\r"s, "\x1b[0m\0"s, "h\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80"s,
                               "\x7f\xc2\x85"s}) {
    auto back = parse_json_string(json_quote(s));
    ASSERT_TRUE(back.has_value()) << json_quote(s);
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(json_quote("a\"b"), "\"a\\\"b\"");
  EXPECT_EQ(json_quote("\x01"), "\"\\u0001\"");
  EXPECT_EQ(json_quote("\xff"), "\"\xef\xbf\xbd\"");  // U+FFFD
}

namespace {

// One line logged through the formatter of `format`, without its newline.
std::string log_line(const char* format, const std::string& msg) {
  std::ostringstream os;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(os);
  spdlog::logger logger("t", sink);
  auto f = make_log_formatter(format);
  EXPECT_TRUE(f);
  logger.set_formatter(std::move(f));
  logger.info("client {} said hi", msg);
  std::string out = os.str();
  EXPECT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  out.pop_back();
  return out;
}

}  // namespace

TEST(LogFormat, UnknownFormat) { EXPECT_FALSE(make_log_formatter("xml")); }

TEST(LogFormat, TextLineIsOneSafeLine) {
  const std::string line = log_line("text", "x\n2099-01-01T00:00:00.000 error forged");
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_NE(line.find("info client x\\n2099-01-01T00:00:00.000 error forged said hi"), std::string::npos) << line;
  const std::string raw = log_line("text", kNasty);
  EXPECT_TRUE(valid_utf8(raw)) << raw;
  EXPECT_FALSE(has_control_or_invalid(raw)) << raw;
}

TEST(LogFormat, JsonLineIsValidJsonAndUtf8) {
  for (const std::string& m : {kNasty, "\xff\xfe\xc0\xaf"s, "quote\" backslash\\ nul\0"s, "plain"s}) {
    const std::string line = log_line("json", m);
    ASSERT_TRUE(valid_utf8(line)) << line;
    const std::string head = "{\"time\":\"";
    ASSERT_EQ(line.rfind(head, 0), 0u) << line;
    const size_t msg_at = line.find(",\"msg\":");
    ASSERT_NE(msg_at, std::string::npos) << line;
    ASSERT_EQ(line.back(), '}');
    auto msg = parse_json_string(line.substr(msg_at + 7, line.size() - msg_at - 8));
    ASSERT_TRUE(msg.has_value()) << line;
    // The message is the text format's message: no control characters once decoded either.
    EXPECT_EQ(*msg, log_safe("client " + m + " said hi"));
    EXPECT_FALSE(has_control_or_invalid(*msg)) << *msg;
  }
}

TEST(ReadRegularFile, ReadsAFile) {
  TempDir d;
  std::ofstream(d / "f") << "hello";
  std::vector<unsigned char> out;
  EXPECT_EQ(read_regular_file(d / "f", 100, out), "");
  EXPECT_EQ(std::string(out.begin(), out.end()), "hello");
  std::ofstream(d / "empty");
  EXPECT_EQ(read_regular_file(d / "empty", 100, out), "");
  EXPECT_TRUE(out.empty());
  std::filesystem::create_symlink(d / "f", d / "link");
  EXPECT_EQ(read_regular_file(d / "link", 100, out), "");
  EXPECT_EQ(out.size(), 5u);
}

TEST(ReadRegularFile, RefusesWhatIsNotARegularFile) {
  TempDir d;
  std::vector<unsigned char> out{1, 2, 3};
  EXPECT_EQ(read_regular_file(d.path(), 100, out), "is a directory, not a file");
  EXPECT_TRUE(out.empty());
  ASSERT_EQ(::mkfifo((d / "fifo").c_str(), 0600), 0);
  // Opened non-blocking: refused at once, never waited on.
  EXPECT_EQ(read_regular_file(d / "fifo", 100, out), "is a FIFO, not a regular file");
  EXPECT_EQ(read_regular_file("/dev/null", 100, out), "is a character device, not a regular file");
  EXPECT_EQ(read_regular_file(d / "missing", 100, out).rfind("cannot open it: No such file", 0), 0u);
  std::ofstream(d / "big") << std::string(101, 'x');
  EXPECT_EQ(read_regular_file(d / "big", 100, out), "is larger than 100 bytes; is this the right file?");
  if (::geteuid() != 0) {  // root reads anything
    std::ofstream(d / "secret") << "x";
    ::chmod((d / "secret").c_str(), 0);
    EXPECT_EQ(read_regular_file(d / "secret", 100, out), "cannot open it: Permission denied");
  }
}
