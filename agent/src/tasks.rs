//! Tasks from the controller: long-polled over the agent's own connection
//! (the controller never dials agents), run only if the agent's own config
//! allows them, and their results delivered at least once from the spool.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicops_config::CommandConfig;
use dicops_core::backoff::Backoff;
use dicops_net::{FailureClass, HttpsClient};
use dicops_proto::{ApiError, ResultAck, Task, TaskKind, TaskOutcome, TaskPoll, TaskResult};
use hyper::Method;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::report::{now_unix, Jitter};
use crate::spool::Spool;

/// The end of a command's output kept in the run record.
const OUTPUT_TAIL_BYTES: usize = 8 * 1024;

pub struct Tasks {
    pub config_file: String,
    pub commands: BTreeMap<String, CommandConfig>,
    pub spool: Arc<Spool>,
    /// Results waiting to be sent.
    pub results_ready: Arc<Notify>,
    pub running: Mutex<HashMap<i64, CancellationToken>>,
}

impl Tasks {
    /// Long-polls for tasks and starts them.
    pub async fn poll_loop(self: Arc<Self>, mut client: HttpsClient, shutdown: CancellationToken) {
        client.request_timeout = Duration::from_secs(45);
        let backoff = Backoff {
            max: Duration::from_secs(30),
            ..Backoff::default()
        };
        let mut attempt = 0u32;
        let mut jitter = Jitter::new();
        loop {
            // Tell the controller what we hold, so it can fail runs that
            // were lost on their way to us.
            let held: Vec<String> = self.spool.held().iter().map(|id| id.to_string()).collect();
            let path = if held.len() <= 1000 {
                format!("{}?wait=25&held={}", dicops_proto::TASKS_PATH, held.join(","))
            } else {
                // Too many for a URL: skip reconciling rather than fail runs.
                format!("{}?wait=25", dicops_proto::TASKS_PATH)
            };
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return,
                answer = client.request(Method::GET, &path, None) => answer,
            };
            let poll = match answer {
                Ok((status, body)) if status.is_success() => {
                    serde_json::from_slice::<TaskPoll>(&body).map_err(|e| e.to_string())
                }
                Ok((status, body)) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
                Err(e) => Err(e.to_string()),
            };
            match poll {
                Ok(poll) => {
                    attempt = 0;
                    for run_id in poll.cancel {
                        let token = self
                            .running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&run_id)
                            .cloned();
                        if let Some(token) = token {
                            tracing::warn!(
                                run = run_id,
                                "the controller gave up on this run (max runtime); stopping it"
                            );
                            token.cancel();
                        }
                    }
                    for task in poll.tasks {
                        self.clone().start(task, shutdown.clone());
                    }
                }
                Err(error) => {
                    let delay = backoff.delay(attempt, jitter.unit());
                    attempt = attempt.saturating_add(1);
                    tracing::debug!(%error, retry_in_ms = delay.as_millis() as u64, "task poll failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn start(self: Arc<Self>, task: Task, shutdown: CancellationToken) {
        if self.spool.is_known(task.run_id) {
            tracing::info!(run = task.run_id, "task already accepted; ignoring the duplicate");
            return;
        }
        if let Err(e) = self.spool.accept(&task) {
            // Not durable, so not accepted: the controller will time it out.
            tracing::error!(run = task.run_id, error = %e, "cannot write the task to the spool; not running it");
            return;
        }
        let cancel = shutdown.child_token();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task.run_id, cancel.clone());
        tokio::spawn(async move {
            let result = self.execute(&task, cancel.clone()).await;
            if cancel.is_cancelled() && shutdown.is_cancelled() {
                // The agent is stopping: leave the task accepted, the next
                // start reports it interrupted.
                return;
            }
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&task.run_id);
            match self.spool.complete(&result) {
                Ok(()) => self.results_ready.notify_one(),
                Err(e) => {
                    tracing::error!(run = task.run_id, error = %e, "cannot write the result to the spool")
                }
            }
        });
    }

    async fn execute(&self, task: &Task, cancel: CancellationToken) -> TaskResult {
        let started_at = now_unix();
        let mut result = TaskResult {
            run_id: task.run_id,
            job: task.job.clone(),
            outcome: TaskOutcome::Failed,
            error: None,
            exit_code: None,
            started_at,
            finished_at: started_at,
            output_tail: String::new(),
            bytes: None,
            files: None,
        };
        match &task.kind {
            TaskKind::Command { name } => match self.commands.get(name) {
                None => {
                    result.error = Some(format!(
                        "command {name:?} is not defined in this agent's config ({}); an agent runs only the commands its own config names",
                        self.config_file
                    ));
                    tracing::warn!(run = task.run_id, command = %name, "refused a task for an unknown command");
                }
                Some(command) => {
                    let left = Duration::from_secs_f64((task.deadline - started_at).max(1.0));
                    let limit = command.timeout.min(left);
                    tracing::info!(run = task.run_id, job = %task.job, command = %name, "running command");
                    run_command(command, limit, cancel, &mut result, |pid| {
                        if let Err(e) = self.spool.note_process(task.run_id, pid) {
                            tracing::warn!(run = task.run_id, error = %e, "cannot note the command's pid");
                        }
                    })
                    .await;
                }
            },
        }
        result.finished_at = now_unix();
        result
    }

