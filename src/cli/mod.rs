pub mod api;
pub mod check_config;
pub mod check_link;
pub mod demo;
pub mod jobs;
pub mod pki;
pub mod status;

use std::future::Future;
use std::process::ExitCode;

pub fn block_on<F: Future<Output = anyhow::Result<ExitCode>>>(future: F) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(future)
}

/// `3m12s ago`-style ages for humans.
pub fn human_age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(human_age(3.2), "3s");
        assert_eq!(human_age(130.0), "2m10s");
        assert_eq!(human_age(7260.0), "2h01m");
        assert_eq!(human_age(90000.0), "1d01h");
        assert_eq!(human_age(-5.0), "0s");
    }
}
