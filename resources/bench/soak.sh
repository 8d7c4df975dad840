#!/usr/bin/env bash
# soak.sh [MINUTES] [CYCLES]: the soak run (issue 15). One Linux guest on the test ground (inside
# the KVM-host image L1 here) under load for MINUTES (default 20) with CYCLES hot-plug/unplug
# cycles (default 1000; the run lasts until both are done): disk I/O on a virtio-blk, pings over
# a virtio-net tap, serial and virtio-console output, QMP clients that connect and vanish. At the
# end the vmm's fds, threads, GSI routes (`info gsi`) and own memory are compared with the
# baseline after boot, every QMP request and DEVICE_DELETED is accounted for, and the guest's
# loops must have run without an error. The driver is tests/soak_e2e.py (which reuses
# tests/hotplug_e2e.py); it prints every check and a final `SOAK PASS` / `SOAK FAIL` line.
# Exit status 0 on PASS. Needs `cargo build --release -p vmm` first. The full log is kept in
# target/soak-<date>.log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MINUTES=${1:-20}
CYCLES=${2:-1000}
VMM=$ROOT/target/release/vmm
[ -x "$VMM" ] || { echo "soak: $VMM missing: cargo build --release -p vmm" >&2; exit 2; }
PY_CPIO=$(bash "$ROOT/resources/linux/build-python-part.sh" | tail -n1)
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
SECONDS_LOAD=$((MINUTES * 60))
# The vmm's deadline (vmmwatch) and the L1 scenario's: only to catch a hang. A cycle takes
# about a second on the nested ground; allow 5 s each.
DEADLINE=$((SECONDS_LOAD + CYCLES * 5 + 600))
{
    echo 'W="$TMPDIR/soak"; mkdir -p "$W"'
    echo "cat > \"\$W/hotplug_e2e.py\" <<'PY_EOF'"; cat "$ROOT/tests/hotplug_e2e.py"; echo PY_EOF
    echo "cat > \"\$W/soak_e2e.py\" <<'PY_EOF'"; cat "$ROOT/tests/soak_e2e.py"; echo PY_EOF
    echo 'echo "=== SOAK-BEGIN ==="'
    echo "python3 \"\$W/soak_e2e.py\" --vmm \"\$VMM\" --kernel \"\$GUEST_KERNEL\" --workdir \"\$W\" --seconds $SECONDS_LOAD --cycles $CYCLES --deadline $DEADLINE 2>&1"
    echo 'echo "=== SOAK-END rc=$? ==="'
} > "$W/host.sh"
mkdir -p "$ROOT/target"
LOG=$ROOT/target/soak-$(date -u +%Y%m%d-%H%M%S).log
echo "soak: $MINUTES min, $CYCLES cycles; log $LOG" >&2
start=$(date +%s)
SCENARIO_TIMEOUT=$((DEADLINE + 300)) L1_EXTRA_CPIO="${L1_EXTRA_CPIO:-} $PY_CPIO" \
    bash "$ROOT/resources/linux/run-scenario.sh" --vmm "$VMM" "$W/host.sh" > "$LOG" 2>&1 || true
tr -d '\r' < "$LOG" | grep -E '^\s+(ok  |FAIL) |^SOAK (PASS|FAIL)|"failure"' || true
echo "soak: wall time $(( $(date +%s) - start )) s; log $LOG"
# grep -c reads to the end (grep -q would close the pipe early: SIGPIPE under pipefail).
[ "$(grep -c '=== SOAK-END rc=0 ===' "$LOG")" -ge 1 ] && [ "$(tr -d '\r' < "$LOG" | grep -c '^SOAK PASS')" -ge 1 ]
