#!/usr/bin/env bash
# Build $CACHE/guest-initramfs.cpio.gz: the L2 guest's base initramfs (busybox, lspci with its
# libraries and pci.ids, the cloud kernel's virtio modules, /init = guest-init).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
load_versions
OUT=$CACHE/guest-initramfs.cpio.gz
if up_to_date "$OUT" "$CACHE/root.stamp" "$LINUX_DIR/guest-init" "$0" "$LINUX_DIR/lib.sh"; then
    echo "guest initramfs up to date: $OUT" >&2; exit 0
fi
echo "building guest initramfs for $KVER_GUEST" >&2
D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
install_busybox "$D"
install -m 755 "$LINUX_DIR/guest-init" "$D/init"
copy_with_libs "$R/usr/bin/lspci" "$D" usr/bin/lspci "$R"
install -D -m 644 "$R/usr/share/misc/pci.ids" "$D/usr/share/misc/pci.ids"

M=$R/lib/modules/$KVER_GUEST
mod_closure "$M" virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
    virtio_blk virtio-rng virtio_console failover net_failover virtio_net > "$D/modlist"
mkdir -p "$D/etc"
mv "$D/modlist" "$D/etc/guest-modules"
while read -r ko; do install -D -m 644 "$M/$ko" "$D/lib/modules/$KVER_GUEST/$ko"; done < "$D/etc/guest-modules"
echo "  modules: $(xargs -n1 basename < "$D/etc/guest-modules" | tr '\n' ' ')" >&2
mkcpio "$D" "$OUT"
