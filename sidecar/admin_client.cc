// `baton status` and `baton drain`: a running baton's admin API, from
// outside (docs/operations.md). status renders GET /stats; drain POSTs
// /drain and, with --wait, follows it until the drain is done or the
// process has exited.
#include <arpa/inet.h>
#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "sidecar/cli.h"

namespace baton::cli {

namespace {

// Members in document order, as the admin API writes them.
using Json = nlohmann::ordered_json;
const Json kEmpty = Json::object();

// Member `key` of an object; null when absent or not an object.
const Json& at(const Json& j, const char* key) {
  static const Json none;
  if (!j.is_object()) return none;
  auto it = j.find(key);
  return it == j.end() ? none : *it;
}
double num(const Json& j, double dflt = 0) { return j.is_number() ? j.get<double>() : dflt; }
std::string str(const Json& j, const std::string& dflt = "") { return j.is_string() ? j.get<std::string>() : dflt; }
bool truthy(const Json& j) { return j.is_boolean() && j.get<bool>(); }

std::string human_bytes(double b) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024 && u < 5) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%.0f B", b);
  else std::snprintf(buf, sizeof buf, "%.1f %s", b, units[u]);
  return buf;
}

std::string human_duration(double seconds) {
  uint64_t s = seconds > 0 ? uint64_t(seconds) : 0;
  char buf[48];
  if (s < 60 && seconds == double(s)) std::snprintf(buf, sizeof buf, "%lus", (unsigned long)s);
  else if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", seconds > 0 ? seconds : 0.0);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%lum%02lus", (unsigned long)(s / 60), (unsigned long)(s % 60));
  else if (s < 86400)
    std::snprintf(buf, sizeof buf, "%luh%02lum", (unsigned long)(s / 3600), (unsigned long)(s / 60 % 60));
  else std::snprintf(buf, sizeof buf, "%lud%02luh", (unsigned long)(s / 86400), (unsigned long)(s / 3600 % 24));
  return buf;
}

