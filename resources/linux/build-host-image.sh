#!/usr/bin/env bash
# build-host-image.sh VMM_BINARY: build the L1 "KVM host" initramfs $CACHE/host-image.cpio.gz =
#   l1-base.cpio.gz  busybox, the generic kernel's kvm modules, the guest kernel and base
#                    initramfs, mkguestinitrd, vmmwatch, /init = host-init   (cached)
#   l1-vmm.cpio.gz   /bin/vmm with its shared libraries and loader (rebuilt when VMM_BINARY changes)
# run-scenario.sh appends a third cpio holding the per-test /host-scenario.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
VMM_BIN=${1:?usage: build-host-image.sh VMM_BINARY}
[ -x "$VMM_BIN" ] || { echo "build-host-image: no executable $VMM_BIN" >&2; exit 1; }
load_versions
"$LINUX_DIR/build-guest-initramfs.sh"
GUEST_INITRD=$CACHE/guest-initramfs.cpio.gz
BASE=$CACHE/l1-base.cpio.gz VMMPART=$CACHE/l1-vmm.cpio.gz OUT=$CACHE/host-image.cpio.gz

if ! up_to_date "$BASE" "$GUEST_INITRD" "$CACHE/root.stamp" "$LINUX_DIR/host-init" \
        "$LINUX_DIR/mkguestinitrd" "$LINUX_DIR/vmmwatch" "$0" "$LINUX_DIR/lib.sh"; then
    echo "building L1 base image ($KVER_HOST)" >&2
    D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
    install_busybox "$D"
    install -m 755 "$LINUX_DIR/host-init" "$D/init"
    install -m 755 "$LINUX_DIR/mkguestinitrd" "$D/bin/mkguestinitrd"
    install -m 755 "$LINUX_DIR/vmmwatch" "$D/bin/vmmwatch"
    install -D -m 644 "$R/boot/vmlinuz-$KVER_GUEST" "$D/guest/vmlinuz"
    install -m 644 "$GUEST_INITRD" "$D/guest/initramfs.cpio.gz"
    M=$R/lib/modules/$KVER_HOST
    mkdir -p "$D/etc"
    mod_closure "$M" irqbypass kvm ccp kvm-amd tun veth > "$D/etc/host-modules"
    while read -r ko; do install -D -m 644 "$M/$ko" "$D/lib/modules/$KVER_HOST/$ko"; done < "$D/etc/host-modules"
    echo "  modules: $(xargs -n1 basename < "$D/etc/host-modules" | tr '\n' ' ')" >&2
    mkcpio "$D" "$BASE"
    rm -rf "$D"; trap - EXIT
fi

if ! up_to_date "$VMMPART" "$VMM_BIN" "$0" "$LINUX_DIR/lib.sh" \
        || [ "$(cat "$VMMPART.src" 2>/dev/null)" != "$(readlink -f "$VMM_BIN")" ]; then
    echo "packing vmm binary $VMM_BIN" >&2
    D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
    copy_with_libs "$VMM_BIN" "$D" bin/vmm
    mkcpio "$D" "$VMMPART"
    readlink -f "$VMM_BIN" > "$VMMPART.src"
fi

if ! up_to_date "$OUT" "$BASE" "$VMMPART"; then
    cat "$BASE" "$VMMPART" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
fi
echo "host image: $OUT ($(( $(stat -c %s "$OUT") / 1024 )) KiB)" >&2
