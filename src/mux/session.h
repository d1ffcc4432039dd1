// A sans-IO yamux session (docs/protocol.md section 2 and hashicorp/yamux framing).
//
// The session owns no socket and no timer. Plaintext yamux bytes from the peer
// go in through consume(); bytes for the peer accumulate in output(), which the
// owner seals into TLS records and writes. Events are reported synchronously
// through SessionHandler while consume() or another call runs.
//
// All state lives in one plain struct, SessionState, so that a session can be
// exported mid-stream (state()) and rebuilt in another process (the
// constructor taking a SessionState); the rebuilt session behaves exactly like
// the original from the next byte on.
//
// Flow control: every stream starts with kInitialWindow credit each way.
// Received Data is kept in the stream's inbound queue (bounded by the receive
// window the session granted) until the owner calls consumed(); credit is
// returned to the peer with a Window Update once at least half the window has
// been consumed (as hashicorp/yamux does). write() never queues more than the
// peer's send window allows, so output() is bounded by the sum of the send
// windows; the owner bounds that further by not writing while output() is large.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "mux/frame.h"
#include "util/byte_queue.h"

namespace baton::mux {

enum class Role : uint8_t { client = 0, server = 1 };

struct SessionLimits {
  uint32_t max_streams = 1024;          // streams open at once; a SYN beyond it is answered with RST
  uint32_t max_frame_data = 16 * 1024;  // largest Data body this side sends
  uint32_t max_pending_pings = 16;      // unanswered pings we keep track of
  uint32_t max_ping_replies = 64;       // queued Ping ACKs; a flood beyond it is a protocol error
  // Peer stream ids remembered individually as spent while a lower id of the
  // peer's parity is still unused (SYNs may arrive out of id order, see
  // SessionState::remote_ids_ahead). Beyond it the lowest unused ids are given
  // up (treated as spent), so "never used" costs at most 4 bytes per entry.
  uint32_t max_ids_ahead = 1024;
};

// What each stream is waiting for, named for what is awaited (ARCHITECTURE principle 3).
enum class StreamPhase : uint8_t {
  awaiting_ack = 0,     // we sent SYN, the peer has not ACKed yet (data may flow already)
  awaiting_accept = 1,  // the peer sent SYN, the owner has not called accept() yet
  open = 2,             // both directions may carry data
};
const char* to_str(StreamPhase p);

struct StreamState {
  uint32_t id = 0;
  StreamPhase phase = StreamPhase::open;
  bool local_fin = false;     // we sent FIN: no more write()
  bool remote_fin = false;    // peer sent FIN: inbound ends after the queued bytes
  uint32_t send_window = kInitialWindow;   // bytes we may still send
  uint32_t recv_window = kInitialWindow;   // bytes the peer may still send (credit not yet used)
  uint32_t recv_window_max = kInitialWindow;  // the window size we grant
  uint32_t unacked_credit = 0;  // consumed bytes not yet returned in a Window Update
  util::ByteQueue inbound;      // received, not yet consumed by the owner
};

struct PendingPing {
  uint32_t value = 0;
  uint64_t sent_at_ms = 0;  // owner-supplied time, for RTT and heartbeat deadlines
};

struct SessionState {
  Role role = Role::server;
  uint32_t next_local_id = 0;      // next id we open (client: 1,3,5.. server: 2,4,6..)
  // Peer stream ids already spent (opened, refused, or given up): every id
  // of the peer's parity below remote_next_id, and the ids in
  // remote_ids_ahead (sorted, all above remote_next_id). A SYN may carry any
  // other id of the peer's parity: yamux never reuses an id but does not
  // require increasing order (hashicorp/yamux sends each SYN from the
  // goroutine that opened the stream). 64 bits: past 0xFFFFFFFF nothing is left.
  uint64_t remote_next_id = 1;
  std::vector<uint32_t> remote_ids_ahead;
  bool go_away_sent = false;
  bool go_away_received = false;
  bool failed = false;  // a fatal protocol error happened; the session is dead
  GoAwayCode go_away_code = GoAwayCode::normal;  // the code received (or sent when failed)
  uint32_t ping_replies_queued = 0;
  // Partially received frame: the header bytes and the part of a Data body
  // received so far for a frame whose body has not fully arrived. Once it
  // holds 12 bytes, they are a header that passed validation. One special
  // form: while the body of a discarded Data frame (unknown or reset stream,
  // refused SYN) is being skipped, it holds exactly one header
  // `Data, flags 0, stream 0, length = bytes still to skip` (a header the
  // peer can never send, since Data on stream 0 is a protocol error), so a
  // large discarded body is never buffered.
  util::ByteQueue partial_input;
  util::ByteQueue output;  // encoded frames for the peer, not yet taken by the owner
  std::map<uint32_t, StreamState> streams;
  std::vector<PendingPing> pings;  // pings we sent and have not seen answered
};

// Callbacks run synchronously inside consume() (or inside consumed() /
// close_write() for on_stream_closed). They may call any Session method except
// consume(), including reset() or consumed() on the very stream they are told
// about; the session looks streams up again after every callback.
class SessionHandler {
 public:
  virtual ~SessionHandler() = default;
  // The peer opened stream `id` (SYN). The owner must call accept(id) or reset(id),
  // now or later; data that arrives meanwhile is queued (within the window).
  virtual void on_stream_opened(uint32_t id) = 0;
  // New inbound bytes are queued on the stream (see read()/consumed()).
  virtual void on_stream_data(uint32_t id) = 0;
  // The peer half-closed: after the queued inbound bytes, no more will come.
  virtual void on_stream_fin(uint32_t id) = 0;
  // The peer reset the stream (RST), or the session reset it because the peer
  // broke the stream's rules (Data after its FIN; an RST was queued). The stream
  // is already erased when this is called. A SYN refused because of Go Away or
  // max_streams never becomes a stream and fires nothing.
  virtual void on_stream_reset(uint32_t id) = 0;
  // The stream's send window grew from 0 (or its ACK arrived): write() may accept bytes again.
  virtual void on_stream_writable(uint32_t id) = 0;
  // Both directions finished (FIN sent and received, inbound drained by consumed()):
  // the stream is erased after this returns.
  virtual void on_stream_closed(uint32_t id) = 0;
  virtual void on_ping_answered(uint32_t value, uint64_t sent_at_ms) { (void)value; (void)sent_at_ms; }
  // A SYN was answered with RST by the session itself: after Go Away
  // (after_go_away) or beyond max_streams. No stream ever existed.
  virtual void on_stream_refused(uint32_t id, bool after_go_away) { (void)id; (void)after_go_away; }
  virtual void on_go_away(GoAwayCode code) { (void)code; }
  // More than max_ids_ahead peer ids were spent out of order: `n` unused
  // lower ids were given up (a later SYN for one of them is a reuse).
  virtual void on_ids_given_up(uint32_t n) { (void)n; }
};

// What consume() found.
enum class ConsumeStatus : uint8_t {
  ok = 0,              // all input processed (a partial frame is kept in state)
  protocol_error = 1,  // Go Away(1) is queued in output(); the owner flushes it and closes the tunnel
  already_failed = 2,  // the session failed earlier; input ignored
};

const char* to_str(ConsumeStatus s);

struct ConsumeResult {
  ConsumeStatus status = ConsumeStatus::ok;
  const char* error = nullptr;  // static text naming the violation when status == protocol_error
};

class Session {
 public:
  Session(Role role, SessionHandler& handler, SessionLimits limits = {});
  // Rebuilds a session from exported state. `state` must come from state() of
  // a session with the same role (the handoff codec validates before this).
  Session(SessionState state, SessionHandler& handler, SessionLimits limits = {});

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Feeds plaintext from the peer. Handles every complete frame; keeps a partial
  // one (never more than a header for a body that is being discarded). `in`
  // must stay valid and unchanged until the call returns, callbacks included.
  [[nodiscard]] ConsumeResult consume(std::span<const uint8_t> in);

