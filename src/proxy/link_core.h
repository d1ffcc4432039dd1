// LinkCore: the plain part of a secured link, no I/O (ARCHITECTURE
// principle 1): the record layer, the yamux session on top of it, the
// link's phase, counters and peer facts, and the clock readings its timers
// start from. It exports itself as a TunnelState and is rebuilt from one.
//
// proxy::Link wraps one in the socket, the timer and the bridges; the
// mid-stream hand-over harness (tests/common/handoff_world.h, its unit test
// and fuzz target) drives the same core with in-memory peers, so what it
// checks is what the proxy runs.
//
// Time is passed in (milliseconds, any monotonic origin): the core never
// reads a clock.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "mux/session.h"
#include "proxy/resume_log.h"
#include "proxy/state.h"
#include "tls/peer_info.h"
#include "tls/record.h"

namespace baton::proxy {

// What input() made of the peer's bytes.
enum class InputStatus : uint8_t {
  ok = 0,              // every whole record was opened and its frames consumed
  closed = 1,          // the peer sent close_notify
  protocol_error = 2,  // a yamux error: Go Away(protocol error) is queued
  tls_error = 3,       // a record that does not open: the alert, if any, is sealed
};

struct InputResult {
  InputStatus status = InputStatus::ok;
  const char* reason = "";  // static text (never peer data), for logs
};

class LinkCore {
 public:
  // A link still in its handshake: no record layer or session yet.
  LinkCore(mux::Role role, mux::SessionHandler& handler, uint32_t max_data_streams, uint64_t now);
  // Rebuilt from exported state: takes st.record, st.session, phase, peer
  // facts, counters and the ages (fds and bridges are the caller's).
  LinkCore(TunnelState& st, mux::SessionHandler& handler, uint32_t max_data_streams, uint64_t now);

  // The handshake is done: records from here on, a fresh session, phase
  // awaiting_hello.
  void secure(tls::RecordState record, const tls::PeerInfo& peer);

  // Opens the records in `data` and feeds their plaintext to the session,
  // while the link is open (awaiting_hello or serving; a session callback
  // that closes the link stops it). Bytes of an incomplete record wait in
  // the record layer. `scratch` is tls::kScratchSize bytes.
  // After hold_input() (from a session callback) it stops at the end of the
  // current record and keeps the rest unopened in the record layer.
  InputResult input(std::span<const uint8_t> data, std::span<uint8_t> scratch);
  // The record being opened is the last one this session reads: what follows
  // belongs to the session the record layer goes to next (a resume,
  // docs/protocol.md 9.4).
  void hold_input() { held_ = true; }
  // Seals what the session queued into records (dropped once close_notify
  // is sent: nothing may follow it).
  void seal();

  // Moves the core into `out`: seals what the session queued, drops the
  // first `written` bytes of record output (the kernel took them while the
  // socket was released) and counts them, takes the record and session
  // state, phase, peer facts, counters, ages and resume log. The core is
  // closed and empty afterwards. Precondition: secured, or detached.
  void export_into(TunnelState& out, size_t written, uint64_t now);

  // Session resume (docs/protocol.md 9). The connection broke: the record
  // layer goes (its unsent records are in the resume log), the session
  // stays; phase detached.
  void detach();
  // A new connection carries the session on: its record layer (holding
  // what it sent already, RESUMED last), then our kept bytes from the
  // peer's offset, sealed and not counted again. False (nothing changed)
  // when the offset is outside what we keep. Phase serving.
  [[nodiscard]] bool attach(std::unique_ptr<tls::RecordLayer> record, uint64_t peer_received);
  // The record layer, given to a session this connection resumes.
  std::unique_ptr<tls::RecordLayer> release_record() { return std::move(record_); }

  bool secured() const { return record_ != nullptr; }
  tls::RecordLayer* record() { return record_.get(); }
  const tls::RecordLayer* record() const { return record_.get(); }
  mux::Session* session() { return session_.get(); }
  const mux::Session* session() const { return session_.get(); }
  LinkPhase phase() const { return phase_; }
  void set_phase(LinkPhase p) { phase_ = p; }
  const tls::PeerInfo& peer_info() const { return peer_info_; }
  LinkCounters& counters() { return counters_; }
  const LinkCounters& counters() const { return counters_; }
  // The session streams' offsets and what is kept for a resume
  // (docs/protocol.md 9). Keeping from the first byte until the owner knows
  // whether the session is resumable (stop_keeping() when it is not).
  ResumeLog& resume_log() { return resume_; }
  const ResumeLog& resume_log() const { return resume_; }

  // Clock readings (the caller's clock, ms).
  uint64_t started_ms() const { return started_ms_; }
  uint64_t last_rx_ms() const { return last_rx_ms_; }
  // `n` bytes arrived from the peer at `now`.
  void received(size_t n, uint64_t now) {
    counters_.bytes_in += n;
    last_rx_ms_ = now;
  }

 private:
  mux::Role role_;
  mux::SessionHandler* handler_;
  uint32_t max_data_streams_;
  std::unique_ptr<tls::RecordLayer> record_;
  std::unique_ptr<mux::Session> session_;
  tls::PeerInfo peer_info_;
  LinkCounters counters_;
  LinkPhase phase_ = LinkPhase::awaiting_handshake;
  ResumeLog resume_;
  uint64_t started_ms_ = 0;
  uint64_t last_rx_ms_ = 0;
  bool held_ = false;  // hold_input()
};

}  // namespace baton::proxy
