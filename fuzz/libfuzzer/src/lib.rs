//! Shared by the libFuzzer entries in `fuzz_targets/`: each calls [`run`] with its name, which
//! runs the `fuzz` crate's target of that name. A panic on any thread (device workers
//! included) aborts the process, which libFuzzer reports as a crash with the input.

/// Runs the target `name` of [`fuzz::TARGETS`] on `data`.
pub fn run(name: &str, data: &[u8]) {
    let t = fuzz::target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    (t.run)(data)
}
