//! A small HTTPS client for one peer: one kept-alive HTTP/1.1 connection
//! over mutual TLS, rebuilt after an error or a certificate reload.
//!
//! Every failure is classified, so that "the network is cut" and "the
//! certificate is broken" are told apart in logs, metrics and `check-link`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicops_proto::Identity;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::body::read_limited;
use crate::identity::certificate_identity;
use crate::tls::{rustls_error_reason, TlsReloader};

/// The largest response body a client reads.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// What kind of failure, for counters and for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// DNS, connect, reset, timeout: the peer or the path to it is down.
    Network,
    /// TLS handshake or certificate: someone must fix a certificate.
    Tls,
    /// The peer answered and refused.
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot resolve {host}: {message}")]
    Dns { host: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("TLS handshake with {addr} failed ({reason}): {message}")]
    Tls {
        addr: String,
        reason: &'static str,
        message: String,
    },
    #[error("{addr} presented a certificate for {actual}, expected {expected}")]
    WrongPeer {
        addr: String,
        actual: String,
        expected: String,
    },
    #[error("connection to {addr} failed: {message}")]
    Io { addr: String, message: String },
    #[error("{addr} did not answer within {seconds} s")]
    Timeout { addr: String, seconds: u64 },
}

impl ClientError {
    pub fn class(&self) -> FailureClass {
        match self {
            ClientError::Tls { .. } | ClientError::WrongPeer { .. } => FailureClass::Tls,
            _ => FailureClass::Network,
        }
    }
}

/// Host and port of an `https://host:port[/...]` URL.
pub fn parse_https_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = |message: &str| ClientError::Url {
        url: url.to_string(),
        message: message.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("must name a port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("must name a host"));
    }
    Ok((host.to_string(), port))
}

/// Resolves a host name (first step of a connection).
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ClientError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Dns {
            host: host.to_string(),
            message: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ClientError::Dns {
            host: host.to_string(),
            message: "no addresses".into(),
        });
    }
    Ok(addrs)
}

/// Opens a TCP connection to the first address that answers.
pub async fn tcp_connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, ClientError> {
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => {
                last = Some(ClientError::Connect {
                    addr: addr.to_string(),
                    message: e.to_string(),
                })
            }
            Err(_) => {
                last = Some(ClientError::Connect {
                    addr: addr.to_string(),
                    message: format!("no answer within {} s", timeout.as_secs()),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Connect {
        addr: "?".into(),
        message: "no address to connect to".into(),
    }))
}

/// Runs the TLS handshake; both sides present certificates.
pub async fn tls_handshake(
    stream: TcpStream,
    config: Arc<ClientConfig>,
    host: &str,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| host.to_string());
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| ClientError::Url {
        url: host.to_string(),
        message: e.to_string(),
    })?;
    let connector = TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(server_name, stream)).await {
        Err(_) => Err(ClientError::Timeout {
            addr,
            seconds: timeout.as_secs(),
        }),
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => {
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(tls_error) => Err(ClientError::Tls {
                    addr,
                    reason: rustls_error_reason(tls_error),
                    message: tls_error.to_string(),
                }),
                // A peer that closes during the handshake without an alert
                // is most often a middlebox or an overloaded server.
                None => Err(ClientError::Io {
                    addr,
                    message: format!("during TLS handshake: {e}"),
                }),
            }
        }
    }
}

/// Checks that the peer's certificate speaks for who we meant to reach.
pub fn check_peer_identity(tls: &TlsStream<TcpStream>, expected: &Identity) -> Result<Identity, ClientError> {
    let addr = tls.get_ref().0.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let actual = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(certificate_identity);
    match actual {
        Some(identity) if &identity == expected => Ok(identity),
        other => Err(ClientError::WrongPeer {
            addr,
            actual: other
                .map(|i| i.to_string())
                .unwrap_or_else(|| "nobody (no dicops identity)".into()),
            expected: expected.to_string(),
        }),
    }
}

/// A kept-alive HTTPS connection to one peer.
pub struct HttpsClient {
    host: String,
    port: u16,
    expected_peer: Identity,
    tls: Arc<TlsReloader>,
    connection: Option<(u64, SendRequest<Full<Bytes>>)>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest answer read; larger ones are an error.
    pub max_response_bytes: u64,
}

impl HttpsClient {
    pub fn new(url: &str, expected_peer: Identity, tls: Arc<TlsReloader>) -> Result<Self, ClientError> {
        let (host, port) = parse_https_url(url)?;
        Ok(HttpsClient {
            host,
            port,
            expected_peer,
            tls,
            connection: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: MAX_RESPONSE_BYTES,
        })
    }

    pub fn peer(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let addrs = resolve(&self.host, self.port).await?;
        let tcp = tcp_connect(&addrs, self.connect_timeout).await?;
        let tls = tls_handshake(tcp, self.tls.client_config(), &self.host, self.connect_timeout).await?;
        check_peer_identity(&tls, &self.expected_peer)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Io {
                addr: self.peer(),
                message: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "client connection closed");
            }
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer. A kept-alive connection
    /// that turns out to be closed is replaced once, transparently.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let timeout = self.request_timeout;
        match tokio::time::timeout(timeout, self.request_inner(method, path, body)).await {
            Ok(result) => result,
            Err(_) => {
                self.connection = None;
                Err(ClientError::Timeout {
                    addr: self.peer(),
                    seconds: timeout.as_secs(),
                })
            }
        }
    }

    async fn request_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let generation = self.tls.generation();
        let mut reused = false;
        let mut sender = match self.connection.take() {
            Some((g, sender)) if g == generation && !sender.is_closed() => {
                reused = true;
                sender
            }
            _ => self.connect().await?,
        };
        let body = body.map(Bytes::from).unwrap_or_default();
        let build = |body: Bytes| {
            Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, self.host.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| ClientError::Url {
                    url: path.to_string(),
                    message: e.to_string(),
                })
        };
        if sender.ready().await.is_err() {
            sender = self.connect().await?;
            reused = false;
        }
        let response = match sender.send_request(build(body.clone())?).await {
            Ok(response) => response,
            Err(e) if reused && (e.is_closed() || e.is_incomplete_message()) => {
                // The server closed an idle connection as we used it.
                sender = self.connect().await?;
                sender.send_request(build(body)?).await.map_err(|e| ClientError::Io {
                    addr: self.peer(),
                    message: e.to_string(),
                })?
            }
            Err(e) => {
                return Err(ClientError::Io {
                    addr: self.peer(),
                    message: e.to_string(),
                })
            }
        };
        let status = response.status();
        let bytes = read_limited(response.into_body(), self.max_response_bytes)
            .await
            .map_err(|e| ClientError::Io {
                addr: self.peer(),
                message: e.to_string(),
            })?;
        self.connection = Some((generation, sender));
        Ok((status, bytes))
    }
}
