#include "config/config.h"

#include <arpa/inet.h>
#include <yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <functional>
#include <map>
#include <memory>
#include <new>

#include "util/bytes.h"

namespace baton::config {

namespace {

// Upper bounds that catch typos (an extra zero or two) without getting in the
// way of real deployments.
constexpr uint32_t kDay_ms = 24u * 3600u * 1000u;
constexpr uint32_t kMaxTunnels = 1000000;
constexpr uint32_t kMaxStreamsPerTunnel = 65536;
constexpr uint32_t kMaxHighWater = 1u << 30;
constexpr uint32_t kMaxTicketLifetime_s = 7u * 24u * 3600u;  // the RFC 8446 cap, also sane for 1.2
constexpr size_t kMaxServerId = 128;                        // HELLO's client_id has the same cap
constexpr size_t kMaxTokenName = 128;
constexpr size_t kMaxUnixPath = 107;  // sizeof(sockaddr_un::sun_path) - 1
constexpr size_t kMaxConfigFile = 16u << 20;

// ---------------------------------------------------------------------------
// host:port

bool is_digits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// "" if `s` is a valid host:port, else why not.
std::string host_port_problem(std::string_view s, bool allow_zero, HostPort* out) {
  if (s.empty()) return "it is empty";
  std::string_view host, port;
  if (s.front() == '[') {
    auto close = s.find(']');
    if (close == std::string_view::npos) return "the IPv6 address has no closing ']'";
    host = s.substr(1, close - 1);
    auto rest = s.substr(close + 1);
    if (rest.empty() || rest.front() != ':') return "':port' must follow the bracketed address";
    port = rest.substr(1);
    std::string addr(host.substr(0, host.find('%')));  // a zone (%eth0) may follow
    in6_addr a6;
    if (addr.empty() || inet_pton(AF_INET6, addr.c_str(), &a6) != 1)
      return "\"" + std::string(host) + "\" is not an IPv6 address";
    if (host.find('%') != std::string_view::npos && host.find('%') + 1 == host.size())
      return "the IPv6 zone after '%' is empty";
  } else {
    auto colon = s.rfind(':');
    if (colon == std::string_view::npos) return "the ':port' is missing";
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
    if (host.empty()) return "the host is missing (write 0.0.0.0 or [::] for all addresses)";
    if (host.find(':') != std::string_view::npos)
      return "IPv6 addresses must be written in brackets, e.g. [::1]:443";
    if (host.size() > 253) return "the host name is longer than 253 characters";
    bool numeric = true;
    for (char c : host) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                c == '.' || c == '_';
      if (!ok) return std::string("the host contains '") + c + "', which is not allowed in a host name";
      if (!((c >= '0' && c <= '9') || c == '.')) numeric = false;
    }
    if (numeric) {
      in_addr a4;
      if (inet_pton(AF_INET, std::string(host).c_str(), &a4) != 1)
        return "\"" + std::string(host) + "\" is not an IPv4 address";
    }
  }
  if (!is_digits(port) || port.size() > 5) return "the port must be a number";
  uint32_t p = 0;
  for (char c : port) p = p * 10 + uint32_t(c - '0');
  if (p > 65535) return "the port must be at most 65535";
  if (p == 0 && !allow_zero) return "port 0 is not allowed here (expected 1..65535)";
  if (out) {
    out->host = std::string(host);
    out->port = uint16_t(p);
  }
  return "";
}

// ---------------------------------------------------------------------------
// Walking the libyaml document

struct Mark {
  uint32_t line = 1;
  uint32_t column = 1;
};

Mark mark_of(const yaml_mark_t& m) { return {uint32_t(m.line) + 1, uint32_t(m.column) + 1}; }

struct DocumentDeleter {
  void operator()(yaml_document_t* d) const {
    yaml_document_delete(d);
    delete d;
  }
};

const char* kind_name(const yaml_node_t* n) {
  switch (n->type) {
    case YAML_MAPPING_NODE: return "a mapping";
    case YAML_SEQUENCE_NODE: return "a sequence";
    case YAML_SCALAR_NODE: return "a scalar";
    default: return "nothing";
  }
}

std::string_view scalar_text(const yaml_node_t* n) {
  return {reinterpret_cast<const char*>(n->data.scalar.value), n->data.scalar.length};
}

bool is_plain(const yaml_node_t* n) { return n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE; }

// A plain ~, null or empty value: YAML's null, which we read as "not set".
bool is_null(const yaml_node_t* n) {
  if (n->type != YAML_SCALAR_NODE || !is_plain(n)) return false;
  auto s = scalar_text(n);
  return s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL";
}

// Quotes a scalar for an error message, shortening long ones and escaping
// anything unprintable.
std::string quote(std::string_view s) {
  std::string out = "\"";
  size_t n = 0;
  for (unsigned char c : s) {
    if (++n > 60) {
      out += "...";
      break;
    }
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

// What a node holds, for "expected X, got Y".
std::string describe(const yaml_node_t* n) {
  if (n->type != YAML_SCALAR_NODE) return kind_name(n);
  if (is_null(n)) return "an empty value";
  if (!is_plain(n)) return "the quoted string " + quote(scalar_text(n));
  return quote(scalar_text(n));
}

class Loader {
 public:
  Loader(yaml_document_t* doc, const std::string& name, const std::string& base_dir, const ReadFile& read_file)
      : doc_(doc), name_(name), base_dir_(base_dir), read_file_(read_file) {}

  // Fills cfg; returns false with error() set on the first problem.
  bool load(Config& cfg);
  const ConfigError& error() const { return error_; }

 private:
  struct Entry {
    std::string key;
    const yaml_node_t* key_node;
    const yaml_node_t* value;
  };
  using Entries = std::vector<Entry>;

  bool fail(Mark m, std::string message) {
    error_ = ConfigError{name_, m.line, m.column, std::move(message)};
    return false;
  }
  bool fail(const yaml_node_t* n, std::string message) { return fail(mark_of(n->start_mark), std::move(message)); }
  // The value of a key that is null has no useful position of its own; the key has.
  bool fail(const Entry& e, std::string message) {
    return fail(is_null(e.value) ? e.key_node : e.value, std::move(message));
  }

  const yaml_node_t* node(int id) const { return yaml_document_get_node(doc_, id); }

  // Reads a mapping into entries, rejecting non-scalar keys, duplicate keys
  // and keys not in `allowed`. `where` names the mapping in messages: "the top
  // level", "tls", ...
  bool entries(const yaml_node_t* map, const std::string& where, std::initializer_list<const char*> allowed,
               Entries& out);
  // Same for mappings whose keys are free-form names (routes).
  bool named_entries(const yaml_node_t* map, const std::string& where, Entries& out);

  bool expect_mapping(const Entry& e, const std::string& path, const char* what) {
    if (e.value->type == YAML_MAPPING_NODE) return true;
    return fail(e, path + ": expected " + what + ", got " + describe(e.value));
  }

  bool get_string(const Entry& e, const std::string& path, const char* what, std::string& out);
  bool get_path(const Entry& e, const std::string& path, std::string& out);
  bool get_bool(const Entry& e, const std::string& path, bool& out);
  bool get_u32(const Entry& e, const std::string& path, uint32_t lo, uint32_t hi, uint32_t& out);
  bool get_host_port(const Entry& e, const std::string& path, bool allow_zero, HostPort& out);
  bool get_choice(const Entry& e, const std::string& path, std::initializer_list<const char*> choices,
                  std::string& out);

  bool load_tls(const Entry& e, Config& cfg);
  bool load_auth(const Entry& e, Config& cfg);
  bool load_token(const yaml_node_t* n, const std::string& path, Config& cfg);
  bool load_tokens_file(const Entry& f, const std::string& p, Config& cfg);
  bool load_routes(const Entry& e, Config& cfg);
  bool load_limits(const Entry& e, Config& cfg);
  bool load_handoff(const Entry& e, Config& cfg);
  bool load_single(const Entry& e, const char* section, const char* key, const char* what,
                   const std::function<bool(const Entry&, const std::string&)>& read);
  bool load_drain(const Entry& e, Config& cfg);
  bool load_resume(const Entry& e, Config& cfg);
  bool load_lifecycle(const Entry& e, Config& cfg);
  bool get_sha256(const Entry& e, const std::string& path, std::array<uint8_t, 32>& out);
  bool load_log(const Entry& e, Config& cfg);
  bool check(Config& cfg);

  // Where each key that was set sits ("tls.client_ca" -> its value), for
  // errors that involve more than one field.
  Mark where(const std::string& path, Mark fallback) const {
    auto it = marks_.find(path);
    return it == marks_.end() ? fallback : it->second;
  }
  // "file:line:column: key" of a value, for errors found after loading
  // (a certificate file that cannot be read).
  std::string origin(const Entry& e, const std::string& path) const {
    const Mark m = mark_of((is_null(e.value) ? e.key_node : e.value)->start_mark);
    return name_ + ":" + std::to_string(m.line) + ":" + std::to_string(m.column) + ": " + path;
  }
  void remember(const std::string& path, const Entry& e) {
    marks_[path] = mark_of((is_null(e.value) ? e.key_node : e.value)->start_mark);
  }

  yaml_document_t* doc_;
  const std::string& name_;
  const std::string& base_dir_;
  const ReadFile& read_file_;
  ConfigError error_;
  std::map<std::string, Mark> marks_;
  std::map<std::string, Mark> token_names_;
  std::map<std::string, std::string> token_digests_;  // hex digest -> token name
};

std::string join(std::initializer_list<const char*> names) {
  std::string s;
  for (const char* n : names) {
    if (!s.empty()) s += ", ";
    s += n;
  }
  return s;
}

bool Loader::entries(const yaml_node_t* map, const std::string& where, std::initializer_list<const char*> allowed,
                     Entries& out) {
  std::map<std::string, Mark> seen;
  for (auto* p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; ++p) {
    const yaml_node_t* k = node(p->key);
    const yaml_node_t* v = node(p->value);
    if (k->type != YAML_SCALAR_NODE)
      return fail(k, "expected a key name in " + where + ", got " + std::string(kind_name(k)));
    std::string key(scalar_text(k));
    bool known = false;
    for (const char* a : allowed) known = known || key == a;
    if (!known)
      return fail(k, "unknown key " + quote(key) + " in " + where + " (expected one of: " + join(allowed) + ")");
    auto [it, fresh] = seen.emplace(key, mark_of(k->start_mark));
    if (!fresh)
      return fail(k, "duplicate key " + quote(key) + " in " + where + " (first at " + std::to_string(it->second.line) +
                         ":" + std::to_string(it->second.column) + ")");
    out.push_back({std::move(key), k, v});
  }
  return true;
}

bool Loader::named_entries(const yaml_node_t* map, const std::string& where, Entries& out) {
  std::map<std::string, Mark> seen;
  for (auto* p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; ++p) {
    const yaml_node_t* k = node(p->key);
    const yaml_node_t* v = node(p->value);
    if (k->type != YAML_SCALAR_NODE)
      return fail(k, "expected a name as key in " + where + ", got " + std::string(kind_name(k)));
    std::string key(scalar_text(k));
    auto [it, fresh] = seen.emplace(key, mark_of(k->start_mark));
    if (!fresh)
      return fail(k, "duplicate key " + quote(key) + " in " + where + " (first at " + std::to_string(it->second.line) +
                         ":" + std::to_string(it->second.column) + ")");
    out.push_back({std::move(key), k, v});
  }
  return true;
}

bool Loader::get_string(const Entry& e, const std::string& path, const char* what, std::string& out) {
  if (e.value->type != YAML_SCALAR_NODE || is_null(e.value))
    return fail(e, path + ": expected " + what + ", got " + describe(e.value));
  out = std::string(scalar_text(e.value));
  if (out.empty()) return fail(e, path + ": expected " + what + ", got an empty string");
  return true;
}

bool Loader::get_path(const Entry& e, const std::string& path, std::string& out) {
  std::string p;
  if (!get_string(e, path, "a file path", p)) return false;
  if (p.find('\0') != std::string::npos) return fail(e, path + ": the file path contains a NUL byte");
  if (!base_dir_.empty() && p.front() != '/') p = (std::filesystem::path(base_dir_) / p).string();
  out = std::move(p);
  return true;
}

bool Loader::get_bool(const Entry& e, const std::string& path, bool& out) {
  if (e.value->type == YAML_SCALAR_NODE && is_plain(e.value)) {
    auto s = scalar_text(e.value);
    if (s == "true" || s == "false") {
      out = s == "true";
      return true;
    }
  }
  return fail(e, path + ": expected true or false, got " + describe(e.value));
}

bool Loader::get_u32(const Entry& e, const std::string& path, uint32_t lo, uint32_t hi, uint32_t& out) {
  const std::string range = " (expected " + std::to_string(lo) + ".." + std::to_string(hi) + ")";
  if (e.value->type != YAML_SCALAR_NODE || is_null(e.value))
    return fail(e, path + ": expected an unsigned integer, got " + describe(e.value));
  auto s = scalar_text(e.value);
  if (!is_plain(e.value))
    return fail(e, path + ": expected an unsigned integer, got " + describe(e.value) + " (write numbers without quotes)");
  if (!s.empty() && s.front() == '-' && is_digits(s.substr(1)))
    return fail(e, path + ": expected an unsigned integer, got the negative number " + quote(s) + range);
  if (!is_digits(s)) return fail(e, path + ": expected an unsigned integer, got " + quote(s));
  if (s.size() > 1 && s.front() == '0')
    return fail(e, path + ": expected an unsigned integer without leading zeros, got " + quote(s) +
                       " (YAML 1.1 readers take it as octal)");
  uint64_t v = 0;
  for (char c : s) {
    v = v * 10 + uint64_t(c - '0');
    if (v > hi) return fail(e, path + ": " + std::string(s) + " is too large" + range);
  }
  if (v < lo) return fail(e, path + ": " + std::string(s) + " is too small" + range);
  out = uint32_t(v);
  return true;
}

bool Loader::get_host_port(const Entry& e, const std::string& path, bool allow_zero, HostPort& out) {
  const char* example = allow_zero ? "host:port, e.g. 0.0.0.0:7443 or [::]:7443" : "host:port, e.g. 10.0.0.5:8080";
  if (e.value->type == YAML_SEQUENCE_NODE)  // [::1]:443 unquoted reads as a flow sequence
    return fail(e, path + ": expected " + example + ", got a sequence (quote IPv6 addresses: \"[::1]:443\")");
  if (e.value->type != YAML_SCALAR_NODE || is_null(e.value))
    return fail(e, path + ": expected " + example + ", got " + describe(e.value));
  auto s = scalar_text(e.value);
  std::string why = host_port_problem(s, allow_zero, &out);
  if (!why.empty()) return fail(e, path + ": expected " + example + ", got " + quote(s) + ": " + why);
  return true;
}

bool Loader::get_choice(const Entry& e, const std::string& path, std::initializer_list<const char*> choices,
                        std::string& out) {
  if (e.value->type == YAML_SCALAR_NODE && !is_null(e.value)) {
    auto s = scalar_text(e.value);
    for (const char* c : choices) {
      if (s == c) {
        out = c;
        return true;
      }
    }
  }
  std::string list;
  for (const char* c : choices) {
    if (!list.empty()) list += '|';
    list += c;
  }
  return fail(e, path + ": expected one of " + list + ", got " + describe(e.value));
}

bool Loader::load(Config& cfg) {
  const yaml_node_t* root = yaml_document_get_root_node(doc_);
  Entries top;
  if (root && !is_null(root)) {
    if (root->type != YAML_MAPPING_NODE)
      return fail(root, "expected a mapping at the top level (server_id:, listen:, tls:, ...), got " + describe(root));
    if (!entries(root, "the top level",
                 {"server_id", "listen", "tls", "auth", "routes", "limits", "admin", "handoff", "drain", "resume",
                  "lifecycle", "log"},
                 top))
      return false;
  }
  bool have_tls = false, have_routes = false;
  for (const Entry& e : top) {
    remember(e.key, e);
    bool ok = true;
    if (e.key == "server_id") {
      if (!is_null(e.value)) {
        ok = get_string(e, "server_id", "a name (e.g. the pod name)", cfg.server_id);
        if (ok && cfg.server_id.size() > kMaxServerId)
          ok = fail(e, "server_id: longer than " + std::to_string(kMaxServerId) + " bytes");
        for (unsigned char c : cfg.server_id)
          if (ok && (c < 0x20 || c == 0x7f)) ok = fail(e, "server_id: contains a control character");
      }
    } else if (e.key == "listen") {
      ok = get_host_port(e, "listen", true, cfg.listen);
    } else if (e.key == "tls") {
      have_tls = true;
      ok = load_tls(e, cfg);
    } else if (e.key == "auth") {
      ok = load_auth(e, cfg);
    } else if (e.key == "routes") {
      have_routes = true;
      ok = load_routes(e, cfg);
    } else if (e.key == "limits") {
      ok = load_limits(e, cfg);
    } else if (e.key == "admin") {
      ok = load_single(e, "admin", "listen", "the admin HTTP address",
                       [&](const Entry& f, const std::string& p) { return get_host_port(f, p, true, cfg.admin); });
    } else if (e.key == "handoff") {
      ok = load_handoff(e, cfg);
    } else if (e.key == "drain") {
      ok = load_drain(e, cfg);
    } else if (e.key == "resume") {
      ok = load_resume(e, cfg);
    } else if (e.key == "lifecycle") {
      ok = load_lifecycle(e, cfg);
    } else if (e.key == "log") {
      ok = load_log(e, cfg);
    }
    if (!ok) return false;
  }
  if (!have_tls) return fail(Mark{}, "missing required key \"tls\" in the top level (tls.cert and tls.key are required)");
  if (!have_routes) return fail(Mark{}, "missing required key \"routes\" in the top level (at least one route: name: host:port)");
  return check(cfg);
}

bool Loader::load_tls(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return fail(e, "tls: expected a mapping with cert: and key:, got an empty value");
  if (!expect_mapping(e, "tls", "a mapping with cert: and key:")) return false;
  Entries es;
  if (!entries(e.value, "tls", {"cert", "key", "client_ca", "require_client_cert", "ticket_key", "ticket_lifetime_s"},
               es))
    return false;
  bool have_cert = false, have_key = false;
  for (const Entry& f : es) {
    std::string p = "tls." + f.key;
    remember(p, f);
    bool ok = true;
    if (f.key == "cert") {
      have_cert = true;
      ok = get_path(f, p, cfg.tls.cert_file);
      cfg.tls.cert_origin = origin(f, p);
    } else if (f.key == "key") {
      have_key = true;
      ok = get_path(f, p, cfg.tls.key_file);
      cfg.tls.key_origin = origin(f, p);
    } else if (f.key == "client_ca") {
      if (!is_null(f.value)) ok = get_path(f, p, cfg.tls.client_ca_file);
      cfg.tls.client_ca_origin = origin(f, p);
    } else if (f.key == "require_client_cert") {
      ok = get_bool(f, p, cfg.tls.require_client_cert);
    } else if (f.key == "ticket_key") {
      if (!is_null(f.value)) ok = get_path(f, p, cfg.tls.ticket_key_file);
      cfg.tls.ticket_key_origin = origin(f, p);
    } else if (f.key == "ticket_lifetime_s") {
      ok = get_u32(f, p, 1, kMaxTicketLifetime_s, cfg.tls.ticket_lifetime_s);
    }
    if (!ok) return false;
  }
  if (!have_cert) return fail(e.value, "missing required key \"cert\" in tls (the server certificate chain, PEM)");
  if (!have_key) return fail(e.value, "missing required key \"key\" in tls (the server private key, PEM)");
  return true;
}

bool Loader::load_auth(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "auth", "a mapping with require_token: and tokens:")) return false;
  marks_["auth"] = mark_of(e.value->start_mark);
  Entries es;
  if (!entries(e.value, "auth", {"require_token", "tokens", "tokens_file"}, es)) return false;
  bool inline_tokens = false, file_tokens = false;
  for (const Entry& f : es) {
    std::string p = "auth." + f.key;
    remember(p, f);
    if (f.key == "require_token") {
      if (!get_bool(f, p, cfg.require_token)) return false;
    } else if (f.key == "tokens_file") {
      if (is_null(f.value)) continue;
      if (inline_tokens) return fail(f, p + ": give either auth.tokens or auth.tokens_file, not both");
      file_tokens = true;
      if (!load_tokens_file(f, p, cfg)) return false;
    } else if (f.key == "tokens") {
      if (is_null(f.value)) continue;
      if (file_tokens) return fail(f, p + ": give either auth.tokens or auth.tokens_file, not both");
      inline_tokens = true;
      if (f.value->type != YAML_SEQUENCE_NODE)
        return fail(f, p + ": expected a sequence of {name, sha256} mappings, got " + describe(f.value));
      size_t i = 0;
      for (auto* it = f.value->data.sequence.items.start; it < f.value->data.sequence.items.top; ++it, ++i)
        if (!load_token(node(*it), p + "[" + std::to_string(i) + "]", cfg)) return false;
    }
  }
  return true;
}

bool Loader::load_token(const yaml_node_t* n, const std::string& path, Config& cfg) {
  if (n->type != YAML_MAPPING_NODE)
    return fail(n, path + ": expected a mapping with name: and sha256:, got " + describe(n));
  Entries es;
  if (!entries(n, path, {"name", "sha256"}, es)) return false;
  Token t;
  bool have_name = false, have_digest = false;
  Entry digest_entry{};
  for (const Entry& f : es) {
    std::string p = path + "." + f.key;
    if (f.key == "name") {
      have_name = true;
      if (!get_string(f, p, "a token name", t.name)) return false;
      if (t.name.size() > kMaxTokenName)
        return fail(f, p + ": longer than " + std::to_string(kMaxTokenName) + " characters");
      for (unsigned char c : t.name)
        if (c < 0x21 || c > 0x7e)
          return fail(f, p + ": expected printable ASCII without spaces, got " + quote(t.name));
      Mark m = mark_of(f.value->start_mark);
      auto [it, fresh] = token_names_.emplace(t.name, m);
      if (!fresh)
        return fail(f, p + ": duplicate token name " + quote(t.name) + " (first at " + std::to_string(it->second.line) +
                           ":" + std::to_string(it->second.column) + ")");
    } else if (f.key == "sha256") {
      have_digest = true;
      if (!get_sha256(f, p, t.sha256)) return false;
      digest_entry = f;
    }
  }
  if (!have_name) return fail(n, "missing required key \"name\" in " + path);
  if (!have_digest) return fail(n, "missing required key \"sha256\" in " + path);
  // Two names for one secret would make the name in logs and metrics a guess.
  auto [it, fresh] = token_digests_.emplace(util::to_hex(t.sha256), t.name);
  if (!fresh)
    return fail(digest_entry, path + ".sha256: the same digest as token " + quote(it->second) +
                                  " (each token needs its own secret)");
  cfg.tokens.push_back(std::move(t));
  return true;
}

bool Loader::load_routes(const Entry& e, Config& cfg) {
  if (is_null(e.value) || e.value->type != YAML_MAPPING_NODE)
    return fail(e, "routes: expected a mapping of route name to host:port (e.g. echo: 127.0.0.1:7000), got " +
                       describe(e.value));
  Entries es;
  if (!named_entries(e.value, "routes", es)) return false;
  if (es.empty()) return fail(e.value, "routes: expected at least one route (name: host:port)");
  for (const Entry& f : es) {
    if (f.key.empty() || f.key.size() > 255)
      return fail(f.key_node, "routes: route name " + quote(f.key) + " must be 1..255 characters long");
    for (unsigned char c : f.key)
      if (c < 0x21 || c > 0x7e)
        return fail(f.key_node, "routes: route name " + quote(f.key) +
                                    " must be printable ASCII without spaces (0x21..0x7e)");
    Route r;
    r.name = f.key;
    if (!get_host_port(f, "routes." + f.key, false, r.upstream)) return false;
    cfg.routes.push_back(std::move(r));
  }
  return true;
}

bool Loader::load_limits(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "limits", "a mapping")) return false;
  Entries es;
  if (!entries(e.value, "limits",
               {"max_tunnels", "max_streams_per_tunnel", "handshake_timeout_ms", "idle_timeout_ms",
                "upstream_connect_timeout_ms", "heartbeat_ms", "tunnel_output_high_water", "max_concurrent_handshakes",
                "max_queued_handshakes", "stream_open_rate", "stream_open_burst", "warn_percent", "retry_after_ms"},
               es))
    return false;
  Limits& l = cfg.limits;
  for (const Entry& f : es) {
    std::string p = "limits." + f.key;
    remember(p, f);
    bool ok = true;
    if (f.key == "max_tunnels") ok = get_u32(f, p, 1, kMaxTunnels, l.max_tunnels);
    else if (f.key == "max_streams_per_tunnel") ok = get_u32(f, p, 1, kMaxStreamsPerTunnel, l.max_streams_per_tunnel);
    else if (f.key == "handshake_timeout_ms") ok = get_u32(f, p, 1, kDay_ms, l.handshake_timeout_ms);
    else if (f.key == "idle_timeout_ms") ok = get_u32(f, p, 1, kDay_ms, l.idle_timeout_ms);
    else if (f.key == "upstream_connect_timeout_ms") ok = get_u32(f, p, 1, kDay_ms, l.upstream_connect_timeout_ms);
    else if (f.key == "heartbeat_ms") ok = get_u32(f, p, 1, kDay_ms, l.heartbeat_ms);
    else if (f.key == "tunnel_output_high_water") ok = get_u32(f, p, 1, kMaxHighWater, l.tunnel_output_high_water);
    else if (f.key == "max_concurrent_handshakes") ok = get_u32(f, p, 1, kMaxTunnels, l.max_concurrent_handshakes);
    else if (f.key == "max_queued_handshakes") ok = get_u32(f, p, 0, kMaxTunnels, l.max_queued_handshakes);
    else if (f.key == "stream_open_rate") ok = get_u32(f, p, 1, 1000000, l.stream_open_rate);
    else if (f.key == "stream_open_burst") ok = get_u32(f, p, 1, 1000000, l.stream_open_burst);
    else if (f.key == "warn_percent") ok = get_u32(f, p, 1, 100, l.warn_percent);
    else if (f.key == "retry_after_ms") ok = get_u32(f, p, 0, kDay_ms, l.retry_after_ms);
    if (!ok) return false;
  }
  return true;
}

