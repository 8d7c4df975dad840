//! Replays every saved corpus input of every target (`fuzz/corpus/<target>/`).

#[test]
fn every_corpus_input_passes() {
    let mut failures = Vec::new();
    let mut total = 0;
    for t in fuzz::TARGETS {
        let corpus = fuzz::load_corpus(t.name);
        assert!(
            !corpus.is_empty(),
            "{}: no corpus in {}",
            t.name,
            fuzz::corpus_dir(t.name).display()
        );
        for (path, data) in corpus {
            total += 1;
            if let Err(e) = fuzz::run_one(t, &data) {
                failures.push(format!("{}: {e}", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "corpus failures:\n{}",
        failures.join("\n")
    );
    eprintln!("{total} corpus inputs passed");
}
