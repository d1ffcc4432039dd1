// Writes the seed corpora of mux_frame_fuzz, mux_session_fuzz, control_fuzz,
// preamble_fuzz, tls_record_fuzz and config_fuzz: valid inputs of every kind
// each target reads, and a few that are wrong in one known way.
// (handoff_decoder_fuzz has its own: handoff_corpus.cc.)
//
//   tests/fuzz/run.sh --regen-corpus     (builds this and runs it)
//   seeds DIR                            (writes DIR/<target>/*.bin, DIR/config/*.yaml)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "mux/control.h"
#include "mux/frame.h"
#include "script.h"
#include "tls/record.h"

using namespace baton;
using V = std::vector<uint8_t>;
namespace ss = fuzz::session_script;
namespace rs = fuzz::record_script;

namespace {

std::string g_dir;

void write(const std::string& target, const std::string& name, std::span<const uint8_t> bytes) {
  std::filesystem::create_directories(g_dir + "/" + target);
  std::string path = g_dir + "/" + target + "/" + name;
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::printf("%-44s %5zu bytes\n", (target + "/" + name).c_str(), bytes.size());
}
void write(const std::string& target, const std::string& name, std::string_view text) {
  write(target, name, std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

V cat(std::initializer_list<V> parts) {
  V out;
  for (const V& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

V frame(mux::FrameType type, uint16_t flags, uint32_t id, uint32_t length, const V& body = {}, uint8_t version = 0) {
  V v(mux::kHeaderSize);
  mux::encode_header({version, uint8_t(type), flags, id, length}, v);
  return cat({v, body});
}
V data(uint32_t id, uint16_t flags, const V& body) {
  return frame(mux::FrameType::data, flags, id, uint32_t(body.size()), body);
}
V bytes(std::string_view s) { return V(s.begin(), s.end()); }
template <typename M>
V control(const M& m) {
  V out;
  mux::encode(m, out);
  return out;
}
V preamble(const std::string& route) {
  V out;
  mux::encode_preamble(route, out);
  return out;
}

mux::Hello hello() {
  mux::Hello h;
  h.version = 1;
  h.token = "s3cret";
  h.client_id = "edge-7";
  return h;
}

// ---------------------------------------------------------------- mux_frame
void mux_frame_seeds() {
  using T = mux::FrameType;
  namespace f = mux::flag;
  write("mux_frame", "client_opens.bin",
        cat({frame(T::window_update, f::syn, 1, 0), data(1, 0, bytes("hi")), frame(T::ping, f::syn, 0, 7)}));
  write("mux_frame", "server_opens.bin", cat({frame(T::window_update, f::syn, 2, 1000), data(2, f::fin, bytes("x"))}));
  write("mux_frame", "data_syn.bin", cat({data(1, f::syn, bytes("hello")), data(3, f::syn | f::fin, {})}));
  write("mux_frame", "ack_rst_fin.bin",
        cat({frame(T::window_update, f::ack, 1, 0), frame(T::window_update, f::rst, 3, 0),
             frame(T::window_update, f::syn | f::rst, 5, 0), frame(T::window_update, f::fin, 1, 0)}));
  write("mux_frame", "ping_go_away.bin",
        cat({frame(T::ping, f::ack, 0, 1), frame(T::ping, 0, 0, 2), frame(T::go_away, 0, 0, 1)}));
  write("mux_frame", "bad_version.bin", frame(T::ping, f::syn, 0, 1, {}, 1));
  write("mux_frame", "unknown_type.bin", cat({V{0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}));
  write("mux_frame", "data_on_stream_0.bin", data(0, 0, bytes("z")));
  write("mux_frame", "ping_on_stream.bin", frame(T::ping, f::syn, 5, 1));
  write("mux_frame", "window_overflow.bin", frame(T::window_update, f::syn, 1, 0xffffffff));
  write("mux_frame", "data_beyond_window.bin", frame(T::data, f::syn, 1, mux::kInitialWindow + 1));
}

// -------------------------------------------------------------- mux_session
// A client's opening bytes as a server receives them: control stream with
// HELLO, a data stream with its preamble, a ping, a half-close.
V client_bytes() {
  using T = mux::FrameType;
  namespace f = mux::flag;
  return cat({frame(T::window_update, f::syn, 1, 0), data(1, 0, control(hello())),
              frame(T::window_update, f::syn, 3, 0), data(3, 0, cat({preamble("web"), bytes("GET / HTTP/1.0\r\n\r\n")})),
              frame(T::ping, f::syn, 0, 42), frame(T::window_update, f::fin, 3, 0),
              frame(T::window_update, 0, 3, 65536)});
}

void mux_session_seeds() {
  const uint8_t next = ss::kNextRemote;  // stream byte: the next id the peer may open
  {
    V in = client_bytes();
    fuzz::ScriptWriter w;
    w.u8(ss::kServer | ss::kAutoAccept | ss::kAutoRead);
    // In pieces of 5, 40 and the rest, as TCP might cut them.
    w.u8(ss::feed).u16(5).bytes(std::span(in).first(5));
    w.u8(ss::feed).u16(40).bytes(std::span(in).subspan(5, 40));
    w.u8(ss::feed).u16(uint16_t(in.size() - 45)).bytes(std::span(in).subspan(45));
    w.u8(ss::write).u8(1).u16(300).u8(ss::close_write).u8(1).u8(ss::drain).u16(0);
    write("mux_session", "solo_server_raw.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(ss::kServer);
    w.u8(ss::frame).u8(1).u8(mux::flag::syn).u8(next).u32(0).u16(0);  // WU SYN 1
    w.u8(ss::accept).u8(0);
    w.u8(ss::frame).u8(0).u8(0).u8(0).u32(1000).u16(500);              // Data on it, cut in two
    w.u8(ss::consumed).u8(0).u16(1000);
    w.u8(ss::frame).u8(0).u8(mux::flag::syn).u8(next).u32(10).u16(3);   // Data SYN 3
    w.u8(ss::frame).u8(0).u8(mux::flag::fin).u8(0).u32(0).u16(0);
    w.u8(ss::set_window).u8(0).u32(1 << 20);
    w.u8(ss::write).u8(0).u16(4000).u8(ss::close_write).u8(0);
    w.u8(ss::frame).u8(2).u8(mux::flag::syn).u8(0xf0).u32(99).u16(0);  // Ping
    w.u8(ss::ping).u8(ss::frame).u8(2).u8(mux::flag::ack).u8(0xf0).u32(1).u16(6);
    w.u8(ss::rebuild);
    w.u8(ss::frame).u8(0).u8(mux::flag::rst).u8(0).u32(0).u16(0);
    w.u8(ss::go_away).u8(0).u8(ss::frame).u8(1).u8(mux::flag::syn).u8(next).u32(0).u16(0);  // refused
    w.u8(ss::drain).u16(0);
    write("mux_session", "solo_server_frames.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(ss::kAutoAccept | ss::kCloseOnFin | ss::kSmallLimits);  // client
    for (int i = 0; i < 5; ++i) w.u8(ss::open);
    w.u8(ss::frame).u8(1).u8(mux::flag::ack).u8(0).u32(0).u16(0);
    w.u8(ss::write).u8(0).u16(250);
    w.u8(ss::frame).u8(1).u8(mux::flag::syn).u8(next).u32(0).u16(0);  // server-opened stream 2
    w.u8(ss::frame).u8(0).u8(mux::flag::fin).u8(0).u32(20).u16(0);
    w.u8(ss::take_inbound).u8(0);
    for (int i = 0; i < 4; ++i) w.u8(ss::frame).u8(2).u8(mux::flag::syn).u8(0xf0).u32(uint32_t(i)).u16(0);
    w.u8(ss::frame).u8(3).u8(0).u8(0xf0).u32(0).u16(0);  // Go Away
    write("mux_session", "solo_client_small_limits.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(ss::kServer).u8(ss::feed).u16(24);
    w.bytes(frame(mux::FrameType::window_update, mux::flag::syn, 2, 0));  // wrong parity
    w.bytes(frame(mux::FrameType::ping, 0, 0, 0));
    write("mux_session", "solo_protocol_error.bin", w.out());
  }
  {
    // Pair: open, write both ways, deliver in pieces, read, half-close, ping, go away.
    fuzz::ScriptWriter w;
    w.u8(ss::kPair | ss::kAutoAccept);
    w.u8(ss::open).u8(0).u8(ss::open).u8(0);
    w.u8(ss::write).u8(0).u8(0).u16(5000);
    w.u8(ss::feed).u8(1).u16(30).u8(ss::feed).u8(1).u16(9000);
    w.u8(ss::write).u8(1).u8(0).u16(70).u8(ss::feed).u8(0).u16(1000);
    w.u8(ss::consumed).u8(1).u8(0).u16(4000).u8(ss::consumed).u8(0).u8(0).u16(70);
    w.u8(ss::close_write).u8(0).u8(0).u8(ss::close_write).u8(1).u8(0);
    w.u8(ss::ping).u8(0).u8(ss::feed).u8(1).u16(1000).u8(ss::feed).u8(0).u16(1000);
    w.u8(ss::rebuild).u8(1).u8(ss::reset).u8(1).u8(1);
    w.u8(ss::go_away).u8(1).u8(0).u8(ss::open).u8(0);
    write("mux_session", "pair_basic.bin", w.out());
  }
  {
    // Pair: fill a window, grant a bigger one, read everything as it comes.
    fuzz::ScriptWriter w;
    w.u8(ss::kPair | ss::kAutoAccept | ss::kAutoRead | ss::kCloseOnFin);
    w.u8(ss::open).u8(0);
    for (int i = 0; i < 5; ++i) w.u8(ss::write).u8(0).u8(0).u16(60000).u8(ss::feed).u8(1).u16(65535);
    w.u8(ss::set_window).u8(1).u8(0).u32(4u << 20);
    w.u8(ss::feed).u8(0).u16(100).u8(ss::write).u8(0).u8(0).u16(60000).u8(ss::close_write).u8(0).u8(0);
    write("mux_session", "pair_windows.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(ss::kPair | ss::kSmallLimits | ss::kResetFromCallback);
    for (int i = 0; i < 6; ++i) w.u8(ss::open).u8(1);
    w.u8(ss::feed).u8(0).u16(1000).u8(ss::feed).u8(1).u16(1000);
    w.u8(ss::write).u8(1).u8(0).u16(500).u8(ss::feed).u8(0).u16(1000);
    write("mux_session", "pair_small_limits.bin", w.out());
  }
}

// ----------------------------------------------------------------- control
void control_seeds() {
  mux::Welcome wel;
  for (size_t i = 0; i < wel.session_id.size(); ++i) wel.session_id[i] = uint8_t(i);
  wel.server_id = "pod-a";
  wel.heartbeat_ms = 15000;
  mux::Reject rej;
  rej.code = 3;
  rej.reason = "max_tunnels";
  rej.retry_after_ms = 1000;
  mux::Drain dr;
  dr.reason = "rolling_update";
  dr.grace_ms = 30000;
  dr.reconnect_hint = "10.0.0.7:7443";
  auto stream = [](uint8_t chunk_seed, const V& bytes) { return cat({V{0, chunk_seed}, bytes}); };
  write("control", "hello.bin", stream(1, control(hello())));
  write("control", "every_type.bin", stream(7, cat({control(hello()), control(wel), control(rej), control(dr)})));
  write("control", "unknown_type_and_tag.bin",
        stream(3, cat({V{0x7f, 0, 0}, V{0x01, 0, 9, 0x01, 0, 2, 0, 1, 0x42, 0, 1, 'x'}, control(mux::Reject{})})));
  V welcome = control(wel);
  welcome.resize(welcome.size() - 4);
  write("control", "truncated.bin", stream(2, welcome));
  V long_id = V{0x01, 0, 132, 0x03, 0, 129};
  long_id.resize(long_id.size() + 129, 'c');
  write("control", "client_id_129.bin", stream(5, long_id));
  // Not UTF-8 (issue 17 item 6): a malformed HELLO.
  write("control", "client_id_not_utf8.bin", stream(5, V{0x01, 0, 7, 0x03, 0, 4, 0xff, 0xfe, 0xc0, 0xaf}));
  write("control", "bad_field_size.bin", stream(9, V{0x02, 0, 6, 0x07, 0, 3, 1, 2, 3}));
  write("control", "field_overrun.bin", stream(9, V{0x04, 0, 4, 0x0a, 0, 9, 'r'}));
  // Encoder scripts: type, then values (see control_fuzz.cc encoder()).
  fuzz::ScriptWriter h;
  h.u8(1).u8(0).u8(1).u16(1).u8(6).bytes(bytes("s3cret")).u8(4).bytes(bytes("edge"));
  write("control", "encode_hello.bin", h.out());
  fuzz::ScriptWriter w;
  w.u8(1).u8(1);
  for (int i = 0; i < 16; ++i) w.u8(uint8_t(i));
  w.u8(0xf0).u32(65530).bytes(bytes("pod-a.example.io")).u32(15000);  // a server_id too long to fit
  write("control", "encode_welcome_oversized.bin", w.out());
  fuzz::ScriptWriter r;
  r.u8(1).u8(2).u16(3).u8(11).bytes(bytes("max_tunnels")).u8(1).u32(1000);
  write("control", "encode_reject.bin", r.out());
  fuzz::ScriptWriter d;
  d.u8(1).u8(3).u8(14).bytes(bytes("rolling_update")).u32(30000).u8(13).bytes(bytes("10.0.0.7:7443"));
  write("control", "encode_drain.bin", d.out());
  // Found by the fuzzer: a reason leaving 3 bytes of room once cut the grace_ms after it.
  write("control", "encode_drain_reason_leaves_3_bytes.bin", V{0xff, 0x23, 0xff, 0, 0, 0xff, 0xf8});
}

// ---------------------------------------------------------------- preamble
void preamble_seeds() {
  write("preamble", "web.bin", preamble("web"));
  write("preamble", "route_then_data.bin", cat({preamble("api.v2"), bytes("GET / HTTP/1.1\r\n")}));
  write("preamble", "edges.bin", cat({preamble("!~"), bytes("!")}));
  write("preamble", "longest.bin", preamble(std::string(255, 'r')));
  write("preamble", "length_zero.bin", V{0, 'x'});
  write("preamble", "space.bin", bytes("\x05" "ab cd"));
  write("preamble", "truncated.bin", bytes("\x09" "abc"));
}

// -------------------------------------------------------------- tls_record
void tls_record_seeds() {
  auto seal = [](fuzz::ScriptWriter& w, tls::ContentType t, uint16_t n, uint8_t fill) {
    // content_type() in tls_record_fuzz.cc: 0 -> application_data, 4 alert, 5 handshake, 6 change_cipher_spec.
    uint8_t b = t == tls::ContentType::alert ? 4 : t == tls::ContentType::handshake ? 5
              : t == tls::ContentType::change_cipher_spec ? 6 : 0;
    w.u8(rs::seal).u8(b).u16(n).u8(fill);
  };
  for (uint8_t suite = 0; suite < 6; ++suite) {
    fuzz::ScriptWriter w;
    w.u8(suite).u8(0);
    seal(w, tls::ContentType::application_data, 100, 3);
    seal(w, tls::ContentType::application_data, 16384, 5);
    seal(w, tls::ContentType::application_data, 0, 1);
    w.u8(rs::deliver).u16(7).u8(rs::deliver).u16(200).u8(rs::rebuild).u8(rs::deliver).u16(20000);
    w.u8(rs::alert).u8(1).u8(0).u8(rs::deliver).u16(100).u8(rs::raw).u16(4).u32(0x17030300);
    write("tls_record", "data_then_close_" + std::to_string(suite) + ".bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(0).u8(0);
    w.u8(rs::alert).u8(1).u8(tls::alert::decode_error);  // a warning: ignored
    seal(w, tls::ContentType::application_data, 10, 9);
    w.u8(rs::alert).u8(2).u8(tls::alert::bad_record_mac).u8(rs::deliver).u16(1000);
    write("tls_record", "warning_then_fatal_alert.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(4).u8(0);
    seal(w, tls::ContentType::handshake, 4, 1);
    w.u8(rs::deliver).u16(1000);
    write("tls_record", "renegotiation.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(1).u8(0);
    seal(w, tls::ContentType::change_cipher_spec, 1, 1);
    w.u8(rs::deliver).u16(1000);
    write("tls_record", "change_cipher_spec.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(2).u8(1);  // sequence numbers up to 2^64-1
    for (int i = 0; i < 4; ++i) seal(w, tls::ContentType::application_data, 20, uint8_t(i + 1));
    w.u8(rs::deliver).u16(1000);
    write("tls_record", "sequence_exhausted.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(0).u8(0);
    for (int i = 0; i < 3; ++i) seal(w, tls::ContentType::application_data, 500, uint8_t(i + 1));
    w.u8(rs::preload).u16(1200).u8(rs::deliver).u16(10).u8(rs::deliver).u16(1000);
    write("tls_record", "preloaded_records.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(3).u8(0);
    seal(w, tls::ContentType::application_data, 50, 2);
    w.u8(rs::corrupt).u16(30).u8(0x80).u8(rs::deliver).u16(1000);
    write("tls_record", "corrupted.bin", w.out());
  }
  {
    fuzz::ScriptWriter w;
    w.u8(0).u8(0).u8(rs::raw).u16(5).bytes(V{23, 3, 3, 0xff, 0xff}).u8(rs::deliver).u16(5);
    write("tls_record", "overlong_header.bin", w.out());
    fuzz::ScriptWriter v;
    v.u8(5).u8(0).u8(rs::raw).u16(21).bytes(V{23, 3, 1, 0, 16}).bytes(V(16, 0)).u8(rs::deliver).u16(100);
    write("tls_record", "wrong_version.bin", v.out());
  }
}

// ------------------------------------------------------------------ config
void config_seeds() {
  const std::string minimal =
      "tls:\n  cert: server.crt\n  key: server.key\n"
      "auth:\n  tokens:\n    - name: fleet\n"
      "      sha256: e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f\n"
      "routes:\n  echo: 127.0.0.1:7000\n";
  write("config", "minimal.yaml", minimal);
  write("config", "everything.yaml",
        "server_id: pod-a\nlisten: \"[::]:7443\"\n"
        "tls:\n  cert: /etc/baton/server.crt\n  key: /etc/baton/server.key\n  client_ca: ca.crt\n"
        "  require_client_cert: true\n  ticket_key: ticket.key\n  ticket_lifetime_s: 3600\n"
        "auth:\n  require_token: false\n"
        "routes:\n  web: 127.0.0.1:8080\n  ssh: \"[::1]:22\"\n  db: db.internal:5432\n"
        "limits:\n  max_tunnels: 100\n  max_streams_per_tunnel: 16\n  handshake_timeout_ms: 5000\n"
        "  idle_timeout_ms: 60000\n  upstream_connect_timeout_ms: 1000\n  heartbeat_ms: 5000\n"
        "  tunnel_output_high_water: 65536\n  max_concurrent_handshakes: 8\n  max_queued_handshakes: 0\n"
        "  stream_open_rate: 10\n  stream_open_burst: 20\n  warn_percent: 90\n  retry_after_ms: 250\n"
        "admin:\n  listen: 127.0.0.1:0\n"
        "handoff:\n  socket: /tmp/baton.sock\n  timeout_ms: 2000\n"
        "drain:\n  grace_ms: 1000\n  delay_ms: 0\n  spread_ms: 0\n  reconnect_hint: other:7443\n"
        "lifecycle:\n  listen: 0.0.0.0:9902\n"
        "  token_sha256: 86b3f171441658d6af0114b6d8e19578bb1d1ae2cbb1454cb76a98f7c78c0fb1\n"
        "log:\n  level: debug\n  format: json\n");
  const std::string with_file =
      "tls: {cert: a.crt, key: a.key}\nauth:\n  tokens_file: tokens.yaml\nroutes: {echo: \"127.0.0.1:7000\"}\n";
  write("config", "tokens_file.yaml",
        with_file + "#--- tokens_file\n- name: a\n  sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n"
                    "- name: b\n  sha256: e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f\n");
  write("config", "tokens_file_bad.yaml", with_file + "#--- tokens_file\n- name: a\n  sha256: nothex\n");
  write("config", "tokens_file_missing.yaml",
        "tls: {cert: a.crt, key: a.key}\nauth: {tokens_file: /etc/passwd}\nroutes: {echo: \"127.0.0.1:7000\"}\n");
  write("config", "anchors.yaml",
        "tls: &t {cert: a.crt, key: a.key}\nadmin: *t\nauth:\n  tokens: &l [ {name: x, sha256: "
        "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f} ]\nroutes: {*l : 1.2.3.4:5}\n");
  write("config", "tab_indent.yaml", "tls:\n\tcert: a\n");
  write("config", "ipv6_unquoted.yaml", minimal + "listen: [::1]:7443\n");
  write("config", "two_documents.yaml", minimal + "---\nlisten: 0.0.0.0:1\n");
  write("config", "duplicate_key.yaml", minimal + "routes:\n  x: 1.2.3.4:5\n");
  write("config", "octal_and_range.yaml", minimal + "limits:\n  max_tunnels: 010\n  warn_percent: 101\n");
  write("config", "bad_route_name.yaml",
        "tls: {cert: a, key: b}\nauth: {require_token: false}\nroutes: {\"a b\": 127.0.0.1:1}\n");
  write("config", "not_utf8.yaml", std::string("server_id: \xff\xfe\n"));
  write("config", "eof_without_newline.yaml", "tls: {cert: a.crt, key: a.key}\nauth: {tokens");
  write("config", "second_document_at_eof.yaml", "0\n---");
  write("config", "line_separator_at_eof.yaml", "tls: \xe2\x80\xa8xx\rk: \"x\xc2\x85y");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];
  mux_frame_seeds();
  mux_session_seeds();
  control_seeds();
  preamble_seeds();
  tls_record_seeds();
  config_seeds();
  return 0;
}
