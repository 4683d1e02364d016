//! The controller's HTTPS endpoint: TLS accept, peer identity, routing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicops_net::TlsReloader;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::Shared;

/// Connections above this count are refused at accept time.
const MAX_CONNECTIONS: i64 = 16_384;

pub use dicops_net::server::Peer;

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
    let (tls, peer) = match dicops_net::server::accept(&acceptor, tcp, addr).await {
        Ok(accepted) => accepted,
        Err((reason, error)) => {
            shared.metrics.tls_handshake_failures.with_label_values(&[reason]).inc();
            tracing::warn!(peer = %addr, reason, %error, "TLS handshake failed");
            return;
        }
    };
    let handler = move |req: Request<Incoming>, peer: Peer| {
        let shared = shared.clone();
        async move { dispatch(req, &peer, &shared).await }
    };
    dicops_net::server::serve_http1(tls, peer, handler, shutdown).await;
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
