//! libFuzzer entry for the `device_option` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("device_option", data));
