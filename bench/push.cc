// bench_push: a pre-sealed tunnel client, standing in for a client on another
// machine so that the sidecar under test (`baton serve`) is the only process
// doing crypto for the transfer.
//
//   BATON_TOKEN=... bench_push --server HOST:PORT --ca FILE --server-name NAME
//                              --route sink --bytes N [--client-id ID] [--timeout-s 30]
//                              [--proto baton|tls] [--suite NAME] [--group x25519|p256]
//
// --proto tls (bench/peers.py, for HAProxy, stunnel and nginx in front of the
// sink): plain TLS, no yamux and no HELLO; the records carry the sink
// protocol directly and there is no window to respect. --suite and --group
// narrow what the client offers (bench/client_context.h).
//
// It does the TLS 1.2 handshake with the project's own tls::Handshake, moves
// the keys into a tls::RecordLayer, sends HELLO on the control stream and
// waits for WELCOME (docs/protocol.md 1-3). Then, before the clock starts, it
// builds the whole transfer in memory: stream 3's SYN, the route preamble,
// the sink protocol's u64 N and N bytes (bench/upstream.cc), as yamux Data
// frames, one frame per TLS record of up to 16 KiB plaintext, every record
// sealed. The timed part only writes that buffer to the socket, never more
// stream data than the yamux send window allows (whole records only), reads
// the server's records (Window Updates, Pings) and stops when the sink's
// 'K' + u64 nanoseconds arrives on the stream, i.e. when the sink has all N
// bytes. Ping answers are deferred until the pre-sealed buffer is written
// (its records hold the sequence numbers before theirs).
//
// stdout: {"bytes":N,"seconds":S,"mib_s":X,"sink_mib_s":Y,"cpu_seconds":C,
//          "suite":"...","records":R,"wire_bytes":W,"seal_seconds":P,"seal_cpu_seconds":Q}
// where S runs from the first byte written to the acknowledgement, Y is the
// sink's own rate, C the CPU time of this process during S only, and P/Q the
// wall and CPU time of building the buffer. Every wait has a timeout: a
// stalled path fails the run (exit 1) instead of hanging it.
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "client_context.h"
#include "control.h"
#include "mux/control.h"
#include "mux/frame.h"
#include "tls/context.h"
#include "tls/handshake.h"
#include "tls/record.h"
#include "util/byte_queue.h"
#include "util/bytes.h"

namespace {

using namespace baton;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kControlStream = 1;
constexpr uint32_t kDataStream = 3;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench_push: %s\n", what.c_str());
  std::exit(1);
}

uint64_t parse_size(const char* s) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  std::string suf = end ? end : "";
  if (suf == "K" || suf == "KiB") v *= 1024.0;
  else if (suf == "M" || suf == "MiB") v *= 1024.0 * 1024.0;
  else if (suf == "G" || suf == "GiB") v *= 1024.0 * 1024.0 * 1024.0;
  else if (!suf.empty()) die(std::string("bad size ") + s);
  return uint64_t(v);
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

int dial(const std::string& hostport, int timeout_s) {
  size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) die("bad address " + hostport + " (HOST:PORT)");
  std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int e = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); e != 0)
    die("resolve " + hostport + ": " + gai_strerror(e));
  int fd = socket(res->ai_family, SOCK_STREAM, 0);
  if (fd < 0) die(std::string("socket: ") + std::strerror(errno));
  timeval tv{timeout_s, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) die("connect " + hostport + ": " + std::strerror(errno));
  freeaddrinfo(res);
  return fd;
}

void append_header(std::vector<uint8_t>& out, mux::FrameType type, uint16_t flags, uint32_t id, uint32_t length) {
  uint8_t h[mux::kHeaderSize];
  mux::encode_header(mux::FrameHeader{mux::kVersion, uint8_t(type), flags, id, length}, h);
  out.insert(out.end(), h, h + sizeof h);
}

class Push {
 public:
  // plain_tls: the sink protocol directly in TLS records (no yamux, no HELLO).
  Push(int fd, int timeout_s, bool plain_tls)
      : fd_(fd), timeout_s_(timeout_s), plain_(plain_tls), credit_(plain_tls ? UINT64_MAX : mux::kInitialWindow) {}

  void handshake(tls::Context& ctx, const std::string& server_name) {
    tls::Handshake hs(ctx, server_name);
    for (;;) {
      tls::HandshakeStatus st = hs.step();
      flush(hs.output());
      if (st == tls::HandshakeStatus::failed) die("TLS handshake: " + hs.error());
      if (st == tls::HandshakeStatus::done) break;
      hs.feed(read_blocking("TLS handshake"));
    }
    suite_ = hs.peer().suite_name;
    rl_ = std::make_unique<tls::RecordLayer>(hs.finish());
    flush(rl_->output());
    take_input({});  // records that arrived right behind the server's Finished
  }

