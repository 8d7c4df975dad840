#!/usr/bin/env bash
# Scale (issue 13): machines with 1, 31, 248 and 1,000 virtio-rng-pci functions, our vmm and
# QEMU with the same devices at the same addresses, on this host.
#
#   resources/bench/scale.sh [REPEATS]        (default 3; ~10 minutes on 2 cores, most of it QEMU)
#
# Machines (device N is virtio-rng-pci; QEMU gets `disable-legacy=on` so both have the same
# modern-only 1af4:1044 function):
#   1      00:01.0
#   31     00:01.0 .. 00:1f.0, one function per slot
#   248    00:01.0 .. 00:1f.7, multifunction (8 functions in each of the 31 slots)
#   496    pci-bridges at 00:1e.0 and 00:1f.0 (buses 1 and 2), 248 functions behind each
#   1000   pci-bridges at 00:1c.0 .. 00:1f.0 (buses 1-4), 248 functions behind each (slots 01-1f,
#          multifunction), and 8 at 00:01.0-01.7
# (bus N behind a bridge holds 248 functions with BAR windows for buses 1-56: README "PCI
# bridges"). COUNTS overrides the list: any N <= 248 goes on bus 0, a larger one fills
# N/248 bridges and puts the rest on bus 0 (at most 27 bridges).
#
# QEMU: `qemu-system-x86_64 -accel kvm -M microvm,pcie=on` (QEMU_MACHINE), the QEMU machine
# ours resembles (GPEX host bridge 1b36:0008 at 00:00.0, ECAM at 0xe0000000, nothing else on
# bus 0, so every address above is free in both; its firmware, qboot, finds no CF8/CFC there and
# leaves PCI alone). It takes pci-bridge on its root bus.
#
# Each run (one launch) gives three figures:
#   (a) start: execve -> first KVM_RUN. bash notes $EPOCHREALTIME and execs the monitor with
#       the LD_PRELOAD shim first-kvm-run.c, which notes CLOCK_REALTIME at the first KVM_RUN
#       ioctl (same clock). Nothing else is traced. Also the monitor's CPU time by then (all
#       threads, CLOCK_PROCESS_CPUTIME_ID in the shim, minus what the launching shell had used
#       before its exec), which a loaded machine disturbs less than the wall time.
#   (b) own memory: while the guest holds after its enumeration (null exits at CPL3), Rss from
#       /proc/PID/smaps_rollup minus the Rss of the guest-RAM mapping (the anonymous mapping
#       of MEM_MIB, default 64, found in /proc/PID/smaps; the guest touches little of it);
#       Private (Private_Clean + Private_Dirty, shared library pages not counted) likewise.
#   (c) enumeration: the probe guest's `mode=enum ring=3` (resources/guest/README.md): every
#       function's 256 bytes through ECAM (QEMU microvm has no CF8/CFC), every bridge numbered
#       depth first; the time between the `=== ENUM ... start ===` and `... done ===` lines as
#       they come out of the monitor's serial port (timestamped here as they arrive). Also
#       launch -> done (QEMU runs its firmware first, we do not), and the monitor's CPU time
#       over the enumeration (all its threads, from /proc/PID/task/*/schedstat when each line
#       arrives; on this KVM an exit's cost is mostly the host kernel's, charged to the vCPU
#       thread), which a loaded machine disturbs less than the wall time.
# The monitors are interleaved (for each repeat: for each N: vmm, qemu); medians of REPEATS.
# Then, per monitor and figure, a least-squares line over N (slope = cost per added function,
# with r^2 and the largest relative residual as a linearity check), and the ratios vmm/QEMU.
# Nothing here asserts a timing: it prints what it measured and the load average.
#
# Env: SKIP_BUILD=1 (do not build the probe guest and the vmm), NO_QEMU=1, COUNTS="1 31 ...",
# MEM_MIB (64), QEMU_MACHINE (microvm,pcie=on), TIMEOUT (s per run, 600), KEEP=DIR (keep the
# per-run logs there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
REPEATS=${1:-3}
COUNTS=${COUNTS:-1 31 248 496 1000}
MEM_MIB=${MEM_MIB:-64}
QEMU_MACHINE=${QEMU_MACHINE:-microvm,pcie=on}
TIMEOUT=${TIMEOUT:-600}
probe=$root/target/guest/probe.elf
vmm=$root/target/release/vmm
shim=$root/target/bench/first-kvm-run.so

