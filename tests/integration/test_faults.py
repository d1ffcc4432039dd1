"""Faults (issue 8): kill -9 of the old process at every handoff step (the
new process's side is test_hot_restart.py), the handoff socket path taken by
a stale file or by another user's process, logs on a full disk. (Descriptor
exhaustion: test_admin.py::test_emfile_pauses_accepting_and_recovers.)"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import baton_wire as bw
from conftest import TOKEN, proc_state, scaled, stream_echo, wait_until


def stream_alive(s: bw.Stream) -> bool:
    try:
        stream_echo(s, b"alive?", timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means the stream did not survive
        return False


# What the new process must have when the old one dies (kill -9) at each step.
# "all": every tunnel survives; "some": the first batch's tunnels survive;
# "none": the old process's tunnels die with it. In every case the new process
# serves: new tunnels work.
OLD_KILLED = {"hello": "none", "listening": "none", "batch": "some", "commit": "all"}


@pytest.mark.parametrize("step", list(OLD_KILLED))
def test_old_process_killed_at_each_step(server_factory, tunnel_factory, client_ctx, step):
    srv = server_factory(env={"BATON_TEST_HANDOFF_PARENT_STOP_AT": step}, limits={"max_tunnels": 1000})
    streams = []
    for _ in range(130):  # two batches (descriptors per message)
        t = tunnel_factory(srv, timeout=30)
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        streams.append(s)
    stream_echo(streams[0], b"before")
    new = server_factory(successor_of=srv, wait=False)
    wait_until(lambda: proc_state(srv.pid) == "T", 20, what="the old process to stop at step " + step)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)
    ready = new.wait_ready(timeout=30)
    assert new.alive(), new.stderr_text()[-3000:]
    err = new.stderr_text()
    if step == "hello":
        assert "the old process is gone, starting fresh" in err, err[-3000:]
        assert ready["takeover"] is False, ready
    else:
        assert ready["takeover"] is True, ready
    alive = sum(1 for s in streams if stream_alive(s))
    expect = OLD_KILLED[step]
    if expect == "all":
        assert alive == len(streams), (alive, err[-3000:])
    elif expect == "some":
        assert 0 < alive < len(streams), (alive, err[-3000:])
        assert alive == ready["tunnels"], (alive, ready)
    else:
        assert alive == 0, alive
    # New tunnels work in every case.
    t = bw.Tunnel.connect(new.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"a new tunnel after the old process was killed at " + step.encode())
    t.close()


def test_stale_socket_file_is_replaced(server_factory, short_tmp, tunnel_factory):
    """A socket file left by a process that died (nobody accepts on it): the
    new process starts fresh, and its own handoff socket replaces the file."""
    path = short_tmp / "handoff0.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound, never listening: connect() gets ECONNREFUSED
    assert path.is_socket()
    srv = server_factory()
    assert srv.ready["takeover"] is False
    t = tunnel_factory(srv)
    st = t.open_stream("echo")
    assert st.wait_acked(scaled(10))
    # The file is now this process's: a successor takes over through it.
    new = server_factory(successor_of=srv)
    assert new.ready["takeover"] is True and new.ready["tunnels"] == 1, new.ready
    stream_echo(st, b"moved through the replaced socket")


def test_socket_path_taken_by_a_regular_file(baton_bin, certs, tmp_path, short_tmp):
    from conftest import make_config
    path = short_tmp / "not-a-socket"
    path.write_text("precious data\n")
    cfg = tmp_path / "baton.yaml"
    cfg.write_text(make_config(certs, {"echo": "127.0.0.1:9"}, str(path)))
    r = subprocess.run([baton_bin, "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=scaled(30))
    assert r.returncode != 0
    assert "exists and is not a socket" in r.stderr, r.stderr
    assert path.read_text() == "precious data\n", "the file was touched"


@pytest.mark.root_only("runs a process as another uid")
def test_socket_path_held_by_another_users_process(baton_bin, certs, tmp_path):
    """Another user's process listens on the handoff socket path: baton must
    not take over from it (it could hand over descriptors and keys of its
    own), and says so."""
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="baton-foreign-"))
    try:
        d.chmod(0o777)
        path = d / "handoff.sock"
        # The foreign "old process": accepts, records what it got, sends nothing.
        script = ("import os, socket, sys\n"
                  "os.setgid(%d); os.setuid(%d)\n"
                  "s = socket.socket(socket.AF_UNIX); s.bind(%r); s.listen(4)\n"
                  "print('listening', flush=True)\n"
                  "c, _ = s.accept(); data = c.recv(65536)\n"
                  "print('got %%d bytes' %% len(data), flush=True)\n"
                  "c.recv(1)\n") % (nobody.pw_gid, nobody.pw_uid, str(path))
        foreign = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert foreign.stdout.readline().strip() == "listening"
            from conftest import make_config
            cfg = tmp_path / "baton.yaml"
            cfg.write_text(make_config(certs, {"echo": "127.0.0.1:9"}, str(path)))
            r = subprocess.run([baton_bin, "serve", "-c", str(cfg)], capture_output=True, text=True,
                               timeout=scaled(30))
            assert r.returncode == 1, (r.returncode, r.stderr)
            assert "is not this user's: refusing to take over" in r.stderr, r.stderr
            assert "uid %d" % nobody.pw_uid in r.stderr, r.stderr
        finally:
            foreign.kill()
            out = foreign.communicate(timeout=10)[0]
        # It may have seen the connection, but not one byte of a hello.
        assert "got 0 bytes" in out or "got" not in out, out
    finally:
        subprocess.run(["rm", "-rf", str(d)])


def test_logs_on_a_full_disk_do_not_stop_the_proxy(baton_bin, certs, echo_server, tmp_path, short_tmp,
                                                   client_ctx):
    """stderr (the log) on a full disk (/dev/full: every write fails with
    ENOSPC): baton keeps serving and stays up; it only loses the log lines."""
    from conftest import make_config
    cfg = tmp_path / "baton.yaml"
    cfg.write_text(make_config(certs, {"echo": echo_server.addr_str}, str(short_tmp / "h.sock")))
    full = open("/dev/full", "wb")
    p = subprocess.Popen([baton_bin, "serve", "-c", str(cfg), "--log-level", "debug"], stdout=subprocess.PIPE,
                         stderr=full, stdin=subprocess.DEVNULL)
    try:
        from conftest import read_json_line
        ready, _ = read_json_line(p, scaled(10))
        host, port = ready["listen"].rsplit(":", 1)
        for i in range(20):  # every tunnel logs several lines at debug
            t = bw.Tunnel.connect((host, int(port)), token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
            s = t.open_stream("echo")
            assert s.wait_acked(scaled(10))
            stream_echo(s, b"logging into a full disk %d" % i)
            t.close()
        with pytest.raises(bw.Rejected):  # an error path logs too
            bw.Tunnel.connect((host, int(port)), token=b"wrong", ctx=client_ctx, timeout=scaled(10))
        assert p.poll() is None, "baton exited with its log on a full disk"
        p.send_signal(signal.SIGINT)
        assert p.wait(scaled(10)) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        full.close()


