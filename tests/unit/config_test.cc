#include "config/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <string>

namespace fs = std::filesystem;
using namespace baton::config;

namespace {

const char* const kDigest = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f";

// Joins lines with '\n', so a test reads with the line numbers its errors name.
std::string lines(std::initializer_list<const char*> ls) {
  std::string s;
  for (const char* l : ls) s += std::string(l) + "\n";
  return s;
}

// The smallest valid file; tests append to it or replace a part.
std::string minimal(const std::string& extra = "") {
  return lines({
             "tls:",                                                                   // 1
             "  cert: server.crt",                                                     // 2
             "  key: server.key",                                                      // 3
             "auth:",                                                                  // 4
             "  tokens:",                                                              // 5
             "    - name: fleet",                                                      // 6
             "      sha256: e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f",  // 7
             "routes:",                                                                // 8
             "  echo: 127.0.0.1:7000",                                                 // 9
         }) +
         extra;
}

Config ok(const std::string& yaml, const std::string& base_dir = "") {
  LoadResult r = parse(yaml, "baton.yaml", base_dir);
  if (auto* e = std::get_if<ConfigError>(&r)) {
    ADD_FAILURE() << "unexpected error: " << e->to_string() << "\n--- yaml:\n" << yaml;
    return Config{};
  }
  return std::get<Config>(r);
}

// The whole "file:line:column: message" text of the error, or "OK".
std::string err(const std::string& yaml) {
  LoadResult r = parse(yaml, "baton.yaml");
  if (auto* e = std::get_if<ConfigError>(&r)) return e->to_string();
  return "OK";
}

#define EXPECT_ERR(yaml, text) EXPECT_EQ(err(yaml), std::string(text))
#define EXPECT_ERR_PREFIX(yaml, prefix)                          \
  do {                                                           \
    std::string e_ = err(yaml);                                  \
    EXPECT_EQ(e_.substr(0, std::string(prefix).size()), prefix) << e_; \
  } while (0)

// The sample file sits at sidecar/baton.example.yaml in the source tree. Meson
// compiles with __FILE__ relative to the build directory, so try it against
// the working directory and the test binary's directory and their parents.
fs::path find_example() {
  if (const char* env = std::getenv("BATON_SOURCE_DIR")) {
    fs::path p = fs::path(env) / "sidecar/baton.example.yaml";
    if (fs::exists(p)) return p;
  }
  std::error_code ec;
  std::vector<fs::path> bases{fs::current_path(ec), fs::read_symlink("/proc/self/exe", ec).parent_path()};
  fs::path here = fs::path(__FILE__).parent_path();
  for (fs::path base : bases) {
    for (; !base.empty(); base = base.parent_path()) {
      for (const fs::path& c : {base / here / "../../sidecar/baton.example.yaml", base / "sidecar/baton.example.yaml"})
        if (fs::exists(c, ec)) return fs::weakly_canonical(c, ec);
      if (base == base.parent_path()) break;
    }
  }
  return {};
}

// --- success -----------------------------------------------------------------

TEST(Config, Defaults) {
  Config c = ok(minimal());
  EXPECT_EQ(c.source, "baton.yaml");
  EXPECT_EQ(c.server_id, "");
  EXPECT_EQ(c.listen.host, "0.0.0.0");
  EXPECT_EQ(c.listen.port, 7443);
  EXPECT_EQ(c.tls.cert_file, "server.crt");
  EXPECT_EQ(c.tls.key_file, "server.key");
  EXPECT_EQ(c.tls.client_ca_file, "");
  EXPECT_FALSE(c.tls.require_client_cert);
  EXPECT_EQ(c.tls.ticket_key_file, "");
  EXPECT_EQ(c.tls.ticket_lifetime_s, 86400u);
  EXPECT_TRUE(c.require_token);
  ASSERT_EQ(c.tokens.size(), 1u);
  EXPECT_EQ(c.tokens[0].name, "fleet");
  EXPECT_EQ(c.tokens[0].sha256[0], 0xe2);
  EXPECT_EQ(c.tokens[0].sha256[31], 0x6f);
  ASSERT_EQ(c.routes.size(), 1u);
  EXPECT_EQ(c.routes[0].name, "echo");
  EXPECT_EQ(c.routes[0].upstream.to_string(), "127.0.0.1:7000");
  EXPECT_EQ(c.limits.max_tunnels, 10000u);
  EXPECT_EQ(c.limits.max_streams_per_tunnel, 1024u);
  EXPECT_EQ(c.limits.handshake_timeout_ms, 10000u);
  EXPECT_EQ(c.limits.idle_timeout_ms, 300000u);
  EXPECT_EQ(c.limits.upstream_connect_timeout_ms, 5000u);
  EXPECT_EQ(c.limits.heartbeat_ms, 15000u);
  EXPECT_EQ(c.limits.tunnel_output_high_water, 1048576u);
  EXPECT_EQ(c.admin.to_string(), "127.0.0.1:9901");
  EXPECT_EQ(c.handoff_socket, "/run/baton/handoff.sock");
  EXPECT_EQ(c.drain.grace_ms, 30000u);
  EXPECT_EQ(c.drain.reconnect_hint, "");
  EXPECT_TRUE(c.resume.enabled);
  EXPECT_EQ(c.resume.window_ms, 30000u);
  EXPECT_EQ(c.resume.max_detached, 10000u);
  EXPECT_EQ(c.resume.buffer_bytes, 1048576u);
  EXPECT_EQ(c.resume.advertise, "");
  EXPECT_EQ(c.log_level, "info");
  EXPECT_EQ(c.log_format, "text");
}

TEST(Config, FullValidConfig) {
  std::string yaml = lines({
      "# every field",
      "server_id: pod-b",
      "listen: \"[::]:0\"",
      "tls:",
      "  cert: /etc/baton/tls.crt",
      "  key: keys/tls.key",
      "  client_ca: ca.crt",
      "  require_client_cert: true",
      "  ticket_key: ticket.key",
      "  ticket_lifetime_s: 3600",
      "auth:",
      "  require_token: false",
      "  tokens:",
      "    - name: fleet",
      "      sha256: E2186DBDB1BB4193608605E84F33208765B5693B55EDD4F730A719A100EEEA6F",
      "    - {name: ops, sha256: 0000000000000000000000000000000000000000000000000000000000000001}",
      "routes:",
      "  echo: 127.0.0.1:7000",
      "  pg: db.internal:5432",
      "  \"v6\": \"[fd00::1]:9100\"",
      "  a/b~c!: 10.0.0.1:1",
      "limits:",
      "  max_tunnels: 5",
      "  max_streams_per_tunnel: 65536",
      "  handshake_timeout_ms: 1",
      "  idle_timeout_ms: 86400000",
      "  upstream_connect_timeout_ms: 250",
      "  heartbeat_ms: 1000",
      "  tunnel_output_high_water: 4096",
      "admin:",
      "  listen: 0.0.0.0:0",
      "handoff:",
      "  socket: run/h.sock",
      "drain:",
      "  grace_ms: 0",
      "  reconnect_hint: other.example:7443",
      "log:",
      "  level: trace",
      "  format: json",
  });
  Config c = ok(yaml, "/srv/conf");
  EXPECT_EQ(c.server_id, "pod-b");
  EXPECT_EQ(c.listen.host, "::");
  EXPECT_EQ(c.listen.port, 0);
  EXPECT_EQ(c.listen.to_string(), "[::]:0");
  EXPECT_EQ(c.tls.cert_file, "/etc/baton/tls.crt");
  EXPECT_EQ(c.tls.key_file, "/srv/conf/keys/tls.key");
  EXPECT_EQ(c.tls.client_ca_file, "/srv/conf/ca.crt");
  EXPECT_TRUE(c.tls.require_client_cert);
  EXPECT_EQ(c.tls.ticket_key_file, "/srv/conf/ticket.key");
  EXPECT_EQ(c.tls.ticket_lifetime_s, 3600u);
  EXPECT_FALSE(c.require_token);
  ASSERT_EQ(c.tokens.size(), 2u);
  EXPECT_EQ(c.tokens[0].sha256[0], 0xe2);
  EXPECT_EQ(c.tokens[1].name, "ops");
  EXPECT_EQ(c.tokens[1].sha256[31], 0x01);
  ASSERT_EQ(c.routes.size(), 4u);
  EXPECT_EQ(c.routes[1].name, "pg");
  EXPECT_EQ(c.routes[1].upstream.host, "db.internal");
  EXPECT_EQ(c.routes[1].upstream.port, 5432);
  ASSERT_NE(c.find_route("v6"), nullptr);
  EXPECT_EQ(c.find_route("v6")->upstream.host, "fd00::1");
  EXPECT_EQ(c.find_route("v6")->upstream.to_string(), "[fd00::1]:9100");
  EXPECT_NE(c.find_route("a/b~c!"), nullptr);
  EXPECT_EQ(c.find_route("nope"), nullptr);
  EXPECT_EQ(c.limits.max_tunnels, 5u);
  EXPECT_EQ(c.limits.max_streams_per_tunnel, 65536u);
  EXPECT_EQ(c.limits.handshake_timeout_ms, 1u);
  EXPECT_EQ(c.limits.idle_timeout_ms, 86400000u);
  EXPECT_EQ(c.limits.upstream_connect_timeout_ms, 250u);
  EXPECT_EQ(c.limits.heartbeat_ms, 1000u);
  EXPECT_EQ(c.limits.tunnel_output_high_water, 4096u);
  EXPECT_EQ(c.admin.to_string(), "0.0.0.0:0");
  EXPECT_EQ(c.handoff_socket, "run/h.sock");  // taken as written
  EXPECT_EQ(c.drain.grace_ms, 0u);
  EXPECT_EQ(c.drain.reconnect_hint, "other.example:7443");
  EXPECT_EQ(c.log_level, "trace");
  EXPECT_EQ(c.log_format, "json");
}

TEST(Config, ExampleFileParses) {
  fs::path p = find_example();
  ASSERT_FALSE(p.empty()) << "sidecar/baton.example.yaml not found from " << __FILE__;
  LoadResult r = load_file(p.string());
  ASSERT_TRUE(std::holds_alternative<Config>(r)) << std::get<ConfigError>(r).to_string();
  const Config& c = std::get<Config>(r);
  EXPECT_EQ(c.source, p.string());
  EXPECT_EQ(c.server_id, "pod-a");
  EXPECT_EQ(c.tls.cert_file, (p.parent_path() / "server.crt").string());
  EXPECT_EQ(c.tls.client_ca_file, (p.parent_path() / "ca.crt").string());
  EXPECT_EQ(c.tls.ticket_key_file, (p.parent_path() / "ticket.key").string());
  EXPECT_NE(c.find_route("echo"), nullptr);
  EXPECT_EQ(c.tokens.size(), 1u);
  EXPECT_EQ(c.drain.reconnect_hint, "other.example:7443");
}

TEST(Config, ParseTouchesNoFiles) {
  // None of these files exist; parse only records the paths.
  Config c = ok(minimal(), "/definitely/not/here");
  EXPECT_EQ(c.tls.cert_file, "/definitely/not/here/server.crt");
}

TEST(Config, NullValuesMeanDefaults) {
  Config c = ok(minimal(lines({"server_id:", "limits:", "admin: ~", "drain:", "  reconnect_hint: null", "log:"})));
  EXPECT_EQ(c.server_id, "");
  EXPECT_EQ(c.limits.max_tunnels, 10000u);
  EXPECT_EQ(c.admin.port, 9901);
}

TEST(Config, TokenNotRequiredWithClientCerts) {
  Config c = ok(lines({
      "tls: {cert: a, key: b, client_ca: c, require_client_cert: true}",
      "auth: {require_token: false}",
      "routes: {echo: 127.0.0.1:1}",
  }));
  EXPECT_FALSE(c.require_token);
  EXPECT_TRUE(c.tokens.empty());
}

TEST(Config, LoadFileUnreadable) {
  LoadResult r = load_file("/nonexistent/baton.yaml");
  ASSERT_TRUE(std::holds_alternative<ConfigError>(r));
  const ConfigError& e = std::get<ConfigError>(r);
  EXPECT_EQ(e.line, 0u);
  EXPECT_EQ(e.to_string(), "/nonexistent/baton.yaml: cannot open the file: No such file or directory");

  r = load_file("/");
  ASSERT_TRUE(std::holds_alternative<ConfigError>(r));
  EXPECT_EQ(std::get<ConfigError>(r).to_string(), "/: is a directory, expected a YAML file");
}

// auth.tokens_file: the token digests in a file of their own (a Kubernetes
// Secret), in the form of auth.tokens; its errors name that file's positions.
TEST(Config, TokensFile) {
  fs::path dir = fs::temp_directory_path() / ("baton-tokens-" + std::to_string(getpid()));
  fs::create_directories(dir);
  auto write = [&](const char* name, const std::string& text) {
    FILE* f = std::fopen((dir / name).c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs(text.c_str(), f);
    std::fclose(f);
  };
  std::string head = lines({"tls: {cert: a, key: b}", "routes: {echo: 127.0.0.1:1}", "auth:"});
  write("tokens.yaml", lines({"- name: fleet", std::string("  sha256: ").append(kDigest).c_str(), "- name: ci",
                              "  sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}));
  Config c = ok(head + "  tokens_file: tokens.yaml\n", dir.string());
  ASSERT_EQ(c.tokens.size(), 2u);
  EXPECT_EQ(c.tokens[0].name, "fleet");
  EXPECT_EQ(c.tokens[1].name, "ci");

  auto error_of = [&](const std::string& yaml) {
    LoadResult r = parse(yaml, "baton.yaml", dir.string());
    auto* e = std::get_if<ConfigError>(&r);
    return e ? e->to_string() : std::string("OK");
  };
  std::string tf = (dir / "bad.yaml").string();
  write("bad.yaml", lines({"- name: fleet", "  sha256: nothex"}));
  EXPECT_EQ(error_of(head + "  tokens_file: bad.yaml\n"),
            tf + ":2:11: tokens[0].sha256: expected 64 hex digits (printf %s \"$TOKEN\" | sha256sum, or baton "
                 "hash-token), got \"nothex\" (6 characters)");
  write("bad.yaml", lines({"- name: a", std::string("  sha256: ").append(kDigest).c_str(), "- name: b",
                           std::string("  sha256: ").append(kDigest).c_str()}));
  EXPECT_EQ(error_of(head + "  tokens_file: bad.yaml\n").rfind(tf + ":4:11: tokens[1].sha256: the same digest as token", 0),
            0u);
  write("bad.yaml", "name: a\n");
  EXPECT_EQ(error_of(head + "  tokens_file: bad.yaml\n"),
            tf + ":1:1: expected a sequence of {name, sha256} mappings (the form of auth.tokens), got a mapping");
  write("bad.yaml", "- [a\n");
  EXPECT_EQ(error_of(head + "  tokens_file: bad.yaml\n").rfind(tf + ":2:1: YAML syntax error", 0), 0u);
  EXPECT_EQ(error_of(head + "  tokens_file: missing.yaml\n"),
            "baton.yaml:4:16: auth.tokens_file: " + (dir / "missing.yaml").string() +
                ": cannot open the file: No such file or directory");
  EXPECT_EQ(error_of(head + "  tokens_file: tokens.yaml\n  tokens: []\n"),
            "baton.yaml:5:11: auth.tokens: give either auth.tokens or auth.tokens_file, not both");
  fs::remove_all(dir);
}

TEST(HostPort, Parse) {
  auto hp = parse_host_port("example.com:443", false);
  ASSERT_TRUE(hp);
  EXPECT_EQ(hp->host, "example.com");
  EXPECT_EQ(hp->port, 443);
  hp = parse_host_port("[::1]:8080", false);
  ASSERT_TRUE(hp);
  EXPECT_EQ(hp->host, "::1");
  EXPECT_EQ(hp->to_string(), "[::1]:8080");
  EXPECT_TRUE(parse_host_port("[fe80::1%eth0]:1", false));
  EXPECT_TRUE(parse_host_port("0.0.0.0:0", true));
  EXPECT_TRUE(parse_host_port("h:65535", false));

  EXPECT_FALSE(parse_host_port("0.0.0.0:0", false));
  EXPECT_FALSE(parse_host_port("h:65536", false));
  EXPECT_FALSE(parse_host_port("h:", false));
  EXPECT_FALSE(parse_host_port("h", false));
  EXPECT_FALSE(parse_host_port(":80", false));
  EXPECT_FALSE(parse_host_port("::1:80", false));
  EXPECT_FALSE(parse_host_port("[::1]80", false));
  EXPECT_FALSE(parse_host_port("[::1:80", false));
  EXPECT_FALSE(parse_host_port("[nothex]:80", false));
  EXPECT_FALSE(parse_host_port("1.2.3.256:80", false));
  EXPECT_FALSE(parse_host_port("bad host:80", false));
  EXPECT_FALSE(parse_host_port("h:-1", false));
  EXPECT_FALSE(parse_host_port("h:8o", false));
  EXPECT_FALSE(parse_host_port("", true));
}

TEST(ConfigError, ToString) {
  EXPECT_EQ((ConfigError{"f.yaml", 3, 7, "m"}).to_string(), "f.yaml:3:7: m");
  EXPECT_EQ((ConfigError{"f.yaml", 0, 0, "m"}).to_string(), "f.yaml: m");
}

// --- errors: one test per class, each with the exact place ------------------

TEST(ConfigErrors, UnknownKeyTopLevel) {
  EXPECT_ERR(lines({"# comment", "server_id: a", "listne: 0.0.0.0:1"}),
             "baton.yaml:3:1: unknown key \"listne\" in the top level (expected one of: server_id, listen, tls, "
             "auth, routes, limits, admin, handoff, drain, resume, lifecycle, log)");
}

TEST(ConfigResume, Values) {
  Config c = ok(minimal(lines({"resume:", "  enabled: false", "  window_ms: 5000", "  max_detached: 7",
                               "  buffer_bytes: 262144", "  advertise: 10.0.0.7:7443"})));
  EXPECT_FALSE(c.resume.enabled);
  EXPECT_EQ(c.resume.window_ms, 5000u);
  EXPECT_EQ(c.resume.max_detached, 7u);
  EXPECT_EQ(c.resume.buffer_bytes, 262144u);
  EXPECT_EQ(c.resume.advertise, "10.0.0.7:7443");
  Config empty = ok(minimal(lines({"resume:"})));
  EXPECT_TRUE(empty.resume.enabled);
}

TEST(ConfigResume, Errors) {
  EXPECT_ERR_PREFIX(minimal(lines({"resume:", "  buffer_bytes: 1000"})), "baton.yaml:11:17: resume.buffer_bytes: ");
  EXPECT_ERR_PREFIX(minimal(lines({"resume:", "  window_ms: 0"})), "baton.yaml:11:14: resume.window_ms: ");
  EXPECT_ERR_PREFIX(minimal(lines({"resume:", "  advertise: nowhere"})), "baton.yaml:11:14: resume.advertise: ");
  EXPECT_ERR_PREFIX(minimal(lines({"resume:", "  enabled: maybe"})), "baton.yaml:11:12: resume.enabled: ");
  EXPECT_ERR_PREFIX(minimal(lines({"resume:", "  windw_ms: 5"})), "baton.yaml:11:3: unknown key \"windw_ms\" in resume");
}

TEST(ConfigErrors, UnknownKeyNested) {
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunels: 5"})),
             "baton.yaml:11:3: unknown key \"max_tunels\" in limits (expected one of: max_tunnels, "
             "max_streams_per_tunnel, handshake_timeout_ms, idle_timeout_ms, upstream_connect_timeout_ms, "
             "heartbeat_ms, tunnel_output_high_water, max_concurrent_handshakes, max_queued_handshakes, stream_open_rate, "
                        "stream_open_burst, warn_percent, retry_after_ms)");
  EXPECT_ERR(minimal(lines({"log: {level: info, colour: true}"})),
             "baton.yaml:10:20: unknown key \"colour\" in log (expected one of: level, format)");
  EXPECT_ERR(lines({"auth:", "  tokens:", "    - name: a", "      secret: x"}),
             "baton.yaml:4:7: unknown key \"secret\" in auth.tokens[0] (expected one of: name, sha256)");
}

TEST(ConfigErrors, NotAnInteger) {
  EXPECT_ERR(minimal(lines({"limits:", "  heartbeat_ms: 100", "  max_tunnels:  lots"})),
             "baton.yaml:12:17: limits.max_tunnels: expected an unsigned integer, got \"lots\"");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 1.5"})),
             "baton.yaml:11:16: limits.max_tunnels: expected an unsigned integer, got \"1.5\"");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 0x10"})),
             "baton.yaml:11:16: limits.max_tunnels: expected an unsigned integer, got \"0x10\"");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: \"10\""})),
             "baton.yaml:11:16: limits.max_tunnels: expected an unsigned integer, got the quoted string \"10\" "
             "(write numbers without quotes)");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels:"})),
             "baton.yaml:11:3: limits.max_tunnels: expected an unsigned integer, got an empty value");
}

