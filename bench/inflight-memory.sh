#!/usr/bin/env bash
# Memory per in-flight proxied request: N requests at once, each on its own keep-alive
# connection, to an upstream that answers after a delay; each proxy's RSS is read while all N
# are in flight (every upstream connection established), against its RSS before. Wakegate, the
# minimal hyper proxy (bench/hyper-proxy), the same on jemalloc, the allocator Wakegate ships
# with ("hyper-jem"), the same doing the edge's per-request duties, nginx (1 worker) and Go's
# httputil.ReverseProxy are measured one after another in the same run, the same way.
#
#   bench/inflight-memory.sh [N] [DELAY_MS]
#
# N is at least 8,000 in the figures (the fd limit is raised to allow it). WAKEGATE_BEFORE=PATH
# also measures that interceptor binary (an earlier build) as "before". BENCH_IDLE=1 measures
# idle keep-alive connections instead: N connections each send one request, read its answer
# and stay open, and the RSS is read once all N are answered (what a burst's release leaves
# behind, and what browsers' kept connections cost).
source "$(dirname "$0")/common.sh"

N="${1:-8000}"
RESULT="$OUT/inflight-memory.txt"; [ -n "${BENCH_IDLE:-}" ] && RESULT="$OUT/idle-connections.txt"
DELAY="${2:-25000}"
ulimit -n 200000 2>/dev/null || ulimit -n 65536 2>/dev/null || true
build
build_references

BACKEND=$(free_port)
"$BIN/wakegate-interceptor" backend --port "$BACKEND" --max-connections $(( N * 2 )) >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$BACKEND"

# established_to PORT: TCP connections established to 127.0.0.1:PORT, seen from the server side.
established_to() {
    python3 - "$1" <<'PY'
import sys
port = f"{int(sys.argv[1]):04X}"
n = 0
for f in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        for line in open(f).readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(":" + port) and cols[3] == "01":
                n += 1
    except FileNotFoundError:
        pass
print(n)
PY
}

# hold_idle PORT PID N: N keep-alive connections, one request answered on each, all kept open
# while the RSS is read; prints "RSS_KIB OK FAILED".
hold_idle() {
    python3 - "$1" "$2" "$3" <<'PY'
import socket, sys
port, pid, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conns, ok, failed = [], 0, 0
for _ in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += s.recv(65536)
        ok += head.startswith(b"HTTP/1.1 200")
        conns.append(s)
    except (OSError, StopIteration, ConnectionError):
        failed += 1
rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0]
print(rss, ok, failed)
PY
}

# settled_rss PID: its RSS once it stops growing. The last requests' upstream connections are
# up, but their proxies may not have set up every buffer yet (hyper allocates an upstream
# connection's read buffer at its first read): read every 250 ms until two readings agree
# within 0.5% (5 s at most), and keep the largest.
settled_rss() {
    local last=0 now max=0
    for _ in $(seq 1 20); do
        now=$(rss_kib "$1")
        [ "$now" -gt "$max" ] && max=$now
        if [ "$last" -gt 0 ] && [ $(( (now - last) * 200 )) -le "$last" ]; then break; fi
        last=$now
        sleep 0.25
    done
    echo "$max"
}

