#!/usr/bin/env bash
# Exit-path cost on the local KVM: our vmm against QEMU, same probe guest, same loops.
#
#   resources/bench/exit-path.sh [N] [REPEATS]      (defaults: N=50000, REPEATS=3; ~1.5 min)
#
# For each monitor (vmm, qemu), op (cf8: CF8 write + CFC read = 2 exits; ecam: one MMIO read;
# null: one `inb` from port 0x2f0 that no device claims) and privilege level of the guest loop
# (ring=0: CPL0, which this machine's PVM KVM runs through its instruction emulator; ring=3:
# CPL3, native), the script watches the serial stream for the guest's `=== BENCH ... start ===`
# and `... done ===` lines and notes, as each arrives, the wall clock ($EPOCHREALTIME) and the
# CPU time of all the monitor's threads (/proc/PID/task/*/schedstat at the start line, bash's
# `times` after the exit: both exact). Boot and teardown cancel out; the figures of an n=0 run
# (printing the done line, shutting down) are subtracted.
# The monitors take turns run by run so that outside load falls on both. Median (and min) of
# REPEATS. CPU time per exit is the robust figure on a shared machine: waiting for a core
# inflates the wall clock, not the CPU time.
#
# QEMU: `-M pc` for cf8 and null; `-M pc` has no ECAM, so QEMU's ecam case runs on `-M q35`
# with the probe's `ecam=0xb0000000` (our vmm: ECAM at 0xe0000000, the probe's default).
#
# On PVM the exit itself (guest -> host kernel -> KVM -> user space and back) costs ~10 us,
# far more than any monitor's user-space handling. A last table therefore shows each
# monitor's CPU time in user space per exit (`perf stat -e user_time`, n=4N minus n=0, ring=3,
# one run each; user_time is tick-sampled, read it as +-20%). Needs `perf` (Debian: linux-perf);
# skipped without it.
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

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkfifo "$tmp/serial"

