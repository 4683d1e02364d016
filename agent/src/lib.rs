//! dicops-agent: one per server. Collects host health and reports it to
//! the controller over mutual TLS. It only dials out: the controller never
//! needs to reach an agent's control port.

mod backup;
pub mod collect;
mod process;
mod replication;
mod report;
mod spool;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dicops_config::AgentConfig;
use dicops_core::backoff::Backoff;
use dicops_net::{HttpsClient, TlsFiles, TlsReloader};
use dicops_proto::Identity;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use report::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{file}: {source}")]
    Tls {
        file: PathBuf,
        source: dicops_net::TlsError,
    },
    #[error("{file}: tls.cert: the certificate is for {actual}, but this agent's id is {id:?}; issue one with `dicops pki issue --agent {id}`")]
    WrongIdentity {
        file: PathBuf,
        actual: Identity,
        id: String,
    },
    #[error("{file}: controller.url: {source}")]
    Url {
        file: PathBuf,
        source: dicops_net::ClientError,
    },
    #[error("cannot start the collector thread: {0}")]
    Thread(std::io::Error),
    #[error("{file}: data.listen: cannot listen on {addr}: {source}")]
    DataPort {
        file: PathBuf,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{file}: state_dir: cannot use the spool in {dir}: {source}")]
    Spool {
        file: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Thread(_) | StartError::Spool { .. } | StartError::DataPort { .. } => 1,
            _ => 2,
        }
    }
}

/// Loads the agent's certificates and checks they are this agent's.
pub fn load_tls(config: &AgentConfig) -> Result<Arc<TlsReloader>, StartError> {
    let tls = TlsReloader::load(TlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    })
    .map_err(|source| StartError::Tls {
        file: config.source.clone(),
        source,
    })?;
    let expected = Identity::Agent(config.id.clone());
    let actual = tls.identity();
    if actual != expected {
        return Err(StartError::WrongIdentity {
            file: config.source.clone(),
            actual,
            id: config.id.clone(),
        });
    }
    Ok(tls)
}

/// A started agent.
pub struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    collector: Option<std::thread::JoinHandle<()>>,
    stop_collector: Option<mpsc::Sender<()>>,
}

impl Running {
    pub async fn wait(mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // Dropping the sender wakes the collector thread, which then exits.
        drop(self.stop_collector.take());
        if let Some(collector) = self.collector.take() {
            let _ = tokio::task::spawn_blocking(move || collector.join()).await;
        }
    }
}

/// Starts collecting and reporting until `shutdown`.
pub fn start(config: AgentConfig, shutdown: CancellationToken) -> Result<Running, StartError> {
    let tls = load_tls(&config)?;
    let client = HttpsClient::new(&config.controller_url, Identity::Controller, tls.clone()).map_err(|source| {
        StartError::Url {
            file: config.source.clone(),
            source,
        }
    })?;

    let spool_error = |source| StartError::Spool {
        file: config.source.clone(),
        dir: config.state_dir.clone(),
        source,
    };
    let spool = Arc::new(spool::Spool::open(&config.state_dir).map_err(spool_error)?);
    let interrupted = spool.recover(report::now_unix()).map_err(spool_error)?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "tasks interrupted by the previous agent stop are reported as failed"
        );
    }
    let backups = Arc::new(backup::Backups::new(
        &config.state_dir,
        &config.commands,
        &config.watches,
        config.timezone,
    ));
    backups
        .start_scanner(config.collect.backups_interval)
        .map_err(StartError::Thread)?;
    let source = config.data.as_ref().map(|_| {
        Arc::new(replication::serve::Source::new(
            &config.id,
            &config.state_dir,
            &config.exports,
            &config.commands,
            backups.clone(),
        ))
    });
    if let Some(source) = &source {
        source
            .start_auditor(config.collect.backups_interval)
            .map_err(StartError::Thread)?;
    }
    let mut data_port = None;
    if let (Some(data), Some(source)) = (&config.data, &source) {
        let listener = std::net::TcpListener::bind(data.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| StartError::DataPort {
                file: config.source.clone(),
                addr: data.listen,
                source: e,
            })?;
        tracing::info!(listen = %data.listen, url = %data.url, exports = config.exports.len(), "data port open");
        data_port = Some(tokio::spawn(replication::serve::serve(
            source.clone(),
            listener,
            tls.clone(),
            shutdown.clone(),
        )));
    }
    let tasks = Arc::new(tasks::Tasks {
        config_file: config.source.display().to_string(),
        commands: config.commands.clone(),
        spool,
        results_ready: Arc::new(tokio::sync::Notify::new()),
        running: std::sync::Mutex::new(std::collections::HashMap::new()),
        backups: backups.clone(),
        progress: Arc::default(),
        puller: replication::pull::Puller {
            roots: config.roots.clone(),
            tls: tls.clone(),
            config_file: config.source.display().to_string(),
        },
        source: source.clone(),
    });
    let new_client = || {
        HttpsClient::new(&config.controller_url, Identity::Controller, tls.clone()).map_err(|source| StartError::Url {
            file: config.source.clone(),
            source,
        })
    };
    let poller = tokio::spawn(tasks.clone().poll_loop(new_client()?, shutdown.clone()));
    let sender = tokio::spawn(tasks.clone().send_loop(new_client()?, shutdown.clone()));
    let progress = tokio::spawn(tasks.clone().progress_loop(new_client()?, shutdown.clone()));

    let (snapshot_tx, snapshot_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let collect_config = config.collect.clone();
    let collector = std::thread::Builder::new()
        .name("collector".into())
        .spawn(move || collector_loop(collect_config, snapshot_tx, stop_rx))
        .map_err(StartError::Thread)?;

    let watcher = tls.spawn_watcher(config.tls.reload_interval, shutdown.clone(), |_| {});
    let mut jitter = report::Jitter::new();
    let reporter = report::Reporter {
        agent_id: config.id.clone(),
        interval: config.collect.interval,
        info: collect::agent_info(),
        instance: format!("{:016x}", jitter.next_u64()),
        client,
        tls,
        backups,
        data_url: config.data.as_ref().map(|d| d.url.clone()),
        source: source.clone(),
        backoff: Backoff {
            max: Duration::from_secs(60)
                .min(config.collect.interval * 4)
                .max(Duration::from_secs(5)),
            ..Backoff::default()
        },
    };
    let reporter = tokio::spawn(reporter.run(snapshot_rx, shutdown));
    tracing::info!(agent = %config.id, controller = %config.controller_url, interval_s = config.collect.interval.as_secs_f64(), "agent started");
    Ok(Running {
        tasks: [reporter, watcher, poller, sender, progress]
            .into_iter()
            .chain(data_port)
            .collect(),
        collector: Some(collector),
        stop_collector: Some(stop_tx),
    })
}

