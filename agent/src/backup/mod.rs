//! Backups on this agent: the output folders of backup commands (what each
//! run produced, local retention) and the folders watched for backups that
//! other tools make. Scanned on a thread of its own, because a backup
//! folder on a hung network mount must not stall reports or tasks.

pub mod ledger;
pub mod scan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use dicops_config::{CommandConfig, OutputConfig, WatchConfig};
use dicops_core::retention::{plan, Item};
use dicops_proto::{Artifact, LocalBackup, LocalBackupKind};

use ledger::{Ledger, LedgerRun};

use crate::report::now_unix;

/// What local retention did after a run.
#[derive(Debug, Default, PartialEq)]
pub struct RetentionOutcome {
    /// Files deleted, relative to the output folder.
    pub deleted: Vec<String>,
    /// Backups kept only because they are not yet in the other site.
    pub blocked: usize,
}

pub struct Backups {
    ledger_dir: PathBuf,
    outputs: BTreeMap<String, OutputConfig>,
    watches: BTreeMap<String, WatchConfig>,
    timezone: chrono_tz::Tz,
    /// Serialises ledger updates (a run's end, retention, a scan).
    ledger_lock: Mutex<()>,
    latest: Mutex<Vec<LocalBackup>>,
    rescan: Mutex<Option<mpsc::Sender<()>>>,
}

fn unix_to_time(unix: f64) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt((unix * 1000.0) as i64)
        .single()
        .unwrap_or_default()
}

impl Backups {
    pub fn new(
        state_dir: &Path,
        commands: &BTreeMap<String, CommandConfig>,
        watches: &BTreeMap<String, WatchConfig>,
        timezone: chrono_tz::Tz,
    ) -> Backups {
        Backups {
            ledger_dir: state_dir.join("backups"),
            outputs: commands
                .iter()
                .filter_map(|(name, c)| Some((name.clone(), c.output.clone()?)))
                .collect(),
            watches: watches.clone(),
            timezone,
            ledger_lock: Mutex::new(()),
            latest: Mutex::new(Vec::new()),
            rescan: Mutex::new(None),
        }
    }

