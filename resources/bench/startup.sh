#!/usr/bin/env bash
# Start-up latency and the monitor's own memory, for a 256 MiB guest, our vmm and QEMU.
#
#   resources/bench/startup.sh [REPEATS]      (default 5; ~30 s, most of it QEMU)
#
# 1. Time from process start (execve) to the first KVM_RUN ioctl, measured twice, median of
#    REPEATS each:
#    - untraced: bash notes $EPOCHREALTIME and execs the monitor with the LD_PRELOAD shim
#      first-kvm-run.c (built here with gcc), which notes the time of the first KVM_RUN;
#    - traced: `strace -f -ttt --seccomp-bpf -e trace=execve,ioctl` (strace stops the process
#      at each traced ioctl, so this is an upper bound; it also counts the ioctls before it).
# 2. Own memory: the probe guest sits in a long bench loop (`op=null ring=3`); then
#    /proc/PID/smaps_rollup gives Rss and private memory, and the guest-RAM mapping's Rss (the
#    anonymous mapping of exactly the guest size for vmm; the largest anonymous mapping for QEMU)
#    is subtracted: what is left is the monitor's own memory.
# Env: SKIP_BUILD=1 skips building; NO_QEMU=1 skips QEMU; MEM_MIB (default 256).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
REPEATS=${1:-5}
MEM_MIB=${MEM_MIB:-256}
probe=$root/target/guest/probe.elf
vmm=$root/target/release/vmm
tmp=$(mktemp -d)
bg=""
cleanup() {
    if [ -n "$bg" ]; then kill "$bg" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    resources/guest/build.sh >/dev/null
    cargo build --release -p vmm 2>&1 | tail -1
fi
need() {
    command -v "$1" >/dev/null && return
    echo "installing $2 ..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2") >&2
}
need strace strace
[ "${NO_QEMU:-0}" != 1 ] && need qemu-system-x86_64 qemu-system-x86

# cmd MONITOR APPEND: sets CMD to the command line of that monitor with a MEM_MIB guest
cmd() {
    case $1 in
    vmm) CMD=("$vmm" run --no-reboot --kernel "$probe" --memory "$MEM_MIB" --append "$2") ;;
    qemu) CMD=(qemu-system-x86_64 -accel kvm -M pc -cpu host,-arch-capabilities -m "$MEM_MIB"
        -nographic -no-reboot -vga none -nic none -kernel "$probe" -append "$2") ;;
    esac
}

shim=$root/target/bench/first-kvm-run.so
mkdir -p "$(dirname "$shim")"
gcc -shared -fPIC -O2 -o "$shim" "$here/first-kvm-run.c" -ldl

# untraced MONITOR -> ms from execve to the first KVM_RUN, through the LD_PRELOAD shim
untraced() {
    cmd "$1" "mode=hello"
    rm -f "$tmp/t0" "$tmp/t1"
    local st=0
    (
        echo "$EPOCHREALTIME" >"$tmp/t0"
        FIRST_KVM_RUN_FILE=$tmp/t1 LD_PRELOAD=$shim exec "${CMD[@]}"
    ) >/dev/null 2>&1 </dev/null || st=$?
    if [ -s "$tmp/t1" ]; then
        awk -v a="$(cat "$tmp/t0")" -v b="$(cat "$tmp/t1")" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }'
    else
        echo "startup.sh: $1 under the LD_PRELOAD shim noted no KVM_RUN (exit status $st)" >&2
        echo nan
    fi
}

# first_run MONITOR -> "ms ioctls" from execve to the first KVM_RUN
first_run() {
    cmd "$1" "mode=hello"
    timeout 60 strace -f -ttt --seccomp-bpf -e trace=execve,ioctl -o "$tmp/trace" \
        "${CMD[@]}" >/dev/null 2>&1 </dev/null || true
    awk '
        { sub(/^[0-9]+ +/, "") }                      # -f: leading pid
        t0 == "" && /execve\(/ { t0 = $1 }
        /ioctl\(/ && !/resumed>/ { n++ }
        /KVM_RUN/ { printf "%.3f %d\n", ($1 - t0) * 1000, n - 1; found = 1; exit }
        END { if (!found) print "nan 0" }' "$tmp/trace"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }

# memory MONITOR -> "rss_mib private_mib guest_rss_mib own_rss_mib own_private_mib"
memory() {
    cmd "$1" "mode=bench op=null n=100000000 ring=3"
    "${CMD[@]}" >"$tmp/out" 2>/dev/null </dev/null &
    bg=$!
    for _ in $(seq 200); do
        grep -q "start ===" "$tmp/out" 2>/dev/null && break
        sleep 0.05
    done
    sleep 0.5
    local pid=$bg
    cp "/proc/$pid/smaps" "$tmp/smaps"
    cp "/proc/$pid/smaps_rollup" "$tmp/rollup"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    bg=""
    local guest
    guest=$(awk -v want=$((MEM_MIB * 1024)) -v exact="$([ "$1" = vmm ] && echo 1 || echo 0)" '
        /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF == 5); size = -1; next }
        /^Size:/ { size = $2; next }
        /^Rss:/ && anon && size >= want {
            if (exact && size == want) { print $2; done = 1; exit }
            if (!exact && size > best) { best = size; rss = $2 }
        }
        END { if (!done) print (rss == "" ? 0 : rss) }' "$tmp/smaps")
    awk -v g="$guest" '
        /^Rss:/ { rss = $2 } /^Private_(Clean|Dirty):/ { priv += $2 }
        END { printf "%.2f %.2f %.2f %.2f %.2f\n", rss / 1024, priv / 1024, g / 1024,
              (rss - g) / 1024, (priv - g) / 1024 }' "$tmp/rollup"
}

monitors="vmm"
[ "${NO_QEMU:-0}" != 1 ] && monitors="vmm qemu"
echo
echo "=== start-up: execve -> first KVM_RUN, ${MEM_MIB} MiB guest (ms, median of $REPEATS) ==="
for mon in $monitors; do
    ms=()
    us=()
    n=0
    for _ in $(seq "$REPEATS"); do
        us+=("$(untraced "$mon")")
        read -r t n <<<"$(first_run "$mon")"
        ms+=("$t")
    done
    printf '%-5s untraced %8.2f ms (runs: %s)\n' "$mon" "$(printf '%s\n' "${us[@]}" | median)" "${us[*]}"
    printf '%-5s strace   %8.2f ms (runs: %s; %s ioctls before it)\n' "$mon" \
        "$(printf '%s\n' "${ms[@]}" | median)" "${ms[*]}" "$n"
done
echo "goal: vmm < 10 ms"
echo
echo "=== memory while the guest runs a bench loop, ${MEM_MIB} MiB guest (MiB) ==="
printf '%-5s %9s %9s %10s %9s %12s\n' mon Rss Private guest-Rss own-Rss own-Private
for mon in $monitors; do
    read -r rss priv g orss opriv <<<"$(memory "$mon")"
    printf '%-5s %9s %9s %10s %9s %12s\n' "$mon" "$rss" "$priv" "$g" "$orss" "$opriv"
done
echo "(own = total minus the guest-RAM mapping's Rss; Rss counts shared library pages, Private not)"
echo "goal: vmm own memory < 5 MiB"
