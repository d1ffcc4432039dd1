"""`baton connect --status-listen`: the client's own small HTTP endpoint
(src/client/status_http.cc; docs/design.md says why it is not cpp-httplib).
Its answers and its bounds: 404, 405, 400, 431 for an oversized head, a
connection that sends nothing is closed after 2 s, at most 32 connections at
once, and /status answers through all of it."""

import json
import select
import socket
import time

from conftest import scaled, wait_until


def request(addr, raw: bytes, timeout=10.0) -> bytes:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=scaled(timeout)) as s:
        s.sendall(raw)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def status_code(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def get_status(addr) -> dict:
    answer = request(addr, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_code(answer) == 200, answer[:200]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Content-Type: application/json" in head
    return json.loads(body)


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_status_answers_and_refuses_what_it_does_not_serve(server, connect_factory):
    c = connect_factory(server, extra_args=["--status-listen", "127.0.0.1:0"])
    addr = c.ready["status"]
    st = get_status(addr)
    assert st["session"] == 1 and st["server_id"] == c.ready["server_id"], st
    assert status_code(request(addr, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    assert status_code(request(addr, b"POST /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n")) == 405
    assert status_code(request(addr, b"NONSENSE\r\n\r\n")) == 400
    head = request(addr, b"HEAD /status HTTP/1.1\r\n\r\n")
    assert status_code(head) == 200 and head.endswith(b"\r\n\r\n"), head  # no body
    big = b"GET /status HTTP/1.1\r\nX-Pad: " + b"a" * 9000
    assert status_code(request(addr, big)) == 431


def test_silent_and_excess_connections_are_bounded(server, connect_factory):
    c = connect_factory(server, extra_args=["--status-listen", "127.0.0.1:0"])
    addr = c.ready["status"]
    host, port = addr.rsplit(":", 1)
    # A connection that sends nothing is closed after the 2 s request deadline.
    silent = socket.create_connection((host, int(port)))
    t0 = time.monotonic()
    assert closed_by_peer(silent, scaled(10)), "a silent connection was never closed"
    took = time.monotonic() - t0
    assert 1.5 <= took <= scaled(6), took
    silent.close()
    # 40 idle connections at once: 32 are held, the rest closed at accept.
    held = [socket.create_connection((host, int(port))) for _ in range(40)]
    t0 = time.monotonic()
    closed_now = set()
    while time.monotonic() - t0 < 1.0:  # well inside the 2 s request deadline
        readable, _, _ = select.select([s for s in held if s not in closed_now], [], [], 0.05)
        for s in readable:
            if closed_by_peer(s, 0.01):
                closed_now.add(s)
    assert len(closed_now) == 8, len(closed_now)
    assert closed_now == set(held[32:]), "the connections past the 32nd are the ones closed"
    for s in held:
        s.close()
    # Once they are gone /status answers again (they leave within the deadline).
    wait_until(lambda: status_code(request(addr, b"GET /status HTTP/1.1\r\n\r\n")) == 200, scaled(10),
               what="/status to answer after the excess connections")
    assert get_status(addr)["session"] == 1