bool Loader::load_single(const Entry& e, const char* section, const char* key, const char* what,
                         const std::function<bool(const Entry&, const std::string&)>& read) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, section, (std::string("a mapping with ") + key + ": (" + what + ")").c_str())) return false;
  Entries es;
  if (!entries(e.value, section, {key}, es)) return false;
  for (const Entry& f : es) {
    std::string p = std::string(section) + "." + f.key;
    remember(p, f);
    if (!read(f, p)) return false;
  }
  return true;
}

bool Loader::load_handoff(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "handoff", "a mapping with socket: (the hot-restart socket)")) return false;
  Entries es;
  if (!entries(e.value, "handoff", {"socket", "timeout_ms"}, es)) return false;
  for (const Entry& f : es) {
    std::string p = "handoff." + f.key;
    remember(p, f);
    if (f.key == "socket") {
      if (!get_string(f, p, "a Unix socket path", cfg.handoff_socket)) return false;
      if (cfg.handoff_socket.size() > kMaxUnixPath)
        return fail(f, p + ": longer than " + std::to_string(kMaxUnixPath) + " bytes, the limit of a Unix socket path");
      if (cfg.handoff_socket.find('\0') != std::string::npos) return fail(f, p + ": the path contains a NUL byte");
    } else if (f.key == "timeout_ms") {
      if (!get_u32(f, p, 100, 600000, cfg.handoff_timeout_ms)) return false;
    }
  }
  return true;
}

