use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{decode, read, Checker, ConfigError, RawTls, TlsFiles};

/// The validated agent config.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub source: PathBuf,
    /// Must match the identity in the agent's certificate.
    pub id: String,
    /// `https://host:port` of the controller.
    pub controller_url: String,
    pub tls: TlsFiles,
    pub collect: CollectConfig,
    /// Where results wait until the controller has acknowledged them.
    pub state_dir: PathBuf,
    /// The only commands this agent runs, by name. The controller refers
    /// to them by name and can never make the agent run anything else.
    pub commands: BTreeMap<String, CommandConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandConfig {
    /// Program and arguments; no shell unless argv says so.
    pub argv: Vec<String>,
    pub working_dir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// The whole process group is killed after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CollectConfig {
    pub interval: Duration,
    /// systemd units whose state is reported.
    pub services: Vec<String>,
    /// How often systemd is asked about them (each ask starts `systemctl`).
    pub services_interval: Duration,
    /// Extra paths measured with statvfs (backup folders, replication
    /// roots, network mounts that sysinfo does not list).
    pub paths: Vec<PathBuf>,
    /// How long a statvfs may take before the path is reported hung.
    pub path_timeout: Duration,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawAgent = decode(path, text)?;
        validate(path, text, raw)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: String,
    controller: RawControllerLink,
    tls: RawTls,
    #[serde(default)]
    collect: RawCollect,
    #[serde(default)]
    state_dir: Option<String>,
    #[serde(default)]
    commands: BTreeMap<String, RawCommand>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    argv: Vec<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControllerLink {
    url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollect {
    interval: Option<String>,
    #[serde(default)]
    services: Vec<String>,
    services_interval: Option<String>,
    #[serde(default)]
    paths: Vec<String>,
    path_timeout: Option<String>,
}

fn validate(path: &Path, text: &str, raw: RawAgent) -> Result<AgentConfig, ConfigError> {
    let mut check = Checker::new(path, text);
    check.id("id", &raw.id, "agent id");
    check.https_url("controller.url", &raw.controller.url);
    let tls = check.tls(&raw.tls);
    let interval = check.duration(
        "collect.interval",
        raw.collect.interval.as_deref(),
        Duration::from_secs(15),
    );
    if interval < Duration::from_secs(1) {
        check.problem(
            "collect.interval",
            "must be at least 1s (CPU usage needs time between two readings)",
        );
    }
    let services_interval = check.duration(
        "collect.services_interval",
        raw.collect.services_interval.as_deref(),
        Duration::from_secs(60).max(interval),
    );
    let path_timeout = check.duration(
        "collect.path_timeout",
        raw.collect.path_timeout.as_deref(),
        Duration::from_secs(5),
    );
    let mut seen = HashSet::new();
    for (i, service) in raw.collect.services.iter().enumerate() {
        let valid = !service.is_empty()
            && service
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c));
        if !valid {
            check.problem(
                &format!("collect.services[{i}]"),
                format!("{service:?} is not a systemd unit name"),
            );
        }
        if !seen.insert(service) {
            check.problem(
                &format!("collect.services[{i}]"),
                format!("service {service:?} is listed twice"),
            );
        }
    }
    let mut paths = Vec::new();
    for (i, p) in raw.collect.paths.iter().enumerate() {
        if !Path::new(p).is_absolute() {
            check.problem(
                &format!("collect.paths[{i}]"),
                format!("{p:?} must be an absolute path"),
            );
        }
        paths.push(PathBuf::from(p));
    }
    let state_dir = check.resolve(raw.state_dir.as_deref().unwrap_or("/var/lib/dicops/agent"));
    let mut commands = BTreeMap::new();
    for (name, command) in raw.commands {
        let field = format!("commands.{name}");
        check.id(&field, &name, "command name");
        if command.argv.is_empty() || command.argv[0].is_empty() {
            check.problem(&format!("{field}.argv"), "must name a program");
        } else if !Path::new(&command.argv[0]).is_absolute() {
            check.problem(
                &format!("{field}.argv"),
                format!(
                    "{:?} must be an absolute path (no PATH lookup for commands run on the controller's behalf)",
                    command.argv[0]
                ),
            );
        }
        if let Some(dir) = &command.working_dir {
            if !Path::new(dir).is_absolute() {
                check.problem(
                    &format!("{field}.working_dir"),
                    format!("{dir:?} must be an absolute path"),
                );
            }
        }
        let timeout = check.duration(
            &format!("{field}.timeout"),
            command.timeout.as_deref(),
            Duration::from_secs(6 * 3600),
        );
        commands.insert(
            name,
            CommandConfig {
                argv: command.argv,
                working_dir: command.working_dir.map(PathBuf::from),
                env: command.env,
                timeout,
            },
        );
    }
    let config = AgentConfig {
        state_dir,
        commands,
        source: path.to_path_buf(),
        id: raw.id,
        controller_url: raw.controller.url,
        tls,
        collect: CollectConfig {
            interval,
            services: raw.collect.services,
            services_interval,
            paths,
            path_timeout,
        },
    };
    check.finish(config)
}
