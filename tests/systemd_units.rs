//! The systemd units in packaging/systemd, checked with systemd's own tools:
//! `systemd-analyze verify` accepts them (and the drop-ins README.md
//! documents) without a warning, with ExecStart pointing at the binaries
//! this build made; `systemd-analyze security --offline=yes` scores them
//! within budget; the hardening directives are all there, so an edit cannot
//! drop one silently; and the controller's reload checks the config, then
//! sends SIGHUP, never restarts.
//!
//! Needs `systemd-analyze` (Debian package `systemd`); PID 1 need not be
//! systemd. Without it these tests fail, they do not skip.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use harness::{run_ok, systemd, Pki};

/// Exposure budgets, on systemd-analyze's 0 (locked down) to 10 scale.
const CONTROLLER_BUDGET: f64 = 2.5;
/// The agent runs backup commands and may be granted capabilities to run
/// them as other users (README.md): its budget holds with those drop-ins.
const AGENT_BUDGET: f64 = 5.0;

/// Where the units expect the binaries (the Ansible role installs them there).
const INSTALL_DIR: &str = "/usr/local/bin";

struct Unit {
    name: &'static str,
    binary: &'static str,
    built: &'static str,
    budget: f64,
    state_directory: &'static str,
    protect_home: &'static str,
}

const UNITS: [Unit; 2] = [
    Unit {
        name: "dicops-controller.service",
        binary: "dicops-controller",
        built: env!("CARGO_BIN_EXE_dicops-controller"),
        budget: CONTROLLER_BUDGET,
        state_directory: "dicops",
        protect_home: "yes",
    },
    Unit {
        name: "dicops-agent.service",
        binary: "dicops-agent",
        built: env!("CARGO_BIN_EXE_dicops-agent"),
        budget: AGENT_BUDGET,
        state_directory: "dicops/agent",
        // Home directories stay readable for exports and commands, and a
        // real /home filesystem keeps being measured (README.md).
        protect_home: "read-only",
    },
];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn units_dir() -> PathBuf {
    workspace().join("packaging/systemd")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `systemd-analyze ARGS`, run in `dir`; a clear failure when it is missing.
/// Key/value lines of a unit file per section, comments and blank lines
/// left out, in file order.
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "continuation lines make these checks blind: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a key=value line: {line}"));
        out.push((section.clone(), key.trim().to_string(), value.trim().to_string()));
    }
    out
}

fn values<'a>(directives: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    directives
        .iter()
        .filter(|(section, k, _)| section == "Service" && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// The program an Exec*= line runs, without systemd's prefixes (-@:+!|).
fn program(exec: &str) -> &str {
    exec.trim_start_matches(['-', '@', ':', '+', '!', '|'])
        .split_whitespace()
        .next()
        .unwrap_or("")
}

/// The drop-ins README.md documents for `unit`: fenced blocks whose first
/// line is `# /etc/systemd/system/UNIT.d/NAME.conf`. Returns (NAME.conf, text).
fn documented_drop_ins(unit: &str) -> Vec<(String, String)> {
    let readme = read(&units_dir().join("README.md"));
    let marker = format!("# /etc/systemd/system/{unit}.d/");
    let mut found = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("```") {
            continue;
        }
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.trim_start().starts_with("```"))
            .collect();
        if let Some(name) = block.first().and_then(|first| first.strip_prefix(&marker)) {
            found.push((name.trim().to_string(), block[1..].join("\n") + "\n"));
        }
    }
    found
}

/// A copy of `unit` in a temporary folder with the installed binary paths
/// replaced by the ones this build made, and `drop_ins` in UNIT.d/ beside it.
fn staged(unit: &Unit, drop_ins: &[(String, String)]) -> (tempfile::TempDir, PathBuf) {
    let text = read(&units_dir().join(unit.name));
    let installed = format!("{INSTALL_DIR}/{}", unit.binary);
    assert!(
        text.contains(&format!("ExecStart={installed} ")),
        "{}: ExecStart must run {installed}",
        unit.name
    );
    assert!(
        !unit.built.contains(char::is_whitespace),
        "the build path {} has whitespace; unit lines would need quoting",
        unit.built
    );
    let dir = tempfile::Builder::new()
        .prefix("dicops-units")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join(unit.name);
    std::fs::write(&path, text.replace(&installed, unit.built)).expect("write unit");
    if !drop_ins.is_empty() {
        let d = dir.path().join(format!("{}.d", unit.name));
        std::fs::create_dir(&d).expect("mkdir drop-in dir");
        for (name, body) in drop_ins {
            std::fs::write(d.join(name), body).expect("write drop-in");
        }
    }
    (dir, path)
}

