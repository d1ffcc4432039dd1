"""Hot restart (docs/hot-restart.md): a new `baton serve` with the same
config takes the listener and every live tunnel from the running one over the
handoff socket. Clients must notice nothing: same TCP connection, same TLS
session, same streams, no byte lost or duplicated, no refused connection."""

import hashlib
import json
import os
import pwd
import socket
import stat
import subprocess
import threading
import time

import pytest

import baton_wire as bw
from conftest import BIG_BYTES, TOKEN, BigSender, proc_state, scaled, stream_echo, wait_until


def hot_restart(server_factory, old, env=None, extra_args=None):
    """Starts a successor of `old`, waits for its ready line and for `old` to
    exit. Returns (new process, seconds from spawn to the old one's exit)."""
    t0 = time.monotonic()
    new = server_factory(successor_of=old, env=env, extra_args=extra_args)
    assert new.ready["takeover"] is True, new.ready
    assert new.ready["epoch"] == old.ready["epoch"] + 1, (old.ready, new.ready)
    assert new.ready["listen"] == old.ready["listen"]
    rc = old.wait_exit(scaled(10))
    gone = time.monotonic() - t0
    assert rc == 0, "old process exited with %s\n%s" % (rc, old.stderr_text(4000))
    return new, gone


def test_live_tunnel_and_streams_move(server_factory, tunnel_factory, echo_server):
    """One tunnel, three open streams with bytes in both directions: after the
    restart the same streams carry on, on the same TCP connection and TLS
    session; new streams and pings work; the old process is gone within 1 s."""
    srv = server_factory()
    t = tunnel_factory(srv)
    local = t.sock.getsockname()
    sid = t.session_id
    streams = []
    for _ in range(3):
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        stream_echo(s, os.urandom(50_000))
        streams.append(s)
    for epoch in (1, 2, 3):
        srv, gone = hot_restart(server_factory, srv)
        assert gone < scaled(1.0), "old process took %.2f s to exit" % gone
        assert srv.ready["tunnels"] == 1
        for s in streams:
            stream_echo(s, os.urandom(70_000))
        assert t.ping(0x1000 + epoch).has(bw.FLAG_ACK)
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        stream_echo(s, b"fresh stream after restart %d" % epoch)
        streams.append(s)
    assert t.sock.getsockname() == local
    assert t.session_id == sid
    # every upstream connection is still the first one per stream: none was re-dialled
    assert len(echo_server.conns) == len(streams)


def test_half_finished_request_and_unread_reply_move(server_factory, tunnel_factory, upstream_factory):
    """Bytes in every buffer at the moment of the restart arrive exactly once:
    a reply the client has not read (window exhausted), a request half sent."""
    source = upstream_factory("source", limit=8 << 20)
    srv = server_factory(routes={"source": source})
    t = tunnel_factory(srv)
    s = t.open_stream("source", recv_window=256 * 1024)
    assert s.wait_acked(scaled(10))
    # The client grants nothing beyond the initial window: the sidecar holds
    # the upstream's bytes (its read buffer, the stream's pending bytes).
    rec = source.wait_conns(1)[0]
    wait_until(lambda: rec.sent > 256 * 1024, 10, what="the source to send past the window")
    srv, _ = hot_restart(server_factory, srv)
    srv, _ = hot_restart(server_factory, srv)
    got = 0
    deadline = time.monotonic() + scaled(60)
    while got < source.limit:
        chunk = s.recv(1 << 20, timeout=deadline - time.monotonic())
        assert chunk, "stream ended after %d bytes" % got
        assert chunk == source.pattern.at(got, len(chunk)), "bytes %d.. differ" % got
        got += len(chunk)
    assert got == source.limit


