"""`baton status`: the admin API's /stats as a table or as JSON, and its exit codes."""

import json
import re
import socket
import subprocess
import urllib.request

import pytest

from conftest import ADMIN_PORT_0, SERVER_ID, echo_roundtrip, scaled, wait_until


def run(args, timeout=30):
    return subprocess.run(args, capture_output=True, timeout=scaled(timeout), text=True)


def admin_of(server):
    return server.ready["admin"]


def stats(server):
    with urllib.request.urlopen("http://%s/stats" % admin_of(server), timeout=scaled(5)) as r:
        return json.loads(r.read())


def status(baton_bin, *args):
    return run([baton_bin, "status"] + list(args))


def row(text, first):
    """The table line whose first word is `first`."""
    for line in text.splitlines():
        if line.split()[:1] == [first]:
            return line
    raise AssertionError("no line starting with %r in:\n%s" % (first, text))


def test_status_table_shows_state_routes_and_limits(baton_bin, server_factory, tunnel_factory):
    srv = server_factory(routes=None, limits={"max_tunnels": 1, "warn_percent": 80})
    t = tunnel_factory(srv)
    data = b"x" * 3000
    assert echo_roundtrip(t, data) == data
    # byte counters reach the snapshot when the stream's bridge finishes
    wait_until(lambda: stats(srv)["routes"][0]["bytes_up"] == 3000, 10, what="3000 bytes up on route echo")

    r = status(baton_bin, "--admin", admin_of(srv))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pid %d" % srv.pid in out
    assert '"%s"' % SERVER_ID in out
    assert re.search(r"^state +serving \(ready\)$", out, re.M), out
    assert re.search(r"^drain +not draining", out, re.M), out
    assert re.search(r"^tunnels +1 active, 0 handshaking, 0 queued", out, re.M), out
    assert "established 1" in row(out, "totals")
    echo = row(out, "echo")
    assert echo.split()[1] == srv.config_text.split("  echo: ")[1].split()[0]  # the upstream
    assert "2.9 KiB" in echo, echo  # 3000 bytes each way
    # max_tunnels 1 with one tunnel: 100 %, at or above warn_percent
    lim = row(out, "max_tunnels")
    assert lim.split()[1:4] == ["1", "1", "100%"] and "<- high" in lim, lim
    assert "<- high" not in row(out, "max_queued_handshakes")
    assert re.search(r"^resources +rss [0-9.]+ [KMG]iB, \d+ open fds$", out, re.M), out


def test_status_routes_sorted_by_traffic(baton_bin, server_factory, tunnel_factory, upstream_factory):
    quiet = upstream_factory("echo")
    busy = upstream_factory("echo")
    # file order: quiet first; the table puts the busy route first
    srv = server_factory(routes={"quiet": quiet, "busy": busy})
    t = tunnel_factory(srv)
    assert echo_roundtrip(t, b"y" * 100, route="busy") == b"y" * 100
    wait_until(lambda: [x["bytes_up"] for x in stats(srv)["routes"]] == [0, 100], 10, what="100 bytes on busy")
    r = status(baton_bin, "--admin", admin_of(srv))
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.split("routes (by traffic)")[1].split("\n\n")[0].splitlines()[2:]]
    assert names == ["busy", "quiet"], r.stdout


def test_status_json_is_the_stats_document(baton_bin, server):
    r = status(baton_bin, "--admin", admin_of(server), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    direct = stats(server)
    assert set(got) == set(direct)
    for k in ("version", "pid", "server_id", "epoch", "state", "ready", "listen", "routes", "limits", "warn_percent"):
        if k == "limits":
            assert set(got[k]) == set(direct[k])
        else:
            assert got[k] == direct[k], k
    assert got["pid"] == server.pid and got["state"] == "serving" and got["ready"] is True
    assert [x["name"] for x in got["routes"]] == ["echo"]


def test_status_shows_drain(baton_bin, server):
    req = urllib.request.Request("http://%s/drain" % admin_of(server), method="POST")
    with urllib.request.urlopen(req, timeout=scaled(5)) as resp:
        assert json.loads(resp.read())["draining"] is True
    r = status(baton_bin, "--admin", admin_of(server))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^state +draining \(not ready\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^drain +draining for .* of 30s grace; 0 tunnels and 0 streams left$", r.stdout, re.M), r.stdout


@pytest.mark.skipif(not ADMIN_PORT_0, reason="needs the generated admin section")
def test_status_reads_admin_listen_from_config_wildcard_means_loopback(baton_bin, server, tmp_path):
    port = int(admin_of(server).rsplit(":", 1)[1])
    text = server.config_text.replace("admin:\n  listen: 127.0.0.1:0", "admin:\n  listen: 0.0.0.0:%d" % port)
    assert text != server.config_text
    cfg = tmp_path / "status.yaml"
    cfg.write_text(text)
    r = status(baton_bin, "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "pid %d" % server.pid in r.stdout
    assert "admin 127.0.0.1:%d" % port in r.stdout
    r = status(baton_bin, "--config=%s" % cfg, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pid"] == server.pid


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_status_unreachable_exit_1_names_the_address(baton_bin):
    port = free_port()
    for extra in ([], ["--json"]):
        r = status(baton_bin, "--admin", "127.0.0.1:%d" % port, *extra)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "127.0.0.1:%d" % port in r.stderr and "unreachable" in r.stderr, r.stderr
        assert r.stdout == ""


@pytest.mark.skipif(not ADMIN_PORT_0, reason="needs the generated admin section")
def test_status_config_with_admin_port_0_is_usage_error(baton_bin, server):
    r = status(baton_bin, "-c", str(server.config_path))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "port 0" in r.stderr and "--admin" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--admin"],
    ["--admin", "no-port"],
    ["--admin", "127.0.0.1:0"],
    ["-c", "/nonexistent/baton.yaml"],
    ["-c", "/nonexistent/baton.yaml", "--admin", "127.0.0.1:9901"],
])
def test_status_bad_usage_exit_2(baton_bin, args):
    r = status(baton_bin, *args)
    assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), "a usage error says what is wrong"
    assert r.stdout == ""