  // HELLO on the control stream (its SYN in the same record), then WELCOME.
  void hello(const std::string& token, const std::string& client_id) {
    std::vector<uint8_t> msg = bench::hello_message(token, client_id), pt;
    append_header(pt, mux::FrameType::window_update, mux::flag::syn, kControlStream, 0);
    append_header(pt, mux::FrameType::data, 0, kControlStream, uint32_t(msg.size()));
    pt.insert(pt.end(), msg.begin(), msg.end());
    rl_->seal(pt);
    flush(rl_->output());
    while (!welcomed_) take_input(read_blocking("waiting for WELCOME"));
  }

  // Seals the whole transfer into wire_: stream 3's SYN, the preamble, u64 N
  // and N bytes, one Data frame per record (plain TLS: u64 N and N bytes).
  void build(const std::string& route, uint64_t n) {
    std::vector<uint8_t> prefix;
    if (!plain_) mux::encode_preamble(route, prefix);
    uint8_t len[8];
    util::store_u64(len, n);
    prefix.insert(prefix.end(), len, len + 8);
    // The body pattern (as bench_load's: nothing compresses) repeats every 256
    // bytes, so any run of it starts somewhere in the first 256.
    std::vector<uint8_t> pattern(tls::kMaxPlaintext + 256);
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = uint8_t(i * 131 + 7);

    const size_t frame_header = plain_ ? 0 : mux::kHeaderSize;
    const size_t per_record = tls::kMaxPlaintext - frame_header;
    const uint64_t records = (prefix.size() + frame_header + n + per_record - 1) / per_record;
    wire_.reserve(size_t(records) * (tls::kMaxPlaintext + tls::kMaxOverhead));
    records_.reserve(size_t(records));
    std::vector<uint8_t> pt;
    pt.reserve(tls::kMaxPlaintext);
    uint64_t body_done = 0, data_done = 0;
    bool first = true;
    while (first || body_done < n) {
      pt.clear();
      if (first && !plain_) append_header(pt, mux::FrameType::window_update, mux::flag::syn, kDataStream, 0);
      const size_t head = first ? prefix.size() : 0;
      const size_t room = tls::kMaxPlaintext - pt.size() - frame_header - head;
      const size_t body = size_t(std::min<uint64_t>(room, n - body_done));
      if (!plain_) append_header(pt, mux::FrameType::data, 0, kDataStream, uint32_t(head + body));
      pt.insert(pt.end(), prefix.begin(), prefix.begin() + long(head));
      const uint8_t* src = pattern.data() + body_done % 256;
      pt.insert(pt.end(), src, src + body);
      rl_->seal_record(tls::ContentType::application_data, pt);
      util::ByteQueue& q = rl_->output();
      while (!q.empty()) {
        std::span<const uint8_t> f = q.front();
        wire_.insert(wire_.end(), f.begin(), f.end());
        q.pop(f.size());
      }
      body_done += body;
      data_done += head + body;
      records_.push_back({wire_.size(), data_done});
      first = false;
    }
    if (body_done != n || data_done != prefix.size() + n) die("internal error: the built stream has the wrong size");
  }

  // The timed part. Returns the seconds from the first byte to the sink's 'K'.
  double transfer() {
    size_t written = 0, allowed = 0, next = 0;
    const auto t0 = Clock::now();
    while (!acked_) {
      while (next < records_.size() && records_[next].data_end <= credit_) allowed = records_[next++].wire_end;
      if (written == wire_.size() && !pings_.empty()) answer_pings();
      pollfd p{fd_, short(POLLIN | (written < allowed ? POLLOUT : 0)), 0};
      int r = poll(&p, 1, timeout_s_ * 1000);
      if (r < 0) {
        if (errno == EINTR) continue;
        die(std::string("poll: ") + std::strerror(errno));
      }
      if (r == 0)
        die("stalled for " + std::to_string(timeout_s_) + " s: wrote " + std::to_string(written) + " of " +
            std::to_string(wire_.size()) + " bytes, stream window allows " + std::to_string(allowed));
      if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t k = recv(fd_, buf_.data(), buf_.size(), MSG_DONTWAIT);
        if (k == 0) die("server closed the connection during the transfer");
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
          die(std::string("read: ") + std::strerror(errno));
        if (k > 0) take_input({buf_.data(), size_t(k)});
      }
      if (!acked_ && (p.revents & POLLOUT) && written < allowed) {
        ssize_t k = send(fd_, wire_.data() + written, allowed - written, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
          die(std::string("write: ") + std::strerror(errno));
        if (k > 0) written += size_t(k);
      }
    }
    const double s = std::chrono::duration<double>(t_ack_ - t0).count();
    if (written != wire_.size()) die("the sink acknowledged before every byte was written");
    return s;
  }

