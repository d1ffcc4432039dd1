// bench_upstream: the upstream servers the benchmark routes to, on one libuv
// loop (so that 10,000 idle connections cost no threads).
//
//   echo  writes back every byte it reads (latency test, HAProxy's backend).
//   sink  a sender first sends N as u64 big-endian, then N bytes. When all N
//         arrived, the sink answers 'K' followed by u64 nanoseconds between
//         the first and the last body byte, then discards until EOF. The
//         sender thus knows the bytes really crossed the tunnel.
//
// usage: bench_upstream [--host 127.0.0.1]
// Prints {"event":"ready","echo":"127.0.0.1:P","sink":"127.0.0.1:Q"} on stdout.
#include <arpa/inet.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

constexpr size_t kSinkBuffer = 1 << 20;
constexpr size_t kEchoBuffer = 64 * 1024;
constexpr size_t kEchoHighWater = 4 << 20;  // queued echo bytes before reading pauses
uint8_t g_sink_buffer[kSinkBuffer];

uint64_t now_ns() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

void die(const char* what, int err) {
  std::fprintf(stderr, "bench_upstream: %s: %s\n", what, uv_strerror(err));
  std::exit(1);
}

struct Conn {
  uv_tcp_t tcp;
  bool sink = false;
  bool closing = false;
  bool paused = false;
  // sink state
  uint8_t hdr[8];
  size_t hdr_have = 0;
  uint64_t want = 0;
  uint64_t got = 0;
  uint64_t first_ns = 0;
  bool acked = false;
};

struct EchoWrite {
  uv_write_t req;
  char* buf;
};

uv_stream_t* stream(Conn* c) { return reinterpret_cast<uv_stream_t*>(&c->tcp); }

void close_conn(Conn* c) {
  if (c->closing) return;
  c->closing = true;
  uv_close(reinterpret_cast<uv_handle_t*>(&c->tcp), [](uv_handle_t* h) { delete static_cast<Conn*>(h->data); });
}

// Echo reads land in one shared buffer; only what the kernel does not take
// at once is copied into a queued write.
uint8_t g_echo_buffer[kEchoBuffer];

void echo_alloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  *buf = uv_buf_init(reinterpret_cast<char*>(g_echo_buffer), kEchoBuffer);
}

void sink_alloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  *buf = uv_buf_init(reinterpret_cast<char*>(g_sink_buffer), kSinkBuffer);
}

void echo_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf);

void echo_written(uv_write_t* req, int status) {
  auto* w = reinterpret_cast<EchoWrite*>(req);
  auto* c = static_cast<Conn*>(req->handle->data);
  std::free(w->buf);
  delete w;
  if (status != 0) {
    close_conn(c);
    return;
  }
  if (c->paused && !c->closing && stream(c)->write_queue_size < kEchoHighWater / 2) {
    c->paused = false;
    uv_read_start(stream(c), echo_alloc, echo_read);
  }
}

void echo_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* c = static_cast<Conn*>(s->data);
  if (n <= 0) {
    if (n == 0) return;
    if (n == UV_EOF) {
      // Half-close back once everything before the EOF is written.
      auto* req = new uv_shutdown_t;
      if (uv_shutdown(req, s, [](uv_shutdown_t* r, int) {
            close_conn(static_cast<Conn*>(r->handle->data));
            delete r;
          }) != 0) {
        delete req;
        close_conn(c);
      }
      uv_read_stop(s);
      return;
    }
    close_conn(c);
    return;
  }
  // A direct write while nothing is queued: a uv_write that completes at
  // once still costs an epoll_ctl and a callback in the next iteration, per
  // answer, which would load the shared cores unlike a real upstream.
  // (uv_try_write takes nothing, UV_EAGAIN, while earlier bytes are queued.)
  uv_buf_t b = uv_buf_init(buf->base, unsigned(n));
  int r = uv_try_write(s, &b, 1);
  if (r < 0 && r != UV_EAGAIN) {
    close_conn(c);
    return;
  }
  size_t done = r > 0 ? size_t(r) : 0;
  if (done == size_t(n)) return;
  auto* w = new EchoWrite;
  w->buf = static_cast<char*>(std::malloc(size_t(n) - done));
  std::memcpy(w->buf, buf->base + done, size_t(n) - done);
  uv_buf_t out = uv_buf_init(w->buf, unsigned(size_t(n) - done));
  if (uv_write(&w->req, s, &out, 1, echo_written) != 0) {
    std::free(w->buf);
    delete w;
    close_conn(c);
    return;
  }
  if (s->write_queue_size > kEchoHighWater) {
    c->paused = true;
    uv_read_stop(s);
  }
}

