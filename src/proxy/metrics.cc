#include "proxy/metrics.h"

#include "util/text.h"

namespace baton::proxy {

namespace {

constexpr bool table_in_enum_order() {
  for (size_t i = 0; i < std::size(kFamilies); ++i)
    if (size_t(kFamilies[i].fam) != i) return false;
  return true;
}
static_assert(table_in_enum_order(), "kFamilies lists the families in the order of Fam");

}  // namespace

std::optional<Fam> family_named(std::string_view name) {
  for (const FamilyInfo& f : kFamilies)
    if (f.name == name) return f.fam;
  return std::nullopt;
}

std::string_view Series::label(std::string_view name) const {
  const FamilyInfo& f = info();
  for (size_t i = 0; i < f.n_labels; ++i)
    if (f.labels[i] == name) return values[i];
  return {};
}

std::string Series::text() const {
  const FamilyInfo& f = info();
  std::string s(f.name);
  if (f.n_labels == 0) return s;
  s += '{';
  for (size_t i = 0; i < f.n_labels; ++i) {
    if (i) s += ',';
    s += f.labels[i];
    s += "=\"";
    // The text format wants UTF-8 label values: a stray byte becomes U+FFFD.
    for (char c : util::to_valid_utf8(values[i])) {
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

std::optional<Series> Series::parse(std::string_view text) {
  size_t brace = text.find('{');
  std::optional<Fam> fam = family_named(text.substr(0, brace));
  if (!fam) return std::nullopt;
  Series s;
  s.fam = *fam;
  const FamilyInfo& f = s.info();
  if (brace == std::string_view::npos) return f.n_labels == 0 ? std::optional<Series>(s) : std::nullopt;
  size_t i = brace + 1;
  for (size_t k = 0; k < f.n_labels; ++k) {
    if (k) {
      if (i >= text.size() || text[i] != ',') return std::nullopt;
      ++i;
    }
    std::string_view want = f.labels[k];
    if (text.substr(i, want.size()) != want || text.substr(i + want.size(), 2) != "=\"") return std::nullopt;
    i += want.size() + 2;
    std::string v;
    for (;; ++i) {
      if (i >= text.size()) return std::nullopt;
      char c = text[i];
      if (c == '"') break;
      if (c == '\\') {
        if (++i >= text.size()) return std::nullopt;
        c = text[i] == 'n' ? '\n' : text[i];
      }
      v += c;
    }
    ++i;  // the closing quote
    s.values[k] = std::move(v);
  }
  if (i + 1 != text.size() || text[i] != '}') return std::nullopt;
  return s;
}

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

uint64_t Metrics::get(const Series& s) const {
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

}  // namespace baton::proxy
