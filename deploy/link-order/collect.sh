#!/usr/bin/env bash
# Writes deploy/link-order/wakegate-interceptor.txt: the functions the interceptor runs at
# start-up and while idle in both modes, and on the request path, by name without build
# hashes. order.sh lays them out first. Run it after a change that moves much code (a new
# dependency, a new start-up step); CI reports how many listed names each build finds.
#
#   deploy/link-order/collect.sh     (root: installs valgrind if missing)
# The ports, waits, clean-up and release build are the benchmarks' (bench/common.sh), so the
# profiled build is the one bench/ measures: the same invocation, features and code.
# (BENCH_NO_BUILD=1: profile the copy the last build kept.)
source "$(dirname "${BASH_SOURCE[0]}")/../../bench/common.sh"
LIST="$ROOT/deploy/link-order/wakegate-interceptor.txt"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    # Relinked, so that order.sh keeps a copy with symbols.
    touch "$ROOT/interceptor/src/main.rs"
    export WAKEGATE_LINK_KEEP=1
fi
build
(cd "$ROOT" && cargo build --release --locked -p wakegate-testapi --example serve >&2)
# Under its own name: local mode finds the example backend's command (the interceptor itself)
# beside it.
mkdir "$WORK/bin"
INTERCEPTOR="$WORK/bin/wakegate-interceptor"
cp "$(ls -t "$BIN"/deps/wakegate_interceptor-*.symbols | head -1)" "$INTERCEPTOR"
profile() { # profile OUT ARGS...: the interceptor under callgrind, function names unmangled
    local out=$1; shift
    RUST_LOG=warn valgrind --tool=callgrind --demangle=no --callgrind-out-file="$out" "$INTERCEPTOR" "$@" \
        >/dev/null 2>"$out.log" &
    PIDS+=($!)
}
stop() { kill -INT "$1"; for _ in $(seq 1 3000); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.01; done; kill -9 "$1"; }

# Kubernetes mode against the test API server: start-up, watches, idle, the admin endpoints.
"$BIN/examples/serve" "$WORK/kubeconfig" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 1 500); do [ -s "$WORK/kubeconfig" ] && break; sleep 0.01; done
P=$(free_port); A=$(free_port)
KUBECONFIG="$WORK/kubeconfig" profile "$WORK/k8s.out" --proxy-addr "127.0.0.1:$P" --admin-addr "127.0.0.1:$A"
K=${PIDS[-1]}
wait_port "$A"
# The controller follows the interceptor's admin API (its queue, its event stream), as in a
# cluster.
G=$(free_port); C=$(free_port)
KUBECONFIG="$WORK/kubeconfig" RUST_LOG=warn "$BIN/wakegate-controller" \
    --scaler standalone --grpc-addr "127.0.0.1:$G" --admin-addr "127.0.0.1:$C" \
    --interceptor-admin-addrs "127.0.0.1:$A" --namespace default >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$C"
sleep 5 # idle: what runs while nothing happens is part of what stays resident
for path in /metrics /livez /readyz /status /queue; do curl -s --max-time 30 "127.0.0.1:$A$path" >/dev/null || true; done
stop "$K"

# Local mode: start-up, a cold start, warm requests, idle, the admin endpoints.
P=$(free_port); A=$(free_port)
profile "$WORK/local.out" --config "$ROOT/examples/local.yaml" --proxy-addr "127.0.0.1:$P" --admin-addr "127.0.0.1:$A"
L=${PIDS[-1]}
wait_port "$A"
for _ in $(seq 1 20); do curl -s --max-time 30 -H 'Host: hello.localhost' "127.0.0.1:$P/" >/dev/null || true; done
sleep 5
for path in /metrics /livez /readyz /status /queue; do curl -s --max-time 30 "127.0.0.1:$A$path" >/dev/null || true; done
stop "$L"

# Every function that ran (callgrind names each once as `fn=(id) name`), without its hash.
python3 - "$WORK/k8s.out" "$WORK/local.out" > "$WORK/mangled" <<'PY'
import re, sys
for path in sys.argv[1:]:
    names, ran = {}, set()
    for line in open(path, errors="replace"):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            if kind == "fn":
                ran.add(ident)
    for ident in ran:
        name = names.get(ident, "")
        # Rust's functions and the C and assembly linked in (ring's), not the loader's or libc's.
        if name and not name.startswith("0x"):
            print(name)
PY
{
    echo "# Functions the interceptor runs at start-up, while idle (both modes) and on the request"
    echo "# path, without build hashes: order.sh lays them out first. Written by collect.sh."
    # Only what the binary itself defines (not libc's or the loader's).
    nm --defined-only "$INTERCEPTOR" | awk '{print $3}' | LC_ALL=C sort -u > "$WORK/defined"
    LC_ALL=C sort -u "$WORK/mangled" | LC_ALL=C comm -12 - "$WORK/defined" | c++filt |
        sed -E 's/::h[0-9a-f]+$//; s/\[[0-9a-f]+\]//g' | LC_ALL=C sort -u
} > "$LIST"
echo "$(grep -vc '^#' "$LIST") functions listed in $LIST" >&2
