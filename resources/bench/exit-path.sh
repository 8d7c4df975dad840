#!/usr/bin/env bash
# Exit-path cost on the local KVM: our vmm against QEMU, same probe guest, same loops.
#
#   resources/bench/exit-path.sh [N] [REPEATS]      (defaults: N=50000, REPEATS=3; ~1.5 min)
#
# For each monitor (vmm, qemu), op (cf8: CF8 write + CFC read = 2 exits; ecam: one MMIO read;
# null: one `inb` from port 0x2f0 that no device claims) and privilege level of the guest loop
# (ring=0: CPL0, which this machine's PVM KVM runs through its instruction emulator; ring=3:
# CPL3, native), the script timestamps the guest's `=== BENCH ... start ===` and
# `... done ===` lines as they arrive on the serial stream, so boot and teardown cancel out.
# The interval of an n=0 run (printing the done line) is subtracted. Median of REPEATS.
#
# QEMU: `-M pc` for cf8 and null; `-M pc` has no ECAM, so QEMU's ecam case runs on `-M q35`
# with the probe's `ecam=0xb0000000` (our vmm: ECAM at 0xe0000000, the probe's default).
#
# On PVM the exit itself (guest -> host kernel -> KVM -> user space and back) costs ~10 us, far
# more than any monitor's user-space handling, so the wall-clock ratio says little about the
# monitors. A second table therefore shows each monitor's own CPU time in user space per exit
# (`perf stat -e user_time,task-clock`, n=4N minus n=0, ring=3, one run each; user_time is
# tick-sampled, so read it as +-20%). Needs `perf` (Debian: linux-perf); skipped without it.
# Env: SKIP_BUILD=1 skips building the probe and the vmm; NO_QEMU=1 skips QEMU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
N=${1:-50000}
REPEATS=${2:-3}
probe=$root/target/guest/probe.elf
vmm=$root/target/release/vmm

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    resources/guest/build.sh >/dev/null
    cargo build --release -p vmm 2>&1 | tail -1
fi
if [ "${NO_QEMU:-0}" != 1 ] && ! command -v qemu-system-x86_64 >/dev/null; then
    echo "installing qemu-system-x86 ..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86) >&2
fi

# Reads a serial stream; prints the seconds between the end of the start line and the end of
# the done line (bash's $EPOCHREALTIME, taken as each line arrives), or "fail".
interval() {
    local line t0="" t1=""
    while IFS= read -r line; do
        case $line in
        *"=== BENCH op="*" start ==="*) t0=$EPOCHREALTIME ;;
        *"=== BENCH op="*" done ==="*) t1=$EPOCHREALTIME ;;
        esac
    done
    if [ -n "$t0" ] && [ -n "$t1" ]; then
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
    else
        echo fail
    fi
}

# monitor MONITOR OP N RING: runs the probe bench under that monitor, serial on stdout
monitor() {
    local mon=$1 op=$2 n=$3 ring=$4 extra="" machine=pc
    [ "$ring" = 3 ] && extra=" ring=3"
    case $mon in
    vmm)
        timeout 120 "$vmm" run --kernel "$probe" --memory 64 \
            --append "mode=bench op=$op n=$n$extra" 2>/dev/null </dev/null
        ;;
    qemu)
        if [ "$op" = ecam ]; then
            machine=q35
            extra="$extra ecam=0xb0000000"
        fi
        timeout 120 qemu-system-x86_64 -accel kvm -M "$machine" -cpu host,-arch-capabilities \
            -m 64 -nographic -no-reboot -vga none -nic none -kernel "$probe" \
            -append "mode=bench op=$op n=$n$extra" 2>/dev/null </dev/null
        ;;
    esac
}

# run MONITOR OP N RING -> seconds between the markers
run() { monitor "$@" | interval; }

# cpu MONITOR OP N RING -> "user_ns task_ns" of the whole monitor process (perf stat)
cpu() {
    local f
    f=$(mktemp)
    perf stat -x, -e user_time,task-clock -o "$f" -- bash -c "$(declare -f monitor); \
        vmm='$vmm' probe='$probe' monitor $*" >/dev/null 2>&1 || true
    awk -F, '$3 == "user_time" { u = $1 } $3 == "task-clock" { t = $1 * 1e6 }
        END { printf "%.0f %.0f\n", u, t }' "$f"
    rm -f "$f"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }
minimum() { sort -g | awk 'NR == 1 { print $1; found = 1 } END { if (!found) print "nan" }'; }

