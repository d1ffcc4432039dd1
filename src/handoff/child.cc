#include "handoff/child.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include "handoff/test_hook.h"
#include "proxy/tunnel.h"

namespace baton::handoff {

// ChildHost over the server it builds (child_logic.h).
class ServerChildHost final : public ChildHost {
 public:
  explicit ServerChildHost(Child::MakeServer make) : make_(std::move(make)) {}
  ~ServerChildHost() override { let_go_adopted(); }

  std::string build(const ServerStateMsg& s, int listener_fd) override {
    std::string err;
    server_ = make_(s.ticket_keys, err);
    if (!server_) {
      if (listener_fd >= 0) ::close(listener_fd);
      return err;
    }
    server_->set_epoch(s.epoch + 1);
    server_->set_metrics(s.metrics);
    return listener_fd >= 0 ? server_->adopt_listener(listener_fd) : server_->listen();
  }
  void stop_accepting() override { server_->stop_accepting(); }
  void resume_accepting() override { server_->resume_accepting(); }
  size_t room() const override {
    size_t max = max_tunnels(), n = server_->tunnel_count();
    return n >= max ? 0 : max - n;
  }
  size_t max_tunnels() const override { return server_->config().limits.max_tunnels; }
  std::string adopt(proxy::TunnelState& st) override {
    std::string err;
    proxy::Tunnel* t = server_->adopt(st, err);
    if (t) adopted_.push_back(t);
    return t ? "" : err;
  }
  void start_adopted() override {
    for (proxy::Tunnel* t : adopted_) t->start_adopted();
    adopted_.clear();
  }
  void let_go_adopted() override {
    for (proxy::Tunnel* t : adopted_) {
      t->abandon();
      delete t;
    }
    adopted_.clear();
  }
  proxy::Metrics& metrics() override { return server_->metrics(); }

  std::unique_ptr<proxy::Server> take_server() { return std::move(server_); }

 private:
  Child::MakeServer make_;
  std::unique_ptr<proxy::Server> server_;
  std::vector<proxy::Tunnel*> adopted_;  // not started until commit
};

Child::Child(uv_loop_t* loop, int fd, uint32_t timeout_ms, MakeServer make_server,
             std::function<void(const ChildResult&)> done)
    : loop_(loop), done_(std::move(done)) {
  host_ = std::make_unique<ServerChildHost>(std::move(make_server));
  logic_ = std::make_unique<ChildLogic>(*host_, timeout_ms, uint32_t(getpid()), uint32_t(getuid()));
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  channel_ = Channel::create(loop_, fd, [this](Message& m) { on_message(m); },
                             [this](const std::string& why) {
                               channel_ = nullptr;
                               apply(logic_->on_closed(why, uv_now(loop_)));
                             });
  uint32_t uid = 0;
  int pid = 0;
  bool known = channel_->peer_uid(uid, pid);
  apply(logic_->start(known, uid, uint32_t(pid), uv_now(loop_)));
  if (logic_->phase() == ChildPhase::awaiting_server_state) test_point(TestPoint::child_hello);
}

Child::~Child() {
  if (channel_) channel_->close();
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
}

std::unique_ptr<proxy::Server> Child::take_server() { return host_->take_server(); }

void Child::on_message(Message& m) {
  if (m.header.type == MsgType::batch && logic_->phase() == ChildPhase::awaiting_tunnels &&
      logic_->result().batches == 0)
    test_point(TestPoint::child_batch);  // the first batch only, before it is handled
  apply(logic_->on_message(m.header, m.body, m.fds, uv_now(loop_)));
}

void Child::apply(Step s) {
  for (Outgoing& o : s.send) {
    if (!channel_) break;
    channel_->send(std::move(o.bytes), std::move(o.fds));
    if (o.type == MsgType::listening) test_point(TestPoint::child_listening);
    if (o.type == MsgType::batch_ack && logic_->result().batches == 1) test_point(TestPoint::child_ack);
  }
  if (channel_ && s.close != CloseChannel::no) {
    if (s.close == CloseChannel::after_send) channel_->close_when_sent();
    else channel_->close();
    channel_ = nullptr;
  }
  rearm();
  if (s.finished && done_) done_(logic_->result());
}

void Child::rearm() {
  uint64_t d = logic_->next_deadline();
  if (d == kNoDeadline) {
    uv_timer_stop(timer_);
    return;
  }
  uint64_t now = uv_now(loop_);
  uv_timer_start(timer_, timer_cb, d > now ? d - now : 0, 0);
}

void Child::timer_cb(uv_timer_t* t) {
  auto* c = static_cast<Child*>(t->data);
  c->apply(c->logic_->on_deadline(uv_now(c->loop_)));
}

void Child::abandon(const std::string& why) { apply(logic_->abandon(why, uv_now(loop_))); }

}  // namespace baton::handoff
