// The state of a live server tunnel as plain data plus file descriptors
// (ARCHITECTURE "the one idea"). Tunnel::export_state() produces it in the
// old process, the handoff codec carries it, Tunnel::adopt() rebuilds a
// tunnel from it in the new one (or in the old one again when a handoff
// fails).
//
// File descriptors: a state owns the fds in it until it is adopted or
// handed to close_fds(). fd -1 means "none".
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "mux/session.h"
#include "proxy/resume_log.h"
#include "tls/peer_info.h"
#include "tls/record.h"
#include "util/byte_queue.h"

namespace baton::proxy {

// What a link is waiting for (ARCHITECTURE principle 3).
enum class LinkPhase : uint8_t {
  awaiting_handshake = 0,  // TLS handshake in progress
  awaiting_hello = 1,      // server: TLS done, HELLO not yet accepted; client: WELCOME not yet received
  serving = 2,             // streams flow
  detached = 3,            // resumable session whose connection broke: no socket, no TLS; waiting for a
                           // resume (docs/protocol.md 9) until the window ends
  flushing = 4,            // closing: writing the last bytes (alerts, Go Away) before TCP close
  closed = 5,              // TCP closed; the object is deleted when the current callback returns
};
const char* to_str(LinkPhase p);

// What a bridge is waiting for.
enum class BridgePhase : uint8_t {
  awaiting_preamble = 0,  // server: the route name has not fully arrived
  awaiting_upstream = 1,  // server: resolving / connecting to the route's upstream
  relaying = 2,           // bytes flow
  done = 3,               // TCP closed; the link drops the bridge
};
const char* to_str(BridgePhase p);

struct BridgeState {
  uint32_t id = 0;
  // awaiting_preamble: the route name is still arriving (no fd).
  // awaiting_upstream: the route is known, the upstream connect had not
  //   completed: the new process dials again (no fd; nothing was relayed yet).
  // relaying: fd is the upstream connection.
  BridgePhase phase{};
  std::string route;
  util::ByteQueue pending;   // read from the upstream, not yet accepted by the send window
  bool tcp_eof = false;      // upstream EOF seen
  bool fin_sent = false;     // FIN sent on the stream
  bool peer_fin = false;     // FIN received on the stream
  bool shutdown_done = false;  // the upstream was sent FIN (shutdown SHUT_WR)
  uint64_t bytes_up = 0;
  uint64_t bytes_down = 0;
  // Bytes at the front of the stream's inbound queue that the kernel already
  // took from a write in flight: the adopting side drops them (and returns
  // their window credit) before it writes anything.
  uint64_t upstream_written = 0;
  int fd = -1;
};

// A link's counters: live in the Link, carried as they are in its state.
struct LinkCounters {
  uint64_t bytes_in = 0;   // TLS bytes read from the peer
  uint64_t bytes_out = 0;  // TLS bytes written to the peer
  uint64_t streams_opened = 0;
  uint64_t streams_reset = 0;
};

// Session resume (docs/protocol.md 9): what a session offered resume carries.
struct ResumeState {
  bool offered = false;              // WELCOME offered resume
  std::array<uint8_t, 32> secret{};  // the latest credential (never logged, never on disk)
  std::string identity;              // what authenticated the session: "token NAME" or "cert SUBJECT"
  ResumeLog::State log;              // offsets of both streams, the bytes kept for the client
  uint64_t detached_ms = 0;          // phase detached: since the connection broke
};

struct TunnelState {
  LinkPhase phase{};           // awaiting_hello, serving, or detached (no fd, no record state)
  tls::RecordState record;     // keys, sequence numbers, partial input, unsent records
  mux::SessionState session;   // streams, windows, buffered bytes, pings
  tls::PeerInfo peer_info;
  LinkCounters counters;
  uint64_t idle_ms = 0;        // since the last byte from the client
  uint64_t age_ms = 0;         // since the connection was accepted
  std::array<uint8_t, 16> session_id{};
  std::string client_id;
  bool control_open = false;   // stream 1 accepted
  bool counted = false;        // WELCOME sent (counted as established)
  std::vector<BridgeState> bridges;
  ResumeState resume;
  int fd = -1;                 // the client connection (-1 when detached)
};

// Closes every fd the state holds and sets them to -1.
void close_fds(TunnelState& st);

}  // namespace baton::proxy
