//! The `dicops-agent` daemon; everything lives in the library.

fn main() -> std::process::ExitCode {
    dicops_agent::main_entry()
}
