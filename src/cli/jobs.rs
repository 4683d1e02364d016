//! Jobs from the command line: list, run now (and follow), pause, resume,
//! history, one run, reload, and a preview of the schedules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use chrono::{TimeZone, Utc};
use clap::Args;
use dicops_config::ControllerConfig;
use dicops_proto::{JobStatus, RunInfo, RunStarted};

use dicops_core::units::format_bytes;

use super::api::Api;
use super::human_age;

#[derive(Debug, Args)]
pub struct CliArgs {
    /// CLI config: the controller's URL and an operator certificate.
    #[arg(long, short, default_value = "/etc/dicops/cli.yaml", env = "DICOPS_CLI_CONFIG")]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub cli: CliArgs,
    /// The job to run now.
    pub job: String,
    /// Wait and show the run's progress until it ends (exit 1 if it fails).
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub cli: CliArgs,
    pub job: String,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub cli: CliArgs,
    pub job: String,
    /// How many runs, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub cli: CliArgs,
    /// The run id.
    pub run: i64,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The controller config whose schedules to preview.
    #[arg(default_value = "/etc/dicops/controller.yaml")]
    pub file: PathBuf,
    /// Fires to show per job.
    #[arg(long, default_value_t = 5)]
    pub count: usize,
}

fn time(unix: f64) -> String {
    Utc.timestamp_opt(unix as i64, 0)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn now() -> f64 {
    Utc::now().timestamp_millis() as f64 / 1000.0
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn list(args: CliArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.config)?;
    let jobs: Vec<JobStatus> = api.get(dicops_proto::JOBS_PATH).await?;
    if args.json {
        print_json(&jobs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now();
    println!(
        "{:<24} {:<5} {:<10} {:<14} {:<22} LAST RUN",
        "JOB", "SITE", "AGENT", "SCHEDULE", "NEXT FIRE"
    );
    for job in jobs {
        let next = match (job.paused, job.next_fire) {
            (true, _) => "paused".to_string(),
            (false, Some(at)) => format!("in {}", human_age(at - now)),
            (false, None) => "manual only".to_string(),
        };
        let last = match (&job.last_run, job.running_run) {
            (_, Some(id)) => format!("running (run {id})"),
            (Some(run), None) => format!(
                "{} {} ago (run {})",
                run.status,
                human_age(now - run.created_at),
                run.id
            ),
            (None, None) => "never".into(),
        };
        println!(
            "{:<24} {:<5} {:<10} {:<14} {:<22} {last}",
            job.name,
            job.site,
            job.agent,
            job.schedule.unwrap_or_else(|| "-".into()),
            next
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(run: &RunInfo) -> String {
    let mut text = format!(
        "run {} of {} ({}, attempt {}): {}\n  created  {}\n",
        run.id,
        run.job,
        run.trigger,
        run.attempt,
        run.status,
        time(run.created_at)
    );
    if let Some(at) = run.started_at {
        text.push_str(&format!("  started  {}\n", time(at)));
    }
    if let Some(at) = run.finished_at {
        let took = run
            .started_at
            .map(|s| format!(" (took {})", human_age(at - s)))
            .unwrap_or_default();
        text.push_str(&format!("  finished {}{took}\n", time(at)));
    }
    if let Some(code) = run.exit_code {
        text.push_str(&format!("  exit code {code}\n"));
    }
    if let Some(error) = &run.error {
        text.push_str(&format!("  error: {error}\n"));
    }
    if let (Some(bytes), Some(files)) = (run.bytes, run.files) {
        text.push_str(&format!("  produced {} in {files} file(s)\n", format_bytes(bytes)));
    }
    if !run.artifacts.is_empty() {
        text.push_str("  manifest (BLAKE3):\n");
        for a in &run.artifacts {
            text.push_str(&format!("    {}  {:>10}  {}\n", a.blake3, format_bytes(a.size), a.path));
        }
    }
    if let Some(tail) = run.output_tail.as_deref().filter(|t| !t.trim().is_empty()) {
        text.push_str("  output (tail):\n");
        for line in tail.lines() {
            text.push_str(&format!("    {line}\n"));
        }
    }
    text
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.cli.config)?;
    let started: RunStarted = api
        .post(&format!("{}/{}/run", dicops_proto::JOBS_PATH, args.job))
        .await?;
    if !args.follow {
        println!("started run {} of {}", started.run_id, args.job);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "started run {} of {}; following (Ctrl-C stops following, not the run)",
        started.run_id, args.job
    );
    let begun = std::time::Instant::now();
    let mut last_status = String::new();
    let mut last_line = std::time::Instant::now();
    let mut shown_progress: Option<f64> = None;
    let mut last_progress: Option<dicops_proto::RunProgress> = None;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // A progress line redrawn in place on a terminal, appended otherwise.
    let mut open_line = false;
    loop {
        let run: RunInfo = api
            .get(&format!("{}/{}", dicops_proto::RUNS_PATH, started.run_id))
            .await?;
        let finished = !matches!(run.status.as_str(), "queued" | "running");
        let elapsed = human_age(begun.elapsed().as_secs_f64());
        let end_progress_line = |open: &mut bool| {
            if std::mem::take(open) {
                println!();
            }
        };
        if run.status != last_status || finished {
            end_progress_line(&mut open_line);
            let detail = match run.status.as_str() {
                "queued" => format!(" (waiting for agent {} to take it)", run.agents),
                "running" => format!(" on {}", run.agents),
                _ => String::new(),
            };
            println!("[{elapsed:>6}] {}{detail}", run.status);
            last_status = run.status.clone();
            last_line = std::time::Instant::now();
        } else if let Some(progress) = run
            .progress
            .as_ref()
            .filter(|p| shown_progress != Some(p.updated_at))
            .filter(|_| tty || last_line.elapsed() >= Duration::from_secs(2))
        {
            let line = format!("[{elapsed:>6}] {}", progress_line(progress, last_progress.as_ref()));
            last_progress = Some(progress.clone());
            if tty {
                use std::io::Write;
                // Clear and redraw: the line only ever shows the latest.
                print!("\r\x1b[2K{}", line.chars().take(160).collect::<String>());
                let _ = std::io::stdout().flush();
                open_line = true;
            } else {
                println!("{line}");
            }
            shown_progress = Some(progress.updated_at);
            last_line = std::time::Instant::now();
        } else if !tty && last_line.elapsed() >= Duration::from_secs(10) {
            // A heartbeat, so a long run visibly is still going.
            println!("[{elapsed:>6}] still {}", run.status);
            last_line = std::time::Instant::now();
        }
        if finished {
            end_progress_line(&mut open_line);
            print!("{}", describe(&run));
            return Ok(if run.status == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        // Short runs end within a fraction of a second: look often at
        // first, then twice a second.
        let poll = match begun.elapsed().as_secs() {
            0 => Duration::from_millis(25),
            1..=4 => Duration::from_millis(100),
            _ => Duration::from_millis(500),
        };
        tokio::time::sleep(poll).await;
    }
}

/// `running: 1.2 GiB written (2 files) | dumping table orders`, or for a
/// transfer `transferring [#####-----] 48% 1.2 MiB of 2.5 MiB, 3.1 MiB/s, ETA 0s`.
/// `previous` is the last progress shown, for the rate.
fn progress_line(progress: &dicops_proto::RunProgress, previous: Option<&dicops_proto::RunProgress>) -> String {
    let mut line = progress.phase.clone();
    match (progress.bytes, progress.bytes_remaining) {
        (Some(done), Some(left)) if done + left > 0 => {
            let total = done + left;
            let share = done as f64 / total as f64;
            let filled = (share * 20.0).round() as usize;
            line.push_str(&format!(
                " [{}{}] {:>3.0}% {} of {}",
                "#".repeat(filled),
                "-".repeat(20 - filled),
                share * 100.0,
                format_bytes(done),
                format_bytes(total)
            ));
            let rate = previous
                .filter(|p| p.phase == progress.phase && progress.updated_at > p.updated_at)
                .and_then(|p| Some((done.checked_sub(p.bytes?)? as f64) / (progress.updated_at - p.updated_at)));
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                line.push_str(&format!(
                    ", {}/s, ETA {}",
                    format_bytes(rate as u64),
                    human_age(left as f64 / rate)
                ));
            }
            return line;
        }
        (Some(bytes), _) => {
            line.push_str(&format!(": {} written", format_bytes(bytes)));
            if let Some(files) = progress.files {
                line.push_str(&format!(" ({files} file{})", if files == 1 { "" } else { "s" }));
            }
        }
        (None, _) => {}
    }
    if let Some(message) = progress.message.as_deref().filter(|m| !m.is_empty()) {
        line.push_str(&format!(" | {message}"));
    }
    line
}

/// Every backup of both sites against its freshness objective, stale first.
pub async fn backups(args: CliArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.config)?;
    let mut backups: Vec<dicops_proto::BackupStatus> = api.get(dicops_proto::BACKUPS_PATH).await?;
    let now = now();
    // Stale first, then the closest to their objective.
    let urgency = |b: &dicops_proto::BackupStatus| {
        let age = b.last_success_at.map_or(f64::INFINITY, |at| now - at);
        (!b.is_stale(now), -(age / b.max_age_seconds.max(1.0)))
    };
    backups.sort_by(|a, b| urgency(a).partial_cmp(&urgency(b)).unwrap_or(std::cmp::Ordering::Equal));
    let stale = backups.iter().filter(|b| b.is_stale(now)).count();
    if args.json {
        print_json(&backups)?;
    } else {
        print!("{}", backups_table(&backups, now));
        println!("{} backup(s), {stale} stale", backups.len());
    }
    // Like a monitoring check: scripts can act on stale backups.
    Ok(if stale > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn backups_table(backups: &[dicops_proto::BackupStatus], now: f64) -> String {
    let mut text = format!(
        "{:<24} {:<5} {:<4} {:<10} {:<7} {:>9} {:>9} {:<11} {:>10}  NOTES\n",
        "BACKUP", "KIND", "SITE", "AGENT", "STATE", "AGE", "MAX AGE", "LAST RUN", "SIZE"
    );
    for b in backups {
        let age = b
            .last_success_at
            .map_or_else(|| "never".to_string(), |at| human_age(now - at));
        let state = if b.is_stale(now) {
            "STALE"
        } else if b.running_run.is_some() {
            "running"
        } else {
            "fresh"
        };
        let last = match (b.running_run, b.last_status.as_deref()) {
            (Some(id), _) => format!("run {id}"),
            (None, Some(status)) => status.to_string(),
            (None, None) => "-".into(),
        };
        let mut notes = Vec::new();
        if let Some(problem) = &b.problem {
            notes.push(problem.clone());
        }
        if let (Some(error), Some("failed" | "timed_out" | "interrupted")) = (&b.last_error, b.last_status.as_deref()) {
            notes.push(format!("last run: {}", error.chars().take(120).collect::<String>()));
        }
        if let Some(local) = b.local.as_ref().filter(|l| l.error.is_none()) {
            notes.push(format!("{} kept ({})", local.artifacts, format_bytes(local.bytes)));
            if local.retention_blocked > 0 {
                let oldest = local
                    .oldest_blocked_at
                    .map(|at| format!(", oldest {} old", human_age(now - at)))
                    .unwrap_or_default();
                notes.push(format!(
                    "retention blocked: {} backup(s), {} not yet in the other site{oldest}",
                    local.retention_blocked,
                    format_bytes(local.retention_blocked_bytes)
                ));
            }
        }
        text.push_str(&format!(
            "{:<24} {:<5} {:<4} {:<10} {:<7} {:>9} {:>9} {:<11} {:>10}  {}\n",
            b.name,
            b.kind,
            b.site,
            b.agent,
            state,
            age,
            human_age(b.max_age_seconds),
            last,
            b.last_size_bytes.map_or_else(|| "-".to_string(), format_bytes),
            notes.join("; ")
        ));
    }
    text
}

pub async fn pause(args: JobArgs, paused: bool) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.cli.config)?;
    let action = if paused { "pause" } else { "resume" };
    let _: serde_json::Value = api
        .post(&format!("{}/{}/{action}", dicops_proto::JOBS_PATH, args.job))
        .await?;
    println!("{} {}", args.job, if paused { "paused" } else { "resumed" });
    Ok(ExitCode::SUCCESS)
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.cli.config)?;
    let runs: Vec<RunInfo> = api
        .get(&format!(
            "{}/{}/runs?limit={}",
            dicops_proto::JOBS_PATH,
            args.job,
            args.limit
        ))
        .await?;
    if args.cli.json {
        print_json(&runs)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<8} {:<10} {:<8} {:<23} {:<9} ERROR",
        "RUN", "STATUS", "TRIGGER", "STARTED", "TOOK"
    );
    for run in runs {
        let took = match (run.started_at, run.finished_at) {
            (Some(s), Some(f)) => human_age(f - s),
            _ => "-".into(),
        };
        println!(
            "{:<8} {:<10} {:<8} {:<23} {:<9} {}",
            run.id,
            run.status,
            run.trigger,
            time(run.started_at.unwrap_or(run.created_at)),
            took,
            run.error.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.cli.config)?;
    let run: RunInfo = api.get(&format!("{}/{}", dicops_proto::RUNS_PATH, args.run)).await?;
    if args.cli.json {
        print_json(&run)?;
    } else {
        print!("{}", describe(&run));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn reload(args: CliArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.config)?;
    let _: serde_json::Value = api.post(dicops_proto::RELOAD_PATH).await?;
    println!("the controller reloaded its configuration");
    Ok(ExitCode::SUCCESS)
}

/// Previews the next fires of every job, in the deployment's timezone,
/// from a config file (nothing needs to run).
pub fn plan(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let config = match ControllerConfig::load_without_files(&args.file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    if config.jobs.is_empty() {
        bail!("{} defines no jobs", args.file.display());
    }
    let tz = config.timezone;
    println!("next fires in {} (deployment timezone)", tz.name());
    let now = Utc::now();
    for job in &config.jobs {
        match &job.schedule {
            None => println!(
                "\n{} on {}: no schedule (runs only with `dicops run`)",
                job.name, job.agent
            ),
            Some(schedule) => {
                println!("\n{} on {} ({}):", job.name, job.agent, schedule.source());
                for fire in schedule.upcoming(now, tz, args.count) {
                    println!("  {}", fire.with_timezone(&tz).format("%a %Y-%m-%d %H:%M:%S %Z"));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What each replication job's source holds that the other site does not.
pub async fn audit(args: CliArgs) -> anyhow::Result<ExitCode> {
    let mut api = Api::from_file(&args.config)?;
    let audits: Vec<dicops_proto::ReplicationAudit> = api.get(dicops_proto::AUDIT_PATH).await?;
    let now = now();
    let lag = |a: &dicops_proto::ReplicationAudit| a.source_state_at.map(|at| now - at);
    let behind = |a: &dicops_proto::ReplicationAudit| match (lag(a), a.max_lag_seconds) {
        (Some(lag), Some(max)) => lag > max,
        (None, Some(_)) => true,
        _ => false,
    };
    let late = audits.iter().filter(|a| behind(a)).count();
    if args.json {
        print_json(&audits)?;
    } else {
        println!(
            "{:<24} {:<22} {:<14} {:>8} {:>8}  {:<30} NOTES",
            "JOB", "FROM", "TO", "LAG", "MAX LAG", "ONLY IN THE SOURCE SITE"
        );
        for a in &audits {
            let only = match &a.audit {
                Some(x) if x.unreplicated_files == 0 => "nothing".to_string(),
                Some(x) => format!(
                    "{} file(s), {}{}",
                    x.unreplicated_files,
                    format_bytes(x.unreplicated_bytes),
                    x.oldest_unreplicated_at
                        .map(|at| format!(", oldest {}", human_age(now - at)))
                        .unwrap_or_default()
                ),
                None => "unknown".to_string(),
            };
            let mut notes = Vec::new();
            if behind(a) {
                notes.push("LAGGING".to_string());
            }
            if let Some(snapshot) = &a.snapshot {
                notes.push(format!("snapshot {snapshot}"));
            }
            if let Some(problem) = &a.problem {
                notes.push(problem.clone());
            }
            println!(
                "{:<24} {:<22} {:<14} {:>8} {:>8}  {:<30} {}",
                a.job,
                format!("{}/{}:{}", a.source_site, a.source_agent, a.export),
                format!("{}/{}", a.site, a.agent),
                lag(a).map_or_else(|| "never".to_string(), human_age),
                a.max_lag_seconds.map_or_else(|| "-".to_string(), human_age),
                only,
                notes.join("; ")
            );
        }
        println!("{} replication job(s), {late} beyond max_lag", audits.len());
    }
    Ok(if late > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_shows_a_bar_a_rate_and_an_eta() {
        let at = |bytes: u64, left: u64, t: f64| dicops_proto::RunProgress {
            run_id: 1,
            phase: "transferring".into(),
            bytes: Some(bytes),
            files: None,
            bytes_remaining: Some(left),
            message: None,
            updated_at: t,
        };
        let first = at(1 << 20, 3 << 20, 10.0);
        assert_eq!(
            progress_line(&first, None),
            "transferring [#####---------------]  25% 1.0 MiB of 4.0 MiB"
        );
        let next = at(2 << 20, 2 << 20, 11.0);
        assert_eq!(
            progress_line(&next, Some(&first)),
            "transferring [##########----------]  50% 2.0 MiB of 4.0 MiB, 1.0 MiB/s, ETA 2s"
        );
    }
}
