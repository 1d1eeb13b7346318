#!/usr/bin/env bash
# Proxy overhead on loopback: direct to the backend, through Wakegate, and through nginx
# (1 worker, upstream keepalive), interleaved over rounds in one run.
#
#   bench/proxy-overhead.sh [ROUNDS] [SECONDS] [CONNECTIONS]
#
# The load generator (wakegate-loadtest, closed loop, one thread) is pinned to core 0; the
# proxy and the backend share core 1. The proxy's CPU time per request comes from /proc.
# Installs nginx with apt-get when it is missing (needs root).
source "$(dirname "$0")/common.sh"

ROUNDS="${1:-5}"
SECONDS_PER_RUN="${2:-5}"
CONNECTIONS="${3:-32}"
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 cores" >&2; exit 1; }

if ! command -v nginx >/dev/null; then
    echo "==> installing nginx" >&2
    # Keep the package from starting a system nginx on port 80.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi
build

BACKEND_PORT=$(free_port); WG_PORT=$(free_port); WG_ADMIN=$(free_port); NGINX_PORT=$(free_port)

# The backend: Wakegate's example backend (hyper), one worker thread, on core 1.
TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/wakegate-interceptor" backend --port "$BACKEND_PORT" >/dev/null 2>&1 &
PIDS+=($!)

# Wakegate: one worker thread, like nginx's one worker, on core 1, an always-on upstream.
cat > "$WORK/wakegate.yaml" <<YAML
routes:
  - name: bench
    target: { upstream: "127.0.0.1:$BACKEND_PORT" }
YAML
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" \
    --proxy-addr "127.0.0.1:$WG_PORT" --admin-addr "127.0.0.1:$WG_ADMIN" >"$WORK/wakegate.log" 2>&1 &
WG_PID=$!; PIDS+=($WG_PID)

# nginx: 1 worker, upstream keepalive, no access log, on core 1.
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
CONF
taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" &
NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)

wait_port "$BACKEND_PORT"; wait_port "$WG_PORT"; wait_port "$NGINX_PORT"
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)

run() { # name port pid...
    local name=$1 port=$2; shift 2
    local pids=()
    for p in "$@"; do pids+=(--pid "$p"); done
    taskset -c 0 "$BIN/wakegate-loadtest" rate --rate max --connections "$CONNECTIONS" \
        --duration "${SECONDS_PER_RUN}s" --single-thread --no-admin --no-progress-bar \
        --url "http://127.0.0.1:$port/" --host bench.local "${pids[@]}" \
        --json "$WORK/$name-$round.json" >/dev/null 2>"$WORK/$name-$round.err"
}

echo "==> $ROUNDS rounds of ${SECONDS_PER_RUN}s each, $CONNECTIONS connections, interleaved" >&2
for round in $(seq 1 "$ROUNDS"); do
    # A short warm-up fills the pools, then the measured runs, in a rotating order.
    for name in direct wakegate nginx; do
        case $name in
            direct) run warm "$BACKEND_PORT" ;;
            wakegate) run warm "$WG_PORT" "$WG_PID" ;;
            nginx) run warm "$NGINX_PORT" "$NGINX_WORKER" ;;
        esac
    done
    order=(direct wakegate nginx)
    for i in 0 1 2; do
        name=${order[$(( (i + round) % 3 ))]}
        case $name in
            direct) run direct "$BACKEND_PORT" ;;
            wakegate) run wakegate "$WG_PORT" "$WG_PID" ;;
            nginx) run nginx "$NGINX_PORT" "$NGINX_WORKER" ;;
        esac
        echo "round $round: $name done" >&2
    done
done

python3 - "$WORK" "$ROUNDS" "$(machine)" "$CONNECTIONS" "$SECONDS_PER_RUN" <<'PY' | tee "$OUT/proxy-overhead.txt"
import json, statistics, sys
work, rounds, machine, conns, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = {}
for name in ("direct", "wakegate", "nginx"):
    runs = [json.load(open(f"{work}/{name}-{r}.json")) for r in range(1, rounds + 1)]
    rows[name] = {
        "rps": [r["throughput"] for r in runs],
        "p50": [r["latency"]["p50"] / 1000 for r in runs],
        "p99": [r["latency"]["p99"] / 1000 for r in runs],
        "cpu": [r["processes"][0]["cpuUsPerRequest"] for r in runs] if runs[0]["processes"] else None,
        "failed": sum(r["requests"]["failed"] for r in runs),
    }
med = statistics.median
print(f"machine: {machine}")
print(f"{rounds} rounds x {secs}s, {conns} connections, closed loop; load on core 0, proxy + backend on core 1")
print(f"{'target':<10} {'req/s (median)':>15} {'min..max':>17} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU us/req':>17} {'failed':>7}")
for name, r in rows.items():
    cpu = f"{med(r['cpu']):.1f}" if r["cpu"] else "-"
    print(f"{name:<10} {med(r['rps']):>15.0f} {min(r['rps']):>8.0f}..{max(r['rps']):<8.0f} {med(r['p50']):>8.3f} {med(r['p99']):>8.3f} {cpu:>17} {r['failed']:>7}")
w, n = rows["wakegate"], rows["nginx"]
ratios = [a / b for a, b in zip(w["rps"], n["rps"])]
print(f"throughput wakegate/nginx per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {med(ratios):.2f}")
cpu_ratio = med(n["cpu"]) / med(w["cpu"])
print(f"proxy CPU per request nginx/wakegate: {cpu_ratio:.2f} (above 1: Wakegate spends less)")
PY
