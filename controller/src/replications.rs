//! Replication gauges, from the scheduler's view of each replication job.
//! Labels: `site` and `agent` are the destination's (where the snapshots
//! live), `source_site` and `source_agent` where the data comes from.

use std::sync::Arc;

use dicops_proto::ReplicationAudit;

use crate::metrics::{self as m, Exposition};
use crate::scheduler::JobMetrics;
use crate::state::AgentRecord;

/// The cross-site audit of every replication job, from the scheduler and
/// the sources' reports.
pub fn audit(jobs: &[JobMetrics], agent: impl Fn(&str) -> (bool, Option<Arc<AgentRecord>>)) -> Vec<ReplicationAudit> {
    jobs.iter()
        .filter_map(|job| {
            let (source_site, source_agent) = job.source.clone()?;
            let export = job.export.clone().unwrap_or_default();
            let (up, record) = agent(&source_agent);
            let audit = record.as_ref().and_then(|r| {
                r.report
                    .exports
                    .iter()
                    .find(|a| a.job == job.job && a.export == export)
                    .cloned()
            });
            let problem = match (&record, &audit, up) {
                (None, _, _) => Some(format!(
                    "source agent {source_agent} has not reported since the controller started"
                )),
                (Some(_), _, false) => Some(format!("source agent {source_agent} is down; its last audit is shown")),
                (Some(_), None, true) => {
                    Some("no snapshot published yet: everything in the export is only in the source site".to_string())
                }
                (Some(_), Some(a), true) => a.error.clone(),
            };
            Some(ReplicationAudit {
                job: job.job.clone(),
                source_site,
                source_agent,
                export,
                site: job.site.clone(),
                agent: job.agent.clone(),
                max_lag_seconds: job.max_lag.map(|d| d.as_secs_f64()),
                source_state_at: job.last_replication.as_ref().map(|r| r.source_state_at),
                last_success_at: job.last_success,
                snapshot: job.last_replication.as_ref().map(|r| r.snapshot.clone()),
                audit,
                problem,
            })
        })
        .collect()
}

/// The audit's gauges.
pub fn render_audit(audits: &[ReplicationAudit], out: &mut String) {
    type Get = fn(&ReplicationAudit) -> Option<f64>;
    let families: [(m::Def, Get); 3] = [
        (m::REPLICATION_UNREPLICATED_FILES, |a| {
            a.audit.as_ref().map(|x| x.unreplicated_files as f64)
        }),
        (m::REPLICATION_UNREPLICATED_BYTES, |a| {
            a.audit.as_ref().map(|x| x.unreplicated_bytes as f64)
        }),
        (m::REPLICATION_OLDEST_UNREPLICATED, |a| {
            a.audit.as_ref().and_then(|x| x.oldest_unreplicated_at)
        }),
    ];
    let mut e = Exposition::new(out);
    for (def, get) in families {
        e.family(def);
        for a in audits {
            if let Some(value) = get(a) {
                e.sample(
                    def,
                    &[
                        ("site", &a.site),
                        ("agent", &a.agent),
                        ("job", &a.job),
                        ("source_site", &a.source_site),
                        ("source_agent", &a.source_agent),
                    ],
                    value,
                );
            }
        }
    }
}

pub fn render(jobs: &[JobMetrics], now: f64, out: &mut String) {
    type Get = fn(&JobMetrics, f64) -> Option<f64>;
    let families: [(m::Def, Get); 9] = [
        (m::REPLICATION_LAST_SUCCESS, |j, _| j.last_success),
        (m::REPLICATION_LAG, |j, now| {
            j.last_replication.as_ref().map(|r| (now - r.source_state_at).max(0.0))
        }),
        (m::REPLICATION_MAX_LAG, |j, _| j.max_lag.map(|d| d.as_secs_f64())),
        (m::REPLICATION_RUNNING, |j, _| Some(f64::from(u8::from(j.running)))),
        (m::REPLICATION_LAST_DURATION, |j, _| j.last_end.last_duration),
        (m::REPLICATION_LAST_OK, |j, _| {
            j.last_end
                .last_status
                .as_deref()
                .map(|s| f64::from(u8::from(s == "succeeded")))
        }),
        (m::REPLICATION_BYTES_REMAINING, |j, _| {
            j.bytes_remaining.map(|b| b as f64)
        }),
        (m::SNAPSHOTS, |j, _| {
            j.last_replication.as_ref().map(|r| r.snapshots as f64)
        }),
        (m::SNAPSHOT_LAST_SIZE, |j, _| {
            j.last_replication.as_ref().map(|r| r.bytes as f64)
        }),
    ];
    let mut e = Exposition::new(out);
    for (def, get) in families {
        e.family(def);
        for job in jobs {
            let Some((source_site, source_agent)) = &job.source else {
                continue;
            };
            if let Some(value) = get(job, now) {
                e.sample(
                    def,
                    &[
                        ("site", &job.site),
                        ("agent", &job.agent),
                        ("job", &job.job),
                        ("source_site", source_site),
                        ("source_agent", source_agent),
                    ],
                    value,
                );
            }
        }
    }
}

/// Verify jobs' gauges.
pub fn render_verify(jobs: &[JobMetrics], out: &mut String) {
    type Get = fn(&JobMetrics) -> Option<f64>;
    let families: [(m::Def, Get); 2] = [
        (m::VERIFY_LOST, |j| j.verify_lost.map(|n| n as f64)),
        (m::VERIFY_LAST_SUCCESS, |j| j.last_success),
    ];
    let mut e = Exposition::new(out);
    for (def, get) in families {
        e.family(def);
        for job in jobs.iter().filter(|j| j.kind == "verify") {
            if let Some(value) = get(job) {
                e.sample(
                    def,
                    &[("site", &job.site), ("agent", &job.agent), ("job", &job.job)],
                    value,
                );
            }
        }
    }
}
