// Config: everything `baton serve` reads from its YAML file, validated.
//
// Loading never throws: it returns either a Config or a ConfigError naming
// file:line:column and what was expected there. Every field has a default
// except tls.cert, tls.key and at least one route.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace baton::config {

struct HostPort {
  std::string host;  // name or literal address; IPv6 literals are written [::1]:443 in YAML
  uint16_t port = 0;
  std::string to_string() const;  // "host:port", "[v6]:port"
};

// Parses "host:port" / "[v6]:port". Port 0 allowed only if allow_zero.
[[nodiscard]] std::optional<HostPort> parse_host_port(std::string_view s, bool allow_zero);

struct Token {
  std::string name;                  // for logs and metrics, never the secret
  std::array<uint8_t, 32> sha256{};  // digest of the token bytes
};

struct Route {
  std::string name;  // 1..255 printable ASCII, the preamble's route name
  HostPort upstream;
};

struct TlsSettings {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;       // empty: no client certificates asked for
  bool require_client_cert = false; // only with client_ca_file
  std::string ticket_key_file;      // empty: random ticket key per process (a warning is logged)
  uint32_t ticket_lifetime_s = 86400;
  // Where each file was named, for the messages of whoever reads it:
  // "baton.yaml:4:9: tls.cert" (file:line:column of the value, then the key).
  std::string cert_origin, key_origin, client_ca_origin, ticket_key_origin;
};

struct Limits {
  uint32_t max_tunnels = 10000;
  uint32_t max_streams_per_tunnel = 1024;
  uint32_t handshake_timeout_ms = 10000;        // TLS handshake + HELLO
  uint32_t idle_timeout_ms = 300000;            // nothing received for this long closes the tunnel
  uint32_t upstream_connect_timeout_ms = 5000;
  uint32_t heartbeat_ms = 15000;                // sent to clients in WELCOME
  uint32_t tunnel_output_high_water = 1048576;  // bytes queued to a client before upstream reads pause
  uint32_t max_concurrent_handshakes = 256;     // TLS handshakes at once; more connections wait in a queue
  uint32_t max_queued_handshakes = 4096;        // connections waiting for a handshake slot; beyond: closed
  uint32_t stream_open_rate = 200;              // streams a tunnel may open per second (token bucket)...
  uint32_t stream_open_burst = 400;             // ...and at once
  uint32_t warn_percent = 80;                   // a limit this full logs a warning (once per crossing)
  uint32_t retry_after_ms = 1000;               // sent with REJECT 3 (overloaded)
};

struct Drain {
  uint32_t grace_ms = 30000;  // from the start of the drain until every tunnel is closed and the process exits
  uint32_t delay_ms = 5000;   // keep accepting (answering REJECT 4) while the endpoint is removed
  uint32_t spread_ms = 1000;  // DRAIN notices spread over this long
  std::string reconnect_hint;  // optional host:port sent in DRAIN
};

// Session resume (docs/protocol.md 9): a session whose connection breaks is
// kept for window_ms, and a client that asked for it re-attaches it.
struct Resume {
  bool enabled = true;
  uint32_t window_ms = 30000;         // how long a detached session is kept
  uint32_t max_detached = 10000;      // detached sessions kept at once; beyond, a break ends the session
  uint32_t buffer_bytes = 1u << 20;   // bytes kept per session for the client (sent, not proved received)
  std::string advertise;              // optional host:port that reaches this server directly (WELCOME)
};

// The lifecycle listener: GET /drain for a kubelet preStop httpGet hook
// (docs/operations.md "Lifecycle hook"). Off unless listen is set.
struct Lifecycle {
  std::optional<HostPort> listen;       // may be the pod IP or 0.0.0.0 (it is token-guarded)
  std::array<uint8_t, 32> token_sha256{};  // digest of the X-Baton-Token header's value (required with listen)
};

struct Config {
  std::string source;  // file the config was read from
  std::string server_id;  // empty: the host name
  HostPort listen{"0.0.0.0", 7443};
  TlsSettings tls;
  bool require_token = true;  // false only if client certificates are required
  std::vector<Token> tokens;
  std::vector<Route> routes;
  Limits limits;
  HostPort admin{"127.0.0.1", 9901};
  std::string handoff_socket = "/run/baton/handoff.sock";
  uint32_t handoff_timeout_ms = 5000;  // longest wait for the other process at each handoff step
  Drain drain;
  Resume resume;
  Lifecycle lifecycle;
  std::string log_level = "info";   // trace, debug, info, warn, error
  std::string log_format = "text";  // text, json

  const Route* find_route(std::string_view name) const;
};

struct ConfigError {
  std::string file;
  uint32_t line = 0;    // 1-based; 0 if the error is not tied to a place (file unreadable)
  uint32_t column = 0;  // 1-based
  std::string message;  // what was expected, e.g. "expected an integer for limits.max_tunnels"
  std::string to_string() const;  // "file:line:column: message" (or "file: message")
};

using LoadResult = std::variant<Config, ConfigError>;

[[nodiscard]] LoadResult load_file(const std::string& path);
// `name` is used as the file name in errors. Relative file paths inside the
// config (tls.cert, ...) are resolved against `base_dir` if not empty.
[[nodiscard]] LoadResult parse(std::string_view yaml, const std::string& name, const std::string& base_dir = "");

// Reads the whole file at `path` into `text`; returns "" or what went wrong,
// for the user ("cannot open the file: ..."). parse() above reads from disk.
using ReadFile = std::function<std::string(const std::string& path, std::string& text)>;
// The same, reading the files the configuration names (auth.tokens_file)
// through `read_file` only: the fuzzer and tests keep the loader off the disk.
[[nodiscard]] LoadResult parse(std::string_view yaml, const std::string& name, const std::string& base_dir,
                               const ReadFile& read_file);

}  // namespace baton::config