@pytest.mark.slow
def test_stalled_client_big_transfer_survives_restarts(server_factory, upstream_factory, connect_factory):
    """BATON_TEST_BIG_BYTES (1 GiB) echoed through `baton connect` while the
    reader stalls three times until every buffer on the path is full; during
    each stall the sidecar is hot-restarted. Both directions arrive intact."""
    echo = upstream_factory("echo")
    srv = server_factory(routes={"echo": echo})
    client = connect_factory(srv)
    total = BIG_BYTES
    s = socket.create_connection(client.forward_addr("echo"))
    s.settimeout(scaled(120))
    snd = BigSender(s, total).start()
    sha_out, sent, errors, th = snd.sha, snd.sent, snd.errors, snd.thread
    sha_in = hashlib.sha256()
    received = 0
    stalls = [total // 4, total // 2, 3 * total // 4]
    restarts = 0
    while True:
        if stalls and received >= stalls[0]:
            stalls.pop(0)
            # Stop reading until the sender is blocked: every buffer is full.
            last, since = sent[0], time.monotonic()
            while time.monotonic() - since < 1.0 and sent[0] < total:
                time.sleep(0.05)
                if sent[0] != last:
                    last, since = sent[0], time.monotonic()
            srv, _ = hot_restart(server_factory, srv)
            restarts += 1
        b = s.recv(1 << 20)
        if not b:
            break
        sha_in.update(b)
        received += len(b)
    th.join(scaled(60))
    assert not errors, errors
    assert restarts == 3
    assert received == total, "got %d of %d bytes back" % (received, total)
    rec = echo.wait_conns(1)[0]
    assert rec.done.wait(scaled(10))
    assert len(echo.conns) == 1, "the upstream connection was re-dialled"
    assert rec.sha_in.hexdigest() == sha_out.hexdigest(), "client -> upstream direction corrupted"
    assert sha_in.hexdigest() == sha_out.hexdigest(), "upstream -> client direction corrupted"
    assert client.alive()


def test_config_change_applies_by_hot_restart(server_factory, tunnel_factory, upstream_factory, tmp_path):
    """A new route in the config, applied by a hot restart: the live tunnel
    keeps its streams and can use the new route."""
    echo = upstream_factory("echo")
    echo2 = upstream_factory("echo")
    srv = server_factory(routes={"echo": echo})
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"before")
    text = srv.config_text.replace("routes:\n", "routes:\n  echo2: %s\n" % echo2.addr_str, 1)
    assert text != srv.config_text
    srv.config_path.write_text(text)
    srv.config_text = text
    srv, _ = hot_restart(server_factory, srv)
    stream_echo(s, b"after")
    s2 = t.open_stream("echo2")
    assert s2.wait_acked(scaled(10))
    stream_echo(s2, b"new route")
    assert len(echo2.conns) == 1


@pytest.mark.parametrize("step", ["hello", "listening", "batch", "ack"])
def test_new_process_killed_at_each_step(server_factory, tunnel_factory, client_ctx, step):
    """kill -9 of the new process at each step of the handoff: no tunnel is
    lost, the old process keeps serving (and accepts again), and a later
    restart succeeds. 130 tunnels x 1 stream = 260 descriptors: two batches,
    so "ack" is a state where one batch is acknowledged and one is not."""
    srv = server_factory(limits={"max_tunnels": 1000})
    tunnels, streams = [], []
    for _ in range(130):
        t = tunnel_factory(srv, timeout=30)
        s = t.open_stream("echo")
        tunnels.append(t)
        streams.append(s)
    for s in streams:
        assert s.wait_acked(scaled(10))
        stream_echo(s, b"x" * 100)
    new = server_factory(successor_of=srv, env={"BATON_TEST_HANDOFF_STOP_AT": step}, wait=False)
    wait_until(lambda: proc_state(new.pid) == "T", 20, what="the new process to stop at step " + step)
    # A client that connects now must not be refused: once the old process
    # has stopped accepting, its connection waits in the listen queue.
    late = {}

    def connect_late():
        try:
            t = bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(30))
            late["tunnel"] = t
        except Exception as e:  # noqa: BLE001 - reported below
            late["error"] = e

    th = threading.Thread(target=connect_late)
    th.start()
    new.kill()
    th.join(scaled(40))
    assert "error" not in late, "a tunnel opened during the failed handoff was refused: %r" % late.get("error")
    tunnels.append(late["tunnel"])
    assert srv.alive(), "the old process died with the new one"
    assert "resuming everything here" in srv.stderr_text() or step == "hello"
    for s in streams:
        stream_echo(s, b"still here after the failed handoff")
    echo_on_new_stream = late["tunnel"].open_stream("echo")
    assert echo_on_new_stream.wait_acked(scaled(10))
    stream_echo(echo_on_new_stream, b"late tunnel works")
    # A later restart goes through, and everything still works.
    srv, _ = hot_restart(server_factory, srv)
    assert srv.ready["tunnels"] == 131
    for s in streams:
        stream_echo(s, b"and after the successful one")


