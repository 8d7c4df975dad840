#!/bin/sh
# Cut one dump out of a probe serial log, ready for `lspci -F`:
#   resources/guest/extract-dump.sh cf8|ecam [LOG] > FILE && lspci -F FILE -nn -vvv
# (The two dumps list the same devices; fed together lspci shows each twice.)
set -eu
case "${1:-}" in
    cf8) m=CF8 ;;
    ecam) m=ECAM ;;
    *) echo "usage: $0 cf8|ecam [LOG]" >&2; exit 2 ;;
esac
shift
tr -d '\r' < "${1:-/dev/stdin}" | sed -n "/=== PROBE-$m-BEGIN ===/,/=== PROBE-$m-END ===/p"
