"""Streams across a drain and across a crashed replica, with real processes
(`baton connect` -> `baton serve` -> upstream) and real local sockets:

- a long stream (BATON_TEST_BIG_BYTES, 1 GiB) started before DRAIN finishes on
  the old session while new connections go to another replica, and the drained
  process exits when that stream ends, not at grace (docs/protocol.md 6,
  docs/operations.md "POST /drain", docs/client.md "Make before break");
- a stream that outlives drain.grace_ms is cut at grace: the local application
  sees a connection reset (never a clean EOF, never a hang) and the upstream
  connection is closed;
- a replica that goes silent (SIGSTOP: its TCP connections stay up, only the
  heartbeat can tell) or dies (kill -9) is left for another one; the local
  listener keeps accepting, and a local connection made while no replica is
  reachable waits for the next session, or is reset after --connect-timeout-ms.
"""

import datetime
import hashlib
import json
import os
import signal
import socket
import threading
import time

import pytest

from conftest import BIG_BYTES, ServerProcess, _teardown, http_request, make_config, scaled, socket_echo, wait_until

# delay_ms 0: the listener closes at once, so the process exits as soon as its
# last tunnel is gone (no delay to wait out); spread_ms 0: DRAIN goes at once.
DRAIN = "drain:\n  delay_ms: 0\n  spread_ms: 0\n  grace_ms: %d\n"



# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def addr_str(srv):
    return "%s:%d" % srv.addr


def http_json(hostport, method, path):
    status, body = http_request(hostport, method, path)
    assert status == 200, (hostport, method, path, status, body)
    return json.loads(body)


def admin(srv, method, path):
    return http_json(srv.ready["admin"], method, path)


def post_drain(srv):
    d = admin(srv, "POST", "/drain")
    assert d["draining"] is True, d
    return d


def sessions(c):
    """The {"event":"session"} lines `baton connect` printed so far."""
    return [e for e in c.events() if e.get("event") == "session"]


def wait_session(c, n, timeout=10.0):
    """The session line of session n (n >= 2)."""
    def got():
        for s in sessions(c):
            if s["n"] == n:
                return s
        return None

    return wait_until(got, timeout, interval=0.02, what="session %d of `baton connect`" % n)


def log_lines(proc):
    return proc.stderr_text().splitlines()


def log_time(proc, needle, timeout=10.0):
    """Wall-clock time (epoch seconds) of the first stderr line of `proc` that
    contains `needle`, from its timestamp ("%Y-%m-%dT%H:%M:%S.%e", local time)."""
    def find():
        for line in log_lines(proc):
            if needle in line:
                return line
        return None

    line = wait_until(find, timeout, interval=0.01, what="log line %r" % needle)
    stamp = line.split(" ", 1)[0]
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def roundtrip(addr, data, timeout=10.0):
    """One local connection: send, half-close, read to EOF."""
    s = socket.create_connection(addr, timeout=scaled(timeout))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = s.recv(65536)
            if not b:
                return got
            got += b
    finally:
        s.close()


def read_outcome(s, timeout):
    """Blocks in recv until something happens: ("reset", t) on ECONNRESET,
    ("eof", t) on a clean EOF, ("data", t, bytes), or ("hung", t) when nothing
    came within timeout. t: time.monotonic() when it happened."""
    s.settimeout(timeout)
    try:
        b = s.recv(65536)
    except ConnectionResetError:
        return ("reset", time.monotonic())
    except socket.timeout:
        return ("hung", time.monotonic())
    if not b:
        return ("eof", time.monotonic())
    return ("data", time.monotonic(), b)


def read_to_end(s, timeout):
    """Reads until EOF or an error: (bytes, "eof" | "reset" | "hung")."""
    s.settimeout(timeout)
    got = bytearray()
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return bytes(got), "reset"
        except socket.timeout:
            return bytes(got), "hung"
        if not b:
            return bytes(got), "eof"
        got += b


