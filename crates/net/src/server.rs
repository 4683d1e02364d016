//! The server half of a connection, shared by the controller's API and the
//! agents' data port: the TLS handshake with a time limit, the peer's
//! identity from its certificate, and HTTP/1.1 until shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use dicops_proto::Identity;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A peer that does not finish its TLS handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
    pub cert_not_after: Option<f64>,
    pub cert_serial: Option<String>,
}

/// Completes the TLS handshake; on failure, the bounded reason (for a
/// metric label) and the error.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Result<(TlsStream<TcpStream>, Peer), (&'static str, String)> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err((crate::handshake_failure_reason(&e), e.to_string())),
        Err(_) => return Err(("timeout", "the TLS handshake timed out".into())),
    };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .cloned();
    let peer = Peer {
        addr,
        identity: leaf.as_ref().and_then(crate::certificate_identity),
        cert_not_after: leaf.as_ref().and_then(crate::certificate_not_after),
        cert_serial: leaf.as_ref().and_then(crate::certificate_serial),
    };
    if leaf.is_some() && peer.identity.is_none() {
        tracing::warn!(peer = %addr, "client certificate from our CA carries no dicops identity");
    }
    Ok((tls, peer))
}

/// Serves HTTP/1.1 with keep-alive on one connection until it closes or
/// `shutdown` (then gracefully, for up to 5 s).
pub async fn serve_http1<F, Fut>(tls: TlsStream<TcpStream>, peer: Peer, handler: F, shutdown: CancellationToken)
where
    F: Fn(Request<Incoming>, Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let addr = peer.addr;
    let handler = std::sync::Arc::new(handler);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handler(req, peer).await) }
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
