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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match args.command {
        Command::Pki(a) => cli::pki::run(a),
        Command::CheckConfig(a) => cli::check_config::run(a),
        Command::Status(a) => cli::block_on(cli::status::run(a)),
        Command::CheckLink(a) => cli::block_on(cli::check_link::run(a)),
        Command::Demo(a) => cli::block_on(cli::demo::run(a)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dicops: {e:#}");
            ExitCode::FAILURE
        }
    }
}
