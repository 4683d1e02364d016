use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dicops_core::retention::RetentionPolicy;
use serde::Deserialize;

use crate::{decode, read, Checker, ConfigError, RawKeep, RawTls, TlsFiles};

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
    /// Folders where other tools leave backups, by name; the controller's
    /// `watch:` backups refer to them.
    pub watches: BTreeMap<String, WatchConfig>,
    /// Local retention counts days, weeks and months in this timezone; set
    /// it to the controller's.
    pub timezone: chrono_tz::Tz,
    /// The data port replication pulls connect to (source agents).
    pub data: Option<DataConfig>,
    /// Folders this agent serves, read only, to replication pulls, by name.
    pub exports: BTreeMap<String, PathBuf>,
    /// Folders under which this agent may write replicas, by name.
    pub roots: BTreeMap<String, PathBuf>,
}

/// Where an agent serves replication data to its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataConfig {
    pub listen: std::net::SocketAddr,
    /// How peers reach it (`https://host:port`), announced to the controller.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandConfig {
    /// Program and arguments; no shell unless argv says so.
    pub argv: Vec<String>,
    /// Defaults to the output folder of a backup command.
    pub working_dir: Option<PathBuf>,
    /// Added to a minimal environment (PATH, HOME, USER, LANG and the
    /// DICOPS_* variables); the agent's own environment is not passed on.
    pub env: BTreeMap<String, String>,
    /// The whole process group is killed after this long.
    pub timeout: Duration,
    /// Run as this user instead of the agent's.
    pub user: Option<RunAs>,
    /// Set for backup commands: where they write their artifacts.
    pub output: Option<OutputConfig>,
}

/// A user to run a command as, resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The output folder of a backup command, and what the agent does with it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputConfig {
    pub dir: PathBuf,
    /// A run does not start when the folder's filesystem has less free.
    pub min_free: FreeSpace,
    /// Local retention of the artifacts runs produced.
    pub retention: RetentionPolicy,
    /// Never delete an artifact that is not yet in the other site.
    pub wait_for_replication: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FreeSpace {
    Bytes(u64),
    /// A share of the filesystem's size, 0 to 1.
    Ratio(f64),
}

impl FreeSpace {
    /// The floor in bytes on a filesystem of `size` bytes.
    pub fn floor(&self, size: u64) -> u64 {
        match *self {
            FreeSpace::Bytes(b) => b,
            FreeSpace::Ratio(r) => (size as f64 * r).ceil() as u64,
        }
    }
}

impl std::fmt::Display for FreeSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            FreeSpace::Bytes(b) => write!(f, "{}", dicops_core::units::format_bytes(b)),
            FreeSpace::Ratio(r) => write!(f, "{}%", r * 100.0),
        }
    }
}

