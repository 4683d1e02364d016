//! What a certificate says: who it speaks for and until when.

use dicops_proto::Identity;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The dicops identity carried in a certificate's URI SAN.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Identity::from_uri(uri),
        _ => None,
    })
}

/// The certificate's notAfter as Unix seconds.
pub fn certificate_not_after(cert: &CertificateDer<'_>) -> Option<f64> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp() as f64)
}

/// The certificate's serial number in hex, for audit records.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(parsed.tbs_certificate.raw_serial_as_string())
}