  // Bytes to send to the peer. The owner pops what it has taken.
  util::ByteQueue& output() { return st_.output; }
  const util::ByteQueue& output() const { return st_.output; }

  // Opens a stream (SYN via Window Update). Returns its id, or 0 if the session
  // has sent or received Go Away, failed, or is at max_streams.
  [[nodiscard]] uint32_t open();
  // Accepts a stream the peer opened (ACK). No-op unless awaiting_accept.
  void accept(uint32_t id);
  // Queues up to data.size() bytes as Data frames, limited by the send window.
  // Returns how many bytes were taken (0 if the window is empty, the stream is
  // unknown, or we already sent FIN). A stream awaiting_accept is accepted first.
  [[nodiscard]] size_t write(uint32_t id, std::span<const uint8_t> data);
  // Sends FIN (half-close). No-op if already sent or the stream is unknown.
  void close_write(uint32_t id);
  // Sends RST and erases the stream (no on_stream_reset for a local reset).
  void reset(uint32_t id);

  // Inbound bytes of a stream, in order, without dropping them. Empty if none or
  // unknown; never null (an unknown stream gets a shared empty queue).
  const util::ByteQueue* inbound(uint32_t id) const;
  // Drops n inbound bytes (n <= inbound size) and returns window credit to the
  // peer once enough has accumulated. May fire on_stream_closed.
  void consumed(uint32_t id, size_t n);
  // Moves a stream's queued inbound bytes out (the session is going away and
  // the owner delivers them on its own). The chunks keep their addresses.
  util::ByteQueue take_inbound(uint32_t id) {
    auto it = st_.streams.find(id);
    return it == st_.streams.end() ? util::ByteQueue{} : std::move(it->second.inbound);
  }
  // Grants the peer a bigger receive window for this stream (sends the difference).
  void set_recv_window(uint32_t id, uint32_t window);