TEST(ConfigErrors, NegativeInteger) {
  EXPECT_ERR(minimal(lines({"limits:", "  idle_timeout_ms: -5"})),
             "baton.yaml:11:20: limits.idle_timeout_ms: expected an unsigned integer, got the negative number \"-5\" "
             "(expected 1..86400000)");
}

TEST(ConfigErrors, IntegerOverflowAndRange) {
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 99999999999999999999999"})),
             "baton.yaml:11:16: limits.max_tunnels: 99999999999999999999999 is too large (expected 1..1000000)");
  EXPECT_ERR(minimal(lines({"limits:", "  max_streams_per_tunnel: 65537"})),
             "baton.yaml:11:27: limits.max_streams_per_tunnel: 65537 is too large (expected 1..65536)");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 0"})),
             "baton.yaml:11:16: limits.max_tunnels: 0 is too small (expected 1..1000000)");
  EXPECT_ERR(minimal(lines({"limits:", "  handshake_timeout_ms: 86400001"})),
             "baton.yaml:11:25: limits.handshake_timeout_ms: 86400001 is too large (expected 1..86400000)");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 010"})),
             "baton.yaml:11:16: limits.max_tunnels: expected an unsigned integer without leading zeros, got \"010\" "
             "(YAML 1.1 readers take it as octal)");
}

