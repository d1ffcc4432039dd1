// Bridge: relays one yamux stream to one TCP connection, both ways, with
// backpressure and half-close (docs/protocol.md section 4).
//
//   stream -> TCP: bytes stay in the stream's inbound queue until the TCP
//     write completes; only then is window credit returned (consumed()).
//   TCP -> stream: a read is written into the session within the send
//     window; what does not fit waits in `pending_` and reading stops until
//     the window opens. Reading also stops while the link is congested.
//   FIN from the peer -> TCP shutdown once everything before it is written;
//   TCP EOF -> FIN once everything read is in the session.
//   TCP error -> RST; RST -> TCP closed.
//
// The server side connects to an upstream after reading the preamble; the
// client side starts with an accepted local connection.
#pragma once

#include <uv.h>

#include <cstdint>
#include <string>

#include "net/listener.h"
#include "net/tcp.h"
#include "proxy/state.h"
#include "util/byte_queue.h"

namespace baton::proxy {

class Link;


class Bridge : public net::TcpHandler {
 public:
  // Server side: waits for the preamble on stream `id`.
  Bridge(Link& link, uint32_t id);
  // Client side: relays stream `id` to an accepted local connection.
  // `sent_before`: bytes read from `local` for an earlier stream that the
  // server refused unprocessed (see try_replay); they go first, and
  // `local_eof` says the local side had already half-closed.
  Bridge(Link& link, uint32_t id, net::Tcp* local, const std::string& route = {}, util::ByteQueue sent_before = {},
         bool local_eof = false);
  // Handoff, adopting process: rebuilds a bridge from `st` (taking its fd;
  // -1 in `st` afterwards). No I/O until start_adopted(). On failure `error`
  // is set, the fd is closed and the bridge must be dropped.
  Bridge(Link& link, BridgeState& st, std::string& error);
  ~Bridge() override;
  // Handoff, old process: stops I/O and moves the bridge into `out` (the
  // upstream socket duplicated). The bridge is done afterwards.
  void export_state(BridgeState& out);
  // Starts I/O after adoption: drops what the kernel already took, re-dials an
  // upstream whose connect had not completed, resumes relaying.
  void start_adopted();
  // Handoff called off: closes the sockets quietly (no RST, no FIN reaches a
  // peer while another process holds them). The bridge is done afterwards.
  void abandon();

  uint32_t id() const { return id_; }
  BridgePhase phase() const { return phase_; }
  const std::string& route() const { return route_; }

  // Server side: uv_now() of the stream's opening (of its adoption, after a hot restart).
  uint64_t opened_ms() const { return opened_ms_; }
  // Server side: the route preamble did not fully arrive in time: counted
  // (reason preamble_timeout) and reset. No effect past the preamble.
  void preamble_timed_out(uint32_t timeout_ms);
  // Starts connecting to host:port (server side, after the preamble).
  void connect(const std::string& route, const std::string& host, uint16_t port, uint32_t timeout_ms);

  // From the link (session events).
  void stream_data();      // inbound bytes queued
  void stream_fin();       // peer half-closed
  void stream_writable();  // send window opened
  void link_decongested(); // the link's output fell below its low-water mark
  // The stream is gone (reset by peer, closed, or the link is ending): close TCP.
  void stream_gone(bool reset_tcp);
  // Client side: the server provably never processed this stream (it reset
  // it after Go Away or refused it at its SYN, see Link::peer_refused, or
  // closed the session cleanly after Go Away). If the
  // server had not ACKed it yet and on_replay is set, the local connection
  // and every byte already sent on the stream go to on_replay, to be sent
  // again (on another session after Go Away), and true is returned (the bridge is done).
  // False: nothing happened; the caller ends the bridge as usual.
  [[nodiscard]] bool try_replay();
  // The link is closing. If the peer had finished the stream (FIN received),
  // everything it sent is here: the TCP connection is handed to a Linger that
  // writes the rest and then sends FIN, instead of being reset with the
  // bytes still queued. Otherwise the same as stream_gone(true).
  void link_closing();

  // Client hook for try_replay(): takes the local connection (reading
  // stopped, no handler) with the bytes to send first and whether the local
  // side had half-closed.
  std::function<void(net::Tcp* local, const std::string& route, util::ByteQueue sent, bool local_eof)> on_replay;
  // Most bytes kept for a replay: a stream cannot carry more before the
  // server's first window update, which only follows its ACK.
  static constexpr size_t kMaxReplayBytes = 256 * 1024;

  // Server hook: the preamble named `route`; the owner looks it up and calls
  // connect() or resets. Set by the server tunnel.
  std::function<void(Bridge&, const std::string& route)> on_preamble;
  // Server hooks for metrics: the upstream connect finished (0 or a UV_*
  // code, with its duration), and the bridge is done (not when it moves to
  // another process).
  std::function<void(Bridge&, int status, double seconds)> on_connect_result;
  std::function<void(Bridge&)> on_finished;
  // Server hook for metrics: the stream is being reset after it was
  // admitted. `reason` is a fixed static string (a metric label value):
  // client (the peer reset it), upstream_error (the upstream connection
  // failed or was reset while relaying), malformed_preamble,
  // preamble_timeout. Failed upstream connects are reported by
  // on_connect_result instead.
  std::function<void(Bridge&, const char* reason)> on_reset;

  uint64_t bytes_up = 0;    // stream -> TCP
  uint64_t bytes_down = 0;  // TCP -> stream

 private:
  void on_read(std::span<const uint8_t> data) override;
  void on_read_end(int err) override;
  void on_written(size_t n, int err) override;
  void on_connected(int status) override;

  void pump_to_tcp();
  void pump_to_stream();
  // RST the stream and close TCP. `reset_reason` (a metric label, see
  // on_reset) counts the reset of an admitted stream; nullptr: not counted
  // here (failed upstream connects go through on_connect_result).
  void fail(const char* why, const char* reset_reason = nullptr);
  void stop_connect_timer();
  // Writes into the stream, keeping a copy while the server has not ACKed.
  size_t write_stream(std::span<const uint8_t> data);

  Link& link_;
  uint32_t id_;
  BridgePhase phase_;
  net::Tcp* tcp_ = nullptr;
  net::Resolve* resolve_ = nullptr;
  uv_timer_t* connect_timer_ = nullptr;
  std::string route_;
  util::ByteQueue pending_;  // read from TCP, not yet accepted by the send window
  bool tcp_eof_ = false;     // TCP EOF seen; FIN once pending_ is empty
  bool fin_sent_ = false;
  bool peer_fin_ = false;    // stream FIN seen; TCP shutdown once inbound is written
  bool shutdown_sent_ = false;
  uint64_t adopted_written_ = 0;  // see BridgeState::upstream_written
  uint64_t connect_started_ns_ = 0;
  uint64_t opened_ms_ = 0;  // server side: uv_now() when the stream was opened (or adopted)
  bool exported_ = false;
  bool local_side_ = false;  // client side: tcp_ is the local application's connection
  // Client side: a copy of every byte written into the stream until the ACK
  // (replayable_ false once ACKed, or when the copy would exceed kMaxReplayBytes).
  bool replayable_ = false;
  util::ByteQueue sent_;
  void report_connect(int status);
};

}  // namespace baton::proxy
