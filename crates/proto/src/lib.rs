//! Wire types exchanged between dicops agents, the controller and the CLI.
//!
//! Only serde types live here, no I/O. Decoders are tolerant of unknown
//! fields so that a newer agent can talk to an older controller and back;
//! every field added later carries `#[serde(default)]`.

use serde::{Deserialize, Serialize};

/// Where an agent posts its reports.
pub const REPORT_PATH: &str = "/api/v1/report";
/// Current state of every site and agent, for the CLI and dashboards.
pub const STATUS_PATH: &str = "/api/v1/status";

/// The URI subject alternative name scheme that carries a dicops identity in
/// a certificate: `dicops://agent/<id>`, `dicops://controller`,
/// `dicops://operator/<name>`.
pub const IDENTITY_URI_SCHEME: &str = "dicops://";

/// Why an agent's data port refuses a request: the only values of
/// `Report::data_refusals` keys the controller exports (a label must stay
/// bounded whatever an agent sends).
pub const DATA_REFUSAL_REASONS: &[&str] = &[
    "not_found",
    "no_grant",
    "wrong_peer",
    "grant_expired",
    "unknown_export",
    "no_manifest",
    "too_many_chunks",
    "unknown_chunk",
    "too_many_bytes",
    "malformed",
    "source_changed",
    "source_read",
    "too_many_connections",
];

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "role", content = "name", rename_all = "snake_case")]
pub enum Identity {
    Agent(String),
    Controller,
    Operator(String),
}

impl Identity {
    /// The URI that encodes this identity in a certificate.
    pub fn to_uri(&self) -> String {
        match self {
            Identity::Agent(id) => format!("{IDENTITY_URI_SCHEME}agent/{id}"),
            Identity::Controller => format!("{IDENTITY_URI_SCHEME}controller"),
            Identity::Operator(name) => format!("{IDENTITY_URI_SCHEME}operator/{name}"),
        }
    }

