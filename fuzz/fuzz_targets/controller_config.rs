//! The controller config: any text gives a config or errors, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dicops_config::ControllerConfig::parse(std::path::Path::new("/fuzz/controller.yaml"), text);
    }
});
