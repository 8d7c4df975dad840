#!/usr/bin/env bash
# build-python-part.sh: pack Python with the `qemu.qmp` library for L1, so a host scenario can
# drive the vmm with QEMU's own QMP client. Writes $CACHE/l1-python.cpio.gz (for L1_EXTRA_CPIO)
# and prints its path. In L1: /usr/bin/python3 (Debian's python3.11, its standard library
# without tests, IDLE, Tk and build files, and the libraries of its extension modules),
# qemu.qmp in /usr/lib/python3/dist-packages, and tests/qmp_e2e.py as /usr/bin/qmp_e2e.
#
# Needs Debian's /usr/bin/python3.11 (installed when missing, as root) and qemu.qmp importable
# by `python3` (resources/test.sh installs it with pip).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$CACHE"
[ -x "$BUSYBOX" ] || "$LINUX_DIR/fetch.sh" >&2   # mkcpio packs with the fetched busybox
PY=/usr/bin/python3.11
if [ ! -x "$PY" ]; then
    echo "build-python-part: installing python3.11 (Debian's, to pack for L1)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-minimal libpython3.11-stdlib >&2
fi
QMP=$(python3 -c 'import os, qemu.qmp; print(os.path.dirname(os.path.dirname(qemu.qmp.__file__)))') \
    || { echo "build-python-part: python3 cannot import qemu.qmp (pip install qemu.qmp)" >&2; exit 1; }
E2E=$REPO_ROOT/tests/qmp_e2e.py
OUT=$CACHE/l1-python.cpio.gz
if ! up_to_date "$OUT" "$PY" "$QMP/qmp/__init__.py" "$E2E" "$0" "$LINUX_DIR/lib.sh"; then
    echo "packing $PY and qemu.qmp ($QMP) for L1" >&2
    D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
    copy_with_libs "$PY" "$D" usr/bin/python3.11
    ln -s python3.11 "$D/usr/bin/python3"
    STD=/usr/lib/python3.11
    mkdir -p "$D$STD"
    (cd "$STD" && tar -c --exclude=./test --exclude=./idlelib --exclude=./tkinter \
        --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 --exclude=./pydoc_data \
        --exclude='./config-3.11-*' --exclude=./site-packages --exclude=./dist-packages \
        --exclude='*.opt-1.pyc' --exclude='*.opt-2.pyc' .) | tar -x -C "$D$STD"
    # Extension modules nothing here uses and whose libraries are large (databases, Kerberos
    # through nis, readline, curses, compression, ctypes), and the CPython test modules.
    for m in _sqlite3 _dbm _gdbm readline _curses _curses_panel _ctypes _ctypes_test nis _crypt \
             _lzma _bz2 _decimal _uuid _test'*' xx'*' _xx'*'; do
        rm -f "$D$STD"/lib-dynload/$m.cpython-*.so
    done
    for so in "$D$STD"/lib-dynload/*.so; do
        # The libraries each extension module needs (the module itself is already there).
        copy_with_libs "$so" "$D" "tmp/so"
    done
    rm -rf "$D/tmp/so"
    mkdir -p "$D/usr/lib/python3/dist-packages"
    cp -r "$QMP" "$D/usr/lib/python3/dist-packages/qemu"
    find "$D/usr/lib/python3/dist-packages" -name __pycache__ -prune -exec rm -rf {} +
    install -D -m 755 "$E2E" "$D/usr/bin/qmp_e2e"
    mkcpio "$D" "$OUT"
fi
echo "$OUT"