bool Loader::load_drain(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "drain", "a mapping")) return false;
  Entries es;
  if (!entries(e.value, "drain", {"grace_ms", "delay_ms", "spread_ms", "reconnect_hint"}, es)) return false;
  for (const Entry& f : es) {
    std::string p = "drain." + f.key;
    remember(p, f);
    if (f.key == "grace_ms") {
      if (!get_u32(f, p, 0, kDay_ms, cfg.drain.grace_ms)) return false;
    } else if (f.key == "delay_ms") {
      if (!get_u32(f, p, 0, kDay_ms, cfg.drain.delay_ms)) return false;
    } else if (f.key == "spread_ms") {
      if (!get_u32(f, p, 0, kDay_ms, cfg.drain.spread_ms)) return false;
    } else if (f.key == "reconnect_hint") {
      if (is_null(f.value)) continue;
      HostPort hp;
      if (!get_host_port(f, p, false, hp)) return false;
      cfg.drain.reconnect_hint = hp.to_string();
    }
  }
  return true;
}

bool Loader::load_resume(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "resume", "a mapping")) return false;
  Entries es;
  if (!entries(e.value, "resume", {"enabled", "window_ms", "max_detached", "buffer_bytes", "advertise"}, es))
    return false;
  for (const Entry& f : es) {
    std::string p = "resume." + f.key;
    remember(p, f);
    if (f.key == "enabled") {
      if (!get_bool(f, p, cfg.resume.enabled)) return false;
    } else if (f.key == "window_ms") {
      if (!get_u32(f, p, 1000, kDay_ms, cfg.resume.window_ms)) return false;
    } else if (f.key == "max_detached") {
      if (!get_u32(f, p, 0, 10000000, cfg.resume.max_detached)) return false;
    } else if (f.key == "buffer_bytes") {
      // At least the 256 KiB a stream's window lets through, so that one
      // stream never stalls on the bound alone.
      if (!get_u32(f, p, 256 * 1024, 64u << 20, cfg.resume.buffer_bytes)) return false;
    } else if (f.key == "advertise") {
      if (is_null(f.value)) continue;
      HostPort hp;
      if (!get_host_port(f, p, false, hp)) return false;
      cfg.resume.advertise = hp.to_string();
    }
  }
  return true;
}

