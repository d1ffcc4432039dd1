#include "handoff/parent_logic.h"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace baton::handoff {

const char* to_str(ParentPhase p) {
  switch (p) {
    case ParentPhase::idle: return "idle";
    case ParentPhase::awaiting_hello: return "awaiting_hello";
    case ParentPhase::awaiting_listening: return "awaiting_listening";
    case ParentPhase::transferring: return "transferring";
    case ParentPhase::committed: return "committed";
  }
  return "?";
}

ParentLogic::ParentLogic(ParentHost& host, ParentLogicOptions opts) : host_(host), opts_(opts) {}

ParentLogic::~ParentLogic() {
  for (auto& [seq, ts] : in_flight_)
    for (auto& t : ts) proxy::close_fds(t);
  for (auto& t : acked_) proxy::close_fds(t);
  for (auto& t : held_) proxy::close_fds(t);
}

ParentLogic::Admission ParentLogic::on_connection(uint32_t uid, uint32_t pid, uint64_t now) {
  if (uid != opts_.my_uid && uid != 0) return {false, false, "not this user or root"};
  // docs/operations.md "When lifecycle events meet": one handoff at a time,
  // and never out of a drain (a drain is not undone; the new process would
  // serve while this pod is going away).
  if (host_.draining()) return {false, true, "this baton is draining (a drain is never undone): no hot restart"};
  if (phase_ != ParentPhase::idle) return {false, true, "another new process is taking over right now"};
  child_pid_ = pid;
  phase_ = ParentPhase::awaiting_hello;
  host_.begin_handoff();
  child_takes_tunnels_ = true;
  commit_pending_ = false;
  handshake_cutoff_ = kNoDeadline;
  last_error_.clear();
  stats_ = {};
  stats_.started_ms = now;
  deadline_ = now + opts_.step_timeout_ms;
  spdlog::info("handoff: new process {} connected", child_pid_);
  return {true, false, ""};
}

uint64_t ParentLogic::next_deadline() const {
  switch (phase_) {
    case ParentPhase::awaiting_hello:
    case ParentPhase::awaiting_listening: return deadline_;
    case ParentPhase::transferring:
      if (commit_pending_) return kNoDeadline;  // the next poll decides
      if (!in_flight_.empty()) return deadline_;
      return handshake_cutoff_;
    default: return kNoDeadline;
  }
}

Step ParentLogic::on_deadline(uint64_t now) {
  switch (phase_) {
    case ParentPhase::awaiting_hello:
    case ParentPhase::awaiting_listening:
      if (now < deadline_) return {};
      return abort(std::string("new process did not answer in time (") + to_str(phase_) + ")", true);
    case ParentPhase::transferring:
      if (!in_flight_.empty()) {
        if (now < deadline_) return {};
        return abort("new process did not acknowledge a batch in time", true);
      }
      {
        Step s;
        pump(s, now);
        return s;
      }
    default: return {};
  }
}

Step ParentLogic::on_message(const Header& h, std::span<const uint8_t> body, uint64_t now) {
  if (phase_ == ParentPhase::idle || phase_ == ParentPhase::committed) return {};
  if (h.version != kProtocolVersion)
    return abort("new process speaks handoff protocol version " + std::to_string(h.version), true);
  switch (h.type) {
    case MsgType::hello:
      if (phase_ == ParentPhase::awaiting_hello) return handle_hello(body, now);
      break;
    case MsgType::listening:
      if (phase_ == ParentPhase::awaiting_listening) return handle_listening(now);
      break;
    case MsgType::batch_ack:
      if (phase_ == ParentPhase::transferring) return handle_batch_ack(body, now);
      break;
    case MsgType::abort:
    case MsgType::refuse:
      // Answered with an abort of our own: a new process that called the
      // takeover off (Child::abandon) tells "resumed here" from "gone".
      return abort("new process gave up: " + reason_of(body), true);
    default: break;
  }
  return abort(std::string("unexpected ") + to_str(h.type) + " message in phase " + to_str(phase_), true);
}

Step ParentLogic::on_closed(const std::string& why, uint64_t) {
  if (phase_ == ParentPhase::committed || phase_ == ParentPhase::idle) return {};
  Step s = abort(why, false);
  s.close = CloseChannel::now;
  return s;
}

