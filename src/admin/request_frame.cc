#include "admin/request_frame.h"

#include <algorithm>
#include <cctype>
#include <cstdint>

namespace baton::admin {

namespace {

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// Where the head ends (the index after its empty line), or npos.
size_t head_end(std::string_view b) {
  for (size_t i = 0; i < b.size(); ++i) {
    if (b[i] != '\n') continue;
    if (i + 1 < b.size() && b[i + 1] == '\n') return i + 2;
    if (i + 2 < b.size() && b[i + 1] == '\r' && b[i + 2] == '\n') return i + 3;
  }
  return std::string_view::npos;
}

}  // namespace

const char* to_str(RequestFrame::Status s) {
  switch (s) {
    case RequestFrame::Status::incomplete: return "incomplete";
    case RequestFrame::Status::complete: return "complete";
    case RequestFrame::Status::head_too_large: return "head_too_large";
  }
  return "?";
}

RequestFrame frame_request(std::string_view bytes, size_t max_head, size_t max_body) {
  RequestFrame f;
  size_t end = head_end(bytes.substr(0, max_head));
  if (end == std::string_view::npos) {
    if (bytes.size() >= max_head) f.status = RequestFrame::Status::head_too_large;
    return f;
  }
  f.head_bytes = end;
  std::string_view head = bytes.substr(0, end);

  size_t eol = head.find('\n');
  std::string_view line = trim(head.substr(0, eol));
  size_t sp = line.find(' ');
  f.method = std::string(line.substr(0, sp));
  if (sp != std::string_view::npos) {
    std::string_view target = line.substr(sp + 1);
    target = target.substr(0, target.find(' '));
    f.path = std::string(target.substr(0, target.find('?')));
  }

  bool have_length = false;
  uint64_t length = 0;
  bool bad_length = false;
  for (size_t at = eol + 1; at < head.size();) {
    size_t next = head.find('\n', at);
    if (next == std::string_view::npos) next = head.size();
    std::string_view h = head.substr(at, next - at);
    at = next + 1;
    size_t colon = h.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view name = h.substr(0, colon), value = trim(h.substr(colon + 1));
    if (iequals(name, "Transfer-Encoding")) {
      f.body_refused = true;
    } else if (iequals(name, "Content-Length") && !have_length) {
      have_length = true;
      if (value.empty() || value.size() > 19) bad_length = true;
      for (char c : value) {
        if (c < '0' || c > '9') {
          bad_length = true;
          break;
        }
        length = length * 10 + uint64_t(c - '0');
      }
    }
  }
  f.status = RequestFrame::Status::complete;
  if (f.body_refused || bad_length) {
    f.body_refused = true;
    return f;
  }
  if (length > max_body) {
    f.body_refused = true;
    f.discard_bytes = size_t(length);
    return f;
  }
  if (bytes.size() - end < length) {
    f.status = RequestFrame::Status::incomplete;
    return f;
  }
  f.body_bytes = size_t(length);
  return f;
}

}  // namespace baton::admin