TEST(ConfigErrors, Booleans) {
  std::string head = "tls:\n  cert: a\n  key: b\n  client_ca: c\n  require_client_cert: ";
  EXPECT_ERR(head + "yes\n", "baton.yaml:5:24: tls.require_client_cert: expected true or false, got \"yes\"");
  EXPECT_ERR(head + "True\n", "baton.yaml:5:24: tls.require_client_cert: expected true or false, got \"True\"");
  EXPECT_ERR(head + "\"true\"\n",
             "baton.yaml:5:24: tls.require_client_cert: expected true or false, got the quoted string \"true\"");
  EXPECT_ERR(head + "[true]\n", "baton.yaml:5:24: tls.require_client_cert: expected true or false, got a sequence");
}

TEST(ConfigErrors, WrongTypes) {
  EXPECT_ERR(lines({"listen: [0.0.0.0, 7443]"}),
             "baton.yaml:1:9: listen: expected host:port, e.g. 0.0.0.0:7443 or [::]:7443, got a sequence (quote "
             "IPv6 addresses: \"[::1]:443\")");
  EXPECT_ERR(lines({"routes:", "  v6: [::1]:443"}),
             "baton.yaml:2:8: YAML syntax error: did not find expected node content while parsing a flow node that "
             "started at 2:8 (quote IPv6 addresses: \"[::1]:443\")");
  EXPECT_ERR(lines({"drain:", "  reconnect_hint: {host: a, port: 1}"}),
             "baton.yaml:2:19: drain.reconnect_hint: expected host:port, e.g. 10.0.0.5:8080, got a mapping");
  EXPECT_ERR(lines({"tls: server.crt"}), "baton.yaml:1:6: tls: expected a mapping with cert: and key:, got \"server.crt\"");
  EXPECT_ERR(lines({"tls:", "  cert:", "    file: a"}),
             "baton.yaml:3:5: tls.cert: expected a file path, got a mapping");
  EXPECT_ERR(lines({"routes:", "  - echo: 127.0.0.1:1"}),
             "baton.yaml:2:3: routes: expected a mapping of route name to host:port (e.g. echo: 127.0.0.1:7000), "
             "got a sequence");
  EXPECT_ERR(lines({"auth:", "  tokens: fleet"}),
             "baton.yaml:2:11: auth.tokens: expected a sequence of {name, sha256} mappings, got \"fleet\"");
  EXPECT_ERR(lines({"auth:", "  tokens:", "    - fleet"}),
             "baton.yaml:3:7: auth.tokens[0]: expected a mapping with name: and sha256:, got \"fleet\"");
  EXPECT_ERR(lines({"? [a, b]", ": 1"}), "baton.yaml:1:3: expected a key name in the top level, got a sequence");
  EXPECT_ERR(lines({"- tls"}),
             "baton.yaml:1:1: expected a mapping at the top level (server_id:, listen:, tls:, ...), got a sequence");
}

