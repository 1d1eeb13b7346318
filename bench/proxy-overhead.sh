#!/usr/bin/env bash
# Proxy overhead on loopback: direct to the backend, through Wakegate, through the minimal
# hyper proxy (bench/hyper-proxy, Wakegate's floor), through the same proxy on jemalloc, the
# allocator Wakegate ships with ("hyper-jem": `hyper-proxy-jemalloc`), through the same proxy
# doing the edge's per-request duties as well ("duties": `hyper-proxy ... duties`), through
# nginx (1 worker, upstream keepalive) and through Go's httputil.ReverseProxy (the add-on's
# engine), interleaved over rounds in one run.
#
#   bench/proxy-overhead.sh [ROUNDS] [SECONDS] [CONNECTIONS]
#
#   BENCH_PATH=/bytes?n=16384   the request path (default `/`: a 60-byte answer)
#   BENCH_H2C=1                 clients speak h2c (prior knowledge, one stream per connection,
#                               h2load from nghttp2-client); every upstream stays HTTP/1.1
#   BENCH_BEFORE=PATH           also run this wakegate-interceptor binary (an earlier build) as
#                               "before", for before/after figures from one run
#   BENCH_OBSERVED=1            also run the same binary with traces on ("traced": every request
#                               sampled and exported over OTLP/HTTP to bench/otlp-sink.py) and
#                               with the JSON access log on ("logged", to /dev/null)
#
# The load generator (one thread) is pinned to core 0; the proxy and the backend share core 1,
# each single-threaded. A proxy's CPU time per request comes from /proc around each run, in
# all and split into user and system (kernel) time. The backend's CPU time per request and its
# wakeups per request (the times it went to sleep and was woken: voluntary context switches)
# are read the same way: they tell how the proxy's writes are spread over the backend's runs on
# the shared core (one request per wakeup, or many), which moves the throughput as much as the
# proxy's own CPU does.
# Installs nginx, golang-go and (for h2c) nghttp2-client with apt-get when missing (needs root).
source "$(dirname "$0")/common.sh"

ROUNDS="${1:-5}"
SECONDS_PER_RUN="${2:-5}"
CONNECTIONS="${3:-32}"
REQ_PATH="${BENCH_PATH:-/}"
H2C="${BENCH_H2C:-}"
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 cores" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || true

build
build_references
[ -z "$H2C" ] || install_pkg h2load nghttp2-client

BACKEND_PORT=$(free_port); WG_PORT=$(free_port); WG_ADMIN=$(free_port)
HYPER_PORT=$(free_port); HYPERJ_PORT=$(free_port); DUTIES_PORT=$(free_port); NGINX_PORT=$(free_port); GO_PORT=$(free_port)

# The backend: Wakegate's example backend (hyper), one worker thread, on core 1.
TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/wakegate-interceptor" backend --port "$BACKEND_PORT" >/dev/null 2>&1 &
BACKEND_PID=$!; PIDS+=($BACKEND_PID)

# Wakegate: one worker thread, like nginx's one worker, on core 1, an always-on upstream.
cat > "$WORK/wakegate.yaml" <<YAML
routes:
  - name: bench
    target: { upstream: "127.0.0.1:$BACKEND_PORT" }
YAML
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" \
    --proxy-addr "127.0.0.1:$WG_PORT" --admin-addr "127.0.0.1:$WG_ADMIN" >"$WORK/wakegate.log" 2>&1 &
WG_PID=$!; PIDS+=($WG_PID)

TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/hyper-proxy" "127.0.0.1:$HYPER_PORT" "127.0.0.1:$BACKEND_PORT" &
HYPER_PID=$!; PIDS+=($HYPER_PID)
TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/hyper-proxy-jemalloc" "127.0.0.1:$HYPERJ_PORT" "127.0.0.1:$BACKEND_PORT" &
HYPERJ_PID=$!; PIDS+=($HYPERJ_PID)
TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/hyper-proxy" "127.0.0.1:$DUTIES_PORT" "127.0.0.1:$BACKEND_PORT" duties &
DUTIES_PID=$!; PIDS+=($DUTIES_PID)

nginx_conf "$WORK/nginx" "$NGINX_PORT" "$BACKEND_PORT" "${H2C:+http2}"
taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" &
NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)

# The minimal hyper proxy serves HTTP/1.1 only: it is the floor for HTTP/1.1 clients.
if [ -n "$H2C" ]; then TARGETS=(direct wakegate nginx); else TARGETS=(direct wakegate hyper hyper-jem duties nginx); fi
if [ -n "${BENCH_BEFORE:-}" ]; then
    BEFORE_PORT=$(free_port); BEFORE_ADMIN=$(free_port)
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$BENCH_BEFORE" --config "$WORK/wakegate.yaml" \
        --proxy-addr "127.0.0.1:$BEFORE_PORT" --admin-addr "127.0.0.1:$BEFORE_ADMIN" >"$WORK/before.log" 2>&1 &
    BEFORE_PID=$!; PIDS+=($BEFORE_PID); TARGETS+=(before)
