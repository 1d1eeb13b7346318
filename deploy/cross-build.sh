#!/usr/bin/env bash
# Release builds for the Raspberry Pi (and x86), with Debian's packaged Rust, tested under
# emulation. The Dockerfile runs the same steps, so what CI builds here is what the images hold.
#
#   deploy/cross-build.sh install            # Debian packages (root): rustc-web, cargo-web,
#                                            # gcc cross compilers, qemu; and the arm64/armhf
#                                            # std (libstd-rust-web-dev:<arch>) unpacked
#   deploy/cross-build.sh build ARCH...      # ARCH: arm64, armv7, amd64; binaries land in
#                                            # $OUT/<arch>/ (default target/cross/)
#   deploy/cross-build.sh test-arm64 [ARGS]  # the interceptor's and loadtest's tests, built
#                                            # for aarch64 and run under qemu-user
#   deploy/cross-build.sh ci                 # install, build arm64 + armv7, test-arm64, sizes
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/target/cross}"
# Debian's packaged toolchain keeps its own target dir, apart from rustup's builds.
export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debian-rust}"
# Debian's cargo-web and rustc-web install as /usr/bin/cargo and /usr/bin/rustc; name them
# outright, so a rustup toolchain earlier on PATH is not picked up instead.
CARGO="${DEBIAN_CARGO:-/usr/bin/cargo}"
export RUSTC="${DEBIAN_RUSTC:-/usr/bin/rustc}"
export RUSTDOC="${DEBIAN_RUSTDOC:-/usr/bin/rustdoc}"
BINARIES=(wakegate-interceptor wakegate-controller wakegate-loadtest)
# Where the other architectures' standard libraries are unpacked (see std_for).
SYSROOT="${DEBIAN_SYSROOT:-$CARGO_TARGET_DIR/sysroot}"
WORK_DEBS="$CARGO_TARGET_DIR/debs"
# Sizes are checked against this (bytes): 15 MiB.
MAX_SIZE=$((15 * 1024 * 1024))

triple() {
    case "$1" in
        arm64) echo aarch64-unknown-linux-gnu ;;
        armv7) echo armv7-unknown-linux-gnueabihf ;;
        amd64) echo x86_64-unknown-linux-gnu ;;
        *) echo "unknown architecture $1 (arm64, armv7 or amd64)" >&2; exit 64 ;;
    esac
}

gcc_prefix() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        x86_64-unknown-linux-gnu) echo x86_64-linux-gnu ;;
    esac
}

# Points cargo and the cc crate (ring builds C and assembly) at the cross compilers.
cross_env() {
    local t=$1 up
    up=$(echo "$t" | tr 'a-z-' 'A-Z_')
    # The cross gcc links, through deploy/link-order/order.sh (the release binaries' code laid
    # out start-up and request path first, with lld). A script per target names its gcc and
    # nm: the host's linker setting (.cargo/config.toml) still links the build scripts.
    local link="$CARGO_TARGET_DIR/order-$t"
    mkdir -p "$CARGO_TARGET_DIR"
    printf '#!/bin/sh\nWAKEGATE_LINK_CC=%s-gcc WAKEGATE_LINK_NM=%s-nm exec %s "$@"\n' \
        "$(gcc_prefix "$t")" "$(gcc_prefix "$t")" "$ROOT/deploy/link-order/order.sh" > "$link"
    chmod +x "$link"
    export "CARGO_TARGET_${up}_LINKER=$link"
    export "CC_$(echo "$t" | tr '-' '_')=$(gcc_prefix "$t")-gcc"
    export "AR_$(echo "$t" | tr '-' '_')=$(gcc_prefix "$t")-ar"
    local run
    run=$(runner "$t")
    if [ -n "$run" ]; then
        export "CARGO_TARGET_${up}_RUNNER=$run"
    fi
    # Only target crates get the sysroot; build scripts and proc macros use the host's.
    # (These replace .cargo/config.toml's rustflags, so its symbol mangling is named again.)
    export "CARGO_TARGET_${up}_RUSTFLAGS=--sysroot=$SYSROOT -C symbol-mangling-version=v0"
}

runner() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu" ;;
        armv7-unknown-linux-gnueabihf) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
        *) echo "" ;;
    esac
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    # A mirror caught mid-sync fails an index now and then (seen: bookworm-security's armhf
    # index); apt carries on with what it has.
    apt-get update -q -o Acquire::Retries=3 || true
    apt-get install -y -q --no-install-recommends \
        rustc-web cargo-web libstd-rust-web-dev curl ca-certificates \
        gcc gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross \
        qemu-user-static lld
    local version
    version=$(dpkg-query -W -f '${Version}' rustc-web)
    for arch in arm64 armhf; do
        std_for "$arch" "$version"
    done
}

