//! The one catalogue of the controller's metric names.
//!
//! Two kinds of metrics come out of `/metrics`:
//! - the controller's own counters and histograms, kept in a local
//!   `prometheus::Registry` (never the global one, so tests build fresh
//!   ones), plus the standard `process_*` metrics;
//! - the state of the deployment (agents, hosts, sites), rendered straight
//!   from the current state at scrape time. Rendering avoids keeping a gauge
//!   per host series up to date, and a host that goes down simply stops
//!   being rendered.
//!
//! Every name of both kinds is listed in [`CATALOGUE`], which the tests use
//! to check dashboards and alert rules.

use std::fmt::Write as _;

use prometheus::{
    exponential_buckets, Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: name, type and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! defs {
    ($($ident:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $(pub const $ident: Def = Def { name: $name, kind: Kind::$kind, help: $help };)*
        /// Every `dicops_*` metric the controller can export.
        pub const CATALOGUE: &[Def] = &[$($ident),*];
    };
}

defs! {
    BUILD_INFO = "dicops_build_info", Gauge, "Version of the running controller; always 1.";
    HTTP_REQUESTS = "dicops_http_requests_total", Counter, "HTTP requests answered by the controller, by handler and status code.";
    HTTP_DURATION = "dicops_http_request_duration_seconds", Histogram, "Time to answer an HTTP request, by handler.";
    REPORTS_ACCEPTED = "dicops_reports_accepted_total", Counter, "Agent reports accepted.";
    REQUESTS_REJECTED = "dicops_requests_rejected_total", Counter, "Requests refused, by handler and reason (no_certificate, wrong_role, identity_mismatch, unknown_agent, body_too_large, malformed, stale_report, not_found, method_not_allowed).";
    TLS_HANDSHAKE_FAILURES = "dicops_tls_handshake_failures_total", Counter, "TLS handshakes that failed, by reason (unknown_ca, expired_certificate, bad_certificate, protocol, eof, timeout, ...).";
    TLS_RELOADS = "dicops_tls_reloads_total", Counter, "Reloads of the controller's certificate files, by result.";
    CONFIG_RELOAD_OK = "dicops_config_last_reload_successful", Gauge, "1 if the last configuration reload succeeded.";
    CONFIG_RELOAD_TIME = "dicops_config_last_reload_success_timestamp_seconds", Gauge, "When the configuration was last loaded successfully.";
    CONNECTIONS_OPEN = "dicops_connections_open", Gauge, "TLS connections currently open to the controller.";
    CERT_EXPIRY = "dicops_tls_certificate_expiry_timestamp_seconds", Gauge, "notAfter of a certificate: the controller's own (cert=controller), the CA (cert=ca), and each agent's as last presented (cert=agent).";
    SITE_REACHABLE = "dicops_site_reachable", Gauge, "1 while at least one agent of the site reports; 0 when every agent of the site is down.";
    SITE_AGENTS = "dicops_site_agents", Gauge, "Agents declared in the site.";
    SITE_AGENTS_UP = "dicops_site_agents_up", Gauge, "Agents of the site that report on time.";
    AGENT_UP = "dicops_agent_up", Gauge, "1 if the agent reported within its allowed number of missed intervals.";
    AGENT_LAST_REPORT = "dicops_agent_last_report_timestamp_seconds", Gauge, "When the controller last accepted a report from the agent.";
    AGENT_INFO = "dicops_agent_info", Gauge, "Version, OS and kernel of the agent; always 1.";
    AGENT_REPORT_INTERVAL = "dicops_agent_report_interval_seconds", Gauge, "The report interval the agent announced.";
    AGENT_REPORT_FAILURES = "dicops_agent_report_failures_total", Counter, "Failed attempts of the agent to reach the controller since it started, by class (network, tls, rejected), as the agent last reported them.";
    AGENT_DATA_REFUSALS = "dicops_agent_data_refusals_total", Counter, "Requests to the agent's replication data port it refused since it started, by reason (wrong_peer, no_grant, malformed...; anything else is other), as the agent last reported them.";
    HOST_CPU = "dicops_host_cpu_usage_ratio", Gauge, "CPU busy time over the last collection interval, 0 to 1 (all cores).";
    HOST_LOAD1 = "dicops_host_load1", Gauge, "1-minute load average.";
    HOST_LOAD5 = "dicops_host_load5", Gauge, "5-minute load average.";
    HOST_LOAD15 = "dicops_host_load15", Gauge, "15-minute load average.";
    HOST_MEM_TOTAL = "dicops_host_memory_total_bytes", Gauge, "Physical memory.";
    HOST_MEM_AVAIL = "dicops_host_memory_available_bytes", Gauge, "Memory available for new work without swapping.";
    HOST_SWAP_TOTAL = "dicops_host_swap_total_bytes", Gauge, "Swap space.";
    HOST_SWAP_FREE = "dicops_host_swap_free_bytes", Gauge, "Unused swap space.";
    HOST_UPTIME = "dicops_host_uptime_seconds", Gauge, "Time since the host booted.";
    HOST_BOOT_TIME = "dicops_host_boot_time_seconds", Gauge, "When the host booted, Unix seconds.";
    HOST_FS_SIZE = "dicops_host_filesystem_size_bytes", Gauge, "Size of a mounted filesystem.";
    HOST_FS_AVAIL = "dicops_host_filesystem_avail_bytes", Gauge, "Space available to unprivileged users on a mounted filesystem.";
    HOST_FS_READONLY = "dicops_host_filesystem_readonly", Gauge, "1 if the filesystem is mounted read-only.";
    HOST_PATH_SIZE = "dicops_host_path_size_bytes", Gauge, "Size of the filesystem holding a path named in the agent's config.";
    HOST_PATH_AVAIL = "dicops_host_path_avail_bytes", Gauge, "Space available on the filesystem holding a configured path.";
    HOST_PATH_STATE = "dicops_host_path_state", Gauge, "State of a configured path: 1 for its current state (ok, hung: statvfs timed out, error).";
    HOST_DISK_READ = "dicops_host_disk_read_bytes_total", Counter, "Bytes read from a block device.";
    HOST_DISK_WRITTEN = "dicops_host_disk_written_bytes_total", Counter, "Bytes written to a block device.";
    HOST_DISK_READS = "dicops_host_disk_reads_completed_total", Counter, "Reads completed by a block device.";
    HOST_DISK_WRITES = "dicops_host_disk_writes_completed_total", Counter, "Writes completed by a block device.";
    HOST_DISK_IO_TIME = "dicops_host_disk_io_time_seconds_total", Counter, "Time a block device spent doing I/O.";
    HOST_NET_RX = "dicops_host_network_receive_bytes_total", Counter, "Bytes received on a network interface.";
    HOST_NET_TX = "dicops_host_network_transmit_bytes_total", Counter, "Bytes transmitted on a network interface.";
    HOST_NET_RX_ERR = "dicops_host_network_receive_errors_total", Counter, "Receive errors on a network interface.";
    HOST_NET_TX_ERR = "dicops_host_network_transmit_errors_total", Counter, "Transmit errors on a network interface.";
    SERVICE_UP = "dicops_service_up", Gauge, "1 if the systemd unit named in the agent's config is active.";
    CONFIG_INFO = "dicops_config_info", Gauge, "Fingerprint of the loaded configuration file; always 1. Compare across deployments to spot drift.";
    JOB_NEXT_RUN = "dicops_job_next_run_timestamp_seconds", Gauge, "Next scheduled fire of the job.";
    JOB_EXPECTED_NEXT_RUN = "dicops_job_expected_next_run_timestamp_seconds", Gauge, "When the job should next have run, counted from its last success: time() beyond it means a fire was missed or failed.";
    JOB_LAST_RUN = "dicops_job_last_run_timestamp_seconds", Gauge, "When the job's last run started.";
    JOB_EVER_SUCCEEDED = "dicops_job_ever_succeeded", Gauge, "1 once the job has had a successful run (within the kept history).";
    JOB_RUNNING = "dicops_job_running", Gauge, "1 while a run of the job is queued or going.";
    JOB_PAUSED = "dicops_job_paused", Gauge, "1 while an operator has paused the job.";
    JOB_RUNS = "dicops_job_runs_total", Counter, "Runs ended, by job and result (succeeded, failed, timed_out, interrupted).";
    JOB_SKIPPED = "dicops_job_skipped_total", Counter, "Scheduled fires that did not start a run, by job and reason (overlap, paused).";
    JOB_TIMEOUTS = "dicops_job_timeouts_total", Counter, "Runs stopped for exceeding their max_runtime.";
    DISPATCH_DELAY = "dicops_scheduler_dispatch_delay_seconds", Histogram, "Time from a run's due time to its task being handed to the agent's queue.";
    BACKUP_LAST_SUCCESS = "dicops_backup_last_success_timestamp_seconds", Gauge, "When the backup last succeeded: the start of its last successful run, or for a watched folder the time the newest file was written. Stale when time() minus this exceeds dicops_backup_max_age_seconds.";
    BACKUP_LAST_RUN = "dicops_backup_last_run_timestamp_seconds", Gauge, "When the backup's last run started (run backups).";
    BACKUP_LAST_DURATION = "dicops_backup_last_duration_seconds", Gauge, "How long the backup's last finished run took, whatever its result (run backups).";
    BACKUP_LAST_SIZE = "dicops_backup_last_size_bytes", Gauge, "Size of the last backup: what the last successful run wrote to its output folder, or the newest file of a watched folder.";
    BACKUP_RUNS = "dicops_backup_runs_total", Counter, "Backup runs ended, by result (succeeded, failed, timed_out, interrupted).";
    BACKUP_MAX_AGE = "dicops_backup_max_age_seconds", Gauge, "The backup's freshness objective from the controller config (max_age).";
    BACKUP_LAST_OK = "dicops_backup_last_run_successful", Gauge, "1 if the backup's last finished run succeeded, 0 if it failed, timed out or was interrupted (run backups).";
    BACKUP_ARTIFACTS = "dicops_backup_artifacts", Gauge, "Backups present on the agent: files matching a watched folder's glob, or runs whose artifacts are still in a command's output folder.";
    BACKUP_ARTIFACTS_BYTES = "dicops_backup_artifacts_bytes", Gauge, "Total size of the backups present on the agent.";
    BACKUP_RETENTION_BLOCKED = "dicops_backup_retention_blocked", Gauge, "Backups that local retention would delete but keeps because they are not yet in the other site. Growing means replication is stuck and the disk will fill.";
    BACKUP_RETENTION_BLOCKED_BYTES = "dicops_backup_retention_blocked_bytes", Gauge, "Size of the backups kept only because they are not yet in the other site.";
    BACKUP_FOLDER_READABLE = "dicops_backup_folder_readable", Gauge, "1 if the agent could read the backup's folder at its last scan; 0 when it is missing, not a folder, or unreadable (the error is in `dicops backups`).";
    BACKUP_SCAN = "dicops_backup_scan_timestamp_seconds", Gauge, "When the agent last scanned the backup's folder.";
    REPLICATION_LAST_SUCCESS = "dicops_replication_last_success_timestamp_seconds", Gauge, "When the replication job's last successful run started. Labels site and agent are the destination's; source_site and source_agent the source's.";
    REPLICATION_LAG = "dicops_replication_lag_seconds", Gauge, "Age of the source state held by the newest published snapshot: how much the other site would lose if the source site were lost now.";
    REPLICATION_MAX_LAG = "dicops_replication_max_lag_seconds", Gauge, "The replication job's objective for its lag (max_lag in the controller config).";
    REPLICATION_RUNNING = "dicops_replication_running", Gauge, "1 while a run of the replication job is queued or going.";
    REPLICATION_LAST_DURATION = "dicops_replication_last_duration_seconds", Gauge, "How long the job's last finished run took, whatever its result.";
    REPLICATION_LAST_OK = "dicops_replication_last_run_successful", Gauge, "1 if the replication job's last finished run succeeded.";
    REPLICATION_BYTES_REMAINING = "dicops_replication_bytes_remaining", Gauge, "Bytes of chunks still to fetch in the running transfer.";
    REPLICATION_BYTES_SENT = "dicops_replication_bytes_sent_total", Counter, "Bytes the replication job moved over the inter-site link (compressed chunks).";
    REPLICATION_BYTES_REUSED = "dicops_replication_bytes_reused_total", Counter, "Bytes of published snapshots that did not cross the link: unchanged files and chunks the destination already held.";
    REPLICATION_FILES = "dicops_replication_files_total", Counter, "Files in the snapshots the replication job published.";
    REPLICATION_RUNS = "dicops_replication_runs_total", Counter, "Replication runs ended, by result (succeeded, failed, timed_out, interrupted).";
    SNAPSHOTS = "dicops_snapshots", Gauge, "Snapshots of the replication job at the destination after its last successful run's retention. (Not dicops_snapshot_count: promtool refuses a _count suffix outside histograms and summaries.)";
    REPLICATION_UNREPLICATED_FILES = "dicops_replication_unreplicated_files", Gauge, "Files of the source's export that the newest snapshot in the other site does not hold (new or changed since), as the source audited them.";
    REPLICATION_UNREPLICATED_BYTES = "dicops_replication_unreplicated_bytes", Gauge, "Bytes of the source's export that are only in the source site.";
    REPLICATION_OLDEST_UNREPLICATED = "dicops_replication_oldest_unreplicated_timestamp_seconds", Gauge, "Modification time of the oldest file of the export that is only in the source site; absent when everything is in the other site.";
    VERIFY_ERRORS = "dicops_verify_errors_total", Counter, "Snapshot files a verify job found different from their manifest (bit rot, tampering), repaired or not.";
    VERIFY_LOST = "dicops_verify_lost_files", Gauge, "Files the last verify run found damaged and could not repair (the source no longer has their content).";
    VERIFY_LAST_SUCCESS = "dicops_verify_last_success_timestamp_seconds", Gauge, "When the verify job last ran to its end with nothing lost.";
    SNAPSHOT_LAST_SIZE = "dicops_snapshot_last_size_bytes", Gauge, "Size of the newest published snapshot of the replication job.";
}

/// The controller's own instruments.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub reports_accepted: IntCounter,
    pub requests_rejected: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub config_reload_ok: IntGauge,
    pub config_reload_time: Gauge,
    pub connections_open: IntGauge,
    pub job_runs: IntCounterVec,
    pub job_skipped: IntCounterVec,
    pub job_timeouts: IntCounterVec,
    pub dispatch_delay: prometheus::Histogram,
    pub backup_runs: IntCounterVec,
    pub replication_runs: IntCounterVec,
    pub replication_bytes_sent: IntCounterVec,
    pub replication_bytes_reused: IntCounterVec,
    pub replication_files: IntCounterVec,
    pub verify_errors: IntCounterVec,
}

fn opts(def: Def) -> Opts {
    Opts::new(def.name, def.help)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(opts(BUILD_INFO), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let metrics = Metrics {
            http_requests: IntCounterVec::new(opts(HTTP_REQUESTS), &["handler", "code"])?,
            http_duration: HistogramVec::new(
                HistogramOpts::new(HTTP_DURATION.name, HTTP_DURATION.help)
                    .buckets(exponential_buckets(0.0005, 4.0, 9)?),
                &["handler"],
            )?,
            reports_accepted: IntCounter::with_opts(opts(REPORTS_ACCEPTED))?,
            requests_rejected: IntCounterVec::new(opts(REQUESTS_REJECTED), &["handler", "reason"])?,
            tls_handshake_failures: IntCounterVec::new(opts(TLS_HANDSHAKE_FAILURES), &["reason"])?,
            tls_reloads: IntCounterVec::new(opts(TLS_RELOADS), &["result"])?,
            config_reload_ok: IntGauge::with_opts(opts(CONFIG_RELOAD_OK))?,
            config_reload_time: Gauge::with_opts(opts(CONFIG_RELOAD_TIME))?,
            connections_open: IntGauge::with_opts(opts(CONNECTIONS_OPEN))?,
            job_runs: IntCounterVec::new(opts(JOB_RUNS), &["job", "result"])?,
            job_skipped: IntCounterVec::new(opts(JOB_SKIPPED), &["job", "reason"])?,
            job_timeouts: IntCounterVec::new(opts(JOB_TIMEOUTS), &["job"])?,
            dispatch_delay: prometheus::Histogram::with_opts(
                HistogramOpts::new(DISPATCH_DELAY.name, DISPATCH_DELAY.help)
                    .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0]),
            )?,
            backup_runs: IntCounterVec::new(opts(BACKUP_RUNS), &["site", "agent", "job", "result"])?,
            replication_runs: IntCounterVec::new(opts(REPLICATION_RUNS), &["site", "agent", "job", "result"])?,
            replication_bytes_sent: IntCounterVec::new(opts(REPLICATION_BYTES_SENT), &["site", "agent", "job"])?,
            replication_bytes_reused: IntCounterVec::new(opts(REPLICATION_BYTES_REUSED), &["site", "agent", "job"])?,
            replication_files: IntCounterVec::new(opts(REPLICATION_FILES), &["site", "agent", "job"])?,
            verify_errors: IntCounterVec::new(opts(VERIFY_ERRORS), &["site", "agent", "job"])?,
            registry,
        };
        let r = &metrics.registry;
        r.register(Box::new(build))?;
        r.register(Box::new(metrics.http_requests.clone()))?;
        r.register(Box::new(metrics.http_duration.clone()))?;
        r.register(Box::new(metrics.reports_accepted.clone()))?;
        r.register(Box::new(metrics.requests_rejected.clone()))?;
        r.register(Box::new(metrics.tls_handshake_failures.clone()))?;
        r.register(Box::new(metrics.tls_reloads.clone()))?;
        r.register(Box::new(metrics.config_reload_ok.clone()))?;
        r.register(Box::new(metrics.config_reload_time.clone()))?;
        r.register(Box::new(metrics.connections_open.clone()))?;
        r.register(Box::new(metrics.job_runs.clone()))?;
        r.register(Box::new(metrics.backup_runs.clone()))?;
        r.register(Box::new(metrics.replication_runs.clone()))?;
        r.register(Box::new(metrics.replication_bytes_sent.clone()))?;
        r.register(Box::new(metrics.replication_bytes_reused.clone()))?;
        r.register(Box::new(metrics.replication_files.clone()))?;
        r.register(Box::new(metrics.verify_errors.clone()))?;
        r.register(Box::new(metrics.job_skipped.clone()))?;
        r.register(Box::new(metrics.job_timeouts.clone()))?;
        r.register(Box::new(metrics.dispatch_delay.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        // Pre-create the series operators alert on, so that a rate() over
        // them works before the first failure.
        for reason in ["unknown_ca", "expired_certificate", "bad_certificate"] {
            metrics.tls_handshake_failures.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            metrics.tls_reloads.with_label_values(&[result]);
        }
        Ok(metrics)
    }

    /// The registry's part of the exposition.
    pub fn encode_registry(&self, out: &mut Vec<u8>) {
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
    }
}

/// Writes state-derived families in the Prometheus text format.
pub struct Exposition<'a> {
    out: &'a mut String,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl<'a> Exposition<'a> {
    pub fn new(out: &'a mut String) -> Self {
        Exposition { out }
    }

    /// Starts a family; call only once per family, before its samples.
    pub fn family(&mut self, def: Def) {
        let _ = writeln!(self.out, "# HELP {} {}", def.name, def.help);
        let _ = writeln!(self.out, "# TYPE {} {}", def.name, def.kind.as_str());
    }

    pub fn sample(&mut self, def: Def, labels: Labels<'_>, value: f64) {
        self.out.push_str(def.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(name);
                self.out.push_str("=\"");
                escape_label_value(self.out, value);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        write_value(self.out, value);
        self.out.push('\n');
    }
}

fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_follows_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for def in CATALOGUE {
            assert!(def.name.starts_with("dicops_"), "{}", def.name);
            assert!(seen.insert(def.name), "duplicate {}", def.name);
            assert_eq!(def.kind == Kind::Counter, def.name.ends_with("_total"), "{}", def.name);
            assert!(!def.help.is_empty());
        }
    }

    #[test]
    fn exposition_escapes_and_formats() {
        let mut out = String::new();
        let mut e = Exposition::new(&mut out);
        e.family(HOST_FS_SIZE);
        e.sample(
            HOST_FS_SIZE,
            &[("agent", "db01"), ("mountpoint", "/mnt/\"odd\"\\dir\n")],
            1024.0,
        );
        e.sample(HOST_FS_SIZE, &[], 0.25);
        assert_eq!(
            out,
            "# HELP dicops_host_filesystem_size_bytes Size of a mounted filesystem.\n\
             # TYPE dicops_host_filesystem_size_bytes gauge\n\
             dicops_host_filesystem_size_bytes{agent=\"db01\",mountpoint=\"/mnt/\\\"odd\\\"\\\\dir\\n\"} 1024\n\
             dicops_host_filesystem_size_bytes 0.25\n"
        );
    }

    #[test]
    fn registry_builds_twice() {
        // A local registry: two controllers in one process do not collide.
        Metrics::new().expect("first");
        Metrics::new().expect("second");
    }
}
