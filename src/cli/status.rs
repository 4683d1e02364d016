//! `dicops status`: both sites side by side.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dicops_config::CliConfig;
use dicops_proto::{AgentStatus, SiteStatus, StatusResponse};

use super::human_age;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// CLI config: the controller's URL and an operator certificate.
    #[arg(long, short, default_value = "/etc/dicops/cli.yaml", env = "DICOPS_CLI_CONFIG")]
    pub config: PathBuf,
    /// Print the raw JSON of the status API.
    #[arg(long)]
    pub json: bool,
    /// One site under the other instead of side by side.
    #[arg(long)]
    pub stacked: bool,
}

/// Fetches the controller's status with an operator certificate.
pub async fn fetch(config: &CliConfig) -> anyhow::Result<StatusResponse> {
    super::api::Api::new(config)?.get(dicops_proto::STATUS_PATH).await
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = match CliConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let status = fetch(&config).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status, &config.controller_url, !args.stacked));
    }
    Ok(ExitCode::SUCCESS)
}

fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

fn agent_row(agent: &AgentStatus, now: f64) -> [String; 6] {
    let age = agent
        .last_report_at
        .map(|at| format!("{} ago", human_age(now - at)))
        .unwrap_or_else(|| "never".into());
    let state = if agent.up { "up" } else { "DOWN" }.to_string();
    match &agent.health {
        Some(h) => {
            let memory = if h.memory_total_bytes > 0 {
                percent(1.0 - h.memory_available_bytes as f64 / h.memory_total_bytes as f64)
            } else {
                "-".into()
            };
            let fullest = h
                .filesystems
                .iter()
                .filter(|f| f.size_bytes > 0)
                .map(|f| (1.0 - f.avail_bytes as f64 / f.size_bytes as f64, f.mountpoint.as_str()))
                .chain(
                    h.paths
                        .iter()
                        .filter(|p| p.size_bytes > 0)
                        .map(|p| (1.0 - p.avail_bytes as f64 / p.size_bytes as f64, p.path.as_str())),
                )
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(used, mount)| format!("{mount} {}", percent(used)))
                .unwrap_or_else(|| "-".into());
            let hung = h
                .paths
                .iter()
                .filter(|p| p.state == dicops_proto::PathState::Hung)
                .count();
            let fullest = if hung > 0 {
                format!("{fullest} ({hung} HUNG)")
            } else {
                fullest
            };
            [
                agent.id.clone(),
                state,
                age,
                percent(h.cpu_usage_ratio),
                memory,
                fullest,
            ]
        }
        None => [agent.id.clone(), state, age, "-".into(), "-".into(), "-".into()],
    }
}

fn site_block(site: &SiteStatus, now: f64) -> Vec<String> {
    let mut lines = Vec::new();
    let reach = if site.reachable {
        format!("{}/{} agents up", site.agents_up, site.agents.len())
    } else {
        format!("UNREACHABLE: 0/{} agents up", site.agents.len())
    };
    let title = if site.description.is_empty() {
        format!("SITE {}: {reach}", site.name)
    } else {
        format!("SITE {} ({}): {reach}", site.name, site.description)
    };
    lines.push(title);
    let header = ["AGENT", "STATE", "LAST REPORT", "CPU", "MEM", "FULLEST FS"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(site.agents.iter().map(|a| agent_row(a, now)))
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        lines.push(format!("  {}", cells.join("  ").trim_end()));
    }
    lines
}

pub fn render(status: &StatusResponse, url: &str, side_by_side: bool) -> String {
    let now = status.generated_at;
    let mut out = format!(
        "dicops status: controller {url} (version {})\n\n",
        status.controller_version
    );
    let blocks: Vec<Vec<String>> = status.sites.iter().map(|s| site_block(s, now)).collect();
    if side_by_side {
        for pair in blocks.chunks(2) {
            let width = pair[0].iter().map(|l| l.chars().count()).max().unwrap_or(0) + 4;
            let height = pair.iter().map(Vec::len).max().unwrap_or(0);
            for i in 0..height {
                let left = pair[0].get(i).map(String::as_str).unwrap_or("");
                let right = pair.get(1).and_then(|b| b.get(i)).map(String::as_str).unwrap_or("");
                let line = format!("{left:<width$}{right}");
                out.push_str(line.trim_end());
                out.push('\n');
            }
            out.push('\n');
        }
    } else {
        for block in blocks {
            for line in block {
                out.push_str(&line);
                out.push('\n');
            }
            out.push('\n');
        }
    }
    out
}
