#!/usr/bin/env bash
# Burst at zero: M requests at once against a cold target in local mode, with the
# interceptor's peak RSS.
#
#   bench/burst.sh [REQUESTS] [BOOT_DELAY]
source "$(dirname "$0")/common.sh"

REQUESTS="${1:-10000}"
BOOT="${2:-2s}"
build

PROXY=$(free_port); ADMIN=$(free_port); BACKEND=$(free_port)
cat > "$WORK/burst.yaml" <<YAML
routes:
  - name: burst
    hosts: ["burst.local"]
    target:
      command: ["$BIN/wakegate-interceptor", "backend", "--port", "$BACKEND", "--boot-delay", "$BOOT"]
      port: $BACKEND
      readinessProbe: { httpGet: { path: /healthz } }
    scaledownPeriod: 1s
    timeouts: { readiness: 60s }
YAML
RUST_LOG=warn "$BIN/wakegate-interceptor" --config "$WORK/burst.yaml" \
    --proxy-addr "127.0.0.1:$PROXY" --admin-addr "127.0.0.1:$ADMIN" >"$WORK/ic.log" 2>&1 &
IC=$!; PIDS+=($IC)
wait_port "$ADMIN"
sleep 0.5 # settle, then read the idle RSS (a reading, not synchronisation)
IDLE=$(awk '/VmRSS/{print $2}' "/proc/$IC/status")

{
    echo "machine: $(machine)"
    echo "interceptor idle RSS before the burst: $IDLE KiB"
} | tee "$OUT/burst.txt"
"$BIN/wakegate-loadtest" burst -m "$REQUESTS" --no-progress-bar --pid "$IC" \
    --url "http://127.0.0.1:$PROXY/" --host burst.local --admin "http://127.0.0.1:$ADMIN/" \
    --json "$OUT/burst.json" --svg "$OUT/burst.svg" 2>/dev/null | tee -a "$OUT/burst.txt"
python3 - "$OUT/burst.json" "$IDLE" <<'PY' | tee -a "$OUT/burst.txt"
import json, sys
r = json.load(open(sys.argv[1])); idle = int(sys.argv[2])
p = r["processes"][0]; b = r["burst"]
peak = max(p["peakRssKib"], p["maxSampledRssKib"])
print(f"lost: {b['requested'] - b['succeeded']} of {b['requested']}; peak held {b['peakHeld']}")
print(f"interceptor peak RSS {peak / 1024:.1f} MiB ({(peak - idle) / max(b['peakHeld'], 1):.1f} KiB per held request above idle)")
PY
