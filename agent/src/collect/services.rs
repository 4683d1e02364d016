//! State of the systemd units named in the agent's config, asked from
//! `systemctl show` with a timeout (systemd can be slow to answer under
//! load; a report must not wait for it forever).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dicops_proto::ServiceState;

/// sd_booted(3): systemd runs this host when /run/systemd/system exists.
pub fn systemd_running() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

pub fn query(units: &[String], timeout: Duration) -> Vec<ServiceState> {
    if units.is_empty() {
        return Vec::new();
    }
    // Without systemd, asking systemctl only costs a process start each
    // collection to learn the same thing.
    let answer = if systemd_running() {
        run_systemctl(units, timeout)
    } else {
        Err("systemd is not running on this host (no /run/systemd/system)".to_string())
    };
    match answer {
        Ok(output) => parse(units, &output),
        Err(error) => units
            .iter()
            .map(|name| ServiceState {
                name: name.clone(),
                active_state: "unknown".into(),
                sub_state: String::new(),
                error: Some(error.clone()),
            })
            .collect(),
    }
}

fn run_systemctl(units: &[String], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new("systemctl")
        .args([
            "show",
            "--no-pager",
            "--property=Id,LoadState,ActiveState,SubState",
            "--",
        ])
        .args(units)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    let _ = stdout.read_to_string(&mut out);
                }
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                if !status.success() && out.trim().is_empty() {
                    return Err(format!("systemctl failed: {}", err.trim()));
                }
                return Ok(out);
            }
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("systemctl did not answer within {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for systemctl: {e}")),
        }
    }
}

/// `systemctl show` prints one block of `Key=Value` lines per unit, in the
/// order asked, separated by blank lines.
pub fn parse(units: &[String], output: &str) -> Vec<ServiceState> {
    let blocks: Vec<&str> = output.split("\n\n").filter(|b| !b.trim().is_empty()).collect();
    units
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let Some(block) = blocks.get(i) else {
                return ServiceState {
                    name: name.clone(),
                    active_state: "unknown".into(),
                    sub_state: String::new(),
                    error: Some("systemctl gave no answer for this unit".into()),
                };
            };
            let field = |key: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                    .unwrap_or("")
                    .to_string()
            };
            let load = field("LoadState");
            ServiceState {
                name: name.clone(),
                active_state: field("ActiveState"),
                sub_state: field("SubState"),
                error: (load == "not-found").then(|| format!("unit {name} is not installed")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocks_in_order() {
        let out = "Id=ssh.service\nLoadState=loaded\nActiveState=active\nSubState=running\n\n\
                   Id=nope.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n";
        let units = vec!["ssh".to_string(), "nope".to_string(), "third".to_string()];
        let states = parse(&units, out);
        assert!(states[0].is_up());
        assert_eq!(states[0].sub_state, "running");
        assert!(!states[1].is_up());
        assert_eq!(states[1].error.as_deref(), Some("unit nope is not installed"));
        assert_eq!(states[2].active_state, "unknown");
    }
}
