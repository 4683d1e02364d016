//! The one scheduler of the deployment: fires jobs from their schedules,
//! hands tasks to agents over their own connections, records every run.
//!
//! Decisions (when, overlap, retry, catch-up) are made by the pure
//! `dicops_core::jobs::JobTimer`; this module does the bookkeeping around
//! it: the database, the per-agent outboxes that long polls drain, the
//! site-pair concurrency limits, and the deadlines.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use dicops_config::{ControllerConfig, JobConfig, JobKind};
use dicops_core::jobs::{Action, ActiveRun, JobTimer, Outcome, Trigger};
use dicops_proto::{
    JobStatus, KeepPolicy, PullTask, ReplicationStats, RunInfo, RunProgress, ServeGrant, Task, TaskKind, TaskOutcome,
    TaskPoll, TaskResult,
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::store::{JobSummary, NewRun, RunEnd, RunStatus, Store, StoreError};

fn to_time(unix: f64) -> DateTime<Utc> {
    let millis = (unix * 1000.0).round() as i64;
    Utc.timestamp_millis_opt(millis).single().unwrap_or_default()
}

/// A run status that ends a run without success, which a retry may follow.
fn ended_without_success(status: &str) -> bool {
    matches!(status, "failed" | "timed_out" | "interrupted")
}

fn to_unix(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

/// Refusals of scheduler operations, each with a stable reason.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("no job named {0:?}")]
    UnknownJob(String),
    #[error("job {job:?} is already running (run {run})")]
    AlreadyRunning { job: String, run: i64 },
    #[error("run {run} belongs to {owner}, not to agent {agent}")]
    NotYourRun { run: i64, owner: String, agent: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SchedulerError {
    pub fn reason(&self) -> &'static str {
        match self {
            SchedulerError::UnknownJob(_) => "unknown_job",
            SchedulerError::AlreadyRunning { .. } => "already_running",
            SchedulerError::NotYourRun { .. } => "not_your_run",
            SchedulerError::Store(_) => "database",
        }
    }
}

/// A run created but not yet handed to its agent (jitter, or waiting for
/// a free slot between its pair of sites).
#[derive(Debug, Clone)]
struct Pending {
    run_id: i64,
    job: String,
    agent: String,
    pair: (String, String),
    ready_at: DateTime<Utc>,
    deadline: f64,
    kind: TaskKind,
    attempt: u32,
    /// Counts against its agent's limit of concurrent backups.
    backup: bool,
}

struct Entry {
    config: JobConfig,
    site: String,
    timer: JobTimer,
    /// The run this job has going (queued, pending or on its agent).
    run: Option<i64>,
    /// Its site pair slot is taken while on the agent.
    holds_slot: bool,
    last_run_at: Option<f64>,
    last_success_at: Option<f64>,
    /// The last finished run and the last success, for metrics and the
    /// backups view.
    last_end: JobSummary,
    /// What the last successful replication run published.
    last_replication: Option<ReplicationStats>,
    /// Files the last verify run could not repair.
    last_verify_lost: Option<u64>,
    /// The timer's last fire as last saved.
    saved_fire: Option<DateTime<Utc>>,
}

struct Dispatched {
    job: String,
    pair: (String, String),
    agent: String,
    taken_at: Option<DateTime<Utc>>,
    backup: bool,
    /// For a replication: the job's own bandwidth limit (None: only the
    /// link's); it shares its link's budget with the others over it.
    pull_limit: Option<Option<u64>>,
}

struct Inner {
    config: Arc<ControllerConfig>,
    jobs: BTreeMap<String, Entry>,
    pending: Vec<Pending>,
    outbox: HashMap<String, Vec<Task>>,
    cancel: HashMap<String, Vec<i64>>,
    /// Grants waiting for the source agents of replication runs.
    grants: HashMap<String, Vec<ServeGrant>>,
    slots: HashMap<(String, String), usize>,
    /// Backup runs on each agent.
    agent_backups: HashMap<String, usize>,
    /// What each run's agent last said about its progress.
    progress: HashMap<i64, RunProgress>,
    /// Runs taken by their agents whose start is not written yet: written
    /// in one transaction per tick, not one fsync per task in the poll path.
    taken: Vec<(i64, f64)>,
    /// Runs given a slot: their job, pair, agent, and when the agent took
    /// the task (None while it waits in the outbox).
    on_agent: HashMap<i64, Dispatched>,
}

pub struct Scheduler {
    store: Arc<Store>,
    inner: Mutex<Inner>,
    /// Wakes the scheduler loop (a manual run, a result, a reload).
    pub wake: Notify,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// The data port each agent announced in its reports.
    data_urls: Mutex<HashMap<String, String>>,
}

/// The state of one job for metrics.
pub struct JobMetrics {
    pub job: String,
    pub site: String,
    pub agent: String,
    pub kind: &'static str,
    pub next_run: Option<f64>,
    pub expected_next_run: Option<f64>,
    pub last_run: Option<f64>,
    pub ever_succeeded: bool,
    pub running: bool,
    pub paused: bool,
    pub running_run: Option<i64>,
    /// The freshness objective of a backup job.
    pub max_age: Option<Duration>,
    /// The agent's command the job runs.
    pub command: String,
    pub last_success: Option<f64>,
    pub last_end: JobSummary,
    /// A replication job: its objective, last published snapshot and the
    /// transfer going on.
    pub max_lag: Option<Duration>,
    pub last_replication: Option<ReplicationStats>,
    pub bytes_remaining: Option<u64>,
    pub source: Option<(String, String)>,
    pub export: Option<String>,
    /// A verify job: files its last run could not repair.
    pub verify_lost: Option<u64>,
}

/// The source a task reads from, for its grant and data URL: replications,
/// and verify runs that may repair. (source agent, export, URL to fill.)
fn source_of(kind: &mut TaskKind) -> Option<(String, String, &mut String)> {
    match kind {
        TaskKind::Pull(p) => Some((p.source_agent.clone(), p.export.clone(), &mut p.source_url)),
        TaskKind::Verify(v) if v.repair => Some((v.source_agent.clone(), v.export.clone(), &mut v.source_url)),
        _ => None,
    }
}

/// The task a job's run sends, and the pair of sites whose slot it takes:
/// (source, destination) for a replication, the agent's site twice otherwise.
fn task_kind(config: &ControllerConfig, job: &JobConfig, site: &str) -> (TaskKind, (String, String)) {
    match &job.kind {
        JobKind::Command { command } | JobKind::Backup { command, .. } => (
            TaskKind::Command { name: command.clone() },
            (site.to_string(), site.to_string()),
        ),
        JobKind::Replication(spec) => {
            let r = &spec.retention;
            let task = PullTask {
                source_agent: spec.source_agent.clone(),
                // Filled in at hand-over, from what the source announced.
                source_url: String::new(),
                export: spec.export.clone(),
                root: spec.root.clone(),
                compress: spec.compression == dicops_config::Compression::Auto,
                bandwidth: spec.bandwidth,
                verify: spec.verify,
                stall_timeout_seconds: spec.stall_timeout.as_secs(),
                retention: KeepPolicy {
                    keep_last: r.keep_last,
                    keep_hourly: r.keep_hourly,
                    keep_daily: r.keep_daily,
                    keep_weekly: r.keep_weekly,
                    keep_monthly: r.keep_monthly,
                    keep_yearly: r.keep_yearly,
                },
                timezone: config.timezone.name().to_string(),
            };
            let source_site = config.site_of(&spec.source_agent).unwrap_or_default().to_string();
            (TaskKind::Pull(task), (source_site, site.to_string()))
        }
        JobKind::Verify {
            replication,
            sample_percent,
            repair,
        } => {
            // Validation made sure the replication exists.
            let spec = config.job(replication).and_then(|j| match &j.kind {
                JobKind::Replication(spec) => Some(spec.as_ref()),
                _ => None,
            });
            let (source_agent, export, root) = spec
                .map(|s| (s.source_agent.clone(), s.export.clone(), s.root.clone()))
                .unwrap_or_default();
            let task = dicops_proto::VerifyTask {
                replication: replication.clone(),
                root,
                sample_percent: *sample_percent,
                repair: *repair,
                source_url: String::new(),
                source_agent,
                export,
            };
            (TaskKind::Verify(task), (site.to_string(), site.to_string()))
        }
    }
}

fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl Scheduler {
    /// Loads the jobs' memory from the database, fails the runs a previous
    /// controller process left open, and catches up missed fires.
    pub fn start(
        store: Arc<Store>,
        config: Arc<ControllerConfig>,
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> Result<Scheduler, StoreError> {
        // Runs a previous process left open are followed up, not failed: the
        // agent may be running them or holding their result in its spool.
        let mut adopt: HashMap<String, RunInfo> = HashMap::new();
        for run in store.open_runs()? {
            let job_here = config.job(&run.job).is_some_and(|j| j.agent == run.agents);
            if job_here && !adopt.contains_key(&run.job) {
                adopt.insert(run.job.clone(), run);
                continue;
            }
            let error = if job_here {
                "a newer run of the same job is being followed; this one was left open by a controller restart"
            } else {
                "the job was removed from the config (or moved to another agent) while this run was open"
            };
            if store.finish_run(
                run.id,
                RunStatus::Failed,
                &RunEnd {
                    error: Some(error.into()),
                    ..RunEnd::default()
                },
                to_unix(now),
            )? {
                tracing::warn!(run = run.id, job = %run.job, error, "open run recorded as failed");
                metrics.job_runs.with_label_values(&[&run.job, "failed"]).inc();
            }
        }
        let scheduler = Scheduler {
            store,
            inner: Mutex::new(Inner {
                config: config.clone(),
                jobs: BTreeMap::new(),
                pending: Vec::new(),
                outbox: HashMap::new(),
                cancel: HashMap::new(),
                grants: HashMap::new(),
                slots: HashMap::new(),
                agent_backups: HashMap::new(),
                progress: HashMap::new(),
                on_agent: HashMap::new(),
                taken: Vec::new(),
            }),
            wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            data_urls: Mutex::new(HashMap::new()),
        };
        scheduler.configure(config, metrics, now, adopt)?;
        Ok(scheduler)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiter(&self, agent: &str) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters
            .entry(agent.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Applies a (new) config: adds, updates and removes jobs. Runs going
    /// on keep going; a changed schedule takes effect from now.
    pub fn apply_config(
        &self,
        config: Arc<ControllerConfig>,
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.configure(config, metrics, now, HashMap::new())
    }

    /// `adopt`: per job, the open run a previous controller process left.
    fn configure(
        &self,
        config: Arc<ControllerConfig>,
        metrics: &Metrics,
        now: DateTime<Utc>,
        mut adopt: HashMap<String, RunInfo>,
    ) -> Result<(), StoreError> {
        let mut summaries: HashMap<String, JobSummary> = self
            .store
            .job_summaries()?
            .into_iter()
            .map(|summary| (summary.job.clone(), summary))
            .collect();
        let mut inner = self.lock();
        let tz = config.timezone;
        let tz_changed = inner.config.timezone != tz;
        inner.jobs.retain(|name, _| config.job(name).is_some());
        let mut actions = Vec::new();
        for job in &config.jobs {
            let site = config.site_of(&job.agent).unwrap_or_default().to_string();
            match inner.jobs.get_mut(&job.name) {
                Some(entry) => {
                    if entry.config.schedule != job.schedule || tz_changed {
                        entry.timer.next_fire = job.schedule.as_ref().and_then(|s| s.next_after(now, tz));
                    }
                    entry.config = job.clone();
                    entry.site = site;
                }
                None => {
                    let row = self.store.job(&job.name, job.kind.as_str(), to_unix(now))?;
                    let adopted = adopt.remove(&job.name);
                    let active = adopted.as_ref().map(|run| ActiveRun {
                        started: to_time(run.started_at.unwrap_or(run.created_at)),
                        trigger: Trigger::parse(&run.trigger).unwrap_or(Trigger::Schedule),
                        attempt: run.attempt,
                    });
                    let (mut timer, action) = JobTimer::start(
                        job.schedule.as_ref(),
                        tz,
                        &job.policy,
                        row.last_fire.map(to_time),
                        row.paused,
                        active,
                        now,
                    );
                    let summary = summaries.remove(&job.name).unwrap_or_default();
                    // A retry the previous process had pending (it lives in
                    // memory only) comes back from the last run's record,
                    // read only for a job whose last run did not succeed.
                    if adopted.is_none() && summary.last_status.as_deref().is_some_and(ended_without_success) {
                        if let Some(last) = self.store.runs_of(&job.name, 1)?.into_iter().next() {
                            if let (true, Some(ended)) = (ended_without_success(&last.status), last.finished_at) {
                                timer.resume_retry(last.attempt, to_time(ended), &job.policy, random_unit());
                                if let Some((at, attempt)) = timer.retry {
                                    tracing::info!(job = %job.name, run = last.id, attempt, at = %at, "resuming the retry of a run that failed before the restart");
                                }
                            }
                        }
                    }
                    // What the database holds: a catch-up fire differs and gets saved.
                    let saved_fire = row.last_fire.map(to_time);
                    if let Some(run) = &adopted {
                        tracing::info!(job = %job.name, run = run.id, "following a run left open by the previous controller process");
                        let pair = (site.clone(), site.clone());
                        *inner.slots.entry(pair.clone()).or_default() += 1;
                        if job.kind.is_backup() {
                            *inner.agent_backups.entry(job.agent.clone()).or_default() += 1;
                        }
                        // As if just taken: the agent's next poll tells
                        // whether it holds the run; if not, it fails at once.
                        inner.on_agent.insert(
                            run.id,
                            Dispatched {
                                job: job.name.clone(),
                                pair,
                                agent: job.agent.clone(),
                                taken_at: Some(now),
                                backup: job.kind.is_backup(),
                                pull_limit: match &job.kind {
                                    JobKind::Replication(spec) => Some(spec.bandwidth),
                                    _ => None,
                                },
                            },
                        );
                    }
                    inner.jobs.insert(
                        job.name.clone(),
                        Entry {
                            config: job.clone(),
                            site,
                            timer,
                            run: adopted.as_ref().map(|r| r.id),
                            holds_slot: adopted.is_some(),
                            last_run_at: summary.last_run,
                            last_success_at: summary.last_success,
                            last_replication: summary
                                .last_success_replication
                                .as_deref()
                                .and_then(|json| serde_json::from_str(json).ok()),
                            last_verify_lost: None,
                            last_end: summary,
                            saved_fire,
                        },
                    );
                    if let Some(action) = action {
                        tracing::info!(job = %job.name, "a fire was missed while the controller was down: catching up once");
                        actions.push((job.name.clone(), action));
                    }
                }
            }
        }
        inner.config = config;
        self.apply_actions(&mut inner, actions, metrics, now)?;
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// Turns timer actions into runs (one transaction) and pending tasks.
    fn apply_actions(
        &self,
        inner: &mut Inner,
        actions: Vec<(String, Action)>,
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut starts = Vec::new();
        for (job, action) in actions {
            match action {
                Action::Skip { reason, fire } => {
                    metrics.job_skipped.with_label_values(&[&job, reason.as_str()]).inc();
                    tracing::info!(%job, reason = reason.as_str(), fire = %fire, "fire skipped");
                }
                Action::Start { trigger, attempt, at } => starts.push((job, trigger, attempt, at)),
            }
        }
        let fires: Vec<(String, f64)> = inner
            .jobs
            .iter_mut()
            .filter(|(_, e)| e.timer.last_fire != e.saved_fire)
            .filter_map(|(name, e)| {
                e.saved_fire = e.timer.last_fire;
                e.timer.last_fire.map(|f| (name.clone(), to_unix(f)))
            })
            .collect();
        if starts.is_empty() && fires.is_empty() {
            return Ok(());
        }
        let new_runs: Vec<NewRun<'_>> = starts
            .iter()
            .filter_map(|(job, trigger, attempt, _)| {
                let entry = inner.jobs.get(job)?;
                Some(NewRun {
                    job: job.as_str(),
                    kind: entry.config.kind.as_str(),
                    agents: entry.config.agent.as_str(),
                    trigger: trigger.as_str(),
                    attempt: *attempt,
                })
            })
            .collect();
        let fire_refs: Vec<(&str, f64)> = fires.iter().map(|(j, f)| (j.as_str(), *f)).collect();
        let ids = self.store.record_tick(&new_runs, &fire_refs, to_unix(now))?;
        let config = inner.config.clone();
        for ((job, trigger, attempt, at), run_id) in starts.into_iter().zip(ids) {
            let Some(entry) = inner.jobs.get_mut(&job) else {
                continue;
            };
            entry.run = Some(run_id);
            entry.last_run_at = Some(to_unix(at));
            let (kind, pair) = task_kind(&config, &entry.config, &entry.site);
            let deadline = to_unix(at) + entry.config.policy.max_runtime.as_secs_f64();
            tracing::info!(%job, run = run_id, trigger = trigger.as_str(), attempt, "run created");
            inner.pending.push(Pending {
                run_id,
                job: job.clone(),
                agent: entry.config.agent.clone(),
                pair,
                ready_at: at,
                deadline,
                kind,
                attempt,
                backup: entry.config.kind.is_backup(),
            });
        }
        Ok(())
    }

    /// Advances every job to `now`; returns when something is next due.
    pub fn tick(&self, metrics: &Metrics, now: DateTime<Utc>) -> Result<DateTime<Utc>, StoreError> {
        let mut inner = self.lock();
        if !inner.taken.is_empty() {
            let taken = std::mem::take(&mut inner.taken);
            self.store.mark_running_many(&taken)?;
        }
        let tz = inner.config.timezone;
        let random = random_unit();
        let mut actions = Vec::new();
        let mut timeouts = Vec::new();
        for (name, entry) in inner.jobs.iter_mut() {
            if entry.timer.timed_out(&entry.config.policy, now) {
                if let Some(run) = entry.run {
                    timeouts.push((
                        name.clone(),
                        run,
                        entry.config.agent.clone(),
                        entry.config.policy.max_runtime,
                    ));
                }
            }
            for action in entry
                .timer
                .tick(entry.config.schedule.as_ref(), tz, &entry.config.policy, now, random)
            {
                actions.push((name.clone(), action));
            }
        }
        for (job, run, agent, max_runtime) in timeouts {
            let error = format!(
                "no result from agent {agent} within max_runtime {}s: the run was stopped (the agent is told to cancel it when it next polls)",
                max_runtime.as_secs()
            );
            self.store.finish_run(
                run,
                RunStatus::TimedOut,
                &RunEnd {
                    error: Some(error.clone()),
                    ..RunEnd::default()
                },
                to_unix(now),
            )?;
            tracing::warn!(%job, run, %error, "run timed out");
            let started = inner
                .jobs
                .get(&job)
                .and_then(|e| e.timer.running)
                .map(|r| to_unix(r.started));
            Self::note_end(
                &mut inner,
                metrics,
                &job,
                RunStatus::TimedOut,
                Some(&error),
                started,
                to_unix(now),
                None,
            );
            metrics.job_timeouts.with_label_values(&[&job]).inc();
            inner.cancel.entry(agent.clone()).or_default().push(run);
            inner.pending.retain(|p| p.run_id != run);
            if let Some(tasks) = inner.outbox.get_mut(&agent) {
                tasks.retain(|t| t.run_id != run);
            }
            if let Some(action) = Self::end_run(&mut inner, &job, run, Outcome::TimedOut, None, random, now) {
                actions.push((job.clone(), action));
            }
            self.notify_agent(&agent);
        }
        self.apply_actions(&mut inner, actions, metrics, now)?;
        let refused = self.promote(&mut inner, metrics, now);
        let mut follow_ups = Vec::new();
        for (run, job, error) in refused {
            self.fail_run(&mut inner, metrics, run, &job, &error, now)?;
            if let Some(action) = Self::end_run(&mut inner, &job, run, Outcome::Failed, None, random, now) {
                follow_ups.push((job, action));
            }
        }
        self.apply_actions(&mut inner, follow_ups, metrics, now)?;

        let mut next = now + chrono::Duration::seconds(1);
        for entry in inner.jobs.values() {
            let timer = &entry.timer;
            let candidates = [timer.next_fire, timer.retry.map(|(at, _)| at)];
            for at in candidates.into_iter().flatten() {
                next = next.min(at);
            }
        }
        for p in &inner.pending {
            next = next.min(p.ready_at);
        }
        Ok(next.max(now))
    }

    /// A replication run's rate now: its share of its link's budget (time
    /// windows in the deployment's timezone), within the job's own limit.
    fn bandwidth_of(inner: &Inner, run: i64, now: DateTime<Utc>) -> Option<u64> {
        let dispatched = inner.on_agent.get(&run)?;
        let job_limit = dispatched.pull_limit?;
        let (a, b) = &dispatched.pair;
        let same_link = |d: &Dispatched| {
            d.pull_limit.is_some() && (d.pair == (a.clone(), b.clone()) || d.pair == (b.clone(), a.clone()))
        };
        let running = inner.on_agent.values().filter(|d| same_link(d)).count();
        let link = inner
            .config
            .link_between(a, b)
            .and_then(|budget| budget.rate_at(&now.with_timezone(&inner.config.timezone)));
        dicops_core::links::share(link, running, job_limit)
    }

    /// Records where an agent serves replication data.
    pub fn note_data_url(&self, agent: &str, url: Option<&str>) {
        let mut urls = self.data_urls.lock().unwrap_or_else(|p| p.into_inner());
        match url {
            Some(url) if urls.get(agent).map(String::as_str) != Some(url) => {
                urls.insert(agent.to_string(), url.to_string());
            }
            None => {
                urls.remove(agent);
            }
            _ => {}
        }
    }

    /// Moves pending runs whose time has come, and whose pair of sites has
    /// a free slot, into their agent's outbox. Returns the runs that cannot
    /// be handed out at all, with the reason.
    fn promote(&self, inner: &mut Inner, metrics: &Metrics, now: DateTime<Utc>) -> Vec<(i64, String, String)> {
        let limit = inner.config.concurrent_runs_per_site_pair;
        let mut waiting = Vec::new();
        let mut refused = Vec::new();
        let pending = std::mem::take(&mut inner.pending);
        let mut woken = Vec::new();
        let backup_limit = inner.config.concurrent_backups_per_agent;
        for mut p in pending {
            let used = inner.slots.get(&p.pair).copied().unwrap_or(0);
            let agent_busy = p.backup && inner.agent_backups.get(&p.agent).copied().unwrap_or(0) >= backup_limit;
            if p.ready_at > now || used >= limit || agent_busy {
                waiting.push(p);
                continue;
            }
            if let Some((source_agent, export, source_url)) = source_of(&mut p.kind) {
                let url = self
                    .data_urls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&source_agent)
                    .cloned();
                let Some(url) = url else {
                    refused.push((
                        p.run_id,
                        p.job.clone(),
                        format!(
                            "source agent {source_agent} has not announced a data port: it is down, or its config lacks `data: {{listen, url}}`"
                        ),
                    ));
                    continue;
                };
                *source_url = url;
                inner.grants.entry(source_agent.clone()).or_default().push(ServeGrant {
                    run_id: p.run_id,
                    job: p.job.clone(),
                    export,
                    peer: p.agent.clone(),
                    expires_at: p.deadline,
                });
                woken.push(source_agent);
            }
            *inner.slots.entry(p.pair.clone()).or_default() += 1;
            if p.backup {
                *inner.agent_backups.entry(p.agent.clone()).or_default() += 1;
            }
            if let Some(entry) = inner.jobs.get_mut(&p.job) {
                entry.holds_slot = true;
            }
            metrics
                .dispatch_delay
                .observe((now - p.ready_at).num_milliseconds().max(0) as f64 / 1000.0);
            inner.on_agent.insert(
                p.run_id,
                Dispatched {
                    job: p.job.clone(),
                    pair: p.pair.clone(),
                    agent: p.agent.clone(),
                    taken_at: None,
                    backup: p.backup,
                    pull_limit: match &p.kind {
                        TaskKind::Pull(pull) => Some(pull.bandwidth),
                        TaskKind::Command { .. } | TaskKind::Verify(_) => None,
                    },
                },
            );
            if let TaskKind::Pull(pull) = &mut p.kind {
                pull.bandwidth = Self::bandwidth_of(inner, p.run_id, now);
            }
            inner.outbox.entry(p.agent.clone()).or_default().push(Task {
                run_id: p.run_id,
                job: p.job.clone(),
                attempt: p.attempt,
                deadline: p.deadline,
                kind: p.kind.clone(),
            });
            woken.push(p.agent);
        }
        inner.pending = waiting;
        for agent in woken {
            self.notify_agent(&agent);
        }
        refused
    }

    fn notify_agent(&self, agent: &str) {
        self.waiter(agent).notify_one();
    }

    /// Records a run as failed with `error` (once), counted and remembered.
    fn fail_run(
        &self,
        inner: &mut Inner,
        metrics: &Metrics,
        run: i64,
        job: &str,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let end = RunEnd {
            error: Some(error.to_string()),
            ..RunEnd::default()
        };
        if self.store.finish_run(run, RunStatus::Failed, &end, to_unix(now))? {
            tracing::warn!(%job, run, %error, "run failed");
            Self::note_end(
                inner,
                metrics,
                job,
                RunStatus::Failed,
                Some(error),
                None,
                to_unix(now),
                None,
            );
        }
        Ok(())
    }

    /// Counts a run's end and remembers it for the job's metrics. Call
    /// before `end_run` (which forgets when the run started).
    #[allow(clippy::too_many_arguments)]
    fn note_end(
        inner: &mut Inner,
        metrics: &Metrics,
        job: &str,
        status: RunStatus,
        error: Option<&str>,
        started: Option<f64>,
        finished: f64,
        bytes: Option<u64>,
    ) {
        metrics.job_runs.with_label_values(&[job, status.as_str()]).inc();
        let Some(entry) = inner.jobs.get_mut(job) else {
            return;
        };
        let labels = [entry.site.as_str(), entry.config.agent.as_str(), job, status.as_str()];
        match &entry.config.kind {
            JobKind::Backup { .. } => metrics.backup_runs.with_label_values(&labels).inc(),
            JobKind::Replication(_) => metrics.replication_runs.with_label_values(&labels).inc(),
            JobKind::Command { .. } | JobKind::Verify { .. } => {}
        }
        let end = &mut entry.last_end;
        end.last_status = Some(status.as_str().to_string());
        end.last_error = error.map(str::to_string);
        end.last_duration = started.map(|s| (finished - s).max(0.0));
        if status == RunStatus::Succeeded {
            end.last_success_bytes = bytes;
        }
    }

    /// Bookkeeping when a run ends; returns the timer's follow-up.
    fn end_run(
        inner: &mut Inner,
        job: &str,
        run: i64,
        outcome: Outcome,
        started: Option<f64>,
        random: f64,
        now: DateTime<Utc>,
    ) -> Option<Action> {
        inner.progress.remove(&run);
        if let Some(dispatched) = inner.on_agent.remove(&run) {
            if let Some(used) = inner.slots.get_mut(&dispatched.pair) {
                *used = used.saturating_sub(1);
            }
            if dispatched.backup {
                if let Some(used) = inner.agent_backups.get_mut(&dispatched.agent) {
                    *used = used.saturating_sub(1);
                }
            }
        }
        let entry = inner.jobs.get_mut(job)?;
        if entry.run != Some(run) {
            return None;
        }
        entry.run = None;
        entry.holds_slot = false;
        if outcome == Outcome::Succeeded {
            entry.last_success_at = started.or(entry.last_run_at);
        }
        entry.timer.finished(outcome, &entry.config.policy, now, random)
    }

    /// What an agent's long poll gets right now (possibly nothing).
    pub fn take_tasks(&self, agent: &str, now: DateTime<Utc>) -> Result<TaskPoll, StoreError> {
        let mut inner = self.lock();
        let tasks = inner.outbox.remove(agent).unwrap_or_default();
        let cancel = inner.cancel.remove(agent).unwrap_or_default();
        let grants = inner.grants.remove(agent).unwrap_or_default();
        for task in &tasks {
            inner.taken.push((task.run_id, to_unix(now)));
            if let Some(d) = inner.on_agent.get_mut(&task.run_id) {
                d.taken_at = Some(now);
            }
        }
        Ok(TaskPoll { tasks, cancel, grants })
    }

    /// An agent polls once it has stored every task of its previous poll,
    /// and says which runs it holds. A run it took before this poll but
    /// does not hold was lost (the agent died before storing it, or a
    /// dead connection swallowed it): fail it now rather than at its
    /// deadline, so retries can start.
    pub fn reconcile(
        &self,
        agent: &str,
        held: &[i64],
        poll_started: DateTime<Utc>,
        metrics: &Metrics,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let lost: Vec<(i64, String)> = inner
            .on_agent
            .iter()
            .filter(|(id, d)| d.agent == agent && d.taken_at.is_some_and(|t| t < poll_started) && !held.contains(id))
            .map(|(id, d)| (*id, d.job.clone()))
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let mut actions = Vec::new();
        for (run, job) in lost {
            let error = format!("agent {agent} does not hold this run: the task was lost before the agent stored it (an agent crash or restart, a dropped connection, or a controller restart before the hand-over)");
            self.fail_run(&mut inner, metrics, run, &job, &error, now)?;
            if let Some(action) = Self::end_run(&mut inner, &job, run, Outcome::Failed, None, random_unit(), now) {
                actions.push((job, action));
            }
        }
        self.apply_actions(&mut inner, actions, metrics, now)?;
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// Long poll: waits up to `wait` for work for `agent`.
    pub async fn poll(&self, agent: &str, wait: Duration) -> Result<TaskPoll, StoreError> {
        let waiter = self.waiter(agent);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = waiter.notified();
            let poll = self.take_tasks(agent, Utc::now())?;
            if !poll.tasks.is_empty() || !poll.cancel.is_empty() || !poll.grants.is_empty() {
                return Ok(poll);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(TaskPoll::default());
            }
        }
    }

    /// Records a result sent by `agent`, exactly once.
    pub fn record_result(
        &self,
        agent: &str,
        result: &TaskResult,
        metrics: &Metrics,
        now: DateTime<Utc>,
    ) -> Result<bool, SchedulerError> {
        let Some(run) = self.store.run(result.run_id)? else {
            // Pruned or unknown: acknowledge so the agent's spool drains.
            tracing::warn!(%agent, run = result.run_id, "result for an unknown run acknowledged and dropped");
            return Ok(false);
        };
        if run.agents != agent {
            return Err(SchedulerError::NotYourRun {
                run: run.id,
                owner: run.agents,
                agent: agent.to_string(),
            });
        }
        let (status, outcome) = match result.outcome {
            TaskOutcome::Succeeded => (RunStatus::Succeeded, Outcome::Succeeded),
            TaskOutcome::Failed => (RunStatus::Failed, Outcome::Failed),
            TaskOutcome::Interrupted => (RunStatus::Interrupted, Outcome::Failed),
        };
        let manifest = (!result.artifacts.is_empty())
            .then(|| serde_json::to_string(&result.artifacts).ok())
            .flatten();
        let end = RunEnd {
            error: result.error.clone(),
            exit_code: result.exit_code,
            output_tail: Some(result.output_tail.clone()),
            bytes: result.bytes,
            files: result.files,
            started_at: Some(result.started_at),
            manifest,
            replication: result.replication.as_ref().and_then(|r| serde_json::to_string(r).ok()),
        };
        // The durable write (an fsync) happens outside the scheduler's lock;
        // finish_run is idempotent, so a timeout racing with it is safe.
        let recorded = self.store.finish_run(run.id, status, &end, to_unix(now))?;
        let mut inner = self.lock();
        if !recorded {
            tracing::info!(%agent, run = run.id, "result resent for a run already recorded; acknowledged again");
            return Ok(false);
        }
        Self::note_end(
            &mut inner,
            metrics,
            &run.job,
            status,
            result.error.as_deref(),
            Some(result.started_at),
            result.finished_at,
            result.bytes,
        );
        if let Some(stats) = &result.verify {
            if let Some(entry) = inner.jobs.get_mut(&run.job) {
                let labels = [entry.site.as_str(), entry.config.agent.as_str(), run.job.as_str()];
                metrics
                    .verify_errors
                    .with_label_values(&labels)
                    .inc_by(stats.damaged.len() as u64);
                entry.last_verify_lost = Some(stats.lost.len() as u64);
            }
        }
        if let (Some(stats), TaskOutcome::Succeeded) = (&result.replication, result.outcome) {
            if let Some(entry) = inner.jobs.get_mut(&run.job) {
                let labels = [entry.site.as_str(), entry.config.agent.as_str(), run.job.as_str()];
                metrics
                    .replication_bytes_sent
                    .with_label_values(&labels)
                    .inc_by(stats.bytes_on_wire);
                metrics
                    .replication_bytes_reused
                    .with_label_values(&labels)
                    .inc_by(stats.bytes_reused);
                metrics.replication_files.with_label_values(&labels).inc_by(stats.files);
                entry.last_replication = Some(stats.clone());
            }
        }
        tracing::info!(job = %run.job, run = run.id, status = status.as_str(), error = result.error.as_deref().unwrap_or(""), "run finished");
        let follow_up = Self::end_run(
            &mut inner,
            &run.job,
            run.id,
            outcome,
            Some(result.started_at),
            random_unit(),
            now,
        );
        if let Some(action) = follow_up {
            self.apply_actions(&mut inner, vec![(run.job.clone(), action)], metrics, now)?;
        }
        drop(inner);
        self.wake.notify_one();
        Ok(true)
    }

    /// An operator's "run now".
    pub fn run_now(&self, job: &str, metrics: &Metrics, now: DateTime<Utc>) -> Result<i64, SchedulerError> {
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(job)
            .ok_or_else(|| SchedulerError::UnknownJob(job.to_string()))?;
        let action = entry.timer.run_now(now).map_err(|_| SchedulerError::AlreadyRunning {
            job: job.to_string(),
            run: entry.run.unwrap_or(0),
        })?;
        self.apply_actions(&mut inner, vec![(job.to_string(), action)], metrics, now)?;
        let run = inner.jobs.get(job).and_then(|e| e.run).unwrap_or(0);
        drop(inner);
        self.wake.notify_one();
        Ok(run)
    }

    pub fn set_paused(&self, job: &str, paused: bool) -> Result<(), SchedulerError> {
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(job)
            .ok_or_else(|| SchedulerError::UnknownJob(job.to_string()))?;
        entry.timer.paused = paused;
        self.store.set_paused(job, paused)?;
        Ok(())
    }

    pub fn jobs(&self) -> Result<Vec<JobStatus>, StoreError> {
        let rows: Vec<(JobStatus, bool)> = {
            let inner = self.lock();
            inner
                .jobs
                .iter()
                .map(|(name, e)| {
                    (
                        JobStatus {
                            name: name.clone(),
                            kind: e.config.kind.as_str().to_string(),
                            agent: e.config.agent.clone(),
                            site: e.site.clone(),
                            schedule: e.config.schedule.as_ref().map(|s| s.source().to_string()),
                            paused: e.timer.paused,
                            next_fire: e.timer.next_fire.map(to_unix),
                            running_run: e.run,
                            last_run: None,
                        },
                        e.run.is_some() || e.last_run_at.is_some(),
                    )
                })
                .collect()
        };
        rows.into_iter()
            .map(|(mut job, has_runs)| {
                if has_runs {
                    job.last_run = self.store.runs_of(&job.name, 1)?.into_iter().next();
                }
                Ok(job)
            })
            .collect()
    }

    pub fn history(&self, job: &str, limit: u32) -> Result<Vec<RunInfo>, SchedulerError> {
        if !self.lock().jobs.contains_key(job) && self.store.runs_of(job, 1)?.is_empty() {
            return Err(SchedulerError::UnknownJob(job.to_string()));
        }
        Ok(self.store.runs_of(job, limit)?)
    }

    /// One run, with its manifest and, while it goes, its progress.
    pub fn run(&self, id: i64) -> Result<Option<RunInfo>, StoreError> {
        let mut run = self.store.run(id)?;
        if let Some(run) = run.as_mut() {
            run.progress = self.lock().progress.get(&id).cloned();
        }
        Ok(run)
    }

    /// A running task's progress from its agent. Progress of a run that
    /// already ended is dropped; a run of another agent is refused. For a
    /// replication, the answer is its rate from now on: a reload or a time
    /// window changes it without restarting the transfer.
    pub fn set_progress(&self, agent: &str, progress: RunProgress) -> Result<Option<u64>, SchedulerError> {
        let mut inner = self.lock();
        let Some(owner) = inner.on_agent.get(&progress.run_id).map(|d| d.agent.clone()) else {
            return Ok(None);
        };
        if owner != agent {
            return Err(SchedulerError::NotYourRun {
                run: progress.run_id,
                owner,
                agent: agent.to_string(),
            });
        }
        let run = progress.run_id;
        inner.progress.insert(run, progress);
        Ok(Self::bandwidth_of(&inner, run, Utc::now()))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn job_metrics(&self) -> Vec<JobMetrics> {
        let inner = self.lock();
        let tz = inner.config.timezone;
        inner
            .jobs
            .iter()
            .map(|(name, e)| {
                // When a run should have started by, counted from the last
                // success (or from when the job appeared): alerts compare
                // it with time() instead of hard-coding ages.
                let baseline = e.last_success_at.map(to_time).or(e.saved_fire);
                let expected = match (&e.config.schedule, baseline) {
                    (Some(s), Some(base)) => s.next_after(base, tz).map(to_unix),
                    _ => None,
                };
                JobMetrics {
                    job: name.clone(),
                    site: e.site.clone(),
                    agent: e.config.agent.clone(),
                    kind: e.config.kind.as_str(),
                    next_run: e.timer.next_fire.map(to_unix),
                    expected_next_run: expected,
                    last_run: e.last_run_at,
                    ever_succeeded: e.last_success_at.is_some(),
                    running: e.run.is_some(),
                    paused: e.timer.paused,
                    running_run: e.run,
                    max_age: match &e.config.kind {
                        JobKind::Backup { max_age, .. } => Some(*max_age),
                        JobKind::Command { .. } | JobKind::Replication(_) | JobKind::Verify { .. } => None,
                    },
                    command: e.config.kind.command().unwrap_or_default().to_string(),
                    last_success: e.last_success_at,
                    last_end: e.last_end.clone(),
                    max_lag: match &e.config.kind {
                        JobKind::Replication(spec) => spec.max_lag,
                        _ => None,
                    },
                    last_replication: e.last_replication.clone(),
                    bytes_remaining: e
                        .run
                        .and_then(|run| inner.progress.get(&run))
                        .and_then(|p| p.bytes_remaining),
                    source: match &e.config.kind {
                        JobKind::Replication(spec) => Some((
                            inner.config.site_of(&spec.source_agent).unwrap_or_default().to_string(),
                            spec.source_agent.clone(),
                        )),
                        _ => None,
                    },
                    export: match &e.config.kind {
                        JobKind::Replication(spec) => Some(spec.export.clone()),
                        _ => None,
                    },
                    verify_lost: match &e.config.kind {
                        JobKind::Verify { .. } => e.last_verify_lost,
                        _ => None,
                    },
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(yaml_jobs: &str, limit: usize) -> (tempfile::TempDir, Scheduler, Metrics) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("controller.yaml");
        let text = format!(
            "listen: 127.0.0.1:1\ntls: {{ca: a, cert: b, key: c}}\nstate: {{database: db.sqlite}}\nlimits: {{concurrent_runs_per_site_pair: {limit}}}\nsites: [{{name: dc1}}]\nagents: [{{id: a1, site: dc1}}, {{id: a2, site: dc1}}]\njobs:\n{yaml_jobs}"
        );
        std::fs::write(&path, text).expect("write");
        let config = Arc::new(ControllerConfig::load_without_files(&path).expect("config"));
        let store = Arc::new(Store::open(&config.database).expect("store"));
        let metrics = Metrics::new().expect("metrics");
        let scheduler = Scheduler::start(store, config, &metrics, Utc::now()).expect("start");
        (dir, scheduler, metrics)
    }

    fn result(run_id: i64, job: &str) -> TaskResult {
        TaskResult {
            run_id,
            job: job.into(),
            outcome: TaskOutcome::Succeeded,
            error: None,
            exit_code: Some(0),
            started_at: 1.0,
            finished_at: 2.0,
            output_tail: String::new(),
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
    fn a_site_pair_runs_at_most_its_limit_at_once() {
        let (_dir, s, m) = setup(
            "  - {name: j1, agent: a1, command: x}\n  - {name: j2, agent: a2, command: x}\n",
            1,
        );
        let now = Utc::now();
        let r1 = s.run_now("j1", &m, now).expect("j1");
        let r2 = s.run_now("j2", &m, now).expect("j2");
        s.tick(&m, now).expect("tick");
        let a1 = s.take_tasks("a1", now).expect("a1");
        let a2 = s.take_tasks("a2", now).expect("a2");
        assert_eq!(a1.tasks.len() + a2.tasks.len(), 1, "only one slot between dc1 and dc1");
        let (first, agent, other, other_agent) = if a1.tasks.is_empty() {
            (r2, "a2", r1, "a1")
        } else {
            (r1, "a1", r2, "a2")
        };
        let job = if agent == "a1" { "j1" } else { "j2" };
        assert!(s.record_result(agent, &result(first, job), &m, now).expect("result"));
        s.tick(&m, now).expect("tick");
        let next = s.take_tasks(other_agent, now).expect("next");
        assert_eq!(next.tasks.iter().map(|t| t.run_id).collect::<Vec<_>>(), [other]);
    }

    #[test]
    fn an_agent_runs_at_most_its_limit_of_backups_at_once() {
        let (_dir, s, m) = setup(
            "backups:\n  - {name: b1, agent: a1, run: x, max_age: 1h}\n  - {name: b2, agent: a1, run: y, max_age: 1h}\n  - {name: b3, agent: a2, run: x, max_age: 1h}\n",
            8,
        );
        let now = Utc::now();
        let r1 = s.run_now("b1", &m, now).expect("b1");
        let r2 = s.run_now("b2", &m, now).expect("b2");
        let r3 = s.run_now("b3", &m, now).expect("b3");
        s.tick(&m, now).expect("tick");
        let a1 = s.take_tasks("a1", now).expect("a1");
        assert_eq!(a1.tasks.len(), 1, "one backup at a time on a1 (the default limit)");
        assert_eq!(
            s.take_tasks("a2", now).expect("a2").tasks[0].run_id,
            r3,
            "other agents are not held up"
        );
        let (first, job, other) = if a1.tasks[0].run_id == r1 {
            (r1, "b1", r2)
        } else {
            (r2, "b2", r1)
        };
        assert!(s.record_result("a1", &result(first, job), &m, now).expect("result"));
        s.tick(&m, now).expect("tick");
        assert_eq!(s.take_tasks("a1", now).expect("next").tasks[0].run_id, other);
        let metrics = s.job_metrics();
        let done = metrics.iter().find(|j| j.job == job).expect("job");
        assert_eq!(done.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(done.last_end.last_status.as_deref(), Some("succeeded"));
    }

    #[test]
    fn progress_is_kept_while_the_run_goes_and_only_from_its_agent() {
        let (_dir, s, m) = setup("  - {name: j1, agent: a1, command: x}\n", 4);
        let now = Utc::now();
        let run = s.run_now("j1", &m, now).expect("run");
        s.tick(&m, now).expect("tick");
        s.take_tasks("a1", now).expect("take");
        let progress = RunProgress {
            run_id: run,
            phase: "running".into(),
            bytes: Some(10),
            files: Some(1),
            bytes_remaining: None,
            message: Some("dumping".into()),
            updated_at: 5.0,
        };
        let err = s.set_progress("a2", progress.clone()).expect_err("not a2's run");
        assert_eq!(err.reason(), "not_your_run");
        s.set_progress("a1", progress.clone()).expect("a1's run");
        assert_eq!(s.run(run).expect("read").expect("run").progress, Some(progress.clone()));
        assert!(s.record_result("a1", &result(run, "j1"), &m, now).expect("result"));
        assert_eq!(s.run(run).expect("read").expect("run").progress, None);
        // A late post for an ended run is dropped quietly.
        s.set_progress("a1", progress).expect("dropped");
        assert_eq!(s.run(run).expect("read").expect("run").progress, None);
    }

    #[test]
    fn results_are_accepted_only_from_the_runs_agent_and_once() {
        let (_dir, s, m) = setup("  - {name: j1, agent: a1, command: x}\n", 4);
        let now = Utc::now();
        let run = s.run_now("j1", &m, now).expect("run");
        s.tick(&m, now).expect("tick");
        assert_eq!(s.take_tasks("a1", now).expect("take").tasks.len(), 1);
        let err = s
            .record_result("a2", &result(run, "j1"), &m, now)
            .expect_err("not a2's");
        assert_eq!(err.reason(), "not_your_run");
        assert!(s.record_result("a1", &result(run, "j1"), &m, now).expect("first"));
        assert!(!s.record_result("a1", &result(run, "j1"), &m, now).expect("again"));
        assert_eq!(s.history("j1", 10).expect("history").len(), 1);
        assert!(matches!(s.run_now("nope", &m, now), Err(SchedulerError::UnknownJob(_))));
    }

    #[test]
    fn a_task_the_agent_does_not_hold_is_failed_and_retried() {
        let (_dir, s, m) = setup(
            "  - {name: j1, agent: a1, command: x, retries: 1, retry_backoff: 1s}\n",
            4,
        );
        let now = Utc::now();
        let run = s.run_now("j1", &m, now).expect("run");
        s.tick(&m, now).expect("tick");
        assert_eq!(s.take_tasks("a1", now).expect("take").tasks.len(), 1);
        // The agent polls again without that run: it was lost.
        s.reconcile("a1", &[], now + chrono::Duration::seconds(1), &m)
            .expect("reconcile");
        let lost = s.run(run).expect("read").expect("exists");
        assert_eq!(lost.status, "failed");
        assert!(lost.error.unwrap_or_default().contains("does not hold this run"));
        // Retried after its backoff.
        s.tick(&m, now + chrono::Duration::seconds(3)).expect("tick");
        let retry = s.take_tasks("a1", now + chrono::Duration::seconds(3)).expect("take");
        assert_eq!(retry.tasks.len(), 1);
        assert_eq!(retry.tasks[0].attempt, 1);
    }
}
