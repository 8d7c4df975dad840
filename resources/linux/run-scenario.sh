#!/usr/bin/env bash
# run-scenario.sh [--vmm PATH] [--with-qemu] HOST_SCRIPT
# Run HOST_SCRIPT (sh; sees VMM, GUEST_KERNEL, GUEST_INITRD, and mkguestinitrd and vmmwatch on PATH) on a
# host with a real KVM: directly on this machine when it has hardware virtualisation (svm/vmx,
# not PVM), else inside the L1 image booted by qemu TCG with emulated SVM. Output goes to stdout;
# exit status is the scenario's rc (or non-zero with a loud message if it never finished).
# Env: VMM_CACHE (cache dir), SCENARIO_TIMEOUT (s, default 900, per L1 attempt), VMM_GROUND=direct|l1
#      (force), L1_STALL_SECS (L1 mode: a heartbeat gap that counts as a wedged L1, default 180),
#      L1_KICK_SECS (L1 mode: a key press to a silent L1 after this many seconds and every as
#      many more, default 15), L1_ATTEMPTS (L1 mode: runs of a scenario whose L1 wedges, default 3),
#      L1_EXTRA_CPIO (L1 mode: extra .cpio.gz files appended to the L1 initramfs, e.g. tools).
# --with-qemu: qemu-system-x86_64 is available to the scenario too (reference L2 monitor).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
VMM_BIN=$REPO_ROOT/target/release/vmm
WITH_QEMU=
while [ $# -gt 1 ]; do
    case $1 in
        --vmm) VMM_BIN=$2; shift 2 ;;
        --with-qemu) WITH_QEMU=1; shift ;;
        *) break ;;
    esac
done
SCRIPT=${1:?usage: run-scenario.sh [--vmm PATH] [--with-qemu] HOST_SCRIPT}
[ -f "$SCRIPT" ] || { echo "run-scenario: no such script $SCRIPT" >&2; exit 2; }
[ -x "$VMM_BIN" ] || { echo "run-scenario: vmm binary $VMM_BIN missing (cargo build --release -p vmm)" >&2; exit 2; }
VMM_BIN=$(readlink -f "$VMM_BIN")
TIMEOUT=${SCENARIO_TIMEOUT:-900}

MODE=${VMM_GROUND:-}
if [ -z "$MODE" ]; then
    if grep -qwE 'svm|vmx' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] && [ -w /dev/kvm ]; then
        MODE=direct
    else
        MODE=l1
    fi
fi

# Build steps hold a lock: tests may call this script in parallel.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if { [ "$MODE" = l1 ] || [ -n "$WITH_QEMU" ]; } && ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq >&2 && apt-get install -y -qq qemu-system-x86 >&2
fi
"$LINUX_DIR/fetch.sh"
"$LINUX_DIR/build-guest-initramfs.sh"
[ "$MODE" = direct ] || "$LINUX_DIR/build-host-image.sh" "$VMM_BIN"
load_versions
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
cp "$CACHE/guest-initramfs.cpio.gz" "$W/guest-initramfs.cpio.gz"
if [ "$MODE" = l1 ]; then
    cp "$CACHE/host-image.cpio.gz" "$W/host-image.cpio.gz"
    if [ -n "$WITH_QEMU" ]; then
        "$LINUX_DIR/build-qemu-part.sh"
        L1_EXTRA_CPIO="${L1_EXTRA_CPIO:-} $W/qemu.cpio.gz"
        cp "$CACHE/l1-qemu.cpio.gz" "$W/qemu.cpio.gz"
    fi
fi
exec 9>&-
start=$(date +%s)

if [ "$MODE" = direct ]; then
    echo "##### run-scenario: DIRECT mode: this host's /dev/kvm (hardware virtualisation) #####"
    echo "=== HOST-SCENARIO-BEGIN ==="
    set +e
    mkdir "$W/tmp"
    VMM=$VMM_BIN GUEST_KERNEL=$R/boot/vmlinuz-$KVER_GUEST GUEST_INITRD=$W/guest-initramfs.cpio.gz \
        TMPDIR=$W/tmp PATH=$LINUX_DIR:$PATH timeout "$TIMEOUT" bash "$SCRIPT"
    rc=$?
    set -e
    echo "=== HOST-SCENARIO-END rc=$rc ==="
