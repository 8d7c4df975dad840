#!/usr/bin/env bash
# Build $CACHE/l1-qemu.cpio.gz: this host's qemu-system-x86_64 with its libraries and the
# firmware it needs for -M microvm / q35, at the same paths as on a Debian host. Appended to the
# L1 image by `run-scenario.sh --with-qemu`, so scenarios can run QEMU as a reference L2 monitor.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
QEMU=$(command -v qemu-system-x86_64) || { echo "build-qemu-part: no qemu-system-x86_64" >&2; exit 1; }
OUT=$CACHE/l1-qemu.cpio.gz
if up_to_date "$OUT" "$QEMU" "$0" "$LINUX_DIR/lib.sh"; then exit 0; fi
echo "packing $QEMU for L1" >&2
D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
copy_with_libs "$QEMU" "$D" usr/bin/qemu-system-x86_64
mkdir -p "$D/usr/share/qemu"
for f in bios-microvm.bin qboot.rom bios-256k.bin linuxboot_dma.bin kvmvapic.bin pvh.bin; do
    cp -L "/usr/share/qemu/$f" "$D/usr/share/qemu/" 2>/dev/null \
        || cp -L "/usr/share/seabios/$f" "$D/usr/share/qemu/"
done
mkcpio "$D" "$OUT"