    /// Parses a URI written by [`Identity::to_uri`].
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(IDENTITY_URI_SCHEME)?;
        if rest == "controller" {
            return Some(Identity::Controller);
        }
        let (role, name) = rest.split_once('/')?;
        if !is_valid_id(name) {
            return None;
        }
        match role {
            "agent" => Some(Identity::Agent(name.to_string())),
            "operator" => Some(Identity::Operator(name.to_string())),
            _ => None,
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Agent(id) => write!(f, "agent {id}"),
            Identity::Controller => write!(f, "controller"),
            Identity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

/// Agent ids, site names and operator names: short, safe in file names,
/// URIs and Prometheus label values.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !id.starts_with('.')
        && !id.starts_with('-')
}

/// One health report from an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting agent; must match the identity of its certificate.
    pub agent: String,
    /// Increases by one with every report the agent builds; restarts at 1
    /// when the agent restarts, together with a new `instance`.
    pub seq: u64,
    /// Random per agent process, so the controller tells a restart from a
    /// replay.
    #[serde(default)]
    pub instance: String,
    /// When the health figures were collected (Unix seconds).
    pub collected_at: f64,
    /// The agent's report interval, so the controller knows when it is late.
    pub interval_seconds: f64,
    pub info: AgentInfo,
    pub health: HostHealth,
    /// Failed attempts to reach the controller since the agent started, by
    /// class, so that a cut-off site and a broken certificate look different.
    #[serde(default)]
    pub report_failures: ReportFailures,
    /// Backup folders as last scanned: the output folders of backup
    /// commands and the folders watched for other tools' backups.
    #[serde(default)]
    pub backups: Vec<LocalBackup>,
    /// Per replication job served from this agent: what the other site
    /// does not hold yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportAudit>,
    /// Where peers pull replication data from this agent, if it serves any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_url: Option<String>,
    /// Requests to the data port refused since the agent started, by reason
    /// (one of `DATA_REFUSAL_REASONS`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub data_refusals: std::collections::BTreeMap<String, u64>,
    /// The agent's own certificate, as it sees it.
    #[serde(default)]
    pub certificate_expiry_timestamp_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub kernel: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFailures {
    /// DNS, TCP connect, connection reset, timeout.
    #[serde(default)]
    pub network: u64,
    /// TLS handshake or certificate errors.
    #[serde(default)]
    pub tls: u64,
    /// The controller answered, but refused the report.
    #[serde(default)]
    pub rejected: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostHealth {
    pub cpu_usage_ratio: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub uptime_seconds: u64,
    pub boot_time_seconds: u64,
    #[serde(default)]
    pub filesystems: Vec<Filesystem>,
    #[serde(default)]
    pub disks: Vec<DiskIo>,
    #[serde(default)]
    pub networks: Vec<NetworkIo>,
    #[serde(default)]
    pub services: Vec<ServiceState>,
    /// Paths named in the agent's config (backup folders, replication
    /// roots), measured with statvfs even when they are network mounts.
    #[serde(default)]
    pub paths: Vec<PathUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    pub mountpoint: String,
    pub device: String,
    pub fstype: String,
    pub size_bytes: u64,
    pub avail_bytes: u64,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskIo {
    pub device: String,
    pub read_bytes_total: u64,
    pub written_bytes_total: u64,
    #[serde(default)]
    pub reads_completed_total: u64,
    #[serde(default)]
    pub writes_completed_total: u64,
    #[serde(default)]
    pub io_time_seconds_total: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkIo {
    pub device: String,
    pub receive_bytes_total: u64,
    pub transmit_bytes_total: u64,
    #[serde(default)]
    pub receive_errors_total: u64,
    #[serde(default)]
    pub transmit_errors_total: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    /// systemd's ActiveState (`active`, `failed`, `inactive`, ...) or
    /// `unknown` when systemd could not be asked.
    pub active_state: String,
    #[serde(default)]
    pub sub_state: String,
    #[serde(default)]
    pub error: Option<String>,
}

impl ServiceState {
    pub fn is_up(&self) -> bool {
        self.active_state == "active"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathState {
    Ok,
    /// statvfs did not answer in time: typically a hung NFS/CIFS mount.
    Hung,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathUsage {
    pub path: String,
    pub state: PathState,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub avail_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// The controller's answer to an accepted report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportAck {
    pub accepted: bool,
    pub site: String,
}

/// Every refusal from the controller's API has this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable, machine-readable cause, also used as the `reason` label of
    /// the rejection counters.
    pub reason: String,
    /// A sentence for the human who reads it.
    pub error: String,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub generated_at: f64,
    pub controller_version: String,
    pub sites: Vec<SiteStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub reachable: bool,
    pub agents_up: usize,
    pub agents: Vec<AgentStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub id: String,
    pub up: bool,
    pub last_report_at: Option<f64>,
    pub info: Option<AgentInfo>,
    pub health: Option<HostHealth>,
    #[serde(default)]
    pub certificate_expiry_timestamp_seconds: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uri_round_trip() {
        for id in [
            Identity::Agent("db01".into()),
            Identity::Controller,
            Identity::Operator("alice".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.to_uri()), Some(id));
        }
        assert_eq!(Identity::from_uri("dicops://agent/../x"), None);
        assert_eq!(Identity::from_uri("dicops://root/x"), None);
        assert_eq!(Identity::from_uri("https://agent/x"), None);
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("db01.dc1"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("..x"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn reports_tolerate_unknown_and_missing_optional_fields() {
        let json = r#"{"agent":"db01","seq":1,"collected_at":1.0,"interval_seconds":15,
            "info":{"version":"9.9","from_the_future":true},
            "health":{"cpu_usage_ratio":0.5,"load1":0,"load5":0,"load15":0,
              "memory_total_bytes":1,"memory_available_bytes":1,"swap_total_bytes":0,
              "swap_free_bytes":0,"uptime_seconds":5,"boot_time_seconds":7},
            "new_field":[1,2,3]}"#;
        let report: Report = serde_json::from_str(json).expect("tolerant decode");
        assert_eq!(report.agent, "db01");
        assert_eq!(report.report_failures, ReportFailures::default());
        assert!(report.health.filesystems.is_empty());
    }
}

/// Where an agent long-polls for its tasks.
pub const TASKS_PATH: &str = "/api/v1/tasks";
/// Where an agent sends the result of a task.
pub const RESULTS_PATH: &str = "/api/v1/results";
/// Jobs, runs and operator actions (`/api/v1/jobs/NAME/run` and so on).
pub const JOBS_PATH: &str = "/api/v1/jobs";
pub const RUNS_PATH: &str = "/api/v1/runs";
pub const RELOAD_PATH: &str = "/api/v1/reload";

/// Work for an agent: one attempt of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub run_id: i64,
    pub job: String,
    pub attempt: u32,
    /// Unix seconds after which the controller records the run as timed out.
    pub deadline: f64,
    pub kind: TaskKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskKind {
    /// Run the command the agent's own config defines under this name.
    Command { name: String },
    /// Pull a source agent's export into a snapshot under one of this
    /// agent's roots.
    Pull(PullTask),
    /// Re-read the snapshots of a replication job against their manifests.
    Verify(VerifyTask),
}

/// A verify run at the destination of replication job `replication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyTask {
    pub replication: String,
    pub root: String,
    /// Share of each snapshot's files to re-read, 1 to 100.
    pub sample_percent: u32,
    /// Fetch damaged chunks again from the source.
    pub repair: bool,
    pub source_agent: String,
    /// Filled in at hand-over when `repair` is set.
    pub source_url: String,
    pub export: String,
}

/// What a verify run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStats {
    pub snapshots: u64,
    pub files: u64,
    pub bytes: u64,
    /// `SNAPSHOT/PATH` of every file that differed from its manifest,
    /// of those repaired from the source, and of those that could not be.
    pub damaged: Vec<String>,
    pub repaired: Vec<String>,
    pub lost: Vec<String>,
}

/// One replication run, as the destination agent gets it: a one-run ticket
/// to pull from `source_agent`, which gets the matching `ServeGrant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullTask {
    pub source_agent: String,
    /// The source's data port, as it announced it.
    pub source_url: String,
    /// Names in the source's `exports:` and in this agent's `roots:`.
    pub export: String,
    pub root: String,
    /// Ask for chunks zstd-compressed (sent raw where that does not pay).
    pub compress: bool,
    /// Bytes per second on the wire; None: unlimited.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    pub verify: bool,
    pub stall_timeout_seconds: u64,
    pub retention: KeepPolicy,
    /// The deployment's timezone, for retention's days and weeks.
    pub timezone: String,
}

/// Snapshots kept by a destination (all zero: keep everything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepPolicy {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

/// Lets `peer` pull `export` from this (source) agent for one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeGrant {
    pub run_id: i64,
    pub job: String,
    pub export: String,
    pub peer: String,
    /// Unix seconds after which the grant is void (the run's deadline).
    pub expires_at: f64,
}

/// What a replication run did, in its result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStats {
    /// The published snapshot's name.
    pub snapshot: String,
    /// When the source read the tree the snapshot holds.
    pub source_state_at: f64,
    pub files: u64,
    pub bytes: u64,
    /// Files hard-linked to the previous snapshot.
    pub files_linked: u64,
    /// Bytes not sent: linked files and chunks found at the destination.
    pub bytes_reused: u64,
    /// Chunk bytes fetched from the source, and what they took on the wire.
    pub bytes_fetched: u64,
    pub bytes_on_wire: u64,
    /// Snapshots at the destination after retention.
    pub snapshots: u64,
}

/// The answer to a long poll.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskPoll {
    #[serde(default)]
    pub tasks: Vec<Task>,
    /// Runs the controller has given up on (max runtime): stop them.
    #[serde(default)]
    pub cancel: Vec<i64>,
    /// Replication runs this agent is the source of: serve them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<ServeGrant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    /// The agent stopped during the run (crash, kill, reboot): the outcome
    /// of the command is unknown, and it is never counted as a success.
    Interrupted,
}

/// What an agent reports when a task ends. Kept on the agent's disk until
/// the controller acknowledges it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub run_id: i64,
    pub job: String,
    pub outcome: TaskOutcome,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    pub started_at: f64,
    pub finished_at: f64,
    /// The end of the command's output, bounded.
    #[serde(default)]
    pub output_tail: String,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub files: Option<u64>,
    /// A backup command's output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// What a backup run produced, with BLAKE3 checksums (the first
    /// `MAX_MANIFEST_ENTRIES`; `artifacts_omitted` counts the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub artifacts_omitted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStats>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Entries of a run's manifest carried in its result and record.
pub const MAX_MANIFEST_ENTRIES: usize = 1000;

/// One file a backup run produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to the output folder.
    pub path: String,
    pub size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
}

