#include "handoff/child_logic.h"

#include <spdlog/spdlog.h>

namespace baton::handoff {

const char* to_str(ChildPhase p) {
  switch (p) {
    case ChildPhase::awaiting_server_state: return "awaiting_server_state";
    case ChildPhase::awaiting_tunnels: return "awaiting_tunnels";
    case ChildPhase::done: return "done";
    case ChildPhase::failed: return "failed";
  }
  return "?";
}

ChildLogic::ChildLogic(ChildHost& host, uint32_t timeout_ms, uint32_t my_pid, uint32_t my_uid)
    : host_(host), timeout_ms_(timeout_ms), my_pid_(my_pid), my_uid_(my_uid) {}

Step ChildLogic::start(bool peer_known, uint32_t peer_uid, uint32_t peer_pid, uint64_t now) {
  started_ms_ = now;
  deadline_ = now + timeout_ms_;
  result_.old_pid = int(peer_pid);
  // Take over only from this user's (or root's) process: anything else on
  // the socket path could hand this process descriptors and keys of its own.
  if (!peer_known || (peer_uid != my_uid_ && peer_uid != 0)) {
    result_.foreign = true;
    return give_up("the process on the handoff socket (uid " + std::to_string(peer_uid) + ", pid " +
                       std::to_string(peer_pid) + ") is not this user's: refusing to take over from it",
                   false, now);
  }
  Hello h;
  h.pid = my_pid_;
  std::vector<uint8_t> msg;
  encode_hello(h, msg);
  Step s;
  s.add(MsgType::hello, std::move(msg));
  return s;
}

Step ChildLogic::on_deadline(uint64_t now) {
  if (phase_ >= ChildPhase::done || now < deadline_) return {};
  return give_up(std::string("the old process did not answer within ") + std::to_string(timeout_ms_) + " ms (" +
                     to_str(phase_) + ")",
                 true, now);
}

Step ChildLogic::on_message(const Header& h, std::span<const uint8_t> body, std::vector<int>& fds, uint64_t now) {
  if (phase_ >= ChildPhase::done) return {};
  if (h.version != kProtocolVersion)
    return give_up("the old process speaks handoff protocol version " + std::to_string(h.version), true, now);
  deadline_ = now + timeout_ms_;
  switch (h.type) {
    case MsgType::server_state:
      if (phase_ == ChildPhase::awaiting_server_state) return handle_server_state(body, fds, now);
      break;
    case MsgType::batch:
      if (phase_ == ChildPhase::awaiting_tunnels && abandoning_) {
        // Sent before the old process read our abort: not acknowledged, so
        // it cannot commit; it resumes them (these fds are copies).
        return {};
      }
      if (phase_ == ChildPhase::awaiting_tunnels) return handle_batch(body, fds);
      break;
    case MsgType::commit:
      if (phase_ == ChildPhase::awaiting_tunnels) return handle_commit(body, now);
      break;
    case MsgType::abort:
    case MsgType::refuse: {
      const std::string reason = reason_of(body);
      if (abandoning_) return give_up(abandon_why_ + "; the old process resumed everything (" + reason + ")", false, now);
      return give_up("the old process called the handoff off: " + reason, false, now);
    }
    default: break;
  }
  return give_up(std::string("unexpected ") + to_str(h.type) + " message in phase " + to_str(phase_), true, now);
}

Step ChildLogic::on_closed(const std::string& why, uint64_t now) {
  if (phase_ >= ChildPhase::done) return {};
  Step s;
  if (phase_ == ChildPhase::awaiting_tunnels) {
    // The old process is gone without commit or abort: it cannot resume what
    // it handed over, so this process carries on with it.
    spdlog::warn("handoff: the old process went away before committing ({}); starting the {} tunnels it handed over",
                 why, adopted_);
    s = take_over(now);
  } else {
    result_.old_gone = adopted_ == 0;
    s = give_up(why, false, now);
  }
  s.close = CloseChannel::now;
  return s;
}

Step ChildLogic::abandon(const std::string& why, uint64_t now) {
  if (phase_ >= ChildPhase::done || abandoning_) return {};
  result_.abandoned = true;
  if (phase_ == ChildPhase::awaiting_server_state) return give_up(why, true, now);
  abandoning_ = true;
  abandon_why_ = why;
  spdlog::warn("handoff: {}: calling the takeover off; waiting for the old process to take back {} tunnels", why,
               adopted_);
  host_.stop_accepting();
  std::vector<uint8_t> msg;
  encode_abort(why, msg);
  Step s;
  s.add(MsgType::abort, std::move(msg));
  return s;
}

Step ChildLogic::handle_server_state(std::span<const uint8_t> body, std::vector<int>& fds, uint64_t now) {
  ServerStateMsg st;
  std::string err = decode_server_state(body, st);
  if (!err.empty()) return give_up("malformed server state: " + err, true, now);
  int lfd = -1;
  if (st.has_listener && !fds.empty()) {
    lfd = fds[0];
    fds[0] = -1;  // the host's now
  }
  base_metrics_ = st.metrics;
  err = host_.build(st, lfd);
  if (!err.empty()) return give_up(err, true, now);
  phase_ = ChildPhase::awaiting_tunnels;
  std::vector<uint8_t> msg;
  encode_listening(msg);
  Step s;
  s.add(MsgType::listening, std::move(msg));
  return s;
}

Step ChildLogic::handle_batch(std::span<const uint8_t> body, std::vector<int>& fds) {
  Batch b;
  BatchResult r = decode_batch(body, fds, b);
  BatchAck ack;
  ack.seq = b.seq;
  if (r.error != BatchError::none) {
    // The old process keeps these and drains them; their fds close with the message.
    spdlog::warn("handoff: refusing batch {}: {}", b.seq, r.message);
    ack.reason = r.message;
  } else {
    for (int& fd : fds) fd = -1;  // the states own them now
    result_.batches++;
    size_t taken = 0;
    for (; taken < b.tunnels.size(); ++taken) {
      if (host_.room() == 0) {
        ack.reason = "max_tunnels (" + std::to_string(host_.max_tunnels()) + ") reached";
        break;
      }
      std::string err = host_.adopt(b.tunnels[taken]);
      if (!err.empty()) {
        ack.reason = err;  // adopt() closed its fds
        break;
      }
      ++adopted_;
    }
    // Tunnels not taken: these fds are copies, the old process keeps its own.
    for (size_t j = taken; j < b.tunnels.size(); ++j) proxy::close_fds(b.tunnels[j]);
    ack.adopted = uint32_t(taken);
  }
  std::vector<uint8_t> msg;
  encode_batch_ack(ack, msg);
  Step s;
  s.add(MsgType::batch_ack, std::move(msg), {}, ack.seq);
  return s;
}

Step ChildLogic::handle_commit(std::span<const uint8_t> body, uint64_t now) {
  Commit c;
  std::string err = decode_commit(body, c);
  if (!err.empty()) spdlog::warn("handoff: malformed commit ({}); taking over anyway", err);
  else host_.metrics().add_delta(c.metrics, base_metrics_);
  if (abandoning_)
    spdlog::warn("handoff: the old process committed before it read our abort: taking over after all");
  host_.metrics().inc(proxy::series<proxy::Fam::handoff_tunnels_total>("received"), adopted_);
  return take_over(now);
}

Step ChildLogic::take_over(uint64_t now) {
  // Our abort may have crossed the commit (or the old process's exit): the
  // tunnels are ours after all, and so is the listener (the caller then
  // drains or stops, as asked).
  if (abandoning_) host_.resume_accepting();
  host_.start_adopted();
  result_.tunnels = adopted_;
  adopted_ = 0;
  Step s;
  finish(s, true, "", now);
  return s;
}

void ChildLogic::finish(Step& s, bool ok, const std::string& error, uint64_t now) {
  phase_ = ok ? ChildPhase::done : ChildPhase::failed;
  if (s.close == CloseChannel::no) s.close = CloseChannel::after_send;
  s.finished = true;
  result_.ok = ok;
  result_.error = error;
  result_.elapsed_ms = now - started_ms_;
}

Step ChildLogic::give_up(const std::string& why, bool tell_peer, uint64_t now) {
  Step s;
  if (phase_ >= ChildPhase::done) return s;
  if (tell_peer) {
    std::vector<uint8_t> msg;
    encode_abort(why, msg);
    s.add(MsgType::abort, std::move(msg));
  }
  // The old process still holds every socket handed over: let go quietly.
  if (adopted_) host_.let_go_adopted();
  adopted_ = 0;
  finish(s, false, why, now);
  return s;
}

}  // namespace baton::handoff
