"""When lifecycle events meet (docs/operations.md, "When lifecycle events
meet"): drain x hot restart in either order, restart x restart, SIGTERM during
a handoff, and SIGHUPs to the hot-restarter while a restart is starting.

The rules under test: a drain is never undone (a restart that meets one is
refused, or called off if it was under way); readiness never says "ready"
while the listener is closed; a new process refused by a live old one exits 1
and never starts a second server beside it; no SIGHUP is lost."""

import os
import signal
import subprocess

import pytest

import baton_wire as bw
from conftest import Admin, BATON_BIN, echo_roundtrip, proc_state, scaled, stream_echo, wait_until
from test_hot_restarter import WRAPPER, Wrapper

DRAIN = "drain:\n  delay_ms: 0\n  spread_ms: 0\n  grace_ms: %d\n"


def ready_status(srv):
    return Admin(srv).request("GET", "/readyz").status


def test_hot_restart_during_a_drain_is_refused(server_factory, tunnel_factory):
    """Drain first (grace 15 s, one live stream), then a second `baton serve`:
    it is refused with the reason and exits 1; the old process goes on
    draining, readiness stays 503, the live stream keeps working, and the
    drain ends when that stream does."""
    srv = server_factory(extra=DRAIN % 15000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"before")
    assert Admin(srv).request("POST", "/drain").status == 200
    assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
    new = server_factory(successor_of=srv, wait=False)
    assert new.wait_exit(20) == 1
    err = new.stderr_text()
    assert "this baton is draining" in err or "not starting a second server" in err, err
    assert new.ready is None
    assert "refused: this baton is draining" in srv.stderr_text()
    assert ready_status(srv) == 503
    d = Admin(srv).get_json("/drain")
    assert d["draining"] is True, d
    stream_echo(s, b"the drain goes on")
    s.close_write()
    s.recv_all(scaled(10))
    assert srv.wait_exit(20) == 0


@pytest.mark.parametrize("trigger", ["POST /drain", "SIGTERM"])
def test_drain_during_a_hot_restart_calls_it_off(server_factory, tunnel_factory, trigger):
    """A restart under way (the new process stopped after `listening`, the
    tunnel already exported to it), then a drain of the old process: the
    handoff is called off, the tunnel resumes in the old process and is told
    to move, readiness is 503 and stays so, and the new process exits 1."""
    srv = server_factory(extra=DRAIN % 15000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"before")
    new = server_factory(successor_of=srv, env={"BATON_TEST_HANDOFF_STOP_AT": "listening"}, wait=False)
    wait_until(lambda: proc_state(new.pid) == "T", scaled(20), what="the new process to stop after listening")
    if trigger == "SIGTERM":
        srv.proc.send_signal(signal.SIGTERM)
    else:
        assert Admin(srv).request("POST", "/drain").status == 200
    assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
    assert "resuming everything here" in srv.stderr_text()
    stream_echo(s, b"the stream came back and goes on")
    assert ready_status(srv) == 503
    os.kill(new.pid, signal.SIGCONT)
    assert new.wait_exit(20) == 1
    assert "a drain started" in new.stderr_text(), new.stderr_text()
    assert ready_status(srv) == 503
    assert Admin(srv).get_json("/drain")["draining"] is True
    stream_echo(s, b"still the old process")
    s.close_write()
    s.recv_all(scaled(10))
    assert srv.wait_exit(20) == 0