std::string count(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

// "accepted 3, established 2" from {"accepted":3,"established":2}; "none" if empty.
std::string counters_line(const Json& o) {
  std::string out;
  if (o.is_object())
    for (const auto& [key, value] : o.items()) {
      if (!out.empty()) out += ", ";
      out += key + " " + count(num(value));
    }
  return out.empty() ? "none" : out;
}

// A table with a header row; align[c] is 'l' or 'r' for column c.
std::string table(const std::vector<std::vector<std::string>>& rows, const std::string& indent, const char* align) {
  std::vector<size_t> w;
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size(); ++c) {
      if (w.size() <= c) w.push_back(0);
      w[c] = std::max(w[c], r[c].size());
    }
  std::string out;
  for (const auto& r : rows) {
    std::string line = indent;
    for (size_t c = 0; c < r.size(); ++c) {
      if (c) line += "  ";
      std::string pad(w[c] - r[c].size(), ' ');
      bool left = c < std::strlen(align) && align[c] == 'l';
      line += left ? r[c] + pad : pad + r[c];
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// The human-readable rendering of /stats.
std::string render_status(const Json& st, const std::string& admin) {
  std::string o;
  auto row = [&](const std::string& label, const std::string& text) {
    o += label + std::string(label.size() < 11 ? 11 - label.size() : 1, ' ') + text + "\n";
  };
  row("process", "pid " + count(num(at(st, "pid"))) + ", baton " + str(at(st, "version"), "?") + ", server_id \"" +
                     str(at(st, "server_id")) + "\", epoch " + count(num(at(st, "epoch"))) + ", up " +
                     human_duration(num(at(st, "uptime_s"))));
  row("state", str(at(st, "state"), "?") + (truthy(at(st, "ready")) ? " (ready)" : " (not ready)"));
  row("listen", str(at(st, "listen"), "-") + ", admin " + admin);
  const Json& d = at(st, "drain");
  if (truthy(at(d, "draining"))) {
    row("drain", "draining for " + human_duration(num(at(d, "elapsed_ms")) / 1000) + " of " +
                     human_duration(num(at(d, "grace_ms")) / 1000) + " grace; " + count(num(at(d, "tunnels_left"))) +
                     " tunnels and " + count(num(at(d, "streams_left"))) + " streams left");
  } else {
    row("drain", "not draining (grace " + human_duration(num(at(d, "grace_ms")) / 1000) + ")");
  }
  const Json& t = at(st, "tunnels");
  row("tunnels", count(num(at(t, "active"))) + " active, " + count(num(at(t, "handshaking"))) + " handshaking, " +
                     count(num(at(t, "queued"))) + " queued (" + count(num(at(t, "connections"))) + " connections)");
  row("  totals", counters_line(at(t, "total")));
  row("streams", count(num(at(at(st, "streams"), "active"))) + " active");

  std::vector<const Json*> routes;
  const Json& route_list = at(st, "routes");
  if (route_list.is_array())
    for (const Json& r : route_list) routes.push_back(&r);
  std::stable_sort(routes.begin(), routes.end(), [](const Json* a, const Json* b) {
    return num(at((*a), "bytes_up")) + num(at((*a), "bytes_down")) > num(at((*b), "bytes_up")) + num(at((*b), "bytes_down"));
  });
  o += "\nroutes (by traffic)\n";
  std::vector<std::vector<std::string>> rows = {
      {"ROUTE", "UPSTREAM", "UP", "DOWN", "ACTIVE", "OPENED", "CONNECT FAILED"}};
  for (const Json* r : routes)
    rows.push_back({str(at((*r), "name")), str(at((*r), "upstream")), human_bytes(num(at((*r), "bytes_up"))),
                    human_bytes(num(at((*r), "bytes_down"))), count(num(at((*r), "streams_active"))),
                    count(num(at((*r), "streams_opened"))), count(num(at((*r), "connect_failed")))});
  o += table(rows, "  ", "llrrrrr");

  double warn = num(at(st, "warn_percent"), 80);
  o += "\nlimits (warning at " + count(warn) + "%)\n";
  rows = {{"LIMIT", "USED", "MAX", "USE", ""}};
  const Json& limits = at(st, "limits");
  for (const auto& [name, l] : limits.is_object() ? limits.items() : kEmpty.items()) {
    double limit = num(at(l, "limit")), used = num(at(l, "used")), pct = num(at(l, "ratio")) * 100;
    char p[16];
    std::snprintf(p, sizeof p, "%.0f%%", std::floor(pct));
    bool hot = limit > 0 && pct >= warn;
    rows.push_back({name, count(used), limit > 0 ? count(limit) : "-", limit > 0 ? p : "-", hot ? "<- high" : ""});
  }
  o += table(rows, "  ", "lrrrl");

  o += "\n";
  row("overload", "rejections: " + counters_line(at(st, "overload_rejections")));
  row("handoff", "tunnels: " + counters_line(at(st, "handoff")));
  const Json& pr = at(st, "process");
  row("resources", "rss " + human_bytes(num(at(pr, "resident_bytes"))) + ", " + count(num(at(pr, "open_fds"))) +
                       " open fds");
  return o;
}

// The admin API's address: --admin, or admin.listen of -c FILE (a wildcard
// address answers on loopback), or the default 127.0.0.1:9901. 0 or an exit code.
int admin_address(const std::string& cmd, const std::string& cfg_path, const std::string& admin_arg,
                  config::HostPort& addr) {
  addr = config::HostPort{"127.0.0.1", 9901};
  if (!admin_arg.empty()) {
    std::string s = admin_arg;
    if (s.rfind("http://", 0) == 0) s = s.substr(7);
    while (!s.empty() && s.back() == '/') s.pop_back();
    auto hp = config::parse_host_port(s, false);
    if (!hp) return usage_error(cmd + ": --admin expects HOST:PORT (e.g. 127.0.0.1:9901), got \"" + admin_arg + "\"");
    addr = *hp;
  } else if (!cfg_path.empty()) {
    config::Config cfg;
    if (int rc = load_config(cfg_path, cfg)) return rc;
    if (cfg.admin.port == 0)
      return usage_error(cmd + ": admin.listen in " + cfg_path +
                         " has port 0 (any free port); give the bound address with --admin HOST:PORT");
    addr = cfg.admin;
  }
  // A wildcard listen address answers on loopback.
  in_addr a4;
  in6_addr a6;
  if (inet_pton(AF_INET, addr.host.c_str(), &a4) == 1 && a4.s_addr == htonl(INADDR_ANY)) addr.host = "127.0.0.1";
  else if (inet_pton(AF_INET6, addr.host.c_str(), &a6) == 1 && IN6_IS_ADDR_UNSPECIFIED(&a6)) addr.host = "::1";
  return 0;
}

}  // namespace

// `baton drain`: POST /drain; with --wait, until the process is gone or the
// drain is done (a preStop hook: the pod's SIGTERM then finds nothing left).
//
// What --wait can tell from outside: an admin API that answered (or took the
// connection) at the start and stops answering later means the process
// exited, its drain over: 0. One that never took a connection cannot be told
// from a wrong address, so that is an error (1), never "already drained".
int run_drain(const AdminClientOptions& o) {
  const bool wait = o.wait;
  config::HostPort addr;
  if (int rc = admin_address("drain", o.config, o.admin, addr)) return rc;
  const std::string where = addr.to_string();
  httplib::Client cli(addr.host, addr.port);
  cli.set_connection_timeout(2, 0);
  cli.set_read_timeout(5, 0);
  auto res = cli.Post("/drain", "", "application/json");
  if (!res) {
    httplib::Error e = res.error();
    if (e == httplib::Error::Connection || e == httplib::Error::ConnectionTimeout) {
      std::fprintf(stderr,
                   "baton drain: cannot reach the admin API at http://%s (%s): no baton serve answers there (not "
                   "running, already exited, or its admin.listen is another address); nothing was drained\n",
                   where.c_str(), e == httplib::Error::Connection ? "connection refused" : "connection timed out");
      return kExitFailure;
    }
    // It took the connection, then closed it without an answer: a process on
    // its way out (the drain that ends it may be another's).
    if (!wait) {
      std::fprintf(stderr, "baton drain: POST http://%s/drain got no answer (%s): the process may be exiting\n",
                   where.c_str(), httplib::to_string(e).c_str());
      return kExitFailure;
    }
  } else if (res->status != 200) {
    std::string body = res->body.substr(0, 300);
    while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
    // 503: the process is exiting, or its event loop is busy (the drain is
    // queued to it and starts when the loop gets there). --wait finds out.
    if (!wait || res->status != 503) {
      std::fprintf(stderr, "baton drain: POST http://%s/drain answered %d: %s\n", where.c_str(), res->status,
                   body.c_str());
      return kExitFailure;
    }
  } else {
    std::fputs(res->body.c_str(), stdout);
    std::fflush(stdout);
    if (!wait || res->body.find("\"phase\":\"done\"") != std::string::npos) return kExitOk;
  }
  // Bounded by the grace period the server reported, plus a margin for its exit.
  uint64_t grace_ms = 30000;
  size_t at = res ? res->body.find("\"grace_ms\":") : std::string::npos;
  if (at != std::string::npos) grace_ms = std::strtoull(res->body.c_str() + at + 11, nullptr, 10);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(grace_ms + 10000);
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = cli.Get("/drain");
    // Refused: nothing listens any more, the process is gone. (No answer or
    // a timeout is not proof of that: ask again.)
    if (!r && r.error() == httplib::Error::Connection) {
      std::fputs("{\"drained\":true,\"process\":\"gone\"}\n", stdout);
      return kExitOk;
    }
    if (r && r->status == 200 && r->body.find("\"phase\":\"done\"") != std::string::npos) {
      std::fputs(r->body.c_str(), stdout);
      return kExitOk;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // polling another process: no event to await
  }
  std::fprintf(stderr, "baton drain: still draining after %llu ms\n", static_cast<unsigned long long>(grace_ms + 10000));
  return kExitFailure;
}

int run_status(const AdminClientOptions& o) {
  const bool json = o.json;
  if (!o.config.empty() && !o.admin.empty()) return usage_error("status: give -c FILE or --admin HOST:PORT, not both");

  config::HostPort addr;
  if (int rc = admin_address("status", o.config, o.admin, addr)) return rc;
  const std::string where = addr.to_string();

  httplib::Client cli(addr.host, addr.port);
  cli.set_connection_timeout(2, 0);
  cli.set_read_timeout(5, 0);  // the admin waits up to 1 s for the event loop
  cli.set_write_timeout(2, 0);
  auto res = cli.Get("/stats");
  if (!res) {
    httplib::Error e = res.error();
    std::string why = e == httplib::Error::Connection ? "cannot connect (is `baton serve` running with this admin.listen?)"
                      : e == httplib::Error::ConnectionTimeout ? "connection timed out"
                      : e == httplib::Error::Read ? "no answer"
                                                  : "request failed (" + httplib::to_string(e) + ")";
    std::fprintf(stderr, "baton status: admin API at http://%s unreachable: %s\n", where.c_str(), why.c_str());
    return kExitFailure;
  }
  if (res->status != 200) {
    std::string body = res->body.substr(0, 300);
    while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
    std::fprintf(stderr, "baton status: admin API at http://%s answered GET /stats with %d: %s\n", where.c_str(),
                 res->status, body.c_str());
    return kExitFailure;
  }
  if (json) {
    std::fwrite(res->body.data(), 1, res->body.size(), stdout);
    if (res->body.empty() || res->body.back() != '\n') std::fputc('\n', stdout);
    return kExitOk;
  }
  // Whatever answers on the address may not be baton: no exception escapes.
  Json st = Json::parse(res->body, nullptr, false);
  if (st.is_discarded() || !st.is_object()) {
    std::fprintf(stderr, "baton status: admin API at http://%s: GET /stats is not a JSON object (%s)\n", where.c_str(),
                 st.is_discarded() ? "not valid JSON" : "not an object");
    return kExitFailure;
  }
  std::fputs(render_status(st, where).c_str(), stdout);
  return kExitOk;
}

}  // namespace baton::cli
