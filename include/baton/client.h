// baton tunnel client, for programs that embed it (and for `baton connect`).
//
// A Client runs inside the caller's libuv loop. It dials the sidecar, runs
// TLS 1.2 and the HELLO exchange (docs/protocol.md sections 1-3), then serves
// local forwarders: every TCP connection accepted on a forwarder's address
// becomes one stream to the forwarder's route. open_stream() gives the same
// to a program that already holds a connected socket.
//
// The client keeps a session up: when one ends (closed, heartbeat lost, dead
// TCP path) it dials again, rotating through `servers`, with exponential
// backoff and full jitter (100 ms, x1.5, cap 5 s). On DRAIN (docs/protocol.md 6)
// it opens the replacement session at once (make before break): new streams
// go to the new session as soon as it is ready, old streams finish on the old
// one. Local connections that arrive while no session is ready wait (at most
// connect_timeout_ms) instead of failing. A stream opened while the server's
// DRAIN was still on the way is reset by the server unprocessed; the client
// keeps a copy of what it sent on a stream until the server ACKs it (at most
// 256 KiB, the initial window), so such a stream is sent again, bytes and
// all, on the next session: the local application never sees it.
//
// Bursts: the server limits how fast a session opens streams (a token bucket)
// and how many are open at once, and refuses a stream beyond them unprocessed
// (RST before it reads any of it). The client paces its opens to the limits
// the server announces in WELCOME (keeping half of its burst in reserve for
// network jitter) and holds local connections beyond them in the waiting
// queue; a stream refused anyway (an older server that announces nothing, a
// changed limit) is sent again on the same session after a short backoff,
// bytes and all. Refusals are told apart from resets of processed streams
// (unknown route, failed upstream connect) by a Ping sent right after the
// SYNs (docs/protocol.md 4). A local connection is reset only when it could
// not be opened within connect_timeout_ms, or when max_waiting are already
// waiting. Every reconnect offers the last TLS
// session ticket. Only REJECT 1 (version) and 2 (unauthorized), or giving up
// (max_reconnects; or no server reachable at all before the first session),
// stop the client: on_closed.
//
// Session resume (docs/protocol.md 9, `resume`): the client asks every new
// session to be resumable. When the connection under a resumable session
// breaks (reset, EOF, TLS error, two unanswered pings) the session is kept
// (detached): its streams and local connections stay open, local data waits
// (within resume_buffer_bytes), new local connections wait in the queue. The
// client dials at once (the server's resume_address first, if it gave one),
// then with backoff, and resumes the session on the new connection: what
// either side sent that the other did not receive is sent again and the
// applications see only a pause. If the server refuses (the session expired
// or is held elsewhere) the new connection is a fresh session and the old
// session's local connections are reset; likewise when the server's
// resume_window_ms passes without a resume.
//
// Threading: every call must come from the loop's thread.
#pragma once

#include <uv.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace baton {

struct ClientForward {
  std::string listen;  // "127.0.0.1:9000"; port 0 picks a free port
  std::string route;   // route name on the sidecar
};

