//! Replication gauges, from the scheduler's view of each replication job.
//! Labels: `site` and `agent` are the destination's (where the snapshots
//! live), `source_site` and `source_agent` where the data comes from.

use crate::metrics::{self as m, Exposition};
use crate::scheduler::JobMetrics;

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