void sink_read(uv_stream_t* s, ssize_t n, const uv_buf_t*) {
  auto* c = static_cast<Conn*>(s->data);
  if (n == 0) return;
  if (n < 0) {
    close_conn(c);
    return;
  }
  const uint8_t* p = g_sink_buffer;
  size_t len = size_t(n);
  if (c->hdr_have < 8) {
    size_t take = std::min(len, 8 - c->hdr_have);
    std::memcpy(c->hdr + c->hdr_have, p, take);
    c->hdr_have += take;
    p += take;
    len -= take;
    if (c->hdr_have < 8) return;
    c->want = 0;
    for (uint8_t b : c->hdr) c->want = (c->want << 8) | b;
  }
  if (len == 0 || c->acked) return;
  if (c->got == 0) c->first_ns = now_ns();
  c->got += len;
  if (c->got < c->want) return;
  c->acked = true;
  uint64_t dt = now_ns() - c->first_ns;
  auto* w = new EchoWrite;
  w->buf = static_cast<char*>(std::malloc(9));
  w->buf[0] = 'K';
  for (int i = 0; i < 8; ++i) w->buf[1 + i] = char(uint8_t(dt >> (56 - 8 * i)));
  uv_buf_t out = uv_buf_init(w->buf, 9);
  if (uv_write(&w->req, s, &out, 1, echo_written) != 0) {
    std::free(w->buf);
    delete w;
    close_conn(c);
  }
}

void on_connection(uv_stream_t* server, int status) {
  if (status != 0) return;
  bool sink = server->data != nullptr;
  auto* c = new Conn;
  c->sink = sink;
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, stream(c)) != 0) {
    close_conn(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  if (sink) uv_read_start(stream(c), sink_alloc, sink_read);
  else uv_read_start(stream(c), echo_alloc, echo_read);
}

std::string listen_on(uv_loop_t* loop, uv_tcp_t* t, const char* host, bool sink) {
  uv_tcp_init(loop, t);
  t->data = sink ? t : nullptr;  // non-null marks the sink listener
  sockaddr_in a;
  if (int e = uv_ip4_addr(host, 0, &a)) die("address", e);
  if (int e = uv_tcp_bind(t, reinterpret_cast<sockaddr*>(&a), 0)) die("bind", e);
  if (int e = uv_listen(reinterpret_cast<uv_stream_t*>(t), 4096, on_connection)) die("listen", e);
  sockaddr_in got;
  int len = sizeof got;
  uv_tcp_getsockname(t, reinterpret_cast<sockaddr*>(&got), &len);
  char ip[64];
  uv_ip4_name(&got, ip, sizeof ip);
  return std::string(ip) + ":" + std::to_string(ntohs(got.sin_port));
}

}  // namespace

int main(int argc, char** argv) {
  const char* host = "127.0.0.1";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host") == 0 && i + 1 < argc) host = argv[++i];
    else {
      std::fprintf(stderr, "usage: bench_upstream [--host 127.0.0.1]\n");
      return 2;
    }
  }
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  signal(SIGPIPE, SIG_IGN);
  uv_loop_t* loop = uv_default_loop();
  uv_tcp_t echo, sink;
  std::string e = listen_on(loop, &echo, host, false);
  std::string s = listen_on(loop, &sink, host, true);
  std::printf("{\"event\":\"ready\",\"echo\":\"%s\",\"sink\":\"%s\",\"pid\":%d}\n", e.c_str(), s.c_str(), int(getpid()));
  std::fflush(stdout);
  return uv_run(loop, UV_RUN_DEFAULT);
}
