//! `dicops demo`: a whole two-site deployment on one machine, with no setup.
//! A fresh CA in a temporary folder, a controller and four agents (two per
//! site) as real processes on loopback, the metrics URL and the status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dicops_config::CliConfig;
use dicops_proto::Identity;
use tokio::process::{Child, Command};

use super::pki;

/// (site, description, agents)
const SITES: [(&str, &str, [&str; 2]); 2] = [
    ("dc1", "primary data integration centre", ["db01", "app01"]),
    ("dc2", "second site", ["backup01", "app02"]),
];

/// (agent, database): one database server per site whose dump is a
/// scheduled backup.
const DUMPS: [(&str, &str); 2] = [("db01", "app"), ("app02", "crm")];

/// (source agent, destination agent in the other site): each site's dumps
/// are replicated to the other site.
const REPLICAS: [(&str, &str); 2] = [("db01", "backup01"), ("app02", "app01")];

/// A stand-in for pg_dump: a plain SQL dump of about 2 MiB, written under
/// a temporary name and renamed when complete, like real dump tools do.
/// One row in twenty changes from one dump to the next.
const DEMO_DUMP_SCRIPT: &str = r#"#!/bin/sh
set -eu
db="$1"
out="$DICOPS_OUTPUT_DIR/$db-$(date -u +%Y%m%dT%H%M%SZ).sql"
echo "pg_dump: dumping database $db"
awk -v run="${DICOPS_RUN_ID:-0}" 'BEGIN {
  print "--\n-- PostgreSQL database dump\n--\n"
  print "CREATE TABLE public.orders (id bigint NOT NULL, customer text, amount numeric(12,2), status text, created_at timestamptz);\n"
  print "COPY public.orders (id, customer, amount, status, created_at) FROM stdin;"
  srand(42)
  for (i = 1; i <= 40000; i++) {
    status = (i % 20 == 0) ? "updated-in-run-" run : "paid"
    printf "%d\tcustomer-%05d\t%.2f\t%s\t2026-11-%02d 10:%02d:00+07\n", i, int(rand() * 90000), rand() * 1000, status, 1 + i % 27, i % 60
  }
  print "\\.\n\n-- PostgreSQL database dump complete"
}' > "$out.partial"
mv "$out.partial" "$out"
echo "pg_dump: wrote $(wc -c < "$out") bytes to $out"
"#;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the demo's PKI, configs and logs (default: a new temporary
    /// folder, removed on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Controller port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Agents' report interval in seconds.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Keep the folder after exit.
    #[arg(long)]
    keep: bool,
}

struct Demo {
    dir: PathBuf,
    remove_dir: bool,
    children: Vec<(String, Child)>,
}

