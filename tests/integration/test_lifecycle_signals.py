"""SIGTERM and SIGINT at each step of a hot restart, to either process
(docs/operations.md, "When lifecycle events meet"), and the drains around a
restart: after a committed one, and twice in a row.

The processes are stopped at a step with the handoff test hooks
(BATON_TEST_HANDOFF_STOP_AT for the new process, ..._PARENT_STOP_AT for the
old one); the signal is sent while the process is stopped and acted on when
it continues, so it lands exactly there.

The rules:
- To the old process before it commits: SIGTERM drains (the restart is called
  off, every exported tunnel comes back, the new process exits 1); SIGINT
  calls the restart off the same way and then stops at once.
- To the old process once it committed (stopped at `commit`): it has handed
  everything over and exits; the new process serves every tunnel.
- To the new process: it calls the takeover off (exits 0, "takeover called
  off") and the old process keeps every tunnel and stays ready; or, if the
  old process had already committed (its commit crossed our abort), the new
  process has every tunnel and then does what the signal says (SIGTERM
  drains). Which of the two happens at `listening`, `batch` and `ack`
  depends on which message is read first; either way nothing is lost, and the
  tests tell which one happened and check it whole.
"""

import os
import signal

import pytest

import baton_wire as bw
from conftest import Admin, TOKEN, proc_state, scaled, stream_echo, wait_until

DRAIN = "drain:\n  delay_ms: 0\n  spread_ms: 0\n  grace_ms: 15000\n"
STREAMS = 4
IDLE = 6  # one batch: the steps "batch" and "ack" then meet the commit (test_hot_restart covers two batches)


def open_tunnels(srv, tunnel_factory):
    """STREAMS tunnels with one echo stream each, and IDLE idle tunnels."""
    with_streams = []
    for _ in range(STREAMS):
        t = tunnel_factory(srv, timeout=scaled(30))
        s = t.open_stream("echo")
        assert s.wait_acked(scaled(10))
        stream_echo(s, b"before")
        with_streams.append((t, s))
    idle = [tunnel_factory(srv, timeout=scaled(30)) for _ in range(IDLE)]
    return with_streams, idle


def stop_then_signal(proc, sig):
    """`proc` is stopped at its hook: the signal waits until SIGCONT."""
    wait_until(lambda: proc_state(proc.pid) == "T", scaled(20), what="pid %d to stop at its step" % proc.pid)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)


def assert_ends(stream):
    """The stream ends (its tunnel was closed at once) rather than hang."""
    try:
        stream.recv_all(scaled(10))
    except ConnectionError:
        pass


def ready_status(admin_addr):
    class A:
        ready = {"admin": admin_addr}
    return Admin(A).request("GET", "/readyz").status


def tunnels_in(srv):
    return Admin(srv).get_json("/stats")["tunnels"]["active"]


def check_old_kept_everything(srv, new, with_streams, client_ctx):
    """The new process called the takeover off; the old one serves on."""
    assert new.wait_exit(scaled(20)) == 0, new.stderr_text()[-3000:]
    assert "takeover called off" in new.stderr_text(), new.stderr_text()[-3000:]
    assert new.ready is None
    assert srv.alive(), srv.stderr_text()[-3000:]
    wait_until(lambda: "handoff: resumed" in srv.stderr_text(), scaled(20), what="the old process to resume")
    for _, s in with_streams:
        stream_echo(s, b"still the old process")
    assert tunnels_in(srv) == STREAMS + IDLE
    assert ready_status(srv.ready["admin"]) == 200
    assert Admin(srv).get_json("/drain")["draining"] is False
    late = bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
    s = late.open_stream("echo")
    assert s.wait_acked(scaled(10))
    stream_echo(s, b"new tunnels are accepted")
    late.close()


def check_new_has_everything(srv, new, with_streams, echo=True):
    """The old process committed: it exits, and the new one has every tunnel
    (and serves them, unless it was told to stop at once: echo=False)."""
    ready = new.wait_ready(scaled(20))
    assert srv.wait_exit(scaled(20)) == 0, srv.stderr_text()[-3000:]
    assert "handoff: committed to pid %d" % new.pid in srv.stderr_text()
    assert ready["takeover"] is True and ready["tunnels"] == STREAMS + IDLE, ready
    for _, s in with_streams if echo else []:
        stream_echo(s, b"now the new process")


def check_drains_with_every_tunnel(proc, with_streams, admin_addr):
    """`proc` drains: DRAIN to every tunnel, readiness 503, streams go on,
    and it exits 0 once they end."""
    for t, s in with_streams:
        assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
        stream_echo(s, b"the drain lets streams finish")
    assert ready_status(admin_addr) == 503
    for _, s in with_streams:
        s.close_write()
        s.recv_all(scaled(10))
    assert proc.wait_exit(scaled(20)) == 0, proc.stderr_text()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("step", ["hello", "listening", "batch", "ack"])
