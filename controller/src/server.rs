//! The controller's HTTPS endpoint: TLS accept, peer identity, routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicops_net::TlsReloader;
use dicops_proto::Identity;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::Shared;

/// A peer that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections above this count are refused at accept time.
const MAX_CONNECTIONS: i64 = 16_384;

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
    pub cert_not_after: Option<f64>,
    pub cert_serial: Option<String>,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<TlsReloader>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if shared.metrics.connections_open.get() >= MAX_CONNECTIONS {
            tracing::warn!(peer = %addr, "too many open connections; refusing");
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = TlsAcceptor::from(tls.server_config());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shared.metrics.connections_open.inc();
            handle_connection(tcp, addr, acceptor, shared.clone(), shutdown).await;
            shared.metrics.connections_open.dec();
        });
    }
}

async fn handle_connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = dicops_net::handshake_failure_reason(&e);
            shared.metrics.tls_handshake_failures.with_label_values(&[reason]).inc();
            tracing::warn!(peer = %addr, reason, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .tls_handshake_failures
                .with_label_values(&["timeout"])
                .inc();
            tracing::warn!(peer = %addr, "TLS handshake timed out");
            return;
        }
    };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .cloned();
    let peer = Peer {
        addr,
        identity: leaf.as_ref().and_then(dicops_net::certificate_identity),
        cert_not_after: leaf.as_ref().and_then(dicops_net::certificate_not_after),
        cert_serial: leaf.as_ref().and_then(dicops_net::certificate_serial),
    };
    if leaf.is_some() && peer.identity.is_none() {
        tracing::warn!(peer = %addr, "client certificate from our CA carries no dicops identity");
    }
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(dispatch(req, &peer, &shared).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}

async fn dispatch(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (handler, response) = api::route(req, peer, shared).await;
    let metrics = &shared.metrics;
    metrics
        .http_requests
        .with_label_values(&[handler, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[handler])
        .observe(started.elapsed().as_secs_f64());
    response
}