    fn lock_ledgers(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ledger_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails when the output folder's filesystem is below its free-space
    /// floor (or the folder is missing): a backup must not fill the disk of
    /// the server it protects.
    pub fn check_free_space(output: &OutputConfig) -> Result<(), String> {
        let meta = std::fs::metadata(&output.dir)
            .map_err(|e| format!("output folder {} cannot be used: {e}", output.dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("output {} is not a folder", output.dir.display()));
        }
        let (size, avail) = crate::collect::statvfs(&output.dir)
            .map_err(|e| format!("cannot measure free space of {}: {e}", output.dir.display()))?;
        let floor = output.min_free.floor(size);
        if avail < floor {
            return Err(format!(
                "not started: only {} free on the filesystem of {} ({:.1}% of {}), below the floor min_free {}",
                dicops_core::units::format_bytes(avail),
                output.dir.display(),
                if size == 0 {
                    0.0
                } else {
                    avail as f64 * 100.0 / size as f64
                },
                dicops_core::units::format_bytes(size),
                output.min_free
            ));
        }
        Ok(())
    }

    /// Records a successful run's artifacts, then applies the retention
    /// policy: whole backups are deleted, never one that is not yet in the
    /// other site when the policy waits for replication.
    pub fn record_run(
        &self,
        command: &str,
        run_id: i64,
        started_at: f64,
        artifacts: &[Artifact],
    ) -> Result<RetentionOutcome, String> {
        let output = self
            .outputs
            .get(command)
            .ok_or_else(|| format!("command {command:?} has no output folder"))?;
        let _guard = self.lock_ledgers();
        let mut ledger = Ledger::load(&self.ledger_dir, command)?;
        if !ledger.runs.iter().any(|r| r.run_id == run_id) {
            ledger.runs.push(LedgerRun::new(run_id, started_at, artifacts));
        }
        // The ledger must name a run's files before anything is deleted.
        ledger.save(&self.ledger_dir, command)?;
        let outcome = self.apply_retention(output, &mut ledger);
        ledger.save(&self.ledger_dir, command)?;
        Ok(outcome)
    }

    /// What the policy keeps, deletes and may not delete (runs not yet in
    /// the other site, when the policy waits for replication).
    fn retention_plan(&self, output: &OutputConfig, ledger: &Ledger) -> dicops_core::retention::Plan<i64> {
        let items: Vec<Item<i64>> = ledger
            .runs
            .iter()
            .map(|r| Item {
                key: r.run_id,
                time: unix_to_time(r.started_at),
                protected: output.wait_for_replication && !r.replicated(),
            })
            .collect();
        plan(&output.retention, &items, self.timezone)
    }

    fn apply_retention(&self, output: &OutputConfig, ledger: &mut Ledger) -> RetentionOutcome {
        let decided = self.retention_plan(output, ledger);
        let mut outcome = RetentionOutcome {
            blocked: decided.blocked.len(),
            ..RetentionOutcome::default()
        };
        for run_id in decided.delete {
            let Some(index) = ledger.runs.iter().position(|r| r.run_id == run_id) else {
                continue;
            };
            let mut all_gone = true;
            for file in &ledger.runs[index].files {
                let path = output.dir.join(&file.path);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        outcome.deleted.push(file.path.clone());
                        remove_empty_parents(&output.dir, &path);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        all_gone = false;
                        tracing::error!(file = %path.display(), error = %e, "retention cannot delete an old backup");
                    }
                }
            }
            if all_gone {
                tracing::info!(run = run_id, folder = %output.dir.display(), "retention deleted an old backup");
                ledger.runs.remove(index);
            }
        }
        outcome
    }

    /// Marks a file of `command`'s output as present in the other site.
    /// Replication's source side calls it once a snapshot holding the file
    /// is published there; until then retention keeps the file.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn mark_replicated(&self, command: &str, path: &str, blake3: &str) -> Result<usize, String> {
        let _guard = self.lock_ledgers();
        let mut ledger = Ledger::load(&self.ledger_dir, command)?;
        let changed = ledger.mark_replicated(path, blake3, now_unix());
        if changed > 0 {
            ledger.save(&self.ledger_dir, command)?;
        }
        Ok(changed)
    }

    fn scan_output(&self, name: &str, output: &OutputConfig) -> LocalBackup {
        let mut local = unscanned(LocalBackupKind::Output, name, &output.dir);
        let present = match scan::list_files(&output.dir, true, None) {
            Ok(files) => files,
            Err(e) => {
                local.error = Some(e);
                return local;
            }
        };
        let _guard = self.lock_ledgers();
        let mut ledger = match Ledger::load(&self.ledger_dir, name) {
            Ok(ledger) => ledger,
            Err(e) => {
                local.error = Some(e);
                return local;
            }
        };
        // Files someone removed by hand are forgotten: they are not backups
        // any more, and retention must not count them.
        let on_disk: std::collections::HashSet<&str> = present.iter().map(|f| f.rel.as_str()).collect();
        let before = ledger.runs.len();
        for run in &mut ledger.runs {
            run.files.retain(|f| on_disk.contains(f.path.as_str()));
        }
        ledger.runs.retain(|r| !r.files.is_empty());
        if ledger.runs.len() != before {
            tracing::warn!(
                command = name,
                gone = before - ledger.runs.len(),
                "backups were removed from the output folder by something other than dicops"
            );
            if let Err(e) = ledger.save(&self.ledger_dir, name) {
                tracing::error!(error = %e, "cannot update the backup ledger");
            }
        }
        local.artifacts = ledger.runs.len() as u64;
        local.bytes = ledger.runs.iter().map(LedgerRun::bytes).sum();
        if let Some(newest) = ledger.runs.iter().max_by(|a, b| a.started_at.total_cmp(&b.started_at)) {
            local.newest_at = Some(newest.started_at);
            local.newest_bytes = Some(newest.bytes());
            local.newest_name = newest.files.first().map(|f| f.path.clone());
        }
        for run_id in self.retention_plan(output, &ledger).blocked {
            if let Some(run) = ledger.runs.iter().find(|r| r.run_id == run_id) {
                local.retention_blocked += 1;
                local.retention_blocked_bytes += run.bytes();
                local.oldest_blocked_at = Some(
                    local
                        .oldest_blocked_at
                        .map_or(run.started_at, |o: f64| o.min(run.started_at)),
                );
            }
        }
        local
    }

    fn scan_watch(name: &str, watch: &WatchConfig) -> LocalBackup {
        let mut local = unscanned(LocalBackupKind::Watch, name, &watch.path);
        match scan::list_files(&watch.path, false, Some(&watch.glob)) {
            Err(e) => local.error = Some(e),
            Ok(files) => {
                local.artifacts = files.len() as u64;
                local.bytes = files.iter().map(|f| f.size).sum();
                if let Some(newest) = files.iter().max_by(|a, b| a.mtime.total_cmp(&b.mtime)) {
                    local.newest_at = Some(newest.mtime);
                    local.newest_bytes = Some(newest.size);
                    local.newest_name = Some(newest.rel.clone());
                }
            }
        }
        local
    }

    /// Scans every output folder and watched folder.
    pub fn scan_all(&self) -> Vec<LocalBackup> {
        let mut all: Vec<LocalBackup> = self
            .outputs
            .iter()
            .map(|(name, output)| self.scan_output(name, output))
            .collect();
        all.extend(self.watches.iter().map(|(name, w)| Self::scan_watch(name, w)));
        all
    }

    /// The latest scan, for reports.
    pub fn latest(&self) -> Vec<LocalBackup> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the scanner thread for a scan now (after a run).
    pub fn rescan(&self) {
        if let Some(tx) = self.rescan.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(());
        }
    }

    /// Starts the scanner thread: a scan every `interval` and on request.
    /// It lives as long as the process.
    pub fn start_scanner(self: &std::sync::Arc<Self>, interval: Duration) -> std::io::Result<()> {
        if self.outputs.is_empty() && self.watches.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<()>();
        *self.rescan.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let me = self.clone();
        std::thread::Builder::new()
            .name("backup-scanner".into())
            .spawn(move || loop {
                let scanned = me.scan_all();
                *me.latest.lock().unwrap_or_else(|p| p.into_inner()) = scanned;
                if let Err(mpsc::RecvTimeoutError::Disconnected) = rx.recv_timeout(interval) {
                    return;
                }
            })
            .map(|_| ())
    }
}

