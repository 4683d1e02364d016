//! The agent's spool: a task accepted from the controller and its result
//! live on disk until the controller has acknowledged the result.
//!
//! What survives a kill -9 or a reboot, and why:
//! - `accepted/<run>.json` is written (temp file, fsync, rename, fsync of
//!   the folder) before the command starts. If the agent dies during the
//!   run, the next start finds it without a result and reports the run as
//!   failed, "interrupted": the controller never waits forever.
//! - `results/<run>.json` is written the same way before the accepted file
//!   is removed, so at every instant at least one of the two exists.
//! - A result is deleted only after the controller's acknowledgement. A
//!   crash between the controller's commit and our delete makes us send it
//!   again; the controller records each run's end exactly once.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use dicops_proto::{Task, TaskOutcome, TaskResult};

pub struct Spool {
    accepted: PathBuf,
    results: PathBuf,
    rejected: PathBuf,
}

pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks
/// since boot. With the pid it names one process for good.
fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19).map(str::to_string)
}

fn run_id_of(path: &Path) -> Option<i64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".json")?.parse().ok()
}

impl Spool {
    pub fn open(state_dir: &Path) -> std::io::Result<Spool> {
        let root = state_dir.join("spool");
        let spool = Spool {
            accepted: root.join("accepted"),
            results: root.join("results"),
            rejected: root.join("rejected"),
        };
        for dir in [&spool.accepted, &spool.results, &spool.rejected] {
            fs::create_dir_all(dir)?;
        }
        Ok(spool)
    }

