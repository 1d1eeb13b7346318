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
    # BENCH_NO_BUILD=1: use the binaries already in the target directory (a rerun).
    [ -n "${BENCH_NO_BUILD:-}" ] && return 0
    echo "==> building release binaries (the shipped profile: lto, one codegen unit)" >&2
    # One invocation for every binary, so that features unify the same way each time and
    # nothing is rebuilt between scripts.
    (cd "$ROOT" && cargo build --release --locked -p wakegate-interceptor -p wakegate-loadtest \
        -p wakegate-controller -p wakegate-testapi -p wakegate-bench-hyper-proxy >&2)
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

# install_pkg COMMAND PACKAGE...: apt-get install the first package that installs, unless
# COMMAND is already there. Keeps a package from starting a system service (nginx on port 80).
install_pkg() {
    local cmd=$1; shift
    command -v "$cmd" >/dev/null && return 0
    echo "==> installing $*" >&2
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    local ok=1
    for pkg in "$@"; do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null 2>&1; then ok=0; break; fi
    done
    rm -f /usr/sbin/policy-rc.d
    return $ok
}

# The reference proxies, installed or built on demand (the minimal hyper proxy, bench/hyper-proxy,
# the floor of the library Wakegate is built on, comes with `build`): nginx, and Go's httputil.ReverseProxy (the
# add-on's engine; skipped when golang-go cannot be installed).
build_references() {
    install_pkg nginx nginx-light nginx
    GO_PROXY=""
    if install_pkg go golang-go; then
        GO_PROXY="$WORK/go-proxy"
        (cd "$ROOT/bench/go-proxy" && HOME="${HOME:-/root}" GOCACHE="$WORK/gocache" GO111MODULE=off \
            go build -o "$GO_PROXY" main.go >&2) || GO_PROXY=""
    fi
    [ -n "$GO_PROXY" ] || echo "==> golang-go unavailable: the Go reference is skipped" >&2
}

# nginx_conf DIR LISTEN_PORT BACKEND_PORT [LISTEN_FLAGS]: nginx as the references run it: one
# worker, upstream keepalive, HTTP/1.1 upstream, no access log. A client connection is not
# closed after 1,000 requests (nginx's default `keepalive_requests`): the other proxies never
# close one, and h2load does not open a new one, so an h2c run would stall at 1,000 each.
nginx_conf() {
    local dir=$1 port=$2 backend=$3 flags=${4:-}
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 32768; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    proxy_read_timeout 300s;
    upstream backend { server 127.0.0.1:$backend; keepalive 64; }
    server {
        listen 127.0.0.1:$port $flags;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
CONF
}

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