/// A folder where another tool leaves its backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    pub path: PathBuf,
    /// Which file names in it are backups (shell pattern, e.g. `*.dump`).
    pub glob: String,
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
    /// How often watched folders and backup output folders are scanned.
    pub backups_interval: Duration,
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
    #[serde(default)]
    watches: BTreeMap<String, RawWatch>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    data: Option<RawData>,
    #[serde(default)]
    exports: BTreeMap<String, String>,
    #[serde(default)]
    roots: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    listen: String,
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    path: String,
    #[serde(default)]
    glob: Option<String>,
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
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    min_free: Option<String>,
    #[serde(default)]
    retention: Option<RawKeep>,
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
    backups_interval: Option<String>,
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
        for key in command.env.keys() {
            if key.starts_with("DICOPS_") {
                check.problem(
                    &format!("{field}.env.{key}"),
                    "DICOPS_* variables are set by the agent for every run",
                );
            }
        }
        let user = command
            .user
            .as_deref()
            .and_then(|user| check.user(&format!("{field}.user"), user));
        let output = validate_output(&mut check, &field, &command);
        commands.insert(
            name,
            CommandConfig {
                argv: command.argv,
                working_dir: command.working_dir.map(PathBuf::from),
                env: command.env,
                timeout,
                user,
                output,
            },
        );
    }
    let mut watches = BTreeMap::new();
    for (name, watch) in raw.watches {
        let field = format!("watches.{name}");
        check.id(&field, &name, "watch name");
        if !Path::new(&watch.path).is_absolute() {
            check.problem(
                &format!("{field}.path"),
                format!("{:?} must be an absolute path", watch.path),
            );
        }
        let glob = watch.glob.unwrap_or_else(|| "*".to_string());
        if let Err(e) = dicops_core::glob::validate_glob(&glob) {
            check.problem(&format!("{field}.glob"), e);
        }
        watches.insert(
            name,
            WatchConfig {
                path: PathBuf::from(watch.path),
                glob,
            },
        );
    }
    let backups_interval = check.duration(
        "collect.backups_interval",
        raw.collect.backups_interval.as_deref(),
        Duration::from_secs(60).max(interval),
    );
    let timezone = match raw.timezone.as_deref() {
        None => chrono_tz::UTC,
        Some(name) => dicops_core::schedule::parse_timezone(name).unwrap_or_else(|e| {
            check.problem("timezone", e);
            chrono_tz::UTC
        }),
    };
    let data = raw.data.as_ref().map(|data| {
        let listen = data.listen.parse().unwrap_or_else(|_| {
            check.problem(
                "data.listen",
                format!("{:?} is not an address and port such as 0.0.0.0:9444", data.listen),
            );
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        });
        check.https_url("data.url", &data.url);
        DataConfig {
            listen,
            url: data.url.clone(),
        }
    });
    let exports = named_folders(&mut check, "exports", &raw.exports);
    let roots = named_folders(&mut check, "roots", &raw.roots);
    if !exports.is_empty() && data.is_none() {
        check.problem(
            "exports",
            "exported folders are served on the data port: set `data: {listen: ADDRESS:PORT, url: https://HOST:PORT}`",
        );
    }
    for (name, root) in &roots {
        if let Some((export, _)) = exports.iter().find(|(_, e)| root.starts_with(e) || e.starts_with(root)) {
            check.problem(
                &format!("roots.{name}"),
                format!(
                    "root {} overlaps export {export:?}: replicas would be replicated back",
                    root.display()
                ),
            );
        }
    }
    let config = AgentConfig {
        data,
        exports,
        roots,
        timezone,
        state_dir,
        commands,
        watches,
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
            backups_interval,
        },
    };
    check.finish(config)
}

/// The backup settings of a command: `output` and what goes with it.
fn validate_output(check: &mut Checker<'_>, field: &str, command: &RawCommand) -> Option<OutputConfig> {
    let Some(dir) = &command.output else {
        for (set, key) in [
            (command.min_free.is_some(), "min_free"),
            (command.retention.is_some(), "retention"),
        ] {
            if set {
                check.problem(
                    &format!("{field}.{key}"),
                    format!("`{key}` applies to a backup command's output folder: set `output` too"),
                );
            }
        }
        return None;
    };
    if !Path::new(dir).is_absolute() {
        check.problem(&format!("{field}.output"), format!("{dir:?} must be an absolute path"));
    }
    let min_free = match command.min_free.as_deref() {
        None => FreeSpace::Ratio(0.01),
        Some(text) => match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => FreeSpace::Ratio(p / 100.0),
                _ => {
                    check.problem(
                        &format!("{field}.min_free"),
                        format!("{text:?} is not a percentage from 0% to 100%"),
                    );
                    FreeSpace::Ratio(0.01)
                }
            },
            None => match dicops_core::units::parse_bytes(text) {
                Ok(b) => FreeSpace::Bytes(b),
                Err(e) => {
                    check.problem(&format!("{field}.min_free"), e);
                    FreeSpace::Ratio(0.01)
                }
            },
        },
    };
    let raw = command.retention.as_ref();
    let retention = raw.map(RawKeep::policy).unwrap_or_default();
    Some(OutputConfig {
        dir: PathBuf::from(dir),
        min_free,
        retention,
        wait_for_replication: raw.and_then(|r| r.wait_for_replication).unwrap_or(true),
    })
}

/// `exports:` or `roots:`: names to absolute folders.
fn named_folders(check: &mut Checker<'_>, section: &str, raw: &BTreeMap<String, String>) -> BTreeMap<String, PathBuf> {
    let mut folders = BTreeMap::new();
    for (name, path) in raw {
        let field = format!("{section}.{name}");
        check.id(&field, name, "name");
        if !Path::new(path).is_absolute() {
            check.problem(&field, format!("{path:?} must be an absolute path"));
        }
        folders.insert(name.clone(), PathBuf::from(path));
    }
    folders
}
