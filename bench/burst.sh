#!/usr/bin/env bash
# Burst at zero: M requests at once against a cold target in local mode, with the
# interceptor's peak RSS.
#
#   bench/burst.sh [REQUESTS] [BOOT_DELAY] [MAX_IN_FLIGHT_PER_ENDPOINT]
#
# Reports the RSS while every request is held, and the peak, which comes at the release: each
# released request opens its own upstream connection unless the route caps in-flight requests
# per endpoint (the third argument). WAKEGATE=PATH runs that interceptor binary instead (an
# earlier build, for before/after figures).
source "$(dirname "$0")/common.sh"

REQUESTS="${1:-10000}"
BOOT="${2:-2s}"
CAP="${3:-}"
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
${CAP:+    maxInFlightPerEndpoint: $CAP}
YAML
RUST_LOG=warn "${WAKEGATE:-$BIN/wakegate-interceptor}" --config "$WORK/burst.yaml" \
    --proxy-addr "127.0.0.1:$PROXY" --admin-addr "127.0.0.1:$ADMIN" >"$WORK/ic.log" 2>&1 &
IC=$!; PIDS+=($IC)
wait_port "$ADMIN"
sleep 0.5 # settle, then read the idle RSS (a reading, not synchronisation)
IDLE=$(awk '/VmRSS/{print $2}' "/proc/$IC/status")

{
    echo "machine: $(machine)"
    echo "interceptor idle RSS before the burst: $IDLE KiB"
} | tee "$OUT/burst.txt"
# Reads the RSS once every request is held (polling /status), while the burst runs.
python3 - "$ADMIN" "$IC" "$REQUESTS" > "$WORK/held-rss" <<'PY' &
import json, sys, time, urllib.request
admin, pid, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        held = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/status"))["held"].get("burst", 0)
    except Exception:
        held = 0
    if held >= want:
        rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0]
        print(rss)
        break
    time.sleep(0.05)
PY
WATCH=$!
"$BIN/wakegate-loadtest" burst -m "$REQUESTS" --no-progress-bar --pid "$IC" \
    --url "http://127.0.0.1:$PROXY/" --host burst.local --admin "http://127.0.0.1:$ADMIN/" \
    --json "$OUT/burst.json" --svg "$OUT/burst.svg" 2>/dev/null | tee -a "$OUT/burst.txt"
wait "$WATCH" || true
python3 - "$OUT/burst.json" "$IDLE" "$(cat "$WORK/held-rss")" "${CAP:-none}" <<'PY' | tee -a "$OUT/burst.txt"
import json, sys
r = json.load(open(sys.argv[1])); idle = int(sys.argv[2])
held_rss = int(sys.argv[3]) if sys.argv[3] else 0
p = r["processes"][0]; b = r["burst"]
peak = max(p["peakRssKib"], p["maxSampledRssKib"])
print(f"lost: {b['requested'] - b['succeeded']} of {b['requested']}; peak held {b['peakHeld']}")
n = max(b["peakHeld"], 1)
if held_rss:
    print(f"interceptor RSS with all {n} held: {held_rss / 1024:.1f} MiB ({(held_rss - idle) / n:.1f} KiB per held request above idle)")
print(f"interceptor peak RSS (at the release, maxInFlightPerEndpoint {sys.argv[4]}): {peak / 1024:.1f} MiB")
PY
