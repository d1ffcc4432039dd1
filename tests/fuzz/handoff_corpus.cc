// Writes the seed corpus of handoff_decoder_fuzz: one valid encoding of each
// message type, and tunnel states taken from real cores mid-conversation (so
// their partial records decrypt and their partial frames parse).
//
//   tests/fuzz/run.sh --regen-corpus     (builds this and runs it)
//   handoff_corpus DIR                   (writes DIR/*.bin, replacing files of the same name)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "handoff/codec.h"
#include "mux/session.h"
#include "null_handler.h"
#include "proxy/bridge.h"
#include "proxy/link.h"
#include "tls/record.h"

using namespace baton;
using fuzz::NullHandler;
using V = std::vector<uint8_t>;

namespace {

std::string g_dir;

void write(const std::string& name, const V& bytes) {
  std::string path = g_dir + "/" + name + ".bin";
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::printf("%-28s %5zu bytes\n", (name + ".bin").c_str(), bytes.size());
}

V take(util::ByteQueue& q, size_t n) {
  V v(std::min(n, q.size()));
  q.peek(v);
  q.pop(v.size());
  return v;
}

// A server tunnel exported mid-conversation: two streams with bridges, data
// queued both ways, half a TLS record and half a yamux frame in its inputs,
// a ping outstanding, sealed bytes unwritten.
proxy::TunnelState mid_stream(uint16_t suite) {
  tls::Cipher c;
  (void)tls::cipher_of_suite(suite, c);
  tls::RecordState cs, ss;
  cs.suite = ss.suite = suite;
  cs.side = tls::Side::client;
  ss.side = tls::Side::server;
  for (size_t i = 0; i < tls::key_length(c); ++i) cs.write.key[i] = ss.read.key[i] = uint8_t(i + 1);
  for (size_t i = 0; i < tls::key_length(c); ++i) cs.read.key[i] = ss.write.key[i] = uint8_t(i + 101);
  for (size_t i = 0; i < tls::fixed_iv_length(c); ++i) cs.write.iv[i] = ss.read.iv[i] = uint8_t(i + 51);
  for (size_t i = 0; i < tls::fixed_iv_length(c); ++i) cs.read.iv[i] = ss.write.iv[i] = uint8_t(i + 151);
  cs.write.seq = ss.read.seq = cs.read.seq = ss.write.seq = 1;

  NullHandler hc, hs;
  tls::RecordLayer crec(std::move(cs)), srec(std::move(ss));
  mux::Session cses(mux::Role::client, hc), sses(mux::Role::server, hs);
  static V scratch(tls::kScratchSize);
  auto client_to_server = [&](size_t record_bytes, size_t wire_bytes) {
    V plain = take(cses.output(), record_bytes);
    if (!plain.empty()) crec.seal(plain);
    V wire = take(crec.output(), wire_bytes);
    std::span<const uint8_t> in(wire);
    while (true) {
      tls::Opened o = srec.open(in, scratch);
      in = in.subspan(o.used);
      if (o.status != tls::OpenStatus::data) break;
      if (!o.plaintext.empty()) (void)sses.consume(o.plaintext);
    }
  };

  uint32_t control = cses.open();
  uint32_t a = cses.open();
  uint32_t b = cses.open();
  (void)cses.write(control, V(40, 'h'));
  (void)cses.write(a, V(300, 'a'));
  (void)cses.write(b, V(200, 'b'));
  client_to_server(SIZE_MAX, SIZE_MAX);
  sses.accept(control);
  sses.accept(a);
  sses.consumed(control, 40);
  (void)sses.write(a, V(120, 'A'));
  (void)sses.ping(5, 1234);
  srec.seal(take(sses.output(), SIZE_MAX));
  (void)take(srec.output(), 50);  // some written, the rest not
  (void)cses.write(a, V(100, 'c'));
  cses.close_write(b);
  // Half a frame in one record (delivered), the next record cut short on the wire.
  client_to_server(60, SIZE_MAX);
  client_to_server(30, 40);

  proxy::TunnelState t;
  t.phase = proxy::LinkPhase::serving;
  t.fd = 3;
  t.record = srec.take_state();
  t.session = sses.take_state();
  t.peer_info = {false, "baton/1", "CN=client", "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"};
  t.counters = {900, 300, 2, 0};
  t.idle_ms = 20;
  t.age_ms = 4000;
  for (size_t i = 0; i < t.session_id.size(); ++i) t.session_id[i] = uint8_t(i * 7);
  t.client_id = "edge";
  t.control_open = true;
  t.counted = true;
  proxy::BridgeState ba;
  ba.id = a;
  ba.phase = proxy::BridgePhase::relaying;
  ba.fd = 4;
  ba.route = "api";
  ba.pending.append(V(30, 'P'));
  ba.upstream_written = 100;
  ba.bytes_up = 100;
  ba.bytes_down = 120;
  t.bridges.push_back(std::move(ba));
  proxy::BridgeState bb;
  bb.id = b;
  bb.phase = proxy::BridgePhase::awaiting_preamble;
  bb.peer_fin = true;
  t.bridges.push_back(std::move(bb));
  return t;
}

proxy::TunnelState minimal(uint16_t suite, int fd) {
  proxy::TunnelState t;
  t.phase = proxy::LinkPhase::awaiting_hello;
  t.fd = fd;
  t.record.suite = suite;
  t.session.next_local_id = 2;
  return t;
}

// A tunnel on its way out: Go Away both ways, close_notify sent, a bridge
// that could not be moved.
proxy::TunnelState closing() {
  proxy::TunnelState t = minimal(tls::suite::ecdhe_rsa_chacha20_poly1305, 0);
  t.phase = proxy::LinkPhase::serving;
  t.record.close_notify_sent = true;
  t.record.output.append(V(27, 0x15));
  t.session.go_away_sent = t.session.go_away_received = true;
  t.session.go_away_code = mux::GoAwayCode::internal_error;
  t.session.remote_next_id = 11;
  t.session.remote_ids_ahead = {15};
  t.session.ping_replies_queued = 3;
  mux::StreamState& s = t.session.streams[9];
  s.id = 9;
  s.remote_fin = true;
  s.send_window = 0;
  s.recv_window = 1000;
  s.recv_window_max = 1000;
  t.session.pings.push_back({77, 99});
  proxy::BridgeState b;
  b.id = 9;
  b.phase = proxy::BridgePhase::done;
  b.route = "db";
  b.tcp_eof = b.fin_sent = b.shutdown_done = true;
  t.bridges.push_back(std::move(b));
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];

