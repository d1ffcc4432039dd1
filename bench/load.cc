// bench_load: load generators with blocking sockets (one connection each).
//
//   bench_load throughput --connect HOST:PORT --bytes N [--buffer BYTES]
//     Sends N (u64 big-endian), then N bytes, to a bench_upstream sink, and
//     waits for the sink's acknowledgement that all N arrived. Prints
//     {"bytes":N,"seconds":S,"mib_s":X,"sink_mib_s":Y,"cpu_seconds":C} where X
//     counts from the first byte sent to the acknowledgement, Y is the sink's
//     own rate (first to last body byte) and C the sender's CPU time.
//
//   bench_load latency --connect HOST:PORT [--size 1024] [--count 20000] [--warmup 2000]
//     Request/response against an echo server with TCP_NODELAY: write `size`
//     bytes, read `size` bytes back, one at a time. Prints
//     {"count":N,"size":B,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,"max_us":..,"mean_us":..}
//
// Every socket has send/receive timeouts, so a stalled path fails the run
// (exit 1) instead of hanging it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench_load: %s\n", what.c_str());
  std::exit(1);
}

int dial(const std::string& hostport, int timeout_s) {
  size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) die("bad address " + hostport);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(std::atoi(hostport.c_str() + colon + 1)));
  if (inet_pton(AF_INET, hostport.substr(0, colon).c_str(), &a.sin_addr) != 1) die("bad IPv4 address " + hostport);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die(std::string("socket: ") + std::strerror(errno));
  timeval tv{timeout_s, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    die("connect " + hostport + ": " + std::strerror(errno));
  return fd;
}

void write_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      die(errno == EAGAIN ? "write timed out (path stalled)" : std::string("write: ") + std::strerror(errno));
    }
    p += w;
    n -= size_t(w);
  }
}

void read_all(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      die(errno == EAGAIN ? "read timed out (path stalled)" : std::string("read: ") + std::strerror(errno));
    }
    if (r == 0) die("connection closed by peer before the reply was complete");
    p += r;
    n -= size_t(r);
  }
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

int throughput(const std::string& addr, uint64_t bytes, size_t buffer, int timeout_s) {
  std::vector<uint8_t> buf(buffer);
  for (size_t i = 0; i < buffer; ++i) buf[i] = uint8_t(i * 131 + 7);  // not all zero: nothing compresses
  int fd = dial(addr, timeout_s);
  uint8_t hdr[8];
  for (int i = 0; i < 8; ++i) hdr[i] = uint8_t(bytes >> (56 - 8 * i));
  auto t0 = Clock::now();
  write_all(fd, hdr, 8);
  uint64_t left = bytes;
  while (left > 0) {
    size_t n = size_t(std::min<uint64_t>(left, buffer));
    write_all(fd, buf.data(), n);
    left -= n;
  }
  auto t_sent = Clock::now();
  uint8_t ack[9];
  read_all(fd, ack, 9);
  auto t1 = Clock::now();
  if (ack[0] != 'K') die("bad acknowledgement from the sink");
  uint64_t sink_ns = 0;
  for (int i = 1; i < 9; ++i) sink_ns = (sink_ns << 8) | ack[i];
  ::close(fd);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  double cpu_s = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  double s = std::chrono::duration<double>(t1 - t0).count();
  double s_sent = std::chrono::duration<double>(t_sent - t0).count();
  double mib = double(bytes) / (1024.0 * 1024.0);
  std::printf(
      "{\"bytes\":%llu,\"seconds\":%.4f,\"mib_s\":%.1f,\"sink_mib_s\":%.1f,\"send_seconds\":%.4f,\"cpu_seconds\":%.4f}\n",
      static_cast<unsigned long long>(bytes), s, mib / s, sink_ns ? mib / (double(sink_ns) / 1e9) : 0.0, s_sent, cpu_s);
  return 0;
}

int latency(const std::string& addr, size_t size, size_t count, size_t warmup, int timeout_s) {
  int fd = dial(addr, timeout_s);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::vector<uint8_t> req(size), resp(size);
  std::vector<double> us;
  us.reserve(count);
  for (size_t i = 0; i < warmup + count; ++i) {
    for (size_t k = 0; k < size; k += 64) req[k] = uint8_t(i + k);
    auto t0 = Clock::now();
    write_all(fd, req.data(), size);
    read_all(fd, resp.data(), size);
    auto t1 = Clock::now();
    if (std::memcmp(req.data(), resp.data(), size) != 0) die("echo reply differs from the request");
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  ::close(fd);
  std::sort(us.begin(), us.end());
  auto pct = [&](double p) { return us[std::min(us.size() - 1, size_t(p / 100.0 * double(us.size())))]; };
  double sum = 0;
  for (double v : us) sum += v;
  std::printf(
      "{\"count\":%zu,\"size\":%zu,\"min_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
      "\"max_us\":%.1f,\"mean_us\":%.1f}\n",
      us.size(), size, us.front(), pct(50), pct(90), pct(99), pct(99.9), us.back(), sum / double(us.size()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die("usage: bench_load throughput|latency --connect HOST:PORT [options]");
  std::string mode = argv[1], addr;
  uint64_t bytes = 1ull << 30;
  size_t buffer = 1 << 20, size = 1024, count = 20000, warmup = 2000;
  int timeout_s = 30;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) die("option " + a + " needs a value");
    const char* v = argv[++i];
    if (a == "--connect") addr = v;
    else if (a == "--bytes") bytes = parse_size(v);
    else if (a == "--buffer") buffer = size_t(parse_size(v));
    else if (a == "--size") size = size_t(parse_size(v));
    else if (a == "--count") count = size_t(std::atol(v));
    else if (a == "--warmup") warmup = size_t(std::atol(v));
    else if (a == "--timeout-s") timeout_s = std::atoi(v);
    else die("unknown option " + a);
  }
  if (addr.empty()) die("--connect HOST:PORT is required");
  if (mode == "throughput") {
    if (bytes == 0 || buffer == 0) die("--bytes and --buffer must be > 0");
    return throughput(addr, bytes, buffer, timeout_s);
  }
  if (mode == "latency") {
    if (size == 0 || count == 0) die("--size and --count must be > 0");
    return latency(addr, size, count, warmup, timeout_s);
  }
  die("unknown mode " + mode + " (throughput or latency)");
}
