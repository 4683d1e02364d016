//! Every backup of the deployment in one view, for `dicops backups`, the
//! API and the backup metrics: the objective from the config, the runs from
//! the scheduler, and the agent's latest scan of the folder.

use std::sync::Arc;

use dicops_config::ControllerConfig;
use dicops_proto::{BackupStatus, LocalBackup, LocalBackupKind};

use crate::metrics::{self as m, Exposition};
use crate::scheduler::JobMetrics;
use crate::state::AgentRecord;

/// Builds the view. `agent` gives an agent's latest report and whether it
/// is up.
pub fn view(
    config: &ControllerConfig,
    jobs: &[JobMetrics],
    agent: impl Fn(&str) -> (bool, Option<Arc<AgentRecord>>),
) -> Vec<BackupStatus> {
    let local = |agent_id: &str, kind: LocalBackupKind, name: &str| -> (Option<LocalBackup>, Option<String>) {
        let (up, record) = agent(agent_id);
        let Some(record) = record else {
            return (
                None,
                Some(format!(
                    "agent {agent_id} has not reported since the controller started"
                )),
            );
        };
        let found = record
            .report
            .backups
            .iter()
            .find(|b| b.kind == kind && b.name == name)
            .cloned();
        let problem = match &found {
            None => Some(match kind {
                LocalBackupKind::Output => format!(
                    "agent {agent_id} does not report an output folder for command {name:?}: give the command an `output` in the agent's config"
                ),
                LocalBackupKind::Watch => format!(
                    "agent {agent_id} has no watch named {name:?} under `watches:` in its config"
                ),
            }),
            Some(b) => b.error.clone(),
        };
        let problem = match (up, problem) {
            (false, p) => Some(format!(
                "agent {agent_id} is down; last scan shown{}",
                p.map(|p| format!(" ({p})")).unwrap_or_default()
            )),
            (true, p) => p,
        };
        (found, problem)
    };
    let mut all = Vec::new();
    for job in jobs {
        let Some(max_age) = job.max_age else { continue };
        let (local, problem) = local(&job.agent, LocalBackupKind::Output, &job.command);
        all.push(BackupStatus {
            name: job.job.clone(),
            kind: "run".into(),
            site: job.site.clone(),
            agent: job.agent.clone(),
            source: job.command.clone(),
            max_age_seconds: max_age.as_secs_f64(),
            last_success_at: job.last_success,
            last_run_at: job.last_run,
            last_status: job.last_end.last_status.clone(),
            last_error: job.last_end.last_error.clone(),
            last_duration_seconds: job.last_end.last_duration,
            last_size_bytes: job.last_end.last_success_bytes,
            running_run: job.running_run,
            local,
            problem,
        });
    }
    for watch in &config.watched_backups {
        let (local, problem) = local(&watch.agent, LocalBackupKind::Watch, &watch.watch);
        all.push(BackupStatus {
            name: watch.name.clone(),
            kind: "watch".into(),
            site: config.site_of(&watch.agent).unwrap_or_default().to_string(),
            agent: watch.agent.clone(),
            source: watch.watch.clone(),
            max_age_seconds: watch.max_age.as_secs_f64(),
            last_success_at: local.as_ref().and_then(|l| l.newest_at),
            last_run_at: None,
            last_status: None,
            last_error: None,
            last_duration_seconds: None,
            last_size_bytes: local.as_ref().and_then(|l| l.newest_bytes),
            running_run: None,
            local,
            problem,
        });
    }
    all
}

/// Renders the backup gauges (the runs counter lives in the registry).
pub fn render(backups: &[BackupStatus], out: &mut String) {
    type Get = fn(&BackupStatus) -> Option<f64>;
    let families: [(m::Def, Get); 12] = [
        (m::BACKUP_MAX_AGE, |b| Some(b.max_age_seconds)),
        (m::BACKUP_LAST_SUCCESS, |b| b.last_success_at),
        (m::BACKUP_LAST_RUN, |b| b.last_run_at),
        (m::BACKUP_LAST_DURATION, |b| b.last_duration_seconds),
        (m::BACKUP_LAST_SIZE, |b| b.last_size_bytes.map(|v| v as f64)),
        (m::BACKUP_LAST_OK, |b| {
            b.last_status.as_deref().map(|s| f64::from(u8::from(s == "succeeded")))
        }),
        (m::BACKUP_ARTIFACTS, |b| local_value(b, |l| l.artifacts)),
        (m::BACKUP_ARTIFACTS_BYTES, |b| local_value(b, |l| l.bytes)),
        (m::BACKUP_RETENTION_BLOCKED, |b| local_value(b, |l| l.retention_blocked)),
        (m::BACKUP_RETENTION_BLOCKED_BYTES, |b| {
            local_value(b, |l| l.retention_blocked_bytes)
        }),
        (m::BACKUP_FOLDER_READABLE, |b| {
            b.local.as_ref().map(|l| f64::from(u8::from(l.error.is_none())))
        }),
        (m::BACKUP_SCAN, |b| b.local.as_ref().map(|l| l.scanned_at)),
    ];
    let mut e = Exposition::new(out);
    for (def, get) in families {
        e.family(def);
        for backup in backups {
            if let Some(value) = get(backup) {
                e.sample(
                    def,
                    &[
                        ("site", &backup.site),
                        ("agent", &backup.agent),
                        ("job", &backup.name),
                        ("kind", &backup.kind),
                    ],
                    value,
                );
            }
        }
    }
}

/// A count from a readable folder's scan.
fn local_value(backup: &BackupStatus, get: fn(&LocalBackup) -> u64) -> Option<f64> {
    backup
        .local
        .as_ref()
        .filter(|l| l.error.is_none())
        .map(|l| get(l) as f64)
}
