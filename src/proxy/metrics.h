// Metrics: the counters and histograms of one server, as plain data.
//
// Every family baton exports is declared once, below: its name, type, help
// and label names (docs/operations.md lists the same). A value is keyed by a
// Series: its family and its label values in the declared order, built with
// series<Fam::...>(values...), which refuses at compile time a wrong number
// of values. Nothing is built as a string and parsed back: the Prometheus
// text is made when /metrics is rendered, and parsed only where it crosses
// a process boundary (the hot-restart handoff, handoff/codec.cc), so that a
// new process continues the old values and counters stay monotonic across
// restarts. Gauges (active tunnels, RSS, limit usage) are not stored: they
// are computed when a snapshot is taken (Server::gauges()).
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace baton::proxy {

enum class Fam : uint8_t {
  tunnels_active,
  tunnels_handshaking,
  tunnels_queued,
  streams_active,
  tunnels_total,
  streams_total,
  stream_resets_total,
  tunnels_cut_total,
  flush_timeouts_total,
  stream_ids_given_up_total,
  bytes_total,
  upstream_connect_seconds,
  handshake_seconds,
  overload_rejections_total,
  drain_state,
  lifecycle_requests_total,
  admin_requests_rejected_total,
  admin_connections,
  ready,
  restart_epoch,
  handoff_tunnels_total,
  process_resident_bytes,
  process_open_fds,
  limit_usage_ratio,
  uptime_seconds,
  tls_certificate_expiry_seconds,
  sessions_detached,
  resume_kept_bytes,
  session_breaks_total,
  session_resumes_total,
  sessions_expired_total,
  resume_replayed_bytes_total,
};

struct FamilyInfo {
  Fam fam;
  std::string_view name;
  std::string_view type;  // counter, gauge, histogram
  std::string_view help;
  uint8_t n_labels = 0;
  std::array<std::string_view, 2> labels{};
};

// In the order of Fam.
inline constexpr FamilyInfo kFamilies[] = {
    {Fam::tunnels_active, "baton_tunnels_active", "gauge", "Tunnels past WELCOME and not closed."},
    {Fam::tunnels_handshaking, "baton_tunnels_handshaking", "gauge", "Connections in their TLS handshake."},
    {Fam::tunnels_queued, "baton_tunnels_queued", "gauge",
     "Connections waiting for a handshake slot (limits.max_concurrent_handshakes)."},
    {Fam::streams_active, "baton_streams_active", "gauge", "Data streams open."},
    {Fam::tunnels_total, "baton_tunnels_total", "counter",
     "Connections by outcome: accepted, established, tls_failed, auth_failed, rejected_overload, rejected_draining, "
     "rejected.",
     1, {"result"}},
    {Fam::streams_total, "baton_streams_total", "counter",
     "Streams by route and outcome: opened, connect_failed, unknown_route.", 2, {"route", "result"}},
    {Fam::stream_resets_total, "baton_stream_resets_total", "counter",
     "Admitted streams reset by route (\"(none)\" before a route was named) and reason: client, upstream_error, "
     "malformed_preamble.",
     2, {"route", "reason"}},
    {Fam::tunnels_cut_total, "baton_tunnels_cut_total", "counter",
     "Connections closed because of the client, by reason: protocol_error, tls_error, not_reading, "
     "handshake_timeout, idle_timeout.",
     1, {"reason"}},
    {Fam::flush_timeouts_total, "baton_flush_timeouts_total", "counter",
     "Closing connections reset because the client did not take their last bytes within 2 s."},
    {Fam::stream_ids_given_up_total, "baton_stream_ids_given_up_total", "counter",
     "Client stream ids treated as used without a SYN: beyond 1,024 ids opened out of order, the lowest unused ones "
     "(a later SYN on one of them ends its tunnel as a reuse)."},
    {Fam::bytes_total, "baton_bytes_total", "counter",
     "Bytes relayed by route; direction up = client to upstream, down = upstream to client.", 2,
     {"route", "direction"}},
    {Fam::upstream_connect_seconds, "baton_upstream_connect_seconds", "histogram",
     "Time to connect to a route's upstream."},
    {Fam::handshake_seconds, "baton_handshake_seconds", "histogram",
     "TLS handshake duration, from getting a handshake slot to Finished."},
    {Fam::overload_rejections_total, "baton_overload_rejections_total", "counter",
     "Refusals by limit: max_tunnels, max_streams_per_tunnel, stream_open_rate, handshake_queue, fd_exhausted.", 1,
     {"reason"}},
    {Fam::drain_state, "baton_drain_state", "gauge",
     "0 serving, 1 notifying clients, 2 waiting for streams to end, 3 done."},
    {Fam::lifecycle_requests_total, "baton_lifecycle_requests_total", "counter",
     "GET /drain on the lifecycle listener by result: drain, unauthorized.", 1, {"result"}},
    {Fam::admin_requests_rejected_total, "baton_admin_requests_rejected_total", "counter",
     "Admin and lifecycle connections closed by a limit, by listener and reason: deadline (request not complete "
     "within 2 s), answer_deadline (answer not taken within 2 s), per_client (a 5th slow connection from one "
     "address), capacity (128 connections), head_too_large (16 KiB).",
     2, {"listener", "reason"}},
    {Fam::admin_connections, "baton_admin_connections", "gauge",
     "Open admin and lifecycle connections by listener and state: reading, slow, handling, writing.", 2,
     {"listener", "state"}},
    {Fam::ready, "baton_ready", "gauge", "1 while /readyz answers 200."},
    {Fam::restart_epoch, "baton_restart_epoch", "gauge",
     "Hot restarts since the first process of this lineage (0 = first)."},
    {Fam::handoff_tunnels_total, "baton_handoff_tunnels_total", "counter",
     "Tunnels in hot restarts: sent, received, drained (the new process could not take them), resumed (handoff "
     "failed).",
     1, {"result"}},
    {Fam::process_resident_bytes, "baton_process_resident_bytes", "gauge", "Resident memory of this process."},
    {Fam::process_open_fds, "baton_process_open_fds", "gauge", "Open file descriptors of this process."},
    {Fam::limit_usage_ratio, "baton_limit_usage_ratio", "gauge", "How full each limit is (1 = at the limit).", 1,
     {"limit"}},
    {Fam::uptime_seconds, "baton_uptime_seconds", "gauge", "Seconds since this process started."},
    {Fam::tls_certificate_expiry_seconds, "baton_tls_certificate_expiry_seconds", "gauge",
     "Earliest notAfter (unix time) of the certificates in a TLS file: cert=\"server\" (tls.cert), "
     "\"client_ca\" (tls.client_ca).",
     1, {"cert"}},
    {Fam::sessions_detached, "baton_sessions_detached", "gauge",
     "Resumable sessions whose connection broke, kept for a resume (resume.max_detached)."},
    {Fam::resume_kept_bytes, "baton_resume_kept_bytes", "gauge",
     "Bytes kept for resumes: sent to clients and not yet proved received, over all sessions."},
    {Fam::session_breaks_total, "baton_session_breaks_total", "counter",
     "Connections of resumable sessions that broke, by what became of the session: detached (kept for a resume), "
     "max_detached (ended: too many detached).",
     1, {"result"}},
    {Fam::session_resumes_total, "baton_session_resumes_total", "counter",
     "Resuming HELLOs by result: resumed, or refused (a fresh session instead): unknown_session, credentials, "
     "offsets, unavailable.",
     1, {"result"}},
    {Fam::sessions_expired_total, "baton_sessions_expired_total", "counter",
     "Detached sessions not resumed within resume.window_ms; their streams were reset."},
    {Fam::resume_replayed_bytes_total, "baton_resume_replayed_bytes_total", "counter",
     "Bytes sent to clients again after resumes: what their broken connections lost."},
};

constexpr const FamilyInfo& family(Fam f) { return kFamilies[size_t(f)]; }
std::optional<Fam> family_named(std::string_view name);

// One series: a family and its label values, in the declared order.
struct Series {
  Fam fam{};
  std::array<std::string, 2> values;

  auto operator<=>(const Series&) const = default;
  bool operator==(const Series&) const = default;
  const FamilyInfo& info() const { return family(fam); }
  // The value of a declared label ("" if the family has no such label).
  std::string_view label(std::string_view name) const;
  // Prometheus text: `family{k1="v1",k2="v2"}`, label values escaped as the
  // text format wants (backslash, double quote, newline) and made valid UTF-8
  // (a byte that is not part of valid UTF-8 becomes U+FFFD). No labels: `family`.
  std::string text() const;
  // The reverse, for a series another process sent: nullopt for a family
  // this build does not know or labels that are not its declared ones.
  static std::optional<Series> parse(std::string_view text);
};

template <Fam F, class... V>
Series series(V&&... values) {
  static_assert(sizeof...(V) == family(F).n_labels, "a value for each label the family declares, in order");
  Series s;
  s.fam = F;
  size_t i = 0;
  ((s.values[i++] = std::string(std::forward<V>(values))), ...);
  return s;
}

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
  std::map<Series, uint64_t> counters;  // monotonic
  std::map<Series, Histogram> histograms;

  void inc(const Series& s, uint64_t n = 1) { counters[s] += n; }
  void observe(const Series& s, double seconds) { histograms[s].observe(seconds); }
  uint64_t get(const Series& s) const;
  // this += (now - base), series by series: what another process counted
  // since `base` was taken (a hot restart: base = the old process's values
  // when the new one started, now = its values at the end).
  void add_delta(const Metrics& now, const Metrics& base);
  bool operator==(const Metrics&) const = default;
};

// A gauge computed for a snapshot.
using Gauge = std::pair<Series, double>;

}  // namespace baton::proxy
