//! The CLI's client of the controller API, with an operator certificate.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use dicops_config::CliConfig;
use dicops_net::{HttpsClient, TlsFiles, TlsReloader};
use dicops_proto::{ApiError, Identity};
use hyper::Method;
use serde::de::DeserializeOwned;

pub struct Api {
    client: HttpsClient,
}

impl Api {
    pub fn new(config: &CliConfig) -> anyhow::Result<Api> {
        let tls = TlsReloader::load(TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        })
        .with_context(|| format!("{}", config.source.display()))?;
        let mut client = HttpsClient::new(&config.controller_url, Identity::Controller, tls)?;
        client.request_timeout = Duration::from_secs(30);
        Ok(Api { client })
    }

    /// Loads the CLI config, printing its errors (exit status 2 is the caller's).
    pub fn from_file(path: &Path) -> Result<Api, anyhow::Error> {
        match CliConfig::load(path) {
            Ok(config) => Api::new(&config),
            Err(e) => Err(anyhow::Error::new(ConfigInvalid(e.to_string()))),
        }
    }

    pub async fn call<T: DeserializeOwned>(&mut self, method: Method, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.client.request(method, path, None).await?;
        if !status.is_success() {
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => bail!("{} ({}): {}", status, e.reason, e.error),
                Err(_) => bail!("the controller answered {status}"),
            }
        }
        serde_json::from_slice(&body).with_context(|| format!("unexpected answer from {path}"))
    }

    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path).await
    }

    pub async fn post<T: DeserializeOwned>(&mut self, path: &str) -> anyhow::Result<T> {
        self.call(Method::POST, path).await
    }
}

/// A CLI config that does not validate: reported as is, exit status 2.
#[derive(Debug)]
pub struct ConfigInvalid(pub String);

impl std::fmt::Display for ConfigInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigInvalid {}
