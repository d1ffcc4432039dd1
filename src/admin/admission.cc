#include "admin/admission.h"

#include <algorithm>
#include <limits>

namespace baton::admin {

namespace {
constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();
}

const char* to_str(CloseReason r) {
  switch (r) {
    case CloseReason::idle: return "idle";
    case CloseReason::deadline: return "deadline";
    case CloseReason::answer_deadline: return "answer_deadline";
    case CloseReason::per_client: return "per_client";
    case CloseReason::capacity: return "capacity";
    case CloseReason::head_too_large: return "head_too_large";
  }
  return "?";
}

const char* to_str(Admission::Phase p) {
  switch (p) {
    case Admission::Phase::awaiting_request: return "awaiting_request";
    case Admission::Phase::handling: return "handling";
    case Admission::Phase::awaiting_client_read: return "awaiting_client_read";
  }
  return "?";
}

std::optional<Admission::Verdict> Admission::admit(uint64_t id, const std::string& source, uint64_t now_ms) {
  std::optional<Verdict> out;
  if (conns_.size() >= limits_.max_connections) {
    // Room comes from the address holding the most connections, its
    // connection that has waited longest for its client; connections in a
    // handler are busy being answered.
    auto victim = conns_.end();
    uint32_t victim_n = 0;
    for (auto it = conns_.begin(); it != conns_.end(); ++it) {
      if (it->second.phase == Phase::handling) continue;
      uint32_t n = conns_by_source_[it->second.source];
      if (victim == conns_.end() || n > victim_n || (n == victim_n && it->second.since_ms < victim->second.since_ms)) {
        victim = it;
        victim_n = n;
      }
    }
    if (victim == conns_.end()) return Verdict{id, CloseReason::capacity};
    out = Verdict{victim->first, CloseReason::capacity};
    remove(victim->first);
  }
  Conn c;
  c.source = source;
  c.since_ms = now_ms;
  conns_.emplace(id, std::move(c));
  ++conns_by_source_[source];
  return out;
}

void Admission::unslow(Conn& c) {
  if (!c.slow) return;
  c.slow = false;
  auto it = slow_by_source_.find(c.source);
  if (it != slow_by_source_.end() && --it->second == 0) slow_by_source_.erase(it);
}

void Admission::awaiting_request(uint64_t id, uint64_t now_ms) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = it->second;
  unslow(c);
  c.phase = Phase::awaiting_request;
  c.since_ms = now_ms;
  c.got_bytes = false;
}

void Admission::received(uint64_t id) {
  auto it = conns_.find(id);
  if (it != conns_.end()) it->second.got_bytes = true;
}

void Admission::handling(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  unslow(it->second);
  it->second.phase = Phase::handling;
}

void Admission::awaiting_client_read(uint64_t id, uint64_t now_ms) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = it->second;
  unslow(c);
  c.phase = Phase::awaiting_client_read;
  c.since_ms = now_ms;
  c.got_bytes = true;  // an answer is waiting: the client is the slow side
}

void Admission::forget(std::map<uint64_t, Conn>::iterator it) {
  unslow(it->second);
  auto s = conns_by_source_.find(it->second.source);
  if (s != conns_by_source_.end() && --s->second == 0) conns_by_source_.erase(s);
  conns_.erase(it);
}

void Admission::remove(uint64_t id) {
  auto it = conns_.find(id);
  if (it != conns_.end()) forget(it);
}

uint64_t Admission::due(const Conn& c) const {
  switch (c.phase) {
    case Phase::handling:
      return kNever;
    case Phase::awaiting_request:
      if (!c.got_bytes) return c.since_ms + limits_.idle_ms;
      if (!c.slow) return c.since_ms + std::min(limits_.slow_after_ms, limits_.request_deadline_ms);
      return c.since_ms + limits_.request_deadline_ms;
    case Phase::awaiting_client_read:
      if (!c.slow) return c.since_ms + std::min(limits_.slow_after_ms, limits_.answer_deadline_ms);
      return c.since_ms + limits_.answer_deadline_ms;
  }
  return kNever;
}

std::vector<Admission::Verdict> Admission::expire(uint64_t now_ms) {
  std::vector<Verdict> out;
  for (auto it = conns_.begin(); it != conns_.end();) {
    Conn& c = it->second;
    std::optional<CloseReason> close;
    if (c.phase == Phase::awaiting_request) {
      if (!c.got_bytes) {
        if (now_ms >= c.since_ms + limits_.idle_ms) close = CloseReason::idle;
      } else if (now_ms >= c.since_ms + limits_.request_deadline_ms) {
        close = CloseReason::deadline;
      }
    } else if (c.phase == Phase::awaiting_client_read) {
      if (now_ms >= c.since_ms + limits_.answer_deadline_ms) close = CloseReason::answer_deadline;
    }
    if (!close && c.phase != Phase::handling && c.got_bytes && !c.slow &&
        now_ms >= c.since_ms + limits_.slow_after_ms) {
      uint32_t& n = slow_by_source_[c.source];
      if (n >= limits_.max_slow_per_client) {
        close = CloseReason::per_client;
      } else {
        ++n;
        c.slow = true;
      }
    }
    if (close) {
      out.push_back({it->first, *close});
      forget(it++);
    } else {
      ++it;
    }
  }
  return out;
}

uint64_t Admission::next_deadline() const {
  uint64_t next = kNever;
  for (const auto& [id, c] : conns_) next = std::min(next, due(c));
  return next;
}

Admission::Counts Admission::counts() const {
  Counts n;
  for (const auto& [id, c] : conns_) {
    if (c.slow) ++n.slow;
    else if (c.phase == Phase::handling) ++n.handling;
    else if (c.phase == Phase::awaiting_request) ++n.reading;
    else ++n.writing;
  }
  return n;
}

uint32_t Admission::slow_from(const std::string& source) const {
  auto it = slow_by_source_.find(source);
  return it == slow_by_source_.end() ? 0 : it->second;
}

}  // namespace baton::admin
