#!/usr/bin/env python3
"""Stand-in for the example application's image (hashicorp/http-echo) in the
rollout simulation: container images do not run on this machine.

Takes the manifest's arguments (`-listen=HOST:PORT`, `-text=...`, others
ignored) and serves TCP on the listen address, echoing every byte back (the
load generator checks each response byte for byte, which a fixed HTTP text
could not). Like http-echo it stops at SIGTERM: it closes its listener and
exits 0. On stdout, JSON lines:

    {"event":"listening","listen":"127.0.0.1:8080"}
    {"event":"term","open":N,"served":M}    (N connections still open at SIGTERM)

`open` at SIGTERM is what the rollout test reads: with the drain started from
this container's preStop, every tunnel stream into the app has ended before
the kubelet sends TERM, so it must be 0.
"""

import json
import signal
import socket
import sys
import threading


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv):
    listen = "127.0.0.1:5678"  # http-echo's default
    for a in argv:
        if a.startswith("-listen="):
            listen = a.split("=", 1)[1]
    host, port = listen.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host or "0.0.0.0", int(port)))
    srv.listen(1024)
    lock = threading.Lock()
    state = {"open": 0, "served": 0}

    def serve(c):
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()
            with lock:
                state["open"] -= 1
                state["served"] += 1

    def term(signum, frame):
        with lock:
            out({"event": "term", "open": state["open"], "served": state["served"]})
        srv.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, term)
    out({"event": "listening", "listen": listen})
    while True:
        try:
            c, _ = srv.accept()
        except OSError:
            return 0
        with lock:
            state["open"] += 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