monitors="vmm"
[ "${NO_QEMU:-0}" != 1 ] && monitors="vmm qemu"
declare -A per_iter best base samples
# The monitors take turns run by run, so that load from elsewhere on the machine falls on both.
for ring in 0 3; do
    for mon in $monitors; do
        b=$(run "$mon" null 0 "$ring")
        [ "$b" = fail ] && b=0
        base[$mon,$ring]=$b
    done
    for op in cf8 ecam null; do
        for _ in $(seq "$REPEATS"); do
            for mon in $monitors; do
                s=$(run "$mon" "$op" "$N" "$ring")
                [ "$s" = fail ] && continue
                samples[$mon,$ring,$op]+="$(awk -v s="$s" -v b="${base[$mon,$ring]}" -v n="$N" \
                    'BEGIN { printf "%.4f", (s - b) / n * 1e6 }') "
            done
        done
        for mon in $monitors; do
            v=${samples[$mon,$ring,$op]:-}
            if [ -z "$v" ]; then
                per_iter[$mon,$ring,$op]=nan
                best[$mon,$ring,$op]=nan
            else
                per_iter[$mon,$ring,$op]=$(printf '%s\n' $v | median)
                best[$mon,$ring,$op]=$(printf '%s\n' $v | minimum)
            fi
            echo "  $mon ring=$ring $op: ${v:-failed} us/iteration (n=0 interval ${base[$mon,$ring]}s)" >&2
        done
    done
done

exits() { [ "$1" = cf8 ] && echo 2 || echo 1; }
echo
echo "=== exit path: us per guest iteration and per exit (median and min of $REPEATS, N=$N) ==="
printf '%-7s %-4s %-5s %10s %10s %10s %10s %10s\n' monitor ring op us/iter us/exit "vs null" "min/exit" "vs null"
for mon in $monitors; do
    for ring in 0 3; do
        for op in cf8 ecam null; do
            awk -v m="$mon" -v r="$ring" -v o="$op" -v e="$(exits "$op")" \
                -v it="${per_iter[$mon,$ring,$op]}" -v nl="${per_iter[$mon,$ring,null]}" \
                -v bt="${best[$mon,$ring,$op]}" -v bn="${best[$mon,$ring,null]}" \
                'BEGIN { pe = it / e; be = bt / e
                         printf "%-7s %-4s %-5s %10.2f %10.2f %+9.1f%% %10.2f %+9.1f%%\n",
                                m, r, o, it, pe, (pe / nl - 1) * 100, be, (be / bn - 1) * 100 }'
        done
    done
done
echo "(cf8 = CF8 write + CFC read = 2 exits; 'vs null': per-exit cost against an unclaimed inb;"
echo " min: best run, the least disturbed by other load on the machine)"
if [ "${NO_QEMU:-0}" != 1 ]; then
    echo
    echo "=== vmm vs QEMU: QEMU time / vmm time per iteration (QEMU ecam on -M q35) ==="
    for ring in 0 3; do
        for op in cf8 ecam null; do
            awk -v r="$ring" -v o="$op" -v a="${per_iter[vmm,$ring,$op]}" -v b="${per_iter[qemu,$ring,$op]}" \
                -v am="${best[vmm,$ring,$op]}" -v bm="${best[qemu,$ring,$op]}" \
                'BEGIN { printf "ring=%s %-5s median: vmm %7.2f us  qemu %7.2f us  %.2fx   min: %7.2f / %7.2f  %.2fx\n",
                                r, o, a, b, b / a, am, bm, bm / am }'
        done
    done
fi

if [ "${NO_QEMU:-0}" != 1 ] && command -v perf >/dev/null; then
    echo
    echo "=== monitor CPU per exit, ring=3, n=$((4 * N)) minus n=0 (perf stat; user time tick-sampled) ==="
    printf '%-5s %-5s %14s %14s\n' op monitor "user us/exit" "total us/exit"
    for op in cf8 ecam null; do
        for mon in vmm qemu; do
            read -r u0 t0 <<<"$(cpu "$mon" "$op" 0 3)"
            read -r u1 t1 <<<"$(cpu "$mon" "$op" $((4 * N)) 3)"
            awk -v o="$op" -v m="$mon" -v u0="$u0" -v u1="$u1" -v t0="$t0" -v t1="$t1" \
                -v n=$((4 * N)) -v e="$(exits "$op")" \
                'BEGIN { printf "%-5s %-7s %12.3f %14.2f\n", o, m, (u1 - u0) / n / e / 1000, (t1 - t0) / n / e / 1000 }'
        done
    done
    echo "(total = user + kernel CPU of the monitor process, i.e. the whole exit including KVM/PVM)"
fi
echo "goals: config access per exit within 10% of a null exit; vmm >= 1.2x faster than QEMU"