/// What kind of folder a `LocalBackup` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalBackupKind {
    /// The output folder of a backup command (`commands.NAME.output`).
    Output,
    /// A folder watched for another tool's backups (`watches.NAME`).
    Watch,
}

/// A backup folder on an agent as last scanned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalBackup {
    pub kind: LocalBackupKind,
    /// The command's or the watch's name in the agent's config.
    pub name: String,
    pub path: String,
    /// Why the folder could not be read (missing, not a folder, denied).
    #[serde(default)]
    pub error: Option<String>,
    /// Backups present: files matching a watch's glob, or runs whose
    /// artifacts are still in an output folder.
    pub artifacts: u64,
    pub bytes: u64,
    /// The newest backup: when it was written, its size and name.
    #[serde(default)]
    pub newest_at: Option<f64>,
    #[serde(default)]
    pub newest_bytes: Option<u64>,
    #[serde(default)]
    pub newest_name: Option<String>,
    /// Backups the retention policy would delete but keeps because they
    /// are not yet in the other site.
    #[serde(default)]
    pub retention_blocked: u64,
    #[serde(default)]
    pub retention_blocked_bytes: u64,
    #[serde(default)]
    pub oldest_blocked_at: Option<f64>,
    pub scanned_at: f64,
}

/// Where a running task's agent posts its progress (best effort).
pub const PROGRESS_PATH: &str = "/api/v1/progress";
/// Every backup of both sites.
pub const BACKUPS_PATH: &str = "/api/v1/backups";

