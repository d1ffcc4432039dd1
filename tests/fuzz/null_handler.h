// A yamux SessionHandler that ignores every event, for fuzz targets, seed
// generators and unit tests that drive a Session only for its state and output.
#pragma once

#include <cstdint>

#include "mux/session.h"

namespace baton::fuzz {

struct NullHandler : mux::SessionHandler {
  void on_stream_opened(uint32_t) override {}
  void on_stream_data(uint32_t) override {}
  void on_stream_fin(uint32_t) override {}
  void on_stream_reset(uint32_t) override {}
  void on_stream_writable(uint32_t) override {}
  void on_stream_closed(uint32_t) override {}
};

}  // namespace baton::fuzz
