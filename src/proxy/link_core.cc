#include "proxy/link_core.h"

#include <algorithm>

namespace baton::proxy {

namespace {

mux::SessionLimits session_limits(uint32_t max_data_streams) {
  mux::SessionLimits sl;
  // max_streams counts data streams; the control stream comes on top.
  sl.max_streams = max_data_streams + 1;
  return sl;
}

}  // namespace

LinkCore::LinkCore(mux::Role role, mux::SessionHandler& handler, uint32_t max_data_streams, uint64_t now)
    : role_(role), handler_(&handler), max_data_streams_(max_data_streams), started_ms_(now), last_rx_ms_(now) {}

LinkCore::LinkCore(TunnelState& st, mux::SessionHandler& handler, uint32_t max_data_streams, uint64_t now)
    : role_(st.session.role), handler_(&handler), max_data_streams_(max_data_streams) {
  started_ms_ = now > st.age_ms ? now - st.age_ms : 0;
  last_rx_ms_ = now > st.idle_ms ? now - st.idle_ms : 0;
  peer_info_ = st.peer_info;
  counters_ = st.counters;
  phase_ = st.phase;
  // A detached session has no connection, so no record layer.
  if (phase_ != LinkPhase::detached) record_ = std::make_unique<tls::RecordLayer>(std::move(st.record));
  session_ = std::make_unique<mux::Session>(std::move(st.session), *handler_, session_limits(max_data_streams_));
  resume_ = ResumeLog(std::move(st.resume.log));
}

void LinkCore::secure(tls::RecordState record, const tls::PeerInfo& peer) {
  peer_info_ = peer;
  record_ = std::make_unique<tls::RecordLayer>(std::move(record));
  session_ = std::make_unique<mux::Session>(role_, *handler_, session_limits(max_data_streams_));
  phase_ = LinkPhase::awaiting_hello;
}

InputResult LinkCore::input(std::span<const uint8_t> data, std::span<uint8_t> scratch) {
  while (phase_ == LinkPhase::awaiting_hello || phase_ == LinkPhase::serving) {
    if (held_) {
      record_->keep_input(data);
      break;
    }
    tls::Opened o = record_->open(data, scratch);
    data = data.subspan(o.used);
    if (o.status == tls::OpenStatus::data) {
      if (o.plaintext.empty()) continue;
      resume_.received_bytes(o.plaintext.size());
      mux::ConsumeResult r = session_->consume(o.plaintext);
      if (r.status != mux::ConsumeStatus::ok) return {InputStatus::protocol_error, r.error ? r.error : "?"};
      continue;
    }
    if (o.status == tls::OpenStatus::need_more) break;
    if (o.status == tls::OpenStatus::closed) return {InputStatus::closed, "close_notify"};
    if (o.send_alert) record_->seal_alert(o.alert, !o.alert_warning);
    return {InputStatus::tls_error, o.reason};
  }
  return {};
}

void LinkCore::seal() {
  if (!record_ || !session_) return;
  util::ByteQueue& so = session_->output();
  if (record_->state().close_notify_sent) {
    so.clear();
    return;
  }
  resume_.sent_bytes(so);
  record_->seal_from(so);
}

void LinkCore::detach() {
  record_.reset();
  phase_ = LinkPhase::detached;
}

bool LinkCore::attach(std::unique_ptr<tls::RecordLayer> record, uint64_t peer_received) {
  util::ByteQueue again;
  if (!resume_.replay_from(peer_received, again)) return false;
  record_ = std::move(record);
  if (!again.empty()) record_->seal_from(again);
  phase_ = LinkPhase::serving;
  return true;
}

void LinkCore::export_into(TunnelState& out, size_t written, uint64_t now) {
  // Frames the session queued become records now, so only two queues travel
  // (while detached they wait in the session for the resume).
  if (record_) {
    seal();
    record_->output().pop(written);
    counters_.bytes_out += written;
    out.record = record_->take_state();
  }
  out.phase = phase_;
  out.session = session_->take_state();
  out.resume.log = resume_.take_state();
  out.peer_info = peer_info_;
  out.counters = counters_;
  out.idle_ms = now - std::min(now, last_rx_ms_);
  out.age_ms = now - std::min(now, started_ms_);
  record_.reset();
  session_.reset();
  phase_ = LinkPhase::closed;
}

}  // namespace baton::proxy