def still_open(s):
    """True if nothing (no data, no EOF, no reset) is pending on s."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def chunk_of(i, block):
    # every 1 MiB chunk differs (its own sha256 up front): a lost, duplicated
    # or reordered chunk changes the digest
    return hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:]


# ---------------------------------------------------------------------------
# 1. a long stream finishes on the drained session
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_long_stream_started_before_drain_completes_on_old_session(server_factory, connect_factory,
                                                                   upstream_factory):
    """BIG_BYTES echoed through `baton connect` -> A. A is drained (grace far
    longer than the transfer) while the bytes flow: the transfer finishes on
    A's session with the right sha256 both ways, new local connections go to
    B meanwhile, and A exits right after the stream ends, long before grace.

    The end of the stream (its last bytes, then EOF) reaches the local
    application even though the server closes the session right after it."""
    echo_a, echo_b = upstream_factory("echo"), upstream_factory("echo")
    grace_ms = int(scaled(60) * 1000)
    a = server_factory(routes={"echo": echo_a}, server_id="srv-a", extra=DRAIN % grace_ms)
    b = server_factory(routes={"echo": echo_b}, server_id="srv-b")
    c = connect_factory(a, extra_args=["--server", addr_str(b)])
    assert c.ready["server_id"] == "srv-a", c.ready
    addr = c.forward_addr("echo")

    total = BIG_BYTES
    # The last `hold` bytes wait until the checks made during the drain are
    # done, so the stream is certainly still open while they run.
    hold = min(1 << 20, total // 8)
    release = threading.Event()
    s = socket.create_connection(addr, timeout=scaled(10))
    s.settimeout(scaled(120))
    sha_out, sha_in = hashlib.sha256(), hashlib.sha256()
    sent, received, errors, ended, reset = [0], [0], [], [], []

    def sender():
        try:
            block = os.urandom(1 << 20)
            i = 0
            while sent[0] < total:
                limit = total if release.is_set() else total - hold
                if sent[0] >= limit:
                    assert release.wait(scaled(120)), "never released"
                    continue
                chunk = chunk_of(i, block)[:limit - sent[0]]
                sha_out.update(chunk)
                s.sendall(chunk)
                sent[0] += len(chunk)
                i += 1
            s.shutdown(socket.SHUT_WR)
        except (OSError, AssertionError) as e:
            errors.append(("send after %d of %d bytes" % (sent[0], total), e))

    def receiver():
        try:
            while True:
                b = s.recv(1 << 20)
                if not b:
                    ended.append(time.monotonic())
                    return
                sha_in.update(b)
                received[0] += len(b)
        except ConnectionResetError as e:
            if release.is_set():
                reset.append((time.monotonic(), received[0]))  # TAIL_BUG's signature, checked below
            else:
                errors.append(("recv after %d of %d bytes" % (received[0], total), e))
        except OSError as e:
            errors.append(("recv after %d of %d bytes" % (received[0], total), e))

    t_start = time.monotonic()
    ths = [threading.Thread(target=sender, daemon=True), threading.Thread(target=receiver, daemon=True)]
    for th in ths:
        th.start()

    # mid-flight: a quarter through
    wait_until(lambda: received[0] >= total // 4 or errors, 120, interval=0.01, what="a quarter of the transfer")
    assert not errors, errors
    assert len(echo_a.conns) == 1
    at_drain = received[0]
    t_drain = time.monotonic()
    post_drain(a)

    # make before break: session 2 goes to B while the big stream is on A
    s2 = wait_session(c, 2, timeout=5)
    assert s2["server"] == addr_str(b) and s2["server_id"] == "srv-b", s2
    assert s2["drains_followed"] == 1, s2
    took_s2 = time.monotonic() - t_drain
    # a new local connection meanwhile goes to B, not A
    assert roundtrip(addr, b"new connection during the drain") == b"new connection during the drain"
    assert len(echo_b.conns) == 1, "the new connection did not reach B's upstream"
    assert len(echo_a.conns) == 1, "a new connection went to the draining server"

    # the big stream keeps flowing on the drained session, up to the held bytes
    wait_until(lambda: received[0] >= total - hold or errors, 120, interval=0.01,
               what="the transfer to continue after DRAIN")
    assert not errors, errors
    assert at_drain < total - hold <= received[0] < total, (at_drain, received[0], total)
    d = admin(a, "GET", "/drain")
    assert d["draining"] is True and d["tunnels_left"] == 1 and d["streams_left"] == 1, d
    assert a.alive(), "the drained server exited while a stream was open"

    release.set()
    for th in ths:
        th.join(scaled(120))
        assert not th.is_alive(), "the transfer hung"
    assert not errors, errors
    assert ended or reset, "the big stream neither ended nor was reset"
    t_end = ended[0] if ended else reset[0][0]

    # the upstream got every byte, once, in order, and its connection ended
    rec = echo_a.conns[0]
    assert rec.done.wait(scaled(10))
    assert len(echo_a.conns) == 1, "the upstream connection was re-dialled"
    assert rec.received == total
    assert rec.sha_in.hexdigest() == sha_out.hexdigest(), "client -> upstream direction corrupted"
    assert rec.error is None and rec.eof.is_set(), (rec.error, rec.events)

    # A exits when the stream is over, not at grace
    assert a.wait_exit(scaled(10)) == 0
    t_exit = time.monotonic()
    assert t_exit - t_end < scaled(2.0), "A exited %.2f s after its last stream ended" % (t_exit - t_end)
    assert t_exit - t_drain < grace_ms / 1000.0
    log = a.stderr_text()
    assert "drain done" in log and "every tunnel closed" in log, log[-3000:]
    assert "grace period over" not in log, log[-3000:]

    # the client goes on, on B
    assert c.alive()
    assert roundtrip(addr, b"after A exited") == b"after A exited"
    assert len(echo_b.conns) == 2
    print("\n[drain-big] %d MiB in %.2f s; drained at %d MiB; session 2 after %.3f s; "
          "A exited %.3f s after the stream's end (%.2f s after DRAIN, grace %d ms)%s"
          % (total >> 20, t_end - t_start, at_drain >> 20, took_s2, t_exit - t_end, t_exit - t_drain, grace_ms,
             "; TAIL LOST: reset after %d of %d bytes" % (reset[0][1], total) if reset else ""))

    assert not reset, "the local application got ECONNRESET after %d of %d bytes" % (reset[0][1], total)
    assert received[0] == total, "got %d of %d bytes back" % (received[0], total)
    assert sha_in.hexdigest() == sha_out.hexdigest(), "upstream -> client direction corrupted"


def test_drained_stream_end_reaches_the_local_application(server_factory, connect_factory, upstream_factory):
    """The end of a stream that finishes on a drained session is delivered:
    its local application gets every byte of the reply and then EOF. To make
    the race in TAIL_BUG certain, `baton connect` is stopped (SIGSTOP) while
    A sends the reply, the stream's FIN and its close_notify, so that it
    reads them all at once when it resumes (as when its loop is busy)."""
    go = threading.Event()
    reply = os.urandom(64 * 1024)  # fits the client's tunnel socket buffer while it is stopped

    def script(srv, rec):
        srv.read_all(rec)  # the request, to its EOF
        if go.wait(60):
            srv.write(rec, reply)  # then the handler returns: close, FIN

    up_a, echo_b = upstream_factory("scripted", script=script), upstream_factory("echo")
    a = server_factory(routes={"echo": up_a}, server_id="srv-a", extra=DRAIN % int(scaled(60) * 1000))
    b = server_factory(routes={"echo": echo_b}, server_id="srv-b")
    c = connect_factory(a, extra_args=["--server", addr_str(b)])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: little kernel buffering
    s.settimeout(scaled(10))
    s.connect(c.forward_addr("echo"))
    s.sendall(b"request")
    s.shutdown(socket.SHUT_WR)
    rec = up_a.wait_conns(1, timeout=scaled(10))[0]
    assert rec.eof.wait(scaled(10)), "the request did not reach A's upstream"

    post_drain(a)
    wait_session(c, 2, timeout=5)
    assert admin(a, "GET", "/drain")["streams_left"] == 1
    os.kill(c.pid, signal.SIGSTOP)
    try:
        go.set()
        # A relays the reply and the end of the stream, closes its last
        # tunnel and exits: the stream is complete as far as A knows
        assert a.wait_exit(scaled(10)) == 0
        assert rec.done.wait(scaled(10)) and rec.error is None and rec.sent == len(reply)
    finally:
        os.kill(c.pid, signal.SIGCONT)
    got, how = read_to_end(s, scaled(10))
    assert (how, len(got)) == ("eof", len(reply)), "the local application got %s after %d of %d bytes" % (
        how, len(got), len(reply))
    assert got == reply
    assert c.alive()


# ---------------------------------------------------------------------------
# 2. a stream longer than grace is cut at grace, with a reset
# ---------------------------------------------------------------------------

def test_stream_past_grace_is_reset_at_grace(server_factory, connect_factory, upstream_factory):
    """Two streams on A when A drains with grace 1.5 s: an idle one (the local
    application blocked in recv) and a busy upload. At grace both local sockets
    get ECONNRESET (not EOF, not a hang), A's upstream connections are closed,
    A exits, and `baton connect` goes on serving through B."""
    grace_ms = 1500
    grace = grace_ms / 1000.0
    echo_a, sink_a = upstream_factory("echo"), upstream_factory("sink")
    echo_b, sink_b = upstream_factory("echo"), upstream_factory("sink")
    a = server_factory(routes={"echo": echo_a, "sink": sink_a}, server_id="srv-a", extra=DRAIN % grace_ms)
    b = server_factory(routes={"echo": echo_b, "sink": sink_b}, server_id="srv-b")
    c = connect_factory(a, forwards=[("127.0.0.1:0", "echo"), ("127.0.0.1:0", "sink")],
                        extra_args=["--server", addr_str(b)])
    echo_addr = c.forward_addr("echo")

    idle = socket.create_connection(echo_addr, timeout=scaled(10))
    socket_echo(idle, b"an idle stream, like a shell")
    assert len(echo_a.conns) == 1

    busy = socket.create_connection(c.forward_addr("sink"), timeout=scaled(10))
    busy.settimeout(scaled(30))
    up = {"sent": 0, "error": None, "t": None}

    def upload():
        chunk = os.urandom(64 * 1024)
        try:
            while True:
                busy.sendall(chunk)
                up["sent"] += len(chunk)
                time.sleep(0.002)  # pacing: ~30 MB/s, enough to keep the stream busy
        except OSError as e:
            up["error"], up["t"] = e, time.monotonic()

    th = threading.Thread(target=upload, daemon=True)
    th.start()
    rec_sink = wait_until(lambda: sink_a.conns and sink_a.conns[0].received > (1 << 20) and sink_a.conns[0],
                          10, what="the upload to reach A's upstream")

    t0 = time.monotonic()
    post_drain(a)
    sink_at_drain = rec_sink.received
    s2 = wait_session(c, 2, timeout=5)
    assert s2["server"] == addr_str(b), s2
    assert roundtrip(echo_addr, b"via B during the drain") == b"via B during the drain"
    assert len(echo_b.conns) == 1 and len(echo_a.conns) == 1

    # The idle local connection: blocked in recv until the cut.
    outcome = read_outcome(idle, scaled(grace + 10))
    cut_idle = outcome[1] - t0
    assert outcome[0] == "reset", "idle stream past grace: %r after %.2f s (want ECONNRESET)" % (outcome, cut_idle)
    assert grace - 0.1 <= cut_idle <= grace + scaled(1.0), "cut %.3f s after DRAIN, grace %.1f s" % (cut_idle, grace)

    th.join(scaled(10))
    assert not th.is_alive(), "the upload was neither finished nor reset: hung"
    cut_busy = up["t"] - t0
    assert isinstance(up["error"], ConnectionResetError), "busy stream past grace: %r (want ECONNRESET)" % up["error"]
    assert grace - 0.1 <= cut_busy <= grace + scaled(1.0), cut_busy
    # it went on until the cut (streams opened before DRAIN keep working)
    assert rec_sink.received > sink_at_drain, (rec_sink.received, sink_at_drain)

    # A's upstream connections are closed too (reset or EOF)
    for name, rec in (("echo", echo_a.conns[0]), ("sink", rec_sink)):
        assert rec.done.wait(scaled(5)), "A's %s upstream connection still open after the cut" % name
    assert len(sink_a.conns) == 1 and len(echo_a.conns) == 1

    # A is gone at grace
    assert a.wait_exit(scaled(10)) == 0
    t_exit = time.monotonic() - t0
    assert t_exit <= grace + scaled(2.0), t_exit
    log = a.stderr_text()
    assert "grace period over" in log, log[-3000:]

    # the client goes on, on B, for both routes
    assert c.alive()
    assert roundtrip(echo_addr, b"after the cut") == b"after the cut"
    assert len(echo_b.conns) == 2
    x = socket.create_connection(c.forward_addr("sink"), timeout=scaled(10))
    x.sendall(b"z" * 1000)
    x.close()
    wait_until(lambda: sink_b.conns and sink_b.conns[0].received == 1000, 10, what="B's sink to get the bytes")
    upstream_saw = [type(r.error).__name__ if r.error else ("eof" if r.eof.is_set() else "?")
                    for r in (echo_a.conns[0], rec_sink)]
    print("\n[drain-cut] grace %.1f s: idle stream reset at %.3f s, upload reset at %.3f s (%d MiB sent), "
          "A exited at %.3f s; A's upstreams saw %s" % (grace, cut_idle, cut_busy, up["sent"] >> 20, t_exit,
                                                         upstream_saw))


# ---------------------------------------------------------------------------
# 3. a replica goes silent or dies
# ---------------------------------------------------------------------------

@pytest.fixture
def fixed_port_server(request, certs, tmp_path, short_tmp):
    """fixed_port_server(port, routes, server_id, limits) -> a ready `baton serve`
    listening on 127.0.0.1:port (a replica coming back at a known address)."""
    procs = []
    request.node._baton_procs = getattr(request.node, "_baton_procs", [])

    def start(port, routes, server_id, limits):
        n = len(procs)
        routes = {k: (v if isinstance(v, str) else v.addr_str) for k, v in routes.items()}
        text = make_config(certs, routes, str(short_tmp / ("fixed%d.sock" % n)), limits=limits, server_id=server_id)
        assert "listen: 127.0.0.1:0\n" in text
        text = text.replace("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:%d\n" % port, 1)
        path = tmp_path / ("fixed%d.yaml" % n)
        path.write_text(text)
        p = ServerProcess(path, tmp_path, text, name="fixed%d" % n)
        procs.append(p)
        request.node._baton_procs.append(p)
        p.wait_ready()
        assert p.addr == ("127.0.0.1", port), p.ready
        return p

    yield start
    _teardown(procs)


def test_dead_replica_detected_and_local_connections_wait(server_factory, connect_factory, upstream_factory,
                                                          fixed_port_server):
    """A silent replica (SIGSTOP) is found by heartbeat, a crashed one (kill -9)
    at once; streams on the dead session are reset to their local
    applications; with no replica reachable the local listener still accepts
    and the new connection waits, then completes when a replica comes back at
    the same address; if none does, it is reset at --connect-timeout-ms."""
    heartbeat_ms = 200
    hb = heartbeat_ms / 1000.0
    ct_ms = int(scaled(4) * 1000)
    ct = ct_ms / 1000.0
    lim = {"heartbeat_ms": heartbeat_ms, "idle_timeout_ms": 60000}
    up = upstream_factory("echo")
    a = server_factory(routes={"echo": up}, limits=lim, server_id="srv-a")
    b = server_factory(routes={"echo": up}, limits=lim, server_id="srv-b")
    # Protocol version 1's behaviour: the session ends with its connection
    # (with resume the client would keep it and try A again first;
    # test_resume_client.py covers that).
    c = connect_factory(a, extra_args=["--server", addr_str(b), "--connect-timeout-ms", str(ct_ms),
                                       "--status-listen", "127.0.0.1:0", "--no-resume"])
    assert c.ready["server_id"] == "srv-a"
    assert "heartbeat %d ms" % heartbeat_ms in c.stderr_text()
    addr = c.forward_addr("echo")

    def status():
        return http_json(c.ready["status"], "GET", "/status")

    # -- A goes silent: SIGSTOP keeps its TCP connections up (the kernel
    # still ACKs), only the heartbeat can tell.
    live = socket.create_connection(addr, timeout=scaled(10))
    socket_echo(live, b"on A")
    t_stop = time.time()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        t_lost = log_time(c, "session 1 lost", timeout=scaled(3 * hb + 2))
        s2 = wait_session(c, 2, timeout=5)
        t_s2 = log_time(c, "session 2 up")
        assert s2["server"] == addr_str(b) and s2["server_id"] == "srv-b", s2
        # the stream on the dead session is reset to its local application
        outcome = read_outcome(live, scaled(5))
        assert outcome[0] == "reset", outcome
        live.close()
        assert roundtrip(addr, b"on B") == b"on B"
    finally:
        a.kill()  # SIGKILL works on a stopped process: A is dead for good
    detect_silent = t_lost - t_stop
    lost_line = [line for line in log_lines(c) if "session 1 lost" in line][0]
    assert "heartbeat" in lost_line, lost_line
    # Dead after 2 heartbeats without a byte from the peer (2 pings
    # unanswered): between 1 and 2 heartbeats after the stop, depending on
    # when the last ping was answered.
    assert detect_silent >= hb - 0.05, "session declared dead %.3f s after SIGSTOP" % detect_silent
    assert detect_silent <= 2 * hb + scaled(0.25), \
        "silent replica detected %.3f s after SIGSTOP (heartbeat %d ms)" % (detect_silent, heartbeat_ms)
    assert t_s2 - t_lost < scaled(1.0), t_s2 - t_lost

    # -- B crashes (kill -9: the kernel closes its sockets). A is dead too:
    # no replica is reachable.
    dials_failed = sum("cannot connect to" in line for line in log_lines(c))
    live = socket.create_connection(addr, timeout=scaled(10))
    socket_echo(live, b"on B again")
    t_kill = time.time()
    b.kill()
    t_lost2 = log_time(c, "session 2 lost", timeout=scaled(3))
    detect_kill = t_lost2 - t_kill
    assert detect_kill < scaled(0.5), "crash detected %.3f s after kill -9" % detect_kill
    outcome = read_outcome(live, scaled(5))
    assert outcome[0] == "reset", outcome
    live.close()

    # The local listener still accepts; the new connection waits (neither
    # reset nor answered) while the client keeps dialing.
    t_w = time.monotonic()
    waiting = socket.create_connection(addr, timeout=scaled(10))
    waiting.sendall(b"waited for a replica")
    st = wait_until(lambda: (lambda s: s if s["waiting"] == 1 else None)(status()), 5, interval=0.02,
                    what="the local connection to wait for a session")
    assert st["state"] == "connecting", st
    wait_until(lambda: sum("cannot connect to" in line for line in log_lines(c)) >= dials_failed + 2, 5,
               what="the client to keep dialing")
    assert still_open(waiting), "the waiting local connection got data, EOF or a reset"
    assert c.alive()

    # B comes back (a new process at B's address): the waiting connection completes.
    b2 = fixed_port_server(b.addr[1], {"echo": up}, "srv-b2", lim)
    t_back = time.monotonic()
    waiting.settimeout(scaled(10))
    got = b""
    while len(got) < len(b"waited for a replica"):
        chunk = waiting.recv(100)
        assert chunk, "the waiting connection was closed after %r" % got
        got += chunk
    assert got == b"waited for a replica"
    waited = time.monotonic() - t_w
    assert waited < ct, "served after %.2f s, past the connect timeout" % waited
    waiting.close()
    s3 = wait_session(c, 3, timeout=5)
    assert s3["server"] == addr_str(b) and s3["server_id"] == "srv-b2", s3
    back_to_served = time.monotonic() - t_back

    # -- It dies again and nothing comes back: a local connection made now is
    # reset when --connect-timeout-ms is over, never hung.
    b2.kill()
    log_time(c, "session 3 lost", timeout=scaled(3))
    t_w2 = time.monotonic()
    waiting = socket.create_connection(addr, timeout=scaled(10))
    waiting.sendall(b"nobody home")
    outcome = read_outcome(waiting, ct + scaled(5))
    reset_after = outcome[1] - t_w2
    assert outcome[0] == "reset", "local connection with no replica for %.1f s: %r" % (reset_after, outcome)
    assert ct - 0.2 <= reset_after <= ct + scaled(1.0), reset_after
    waiting.close()
    log_time(c, "1 local connection(s) reset: no session within %d ms" % ct_ms, timeout=5)  # logged just after
    assert c.alive()
    assert status()["waiting"] == 0
    # the listener still accepts
    probe = socket.create_connection(addr, timeout=scaled(10))
    probe.close()
    print("\n[crash] heartbeat %d ms: SIGSTOP detected after %.3f s (%.2f heartbeats), session 2 up %.3f s later; "
          "kill -9 detected after %.3f s; a waiting connection served %.3f s after the replica came back "
          "(waited %.2f s); with no replica, reset after %.3f s (--connect-timeout-ms %d)"
          % (heartbeat_ms, detect_silent, detect_silent / hb, t_s2 - t_lost, detect_kill, back_to_served, waited,
             reset_after, ct_ms))


@pytest.mark.parametrize("resume", [False, True], ids=["no_resume", "resume"])
def test_silent_replica_detected_within_two_heartbeats(server_factory, connect_factory, resume):
    """docs/client.md: a dead path is found "within 2 heartbeats in any
    case". A is stopped just after the client's first ping was answered (the
    worst moment); the session must be declared lost (with resume: its
    connection declared dead and the session detached) within 2 heartbeats
    (+ a small margin) of the stop."""
    heartbeat_ms = 500
    hb = heartbeat_ms / 1000.0
    lim = {"heartbeat_ms": heartbeat_ms, "idle_timeout_ms": 60000}
    a = server_factory(limits=lim, server_id="srv-a")
    b = server_factory(limits=lim, server_id="srv-b")
    c = connect_factory(a, extra_args=["--server", addr_str(b)] + ([] if resume else ["--no-resume"]))
    # WELCOME at t_up: the client pings at t_up + k * heartbeat
    t_up = log_time(c, "tunnel up")
    time.sleep(max(0.0, t_up + 1.2 * hb - time.time()))  # pacing: just past the first ping's answer
    t_stop = time.time()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        lost = "connection lost (heartbeat lost" if resume else "session 1 lost"
        t_lost = log_time(c, lost, timeout=scaled(3 * hb + 2))
    finally:
        a.kill()
    detect = t_lost - t_stop
    print("\n[heartbeat] stopped %.3f s after WELCOME; lost after %.3f s (%.2f heartbeats)"
          % (t_stop - t_up, detect, detect / hb))
    assert detect <= 2 * hb + scaled(0.05), "silent replica detected %.3f s (%.2f heartbeats) after SIGSTOP" % (
        detect, detect / hb)
