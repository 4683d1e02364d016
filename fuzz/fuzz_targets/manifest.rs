//! A source's manifest, parsed and checked before anything is written.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dicops_agent::fuzzing::manifest(data);
});