/// A folder's report before its scan fills it in.
fn unscanned(kind: LocalBackupKind, name: &str, path: &Path) -> LocalBackup {
    LocalBackup {
        kind,
        name: name.to_string(),
        path: path.display().to_string(),
        error: None,
        artifacts: 0,
        bytes: 0,
        newest_at: None,
        newest_bytes: None,
        newest_name: None,
        retention_blocked: 0,
        retention_blocked_bytes: 0,
        oldest_blocked_at: None,
        scanned_at: now_unix(),
    }
}

/// Removes folders a deleted backup leaves empty, up to (not including)
/// the output folder.
fn remove_empty_parents(root: &Path, file: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || std::fs::remove_dir(d).is_err() {
            return;
        }
        dir = d.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicops_config::FreeSpace;
    use dicops_core::retention::RetentionPolicy;

    fn backups(dir: &Path, output: &Path, keep_last: u32) -> Backups {
        let mut commands = BTreeMap::new();
        commands.insert(
            "dump".to_string(),
            CommandConfig {
                argv: vec!["/bin/true".into()],
                working_dir: None,
                env: BTreeMap::new(),
                timeout: Duration::from_secs(60),
                user: None,
                output: Some(OutputConfig {
                    dir: output.to_path_buf(),
                    min_free: FreeSpace::Bytes(0),
                    retention: RetentionPolicy {
                        keep_last,
                        ..RetentionPolicy::default()
                    },
                    wait_for_replication: true,
                }),
            },
        );
        Backups::new(dir, &commands, &BTreeMap::new(), chrono_tz::UTC)
    }

    fn produce(output: &Path, name: &str, body: &[u8]) -> Artifact {
        std::fs::write(output.join(name), body).expect("write");
        Artifact {
            path: name.into(),
            size: body.len() as u64,
            blake3: blake3::hash(body).to_hex().to_string(),
        }
    }

    #[test]
    fn retention_never_deletes_what_is_not_in_the_other_site() {
        let state = tempfile::tempdir().expect("state");
        let output = tempfile::tempdir().expect("output");
        let b = backups(state.path(), output.path(), 1);
        let first = produce(output.path(), "1.dump", b"one");
        b.record_run("dump", 1, 100.0, std::slice::from_ref(&first))
            .expect("run 1");
        let second = produce(output.path(), "2.dump", b"two");
        let outcome = b.record_run("dump", 2, 200.0, &[second]).expect("run 2");
        // keep_last 1 would delete 1.dump, but it is not replicated yet.
        assert_eq!(
            outcome,
            RetentionOutcome {
                deleted: vec![],
                blocked: 1
            }
        );
        assert!(output.path().join("1.dump").exists());
        let scan = b.scan_all();
        assert_eq!(
            (
                scan[0].artifacts,
                scan[0].retention_blocked,
                scan[0].retention_blocked_bytes
            ),
            (2, 1, 3)
        );
        assert_eq!(scan[0].oldest_blocked_at, Some(100.0));

        // Once the other site has it, the next run's retention deletes it.
        assert_eq!(b.mark_replicated("dump", "1.dump", &first.blake3).expect("mark"), 1);
        let third = produce(output.path(), "3.dump", b"three");
        let outcome = b.record_run("dump", 3, 300.0, &[third]).expect("run 3");
        assert_eq!(outcome.deleted, ["1.dump"]);
        assert_eq!(outcome.blocked, 1, "2.dump is not in the other site either");
        assert!(!output.path().join("1.dump").exists());
    }

    #[test]
    fn files_dicops_did_not_produce_are_never_touched_and_removed_ones_are_forgotten() {
        let state = tempfile::tempdir().expect("state");
        let output = tempfile::tempdir().expect("output");
        let b = backups(state.path(), output.path(), 1);
        std::fs::write(output.path().join("operator-notes.txt"), b"keep me").expect("write");
        let first = produce(output.path(), "1.dump", b"one");
        b.record_run("dump", 1, 100.0, &[first]).expect("run 1");
        std::fs::remove_file(output.path().join("1.dump")).expect("rm by hand");
        let scan = b.scan_all();
        assert_eq!(scan[0].artifacts, 0);
        assert!(output.path().join("operator-notes.txt").exists());
    }

    #[test]
    fn a_run_below_the_free_space_floor_does_not_start() {
        let output = tempfile::tempdir().expect("output");
        let mut config = OutputConfig {
            dir: output.path().to_path_buf(),
            min_free: FreeSpace::Bytes(1 << 60),
            retention: RetentionPolicy::default(),
            wait_for_replication: true,
        };
        let error = Backups::check_free_space(&config).unwrap_err();
        assert!(error.contains("below the floor min_free 1024.0 PiB"), "{error}");
        config.min_free = FreeSpace::Ratio(0.0);
        assert_eq!(Backups::check_free_space(&config), Ok(()));
        config.dir = output.path().join("missing");
        assert!(Backups::check_free_space(&config)
            .unwrap_err()
            .contains("cannot be used"));
    }
}
