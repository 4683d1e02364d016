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

const INVENTORY: &str = "sites: [{name: dc1}]\nagents: [{id: db01, site: dc1}]\n";

#[test]
fn backups_are_run_or_watch_with_a_freshness_objective() {
    let config = controller(&format!(
        "{INVENTORY}backups:\n  - {{name: pg, agent: db01, run: pg-dump, schedule: \"0 1 * * *\", max_age: 26h, retries: 1}}\n  - {{name: vault, agent: db01, watch: exports, max_age: 2d}}\n"
    ))
    .expect("valid");
    let pg = config.job("pg").expect("run backup is a job");
    assert_eq!(
        pg.kind,
        JobKind::Backup {
            command: "pg-dump".into(),
            max_age: Duration::from_secs(26 * 3600)
        }
    );
    assert_eq!(pg.policy.retries, 1);
    assert_eq!(
        config.watched_backups,
        [WatchBackup {
            name: "vault".into(),
            agent: "db01".into(),
            watch: "exports".into(),
            max_age: Duration::from_secs(2 * 86400)
        }]
    );
    assert_eq!(config.concurrent_backups_per_agent, 1);
}

#[test]
fn backup_mistakes_are_named_where_they_are() {
    let err = message(
        controller(&format!(
            "{INVENTORY}jobs:\n  - {{name: pg, agent: db01, command: x}}\nbackups:\n  - {{name: pg, agent: db01, run: pg-dump}}\n  - {{name: both, agent: db01, run: a, watch: b, max_age: 1h}}\n  - {{name: w, agent: db01, watch: b, max_age: 1h, schedule: \"@daily\"}}\n  - {{name: none, agent: db01, max_age: 1h}}\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("11:12: backups[0].name: duplicate job or backup name \"pg\" (first declared at jobs[0].name)"),
        "{err}"
    );
    assert!(err.contains("backup \"pg\" needs `max_age`"), "{err}");
    assert!(
        err.contains("backups[1].watch: backup \"both\" has both `run` and `watch`"),
        "{err}"
    );
    assert!(
        err.contains("backups[2].schedule: backup \"w\" watches backups made by another tool"),
        "{err}"
    );
    assert!(err.contains("backup \"none\" needs `run: COMMAND`"), "{err}");
}

#[test]
fn backup_commands_have_an_output_folder_a_floor_retention_and_a_user() {
    let base = "id: db01\ncontroller: {url: \"https://c:9443\"}\ntls: {ca: ca.pem, cert: cert.pem, key: key.pem}\n";
    let config = agent(&format!(
        "{base}timezone: Asia/Ho_Chi_Minh\ncommands:\n  pg-dump:\n    argv: [/usr/bin/pg_dump]\n    user: root\n    output: /var/backups/pg\n    min_free: 5%\n    retention: {{keep_last: 2, keep_daily: 7, wait_for_replication: false}}\nwatches:\n  exports: {{path: /srv/exports, glob: \"*.tar.zst\"}}\n"
    ))
    .expect("valid");
    let command = &config.commands["pg-dump"];
    assert_eq!(command.user.as_ref().map(|u| u.uid), Some(0));
    let output = command.output.as_ref().expect("output");
    assert_eq!(output.min_free, FreeSpace::Ratio(0.05));
    assert_eq!((output.retention.keep_last, output.retention.keep_daily), (2, 7));
    assert!(!output.wait_for_replication);
    assert_eq!(config.watches["exports"].glob, "*.tar.zst");
    assert_eq!(config.timezone, chrono_tz::Asia::Ho_Chi_Minh);

    let err = message(
        agent(&format!(
            "{base}commands:\n  a:\n    argv: [/bin/true]\n    user: no-such-user-dicops\n    min_free: 1GiB\n  b:\n    argv: [/bin/true]\n    output: relative/dir\n    min_free: 120%\n    env: {{DICOPS_RUN_ID: \"1\"}}\nwatches:\n  w: {{path: /srv, glob: \"a/b\"}}\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("7:11: commands.a.user: user \"no-such-user-dicops\" does not exist on this host"),
        "{err}"
    );
    assert!(
        err.contains("commands.a.min_free: `min_free` applies to a backup command's output folder"),
        "{err}"
    );
    assert!(
        err.contains("commands.b.output: \"relative/dir\" must be an absolute path"),
        "{err}"
    );
    assert!(
        err.contains("commands.b.min_free: \"120%\" is not a percentage"),
        "{err}"
    );
    assert!(
        err.contains("commands.b.env.DICOPS_RUN_ID: DICOPS_* variables are set by the agent"),
        "{err}"
    );
    assert!(err.contains("watches.w.glob:"), "{err}");
}

const TWO_SITES: &str = "sites: [{name: dc1}, {name: dc2}]\nagents: [{id: db01, site: dc1}, {id: app01, site: dc1}, {id: backup01, site: dc2}]\n";

#[test]
fn replications_copy_from_an_export_to_a_root_in_the_other_site() {
    let config = controller(&format!(
        "{TWO_SITES}replications:\n  - name: pg-to-dc2\n    source: {{agent: db01, export: pg}}\n    destination: {{agent: backup01, root: replicas}}\n    schedule: \"*/30 * * * *\"\n    max_lag: 2h\n    retention: {{keep_last: 3, keep_daily: 7}}\n    bandwidth: 50MiB/s\n    compression: none\n    stall_timeout: 2m\n"
    ))
    .expect("valid");
    let job = config.job("pg-to-dc2").expect("job");
    assert_eq!(job.agent, "backup01", "the destination pulls");
    let JobKind::Replication(spec) = &job.kind else {
        panic!("{job:?}")
    };
    assert_eq!(
        (spec.source_agent.as_str(), spec.export.as_str(), spec.root.as_str()),
        ("db01", "pg", "replicas")
    );
    assert_eq!(spec.max_lag, Some(Duration::from_secs(7200)));
    assert_eq!((spec.retention.keep_last, spec.retention.keep_daily), (3, 7));
    assert_eq!(spec.bandwidth, Some(50 << 20));
    assert_eq!(spec.compression, Compression::None);
    assert!(
        !spec.verify,
        "publishing verifies every file already; re-reading is an option"
    );
    assert_eq!(spec.stall_timeout, Duration::from_secs(120));

    let err = message(
        controller(&format!(
            "{TWO_SITES}replications:\n  - {{name: same-site, source: {{agent: db01, export: pg}}, destination: {{agent: app01, root: r}}}}\n  - {{name: nowhere, source: {{agent: db01, export: pg}}}}\n  - {{name: ghost, source: {{agent: db99, export: pg}}, destination: {{agent: backup01, root: r}}, compression: lz4}}\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("replications[0].destination.agent: \"same-site\" copies from db01 to app01, both in site dc1"),
        "{err}"
    );
    assert!(
        err.contains("replication \"nowhere\" needs `source: {agent, export}` and `destination: {agent, root}`"),
        "{err}"
    );
    assert!(
        err.contains("replications[2].source.agent: \"ghost\" names agent \"db99\""),
        "{err}"
    );
    assert!(
        err.contains("replications[2].compression: \"lz4\" is not `auto`, `zstd` or `none`"),
        "{err}"
    );
}

#[test]
fn agents_name_their_exports_roots_and_data_port() {
    let base = "id: db01\ncontroller: {url: \"https://c:9443\"}\ntls: {ca: ca.pem, cert: cert.pem, key: key.pem}\n";
    let config = agent(&format!(
        "{base}data: {{listen: \"0.0.0.0:9444\", url: \"https://db01.dc1.example.org:9444\"}}\nexports: {{pg: /var/backups/pg}}\nroots: {{replicas: /srv/replicas}}\n"
    ))
    .expect("valid");
    assert_eq!(config.data.as_ref().map(|d| d.listen.port()), Some(9444));
    assert_eq!(config.exports["pg"], PathBuf::from("/var/backups/pg"));
    assert_eq!(config.roots["replicas"], PathBuf::from("/srv/replicas"));

    let err = message(
        agent(&format!(
            "{base}exports: {{pg: /var/backups/pg}}\nroots: {{mine: /var/backups, rel: srv}}\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("exports: exported folders are served on the data port"),
        "{err}"
    );
    assert!(
        err.contains("roots.mine: root /var/backups overlaps export \"pg\""),
        "{err}"
    );
    assert!(err.contains("roots.rel: \"srv\" must be an absolute path"), "{err}");
}

#[test]
fn links_have_a_budget_with_time_windows() {
    let config = controller(&format!(
        "{TWO_SITES}links:\n  - sites: [dc1, dc2]\n    bandwidth: 100MiB/s\n    windows:\n      - {{days: mon-fri, from: \"08:00\", to: \"18:00\", bandwidth: 20MiB/s}}\n"
    ))
    .expect("valid");
    let link = config.link_between("dc2", "dc1").expect("either order");
    assert_eq!(link.rate, Some(100 << 20));
    assert_eq!(link.windows[0].rate, 20 << 20);
    assert_eq!((link.windows[0].from, link.windows[0].to), (480, 1080));

    let err = message(
        controller(&format!(
            "{TWO_SITES}links:\n  - sites: [dc1, dc9]\n  - sites: [dc1]\n  - sites: [dc1, dc2]\n    windows: [{{days: someday, from: \"8\", to: \"18:00\", bandwidth: 1MiB}}]\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("links[0].sites: site \"dc9\" is not declared in sites"),
        "{err}"
    );
    assert!(err.contains("links[1].sites: a link joins exactly two sites"), "{err}");
    assert!(
        err.contains("links[2].windows[0].days: \"someday\" is not a day"),
        "{err}"
    );
    assert!(
        err.contains("links[2].windows[0].from: \"8\" is not a time of day"),
        "{err}"
    );
}

#[test]
fn verifications_name_a_replication_and_run_at_its_destination() {
    let config = controller(&format!(
        "{TWO_SITES}replications:\n  - {{name: r, source: {{agent: db01, export: pg}}, destination: {{agent: backup01, root: x}}}}\nverifications:\n  - {{name: v, replication: r, sample: 10%, schedule: \"@weekly\"}}\n"
    ))
    .expect("valid");
    let v = config.job("v").expect("verify job");
    assert_eq!(v.agent, "backup01");
    assert_eq!(
        v.kind,
        JobKind::Verify {
            replication: "r".into(),
            sample_percent: 10,
            repair: true
        }
    );
    let err = message(
        controller(&format!(
            "{TWO_SITES}verifications:\n  - {{name: v, replication: nope, sample: 0%}}\n"
        ))
        .expect_err("invalid"),
    );
    assert!(
        err.contains("verifications[0].replication: \"nope\" is not a replication job"),
        "{err}"
    );
}