impl Demo {
    /// Agents first, then the controller: SIGTERM, a grace period, then
    /// SIGKILL for anything still alive.
    async fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            if let Some(pid) = child.id() {
                terminate(pid);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in self.children.iter_mut() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, child.wait()).await {
                Ok(Ok(status)) if status.success() => println!("  {name} stopped"),
                Ok(Ok(status)) => println!("  {name} exited with {status}"),
                _ => {
                    let _ = child.kill().await;
                    println!("  {name} killed after the grace period");
                }
            }
        }
        self.children.clear();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[allow(unsafe_code)]
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid of a child we spawned and still own.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the dicops binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {} (build all binaries: cargo build --release)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn write_configs(dir: &Path, port: u16, interval: u64) -> anyhow::Result<()> {
    let mut data_ports = std::collections::HashMap::new();
    for (source, _) in REPLICAS {
        data_ports.insert(source, free_port()?);
    }
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir, "dicops demo CA", 30, true)?;
    pki::issue(&pki_dir, &pki_dir, &Identity::Controller, &[], 30, true)?;
    pki::issue(&pki_dir, &pki_dir, &Identity::Operator("demo".into()), &[], 30, true)?;
    let mut controller = format!(
        "# dicops demo controller: two sites on loopback.\nlisten: 127.0.0.1:{port}\nstate:\n  database: controller.db\ntls:\n  ca: pki/ca.pem\n  cert: pki/controller.pem\n  key: pki/controller-key.pem\nhealth:\n  report_interval: {interval}s\n  down_after_missed_reports: 3\nsites:\n"
    );
    for (site, description, _) in SITES {
        controller.push_str(&format!("  - name: {site}\n    description: {description}\n"));
    }
    controller.push_str("agents:\n");
    let script = dir.join("bin/demo-pg-dump.sh");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::write(&script, DEMO_DUMP_SCRIPT)?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    for (site, _, agents) in SITES {
        for agent in agents {
            controller.push_str(&format!("  - id: {agent}\n    site: {site}\n"));
            pki::issue(&pki_dir, &pki_dir, &Identity::Agent(agent.to_string()), &[], 30, true)?;
            let mut config = format!(
                "id: {agent}\ncontroller:\n  url: https://127.0.0.1:{port}\nstate_dir: state-{agent}\ncommands:\n  disk-usage:\n    argv: [/bin/df, -h, {}]\n    timeout: 1m\n",
                dir.display()
            );
            if let Some((_, database)) = DUMPS.iter().find(|(a, _)| *a == agent) {
                let output = dir.join("backups").join(agent);
                std::fs::create_dir_all(&output)?;
                // The demo's dumps are a few KiB: an absolute floor lets it
                // run on a nearly full disk, where the default (1% of the
                // filesystem) would refuse every dump.
                config.push_str(&format!(
                    "  pg-dump:\n    argv: [{}, {database}]\n    output: {}\n    min_free: 64MiB\n    timeout: 5m\n    retention: {{keep_last: 10}}\n",
                    script.display(),
                    output.display()
                ));
            }
            if let Some(data_port) = data_ports.get(agent) {
                // Its dumps are served, read only, to the other site.
                config.push_str(&format!(
                    "data:\n  listen: 127.0.0.1:{data_port}\n  url: https://127.0.0.1:{data_port}\nexports:\n  dumps: {}\n",
                    dir.join("backups").join(agent).display()
                ));
            }
            if REPLICAS.iter().any(|(_, to)| *to == agent) {
                let root = dir.join("replicas").join(agent);
                std::fs::create_dir_all(&root)?;
                config.push_str(&format!("roots:\n  replicas: {}\n", root.display()));
            }
            config.push_str(&format!(
                "tls:\n  ca: pki/ca.pem\n  cert: pki/agent-{agent}.pem\n  key: pki/agent-{agent}-key.pem\ncollect:\n  interval: {interval}s\n  backups_interval: {interval}s\n  paths: [{}]\n",
                dir.display()
            ));
            std::fs::write(dir.join(format!("agent-{agent}.yaml")), config)?;
        }
    }
    // One scheduled job per agent, so the demo shows the scheduler at work.
    controller.push_str("jobs:\n");
    for (_, _, agents) in SITES {
        for agent in agents {
            controller.push_str(&format!("  - name: {agent}-disk-usage\n    agent: {agent}\n    command: disk-usage\n    schedule: \"* * * * *\"\n"));
        }
    }
    // A database dump on each site every two minutes, fresh within five.
    controller.push_str("backups:\n");
    for (agent, database) in DUMPS {
        controller.push_str(&format!(
            "  - name: {agent}-{database}-dump\n    agent: {agent}\n    run: pg-dump\n    schedule: \"*/2 * * * *\"\n    max_age: 5m\n"
        ));
    }
    // Each site's dumps copied to the other site on the odd minutes, after
    // the dumps of the even ones.
    controller.push_str("replications:\n");
    for (source, destination) in REPLICAS {
        controller.push_str(&format!(
            "  - name: {source}-dumps-to-{destination}\n    source: {{agent: {source}, export: dumps}}\n    destination: {{agent: {destination}, root: replicas}}\n    schedule: \"1-59/2 * * * *\"\n    max_lag: 10m\n    retention: {{keep_last: 5}}\n"
        ));
    }
    // And every replica re-read against its manifest every ten minutes.
    controller.push_str("verifications:\n");
    for (source, destination) in REPLICAS {
        controller.push_str(&format!(
            "  - name: verify-{source}-dumps\n    replication: {source}-dumps-to-{destination}\n    schedule: \"5-59/10 * * * *\"\n    sample: 100%\n"
        ));
    }
    std::fs::write(dir.join("controller.yaml"), controller)?;
    let cli = format!(
        "controller: https://127.0.0.1:{port}\ntls:\n  ca: pki/ca.pem\n  cert: pki/operator-demo.pem\n  key: pki/operator-demo-key.pem\n"
    );
    std::fs::write(dir.join("cli.yaml"), cli)?;
    Ok(())
}

