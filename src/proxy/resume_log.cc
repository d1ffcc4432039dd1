#include "proxy/resume_log.h"

#include <utility>

namespace baton::proxy {

ResumeLog::ResumeLog(State st)
    : keeping_(st.keeping), sent_(st.sent), received_(st.received), reported_(st.reported), kept_(std::move(st.kept)) {}

ResumeLog::State ResumeLog::take_state() {
  State st;
  st.keeping = keeping_;
  st.sent = sent_;
  st.received = received_;
  st.reported = reported_;
  st.kept = std::move(kept_);
  kept_.clear();
  return st;
}

ResumeLog::Ack ResumeLog::acknowledge(uint64_t offset) {
  if (offset > sent_) return Ack::beyond_sent;
  const uint64_t acked_now = acked();
  if (offset <= acked_now) return offset < acked_now ? Ack::stale : Ack::ok;
  kept_.pop(size_t(offset - acked_now));
  return Ack::ok;
}

bool ResumeLog::replay_from(uint64_t offset, util::ByteQueue& out) {
  if (offset < acked() || offset > sent_) return false;
  kept_.pop(size_t(offset - acked()));
  out.append(kept_);
  return true;
}

}  // namespace baton::proxy
