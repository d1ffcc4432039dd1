#!/usr/bin/env bash
# `make run`: a local demo of baton with real processes on loopback.
#   echo upstream <- baton serve (TLS tunnel listener) <- baton connect (local forwarder) <- you
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
BATON="$PWD/$BUILD/baton"
RUN="$PWD/demo-run"
mkdir -p "$RUN"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Reads the first line a background process prints (its ready line), with a timeout.
ready_line() {  # fifo
  local line
  if ! IFS= read -r -t 15 line < "$1"; then echo "demo: a process did not become ready; see $RUN/*.log" >&2; exit 1; fi
  echo "$line"
}
json_field() { /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"d": d}))' "$1" "$2"; }

echo "1. Development certificates (a CA, a server and a client certificate, a ticket key):"
"$BATON" certs --out "$RUN/certs" | sed 's/^/   /'

TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
DIGEST=$(printf %s "$TOKEN" | "$BATON" hash-token)

mkfifo "$RUN/echo.fifo" "$RUN/serve.fifo" "$RUN/connect.fifo" 2>/dev/null || true
/usr/bin/python3 scripts/echo_server.py --listen 127.0.0.1:0 > "$RUN/echo.fifo" 2> "$RUN/echo.log" &
pids+=($!)
ECHO=$(json_field "$(ready_line "$RUN/echo.fifo")" 'd["listen"]')
echo "2. An echo server stands in for your application at $ECHO."

cat > "$RUN/baton.yaml" <<YAML
server_id: demo-pod
listen: 127.0.0.1:0
tls:
  cert: certs/server.crt
  key: certs/server.key
  ticket_key: certs/ticket.key
auth:
  tokens:
    - name: demo
      sha256: $DIGEST
routes:
  echo: $ECHO
handoff:
  socket: $RUN/handoff.sock
YAML
"$BATON" check -c "$RUN/baton.yaml" | sed 's/^/   /'
"$BATON" serve -c "$RUN/baton.yaml" > "$RUN/serve.fifo" 2> "$RUN/serve.log" &
SERVE_PID=$!
pids+=($!)
SERVE=$(json_field "$(ready_line "$RUN/serve.fifo")" 'd["listen"]')
echo "3. The sidecar (baton serve) terminates TLS tunnels on $SERVE and routes \"echo\" to $ECHO."

BATON_TOKEN=$TOKEN "$BATON" connect --server "$SERVE" --server-name localhost --ca "$RUN/certs/ca.crt" \
  --forward 127.0.0.1:0=echo --client-id demo-laptop > "$RUN/connect.fifo" 2> "$RUN/connect.log" &
pids+=($!)
READY=$(ready_line "$RUN/connect.fifo")
LOCAL=$(json_field "$READY" 'd["forwards"][0]["listen"]')
echo "4. The client (baton connect) opened one TLS tunnel and listens on $LOCAL for route \"echo\"."

echo "5. Sending traffic through the tunnel:"
/usr/bin/python3 - "$LOCAL" <<'PY'
import hashlib, os, socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
def one(n, size, results):
    data = os.urandom(size)
    s = socket.create_connection((host, int(port)))
    threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)), daemon=True).start()
    got = bytearray()
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    s.close()
    results[n] = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
results = {}
t0 = time.time()
threads = [threading.Thread(target=one, args=(i, 4 << 20, results)) for i in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
dt = time.time() - t0
ok = sum(results.values())
print(f"   8 concurrent connections, each sent 4 MiB and got it back: {ok}/8 intact, "
      f"{8*4*2/dt:.0f} MiB/s through the tunnel (both directions)")
s = socket.create_connection((host, int(port)))
lat = []
for i in range(200):
    t = time.perf_counter(); s.sendall(b"x" * 1024); n = 0
    while n < 1024: n += len(s.recv(4096))
    lat.append((time.perf_counter() - t) * 1e6)
lat.sort()
print(f"   1 KiB request/response: p50 {lat[100]:.0f} us, p99 {lat[198]:.0f} us")
sys.exit(0 if ok == 8 else 1)
PY

echo "6. All of it used one tunnel; the sidecar logged:"
grep -E "welcome|serving" "$RUN/serve.log" | sed 's/^/   /' | tail -3

OLD_PID=$SERVE_PID
echo "7. Hot restart: a second baton serve with the same config takes over the listener and the live"
echo "   tunnel from pid $OLD_PID, while a connection through the tunnel keeps doing request/response:"
mkfifo "$RUN/serve2.fifo" 2>/dev/null || true
cat > "$RUN/during-restart.py" <<'PY'
import os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
n = bad = 0; worst = 0.0
end = time.time() + 2.0
while time.time() < end:
    m = os.urandom(1024); t = time.perf_counter(); s.sendall(m); got = b""
    while len(got) < len(m): got += s.recv(4096)
    worst = max(worst, time.perf_counter() - t); n += 1; bad += got != m
print(f"   {n} round trips on one connection across the restart, {bad} wrong, longest {worst*1000:.1f} ms")
PY
/usr/bin/python3 "$RUN/during-restart.py" "$LOCAL" > "$RUN/during-restart.txt" &
TRAFFIC=$!
sleep 0.5  # let the traffic get going before the restart
"$BATON" serve -c "$RUN/baton.yaml" > "$RUN/serve2.fifo" 2> "$RUN/serve2.log" &
pids+=($!)
READY2=$(ready_line "$RUN/serve2.fifo")
echo "   new pid $(json_field "$READY2" 'd["pid"]'): epoch $(json_field "$READY2" 'd["epoch"]'), took over $(json_field "$READY2" 'd["tunnels"]') tunnel(s) on the same address $(json_field "$READY2" 'd["listen"]')"
while kill -0 "$OLD_PID" 2>/dev/null; do sleep 0.05; done  # the old process exits by itself
grep -E "committed" "$RUN/serve.log" | sed 's/.*handoff: /   old process: /'
wait "$TRAFFIC"
cat "$RUN/during-restart.txt"
echo "   The client never reconnected: baton connect logged nothing but its first tunnel:"
grep -cE "tunnel up|session [0-9]+ up" "$RUN/connect.log" | sed "s/^/   sessions opened by the client: /"
cat <<TXT

Running. Try it yourself:
   echo hello | nc -q1 ${LOCAL%:*} ${LOCAL##*:}     (through the tunnel to the echo server)
   tail -f $RUN/serve2.log                       (sidecar log, the process that took over)
   $BATON serve -c $RUN/baton.yaml    (another hot restart, from a second terminal)
Press Ctrl-C to stop.
TXT
wait
