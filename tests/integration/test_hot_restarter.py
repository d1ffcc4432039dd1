"""scripts/hot-restart/hot-restarter: the PID-1 wrapper that turns SIGHUP
into a hot restart, keeps the current baton when the next one fails, forwards
SIGTERM and exits with the baton's status."""

import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path


from conftest import BATON_BIN, scaled

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "scripts" / "hot-restart" / "hot-restarter"


class Wrapper:
    def __init__(self, argv, env, workdir):
        self.stderr_path = workdir / "hot-restarter.stderr"
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"),
                                     stdin=subprocess.DEVNULL, env=env)
        self.events = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def next_event(self, kind, timeout=20.0):
        while True:
            ev = self.events.get(timeout=scaled(timeout))
            if ev.get("event") == kind:
                return ev

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_sighup_restarts_failed_start_keeps_serving_sigterm_forwards(server_factory, tunnel_factory, tmp_path):
    # a config the wrapper's batons will use (taken from a normal server, then stopped)
    # SIGTERM drains before exiting: no delay, a short grace for this test
    proto = server_factory(extra="drain:\n  delay_ms: 0\n  grace_ms: 3000\n")
    cfg = proto.config_path
    proto.stop()
    args_file = tmp_path / "args"
    args_file.write_text("\n".join([BATON_BIN, "serve", "-c", str(cfg)]) + "\n")
    env = dict(os.environ, BATON_RESTART_ARGS_FILE=str(args_file))
    w = Wrapper([str(WRAPPER), "--ready-timeout", str(scaled(20)), "--", BATON_BIN, "serve", "-c", str(cfg)], env,
                tmp_path)
    try:
        first = w.next_event("ready")
        assert first["epoch"] == 0

        class Addr:  # what tunnel_factory needs of a server
            addr = tuple([first["listen"].rsplit(":", 1)[0], int(first["listen"].rsplit(":", 1)[1])])

        t = tunnel_factory(Addr)
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        s.send(b"one")
        assert s.recv_exactly(3, scaled(10)) == b"one"

        # SIGHUP: a new baton takes over; the old one exits; the stream goes on
        w.proc.send_signal(signal.SIGHUP)
        second = w.next_event("ready")
        assert second["epoch"] == 1 and second["takeover"] is True and second["tunnels"] == 1
        assert second["pid"] != first["pid"]
        s.send(b"two")
        assert s.recv_exactly(3, scaled(10)) == b"two"

        # SIGHUP with a broken command: the current baton keeps serving
        args_file.write_text("\n".join([BATON_BIN, "serve", "-c", str(tmp_path / "missing.yaml")]) + "\n")
        w.proc.send_signal(signal.SIGHUP)
        for _ in range(int(scaled(100))):
            if "failed to start" in w.stderr():
                break
            try:
                w.events.get(timeout=0.1)
            except queue.Empty:
                pass
        assert "failed to start" in w.stderr(), w.stderr()
        assert pid_alive(second["pid"])
        s.send(b"three")
        assert s.recv_exactly(5, scaled(10)) == b"three"

        # and a good one again
        args_file.write_text("\n".join([BATON_BIN, "serve", "-c", str(cfg)]) + "\n")
        w.proc.send_signal(signal.SIGHUP)
        third = w.next_event("ready")
        assert third["epoch"] == 2
        s.send(b"four")
        assert s.recv_exactly(4, scaled(10)) == b"four"

        # SIGTERM goes to the current baton, which drains (the live tunnel is
        # told to move; its stream ends here) and exits; the wrapper exits with its status
        w.proc.send_signal(signal.SIGTERM)
        msg = t.next_control(scaled(10))
        assert msg.type == 4, msg  # DRAIN
        s.close_write()
        assert w.proc.wait(scaled(20)) == 0
        for ev in (first, second, third):
            assert not pid_alive(ev["pid"]), "baton pid %d outlived the wrapper" % ev["pid"]
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_two_wrappers_share_the_socket_hot_upgrade(server_factory, tunnel_factory, tmp_path):
    """The two-container hot upgrade (docs/kubernetes.md): two wrappers (two
    containers) share the handoff socket. Starting the second one moves the
    tunnels to it; the first stays up on standby with no baton (its container
    is not restarted, which would take the tunnels back); SIGHUP on the
    standby one moves them back; SIGTERM on a standby wrapper exits 0."""
    proto = server_factory(extra="drain:\n  delay_ms: 0\n  grace_ms: 3000\n")
    cfg = proto.config_path
    proto.stop()
    argv = [str(WRAPPER), "--ready-timeout", str(scaled(20)), "--", BATON_BIN, "serve", "-c", str(cfg)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Wrapper(argv, dict(os.environ), tmp_path / "a")
    b = None
    try:
        first = a.next_event("ready")

        class Addr:
            addr = tuple([first["listen"].rsplit(":", 1)[0], int(first["listen"].rsplit(":", 1)[1])])

        t = tunnel_factory(Addr)
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        s.send(b"on a")
        assert s.recv_exactly(4, scaled(10)) == b"on a"

        b = Wrapper(argv, dict(os.environ), tmp_path / "b")
        second = b.next_event("ready")
        assert second["takeover"] is True and second["tunnels"] == 1, second
        s.send(b"on b")
        assert s.recv_exactly(4, scaled(10)) == b"on b"
        # a's baton is gone, a itself stands by
        for _ in range(int(scaled(200))):
            if "standing by" in a.stderr():
                break
            try:
                a.events.get(timeout=0.05)
            except queue.Empty:
                pass
        assert "standing by" in a.stderr(), a.stderr()
        assert a.proc.poll() is None, "the standby wrapper exited (its container would restart)"
        assert not pid_alive(first["pid"])

        # SIGHUP on the standby wrapper: its new baton takes the tunnel back
        a.proc.send_signal(signal.SIGHUP)
        third = a.next_event("ready")
        assert third["takeover"] is True and third["tunnels"] == 1 and third["epoch"] == 2, third
        s.send(b"on a again")
        assert s.recv_exactly(10, scaled(10)) == b"on a again"
        for _ in range(int(scaled(200))):
            if "standing by" in b.stderr():
                break
            try:
                b.events.get(timeout=0.05)
            except queue.Empty:
                pass
        assert "standing by" in b.stderr(), b.stderr()
        assert b.proc.poll() is None

        # SIGTERM on the standby wrapper: exits 0 and the tunnel is untouched
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(scaled(10)) == 0
        s.send(b"still")
        assert s.recv_exactly(5, scaled(10)) == b"still"
        s.close_write()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(scaled(20)) == 0
    finally:
        for w in (a, b):
            if w is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
