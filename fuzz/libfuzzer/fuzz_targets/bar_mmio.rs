//! libFuzzer entry for the `bar_mmio` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("bar_mmio", data));
