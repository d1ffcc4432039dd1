// ResumeLog: one side's account of a resumable session's two streams
// (docs/protocol.md 9.1), no I/O.
//
// Our stream: every byte we send is counted (`sent`) and kept until the
// peer reports, with RECEIVED or when resuming, that it received it. The
// kept bytes are [acked, sent). The peer's stream: every byte we hand to our
// yamux parser is counted (`received`); RECEIVED is due every kReceiptEvery
// bytes and whenever the owner asks (its heartbeat).
//
// A log counts and keeps only while keeping: from start_keeping() (a side
// that offers or asks for resume, from the session's first byte) until
// stop_keeping() (the session turned out not to be resumable). A new log
// does not keep.
#pragma once

#include <cstddef>
#include <cstdint>

#include "util/byte_queue.h"

namespace baton::proxy {

class ResumeLog {
 public:
  // RECEIVED goes out at least this often (bytes of the peer's stream).
  static constexpr uint64_t kReceiptEvery = 64 * 1024;

  uint64_t sent() const { return sent_; }
  uint64_t received() const { return received_; }
  uint64_t acked() const { return sent_ - kept_.size(); }  // the peer's highest report
  size_t kept() const { return kept_.size(); }
  bool keeping() const { return keeping_; }

  // Our bytes, in order, as they leave for the record layer.
  void sent_bytes(const util::ByteQueue& q) {
    if (!keeping_) return;
    kept_.append(q);
    sent_ += q.size();
  }
  // `n` bytes of the peer's stream reached our parser.
  void received_bytes(size_t n) {
    if (keeping_) received_ += n;
  }

  enum class Ack : uint8_t { ok, stale, beyond_sent };
  // The peer reports it has `offset` bytes of our stream: drop what it has.
  // A report below an earlier one is stale (ignored); one beyond what we
  // sent is a protocol error.
  Ack acknowledge(uint64_t offset);

  // Resuming: the peer has `offset` bytes of our stream. False when that is
  // outside [acked, sent] (it claims less than it reported, or more than we
  // sent). Else drops what it has and appends a copy of the rest, to send
  // again, to `out`; those bytes stay kept until acknowledged.
  [[nodiscard]] bool replay_from(uint64_t offset, util::ByteQueue& out);

  // A RECEIVED is due: kReceiptEvery bytes of the peer's stream since the
  // last one (or, with `any`, at least one byte).
  bool receipt_due(bool any = false) const {
    const uint64_t since = received_ - reported_;
    return keeping_ && (any ? since > 0 : since >= kReceiptEvery);
  }
  // The offset to report now; it counts as reported.
  uint64_t take_receipt() { return reported_ = received_; }

  // From the session's first byte: count and keep.
  void start_keeping() { keeping_ = true; }
  // Not resumable: drop what is kept, keep nothing from now on.
  void stop_keeping() {
    keeping_ = false;
    kept_.clear();
  }

  // Handoff: the log as plain data, and rebuilt from it.
  struct State {
    bool keeping = false;
    uint64_t sent = 0;
    uint64_t received = 0;
    uint64_t reported = 0;
    util::ByteQueue kept;  // [sent - kept.size(), sent)
  };
  State take_state();
  ResumeLog() = default;
  explicit ResumeLog(State st);

 private:
  bool keeping_ = false;
  uint64_t sent_ = 0;
  uint64_t received_ = 0;
  uint64_t reported_ = 0;  // the last RECEIVED we sent
  util::ByteQueue kept_;
};

}  // namespace baton::proxy
