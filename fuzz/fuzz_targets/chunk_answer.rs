//! A source's chunk frames, as the destination reads them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dicops_agent::fuzzing::chunk_answer(data);
});
