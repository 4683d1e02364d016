use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::jobs::{validate_jobs, JobConfig, RawBackup, RawJob, RawReplication, RawVerify, WatchBackup};
use crate::{decode, read, Checker, ConfigError, RawTls, TlsFiles};

/// The validated controller config.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// The interval agents are expected to report at, used until an agent
    /// has told its own.
    pub report_interval: Duration,
    /// An agent is down after this many report intervals without a report.
    pub down_after_missed_reports: u32,
    /// Largest request body the API accepts.
    pub max_request_bytes: u64,
    pub sites: Vec<Site>,
    pub agents: Vec<AgentEntry>,
    /// The deployment's timezone: every schedule is evaluated in it.
    pub timezone: chrono_tz::Tz,
    /// The controller's SQLite database.
    pub database: PathBuf,
    /// Run history older than this is pruned.
    pub history_keep: Duration,
    /// Runs at once between one pair of sites (source site, destination site).
    pub concurrent_runs_per_site_pair: usize,
    /// Backup runs at once on one agent (its disks and database are busy
    /// enough with one).
    pub concurrent_backups_per_agent: usize,
    /// Scheduled jobs, run backups included.
    pub jobs: Vec<JobConfig>,
    /// Backups made by other tools, watched by agents.
    pub watched_backups: Vec<WatchBackup>,
    /// Bandwidth budgets of the links between sites.
    pub links: Vec<Link>,
    /// Fingerprint of the file's bytes, to show drift from the deployed
    /// file (`dicops_config_info{hash}`).
    pub hash: String,
}

