#!/usr/bin/env python3
"""Soak run (issue 15): one vmm + Linux guest under load for a long time. Runs on the KVM host
(inside L1 on the test ground); reuses hotplug_e2e.py's Vm (console command loop, qemu.qmp client)
from the same directory.

    soak_e2e.py --vmm VMM --kernel K --initrd BASE_INITRD --workdir DIR
                [--seconds S] [--cycles N] [--deadline SECS]

The guest (its /scenario is a command loop on the serial console, built here with
`mkguestinitrd`) runs, for the whole soak, in the background:
  - blk: 64 KiB patterns written (fsync) to a cold-plugged virtio-blk, read back after dropping
    the page cache and compared; counted iterations and errors;
  - net: `ping -s 1400` of L1's end of a tap the vmm created; counted replies and losses;
  - console: a numbered line every 0.2 s on the serial console and on a virtio-console whose
    host end is a file (the host counts what arrived).
Meanwhile the driver runs N hot-plug/unplug cycles at 09.0 (virtio-rng, every fourth a virtio-blk
with its own image), each device_add/device_del must be answered and each DEVICE_DELETED must
arrive; every tenth cycle it drops its own QMP connection and lets clients connect and vanish
(before the greeting, after it, after sending commands without reading replies, in the middle of
a message), then reconnects. It goes on until both the cycles and the seconds are done.

The vmm's fds, threads, HMP `info gsi` and memory (VmRSS; and its own memory: VmRSS minus the
resident part of the guest RAM mapping) are taken after boot plus one warm-up cycle of each kind
and one round of vanishing clients ("baseline"), and again at the end ("end"). Output: JSON lines
as hotplug_e2e.py's, ending with {"soak": "summary", ...} and a `SOAK PASS` / `SOAK FAIL` line
listing every check; exit status 0 only on PASS.
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hotplug_e2e import guest_script, Failure, Vm, emit, fd_kinds, resources, vmm_pid  # noqa: E402

TAP = "soaktap0"
HOST_IP = "10.0.2.1"
SLOT = "0x9"
# The vmm's own memory (VmRSS minus the guest RAM's resident pages) may grow this much over the
# soak: allocator slack and caches that settle (a few MiB at most), while a leak of 8 KiB per
# hot-plug cycle would pass it after 1,000 cycles.
OWN_RSS_SLACK_KIB = 8 * 1024

GUEST = guest_script(r"""dev() { echo "/sys/bus/pci/devices/0000:00:$1"; }
bound() { waitfor "$(dev "$1")/driver" && basename "$(readlink "$(dev "$1")/driver")"; }
disk() { for b in /sys/block/vd*; do [ "$(cat $b/serial)" = "$1" ] && echo /dev/$(basename $b); done; }
blkloop() {
    D=$(disk soak-disk); n=0; e=0
    i=0; while [ $i -lt 4096 ]; do printf 'SOAK-%010d\n' $i; i=$((i+1)); done > /tmp/pat
    want=$(md5sum < /tmp/pat | cut -d' ' -f1)
    while [ ! -e /tmp/stop ]; do
        off=$(( (n % 64) * 16 ))
        if dd if=/tmp/pat of=$D bs=4096 seek=$off count=16 conv=fsync 2>/dev/null; then
            echo 1 > /proc/sys/vm/drop_caches
            got=$(dd if=$D bs=4096 skip=$off count=16 2>/dev/null | md5sum | cut -d' ' -f1)
            [ "$got" = "$want" ] || e=$((e+1))
        else
            e=$((e+1))
        fi
        n=$((n+1)); echo "$n $e" > /tmp/blk.count
    done
    echo "$n $e" > /tmp/blk.done
}
netloop() {
    n=0; e=0
    while [ ! -e /tmp/stop ]; do
        ping -c 1 -W 10 -s 1400 10.0.2.1 >/dev/null 2>&1 || e=$((e+1))
        n=$((n+1)); echo "$n $e" > /tmp/net.count
    done
    echo "$n $e" > /tmp/net.done
}
conloop() {
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n+1))
        echo "soak-console $n"
        echo "soak-hvc $n" > /dev/hvc0 || echo "soak-hvc-error $n"
        sleep 0.2
    done
    echo "$n" > /tmp/con.done
}
startload() {
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || return 1
    [ -n "$(disk soak-disk)" ] && [ -e /dev/hvc0 ] || return 1
    blkloop </dev/null >/dev/null 2>&1 &
    netloop </dev/null >/dev/null 2>&1 &
    conloop </dev/null &
    waitfor /tmp/blk.count && waitfor /tmp/net.count && echo started
}
progress() { echo "blk $(cat /tmp/blk.count) net $(cat /tmp/net.count)"; }
stopload() {
    touch /tmp/stop
    waitfor /tmp/blk.done && waitfor /tmp/net.done && waitfor /tmp/con.done || return 1
    echo "blk $(cat /tmp/blk.done)"; echo "net $(cat /tmp/net.done)"; echo "con $(cat /tmp/con.done)"
}
""")


class SoakVm(Vm):
    """hotplug_e2e's Vm, plus dropping and re-opening its QMP connection."""

    # The load loops, page cache drops and hot-plugged disks need more than the default
    # (a 256 MiB guest once ran out of memory under them).
    MEMORY_MIB = 512

    async def drop_qmp(self):
        self.ev_task.cancel()
        await self.client.disconnect()
        self.client = None

    async def reopen_qmp(self):
        from qemu.qmp import EventListener, QMPClient
        self.client = QMPClient("soak")
        await asyncio.wait_for(self.client.connect(self.sock), 30)
        self.listener = EventListener()
        self.client.register_listener(self.listener)
        self.ev_task = asyncio.create_task(self.read_events())


