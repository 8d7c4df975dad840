#!/usr/bin/env python3
"""Drives one running vmm + Linux guest through ACPI PCI hot-plug (issue 12), for
tests/tests/hotplug.rs. Runs on the KVM host (inside L1 on the test ground).

    hotplug_e2e.py session|oldrec --vmm VMM --kernel K --initrd I --workdir DIR
                   [--deadline SECS] [--cycles N]
    hotplug_e2e.py guest-script   (prints the guest's /scenario)

Starts `vmmwatch --qmp SOCK DEADLINE VMM run ...` (QMP socket, `--compat DIR/rec.json`, a
virtio-rng at 04.0) with the guest console on pipes. The guest's /scenario is a command loop
(`TAG COMMAND` per line on the console; it answers between `=== TAG-BEGIN ===` and
`=== TAG-END rc=N ===`). QMP goes through QEMU's client library `qemu.qmp`.

Output, one JSON object per line (the Rust test asserts on them):

    {"guest": NAME, "rc": N, "out": TEXT}          a guest command's output
    {"qmp": NAME, "cmd": C, "arguments": A, "return": R} / {..., "error": {"class", "desc"}}
    {"event": E, "data": D, "step": S}              QMP events, with the step they arrived in
    {"host": NAME, ...}                             host-side facts (disk contents, abi show, fds)
    {"exit": RC}                                    the vmm's (vmmwatch's) exit status
    {"failure": TEXT}                               the driver gave up (then exit status 1)

The guest console is copied to stderr with a `console| ` prefix.
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys


def pattern(name):
    """The 8192 bytes the guest's `hdwrite NAME` writes: lines `NAME-0000` to `NAME-0511`."""
    return b"".join(b"%s-%04d\n" % (name.encode(), i) for i in range(512))


PATTERN_NAME = "HP-PATTERN"
PATTERN = pattern(PATTERN_NAME)
HOST_PATTERN = b"".join(b"HOST-WROTE-%04d\n" % i for i in range(256))  # 4096 bytes
HOST_OFFSET = 65536


# The guest's /scenario, shared by the drivers: wait helpers, the driver's own helpers, then a
# command loop on the console. Each line is `TAG COMMAND`; the answer is COMMAND's output
# between `=== TAG-BEGIN ===` and `=== TAG-END rc=N ===`.
GUEST_WAITS = r"""waitfor() { i=0; while [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
waitgone() { i=0; while [ -e "$1" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ ! -e "$1" ]; }
"""
GUEST_LOOP = r"""stty -echo 2>/dev/null
echo "=== CMDLOOP-READY ==="
while read -r tag cmd; do
    echo "=== $tag-BEGIN ==="
    eval "$cmd"
    echo "=== $tag-END rc=$? ==="
done
"""


# The disk helpers of the drivers with a hot-plugged virtio-blk at /dev/vda: the two blocks at
# 4 KiB, the host's block at 64 KiB, and `hdwrite NAME`, which writes pattern(NAME) at 4 KiB.
GUEST_DISK = r"""hdread() { dd if=/dev/vda bs=4096 skip=1 count=2 2>/dev/null | md5sum; }
hdhost() { dd if=/dev/vda bs=4096 skip=16 count=1 2>/dev/null | md5sum; }
hdwrite() {
    i=0; while [ $i -lt 512 ]; do printf '%s-%04d\n' "$1" $i; i=$((i+1)); done > /tmp/p
    dd if=/tmp/p of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null || return 1
    md5sum < /tmp/p && echo 3 > /proc/sys/vm/drop_caches && hdread
}
"""


def guest_script(helpers):
    """The guest's /scenario with `helpers` (sh functions) between the waits and the loop."""
    return GUEST_WAITS + helpers + GUEST_LOOP


# This driver's guest. One command is a 300-byte line typed at once: longer than the UART's
# 64-byte receive FIFO and than the 256 bytes Linux's 8250 driver reads per interrupt, it must
# still arrive whole.
GUEST = guest_script(GUEST_DISK + r"""dev() { echo "/sys/bus/pci/devices/0000:00:$1"; }
drv() { basename "$(readlink "$(dev "$1")/driver")"; }
bound() { waitfor "$(dev "$1")/driver" && drv "$1"; }
gone() { waitgone "$(dev "$1")" && lspci -nn; }
slots() { ls /sys/bus/pci/slots | sort -n | tr '\n' ' '; echo; }
hdbound() { bound 07.0 && waitfor /dev/vda && cat /sys/block/vda/size; }
settled() { bound 04.0 && bound 07.0 && waitfor /dev/vda; }
""")


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


