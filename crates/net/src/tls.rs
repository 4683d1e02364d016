//! TLS configs that require the deployment's CA on both sides, and their
//! reload when the files on disk change (a renewal needs no restart).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use dicops_proto::Identity;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::identity::{certificate_identity, certificate_not_after};

/// The three PEM files of one party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {path}: {message}")]
    Read {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{field}: {path} holds no {what}")]
    Empty {
        field: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("tls.cert: {path} is not signed by the CA in {ca}: {message}")]
    NotSignedByCa {
        path: PathBuf,
        ca: PathBuf,
        message: String,
    },
    #[error("tls.cert: {path} carries no dicops identity (issue it with `dicops pki issue`)")]
    NoIdentity { path: PathBuf },
    #[error("tls.key: {key} does not belong to the certificate {cert}: {message}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| TlsError::Read {
        field,
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let certs: Vec<_> = iter.collect::<Result<_, _>>().map_err(|e| TlsError::Read {
        field,
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            field,
            path: path.to_path_buf(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            field: "tls.key",
            path: path.to_path_buf(),
            what: "PEM private key",
        },
        other => TlsError::Read {
            field: "tls.key",
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

/// Everything built from one version of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Identity,
    not_after: f64,
    ca_not_after: f64,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamp = stamp(files);
    let ca_certs = read_certs("tls.ca", &files.ca)?;
    let chain = read_certs("tls.cert", &files.cert)?;
    let key = read_key(&files.key)?;
    let mut roots = RootCertStore::empty();
    for ca in &ca_certs {
        roots.add(ca.clone()).map_err(|e| TlsError::Read {
            field: "tls.ca",
            path: files.ca.clone(),
            message: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    let provider = provider();

    // Peers must present a certificate from our CA; a TLS client without one
    // is let in so that the HTTP layer can answer with a clear 401 and the
    // health probes work, but any certificate it does present is verified.
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Setup(e.to_string()))?;

    // Fail loud at load time when our own certificate is not from our CA:
    // otherwise every peer would refuse us with a vaguer error.
    client_verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| TlsError::NotSignedByCa {
            path: files.cert.clone(),
            ca: files.ca.clone(),
            message: e.to_string(),
        })?;
    let identity = certificate_identity(&chain[0]).ok_or_else(|| TlsError::NoIdentity {
        path: files.cert.clone(),
    })?;
    let not_after = certificate_not_after(&chain[0]).unwrap_or(0.0);
    let ca_not_after = certificate_not_after(&ca_certs[0]).unwrap_or(0.0);

    let mismatch = |e: rustls::Error| TlsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    };
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        identity,
        not_after,
        ca_not_after,
        stamp,
    })
}

/// What a reload check found.
#[derive(Debug)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded,
    /// The new files are bad; the previous certificates stay in use.
    Failed(TlsError),
}

/// The current TLS configs of one party, rebuilt when its files change.
pub struct TlsReloader {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
    generation: std::sync::atomic::AtomicU64,
}

impl TlsReloader {
    pub fn load(files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let loaded = build(&files)?;
        Ok(Arc::new(TlsReloader {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
            generation: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.loaded.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Who our own certificate says we are.
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// notAfter of our own certificate, Unix seconds.
    pub fn not_after(&self) -> f64 {
        self.current().not_after
    }

    /// notAfter of the CA certificate, Unix seconds.
    pub fn ca_not_after(&self) -> f64 {
        self.current().ca_not_after
    }

    /// Increases with every successful reload, so clients know to drop a
    /// kept-alive connection made with the old certificate.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Rebuilds the configs if any of the files changed. A bad new file
    /// keeps the old, working certificates in use.
    pub fn reload_if_changed(&self) -> ReloadOutcome {
        let current = self.current();
        if stamp(&self.files) == current.stamp {
            return ReloadOutcome::Unchanged;
        }
        match build(&self.files) {
            Ok(loaded) => {
                if loaded.identity != current.identity {
                    // A certificate for someone else is never swapped in.
                    let message = format!(
                        "new certificate is for {}, this process is {}",
                        loaded.identity, current.identity
                    );
                    self.remember_stamp();
                    return ReloadOutcome::Failed(TlsError::Setup(message));
                }
                match self.loaded.write() {
                    Ok(mut guard) => *guard = Arc::new(loaded),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
                }
                self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ReloadOutcome::Reloaded
            }
            Err(e) => {
                // Do not retry the same bad files every tick; wait for the
                // next change.
                self.remember_stamp();
                ReloadOutcome::Failed(e)
            }
        }
    }

    fn remember_stamp(&self) {
        let current = self.current();
        let updated = Loaded {
            server: current.server.clone(),
            client: current.client.clone(),
            identity: current.identity.clone(),
            not_after: current.not_after,
            ca_not_after: current.ca_not_after,
            stamp: stamp(&self.files),
        };
        match self.loaded.write() {
            Ok(mut guard) => *guard = Arc::new(updated),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(updated),
        }
    }

    /// Checks the files every `interval` until `shutdown`, logging and
    /// passing every outcome but `Unchanged` to `on_change`.
    pub fn spawn_watcher<F>(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
        on_change: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(&ReloadOutcome) + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let check = this.clone();
                let outcome = match tokio::task::spawn_blocking(move || check.reload_if_changed()).await {
                    Ok(outcome) => outcome,
                    Err(e) => ReloadOutcome::Failed(TlsError::Setup(e.to_string())),
                };
                match &outcome {
                    ReloadOutcome::Unchanged => continue,
                    ReloadOutcome::Reloaded => tracing::info!(
                        cert = %this.files.cert.display(),
                        not_after = this.not_after(),
                        "reloaded TLS certificates"
                    ),
                    ReloadOutcome::Failed(e) => tracing::error!(
                        error = %e,
                        "new TLS files are not usable; keeping the previous certificates"
                    ),
                }
                on_change(&outcome);
            }
        })
    }
}

/// A bounded label value for a failed server-side handshake.
pub fn handshake_failure_reason(err: &io::Error) -> &'static str {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return rustls_error_reason(tls);
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

/// A bounded label for a rustls error.
pub fn rustls_error_reason(err: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "unknown_ca",
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "expired_certificate",
        rustls::Error::InvalidCertificate(C::Revoked) => "revoked_certificate",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "protocol",
        _ => "other",
    }
}
