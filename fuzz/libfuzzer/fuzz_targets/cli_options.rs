//! libFuzzer entry for the `cli_options` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("cli_options", data));
