// The two formats of baton's log lines (`log.format`, `--log-format`).
//
//   text: 2024-05-01T12:00:00.123 info MESSAGE
//   json: {"time":"2024-05-01T12:00:00.123+0000","level":"info","msg":"MESSAGE"}
//
// Whatever bytes a message holds, a line is one line of valid UTF-8 without
// control characters, and in json a valid JSON object: the message goes
// through util::append_log_safe (control characters and invalid UTF-8 become
// \xNN escapes; util/text.h), the same text in both formats, and json then
// quotes it. Call sites still pass peer values through util::printable() so
// that backslashes and quotes are escaped too; this is the last line of defence.
#pragma once

#include <memory>
#include <string_view>

#include <spdlog/formatter.h>

namespace baton::util {

// nullptr for a format other than "text" and "json".
[[nodiscard]] std::unique_ptr<spdlog::formatter> make_log_formatter(std::string_view format);

}  // namespace baton::util
