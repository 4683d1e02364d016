//! What the controller knows right now: the inventory from its config and
//! the latest report of every agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dicops_config::ControllerConfig;
use dicops_core::liveness;
use dicops_proto::{AgentStatus, Report, SiteStatus, StatusResponse};

use crate::metrics::{self as m, Exposition};

/// The latest accepted report of one agent.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// Controller clock when the report arrived (agents' clocks are not
    /// trusted for liveness).
    pub received_at: f64,
    pub report: Report,
    /// notAfter of the certificate the agent presented.
    pub cert_not_after: Option<f64>,
}

/// Why a report was refused, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRefusal {
    UnknownAgent,
    StaleReport,
}

struct Inner {
    config: Arc<ControllerConfig>,
    agents: HashMap<String, Arc<AgentRecord>>,
}

pub struct State {
    inner: RwLock<Inner>,
}

impl State {
    pub fn new(config: Arc<ControllerConfig>) -> State {
        State {
            inner: RwLock::new(Inner {
                config,
                agents: HashMap::new(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> Arc<ControllerConfig> {
        self.read().config.clone()
    }

    /// Swaps in a new inventory; agents removed from it are forgotten.
    pub fn replace_config(&self, config: Arc<ControllerConfig>) {
        let mut inner = self.write();
        inner.agents.retain(|id, _| config.agents.iter().any(|a| &a.id == id));
        inner.config = config;
    }

    /// (agent, site, last report, info JSON) for the database.
    pub fn inventory_rows(&self) -> Vec<crate::store::InventoryRow> {
        let inner = self.read();
        inner
            .config
            .agents
            .iter()
            .map(|a| {
                let record = inner.agents.get(&a.id);
                crate::store::InventoryRow {
                    agent: a.id.clone(),
                    site: a.site.clone(),
                    last_report_at: record.map(|r| r.received_at),
                    info: record.and_then(|r| serde_json::to_string(&r.report.info).ok()),
                }
            })
            .collect()
    }

    /// Records a report from an authenticated agent. Returns its site.
    pub fn accept_report(
        &self,
        report: Report,
        cert_not_after: Option<f64>,
        now: f64,
    ) -> Result<String, ReportRefusal> {
        let mut inner = self.write();
        let site = inner
            .config
            .site_of(&report.agent)
            .ok_or(ReportRefusal::UnknownAgent)?
            .to_string();
        if let Some(previous) = inner.agents.get(&report.agent) {
            // A replayed or reordered report from the same agent process
            // must not roll the state back.
            if previous.report.instance == report.instance && report.seq <= previous.report.seq {
                return Err(ReportRefusal::StaleReport);
            }
        }
        inner.agents.insert(
            report.agent.clone(),
            Arc::new(AgentRecord {
                received_at: now,
                report,
                cert_not_after,
            }),
        );
        Ok(site)
    }

    /// The latest report of an agent and whether it is up now.
    pub fn agent(&self, agent: &str, now: f64) -> (bool, Option<Arc<AgentRecord>>) {
        let inner = self.read();
        let record = inner.agents.get(agent).cloned();
        (Self::is_up(&inner.config, record.as_deref(), now), record)
    }

    fn is_up(config: &ControllerConfig, record: Option<&AgentRecord>, now: f64) -> bool {
        let Some(record) = record else { return false };
        let interval = if record.report.interval_seconds > 0.0 {
            record.report.interval_seconds
        } else {
            config.report_interval.as_secs_f64()
        };
        liveness::agent_is_up(
            Some(record.received_at),
            now,
            interval,
            config.down_after_missed_reports,
        )
    }

    pub fn status(&self, now: f64) -> StatusResponse {
        let inner = self.read();
        let config = &inner.config;
        let sites = config
            .sites
            .iter()
            .map(|site| {
                let agents: Vec<AgentStatus> = config
                    .agents
                    .iter()
                    .filter(|a| a.site == site.name)
                    .map(|a| {
                        let record = inner.agents.get(&a.id).map(|r| &**r);
                        let up = Self::is_up(config, record, now);
                        AgentStatus {
                            id: a.id.clone(),
                            up,
                            last_report_at: record.map(|r| r.received_at),
                            info: record.map(|r| r.report.info.clone()),
                            health: record.filter(|_| up).map(|r| r.report.health.clone()),
                            certificate_expiry_timestamp_seconds: record.and_then(|r| r.cert_not_after),
                        }
                    })
                    .collect();
                let agents_up = agents.iter().filter(|a| a.up).count();
                SiteStatus {
                    name: site.name.clone(),
                    description: site.description.clone(),
                    reachable: liveness::site_is_reachable(agents_up, agents.len()),
                    agents_up,
                    agents,
                }
            })
            .collect();
        StatusResponse {
            generated_at: now,
            controller_version: env!("CARGO_PKG_VERSION").to_string(),
            sites,
        }
    }

    /// Renders the deployment's state as Prometheus families. Host series
    /// are rendered only for agents that are up: a silent host must not
    /// look healthy on a dashboard.
    pub fn render(&self, now: f64, own_certs: &[(&str, f64)], out: &mut String) {
        // Copy the pointers out and render without the lock: a render of
        // thousands of hosts must not hold up the reports arriving meanwhile.
        let inner = {
            let guard = self.read();
            Inner {
                config: guard.config.clone(),
                agents: guard.agents.clone(),
            }
        };
        let config = &inner.config;
        // (site, agent, record, up) for every agent in the inventory.
        let rows: Vec<(&str, &str, Option<&AgentRecord>, bool)> = config
            .agents
            .iter()
            .map(|a| {
                let record = inner.agents.get(&a.id).map(|r| &**r);
                (a.site.as_str(), a.id.as_str(), record, Self::is_up(config, record, now))
            })
            .collect();
        let mut e = Exposition::new(out);

        e.family(m::CERT_EXPIRY);
        for (cert, not_after) in own_certs {
            e.sample(m::CERT_EXPIRY, &[("cert", cert)], *not_after);
        }
        for (site, agent, record, _) in &rows {
            if let Some(not_after) = record.and_then(|r| r.cert_not_after) {
                e.sample(
                    m::CERT_EXPIRY,
                    &[("cert", "agent"), ("site", site), ("agent", agent)],
                    not_after,
                );
            }
        }

        let site_counts: Vec<(&str, usize, usize)> = config
            .sites
            .iter()
            .map(|s| {
                let of_site = rows.iter().filter(|r| r.0 == s.name);
                let total = of_site.clone().count();
                let up = of_site.filter(|r| r.3).count();
                (s.name.as_str(), total, up)
            })
            .collect();
        e.family(m::SITE_REACHABLE);
        for (site, total, up) in &site_counts {
            let reachable = liveness::site_is_reachable(*up, *total);
            e.sample(m::SITE_REACHABLE, &[("site", site)], f64::from(u8::from(reachable)));
        }
        e.family(m::SITE_AGENTS);
        for (site, total, _) in &site_counts {
            e.sample(m::SITE_AGENTS, &[("site", site)], *total as f64);
        }
        e.family(m::SITE_AGENTS_UP);
        for (site, _, up) in &site_counts {
            e.sample(m::SITE_AGENTS_UP, &[("site", site)], *up as f64);
        }

        e.family(m::AGENT_UP);
        for (site, agent, _, up) in &rows {
            e.sample(
                m::AGENT_UP,
                &[("site", site), ("agent", agent)],
                f64::from(u8::from(*up)),
            );
        }
        let reported: Vec<(&str, &str, &AgentRecord, bool)> = rows
            .iter()
            .filter_map(|(s, a, r, up)| r.map(|r| (*s, *a, r, *up)))
            .collect();
        e.family(m::AGENT_LAST_REPORT);
        for (site, agent, r, _) in &reported {
            e.sample(m::AGENT_LAST_REPORT, &[("site", site), ("agent", agent)], r.received_at);
        }
        e.family(m::AGENT_INFO);
        for (site, agent, r, _) in &reported {
            let info = &r.report.info;
            e.sample(
                m::AGENT_INFO,
                &[
                    ("site", site),
                    ("agent", agent),
                    ("version", &info.version),
                    ("os", &info.os),
                    ("kernel", &info.kernel),
                    ("hostname", &info.hostname),
                ],
                1.0,
            );
        }
        e.family(m::AGENT_REPORT_INTERVAL);
        for (site, agent, r, _) in &reported {
            e.sample(
                m::AGENT_REPORT_INTERVAL,
                &[("site", site), ("agent", agent)],
                r.report.interval_seconds,
            );
        }
        e.family(m::AGENT_REPORT_FAILURES);
        for (site, agent, r, _) in &reported {
            let f = r.report.report_failures;
            for (reason, value) in [("network", f.network), ("tls", f.tls), ("rejected", f.rejected)] {
                e.sample(
                    m::AGENT_REPORT_FAILURES,
                    &[("site", site), ("agent", agent), ("reason", reason)],
                    value as f64,
                );
            }
        }
        e.family(m::AGENT_DATA_REFUSALS);
        for (site, agent, r, _) in &reported {
            // Known reasons only: the label stays bounded whatever an agent sends.
            let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
            for (reason, n) in &r.report.data_refusals {
                let known = dicops_proto::DATA_REFUSAL_REASONS
                    .iter()
                    .find(|k| **k == reason.as_str());
                let slot = counts.entry(known.copied().unwrap_or("other")).or_default();
                *slot = slot.saturating_add(*n);
            }
            for (reason, n) in counts {
                e.sample(
                    m::AGENT_DATA_REFUSALS,
                    &[("site", site), ("agent", agent), ("reason", reason)],
                    n as f64,
                );
            }
        }

        let up: Vec<(&str, &str, &AgentRecord)> = reported
            .iter()
            .filter(|r| r.3)
            .map(|(s, a, r, _)| (*s, *a, *r))
            .collect();
        type Scalar = fn(&dicops_proto::HostHealth) -> f64;
        let scalars: [(m::Def, Scalar); 10] = [
            (m::HOST_CPU, |h| h.cpu_usage_ratio),
            (m::HOST_LOAD1, |h| h.load1),
            (m::HOST_LOAD5, |h| h.load5),
            (m::HOST_LOAD15, |h| h.load15),
            (m::HOST_MEM_TOTAL, |h| h.memory_total_bytes as f64),
            (m::HOST_MEM_AVAIL, |h| h.memory_available_bytes as f64),
            (m::HOST_SWAP_TOTAL, |h| h.swap_total_bytes as f64),
            (m::HOST_SWAP_FREE, |h| h.swap_free_bytes as f64),
            (m::HOST_UPTIME, |h| h.uptime_seconds as f64),
            (m::HOST_BOOT_TIME, |h| h.boot_time_seconds as f64),
        ];
        for (def, get) in scalars {
            e.family(def);
            for (site, agent, r) in &up {
                e.sample(def, &[("site", site), ("agent", agent)], get(&r.report.health));
            }
        }

        type Fs = fn(&dicops_proto::Filesystem) -> f64;
        let fs_families: [(m::Def, Fs); 3] = [
            (m::HOST_FS_SIZE, |f| f.size_bytes as f64),
            (m::HOST_FS_AVAIL, |f| f.avail_bytes as f64),
            (m::HOST_FS_READONLY, |f| f64::from(u8::from(f.read_only))),
        ];
        for (def, get) in fs_families {
            e.family(def);
            for (site, agent, r) in &up {
                for fs in &r.report.health.filesystems {
                    e.sample(
                        def,
                        &[
                            ("site", site),
                            ("agent", agent),
                            ("mountpoint", &fs.mountpoint),
                            ("device", &fs.device),
                            ("fstype", &fs.fstype),
                        ],
                        get(fs),
                    );
                }
            }
        }

        // Sizes only for paths that answered; every path has a state.
        type Path = fn(&dicops_proto::PathUsage) -> f64;
        let path_families: [(m::Def, Path); 2] = [
            (m::HOST_PATH_SIZE, |p| p.size_bytes as f64),
            (m::HOST_PATH_AVAIL, |p| p.avail_bytes as f64),
        ];
        for (def, get) in path_families {
            e.family(def);
            for (site, agent, r) in &up {
                for p in r
                    .report
                    .health
                    .paths
                    .iter()
                    .filter(|p| p.state == dicops_proto::PathState::Ok)
                {
                    e.sample(def, &[("site", site), ("agent", agent), ("path", &p.path)], get(p));
                }
            }
        }
        e.family(m::HOST_PATH_STATE);
        for (site, agent, r) in &up {
            for p in &r.report.health.paths {
                for (state, is) in [
                    ("ok", p.state == dicops_proto::PathState::Ok),
                    ("hung", p.state == dicops_proto::PathState::Hung),
                    ("error", p.state == dicops_proto::PathState::Error),
                ] {
                    e.sample(
                        m::HOST_PATH_STATE,
                        &[("site", site), ("agent", agent), ("path", &p.path), ("state", state)],
                        f64::from(u8::from(is)),
                    );
                }
            }
        }

        type Disk = fn(&dicops_proto::DiskIo) -> f64;
        let disk_families: [(m::Def, Disk); 5] = [
            (m::HOST_DISK_READ, |d| d.read_bytes_total as f64),
            (m::HOST_DISK_WRITTEN, |d| d.written_bytes_total as f64),
            (m::HOST_DISK_READS, |d| d.reads_completed_total as f64),
            (m::HOST_DISK_WRITES, |d| d.writes_completed_total as f64),
            (m::HOST_DISK_IO_TIME, |d| d.io_time_seconds_total),
        ];
        for (def, get) in disk_families {
            e.family(def);
            for (site, agent, r) in &up {
                for d in &r.report.health.disks {
                    e.sample(def, &[("site", site), ("agent", agent), ("device", &d.device)], get(d));
                }
            }
        }

        type Net = fn(&dicops_proto::NetworkIo) -> f64;
        let net_families: [(m::Def, Net); 4] = [
            (m::HOST_NET_RX, |n| n.receive_bytes_total as f64),
            (m::HOST_NET_TX, |n| n.transmit_bytes_total as f64),
            (m::HOST_NET_RX_ERR, |n| n.receive_errors_total as f64),
            (m::HOST_NET_TX_ERR, |n| n.transmit_errors_total as f64),
        ];
        for (def, get) in net_families {
            e.family(def);
            for (site, agent, r) in &up {
                for n in &r.report.health.networks {
                    e.sample(def, &[("site", site), ("agent", agent), ("device", &n.device)], get(n));
                }
            }
        }

        e.family(m::SERVICE_UP);
        for (site, agent, r) in &up {
            for s in &r.report.health.services {
                e.sample(
                    m::SERVICE_UP,
                    &[("site", site), ("agent", agent), ("service", &s.name)],
                    f64::from(u8::from(s.is_up())),
                );
            }
        }
    }
}