bool Loader::get_sha256(const Entry& f, const std::string& p, std::array<uint8_t, 32>& out) {
  std::string hex;
  const char* what = "64 hex digits (printf %s \"$TOKEN\" | sha256sum, or baton hash-token)";
  if (!get_string(f, p, what, hex)) return false;
  if (hex.size() != 64 || !util::from_hex(hex, out))
    return fail(f, p + ": expected " + what + ", got " + quote(hex) + " (" + std::to_string(hex.size()) +
                       " characters)");
  return true;
}

bool Loader::load_lifecycle(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "lifecycle", "a mapping")) return false;
  Entries es;
  if (!entries(e.value, "lifecycle", {"listen", "token_sha256"}, es)) return false;
  bool have_token = false;
  for (const Entry& f : es) {
    std::string p = "lifecycle." + f.key;
    remember(p, f);
    if (f.key == "listen") {
      if (is_null(f.value)) continue;
      HostPort hp;
      if (!get_host_port(f, p, true, hp)) return false;
      cfg.lifecycle.listen = hp;
    } else if (f.key == "token_sha256") {
      if (!get_sha256(f, p, cfg.lifecycle.token_sha256)) return false;
      have_token = true;
    }
  }
  if (cfg.lifecycle.listen && !have_token)
    return fail(where("lifecycle.listen", Mark{}),
                "lifecycle.listen needs lifecycle.token_sha256 (the sha256 of the X-Baton-Token header's value): "
                "the listener may face the pod network");
  return true;
}