measure() { # name port pid
    local name=$1 port=$2 pid=$3 idle held="" t
    wait_port "$port"
    sleep 0.5 # let start-up allocations settle before the idle reading (a reading, not sync)
    idle=$(rss_kib "$pid")
    if [ -n "${BENCH_IDLE:-}" ]; then
        read -r held ok failed <<<"$(hold_idle "$port" "$pid" "$N")"
        kill "$pid" 2>/dev/null || true
        awk -v n="$name" -v i="$idle" -v h="$held" -v c="$N" -v ok="$ok" -v f="$failed" 'BEGIN {
            printf "%-9s idle %6.1f MiB, %d idle keep-alive connections %7.1f MiB: %5.1f KiB per connection (ok %d, failed %d)\n",
                n, i/1024, c, h/1024, (h-i)/c, ok, f }' | tee -a "$RESULT"
        return
    fi
    "$BIN/wakegate-loadtest" rate --rate max --connections "$N" --requests "$N" \
        --duration 120s --timeout 120s --no-admin --no-progress-bar \
        --url "http://127.0.0.1:$port/sleep?ms=$DELAY" --host bench.local \
        --json "$WORK/$name.json" >/dev/null 2>"$WORK/$name.err" &
    local load=$!
    # Poll until every request has its upstream connection (bounded by the delay).
    for t in $(seq 1 $(( DELAY / 100 ))); do
        if [ "$(established_to "$BACKEND")" -ge "$N" ]; then held=$(settled_rss "$pid"); break; fi
        sleep 0.1
    done
    wait "$load" || true
    kill "$pid" 2>/dev/null || true
    python3 - "$name" "$idle" "${held:-0}" "$N" "$WORK/$name.json" <<'PY' | tee -a "$RESULT"
import json, sys
name, idle, held, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
j = json.load(open(sys.argv[5]))
ok, failed = j["requests"]["ok"], j["requests"]["failed"]
if not held:
    print(f"{name:<9} never had all {n} in flight (ok {ok}, failed {failed})")
else:
    print(f"{name:<9} idle {idle/1024:6.1f} MiB, {n} in flight {held/1024:7.1f} MiB: {(held-idle)/n:5.1f} KiB per request (ok {ok}, failed {failed})")
PY
}

{
    echo "machine: $(machine)"
    if [ -n "${BENCH_IDLE:-}" ]; then
        echo "$N idle keep-alive connections, one request answered on each; RSS above idle while all are open"
    else
        echo "$N concurrent requests, upstream answers after $DELAY ms; RSS above idle while all are in flight"
    fi
} | tee "$RESULT"

P=$(free_port); A=$(free_port)
cat > "$WORK/wakegate.yaml" <<YAML
routes:
  - name: bench
    target: { upstream: "127.0.0.1:$BACKEND" }
YAML
RUST_LOG=warn "${WAKEGATE:-$BIN/wakegate-interceptor}" --config "$WORK/wakegate.yaml" \
    --proxy-addr "127.0.0.1:$P" --admin-addr "127.0.0.1:$A" >"$WORK/wakegate.log" 2>&1 &
PIDS+=($!); measure wakegate "$P" $!

if [ -n "${WAKEGATE_BEFORE:-}" ]; then
    P=$(free_port); A=$(free_port)
    RUST_LOG=warn "$WAKEGATE_BEFORE" --config "$WORK/wakegate.yaml" \
        --proxy-addr "127.0.0.1:$P" --admin-addr "127.0.0.1:$A" >"$WORK/before.log" 2>&1 &
    PIDS+=($!); measure before "$P" $!
fi

P=$(free_port)
"$BIN/hyper-proxy" "127.0.0.1:$P" "127.0.0.1:$BACKEND" &
PIDS+=($!); measure hyper "$P" $!

# The same on jemalloc, the allocator Wakegate ships with: the floor with the allocator's
# share taken out.
P=$(free_port)
"$BIN/hyper-proxy-jemalloc" "127.0.0.1:$P" "127.0.0.1:$BACKEND" &
PIDS+=($!); measure hyper-jem "$P" $!

# The same proxy doing the edge's per-request duties as well (see bench/hyper-proxy).
P=$(free_port)
"$BIN/hyper-proxy" "127.0.0.1:$P" "127.0.0.1:$BACKEND" duties &
PIDS+=($!); measure duties "$P" $!

P=$(free_port)
nginx_conf "$WORK/nginx" "$P" "$BACKEND"
nginx -c "$WORK/nginx/nginx.conf" &
M=$!; PIDS+=($M); wait_port "$P"
measure nginx "$P" "$(pgrep -P "$M" | head -1)"
kill "$M" 2>/dev/null || true

if [ -n "$GO_PROXY" ]; then
    P=$(free_port)
    "$GO_PROXY" "127.0.0.1:$P" "127.0.0.1:$BACKEND" &
    PIDS+=($!); measure go "$P" $!
fi
