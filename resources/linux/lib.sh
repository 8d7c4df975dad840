# Shared helpers for the resources/linux build scripts (bash; sourced, not run).
LINUX_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LINUX_DIR/../.." && pwd)
CACHE=${VMM_CACHE:-$HOME/.cache/vmm-pci}
R=$CACHE/root                       # all fetched packages, unpacked
BUSYBOX=$R/bin/busybox
export BUSYBOX

load_versions() {
    [ -s "$CACHE/versions.env" ] || "$LINUX_DIR/fetch.sh"
    # shellcheck disable=SC1091
    . "$CACHE/versions.env"
}

# up_to_date OUT INPUT...: OUT exists, is non-empty and newer than every INPUT.
up_to_date() {
    local out=$1 f; shift
    [ -s "$out" ] || return 1
    for f in "$@"; do [ "$out" -nt "$f" ] || return 1; done
}

# mod_closure MODDIR NAME...: print .ko paths (relative to MODDIR) of NAMEs and of their
# dependencies (from each .ko's .modinfo "depends="), dependencies first. Missing modules
# (built in, or not in this flavour) are skipped.
mod_closure() {
    local dir=$1; shift
    local -A seen=()
    _mod_visit() {
        local name=${1//-/_} ko dep
        [ -n "${seen[$name]:-}" ] && return 0
        seen[$name]=1
        ko=$(cd "$dir" && find kernel -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)
        [ -n "$ko" ] || { echo "  (module $name not found: built in?)" >&2; return 0; }
        for dep in $(tr '\0' '\n' < "$dir/$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            _mod_visit "$dep"
        done
        echo "$ko"
    }
    local m
    for m in "$@"; do _mod_visit "$m"; done
}

# copy_with_libs BIN DESTROOT DESTPATH [LIBROOT]: copy BIN to DESTROOT/DESTPATH plus the shared
# libraries ldd finds (into /lib/x86_64-linux-gnu) and the dynamic loader (at its own path).
# With LIBROOT, libraries (and the loader) are taken from LIBROOT's multiarch dirs when there, so
# libc and the loader come from the same package.
copy_with_libs() {
    local bin=$1 dest=$2 path=$3 libroot=${4:-} lib name src ldpath=
    install -D -m 755 "$bin" "$dest/$path"
    [ -n "$libroot" ] && ldpath=$libroot/lib/x86_64-linux-gnu:$libroot/usr/lib/x86_64-linux-gnu
    if ! LD_LIBRARY_PATH=$ldpath ldd "$bin" >/dev/null 2>&1; then
        echo "  $bin: static (or not a dynamic ELF): no libraries" >&2
        return 0
    fi
    LD_LIBRARY_PATH=$ldpath ldd "$bin" | grep -q 'not found' && {
        echo "copy_with_libs: unresolved libraries for $bin:" >&2; ldd "$bin" >&2; return 1; }
    for lib in $(LD_LIBRARY_PATH=$ldpath ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
        name=$(basename "$lib")
        src=$lib
        for d in "$libroot/lib/x86_64-linux-gnu" "$libroot/usr/lib/x86_64-linux-gnu"; do
            [ -n "$libroot" ] && [ -e "$d/$name" ] && { src=$d/$name; break; }
        done
        install -D -m 755 "$(readlink -f "$src")" "$dest/lib/x86_64-linux-gnu/$name"
        case $lib in /lib64/*) install -D -m 755 "$(readlink -f "$src")" "$dest$lib" ;; esac
    done
}

# install_busybox DESTROOT: static busybox at /bin/busybox and /bin/sh (init installs the rest).
install_busybox() {
    install -D -m 755 "$BUSYBOX" "$1/bin/busybox"
    ln -sf busybox "$1/bin/sh"
    mkdir -p "$1/dev" "$1/proc" "$1/sys" "$1/tmp" "$1/sbin" "$1/usr/bin" "$1/usr/sbin"
    [ "$(id -u)" = 0 ] && mknod -m 600 "$1/dev/console" c 5 1 2>/dev/null || true
}

# mkcpio DIR OUT: gzip'd newc archive of DIR's contents, written atomically and checked by
# listing it back (a broken pipeline once produced a 20-byte archive).
mkcpio() {
    local dir=$1 out=$2 want got tmp=$2.tmp.$$
    want=$(cd "$dir" && find . -mindepth 1 | wc -l)
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) \
        | gzip -6 > "$tmp"
    got=$(gzip -dc "$tmp" | "$BUSYBOX" cpio -t 2>/dev/null | wc -l)
    if [ "$want" -eq 0 ] || [ "$got" -ne "$want" ]; then
        echo "mkcpio: $tmp holds $got of $want entries: archive failed" >&2
        rm -f "$tmp"; return 1
    fi
    mv "$tmp" "$out"
    echo "  wrote $out ($(( $(stat -c %s "$out") / 1024 )) KiB, $got entries)" >&2
}
