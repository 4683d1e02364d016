//! The `dicops-controller` daemon; everything lives in the library.

fn main() -> std::process::ExitCode {
    dicops_controller::main_entry()
}