  // Bare tunnel states (decode_tunnel).
  V v;
  handoff::encode_tunnel(mid_stream(tls::suite::ecdhe_ecdsa_aes128_gcm_sha256), v);
  write("tunnel_mid_stream_gcm", v);
  v.clear();
  handoff::encode_tunnel(mid_stream(tls::suite::ecdhe_ecdsa_chacha20_poly1305), v);
  write("tunnel_mid_stream_chacha", v);
  v.clear();
  handoff::encode_tunnel(minimal(tls::suite::ecdhe_rsa_aes256_gcm_sha384, 0), v);
  write("tunnel_minimal", v);
  v.clear();
  handoff::encode_tunnel(closing(), v);
  write("tunnel_closing", v);

  // Whole messages.
  std::vector<int> fds;
  handoff::Batch batch;
  batch.seq = 1;
  batch.tunnels.push_back(mid_stream(tls::suite::ecdhe_rsa_aes128_gcm_sha256));
  batch.tunnels.push_back(minimal(tls::suite::ecdhe_ecdsa_aes256_gcm_sha384, 7));
  batch.tunnels.push_back(closing());
  v.clear();
  handoff::encode_batch(batch, v, fds);
  write("msg_batch", v);
  // The same body bare, with three fds (the fuzzer tries 0, 1, 2, 3 and 5).
  write("body_batch_3fds", V(v.begin() + handoff::kHeaderSize, v.end()));
  v.clear();
  fds.clear();
  handoff::encode_batch(handoff::Batch{}, v, fds);
  write("msg_batch_empty", v);

  v.clear();
  handoff::encode_hello({4242, 1, 1}, v);
  write("msg_hello", v);
  handoff::ServerStateMsg ss;
  ss.pid = 4242;
  ss.epoch = 3;
  ss.metrics.inc(proxy::series<proxy::Fam::tunnels_total>("accepted"), 10);
  ss.metrics.inc(proxy::series<proxy::Fam::bytes_total>("echo", "up"), 12345);
  ss.metrics.observe(proxy::series<proxy::Fam::handshake_seconds>(), 0.004);
  ss.ticket_keys.resize(2);
  ss.ticket_keys[0].fill(0x11);
  ss.ticket_keys[1].fill(0x22);
  ss.has_listener = true;
  v.clear();
  handoff::encode_server_state(ss, v);
  write("msg_server_state", v);
  v.clear();
  handoff::encode_listening(v);
  write("msg_listening", v);
  v.clear();
  handoff::encode_batch_ack({1, 2, "stream 5: cannot adopt the upstream socket"}, v);
  write("msg_batch_ack", v);
  v.clear();
  handoff::encode_commit({ss.metrics}, v);
  write("msg_commit", v);
  v.clear();
  handoff::encode_abort("new process failed to listen", v);
  write("msg_abort", v);
  v.clear();
  handoff::encode_refuse("unknown message type 99", v);
  write("msg_refuse", v);
  return 0;
}
