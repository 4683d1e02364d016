//! Scheduled jobs and backups in the controller config: what runs where,
//! when, under which run policy, and how fresh each backup must be.

use std::collections::HashMap;
use std::time::Duration;

use dicops_core::backoff::Backoff;
use dicops_core::jobs::{Overlap, RunPolicy};
use dicops_core::retention::RetentionPolicy;
use dicops_core::schedule::Schedule;
use serde::Deserialize;

use crate::{Checker, RawKeep};

/// A validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    pub name: String,
    /// The agent that runs it.
    pub agent: String,
    pub kind: JobKind,
    /// None: runs only when asked (`dicops run`).
    pub schedule: Option<Schedule>,
    pub policy: RunPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// Runs a command the agent's own config defines under this name; the
    /// controller can never make an agent run anything else.
    Command { command: String },
    /// A backup made by running the agent's command `command`, which must
    /// succeed at least every `max_age`.
    Backup { command: String, max_age: Duration },
    /// A pull of a source agent's exported folder into a snapshot under a
    /// root of the job's agent (the destination), in another site.
    Replication(Box<ReplicationSpec>),
    /// Re-reading the snapshots of replication job `replication` at its
    /// destination (the job's agent).
    Verify {
        replication: String,
        sample_percent: u32,
        repair: bool,
    },
}

/// What a replication job copies, where to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSpec {
    pub source_agent: String,
    /// The name of the folder in the source agent's `exports:`.
    pub export: String,
    /// The name of the folder in the destination agent's `roots:`.
    pub root: String,
    /// The objective: the newest snapshot's source state must be younger.
    pub max_lag: Option<Duration>,
    /// Snapshots kept at the destination.
    pub retention: RetentionPolicy,
    /// Bytes per second on the wire for this job; None: no limit of its own.
    pub bandwidth: Option<u64>,
    pub compression: Compression,
    /// Re-read every published file and compare with the manifest.
    pub verify: bool,
    /// A transfer that moves no byte for this long is aborted and retried.
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd where it pays (a chunk that does not shrink travels raw).
    Auto,
    None,
}

impl JobKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Command { .. } => "command",
            JobKind::Backup { .. } => "backup",
            JobKind::Replication(_) => "replication",
            JobKind::Verify { .. } => "verify",
        }
    }

    /// The name of the agent's command the job runs, if it runs one.
    pub fn command(&self) -> Option<&str> {
        match self {
            JobKind::Command { command } | JobKind::Backup { command, .. } => Some(command),
            JobKind::Replication(_) | JobKind::Verify { .. } => None,
        }
    }

    pub fn is_backup(&self) -> bool {
        matches!(self, JobKind::Backup { .. })
    }
}

/// A backup made by another tool (a database's own dump job, a backup
/// appliance): the agent watches a folder its own config names under
/// `watches:`, and the newest file there must be younger than `max_age`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBackup {
    pub name: String,
    pub agent: String,
    /// The name of the watch in the agent's config.
    pub watch: String,
    pub max_age: Duration,
}

macro_rules! raw_with_policy {
    ($(#[$meta:meta])* $name:ident { $($required:ident: $rty:ty,)* ; $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            name: String,
            $($required: $rty,)*
            $(#[serde(default)] $field: $ty,)*
            #[serde(default)]
            schedule: Option<String>,
            #[serde(default)]
            catch_up: Option<bool>,
            #[serde(default)]
            overlap: Option<String>,
            #[serde(default)]
            max_runtime: Option<String>,
            #[serde(default)]
            retries: Option<u32>,
            #[serde(default)]
            retry_backoff: Option<String>,
            #[serde(default)]
            retry_backoff_max: Option<String>,
            #[serde(default)]
            jitter: Option<String>,
        }

        impl $name {
            fn policy_fields(&self) -> PolicyFields<'_> {
                PolicyFields {
                    catch_up: self.catch_up,
                    overlap: self.overlap.as_deref(),
                    max_runtime: self.max_runtime.as_deref(),
                    retries: self.retries,
                    retry_backoff: self.retry_backoff.as_deref(),
                    retry_backoff_max: self.retry_backoff_max.as_deref(),
                    jitter: self.jitter.as_deref(),
                }
            }
        }
    };
}

