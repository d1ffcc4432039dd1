"""Drain behind a load balancer (docs/operations.md "Drain", docs/protocol.md 6).

Three `baton serve` replicas behind HAProxy (Debian's, TCP mode) that
health-checks each replica's `/readyz`, standing in for a Kubernetes Service.
100 `baton connect` clients (50 under ASan/TSan; BATON_TEST_LB_CLIENTS sets
it) reach the replicas only through HAProxy; each carries continuous
request/response traffic: one long-lived local connection doing round trips
plus a stream of short connections (send, half-close, read the echo to EOF).
Then one replica is drained (POST /drain):

- not one request fails, anywhere, at any time;
- HAProxy takes the replica out (its /readyz says 503);
- every client of that replica has a session on another replica within 1 s
  of the drain (p50/p99/max printed); clients of the other replicas stay put;
- new connections of the moved clients reach the other replicas only, while
  their long-lived connections go on working on the draining replica;
- the drained process keeps the long-lived streams of its former clients
  until they end (the test ends them all but one, then the last one) and
  exits 0 when the last one ends, long before drain.grace_ms.

Each replica has its own echo upstream, so the test sees which replica served
which connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from types import SimpleNamespace
from typing import Dict, List

import pytest

from conftest import SANITIZED, http_request, scaled, wait_until
from lbtools import HAPROXY, HAProxy, Load, cpu_seconds, pct, port_of

REPLICAS = 3
# 100 clients as the acceptance criterion says; under ASan/TSan (every process
# several times slower and bigger, ~1.5 GB for 50 ASan clients) 50.
CLIENTS = int(os.environ.get("BATON_TEST_LB_CLIENTS", "50" if SANITIZED else "100"))
LONG_GAP_S = 0.05  # pause between round trips on a long-lived connection
SHORT_EVERY_S = 0.5  # a new short connection per client this often
REQUEST_TIMEOUT_S = 5.0  # a round trip slower than this (scaled) counts as failed
GRACE_MS = 60000  # far beyond the test: an exit at grace would show
DRAIN = "drain:\n  grace_ms: %d\n  spread_ms: 200\n  delay_ms: 1000\n" % GRACE_MS


# ---------------------------------------------------------------------------
# HAProxy
# ---------------------------------------------------------------------------

@pytest.fixture
def haproxy_factory(request, tmp_path, short_tmp):
    made: List[HAProxy] = []
    request.node._baton_procs = getattr(request.node, "_baton_procs", [])

    def start(backends) -> HAProxy:
        if not os.access(HAPROXY, os.X_OK):
            pytest.fail("haproxy not found (%s); scripts/deps.sh installs it" % HAPROXY)
        servers = ["server %s 127.0.0.1:%d check port %d inter 100ms fall 1 rise 2" % b for b in backends]
        h = HAProxy(tmp_path, short_tmp, servers,
                    backend_options=["option httpchk GET /readyz", "http-check expect status 200"])
        made.append(h)
        request.node._baton_procs.append(h)
        h.start()
        return h

    yield start
    for h in made:
        h.stop()


# ---------------------------------------------------------------------------
# admin API
# ---------------------------------------------------------------------------

def admin(srv, method: str, path: str):
    return http_request(srv.ready["admin"], method, path)


def admin_json(srv, path: str) -> dict:
    status, body = admin(srv, "GET", path)
    assert status == 200, (path, status, body)
    return json.loads(body)


# ---------------------------------------------------------------------------
# load: one thread, non-blocking sockets
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# session lines
# ---------------------------------------------------------------------------

class MoveWatcher:
    """Polls the stdout of the given clients every 10 ms and records when a
    session line with n >= 2 (a new session) first shows, and its server_id."""

    def __init__(self, clients: Dict[int, object]):
        self.clients = clients
        self.seen: Dict[int, tuple] = {}  # client -> (monotonic time seen, session line)
        self.sizes = {i: 0 for i in clients}
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lb-moves")

    def start(self):
        self.thread.start()

    def stop(self):
        self.stop_ev.set()
        self.thread.join(10)

    def _run(self):
        while not self.stop_ev.is_set() and len(self.seen) < len(self.clients):
            for i, c in self.clients.items():
                if i in self.seen:
                    continue
                try:
                    size = os.path.getsize(c.stdout_extra_path)
                except OSError:
                    continue
                if size == self.sizes[i]:
                    continue
                now = time.monotonic()
                self.sizes[i] = size
                for line in c.stdout_extra_path.read_text().splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    obj = json.loads(line)
                    if obj.get("event") == "session" and obj.get("n", 0) >= 2:
                        self.seen[i] = (now, obj)
                        break
            time.sleep(0.01)


def new_sessions(c) -> List[dict]:
    return [e for e in c.events() if e.get("event") == "session" and e.get("n", 0) >= 2]


# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------

def test_drain_one_replica_behind_haproxy(server_factory, connect_factory, upstream_factory, haproxy_factory,
                                          certs, capsys):
    t_test = time.monotonic()
    ups = [upstream_factory("echo") for _ in range(REPLICAS)]
    srvs = [server_factory(routes={"echo": ups[k]}, server_id="replica-%d" % k, ticket_key=str(certs.ticket_key),
                           extra=DRAIN) for k in range(REPLICAS)]
    lb = haproxy_factory([("r%d" % k, s.addr[1], port_of(s.ready["admin"])) for k, s in enumerate(srvs)])

    def lb_up():
        rows = lb.servers()
        return all(rows["r%d" % k]["status"] == "UP" and rows["r%d" % k]["check_status"] == "L7OK"
                   for k in range(REPLICAS))

    wait_until(lb_up, 10, interval=0.05, what="haproxy to see every replica UP (GET /readyz 200)")

    # Clients reach the replicas only through haproxy.
    via_lb = SimpleNamespace(addr=lb.addr)
    clients = [connect_factory(via_lb, wait=False) for _ in range(CLIENTS)]
    for c in clients:
        c.wait_ready(timeout=30)
    first = [c.ready["server_id"] for c in clients]
    per_replica = {s: first.count(s) for s in sorted(set(first))}
    assert set(first) == {"replica-%d" % k for k in range(REPLICAS)}, per_replica
    drained_id = "replica-0"
    drained = srvs[0]
    movers = {i: c for i, c in enumerate(clients) if first[i] == drained_id}
    stayers = [i for i in range(CLIENTS) if first[i] != drained_id]
    assert len(movers) >= CLIENTS // 6, "haproxy put only %d of %d clients on %s: %s" % (
        len(movers), CLIENTS, drained_id, per_replica)
    t_setup = time.monotonic() - t_test

    pids = [s.pid for s in srvs] + [c.pid for c in clients] + [lb.proc.pid]
    load = Load([c.forward_addr("echo") for c in clients], long_gap_s=LONG_GAP_S, short_every_s=SHORT_EVERY_S,
                request_timeout_s=REQUEST_TIMEOUT_S)
    cpu0, wall0 = cpu_seconds(pids) + time.process_time(), time.monotonic()

    def more(long_from, short_from, n_long, n_short):
        """A predicate: every client finished n_long more round trips and n_short
        more short connections than the counts given; fails at once on any
        failed request."""
        def pred():
            fails = load.failed()
            assert not fails, "%d failed requests: %s" % (len(fails), fails[:20])
            lo, sh = load.counts()
            return all(lo[i] >= long_from[i] + n_long and sh[i] >= short_from[i] + n_short
                       for i in range(CLIENTS))
        return pred

    watcher = MoveWatcher(movers)
    load.start()
    try:
        # warm-up: every client has finished requests on both kinds of connection
        wait_until(more([0] * CLIENTS, [0] * CLIENTS, 3, 3), 20, interval=0.05,
                   what="every client to finish 3 long and 3 short requests")

        watcher.start()
        exited_at = []
        threading.Thread(target=lambda: (drained.proc.wait(), exited_at.append(time.monotonic())),
                         daemon=True).start()
        t0 = time.monotonic()
        status, body = admin(drained, "POST", "/drain")
        assert status in (200, 202), (status, body)
        status, _ = admin(drained, "GET", "/readyz")
        assert status == 503, "GET /readyz answered %d right after POST /drain" % status

        # haproxy takes the replica out on its failed check (503)
        wait_until(lambda: lb.servers()["r0"]["status"].startswith("DOWN"), 5, interval=0.02,
                   what="haproxy to mark the draining replica DOWN")

        wait_until(lambda: len(watcher.seen) == len(movers), 10, interval=0.01,
                   what="every client of %s to open a session elsewhere (%d of %d so far)" % (
                       drained_id, len(watcher.seen), len(movers)))
        watcher.stop()
        moves = {i: t - t0 for i, (t, _) in watcher.seen.items()}
        vals = list(moves.values())
        summary = "%d clients moved from %s: p50 %.0f ms, p99 %.0f ms, max %.0f ms" % (
            len(vals), drained_id, pct(vals, 50) * 1000, pct(vals, 99) * 1000, max(vals) * 1000)
        print("\n" + summary)
        landed = {}
        for i, (_, line) in watcher.seen.items():
            assert line["server_id"] != drained_id and line["server_id"] in first, (i, line)
            assert line["drains_followed"] == 1, (i, line)
            landed[line["server_id"]] = landed.get(line["server_id"], 0) + 1
        assert max(vals) < scaled(1.0), summary

        # Only the drained replica's clients moved.
        for i in stayers:
            assert not new_sessions(clients[i]), (i, first[i], new_sessions(clients[i]))

        # Traffic goes on: new connections of the moved clients reach other
        # replicas only, while their long-lived connections still work on
        # the draining one. Once every client has finished 2 short requests
        # opened after its move, the draining replica's upstream must see no
        # new connection while every client finishes 2 more, and the drain's
        # delay_ms runs out (the listener closes).
        long_a, short_a = load.counts()
        wait_until(more(long_a, short_a, 3, 2), 15, interval=0.02,
                   what="every client to finish 3 long and 2 short requests after the move")
        conns_drained = len(ups[0].conns)
        conns_others = sum(len(u.conns) for u in ups[1:])
        long_b, short_b = load.counts()
        wait_until(more(long_b, short_b, 2, 2), 15, interval=0.02,
                   what="every client to finish 2 more long and short requests")
        wait_until(lambda: "drain: stopped accepting" in drained.stderr_text(), 10, interval=0.02,
                   what="the draining replica to close its listener (drain.delay_ms)")
        assert len(ups[0].conns) == conns_drained, "%d new connections reached the draining replica's upstream" % (
            len(ups[0].conns) - conns_drained)
        # at least one short connection per client opened after the snapshot (the
        # first of the 2 finished may have been opened just before it)
        assert sum(len(u.conns) for u in ups[1:]) >= conns_others + CLIENTS
        assert not load.failed(), load.failed()[:10]

        # The draining replica keeps only the long-lived streams of its clients.
        assert drained.alive(), "the draining replica exited while its clients' streams were open"
        d = admin_json(drained, "/drain")
        assert d["state"] == "draining" and d["phase"] == "waiting", d
        assert d["tunnels_left"] == len(movers) and d["streams_left"] == len(movers), (d, len(movers))
        stats = admin_json(drained, "/stats")

        # Their streams end, all but one: the process stays while one is left.
        last = max(movers)
        load.retire([i for i in movers if i != last])
        wait_until(lambda: len(load.retired_at) == len(movers) - 1, 10, interval=0.01,
                   what="the moved clients' long-lived connections but one to close")
        wait_until(lambda: admin_json(drained, "/drain")["tunnels_left"] == 1, 10, interval=0.02,
                   what="the draining replica to close the tunnels without streams")
        d = admin_json(drained, "/drain")
        assert d["streams_left"] == 1 and d["phase"] == "waiting", d
        assert drained.alive()
        # The last stream ends: the process exits then, not at grace.
        t_retire = time.monotonic()
        load.retire([last])
        wait_until(lambda: len(load.retired_at) == len(movers), 10, interval=0.01,
                   what="the last long-lived connection on the draining replica to close")
        last_end = max(load.retired_at.values())
        try:
            code = drained.wait_exit(5)
        except subprocess.TimeoutExpired:
            raise AssertionError("the draining replica still runs %.1f s after its last stream ended: %s" % (
                time.monotonic() - last_end, admin_json(drained, "/drain")))
        assert code == 0, code
        wait_until(lambda: exited_at, 5, interval=0.01, what="the exit time")
        # The test sees the last EOF and the exit within scheduling noise of
        # each other (the client closes its old session as soon as the stream
        # ends); either order is fine.
        exit_after = exited_at[0] - last_end
        since_drain = exited_at[0] - t0
        err = drained.stderr_text()
        assert "every tunnel closed" in err and "grace period over" not in err, err[-3000:]
        assert exited_at[0] > t_retire, "the draining replica exited before its last streams were closed"
        assert exit_after < scaled(1.0), "exited %.3f s after the last stream ended" % exit_after
        assert since_drain < GRACE_MS / 1000.0 / 2, since_drain

        # The other replicas and every client carry on.
        long_c, short_c = load.counts()
        wait_until(more(long_c, short_c, 2, 1), 15, interval=0.02,
                   what="every client to finish more requests after the drained replica exited")
        assert all(c.alive() for c in clients)
        assert all(s.alive() for s in srvs[1:])
    finally:
        watcher.stop()
        load.stop()
    wall = time.monotonic() - wall0
    cpu = cpu_seconds(pids) + time.process_time() - cpu0
    failures = load.failed()
    long_ok, short_ok = load.counts()
    lat = load.latencies
    report = ("%s; landed on %s; %d requests (%d on long-lived connections, %d short connections) in %.1f s, "
              "round trip p50 %.1f ms p99 %.1f ms; %d failed; drained replica exited %.0f ms after the test "
              "began closing its last stream (%+.0f ms from that stream's end as the test saw it), %.2f s after the drain; "
              "setup %.1f s (%d clients: %s); CPU %.1f s in %.1f s (%.0f%% of 2 cores); REJECT 4 answers %s" % (
                  summary, landed, sum(long_ok) + sum(short_ok), sum(long_ok), sum(short_ok), wall,
                  pct(lat, 50) * 1000, pct(lat, 99) * 1000, len(failures), (exited_at[0] - t_retire) * 1000,
                  exit_after * 1000, since_drain,
                  t_setup, CLIENTS, per_replica, cpu, wall, 100 * cpu / wall / 2,
                  stats["tunnels"]["total"].get("rejected_draining", 0)))
    with capsys.disabled():  # shown in `make test` too, not only with -s
        print("\n[test_drain_lb] " + report)
    assert not failures, "%d failed requests: %s\n%s" % (len(failures), failures[:20], report)
