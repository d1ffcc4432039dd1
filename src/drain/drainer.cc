#include "drain/drainer.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "proxy/tunnel.h"

namespace baton::drain {

Drainer::Drainer(uv_loop_t* loop, proxy::Server& server, const config::Drain& settings,
                 std::function<void(const std::string&)> on_done)
    : loop_(loop), server_(server), settings_(settings), on_done_(std::move(on_done)) {
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
}

Drainer::~Drainer() {
  server_.set_on_tunnel_gone(nullptr);  // it names this drainer
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
}

void Drainer::start(const std::string& trigger) {
  if (phase_ != DrainPhase::idle) return;
  started_ms_ = uv_now(loop_);
  phase_ = DrainPhase::notifying;
  server_.set_drain_phase(phase_);
  to_notify_ = server_.serving_tunnels();
  spdlog::info("drain ({}): readiness 503; telling {} tunnels to move over {} ms; accepting for {} ms more; grace {} ms",
               trigger, to_notify_, settings_.spread_ms, settings_.delay_ms, settings_.grace_ms);
  // A tunnel that ends may end the drain: look at once (not from inside the
  // server's bookkeeping: on the next loop iteration).
  server_.set_on_tunnel_gone([this] {
    if (phase_ == DrainPhase::notifying || phase_ == DrainPhase::waiting) uv_timer_start(timer_, tick_cb, 0, 0);
  });
  tick();
}

void Drainer::stop() {
  uv_timer_stop(timer_);
  server_.set_on_tunnel_gone(nullptr);
}

void Drainer::tick_cb(uv_timer_t* t) { static_cast<Drainer*>(t->data)->tick(); }

void Drainer::tick() {
  uint64_t elapsed = uv_now(loop_) - started_ms_;
  uint32_t grace_left = elapsed >= settings_.grace_ms ? 0 : uint32_t(settings_.grace_ms - elapsed);
  if (phase_ == DrainPhase::notifying) {
    // Notices due by now, evenly spread: the k-th of n (from 0) goes at k/n of spread_ms.
    size_t due = settings_.spread_ms == 0 || elapsed >= settings_.spread_ms
                     ? SIZE_MAX
                     : size_t(double(to_notify_) * double(elapsed) / settings_.spread_ms) + 1;
    for (proxy::Tunnel* t : server_.tunnels_to_drain()) {
      if (notified_ >= due) break;
      t->drain("drain", grace_left, settings_.reconnect_hint);
      ++notified_;
    }
    if (server_.tunnels_to_drain().empty()) {
      phase_ = DrainPhase::waiting;
      server_.set_drain_phase(phase_);
      spdlog::info("drain: every tunnel told ({} in {} ms); {} tunnels and {} streams left", notified_, elapsed,
                   server_.tunnel_count(), server_.active_streams());
    }
  }
  if (!listener_closed_ && elapsed >= settings_.delay_ms) {
    listener_closed_ = true;
    server_.stop_accepting();
    server_.release_listener();
    spdlog::info("drain: stopped accepting after {} ms", elapsed);
  }
  if (listener_closed_ && phase_ == DrainPhase::waiting && server_.tunnel_count() == 0) {
    finish("every tunnel closed");
    return;
  }
  if (elapsed >= settings_.grace_ms) {
    finish("grace period over");
    return;
  }
  uv_timer_start(timer_, tick_cb, next_deadline(elapsed) - elapsed, 0);
}

uint64_t Drainer::next_deadline(uint64_t elapsed) const {
  uint64_t next = settings_.grace_ms;
  if (!listener_closed_) next = std::min<uint64_t>(next, settings_.delay_ms);
  if (phase_ == DrainPhase::notifying) {
    // The next notice: the notified_-th goes at notified_/n of spread_ms;
    // tunnels beyond the count at the start get theirs when the spread ends.
    uint64_t at = notified_ < to_notify_
                      ? uint64_t(std::ceil(double(notified_) * settings_.spread_ms / double(to_notify_)))
                      : settings_.spread_ms;
    next = std::min(next, at);
  }
  return std::max(next, elapsed + 1);
}

void Drainer::finish(const std::string& why) {
  if (phase_ == DrainPhase::done) return;
  phase_ = DrainPhase::done;
  server_.set_drain_phase(phase_);
  uv_timer_stop(timer_);
  server_.set_on_tunnel_gone(nullptr);
  spdlog::info("drain done after {} ms: {} ({} tunnels left)", uv_now(loop_) - started_ms_, why, server_.tunnel_count());
  if (on_done_) on_done_(why);
}

}  // namespace baton::drain