fn spawn(dir: &Path, binary: &Path, config: &str, log: &str) -> anyhow::Result<Child> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log_file = std::fs::File::create(logs.join(log))?;
    // Own process group: Ctrl-C reaches the demo, which stops the children
    // in order, instead of reaching everyone at once.
    let child = Command::new(binary)
        .arg("--config")
        .arg(dir.join(config))
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(child)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // Catch Ctrl-C before anything starts: a signal that came before the
    // handler would kill the demo and leave its children running.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (dir, remove_dir) = match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => {
            let dir = std::env::temp_dir().join(format!("dicops-demo-{}", std::process::id()));
            (dir, !args.keep)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let port = if args.port == 0 { free_port()? } else { args.port };
    let controller_bin = sibling_binary("dicops-controller")?;
    let agent_bin = sibling_binary("dicops-agent")?;
    println!("dicops demo: two sites on this machine, files in {}", dir.display());
    write_configs(&dir, port, args.interval)?;
    println!("  created a CA and certificates for the controller, an operator and 4 agents");

    let mut demo = Demo {
        dir: dir.clone(),
        remove_dir,
        children: Vec::new(),
    };
    let until_stopped = async {
        drive(&mut demo, &args, &dir, port, &controller_bin, &agent_bin).await?;
        tokio::time::sleep(Duration::from_secs(args.duration.unwrap_or(u64::MAX / 4))).await;
        Ok(ExitCode::SUCCESS)
    };
    let result = tokio::select! {
        result = until_stopped => result,
        _ = int.recv() => Ok(ExitCode::SUCCESS),
        _ = term.recv() => Ok(ExitCode::SUCCESS),
    };
    println!("stopping the demo");
    demo.stop().await;
    result
}

async fn drive(
    demo: &mut Demo,
    args: &DemoArgs,
    dir: &Path,
    port: u16,
    controller_bin: &Path,
    agent_bin: &Path,
) -> anyhow::Result<()> {
    demo.children.push((
        "controller".into(),
        spawn(dir, controller_bin, "controller.yaml", "controller.log")?,
    ));
    for (_, _, agents) in SITES {
        for agent in agents {
            let config = format!("agent-{agent}.yaml");
            demo.children.push((
                format!("agent {agent}"),
                spawn(dir, agent_bin, &config, &format!("agent-{agent}.log"))?,
            ));
        }
    }
    let cli = match CliConfig::load(&dir.join("cli.yaml")) {
        Ok(cli) => cli,
        Err(e) => bail!("{e}"),
    };

    // Wait until every agent has reported, or say what is missing.
    let started = Instant::now();
    let status = loop {
        for (name, child) in demo.children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited with {status}; see {}/logs", dir.display());
            }
        }
        if let Ok(status) = super::status::fetch(&cli).await {
            if status.sites.iter().all(|s| s.agents.iter().all(|a| a.up)) {
                break status;
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "agents did not all report within 30 s; see the logs in {}/logs",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let url = format!("https://127.0.0.1:{port}");
    let p = dir.join("pki");
    println!("\nmetrics:  {url}/metrics (mutual TLS: present the operator certificate)");
    println!(
        "  curl --cacert {} --cert {} --key {} {url}/metrics",
        p.join("ca.pem").display(),
        p.join("operator-demo.pem").display(),
        p.join("operator-demo-key.pem").display()
    );
    // The first dumps now, rather than at the next even minute.
    match super::api::Api::from_file(&dir.join("cli.yaml")) {
        Ok(mut api) => {
            for (agent, database) in DUMPS {
                let path = format!("{}/{agent}-{database}-dump/run", dicops_proto::JOBS_PATH);
                if let Err(e) = api.post::<dicops_proto::RunStarted>(&path).await {
                    println!("  could not start {agent}-{database}-dump: {e}");
                }
            }
        }
        Err(e) => println!("  cannot reach the controller to start the first dumps: {e}"),
    }
    // And their first copies to the other site once the dumps are done.
    let cli_file = dir.join("cli.yaml");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(15)).await;
        if let Ok(mut api) = super::api::Api::from_file(&cli_file) {
            for (source, destination) in REPLICAS {
                let path = format!("{}/{source}-dumps-to-{destination}/run", dicops_proto::JOBS_PATH);
                let _ = api.post::<dicops_proto::RunStarted>(&path).await;
            }
        }
    });
    println!("status:   dicops status --config {}", dir.join("cli.yaml").display());
    println!("backups:  dicops backups --config {}", dir.join("cli.yaml").display());
    println!(
        "replicas: dicops audit --config {}   (and {})",
        dir.join("cli.yaml").display(),
        dir.join("replicas").display()
    );
    println!("logs:     {}\n", dir.join("logs").display());
    print!("{}", super::status::render(&status, &url, true));
    match args.duration {
        Some(seconds) => println!("running for {seconds} s (or until Ctrl-C)"),
        None => println!("running; press Ctrl-C to stop"),
    }
    Ok(())
}
