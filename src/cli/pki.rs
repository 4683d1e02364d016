//! `dicops pki`: the deployment's own CA and its certificates, with no
//! openssl gymnastics. Every certificate carries its dicops identity as a
//! URI SAN (`dicops://agent/db01`), which is what peers authorize on.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dicops_proto::{is_valid_id, Identity};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, Args)]
pub struct PkiArgs {
    #[command(subcommand)]
    command: PkiCommand,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the deployment CA: ca.pem and ca-key.pem (keep the key offline).
    Init {
        /// Folder for the CA files.
        #[arg(long, default_value = "/etc/dicops/pki")]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "dicops deployment CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Overwrite an existing CA (every certificate it issued stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["agent", "controller", "operator"])))]
struct IssueArgs {
    /// Folder holding ca.pem and ca-key.pem.
    #[arg(long, default_value = "/etc/dicops/pki")]
    dir: PathBuf,
    /// Where to write the certificate and key (default: --dir).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// An agent certificate (client and server: agents also serve replication data).
    #[arg(long)]
    agent: Option<String>,
    /// The controller's certificate.
    #[arg(long)]
    controller: bool,
    /// An operator's certificate for the CLI and for Prometheus scrapes.
    #[arg(long)]
    operator: Option<String>,
    /// DNS name or IP address the holder is reached at (repeatable). Without
    /// any, server certificates get localhost, 127.0.0.1 and ::1.
    #[arg(long)]
    san: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 397)]
    days: i64,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
    /// Keep an existing certificate that is still good for more than DAYS
    /// (right holder, same names, signed by this CA, matching key), and
    /// replace it otherwise. Prints "kept" or "issued": made for cron and
    /// Ansible, which run it on every pass.
    #[arg(long, value_name = "DAYS", conflicts_with = "force")]
    renew_before: Option<i64>,
}

pub fn run(args: PkiArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PkiCommand::Init { dir, name, days, force } => {
            let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
            init_ca(&dir, &name, days, force)?;
            println!(
                "created CA {name:?}\n  certificate: {}\n  private key: {} (keep it safe: it signs every identity)",
                cert.display(),
                key.display()
            );
        }
        PkiCommand::Issue(a) => {
            let identity = match (&a.agent, a.controller, &a.operator) {
                (Some(id), _, _) => Identity::Agent(id.clone()),
                (_, true, _) => Identity::Controller,
                (_, _, Some(name)) => Identity::Operator(name.clone()),
                _ => bail!("say who the certificate is for: --agent ID, --controller or --operator NAME"),
            };
            let out = a.out_dir.clone().unwrap_or_else(|| a.dir.clone());
            let mut force = a.force;
            let mut reason = String::new();
            if let Some(days) = a.renew_before {
                if days >= a.days {
                    // Every run would find the new certificate due again.
                    bail!(
                        "--renew-before {days} must be fewer days than the validity, --days {}",
                        a.days
                    );
                }
                match why_renew(&a.dir, &out, &identity, &a.san, days) {
                    None => {
                        println!(
                            "kept certificate for {identity}: {} is good for more than {days} days",
                            out.join(format!("{}.pem", file_stem(&identity))).display()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(why) => {
                        force = true;
                        reason = format!(" ({why})");
                    }
                }
            }
            let (cert, key) = issue(&a.dir, &out, &identity, &a.san, a.days, force)?;
            println!(
                "issued certificate for {identity}{reason}\n  certificate: {}\n  private key: {}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// File stem of an identity's certificate: `agent-db01`, `controller`,
/// `operator-alice`.
pub fn file_stem(identity: &Identity) -> String {
    match identity {
        Identity::Agent(id) => format!("agent-{id}"),
        Identity::Controller => "controller".into(),
        Identity::Operator(name) => format!("operator-{name}"),
    }
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} already exists; pass --force to replace it", path.display());
    }
    // Write beside, then rename: a reader never sees half a PEM file, and a
    // daemon watching for renewal picks up the whole new file.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The names a certificate is issued for: those asked, or for a server
/// with none asked, the loopback names.
fn requested_names(identity: &Identity, sans: &[String]) -> Vec<String> {
    if sans.is_empty() && !matches!(identity, Identity::Operator(_)) {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        sans.to_vec()
    }
}

/// Why the certificate in `out_dir` for `identity` must be (re)issued, or
/// None when it is still good for more than `days`.
fn why_renew(ca_dir: &Path, out_dir: &Path, identity: &Identity, sans: &[String], days: i64) -> Option<String> {
    let stem = file_stem(identity);
    let cert_path = out_dir.join(format!("{stem}.pem"));
    let key_path = out_dir.join(format!("{stem}-key.pem"));
    let Ok(cert_der) = CertificateDer::from_pem_file(&cert_path) else {
        return Some(format!("no readable certificate at {}", cert_path.display()));
    };
    let Ok(key_pem) = std::fs::read_to_string(&key_path) else {
        return Some(format!("no readable key at {}", key_path.display()));
    };
    let Ok(key) = KeyPair::from_pem(&key_pem) else {
        return Some(format!("{} is not a private key", key_path.display()));
    };
    let Ok(ca_der) = CertificateDer::from_pem_file(ca_dir.join("ca.pem")) else {
        // `issue` names the missing CA.
        return Some("no CA certificate".into());
    };
    let (Ok((_, cert)), Ok((_, ca))) = (X509Certificate::from_der(&cert_der), X509Certificate::from_der(&ca_der))
    else {
        return Some(format!("{} cannot be parsed", cert_path.display()));
    };
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return Some("signed by another CA".into());
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Some("the key does not match the certificate".into());
    }
    let mut names = Vec::new();
    let mut holder = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => holder = Identity::from_uri(uri),
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if holder.as_ref() != Some(identity) {
        return Some("issued to another identity".into());
    }
    let normalise = |list: &[String]| {
        let mut list: Vec<String> = list
            .iter()
            .map(|n| {
                n.parse::<std::net::IpAddr>()
                    .map_or_else(|_| n.to_ascii_lowercase(), |ip| ip.to_string())
            })
            .collect();
        list.sort();
        list.dedup();
        list
    };
    if normalise(&names) != normalise(&requested_names(identity, sans)) {
        return Some(format!("its names {:?} differ from those asked", names));
    }
    let expires = cert.validity().not_after.to_datetime();
    let now = OffsetDateTime::now_utc();
    if expires - now <= Duration::days(days) {
        return Some(format!("it expires on {}, within {days} days", expires.date()));
    }
    None
}

pub fn init_ca(dir: &Path, name: &str, days: i64, force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "dicops");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    let cert = params.self_signed(&key)?;
    // The key first: a CA certificate without its key is useless.
    write_file(&dir.join("ca-key.pem"), &key.serialize_pem(), 0o600, force)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), 0o644, force)?;
    Ok(())
}

pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    identity: &Identity,
    sans: &[String],
    days: i64,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    match identity {
        Identity::Agent(name) | Identity::Operator(name) if !is_valid_id(name) => {
            bail!("{name:?} is not a valid name: use 1-64 letters, digits, '.', '-' or '_'")
        }
        _ => {}
    }
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca-key.pem");
    let ca_pem = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "cannot read the CA certificate {} (run `dicops pki init` first)",
            ca_cert_path.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("cannot read the CA key {}", ca_key_path.display()))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).with_context(|| format!("{} is not a private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{} is not a CA certificate", ca_cert_path.display()))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let common_name = match identity {
        Identity::Agent(id) => id.clone(),
        Identity::Controller => "dicops-controller".into(),
        Identity::Operator(name) => name.clone(),
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
    for name in requested_names(identity, sans) {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => params.subject_alt_names.push(SanType::DnsName(
                name.clone()
                    .try_into()
                    .with_context(|| format!("{name:?} is not a DNS name or IP address"))?,
            )),
        }
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let stem = file_stem(identity);
    let cert_path = out_dir.join(format!("{stem}.pem"));
    let key_path = out_dir.join(format!("{stem}-key.pem"));
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str) -> Identity {
        Identity::Agent(id.into())
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn renew_before_keeps_a_good_certificate_and_names_why_it_replaces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, out) = (dir.path().join("ca"), dir.path().join("out"));
        init_ca(&ca, "test CA", 3650, false).expect("init");
        let sans = names(&["db01.dc1.example.org", "10.0.0.5"]);

        let missing = why_renew(&ca, &out, &agent("db01"), &sans, 30).expect("nothing issued yet");
        assert!(missing.contains("no readable certificate"), "{missing}");

        issue(&ca, &out, &agent("db01"), &sans, 397, false).expect("issue");
        assert_eq!(why_renew(&ca, &out, &agent("db01"), &sans, 30), None);
        // Order, case and IP spelling do not make it differ.
        let same = names(&["10.0.0.5", "DB01.dc1.example.org"]);
        assert_eq!(why_renew(&ca, &out, &agent("db01"), &same, 30), None);

        let more = names(&["db01.dc1.example.org", "10.0.0.5", "db01.example.org"]);
        let reason = why_renew(&ca, &out, &agent("db01"), &more, 30).expect("a name was added");
        assert!(reason.contains("names"), "{reason}");

        // Due within the renewal window.
        let reason = why_renew(&ca, &out, &agent("db01"), &sans, 400).expect("expires within 400 days");
        assert!(reason.contains("expires on"), "{reason}");

        // Another holder's file under this name (copied by mistake).
        issue(&ca, &out, &agent("db02"), &sans, 397, false).expect("issue db02");
        std::fs::copy(out.join("agent-db02.pem"), out.join("agent-db01.pem")).expect("copy");
        std::fs::copy(out.join("agent-db02-key.pem"), out.join("agent-db01-key.pem")).expect("copy");
        let reason = why_renew(&ca, &out, &agent("db01"), &sans, 30).expect("another identity");
        assert!(reason.contains("another identity"), "{reason}");

        // A key that is not the certificate's.
        issue(&ca, &out, &agent("db01"), &sans, 397, true).expect("reissue");
        std::fs::copy(out.join("agent-db02-key.pem"), out.join("agent-db01-key.pem")).expect("copy");
        let reason = why_renew(&ca, &out, &agent("db01"), &sans, 30).expect("wrong key");
        assert!(reason.contains("key does not match"), "{reason}");

        // A new CA: every certificate of the old one is replaced.
        issue(&ca, &out, &agent("db01"), &sans, 397, true).expect("reissue");
        init_ca(&ca, "test CA", 3650, true).expect("new CA");
        let reason = why_renew(&ca, &out, &agent("db01"), &sans, 30).expect("old CA");
        assert!(reason.contains("another CA"), "{reason}");
    }

    #[test]
    fn a_server_certificate_asked_without_names_keeps_the_loopback_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), "test CA", 3650, false).expect("init");
        issue(dir.path(), dir.path(), &Identity::Controller, &[], 397, false).expect("issue");
        assert_eq!(why_renew(dir.path(), dir.path(), &Identity::Controller, &[], 30), None);
        let operator = Identity::Operator("alice".into());
        issue(dir.path(), dir.path(), &operator, &[], 397, false).expect("issue");
        assert_eq!(why_renew(dir.path(), dir.path(), &operator, &[], 30), None);
    }
}