bool Loader::load_log(const Entry& e, Config& cfg) {
  if (is_null(e.value)) return true;
  if (!expect_mapping(e, "log", "a mapping")) return false;
  Entries es;
  if (!entries(e.value, "log", {"level", "format"}, es)) return false;
  for (const Entry& f : es) {
    std::string p = "log." + f.key;
    remember(p, f);
    bool ok = f.key == "level" ? get_choice(f, p, {"trace", "debug", "info", "warn", "error"}, cfg.log_level)
                               : get_choice(f, p, {"text", "json"}, cfg.log_format);
    if (!ok) return false;
  }
  return true;
}

// Rules that tie fields together; each error points at the field to change.
bool Loader::check(Config& cfg) {
  const Mark top{};
  if (cfg.tls.require_client_cert && cfg.tls.client_ca_file.empty())
    return fail(where("tls.require_client_cert", top),
                "tls.require_client_cert: true needs tls.client_ca (the CA that signs client certificates)");
  if (!cfg.require_token && !cfg.tls.require_client_cert)
    return fail(where("auth.require_token", top),
                "auth.require_token: false is allowed only with tls.require_client_cert: true "
                "(otherwise anyone could open a tunnel)");
  if (cfg.require_token && cfg.tokens.empty())
    return fail(where("auth.tokens", where("auth", top)),
                "auth.tokens: at least one token is needed while auth.require_token is true "
                "(add - name: ... sha256: ..., or auth.tokens_file, or require client certificates)");
  if (cfg.limits.heartbeat_ms >= cfg.limits.idle_timeout_ms)
    return fail(where("limits.heartbeat_ms", where("limits.idle_timeout_ms", top)),
                "limits.heartbeat_ms (" + std::to_string(cfg.limits.heartbeat_ms) +
                    ") must be less than limits.idle_timeout_ms (" + std::to_string(cfg.limits.idle_timeout_ms) +
                    "): clients ping every heartbeat_ms and the server closes tunnels idle for idle_timeout_ms");
  return true;
}