def test_second_new_process_during_a_restart_exits_without_serving(server_factory, tunnel_factory, certs):
    """Two new processes at once: the one that comes second is refused while
    the first holds the handoff. It must exit 1, not decide the old process is
    gone and start a second server (with `listen: ...:0` it could)."""
    srv = server_factory(handoff_timeout_ms=4000)
    t = tunnel_factory(srv)
    first = server_factory(successor_of=srv, env={"BATON_TEST_HANDOFF_STOP_AT": "hello"}, wait=False)
    wait_until(lambda: proc_state(first.pid) == "T", scaled(20), what="the first new process to stop after hello")
    for _ in range(3):
        second = server_factory(successor_of=srv, wait=False)
        assert second.wait_exit(20) == 1, "the second new process did not exit"
        err = second.stderr_text()
        assert "starting fresh" not in err, err
        assert "another new process is taking over" in err or "not starting a second server" in err, err
    first.kill()
    # The old process gave up on the first (step timeout) and serves on.
    wait_until(lambda: "resuming everything here" in srv.stderr_text(), scaled(15), what="the old process to give up")
    assert echo_roundtrip(t, b"old process serves on") == b"old process serves on"
    assert ready_status(srv) == 200


def test_sighups_during_a_restart_are_not_lost(server_factory, tunnel_factory, tmp_path):
    """A configuration change signalled while a restart is still starting is
    applied: the wrapper runs one more restart after it (several SIGHUPs make
    one)."""
    proto = server_factory(extra=DRAIN % 3000)
    cfg = proto.config_path
    proto.stop()
    cfg2 = tmp_path / "second.yaml"
    cfg2.write_text(cfg.read_text().replace("server_id: test-server", "server_id: second-config"))
    args_file = tmp_path / "args"
    args_file.write_text("\n".join([BATON_BIN, "serve", "-c", str(cfg)]) + "\n")
    env = dict(os.environ, BATON_RESTART_ARGS_FILE=str(args_file))
    w = Wrapper([str(WRAPPER), "--ready-timeout", str(scaled(20)), "--", BATON_BIN, "serve", "-c", str(cfg)], env,
                tmp_path)
    try:
        first = w.next_event("ready")

        class Addr:
            addr = tuple([first["listen"].rsplit(":", 1)[0], int(first["listen"].rsplit(":", 1)[1])])

        assert tunnel_factory(Addr).welcome.text(0x06) == "test-server"
        # The first restart starts slowly (a shell that waits a second before
        # exec'ing baton), so the storm below lands while it is pending.
        args_file.write_text("\n".join(["/bin/sh", "-c", "sleep 1; exec \"$0\" serve -c \"$1\"", BATON_BIN,
                                        str(cfg)]) + "\n")
        w.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: started pid" in w.stderr(), scaled(10), what="the first restart to start")
        args_file.write_text("\n".join([BATON_BIN, "serve", "-c", str(cfg2)]) + "\n")
        for _ in range(40):
            w.proc.send_signal(signal.SIGHUP)
        second = w.next_event("ready")
        assert second["epoch"] == 1
        third = w.next_event("ready")
        assert third["epoch"] == 2, third
        assert tunnel_factory(Addr).welcome.text(0x06) == "second-config"
        assert "another one follows it" in w.stderr()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(scaled(20)) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


@pytest.mark.parametrize("trigger", ["POST /drain", "baton drain", "SIGTERM"])
def test_idle_drain_with_no_delay_exits_zero_50_times(server_factory, trigger):
    """The crash on drain (a drain that ends inside POST /drain destroyed the
    admin under its own callback): an idle process with drain.delay_ms 0
    exits 0 through each trigger, 50 runs in a row (release and ASan; 10
    under TSan, whose pass checks the threads rather than the count)."""
    for i in range(10 if os.environ.get("BATON_TEST_TSAN") == "1" else 50):
        srv = server_factory(extra=DRAIN % 5000)
        if trigger == "POST /drain":
            r = Admin(srv).request("POST", "/drain")
            assert r.status == 200, (i, r)
        elif trigger == "baton drain":
            d = subprocess.run([BATON_BIN, "drain", "--wait", "--admin", srv.ready["admin"]], capture_output=True,
                               timeout=scaled(20))
            assert d.returncode == 0, (i, d.stderr)
        else:
            srv.proc.send_signal(signal.SIGTERM)
        assert srv.wait_exit(20) == 0, (i, srv.stderr_text())