    /// Sends spooled results until each is acknowledged.
    pub async fn send_loop(self: Arc<Self>, mut client: HttpsClient, shutdown: CancellationToken) {
        let backoff = Backoff {
            max: Duration::from_secs(60),
            ..Backoff::default()
        };
        let mut attempt = 0u32;
        let mut jitter = Jitter::new();
        loop {
            let mut failed = false;
            for result in self.spool.pending() {
                match send(&mut client, &result).await {
                    Ok(ack) => {
                        if !ack.recorded {
                            tracing::info!(run = result.run_id, "the controller already had this result");
                        }
                        if let Err(e) = self.spool.acknowledged(result.run_id) {
                            tracing::error!(run = result.run_id, error = %e, "cannot remove an acknowledged result");
                        }
                        attempt = 0;
                    }
                    Err((FailureClass::Rejected, error)) => {
                        tracing::error!(run = result.run_id, %error, "the controller refused this result; kept in spool/rejected/");
                        let _ = self.spool.reject(result.run_id);
                    }
                    Err((_, error)) => {
                        tracing::warn!(run = result.run_id, %error, "result not delivered; will retry");
                        failed = true;
                        break;
                    }
                }
            }
            let wait = if failed {
                let d = backoff.delay(attempt, jitter.unit());
                attempt = attempt.saturating_add(1);
                d
            } else {
                Duration::from_secs(30)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.results_ready.notified(), if !failed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

async fn send(client: &mut HttpsClient, result: &TaskResult) -> Result<ResultAck, (FailureClass, String)> {
    let body = serde_json::to_vec(result).map_err(|e| (FailureClass::Rejected, e.to_string()))?;
    match client
        .request(Method::POST, dicops_proto::RESULTS_PATH, Some(body))
        .await
    {
        Ok((status, body)) if status.is_success() => {
            serde_json::from_slice(&body).map_err(|e| (FailureClass::Network, e.to_string()))
        }
        Ok((status, body)) if status.is_client_error() => {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| format!("{status} ({}): {}", e.reason, e.error))
                .unwrap_or_else(|_| status.to_string());
            Err((FailureClass::Rejected, message))
        }
        Ok((status, _)) => Err((FailureClass::Network, format!("controller answered {status}"))),
        Err(e) => Err((e.class(), e.to_string())),
    }
}

/// Keeps the last `OUTPUT_TAIL_BYTES` of a stream.
async fn tail<R: tokio::io::AsyncRead + Unpin>(mut reader: R) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_TAIL_BYTES {
                    kept.drain(..kept.len() - OUTPUT_TAIL_BYTES);
                }
            }
        }
    }
}

#[allow(unsafe_code)]
pub(crate) fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) on the process group we created for this command
    // (process_group(0) makes the child its leader).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Runs one allowlisted command: no shell, own process group (a timeout
/// kills everything it started), output tail kept.
async fn run_command(
    command: &CommandConfig,
    limit: Duration,
    cancel: CancellationToken,
    result: &mut TaskResult,
    started: impl FnOnce(u32),
) {
    let mut cmd = tokio::process::Command::new(&command.argv[0]);
    cmd.args(&command.argv[1..])
        .envs(&command.env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &command.working_dir {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            result.error = Some(format!("cannot start {}: {e}", command.argv[0]));
            return;
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        started(pid);
    }
    let stdout = child.stdout.take().map(|s| tokio::spawn(tail(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(tail(s)));
    let status = tokio::select! {
        status = child.wait() => Some(status),
        _ = tokio::time::sleep(limit) => {
            result.error = Some(format!("the command ran longer than {} s and was killed with its process group", limit.as_secs()));
            None
        }
        _ = cancel.cancelled() => {
            result.error = Some("the run was cancelled (the controller's max_runtime passed, or the agent is stopping); the command was killed".into());
            None
        }
    };
    if status.is_none() {
        if let Some(pid) = pid {
            kill_group(pid);
        }
        let _ = child.wait().await;
    }
    let mut output = Vec::new();
    for handle in [stdout, stderr].into_iter().flatten() {
        if let Ok(bytes) = handle.await {
            output.extend_from_slice(&bytes);
        }
    }
    let start = output.len().saturating_sub(OUTPUT_TAIL_BYTES);
    result.output_tail = String::from_utf8_lossy(&output[start..]).into_owned();
    if let Some(status) = status {
        match status {
            Ok(status) if status.success() => {
                result.outcome = TaskOutcome::Succeeded;
                result.exit_code = Some(0);
            }
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                result.exit_code = status.code();
                result.error = Some(match (status.code(), status.signal()) {
                    (Some(code), _) => format!("{} exited with status {code}", command.argv[0]),
                    (None, Some(signal)) => {
                        format!("{} was killed by signal {signal}", command.argv[0])
                    }
                    _ => format!("{} failed", command.argv[0]),
                });
            }
            Err(e) => result.error = Some(format!("cannot wait for {}: {e}", command.argv[0])),
        }
    }
}
