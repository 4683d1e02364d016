//! The JSON bodies an agent sends the controller (report, task result,
//! progress): decoded or refused, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<dicops_proto::Report>(data);
    let _ = serde_json::from_slice::<dicops_proto::TaskResult>(data);
    let _ = serde_json::from_slice::<dicops_proto::RunProgress>(data);
});