/// A running task's progress, as its agent last posted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunProgress {
    pub run_id: i64,
    /// What the agent is doing: `checking`, `running`, `hashing`, `retention`.
    pub phase: String,
    /// Bytes written (a backup's output) or moved so far.
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub files: Option<u64>,
    /// Bytes still to move (a replication's transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_remaining: Option<u64>,
    /// The last line of the command's output.
    #[serde(default)]
    pub message: Option<String>,
    pub updated_at: f64,
}

/// The controller's answer to a progress post.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressAck {
    /// A replication's rate from now on, bytes per second; None: unlimited.
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// One backup as the API lists it: objective, last runs, the agent's scan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    pub name: String,
    /// `run` (scheduled by dicops) or `watch` (made by another tool).
    pub kind: String,
    pub site: String,
    pub agent: String,
    /// The command or watch name in the agent's config.
    pub source: String,
    pub max_age_seconds: f64,
    /// For a run backup, when its last successful run started; for a watch,
    /// when the newest file was written.
    pub last_success_at: Option<f64>,
    pub last_run_at: Option<f64>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_duration_seconds: Option<f64>,
    pub last_size_bytes: Option<u64>,
    pub running_run: Option<i64>,
    /// The agent's latest scan of the folder.
    pub local: Option<LocalBackup>,
    /// Why the controller cannot judge this backup (agent silent, watch
    /// not defined on the agent, folder unreadable).
    pub problem: Option<String>,
}

