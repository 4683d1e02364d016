//! The Ansible roles in ansible/, run for real by the pinned ansible-core
//! and ansible-lint from PyPI (`scripts/ansible-venv` makes the virtual
//! environment; `./scripts/test` runs it first).
//!
//! The deployment test applies site.yml to this machine (connection local)
//! as four hosts, each installed under its own folder (`dicops_prefix`) with
//! systemd left alone (`dicops_systemd: false`): a controller, db01 in dc1
//! with a backup command and an export, backup01 in dc2 with a replication
//! root, and a Prometheus host. It runs twice (the second run must change
//! nothing), then starts the installed controller and agents as the
//! `dicops` user the play created, and the Debian Prometheus as its own
//! user with the installed config, and checks they report, back up,
//! replicate and scrape. Then it feeds bad inventories and checks that each
//! fails early, names the cause, and leaves the installed config alone.
//!
//! Needs root (it creates the `dicops` system user and root:dicops files)
//! and the Debian packages prometheus and systemd (systemd-analyze); fails,
//! never skips, without them.

mod harness;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use harness::prometheus::query;
use harness::{free_port, systemd, wait_until, Process};

/// The units' exposure budgets (packaging/systemd/README.md).
const CONTROLLER_BUDGET: f64 = 2.5;
const AGENT_BUDGET: f64 = 5.0;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The virtual environment's bin folder, made (or found up to date) once.
fn venv_bin() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new(workspace().join("scripts/ansible-venv"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/ansible-venv");
        assert!(
            out.status.success(),
            "scripts/ansible-venv could not make the Ansible virtual environment (needs python3 and PyPI)"
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin")
    })
}

