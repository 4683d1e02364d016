//! Cross-site replication on the agent: the source side serves the chunks
//! of an exported folder to one peer per run; the destination side pulls
//! them and publishes immutable snapshots.

pub mod chunks;
mod direct;
pub mod pull;
pub mod serve;
pub mod snapshot;
pub mod verify;

use dicops_core::retention::RetentionPolicy;
use dicops_proto::KeepPolicy;

/// The destination's retention policy, as the task carries it.
pub fn snapshot_retention(keep: &KeepPolicy) -> RetentionPolicy {
    RetentionPolicy {
        keep_last: keep.keep_last,
        keep_hourly: keep.keep_hourly,
        keep_daily: keep.keep_daily,
        keep_weekly: keep.keep_weekly,
        keep_monthly: keep.keep_monthly,
        keep_yearly: keep.keep_yearly,
    }
}
