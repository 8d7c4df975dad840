//! A bounded mutation-fuzz loop over every target: `FUZZ_ITERATIONS` inputs per target
//! (default: each target's CI budget, all together well under a minute), seeded from the
//! clock unless `FUZZ_SEED` is set. A failing input is saved under `fuzz/artifacts/` and the
//! test fails with its path and the seed.

#[test]
fn fuzz_every_target_briefly() {
    let seed = fuzz::seed_from_env();
    eprintln!("fuzz seed {seed:#x} (set FUZZ_SEED={seed:#x} to repeat this run)");
    let mut failures = Vec::new();
    for t in fuzz::TARGETS {
        let n = fuzz::iterations_for(t);
        match fuzz::fuzz(t, n, seed) {
            Ok(s) => eprintln!(
                "{:14} {:>7} inputs in {:5.2} s",
                t.name,
                s.iterations,
                s.elapsed.as_secs_f64()
            ),
            Err(f) => failures.push(format!(
                "{}: {}\n  input saved as {} (FUZZ_SEED={:#x}; replay: cargo run -p fuzz -- --replay {} {})",
                t.name,
                f.message,
                f.artifact.display(),
                f.seed,
                t.name,
                f.artifact.display()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "fuzzing found:\n{}",
        failures.join("\n")
    );
}
