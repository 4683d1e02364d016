//! Scheduled jobs in the controller config: what runs where, when, and
//! under which run policy.

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
}

impl JobKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Command { .. } => "command",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    name: String,
    agent: String,
    command: String,
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

/// Validates every job; `agents` is the inventory (id -> index).
pub(crate) fn validate_jobs(
    check: &mut Checker<'_>,
    raw: Vec<RawJob>,
    agents: &HashMap<&str, usize>,
) -> Vec<JobConfig> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, job) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("jobs[{i}].{field}");
        check.id(&at("name"), &job.name, "job name");
        if let Some(first) = seen.insert(job.name.clone(), i) {
            check.problem(
                &at("name"),
                format!("duplicate job {:?} (first declared at jobs[{first}])", job.name),
            );
        }
        if !agents.contains_key(job.agent.as_str()) {
            check.problem(
                &at("agent"),
                format!(
                    "job {:?} names agent {:?}, which is not under `agents:`",
                    job.name, job.agent
                ),
            );
        }
        check.id(&at("command"), &job.command, "command name");
        let schedule = job.schedule.as_deref().and_then(|text| match Schedule::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                check.problem(&at("schedule"), format!("job {:?}: {e}", job.name));
                None
            }
        });
        let defaults = RunPolicy::default();
        let overlap = match job.overlap.as_deref() {
            None | Some("skip") => Overlap::Skip,
            Some("queue") => Overlap::Queue,
            Some(other) => {
                check.problem(&at("overlap"), format!("{other:?} is not `skip` or `queue`"));
                Overlap::Skip
            }
        };
        let initial = check.duration(
            &at("retry_backoff"),
            job.retry_backoff.as_deref(),
            defaults.retry_backoff.initial,
        );
        let max = check.duration(
            &at("retry_backoff_max"),
            job.retry_backoff_max.as_deref(),
            defaults.retry_backoff.max.max(initial),
        );
        let jitter = match job.jitter.as_deref() {
            Some("0") | Some("0s") => Duration::ZERO,
            other => check.duration(&at("jitter"), other, Duration::ZERO),
        };
        let policy = RunPolicy {
            catch_up: job.catch_up.unwrap_or(defaults.catch_up),
            overlap,
            max_runtime: check.duration(&at("max_runtime"), job.max_runtime.as_deref(), defaults.max_runtime),
            retries: job.retries.unwrap_or(defaults.retries),
            retry_backoff: Backoff {
                initial,
                max,
                ..defaults.retry_backoff
            },
            jitter,
        };
        jobs.push(JobConfig {
            name: job.name,
            agent: job.agent,
            kind: JobKind::Command { command: job.command },
            schedule,
            policy,
        });
    }
    jobs
}