def test_new_process_dies_before_the_old_one_reads_listening(server_factory, tunnel_factory, client_ctx):
    """The new process dies right after announcing "listening", before the old
    one has handled that message: the old one's first batch write then fails
    (EPIPE) while it is exporting tunnels. It must resume every tunnel it had
    exported and keep serving. (This once crashed the old process: the write
    error tore the handoff down inside the send, and the export loop went on
    with it gone. Found by the test above under ThreadSanitizer's timing.)"""
    import signal
    srv = server_factory(env={"BATON_TEST_HANDOFF_PARENT_STOP_AT": "listening"}, limits={"max_tunnels": 1000})
    tunnels, streams = [], []
    for _ in range(130):  # two batches (fd limit per message), as in the test above
        t = tunnel_factory(srv, timeout=30)
        s = t.open_stream("echo")
        tunnels.append(t)
        streams.append(s)
    for s in streams:
        assert s.wait_acked(scaled(10))
        stream_echo(s, b"before")
    new = server_factory(successor_of=srv, env={"BATON_TEST_HANDOFF_STOP_AT": "listening"}, wait=False)
    wait_until(lambda: proc_state(srv.pid) == "T", 20, what="the old process to stop on receiving listening")
    new.kill()
    os.kill(srv.pid, signal.SIGCONT)
    wait_until(lambda: "resuming everything here" in srv.stderr_text(), 20, what="the old process to resume")
    wait_until(lambda: "handoff: resumed" in srv.stderr_text(), 10, what="the resumed line")
    assert srv.alive(), srv.stderr_text()[-3000:]
    assert "handoff: resumed 130 tunnels" in srv.stderr_text(), srv.stderr_text()[-3000:]
    for s in streams:
        stream_echo(s, b"after the new process died mid-handoff")
    late = bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    tunnels.append(late)
    s = late.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"new tunnel after the failed handoff")


def test_newer_state_version_is_drained_not_dropped(server_factory, tunnel_factory):
    """The old process writes a tunnel state version the new one does not
    read (as after a downgrade): the new one refuses the batch, the old one
    keeps those tunnels and drains them per docs/protocol.md 6 (DRAIN, Go Away,
    open streams finish), new tunnels go to the new process."""
    srv = server_factory(env={"BATON_TEST_HANDOFF_STATE_VERSION": "99"})
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"before")
    new = server_factory(successor_of=srv)
    assert new.ready["takeover"] is True and new.ready["tunnels"] == 0
    msg = t.next_control(scaled(10))
    assert msg.type == bw.MSG_DRAIN, msg
    assert msg.u32(0x0b) is not None  # grace_ms
    stream_echo(s, b"the open stream keeps working while draining")
    # a new tunnel lands on the new process
    t2 = tunnel_factory(new)
    s2 = t2.open_stream("echo")
    assert s2.wait_acked(scaled(10))
    stream_echo(s2, b"new process")
    assert srv.alive()
    # the last stream ends -> the old process closes the tunnel and exits
    s.close_write()
    s.recv_all(scaled(10))
    log = srv.stderr_text()
    assert srv.wait_exit(scaled(10)) == 0
    # the versions are compared at hello; a batch of an unknown version would be refused too (unit tests)
    assert "tunnels will be drained" in log and "draining" in log, log


def _handoff_socket(srv) -> str:
    return srv.config_text.split("socket: ", 1)[1].split("\n", 1)[0].strip()


def test_handoff_socket_is_private(server_factory, short_tmp):
    """Mode 0600 in a directory created 0700."""
    srv = server_factory()
    path = _handoff_socket(srv)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


@pytest.mark.root_only("connects as another uid")
def test_handoff_socket_refuses_another_uid(server_factory, short_tmp):
    """A process of another uid is refused (SO_PEERCRED) without a word,
    even when the file permissions would let it connect."""
    srv = server_factory()
    path = _handoff_socket(srv)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chmod(path, 0o666)
    os.chmod(os.path.dirname(path), 0o755)
    code = ("import os, socket, sys\n"
            "os.setuid(%d)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(%r); s.settimeout(10)\n"
            "try:\n"
            "    s.sendall(b'x' * 12)\n"
            "    sys.exit(0 if s.recv(100) == b'' else 1)\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    sys.exit(0)\n") % (nobody, path)
    r = subprocess.run(["/usr/bin/python3", "-c", code], timeout=scaled(20))
    assert r.returncode == 0, "the handoff socket answered a process of uid %d" % nobody
    wait_until(lambda: "refused a connection from uid %d" % nobody in srv.stderr_text(), 5,
               what="the refusal in the log")
    assert srv.alive()


def test_no_takeover_starts_fresh(server_factory):
    srv = server_factory()
    other = server_factory(successor_of=srv, extra_args=["--no-takeover"])
    assert other.ready["takeover"] is False and other.ready["epoch"] == 0
    assert other.ready["listen"] != srv.ready["listen"]  # port 0 in the config: a fresh socket
    assert srv.alive()


def _tool(name: str) -> str:
    from conftest import BATON_BIN
    path = os.path.join(os.path.dirname(os.path.abspath(BATON_BIN)), "bench", name)
    if not os.access(path, os.X_OK):
        pytest.skip("%s is not built" % path)
    return path