Step ParentLogic::handle_hello(std::span<const uint8_t> body, uint64_t now) {
  Hello h;
  std::string err = decode_hello(body, h);
  if (!err.empty()) return abort("malformed hello: " + err, true);
  // The newest layout both read: an older new process (a downgrade) still
  // takes the tunnels in the layout it knows.
  uint16_t v = std::min(kStateVersion, h.max_state_version);
  if (v < kMinStateVersion) v = kStateVersion;
  if (opts_.state_version_override) v = opts_.state_version_override;
  state_version_ = v;
  if (v < h.min_state_version || v > h.max_state_version) {
    spdlog::warn("handoff: new process reads tunnel state versions {}..{}, this one writes {}: its tunnels will be drained",
                 h.min_state_version, h.max_state_version, v);
    child_takes_tunnels_ = false;
  }
  int lfd = -1;
  ServerStateMsg st = host_.server_state(lfd);
  st.pid = opts_.my_pid;
  st.has_listener = lfd >= 0;
  Step s;
  std::vector<uint8_t> msg;
  encode_server_state(st, msg);
  std::vector<int> fds;
  if (lfd >= 0) fds.push_back(lfd);
  s.add(MsgType::server_state, std::move(msg), std::move(fds));
  phase_ = ParentPhase::awaiting_listening;
  deadline_ = now + opts_.step_timeout_ms;
  return s;
}

Step ParentLogic::handle_listening(uint64_t now) {
  // The new process accepts on the same socket now: stop here. Connections
  // queued in the kernel stay there for it; none is refused.
  host_.stop_accepting();
  phase_ = ParentPhase::transferring;
  // Tunnels in their TLS handshake get half the step timeout (a client stuck
  // in its handshake must not hold the restart hostage, nor make the new
  // process give up); then they are closed and reconnect.
  handshake_cutoff_ = now + opts_.step_timeout_ms / 2;
  if (!child_takes_tunnels_) drain_local("the new process cannot read this process's tunnel state");
  Step s;
  pump(s, now);
  return s;
}

Step ParentLogic::on_tunnels_changed(uint64_t now) {
  Step s;
  if (phase_ == ParentPhase::transferring && !commit_pending_) pump(s, now);
  return s;
}

void ParentLogic::pump(Step& s, uint64_t now) {
  if (phase_ != ParentPhase::transferring) return;
  if (child_takes_tunnels_ && in_flight_.size() < kWindow) {
    std::vector<proxy::TunnelState> batch;
    size_t fds = 0, bytes = 0;
    // Adds `st` to the batch being built; a full batch goes out first. When
    // that fills the window, `st` waits in held_ for the next acknowledgement.
    auto take = [&](proxy::TunnelState&& st) {
      size_t n = fd_count(st), b = encoded_size(st);
      if (!batch.empty() && (fds + n > kMaxFdsPerMessage || bytes + b > kBatchBytes)) {
        send_batch(s, std::move(batch), now);
        batch.clear();
        fds = bytes = 0;
        if (in_flight_.size() >= kWindow) {
          held_.push_back(std::move(st));
          return;
        }
      }
      fds += n;
      bytes += b;
      batch.push_back(std::move(st));
    };
    std::vector<proxy::TunnelState> held = std::move(held_);
    held_.clear();
    for (auto& st : held) take(std::move(st));
    proxy::TunnelState st;
    while (held_.empty() && host_.export_next(st, state_version_)) {
      take(std::move(st));
      st = proxy::TunnelState{};
    }
    if (!batch.empty()) send_batch(s, std::move(batch), now);
  }
  if (!in_flight_.empty()) return;
  bool more = child_takes_tunnels_ && (!held_.empty() || host_.any_exportable(state_version_));
  size_t handshaking = host_.handshaking();
  if (handshaking && now >= handshake_cutoff_) {
    size_t n = host_.close_handshaking("hot restart: handshake not finished in time");
    spdlog::warn("handoff: closed {} tunnels still in their TLS handshake after {} ms", n, opts_.step_timeout_ms / 2);
    handshaking = host_.handshaking();
  }
  if (!more && handshaking == 0) {
    commit_pending_ = true;
    s.commit_after_poll = true;
  }
  // Otherwise on_tunnels_changed (a handshake ends) or the cutoff comes.
}

Step ParentLogic::on_poll_passed(uint64_t now) {
  Step s;
  if (!commit_pending_ || phase_ != ParentPhase::transferring) return s;
  commit_pending_ = false;
  // Something may have arrived meanwhile (a tunnel finished its handshake):
  // move it first; commit only with nothing left.
  pump(s, now);
  if (!commit_pending_) return s;
  commit_pending_ = false;
  commit(s, now);
  return s;
}

void ParentLogic::send_batch(Step& s, std::vector<proxy::TunnelState> tunnels, uint64_t now) {
  Batch b;
  b.seq = next_seq_++;
  b.state_version = state_version_;
  b.tunnels = std::move(tunnels);
  std::vector<uint8_t> msg;
  std::vector<int> fds;
  encode_batch(b, msg, fds, opts_.state_version_override);
  // Held until acknowledged: if the handoff fails, abort() resumes every
  // tunnel in in_flight_ (the Tunnel objects are gone; only the states remain).
  in_flight_[b.seq] = std::move(b.tunnels);
  stats_.batches++;
  s.add(MsgType::batch, std::move(msg), std::move(fds), b.seq);
  deadline_ = now + opts_.step_timeout_ms;
}

