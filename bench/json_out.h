// JSON text for the bench tools' result lines: util/json.h, like the rest
// of baton (one escaper).
#pragma once

#include <string>
#include <vector>

#include "util/json.h"

namespace baton::bench {

inline std::string json_string(const std::string& s) { return util::json_quote(s); }
inline std::string json_array(const std::vector<std::string>& v) { return util::json_text(util::Json(v)); }

}  // namespace baton::bench