def _quit_load(load, windows):
    """Ends a tunnel_load run (`mark end`, `quit`): adds the last window
    lines to `windows`, checks it exited 0 with no stream error, and returns
    its done line."""
    load.stdin.write(b"mark end\nquit\n")
    load.stdin.flush()
    lines = _json_lines(load, lambda o: o.get("event") == "done", 60)
    windows += [o for o in lines if "window" in o]
    done = lines[-1]
    assert load.wait(scaled(30)) == 0
    assert done["errors_total"] == 0, done["error_samples"]
    return done


def _json_lines(proc, want, timeout):
    """Reads JSON lines from proc.stdout until one satisfies want(obj); returns all read."""
    import json
    import select
    out = []
    deadline = time.monotonic() + scaled(timeout)
    fd = proc.stdout.fileno()
    buf = b""
    while True:
        rem = deadline - time.monotonic()
        assert rem > 0, "timed out; lines so far: %r" % out
        r, _, _ = select.select([fd], [], [], rem)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, "process ended; lines so far: %r" % out
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            obj = json.loads(line)
            out.append(obj)
            if want(obj):
                return out


def test_twenty_restarts_under_load(server_factory, certs):
    """200 tunnels x 5 streams doing request/response with byte checks, and a
    connector opening new tunnels all the time, while baton is hot-restarted
    20 times in a row: no stream error, no reconnect (every tunnel keeps its
    local port), no refused or failed new tunnel, every old process gone
    within 1 s of its successor's start, every restart a new pid."""
    up = subprocess.Popen([_tool("bench_upstream")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    load = None
    try:
        echo = _json_lines(up, lambda o: o.get("event") == "ready", 10)[-1]["echo"]
        srv = server_factory(routes={"echo": echo}, limits={"max_tunnels": 1000})
        env = dict(os.environ, BATON_TOKEN=TOKEN)
        load = subprocess.Popen([_tool("tunnel_load"), "--server", "%s:%d" % srv.addr, "--ca", str(certs.ca_crt),
                                 "--server-name", "localhost", "--route", "echo", "--tunnels", "200", "--streams", "5",
                                 "--churn", "1", "--timeout-ms", str(int(scaled(60) * 1000))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready = _json_lines(load, lambda o: "event" in o, 90)[-1]
        assert ready.get("event") == "ready", ready
        pids = {srv.pid}
        gones = []
        windows = []
        for i in range(20):
            load.stdin.write(b"mark restart%d\n" % i)
            load.stdin.flush()
            windows += _json_lines(load, lambda o: "window" in o, 30)
            srv, gone = hot_restart(server_factory, srv)
            assert srv.pid not in pids
            pids.add(srv.pid)
            gones.append(gone)
            assert srv.ready["tunnels"] >= 200, srv.ready
        done = _quit_load(load, windows)
        assert done["port_changes_total"] == 0, done["error_samples"]
        assert done["churn_failures_total"] == 0, done["churn_failure_samples"]
        assert done["churn_ok_total"] > 0
        # traffic flowed in every window between restarts, and nothing stalled
        # (the last window, "end", lasts no time: quit follows at once)
        assert [w["window"] for w in windows[1:-1]] == ["restart%d" % i for i in range(20)]
        for w in windows[1:-1]:
            assert w["rtts"] > 0, "\n".join(json.dumps(x) for x in windows)
            assert w["stalled_streams"] == 0, w
        assert max(gones) < scaled(1.0), "old processes took %s s to exit" % ["%.2f" % g for g in gones]
        print("20 restarts: old process gone after %.0f..%.0f ms; longest round trip per window: %s ms" % (
            1000 * min(gones), 1000 * max(gones), [w["max_us"] // 1000 for w in windows]))
    finally:
        if load and load.poll() is None:
            load.kill()
            load.wait()
        up.kill()
        up.wait()


def test_client_stuck_in_handshake_does_not_hold_the_restart(server_factory, tunnel_factory):
    """A connection that never finishes its TLS handshake is closed after half
    of handoff.timeout_ms; everything else moves and the old process exits."""
    srv = server_factory(handoff_timeout_ms=1000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stuck = socket.create_connection(srv.addr)
    stuck.sendall(b"\x16\x03\x01")  # the start of a record header, and then nothing
    # one loop turn of the server after the connection was queued: it has accepted it
    assert t.ping(77).has(bw.FLAG_ACK)
    new, gone = hot_restart(server_factory, srv)
    assert new.ready["tunnels"] == 1
    stuck.settimeout(scaled(5))
    try:
        assert stuck.recv(100) == b""
    except ConnectionResetError:
        pass
    assert "still in their TLS handshake" in srv.stderr_text()
    stream_echo(s, b"moved while the other one was stuck")
