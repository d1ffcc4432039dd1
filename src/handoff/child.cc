#include "handoff/child.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>

#include "handoff/test_hook.h"
#include "proxy/tunnel.h"

namespace baton::handoff {

namespace {
void test_stop_at(const char* step) { handoff::test_stop_at("BATON_TEST_HANDOFF_STOP_AT", step); }
}  // namespace

const char* to_str(ChildPhase p) {
  switch (p) {
    case ChildPhase::awaiting_server_state: return "awaiting_server_state";
    case ChildPhase::awaiting_tunnels: return "awaiting_tunnels";
    case ChildPhase::done: return "done";
    case ChildPhase::failed: return "failed";
  }
  return "?";
}

Child::Child(uv_loop_t* loop, int fd, uint32_t timeout_ms, MakeServer make_server,
             std::function<void(const ChildResult&)> done)
    : loop_(loop), timeout_ms_(timeout_ms), make_server_(std::move(make_server)), done_(std::move(done)) {
  started_ms_ = uv_now(loop_);
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  uv_timer_start(timer_, timer_cb, timeout_ms_, 0);
  channel_ = Channel::create(loop_, fd, [this](Message& m) { on_message(m); },
                             [this](const std::string& why) { on_closed(why); });
  // Take over only from this user's (or root's) process: anything else on
  // the socket path could hand this process descriptors and keys of its own.
  uint32_t uid = 0;
  if (!channel_->peer_uid(uid, result_.old_pid) || (uid != getuid() && uid != 0)) {
    result_.foreign = true;
    give_up("the process on the handoff socket (uid " + std::to_string(uid) + ", pid " +
                std::to_string(result_.old_pid) + ") is not this user's: refusing to take over from it",
            false);
    return;
  }
  Hello h;
  h.pid = uint32_t(getpid());
  std::vector<uint8_t> msg;
  encode_hello(h, msg);
  channel_->send(std::move(msg));
  test_stop_at("hello");
}

Child::~Child() {
  if (channel_) channel_->close();
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
}

void Child::timer_cb(uv_timer_t* t) {
  auto* c = static_cast<Child*>(t->data);
  c->give_up(std::string("the old process did not answer within ") + std::to_string(c->timeout_ms_) + " ms (" +
                 to_str(c->phase_) + ")",
             true);
}

void Child::on_message(Message& m) {
  if (phase_ >= ChildPhase::done) return;
  if (m.header.version != kProtocolVersion) {
    give_up("the old process speaks handoff protocol version " + std::to_string(m.header.version), true);
    return;
  }
  uv_timer_start(timer_, timer_cb, timeout_ms_, 0);
  switch (m.header.type) {
    case MsgType::server_state:
      if (phase_ == ChildPhase::awaiting_server_state) return handle_server_state(m);
      break;
    case MsgType::batch:
      if (phase_ == ChildPhase::awaiting_tunnels && abandoning_) {
        // Sent before the old process read our abort: not acknowledged, so
        // it cannot commit; it resumes them (these fds are copies).
        return;
      }
      if (phase_ == ChildPhase::awaiting_tunnels) return handle_batch(m);
      break;
    case MsgType::commit:
      if (phase_ == ChildPhase::awaiting_tunnels) return handle_commit(m);
      break;
    case MsgType::abort:
    case MsgType::refuse: {
      std::string reason;
      (void)decode_reason(m.body, reason);
      if (abandoning_) {
        give_up(abandon_why_ + "; the old process resumed everything (" + reason + ")", false);
        return;
      }
      give_up("the old process called the handoff off: " + reason, false);
      return;
    }
    default: break;
  }
  give_up(std::string("unexpected ") + to_str(m.header.type) + " message in phase " + to_str(phase_), true);
}

void Child::on_closed(const std::string& why) {
  channel_ = nullptr;
  if (phase_ >= ChildPhase::done) return;
  if (phase_ == ChildPhase::awaiting_tunnels) {
    // The old process is gone without commit or abort: it cannot resume what
    // it handed over, so this process carries on with it.
    spdlog::warn("handoff: the old process went away before committing ({}); starting the {} tunnels it handed over",
                 why, adopted_.size());
    if (abandoning_) server_->resume_accepting();
    for (proxy::Tunnel* t : adopted_) t->start_adopted();
    result_.tunnels = adopted_.size();
    adopted_.clear();
    finish(true, "");
    return;
  }
  result_.old_gone = adopted_.empty();
  give_up(why, false);
}

void Child::abandon(const std::string& why) {
  if (phase_ >= ChildPhase::done || abandoning_) return;
  result_.abandoned = true;
  if (phase_ == ChildPhase::awaiting_server_state) {
    give_up(why, true);
    return;
  }
  abandoning_ = true;
  abandon_why_ = why;
  spdlog::warn("handoff: {}: calling the takeover off; waiting for the old process to take back {} tunnels", why,
               adopted_.size());
  server_->stop_accepting();
  std::vector<uint8_t> msg;
  encode_abort(why, msg);
  channel_->send(std::move(msg));
}

void Child::handle_server_state(Message& m) {
  ServerStateMsg s;
  std::string err = decode_server_state(m.body, s);
  if (!err.empty()) {
    give_up("malformed server state: " + err, true);
    return;
  }
  server_ = make_server_(s.ticket_keys, err);
  if (!server_) {
    give_up(err, true);
    return;
  }
  server_->set_epoch(s.epoch + 1);
  server_->set_metrics(s.metrics);
  base_metrics_ = s.metrics;
  if (s.has_listener && !m.fds.empty()) {
    err = server_->adopt_listener(m.fds[0]);
    m.fds[0] = -1;
  } else {
    err = server_->listen();
  }
  if (!err.empty()) {
    give_up(err, true);
    return;
  }
  phase_ = ChildPhase::awaiting_tunnels;
  std::vector<uint8_t> msg;
  encode_listening(msg);
  channel_->send(std::move(msg));
  test_stop_at("listening");
}

void Child::handle_batch(Message& m) {
  if (result_.batches == 0) test_stop_at("batch");  // the first batch only
  Batch b;
  BatchResult r = decode_batch(m.body, m.fds, b);
  BatchAck ack;
  ack.seq = b.seq;
  if (r.error != BatchError::none) {
    // The old process keeps these and drains them; their fds close with the message.
    spdlog::warn("handoff: refusing batch {}: {}", b.seq, r.message);
    ack.reason = r.message;
  } else {
    for (int& fd : m.fds) fd = -1;  // the states own them now
    result_.batches++;
    size_t taken = 0;
    for (; taken < b.tunnels.size(); ++taken) {
      if (server_->tunnel_count() >= server_->config().limits.max_tunnels) {
        ack.reason = "max_tunnels (" + std::to_string(server_->config().limits.max_tunnels) + ") reached";
        break;
      }
      std::string err;
      proxy::Tunnel* t = server_->adopt(b.tunnels[taken], err);
      if (!t) {
        ack.reason = err;  // adopt() closed its fds
        break;
      }
      adopted_.push_back(t);
    }
    // Tunnels not taken: these fds are copies, the old process keeps its own.
    for (size_t j = taken; j < b.tunnels.size(); ++j) proxy::close_fds(b.tunnels[j]);
    ack.adopted = uint32_t(taken);
  }
  std::vector<uint8_t> msg;
  encode_batch_ack(ack, msg);
  channel_->send(std::move(msg));
  if (result_.batches == 1) test_stop_at("ack");
}

void Child::handle_commit(Message& m) {
  Commit c;
  std::string err = decode_commit(m.body, c);
  if (!err.empty()) spdlog::warn("handoff: malformed commit ({}); taking over anyway", err);
  else server_->metrics().add_delta(c.metrics, base_metrics_);
  if (abandoning_) {
    // Our abort crossed this commit: the tunnels are ours after all, and so
    // is the listener (the caller then drains or stops, as asked).
    spdlog::warn("handoff: the old process committed before it read our abort: taking over after all");
    server_->resume_accepting();
  }
  for (proxy::Tunnel* t : adopted_) t->start_adopted();
  result_.tunnels = adopted_.size();
  server_->metrics().inc(proxy::series("baton_handoff_tunnels_total", {{"result", "received"}}), adopted_.size());
  adopted_.clear();
  finish(true, "");
}

void Child::finish(bool ok, const std::string& error) {
  phase_ = ok ? ChildPhase::done : ChildPhase::failed;
  uv_timer_stop(timer_);
  if (channel_) {
    channel_->close_when_sent();
    channel_ = nullptr;
  }
  result_.ok = ok;
  result_.error = error;
  result_.elapsed_ms = uv_now(loop_) - started_ms_;
  if (done_) done_(result_);
}

void Child::give_up(const std::string& why, bool tell_peer) {
  if (phase_ >= ChildPhase::done) return;
  if (channel_ && tell_peer) {
    std::vector<uint8_t> msg;
    encode_abort(why, msg);
    channel_->send(std::move(msg));
  }
  // The old process still holds every socket handed over: let go quietly.
  for (proxy::Tunnel* t : adopted_) {
    t->abandon();
    delete t;
  }
  adopted_.clear();
  finish(false, why);
}

}  // namespace baton::handoff
