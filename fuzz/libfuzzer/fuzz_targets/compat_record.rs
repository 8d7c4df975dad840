//! libFuzzer entry for the `compat_record` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("compat_record", data));
