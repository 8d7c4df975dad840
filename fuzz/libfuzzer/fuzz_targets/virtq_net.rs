//! libFuzzer entry for the `virtq_net` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("virtq_net", data));
