#!/usr/bin/env bash
# build-usock.sh: build the static unix-socket test client (usock.c) into $CACHE/usock and pack
# it as $CACHE/l1-usock.cpio.gz (/usr/bin/usock) for L1_EXTRA_CPIO. Prints the cpio's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$CACHE"
[ -x "$BUSYBOX" ] || "$LINUX_DIR/fetch.sh" >&2   # mkcpio packs with the fetched busybox
BIN=$CACHE/usock OUT=$CACHE/l1-usock.cpio.gz
if ! up_to_date "$BIN" "$LINUX_DIR/usock.c" "$0"; then
    gcc -static -O2 -Wall -Wextra -Werror -o "$BIN.tmp" "$LINUX_DIR/usock.c"
    mv "$BIN.tmp" "$BIN"
fi
if ! up_to_date "$OUT" "$BIN"; then
    D=$(mktemp -d); trap 'rm -rf "$D"' EXIT
    install -D -m 755 "$BIN" "$D/usr/bin/usock"
    mkcpio "$D" "$OUT"
fi
echo "$OUT"