    pub fn accept(&self, task: &Task) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(task).map_err(std::io::Error::other)?;
        write_atomically(&self.accepted, &format!("{}.json", task.run_id), &bytes)
    }

    pub fn is_known(&self, run_id: i64) -> bool {
        self.accepted.join(format!("{run_id}.json")).exists() || self.results.join(format!("{run_id}.json")).exists()
    }

    /// Every run this agent holds: accepted, or finished and not yet
    /// acknowledged.
    pub fn held(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = [&self.accepted, &self.results]
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flat_map(|entries| entries.flatten().filter_map(|e| run_id_of(&e.path())))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn complete(&self, result: &TaskResult) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(result).map_err(std::io::Error::other)?;
        write_atomically(&self.results, &format!("{}.json", result.run_id), &bytes)?;
        match fs::remove_file(self.accepted.join(format!("{}.json", result.run_id))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let _ = fs::remove_file(self.accepted.join(format!("{}.pid", result.run_id)));
        fs::File::open(&self.accepted)?.sync_all()
    }

    /// Results waiting for an acknowledgement, oldest run first.
    pub fn pending(&self) -> Vec<TaskResult> {
        let mut results = Vec::new();
        let Ok(entries) = fs::read_dir(&self.results) else {
            return results;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if run_id_of(&path).is_none() {
                continue;
            }
            match fs::read(&path).map(|bytes| serde_json::from_slice::<TaskResult>(&bytes)) {
                Ok(Ok(result)) => results.push(result),
                Ok(Err(e)) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable result in the spool; moved to rejected/");
                    let _ = fs::rename(&path, self.rejected.join(entry.file_name()));
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read a spooled result")
                }
            }
        }
        results.sort_by_key(|r| r.run_id);
        results
    }

    /// The controller has the result: forget it.
    pub fn acknowledged(&self, run_id: i64) -> std::io::Result<()> {
        match fs::remove_file(self.results.join(format!("{run_id}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => fs::File::open(&self.results)?.sync_all(),
        }
    }

    /// The controller refused the result for good: keep it for a human.
    pub fn reject(&self, run_id: i64) -> std::io::Result<()> {
        let name = format!("{run_id}.json");
        fs::rename(self.results.join(&name), self.rejected.join(&name))
    }

    /// Remembers the process group of a running command, so that a restarted
    /// agent can stop what a killed one left behind.
    pub fn note_process(&self, run_id: i64, pid: u32) -> std::io::Result<()> {
        let start = process_start_time(pid).unwrap_or_default();
        write_atomically(
            &self.accepted,
            &format!("{run_id}.pid"),
            format!("{pid} {start}").as_bytes(),
        )
    }

    /// Kills the process group of an interrupted run if it is still the
    /// same process (same start time: a reused pid is left alone).
    fn kill_leftover(&self, run_id: i64) {
        let path = self.accepted.join(format!("{run_id}.pid"));
        let Ok(text) = fs::read_to_string(&path) else {
            return;
        };
        let mut parts = text.split_whitespace();
        let (Some(Ok(pid)), Some(start)) = (parts.next().map(str::parse::<u32>), parts.next()) else {
            return;
        };
        if process_start_time(pid).as_deref() == Some(start) {
            tracing::warn!(
                run = run_id,
                pid,
                "stopping the command an earlier agent process left running"
            );
            crate::process::kill_group(pid);
        }
        let _ = fs::remove_file(&path);
    }

    /// At start: tasks accepted by a previous agent process that never got
    /// a result were interrupted; they become failed results.
    pub fn recover(&self, now: f64) -> std::io::Result<usize> {
        let mut recovered = 0;
        for entry in fs::read_dir(&self.accepted)?.flatten() {
            let path = entry.path();
            let Some(run_id) = run_id_of(&path) else {
                continue;
            };
            self.kill_leftover(run_id);
            let job = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Task>(&b).ok())
                .map(|t| t.job)
                .unwrap_or_default();
            // The task file was written just before the command started.
            let started_at = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_secs_f64());
            if !self.results.join(format!("{run_id}.json")).exists() {
                self.complete(&TaskResult {
                    run_id,
                    job,
                    outcome: TaskOutcome::Interrupted,
                    error: Some("interrupted: the agent stopped during the run (crash, kill or reboot); the command was stopped and its outcome is unknown, so it is not counted as a success".into()),
                    exit_code: None,
                    started_at,
                    finished_at: now,
                    output_tail: String::new(),
                    bytes: None,
                    files: None,
                    output_dir: None,
                    artifacts: Vec::new(),
                    artifacts_omitted: 0,
                    replication: None,
                    verify: None,
                })?;
                recovered += 1;
            } else {
                fs::remove_file(&path)?;
            }
        }
        Ok(recovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicops_proto::TaskKind;
    use std::os::unix::process::CommandExt;

    fn task(run_id: i64) -> Task {
        Task {
            run_id,
            job: "dump".into(),
            attempt: 0,
            deadline: 100.0,
            kind: TaskKind::Command { name: "pg-dump".into() },
        }
    }

    fn result(run_id: i64) -> TaskResult {
        TaskResult {
            run_id,
            job: "dump".into(),
            outcome: TaskOutcome::Succeeded,
            error: None,
            exit_code: Some(0),
            started_at: 1.0,
            finished_at: 2.0,
            output_tail: "ok".into(),
            bytes: None,
            files: None,
            output_dir: None,
            artifacts: Vec::new(),
            artifacts_omitted: 0,
            replication: None,
            verify: None,
        }
    }

    #[test]
    fn results_stay_until_acknowledged_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        spool.accept(&task(7)).expect("accept");
        assert!(spool.is_known(7));
        spool.complete(&result(7)).expect("complete");
        drop(spool);
        let spool = Spool::open(dir.path()).expect("reopen");
        assert_eq!(spool.recover(5.0).expect("recover"), 0);
        assert_eq!(spool.pending(), vec![result(7)]);
        spool.acknowledged(7).expect("ack");
        assert!(spool.pending().is_empty());
        assert!(!spool.is_known(7));
    }

    #[test]
    fn an_interrupted_task_becomes_a_failed_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        spool.accept(&task(9)).expect("accept");
        drop(spool);
        let spool = Spool::open(dir.path()).expect("reopen");
        assert_eq!(spool.recover(5.0).expect("recover"), 1);
        let pending = spool.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].outcome, TaskOutcome::Interrupted);
        assert!(pending[0].error.as_deref().unwrap_or("").contains("interrupted"));
        // Recovering again adds nothing.
        assert_eq!(spool.recover(6.0).expect("recover"), 0);
        assert_eq!(spool.pending().len(), 1);
    }

    #[test]
    fn a_leftover_command_of_a_killed_agent_is_stopped_on_recovery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        spool.accept(&task(4)).expect("accept");
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("spawn");
        spool.note_process(4, child.id()).expect("note");
        assert_eq!(spool.recover(1.0).expect("recover"), 1);
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(!dir.path().join("spool/accepted/4.pid").exists());
    }

    #[test]
    fn a_corrupt_result_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        std::fs::write(dir.path().join("spool/results/3.json"), b"{broken").expect("write");
        assert!(spool.pending().is_empty());
        assert!(dir.path().join("spool/rejected/3.json").exists());
    }
}
