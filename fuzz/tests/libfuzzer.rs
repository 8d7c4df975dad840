//! The cargo-fuzz crate `fuzz/libfuzzer/` stays in step with `fuzz::TARGETS`: one entry per
//! target that calls that target, a `[[bin]]` for it, no entry without a target, and each
//! target's dictionary as generated (`cargo run -p fuzz -- libfuzzer-dicts` rewrites them).
//! CI builds and runs those entries (`fuzz/libfuzzer/run.sh`); this test needs no nightly.

use std::collections::BTreeSet;

#[test]
fn every_target_has_a_libfuzzer_entry_and_dictionary() {
    let dir = fuzz::libfuzzer_dir();
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
    let mut problems = Vec::new();
    for t in fuzz::TARGETS {
        let entry = dir.join("fuzz_targets").join(format!("{}.rs", t.name));
        match std::fs::read_to_string(&entry) {
            Ok(src) if src.contains(&format!("fuzz_libfuzzer::run(\"{}\", data)", t.name)) => {}
            Ok(_) => problems.push(format!("{} does not run {}", entry.display(), t.name)),
            Err(e) => problems.push(format!("{}: {e}", entry.display())),
        }
        let bin = format!(
            "[[bin]]\nname = \"{0}\"\npath = \"fuzz_targets/{0}.rs\"\n",
            t.name
        );
        if !manifest.contains(&bin) {
            problems.push(format!(
                "no [[bin]] {} in fuzz/libfuzzer/Cargo.toml",
                t.name
            ));
        }
        let path = fuzz::libfuzzer_dict_path(t.name);
        let have = std::fs::read_to_string(&path).ok();
        if have != fuzz::libfuzzer_dict(t) {
            problems.push(format!(
                "{} is stale (cargo run -p fuzz -- libfuzzer-dicts)",
                path.display()
            ));
        }
    }
    let names: BTreeSet<&str> = fuzz::TARGETS.iter().map(|t| t.name).collect();
    for sub in ["fuzz_targets", "dicts"] {
        for e in std::fs::read_dir(dir.join(sub)).expect(sub).flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let stem = file.split('.').next().unwrap_or_default();
            if !names.contains(stem) {
                problems.push(format!("{sub}/{file}: no such target in fuzz::TARGETS"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
