//! dicops-controller: the one scheduler and source of truth of a
//! deployment. This part: it receives agents' health reports over
//! mutual TLS and exposes the state of both sites as Prometheus metrics and
//! a JSON API.

mod api;
mod backups;
pub mod metrics;
mod replications;
pub mod scheduler;
mod server;
mod state;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use dicops_config::ControllerConfig;
use dicops_net::tls::ReloadOutcome;
use dicops_net::{TlsFiles, TlsReloader};
use dicops_proto::Identity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::{Metrics, CATALOGUE};
pub use state::State;

/// What every request handler shares.
pub struct Shared {
    pub state: State,
    pub scheduler: Arc<scheduler::Scheduler>,
    pub metrics: Metrics,
    pub tls: Arc<TlsReloader>,
    pub ready: AtomicBool,
    /// Size of the last /metrics body, to allocate the next one at once
    /// instead of regrowing a string of megabytes several times.
    pub last_metrics_len: std::sync::atomic::AtomicUsize,
}

pub(crate) fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The body of `/metrics`: the deployment's state, then the controller's
/// own instruments and process metrics.
pub fn render_metrics(shared: &Shared) -> Vec<u8> {
    let last = shared.last_metrics_len.load(std::sync::atomic::Ordering::Relaxed);
    let mut text = String::with_capacity((last + last / 8).max(64 * 1024));
    let own = [
        ("controller", shared.tls.not_after()),
        ("ca", shared.tls.ca_not_after()),
    ];
    shared.state.render(now_unix(), &own, &mut text);
    render_jobs(shared, &mut text);
    backups::render(&backups_view(shared), &mut text);
    let jobs = shared.scheduler.job_metrics();
    replications::render(&jobs, now_unix(), &mut text);
    replications::render_audit(&audit_view(shared, &jobs), &mut text);
    replications::render_verify(&jobs, &mut text);
    let mut out = text.into_bytes();
    shared.metrics.encode_registry(&mut out);
    shared
        .last_metrics_len
        .store(out.len(), std::sync::atomic::Ordering::Relaxed);
    out
}

/// Every backup of both sites, as of now.
pub(crate) fn backups_view(shared: &Shared) -> Vec<dicops_proto::BackupStatus> {
    let now = now_unix();
    backups::view(&shared.state.config(), &shared.scheduler.job_metrics(), |agent| {
        shared.state.agent(agent, now)
    })
}

/// The cross-site audit of every replication job, as of now.
pub(crate) fn audit_view(shared: &Shared, jobs: &[scheduler::JobMetrics]) -> Vec<dicops_proto::ReplicationAudit> {
    let now = now_unix();
    replications::audit(jobs, |agent| shared.state.agent(agent, now))
}

