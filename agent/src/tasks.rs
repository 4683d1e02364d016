//! Tasks from the controller: long-polled over the agent's own connection
//! (the controller never dials agents), run only if the agent's own config
//! allows them, and their results delivered at least once from the spool.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicops_config::{CommandConfig, OutputConfig};
use dicops_core::backoff::Backoff;
use dicops_net::{FailureClass, HttpsClient};
use dicops_proto::{ApiError, ResultAck, RunProgress, Task, TaskKind, TaskOutcome, TaskPoll, TaskResult};
use hyper::Method;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backup::{scan, Backups};
use crate::process::{self, LastLine};
use crate::report::{now_unix, Jitter};
use crate::spool::Spool;

/// How often a running task's progress is posted.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub struct Tasks {
    pub config_file: String,
    pub commands: BTreeMap<String, CommandConfig>,
    pub spool: Arc<Spool>,
    /// Results waiting to be sent.
    pub results_ready: Arc<Notify>,
    pub running: Mutex<HashMap<i64, CancellationToken>>,
    pub backups: Arc<Backups>,
    pub progress: Arc<ProgressBoard>,
    /// Pulls replication runs into this agent's roots.
    pub puller: crate::replication::pull::Puller,
    /// Serves this agent's exports (when it has a data port).
    pub source: Option<Arc<crate::replication::serve::Source>>,
}

/// The latest progress of each running task; `progress_loop` posts it.
#[derive(Default)]
pub struct ProgressBoard {
    latest: Mutex<HashMap<i64, RunProgress>>,
    /// Runs whose progress changed since the last post.
    changed: Mutex<Vec<i64>>,
    ready: Notify,
    /// A replication's rate as the controller last set it.
    bandwidth: Mutex<HashMap<i64, Option<u64>>>,
}

