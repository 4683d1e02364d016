//! `dicops`: the operator's command line. It talks to the controller's API
//! (never its database), manages the deployment's PKI, checks configs and
//! links, and runs a whole two-site demo on one machine.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dicops",
    version,
    about = "Operations for two data centres: health, backups, cross-site replication"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the deployment's CA and issue certificates.
    Pki(cli::pki::PkiArgs),
    /// Validate config files without starting anything (exit 2 if invalid).
    CheckConfig(cli::check_config::CheckConfigArgs),
    /// Both sites at a glance: agents up or down, CPU, memory, fullest filesystem.
    Status(cli::status::StatusArgs),
    /// Test a connection step by step: DNS, TCP, TLS, identity, HTTP.
    CheckLink(cli::check_link::CheckLinkArgs),
    /// Run a controller and four agents in two sites on this machine.
    Demo(cli::demo::DemoArgs),
    /// Every job with its next fire and last result.
    Jobs(cli::jobs::CliArgs),
    /// Every backup of both sites against its max_age, stale first (exit 1 if any is stale).
    Backups(cli::jobs::CliArgs),
    /// What each replication's source site holds that the other site does not (exit 1 if a job is beyond max_lag).
    Audit(cli::jobs::CliArgs),
    /// Run a job now (`--follow` to watch it to the end).
    Run(cli::jobs::RunArgs),
    /// Stop a job's schedule from firing until resumed.
    Pause(cli::jobs::JobArgs),
    /// Let a paused job's schedule fire again.
    Resume(cli::jobs::JobArgs),
    /// The runs of a job, newest first.
    History(cli::jobs::HistoryArgs),
    /// One run in detail, with its output tail.
    Show(cli::jobs::ShowArgs),
    /// Make the controller re-read its config (like SIGHUP).
    Reload(cli::jobs::CliArgs),
    /// Preview the next fires of every job of a controller config.
    Plan(cli::jobs::PlanArgs),
}

/// A CLI piped into `head` must end quietly when the pipe closes, as Unix
/// tools do, instead of panicking on a failed print.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to its default at start, before
    // any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    restore_sigpipe();
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match args.command {
        Command::Pki(a) => cli::pki::run(a),
        Command::CheckConfig(a) => cli::check_config::run(a),
        Command::Status(a) => cli::block_on(cli::status::run(a)),
        Command::CheckLink(a) => cli::block_on(cli::check_link::run(a)),
        Command::Demo(a) => cli::block_on(cli::demo::run(a)),
        Command::Jobs(a) => cli::block_on(cli::jobs::list(a)),
        Command::Backups(a) => cli::block_on(cli::jobs::backups(a)),
        Command::Audit(a) => cli::block_on(cli::jobs::audit(a)),
        Command::Run(a) => cli::block_on(cli::jobs::run(a)),
        Command::Pause(a) => cli::block_on(cli::jobs::pause(a, true)),
        Command::Resume(a) => cli::block_on(cli::jobs::pause(a, false)),
        Command::History(a) => cli::block_on(cli::jobs::history(a)),
        Command::Show(a) => cli::block_on(cli::jobs::show(a)),
        Command::Reload(a) => cli::block_on(cli::jobs::reload(a)),
        Command::Plan(a) => cli::jobs::plan(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<cli::api::ConfigInvalid>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("dicops: {e:#}");
            ExitCode::FAILURE
        }
    }
}
