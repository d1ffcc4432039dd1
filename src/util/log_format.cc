#include "util/log_format.h"

#include <spdlog/pattern_formatter.h>

#include <string>

#include "util/json.h"
#include "util/text.h"

namespace baton::util {

namespace {

// %* in the patterns below: the message, made safe.
class SafeMessage : public spdlog::custom_flag_formatter {
 public:
  explicit SafeMessage(bool json) : json_(json) {}
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    std::string& safe = buf_;
    safe.clear();
    append_log_safe(payload, safe);
    if (json_) {
      // The pattern holds the quotes: the string's escaped text without them.
      const std::string quoted = json_quote(safe);
      dest.append(quoted.data() + 1, quoted.data() + quoted.size() - 1);
    } else {
      dest.append(safe.data(), safe.data() + safe.size());
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<SafeMessage>(json_); }

 private:
  bool json_;
  // Reused between lines; a formatter is used under its sink's lock.
  std::string buf_;
};

}  // namespace

std::unique_ptr<spdlog::formatter> make_log_formatter(std::string_view format) {
  auto f = std::make_unique<spdlog::pattern_formatter>();
  if (format == "json") {
    f->add_flag<SafeMessage>('*', true).set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","msg":"%*"})");
  } else if (format == "text") {
    f->add_flag<SafeMessage>('*', false).set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %*");
  } else {
    return nullptr;
  }
  return f;
}

}  // namespace baton::util