# The standard library for another architecture: Debian's libstd-rust-web-dev:<arch>, at the
# exact version of the installed rustc-web. It is unpacked into a sysroot of its own rather
# than installed with `dpkg --add-architecture`: the rlibs are all a cross build needs, while
# the multiarch install drags in LLVM for that architecture and fails whenever the mirror's
# indexes for the architectures are out of step (seen: bookworm-security's armhf index stale).
std_for() {
    local arch=$1 version=$2 deb dir
    deb="libstd-rust-web-dev_${version}_${arch}.deb"
    dir="$WORK_DEBS/$arch"
    mkdir -p "$dir" "$SYSROOT/lib/rustlib"
    if [ ! -f "$dir/$deb" ]; then
        # The security archive first (where rustc-web's updates are), then the release.
        curl -fsSL --retry 3 -o "$dir/$deb" \
            "http://deb.debian.org/debian-security/pool/updates/main/r/rustc-web/$deb" \
            || curl -fsSL --retry 3 -o "$dir/$deb" \
                "http://deb.debian.org/debian/pool/main/r/rustc-web/$deb"
    fi
    dpkg-deb -x "$dir/$deb" "$dir/root"
    cp -a "$dir/root/usr/lib/rustlib/." "$SYSROOT/lib/rustlib/"
    # The host's own standard library, for the same sysroot.
    ln -sfn "/usr/lib/rustlib/$(rustc_host)" "$SYSROOT/lib/rustlib/$(rustc_host)"
    echo "standard library for $arch ($version) in $SYSROOT" >&2
}

rustc_host() {
    "$RUSTC" -vV | sed -n 's/^host: //p'
}

build() {
    for arch in "$@"; do
        local t
        t=$(triple "$arch")
        cross_env "$t"
        echo "==> $arch ($t): release build" >&2
        (cd "$ROOT" && "$CARGO" build --release --locked --target "$t" \
            -p wakegate-interceptor -p wakegate-controller -p wakegate-loadtest)
        mkdir -p "$OUT/$arch"
        for b in "${BINARIES[@]}"; do
            cp "$CARGO_TARGET_DIR/$t/release/$b" "$OUT/$arch/$b"
        done
        # What the link order found (deploy/link-order/order.sh), newest link first.
        local order
        order=$(ls -t "$CARGO_TARGET_DIR/$t"/release/deps/wakegate_interceptor-*.link-order 2>/dev/null | head -1)
        if [ -n "$order" ]; then
            echo "$arch wakegate-interceptor link order: $(cat "$order")" >&2
        fi
    done
}

sizes() {
    local fail=0
    for dir in "$OUT"/*/; do
        for b in "${BINARIES[@]}"; do
            [ -f "$dir$b" ] || continue
            local size
            size=$(stat -c %s "$dir$b")
            printf '%-8s %-22s %9d bytes (%.1f MiB)\n' "$(basename "$dir")" "$b" "$size" "$(echo "$size / 1048576" | bc -l)"
            if [ "$size" -gt "$MAX_SIZE" ]; then
                echo "  over the 15 MiB budget" >&2
                fail=1
            fi
        done
    done
    return $fail
}

# Lets the kernel run aarch64 and arm binaries through qemu: the tests start the interceptor
# binary, which starts the example backend, so every exec must find its emulator.
binfmt() {
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    for arch in aarch64 arm; do
        if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$arch" ]; then
            cat "/usr/lib/binfmt.d/qemu-$arch.conf" > /proc/sys/fs/binfmt_misc/register
        fi
    done
}

test_arm64() {
    local t=aarch64-unknown-linux-gnu
    cross_env "$t"
    binfmt
    # The dynamic loader and libc the emulated binaries load.
    export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
    # Doctests are compiled by rustdoc, which takes its flags from here, not from RUSTFLAGS.
    export RUSTDOCFLAGS="--sysroot=$SYSROOT"
    echo "==> aarch64 tests under qemu" >&2
    (cd "$ROOT" && "$CARGO" test --locked --no-fail-fast --target "$t" -p wakegate-interceptor -p wakegate-loadtest "$@")
}

case "${1:-}" in
    install) install ;;
    build) shift; build "$@"; sizes ;;
    test-arm64) shift; test_arm64 "$@" ;;
    sizes) sizes ;;
    ci)
        install
        start=$(date +%s)
        build arm64 armv7
        built=$(date +%s)
        test_arm64
        tested=$(date +%s)
        sizes
        echo "cross builds took $((built - start)) s; aarch64 tests under qemu took $((tested - built)) s"
        ;;
    *) sed -n '2,13p' "$0"; exit 64 ;;
esac
