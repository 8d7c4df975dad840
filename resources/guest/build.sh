#!/bin/sh
# Build the probe test guest: resources/guest/build.sh [OUTDIR]  (default target/guest)
# Needs only gcc and binutils (no multilib: -m32 -ffreestanding -nostdlib, no libgcc).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
CC=${CC:-gcc}
LD=${LD:-ld}
OBJCOPY=${OBJCOPY:-objcopy}
CFLAGS="-m32 -march=i686 -ffreestanding -fno-pic -fno-pie -nostdlib -mgeneral-regs-only \
 -O2 -fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin -fcf-protection=none \
 -Wall -Wextra -Werror"

$CC $CFLAGS -c "$here/start.S" -o "$out/start.o"
$CC $CFLAGS -c "$here/probe.c" -o "$out/probe.o"
$LD -m elf_i386 -nostdlib --no-dynamic-linker -z noexecstack --no-warn-rwx-segments -T "$here/probe.ld" \
    "$out/start.o" "$out/probe.o" -o "$out/probe32.elf"
# linux-loader only reads ELF64 headers; the code stays 32-bit (PVH entry).
$OBJCOPY -O elf64-x86-64 "$out/probe32.elf" "$out/probe.elf"

# This machine's KVM (PVM) emulates all CPL0 code and cannot do int3/int n,
# SSE/XMM, XSAVE or cmpxchg16b: refuse to produce an image that contains them.
if objdump -d -M i386 "$out/probe32.elf" | grep -E '\<(int3|int |xmm|ymm|xsave|xrstor|cmpxchg16b|fxsave|fxrstor)' ; then
    echo "build.sh: forbidden instruction in probe image" >&2
    exit 1
fi
echo "$out/probe.elf"