def test_signal_to_the_new_process_at_each_step(server_factory, tunnel_factory, client_ctx, step, sig):
    srv = server_factory(extra=DRAIN, limits={"max_tunnels": 1000})
    with_streams, idle = open_tunnels(srv, tunnel_factory)
    new = server_factory(successor_of=srv, env={"BATON_TEST_HANDOFF_STOP_AT": step}, wait=False)
    stop_then_signal(new, sig)
    wait_until(lambda: "takeover called off" in new.stderr_text() or "took over" in new.stderr_text(), scaled(30),
               what="the new process to call the takeover off or take over")
    if "took over" in new.stderr_text():
        # The old process committed before it read our abort.
        assert step != "hello", "nothing can be committed before the new process listens"
        check_new_has_everything(srv, new, with_streams, echo=sig == signal.SIGTERM)
        if sig == signal.SIGTERM:
            check_drains_with_every_tunnel(new, with_streams, new.ready["admin"])
        else:
            assert new.wait_exit(scaled(20)) == 0
            for _, s in with_streams:
                assert_ends(s)
    else:
        check_old_kept_everything(srv, new, with_streams, client_ctx)
    for t in idle[:3]:
        t.close()


# At `commit` the old process has handed everything over by the time it
# reads the signal.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("step", ["hello", "listening", "batch", "commit"])
def test_signal_to_the_old_process_at_each_step(server_factory, tunnel_factory, step, sig):
    srv = server_factory(extra=DRAIN, limits={"max_tunnels": 1000}, env={"BATON_TEST_HANDOFF_PARENT_STOP_AT": step})
    with_streams, idle = open_tunnels(srv, tunnel_factory)
    new = server_factory(successor_of=srv, wait=False)
    stop_then_signal(srv, sig)
    if step == "commit":
        check_new_has_everything(srv, new, with_streams)
        assert ready_status(new.ready["admin"]) == 200
        return
    assert new.wait_exit(scaled(20)) == 1, new.stderr_text()[-3000:]
    err = new.stderr_text()
    if sig == signal.SIGTERM:
        assert "a drain started (SIGTERM)" in err, err[-3000:]
        wait_until(lambda: "handoff: resumed" in srv.stderr_text(), scaled(20), what="the old process to resume")
        assert "handoff: resumed %d tunnels" % (STREAMS + IDLE) in srv.stderr_text() or step == "hello"
        check_drains_with_every_tunnel(srv, with_streams, srv.ready["admin"])
    else:
        assert "this process is stopping at once" in err, err[-3000:]
        assert srv.wait_exit(scaled(20)) == 0, srv.stderr_text()[-3000:]
        for _, s in with_streams:
            assert_ends(s)
    assert new.ready is None


def test_drain_after_a_committed_restart(server_factory, tunnel_factory):
    """After a hot restart the drain is the new process's: POST /drain on the
    (same) admin port reaches it, its tunnels get DRAIN, it exits 0 once
    their streams end."""
    srv = server_factory(extra=DRAIN)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    new = server_factory(successor_of=srv)
    assert srv.wait_exit(scaled(20)) == 0
    assert new.ready["tunnels"] == 1
    assert Admin(new).request("POST", "/drain").status == 200
    check_drains_with_every_tunnel(new, [(t, s)], new.ready["admin"])


def test_drain_twice(server_factory, tunnel_factory):
    """POST /drain twice: the second answers with the drain in progress and
    changes nothing (one DRAIN per tunnel, same start); `baton drain` then
    too. A SIGTERM during the drain stops at once (a second SIGTERM is the
    way to cut a drain short)."""
    srv = server_factory(extra=DRAIN)
    t = tunnel_factory(srv)
    s = t.open_stream("echo")
    assert s.wait_acked(scaled(10))
    a = Admin(srv)
    first = a.request("POST", "/drain")
    assert first.status == 200
    assert t.next_control(scaled(10)).type == bw.MSG_DRAIN
    second = a.request("POST", "/drain")
    assert second.status == 200
    d1, d2 = first.json(), second.json()
    assert d1["draining"] is True and d2["draining"] is True, (d1, d2)
    assert d2["elapsed_ms"] >= d1["elapsed_ms"], (d1, d2)  # the same drain, not a new one
    with pytest.raises(TimeoutError):
        t.next_control(0.5)  # no second DRAIN
    stream_echo(s, b"the stream goes on")
    assert ready_status(srv.ready["admin"]) == 503
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait_exit(scaled(20)) == 0
    assert "closing 1 tunnels now" in srv.stderr_text()