TEST(ConfigErrors, YamlSyntax) {
  EXPECT_ERR(lines({"tls:", "  cert: a", " key: b"}),
             "baton.yaml:3:2: YAML syntax error: did not find expected key while parsing a block mapping that started "
             "at 1:1");
  EXPECT_ERR(lines({"routes:", "  echo: \"127.0.0.1:1"}),
             "baton.yaml:3:1: YAML syntax error: found unexpected end of stream while scanning a quoted scalar that "
             "started at 2:9");
  EXPECT_ERR(lines({"tls: {cert: a, key: b"}),
             "baton.yaml:2:1: YAML syntax error: did not find expected ',' or '}' while parsing a flow mapping that "
             "started at 1:6");
  EXPECT_ERR(lines({"tls:", "\tcert: a"}),
             "baton.yaml:2:1: YAML syntax error: found character that cannot start any token while scanning for the "
             "next token that started at 2:1 (YAML does not allow tabs for indentation; use spaces)");
  EXPECT_ERR(lines({"server_id: *nowhere"}), "baton.yaml:1:12: YAML syntax error: found undefined alias");
  // Found by tests/fuzz/config_fuzz.cc: at the end of a file without a final
  // newline, libyaml names a line past the last one; the error names the end
  // of the last line instead.
  EXPECT_ERR("tls: {cert: a, key: b}\nauth: {tokens",
             "baton.yaml:2:14: YAML syntax error: did not find expected ',' or '}' while parsing a flow mapping that "
             "started at 2:7");
  // ... lines end where YAML says (a lone \r, LS, NEL too), and libyaml's
  // positions count characters, not bytes.
  EXPECT_ERR("k: \"x\xe2\x80\xa8y",
             "baton.yaml:2:2: YAML syntax error: found unexpected end of stream while scanning a quoted scalar that "
             "started at 1:4");
  EXPECT_ERR("0\n---", "baton.yaml:2:4: expected a single YAML document, found a second one here");
  EXPECT_ERR("k: \"x\ry",
             "baton.yaml:2:2: YAML syntax error: found unexpected end of stream while scanning a quoted scalar that "
             "started at 1:4");
  EXPECT_ERR("k: \xc3\xa9\xc3\xa9\xc3\xa9\n\tx: 1\n",
             "baton.yaml:2:1: YAML syntax error: found a tab character that violates indentation while scanning a "
             "plain scalar that started at 1:4 (YAML does not allow tabs for indentation; use spaces)");
  EXPECT_ERR("routes:\n  echo: \"127.0.0.1:1",
             "baton.yaml:2:21: YAML syntax error: found unexpected end of stream while scanning a quoted scalar that "
             "started at 2:9");
  // libyaml's reader reports these by byte offset; the position is still line:column.
  EXPECT_ERR("server_id: ab\xff\n",
             "baton.yaml:1:14: YAML syntax error: invalid leading UTF-8 octet (the file must be UTF-8 text)");
  EXPECT_ERR("tls: {cert: a, key: b}\nserver_id: \"a\x01\"\n",
             "baton.yaml:2:14: YAML syntax error: control characters are not allowed");
}