class Failure(Exception):
    pass


class Vm:
    # Guest RAM in MiB.
    MEMORY_MIB = 256

    def __init__(self, args, vmm_args):
        self.args = args
        self.vmm_args = vmm_args
        self.lines = []  # guest console lines
        self.cond = asyncio.Condition()
        self.events = []
        self.step = "start"
        self.ntag = 0
        self.proc = None
        self.client = None

    async def start(self):
        a = self.args
        self.sock = os.path.join(a.workdir, "qmp.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = ["vmmwatch", "--qmp", self.sock, str(a.deadline), a.vmm, "run",
               "--kernel", a.kernel, "--initrd", a.initrd,
               "--append", "console=ttyS0 quiet panic=-1 reboot=t",
               "--memory", str(self.MEMORY_MIB),
               "--qmp", f"unix:{self.sock},server=on,wait=off"] + self.vmm_args
        emit({"host": "command", "argv": cmd})
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self.reader = asyncio.create_task(self.read_console())
        for _ in range(300):
            if os.path.exists(self.sock):
                break
            await asyncio.sleep(0.1)
        from qemu.qmp import EventListener, QMPClient
        self.client = QMPClient("hotplug-e2e")
        await asyncio.wait_for(self.client.connect(self.sock), 30)
        self.listener = EventListener()
        self.client.register_listener(self.listener)
        self.ev_task = asyncio.create_task(self.read_events())

    async def read_console(self):
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            sys.stderr.write("console| " + line + "\n")
            sys.stderr.flush()
            async with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        async with self.cond:
            self.lines.append(None)  # end of output
            self.cond.notify_all()

    async def read_events(self):
        while True:
            ev = await self.listener.get()
            e = {"event": ev["event"], "data": ev.get("data", {}), "step": self.step}
            emit(e)
            async with self.cond:
                self.events.append(e)
                self.cond.notify_all()

    async def wait_for(self, pred, what, timeout=180):
        """Waits until pred() is true (checked on each console line or event)."""
        async def waiter():
            async with self.cond:
                await self.cond.wait_for(pred)
        try:
            await asyncio.wait_for(waiter(), timeout)
        except asyncio.TimeoutError:
            raise Failure(f"timed out after {timeout}s waiting for {what} (step {self.step})")

    def console_has(self, text, start):
        return any(l is not None and text in l for l in self.lines[start:]) or \
            (self.lines and self.lines[-1] is None)

    async def wait_ready(self, nth):
        """Waits for the nth `=== CMDLOOP-READY ===` line (1-based) of this process."""
        def count():
            return sum(1 for l in self.lines if l is not None and "=== CMDLOOP-READY" in l)
        await self.wait_for(lambda: count() >= nth or (self.lines and self.lines[-1] is None),
                            f"guest command loop #{nth}")
        if count() < nth:
            raise Failure(f"the vmm ended before guest boot #{nth} was ready")

    async def send(self, line):
        """Types `line` on the guest console, at once (longer lines than the UART's 64-byte
        receive FIFO included: the vmm feeds the FIFO as the guest drains it)."""
        sys.stderr.write(f"send| {line[:100]}\n")
        sys.stderr.flush()
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def guest(self, name, cmd, timeout=180):
        self.ntag += 1
        tag = f"C{self.ntag}"
        start = len(self.lines)
        await self.send(f"{tag} {cmd}")
        end = f"=== {tag}-END rc="

        await self.wait_for(lambda: self.console_has(end, start), f"guest command {name}", timeout)
        out, inside, rc = [], False, None
        for l in self.lines[start:]:
            if l is None:
                break
            if f"=== {tag}-BEGIN ===" in l:
                inside = True
                continue
            if end in l:
                rc = int(l.split(end)[1].split()[0])
                break
            if inside:
                out.append(l)
        if rc is None:
            raise Failure(f"the vmm ended during guest command {name}")
        text = "\n".join(out)
        emit({"guest": name, "rc": rc, "out": text})
        return rc, text

    async def qmp(self, name, cmd, arguments=None, timeout=60):
        from qemu.qmp import ExecuteError
        line = {"qmp": name, "cmd": cmd}
        if arguments is not None:
            line["arguments"] = arguments
        try:
            line["return"] = await asyncio.wait_for(self.client.execute(cmd, arguments), timeout)
        except ExecuteError as e:
            err = e.error.error
            line["error"] = {"class": err.class_, "desc": err.desc}
        emit(line)
        return line

    def deleted(self, dev, since=0):
        return [e for e in self.events[since:]
                if e["event"] == "DEVICE_DELETED" and e["data"].get("device") == dev]

    async def wait_deleted(self, dev, since, timeout=120):
        await self.wait_for(lambda: self.deleted(dev, since), f"DEVICE_DELETED {dev}", timeout)

    async def wait_exit(self, timeout=120):
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise Failure(f"the vmm did not end within {timeout}s (step {self.step})")
        await self.reader
        emit({"exit": rc})
        return rc

    async def run(self, session, args):
        """Starts the vmm and runs `session(self, args)`. A failure is reported (`failure`, the
        step) and the vmm ended, so that the scenario goes on. Returns the exit status."""
        try:
            await self.start()
            await session(self, args)
        except Exception as e:
            emit({"failure": f"{type(e).__name__}: {e}", "step": self.step})
            await self.abort()
            return 1
        return 0

    async def abort(self):
        """After a failure: end the vmm (quit over QMP, else SIGTERM) so the scenario goes on."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            if self.client is not None:
                await asyncio.wait_for(self.client.execute("quit"), 10)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except asyncio.TimeoutError:
            self.proc.terminate()
            await self.proc.wait()
        emit({"exit": self.proc.returncode, "aborted": True})


def vmm_pid(vmm):
    """The pid of the `VMM run` process (a child of vmmwatch)."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0] == vmm.encode() and argv[1] == b"run":
            found.append(int(p))
    if len(found) != 1:
        raise Failure(f"expected one vmm process, found {found}")
    return found[0]


