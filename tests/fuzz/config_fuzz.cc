// libFuzzer target for the configuration loader (src/config/config.h).
//
// The input is a YAML file. If it holds a line "#--- tokens_file", what
// follows that line is the file auth.tokens_file may name, served as
// /fuzz/tokens.yaml (a relative `tokens.yaml` resolves there too; the base
// directory is /fuzz); without it that file holds one valid token. The loader
// reads files through config::ReadFile only, and this reader serves nothing
// else: fuzz input never reaches the disk.
//
// Properties, beyond "no crash, no leak, no undefined behaviour, no exception":
//   - at most one file is read;
//   - an error names fuzz.yaml or the tokens file, says what is wrong, and its
//     line lies within that file;
//   - an accepted Config holds what config.h promises and the rest of baton
//     relies on: a cert and a key, absolute paths, at least one route, route
//     names unique and valid in a route preamble (1..255 bytes of 0x21..0x7e,
//     find_route finds each), upstream ports not 0, addresses that print and
//     parse back, tokens when they are required, unique token names and
//     digests, heartbeat_ms below idle_timeout_ms.
//
// Build and run: tests/fuzz/run.sh SECONDS config. Seeds:
// tests/fuzz/corpus/config/ (tests/fuzz/run.sh --regen-corpus).
#include <algorithm>
#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "config/config.h"
#include "mux/control.h"
#include "script.h"

using namespace baton;
using fuzz::require;

namespace {

constexpr std::string_view kSeparator = "#--- tokens_file\n";
constexpr const char* kName = "fuzz.yaml";
constexpr const char* kBaseDir = "/fuzz";
constexpr const char* kTokensPath = "/fuzz/tokens.yaml";
constexpr std::string_view kDefaultTokens =
    "- name: fleet\n  sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n";

// Lines as YAML counts them: \n, \r\n, a lone \r, NEL, LS and PS all end one.
size_t lines(std::string_view t) {
  size_t n = 1;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == '\n' || (t[i] == '\r' && (i + 1 == t.size() || t[i + 1] != '\n'))) ++n;
    else if (t.substr(i, 2) == "\xc2\x85" || t.substr(i, 3) == "\xe2\x80\xa8" || t.substr(i, 3) == "\xe2\x80\xa9") ++n;
  }
  return n;
}

bool same_address(const config::HostPort& a) {
  auto back = config::parse_host_port(a.to_string(), true);
  return back && back->host == a.host && back->port == a.port;
}

void check_config(const config::Config& c) {
  require(c.source == kName, "source names the file");
  require(!c.tls.cert_file.empty() && !c.tls.key_file.empty(), "a cert and a key");
  for (const std::string* p : {&c.tls.cert_file, &c.tls.key_file, &c.tls.client_ca_file, &c.tls.ticket_key_file})
    require(p->empty() || (p->front() == '/' && p->find('\0') == std::string::npos), "file paths are absolute, no NUL");
  require(!c.tls.require_client_cert || !c.tls.client_ca_file.empty(), "client certificates need a CA");
  require(!c.routes.empty(), "at least one route");
  std::set<std::string> names;
  for (const config::Route& r : c.routes) {
    require(names.insert(r.name).second, "route names are unique");
    require(c.find_route(r.name) == &r, "find_route finds every route");
    require(r.upstream.port != 0 && same_address(r.upstream), "an upstream address that prints and parses back");
    std::vector<uint8_t> pre;
    mux::encode_preamble(r.name, pre);
    mux::PreambleResult back = mux::decode_preamble(pre);
    require(back.status == mux::PreambleStatus::route && back.route == r.name, "route names are valid preambles");
  }
  require(same_address(c.listen) && same_address(c.admin), "listen addresses print and parse back");
  require(!c.require_token || !c.tokens.empty(), "tokens when tokens are required");
  require(c.require_token || c.tls.require_client_cert, "no token only with client certificates");
  std::set<std::string> token_names;
  std::set<std::array<uint8_t, 32>> digests;
  for (const config::Token& t : c.tokens)
    require(token_names.insert(t.name).second && digests.insert(t.sha256).second && !t.name.empty(),
            "token names and digests are unique");
  require(c.limits.heartbeat_ms < c.limits.idle_timeout_ms, "heartbeat_ms < idle_timeout_ms");
  require(c.handoff_socket.size() <= 107, "the handoff socket path fits sockaddr_un");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string_view yaml = in, tokens = kDefaultTokens;
  if (size_t at = in.find(kSeparator); at != std::string_view::npos) {
    yaml = in.substr(0, at);
    tokens = in.substr(at + kSeparator.size());
  }
  int reads = 0;
  config::ReadFile read = [&](const std::string& path, std::string& text) -> std::string {
    ++reads;
    if (path != kTokensPath) return "cannot open the file: No such file or directory";
    text = tokens;
    return "";
  };
  config::LoadResult r = config::parse(yaml, kName, kBaseDir, read);
  require(reads <= 1, "at most one file is read");
  if (const auto* e = std::get_if<config::ConfigError>(&r)) {
    require(!e->message.empty() && !e->to_string().empty(), "an error says what is wrong");
    require(e->file == kName || e->file == kTokensPath, "an error names the file it is about");
    const std::string_view text = e->file == kName ? yaml : tokens;
    require(e->line <= lines(text) && (e->line == 0 || e->column >= 1), "an error's line lies within its file");
    return 0;
  }
  check_config(std::get<config::Config>(r));
  return 0;
}