struct ClientOptions {
  std::string server;       // "host:port" of the sidecar's tunnel listener (tried first)
  std::vector<std::string> servers;  // more "host:port"s, tried in turn after `server`
  // Name the sidecar's certificate must hold; default: the host of the
  // address dialed. A DNS name is also sent as SNI; an IP literal is matched
  // against the certificate's IP address SubjectAltNames and sent as nothing.
  std::string server_name;
  std::string token;        // sent in HELLO; never logged
  std::string client_id;    // shown in the sidecar's logs; default: the host name
  std::string ca_file;      // CA that signed the sidecar's certificate; default: system bundle
  std::string cert_file;    // optional client certificate (mTLS)
  std::string key_file;
  std::vector<ClientForward> forwards;
  // TCP + TLS + WELCOME; also the longest a local connection waits (for a
  // session, for the open pacing, for the retries of a refused open) before it is reset.
  uint32_t connect_timeout_ms = 10000;
  // Local connections that may wait at once (for a session or the open
  // pacing); one more is reset at once. Refused opens waiting for their
  // retry come on top (at most the streams that were open).
  uint32_t max_waiting = 4096;
  // Give up (on_closed) when this many tries in a row have failed; 0 = never.
  // A try is one dial of one address (TCP connect, TLS, HELLO) that ends
  // before WELCOME, a REJECT 3 or 4 included; a session that comes up
  // starts the count again. So after a session is lost the client dials at
  // most max_reconnects times. (Before the first session, a TCP or TLS
  // failure at every address once ends the client regardless.)
  uint32_t max_reconnects = 0;
  // TCP keepalive and TCP_USER_TIMEOUT on the tunnel socket find a dead path
  // within about this long; 0 leaves the system defaults.
  uint32_t dead_after_ms = 10000;
  // Ask for session resume (docs/protocol.md 9); false: a session ends with
  // its connection, as in protocol version 1.
  bool resume = true;
  // Bytes kept for a resume (sent, not yet proved received, and queued) at
  // which local connections stop being read until the server's receipts
  // (or the resume) make room.
  uint32_t resume_buffer_bytes = 1u << 20;
};

struct ClientCounters {
  uint64_t sessions_opened = 0;     // sessions that got WELCOME
  uint64_t reconnects = 0;          // sessions after the first
  uint64_t full_handshakes = 0;
  uint64_t resumed_handshakes = 0;  // TLS resumed with a session ticket
  uint64_t drains_followed = 0;     // DRAIN messages acted upon
  uint64_t failed_tries = 0;        // dials that ended before WELCOME (incl. REJECT)
  // Streams the server refused unprocessed (opened while its DRAIN / Go Away
  // was on the way) and that were sent again on another session.
  uint64_t streams_replayed = 0;
  // Opens that waited for the client's pacing (the server's stream_open_rate
  // and stream_open_burst) or for a free stream (its max_streams).
  uint64_t opens_deferred = 0;
  // Streams the server refused at their SYN, unprocessed, without Go Away
  // (beyond its open rate or stream limit), and refused opens sent again.
  uint64_t opens_refused = 0;
  uint64_t opens_retried = 0;
  // Local connections reset because they could not be opened within
  // connect_timeout_ms, or at once because max_waiting were already waiting.
  uint64_t waiting_expired = 0;
  uint64_t waiting_overflow = 0;
  // Session resume: connections that broke under a resumable session (kept,
  // detached), sessions resumed on a new connection, resumes the server
  // refused (a fresh session instead) or that did not happen within the
  // window (the kept session's local connections are reset either way), and
  // bytes sent again on resumes.
  uint64_t sessions_detached = 0;
  uint64_t sessions_resumed = 0;
  uint64_t resumes_refused = 0;
  uint64_t resumes_expired = 0;
  uint64_t resume_replayed_bytes = 0;
};

// One session that became ready (the first one too).
struct ClientSessionInfo {
  uint64_t n = 0;           // 1 for the first session, then 2, 3, ...
  std::string server;       // "host:port" dialed
  std::string server_id;    // from WELCOME
  std::array<uint8_t, 16> session_id{};
  uint32_t heartbeat_ms = 0;
  bool resumed = false;     // TLS session resumed with a ticket
  ClientCounters counters;  // after this session was counted
};