else
    echo "##### run-scenario: L1 mode: scenario runs inside qemu TCG (-cpu max, emulated SVM) with nested KVM #####"
    mkdir "$W/s"
    install -m 755 "$SCRIPT" "$W/s/host-scenario"
    mkcpio "$W/s" "$W/scenario.cpio.gz"
    # shellcheck disable=SC2086
    cat "$W/host-image.cpio.gz" ${L1_EXTRA_CPIO:-} "$W/scenario.cpio.gz" > "$W/l1.cpio.gz"
    # One L1 run. L1's /init writes a heartbeat line to its second serial port ($W/hb.N) every
    # 5 s. Its silence is how a wedged L1 shows (its one CPU halted with interrupts on, in its
    # idle loop). What wedges it is a race in QEMU 7.2's TCG: the SVM helpers that run every
    # L2 entry and exit (helper_vmrun, do_vmexit) update cpu->interrupt_request without the
    # lock that the main loop holds when it sets CPU_INTERRUPT_POLL for an APIC timer
    # interrupt, so that bit can be lost: caught with the vector (236, the timer) pending in
    # `info lapic`'s IRR and interrupt_request read as 0 from QEMU's memory. Nothing wakes that
    # CPU again, NMIs included (they do not make QEMU look at the APIC again). Any interrupt
    # through the IOAPIC does: the APIC signals the CPU again, which then takes the lost timer
    # interrupt too. So after KICK seconds of silence (and every KICK more) L1 gets a key press
    # (`sendkey shift`: IRQ 1, the i8042 that L1 has), its state going to stderr first. After
    # STALL seconds of silence the CPU state is printed, QEMU is killed and the whole scenario
    # runs again. Everything the void attempt printed stays above a `##### run-scenario:
    # RETRY` line: readers of this output (tests/src/ground.rs, the bench scripts) use what
    # follows the last one.
    attempt() { # N: runs L1, sets qrc and wedged
        local n=$1 hb=$W/hb.$1 mon=$W/mon.$1 qpid last size now stall_since
        : > "$hb"
        mkfifo "$mon.in" "$mon.out"
        qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 1 -nographic \
            -no-reboot -vga none -nic none -serial stdio -serial "file:$hb" -monitor "pipe:$mon" \
            -kernel "$R/boot/vmlinuz-$KVER_HOST" -initrd "$W/l1.cpio.gz" \
            -append "console=ttyS0 panic=-1 quiet l1attempt=$n" </dev/null 2>&1 \
            > >(sed -u 's/\r//g' | tee -a "$W/log.$n") &
        qpid=$!
        wedged= last=-1 stall_since=$(date +%s) kicked=0
        local deadline=$(( stall_since + TIMEOUT ))
        while kill -0 "$qpid" 2>/dev/null; do
            sleep 2
            now=$(date +%s) size=$(stat -c %s "$hb" 2>/dev/null || echo 0)
            if [ "$size" != "$last" ]; then
                if [ "$kicked" -gt 0 ]; then
                    echo "##### run-scenario: L1 RESUMED after $(( now - stall_since ))s and $kicked key press(es) (attempt $n) #####" >&2
                fi
                last=$size stall_since=$now kicked=0
            fi
            # Armed by the first heartbeat (an L1 without one is left to the deadline).
            [ "$size" -gt 0 ] || continue
            if [ $(( now - stall_since )) -ge "$STALL" ]; then
                wedged=1
                break
            fi
            # (On stderr: the scenario's stdout is the guest's, compared section by section.)
            if [ $(( now - stall_since )) -ge $(( KICK * (kicked + 1) )) ]; then
                kicked=$(( kicked + 1 ))
                printf 'info status\ninfo registers\ninfo lapic\n' > "$mon.in"
                echo "##### run-scenario: L1 STALLED: no heartbeat for $(( now - stall_since ))s (attempt $n): $(timeout 2 cat "$mon.out" | tr -d '\r' | grep -m3 -E '^(VM status|RIP=|IRR)' | tr '\n\t' '  ') ; pressing a key #####" >&2
                echo 'sendkey shift' > "$mon.in"
            fi
            if [ "$now" -ge "$deadline" ]; then break; fi
        done
        if kill -0 "$qpid" 2>/dev/null; then
            if [ -n "$wedged" ]; then
                echo "##### run-scenario: L1 WEDGED: no heartbeat from L1 for ${STALL}s (attempt $n); its CPU, 1 s apart: #####"
                for _ in 1 2; do
                    echo 'info registers' > "$mon.in"
                    timeout 2 cat "$mon.out" | tr -d '\r' | grep -vE '^(FPR|YMM|XMM|FCW|DR[0-9])' | head -n 20
                    sleep 1
                done
                echo "##### run-scenario: L1 WEDGED report end #####"
            fi
            kill "$qpid" 2>/dev/null; sleep 1; kill -9 "$qpid" 2>/dev/null
            wait "$qpid" 2>/dev/null
            qrc=124
        else
            wait "$qpid"; qrc=$?
        fi
        sleep 0.2 # the tee behind the process substitution
        rm -f "$mon.in" "$mon.out"
    }
    STALL=${L1_STALL_SECS:-180} KICK=${L1_KICK_SECS:-15}
    set +e
    # Up to L1_ATTEMPTS runs (CI once saw two wedges in a row in one long scenario).
    n=1
    attempt 1
    while [ -n "$wedged" ] && [ "$n" -lt "${L1_ATTEMPTS:-3}" ]; do
        n=$(( n + 1 ))
        echo "##### run-scenario: RETRY: L1 wedged; the output above is void, the scenario runs again #####"
        attempt "$n"
    done
    log=$W/log.$n
    set -e
    rc=$(sed -n 's/.*=== HOST-SCENARIO-END rc=\([0-9]*\) ===.*/\1/p' "$log" | tail -n1)
    if [ -z "$rc" ]; then
        echo "##### run-scenario: the host scenario did not finish (qemu rc=$qrc; 124 = timeout after ${TIMEOUT}s or a wedged L1) #####"
        rc=$(( qrc ? qrc : 1 ))
    fi
fi
echo "##### run-scenario: mode=$MODE rc=$rc after $(( $(date +%s) - start ))s #####"
exit "$rc"
