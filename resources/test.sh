#!/usr/bin/env bash
# resources/test.sh: runs every test. Installs what the tests need on a fresh Debian machine
# (as root: apt packages; guest images are built or fetched on first use and cached in
# ~/.cache/vmm-pci), checks formatting and lints, builds the release vmm and the probe guest,
# then runs the unit and integration tests of the whole workspace and a bounded libFuzzer run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v lspci >/dev/null || need+=(pciutils)
command -v gcc >/dev/null || need+=(gcc)
command -v g++ >/dev/null || need+=(g++) # libfuzzer-sys builds libFuzzer
command -v flock >/dev/null || need+=(util-linux)
command -v iasl >/dev/null || need+=(acpica-tools)
if [ ${#need[@]} -gt 0 ]; then
    echo "test.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
if [ ! -w /dev/kvm ]; then
    echo "test.sh: /dev/kvm is missing or not writable: the probe-guest tests need it" >&2
    exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --release -p vmm
bash resources/guest/build.sh target/guest
# Every vmm hang on the test ground is reported here, pass or fail (a hung guest boot is run
# once more; see tests/src/ground.rs, resources/linux/vmmwatch).
HANGS=target/test-ground-hangs.log
rm -f "$HANGS"
report_hangs() {
    if [ -s "$HANGS" ]; then
        echo "test.sh: WARNING: vmm runs hung (a retried boot may have passed); their reports:" >&2
        cat "$HANGS" >&2
    fi
}
trap report_hangs EXIT
LOG=target/test-output.log
cargo test --workspace 2>&1 | tee "$LOG"
# Coverage-guided fuzzing (libFuzzer via cargo-fuzz, installed when missing): every target for
# a bounded time (FUZZ_SEED fixes the seed), a coverage line per target; fails on a crash.
bash fuzz/libfuzzer/run.sh
# One closing line for the whole run: every cargo test binary's passed and failed counts.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"