// What the client is doing now (for status displays).
struct ClientStatus {
  // "connected": a session takes new streams; "moving": the session is
  // draining and its replacement is being set up; "detached": the session's
  // connection broke and the client is resuming it (its streams wait);
  // "connecting": no session takes streams (local connections wait).
  std::string state;
  uint64_t session = 0;     // number of the session new streams go to (0: none)
  std::string server;       // its "host:port"
  std::string server_id;
  bool resumed = false;
  uint64_t session_age_ms = 0;
  std::string dialing;      // "host:port" being dialed ("" when none)
  size_t old_sessions = 0;  // replaced or draining sessions still finishing streams
  size_t streams = 0;       // open on all sessions
  size_t waiting = 0;       // local connections waiting (for a session, the open pacing or a retry)
  size_t waiting_limit = 0; // max_waiting
  // The limits of the session new streams go to, from its WELCOME (0: not
  // announced: an older server), and the pace the client keeps to them.
  uint32_t server_open_rate = 0;
  uint32_t server_open_burst = 0;
  uint32_t server_max_streams = 0;
  uint32_t open_rate = 0;   // streams/s the client opens at most (0: not paced)
  uint32_t open_burst = 0;  // ... and at once
  bool resumable = false;        // the session can be resumed after a break
  uint64_t detached_for_ms = 0;  // state "detached": since the break
  uint32_t resume_window_ms = 0; // the server keeps the session this long after a break
  size_t resume_kept_bytes = 0;  // kept for a resume: sent, not proved received
  ClientCounters counters;
};

struct ClientReady {
  std::array<uint8_t, 16> session_id{};
  std::string server_id;
  uint32_t heartbeat_ms = 0;
  std::vector<std::pair<std::string, std::string>> forwards;  // bound address, route
};

struct ClientEvents {
  std::function<void(const ClientReady&)> on_ready;  // WELCOME received, forwarders listening
  // REJECT received: code per docs/protocol.md (1 version, 2 unauthorized, 3 overloaded, 4 draining).
  std::function<void(uint16_t code, const std::string& reason)> on_reject;
  // The client stopped for good (fatal REJECT, gave up reconnecting, bad
  // forward address); `error` says why. Not called after stop().
  std::function<void(const std::string& error)> on_closed;
  // A session became ready (after on_ready for the first one).
  std::function<void(const ClientSessionInfo&)> on_session;
  // A ready session ended without DRAIN (reset, heartbeat lost, closed); the
  // client reconnects unless told to stop. Not called for a drained session
  // that closes before its replacement is ready (it had no streams left):
  // that is the move (on_drain) going as planned.
  std::function<void(uint64_t n, const std::string& reason)> on_session_lost;
  // DRAIN received on session n (the one taking new streams): the client is
  // dialing `target` (the reconnect hint or the same address) and moves there.
  std::function<void(uint64_t n, const std::string& reason, uint32_t grace_ms, const std::string& target)> on_drain;
  // Session resume: session n's connection broke and the session is kept
  // for at most window_ms while the client resumes it.
  std::function<void(uint64_t n, const std::string& reason, uint32_t window_ms)> on_detached;
  // Session n carries on over a new connection to `server`, after a pause
  // of paused_ms; replayed: bytes this side sent again.
  std::function<void(uint64_t n, const std::string& server, uint64_t paused_ms, uint64_t replayed)> on_resumed;
  // Session n could not be resumed (refused: a fresh session follows; or its
  // window ended): its local connections were reset.
  std::function<void(uint64_t n, const std::string& reason)> on_resume_failed;
};

class Client {
 public:
  Client(uv_loop_t* loop, ClientOptions options, ClientEvents events);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Validates options, loads TLS material and starts dialing. Returns "" or
  // an error (bad address, unreadable CA file, ...).
  [[nodiscard]] std::string start();
  // Closes forwarders and the session (Go Away, close_notify).
  void stop();

  // Relays an already connected TCP socket `fd` over a new stream to `route`.
  // Takes ownership of fd. While no session is ready, or the open pacing holds
  // it, the socket waits (at most connect_timeout_ms, then it is reset). False (fd closed) if the client is
  // stopped.
  bool open_stream(int fd, const std::string& route);

  // Streams currently open on all sessions (the current one and draining ones).
  size_t stream_count() const;
  // Local connections waiting (for a session, the open pacing or a retry).
  size_t waiting_count() const;
  const ClientCounters& counters() const;
  ClientStatus status() const;
  // Local "host:port" of the tunnel's TCP connection ("" when none). A hot
  // restart of the sidecar leaves it unchanged: the connection is the same.
  std::string local_address() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace baton
