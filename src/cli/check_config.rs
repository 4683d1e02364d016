//! `dicops check-config`: validate config files, and the certificates they
//! name, without starting anything.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dicops_config::{detect_kind, AgentConfig, CliConfig, ConfigKind, ControllerConfig};

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Config files: controller, agent or CLI (told apart by their keys).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Force the kind instead of guessing it.
    #[arg(long, value_parser = ["controller", "agent", "cli"])]
    kind: Option<String>,
}

pub fn run(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for file in &args.files {
        match check(file, args.kind.as_deref()) {
            Ok(summary) => println!("{}: ok ({summary})", file.display()),
            Err(message) => {
                failed = true;
                eprintln!("{message}");
            }
        }
    }
    Ok(if failed { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn check(file: &std::path::Path, kind: Option<&str>) -> Result<String, String> {
    let kind = match kind {
        Some("controller") => ConfigKind::Controller,
        Some("agent") => ConfigKind::Agent,
        Some(_) => ConfigKind::Cli,
        None => detect_kind(file).map_err(|e| e.to_string())?,
    };
    match kind {
        ConfigKind::Controller => {
            let config = ControllerConfig::load(file).map_err(|e| e.to_string())?;
            dicops_controller::load_tls(&config).map_err(|e| e.to_string())?;
            let count = |kind: &str| config.jobs.iter().filter(|j| j.kind.as_str() == kind).count();
            let run_backups = count("backup");
            Ok(format!(
                "controller: {} sites, {} agents, {} jobs, {} backups ({} run, {} watched), {} replications, listens on {}",
                config.sites.len(),
                config.agents.len(),
                count("command"),
                run_backups + config.watched_backups.len(),
                run_backups,
                config.watched_backups.len(),
                count("replication"),
                config.listen
            ))
        }
        ConfigKind::Agent => {
            let config = AgentConfig::load(file).map_err(|e| e.to_string())?;
            dicops_agent::load_tls(&config).map_err(|e| e.to_string())?;
            let backups = config.commands.values().filter(|c| c.output.is_some()).count();
            Ok(format!(
                "agent {} reporting to {}: {} commands ({backups} backups), {} watched folders, {} exports, {} roots",
                config.id,
                config.controller_url,
                config.commands.len(),
                config.watches.len(),
                config.exports.len(),
                config.roots.len()
            ))
        }
        ConfigKind::Cli => {
            let config = CliConfig::load(file).map_err(|e| e.to_string())?;
            let tls = dicops_net::TlsReloader::load(dicops_net::TlsFiles {
                ca: config.tls.ca.clone(),
                cert: config.tls.cert.clone(),
                key: config.tls.key.clone(),
            })
            .map_err(|e| format!("{}: {e}", file.display()))?;
            Ok(format!("CLI as {} for {}", tls.identity(), config.controller_url))
        }
    }
}
