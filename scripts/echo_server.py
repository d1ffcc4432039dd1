#!/usr/bin/env python3
"""A small TCP echo server for the demo and manual tests.

    python3 scripts/echo_server.py --listen 127.0.0.1:0

Prints one JSON line when listening, then serves until SIGTERM/SIGINT:
    {"event":"ready","listen":"127.0.0.1:PORT"}
Each connection gets its bytes back; when the client half-closes, the server
finishes echoing and half-closes too.
"""

import argparse
import json
import signal
import socket
import sys
import threading


def serve_one(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free port)")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        ap.error("--listen must be host:port")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(1024)
    addr = ls.getsockname()
    shown = ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % (addr[0], addr[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"event": "ready", "listen": shown}, separators=(",", ":")), flush=True)
    try:
        while True:
            conn, _ = ls.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
