#!/usr/bin/env bash
# Every performance figure of issue 7, in one run (~4-5 minutes on 2 cores):
#
#   resources/bench/run-all.sh
#
# 1. the criterion bench devices/benches/dispatch.rs (lock-free bus vs Mutex<BTreeMap> and
#    RwLock<BTreeMap> + per-device Mutex, on the same PCI devices);
# 2. the no-allocation test devices/tests/hot_path_no_alloc.rs;
# 3. exit-path.sh: per-exit cost on the local KVM, vmm vs QEMU;
# 4. startup.sh: execve -> first KVM_RUN and the vmm's own memory.
# Logs go to target/bench/; the summary is printed and saved as target/bench/summary.txt.
# Arguments are passed to nobody; env N, REPEATS tune exit-path.sh; NO_QEMU=1 skips QEMU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
out=$root/target/bench
mkdir -p "$out"

machine() {
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "kernel:  $(uname -r)"
    echo "cpu:     $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cpus online"
    local kvm="no /dev/kvm"
    if [ -e /dev/kvm ]; then
        if [ -d /sys/module/kvm_pvm ]; then
            kvm="PVM (kvm_pvm loaded; guest CPL0 emulated, CPL3 native)"
        elif grep -qwE 'vmx|svm' /proc/cpuinfo; then
            kvm="hardware (vmx/svm)"
        else
            kvm="present, no vmx/svm flag and no kvm_pvm"
        fi
    fi
    echo "kvm:     $kvm"
    echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, at start)"
    if command -v qemu-system-x86_64 >/dev/null; then
        echo "qemu:    $(qemu-system-x86_64 --version | head -1)"
    fi
}

section() { printf '\n##### %s\n' "$1" >&2; }

machine | tee "$out/machine.txt"

section "build (probe guest, vmm release)"
resources/guest/build.sh >/dev/null
cargo build --release -p vmm 2>&1 | tail -1 >&2

section "criterion: devices/benches/dispatch.rs"
cargo bench -p devices --bench dispatch >"$out/dispatch.log" 2>&1
grep -E '^dispatch/.* time:' "$out/dispatch.log" >&2 || true

section "no-allocation test"
if cargo test -p devices --release --test hot_path_no_alloc >"$out/no-alloc.log" 2>&1; then
    no_alloc="PASS: 10,000 rounds of CF8/CFC reads and a config write, ECAM, MSI-X table/PBA and unclaimed reads allocated nothing"
else
    no_alloc="FAIL: see $out/no-alloc.log"
fi
echo "$no_alloc" >&2

section "exit path (vmm vs QEMU)"
SKIP_BUILD=1 resources/bench/exit-path.sh "${N:-50000}" "${REPEATS:-3}" >"$out/exit-path.log"

section "start-up and memory"
SKIP_BUILD=1 resources/bench/startup.sh >"$out/startup.log"

{
    echo
    echo "=================== SUMMARY ==================="
    cat "$out/machine.txt"
    sed -n '/=== dispatch summary/,$p' "$out/dispatch.log"
    echo
    echo "no-alloc: $no_alloc"
    cat "$out/exit-path.log"
    cat "$out/startup.log"
} | tee "$out/summary.txt"