die() {
    echo "scale.sh: $*" >&2
    exit 1
}
case $REPEATS in '' | *[!0-9]* | 0) die "REPEATS must be a positive number, not '$REPEATS'" ;; esac
for n in $COUNTS; do
    case $n in '' | *[!0-9]* | 0) die "COUNTS: '$n' is not a positive number" ;; esac
    [ "$n" -le $((248 + 27 * 248)) ] || die "COUNTS: $n functions do not fit (27 bridges x 248 + 248 on bus 0)"
done

tmp=$(mktemp -d)
pid=""
reader=""
cleanup() {
    local p
    for p in $pid $reader; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp -r "$tmp"/. "$KEEP"/ && echo "scale.sh: logs kept in $KEEP" >&2
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    resources/guest/build.sh >/dev/null || die "building the probe guest failed"
    cargo build --release -p vmm 2>&1 | tail -1 >&2
    [ "${PIPESTATUS[0]}" = 0 ] || die "cargo build --release -p vmm failed"
fi
[ -f "$probe" ] || die "no probe guest at $probe (run resources/guest/build.sh)"
[ -x "$vmm" ] || die "no vmm at $vmm (cargo build --release -p vmm)"
[ -w /dev/kvm ] || die "/dev/kvm is not usable here"
command -v gcc >/dev/null || die "gcc is needed to build the LD_PRELOAD shim"
monitors="vmm qemu"
if [ "${NO_QEMU:-0}" = 1 ]; then
    monitors="vmm"
else
    command -v qemu-system-x86_64 >/dev/null ||
        die "qemu-system-x86_64 not found (apt-get install qemu-system-x86, or NO_QEMU=1)"
fi
mkdir -p "$(dirname "$shim")"
gcc -shared -fPIC -O2 -o "$shim" "$here/first-kvm-run.c" -ldl || die "building the shim failed"

# devices N: one device per line in QEMU's -device syntax (ours is the same)
devices() {
    local n=$1 i b slot fn nb rest mf
    dev() { # dev ID BUS SLOT FN N_ON_THIS_BUS
        mf=""
        [ "$5" -gt 31 ] && [ "$4" = 0 ] && mf=,multifunction=on
        if [ "$5" -le 31 ]; then
            printf 'virtio-rng-pci,id=%s%s,addr=%02x.0\n' "$1" "$2" "$3"
        else
            printf 'virtio-rng-pci,id=%s%s,addr=%02x.%d%s\n' "$1" "$2" "$3" "$4" "$mf"
        fi
    }
    if [ "$n" -le 248 ]; then
        nb=0
        rest=$n
    else
        nb=$((n / 248))
        rest=$((n - nb * 248))
        # the bridges take the last slots of bus 0; the rest of the functions the first ones
        [ $(((rest + 7) / 8 + nb)) -le 31 ] || die "COUNTS: $n functions do not fit on bus 0 and $nb bridges"
    fi
    for ((b = 1; b <= nb; b++)); do
        printf 'pci-bridge,id=br%d,chassis_nr=%d,addr=%02x.0\n' "$b" "$b" $((31 - nb + b))
    done
    for ((i = 0; i < rest; i++)); do
        if [ "$rest" -le 31 ]; then
            slot=$((i + 1)) fn=0
        else
            slot=$((1 + i / 8)) fn=$((i % 8))
        fi
        dev "r0_$i" "" "$slot" "$fn" "$rest"
    done
    for ((b = 1; b <= nb; b++)); do
        for ((i = 0; i < 248; i++)); do
            dev "r${b}_$i" ",bus=br$b" $((1 + i / 8)) $((i % 8)) 248
        done
    done
}

for n in $COUNTS; do devices "$n" >/dev/null; done

# launch MONITOR N: execs that monitor (with the shim) on the probe guest's mode=enum
launch() {
    local mon=$1 n=$2 d args=()
    # hold: >= 30 s of null exits (~10 us each here) for the memory sample; the guest then
    # ends by itself even if this script is killed before it stops the monitor
    local append="mode=enum ring=3 hold=3000000"
    while IFS= read -r d; do
        case $mon in
        vmm) args+=(--device "$d") ;;
        qemu)
            case $d in virtio-*) d="$d,disable-legacy=on" ;; esac
            args+=(-device "$d")
            ;;
        esac
    done < <(devices "$n")
    local c0 _
    read -r c0 _ </proc/$BASHPID/schedstat # this shell's CPU time (ns), counted in the exec'd one's
    echo "$c0" >"$tmp/c0"
    echo "$BASHPID" >"$tmp/pid"
    echo "$EPOCHREALTIME" >"$tmp/t0"
    export FIRST_KVM_RUN_FILE=$tmp/t1 FIRST_KVM_RUN_CPU_FILE=$tmp/c1 LD_PRELOAD=$shim
    case $mon in
    vmm)
        exec "$vmm" run --no-reboot --kernel "$probe" --memory "$MEM_MIB" --append "$append" \
            "${args[@]}"
        ;;
    qemu)
        exec qemu-system-x86_64 -accel kvm -M "$QEMU_MACHINE" -cpu host,-arch-capabilities \
            -m "$MEM_MIB" -nographic -no-reboot -vga none -nic none \
            -kernel "$probe" -append "$append" "${args[@]}"
        ;;
    esac
}