// Bytes of the line break that starts at text[i], as YAML counts them (\n,
// \r\n, a lone \r, NEL, LS, PS), or 0.
size_t line_break_at(std::string_view text, size_t i) {
  if (text[i] == '\n') return 1;
  if (text[i] == '\r') return text.substr(i, 2) == "\r\n" ? 2 : 1;
  if (text.substr(i, 2) == "\xc2\x85") return 2;
  if (text.substr(i, 3) == "\xe2\x80\xa8" || text.substr(i, 3) == "\xe2\x80\xa9") return 3;
  return 0;
}

// libyaml reports reader errors (bad UTF-8, control characters) by byte offset only.
Mark mark_at_offset(std::string_view text, size_t offset) {
  Mark m;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (size_t n = line_break_at(text, i)) {
      ++m.line;
      m.column = 1;
      i += n - 1;
    } else if ((static_cast<unsigned char>(text[i]) & 0xc0) != 0x80) {
      ++m.column;
    }
  }
  return m;
}

// The byte offset of character `index` (libyaml's marks count characters).
size_t byte_offset(std::string_view text, size_t index) {
  size_t i = 0;
  for (size_t chars = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xc0) == 0x80) continue;
    if (chars++ == index) return i;
  }
  return i;
}

// Where a libyaml mark points. At the end of a file without a final newline
// libyaml counts one line more than there is: that names the end of the last line.
Mark mark_in(std::string_view text, const yaml_mark_t& m) {
  return byte_offset(text, m.index) >= text.size() ? mark_at_offset(text, text.size()) : mark_of(m);
}

