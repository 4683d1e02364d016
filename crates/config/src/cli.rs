use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{decode, read, Checker, ConfigError, RawTls, TlsFiles};

/// How the `dicops` CLI reaches the controller: its URL and an operator
/// certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CliConfig {
    pub source: PathBuf,
    pub controller_url: String,
    pub tls: TlsFiles,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCli {
    controller: String,
    tls: RawTls,
}

impl CliConfig {
    pub fn load(path: &Path) -> Result<CliConfig, ConfigError> {
        let text = read(path)?;
        let raw: RawCli = decode(path, &text)?;
        let mut check = Checker::new(path, &text);
        check.https_url("controller", &raw.controller);
        let tls = check.tls(&raw.tls);
        check.finish(CliConfig {
            source: path.to_path_buf(),
            controller_url: raw.controller,
            tls,
        })
    }
}
