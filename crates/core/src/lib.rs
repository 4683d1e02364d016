//! Pure decisions of dicops: no I/O, no clock, no async runtime.
//!
//! Every function takes the current time and data and returns a decision, so
//! that the policies are unit-tested with literal values.

pub mod backoff;
pub mod filesystems;
pub mod glob;
pub mod jobs;
pub mod links;
pub mod liveness;
pub mod retention;
pub mod schedule;
pub mod units;