def vanishing_clients(sock_path):
    """Clients that connect, maybe send something, and vanish. Each is served in turn (one
    client at a time), so each must be let go before the next gets its greeting. Returns how
    many got their greeting where they waited for it."""
    caps = b'{"execute":"qmp_capabilities"}\n'
    plans = [
        [],                                                   # connect, close at once
        ["greeting"],                                         # read the greeting, close
        ["greeting", caps + b'{"execute":"query-status"}\n'],  # commands, replies never read
        ["greeting", caps, "reply", b'{"execute":"query-pci","argu'],  # mid-message
        ["greeting", caps, "reply",
         b'{"execute":"human-monitor-command","arguments":{"command-line":"info gsi"}}\n'],
        ["greeting", b'{"execute":"qmp_capabilities"'],       # mid-message before capabilities
    ]
    greeted, expected = 0, sum(plan.count("greeting") for plan in plans)
    for plan in plans:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)  # a deadline only: a vmm that never greets is caught here
        s.connect(sock_path)
        buf = b""
        for step in plan:
            if step in ("greeting", "reply"):
                while b"\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise Failure(f"the QMP server closed on a vanishing client ({plan})")
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                if step == "greeting":
                    if b'"QMP"' not in line:
                        raise Failure(f"no QMP greeting: {line!r}")
                    greeted += 1
            else:
                s.sendall(step)
        s.close()
    return greeted, expected, len(plans)


async def hmp(vm, name, command):
    r = await vm.qmp(name, "human-monitor-command", {"command-line": command})
    if "return" not in r:
        raise Failure(f"{command}: {r}")
    return r["return"]


def parse_gsi(text):
    out = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.rsplit(":", 1)
            out[k.strip()] = v.strip()
    return out