TEST(ConfigErrors, MissingRequired) {
  EXPECT_ERR("", "baton.yaml:1:1: missing required key \"tls\" in the top level (tls.cert and tls.key are required)");
  EXPECT_ERR(lines({"# nothing", "", "routes: {a: b:1}"}),
             "baton.yaml:1:1: missing required key \"tls\" in the top level (tls.cert and tls.key are required)");
  EXPECT_ERR("tls: {cert: a, key: b}\nauth: {tokens: [{name: x, sha256: " + std::string(kDigest) + "}]}\n",
             "baton.yaml:1:1: missing required key \"routes\" in the top level (at least one route: name: host:port)");
  EXPECT_ERR(lines({"routes: {a: b:1}", "tls:", "  key: server.key", "  ticket_lifetime_s: 5"}),
             "baton.yaml:3:3: missing required key \"cert\" in tls (the server certificate chain, PEM)");
  EXPECT_ERR(lines({"tls:", "  cert: a"}),
             "baton.yaml:2:3: missing required key \"key\" in tls (the server private key, PEM)");
  EXPECT_ERR(lines({"tls:", "  cert: a", "  key: b", "auth:", "  tokens:", "    - name: fleet"}),
             "baton.yaml:6:7: missing required key \"sha256\" in auth.tokens[0]");
  EXPECT_ERR(lines({"tls:", "  cert: \"\"", "  key: b"}), "baton.yaml:2:9: tls.cert: expected a file path, got an empty string");
  EXPECT_ERR(lines({"tls:", "  cert:", "  key: b"}), "baton.yaml:2:3: tls.cert: expected a file path, got an empty value");
}

