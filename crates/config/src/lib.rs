//! Configuration of the dicops controller, agents and CLI.
//!
//! Each file is read in two steps: serde decodes the raw YAML (unknown
//! fields are refused, and syntax and type errors carry line and column),
//! then `validate` turns the raw structs into typed values and collects
//! every semantic problem at once, each with the field path and, found by
//! [`locate`], the line and column of the offending value. The daemons only
//! ever see the validated types.

mod agent;
mod cli;
mod controller;
mod error;
mod jobs;
mod locate;
mod users;

pub use agent::{AgentConfig, CollectConfig, CommandConfig, DataConfig, FreeSpace, OutputConfig, RunAs, WatchConfig};
pub use cli::CliConfig;
pub use controller::{AgentEntry, ControllerConfig, Link, Site};
pub use error::{ConfigError, Problem};
pub use jobs::{Compression, JobConfig, JobKind, ReplicationSpec, WatchBackup};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Paths of the PEM files that make up one party's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The deployment's CA certificate: peers must chain to it.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for a renewal.
    pub reload_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: String,
    cert: String,
    key: String,
    #[serde(default)]
    reload_interval: Option<String>,
}

/// A retention policy as written (`retention:` of a backup command or of
/// a replication).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeep {
    #[serde(default)]
    keep_last: u32,
    #[serde(default)]
    keep_hourly: u32,
    #[serde(default)]
    keep_daily: u32,
    #[serde(default)]
    keep_weekly: u32,
    #[serde(default)]
    keep_monthly: u32,
    #[serde(default)]
    keep_yearly: u32,
    /// Backups only: never delete what the other site does not hold yet.
    #[serde(default)]
    wait_for_replication: Option<bool>,
}

impl RawKeep {
    fn policy(&self) -> dicops_core::retention::RetentionPolicy {
        dicops_core::retention::RetentionPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
        }
    }
}

/// Which kind of config a file holds, told from its top-level keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Controller,
    Agent,
    Cli,
}

/// Reads a file and guesses its kind: a controller config has `sites`, an
/// agent config has `collect` or `id`, a CLI config has `controller` as a URL.
pub fn detect_kind(path: &Path) -> Result<ConfigKind, ConfigError> {
    let text = read(path)?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::from_yaml(path, &e))?;
    let has = |key: &str| value.get(key).is_some();
    if has("sites") || has("agents") {
        Ok(ConfigKind::Controller)
    } else if has("id") || has("collect") {
        Ok(ConfigKind::Agent)
    } else if value.get("controller").map(|v| v.is_string()).unwrap_or(false) {
        Ok(ConfigKind::Cli)
    } else {
        Err(ConfigError::single(
            path,
            None,
            "",
            "cannot tell whether this is a controller config (has `sites`), an agent config (has `id`) or a CLI config (has `controller: URL`)",
        ))
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::single(path, None, "", &format!("cannot read config file: {e}")))
}

/// Decodes the raw YAML; syntax, type and unknown-field errors carry their
/// position.
fn decode<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::from_yaml(path, &e))
}

/// Collects semantic problems for one file, locating each in the source.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    base_dir: PathBuf,
    problems: Vec<Problem>,
    /// False to validate a config away from the host it is meant for
    /// (`dicops plan`): files it names are not looked for.
    check_files: bool,
}

impl<'a> Checker<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        let base_dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Checker {
            file,
            text,
            base_dir,
            problems: Vec::new(),
            check_files: true,
        }
    }

    fn problem(&mut self, field: &str, message: impl Into<String>) {
        let location = locate::locate(self.text, field);
        self.problems.push(Problem {
            location,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                file: self.file.to_path_buf(),
                problems: self.problems,
            })
        }
    }

    /// Relative paths in a config are relative to the config file.
    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    fn existing_file(&mut self, field: &str, path: &str) -> PathBuf {
        let resolved = self.resolve(path);
        if !self.check_files {
            return resolved;
        }
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => self.problem(field, format!("{} is not a file", resolved.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.problem(field, format!("file {} does not exist", resolved.display()))
            }
            Err(e) => self.problem(field, format!("cannot read {}: {e}", resolved.display())),
        }
        resolved
    }

    fn duration(&mut self, field: &str, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => match dicops_core::units::parse_duration(text) {
                Ok(d) if d.is_zero() => {
                    self.problem(field, "must be greater than zero");
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.problem(field, e);
                    default
                }
            },
        }
    }

    fn bytes(&mut self, field: &str, raw: Option<&str>, default: u64) -> u64 {
        match raw {
            None => default,
            Some(text) => match dicops_core::units::parse_bytes(text) {
                Ok(0) => {
                    self.problem(field, "must be greater than zero");
                    default
                }
                Ok(n) => n,
                Err(e) => {
                    self.problem(field, e);
                    default
                }
            },
        }
    }

    fn id(&mut self, field: &str, id: &str, what: &str) {
        if !dicops_proto::is_valid_id(id) {
            self.problem(
                field,
                format!("{what} {id:?} is not valid: use 1-64 letters, digits, '.', '-' or '_'"),
            );
        }
    }

    /// The user a command runs as; must exist on this host.
    fn user(&mut self, field: &str, name: &str) -> Option<agent::RunAs> {
        if !self.check_files {
            return None;
        }
        match users::lookup(name) {
            Ok(Some(user)) => Some(user),
            Ok(None) => {
                self.problem(field, format!("user {name:?} does not exist on this host"));
                None
            }
            Err(e) => {
                self.problem(field, e);
                None
            }
        }
    }

    fn tls(&mut self, raw: &RawTls) -> TlsFiles {
        TlsFiles {
            ca: self.existing_file("tls.ca", &raw.ca),
            cert: self.existing_file("tls.cert", &raw.cert),
            key: self.existing_file("tls.key", &raw.key),
            reload_interval: self.duration(
                "tls.reload_interval",
                raw.reload_interval.as_deref(),
                Duration::from_secs(10),
            ),
        }
    }

    fn https_url(&mut self, field: &str, url: &str) {
        match url.strip_prefix("https://") {
            None => self.problem(
                field,
                format!("{url:?} must start with https:// (dicops speaks only TLS)"),
            ),
            Some(rest) => {
                let authority = rest.split('/').next().unwrap_or("");
                let has_port = authority
                    .rsplit_once(':')
                    .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                    .unwrap_or(false);
                if !has_port {
                    self.problem(
                        field,
                        format!("{url:?} must name a host and port, e.g. https://controller.example:9443"),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
