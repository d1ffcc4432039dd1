// baton: the sidecar (`serve`), the client (`connect`) and their tools. This
// file is the command line only (CLI11): each command's options go into its
// struct in sidecar/cli.h and its run_* function does the work.
#include <uv.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <string>

#include "sidecar/cli.h"

namespace {

using namespace baton::cli;

constexpr const char* kExitStatus =
    "exit status: 0 ok, 1 failure (status: admin API unreachable or in error; check --strict:\n"
    "a certificate warning), 2 usage or configuration error, 3 rejected by the server\n"
    "'baton help COMMAND' (or 'baton COMMAND --help') shows one command's options.";

void log_options(CLI::App* cmd, LogOptions& log, const char* level_default, const char* format_default) {
  cmd->add_option("--log-level", log.level, std::string("trace, debug, info, warn, error (default: ") + level_default + ")")
      ->type_name("L");
  cmd->add_option("--log-format", log.format, std::string("text or json (default: ") + format_default + ")")
      ->type_name("F");
}

// A number option with a lower bound, as "N" in the help.
template <typename T>
CLI::Option* number(CLI::App* cmd, const std::string& name, T& value, T min, const std::string& help) {
  auto* opt = cmd->add_option(name, value, help)->type_name("N")->default_val(value);
  if (min > 0) opt->check(CLI::Range(min, std::numeric_limits<T>::max()));
  return opt;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"baton " BATON_VERSION " - TLS tunnel sidecar with hot restart", "baton"};
  app.footer(kExitStatus);
  app.get_formatter()->column_width(34);
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", std::string("baton ") + BATON_VERSION + " (mbedTLS 2.28, libuv " +
                                        uv_version_string() + ")");

  ServeOptions serve;
  auto* c_serve = app.add_subcommand("serve", "Terminate client tunnels as configured in FILE.");
  c_serve->footer(
      "Prints one JSON line {\"event\":\"ready\",...} to stdout once listening; logs go to stderr.\n"
      "Takes over the listener and every live tunnel from a baton running on the same handoff\n"
      "socket (hot restart: docs/hot-restart.md). SIGTERM drains, SIGINT stops at once.");
  c_serve->add_option("-c,--config", serve.config, "configuration file (docs/configuration.md)")
      ->required()
      ->type_name("FILE");
  c_serve->add_flag("--no-takeover", serve.no_takeover, "start without taking over from a running baton");
  c_serve->add_option("--resume-advertise", serve.resume_advertise,
                      "overrides resume.advertise of FILE (in Kubernetes: \"$(POD_IP):7443\", the pod IP from "
                      "the Downward API; docs/kubernetes.md)")
      ->type_name("HOST:PORT");
  log_options(c_serve, serve.log, "log_level of FILE", "log_format of FILE");

  ConnectOptions conn;
  auto* c_conn = app.add_subcommand("connect", "Open a tunnel; forward local connections on LISTEN to ROUTE.");
  c_conn->footer(
      "Reconnects (rotating through the --server list, with backoff) when the session ends, and\n"
      "follows DRAIN. Prints {\"event\":\"ready\",...}, then {\"event\":\"session\",...} for every\n"
      "session that comes up (docs/client.md).");
  c_conn->add_option("--server", conn.servers, "the sidecar's tunnel listener; repeat for more, tried in turn")
      ->required()
      ->type_name("HOST:PORT");
  c_conn->add_option("-L,--forward", conn.forwards, "forward connections on LISTEN to ROUTE; repeatable")
      ->required()
      ->type_name("LISTEN=ROUTE");
  c_conn->add_option("--token", conn.client.token, "the token sent in HELLO (never logged)")
      ->envname("BATON_TOKEN")
      ->type_name("T");
  c_conn->add_option("--token-file", conn.token_file, "read the token from F (wins over --token)")->type_name("F");
  c_conn->add_option("--ca", conn.client.ca_file, "CA that signed the server's certificate (default: system)")
      ->type_name("FILE");
  c_conn->add_option("--cert", conn.client.cert_file, "client certificate (mTLS), with --key")->type_name("FILE");
  c_conn->add_option("--key", conn.client.key_file, "the client certificate's key")->type_name("FILE");
  c_conn->add_option("--server-name", conn.client.server_name,
                     "the name the server's certificate must hold (default: the host of --server); an IP "
                     "address is matched against its IP names")
      ->type_name("NAME");
  c_conn->add_option("--client-id", conn.client.client_id, "shown in the server's logs (default: the host name)")
      ->type_name("ID");
  number<uint32_t>(c_conn, "--max-reconnects", conn.client.max_reconnects, 0,
                   "give up after N failed tries in a row (0: never)");
  number<uint32_t>(c_conn, "--connect-timeout-ms", conn.client.connect_timeout_ms, 100,
                   "dial + TLS + WELCOME, and how long a local connection waits (for a session, or for the "
                   "server's stream open rate) before it is reset");
  number<uint32_t>(c_conn, "--dead-after-ms", conn.client.dead_after_ms, 0,
                   "TCP keepalive / TCP_USER_TIMEOUT bound");
  number<uint32_t>(c_conn, "--max-waiting", conn.client.max_waiting, 1,
                   "local connections waiting at once; one more is reset at once");
  bool no_resume = false;
  c_conn->add_flag("--no-resume", no_resume,
                   "do not ask for session resume: a broken connection ends the session and its streams "
                   "(docs/client.md)");
  number<uint32_t>(c_conn, "--resume-buffer-bytes", conn.client.resume_buffer_bytes, 64 * 1024,
                   "bytes kept for a resume before local connections stop being read");
  c_conn->add_option("--status-listen", conn.status_listen, "GET /status there answers the client's state as JSON")
      ->type_name("HOST:PORT");
  log_options(c_conn, conn.log, "info", "text");