/// The link between two sites and its bandwidth budget, shared by every
/// replication between them (both directions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub sites: (String, String),
    pub budget: dicops_core::links::LinkBudget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    pub id: String,
    pub site: String,
    pub description: String,
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ControllerConfig, ConfigError> {
        let raw: RawController = decode(path, text)?;
        validate(path, text, raw, true)
    }

    /// Validates everything but the existence of the files it names, to
    /// preview a config away from its host (`dicops plan`).
    pub fn load_without_files(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = read(path)?;
        let raw: RawController = decode(path, &text)?;
        validate(path, &text, raw, false)
    }

    pub fn job(&self, name: &str) -> Option<&JobConfig> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The budget of the link between two sites, in either order.
    pub fn link_between(&self, a: &str, b: &str) -> Option<&dicops_core::links::LinkBudget> {
        self.links
            .iter()
            .find(|l| (l.sites.0 == a && l.sites.1 == b) || (l.sites.0 == b && l.sites.1 == a))
            .map(|l| &l.budget)
    }

    pub fn site_of(&self, agent: &str) -> Option<&str> {
        self.agents.iter().find(|a| a.id == agent).map(|a| a.site.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    listen: String,
    tls: RawTls,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    state: RawState,
    sites: Vec<RawSite>,
    #[serde(default)]
    agents: Vec<RawAgentEntry>,
    #[serde(default)]
    jobs: Vec<RawJob>,
    #[serde(default)]
    backups: Vec<RawBackup>,
    #[serde(default)]
    replications: Vec<RawReplication>,
    #[serde(default)]
    verifications: Vec<RawVerify>,
    #[serde(default)]
    links: Vec<RawLink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    sites: Vec<String>,
    #[serde(default)]
    bandwidth: Option<String>,
    #[serde(default)]
    windows: Vec<RawWindow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    #[serde(default)]
    days: Option<String>,
    from: String,
    to: String,
    bandwidth: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    database: Option<String>,
    history_keep: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    report_interval: Option<String>,
    down_after_missed_reports: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_bytes: Option<String>,
    concurrent_runs_per_site_pair: Option<usize>,
    concurrent_backups_per_agent: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentEntry {
    id: String,
    site: String,
    #[serde(default)]
    description: String,
}

fn validate(path: &Path, text: &str, raw: RawController, check_files: bool) -> Result<ControllerConfig, ConfigError> {
    let mut check = Checker::new(path, text);
    check.check_files = check_files;

    let listen = match raw.listen.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            check.problem(
                "listen",
                format!("{:?} is not an address and port such as 0.0.0.0:9443", raw.listen),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let tls = check.tls(&raw.tls);
    let report_interval = check.duration(
        "health.report_interval",
        raw.health.report_interval.as_deref(),
        Duration::from_secs(15),
    );
    let down_after_missed_reports = raw.health.down_after_missed_reports.unwrap_or(3);
    if down_after_missed_reports == 0 {
        check.problem("health.down_after_missed_reports", "must be at least 1");
    }
    let max_request_bytes = check.bytes(
        "limits.max_request_bytes",
        raw.limits.max_request_bytes.as_deref(),
        1 << 20,
    );

    if raw.sites.is_empty() {
        check.problem("sites", "at least one site must be declared");
    }
    let mut site_index: HashMap<&str, usize> = HashMap::new();
    for (i, site) in raw.sites.iter().enumerate() {
        let field = format!("sites[{i}].name");
        check.id(&field, &site.name, "site name");
        if let Some(first) = site_index.insert(&site.name, i) {
            check.problem(
                &field,
                format!("duplicate site {:?} (first declared at sites[{first}])", site.name),
            );
        }
    }
    let mut agent_index: HashMap<&str, usize> = HashMap::new();
    for (i, agent) in raw.agents.iter().enumerate() {
        let field = format!("agents[{i}].id");
        check.id(&field, &agent.id, "agent id");
        if let Some(first) = agent_index.insert(&agent.id, i) {
            check.problem(
                &field,
                format!("duplicate agent id {:?} (first declared at agents[{first}])", agent.id),
            );
        }
        if !site_index.contains_key(agent.site.as_str()) {
            let declared: Vec<&str> = raw.sites.iter().map(|s| s.name.as_str()).collect();
            check.problem(
                &format!("agents[{i}].site"),
                format!(
                    "agent {:?} is in site {:?}, which is not declared in sites (declared: {})",
                    agent.id,
                    agent.site,
                    declared.join(", ")
                ),
            );
        }
    }

    let timezone = match raw.timezone.as_deref() {
        None => chrono_tz::UTC,
        Some(name) => dicops_core::schedule::parse_timezone(name).unwrap_or_else(|e| {
            check.problem("timezone", e);
            chrono_tz::UTC
        }),
    };
    let database = check.resolve(raw.state.database.as_deref().unwrap_or("/var/lib/dicops/controller.db"));
    let history_keep = check.duration(
        "state.history_keep",
        raw.state.history_keep.as_deref(),
        Duration::from_secs(90 * 86400),
    );
    let concurrent_runs_per_site_pair = raw.limits.concurrent_runs_per_site_pair.unwrap_or(4);
    if concurrent_runs_per_site_pair == 0 {
        check.problem("limits.concurrent_runs_per_site_pair", "must be at least 1");
    }
    let concurrent_backups_per_agent = raw.limits.concurrent_backups_per_agent.unwrap_or(1);
    if concurrent_backups_per_agent == 0 {
        check.problem("limits.concurrent_backups_per_agent", "must be at least 1");
    }
    let agent_sites: HashMap<&str, &str> = raw.agents.iter().map(|a| (a.id.as_str(), a.site.as_str())).collect();
    let links = validate_links(&mut check, &raw.links, &site_index);
    let (jobs, watched_backups) = validate_jobs(
        &mut check,
        raw.jobs,
        raw.backups,
        raw.replications,
        raw.verifications,
        &agent_sites,
    );

    let config = ControllerConfig {
        timezone,
        database,
        history_keep,
        concurrent_runs_per_site_pair,
        concurrent_backups_per_agent,
        jobs,
        watched_backups,
        links,
        hash: fingerprint(text),
        source: path.to_path_buf(),
        listen,
        tls,
        report_interval,
        down_after_missed_reports,
        max_request_bytes,
        sites: raw
            .sites
            .into_iter()
            .map(|s| Site {
                name: s.name,
                description: s.description,
            })
            .collect(),
        agents: raw
            .agents
            .into_iter()
            .map(|a| AgentEntry {
                id: a.id,
                site: a.site,
                description: a.description,
            })
            .collect(),
    };
    check.finish(config)
}

/// FNV-1a of the file, in hex: enough to tell two deployed files apart.
fn fingerprint(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A rate such as `100MiB/s` (the `/s` is optional).
fn rate(check: &mut Checker<'_>, field: &str, text: &str) -> u64 {
    check.bytes(field, Some(text.strip_suffix("/s").unwrap_or(text)), u64::MAX)
}

fn validate_links(check: &mut Checker<'_>, raw: &[RawLink], sites: &HashMap<&str, usize>) -> Vec<Link> {
    use dicops_core::links::{parse_clock, parse_days, LinkBudget, Window};
    let mut links: Vec<Link> = Vec::new();
    for (i, link) in raw.iter().enumerate() {
        let at = |field: &str| format!("links[{i}].{field}");
        let [a, b] = link.sites.as_slice() else {
            check.problem(&at("sites"), "a link joins exactly two sites: `sites: [dc1, dc2]`");
            continue;
        };
        for site in [a, b] {
            if !sites.contains_key(site.as_str()) {
                check.problem(&at("sites"), format!("site {site:?} is not declared in sites"));
            }
        }
        if links
            .iter()
            .any(|l| (&l.sites.0, &l.sites.1) == (a, b) || (&l.sites.0, &l.sites.1) == (b, a))
        {
            check.problem(&at("sites"), format!("the link between {a} and {b} is declared twice"));
        }
        let mut windows = Vec::new();
        for (j, w) in link.windows.iter().enumerate() {
            let wat = |field: &str| format!("links[{i}].windows[{j}].{field}");
            let days = match w.days.as_deref().map(parse_days) {
                None => Ok([true; 7]),
                Some(result) => result,
            }
            .unwrap_or_else(|e| {
                check.problem(&wat("days"), e);
                [true; 7]
            });
            let mut clock = |field: &str, text: &str| {
                parse_clock(text).unwrap_or_else(|e| {
                    check.problem(&wat(field), e);
                    0
                })
            };
            let (from, to) = (clock("from", &w.from), clock("to", &w.to));
            if from == to {
                check.problem(&wat("to"), "a window must not start and end at the same time");
            }
            windows.push(Window {
                days,
                from,
                to,
                rate: rate(check, &wat("bandwidth"), &w.bandwidth),
            });
        }
        links.push(Link {
            sites: (a.clone(), b.clone()),
            budget: LinkBudget {
                rate: link.bandwidth.as_deref().map(|t| rate(check, &at("bandwidth"), t)),
                windows,
            },
        });
    }
    links
}
