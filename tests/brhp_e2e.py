#!/usr/bin/env python3
"""Hot-plug behind a PCI bridge (issue 13) with real Linux, for tests/tests/hotplug.rs. Runs on
the KVM host (inside L1 on the test ground); reuses hotplug_e2e.py's Vm (console command loop,
qemu.qmp client) and its output format (one JSON object per line).

    brhp_e2e.py session --vmm VMM --kernel K --initrd I --workdir DIR [--deadline SECS]
    brhp_e2e.py guest-script      (prints the guest's /scenario)

The machine: a pci-bridge br1 at 00:1e.0 (bus 1 behind it), a virtio-rng at 01:01.0 behind it
and one at 00:04.0, `--compat DIR/rec.json`. Steps: hot-plug a virtio-blk at bus=br1,addr=03.0
(bound, the guest reads what the host wrote and writes what the host reads), unplug it
(DEVICE_DELETED, gone), add it again, reboot in place (it is still at 01:03.0), unplug it on
the new run; add it again and ask for its removal while paused: a system_reset completes it
(DEVICE_DELETED, the next boot never sees it); power off.
"""

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hotplug_e2e import (  # noqa: E402
    GUEST_DISK, Failure, Vm, abi_show, emit, emit_guest_write, guest_script, pattern,
    write_host_disk)

PATTERN_NAME = "BR-PATTERN"
PATTERN = pattern(PATTERN_NAME)
HOST_PATTERN = b"".join(b"HOST-BRIDGE-%03d\n" % i for i in range(256))  # 4096 bytes
HOST_OFFSET = 65536

GUEST = guest_script(GUEST_DISK + r"""dev() { echo "/sys/bus/pci/devices/0000:$1"; }
bound() { waitfor "$(dev "$1")/driver" && basename "$(readlink "$(dev "$1")/driver")"; }
gone() { waitgone "$(dev "$1")" && lspci -n; }
slots() { for s in /sys/bus/pci/slots/*; do echo "$(basename $s) $(cat $s/address)"; done | sort; }
hdbound() { bound 01:03.0 && waitfor /dev/vda && cat /sys/block/vda/size; }
settled() { bound 00:04.0 && bound 01:01.0 && bound 01:03.0 && waitfor /dev/vda; }
""")


async def session(vm, args):
    rec = os.path.join(args.workdir, "rec.json")
    disk = os.path.join(args.workdir, "hdb.img")
    vm.step = "boot1"
    await vm.wait_ready(1)
    await vm.guest("before-lspci-n", "lspci -n")
    await vm.guest("before-bound", "bound 00:04.0 && bound 01:01.0")
    await vm.guest("before-slots", "slots")
    await abi_show(vm, "abi-before", rec)

    vm.step = "add"
    write_host_disk(disk, HOST_OFFSET, HOST_PATTERN)
    await vm.qmp("add-hdb", "device_add", {"driver": "virtio-blk-pci", "id": "hdb",
                                           "bus": "br1", "addr": "03.0", "file": disk})
    await vm.guest("hdb-bound", "hdbound")
    await vm.guest("added-lspci-n", "lspci -n")
    await vm.guest("added-lspci-v", "lspci -v -s 01:03.0")
    await vm.guest("added-slots", "slots")
    await vm.guest("hdb-read-host", "hdhost")
    await vm.guest("hdb-write", f"hdwrite {PATTERN_NAME}")
    emit_guest_write(disk, PATTERN)
    await abi_show(vm, "abi-after-add", rec)
    # A bridge is not hot-pluggable, in either direction.
    await vm.qmp("add-bridge", "device_add", {"driver": "pci-bridge", "id": "br2",
                                              "chassis_nr": "2", "bus": "br1", "addr": "05.0"})
    await vm.qmp("del-bridge", "device_del", {"id": "br1"})

    vm.step = "del"
    since = len(vm.events)
    await vm.qmp("del-hdb", "device_del", {"id": "hdb"})
    await vm.wait_deleted("hdb", since)
    await vm.guest("hdb-gone", "gone 01:03.0")
    await abi_show(vm, "abi-after-del", rec)

    vm.step = "readd"
    await vm.qmp("readd-hdb", "device_add", {"driver": "virtio-blk-pci", "id": "hdb",
                                             "bus": "br1", "addr": "03.0", "file": disk})
    await vm.guest("readd-bound", "hdbound")
    await vm.guest("readd-read", "hdread")
    await vm.guest("before-reboot-lspci-n", "lspci -n")
    await vm.guest("before-reboot-lspci-vvv", "lspci -vvv")

    vm.step = "reboot"
    await vm.send("R reboot -f")
    await vm.wait_ready(2)
    vm.step = "boot2"
    await vm.guest("boot2-settled", "settled")
    await vm.guest("boot2-lspci-n", "lspci -n")
    await vm.guest("boot2-lspci-vvv", "lspci -vvv")
    await vm.guest("boot2-read", "hdread")
    since = len(vm.events)
    await vm.qmp("boot2-del-hdb", "device_del", {"id": "hdb"})
    await vm.wait_deleted("hdb", since)
    await vm.guest("boot2-gone", "gone 01:03.0")

    # A removal still pending at a reset completes with the reset (as in QEMU): paused, the
    # guest cannot eject; system_reset removes it and says so; the next boot never sees it.
    vm.step = "pending-at-reset"
    await vm.qmp("boot2-readd-hdb", "device_add", {"driver": "virtio-blk-pci", "id": "hdb",
                                                   "bus": "br1", "addr": "03.0", "file": disk})
    await vm.guest("boot2-readd-bound", "hdbound")
    since = len(vm.events)
    await vm.qmp("stop", "stop")
    await vm.qmp("pending-del-hdb", "device_del", {"id": "hdb"})
    await asyncio.sleep(1)
    emit({"host": "deleted-while-paused", "events": vm.deleted("hdb", since)})
    await vm.qmp("system-reset", "system_reset")
    await vm.wait_deleted("hdb", since)
    vm.step = "boot3"
    await vm.qmp("cont", "cont")
    await vm.wait_ready(3)
    await vm.guest("boot3-lspci-n", "bound 00:04.0 >/dev/null && bound 01:01.0 >/dev/null && lspci -n")
    await abi_show(vm, "abi-final", rec)

    vm.step = "poweroff"
    await vm.send("P poweroff -f")
    await vm.wait_exit()


async def main(args):
    rec = os.path.join(args.workdir, "rec.json")
    vmm_args = ["--compat", rec,
                "--device", "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
                "--device", "virtio-rng-pci,id=rngb,bus=br1,addr=01.0",
                "--device", "virtio-rng-pci,id=rng0,addr=04.0"]
    return await Vm(args, vmm_args).run(session, args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["session", "guest-script"])
    p.add_argument("--vmm")
    p.add_argument("--kernel")
    p.add_argument("--initrd")
    p.add_argument("--workdir")
    p.add_argument("--deadline", type=int, default=600)
    a = p.parse_args()
    if a.what == "guest-script":
        sys.stdout.write(GUEST)
        sys.exit(0)
    sys.exit(asyncio.run(main(a)))