Step ParentLogic::handle_batch_ack(std::span<const uint8_t> body, uint64_t now) {
  BatchAck a;
  std::string err = decode_batch_ack(body, a);
  auto it = in_flight_.find(a.seq);
  if (!err.empty() || it == in_flight_.end() || a.adopted > it->second.size())
    return abort(err.empty() ? "acknowledgement for an unknown batch" : "malformed acknowledgement: " + err, true);
  std::vector<proxy::TunnelState> ts = std::move(it->second);
  in_flight_.erase(it);
  deadline_ = now + opts_.step_timeout_ms;
  size_t drained = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (i < a.adopted) {
      acked_.push_back(std::move(ts[i]));
      stats_.tunnels_sent++;
      count("sent", 1);
      continue;
    }
    // Not taken: back into this process, then drained (make before break).
    if (!host_.resume(ts[i], true)) {
      spdlog::error("handoff: a tunnel refused by the new process could not be resumed here");
      continue;
    }
    ++drained;
  }
  stats_.tunnels_drained += drained;
  count("drained", drained);
  if (a.adopted < ts.size()) {
    spdlog::warn("handoff: new process took {} of {} tunnels ({}); the rest drain here", a.adopted, ts.size(), a.reason);
    if (child_takes_tunnels_) {
      child_takes_tunnels_ = false;
      size_t n = 0;
      for (auto& st : held_) n += host_.resume(st, true) ? 1 : 0;
      held_.clear();
      stats_.tunnels_drained += n;
      count("drained", n);
      drain_local("the new process refused tunnels: " + a.reason);
    }
  }
  Step s;
  pump(s, now);
  return s;
}

void ParentLogic::drain_local(const std::string& why) {
  size_t n = host_.drain_exportable();
  stats_.tunnels_drained += n;
  count("drained", n);
  if (n) spdlog::info("handoff: draining {} tunnels here: {}", n, why);
}

void ParentLogic::count(const char* result, uint64_t n) {
  if (n) host_.metrics().inc(proxy::series<proxy::Fam::handoff_tunnels_total>(result), n);
}

void ParentLogic::commit(Step& s, uint64_t now) {
  Commit c;
  c.metrics = host_.metrics();
  std::vector<uint8_t> msg;
  encode_commit(c, msg);
  s.add(MsgType::commit, std::move(msg));
  s.close = CloseChannel::after_send;
  s.finished = true;
  // The new process owns them now.
  for (auto& t : acked_) proxy::close_fds(t);
  acked_.clear();
  host_.release_listener();
  phase_ = ParentPhase::committed;
  stats_.committed_ms = now;
  spdlog::info("handoff: committed to pid {}: {} tunnels moved in {} batches in {} ms, {} draining here", child_pid_,
               stats_.tunnels_sent, stats_.batches, stats_.committed_ms - stats_.started_ms, stats_.tunnels_drained);
}

Step ParentLogic::cancel(const std::string& why, uint64_t) { return abort(why, true); }

Step ParentLogic::abort(const std::string& why, bool tell_peer) {
  Step s;
  if (phase_ == ParentPhase::committed || phase_ == ParentPhase::idle) return s;
  spdlog::warn("handoff to pid {} failed in phase {}: {}; resuming everything here", child_pid_, to_str(phase_), why);
  last_error_ = why;
  if (tell_peer) {
    std::vector<uint8_t> msg;
    encode_abort(why, msg);
    s.add(MsgType::abort, std::move(msg));
    s.close = CloseChannel::after_send;
  } else {
    s.close = CloseChannel::now;
  }
  s.finished = true;
  commit_pending_ = false;
  // Everything exported comes back, through the same path as in a new process.
  size_t resumed = 0;
  std::vector<proxy::TunnelState> all = std::move(acked_);
  acked_.clear();
  for (auto& [seq, ts] : in_flight_)
    for (auto& t : ts) all.push_back(std::move(t));
  in_flight_.clear();
  for (auto& t : held_) all.push_back(std::move(t));
  held_.clear();
  for (proxy::TunnelState& st : all) {
    if (!host_.resume(st, false)) {
      spdlog::error("handoff: could not resume a tunnel");
      continue;
    }
    ++resumed;
  }
  stats_.tunnels_resumed = resumed;
  count("resumed", resumed);
  host_.end_handoff();
  phase_ = ParentPhase::idle;
  deadline_ = handshake_cutoff_ = kNoDeadline;
  spdlog::info("handoff: resumed {} tunnels; accepting again", resumed);
  return s;
}

}  // namespace baton::handoff