/// The collector thread: the first reading is a CPU baseline, the first
/// report follows a second later, then one every interval.
fn collector_loop(
    config: dicops_config::CollectConfig,
    out: watch::Sender<Option<Snapshot>>,
    stop: mpsc::Receiver<()>,
) {
    let mut collector = collect::Collector::new(&config);
    let mut wait = Duration::from_secs(1).max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
    loop {
        match stop.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let started = std::time::Instant::now();
        let health = collector.collect();
        let snapshot = Snapshot {
            collected_at: report::now_unix(),
            health,
        };
        if out.send(Some(snapshot)).is_err() {
            return;
        }
        // Keep the cadence: a slow collection shortens the next wait.
        wait = config.interval.saturating_sub(started.elapsed());
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "dicops-agent",
    version,
    about = "dicops agent: reports this server's health to the controller"
)]
struct Args {
    /// Agent config file.
    #[arg(long, short, default_value = "/etc/dicops/agent.yaml", env = "DICOPS_AGENT_CONFIG")]
    config: PathBuf,
    /// Validate the config and certificates, then exit (0 = valid, 2 = not).
    #[arg(long)]
    check: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "DICOPS_LOG_FORMAT")]
    log_format: String,
}

/// The `dicops-agent` program.
pub fn main_entry() -> ExitCode {
    let args = Args::parse();
    dicops_net::logging::init(&args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match AgentConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match load_tls(&config) {
            Ok(_) => {
                println!("{}: ok", args.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    // Two worker threads are plenty: the agent's async work is one
    // connection; the heavy lifting runs on the collector thread.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a SIGTERM while the agent starts must still stop
        // it cleanly.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                eprintln!("cannot listen for signals");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let running = match start(config, shutdown.clone()) {
            Ok(running) => running,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(e.exit_code());
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        shutdown.cancel();
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// The agent's decoders of bytes another agent sends, for the fuzz targets
/// in fuzz/ and their regression test (tests/fuzz_regressions.rs). Not an
/// API: each returns what it decoded, or the refusal it would log.
#[doc(hidden)]
pub mod fuzzing {
    use dicops_proto::ChunkRef;

    /// A source's answer to a chunk request, as the destination reads it.
    /// The input's first byte says how many chunks were asked (0-3); each
    /// is 32 bytes of id and a 3-byte length, then comes the body.
    pub fn chunk_answer(data: &[u8]) -> Result<usize, String> {
        let (&count, mut rest) = data.split_first().ok_or("empty")?;
        let mut asked = Vec::new();
        for _ in 0..count % 4 {
            let (head, tail) = rest.split_at_checked(35).ok_or("short")?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&head[..32]);
            let len = u32::from_le_bytes([head[32], head[33], head[34], 0]);
            asked.push(ChunkRef {
                id: crate::replication::serve::encode_hex32(&id),
                len,
            });
            rest = tail;
        }
        crate::replication::pull::parse_frames(rest, &asked).map(|chunks| chunks.len())
    }

    /// A source's manifest, parsed and checked as before anything is
    /// written: paths that escape the snapshot, bad ids, bad chunk lists.
    pub fn manifest(data: &[u8]) -> Result<usize, String> {
        let (_, entries) = crate::replication::pull::parse_manifest(data)?;
        crate::replication::snapshot::validate_entries(&entries)?;
        Ok(entries.len())
    }
}
