// Admission: which connections of one admin listener to close, decided from
// their phases and clocks alone (no I/O, no threads; time is passed in, the
// next deadline is returned: ARCHITECTURE principle 2). admin/gate.h is the
// I/O shell that reads, writes and closes; docs/design.md "The admin's
// request gate" says why these rules.
//
// The rules, per connection (limits in AdmissionLimits):
//   * awaiting_request (since accept, or since its previous answer was
//     taken): no byte of the request within idle_ms -> closed, idle (not a
//     rejection: the keep-alive timeout); the request not complete within
//     request_deadline_ms -> closed, deadline.
//   * awaiting_client_read (an answer the client has not taken yet): not
//     taken within answer_deadline_ms -> closed, answer_deadline.
//   * in either, a connection that has some of a request (or an answer
//     waiting) for longer than slow_after_ms is slow; a source address holds
//     at most max_slow_per_client slow connections: the one that would be one
//     more is closed at that moment, per_client. A prompt request from the
//     same address is never slow, so it is never refused.
//   * handling (queued for or in a handler): no client deadline.
//   * at most max_connections per listener: a new one beyond that closes a
//     connection waiting for its client (awaiting_request or
//     awaiting_client_read): the longest-waiting one of the source address
//     that holds the most connections, so a flood from some addresses does
//     not push out another address's probe. When every one is handling, the
//     new one itself is closed. Both are `capacity`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace baton::admin {

struct AdmissionLimits {
  uint32_t idle_ms = 1000;
  uint32_t request_deadline_ms = 2000;
  uint32_t answer_deadline_ms = 2000;
  uint32_t slow_after_ms = 250;
  uint32_t max_slow_per_client = 4;
  uint32_t max_connections = 128;
};

// Why a connection is closed. Every reason but `idle` is a rejection,
// counted in baton_admin_requests_rejected_total{reason}.
enum class CloseReason { idle, deadline, answer_deadline, per_client, capacity, head_too_large };
const char* to_str(CloseReason r);
constexpr size_t kCloseReasons = 6;

class Admission {
 public:
  enum class Phase { awaiting_request, handling, awaiting_client_read };

  struct Verdict {
    uint64_t id;
    CloseReason reason;
  };
  struct Counts {
    uint32_t reading = 0;   // awaiting_request, not slow
    uint32_t slow = 0;      // slow (either direction)
    uint32_t handling = 0;
    uint32_t writing = 0;   // awaiting_client_read, not slow
  };

  explicit Admission(const AdmissionLimits& limits) : limits_(limits) {}

  // A new connection `id` (unique, increasing) from `source`, awaiting its
  // first request from now_ms. If the listener is full, returns the
  // connection to close for room (already forgotten here); when that is
  // `id` itself, the new connection was not admitted.
  std::optional<Verdict> admit(uint64_t id, const std::string& source, uint64_t now_ms);
  // Phase changes (the connection must be known).
  void awaiting_request(uint64_t id, uint64_t now_ms);
  void received(uint64_t id);  // some bytes of the awaited request arrived
  void handling(uint64_t id);
  void awaiting_client_read(uint64_t id, uint64_t now_ms);
  // Forgets a connection (closed for any reason). Unknown ids are ignored.
  void remove(uint64_t id);

  // The connections to close at now_ms, in the order decided; they are
  // forgotten here.
  std::vector<Verdict> expire(uint64_t now_ms);
  // When expire() next has something to do (UINT64_MAX: nothing pending).
  uint64_t next_deadline() const;

  size_t size() const { return conns_.size(); }
  Counts counts() const;
  uint32_t slow_from(const std::string& source) const;

 private:
  struct Conn {
    std::string source;
    Phase phase = Phase::awaiting_request;
    uint64_t since_ms = 0;
    bool got_bytes = false;
    bool slow = false;
  };
  void unslow(Conn& c);
  void forget(std::map<uint64_t, Conn>::iterator it);
  // The next time `c` needs a look (UINT64_MAX: none).
  uint64_t due(const Conn& c) const;

  AdmissionLimits limits_;
  std::map<uint64_t, Conn> conns_;  // by id: oldest connection first
  std::map<std::string, uint32_t> slow_by_source_;
  std::map<std::string, uint32_t> conns_by_source_;
};

const char* to_str(Admission::Phase p);

}  // namespace baton::admin