impl BackupStatus {
    /// Stale: never succeeded, or its last success is older than max_age.
    pub fn is_stale(&self, now: f64) -> bool {
        self.last_success_at.is_none_or(|at| now - at > self.max_age_seconds)
    }
}

/// The controller's acknowledgement of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultAck {
    pub run_id: i64,
    /// False when the run had already ended (a resend): nothing changed.
    pub recorded: bool,
}

/// One job as the API lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub kind: String,
    pub agent: String,
    pub site: String,
    pub schedule: Option<String>,
    pub paused: bool,
    pub next_fire: Option<f64>,
    pub running_run: Option<i64>,
    pub last_run: Option<RunInfo>,
}

/// One run as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub agents: String,
    pub trigger: String,
    pub attempt: u32,
    pub status: String,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub output_tail: Option<String>,
    pub bytes: Option<u64>,
    pub files: Option<u64>,
    /// Set while the run is going, from its agent's last progress post.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RunProgress>,
    /// A backup run's manifest (only when one run is asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
}

/// The answer to "run now".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    pub run_id: i64,
}

/// One content-defined chunk of a file: its BLAKE3 (hex) and length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: String,
    pub len: u32,
}

/// The first line of a replication manifest (NDJSON: this header, then one
/// `ManifestEntry` per line, in path order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestHeader {
    pub version: u32,
    pub job: String,
    pub run_id: i64,
    pub source_agent: String,
    pub export: String,
    /// When the source started reading its tree (Unix seconds): the age of
    /// a snapshot's source state, for the replication lag.
    pub taken_at: f64,
    /// How many entries follow: a manifest with more (or fewer) is refused.
    #[serde(default)]
    pub files: Option<u64>,
    /// The bytes of every file of the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// BLAKE3 (hex) of the entry lines exactly as sent after this header.
    /// The destination names the one of its newest snapshot when it asks
    /// for the next manifest (`?unless=`), so that an unchanged tree costs
    /// one line instead of the whole manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries_blake3: Option<String>,
    /// The tree is exactly the one `?unless=` named: no entries follow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// One regular file of a replicated tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the exported folder, `/`-separated, never `..` or
    /// absolute (checked again by the destination).
    pub path: String,
    pub size: u64,
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
    pub chunks: Vec<ChunkRef>,
}

/// The cross-site audit of one replication job, made by its source: the
/// files of the export that the newest snapshot published in the other site
/// does not hold (new, or changed since).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportAudit {
    pub export: String,
    pub job: String,
    /// Files and bytes in the export now.
    pub files: u64,
    pub bytes: u64,
    pub unreplicated_files: u64,
    pub unreplicated_bytes: u64,
    /// Modification time of the oldest file not in the other site.
    #[serde(default)]
    pub oldest_unreplicated_at: Option<f64>,
    /// When the newest snapshot of the job was published, as the
    /// destination told the source.
    #[serde(default)]
    pub published_at: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
    pub scanned_at: f64,
}

/// Where the cross-site audit is served.
pub const AUDIT_PATH: &str = "/api/v1/audit";

/// One replication job in the cross-site audit (`dicops audit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationAudit {
    pub job: String,
    pub source_site: String,
    pub source_agent: String,
    pub export: String,
    /// The destination.
    pub site: String,
    pub agent: String,
    pub max_lag_seconds: Option<f64>,
    /// When the source state of the newest snapshot was read.
    pub source_state_at: Option<f64>,
    pub last_success_at: Option<f64>,
    pub snapshot: Option<String>,
    /// The source's comparison of its export with that snapshot.
    pub audit: Option<ExportAudit>,
    /// Why the audit is missing or stale.
    pub problem: Option<String>,
}
