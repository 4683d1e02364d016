//! systemd's own checks of unit files: `systemd-analyze verify` and
//! `security --offline=yes`. PID 1 need not be systemd.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `systemd-analyze ARGS` in `dir`; panics naming the package when it
/// is not installed.
pub fn systemd_analyze(dir: &Path, args: &[&str]) -> Output {
    match Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "")
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed: these tests check the systemd units with it. \
             Install systemd (Debian: apt-get install systemd); PID 1 need not be systemd"
        ),
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

/// `systemd-analyze verify`: exit 0 and not one line about our files.
pub fn verify(unit: &str, dir: &Path, path: &Path) {
    let out = systemd_analyze(dir, &["verify", path.to_str().expect("utf8 path")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(unit) || l.contains(dir.to_str().expect("utf8")))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} failed or warned ({}):\n{text}",
        unit,
        out.status
    );
    if !text.trim().is_empty() {
        // About other units of this machine, not ours: shown, not failed.
        eprintln!("systemd-analyze verify {}, about other units:\n{text}", unit);
    }
}

/// The overall exposure of `systemd-analyze security --offline=yes`.
pub fn exposure(unit: &str, dir: &Path, path: &Path) -> f64 {
    let out = systemd_analyze(dir, &["security", "--offline=yes", path.to_str().expect("utf8 path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security {} failed ({}):\n{stdout}{}",
        unit,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "→ Overall exposure level for dicops-agent.service: 1.4 OK 🙂"
    let prefix = format!("Overall exposure level for {}:", unit);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(prefix.as_str()).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"));
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"))
}
