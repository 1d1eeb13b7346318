#!/usr/bin/env bash
# Idle footprint: RSS of the interceptor in local mode, of the interceptor in Kubernetes mode
# and of the controller (both against the test API server, with no HTTPScaledObjects).
#
#   bench/footprint.sh        (WAKEGATE=PATH: that interceptor binary instead, an earlier build)
source "$(dirname "$0")/common.sh"
build
(cd "$ROOT" && cargo build --release --locked -p wakegate-testapi --example serve >&2)

# VmRSS, and how much of it is the process's own memory (RssAnon: heap, stacks) and how much
# the binary's and libraries' pages (RssFile).
rss() { awk '/VmRSS/{r=$2} /RssAnon/{a=$2} /RssFile/{f=$2} END{printf "%s (anonymous %s, file %s)", r, a, f}' "/proc/$1/status"; }
settle() { sleep 2; } # let start-up allocations settle before reading (a reading, not sync)

PROXY=$(free_port); ADMIN=$(free_port)
RUST_LOG=warn "${WAKEGATE:-$BIN/wakegate-interceptor}" --config "$ROOT/examples/local.yaml" \
    --proxy-addr "127.0.0.1:$PROXY" --admin-addr "127.0.0.1:$ADMIN" >/dev/null 2>&1 &
LOCAL=$!; PIDS+=($LOCAL)
wait_port "$ADMIN"

"$BIN/examples/serve" "$WORK/kubeconfig" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 1 500); do [ -s "$WORK/kubeconfig" ] && break; sleep 0.01; done
KPROXY=$(free_port); KADMIN=$(free_port)
KUBECONFIG="$WORK/kubeconfig" RUST_LOG=warn "${WAKEGATE:-$BIN/wakegate-interceptor}" \
    --proxy-addr "127.0.0.1:$KPROXY" --admin-addr "127.0.0.1:$KADMIN" >/dev/null 2>&1 &
KUBE=$!; PIDS+=($KUBE)
GRPC=$(free_port); CADMIN=$(free_port)
KUBECONFIG="$WORK/kubeconfig" RUST_LOG=warn "$BIN/wakegate-controller" --scaler standalone \
    --grpc-addr "127.0.0.1:$GRPC" --admin-addr "127.0.0.1:$CADMIN" \
    --interceptor-admin-addrs "127.0.0.1:$KADMIN" --namespace default >/dev/null 2>&1 &
CTRL=$!; PIDS+=($CTRL)
wait_port "$KADMIN"; wait_port "$CADMIN"
settle
{
    echo "machine: $(machine)"
    echo "interceptor, local mode (examples/local.yaml), idle: $(rss $LOCAL) KiB"
    echo "interceptor, Kubernetes mode (test API server, no objects), idle: $(rss $KUBE) KiB"
    echo "controller, standalone (test API server, no objects), idle: $(rss $CTRL) KiB"
    for f in wakegate-interceptor wakegate-controller wakegate-loadtest; do
        echo "binary $f: $(stat -c %s "$BIN/$f") bytes"
    done
} | tee "$OUT/footprint.txt"