fn render_jobs(shared: &Shared, out: &mut String) {
    use metrics as m;
    let config = shared.state.config();
    let jobs = shared.scheduler.job_metrics();
    let mut e = metrics::Exposition::new(out);
    e.family(m::CONFIG_INFO);
    e.sample(m::CONFIG_INFO, &[("hash", &config.hash)], 1.0);
    type Get = fn(&scheduler::JobMetrics) -> Option<f64>;
    let families: [(m::Def, Get); 6] = [
        (m::JOB_NEXT_RUN, |j| j.next_run),
        (m::JOB_EXPECTED_NEXT_RUN, |j| j.expected_next_run),
        (m::JOB_LAST_RUN, |j| j.last_run),
        (m::JOB_EVER_SUCCEEDED, |j| Some(f64::from(u8::from(j.ever_succeeded)))),
        (m::JOB_RUNNING, |j| Some(f64::from(u8::from(j.running)))),
        (m::JOB_PAUSED, |j| Some(f64::from(u8::from(j.paused)))),
    ];
    for (def, get) in families {
        e.family(def);
        for job in &jobs {
            if let Some(value) = get(job) {
                e.sample(
                    def,
                    &[
                        ("job", &job.job),
                        ("kind", job.kind),
                        ("site", &job.site),
                        ("agent", &job.agent),
                    ],
                    value,
                );
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{file}: {source}")]
    Tls {
        file: PathBuf,
        source: dicops_net::TlsError,
    },
    #[error("{file}: tls.cert: the certificate is for {actual}; the controller needs one issued with `dicops pki issue --controller`")]
    NotController { file: PathBuf, actual: Identity },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl StartError {
    /// Exit status: 2 for configuration problems, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls { .. } | StartError::NotController { .. } => 2,
            _ => 1,
        }
    }
}

/// Loads the controller's certificates and checks that they are a
/// controller's.
pub fn load_tls(config: &ControllerConfig) -> Result<Arc<TlsReloader>, StartError> {
    let tls = TlsReloader::load(TlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    })
    .map_err(|source| StartError::Tls {
        file: config.source.clone(),
        source,
    })?;
    match tls.identity() {
        Identity::Controller => Ok(tls),
        actual => Err(StartError::NotController {
            file: config.source.clone(),
            actual,
        }),
    }
}

/// A started controller.
pub struct Running {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl Running {
    /// Waits until every connection and background task has finished after
    /// shutdown was requested, at most `deadline`.
    pub async fn wait(self, deadline: Duration) {
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait()).await.is_err() {
            tracing::warn!("some connections did not finish before the shutdown deadline");
        }
    }
}

/// Starts the controller: binds, then serves until `shutdown`.
pub async fn start(config: ControllerConfig, shutdown: CancellationToken) -> Result<Running, StartError> {
    let tls = load_tls(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics = Metrics::new()?;
    metrics.config_reload_ok.set(1);
    metrics.config_reload_time.set(now_unix());
    let reload_interval = config.tls.reload_interval;
    let config = Arc::new(config);
    let store = Arc::new(store::Store::open(&config.database)?);
    let scheduler = Arc::new(scheduler::Scheduler::start(
        store,
        config.clone(),
        &metrics,
        chrono::Utc::now(),
    )?);
    let shared = Arc::new(Shared {
        scheduler,
        state: State::new(config),
        metrics,
        tls: tls.clone(),
        ready: AtomicBool::new(false),
        last_metrics_len: std::sync::atomic::AtomicUsize::new(0),
    });
    let tracker = TaskTracker::new();
    let watcher_shared = shared.clone();
    let watcher = tls.spawn_watcher(reload_interval, shutdown.clone(), move |outcome| {
        let result = match outcome {
            ReloadOutcome::Reloaded => "success",
            _ => "failure",
        };
        watcher_shared.metrics.tls_reloads.with_label_values(&[result]).inc();
    });
    tracker.spawn(async move {
        let _ = watcher.await;
    });
    tracker.spawn(scheduler_loop(shared.clone(), shutdown.clone()));
    tracker.spawn(housekeeping(shared.clone(), shutdown.clone()));
    tracker.spawn(server::serve(listener, shared.clone(), tls, shutdown, tracker.clone()));
    shared.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%addr, "controller listening");
    Ok(Running { addr, shared, tracker })
}

/// Ticks the scheduler whenever something is due, or when woken.
async fn scheduler_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let now = chrono::Utc::now();
        let next = match shared.scheduler.tick(&shared.metrics, now) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "scheduler tick failed; retrying in 1 s");
                now + chrono::Duration::seconds(1)
            }
        };
        let wait = (next - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.scheduler.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Saves the inventory as last seen every minute and prunes old history
/// every hour.
async fn housekeeping(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut minutes = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rows = shared.state.inventory_rows();
        let store = shared.scheduler.clone();
        let keep = shared.state.config().history_keep;
        let prune = minutes.is_multiple_of(60);
        minutes += 1;
        let outcome = tokio::task::spawn_blocking(move || {
            store.store().save_inventory(&rows)?;
            if prune {
                let removed = store.store().prune(now_unix() - keep.as_secs_f64())?;
                if removed > 0 {
                    tracing::info!(removed, "pruned old run history");
                }
            }
            Ok::<_, store::StoreError>(())
        })
        .await;
        if let Ok(Err(e)) = outcome {
            tracing::error!(error = %e, "housekeeping failed");
        }
    }
}

/// Re-reads the config file; a bad file keeps the running config.
pub fn reload(shared: &Shared) -> Result<(), dicops_config::ConfigError> {
    let current = shared.state.config();
    match ControllerConfig::load(&current.source) {
        Ok(new) => {
            if new.listen != current.listen || new.tls != current.tls {
                tracing::warn!("listen address and TLS file paths take effect only after a restart");
            }
            let agents = new.agents.len();
            let new = Arc::new(new);
            if let Err(e) = shared
                .scheduler
                .apply_config(new.clone(), &shared.metrics, chrono::Utc::now())
            {
                shared.metrics.config_reload_ok.set(0);
                tracing::error!(error = %e, "cannot apply the new jobs; keeping the running configuration");
                return Err(dicops_config::ConfigError {
                    file: current.source.clone(),
                    problems: vec![dicops_config::Problem {
                        location: None,
                        field: String::new(),
                        message: e.to_string(),
                    }],
                });
            }
            shared.state.replace_config(new);
            shared.metrics.config_reload_ok.set(1);
            shared.metrics.config_reload_time.set(now_unix());
            tracing::info!(agents, "configuration reloaded");
            Ok(())
        }
        Err(e) => {
            shared.metrics.config_reload_ok.set(0);
            tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
            Err(e)
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "dicops-controller",
    version,
    about = "dicops controller: the scheduler and source of truth of a two-site deployment"
)]
struct Args {
    /// Controller config file.
    #[arg(
        long,
        short,
        default_value = "/etc/dicops/controller.yaml",
        env = "DICOPS_CONTROLLER_CONFIG"
    )]
    config: PathBuf,
    /// Validate the config and certificates, then exit (0 = valid, 2 = not).
    #[arg(long)]
    check: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "DICOPS_LOG_FORMAT")]
    log_format: String,
}

/// The `dicops-controller` program.
pub fn main_entry() -> ExitCode {
    let args = Args::parse();
    dicops_net::logging::init(&args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Config is checked before any port is bound: a bad file is a clean exit.
    let config = match ControllerConfig::load(&args.config) {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a SIGHUP or SIGTERM that arrives while the
        // controller starts must not kill it with the default action.
        let mut signals = match Signals::listen() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("cannot listen for signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let running = match start(config, shutdown.clone()).await {
            Ok(running) => running,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(e.exit_code());
            }
        };
        signals.wait(&running.shared).await;
        tracing::info!("shutting down");
        shutdown.cancel();
        running.wait(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    })
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGTERM or SIGINT; SIGHUP reloads the config.
    async fn wait(&mut self, shared: &Shared) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    let _ = reload(shared);
                }
            }
        }
    }
}
