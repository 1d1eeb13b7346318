#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: Wakegate against the
# minimal hyper proxy (bench/hyper-proxy), bare (on glibc's allocator and on jemalloc, the one
# Wakegate ships with) and doing the edge's per-request duties.
# Instruction counts do not depend on what else the machine is doing, so a change of a few
# percent shows where wall-clock runs are too noisy to.
# They leave out the kernel (about two thirds of a request's CPU time on loopback) and weigh an
# atomic or a cache miss like any other instruction: they complement bench/proxy-overhead.sh.
#
# Two more columns tell how much code a request runs, which instruction counts do not: a
# request that runs 1,000 instructions of straight-line code costs more than one that runs a
# 100-instruction loop ten times, once the code no longer fits the CPU's instruction cache.
#   hot code KiB   the 64-byte lines of machine code that run at least once every two requests
#   L1i miss/req   misses of callgrind's simulated 32 KiB, 8-way L1 instruction cache (the proxy
#                  alone: the kernel's code and the backend's, which share the core in
#                  bench/proxy-overhead.sh, evict more)
#
#   bench/instructions.sh [REQUESTS]     (default 20000; WAKEGATE_BEFORE=PATH also counts that build)
#
# Each proxy runs under callgrind with one worker thread. 2,000 requests warm it up (pools,
# buffers), the counters are zeroed, then REQUESTS small requests over 32 keep-alive
# connections are counted. Installs valgrind with apt-get when missing (needs root).
source "$(dirname "$0")/common.sh"

REQUESTS="${1:-20000}"
build
install_pkg valgrind valgrind

BACKEND=$(free_port)
"$BIN/wakegate-interceptor" backend --port "$BACKEND" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$BACKEND"
cat > "$WORK/wakegate.yaml" <<YAML
routes:
  - name: bench
    target: { upstream: "127.0.0.1:$BACKEND" }
YAML

load() { # port requests json
    "$BIN/wakegate-loadtest" rate --rate max --connections 32 --requests "$2" --duration 600s \
        --no-admin --no-progress-bar --url "http://127.0.0.1:$1/" --host bench.local \
        --json "$3" >/dev/null 2>&1
}

count() { # name command...
    local name=$1 port out vg total ok; shift
    port=$(free_port)
    out="$WORK/$name.callgrind"
    # The proxy's address is the command's {} argument.
    local cmd=("${@//\{\}/127.0.0.1:$port}")
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind --cache-sim=yes --dump-instr=yes --callgrind-out-file="$out" \
        "${cmd[@]}" >"$WORK/$name.log" 2>&1 &
    vg=$!; PIDS+=($vg)
    for _ in $(seq 1 6000); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.01; done
    load "$port" 2000 "$WORK/$name-warm.json"
    callgrind_control -z "$vg" >/dev/null 2>&1
    load "$port" "$REQUESTS" "$WORK/$name.json"
    callgrind_control -d "$vg" >/dev/null 2>&1
    # The dump is written by the profiled process: wait for it.
    for _ in $(seq 1 500); do [ -s "$out.1" ] && break; sleep 0.01; done
    { kill -9 "$vg" && wait "$vg"; } 2>/dev/null || true
    ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['requests']['ok'])" "$WORK/$name.json")
    python3 - "$out.1" "$name" "$ok" <<'PY' | tee -a "$RESULT"
import sys
path, name, ok = sys.argv[1], sys.argv[2], int(sys.argv[3])
events, totals, hot = [], None, {}  # hot: runs per instruction address
addr, after_call, positions = 0, False, 2
with open(path) as f:
    for line in f:
        if line.startswith("positions:"):
            positions = len(line.split()) - 1  # `instr line`: the address, then the line
        elif line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")) and totals is None:
            totals = [int(v) for v in line.split()[1:]]
        elif line.startswith("calls="):
            after_call = True  # the next cost line is the call's inclusive cost: skipped
        elif line[:1] in "0123456789+-*":
            # A cost line: instruction address (absolute, or relative to the last), source
            # line, then the events, Ir first.
            parts = line.split()
            a = parts[0]
            if a.startswith("0x"):
                addr = int(a, 16)
            elif a[0] in "+-" and len(a) > 1:
                addr += int(a, 16) if a[0] == "+" else -int(a[1:], 16)
            if after_call:
                after_call = False
                continue
            if len(parts) > positions and parts[positions].isdigit():
                hot[addr] = hot.get(addr, 0) + int(parts[positions])
ir = totals[events.index("Ir")]
i1 = totals[events.index("I1mr")]
# A line is hot if one of its instructions ran at least once every two requests on average.
hot_kib = len({a >> 6 for a, n in hot.items() if n >= ok / 2}) * 64 / 1024
print(f"{name:<9} {ok:7d} requests  {ir:12d} instructions  {ir / ok:7.0f} per request"
      f"  hot code {hot_kib:5.1f} KiB  L1i miss/req {i1 / ok:6.0f}")
PY
}

RESULT="$OUT/instructions.txt"
{ echo "machine: $(machine)"; echo "callgrind, one worker thread, $REQUESTS small requests over 32 keep-alive connections after 2,000 to warm up"; } | tee "$RESULT"
count wakegate "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" --proxy-addr {} --admin-addr "127.0.0.1:$(free_port)"
[ -z "${WAKEGATE_BEFORE:-}" ] || count before "$WAKEGATE_BEFORE" --config "$WORK/wakegate.yaml" --proxy-addr {} --admin-addr "127.0.0.1:$(free_port)"
count hyper "$BIN/hyper-proxy" {} "127.0.0.1:$BACKEND"
count hyper-jem "$BIN/hyper-proxy-jemalloc" {} "127.0.0.1:$BACKEND"
count duties "$BIN/hyper-proxy" {} "127.0.0.1:$BACKEND" duties
