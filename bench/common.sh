# Shared by the bench scripts: build the release binaries once, pick free ports, wait for a
# port, and clean up every process a script started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wakegate/target}"
BIN="$CARGO_TARGET_DIR/release"
OUT="${BENCH_OUT:-$ROOT/bench/out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

build() {
    echo "==> building release binaries (the shipped profile: lto, one codegen unit)" >&2
    (cd "$ROOT" && cargo build --release --locked -p wakegate-interceptor -p wakegate-loadtest -p wakegate-controller -p wakegate-testapi >&2)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() {
    for _ in $(seq 1 1000); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    echo "nothing listens on port $1" >&2
    return 1
}

machine() {
    echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr), rustc $(rustc --version | cut -d' ' -f2)"
}