/// Runs an Ansible program from the virtual environment in ansible/.
fn ansible(program: &str, args: &[&str], home: &Path) -> Output {
    let path = format!("{}:{}", venv_bin().display(), std::env::var("PATH").unwrap_or_default());
    Command::new(venv_bin().join(program))
        .args(args)
        .current_dir(workspace().join("ansible"))
        .env("PATH", path)
        .env("ANSIBLE_HOME", home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        // The test runs as root already; there is no sudo to become with.
        .env("ANSIBLE_BECOME", "false")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_example_inventory_passes_syntax_check_and_ansible_lint_production() {
    let home = tempfile::tempdir().expect("tempdir");
    let out = ansible("ansible-playbook", &["--syntax-check", "site.yml"], home.path());
    assert!(out.status.success(), "ansible-playbook --syntax-check:\n{}", text(&out));

    // The example inventory's groups: both sites under dicops_agents.
    let out = ansible("ansible-inventory", &["--graph", "dicops_agents"], home.path());
    let graph = text(&out);
    assert!(out.status.success(), "ansible-inventory:\n{graph}");
    for line in ["@dc1:", "db01.dc1.example.org", "@dc2:", "backup01.dc2.example.org"] {
        assert!(graph.contains(line), "{line} not in the example inventory:\n{graph}");
    }

    let out = ansible(
        "ansible-lint",
        &["--offline", "--nocolor", "--profile", "production"],
        home.path(),
    );
    let report = text(&out);
    assert!(
        out.status.success() && report.contains("Profile 'production' was required, and it passed"),
        "ansible-lint --profile production:\n{report}"
    );
}

/// One machine, four inventory hosts, each in its own folder.
struct Site {
    root: tempfile::TempDir,
    controller_port: u16,
    data_port: u16,
}

impl Site {
    fn new() -> Site {
        let root = tempfile::Builder::new()
            .prefix("dicops-ansible")
            .tempdir()
            .expect("tempdir");
        // The daemons run as `dicops` and Prometheus as `prometheus`: they
        // must be able to reach their files under it.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Site {
            root,
            controller_port: free_port(),
            data_port: free_port(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn prefix(&self, host: &str) -> String {
        self.path(host).display().to_string()
    }

    /// The inventory, with `overrides` (YAML lines) added to a host's vars.
    fn inventory(&self, overrides: &[(&str, &str)]) -> PathBuf {
        let extra = |host: &str| -> String {
            overrides
                .iter()
                .filter(|(h, _)| *h == host)
                .map(|(_, lines)| {
                    lines
                        .lines()
                        .map(|l| format!("              {l}\n"))
                        .collect::<String>()
                })
                .collect()
        };
        let bin = harness::bin("dicops");
        let binary_dir = bin.parent().expect("target dir");
        let yaml = format!(
            r#"all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
    dicops_systemd: false
    dicops_sites: [{{name: dc1, description: first site}}, {{name: dc2}}]
    dicops_timezone: UTC
    dicops_pki_ca_dir: {root}/control/pki
    dicops_pki_cli: {cli}
    dicops_binary_dir: {bins}
    dicops_source_dir: {source}
  children:
    dicops_agents:
      children:
        dc1:
          vars: {{dicops_site: dc1}}
          hosts:
            db01:
              dicops_prefix: {root}/db01
              dicops_address: 127.0.0.1
              dicops_agent_collect_interval: 1s
              dicops_agent_data_bind: 127.0.0.1
              dicops_agent_data_port: {data_port}
              dicops_agent_commands:
                dump:
                  argv: [/bin/sh, -c, 'echo "dump of run $DICOPS_RUN_ID" > "$DICOPS_OUTPUT_DIR/dump-$DICOPS_RUN_ID.sql"']
                  output: {root}/db01/var/backups/db
                  # An absolute floor: the default (1% of the filesystem)
                  # depends on how full the test machine's disk is.
                  min_free: 16MiB
                  timeout: 1m
              dicops_agent_exports: {{dumps: {root}/db01/var/backups/db}}
              dicops_agent_backups:
                - {{name: db01-dump, run: dump, max_age: 1h}}
{db01}        dc2:
          vars: {{dicops_site: dc2}}
          hosts:
            backup01:
              dicops_prefix: {root}/backup01
              dicops_address: 127.0.0.1
              dicops_agent_collect_interval: 1s
              dicops_agent_roots: {{replicas: {root}/backup01/srv/replicas}}
              # Never run here: it makes the role grant what `user:` needs.
              dicops_agent_commands:
                check-as-nobody: {{argv: [/bin/true], user: nobody, timeout: 1m}}
              dicops_agent_supplementary_groups: [nogroup]
{backup01}    dicops_controller:
      hosts:
        ctl:
          dicops_prefix: {root}/ctl
          dicops_address: 127.0.0.1
          dicops_controller_port: {controller_port}
          dicops_controller_report_interval: 1s
          dicops_controller_cli_operator: admin
          dicops_controller_replications:
            - name: db01-to-dc2
              source: {{agent: db01, export: dumps}}
              destination: {{agent: backup01, root: replicas}}
              max_lag: 1h
{ctl}    dicops_monitoring:
      hosts:
        mon:
          dicops_prefix: {root}/mon
          dicops_monitoring_scrape_interval: 1s
          dicops_monitoring_evaluation_interval: 1s
"#,
            root = self.root.path().display(),
            cli = bin.display(),
            bins = binary_dir.display(),
            source = workspace().display(),
            data_port = self.data_port,
            controller_port = self.controller_port,
            db01 = extra("db01"),
            backup01 = extra("backup01"),
            ctl = extra("ctl").replace("              ", "          "),
        );
        let path = self.path(&format!("inventory-{}.yml", overrides.len()));
        std::fs::write(&path, yaml).expect("write inventory");
        path
    }

    /// A play limited to `limit`, with one host's vars overridden, that
    /// must fail (`what` says why it should): its whole output.
    fn refused(&self, what: &str, override_vars: (&str, &str), limit: &str) -> String {
        let out = self.play(&self.inventory(&[override_vars]), &["--limit", limit]);
        let output = text(&out);
        assert!(!out.status.success(), "{what} must fail:\n{output}");
        output
    }

    fn play(&self, inventory: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["-i", inventory.to_str().expect("utf8"), "site.yml"];
        args.extend_from_slice(extra);
        ansible("ansible-playbook", &args, &self.path("ansible-home"))
    }

    /// Starts an installed binary as `user` (setpriv), as systemd would.
    fn start_as(&self, user: &str, program: &Path, args: &[&str], log: &str) -> Process {
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
                "--",
            ])
            .arg(program)
            .args(args);
        Process::spawn_logged(command, self.path(log))
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(self.path("ctl/usr/local/bin/dicops"))
            .args(args)
            .env("DICOPS_CLI_CONFIG", self.path("ctl/etc/dicops/cli.yaml"))
            .stdin(Stdio::null())
            .output()
            .expect("installed dicops")
    }
}

/// `changed=N` of every host in the play recap.
fn changed_per_host(output: &str) -> BTreeMap<String, u32> {
    let recap = output.split("PLAY RECAP").nth(1).unwrap_or("");
    recap
        .lines()
        .filter_map(|line| {
            let (host, counts) = line.split_once(" : ")?;
            let changed = counts
                .split_whitespace()
                .find_map(|c| c.strip_prefix("changed="))?
                .parse()
                .ok()?;
            Some((host.trim().to_string(), changed))
        })
        .collect()
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

/// `id -u NAME` or `id -g NAME`.
fn id_of(kind: &str, name: &str) -> u32 {
    let out = Command::new("id").arg(kind).arg(name).output().expect("id");
    assert!(out.status.success(), "no {name} on this machine");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("number")
}

fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the deployment test creates the dicops system user and root:dicops files: run it as root (CI does)"
    );
}

#[test]
fn the_playbook_deploys_both_sites_a_second_run_changes_nothing_and_the_installed_files_run() {
    require_root();
    let site = Site::new();
    let inventory = site.inventory(&[]);

    // First run: installs.
    let first = site.play(&inventory, &[]);
    let first_text = text(&first);
    assert!(first.status.success(), "first run failed:\n{first_text}");
    let changed = changed_per_host(&first_text);
    for host in ["ctl", "db01", "backup01", "mon"] {
        assert!(
            changed.get(host).copied().unwrap_or(0) > 0,
            "the first run changed nothing on {host}: {changed:?}\n{first_text}"
        );
    }

    // Second run: idempotent.
    let second = site.play(&inventory, &["--diff"]);
    let second_text = text(&second);
    assert!(second.status.success(), "second run failed:\n{second_text}");
    let changed = changed_per_host(&second_text);
    assert_eq!(changed.len(), 4, "recap of every host expected:\n{second_text}");
    assert!(
        changed.values().all(|c| *c == 0),
        "the second run changed something: {changed:?}\n{second_text}"
    );

    // What was installed, with the permissions the design asks for.
    let dicops_gid = id_of("-g", "dicops");
    let dicops_uid = id_of("-u", "dicops");
    for (path, mode, uid, gid) in [
        ("ctl/etc/dicops", 0o750, 0, dicops_gid),
        ("ctl/etc/dicops/controller.yaml", 0o640, 0, dicops_gid),
        ("ctl/etc/dicops/pki/controller-key.pem", 0o640, 0, dicops_gid),
        ("ctl/etc/dicops/cli/operator-admin-key.pem", 0o640, 0, 0),
        ("ctl/etc/dicops/cli.yaml", 0o600, 0, 0),
        ("ctl/var/lib/dicops", 0o700, dicops_uid, dicops_gid),
        ("ctl/usr/local/bin/dicops-controller", 0o755, 0, 0),
        ("db01/etc/dicops/agent.yaml", 0o640, 0, dicops_gid),
        ("db01/etc/dicops/pki/agent-db01-key.pem", 0o640, 0, dicops_gid),
        ("db01/var/lib/dicops/agent", 0o700, dicops_uid, dicops_gid),
        ("db01/var/backups/db", 0o770, dicops_uid, dicops_gid),
        ("backup01/srv/replicas", 0o770, dicops_uid, dicops_gid),
    ] {
        assert_eq!(
            mode_owner(&site.path(path)),
            (mode, uid, gid),
            "{path}: (mode, uid, gid)"
        );
    }
    assert!(
        !site.path("db01/etc/dicops/pki/ca-key.pem").exists(),
        "the CA key must stay on the control node"
    );

    // The generated configs pass check-config with the installed CLI.
    let check = Command::new(site.path("ctl/usr/local/bin/dicops"))
        .arg("check-config")
        .args([
            site.path("ctl/etc/dicops/controller.yaml"),
            site.path("db01/etc/dicops/agent.yaml"),
            site.path("backup01/etc/dicops/agent.yaml"),
            site.path("ctl/etc/dicops/cli.yaml"),
        ])
        .output()
        .expect("check-config");
    let report = text(&check);
    assert!(check.status.success(), "check-config:\n{report}");
    assert!(
        report.contains("controller: 2 sites, 2 agents, 0 jobs, 1 backups (1 run, 0 watched), 1 replications"),
        "the controller's inventory comes from the Ansible inventory:\n{report}"
    );

    // The installed units, with the drop-ins the roles wrote, verify and
    // stay within their exposure budgets.
    for (host, unit, budget, drop_ins) in [
        (
            "ctl",
            "dicops-controller.service",
            CONTROLLER_BUDGET,
            &["exec.conf"][..],
        ),
        (
            "db01",
            "dicops-agent.service",
            AGENT_BUDGET,
            &["exec.conf", "paths.conf"][..],
        ),
        (
            "backup01",
            "dicops-agent.service",
            AGENT_BUDGET,
            &["exec.conf", "paths.conf", "user-commands.conf", "groups.conf"][..],
        ),
    ] {
        let dir = site.path(&format!("{host}/etc/systemd/system"));
        for name in drop_ins {
            assert!(
                dir.join(format!("{unit}.d/{name}")).is_file(),
                "{host}: {unit}.d/{name} missing"
            );
        }
        systemd::verify(unit, &dir, &dir.join(unit));
        let score = systemd::exposure(unit, &dir, &dir.join(unit));
        eprintln!("{host}: {unit} with {drop_ins:?}: exposure {score}");
        assert!(score <= budget, "{host}: {unit} exposure {score} above {budget}");
    }
    let paths = std::fs::read_to_string(site.path("backup01/etc/systemd/system/dicops-agent.service.d/paths.conf"))
        .expect("paths.conf");
    assert!(
        paths.contains(&format!(
            "ReadWritePaths={}",
            site.path("backup01/srv/replicas").display()
        )),
        "the replication root must be writable in the sandbox:\n{paths}"
    );

    // Start what was installed, as the users the units name.
    let controller = site.start_as(
        "dicops",
        &site.path("ctl/usr/local/bin/dicops-controller"),
        &[
            "--config",
            &format!("{}/etc/dicops/controller.yaml", site.prefix("ctl")),
        ],
        "controller.log",
    );
    let mut agents: Vec<Process> = ["db01", "backup01"]
        .iter()
        .map(|host| {
            site.start_as(
                "dicops",
                &site.path(&format!("{host}/usr/local/bin/dicops-agent")),
                &["--config", &format!("{}/etc/dicops/agent.yaml", site.prefix(host))],
                &format!("{host}.log"),
            )
        })
        .collect();
    wait_until(Duration::from_secs(30), "both agents up in `dicops status`", || {
        let out = site.cli(&["status", "--json"]);
        let status: dicops_proto::StatusResponse = serde_json::from_slice(&out.stdout).ok()?;
        let up: Vec<&str> = status
            .sites
            .iter()
            .flat_map(|s| s.agents.iter())
            .filter(|a| a.up)
            .map(|a| a.id.as_str())
            .collect();
        (up.len() == 2).then_some(())
    });

    // The backup command from the inventory runs as dicops and writes where
    // the role made room; the replication lands in the other site's root.
    let run = site.cli(&["run", "db01-dump", "--follow"]);
    assert!(
        run.status.success(),
        "backup run:\n{}\ncontroller log:\n{}",
        text(&run),
        controller.log_text()
    );
    let dumps: Vec<PathBuf> = std::fs::read_dir(site.path("db01/var/backups/db"))
        .expect("output folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dumps.len(), 1, "one dump expected: {dumps:?}");
    let replicate = site.cli(&["run", "db01-to-dc2", "--follow"]);
    assert!(replicate.status.success(), "replication run:\n{}", text(&replicate));
    let name = dumps[0].file_name().expect("name");
    let replica = site.path("backup01/srv/replicas/db01-to-dc2/latest").join(name);
    assert_eq!(
        std::fs::read(&replica).unwrap_or_else(|e| panic!("{}: {e}", replica.display())),
        std::fs::read(&dumps[0]).expect("dump"),
        "the replica must be byte-identical to the dump"
    );

    // The Debian Prometheus, as its own user, with the installed config:
    // it reads its key through the prometheus group and scrapes the
    // controller over mutual TLS.
    let prom_port = free_port();
    let data = site.path("prometheus-data");
    std::fs::create_dir(&data).expect("mkdir");
    let status = Command::new("chown")
        .args(["prometheus:", data.to_str().expect("utf8")])
        .status()
        .expect("chown");
    assert!(
        status.success(),
        "chown prometheus (is Debian's prometheus package installed?)"
    );
    let prometheus = site.start_as(
        "prometheus",
        Path::new("/usr/bin/prometheus"),
        &[
            &format!("--config.file={}/etc/prometheus/prometheus.yml", site.prefix("mon")),
            &format!("--storage.tsdb.path={}", data.display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        "prometheus.log",
    );
    wait_until(
        Duration::from_secs(60),
        "Prometheus scraping both agents' state",
        || {
            query(prom_port, "dicops_agent_up{job=\"dicops-controller\"} == 1")
                .ok()
                .filter(|r| r.len() == 2)
        },
    );
    let (_, rules) = harness::prometheus::http_get(prom_port, "/api/v1/rules").expect("rules");
    assert!(
        rules.contains("\"name\":\"AgentDown\""),
        "the installed rules must be loaded:\n{rules}\n{}",
        prometheus.log_text()
    );

    // Bad inventories fail early, name the cause and change nothing.
    let config_before = std::fs::read(site.path("ctl/etc/dicops/controller.yaml")).expect("config");
    let out = site.refused(
        "a port that is not a number",
        ("db01", "dicops_agent_data_port: not-a-port"),
        "db01",
    );
    assert!(
        out.contains("dicops_agent_data_port") && out.contains("int"),
        "argument_specs must name the variable and its type:\n{out}"
    );

    let out = site.refused(
        "an agent in an unknown site",
        ("backup01", "dicops_site: dc3"),
        "ctl,backup01",
    );
    assert!(
        out.contains("backup01") && out.contains("dicops_site") && out.contains("dc1, dc2"),
        "the error must name the host, the variable and the sites:\n{out}"
    );

    let out = site.refused(
        "a bad schedule",
        (
            "db01",
            "dicops_agent_jobs: [{name: db01-nightly, command: dump, schedule: \"61 * * * *\"}]",
        ),
        "ctl",
    );
    assert!(
        out.contains("failed to validate") && out.contains("schedule"),
        "dicops-controller --check must refuse the generated config and say why:\n{out}"
    );
    assert_eq!(
        std::fs::read(site.path("ctl/etc/dicops/controller.yaml")).expect("config"),
        config_before,
        "a refused config must leave the installed one alone"
    );
    // And the controller kept serving throughout.
    let out = site.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "the controller must keep serving:\n{}",
        text(&out)
    );

    for agent in &mut agents {
        agent.kill9();
    }
    drop(controller);
    drop(prometheus);
}
