"""The bench tools that speak baton's protocol (make bench runs them for
minutes) work against a real server: each does its HELLO / WELCOME and its
job briefly here, so a change to the wire or to bench/control.h cannot
silently break `make bench`."""
import json
import os
import subprocess

import pytest

from conftest import BATON_BIN, TOKEN, scaled


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(BATON_BIN)), "bench", name)
    assert os.access(path, os.X_OK), "%s is not built (meson target test-needs)" % path
    return path


@pytest.fixture
def bench_upstream():
    up = subprocess.Popen([_tool("bench_upstream")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready = json.loads(up.stdout.readline())
        assert ready.get("event") == "ready", ready
        yield ready
    finally:
        up.kill()
        up.wait(10)


@pytest.fixture
def bench_server(server_factory, bench_upstream):
    return server_factory(routes={"echo": bench_upstream["echo"], "sink": bench_upstream["sink"]})


def _common(srv, certs):
    return ["--server", "%s:%d" % srv.addr, "--ca", str(certs.ca_crt), "--server-name", "localhost"]


def _last_json(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


def test_idle_tunnels_open_and_hold(bench_server, certs):
    r = subprocess.run([_tool("idle_tunnels")] + _common(bench_server, certs) +
                       ["--token", TOKEN, "--count", "20", "--concurrency", "5", "--timeout-s", "20", "--hold-s", "1"],
                       capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode == 0, r.stderr[-3000:]
    ready = _last_json(r.stdout)
    assert ready["event"] == "ready" and ready["count"] == 20 and ready["failed"] == 0, ready


def test_peer_load_round_trips_through_a_tunnel(bench_server, certs):
    r = subprocess.run([_tool("peer_load"), "rr", "--proto", "baton"] + _common(bench_server, certs) +
                       ["--conns", "2", "--seconds", "0.5", "--warmup-s", "0.1", "--timeout-s", "20"],
                       capture_output=True, text=True, timeout=scaled(60), env=dict(os.environ, BATON_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr[-3000:]
    res = _last_json(r.stdout)
    assert res["mode"] == "rr" and res["rtts"] > 0 and res["errors"] == 0 and res["refused"] == 0, res


def test_bench_push_reaches_the_sink(bench_server, certs):
    r = subprocess.run([_tool("bench_push")] + _common(bench_server, certs) + ["--route", "sink", "--bytes", "4MiB"],
                       capture_output=True, text=True, timeout=scaled(60), env=dict(os.environ, BATON_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr[-3000:]
    res = _last_json(r.stdout)
    assert res["bytes"] == 4 << 20 and res["mib_s"] > 0, res
