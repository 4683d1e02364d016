use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// A folder with a config file and the three PEM files it names (their
/// content does not matter to this crate; the TLS crate checks it).
fn setup(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::write(dir.path().join(f), "x").expect("write pem");
    }
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).expect("write config");
    (dir, path)
}

const TLS: &str = "tls:\n  ca: ca.pem\n  cert: cert.pem\n  key: key.pem\n";

fn controller(body: &str) -> Result<ControllerConfig, ConfigError> {
    let text = format!("listen: 127.0.0.1:9443\n{TLS}{body}");
    let (_dir, path) = setup(&text);
    ControllerConfig::load(&path)
}

fn agent(body: &str) -> Result<AgentConfig, ConfigError> {
    let (_dir, path) = setup(body);
    AgentConfig::load(&path)
}

fn message(err: ConfigError) -> String {
    let file = err.file.clone();
    err.to_string().replace(&file.display().to_string(), "FILE")
}

#[test]
fn minimal_controller_has_defaults() {
    let config =
        controller("sites:\n  - name: dc1\n  - name: dc2\nagents:\n  - {id: db01, site: dc1}\n").expect("valid");
    assert_eq!(config.report_interval, Duration::from_secs(15));
    assert_eq!(config.down_after_missed_reports, 3);
    assert_eq!(config.max_request_bytes, 1 << 20);
    assert_eq!(config.site_of("db01"), Some("dc1"));
    // Relative TLS paths are relative to the config file.
    assert!(config.tls.ca.is_absolute() || config.tls.ca.starts_with(std::env::temp_dir()));
    assert!(config.tls.ca.ends_with("ca.pem"));
}

#[test]
fn syntax_errors_name_line_and_column() {
    let err = controller("sites:\n  - name: dc1\n   bad: [\n").unwrap_err();
    let text = message(err);
    assert!(text.starts_with("FILE:8:"), "{text}");
}

#[test]
fn unknown_fields_are_refused_with_position() {
    let err = controller("sites:\n  - name: dc1\n    colour: blue\n").unwrap_err();
    let text = message(err);
    assert!(text.starts_with("FILE:8:5: "), "{text}");
    assert!(text.contains("unknown field `colour`"), "{text}");
}

#[test]
fn wrong_types_are_refused_with_position() {
    let err = controller("health:\n  down_after_missed_reports: many\nsites: []\n").unwrap_err();
    let text = message(err);
    assert!(text.starts_with("FILE:7:30: "), "{text}");
    assert!(text.contains("invalid type"), "{text}");
}

#[test]
fn semantic_errors_are_all_reported_with_path_and_position() {
    let err = controller("sites:\n  - name: dc1\nagents:\n  - id: db01\n    site: dc1\n  - id: db01\n    site: dc3\n")
        .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    let text = message(err);
    assert!(
        text.contains("FILE:11:9: agents[1].id: duplicate agent id \"db01\" (first declared at agents[0])"),
        "{text}"
    );
    assert!(
        text.contains("FILE:12:11: agents[1].site: agent \"db01\" is in site \"dc3\", which is not declared in sites (declared: dc1)"),
        "{text}"
    );
}

#[test]
fn missing_certificate_file_is_named() {
    let text = "listen: 127.0.0.1:9443\ntls:\n  ca: ca.pem\n  cert: nope.pem\n  key: key.pem\nsites: [{name: dc1}]\n";
    let (dir, path) = setup(text);
    let err = ControllerConfig::load(&path).unwrap_err();
    let text = message(err);
    let missing = dir.path().join("nope.pem");
    assert!(
        text.contains(&format!(
            "FILE:4:9: tls.cert: file {} does not exist",
            missing.display()
        )),
        "{text}"
    );
}

#[test]
fn bad_values_are_explained() {
    let err =
        controller("health:\n  report_interval: 15\nlimits:\n  max_request_bytes: 0\nsites: [{name: \"dc 1\"}]\n")
            .unwrap_err();
    let text = message(err);
    assert!(
        text.contains("health.report_interval: duration \"15\" needs a unit"),
        "{text}"
    );
    assert!(
        text.contains("limits.max_request_bytes: must be greater than zero"),
        "{text}"
    );
    assert!(
        text.contains("sites[0].name: site name \"dc 1\" is not valid"),
        "{text}"
    );
}

#[test]
fn agent_config() {
    let config = agent(&format!(
        "id: db01\ncontroller:\n  url: https://ctl.example:9443\n{TLS}collect:\n  interval: 5s\n  services: [postgresql]\n  paths: [/srv/backup]\n"
    ))
    .expect("valid");
    assert_eq!(config.collect.interval, Duration::from_secs(5));
    assert_eq!(config.collect.paths, vec![Path::new("/srv/backup").to_path_buf()]);
    assert_eq!(config.collect.path_timeout, Duration::from_secs(5));

    let err = agent(&format!(
        "id: db01\ncontroller:\n  url: http://ctl.example\n{TLS}collect:\n  paths: [relative/dir]\n  services: [\"rm -rf\"]\n"
    ))
    .unwrap_err();
    let text = message(err);
    assert!(
        text.contains("FILE:3:8: controller.url: \"http://ctl.example\" must start with https://"),
        "{text}"
    );
    assert!(
        text.contains("collect.paths[0]: \"relative/dir\" must be an absolute path"),
        "{text}"
    );
    assert!(
        text.contains("collect.services[0]: \"rm -rf\" is not a systemd unit name"),
        "{text}"
    );
}

#[test]
fn kinds_are_told_apart() {
    let (_d, p) = setup("sites: []\n");
    assert_eq!(detect_kind(&p), Ok(ConfigKind::Controller));
    let (_d, p) = setup("id: db01\n");
    assert_eq!(detect_kind(&p), Ok(ConfigKind::Agent));
    let (_d, p) = setup("controller: https://x:1\n");
    assert_eq!(detect_kind(&p), Ok(ConfigKind::Cli));
    let (_d, p) = setup("hello: world\n");
    assert!(detect_kind(&p).is_err());
}
