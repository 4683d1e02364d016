//! Examples are tests: every example in config/ passes `dicops check-config`
//! with real certificates, and every broken sample fails with its expected
//! message, naming file, line and column.

mod harness;

use std::path::Path;

use harness::{dicops, Pki};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn example_configs_are_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    for who in [
        &["--controller"][..],
        &["--agent", "db01"],
        &["--agent", "backup01"],
        &["--operator", "alice"],
    ] {
        pki.issue(who);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(workspace().join("config")).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("read");
            // The examples use the production paths; point them at the test PKI.
            let text = text.replace("/etc/dicops/pki", pki.dir.to_str().expect("utf8"));
            let copy = dir.path().join(path.file_name().expect("name"));
            std::fs::write(&copy, text).expect("write");
            files.push(copy.to_string_lossy().into_owned());
        }
    }
    assert!(files.len() >= 4, "expected controller, two agents and a CLI example");
    let mut args = vec!["check-config"];
    args.extend(files.iter().map(String::as_str));
    let out = dicops(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("controller: 2 sites, 4 agents, 1 jobs, 2 backups (1 run, 1 watched), 1 replications"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "agent db01 reporting to https://controller.dc2.example.org:9443: 2 commands (1 backups), 0 watched folders, 1 exports, 0 roots"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("CLI as operator alice"), "{stdout}");
}

#[test]
fn broken_configs_fail_with_their_expected_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    pki.issue(&["--controller"]);
    pki.issue(&["--agent", "db01"]);
    let pki_dir = pki.dir.to_str().expect("utf8");
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(workspace().join("tests/fixtures/configs/invalid"))
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("read").replace("PKI", pki_dir);
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` first line", path.display()))
            .to_string();
        let copy = dir.path().join(path.file_name().expect("name"));
        std::fs::write(&copy, &text).expect("write");
        let out = dicops(&["check-config", copy.to_str().expect("utf8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        // file:line:column: message, or file: field: message for checks
        // that are not tied to one position.
        let separator = if expect.starts_with(|c: char| c.is_ascii_digit()) {
            ":"
        } else {
            ": "
        };
        let wanted = format!("{}{separator}{expect}", copy.display());
        assert!(
            stderr.contains(&wanted),
            "{}:\n  wanted: {wanted}\n  got:    {stderr}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn daemons_refuse_a_bad_config_with_status_2_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("controller.yaml");
    std::fs::write(&config, "listen: 127.0.0.1:1\nsites: [\n").expect("write");
    for binary in ["dicops-controller", "dicops-agent"] {
        let out = std::process::Command::new(harness::bin(binary))
            .args(["--config", config.to_str().expect("utf8")])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{binary}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("{}:", config.display())),
            "{binary}: {stderr}"
        );
    }
}

#[test]
fn plan_previews_the_example_schedules_in_the_deployment_timezone() {
    let example = workspace().join("config/controller.yaml");
    let out = dicops(&["plan", example.to_str().expect("utf8"), "--count", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("next fires in Asia/Ho_Chi_Minh"), "{text}");
    let daily: Vec<&str> = text.lines().filter(|l| l.contains("02:30:00 +07")).collect();
    assert_eq!(daily.len(), 3, "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("controller.yaml");
    let broken = std::fs::read_to_string(&example)
        .expect("read")
        .replace("\"*/15 * * * *\"", "\"*/15 * * *\"");
    std::fs::write(&bad, broken).expect("write");
    let out = dicops(&["plan", bad.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("jobs[0].schedule: job \"db01-wal-check\": \"*/15 * * *\" has 4 fields"),
        "{stderr}"
    );
    assert!(stderr.starts_with(&format!("{}:", bad.display())), "{stderr}");
}
