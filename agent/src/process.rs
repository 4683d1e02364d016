//! Running one allowlisted command: no shell, a minimal environment, the
//! configured user, its own process group (a timeout, a cancel or a
//! leftover child is dealt with by killing the whole group), and a bounded
//! tail of its output however much it writes.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicops_config::{CommandConfig, RunAs};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// The end of a command's output kept in the run record.
pub const OUTPUT_TAIL_BYTES: usize = 8 * 1024;

/// How long the output pipes may stay open after the command exited and
/// its group was killed (a process that escaped the group with setsid).
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// How a command ended.
#[derive(Debug, Default)]
pub struct Finished {
    /// Set when the command ran to its end and exited 0.
    pub succeeded: bool,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output_tail: String,
}

/// The last line the command wrote, for progress.
pub type LastLine = Arc<Mutex<String>>;

pub fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) on the process group we created for this command
    // (process_group(0) makes the child its leader).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// True while any process of the group is alive (zombies aside).
fn group_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-pid, 0) == 0 }
}

/// The supplementary groups of `user`, looked up before the fork: after
/// it, only async-signal-safe calls are allowed.
fn groups_of(user: &RunAs) -> Result<Vec<libc::gid_t>, String> {
    let name = std::ffi::CString::new(user.name.as_str()).map_err(|_| "user name contains a NUL byte".to_string())?;
    let mut count: libc::c_int = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; count.max(1) as usize];
        let mut n = count;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most
        // that many and sets `n` to the number needed.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), user.gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return Ok(groups);
        }
        if n <= count || n > 65536 {
            return Err(format!("cannot list the groups of user {:?}", user.name));
        }
        count = n;
    }
}

/// Keeps the last `OUTPUT_TAIL_BYTES` of a stream, and its last line.
async fn tail<R: tokio::io::AsyncRead + Unpin>(mut reader: R, last_line: LastLine) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_TAIL_BYTES {
                    kept.drain(..kept.len() - OUTPUT_TAIL_BYTES);
                }
                let text = String::from_utf8_lossy(&kept);
                if let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) {
                    let line: String = line.chars().take(200).collect();
                    *last_line.lock().unwrap_or_else(|p| p.into_inner()) = line;
                }
            }
        }
    }
}

/// The environment of a command: a minimal, predictable one (a backup
/// must not depend on how the agent was started), the DICOPS_* variables,
/// then what the command's config adds.
pub fn environment(command: &CommandConfig, dicops: &[(&str, String)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    match &command.user {
        Some(user) => {
            env.insert("HOME".to_string(), user.home.display().to_string());
            env.insert("USER".to_string(), user.name.clone());
            env.insert("LOGNAME".to_string(), user.name.clone());
        }
        None => {
            for key in ["HOME", "USER", "LOGNAME"] {
                if let Ok(value) = std::env::var(key) {
                    env.insert(key.to_string(), value);
                }
            }
        }
    }
    for (key, value) in dicops {
        env.insert((*key).to_string(), value.clone());
    }
    for (key, value) in &command.env {
        env.insert(key.clone(), value.clone());
    }
    env
}

/// Runs `command` for at most `limit`. `started` gets the pid (the group
/// id) as soon as it exists, so a restarted agent can stop a command its
/// predecessor left behind.
pub async fn run(
    command: &CommandConfig,
    env: &BTreeMap<String, String>,
    limit: Duration,
    cancel: CancellationToken,
    last_line: LastLine,
    started: impl FnOnce(u32),
) -> Finished {
    let mut finished = Finished::default();
    let program = &command.argv[0];
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&command.argv[1..])
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let working_dir = command.working_dir.as_ref().or(command.output.as_ref().map(|o| &o.dir));
    if let Some(dir) = working_dir {
        cmd.current_dir(dir);
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if let Some(user) = command.user.as_ref().filter(|u| u.uid != euid) {
        let groups = match groups_of(user) {
            Ok(groups) => groups,
            Err(e) => {
                finished.error = Some(e);
                return finished;
            }
        };
        let (uid, gid) = (user.uid, user.gid);
        // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid)
        // between fork and exec, on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // An agent given capabilities as ambient ones (a systemd drop-in for
    // `user:` commands) would pass them on through exec, with or without a
    // user switch: the command could make itself root. Runs after the
    // switch above.
    // SAFETY: prctl is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            // EINVAL: a kernel without ambient capabilities.
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let who = command
                .user
                .as_ref()
                .map(|u| format!(" as user {}", u.name))
                .unwrap_or_default();
            finished.error = Some(match e.kind() {
                std::io::ErrorKind::NotFound => format!("cannot start {program}{who}: no such program"),
                std::io::ErrorKind::PermissionDenied if command.user.is_some() => format!(
                    "cannot start {program}{who}: permission denied (the agent needs to run as root, or with CAP_SETUID and CAP_SETGID, to switch users; and the program must be executable by that user)"
                ),
                _ => format!("cannot start {program}{who}: {e}"),
            });
            return finished;
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        started(pid);
    }
    let stdout = child.stdout.take().map(|s| tokio::spawn(tail(s, last_line.clone())));
    let stderr = child.stderr.take().map(|s| tokio::spawn(tail(s, last_line.clone())));
    let status = tokio::select! {
        status = child.wait() => Some(status),
        _ = tokio::time::sleep(limit) => {
            finished.error = Some(format!("the command ran longer than its timeout of {} s and was killed with its process group", limit.as_secs()));
            None
        }
        _ = cancel.cancelled() => {
            finished.error = Some("the run was cancelled (the controller's max_runtime passed, or the agent is stopping); the command was killed".into());
            None
        }
    };
    let mut left_behind = false;
    if let Some(pid) = pid {
        // Whatever the command started and left running (a background
        // child still writing the backup, say) goes with it.
        left_behind = status.is_some() && group_alive(pid);
        kill_group(pid);
    }
    if status.is_none() {
        let _ = child.wait().await;
    }
    let mut output = Vec::new();
    for handle in [stdout, stderr].into_iter().flatten() {
        let abort = handle.abort_handle();
        match tokio::time::timeout(PIPE_GRACE, handle).await {
            Ok(Ok(bytes)) => output.extend_from_slice(&bytes),
            Ok(Err(_)) => {}
            Err(_) => {
                abort.abort();
                tracing::warn!(%program, "a process outside the command's group still holds its output open; output tail cut");
            }
        }
    }
    let start = output.len().saturating_sub(OUTPUT_TAIL_BYTES);
    finished.output_tail = String::from_utf8_lossy(&output[start..]).into_owned();
    let Some(status) = status else {
        return finished;
    };
    match status {
        Ok(status) if status.success() && left_behind => {
            finished.exit_code = Some(0);
            finished.error = Some(format!(
                "{program} exited 0 but left processes running in its process group; they were killed, and what they were writing may be incomplete"
            ));
        }
        Ok(status) if status.success() => {
            finished.succeeded = true;
            finished.exit_code = Some(0);
        }
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            finished.exit_code = status.code();
            finished.error = Some(match (status.code(), status.signal()) {
                (Some(code), _) => format!("{program} exited with status {code}"),
                (None, Some(signal)) => format!("{program} was killed by signal {signal}"),
                _ => format!("{program} failed"),
            });
        }
        Err(e) => finished.error = Some(format!("cannot wait for {program}: {e}")),
    }
    finished
}
