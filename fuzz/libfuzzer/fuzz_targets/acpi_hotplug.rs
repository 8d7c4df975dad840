//! libFuzzer entry for the `acpi_hotplug` target of the `fuzz` crate (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_libfuzzer::run("acpi_hotplug", data));