def resources(pid):
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def fd_kinds(pid):
    """How many of the process's fds point at each kind of file (for a leak report)."""
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[")[0] if target.startswith(("anon_inode:", "socket:", "pipe:")) \
            else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def abi_show(vm, name, rec):
    p = await asyncio.create_subprocess_exec(vm.args.vmm, "abi", "show", rec,
                                             stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.STDOUT)
    out, _ = await p.communicate()
    emit({"host": name, "rc": p.returncode, "out": out.decode("utf-8", "replace")})


def md5(b):
    return hashlib.md5(b).hexdigest()


def write_host_disk(path, offset, pattern):
    """A 16 MiB disk image at `path` with `pattern` (what the guest must read) at `offset`."""
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        f.seek(offset)
        f.write(pattern)
    emit({"host": "host-pattern", "md5": md5(pattern)})


def emit_guest_write(path, pattern):
    """What the guest's `hdwrite` left at byte 4096 of the image at `path`, against `pattern`."""
    with open(path, "rb") as f:
        f.seek(4096)
        host = f.read(len(pattern))
    emit({"host": "disk-after-guest-write", "md5": md5(host), "want": md5(pattern),
          "head": host[:32].decode("latin-1")})


async def session(vm, args):
    rec = os.path.join(args.workdir, "rec.json")
    disk = os.path.join(args.workdir, "hd1.img")
    vm.step = "boot1"
    await vm.wait_ready(1)
    await vm.guest("boot1-lspci-nn", "lspci -nn")
    await vm.guest("boot1-lspci-v-04", "lspci -v -s 04.0")
    await vm.guest("boot1-slots", "slots")
    await vm.guest("boot1-drv-04", "drv 04.0")
    # A line longer than the UART's 64-byte receive FIFO, typed at once, arrives whole.
    long = "x" * 300
    _, out = await vm.guest("long-console-line", f"echo {long}")
    if long not in out:
        raise Failure(f"a 300-byte console line did not arrive whole: {out!r}")

    # Hot-plug a virtio-blk at 07.0; the host wrote a pattern the guest must read.
    vm.step = "add-hd1"
    write_host_disk(disk, HOST_OFFSET, HOST_PATTERN)
    await vm.qmp("add-hd1", "device_add", {"driver": "virtio-blk-pci", "id": "hd1",
                                           "addr": "0x7", "file": disk})
    await vm.guest("hd1-bound", "hdbound")
    await vm.guest("hd1-lspci-nn", "lspci -nn")
    await vm.guest("hd1-lspci-v-07", "lspci -v -s 07.0")
    await vm.guest("hd1-read-host", "hdhost")
    await vm.guest("hd1-write", f"hdwrite {PATTERN_NAME}")
    emit_guest_write(disk, PATTERN)
    await abi_show(vm, "abi-after-add", rec)

    # Errors that need no guest.
    vm.step = "errors"
    await vm.qmp("add-fn1", "device_add", {"driver": "virtio-rng-pci", "id": "fn1",
                                           "addr": "0x9.0x1"})
    await vm.qmp("del-unknown", "device_del", {"id": "nosuch"})

    # Unplug the cold-plugged rng0 at 04.0. Paused, the guest cannot eject yet: the command
    # is answered, the device stays, its id and slot stay taken, no DEVICE_DELETED.
    vm.step = "del-rng0-paused"
    since = len(vm.events)
    await vm.qmp("stop", "stop")
    await vm.qmp("del-rng0", "device_del", {"id": "rng0"})
    await vm.qmp("del-rng0-again", "device_del", {"id": "rng0"})
    await vm.qmp("readd-rng0-same-id", "device_add", {"driver": "virtio-rng-pci", "id": "rng0",
                                                      "addr": "0x4"})
    await vm.qmp("readd-other-id-same-slot", "device_add",
                 {"driver": "virtio-rng-pci", "id": "rng0b", "addr": "0x4"})
    await vm.qmp("query-pci-paused", "query-pci")
    await asyncio.sleep(1)
    emit({"host": "deleted-while-paused", "events": vm.deleted("rng0", since)})
    vm.step = "del-rng0-cont"
    await vm.qmp("cont", "cont")
    await vm.wait_deleted("rng0", since)
    vm.step = "del-rng0-done"
    await vm.qmp("del-rng0-after-event", "device_del", {"id": "rng0"})
    await vm.guest("rng0-gone", "gone 04.0")
    await abi_show(vm, "abi-after-del", rec)
    vm.step = "readd-rng0"
    await vm.qmp("readd-rng0", "device_add", {"driver": "virtio-rng-pci", "id": "rng0",
                                              "addr": "0x4"})
    await vm.guest("rng0-back", "bound 04.0")

    # A removal while running, no pause: asked, ejected by the guest, gone.
    vm.step = "running-del"
    since = len(vm.events)
    await vm.qmp("add-tmp", "device_add", {"driver": "virtio-rng-pci", "id": "tmp",
                                           "addr": "0x9"})
    await vm.guest("tmp-bound", "bound 09.0")
    await vm.qmp("del-tmp", "device_del", {"id": "tmp"})
    await vm.wait_deleted("tmp", since)
    await vm.guest("tmp-gone", "gone 09.0")
    await abi_show(vm, "abi-before-reboot", rec)

    # Reboot in place: the guest's view must be the same (hot-plugged devices included).
    vm.step = "before-reboot"
    await vm.guest("boot1-lspci-vvv", "lspci -nn -vvv")
    since = len(vm.events)
    vm.step = "reboot"
    await vm.send("R reboot -f")
    await vm.wait_ready(2)
    vm.step = "boot2"
    await vm.guest("boot2-settled", "settled")
    await vm.guest("boot2-lspci-vvv", "lspci -nn -vvv")
    await vm.guest("boot2-read-pattern", "hdread")
    emit({"host": "reset-events", "events": [e for e in vm.events[since:] if e["event"] == "RESET"]})

    # A second reset, from QMP: the boot after it sees exactly what the boot before it saw.
    since = len(vm.events)
    vm.step = "system_reset"
    await vm.qmp("system-reset", "system_reset")
    await vm.wait_ready(3)
    vm.step = "boot3"
    await vm.guest("boot3-settled", "settled")
    await vm.guest("boot3-lspci-vvv", "lspci -nn -vvv")
    emit({"host": "reset-events-qmp",
          "events": [e for e in vm.events[since:] if e["event"] == "RESET"]})

    # Add/del cycles: the vmm's fds and threads come back to where they were.
    if args.cycles:
        vm.step = "cycles"
        pid = vm_pid = vmm_pid(args.vmm)
        before = resources(pid)
        kinds_before = fd_kinds(pid)
        for i in range(args.cycles):
            since = len(vm.events)
            r = await vm.qmp(f"cycle-add-{i}", "device_add",
                             {"driver": "virtio-rng-pci", "id": "cyc", "addr": "0x9"})
            if "return" not in r:
                raise Failure(f"cycle {i}: device_add failed: {r}")
            r = await vm.qmp(f"cycle-del-{i}", "device_del", {"id": "cyc"})
            if "return" not in r:
                raise Failure(f"cycle {i}: device_del failed: {r}")
            await vm.wait_deleted("cyc", since)
            if i == 0:
                first = resources(vm_pid)
                kinds_first = fd_kinds(vm_pid)
        # Device threads end after DEVICE_DELETED: wait (bounded) for them to be gone.
        after = resources(vm_pid)
        for _ in range(300):
            if after == first:
                break
            await asyncio.sleep(0.1)
            after = resources(vm_pid)
        emit({"host": "resources", "cycles": args.cycles, "before": list(before),
              "after_first": list(first), "after": list(after), "fd_kinds_before": kinds_before,
              "fd_kinds_after_first": kinds_first,
              "fd_kinds_after": fd_kinds(vm_pid)})
        await vm.guest("cycles-lspci", "lspci -n")
        await abi_show(vm, "abi-after-cycles", rec)

    vm.step = "poweroff"
    await vm.send("P poweroff -f")
    await vm.wait_exit()
    await abi_show(vm, "abi-final", rec)


async def oldrec(vm, args):
    vm.step = "oldrec"
    await vm.wait_ready(1)
    await vm.guest("old-lspci-v", "lspci -v")
    await vm.guest("old-slots", "ls /sys/bus/pci/slots | wc -l")
    await vm.qmp("old-add", "device_add", {"driver": "virtio-rng-pci", "id": "late",
                                           "addr": "0x9"})
    await vm.send("P poweroff -f")
    await vm.wait_exit()


def make_old_record(workdir):
    """rec.json without the machine's hot-plug field -> old.json (a record written before the
    property existed)."""
    with open(os.path.join(workdir, "rec.json")) as f:
        rec = json.load(f)
    machine = rec.get("machine", {})
    dropped = [k for k in list(machine) if "hotplug" in k.lower().replace("-", "").replace("_", "")]
    for k in dropped:
        del machine[k]
    with open(os.path.join(workdir, "old.json"), "w") as f:
        json.dump(rec, f, indent=2)
    emit({"host": "old-record", "dropped": dropped, "machine_keys": sorted(machine)})


async def main(args):
    disk = os.path.join(args.workdir, "hd1.img")
    if args.what == "session":
        rec = os.path.join(args.workdir, "rec.json")
        vmm_args = ["--compat", rec, "--device", "virtio-rng-pci,id=rng0,addr=04.0"]
        run = session
    else:
        make_old_record(args.workdir)
        rec = os.path.join(args.workdir, "old.json")
        vmm_args = ["--compat", rec, "--device", "virtio-rng-pci,id=rng0,addr=04.0",
                    "--device", f"virtio-blk-pci,id=hd1,addr=07.0,file={disk}"]
        run = oldrec
    return await Vm(args, vmm_args).run(run, args)


if __name__ == "__main__":
    if sys.argv[1:] == ["guest-script"]:
        sys.stdout.write(GUEST)
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["session", "oldrec"])
    p.add_argument("--vmm", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--deadline", type=int, default=900)
    p.add_argument("--cycles", type=int, default=0)
    sys.exit(asyncio.run(main(p.parse_args())))
