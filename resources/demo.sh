#!/usr/bin/env bash
# demo.sh [--qemu]: the main job. Build the vmm, fetch/build the Linux images on first use, and boot
# the default Linux guest (it prints lspci -n, -nn, -vvv) with three virtio-rng PCI devices:
# rng0 at 05.0, rng1 wherever the vmm puts it, rng2 at 1f.0. Runs on this host's KVM when it has
# hardware virtualisation, else inside a TCG L1 with nested KVM (resources/linux/run-scenario.sh).
# --qemu boots the same guest and devices under QEMU instead of our vmm, for reference.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p vmm

DEVICES='--device virtio-rng-pci,id=rng0,addr=05.0 --device virtio-rng-pci,id=rng1 --device virtio-rng-pci,id=rng2,addr=1f.0'
APPEND='console=ttyS0 quiet panic=-1 reboot=t'
SCRIPT=$(mktemp); LOG=$(mktemp); trap 'rm -f "$SCRIPT" "$LOG"' EXIT
if [ "${1:-}" = --qemu ]; then
    ARGS=--with-qemu
    echo "qemu-system-x86_64 -accel kvm -M microvm,pcie=on -cpu host,-xsave -m 256 -nodefaults -nographic" \
         "-no-reboot -serial stdio -kernel \"\$GUEST_KERNEL\" -initrd \"\$GUEST_INITRD\" -append '$APPEND' $DEVICES" > "$SCRIPT"
else
    ARGS=
    echo "\"\$VMM\" run --no-reboot --kernel \"\$GUEST_KERNEL\" --initrd \"\$GUEST_INITRD\" --append '$APPEND' --memory 256 $DEVICES" > "$SCRIPT"
fi
echo "demo: host scenario: $(cat "$SCRIPT")"
rc=0
resources/linux/run-scenario.sh $ARGS "$SCRIPT" | tee "$LOG" || rc=$?
echo
# After a wedged L1, run-scenario.sh ran everything again: keep the last run only.
awk '/##### run-scenario: RETRY:/ { n = 0 } { l[++n] = $0 } END { for (i = 1; i <= n; i++) print l[i] }' \
    "$LOG" > "$LOG.last" && mv "$LOG.last" "$LOG"
if grep -q '=== LSPCI-NN-END rc=0 ===' "$LOG"; then
    echo "demo: the guest's lspci -nn:"
    sed -n '/=== LSPCI-NN-BEGIN ===/,/=== LSPCI-NN-END/p' "$LOG" | sed '1d;$d'
else
    echo "demo: FAILED: the guest did not print its lspci output (scenario rc=$rc)"
    exit $(( rc ? rc : 1 ))
fi
exit "$rc"