def memory(pid):
    """(VmRSS, own) in KiB: own is VmRSS minus the resident part of the largest mapping (the
    guest's RAM, which grows as the guest touches its memory)."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    largest, largest_rss, size = 0, 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:") and size > largest:
                largest, largest_rss = size, int(line.split()[1])
    return rss, rss - largest_rss


async def snapshot(vm, pid, name):
    gsi = parse_gsi(await hmp(vm, f"{name}-info-gsi", "info gsi"))
    fds, threads = resources(pid)
    rss, own = memory(pid)
    snap = {"fds": fds, "threads": threads, "gsi": gsi, "vmrss_kib": rss, "own_kib": own,
            "fd_kinds": fd_kinds(pid)}
    emit({"host": name, **snap})
    return snap


async def cycle(vm, args, i, counts):
    since = len(vm.events)
    if i % 4 == 3:
        img = os.path.join(args.workdir, "cyc.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        dev = {"driver": "virtio-blk-pci", "id": "cyc", "addr": SLOT, "file": img}
    else:
        dev = {"driver": "virtio-rng-pci", "id": "cyc", "addr": SLOT}
    r = await vm.qmp(f"cycle-add-{i}", "device_add", dev)
    counts["device_add"] += 1
    if "return" not in r:
        raise Failure(f"cycle {i}: device_add failed: {r}")
    counts["device_add_ok"] += 1
    r = await vm.qmp(f"cycle-del-{i}", "device_del", {"id": "cyc"})
    counts["device_del"] += 1
    if "return" not in r:
        raise Failure(f"cycle {i}: device_del failed: {r}")
    counts["device_del_ok"] += 1
    # Generous: only catches a lost event (an overloaded L1 once stalled for two minutes).
    await vm.wait_deleted("cyc", since, timeout=600)
    counts["deleted_events"] += len(vm.deleted("cyc", since))


async def vanish_round(vm, counts):
    await vm.drop_qmp()
    greeted, expected, n = await asyncio.to_thread(vanishing_clients, vm.sock)
    counts["vanished_clients"] += n
    counts["vanished_greeted"] += greeted
    counts["vanished_greetings_expected"] += expected
    await vm.reopen_qmp()
    r = await vm.qmp("after-vanish-status", "query-status")
    if r.get("return", {}).get("status") != "running":
        raise Failure(f"query-status after vanishing clients: {r}")


def settle_tap():
    for _ in range(300):
        if os.path.exists(f"/sys/class/net/{TAP}"):
            break
        time.sleep(0.1)
    for cmd in (["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP],
                ["ip", "link", "set", TAP, "up"]):
        subprocess.run(cmd, check=True)


async def soak(vm, args, counts):
    vm.step = "boot"
    await vm.wait_ready(1)
    await asyncio.to_thread(settle_tap)
    rc, out = await vm.guest("startload", "startload")
    if rc != 0 or "started" not in out:
        raise Failure(f"the guest's load did not start: {out}")
    pid = vmm_pid(args.vmm)
    after_boot = await snapshot(vm, pid, "after-boot")

    # Warm-up: one cycle of each kind, one round of vanishing clients (lazily created things).
    vm.step = "warm-up"
    for i in (0, 3):
        await cycle(vm, args, i, counts)
    await vanish_round(vm, counts)
    await asyncio.sleep(1)
    baseline = await snapshot(vm, pid, "baseline")
    t0 = time.monotonic()

    vm.step = "soak"
    i = 0
    while i < args.cycles or time.monotonic() - t0 < args.seconds:
        if i < args.cycles:
            await cycle(vm, args, 4 + i, counts)
            i += 1
            if i % 10 == 0:
                await vanish_round(vm, counts)
            if i % 100 == 0:
                await vm.guest(f"progress-{i}", "progress")
        else:
            await vanish_round(vm, counts)
            await asyncio.sleep(2)
    counts["cycles"] = i
    counts["load_seconds"] = round(time.monotonic() - t0, 1)

    vm.step = "stop-load"
    rc, out = await vm.guest("stopload", "stopload", timeout=300)
    if rc != 0:
        raise Failure(f"the guest's load loops did not end: {out}")
    load = {}
    for line in out.splitlines():
        w = line.split()
        if w and w[0] in ("blk", "net", "con"):
            load[w[0]] = [int(x) for x in w[1:]]
    # Device threads end after DEVICE_DELETED: wait (bounded) for the counts to settle.
    end = await snapshot(vm, pid, "end")
    for _ in range(100):
        if (end["fds"], end["threads"]) == (baseline["fds"], baseline["threads"]):
            break
        await asyncio.sleep(0.1)
        end = await snapshot(vm, pid, "end")

    vm.step = "poweroff"
    await vm.send("P poweroff -f")
    rc = await vm.wait_exit()
    with open(os.path.join(args.workdir, "hvc0.txt"), "rb") as f:
        hvc = f.read().decode("latin-1").splitlines()
    serial = sum(1 for l in vm.lines if l is not None and "soak-console " in l)
    return after_boot, baseline, end, load, rc, hvc, serial


def checks(after_boot, baseline, end, load, rc, hvc, serial, counts, args):
    c = []

    def check(name, ok, detail):
        c.append({"check": name, "ok": bool(ok), "detail": detail})

    check("cycles", counts["cycles"] == args.cycles, f"{counts['cycles']} of {args.cycles}")
    n = counts["cycles"] + 2
    check("device_add replies", counts["device_add_ok"] == counts["device_add"] == n,
          f"{counts['device_add_ok']} ok of {counts['device_add']} sent, {n} cycles")
    check("device_del replies", counts["device_del_ok"] == counts["device_del"] == n,
          f"{counts['device_del_ok']} ok of {counts['device_del']} sent")
    check("DEVICE_DELETED events", counts["deleted_events"] == n,
          f"{counts['deleted_events']} for {n} removals")
    check("vanishing QMP clients served", counts["vanished_greeted"] > 0 and
          counts["vanished_greeted"] == counts["vanished_greetings_expected"],
          f"{counts['vanished_clients']} clients, {counts['vanished_greeted']} read a greeting")
    check("fds", end["fds"] == baseline["fds"],
          f"after boot {after_boot['fds']}, baseline {baseline['fds']}, end {end['fds']}")
    check("threads", end["threads"] == baseline["threads"] == after_boot["threads"],
          f"after boot {after_boot['threads']}, baseline {baseline['threads']}, "
          f"end {end['threads']}")
    check("GSI routes (info gsi)", end["gsi"] == baseline["gsi"] and end["gsi"],
          f"baseline {baseline['gsi']}, end {end['gsi']}")
    grow = end["own_kib"] - baseline["own_kib"]
    check("memory", grow <= OWN_RSS_SLACK_KIB,
          f"own (VmRSS minus guest RAM) {baseline['own_kib']} -> {end['own_kib']} KiB "
          f"(+{grow}, bound +{OWN_RSS_SLACK_KIB}); VmRSS after boot {after_boot['vmrss_kib']}, "
          f"baseline {baseline['vmrss_kib']}, end {end['vmrss_kib']} KiB")
    blk, net, con = load.get("blk", [0, -1]), load.get("net", [0, -1]), load.get("con", [0])
    check("guest blk loop", blk[0] > 0 and blk[1] == 0, f"{blk[0]} write/read-back rounds, "
          f"{blk[1]} errors")
    check("guest net loop", net[0] > 0 and net[1] == 0, f"{net[0]} pings, {net[1]} lost")
    want = [f"soak-hvc {k}" for k in range(1, con[0] + 1)]
    check("guest console (virtio-console file)", con[0] > 0 and hvc == want,
          f"{con[0]} lines written, {len(hvc)} arrived")
    check("guest console (serial)", con[0] > 0 and serial == con[0],
          f"{con[0]} lines written, {serial} arrived")
    check("vmm exit status", rc == 0, f"{rc}")
    return c


async def main(args):
    os.makedirs(args.workdir, exist_ok=True)
    guest = os.path.join(args.workdir, "guest.sh")
    with open(guest, "w") as f:
        f.write(GUEST)
    initrd = os.path.join(args.workdir, "guest.cpio.gz")
    subprocess.run(["mkguestinitrd", initrd, guest], check=True)
    args.initrd = initrd
    disk = os.path.join(args.workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    hvc = os.path.join(args.workdir, "hvc0.txt")
    vm = SoakVm(args, [
        "--device", f"virtio-blk-pci,id=disk0,addr=05.0,file={disk},serial=soak-disk",
        "--device", f"virtio-net-pci,id=net0,addr=06.0,tap={TAP}",
        "--device", f"virtio-console-pci,id=con0,addr=07.0,path={hvc}",
        "--device", "virtio-rng-pci,id=rng0,addr=04.0"])
    counts = {k: 0 for k in ("device_add", "device_add_ok", "device_del", "device_del_ok",
                             "deleted_events", "vanished_clients", "vanished_greeted",
                             "vanished_greetings_expected",
                             "cycles")}
    try:
        await vm.start()
        result = await soak(vm, args, counts)
    except Exception as e:
        emit({"failure": f"{type(e).__name__}: {e}", "step": vm.step, "counts": counts})
        await vm.abort()
        print("SOAK FAIL: the driver gave up at step", vm.step, flush=True)
        return 1
    c = checks(*result, counts, args)
    ok = all(x["ok"] for x in c)
    emit({"soak": "summary", "pass": ok, "counts": counts, "checks": c})
    for x in c:
        print(f"  {'ok  ' if x['ok'] else 'FAIL'} {x['check']}: {x['detail']}", flush=True)
    print(f"SOAK {'PASS' if ok else 'FAIL'}: {counts['cycles']} hot-plug cycles, "
          f"{counts['load_seconds']} s of load", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vmm", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--deadline", type=int, default=7200)
    sys.exit(asyncio.run(main(p.parse_args())))
