#!/usr/bin/env bash
# Memory per in-flight proxied request: N requests at once, each on its own keep-alive
# connection, to an upstream that answers after a delay; each proxy's RSS is read while all N
# are in flight (every upstream connection established), against its RSS before. Wakegate, the
# minimal hyper proxy (bench/hyper-proxy), nginx (1 worker) and Go's httputil.ReverseProxy are
# measured one after another in the same run, the same way.
#
#   bench/inflight-memory.sh [N] [DELAY_MS]
#
# N is at least 8,000 in the figures (the fd limit is raised to allow it). WAKEGATE_BEFORE=PATH
# also measures that interceptor binary (an earlier build) as "before".
source "$(dirname "$0")/common.sh"

N="${1:-8000}"
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

measure() { # name port pid
    local name=$1 port=$2 pid=$3 idle held="" t
    wait_port "$port"
    sleep 0.5 # let start-up allocations settle before the idle reading (a reading, not sync)
    idle=$(rss_kib "$pid")
    "$BIN/wakegate-loadtest" rate --rate max --connections "$N" --requests "$N" \
        --duration 120s --timeout 120s --no-admin --no-progress-bar \
        --url "http://127.0.0.1:$port/sleep?ms=$DELAY" --host bench.local \
        --json "$WORK/$name.json" >/dev/null 2>"$WORK/$name.err" &
    local load=$!
    # Poll until every request has its upstream connection (bounded by the delay).
    for t in $(seq 1 $(( DELAY / 100 ))); do
        if [ "$(established_to "$BACKEND")" -ge "$N" ]; then held=$(rss_kib "$pid"); break; fi
        sleep 0.1
    done
    wait "$load" || true
    kill "$pid" 2>/dev/null || true
    python3 - "$name" "$idle" "${held:-0}" "$N" "$WORK/$name.json" <<'PY' | tee -a "$OUT/inflight-memory.txt"
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
    echo "$N concurrent requests, upstream answers after $DELAY ms; RSS above idle while all are in flight"
} | tee "$OUT/inflight-memory.txt"

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
