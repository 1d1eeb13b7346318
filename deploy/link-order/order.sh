#!/usr/bin/env bash
# A linker driver that lays out a release binary's code in the order its listed functions are
# wanted: everything that runs at start-up, while idle and on the request path first, packed
# together, and the rest (error paths, code for the other mode, what the binary links but
# never calls) after it.
#
# Why: the kernel maps a binary's code a page at a time, plus the 64 KiB around each page it
# faults (fault-around). A process that runs 2.6 MB of its 11 MB of code, scattered, keeps
# most of those 11 MB resident; packed, it keeps about what it runs. docs/benchmarks.md has
# the figures.
#
# cargo calls this as the linker (.cargo/config.toml; deploy/cross-build.sh for the other
# targets). For a release build of a binary with a list here (deploy/link-order/<binary>.txt)
# it links twice: once with symbols, to learn the exact names of the listed functions (the
# list holds them without the hashes a build gives them, so one list serves every toolchain
# and target), then once more with lld's --symbol-ordering-file. Anything else, or a machine
# without lld, is linked as it comes, unchanged.
#
#   WAKEGATE_LINK_CC     the real linker driver (default: cc)
#   WAKEGATE_LINK_NM     nm for the target (default: nm)
#   WAKEGATE_LINK_ORDER  0: link everything as it comes
#   WAKEGATE_LINK_KEEP   1: also write the ordered binary with its symbols, as <output>.symbols
#                        (collect.sh profiles it; its code and layout are the shipped one's)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cc="${WAKEGATE_LINK_CC:-cc}"
nm="${WAKEGATE_LINK_NM:-nm}"

out=""
prev=""
lld=0
for arg in "$@"; do
    [ "$prev" = "-o" ] && out="$arg"
    [ "$arg" = "-fuse-ld=lld" ] && lld=1
    # A response file: its arguments are not looked into; linked as it comes.
    [ "${arg:0:1}" = "@" ] && exec "$cc" "$@"
    prev="$arg"
done
base="$(basename "$out")"
list="$here/$(echo "${base%-*}" | tr _ -).txt"
if [ "${WAKEGATE_LINK_ORDER:-1}" = 0 ] || [ ! -f "$list" ] || [[ "$out" != */release/deps/* ]]; then
    exec "$cc" "$@"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
extra=()
if [ "$lld" = 0 ]; then
    # GNU ld cannot order by symbol; lld can, when it is installed. A cross gcc looks for
    # `ld.lld` only in its own directories, so it is shown one holding it.
    if ! command -v ld.lld >/dev/null; then
        echo "link-order: no ld.lld; $base linked unordered" > "$out.link-order"
        "$cc" "$@"
        exit
    fi
    mkdir "$work/lld"
    ln -s "$(command -v ld.lld)" "$work/lld/ld.lld"
    extra+=(-fuse-ld=lld "-B$work/lld")
fi
# Pass 1: the same link, keeping the symbols.
unstripped=()
for arg in "$@"; do
    case "$arg" in
        -s | -Wl,--strip-all | -Wl,-s | -Wl,--strip-debug | -Wl,-S) ;;
        *) unstripped+=("$arg") ;;
    esac
done
if ! "$cc" "${unstripped[@]}" "${extra[@]}" -o "$work/pass1"; then
    # lld was this script's choice (the toolchain links with GNU ld): the link as it comes
    # decides whether the error is real.
    [ "${#extra[@]}" = 0 ] && exit 1
    echo "link-order: lld failed to link $base; linked unordered" > "$out.link-order"
    "$cc" "$@"
    exit
fi
"$nm" --defined-only "$work/pass1" | awk '$2 ~ /^[tTW]$/ {print $3}' > "$work/mangled"
c++filt < "$work/mangled" > "$work/demangled"
# Without its crate hashes a name can stand for several symbols (a small generic function
# copied into each crate that uses it: `RawVecInner::finish_grow` has 34). All are taken, up
# to 64; a name with more is left where it falls, as taking them all would pull in far more
# than runs.
paste "$work/mangled" "$work/demangled" | awk -F'\t' -v max=64 -v summary="$work/summary" '
    NR == FNR { if ($0 != "" && substr($0, 1, 1) != "#") { want[$0] = 1; listed++ } next }
    {
        name = $2
        sub(/::h[0-9a-f]+$/, "", name)
        gsub(/\[[0-9a-f]+\]/, "", name)
        if (name in want) { count[name]++; syms[name] = syms[name] $1 "\n" }
    }
    END {
        for (name in count) if (count[name] <= max) { printf "%s", syms[name]; found++; n += count[name] }
        printf "%d of %d listed functions found, %d symbols ordered first\n", found, listed, n > summary
    }' "$list" - | sort > "$work/order"
# Pass 2: the binary cargo asked for, its listed functions first.
"$cc" "$@" "${extra[@]}" -Wl,--symbol-ordering-file="$work/order" -Wl,--no-warn-symbol-ordering
if [ "${WAKEGATE_LINK_KEEP:-0}" = 1 ]; then
    "$cc" "${unstripped[@]}" "${extra[@]}" -Wl,--symbol-ordering-file="$work/order" \
        -Wl,--no-warn-symbol-ordering -o "$out.symbols"
fi
cp "$work/summary" "$out.link-order"