// True if the line of `m` holds something like [::1]:443 outside quotes,
// which YAML reads as the start of a flow sequence.
bool unquoted_bracket_address(std::string_view text, const yaml_mark_t& m) {
  size_t begin = std::min(m.index, text.size());
  while (begin > 0 && text[begin - 1] != '\n') --begin;
  size_t end = text.find('\n', begin);
  std::string_view line = text.substr(begin, end == std::string_view::npos ? std::string_view::npos : end - begin);
  if (line.find('"') != std::string_view::npos || line.find('\'') != std::string_view::npos) return false;
  auto open = line.find('[');
  return open != std::string_view::npos && line.find("]:", open) != std::string_view::npos;
}

ConfigError syntax_error(const yaml_parser_t& p, std::string_view text, const std::string& name) {
  ConfigError e;
  e.file = name;
  std::string what = p.problem ? p.problem : "unknown error";
  Mark m;
  switch (p.error) {
    case YAML_MEMORY_ERROR:
      e.message = "out of memory while reading YAML";
      return e;
    case YAML_READER_ERROR:
      m = mark_at_offset(text, p.problem_offset);
      e.message = "YAML syntax error: " + what;
      if (what.find("UTF") != std::string::npos) e.message += " (the file must be UTF-8 text)";
      break;
    default: {
      const size_t at = byte_offset(text, p.problem_mark.index);
      m = mark_in(text, p.problem_mark);
      e.message = "YAML syntax error: " + what;
      if (p.context) {
        Mark c = mark_of(p.context_mark);
        e.message += " " + std::string(p.context) + " that started at " + std::to_string(c.line) + ":" +
                     std::to_string(c.column);
      }
      if (at < text.size() && text[at] == '\t')
        e.message += " (YAML does not allow tabs for indentation; use spaces)";
      else if (unquoted_bracket_address(text, p.problem_mark))
        e.message += " (quote IPv6 addresses: \"[::1]:443\")";
      break;
    }
  }
  e.line = m.line;
  e.column = m.column;
  return e;
}

struct ParserGuard {
  yaml_parser_t p;
  bool live = false;
  ~ParserGuard() {
    if (live) yaml_parser_delete(&p);
  }
};

using DocPtr = std::unique_ptr<yaml_document_t, DocumentDeleter>;

