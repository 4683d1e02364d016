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
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

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
            let (cert, key) = issue(&a.dir, &out, &identity, &a.san, a.days, a.force)?;
            println!(
                "issued certificate for {identity}\n  certificate: {}\n  private key: {}",
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
    let mut names: Vec<String> = sans.to_vec();
    if serves && names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    }
    for name in names {
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
