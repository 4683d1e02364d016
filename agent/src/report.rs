//! Sends the latest health snapshot to the controller. Collection never
//! waits for the network: the collector thread overwrites one slot, and
//! this loop sends whatever is newest when the controller can be reached.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dicops_core::backoff::Backoff;
use dicops_net::{FailureClass, HttpsClient, TlsReloader};
use dicops_proto::{AgentInfo, ApiError, HostHealth, Report, ReportFailures};
use hyper::Method;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One collected snapshot and when it was taken.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub collected_at: f64,
    pub health: HostHealth,
}

pub struct Reporter {
    pub agent_id: String,
    pub interval: Duration,
    pub info: AgentInfo,
    pub instance: String,
    pub client: HttpsClient,
    pub tls: Arc<TlsReloader>,
    pub backups: Arc<crate::backup::Backups>,
    /// The data port this agent serves replication pulls on, if any.
    pub data_url: Option<String>,
    /// Its exports, audited against what the other site holds.
    pub source: Option<Arc<crate::replication::serve::Source>>,
    pub backoff: Backoff,
}

pub(crate) fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A small xorshift generator for jitter; no need for a crypto RNG here.
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Jitter {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Jitter(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Reporter {
    pub async fn run(mut self, mut snapshots: watch::Receiver<Option<Snapshot>>, shutdown: CancellationToken) {
        let mut seq = 0u64;
        let mut failures = ReportFailures::default();
        let mut attempt = 0u32;
        let mut jitter = Jitter::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = snapshots.changed() => if changed.is_err() { return },
            }
            // Send the newest snapshot; keep retrying with it (or a newer
            // one) until the controller takes it.
            loop {
                let Some(snapshot) = snapshots.borrow_and_update().clone() else {
                    break;
                };
                seq += 1;
                let report = Report {
                    agent: self.agent_id.clone(),
                    seq,
                    instance: self.instance.clone(),
                    collected_at: snapshot.collected_at,
                    interval_seconds: self.interval.as_secs_f64(),
                    info: self.info.clone(),
                    health: snapshot.health,
                    report_failures: failures,
                    backups: self.backups.latest(),
                    data_url: self.data_url.clone(),
                    data_refusals: crate::replication::serve::refusals(),
                    exports: self.source.as_ref().map(|s| s.latest_audit()).unwrap_or_default(),
                    certificate_expiry_timestamp_seconds: Some(self.tls.not_after()),
                };
                match self.send(&report).await {
                    Ok(()) => {
                        if attempt > 0 {
                            tracing::info!(controller = %self.client.peer(), failed_attempts = attempt, "controller reachable again; report delivered");
                        }
                        attempt = 0;
                        break;
                    }
                    Err((class, message)) => {
                        match class {
                            FailureClass::Network => failures.network += 1,
                            FailureClass::Tls => failures.tls += 1,
                            FailureClass::Rejected => failures.rejected += 1,
                        }
                        let delay = self.backoff.delay(attempt, jitter.unit());
                        attempt = attempt.saturating_add(1);
                        let class = match class {
                            FailureClass::Network => "network",
                            FailureClass::Tls => "tls",
                            FailureClass::Rejected => "rejected",
                        };
                        tracing::warn!(
                            controller = %self.client.peer(),
                            class,
                            error = %message,
                            retry_in_ms = delay.as_millis() as u64,
                            "report not delivered"
                        );
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }

    async fn send(&mut self, report: &Report) -> Result<(), (FailureClass, String)> {
        let body = serde_json::to_vec(report).map_err(|e| (FailureClass::Rejected, e.to_string()))?;
        match self
            .client
            .request(Method::POST, dicops_proto::REPORT_PATH, Some(body))
            .await
        {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, body)) => {
                let message = serde_json::from_slice::<ApiError>(&body)
                    .map(|e| format!("{} ({}): {}", status, e.reason, e.error))
                    .unwrap_or_else(|_| format!("{status}: {}", String::from_utf8_lossy(&body)));
                Err((FailureClass::Rejected, message))
            }
            Err(e) => Err((e.class(), e.to_string())),
        }
    }
}
