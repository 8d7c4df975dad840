#!/usr/bin/env bash
# fuzz/libfuzzer/run.sh [TARGET...]: coverage-guided fuzzing with libFuzzer (cargo-fuzz), each
# target for a bounded time, then a one-line summary per target (libFuzzer's final `cov:`
# edges, `ft:` features, corpus size, inputs run). Fails on any crash, leak, timeout or
# out-of-memory, naming the saved input.
#
# - Installs cargo-fuzz when it is missing (`cargo install`, pinned; skipped when present).
# - Builds on the stable toolchain with `RUSTC_BOOTSTRAP=1` (cargo-fuzz passes nightly-only
#   flags: -Zsanitizer=address, sanitizer coverage), into target/libfuzzer/.
# - Seeds: fuzz/corpus/TARGET/ (read-only); new inputs go to target/libfuzzer/corpus/TARGET/,
#   emptied first so that a run depends only on the seed. Dictionaries: fuzz/libfuzzer/dicts/.
# - A failing input is saved as fuzz/artifacts/TARGET/crash-* (or leak-, timeout-, oom-); once
#   fixed, copy it into fuzz/corpus/TARGET/ so `cargo test -p fuzz` replays it from then on.
#
# Environment: LIBFUZZER_SECONDS (per target, default 12), FUZZ_SEED (decimal or 0x hex; CI
# fixes it; default: a new seed per run), LIBFUZZER_ARGS (more libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET="${LIBFUZZER_SECONDS:-12}"
OUT=target/libfuzzer
BIN="$OUT/x86_64-unknown-linux-gnu/release"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "libfuzzer: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi
command -v c++ >/dev/null || {
    echo "libfuzzer: no C++ compiler (libfuzzer-sys builds libFuzzer): apt-get install g++" >&2
    exit 1
}

if [ -n "${FUZZ_SEED:-}" ]; then
    seed=$((FUZZ_SEED & 0x7fffffff))
else
    seed=$(( (RANDOM << 16 | RANDOM) & 0x7fffffff ))
fi
[ "$seed" -ne 0 ] || seed=1 # libFuzzer takes 0 as "pick one"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/libfuzzer/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

start=$SECONDS
RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir fuzz/libfuzzer --target-dir "$OUT"
build_time=$((SECONDS - start))

mkdir -p "$OUT/logs"
summary="$OUT/summary.txt"
: >"$summary"
failed=()
start=$SECONDS
for t in "${targets[@]}"; do
    corpus="$OUT/corpus/$t"
    rm -rf "$corpus"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    args=(-seed="$seed" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=3072
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/")
    [ -f "fuzz/libfuzzer/dicts/$t.dict" ] && args+=(-dict="fuzz/libfuzzer/dicts/$t.dict")
    # shellcheck disable=SC2206 # LIBFUZZER_ARGS is a list of flags
    args+=(${LIBFUZZER_ARGS:-})
    log="$OUT/logs/$t.log"
    rc=0
    "$BIN/$t" "${args[@]}" "$corpus" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        verdict=ok
    else
        verdict="FAILED (exit $rc)"
        failed+=("$t")
        echo "libfuzzer: $t FAILED; the end of $log:" >&2
        tail -n 40 "$log" >&2
    fi
    printf '%-14s cov: %5s  ft: %6s  corpus: %4s  inputs: %8s  %s\n' \
        "$t" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${runs:-?}" "$verdict" | tee -a "$summary"
done

echo "libfuzzer: seed $seed, ${SECONDS_PER_TARGET} s per target; build ${build_time} s, runs $((SECONDS - start)) s; summary:"
cat "$summary"
if [ ${#failed[@]} -gt 0 ]; then
    echo "libfuzzer: FAILED: ${failed[*]} (inputs in fuzz/artifacts/; replay one with" \
        "cargo run -p fuzz -- --replay TARGET FILE)" >&2
    exit 1
fi