#[test]
fn units_pass_systemd_analyze_verify_with_the_built_binaries() {
    for unit in &UNITS {
        let (dir, path) = staged(unit, &[]);
        systemd::verify(unit.name, dir.path(), &path);
        // verify looks at ExecStart only: every Exec*= program must exist too.
        for (section, key, value) in directives(&read(&path)) {
            if section == "Service" && key.starts_with("Exec") {
                let program = Path::new(program(&value));
                assert!(
                    program.is_absolute(),
                    "{}: {key}={value}: not an absolute path",
                    unit.name
                );
                let meta = std::fs::metadata(program)
                    .unwrap_or_else(|e| panic!("{}: {key}={value}: {}: {e}", unit.name, program.display()));
                assert!(
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
                    "{}: {key}={value}: {} is not executable",
                    unit.name,
                    program.display()
                );
            }
        }
    }
}

/// `score` (of `unit`, `with` naming what was added to it) is within the
/// unit's budget.
fn assert_within_budget(unit: &Unit, with: &str, score: f64) {
    eprintln!("{}{with}: exposure {score}", unit.name);
    assert!(
        score <= unit.budget,
        "{}{with}: systemd-analyze security --offline=yes scores {score}, over the budget of {}",
        unit.name,
        unit.budget
    );
}

#[test]
fn units_are_within_their_exposure_budget() {
    for unit in &UNITS {
        let (dir, path) = staged(unit, &[]);
        assert_within_budget(unit, "", systemd::exposure(unit.name, dir.path(), &path));
    }
}

#[test]
fn documented_drop_ins_verify_and_stay_within_budget() {
    for unit in &UNITS {
        let drop_ins = documented_drop_ins(unit.name);
        assert!(
            !drop_ins.is_empty(),
            "packaging/systemd/README.md documents no drop-in for {}",
            unit.name
        );
        // All of them at once: the most a deployment grants.
        let (dir, path) = staged(unit, &drop_ins);
        systemd::verify(unit.name, dir.path(), &path);
        let names: Vec<&str> = drop_ins.iter().map(|(n, _)| n.as_str()).collect();
        assert_within_budget(
            unit,
            &format!(" with the drop-ins {names:?}"),
            systemd::exposure(unit.name, dir.path(), &path),
        );
    }
    let agent = documented_drop_ins("dicops-agent.service");
    assert!(
        agent
            .iter()
            .any(|(name, body)| name == "paths.conf" && body.contains("ReadWritePaths=")),
        "README.md must show the paths.conf drop-in (ReadWritePaths=) that the agent unit refers to"
    );
}