# stamp: each line of stdin as "TIME CPU LINE": the time it arrived and, for the ENUM lines, the
# CPU time (ns, all threads, /proc/PID/task/*/schedstat) the monitor had used by then ("-" else)
stamp() {
    local line t cpu
    while IFS= read -r line; do
        t=$EPOCHREALTIME
        cpu=-
        case $line in
        *"=== ENUM op="*)
            cpu=$(cat /proc/"$(cat "$tmp/pid")"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }')
            ;;
        esac
        printf '%s %s %s\n' "$t" "$cpu" "$line"
    done
}

# own_memory PID -> "own_rss_kib own_private_kib guest_rss_kib" (see the header)
own_memory() {
    cp "/proc/$1/smaps" "$tmp/smaps"
    cp "/proc/$1/smaps_rollup" "$tmp/rollup"
    local guest
    guest=$(awk -v lo=$((MEM_MIB * 1024)) -v hi=$((MEM_MIB * 1024 + 4096)) '
        /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF == 5); size = -1; next }
        /^Size:/ { size = $2; next }
        /^Rss:/ && anon && size >= lo && size <= hi && (best == "" || $2 > best) { best = $2 }
        END { print (best == "" ? "none" : best) }' "$tmp/smaps")
    [ "$guest" != none ] || { echo "no guest-RAM mapping of $MEM_MIB MiB in /proc/$1/smaps" >&2 && return 1; }
    awk -v g="$guest" '
        /^Rss:/ { rss = $2 } /^Private_(Clean|Dirty):/ { priv += $2 }
        END { printf "%d %d %d\n", rss - g, priv - g, g }' "$tmp/rollup"
}

# run MONITOR N: sets RESULT to "first_kvm_run_ms first_kvm_run_cpu_ms enum_ms enum_cpu_ms
# launch_to_done_ms own_rss_kib own_private_kib functions" (in this shell, not a subshell, so
# that the EXIT trap knows the monitor's pid) (functions as the guest counted them), or fails with the monitor's own words
run() {
    local mon=$1 n=$2 deadline st=0 mem
    RESULT=""
    rm -f "$tmp/t0" "$tmp/t1" "$tmp/c0" "$tmp/c1" "$tmp/out" "$tmp/err" "$tmp/fifo" "$tmp/pid"
    mkfifo "$tmp/fifo"
    : >"$tmp/out"
    stamp <"$tmp/fifo" >"$tmp/out" &
    reader=$!
    (launch "$mon" "$n") >"$tmp/fifo" 2>"$tmp/err" </dev/null &
    pid=$!
    deadline=$((SECONDS + TIMEOUT))
    while ! grep -q "=== ENUM hold ===" "$tmp/out"; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || st=$?
            pid=""
            wait "$reader" 2>/dev/null || true
            reader=""
            echo "scale.sh: $mon with $n functions did not finish its enumeration (exit status $st," \
                "$((TIMEOUT)) s limit); its stderr:" >&2
            tail -n 5 "$tmp/err" | sed 's/^/    /' >&2
            echo "    its serial output (last lines):" >&2
            tail -n 3 "$tmp/out" | sed 's/^/    /' >&2
            cp "$tmp/err" "$tmp/fail-$mon-$n.err"
            return 1
        fi
        sleep 0.05
    done
    mem=$(own_memory "$pid") || mem=""
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
    wait "$reader" 2>/dev/null || true
    reader=""
    [ -n "$mem" ] || return 1
    [ -s "$tmp/t1" ] || { echo "scale.sh: the shim noted no KVM_RUN for $mon with $n functions" >&2 && return 1; }
    cp "$tmp/out" "$tmp/serial-$mon-$n.log"
    [ -s "$tmp/c1" ] || { echo "scale.sh: the shim noted no CPU time for $mon with $n functions" >&2 && return 1; }
    RESULT=$(awk -v t0="$(cat "$tmp/t0")" -v t1="$(cat "$tmp/t1")" -v c0="$(cat "$tmp/c0")" -v c1="$(cat "$tmp/c1")" -v mem="$mem" '
        / === ENUM op=[a-z0-9]+ start ===/ { s = $1; sc = $2 }
        / === ENUM op=[a-z0-9]+ done / { d = $1; dc = $2; for (i = 1; i <= NF; i++) if ($i ~ /^functions=/) { f = $i; sub(/.*=/, "", f) } }
        END {
            if (s == "" || d == "") { print "no ENUM start/done lines" > "/dev/stderr"; exit 1 }
            split(mem, m, " ")
            printf "%.3f %.3f %.3f %.3f %.3f %d %d %d\n", (t1 - t0) * 1000, c1 * 1000 - c0 / 1e6, (d - s) * 1000, (dc - sc) / 1e6, (d - t0) * 1000, m[1], m[2], f
        }' "$tmp/out")
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }

echo "=== scale (issue 13): $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)') ==="
echo "host:    $(uname -r), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cpus; kvm: $([ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, at start)"
[ "$monitors" = vmm ] || echo "qemu:    $(qemu-system-x86_64 --version | head -1), -M $QEMU_MACHINE"
echo "guest:   probe.elf mode=enum ring=3 (ECAM), $MEM_MIB MiB; functions: $COUNTS (virtio-rng-pci); medians of $REPEATS, interleaved"
echo

# results: lines "MONITOR N FIRST ENUM DONE RSS PRIV FUNCTIONS" per run
: >"$tmp/results"
: >"$tmp/medians"
for rep in $(seq "$REPEATS"); do
    for n in $COUNTS; do
        for mon in $monitors; do
            if run "$mon" "$n"; then
                r=$RESULT
                echo "$mon $n $r" >>"$tmp/results"
                printf 'run %d/%d %-4s %5d functions: first KVM_RUN %9.1f ms (CPU %9.1f ms), enumeration %9.1f ms (CPU %9.1f ms), launch->done %9.1f ms, own Rss %7d KiB, own private %7d KiB (guest counted %d functions)\n' \
                    "$rep" "$REPEATS" "$mon" "$n" $r >&2
            else
                echo "$mon $n FAIL" >>"$tmp/results"
            fi
        done
    done
done
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, at the end)"
echo