  // Sends Ping(SYN) with `value`, recording now_ms. False if max_pending_pings are outstanding.
  bool ping(uint32_t value, uint64_t now_ms);
  // Sends Go Away with the code. Afterwards open() fails and peer SYNs are reset.
  void go_away(GoAwayCode code);

  bool has_stream(uint32_t id) const { return st_.streams.count(id) != 0; }
  // True while a stream we opened has not been ACKed by the peer.
  bool awaiting_ack(uint32_t id) const {
    auto it = st_.streams.find(id);
    return it != st_.streams.end() && it->second.phase == StreamPhase::awaiting_ack;
  }
  uint32_t send_window(uint32_t id) const;
  size_t stream_count() const { return st_.streams.size(); }
  bool failed() const { return st_.failed; }
  bool go_away_received() const { return st_.go_away_received; }
  bool go_away_sent() const { return st_.go_away_sent; }
  // True if the peer may still open stream `id` (right parity, never spent).
  bool remote_id_unused(uint32_t id) const;
  const std::vector<PendingPing>& pending_pings() const { return st_.pings; }

  // The whole state, for handoff and tests.
  const SessionState& state() const { return st_; }
  // Moves the state out for handoff; the session must not be used afterwards.
  SessionState take_state() { return std::move(st_); }

 private:
  enum class DataVerdict : uint8_t { deliver, discard, error };

  StreamState* find(uint32_t id);
  void emit(FrameType type, uint16_t flags, uint32_t id, uint32_t length);
  ConsumeResult fail(const char* why);
  const char* check_header(const FrameHeader& h) const;
  const char* check_syn(uint32_t id) const;
  bool refuse_syn(uint32_t id);
  void spend_remote_id(uint32_t id);
  StreamState& create_remote_stream(uint32_t id);
  DataVerdict classify_data(const FrameHeader& h, const char*& error);
  void deliver_data(const FrameHeader& h, std::span<const uint8_t> direct, util::ByteQueue& queued);
  void skip_body(uint32_t remaining, std::span<const uint8_t>& in);
  const char* handle_window_update(const FrameHeader& h);
  const char* handle_ping(const FrameHeader& h);
  void handle_go_away(const FrameHeader& h);
  void remote_reset(uint32_t id);
  void remote_fin(uint32_t id);
  void maybe_close(uint32_t id);

  SessionState st_;
  SessionHandler& handler_;
  SessionLimits limits_;
};

}  // namespace baton::mux
