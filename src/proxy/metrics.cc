#include "proxy/metrics.h"

#include "util/text.h"

namespace baton::proxy {

void Histogram::observe(double seconds) {
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  counts[i]++;
  sum += seconds;
}

uint64_t Histogram::count() const {
  uint64_t n = 0;
  for (uint64_t c : counts) n += c;
  return n;
}

uint64_t Metrics::get(const std::string& s) const {
  auto it = counters.find(s);
  return it == counters.end() ? 0 : it->second;
}

void Metrics::add_delta(const Metrics& now, const Metrics& base) {
  for (const auto& [k, v] : now.counters) {
    uint64_t b = base.get(k);
    if (v > b) counters[k] += v - b;
  }
  for (const auto& [k, h] : now.histograms) {
    auto bit = base.histograms.find(k);
    Histogram& mine = histograms[k];
    for (size_t i = 0; i < h.counts.size(); ++i) {
      uint64_t b = bit == base.histograms.end() ? 0 : bit->second.counts[i];
      if (h.counts[i] > b) mine.counts[i] += h.counts[i] - b;
    }
    double bs = bit == base.histograms.end() ? 0 : bit->second.sum;
    if (h.sum > bs) mine.sum += h.sum - bs;
  }
}

std::string series(std::string_view family, std::initializer_list<std::pair<std::string_view, std::string_view>> labels) {
  std::string s(family);
  if (labels.size() == 0) return s;
  s += '{';
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) s += ',';
    first = false;
    s += k;
    s += "=\"";
    // The text format wants UTF-8 label values: a stray byte becomes U+FFFD.
    for (char c : util::to_valid_utf8(v)) {
      if (c == '\\') s += "\\\\";
      else if (c == '"') s += "\\\"";
      else if (c == '\n') s += "\\n";
      else s += c;
    }
    s += '"';
  }
  s += '}';
  return s;
}

}  // namespace baton::proxy
