// Metrics: the counters and histograms of one server, as plain data.
//
// Every value is keyed by its Prometheus series name with labels, e.g.
// `baton_streams_total{route="echo",result="opened"}`, so the registry is a
// pair of maps a hot restart carries as they are: the new process continues
// the old values and counters stay monotonic across restarts. Gauges (active
// tunnels, RSS, limit usage) are not stored: they are computed when a
// snapshot is taken (Server::gauges()).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>

namespace baton::proxy {

struct Histogram {
  // Upper bounds in seconds (Prometheus `le`); a last bucket holds the rest (+Inf).
  static constexpr std::array<double, 14> kBounds{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                  0.025,  0.05,    0.1,    0.25,  0.5,    1.0,   5.0};
  std::array<uint64_t, kBounds.size() + 1> counts{};  // per bucket, not cumulative
  double sum = 0;

  void observe(double seconds);
  uint64_t count() const;
  bool operator==(const Histogram&) const = default;
};

struct Metrics {
  std::map<std::string, uint64_t> counters;      // monotonic
  std::map<std::string, Histogram> histograms;

  void inc(const std::string& series, uint64_t n = 1) { counters[series] += n; }
  void observe(const std::string& name, double seconds) { histograms[name].observe(seconds); }
  uint64_t get(const std::string& series) const;
  // this += (now - base), series by series: what another process counted
  // since `base` was taken (a hot restart: base = the old process's values
  // when the new one started, now = its values at the end).
  void add_delta(const Metrics& now, const Metrics& base);
  bool operator==(const Metrics&) const = default;
};

// `family{k1="v1",k2="v2"}` with label values escaped as Prometheus wants
// (backslash, double quote, newline) and made valid UTF-8 (a byte that is
// not part of valid UTF-8 becomes U+FFFD). No labels: just `family`.
std::string series(std::string_view family, std::initializer_list<std::pair<std::string_view, std::string_view>> labels = {});

}  // namespace baton::proxy