raw_with_policy!(
    /// A job running an agent's command (`command: NAME`).
    RawJob {
        agent: String,
        command: String,
        ;
    }
);

raw_with_policy!(
    /// A verify job: re-reads a replication's snapshots at its destination.
    RawVerify {
        replication: String,
        ;
        sample: Option<String>,
        repair: Option<bool>,
    }
);

raw_with_policy!(
    /// A replication: from a source agent's export to a destination
    /// agent's root, in another site.
    RawReplication {
        ;
        source: Option<RawSource>,
        destination: Option<RawDestination>,
        max_lag: Option<String>,
        retention: Option<RawKeep>,
        bandwidth: Option<String>,
        compression: Option<String>,
        verify: Option<bool>,
        stall_timeout: Option<String>,
    }
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    agent: String,
    export: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDestination {
    agent: String,
    root: String,
}

raw_with_policy!(
    /// A backup: `run: COMMAND` (scheduled here, run by the agent) or
    /// `watch: WATCH` (made by another tool, watched by the agent).
    RawBackup {
        agent: String,
        ;
        run: Option<String>,
        watch: Option<String>,
        max_age: Option<String>,
    }
);

/// The run policy fields as written (serde's flatten would lose
/// `deny_unknown_fields` and the error positions, so each raw struct
/// carries them and lends them here).
struct PolicyFields<'a> {
    catch_up: Option<bool>,
    overlap: Option<&'a str>,
    max_runtime: Option<&'a str>,
    retries: Option<u32>,
    retry_backoff: Option<&'a str>,
    retry_backoff_max: Option<&'a str>,
    jitter: Option<&'a str>,
}

impl PolicyFields<'_> {
    fn any_set(&self) -> Option<&'static str> {
        [
            (self.catch_up.is_some(), "catch_up"),
            (self.overlap.is_some(), "overlap"),
            (self.max_runtime.is_some(), "max_runtime"),
            (self.retries.is_some(), "retries"),
            (self.retry_backoff.is_some(), "retry_backoff"),
            (self.retry_backoff_max.is_some(), "retry_backoff_max"),
            (self.jitter.is_some(), "jitter"),
        ]
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, name)| name)
    }
}

fn validate_policy(check: &mut Checker<'_>, at: &dyn Fn(&str) -> String, raw: &PolicyFields<'_>) -> RunPolicy {
    let defaults = RunPolicy::default();
    let overlap = match raw.overlap {
        None | Some("skip") => Overlap::Skip,
        Some("queue") => Overlap::Queue,
        Some(other) => {
            check.problem(&at("overlap"), format!("{other:?} is not `skip` or `queue`"));
            Overlap::Skip
        }
    };
    let initial = check.duration(&at("retry_backoff"), raw.retry_backoff, defaults.retry_backoff.initial);
    let max = check.duration(
        &at("retry_backoff_max"),
        raw.retry_backoff_max,
        defaults.retry_backoff.max.max(initial),
    );
    let jitter = match raw.jitter {
        Some("0") | Some("0s") => Duration::ZERO,
        other => check.duration(&at("jitter"), other, Duration::ZERO),
    };
    RunPolicy {
        catch_up: raw.catch_up.unwrap_or(defaults.catch_up),
        overlap,
        max_runtime: check.duration(&at("max_runtime"), raw.max_runtime, defaults.max_runtime),
        retries: raw.retries.unwrap_or(defaults.retries),
        retry_backoff: Backoff {
            initial,
            max,
            ..defaults.retry_backoff
        },
        jitter,
    }
}

fn validate_schedule(check: &mut Checker<'_>, field: &str, name: &str, raw: Option<&str>) -> Option<Schedule> {
    raw.and_then(|text| match Schedule::parse(text) {
        Ok(s) => Some(s),
        Err(e) => {
            check.problem(field, format!("job {name:?}: {e}"));
            None
        }
    })
}

/// Checks a job's or backup's name (unique across both lists) and agent.
fn check_name_and_agent(
    check: &mut Checker<'_>,
    seen: &mut HashMap<String, String>,
    at: &dyn Fn(&str) -> String,
    name: &str,
    agent: &str,
    agents: &HashMap<&str, &str>,
) {
    check.id(&at("name"), name, "job name");
    if let Some(first) = seen.insert(name.to_string(), at("name")) {
        check.problem(
            &at("name"),
            format!("duplicate job or backup name {name:?} (first declared at {first})"),
        );
    }
    if !agents.contains_key(agent) {
        check.problem(
            &at("agent"),
            format!("{name:?} names agent {agent:?}, which is not under `agents:`"),
        );
    }
}