TEST(ConfigErrors, DuplicateKeys) {
  EXPECT_ERR(minimal(lines({"listen: 0.0.0.0:1", "listen: 0.0.0.0:2"})),
             "baton.yaml:11:1: duplicate key \"listen\" in the top level (first at 10:1)");
  EXPECT_ERR(minimal(lines({"limits:", "  max_tunnels: 1", "  max_tunnels: 2"})),
             "baton.yaml:12:3: duplicate key \"max_tunnels\" in limits (first at 11:3)");
  EXPECT_ERR(lines({"routes:", "  echo: 127.0.0.1:1", "  echo: 127.0.0.1:2"}),
             "baton.yaml:3:3: duplicate key \"echo\" in routes (first at 2:3)");
  EXPECT_ERR(minimal(lines({"tls:", "  cert: x"})), "baton.yaml:10:1: duplicate key \"tls\" in the top level (first at 1:1)");
}

TEST(ConfigErrors, RouteNames) {
  EXPECT_ERR(lines({"routes:", "  my route: 127.0.0.1:1"}),
             "baton.yaml:2:3: routes: route name \"my route\" must be printable ASCII without spaces (0x21..0x7e)");
  EXPECT_ERR(lines({"routes:", "  \"\": 127.0.0.1:1"}),
             "baton.yaml:2:3: routes: route name \"\" must be 1..255 characters long");
  std::string long_name(256, 'r');
  EXPECT_ERR_PREFIX("routes:\n  " + long_name + ": 127.0.0.1:1\n", "baton.yaml:2:3: routes: route name \"rrr");
  std::string max_name(255, 'r');
  Config c = ok(lines({"tls: {cert: a, key: b, client_ca: c, require_client_cert: true}", "auth: {require_token: false}"}) +
                "routes:\n  " + max_name + ": 127.0.0.1:1\n  \"!~\": 127.0.0.1:2\n");
  ASSERT_EQ(c.routes.size(), 2u);
  EXPECT_EQ(c.routes[0].name, max_name);
  EXPECT_EQ(c.routes[1].name, "!~");
}

