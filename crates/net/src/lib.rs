//! TLS and HTTP plumbing shared by every dicops party.
//!
//! Every connection is mutual TLS with certificates from the deployment's
//! own CA. Identity comes from the certificate (a `dicops://` URI SAN),
//! never from what a peer says about itself.

pub mod body;
pub mod client;
pub mod identity;
pub mod logging;
pub mod server;
pub mod tls;

pub use client::{ClientError, FailureClass, HttpsClient};
pub use identity::{certificate_identity, certificate_not_after, certificate_serial};
pub use tls::{handshake_failure_reason, TlsError, TlsFiles, TlsReloader};
