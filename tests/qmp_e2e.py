#!/usr/bin/env python3
"""End-to-end QMP check with the `qemu.qmp` library (the client QEMU's own tests use).

    qmp_e2e.py SOCKET [--driver virtio-rng-pci] [--id rng9] [--addr 06.0]
               [--no-cont] [--hmp "info pci"]... [--timeout 10]

Connects to SOCKET, negotiates, then runs query-status, device_add (DRIVER, ID, ADDR),
query-pci, each --hmp command line through human-monitor-command, and cont (waiting for
RESUME). Prints one JSON object per line:

    {"greeting": {...}}
    {"cmd": "query-status", "return": {...}}
    {"cmd": "device_add", "arguments": {...}, "error": {"class": ..., "desc": ...}}
    {"event": "RESUME", "data": ..., "timestamp": {...}}

Exit status: 0 when every step got an answer (errors from the VM are printed, not fatal),
1 when the connection or the protocol failed. Installs `qemu.qmp` with pip if missing.
"""

import argparse
import asyncio
import json
import subprocess
import sys


def import_qmp():
    try:
        from qemu.qmp import QMPClient  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "qemu.qmp"],
            check=True,
        )
    from qemu.qmp import EventListener, ExecuteError, QMPClient

    return EventListener, ExecuteError, QMPClient


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


async def main(args):
    EventListener, ExecuteError, QMPClient = import_qmp()
    client = QMPClient("qmp-e2e")
    await asyncio.wait_for(client.connect(args.socket), args.timeout)
    emit({"greeting": client.greeting._asdict()})

    async def run(cmd, arguments=None):
        line = {"cmd": cmd}
        if arguments is not None:
            line["arguments"] = arguments
        try:
            ret = await asyncio.wait_for(client.execute(cmd, arguments), args.timeout)
            line["return"] = ret
        except ExecuteError as e:
            err = e.error.error
            line["error"] = {"class": err.class_, "desc": err.desc}
        emit(line)
        return line

    await run("query-status")
    dev = {"driver": args.driver}
    if args.id:
        dev["id"] = args.id
    if args.addr:
        dev["addr"] = args.addr
    await run("device_add", dev)
    await run("query-pci")
    for hmp in args.hmp:
        await run("human-monitor-command", {"command-line": hmp})
    if not args.no_cont:
        listener = EventListener(("RESUME",))
        client.register_listener(listener)
        try:
            r = await run("cont")
            if "return" in r:
                ev = await asyncio.wait_for(listener.get(), args.timeout)
                emit(dict(ev))
        finally:
            client.remove_listener(listener)
        await run("query-status")
    await client.disconnect()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("socket")
    p.add_argument("--driver", default="virtio-rng-pci")
    p.add_argument("--id", default="rng9")
    p.add_argument("--addr", default=None)
    p.add_argument("--no-cont", action="store_true")
    p.add_argument("--hmp", action="append", default=[])
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    try:
        asyncio.run(main(a))
    except Exception as e:  # connection refused, timeout, protocol error
        emit({"failure": f"{type(e).__name__}: {e}"})
        sys.exit(1)
