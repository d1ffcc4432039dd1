// `baton check`, `baton certs`, `baton hash-token`: offline tools.
#include <mbedtls/sha256.h>
#include <spdlog/spdlog.h>
#include <uv.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "config/config.h"
#include "proxy/server.h"
#include "sidecar/cli.h"
#include "tls/context.h"
#include "tls/dev_certs.h"
#include "util/bytes.h"

namespace baton::cli {

int run_check(const CheckOptions& o) {
  const std::string& cfg_path = o.config;
  const bool strict = o.strict;
  config::Config cfg;
  if (int rc = load_config(cfg_path, cfg)) return rc;
  spdlog::set_level(spdlog::level::err);
  std::string error;
  uv_loop_t loop;
  uv_loop_init(&loop);
  auto server = proxy::Server::create(&loop, cfg, error);
  // Certificates that load but that peers will refuse (docs/configuration.md "Certificate checks").
  std::vector<std::string> warnings;
  if (server) warnings = server->tls().warnings();
  server.reset();
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (!error.empty()) {
    // Errors about a file the configuration names start with file:line:column already.
    if (error.rfind(cfg_path + ":", 0) == 0) std::fprintf(stderr, "%s\n", error.c_str());
    else std::fprintf(stderr, "%s: %s\n", cfg_path.c_str(), error.c_str());
    return kExitUsage;
  }
  for (const std::string& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  std::printf("%s: ok (%zu routes, %zu tokens, listen %s)%s\n", cfg_path.c_str(), cfg.routes.size(),
              cfg.tokens.size(), cfg.listen.to_string().c_str(),
              warnings.empty() ? "" : (", " + std::to_string(warnings.size()) + " warning(s)").c_str());
  return strict && !warnings.empty() ? kExitFailure : kExitOk;
}

int run_certs(const CertsOptions& opts) {
  tls::DevCertOptions o;
  o.out_dir = opts.out_dir;
  // Added to the defaults (localhost, 127.0.0.1, ::1), each name once.
  auto add = [](std::vector<std::string>& to, const std::vector<std::string>& more) {
    for (const std::string& m : more)
      if (std::find(to.begin(), to.end(), m) == to.end()) to.push_back(m);
  };
  add(o.server_names, opts.names);
  add(o.server_ips, opts.ips);
  std::string e = tls::write_dev_certs(o);
  if (!e.empty()) {
    std::fprintf(stderr, "baton certs: %s\n", e.c_str());
    return kExitFailure;
  }
  std::printf("wrote ca.crt ca.key server.crt server.key client.crt client.key ticket.key to %s\n", o.out_dir.c_str());
  return kExitOk;
}

int run_hash_token() {
  std::string token((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
  if (token.empty()) return usage_error("hash-token: no token on stdin");
  uint8_t d[32];
  mbedtls_sha256_ret(reinterpret_cast<const unsigned char*>(token.data()), token.size(), d, 0);
  std::printf("%s\n", util::to_hex(d).c_str());
  return kExitOk;
}

}  // namespace baton::cli