# table of medians
fig_names=("" "" "first KVM_RUN (ms)" "first KVM_RUN CPU (ms)" "enumeration (ms)" "enumeration CPU (ms)" "launch->enum done (ms)" "own Rss (KiB)" "own private (KiB)")
printf '%-6s %6s %9s | %12s %12s %12s %12s %14s %11s %11s | %s\n' monitor N functions "1st KVM_RUN" "its CPU" enumeration "enum CPU" "launch->done" "own Rss" "own priv" "runs ok"
for n in $COUNTS; do
    for mon in $monitors; do
        ok=$(awk -v m="$mon" -v n="$n" '$1 == m && $2 == n && $3 != "FAIL"' "$tmp/results" | wc -l)
        if [ "$ok" = 0 ]; then
            printf '%-6s %6d %9s | %12s\n' "$mon" "$n" - "FAILED (see the messages above)"
            continue
        fi
        row=()
        for col in 3 4 5 6 7 8 9; do
            row+=("$(awk -v m="$mon" -v n="$n" -v c="$col" '$1 == m && $2 == n && $3 != "FAIL" { print $c }' "$tmp/results" | median)")
        done
        fns=$(awk -v m="$mon" -v n="$n" '$1 == m && $2 == n && $3 != "FAIL" { print $10; exit }' "$tmp/results")
        printf '%-6s %6d %9d | %9.1f ms %9.1f ms %9.1f ms %9.1f ms %11.1f ms %7d KiB %7d KiB | %d/%d\n' "$mon" "$n" "$fns" "${row[@]}" "$ok" "$REPEATS"
        echo "$mon $n ${row[*]}" >>"$tmp/medians"
    done
done
echo "(N: virtio-rng-pci functions; functions: what the guest enumerated, host bridge and bridges included;"
echo " own priv counts a page of the binary as shared while another process maps it: other vmm or"
echo " QEMU processes on the host move it, own Rss does not move)"
echo

