// JSON text helpers shared by the admin API and the tools that print JSON lines.
#pragma once

#include <string>

namespace baton::util {

// `s` as a JSON string literal, quotes included; control characters escaped.
std::string json_quote(const std::string& s);

}  // namespace baton::util