impl ProgressBoard {
    fn set(&self, progress: RunProgress) {
        let run_id = progress.run_id;
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_id, progress);
        let mut changed = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        if !changed.contains(&run_id) {
            changed.push(run_id);
        }
        self.ready.notify_one();
    }

    fn forget(&self, run_id: i64) {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).remove(&run_id);
        self.bandwidth.lock().unwrap_or_else(|p| p.into_inner()).remove(&run_id);
    }

    /// The rate the controller last gave this run, if it gave one.
    pub fn bandwidth(&self, run_id: i64) -> Option<Option<u64>> {
        self.bandwidth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&run_id)
            .copied()
    }

    fn take_changed(&self) -> Vec<RunProgress> {
        let ids = std::mem::take(&mut *self.changed.lock().unwrap_or_else(|p| p.into_inner()));
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter_map(|id| latest.get(id).cloned()).collect()
    }
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
                    for grant in poll.grants {
                        match &self.source {
                            Some(source) => source.grant(grant),
                            None => tracing::warn!(
                                run = grant.run_id,
                                "asked to serve a replication, but this agent has no data port (data.listen)"
                            ),
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
            output_dir: None,
            artifacts: Vec::new(),
            artifacts_omitted: 0,
            replication: None,
            verify: None,
        };
        let name = match &task.kind {
            TaskKind::Command { name } => name,
            TaskKind::Pull(pull) => {
                self.replicate(task, pull, cancel, &mut result).await;
                self.forget_progress(task.run_id);
                result.finished_at = now_unix();
                return result;
            }
            TaskKind::Verify(verify) => {
                self.verify(task, verify, cancel, &mut result).await;
                self.forget_progress(task.run_id);
                result.finished_at = now_unix();
                return result;
            }
        };
        match self.commands.get(name) {
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
                match &command.output {
                    None => {
                        let env = process::environment(command, &dicops_vars(task, name, None));
                        self.run_command(task, command, &env, limit, cancel, &mut result, None)
                            .await;
                    }
                    Some(output) => {
                        self.run_backup(task, name, command, output, limit, cancel, &mut result)
                            .await
                    }
                }
            }
        }
        self.forget_progress(task.run_id);
        result.finished_at = now_unix();
        result
    }

    /// Runs the command and fills in the result's exit, error and output.
    #[allow(clippy::too_many_arguments)]
    async fn run_command(
        &self,
        task: &Task,
        command: &CommandConfig,
        env: &std::collections::BTreeMap<String, String>,
        limit: Duration,
        cancel: CancellationToken,
        result: &mut TaskResult,
        output: Option<(&OutputConfig, &[scan::FileInfo])>,
    ) {
        let last_line = LastLine::default();
        let reporter = self.progress_while_running(task.run_id, last_line.clone(), output);
        let finished = process::run(command, env, limit, cancel, last_line, |pid| {
            if let Err(e) = self.spool.note_process(task.run_id, pid) {
                tracing::warn!(run = task.run_id, error = %e, "cannot note the command's pid");
            }
        })
        .await;
        drop(reporter);
        result.exit_code = finished.exit_code;
        result.error = finished.error;
        result.output_tail = finished.output_tail;
        if finished.succeeded {
            result.outcome = TaskOutcome::Succeeded;
        }
    }

    /// A backup run: free space checked first, the command run, then what
    /// it produced in its output folder measured and checksummed, recorded
    /// in the ledger, and local retention applied.
    #[allow(clippy::too_many_arguments)]
    async fn run_backup(
        &self,
        task: &Task,
        name: &str,
        command: &CommandConfig,
        output: &OutputConfig,
        limit: Duration,
        cancel: CancellationToken,
        result: &mut TaskResult,
    ) {
        result.output_dir = Some(output.dir.display().to_string());
        self.set_progress(task.run_id, "checking", None, None, None);
        let dir = output.dir.clone();
        let checked = {
            let output = output.clone();
            blocking(move || {
                Backups::check_free_space(&output).and_then(|()| scan::list_files(&output.dir, true, None))
            })
            .await
        };
        let before = match checked {
            Ok(before) => before,
            Err(e) => {
                tracing::warn!(run = task.run_id, error = %e, "backup not started");
                result.error = Some(e);
                return;
            }
        };
        let env = process::environment(command, &dicops_vars(task, name, Some(&dir)));
        self.run_command(task, command, &env, limit, cancel, result, Some((output, &before)))
            .await;
        self.set_progress(task.run_id, "hashing", None, None, None);
        let produced = {
            let dir = dir.clone();
            blocking(move || scan::list_files(&dir, true, None).map(|after| scan::produced(&before, &after))).await
        };
        let produced = match produced {
            Ok(files) => files,
            Err(e) => {
                result.outcome = TaskOutcome::Failed;
                result.error = Some(format!("cannot read the output folder after the run: {e}"));
                return;
            }
        };
        let bytes: u64 = produced.iter().map(|f| f.size).sum();
        result.bytes = Some(bytes);
        result.files = Some(produced.len() as u64);
        if result.outcome != TaskOutcome::Succeeded {
            if !produced.is_empty() {
                let note = format!(
                    "; it left {} file(s), {}, in {} that are not counted as a backup",
                    produced.len(),
                    dicops_core::units::format_bytes(bytes),
                    dir.display()
                );
                result.error = Some(result.error.take().unwrap_or_default() + &note);
            }
            return;
        }
        if bytes == 0 {
            result.outcome = TaskOutcome::Failed;
            result.error = Some(format!(
                "{} exited 0 but wrote {} into its output folder {}: an empty backup is a failed backup",
                command.argv[0],
                if produced.is_empty() {
                    "nothing"
                } else {
                    "only empty files"
                },
                dir.display()
            ));
            return;
        }
        let manifest = {
            let dir = dir.clone();
            let produced = produced.clone();
            blocking(move || scan::manifest(&dir, &produced)).await
        };
        let artifacts = match manifest {
            Ok(artifacts) => artifacts,
            Err(e) => {
                result.outcome = TaskOutcome::Failed;
                result.error = Some(e);
                return;
            }
        };
        self.set_progress(task.run_id, "retention", Some(bytes), Some(produced.len() as u64), None);
        let recorded = {
            let backups = self.backups.clone();
            let (name, run_id, started_at, artifacts) =
                (name.to_string(), task.run_id, result.started_at, artifacts.clone());
            blocking(move || backups.record_run(&name, run_id, started_at, &artifacts)).await
        };
        match recorded {
            Ok(retention) => {
                if !retention.deleted.is_empty() || retention.blocked > 0 {
                    tracing::info!(
                        run = task.run_id,
                        deleted = retention.deleted.len(),
                        blocked = retention.blocked,
                        "local retention applied"
                    );
                }
            }
            Err(e) => {
                // The backup itself is good; only its bookkeeping failed.
                tracing::error!(run = task.run_id, error = %e, "cannot record the backup in its ledger; retention skipped");
            }
        }
        self.backups.rescan();
        result.artifacts_omitted = artifacts.len().saturating_sub(dicops_proto::MAX_MANIFEST_ENTRIES) as u64;
        result.artifacts = artifacts;
        result.artifacts.truncate(dicops_proto::MAX_MANIFEST_ENTRIES);
    }

    /// A replication run: pulled from the source named in the ticket.
    async fn replicate(
        &self,
        task: &Task,
        pull: &dicops_proto::PullTask,
        cancel: CancellationToken,
        result: &mut TaskResult,
    ) {
        tracing::info!(run = task.run_id, job = %task.job, source = %pull.source_agent, root = %pull.root, "replicating");
        let board = self.progress.clone();
        let run_id = task.run_id;
        let rates = self.progress.clone();
        let outcome = self
            .puller
            .pull(
                &task.job,
                task.run_id,
                pull,
                cancel,
                move || rates.bandwidth(run_id),
                |p| {
                    board.set(RunProgress {
                        run_id,
                        phase: p.phase.to_string(),
                        bytes: Some(p.bytes),
                        files: None,
                        bytes_remaining: Some(p.remaining),
                        message: Some(p.message),
                        updated_at: now_unix(),
                    })
                },
            )
            .await;
        match outcome {
            Ok(stats) => {
                tracing::info!(run = task.run_id, snapshot = %stats.snapshot, fetched = stats.bytes_fetched, reused = stats.bytes_reused, "snapshot published");
                result.outcome = TaskOutcome::Succeeded;
                result.bytes = Some(stats.bytes_on_wire);
                result.files = Some(stats.files);
                result.output_tail = format!(
                    "snapshot {}: {} files, {}; {} sent ({} on the wire), {} reused, {} files linked; {} snapshots kept",
                    stats.snapshot,
                    stats.files,
                    dicops_core::units::format_bytes(stats.bytes),
                    dicops_core::units::format_bytes(stats.bytes_fetched),
                    dicops_core::units::format_bytes(stats.bytes_on_wire),
                    dicops_core::units::format_bytes(stats.bytes_reused),
                    stats.files_linked,
                    stats.snapshots
                );
                result.replication = Some(stats);
            }
            Err(e) => {
                tracing::warn!(run = task.run_id, error = %e, "replication failed");
                result.error = Some(e);
            }
        }
    }

    /// A verify run of a replication's snapshots.
    async fn verify(
        &self,
        task: &Task,
        verify: &dicops_proto::VerifyTask,
        cancel: CancellationToken,
        result: &mut TaskResult,
    ) {
        tracing::info!(run = task.run_id, job = %task.job, replication = %verify.replication, "verifying snapshots");
        let board = self.progress.clone();
        let run_id = task.run_id;
        let outcome = self
            .puller
            .verify(&task.job, task.run_id, verify, cancel, |p| {
                board.set(RunProgress {
                    run_id,
                    phase: p.phase.to_string(),
                    bytes: None,
                    files: None,
                    bytes_remaining: None,
                    message: Some(p.message),
                    updated_at: now_unix(),
                })
            })
            .await;
        match outcome {
            Ok(stats) => {
                result.files = Some(stats.files);
                result.bytes = Some(stats.bytes);
                result.output_tail = format!(
                    "{} snapshot(s), {} file(s), {} re-read: {} damaged, {} repaired from the source, {} lost",
                    stats.snapshots,
                    stats.files,
                    dicops_core::units::format_bytes(stats.bytes),
                    stats.damaged.len(),
                    stats.repaired.len(),
                    stats.lost.len()
                );
                if stats.lost.is_empty() {
                    result.outcome = TaskOutcome::Succeeded;
                } else {
                    result.error = Some(format!(
                        "{} file(s) differ from their manifest and could not be repaired (the source no longer has their content): {}",
                        stats.lost.len(),
                        stats.lost.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                result.verify = Some(stats);
            }
            Err(e) => result.error = Some(e),
        }
    }

    fn set_progress(&self, run_id: i64, phase: &str, bytes: Option<u64>, files: Option<u64>, message: Option<String>) {
        self.progress.set(RunProgress {
            run_id,
            bytes_remaining: None,
            phase: phase.to_string(),
            bytes,
            files,
            message,
            updated_at: now_unix(),
        });
    }

    fn forget_progress(&self, run_id: i64) {
        self.progress.forget(run_id);
    }

    /// While the command runs: its last output line and, for a backup,
    /// what it has written so far, every few seconds. Stops when the
    /// returned guard is dropped.
    fn progress_while_running(
        &self,
        run_id: i64,
        last_line: LastLine,
        output: Option<(&OutputConfig, &[scan::FileInfo])>,
    ) -> tokio_util::sync::DropGuard {
        let stop = CancellationToken::new();
        let output = output.map(|(o, before)| (o.dir.clone(), before.to_vec()));
        let board = self.progress.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let written = match &output {
                    Some((dir, before)) => {
                        let (dir, before) = (dir.clone(), before.clone());
                        blocking(move || {
                            scan::list_files(&dir, true, None).map(|after| scan::produced(&before, &after))
                        })
                        .await
                        .ok()
                    }
                    None => None,
                };
                if token.is_cancelled() {
                    return;
                }
                let line = last_line.lock().unwrap_or_else(|p| p.into_inner()).clone();
                board.set(RunProgress {
                    run_id,
                    bytes_remaining: None,
                    phase: "running".into(),
                    bytes: written.as_ref().map(|files| files.iter().map(|f| f.size).sum()),
                    files: written.as_ref().map(|files| files.len() as u64),
                    message: (!line.is_empty()).then_some(line),
                    updated_at: now_unix(),
                });
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(PROGRESS_EVERY) => {}
                }
            }
        });
        stop.drop_guard()
    }

    /// Posts progress as it changes. Best effort: a lost post is replaced
    /// by the next one, and nothing waits for it.
    pub async fn progress_loop(self: Arc<Self>, mut client: HttpsClient, shutdown: CancellationToken) {
        client.request_timeout = Duration::from_secs(5);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.progress.ready.notified() => {}
            }
            for progress in self.progress.take_changed() {
                let Ok(body) = serde_json::to_vec(&progress) else {
                    continue;
                };
                match client
                    .request(Method::POST, dicops_proto::PROGRESS_PATH, Some(body))
                    .await
                {
                    Ok((status, body)) if status.is_success() => {
                        if let Ok(ack) = serde_json::from_slice::<dicops_proto::ProgressAck>(&body) {
                            self.progress
                                .bandwidth
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(progress.run_id, ack.bandwidth);
                        }
                    }
                    Ok((status, _)) => tracing::debug!(run = progress.run_id, %status, "progress refused"),
                    Err(e) => tracing::debug!(run = progress.run_id, error = %e, "progress not posted"),
                }
            }
        }
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

/// The DICOPS_* variables a command gets.
fn dicops_vars(task: &Task, command: &str, output: Option<&std::path::Path>) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("DICOPS_RUN_ID", task.run_id.to_string()),
        ("DICOPS_JOB", task.job.clone()),
        ("DICOPS_COMMAND", command.to_string()),
        ("DICOPS_ATTEMPT", task.attempt.to_string()),
    ];
    if let Some(dir) = output {
        vars.push(("DICOPS_OUTPUT_DIR", dir.display().to_string()));
    }
    vars
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
}
