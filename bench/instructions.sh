#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: Wakegate against the
# minimal hyper proxy (bench/hyper-proxy), bare (on glibc's allocator and on jemalloc, the one
# Wakegate ships with) and doing the edge's per-request duties.
# Instruction counts do not depend on what else the machine is doing, so a change of a few
# percent shows where wall-clock runs are too noisy to.
# They leave out the kernel (about two thirds of a request's CPU time on loopback) and weigh an
# atomic or a cache miss like any other instruction: they complement bench/proxy-overhead.sh.
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
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
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
    total=$(awk '/^(summary|totals):/{print $2; exit}' "$out.1")
    ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['requests']['ok'])" "$WORK/$name.json")
    awk -v n="$name" -v t="$total" -v ok="$ok" 'BEGIN {
        printf "%-9s %7d requests  %12d instructions  %7.0f per request\n", n, ok, t, t / ok }' | tee -a "$RESULT"
}

RESULT="$OUT/instructions.txt"
{ echo "machine: $(machine)"; echo "callgrind, one worker thread, $REQUESTS small requests over 32 keep-alive connections after 2,000 to warm up"; } | tee "$RESULT"
count wakegate "$BIN/wakegate-interceptor" --config "$WORK/wakegate.yaml" --proxy-addr {} --admin-addr "127.0.0.1:$(free_port)"
[ -z "${WAKEGATE_BEFORE:-}" ] || count before "$WAKEGATE_BEFORE" --config "$WORK/wakegate.yaml" --proxy-addr {} --admin-addr "127.0.0.1:$(free_port)"
count hyper "$BIN/hyper-proxy" {} "127.0.0.1:$BACKEND"
count hyper-jem "$BIN/hyper-proxy-jemalloc" {} "127.0.0.1:$BACKEND"
count duties "$BIN/hyper-proxy" {} "127.0.0.1:$BACKEND" duties