TEST(ConfigErrors, HostPort) {
  EXPECT_ERR(lines({"routes:", "  echo: 127.0.0.1:0"}),
             "baton.yaml:2:9: routes.echo: expected host:port, e.g. 10.0.0.5:8080, got \"127.0.0.1:0\": port 0 is not "
             "allowed here (expected 1..65535)");
  EXPECT_ERR(lines({"routes:", "  echo: 127.0.0.1:65536"}),
             "baton.yaml:2:9: routes.echo: expected host:port, e.g. 10.0.0.5:8080, got \"127.0.0.1:65536\": the port "
             "must be at most 65535");
  EXPECT_ERR(lines({"listen: ::1:7443"}),
             "baton.yaml:1:9: listen: expected host:port, e.g. 0.0.0.0:7443 or [::]:7443, got \"::1:7443\": IPv6 "
             "addresses must be written in brackets, e.g. [::1]:443");
  EXPECT_ERR(lines({"listen: localhost"}),
             "baton.yaml:1:9: listen: expected host:port, e.g. 0.0.0.0:7443 or [::]:7443, got \"localhost\": the "
             "':port' is missing");
}

TEST(ConfigErrors, Tokens) {
  std::string head = lines({"tls: {cert: a, key: b}", "routes: {echo: 127.0.0.1:1}", "auth:", "  tokens:"});
  EXPECT_ERR(head + lines({"    - name: a", "      sha256: abc"}),
             "baton.yaml:6:15: auth.tokens[0].sha256: expected 64 hex digits (printf %s \"$TOKEN\" | sha256sum, or baton "
             "hash-token), got \"abc\" (3 characters)");
  std::string bad(64, 'g');
  EXPECT_ERR_PREFIX(head + "    - name: a\n      sha256: " + bad + "\n",
                    "baton.yaml:6:15: auth.tokens[0].sha256: expected 64 hex digits");
  std::string two = head + lines({"    - name: a", "      sha256: 0000000000000000000000000000000000000000000000000000000000000001",
                                  "    - name: a", "      sha256: 0000000000000000000000000000000000000000000000000000000000000002"});
  EXPECT_ERR(two, "baton.yaml:7:13: auth.tokens[1].name: duplicate token name \"a\" (first at 5:13)");
  std::string same = head + lines({"    - name: a", "      sha256: 0000000000000000000000000000000000000000000000000000000000000001",
                                   "    - sha256: 0000000000000000000000000000000000000000000000000000000000000001",
                                   "      name: b"});
  EXPECT_ERR(same, "baton.yaml:7:15: auth.tokens[1].sha256: the same digest as token \"a\" (each token needs its own "
                   "secret)");
  EXPECT_ERR(head + lines({"    - name: a b", "      sha256: 00"}),
             "baton.yaml:5:13: auth.tokens[0].name: expected printable ASCII without spaces, got \"a b\"");
}

