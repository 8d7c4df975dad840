#!/usr/bin/env bash
# Download Debian's kernels, busybox and lspci (with its libraries) into the cache
# and unpack them into $CACHE/root. Idempotent; safe to interrupt and rerun.
#
# Result:  $CACHE/root/...            all packages unpacked into one tree
#          $CACHE/versions.env        KVER_HOST=6.1.0-NN-amd64  KVER_GUEST=6.1.0-NN-cloud-amd64
# The kernel ABI (NN) is resolved once; VMM_REFETCH=1 resolves it again (new Debian kernel).
set -euo pipefail
CACHE=${VMM_CACHE:-$HOME/.cache/vmm-pci}
mkdir -p "$CACHE/debs"
find "$CACHE/debs" -maxdepth 1 -name '.dl.*' -mmin +30 -exec rm -rf {} + # interrupted downloads

# Library packages lspci needs (`ldd lspci`: libpci, libkmod, libz, libudev, libzstd, liblzma,
# libcrypto from libssl3, libc and the loader from libc6).
LIBS="libpci3 libc6 libkmod2 zlib1g libudev1 liblzma5 libzstd1 libssl3"
USERLAND="busybox-static pciutils pci.ids $LIBS"

apt_updated=
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        echo "fetch: apt-get update" >&2
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# Resolve a meta package (linux-image-amd64) to the versioned kernel package it depends on.
resolve_kernel() {
    local dep
    dep=$(apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    if [ -z "$dep" ]; then
        apt_update_once
        dep=$(apt-cache depends "$1" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    fi
    [ -n "$dep" ] || { echo "fetch: cannot resolve $1" >&2; exit 1; }
    echo "$dep"
}

if [ -s "$CACHE/versions.env" ] && [ -z "${VMM_REFETCH:-}" ]; then
    # shellcheck disable=SC1091
    . "$CACHE/versions.env"
else
    KVER_HOST=$(resolve_kernel linux-image-amd64); KVER_HOST=${KVER_HOST#linux-image-}
    KVER_GUEST=$(resolve_kernel linux-image-cloud-amd64); KVER_GUEST=${KVER_GUEST#linux-image-}
fi
PKGS="linux-image-$KVER_HOST linux-image-$KVER_GUEST $USERLAND"

# Download every package not yet cached (into a temp dir, then rename).
for p in $PKGS; do
    if ! ls "$CACHE/debs/${p}_"*.deb >/dev/null 2>&1; then
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        echo "fetch: downloading $p" >&2
        if ! (cd "$tmp" && apt-get download -q "$p" >&2 2>/dev/null); then
            apt_update_once
            (cd "$tmp" && apt-get download -q "$p" >&2)
        fi
        chmod 644 "$tmp"/*.deb
        mv "$tmp"/*.deb "$CACHE/debs/"
        rmdir "$tmp"
    fi
done

# Unpack all of them into one tree; the stamp records which .debs it was made from.
debs=$(for p in $PKGS; do ls "$CACHE/debs/${p}_"*.deb | sort | tail -n1; done)
if [ "$(cat "$CACHE/root.stamp" 2>/dev/null)" != "$debs" ] || [ ! -d "$CACHE/root" ]; then
    echo "fetch: unpacking into $CACHE/root" >&2
    rm -rf "$CACHE/root.tmp"
    mkdir -p "$CACHE/root.tmp"
    for d in $debs; do dpkg-deb -x "$d" "$CACHE/root.tmp"; done
    rm -rf "$CACHE/root"
    mv "$CACHE/root.tmp" "$CACHE/root"
    echo "$debs" > "$CACHE/root.stamp"
fi

R=$CACHE/root
for f in "boot/vmlinuz-$KVER_HOST" "boot/vmlinuz-$KVER_GUEST" bin/busybox usr/bin/lspci \
         "lib/modules/$KVER_HOST/kernel/arch/x86/kvm/kvm-amd.ko"; do
    [ -s "$R/$f" ] || { echo "fetch: missing $R/$f" >&2; exit 1; }
done
printf 'KVER_HOST=%s\nKVER_GUEST=%s\n' "$KVER_HOST" "$KVER_GUEST" > "$CACHE/versions.env.tmp"
mv "$CACHE/versions.env.tmp" "$CACHE/versions.env"
echo "fetch: ok ($KVER_HOST, $KVER_GUEST) in $CACHE" >&2