/// Validates every job and backup; `agents` is the inventory (id -> index).
/// Run backups become jobs of kind `Backup`; watch backups are returned
/// apart, as nothing schedules them.
pub(crate) fn validate_jobs(
    check: &mut Checker<'_>,
    raw_jobs: Vec<RawJob>,
    raw_backups: Vec<RawBackup>,
    raw_replications: Vec<RawReplication>,
    raw_verifications: Vec<RawVerify>,
    agents: &HashMap<&str, &str>,
) -> (Vec<JobConfig>, Vec<WatchBackup>) {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut jobs = Vec::new();
    let mut watches = Vec::new();
    for (i, job) in raw_jobs.into_iter().enumerate() {
        let at = |field: &str| format!("jobs[{i}].{field}");
        check_name_and_agent(check, &mut seen, &at, &job.name, &job.agent, agents);
        check.id(&at("command"), &job.command, "command name");
        let schedule = validate_schedule(check, &at("schedule"), &job.name, job.schedule.as_deref());
        let policy = validate_policy(check, &at, &job.policy_fields());
        jobs.push(JobConfig {
            name: job.name,
            agent: job.agent,
            kind: JobKind::Command { command: job.command },
            schedule,
            policy,
        });
    }
    for (i, backup) in raw_backups.into_iter().enumerate() {
        let at = |field: &str| format!("backups[{i}].{field}");
        check_name_and_agent(check, &mut seen, &at, &backup.name, &backup.agent, agents);
        let max_age = match backup.max_age.as_deref() {
            None => {
                check.problem(
                    &at("name"),
                    format!(
                        "backup {:?} needs `max_age`, its freshness objective (e.g. 26h for a daily backup)",
                        backup.name
                    ),
                );
                Duration::from_secs(86400)
            }
            some => check.duration(&at("max_age"), some, Duration::from_secs(86400)),
        };
        match (&backup.run, &backup.watch) {
            (Some(command), None) => {
                check.id(&at("run"), command, "command name");
                let schedule = validate_schedule(check, &at("schedule"), &backup.name, backup.schedule.as_deref());
                let policy = validate_policy(check, &at, &backup.policy_fields());
                jobs.push(JobConfig {
                    name: backup.name,
                    agent: backup.agent,
                    kind: JobKind::Backup {
                        command: command.clone(),
                        max_age,
                    },
                    schedule,
                    policy,
                });
            }
            (None, Some(watch)) => {
                check.id(&at("watch"), watch, "watch name");
                let scheduled = backup.schedule.is_some().then_some("schedule");
                if let Some(field) = scheduled.or(backup.policy_fields().any_set()) {
                    check.problem(
                        &at(field),
                        format!(
                            "backup {:?} watches backups made by another tool: dicops does not schedule it, so `{field}` does not apply",
                            backup.name
                        ),
                    );
                }
                watches.push(WatchBackup {
                    name: backup.name,
                    agent: backup.agent,
                    watch: watch.clone(),
                    max_age,
                });
            }
            (Some(_), Some(_)) => check.problem(
                &at("watch"),
                format!(
                    "backup {:?} has both `run` and `watch`: a backup is either run by dicops or made by another tool",
                    backup.name
                ),
            ),
            (None, None) => check.problem(
                &at("name"),
                format!(
                    "backup {:?} needs `run: COMMAND` (a command in the agent's config) or `watch: WATCH` (a watch in the agent's config)",
                    backup.name
                ),
            ),
        }
    }
    for (i, raw) in raw_replications.into_iter().enumerate() {
        let at = |field: &str| format!("replications[{i}].{field}");
        if let Some(job) = validate_replication(check, &mut seen, &at, raw, agents) {
            jobs.push(job);
        }
    }
    for (i, raw) in raw_verifications.into_iter().enumerate() {
        let at = |field: &str| format!("verifications[{i}].{field}");
        let destination = jobs.iter().find_map(|j| match &j.kind {
            JobKind::Replication(_) if j.name == raw.replication => Some(j.agent.clone()),
            _ => None,
        });
        let Some(destination) = destination else {
            check.problem(
                &at("replication"),
                format!("{:?} is not a replication job under `replications:`", raw.replication),
            );
            continue;
        };
        check_name_and_agent(check, &mut seen, &at, &raw.name, &destination, agents);
        let sample_percent = match raw.sample.as_deref() {
            None => 100,
            Some(text) => match text.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok()) {
                Some(p) if (1..=100).contains(&p) => p,
                _ => {
                    check.problem(&at("sample"), format!("{text:?} is not a percentage from 1% to 100%"));
                    100
                }
            },
        };
        let schedule = validate_schedule(check, &at("schedule"), &raw.name, raw.schedule.as_deref());
        let policy = validate_policy(check, &at, &raw.policy_fields());
        jobs.push(JobConfig {
            name: raw.name,
            agent: destination,
            kind: JobKind::Verify {
                replication: raw.replication,
                sample_percent,
                repair: raw.repair.unwrap_or(true),
            },
            schedule,
            policy,
        });
    }
    (jobs, watches)
}

