// What one event of a hot restart asks of the I/O around the hand-over
// logic (parent_logic.h, child_logic.h): messages to write, in order, and
// what becomes of the channel afterwards. The logic never touches a socket,
// a timer or a signal; Parent and Child (parent.h, child.h) do what a Step
// says, and unit tests read it.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "handoff/codec.h"

namespace baton::handoff {

constexpr uint64_t kNoDeadline = std::numeric_limits<uint64_t>::max();

struct Outgoing {
  MsgType type{};
  uint32_t seq = 0;            // batches: their sequence number
  std::vector<uint8_t> bytes;  // the whole message, header included
  std::vector<int> fds;        // sent with it; owned elsewhere (the listener, exported tunnel states)
};

enum class CloseChannel : uint8_t {
  no = 0,
  after_send = 1,  // once every queued message is written
  now = 2,         // the peer is gone: nothing more to write
};

struct Step {
  std::vector<Outgoing> send;
  CloseChannel close = CloseChannel::no;
  // Parent: every tunnel is acknowledged. Call on_poll_passed() once the
  // event loop has polled again, so that a signal that came with the last
  // acknowledgement (its handler runs on that poll) can still call the
  // hand-over off before anything is committed.
  bool commit_after_poll = false;
  bool finished = false;  // the hand-over is over (committed, called off, failed): see the logic's result

  void add(MsgType type, std::vector<uint8_t> bytes, std::vector<int> fds = {}, uint32_t seq = 0) {
    send.push_back(Outgoing{type, seq, std::move(bytes), std::move(fds)});
  }
};

}  // namespace baton::handoff