fi
if [ -n "${BENCH_OBSERVED:-}" ]; then
    SINK_PORT=$(free_port); TRACED_PORT=$(free_port); TRACED_ADMIN=$(free_port)
    LOGGED_PORT=$(free_port); LOGGED_ADMIN=$(free_port)
    taskset -c 0 python3 "$(dirname "$0")/otlp-sink.py" "$SINK_PORT" &
    PIDS+=($!)
    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" OTEL_BSP_MAX_QUEUE_SIZE=65536 \
        TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" \
        --proxy-addr "127.0.0.1:$TRACED_PORT" --admin-addr "127.0.0.1:$TRACED_ADMIN" >"$WORK/traced.log" 2>&1 &
    TRACED_PID=$!; PIDS+=($TRACED_PID)
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" \
        --proxy-addr "127.0.0.1:$LOGGED_PORT" --admin-addr "127.0.0.1:$LOGGED_ADMIN" --access-log json >/dev/null 2>"$WORK/logged.log" &
    LOGGED_PID=$!; PIDS+=($LOGGED_PID); TARGETS+=(traced logged)
fi
if [ -n "$GO_PROXY" ] && [ -z "$H2C" ]; then
    # h2c needs golang.org/x/net/http2/h2c, outside the standard library: HTTP/1.1 only.
    GOMAXPROCS=1 taskset -c 1 "$GO_PROXY" "127.0.0.1:$GO_PORT" "127.0.0.1:$BACKEND_PORT" &
    GO_PID=$!; PIDS+=($GO_PID); TARGETS+=(go)
fi

wait_port "$BACKEND_PORT"; wait_port "$WG_PORT"; wait_port "$HYPER_PORT"; wait_port "$HYPERJ_PORT"; wait_port "$DUTIES_PORT"; wait_port "$NGINX_PORT"
[ -z "${GO_PID:-}" ] || wait_port "$GO_PORT"
[ -z "${BEFORE_PID:-}" ] || wait_port "$BEFORE_PORT"
[ -z "${TRACED_PID:-}" ] || { wait_port "$SINK_PORT"; wait_port "$TRACED_PORT"; wait_port "$LOGGED_PORT"; }
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)

port_of() { case $1 in direct) echo "$BACKEND_PORT";; wakegate) echo "$WG_PORT";; hyper) echo "$HYPER_PORT";; hyper-jem) echo "$HYPERJ_PORT";; duties) echo "$DUTIES_PORT";; nginx) echo "$NGINX_PORT";; go) echo "$GO_PORT";; before) echo "$BEFORE_PORT";; traced) echo "$TRACED_PORT";; logged) echo "$LOGGED_PORT";; esac; }
pid_of() { case $1 in direct) echo "";; wakegate) echo "$WG_PID";; hyper) echo "$HYPER_PID";; hyper-jem) echo "$HYPERJ_PID";; duties) echo "$DUTIES_PID";; nginx) echo "$NGINX_WORKER";; go) echo "$GO_PID";; before) echo "$BEFORE_PID";; traced) echo "$TRACED_PID";; logged) echo "$LOGGED_PID";; esac; }
# ticks PID: the process's user and system CPU time so far, in clock ticks.
ticks() { [ -n "$1" ] && awk '{print $14, $15}' "/proc/$1/stat" || echo 0 0; }
# backend: the backend's CPU ticks (user + system) and voluntary context switches so far, over
# all its threads, on one line.
backend() {
    local user system
    read -r user system <<<"$(ticks "$BACKEND_PID")"
    echo "$(( user + system )) $(cat /proc/"$BACKEND_PID"/task/*/status | awk '/^voluntary_ctxt_switches/ {n += $2} END {print n}')"
}

run() { # name output-file
    local name=$1 out=$2 port pid user_before sys_before user_after sys_after
    port=$(port_of "$name"); pid=$(pid_of "$name")
    read -r user_before sys_before <<<"$(ticks "$pid")"
    local backend_before; backend_before=$(backend)
    if [ -n "$H2C" ]; then
        taskset -c 0 h2load -D "$SECONDS_PER_RUN" -c "$CONNECTIONS" -m 1 -t 1 \
            "http://127.0.0.1:$port$REQ_PATH" > "$out.h2load" 2>&1 || true
    else
        taskset -c 0 "$BIN/wakegate-loadtest" rate --rate max --connections "$CONNECTIONS" \
            --duration "${SECONDS_PER_RUN}s" --single-thread --no-admin --no-progress-bar \
            --url "http://127.0.0.1:$port$REQ_PATH" --host bench.local \
            --json "$out.json" >/dev/null 2>"$out.err"
    fi
    read -r user_after sys_after <<<"$(ticks "$pid")"
    echo "$(( user_after - user_before )) $(( sys_after - sys_before ))" > "$out.ticks"
    echo "$backend_before $(backend)" > "$out.backend"
}