#[test]
fn units_name_every_hardening_directive() {
    let common: &[(&str, &str)] = &[
        ("User", "dicops"),
        ("Group", "dicops"),
        ("Restart", "on-failure"),
        ("UMask", "0077"),
        ("ConfigurationDirectory", "dicops"),
        ("StateDirectoryMode", "0700"),
        ("NoNewPrivileges", "yes"),
        // Empty: no capability at all; drop-ins add what a site needs.
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("PrivateMounts", "yes"),
        ("PrivateDevices", "yes"),
        ("DevicePolicy", "closed"),
        ("PrivateIPC", "yes"),
        ("RemoveIPC", "yes"),
        ("ProtectProc", "invisible"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallErrorNumber", "EPERM"),
    ];
    for unit in &UNITS {
        let d = directives(&read(&units_dir().join(unit.name)));
        let mut expected: Vec<(&str, &str)> = common.to_vec();
        expected.push(("StateDirectory", unit.state_directory));
        expected.push(("ProtectHome", unit.protect_home));
        for (key, value) in expected {
            assert_eq!(
                values(&d, key),
                [value],
                "{}: expected exactly one {key}={value}",
                unit.name
            );
        }
        let filters = values(&d, "SystemCallFilter");
        assert_eq!(
            filters.first(),
            Some(&"@system-service"),
            "{}: SystemCallFilter= must start from the @system-service allow list",
            unit.name
        );
        assert!(
            filters.iter().any(|f| f.starts_with('~') && f.contains("@privileged")),
            "{}: SystemCallFilter= must take @privileged away",
            unit.name
        );
        // Nothing that would undo the sandbox.
        for key in [
            "PrivateNetwork",
            "DynamicUser",
            "Delegate",
            "KillMode",
            "PermissionsStartOnly",
        ] {
            assert!(values(&d, key).is_empty(), "{}: unexpected {key}=", unit.name);
        }
        let types = values(&d, "Type");
        assert!(
            types == ["exec"] || types == ["simple"],
            "{}: the daemons do not speak sd_notify; Type= must be exec or simple, not {types:?}",
            unit.name
        );
    }
    let controller = directives(&read(&units_dir().join("dicops-controller.service")));
    assert_eq!(values(&controller, "PrivateUsers"), ["yes"]);
    assert!(
        values(&controller, "SystemCallFilter")
            .iter()
            .any(|f| f.starts_with('~') && f.contains("@resources")),
        "the controller needs no @resources system call"
    );
    let nofile: u64 = values(&controller, "LimitNOFILE")
        .first()
        .and_then(|v| v.parse().ok())
        .expect("the controller unit sets LimitNOFILE to a number");
    assert!(
        nofile >= 65536,
        "LimitNOFILE={nofile}: one connection per agent needs more"
    );
}

/// The units give no privilege to bind ports: the example configs listen
/// above 1024, and keep their state under the units' StateDirectory=.
#[test]
fn example_configs_fit_the_units() {
    let yaml = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&read(&workspace().join("config").join(name))).expect("example YAML")
    };
    let port = |listen: &serde_yaml::Value| -> u16 {
        let text = listen.as_str().expect("listen is a string");
        text.parse::<std::net::SocketAddr>().expect("address:port").port()
    };
    let controller = yaml("controller.yaml");
    assert!(port(&controller["listen"]) >= 1024);
    let database = controller["state"]["database"].as_str().expect("state.database");
    assert!(
        Path::new(database).parent() == Some(Path::new("/var/lib/dicops")),
        "state.database {database} is outside the controller's StateDirectory=dicops"
    );
    for agent in ["agent-db01.yaml", "agent-backup01.yaml"] {
        let agent = yaml(agent);
        if !agent["data"].is_null() {
            assert!(port(&agent["data"]["listen"]) >= 1024);
        }
        // Missing: the default, /var/lib/dicops/agent.
        let state_dir = agent["state_dir"].as_str().unwrap_or("/var/lib/dicops/agent");
        assert_eq!(
            state_dir, "/var/lib/dicops/agent",
            "the agent's StateDirectory=dicops/agent"
        );
    }
}

/// `systemctl reload dicops-controller` checks the file first and fails on
/// a bad one, so only a good config ever gets SIGHUP; it never restarts.
#[test]
fn controller_reload_checks_then_sends_sighup() {
    let controller = &UNITS[0];
    let d = directives(&read(&units_dir().join(controller.name)));
    let reload = values(&d, "ExecReload");
    assert_eq!(reload.len(), 2, "ExecReload: the check, then the signal: {reload:?}");
    assert_eq!(reload[1], "/bin/kill -HUP $MAINPID", "the last ExecReload sends SIGHUP");
    let check = reload[0];
    let installed = format!("{INSTALL_DIR}/{} ", controller.binary);
    assert!(check.starts_with(&installed), "the check runs {installed}: {check}");
    assert!(
        !check.starts_with('-'),
        "a failed check must fail the reload (no '-' prefix): {check}"
    );
    for line in &reload {
        let lower = line.to_lowercase();
        for word in ["restart", "systemctl", "-term", "-kill", "-9"] {
            assert!(!lower.contains(word), "ExecReload must not stop or restart: {line}");
        }
    }
    let start = values(&d, "ExecStart");
    assert_eq!(start.len(), 1);
    assert_eq!(
        format!("{} --check", start[0]),
        check,
        "the check reads the same config as ExecStart"
    );

    // Run the check as systemd would: a good config passes, a bad one fails.
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path());
    pki.issue(&["--controller"]);
    let example =
        read(&workspace().join("config/controller.yaml")).replace("/etc/dicops/pki", pki.dir.to_str().expect("utf8"));
    let good = tmp.path().join("good.yaml");
    std::fs::write(&good, &example).expect("write");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, example.replace("listen: 0.0.0.0:9443", "listen: 0.0.0.0:99999")).expect("write");
    let run = |config: &Path| -> Output {
        let line = check
            .replace(&format!("{INSTALL_DIR}/{}", controller.binary), controller.built)
            .replace("/etc/dicops/controller.yaml", config.to_str().expect("utf8"));
        let mut words = line.split_whitespace();
        Command::new(words.next().expect("program"))
            .args(words)
            .stdin(Stdio::null())
            .output()
            .expect("run the ExecReload check")
    };
    let out = run(&good);
    assert!(
        out.status.success(),
        "the reload check refuses the example config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad config must fail the reload: {stderr}"
    );
    assert!(stderr.contains("bad.yaml"), "the refusal names the file: {stderr}");

    // The agent re-reads nothing on SIGHUP (it would stop): no ExecReload.
    let agent = directives(&read(&units_dir().join("dicops-agent.service")));
    assert!(values(&agent, "ExecReload").is_empty(), "dicops-agent has no reload");
}

