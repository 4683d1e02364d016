use std::collections::HashSet;
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct CollectConfig {
    pub interval: Duration,
    /// systemd units whose state is reported.
    pub services: Vec<String>,
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
    let config = AgentConfig {
        source: path.to_path_buf(),
        id: raw.id,
        controller_url: raw.controller.url,
        tls,
        collect: CollectConfig {
            interval,
            services: raw.collect.services,
            paths,
            path_timeout,
        },
    };
    check.finish(config)
}
