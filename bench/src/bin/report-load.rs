//! report-load: many simulated dicops agents, for the controller benchmarks.
//!
//! It issues one certificate per simulated agent in-process (the same shape
//! as `dicops pki issue --agent ID`), opens one kept-alive mutual-TLS
//! HTTP/1.1 connection per agent, lets every agent report once, then either
//!
//! - posts realistic reports as fast as the controller takes them, with a
//!   bounded number in flight, for a fixed time or count, and prints the
//!   accepted reports per second, the errors and the latency percentiles; or
//! - (`--render M`) times `GET /metrics` M times with an operator
//!   certificate and prints the render time, body size and series count.
//!
//! With `--controller-pid` it also prints the controller's CPU time during
//! the measured phase and its resident memory at the end. The last line of
//! the output is `RESULT key=value ...` for scripts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dicops_net::client::{check_peer_identity, parse_https_url, resolve, tcp_connect, tls_handshake};
use dicops_proto::{
    AgentInfo, DiskIo, Filesystem, HostHealth, Identity, NetworkIo, PathState, PathUsage, Report, ReportFailures,
    ServiceState,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Kernel clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "report-load",
    about = "Simulated dicops agents: report throughput and /metrics render time of a controller"
)]
struct Args {
    /// PKI folder holding ca.pem and ca-key.pem (as made by `dicops pki init`).
    #[arg(long)]
    pki: PathBuf,
    /// The controller, https://HOST:PORT.
    #[arg(long)]
    url: String,
    /// Number of simulated agents (one certificate and one connection each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Agent ids are PREFIX0001, PREFIX0002, ... (at least 4 digits); the
    /// controller config must list them under `agents:`.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Requests in flight at once (default: one per agent).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Length of the measured phase, seconds (ignored with --count).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Send exactly this many reports in the measured phase instead.
    #[arg(long)]
    count: Option<u64>,
    /// Unmeasured load before the measured phase, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Instead of the load: time GET /metrics this many times, after every
    /// agent reported once.
    #[arg(long)]
    render: Option<usize>,
    /// Operator name of the certificate issued for --render.
    #[arg(long, default_value = "bench")]
    operator: String,
    /// The controller's process id, for its CPU time and memory.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// Worker threads of this load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The report interval the simulated agents announce, seconds.
    #[arg(long, default_value_t = 15.0)]
    interval: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Certificates

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
}

fn load_ca(dir: &Path) -> Result<Ca> {
    let ca_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| format!("cannot read {}", ca_path.display()))?;
    let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a private key", key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
        .with_context(|| format!("{} is not a CA certificate", ca_path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.with_context(|| format!("{} is not PEM", ca_path.display()))?)
            .context("CA certificate refused by rustls")?;
    }
    Ok(Ca {
        issuer,
        roots: Arc::new(roots),
    })
}

