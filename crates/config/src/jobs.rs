//! Scheduled jobs and backups in the controller config: what runs where,
//! when, under which run policy, and how fresh each backup must be.

use std::collections::HashMap;
use std::time::Duration;

use dicops_core::backoff::Backoff;
use dicops_core::jobs::{Overlap, RunPolicy};
use dicops_core::schedule::Schedule;
use serde::Deserialize;

use crate::Checker;

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
}

impl JobKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Command { .. } => "command",
            JobKind::Backup { .. } => "backup",
        }
    }

    /// The name of the agent's command the job runs.
    pub fn command(&self) -> &str {
        match self {
            JobKind::Command { command } | JobKind::Backup { command, .. } => command,
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
    ($(#[$meta:meta])* $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            name: String,
            agent: String,
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
        command: String,
    }
);

raw_with_policy!(
    /// A backup: `run: COMMAND` (scheduled here, run by the agent) or
    /// `watch: WATCH` (made by another tool, watched by the agent).
    RawBackup {
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
    agents: &HashMap<&str, usize>,
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
    agents: &HashMap<&str, usize>,
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
    (jobs, watches)
}
