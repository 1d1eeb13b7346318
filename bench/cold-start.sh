#!/usr/bin/env bash
# Cold-start overhead in local mode: first byte minus the moment the backend became ready, for
# the example backend with a known boot delay, over K cold starts of N requests each.
#
#   bench/cold-start.sh [ITERATIONS] [CONCURRENCY] [BOOT_DELAY]   (WAKEGATE=PATH: that interceptor binary)
#
# BENCH_PIN=1 runs the interceptor (and so the backend it starts) on core 1 and the load
# generator on core 0, as bench/proxy-overhead.sh does, so that the three do not preempt each
# other on a two-core machine.
source "$(dirname "$0")/common.sh"

ITERATIONS="${1:-30}"
CONCURRENCY="${2:-10}"
BOOT="${3:-300ms}"
build

PROXY=$(free_port); ADMIN=$(free_port); BACKEND=$(free_port)
cat > "$WORK/cold.yaml" <<YAML
routes:
  - name: cold
    hosts: ["cold.local"]
    target:
      command: ["$BIN/wakegate-interceptor", "backend", "--port", "$BACKEND", "--boot-delay", "$BOOT"]
      port: $BACKEND
      readinessProbe: { httpGet: { path: /healthz } }
    scaledownPeriod: 300ms
YAML
PIN_IC=(); PIN_LOAD=()
if [ -n "${BENCH_PIN:-}" ]; then PIN_IC=(taskset -c 1); PIN_LOAD=(taskset -c 0); fi
RUST_LOG=warn "${PIN_IC[@]}" "${WAKEGATE:-$BIN/wakegate-interceptor}" --config "$WORK/cold.yaml" \
    --proxy-addr "127.0.0.1:$PROXY" --admin-addr "127.0.0.1:$ADMIN" >"$WORK/ic.log" 2>&1 &
PIDS+=($!)
wait_port "$ADMIN"

echo "machine: $(machine)${BENCH_PIN:+ (interceptor and backend on core 1, load on core 0)}" | tee "$OUT/cold-start.txt"
"${PIN_LOAD[@]}" "$BIN/wakegate-loadtest" cold-start -k "$ITERATIONS" -n "$CONCURRENCY" --no-progress-bar \
    --url "http://127.0.0.1:$PROXY/" --host cold.local --admin "http://127.0.0.1:$ADMIN/" \
    --json "$OUT/cold-start.json" --svg "$OUT/cold-start.svg" 2>/dev/null | tee -a "$OUT/cold-start.txt"