/// The Debian package (packaging/deb/build-deb) of the binaries this build
/// made: its units are the ones above with /usr/bin paths, and they verify
/// and score the same; its binaries run; every file is root's.
#[test]
fn the_debian_package_ships_the_binaries_and_units_that_verify() {
    let out = tempfile::tempdir().expect("tempdir");
    let bin_dir = Path::new(UNITS[0].built).parent().expect("target dir");
    let build = run_ok(
        Command::new(workspace().join("packaging/deb/build-deb"))
            .args(["--bin-dir", bin_dir.to_str().expect("utf8")])
            .args(["--out-dir", out.path().to_str().expect("utf8")])
            .stdin(Stdio::null()),
        "build-deb must build the package",
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&build.stdout).trim());
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.is_file()
            && deb
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("dicops_{version}-1_"))),
        "build-deb must print the path of dicops_{version}-1_ARCH.deb, printed {deb:?}"
    );
    let dpkg_deb = |args: &[&str]| -> String {
        let out = run_ok(Command::new("dpkg-deb").args(args), "dpkg-deb reads the package");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deb_str = deb.to_str().expect("utf8");
    let fields = dpkg_deb(&["--field", deb_str, "Package", "Version", "Depends"]);
    assert!(
        fields.contains("Package: dicops\n") && fields.contains(&format!("Version: {version}-1\n")),
        "{fields}"
    );
    assert!(
        fields.contains("libc6") && fields.contains("procps"),
        "Depends: {fields}"
    );
    for line in dpkg_deb(&["--contents", deb_str]).lines() {
        assert!(line.contains(" root/root "), "every file must be root's: {line}");
    }

    let root = tempfile::tempdir().expect("tempdir");
    dpkg_deb(&["-x", deb_str, root.path().to_str().expect("utf8")]);
    let control = root.path().join("DEBIAN");
    dpkg_deb(&["-e", deb_str, control.to_str().expect("utf8")]);
    for script in ["postinst", "prerm", "postrm"] {
        let status = Command::new("sh")
            .arg("-n")
            .arg(control.join(script))
            .status()
            .expect("sh -n");
        assert!(status.success(), "{script} is not valid sh");
    }
    let usr_bin = root.path().join("usr/bin");
    for binary in ["dicops", "dicops-agent", "dicops-controller"] {
        let out = Command::new(usr_bin.join(binary))
            .arg("--version")
            .output()
            .expect("run packaged binary");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{binary} {version}")
        );
    }
    for unit in &UNITS {
        let packaged = read(&root.path().join("lib/systemd/system").join(unit.name));
        let source = read(&units_dir().join(unit.name));
        assert_eq!(
            packaged,
            source.replace("/usr/local/bin/", "/usr/bin/"),
            "{}: the package must ship packaging/systemd's unit with /usr/bin paths",
            unit.name
        );
        // Verified with the packaged binaries where the unit expects /usr/bin.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(unit.name);
        std::fs::write(&path, packaged.replace("/usr/bin/", &format!("{}/", usr_bin.display()))).expect("write");
        systemd::verify(unit.name, dir.path(), &path);
        assert_within_budget(unit, " (packaged)", systemd::exposure(unit.name, dir.path(), &path));
    }
}
