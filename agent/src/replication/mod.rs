//! Cross-site replication on the agent: the source side serves the chunks
//! of an exported folder to one peer per run; the destination side pulls
//! them and publishes immutable snapshots.

pub mod chunks;
pub mod snapshot;