TEST(ConfigErrors, AuthRules) {
  EXPECT_ERR(lines({"tls: {cert: a, key: b}", "routes: {echo: 127.0.0.1:1}"}),
             "baton.yaml:1:1: auth.tokens: at least one token is needed while auth.require_token is true (add - name: "
             "... sha256: ..., or auth.tokens_file, or require client certificates)");
  EXPECT_ERR(lines({"tls: {cert: a, key: b}", "routes: {echo: 127.0.0.1:1}", "auth:", "  tokens: []"}),
             "baton.yaml:4:11: auth.tokens: at least one token is needed while auth.require_token is true (add - "
             "name: ... sha256: ..., or auth.tokens_file, or require client certificates)");
  EXPECT_ERR(lines({"tls: {cert: a, key: b}", "routes: {echo: 127.0.0.1:1}", "auth:", "  require_token: false"}),
             "baton.yaml:4:18: auth.require_token: false is allowed only with tls.require_client_cert: true "
             "(otherwise anyone could open a tunnel)");
  EXPECT_ERR(lines({"tls:", "  cert: a", "  key: b", "  require_client_cert: true", "routes: {echo: 127.0.0.1:1}"}),
             "baton.yaml:4:24: tls.require_client_cert: true needs tls.client_ca (the CA that signs client "
             "certificates)");
}

TEST(ConfigErrors, RoutesEmpty) {
  EXPECT_ERR(lines({"tls: {cert: a, key: b}", "routes: {}"}),
             "baton.yaml:2:9: routes: expected at least one route (name: host:port)");
  EXPECT_ERR(lines({"tls: {cert: a, key: b}", "routes:"}),
             "baton.yaml:2:1: routes: expected a mapping of route name to host:port (e.g. echo: 127.0.0.1:7000), got "
             "an empty value");
}

TEST(ConfigErrors, HeartbeatBelowIdle) {
  EXPECT_ERR(minimal(lines({"limits:", "  idle_timeout_ms: 10000", "  heartbeat_ms: 10000"})),
             "baton.yaml:12:17: limits.heartbeat_ms (10000) must be less than limits.idle_timeout_ms (10000): clients "
             "ping every heartbeat_ms and the server closes tunnels idle for idle_timeout_ms");
  EXPECT_ERR(minimal(lines({"limits:", "  idle_timeout_ms: 1000"})),
             "baton.yaml:11:20: limits.heartbeat_ms (15000) must be less than limits.idle_timeout_ms (1000): clients "
             "ping every heartbeat_ms and the server closes tunnels idle for idle_timeout_ms");
}

TEST(ConfigErrors, EnumsAndMisc) {
  EXPECT_ERR(minimal(lines({"log:", "  level: verbose"})),
             "baton.yaml:11:10: log.level: expected one of trace|debug|info|warn|error, got \"verbose\"");
  EXPECT_ERR(minimal(lines({"log:", "  format: xml"})),
             "baton.yaml:11:11: log.format: expected one of text|json, got \"xml\"");
  EXPECT_ERR(minimal(lines({"drain:", "  reconnect_hint: other.example"})),
             "baton.yaml:11:19: drain.reconnect_hint: expected host:port, e.g. 10.0.0.5:8080, got \"other.example\": "
             "the ':port' is missing");
  EXPECT_ERR(minimal(lines({"admin:", "  listen: 127.0.0.1:99999"})),
             "baton.yaml:11:11: admin.listen: expected host:port, e.g. 0.0.0.0:7443 or [::]:7443, got "
             "\"127.0.0.1:99999\": the port must be at most 65535");
  EXPECT_ERR(minimal("handoff:\n  socket: /" + std::string(107, 's') + "\n"),
             "baton.yaml:11:11: handoff.socket: longer than 107 bytes, the limit of a Unix socket path");
  EXPECT_ERR(minimal(lines({"handoff:", "  timeout_ms: 50"})),
             "baton.yaml:11:15: handoff.timeout_ms: 50 is too small (expected 100..600000)");
  EXPECT_ERR(minimal(lines({"handoff:", "  timeot_ms: 500"})),
             "baton.yaml:11:3: unknown key \"timeot_ms\" in handoff (expected one of: socket, timeout_ms)");
  EXPECT_EQ(ok(minimal(lines({"handoff:", "  timeout_ms: 250"}))).handoff_timeout_ms, 250u);
  EXPECT_ERR("---\n" + minimal(lines({"---", "a: 1"})),
             "baton.yaml:12:1: expected a single YAML document, found a second one here");
  EXPECT_EQ(ok("---\n" + minimal("...\n")).routes.size(), 1u);
}

}  // namespace

// Where each TLS file was named, for the messages of whoever reads it later
// (a directory as tls.cert: docs/configuration.md "Certificate checks").
TEST(Config, TlsFileOrigins) {
  Config c = ok(lines({"tls:", "  cert: server.crt", "  key:   server.key", "  client_ca: ca.crt",
                       "  require_client_cert: true", "  ticket_key: ticket.key", "auth:", "  require_token: false",
                       "routes:", "  echo: 127.0.0.1:7000"}));
  EXPECT_EQ(c.tls.cert_origin, "baton.yaml:2:9: tls.cert");
  EXPECT_EQ(c.tls.key_origin, "baton.yaml:3:10: tls.key");
  EXPECT_EQ(c.tls.client_ca_origin, "baton.yaml:4:14: tls.client_ca");
  EXPECT_EQ(c.tls.ticket_key_origin, "baton.yaml:6:15: tls.ticket_key");
}
