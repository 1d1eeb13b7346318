#!/usr/bin/env bash
# Where the memory of an in-flight proxied request goes: Wakegate and the minimal hyper proxy
# (bench/hyper-proxy) each run under heaptrack while N requests wait on an upstream that answers
# after a delay; for each, the heap at its peak per request, and the largest allocation sites
# live at that peak, per request. bench/inflight-memory.sh measures the RSS; this says what the
# heap holds, so the two tell apart what is allocated from how much of it is touched.
#
#   bench/inflight-heap.sh [N] [DELAY_MS] [SITES]     (defaults 2000, 8000, 16)
#
# Builds both proxies with symbols (the shipped profile, unstripped, line tables) into
# $CARGO_TARGET_DIR/heap-profile, and installs heaptrack with apt-get when missing (needs root).
# heaptrack sees only the C library's allocator, so Wakegate is built here without its
# `jemalloc` feature: the sites and sizes are the shipped binary's, and how many pages they
# touch is bench/inflight-memory.sh's to measure.
source "$(dirname "$0")/common.sh"

N="${1:-2000}"
DELAY="${2:-8000}"
SITES="${3:-16}"
RESULT="$OUT/inflight-heap.txt"
ulimit -n 65536 2>/dev/null || true
build
install_pkg heaptrack heaptrack
PROFILE_DIR="$CARGO_TARGET_DIR/heap-profile"
echo "==> building both proxies with symbols into $PROFILE_DIR" >&2
(cd "$ROOT" && CARGO_TARGET_DIR="$PROFILE_DIR" CARGO_PROFILE_RELEASE_STRIP=none \
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only WAKEGATE_LINK_ORDER=0 \
    cargo build --release --locked --no-default-features -p wakegate-interceptor \
        -p wakegate-bench-hyper-proxy >&2)
SYM="$PROFILE_DIR/release"

BACKEND=$(free_port)
"$BIN/wakegate-interceptor" backend --port "$BACKEND" --max-connections $(( N * 2 )) >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$BACKEND"

# sites FLAMEGRAPH: the heap at its peak per request, then the largest sites per request, each
# named by the source files on its stack.
sites() {
    python3 - "$1" "$N" "$SITES" <<'PY'
import re, sys
path, n, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PLUMBING = {"alloc.rs", "unix.rs", "boxed.rs", "mod.rs", "sync.rs", "raw.rs", "harness.rs",
            "panic.rs", "core.rs", "option.rs", "current.rs", "local.rs", "function.rs",
            "future.rs", "either.rs", "select.rs", "poll_fn.rs", "unsafe_cell.rs", "panicking.rs"}
rows = []
for line in open(path):
    stack, _, cost = line.rstrip("\n").rpartition(" ")
    if cost.isdigit():
        rows.append((int(cost), stack.rstrip(";").split(";")))
rows.sort(key=lambda r: -r[0])
print(f"  heap at peak: {sum(c for c, _ in rows) / n:8.0f} bytes per request")
for cost, frames in rows[:top]:
    # The source files on the site's stack, each once, leaving out the allocator's and std's
    # plumbing: enough to tell the sites apart (inlined frames may come in either order).
    files = []
    for frame in reversed(frames):
        m = re.search(r"\(([^()]*\.rs)\)$", frame)
        if m and m.group(1) not in PLUMBING and m.group(1) not in files:
            files.append(m.group(1))
    print(f"  {cost / n:8.0f}  {' '.join(files[:6])}")
PY
}

measure() { # name port command...
    local name=$1 port=$2 out="$WORK/$1" pid; shift 2
    RUST_LOG=warn heaptrack -o "$out" "$@" >"$WORK/$name.log" 2>&1 &
    pid=$!; PIDS+=($pid)
    wait_port "$port"
    "$BIN/wakegate-loadtest" rate --rate max --connections "$N" --requests "$N" \
        --duration 120s --timeout 120s --no-admin --no-progress-bar \
        --url "http://127.0.0.1:$port/sleep?ms=$DELAY" --host bench.local \
        --json "$WORK/$name.json" >/dev/null 2>&1 || true
    # The proxy alone is stopped (its command line starts with its path; heaptrack's wrapper
    # then writes the data and exits).
    pkill -TERM -f -- "^$1 " 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    heaptrack_print -f "$out".*zst --print-peaks 0 --print-allocators 0 --print-temporary 0 \
        --print-leaks 0 --print-flamegraph "$WORK/$name.fg" --flamegraph-cost-type peak >/dev/null 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['requests']; bad={s: n for s, n in r['byStatus'].items() if not 200 <= int(s) < 400}; print(f'$name: ok {r[\"ok\"]}, failed {r[\"failed\"]}', bad or '', r['errors'] or '')" "$WORK/$name.json"
    # A failed request's cause, as the proxy logged it (warnings and errors only).
    grep -m 5 -E 'WARN|ERROR' "$WORK/$name.log" || true
    sites "$WORK/$name.fg"
}

{
    echo "machine: $(machine)"
    echo "$N concurrent requests, upstream answers after $DELAY ms; heaptrack, live allocations at the heap's peak, bytes per request"
} | tee "$RESULT"

cat > "$WORK/wakegate.yaml" <<YAML
routes:
  - name: bench
    target: { upstream: "127.0.0.1:$BACKEND" }
YAML
P=$(free_port)
measure wakegate "$P" "$SYM/wakegate-interceptor" --config "$WORK/wakegate.yaml" \
    --proxy-addr "127.0.0.1:$P" --admin-addr "127.0.0.1:$(free_port)" | tee -a "$RESULT"
P=$(free_port)
measure hyper "$P" "$SYM/hyper-proxy" "127.0.0.1:$P" "127.0.0.1:$BACKEND" | tee -a "$RESULT"
