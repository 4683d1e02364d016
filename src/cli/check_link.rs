//! `dicops check-link`: where exactly does a connection fail? Each step is
//! tried in order and the first failure is named, so "the site is cut off"
//! (DNS/TCP) is told apart from "the certificate is broken" (TLS/identity).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use dicops_config::{detect_kind, AgentConfig, CliConfig, ConfigKind};
use dicops_net::client::{check_peer_identity, parse_https_url, resolve, tcp_connect, tls_handshake};
use dicops_net::{TlsFiles, TlsReloader};
use dicops_proto::Identity;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;

#[derive(Debug, Args)]
pub struct CheckLinkArgs {
    /// Take the URL and certificates from an agent or CLI config.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// URL to test, e.g. https://controller.dc2.example:9443.
    #[arg(long, requires_all = ["ca", "cert", "key"], conflicts_with = "config")]
    url: Option<String>,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Who the peer must be: `controller` or `agent:ID`.
    #[arg(long, default_value = "controller")]
    expect: String,
    /// Time allowed for each step, in seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn step(name: &str, started: Instant, detail: &str) {
    println!("ok    {name:<9} {detail} ({} ms)", started.elapsed().as_millis());
}

fn fail(name: &str, detail: &str, hint: &str) -> ExitCode {
    println!("FAIL  {name:<9} {detail}");
    if !hint.is_empty() {
        println!("      hint: {hint}");
    }
    ExitCode::from(1)
}

pub async fn run(args: CheckLinkArgs) -> anyhow::Result<ExitCode> {
    let (url, files) = match (&args.config, &args.url) {
        (Some(path), _) => {
            let loaded = match detect_kind(path) {
                Ok(ConfigKind::Agent) => AgentConfig::load(path).map(|c| (c.controller_url, c.tls)),
                Ok(ConfigKind::Cli) => CliConfig::load(path).map(|c| (c.controller_url, c.tls)),
                Ok(ConfigKind::Controller) => bail!(
                    "{}: a controller config names no peer to test; use an agent or CLI config, or --url",
                    path.display()
                ),
                Err(e) => Err(e),
            };
            match loaded {
                Ok((url, tls)) => (
                    url,
                    TlsFiles {
                        ca: tls.ca,
                        cert: tls.cert,
                        key: tls.key,
                    },
                ),
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        (None, Some(url)) => (
            url.clone(),
            TlsFiles {
                ca: args.ca.clone().unwrap_or_default(),
                cert: args.cert.clone().unwrap_or_default(),
                key: args.key.clone().unwrap_or_default(),
            },
        ),
        (None, None) => bail!("give --config FILE or --url URL --ca --cert --key"),
    };
    let expected = match args.expect.as_str() {
        "controller" => Identity::Controller,
        other => match other.strip_prefix("agent:") {
            Some(id) => Identity::Agent(id.to_string()),
            None => bail!("--expect must be `controller` or `agent:ID`"),
        },
    };
    let timeout = Duration::from_secs(args.timeout);
    println!("checking {url} (expecting {expected})");

    let t = Instant::now();
    let tls = match TlsReloader::load(files) {
        Ok(tls) => tls,
        Err(e) => return Ok(fail("certs", &e.to_string(), "fix the local certificate files first")),
    };
    step(
        "certs",
        t,
        &format!(
            "we are {}; our certificate expires at unix {}",
            tls.identity(),
            tls.not_after() as i64
        ),
    );

    let (host, port) = parse_https_url(&url)?;
    let t = Instant::now();
    let addrs = match resolve(&host, port).await {
        Ok(a) => a,
        Err(e) => {
            return Ok(fail(
                "dns",
                &e.to_string(),
                "check the host name and the resolver of this machine",
            ))
        }
    };
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    step("dns", t, &format!("{host} -> {}", list.join(", ")));

    let t = Instant::now();
    let tcp = match tcp_connect(&addrs, timeout).await {
        Ok(s) => s,
        Err(e) => {
            return Ok(fail(
                "tcp",
                &e.to_string(),
                "is the peer running, and does every firewall between the sites allow this port?",
            ))
        }
    };
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    step("tcp", t, &format!("connected to {peer}"));

    let t = Instant::now();
    let stream = match tls_handshake(tcp, tls.client_config(), &host, timeout).await {
        Ok(s) => s,
        Err(e) => {
            return Ok(fail(
                "tls",
                &e.to_string(),
                "both sides must use certificates from the same deployment CA, unexpired, and the peer's must name this host",
            ))
        }
    };
    step("tls", t, "handshake done, both certificates accepted");

    let t = Instant::now();
    let identity = match check_peer_identity(&stream, &expected) {
        Ok(i) => i,
        Err(e) => return Ok(fail("identity", &e.to_string(), "the URL points at the wrong service")),
    };
    step("identity", t, &format!("peer is {identity}"));

    let t = Instant::now();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = Request::get("/healthz")
        .header(hyper::header::HOST, host.as_str())
        .body(Empty::<Bytes>::new())?;
    match tokio::time::timeout(timeout, sender.send_request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            step(
                "http",
                t,
                &format!("/healthz answered {:?}", String::from_utf8_lossy(&body).trim()),
            );
        }
        Ok(Ok(response)) => return Ok(fail("http", &format!("/healthz answered {}", response.status()), "")),
        Ok(Err(e)) => return Ok(fail("http", &e.to_string(), "")),
        Err(_) => return Ok(fail("http", "no answer in time", "")),
    }
    println!("link ok");
    Ok(ExitCode::SUCCESS)
}
