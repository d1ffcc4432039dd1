// libFuzzer target for the route preamble (src/mux/control.h, docs/protocol.md
// section 4): `length u8 (1..255) | route name (printable ASCII)` at the start
// of every data stream, read before the stream is connected anywhere.
//
// The input is the start of a stream. decode_preamble is checked against a
// model of the rule on every prefix of it, and as Bridge::stream_data calls
// it: on at most 256 bytes peeked from the stream's inbound queue, which
// holds them in chunks cut where the input's last byte says.
//   - route: 1 + n bytes taken, the name is the n bytes after the length, all
//     in 0x21..0x7e, and encode_preamble(name) gives back the bytes taken;
//   - need_more: the input is shorter than 1 + n (even if the bytes so far
//     are already bad, as the header promises), nothing taken;
//   - malformed: length 0, or a byte outside 0x21..0x7e in the name;
//   - bytes after the preamble never change the verdict.
//
// Build and run: tests/fuzz/run.sh SECONDS preamble. Seeds:
// tests/fuzz/corpus/preamble/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mux/control.h"
#include "script.h"
#include "util/byte_queue.h"

using namespace baton;
using fuzz::require;

namespace {

mux::PreambleStatus model(std::span<const uint8_t> in) {
  if (in.empty()) return mux::PreambleStatus::need_more;
  const size_t n = in[0];
  if (n == 0) return mux::PreambleStatus::malformed;
  if (in.size() < 1 + n) return mux::PreambleStatus::need_more;
  for (uint8_t c : in.subspan(1, n))
    if (c < 0x21 || c > 0x7e) return mux::PreambleStatus::malformed;
  return mux::PreambleStatus::route;
}

void check(std::span<const uint8_t> in) {
  mux::PreambleResult r = mux::decode_preamble(in);
  require(r.status == model(in), "decode_preamble follows the rule");
  require(mux::to_str(r.status) != nullptr, "to_str names every status");
  if (r.status != mux::PreambleStatus::route) {
    require(r.used == 0 && r.route.empty(), "no route, nothing taken");
    return;
  }
  require(r.used == 1 + size_t(in[0]) && r.route.size() == in[0], "a route takes 1 + its length");
  require(std::equal(r.route.begin(), r.route.end(), in.begin() + 1), "the route is the bytes after the length");
  std::vector<uint8_t> again;
  mux::encode_preamble(r.route, again);
  require(std::equal(again.begin(), again.end(), in.begin(), in.begin() + ptrdiff_t(r.used)) && again.size() == r.used,
          "encode_preamble(route) gives back the bytes taken");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> in(data, size);
  for (size_t k = 0; k <= std::min<size_t>(in.size(), 257); ++k) check(in.first(k));
  check(in);

  // As the bridge sees it: the first 256 bytes of the stream's inbound queue.
  util::ByteQueue q;
  const size_t cut = in.empty() ? 0 : in.back() % (in.size() + 1);
  q.append(in.first(cut));
  q.append(in.subspan(cut));
  uint8_t buf[256];
  const size_t n = q.peek(buf);
  mux::PreambleResult peeked = mux::decode_preamble({buf, n});
  mux::PreambleResult whole = mux::decode_preamble(in);
  require(peeked.status == whole.status && peeked.used == whole.used && peeked.route == whole.route,
          "256 bytes are enough to decide");
  return 0;
}