echo "==> $ROUNDS rounds of ${SECONDS_PER_RUN}s each, $CONNECTIONS connections, ${H2C:+h2c, }path $REQ_PATH: ${TARGETS[*]}" >&2
N=${#TARGETS[@]}
for round in $(seq 1 "$ROUNDS"); do
    # A short warm-up fills the pools, then the measured runs, in a rotating order.
    for name in "${TARGETS[@]}"; do run "$name" "$WORK/warm"; done
    for i in $(seq 0 $(( N - 1 ))); do
        name=${TARGETS[$(( (i + round) % N ))]}
        run "$name" "$WORK/$name-$round"
        echo "round $round: $name done" >&2
    done
done

# The raw runs are kept beside the summary.
RAW="$OUT/proxy-overhead-runs${H2C:+-h2c}"; rm -rf "$RAW"; mkdir -p "$RAW"
cp "$WORK"/*-[0-9]*.* "$RAW"/ 2>/dev/null || true
python3 - "$RAW" "$ROUNDS" "$(machine)" "$CONNECTIONS" "$SECONDS_PER_RUN" "$REQ_PATH" "${H2C:-}" "$(getconf CLK_TCK)" "${TARGETS[@]}" <<'PY' | tee "$OUT/proxy-overhead${H2C:+-h2c}$( [ "$REQ_PATH" = / ] || echo -body).txt"
import json, re, statistics, sys
work, rounds, machine, conns, secs, path, h2c, hz = sys.argv[1:9]
rounds, hz = int(rounds), int(hz)
targets = sys.argv[9:]
med = statistics.median

def load(name, r):
    base = f"{work}/{name}-{r}"
    ticks = tuple(int(t) for t in open(base + ".ticks").read().split())  # user, system
    b = [int(t) for t in open(base + ".backend").read().split()]  # ticks, wakeups; before, after
    backend = (b[2] - b[0], b[3] - b[1])
    if h2c:
        text = open(base + ".h2load").read()
        rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text).group(1))
        m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
        done, ok = int(m.group(2)), int(m.group(3))
        lat = re.search(r"time for request:\s+([\d.]+)(us|ms)\s+([\d.]+)(us|ms)\s+([\d.]+)(us|ms)", text)
        to_ms = lambda v, u: float(v) / (1000 if u == "us" else 1)
        mean = to_ms(lat.group(5), lat.group(6)) if lat else float("nan")
        return rps, mean, float("nan"), ticks, done, done - ok, backend
    j = json.load(open(base + ".json"))
    done = j["requests"]["sent"]
    return j["throughput"], j["latency"]["p50"] / 1000, j["latency"]["p99"] / 1000, ticks, j["requests"]["ok"], j["requests"]["failed"], backend

rows = {}
for name in targets:
    runs = [load(name, r) for r in range(1, rounds + 1)]
    rows[name] = {
        "rps": [x[0] for x in runs], "p50": [x[1] for x in runs], "p99": [x[2] for x in runs],
        "cpu": [sum(x[3]) * 1e6 / hz / max(x[4], 1) for x in runs],
        "user": [x[3][0] * 1e6 / hz / max(x[4], 1) for x in runs],
        "sys": [x[3][1] * 1e6 / hz / max(x[4], 1) for x in runs],
        "failed": sum(x[5] for x in runs),
        "backend": [x[6][0] * 1e6 / hz / max(x[4], 1) for x in runs],
        "wakes": [x[6][1] / max(x[4], 1) for x in runs],
    }
print(f"machine: {machine}")
print(f"{rounds} rounds x {secs}s, {conns} connections, closed loop, {'h2c' if h2c else 'HTTP/1.1'} clients, path {path}; load on core 0, proxy + backend on core 1")
lat = "mean ms" if h2c else "p50 ms"
print(f"{'target':<10} {'req/s (median)':>15} {'min..max':>17} {lat:>8} {'p99 ms':>8} {'proxy CPU us/req':>17} {'user':>6} {'system':>6} {'failed':>7} {'backend us/req':>15} {'wakeups/req':>12}")
for name, r in rows.items():
    cpu, user, system = (f"{med(r[k]):.1f}" if name != "direct" else "-" for k in ("cpu", "user", "sys"))
    print(f"{name:<10} {med(r['rps']):>15.0f} {min(r['rps']):>8.0f}..{max(r['rps']):<8.0f} {med(r['p50']):>8.3f} {med(r['p99']):>8.3f} {cpu:>17} {user:>6} {system:>6} {r['failed']:>7} {med(r['backend']):>15.1f} {med(r['wakes']):>12.2f}")
w = rows["wakegate"]
for ref in [t for t in targets if t not in ("direct", "wakegate")]:
    ratios = [a / b for a, b in zip(w["rps"], rows[ref]["rps"])]
    print(f"throughput wakegate/{ref} per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {med(ratios):.2f}"
          f"; CPU per request {ref}/wakegate {med(rows[ref]['cpu']) / med(w['cpu']):.2f}")
PY