fn validate_replication(
    check: &mut Checker<'_>,
    seen: &mut HashMap<String, String>,
    at: &dyn Fn(&str) -> String,
    raw: RawReplication,
    agents: &HashMap<&str, &str>,
) -> Option<JobConfig> {
    let (Some(source), Some(destination)) = (&raw.source, &raw.destination) else {
        check.problem(
            &at("name"),
            format!(
                "replication {:?} needs `source: {{agent, export}}` and `destination: {{agent, root}}`",
                raw.name
            ),
        );
        return None;
    };
    check_name_and_agent(check, seen, at, &raw.name, &destination.agent, agents);
    if !agents.contains_key(source.agent.as_str()) {
        check.problem(
            &at("source.agent"),
            format!(
                "{:?} names agent {:?}, which is not under `agents:`",
                raw.name, source.agent
            ),
        );
    }
    check.id(&at("source.export"), &source.export, "export name");
    check.id(&at("destination.root"), &destination.root, "root name");
    if let (Some(from), Some(to)) = (
        agents.get(source.agent.as_str()),
        agents.get(destination.agent.as_str()),
    ) {
        if from == to {
            check.problem(
                &at("destination.agent"),
                format!(
                    "{:?} copies from {} to {}, both in site {from}: a replica in the same site does not survive the loss of that site",
                    raw.name, source.agent, destination.agent
                ),
            );
        }
    }
    let schedule = validate_schedule(check, &at("schedule"), &raw.name, raw.schedule.as_deref());
    let policy = validate_policy(check, at, &raw.policy_fields());
    let max_lag = raw
        .max_lag
        .as_deref()
        .map(|text| check.duration(&at("max_lag"), Some(text), Duration::from_secs(86400)));
    let compression = match raw.compression.as_deref() {
        None | Some("auto") | Some("zstd") => Compression::Auto,
        Some("none") => Compression::None,
        Some(other) => {
            check.problem(&at("compression"), format!("{other:?} is not `auto`, `zstd` or `none`"));
            Compression::Auto
        }
    };
    let bandwidth = raw.bandwidth.as_deref().map(|text| {
        let per_second = text.strip_suffix("/s").unwrap_or(text);
        check.bytes(&at("bandwidth"), Some(per_second), u64::MAX)
    });
    if raw.retention.as_ref().is_some_and(|r| r.wait_for_replication.is_some()) {
        check.problem(
            &at("retention.wait_for_replication"),
            "applies to backups kept on an agent, not to snapshots in the other site",
        );
    }
    let retention = raw.retention.as_ref().map(RawKeep::policy).unwrap_or_default();
    let stall_timeout = check.duration(
        &at("stall_timeout"),
        raw.stall_timeout.as_deref(),
        Duration::from_secs(300),
    );
    Some(JobConfig {
        name: raw.name,
        agent: destination.agent.clone(),
        kind: JobKind::Replication(Box::new(ReplicationSpec {
            source_agent: source.agent.clone(),
            export: source.export.clone(),
            root: destination.root.clone(),
            max_lag,
            retention,
            bandwidth,
            compression,
            verify: raw.verify.unwrap_or(false),
            stall_timeout,
        })),
        schedule,
        policy,
    })
}