// Parses exactly one YAML document; `name` names the file in errors.
std::variant<DocPtr, ConfigError> load_document(std::string_view yaml, const std::string& name) {
  ParserGuard g;
  if (!yaml_parser_initialize(&g.p)) return ConfigError{name, 0, 0, "out of memory while reading YAML"};
  g.live = true;
  yaml_parser_set_input_string(&g.p, reinterpret_cast<const unsigned char*>(yaml.data()), yaml.size());

  DocPtr doc(new yaml_document_t);
  if (!yaml_parser_load(&g.p, doc.get())) {
    delete doc.release();  // nothing to yaml_document_delete after a failed load
    return syntax_error(g.p, yaml, name);
  }
  // A second document would be silently ignored by most readers; say so instead.
  DocPtr next(new yaml_document_t);
  if (!yaml_parser_load(&g.p, next.get())) {
    delete next.release();
    return syntax_error(g.p, yaml, name);
  }
  if (const yaml_node_t* r = yaml_document_get_root_node(next.get())) {
    Mark m = mark_in(yaml, r->start_mark);
    return ConfigError{name, m.line, m.column, "expected a single YAML document, found a second one here"};
  }
  return doc;
}

// Reads a whole (small) text file; "" or what went wrong.
std::string read_text_file(const std::string& path, std::string& text) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::string("cannot open the file: ") + std::strerror(errno);
  struct stat st;
  std::string problem;
  if (::fstat(fd, &st) != 0) {
    problem = std::string("cannot read the file: ") + std::strerror(errno);
  } else if (S_ISDIR(st.st_mode)) {
    problem = "is a directory, expected a YAML file";
  } else {
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        problem = std::string("cannot read the file: ") + std::strerror(errno);
        break;
      }
      if (n == 0) break;
      text.append(buf, size_t(n));
      if (text.size() > kMaxConfigFile) {
        problem = "the file is larger than 16 MiB; is this the right file?";
        break;
      }
    }
  }
  ::close(fd);
  return problem;
}

bool Loader::load_tokens_file(const Entry& f, const std::string& p, Config& cfg) {
  std::string path, text;
  if (!get_path(f, p, path)) return false;
  std::string problem = read_file_(path, text);
  if (!problem.empty()) return fail(f, p + ": " + path + ": " + problem);
  auto doc = load_document(text, path);
  if (auto* e = std::get_if<ConfigError>(&doc)) {
    error_ = *e;
    return false;
  }
  yaml_document_t* d = std::get<DocPtr>(doc).get();
  const yaml_node_t* root = yaml_document_get_root_node(d);
  if (!root || is_null(root)) return true;  // no tokens
  // The file's own positions in its errors; duplicates across the file are
  // caught by the same maps (tokens and tokens_file are exclusive).
  Loader nested(d, path, base_dir_, read_file_);
  nested.token_names_ = std::move(token_names_);
  nested.token_digests_ = std::move(token_digests_);
  if (root->type != YAML_SEQUENCE_NODE) {
    nested.fail(root, "expected a sequence of {name, sha256} mappings (the form of auth.tokens), got " +
                          describe(root));
    error_ = nested.error();
    return false;
  }
  size_t i = 0;
  for (auto* it = root->data.sequence.items.start; it < root->data.sequence.items.top; ++it, ++i) {
    if (!nested.load_token(nested.node(*it), "tokens[" + std::to_string(i) + "]", cfg)) {
      error_ = nested.error();
      return false;
    }
  }
  return true;
}

LoadResult parse_impl(std::string_view yaml, const std::string& name, const std::string& base_dir,
                      const ReadFile& read_file) {
  auto loaded = load_document(yaml, name);
  if (auto* e = std::get_if<ConfigError>(&loaded)) return *e;
  DocPtr doc = std::move(std::get<DocPtr>(loaded));

  Config cfg;
  cfg.source = name;
  Loader loader(doc.get(), name, base_dir, read_file);
  if (!loader.load(cfg)) return loader.error();
  return cfg;
}

}  // namespace

std::string HostPort::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::optional<HostPort> parse_host_port(std::string_view s, bool allow_zero) {
  HostPort hp;
  if (!host_port_problem(s, allow_zero, &hp).empty()) return std::nullopt;
  return hp;
}

const Route* Config::find_route(std::string_view name) const {
  for (const Route& r : routes)
    if (r.name == name) return &r;
  return nullptr;
}

std::string ConfigError::to_string() const {
  if (line == 0) return file + ": " + message;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + message;
}

LoadResult parse(std::string_view yaml, const std::string& name, const std::string& base_dir) {
  return parse(yaml, name, base_dir, read_text_file);
}

LoadResult parse(std::string_view yaml, const std::string& name, const std::string& base_dir,
                 const ReadFile& read_file) {
  // The only things that can throw in here are allocations.
  try {
    return parse_impl(yaml, name, base_dir, read_file);
  } catch (const std::bad_alloc&) {
    return ConfigError{name, 0, 0, "out of memory while reading the configuration"};
  }
}

LoadResult load_file(const std::string& path) {
  try {
    std::string text;
    std::string problem = read_text_file(path, text);
    if (!problem.empty()) return ConfigError{path, 0, 0, problem};
    return parse(text, path, std::filesystem::path(path).parent_path().string());
  } catch (const std::bad_alloc&) {
    return ConfigError{path, 0, 0, "out of memory while reading the configuration"};
  }
}

}  // namespace baton::config