/// A certificate of the same shape as `dicops pki issue` makes.
fn issue(ca: &Ca, identity: &Identity) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate().context("key generation")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let common_name = match identity {
        Identity::Agent(id) | Identity::Operator(id) => id.clone(),
        Identity::Controller => "dicops-controller".into(),
    };
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, "dicops");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let serves = !matches!(identity, Identity::Operator(_));
    params.extended_key_usages = if serves {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params
        .subject_alt_names
        .push(SanType::URI(identity.to_uri().try_into()?));
    if serves {
        params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
        for ip in ["127.0.0.1", "::1"] {
            params.subject_alt_names.push(SanType::IpAddress(ip.parse()?));
        }
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    let cert = params.signed_by(&key, &ca.issuer).context("signing a certificate")?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((cert.der().clone(), key_der))
}

fn client_config(ca: &Ca, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(ca.roots.clone())
        .with_client_auth_cert(vec![cert], key)
        .context("client certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------
// Connections

struct Target {
    host: String,
    addrs: Vec<SocketAddr>,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(target: &Target, config: Arc<ClientConfig>) -> Result<Sender> {
    let tcp = tcp_connect(&target.addrs, IO_TIMEOUT).await?;
    let tls = tls_handshake(tcp, config, &target.host, IO_TIMEOUT).await?;
    check_peer_identity(&tls, &Identity::Controller)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on a kept-alive connection and reads the whole answer.
async fn exchange(
    sender: &mut Sender,
    target: &Target,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes)> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, target.host.as_str())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .context("building a request")?;
    let work = async {
        sender.ready().await.context("connection not ready")?;
        let response = sender.send_request(request).await.context("sending a request")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(IO_TIMEOUT, work)
        .await
        .context("no answer within 10 s")?
}

// ---------------------------------------------------------------------------
// Simulated agents

/// Where the digits of `seq` go in a serialized report.
const SEQ_MARK: u64 = 987_654_321_987_654_321;

struct Sim {
    id: String,
    config: Arc<ClientConfig>,
    /// The report JSON before and after the digits of `seq`.
    head: Vec<u8>,
    tail: Vec<u8>,
    seq: u64,
    sender: Option<Sender>,
}

impl Sim {
    fn next_body(&mut self) -> Bytes {
        self.seq += 1;
        let digits = self.seq.to_string();
        let mut body = Vec::with_capacity(self.head.len() + digits.len() + self.tail.len());
        body.extend_from_slice(&self.head);
        body.extend_from_slice(digits.as_bytes());
        body.extend_from_slice(&self.tail);
        Bytes::from(body)
    }

    /// One report; reconnects once if the connection is gone.
    async fn report(&mut self, target: &Target) -> Result<StatusCode> {
        let body = self.next_body();
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(target, self.config.clone()).await?,
        };
        let (status, _) = exchange(&mut sender, target, Method::POST, dicops_proto::REPORT_PATH, body).await?;
        self.sender = Some(sender);
        Ok(status)
    }
}

/// A host of average size: 5 filesystems, 2 disks, 3 interfaces, 3
/// services, 2 configured paths.
fn health(n: usize) -> HostHealth {
    let n = n as u64;
    let gib = 1u64 << 30;
    let fs = |mountpoint: &str, device: &str, fstype: &str, size: u64, avail: u64| Filesystem {
        mountpoint: mountpoint.into(),
        device: device.into(),
        fstype: fstype.into(),
        size_bytes: size,
        avail_bytes: avail,
        read_only: false,
    };
    let disk = |device: &str, k: u64| DiskIo {
        device: device.into(),
        read_bytes_total: 912_384_512_000 * k + n * 4096,
        written_bytes_total: 2_381_023_232_000 * k + n * 8192,
        reads_completed_total: 48_120_331 * k + n,
        writes_completed_total: 120_448_901 * k + n,
        io_time_seconds_total: 81_234.567 * k as f64,
    };
    let net = |device: &str, k: u64| NetworkIo {
        device: device.into(),
        receive_bytes_total: 58_123_456_789_012 * k + n,
        transmit_bytes_total: 41_234_567_890_123 * k + n,
        receive_errors_total: k - 1,
        transmit_errors_total: 0,
    };
    let service = |name: &str| ServiceState {
        name: name.into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        error: None,
    };
    let path = |path: &str, size: u64, avail: u64| PathUsage {
        path: path.into(),
        state: PathState::Ok,
        size_bytes: size,
        avail_bytes: avail,
        error: None,
    };
    HostHealth {
        cpu_usage_ratio: 0.137 + (n % 50) as f64 / 100.0,
        load1: 0.82,
        load5: 0.61,
        load15: 0.57,
        memory_total_bytes: 67_430_322_176,
        memory_available_bytes: 41_203_712_000 - n * 4096,
        swap_total_bytes: 8 * gib,
        swap_free_bytes: 8 * gib - 1_048_576,
        uptime_seconds: 3_456_789 + n,
        boot_time_seconds: 1_760_000_000 - n,
        filesystems: vec![
            fs("/", "/dev/mapper/vg0-root", "ext4", 50 * gib, 31 * gib),
            fs("/boot", "/dev/sda1", "ext4", gib, gib / 2),
            fs("/home", "/dev/mapper/vg0-home", "ext4", 200 * gib, 120 * gib),
            fs("/var", "/dev/mapper/vg0-var", "xfs", 100 * gib, 64 * gib),
            fs("/srv/data", "/dev/nvme0n1p1", "xfs", 1800 * gib, 900 * gib),
        ],
        disks: vec![disk("nvme0n1", 2), disk("sda", 1)],
        networks: vec![net("bond0", 2), net("eth0", 1), net("eth1", 1)],
        services: vec![service("ssh"), service("postgresql"), service("cron")],
        paths: vec![
            path("/var/backups/postgresql", 100 * gib, 64 * gib),
            path("/srv/dicops/replicas", 1800 * gib, 900 * gib),
        ],
    }
}

/// The report of agent number `n` with its `seq` cut out.
fn report_template(id: &str, n: usize, interval: f64) -> Result<(Vec<u8>, Vec<u8>)> {
    let now = now_unix();
    let report = Report {
        agent: id.to_string(),
        seq: SEQ_MARK,
        instance: format!("{:016x}", (now * 1e6) as u64 ^ ((n as u64) << 40) ^ 0x5eed),
        collected_at: now,
        interval_seconds: interval,
        info: AgentInfo {
            version: "0.1.0".into(),
            hostname: format!("{id}.example.org"),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-27-amd64".into(),
        },
        health: health(n),
        report_failures: ReportFailures::default(),
        backups: Vec::new(),
        data_url: None,
        data_refusals: Default::default(),
        exports: Vec::new(),
        certificate_expiry_timestamp_seconds: Some(now + 397.0 * 86_400.0),
    };
    let json = serde_json::to_vec(&report)?;
    let mark = format!("\"seq\":{SEQ_MARK}");
    let text = std::str::from_utf8(&json)?;
    let at = text.find(&mark).context("seq not found in the report JSON")? + "\"seq\":".len();
    let tail_at = at + SEQ_MARK.to_string().len();
    Ok((json[..at].to_vec(), json[tail_at..].to_vec()))
}

fn agent_id(prefix: &str, n: usize) -> String {
    format!("{prefix}{n:04}")
}

// ---------------------------------------------------------------------------
// Phases

/// What a group of agents saw in one phase.
#[derive(Default)]
struct Tally {
    accepted: u64,
    /// Refusals by HTTP status, and transport failures under "io".
    errors: BTreeMap<String, u64>,
    first_messages: Vec<String>,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn error(&mut self, key: String, message: String) {
        *self.errors.entry(key).or_default() += 1;
        if self.first_messages.len() < 3 {
            self.first_messages.push(message);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.accepted += other.accepted;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for m in other.first_messages {
            if self.first_messages.len() < 3 {
                self.first_messages.push(m);
            }
        }
        self.latencies_us.extend(other.latencies_us);
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// When a phase ends.
#[derive(Clone)]
enum Stop {
    /// Every agent sends exactly one report.
    OncePerAgent,
    At(Instant),
    /// This many reports in total, shared by every worker.
    Budget(Arc<AtomicU64>),
}

impl Stop {
    fn take(&self) -> bool {
        match self {
            Stop::OncePerAgent => true,
            Stop::At(deadline) => Instant::now() < *deadline,
            Stop::Budget(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// Runs one phase over `groups` (one worker task per group, so one request
/// in flight per group). Returns the groups for the next phase.
async fn phase(
    groups: Vec<Vec<Sim>>,
    target: &Arc<Target>,
    stop: Stop,
    record: bool,
) -> Result<(Vec<Vec<Sim>>, Tally, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(groups.len());
    for mut group in groups {
        let target = target.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let once = matches!(stop, Stop::OncePerAgent);
            'outer: loop {
                for sim in group.iter_mut() {
                    if !stop.take() {
                        break 'outer;
                    }
                    let t0 = Instant::now();
                    match sim.report(&target).await {
                        Ok(StatusCode::OK) => {
                            tally.accepted += 1;
                            if record {
                                let us = t0.elapsed().as_micros();
                                tally.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                            }
                        }
                        Ok(status) => tally.error(status.as_u16().to_string(), format!("{}: HTTP {status}", sim.id)),
                        Err(e) => {
                            sim.sender = None;
                            tally.error("io".into(), format!("{}: {e:#}", sim.id));
                        }
                    }
                }
                if once || group.is_empty() {
                    break;
                }
            }
            (group, tally)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut total = Tally::default();
    for task in tasks {
        let (group, tally) = task.await.context("worker task")?;
        out.push(group);
        total.merge(tally);
    }
    Ok((out, total, started.elapsed()))
}

fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1000.0
}

// ---------------------------------------------------------------------------
// /proc

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state is field 0, utime 11, stime 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// VmRSS and VmHWM of a process, KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let (host, port) = parse_https_url(&args.url)?;
    let target = Arc::new(Target {
        addrs: resolve(&host, port).await?,
        host,
    });
    let concurrency = args.concurrency.unwrap_or(args.agents).clamp(1, args.agents);
    let ca = load_ca(&args.pki)?;
    let pid = args.controller_pid.map(|p| p.to_string());

    // Certificates, issued up front so that signing is not measured.
    let started = Instant::now();
    let mut sims = Vec::with_capacity(args.agents);
    for n in 1..=args.agents {
        let id = agent_id(&args.prefix, n);
        let (cert, key) = issue(&ca, &Identity::Agent(id.clone()))?;
        let (head, tail) = report_template(&id, n, args.interval)?;
        sims.push(Sim {
            config: client_config(&ca, cert, key)?,
            id,
            head,
            tail,
            seq: 0,
            sender: None,
        });
    }
    let body_bytes = sims[0].head.len() + 1 + sims[0].tail.len();
    println!(
        "report-load: {} agents ({}..{}), {concurrency} in flight, {} worker thread(s), report body {body_bytes} bytes",
        args.agents,
        agent_id(&args.prefix, 1),
        agent_id(&args.prefix, args.agents),
        args.threads.max(1),
    );
    println!(
        "  issued {} agent certificates in {:.2} s",
        args.agents,
        started.elapsed().as_secs_f64()
    );

    // Agent i goes to worker i % concurrency.
    let mut groups: Vec<Vec<Sim>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (i, sim) in sims.into_iter().enumerate() {
        groups[i % concurrency].push(sim);
    }

    // Connect (mutual TLS handshake) and send every agent's first report.
    let (groups, first, took) = phase(groups, &target, Stop::OncePerAgent, false).await?;
    println!(
        "  connected and sent the first report of every agent in {:.2} s: {} accepted, {} refused",
        took.as_secs_f64(),
        first.accepted,
        first.error_count()
    );
    if first.error_count() > 0 {
        println!("    errors: {:?}; first: {:?}", first.errors, first.first_messages);
    }
    if first.accepted == 0 {
        bail!(
            "no report was accepted; does the controller config list the agents {}..?",
            agent_id(&args.prefix, 1)
        );
    }

    match args.render {
        Some(renders) => render(&args, &ca, &target, renders, pid.as_deref()).await,
        None => load(&args, groups, &target, concurrency, pid.as_deref()).await,
    }
}

async fn load(
    args: &Args,
    groups: Vec<Vec<Sim>>,
    target: &Arc<Target>,
    concurrency: usize,
    pid: Option<&str>,
) -> Result<()> {
    let mut groups = groups;
    if args.warmup > 0.0 {
        let deadline = Instant::now() + Duration::from_secs_f64(args.warmup);
        let (g, warm, _) = phase(groups, target, Stop::At(deadline), false).await?;
        groups = g;
        println!(
            "  warm-up {:.1} s: {} accepted, {} refused",
            args.warmup,
            warm.accepted,
            warm.error_count()
        );
    }
    let stop = match args.count {
        Some(count) => Stop::Budget(Arc::new(AtomicU64::new(count))),
        None => Stop::At(Instant::now() + Duration::from_secs_f64(args.duration)),
    };
    let ctl_cpu_0 = pid.and_then(cpu_seconds);
    let own_cpu_0 = cpu_seconds("self");
    let (_groups, mut tally, took) = phase(groups, target, stop, true).await?;
    let seconds = took.as_secs_f64();
    let ctl_cpu = pid.and_then(cpu_seconds).zip(ctl_cpu_0).map(|(b, a)| b - a);
    let own_cpu = cpu_seconds("self").zip(own_cpu_0).map(|(b, a)| b - a);
    tally.latencies_us.sort_unstable();
    let rate = tally.accepted as f64 / seconds;
    let (p50, p99) = (
        percentile_ms(&tally.latencies_us, 0.50),
        percentile_ms(&tally.latencies_us, 0.99),
    );
    let max = percentile_ms(&tally.latencies_us, 1.0);
    println!(
        "  measured {seconds:.2} s: {} reports accepted = {rate:.0} reports/s; errors {}",
        tally.accepted,
        tally.error_count()
    );
    if tally.error_count() > 0 {
        println!("    errors: {:?}; first: {:?}", tally.errors, tally.first_messages);
    }
    println!("  latency per report: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    let mut result = format!(
        "RESULT mode=load agents={} concurrency={concurrency} threads={} seconds={seconds:.3} accepted={} rps={rate:.1} errors={} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3}",
        args.agents,
        args.threads.max(1),
        tally.accepted,
        tally.error_count()
    );
    if let Some(cpu) = own_cpu {
        println!("  load generator CPU: {cpu:.2} s ({:.2} cores)", cpu / seconds);
        result.push_str(&format!(" gen_cpu_s={cpu:.2}"));
    }
    if let Some(cpu) = ctl_cpu {
        let per_report_us = cpu / tally.accepted.max(1) as f64 * 1e6;
        println!(
            "  controller CPU: {cpu:.2} s ({:.2} cores), {per_report_us:.0} µs per accepted report",
            cpu / seconds
        );
        result.push_str(&format!(" ctl_cpu_s={cpu:.2} ctl_us_per_report={per_report_us:.1}"));
    }
    result.push_str(&controller_memory(args));
    println!("{result}");
    Ok(())
}

/// Prints the controller's memory; returns its RESULT fields.
fn controller_memory(args: &Args) -> String {
    match args.controller_pid.and_then(memory_kib) {
        Some((rss, hwm)) => {
            println!(
                "  controller memory: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            );
            format!(" ctl_rss_kib={rss} ctl_hwm_kib={hwm}")
        }
        None => String::new(),
    }
}

/// `name{labels} value` of the first series line starting with `prefix`.
fn sample_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))?
        .rsplit_once(' ')?
        .1
        .parse()
        .ok()
}

async fn render(args: &Args, ca: &Ca, target: &Arc<Target>, renders: usize, pid: Option<&str>) -> Result<()> {
    if renders == 0 {
        bail!("--render needs at least 1");
    }
    let (cert, key) = issue(ca, &Identity::Operator(args.operator.clone()))?;
    let config = client_config(ca, cert, key)?;
    let mut sender = connect(target, config).await?;
    let mut times_ms = Vec::with_capacity(renders);
    let mut bytes = 0usize;
    let mut series = 0usize;
    let mut server = Vec::with_capacity(renders);
    let ctl_cpu_0 = pid.and_then(cpu_seconds);
    for _ in 0..renders {
        let t0 = Instant::now();
        let (status, body) = exchange(&mut sender, target, Method::GET, "/metrics", Bytes::new()).await?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        if status != StatusCode::OK {
            bail!("GET /metrics: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let text = std::str::from_utf8(&body).context("/metrics is not UTF-8")?;
        bytes = body.len();
        series = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
        // The controller's own histogram of its handler time, to tell the
        // server-side render from the transfer.
        let sum = sample_value(text, "dicops_http_request_duration_seconds_sum{handler=\"metrics\"}");
        let count = sample_value(text, "dicops_http_request_duration_seconds_count{handler=\"metrics\"}");
        server.push(sum.zip(count));
    }
    let ctl_cpu = pid.and_then(cpu_seconds).zip(ctl_cpu_0).map(|(b, a)| b - a);
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    println!(
        "  GET /metrics x{renders} (kept-alive, whole body read): median {median:.1} ms, min {min:.1} ms, max {max:.1} ms"
    );
    println!("  body {bytes} bytes ({:.2} MB), {series} series", bytes as f64 / 1e6);
    let mut result = format!(
        "RESULT mode=render agents={} renders={renders} median_ms={median:.2} min_ms={min:.2} max_ms={max:.2} bytes={bytes} series={series}",
        args.agents
    );
    // Mean handler time of the renders between the first body that shows
    // the histogram and the last one, from the controller's histogram (a
    // body is written before its own time is observed).
    let observed: Vec<(f64, f64)> = server.iter().flatten().copied().collect();
    if let (Some((s0, c0)), Some((s1, c1))) = (observed.first(), observed.last()) {
        if c1 > c0 {
            let mean = (s1 - s0) / (c1 - c0) * 1000.0;
            println!(
                "  controller's own handler time (dicops_http_request_duration_seconds): mean {mean:.1} ms over {} renders",
                c1 - c0
            );
            result.push_str(&format!(" server_mean_ms={mean:.2}"));
        }
    }
    if let Some(cpu) = ctl_cpu {
        let per = cpu / renders as f64 * 1000.0;
        println!("  controller CPU per render: {per:.1} ms");
        result.push_str(&format!(" ctl_cpu_ms_per_render={per:.2}"));
    }
    result.push_str(&controller_memory(args));
    println!("{result}");
    Ok(())
}
