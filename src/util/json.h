// JSON text, one way for all of baton (the admin API, the client's status,
// event lines, JSON log lines, the bench tools): nlohmann-json, compact, and
// a byte that is not UTF-8 becomes U+FFFD instead of an exception. Text from
// a peer goes through util::printable (util/text.h) before it gets here; this
// only encodes.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace baton::util {

using Json = nlohmann::ordered_json;

inline std::string json_text(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

// `s` as a JSON string literal, quotes included.
inline std::string json_quote(const std::string& s) { return json_text(Json(s)); }

}  // namespace baton::util