# least squares per monitor and figure over the medians
fit() { # fit MONITOR COLUMN -> "slope intercept r2 maxres%" over (N, median)
    awk -v m="$1" -v c="$2" '$1 == m { x[++k] = $2; y[k] = $c }
        END {
            if (k < 2) { print "nan nan nan nan"; exit }
            for (i = 1; i <= k; i++) { sx += x[i]; sy += y[i] }
            mx = sx / k; my = sy / k
            for (i = 1; i <= k; i++) { sxx += (x[i] - mx) ^ 2; sxy += (x[i] - mx) * (y[i] - my); syy += (y[i] - my) ^ 2 }
            b = sxy / sxx; a = my - b * mx
            r2 = syy ? (sxy * sxy) / (sxx * syy) : 1
            for (i = 1; i <= k; i++) { if (y[i] > ymax) ymax = y[i] }
            for (i = 1; i <= k; i++) { r = y[i] - (a + b * x[i]); r = r < 0 ? -r : r; if (ymax > 0 && r / ymax > mr) mr = r / ymax }
            printf "%.6g %.6g %.4f %.1f\n", b, a, r2, mr * 100
        }' "$tmp/medians"
}
echo "=== cost per added function: least squares over N (slope), per monitor ==="
printf '%-24s %-6s %14s %12s %8s %12s\n' figure monitor "per function" "at N=0" "r^2" "max resid"
declare -A slope
units=("" "" "" ms ms ms ms ms KiB KiB)
for col in 3 4 5 6 7 8 9; do
    for mon in $monitors; do
        [ -s "$tmp/medians" ] && grep -q "^$mon " "$tmp/medians" || continue
        read -r b a r2 mr <<<"$(fit "$mon" $((col - 0)))"
        slope[$mon.$col]=$b
        if [ "${units[$col]}" = ms ]; then
            printf '%-24s %-6s %11.1f us %9.1f ms %8s %11s%%\n' "${fig_names[$((col - 1))]}" "$mon" "$(awk -v b="$b" 'BEGIN { print b * 1000 }')" "$a" "$r2" "$mr"
        else
            printf '%-24s %-6s %10.2f KiB %8.0f KiB %8s %11s%%\n' "${fig_names[$((col - 1))]}" "$mon" "$b" "$a" "$r2" "$mr"
        fi
    done
done
echo "(max resid: the largest |median - line| over the N, in % of the largest median; r^2 near 1 and"
echo " small residuals = linear; at N=0: the line's intercept)"

if [ "$monitors" != vmm ]; then
    echo
    echo "=== ratios vmm/QEMU, measured in this run ==="
    printf '%-24s %8s' figure "slope"
    for n in $COUNTS; do printf ' %8s' "N=$n"; done
    echo
    for col in 3 4 5 6 7 8 9; do
        printf '%-24s %8s' "${fig_names[$((col - 1))]}" "$(awk -v a="${slope[vmm.$col]:-nan}" -v b="${slope[qemu.$col]:-nan}" 'BEGIN { if (b + 0 == 0) print "nan"; else printf "%.3f", a / b }')"
        for n in $COUNTS; do
            printf ' %8s' "$(awk -v n="$n" -v c="$col" '$2 == n { v[$1] = $c } END { if (v["qemu"] + 0 == 0 || v["vmm"] == "") print "-"; else printf "%.3f", v["vmm"] / v["qemu"] }' "$tmp/medians")"
        done
        echo
    done
    echo "(goal of issue 13: linear, and per function at most 1/5 of QEMU's start time and memory: slope ratio <= 0.2)"
fi

# the curve: enumeration and own Rss against N, one bar per monitor
echo
echo "=== curve: own Rss (KiB) and first KVM_RUN (ms) against N (bars scaled to the largest) ==="
max_rss=$(awk '{ if ($8 > m) m = $8 } END { print m + 0 }' "$tmp/medians")
max_first=$(awk '{ if ($3 > m) m = $3 } END { print m + 0 }' "$tmp/medians")
while read -r mon n first fcpu en ecpu fin rss priv; do
    printf '%-5s %5d  Rss %7d |%-30s|  1st KVM_RUN %8.1f |%-30s|\n' "$mon" "$n" "$rss" \
        "$(awk -v v="$rss" -v m="$max_rss" 'BEGIN { s = ""; k = m ? int(30 * v / m + 0.5) : 0; for (i = 0; i < k; i++) s = s "#"; print s }')" \
        "$first" "$(awk -v v="$first" -v m="$max_first" 'BEGIN { s = ""; k = m ? int(30 * v / m + 0.5) : 0; for (i = 0; i < k; i++) s = s "#"; print s }')"
done <"$tmp/medians"
if grep -q FAIL "$tmp/results"; then
    echo
    echo "failed runs: $(awk '$3 == "FAIL" { print $1 " N=" $2 }' "$tmp/results" | sort | uniq -c | tr -s ' ' | paste -sd, -)"
    exit 1
fi