  // Half-closes the stream, sends close_notify and waits briefly for the server to close.
  void finish() {
    if (!plain_) {
      std::vector<uint8_t> pt;
      append_header(pt, mux::FrameType::window_update, mux::flag::fin, kDataStream, 0);
      if (!pings_.empty()) answer_pings();
      rl_->seal(pt);
    }
    rl_->seal_alert(tls::alert::close_notify, false);
    flush(rl_->output());
    shutdown(fd_, SHUT_WR);
    timeval tv{2, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while (recv(fd_, buf_.data(), buf_.size(), 0) > 0) {
    }
    ::close(fd_);
  }

  const std::string& suite() const { return suite_; }
  uint64_t sink_ns() const { return sink_ns_; }
  size_t records() const { return records_.size(); }
  size_t wire_bytes() const { return wire_.size(); }

 private:
  struct Record {
    size_t wire_end;    // end of this record in wire_
    uint64_t data_end;  // stream bytes (preamble included) up to the end of its frame
  };

  void write_all(std::span<const uint8_t> b) {
    while (!b.empty()) {
      ssize_t w = send(fd_, b.data(), b.size(), MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        die(errno == EAGAIN ? "write timed out (path stalled)" : std::string("write: ") + std::strerror(errno));
      }
      b = b.subspan(size_t(w));
    }
  }

  void flush(util::ByteQueue& q) {
    while (!q.empty()) {
      std::span<const uint8_t> f = q.front();
      write_all(f);
      q.pop(f.size());
    }
  }

  std::span<const uint8_t> read_blocking(const char* what) {
    for (;;) {
      ssize_t r = recv(fd_, buf_.data(), buf_.size(), 0);
      if (r > 0) return {buf_.data(), size_t(r)};
      if (r == 0) die(std::string(what) + ": server closed the connection");
      if (errno == EINTR) continue;
      die(std::string(what) + ": " + (errno == EAGAIN ? "read timed out" : std::strerror(errno)));
    }
  }

  // Opens every whole record in `in` (after what is buffered) and handles its frames.
  void take_input(std::span<const uint8_t> in) {
    for (;;) {
      tls::Opened op = rl_->open(in, scratch_);
      in = in.subspan(op.used);
      if (op.status == tls::OpenStatus::need_more) return;
      if (op.status == tls::OpenStatus::closed) die("server sent close_notify");
      if (op.status == tls::OpenStatus::fatal) die(std::string("TLS record from server: ") + op.reason);
      if (plain_) {
        reply(op.plaintext.data(), op.plaintext.size());
        continue;
      }
      rx_.insert(rx_.end(), op.plaintext.begin(), op.plaintext.end());
      frames();  // before the next record: a REJECT says more than the close that follows it
    }
  }

  void frames() {
    size_t off = 0;
    while (rx_.size() - off >= mux::kHeaderSize) {
      mux::FrameHeader h = mux::decode_header({rx_.data() + off, mux::kHeaderSize});
      if (h.version != mux::kVersion) die("yamux frame of version " + std::to_string(h.version));
      size_t body = h.type == uint8_t(mux::FrameType::data) ? h.length : 0;
      if (rx_.size() - off < mux::kHeaderSize + body) break;
      const uint8_t* b = rx_.data() + off + mux::kHeaderSize;
      off += mux::kHeaderSize + body;
      const bool stream_frame =
          h.type == uint8_t(mux::FrameType::data) || h.type == uint8_t(mux::FrameType::window_update);
      if (stream_frame && h.stream_id == kDataStream) {
        if (h.flags & mux::flag::rst) die("the server reset the data stream (unknown route or upstream refused?)");
        if (h.type == uint8_t(mux::FrameType::window_update)) credit_ += h.length;
        else reply(b, body);
      } else if (h.type == uint8_t(mux::FrameType::data) && h.stream_id == kControlStream) {
        control_.insert(control_.end(), b, b + body);
        control();
      } else if (h.type == uint8_t(mux::FrameType::ping)) {
        if (h.flags & mux::flag::syn) pings_.push_back(h.length);
      } else if (h.type == uint8_t(mux::FrameType::go_away)) {
        if (!acked_) die("server sent Go Away with code " + std::to_string(h.length));
      } else if (stream_frame && h.stream_id == kControlStream && (h.flags & mux::flag::rst)) {
        die("the server reset the control stream");
      }
    }
    rx_.erase(rx_.begin(), rx_.begin() + long(off));
  }

  void control() {
    for (;;) {
      mux::ControlMessage m;
      mux::DecodeResult r = mux::decode(control_, m);
      if (r.status == mux::DecodeStatus::need_more) return;
      if (r.status == mux::DecodeStatus::malformed)
        die(std::string("malformed control message: ") + (r.error ? r.error : "?"));
      control_.erase(control_.begin(), control_.begin() + long(r.used));
      if (m.welcome) welcomed_ = true;
      if (m.reject) die("REJECT code " + std::to_string(m.reject->code) + ": " + m.reject->reason);
      if (m.drain && !acked_) die("server sent DRAIN: " + m.drain->reason);
    }
  }

  void reply(const uint8_t* b, size_t n) {
    reply_.insert(reply_.end(), b, b + n);
    if (acked_ || reply_.size() < 9) return;
    t_ack_ = Clock::now();
    if (reply_[0] != 'K') die("bad acknowledgement from the sink");
    sink_ns_ = util::load_u64(&reply_[1]);
    acked_ = true;
  }

  // Ping ACKs go out only behind the pre-sealed records (sequence numbers).
  void answer_pings() {
    std::vector<uint8_t> pt;
    for (uint32_t v : pings_) append_header(pt, mux::FrameType::ping, mux::flag::ack, 0, v);
    pings_.clear();
    rl_->seal(pt);
    flush(rl_->output());
  }

  int fd_;
  int timeout_s_;
  bool plain_;
  std::string suite_;
  std::unique_ptr<tls::RecordLayer> rl_;
  std::array<uint8_t, 64 * 1024> buf_{};
  std::vector<uint8_t> scratch_ = std::vector<uint8_t>(tls::kScratchSize);
  std::vector<uint8_t> rx_;       // plaintext yamux bytes not yet parsed
  std::vector<uint8_t> control_;  // control stream bytes not yet decoded
  std::vector<uint8_t> reply_;    // what the sink sent back on the data stream
  std::vector<uint32_t> pings_;   // Ping values to answer
  bool welcomed_ = false;
  bool acked_ = false;
  uint64_t credit_;  // stream bytes the server allows in total so far (plain TLS: no limit)
  uint64_t sink_ns_ = 0;
  Clock::time_point t_ack_;
  std::vector<uint8_t> wire_;  // the sealed transfer
  std::vector<Record> records_;
};

void usage() {
  std::fprintf(stderr,
               "usage: BATON_TOKEN=... bench_push --server HOST:PORT --ca FILE [--server-name localhost]\n"
               "                  [--route sink] [--bytes 512MiB] [--client-id bench-push] [--timeout-s 30]\n"
               "                  [--proto baton|tls] [--suite NAME] [--group x25519|p256]\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string server, ca, server_name = "localhost", route = "sink", client_id = "bench-push";
  std::string proto = "baton", suite, group;
  uint64_t bytes = 512ull << 20;
  int timeout_s = 30;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage();
    const char* v = argv[++i];
    if (a == "--server") server = v;
    else if (a == "--ca") ca = v;
    else if (a == "--server-name") server_name = v;
    else if (a == "--route") route = v;
    else if (a == "--bytes") bytes = parse_size(v);
    else if (a == "--client-id") client_id = v;
    else if (a == "--timeout-s") timeout_s = std::atoi(v);
    else if (a == "--proto") proto = v;
    else if (a == "--suite") suite = v;
    else if (a == "--group") group = v;
    else usage();
  }
  if (server.empty() || bytes == 0 || timeout_s <= 0 || route.empty() || route.size() > 255 ||
      (proto != "baton" && proto != "tls"))
    usage();
  const char* token = std::getenv("BATON_TOKEN");
  std::signal(SIGPIPE, SIG_IGN);

  std::string err;
  std::unique_ptr<tls::Context> ctx = bench::make_client_context(ca, suite, group, err);
  if (!ctx) die(err);

  const bool plain = proto == "tls";
  Push push(dial(server, timeout_s), timeout_s, plain);
  push.handshake(*ctx, server_name);
  if (!plain) push.hello(token ? token : "", client_id);

  const auto s0 = Clock::now();
  const double c0 = cpu_seconds();
  push.build(route, bytes);
  const double seal_s = std::chrono::duration<double>(Clock::now() - s0).count();
  const double c1 = cpu_seconds();
  const double s = push.transfer();
  const double cpu_s = cpu_seconds() - c1;
  push.finish();

  const double mib = double(bytes) / (1024.0 * 1024.0);
  std::printf(
      "{\"bytes\":%llu,\"seconds\":%.4f,\"mib_s\":%.1f,\"sink_mib_s\":%.1f,\"cpu_seconds\":%.4f,\"suite\":\"%s\","
      "\"records\":%zu,\"wire_bytes\":%zu,\"seal_seconds\":%.4f,\"seal_cpu_seconds\":%.4f}\n",
      static_cast<unsigned long long>(bytes), s, mib / s,
      push.sink_ns() ? mib / (double(push.sink_ns()) / 1e9) : 0.0, cpu_s, push.suite().c_str(), push.records(),
      push.wire_bytes(), seal_s, c1 - c0);
  return 0;
}
