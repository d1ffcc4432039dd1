// RequestFrame: how much of one HTTP/1.1 request a buffer holds. The admin
// listeners read requests on one I/O thread, without blocking, and hand a
// worker only a complete one (admin/gate.h); this says when it is complete.
// Pure: bytes in, a verdict out.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace baton::admin {

struct RequestFrame {
  enum class Status {
    incomplete,      // the head or the body is still arriving
    complete,        // head_bytes + body_bytes hold the request
    head_too_large,  // no end of head within max_head bytes
  };
  Status status = Status::incomplete;
  size_t head_bytes = 0;  // through the blank line (when the head is complete)
  size_t body_bytes = 0;  // the body that belongs to the request and is taken with it
  // The body is not taken: Content-Length over max_body (then discard_bytes
  // is that length, for the caller to read and drop), or Transfer-Encoding,
  // or a Content-Length that is not a number. The handler sees the head
  // alone and answers 413 / 400; the connection closes after the answer.
  bool body_refused = false;
  size_t discard_bytes = 0;
  std::string method;  // of the request line
  std::string path;    // its target without the query
};

// Frames the request at the start of `bytes`. The head ends at the first
// empty line ("\r\n\r\n", or "\n\n" from a sloppy client: the handler then
// judges it). Content-Length (the first one) and Transfer-Encoding are read
// case-insensitively. Never reads beyond max_head bytes for the head.
RequestFrame frame_request(std::string_view bytes, size_t max_head, size_t max_body);

const char* to_str(RequestFrame::Status s);

}  // namespace baton::admin