# cpu_ns PID: sets CPU_NS to the CPU time (ns) used so far by all threads of PID (builtins only,
# so reading it costs no fork while the guest loop runs).
cpu_ns() {
    local f a
    CPU_NS=0
    for f in /proc/"$1"/task/*/schedstat; do
        if read -r a _ <"$f" 2>/dev/null; then CPU_NS=$((CPU_NS + a)); fi
    done
}

# interval PID: reads the serial stream of monitor PID; prints "wall_s cpu_s": the seconds
# between the end of the start line and the end of the done line, and the CPU time PID had used
# when the start line came; or "fail". Kills PID if the stream stays silent for 120 s.
interval() {
    local pid=$1 line t0="" t1="" c0=""
    while true; do
        if IFS= read -r -t 120 line; then
            case $line in
            *"=== BENCH op="*" start ==="*) t0=$EPOCHREALTIME && cpu_ns "$pid" && c0=$CPU_NS ;;
            *"=== BENCH op="*" done ==="*) t1=$EPOCHREALTIME ;;
            esac
        else
            (($? > 128)) && kill "$pid" 2>/dev/null
            break
        fi
    done
    if [ -n "$t0" ] && [ -n "$t1" ]; then
        awk -v a="$t0" -v b="$t1" -v c="$c0" 'BEGIN { printf "%.6f %.6f\n", b - a, c / 1e9 }'
    else
        echo fail
    fi
}

# monitor MONITOR OP N RING: runs (execs) the probe bench under that monitor, serial on stdout
monitor() {
    local mon=$1 op=$2 n=$3 ring=$4 extra="" machine=pc
    [ "$ring" = 3 ] && extra=" ring=3"
    case $mon in
    vmm)
        exec "$vmm" run --no-reboot --kernel "$probe" --memory 64 \
            --append "mode=bench op=$op n=$n$extra" 2>/dev/null </dev/null
        ;;
    qemu)
        if [ "$op" = ecam ]; then
            machine=q35
            extra="$extra ecam=0xb0000000"
        fi
        exec qemu-system-x86_64 -accel kvm -M "$machine" -cpu host,-arch-capabilities \
            -m 64 -nographic -no-reboot -vga none -nic none -kernel "$probe" \
            -append "mode=bench op=$op n=$n$extra" 2>/dev/null </dev/null
        ;;
    esac
}

# run MONITOR OP N RING -> "wall_s cpu_s" from the start marker to the done marker (wall) and
# to the monitor's exit (CPU), or "fail". The CPU figure is the monitor's whole CPU time (from
# bash's `times`: the children's user + system time, exact once the child is reaped) minus what
# it had used at the start marker; the n=0 run subtracts the teardown after the done marker.
run() {
    local pid out
    times >"$tmp/times0"
    monitor "$@" >"$tmp/serial" &
    pid=$!
    out=$(interval "$pid" <"$tmp/serial")
    wait "$pid" 2>/dev/null || true
    times >"$tmp/times1"
    if [ "$out" = fail ]; then
        echo fail
        return
    fi
    awk -v out="$out" '
        function secs(t) { split(t, p, "m"); sub(/s$/, "", p[2]); return p[1] * 60 + p[2] }
        FNR == 2 { c[FILENAME == ARGV[1]] = secs($1) + secs($2) }
        END { split(out, o, " "); printf "%.6f %.6f\n", o[1], c[0] - c[1] - o[2] }' \
        "$tmp/times0" "$tmp/times1"
}

# cpu MONITOR OP N RING -> "user_ns task_ns" of the whole monitor process (perf stat)
cpu() {
    local f
    f=$(mktemp)
    perf stat -x, -e user_time,task-clock -o "$f" -- bash -c "$(declare -f monitor); \
        vmm='$vmm' probe='$probe' monitor $*" >/dev/null 2>&1 </dev/null || true
    awk -F, '$3 == "user_time" { u = $1 } $3 == "task-clock" { t = $1 * 1e6 }
        END { printf "%.0f %.0f\n", u, t }' "$f"
    rm -f "$f"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }
minimum() { sort -g | awk 'NR == 1 { print $1; found = 1 } END { if (!found) print "nan" }'; }

monitors="vmm"
[ "${NO_QEMU:-0}" != 1 ] && monitors="vmm qemu"
declare -A wall best cpu base_w base_c sw sc
# The monitors take turns run by run, so that load from elsewhere on the machine falls on both.
for ring in 0 3; do
    for mon in $monitors; do
        read -r w c <<<"$(run "$mon" null 0 "$ring")"
        [ "$w" = fail ] && w=0 c=0
        base_w[$mon,$ring]=$w
        base_c[$mon,$ring]=$c
    done
    for op in cf8 ecam null; do
        for _ in $(seq "$REPEATS"); do
            for mon in $monitors; do
                read -r w c <<<"$(run "$mon" "$op" "$N" "$ring")"
                [ "$w" = fail ] && continue
                k=$mon,$ring,$op
                sw[$k]+="$(awk -v s="$w" -v b="${base_w[$mon,$ring]}" -v n="$N" 'BEGIN { printf "%.4f", (s - b) / n * 1e6 }') "
                sc[$k]+="$(awk -v s="$c" -v b="${base_c[$mon,$ring]}" -v n="$N" 'BEGIN { printf "%.4f", (s - b) / n * 1e6 }') "
            done
        done
        for mon in $monitors; do
            k=$mon,$ring,$op
            v=${sw[$k]:-}
            if [ -z "$v" ]; then
                wall[$k]=nan best[$k]=nan cpu[$k]=nan
            else
                # shellcheck disable=SC2086 # word splitting wanted: one sample per line
                wall[$k]=$(printf '%s\n' $v | median)
                # shellcheck disable=SC2086
                best[$k]=$(printf '%s\n' $v | minimum)
                # shellcheck disable=SC2086
                cpu[$k]=$(printf '%s\n' ${sc[$k]} | median)
            fi
            echo "  $mon ring=$ring $op: wall ${v:-failed}/ cpu ${sc[$k]:-} us/iteration" >&2
        done
    done
done

exits() { [ "$1" = cf8 ] && echo 2 || echo 1; }
echo
echo "=== exit path: us per exit (N=$N iterations, $REPEATS runs; cf8 iteration = 2 exits) ==="
printf '%-7s %-4s %-5s %11s %11s %11s %9s %9s\n' monitor ring op "wall med" "wall min" "CPU med" "CPU/null" "wall/null"
for mon in $monitors; do
    for ring in 0 3; do
        for op in cf8 ecam null; do
            k=$mon,$ring,$op
            n=$mon,$ring,null
            awk -v m="$mon" -v r="$ring" -v o="$op" -v e="$(exits "$op")" \
                -v w="${wall[$k]}" -v b="${best[$k]}" -v c="${cpu[$k]}" \
                -v wn="${wall[$n]}" -v cn="${cpu[$n]}" \
                'BEGIN { printf "%-7s %-4s %-5s %11.2f %11.2f %11.2f %+8.1f%% %+8.1f%%\n",
                                m, r, o, w / e, b / e, c / e, (c / e / cn - 1) * 100, (w / e / wn - 1) * 100 }'
        done
    done
done
echo "(wall: between the guest's markers; CPU: all the monitor's threads, user + kernel, over the"
echo " loop; CPU/null, wall/null: per-exit cost against a null exit, an inb nobody claims)"
if [ "${NO_QEMU:-0}" != 1 ]; then
    echo
    echo "=== vmm vs QEMU: QEMU / vmm per iteration (QEMU ecam on -M q35) ==="
    printf '%-5s %-5s %12s %12s %12s %12s %10s\n' ring op "vmm CPU" "qemu CPU" "CPU ratio" "wall ratio" "wall min"
    for ring in 0 3; do
        for op in cf8 ecam null; do
            a=vmm,$ring,$op
            b=qemu,$ring,$op
            awk -v r="$ring" -v o="$op" -v ca="${cpu[$a]}" -v cb="${cpu[$b]}" \
                -v wa="${wall[$a]}" -v wb="${wall[$b]}" -v ma="${best[$a]}" -v mb="${best[$b]}" \
                'BEGIN { printf "%-5s %-5s %12.2f %12.2f %11.2fx %11.2fx %9.2fx\n",
                                r, o, ca, cb, cb / ca, wb / wa, mb / ma }'
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