  CheckOptions check;
  auto* c_check = app.add_subcommand("check", "Validate a configuration and load its TLS files.");
  c_check->footer(
      "Certificates that peers will refuse (expired, not yet valid, weak) or that expire within\n"
      "14 days are warnings.");
  c_check->add_option("-c,--config", check.config, "configuration file")->required()->type_name("FILE");
  c_check->add_flag("--strict", check.strict, "a certificate warning exits 1");

  CertsOptions certs;
  auto* c_certs = app.add_subcommand(
      "certs", "Write a development CA, server and client certificates and a ticket key.");
  c_certs->add_option("--out", certs.out_dir, "directory to write to")->required()->type_name("DIR");
  c_certs->add_option("--name", certs.names, "another DNS name for the server certificate; repeatable")
      ->type_name("DNS");
  c_certs->add_option("--ip", certs.ips, "another IP address for the server certificate; repeatable")
      ->type_name("ADDR");

  AdminClientOptions drain;
  auto* c_drain = app.add_subcommand("drain", "Start a running baton's drain (POST /drain).");
  c_drain->footer(
      "Clients are told to move, open streams finish, then the process exits. Exit 1 if no\n"
      "baton answers at the address.");
  c_drain->add_option("-c,--config", drain.config, "use admin.listen of FILE")->type_name("FILE");
  c_drain->add_option("--admin", drain.admin, "the admin API (default 127.0.0.1:9901)")->type_name("HOST:PORT");
  c_drain->add_flag("--wait",
                    drain.wait,
                    "return when the drain is done or the process has exited (for a preStop hook): exit 0; "
                    "exit 1 if still draining after grace + 10 s");

  AdminClientOptions status;
  auto* c_status = app.add_subcommand("status", "Show a running baton's state, tunnels, routes and limits.");
  c_status->footer(
      "Read from its admin API (GET /stats) at admin.listen of FILE, --admin, or 127.0.0.1:9901.");
  c_status->add_option("-c,--config", status.config, "use admin.listen of FILE")->type_name("FILE");
  c_status->add_option("--admin", status.admin, "the admin API")->type_name("HOST:PORT");
  c_status->add_flag("--json", status.json, "print the /stats answer as it came");

  auto* c_hash = app.add_subcommand("hash-token", "Read a token on stdin, print the sha256 hex for the config.");
  auto* c_version = app.add_subcommand("version", "Print the version.");
  std::string help_topic;
  auto* c_help = app.add_subcommand("help", "Show this help, or one command's.");
  c_help->add_option("command", help_topic, "the command")->type_name("COMMAND");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version: to stdout, 0
    std::string where;
    for (const CLI::App* sub : app.get_subcommands()) where = sub->get_name() + ": ";
    return usage_error(where + e.what());
  }

  if (c_serve->parsed()) return run_serve(serve);
  if (c_conn->parsed()) {
    conn.client.resume = !no_resume;
    return run_connect(conn);
  }
  if (c_check->parsed()) return run_check(check);
  if (c_certs->parsed()) return run_certs(certs);
  if (c_drain->parsed()) return run_drain(drain);
  if (c_status->parsed()) return run_status(status);
  if (c_hash->parsed()) return run_hash_token();
  if (c_version->parsed()) {
    std::printf("baton %s (mbedTLS 2.28, libuv %s)\n", BATON_VERSION, uv_version_string());
    return kExitOk;
  }
  if (c_help->parsed() && !help_topic.empty()) {
    CLI::App* sub = nullptr;
    try {
      sub = app.get_subcommand(help_topic);
    } catch (const CLI::OptionNotFound&) {
      return usage_error("help: unknown command \"" + help_topic + "\"");
    }
    std::cout << sub->help();
    return kExitOk;
  }
  std::cout << app.help();  // `baton`, `baton help`
  return kExitOk;
}
