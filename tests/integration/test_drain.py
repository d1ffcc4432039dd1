"""Drain on pod termination (docs/operations.md "Drain"): SIGTERM or `baton
drain` -> readiness 503, DRAIN to every client, open streams finish, then the
process exits."""

import signal
import subprocess
import time

import baton_wire as bw
from conftest import BATON_BIN, proc_state, scaled, wait_until

FAST = "drain:\n  delay_ms: 0\n  spread_ms: 100\n  grace_ms: %d\n"


def echo(stream, data):
    stream.send(data)
    assert stream.recv_exactly(len(data), timeout=scaled(10)) == data


def test_baton_drain_wait_returns_when_the_last_stream_ends(server_factory, tunnel_factory):
    srv = server_factory(extra=FAST % 20000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    echo(s, b"before")
    d = subprocess.Popen([BATON_BIN, "drain", "--wait", "--admin", srv.ready["admin"]], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    msg = t.next_control(scaled(10))
    assert msg.type == bw.MSG_DRAIN and msg.text(0x0a) == "drain"
    echo(s, b"the open stream goes on")
    # a new stream on the drained tunnel is refused (Go Away sent)
    s2 = t.open_stream("echo")
    assert not s2.wait_acked(scaled(10))
    assert d.poll() is None, "baton drain --wait returned while a stream was open"
    t0 = time.monotonic()
    s.close_write()
    s.recv_all(scaled(10))
    out, err = d.communicate(timeout=scaled(20))
    assert d.returncode == 0, err
    assert srv.wait_exit(scaled(10)) == 0
    assert time.monotonic() - t0 < scaled(2), "the process lingered after its last stream ended"


def test_sigterm_drains_then_exits_at_grace(server_factory, tunnel_factory):
    """A stream longer than the grace period is cut at grace (the client sees
    the session end), never hung; a second SIGTERM is not needed."""
    srv = server_factory(extra=FAST % 800)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
    assert srv.wait_exit(scaled(10)) == 0
    took = time.monotonic() - t0
    assert 0.7 < took < scaled(3.5), took
    wait_until(lambda: t.closed, 5, what="the tunnel to be closed by the server")


def test_sigterm_while_exiting_keeps_the_clean_exit(server_factory):
    """A drain that ended by itself (the preStop hook's) is followed by the
    kubelet's SIGTERM, which may land while the process is on its way out,
    after its signal handlers are gone: the exit status stays 0, not
    "killed by SIGTERM" (143 in a container). The process stops itself right
    after it set the signals aside (BATON_TEST_STOP_AT=signals_off), gets
    SIGTERM and SIGINT there, and is let go."""
    srv = server_factory(extra=FAST % 20000, env={"BATON_TEST_STOP_AT": "signals_off"})
    srv.proc.send_signal(signal.SIGTERM)  # the drain: nothing to wait for, so it ends at once
    wait_until(lambda: proc_state(srv.pid) == "T", 20, what="the process to stop on its way out")
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.send_signal(signal.SIGINT)
    srv.proc.send_signal(signal.SIGCONT)
    assert srv.wait_exit(scaled(10)) == 0


def test_second_sigterm_exits_at_once(server_factory, tunnel_factory):
    srv = server_factory(extra=FAST % 60000)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    srv.proc.send_signal(signal.SIGTERM)
    assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
    assert srv.alive()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait_exit(scaled(5)) == 0
