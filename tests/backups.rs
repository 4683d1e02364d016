//! Backup jobs with real agents, a real controller and real commands: a
//! small script writes a dump into the command's output folder.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dicops_proto::BackupStatus;
use harness::{promtool_check_metrics, sample, wait_until, Deployment};

/// A dump writer like a database's: progress on stdout, the dump written
/// under a temporary name and renamed when complete.
const DUMP_SCRIPT: &str = r#"#!/bin/sh
set -eu
out="$DICOPS_OUTPUT_DIR/app-$DICOPS_RUN_ID.dump"
echo "dumping database app (run $DICOPS_RUN_ID, attempt $DICOPS_ATTEMPT)"
head -c 150000 /dev/urandom > "$out.partial"
echo "table orders done"
sleep "${DUMP_PAUSE:-0}"
head -c 50000 /dev/urandom >> "$out.partial"
mv "$out.partial" "$out"
echo "dump complete: $out"
"#;

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn backups(d: &Deployment) -> Vec<BackupStatus> {
    let (status, body) = d.get(dicops_proto::BACKUPS_PATH);
    assert!(status.is_success(), "{status}");
    serde_json::from_slice(&body).expect("backups")
}

fn labels<'a>(job: &'a str, agent: &'a str) -> [(&'a str, &'a str); 2] {
    [("job", job), ("agent", agent)]
}

/// A deployment with db01 in dc1 and backup01 in dc2, each agent with the
/// dump script as command `pg-dump` writing into its own output folder.
fn deployment(agent_commands: &str, controller_backups: &str) -> Deployment {
    let mut d = Deployment::new(&[("dc1", &["db01"]), ("dc2", &["backup01"])]);
    let script = write_script(d.root.path(), "dump.sh", DUMP_SCRIPT);
    std::fs::create_dir_all(d.path("out")).expect("output folder");
    d.controller_extra = format!("backups:\n{controller_backups}");
    d.agent_extra = with_small_floor(agent_commands)
        .replace("@SCRIPT@", script.to_str().expect("utf8"))
        .replace("@OUT@", d.path("out").to_str().expect("utf8"))
        .replace("@ROOT@", d.root.path().to_str().expect("utf8"));
    d
}

/// Gives every command that names no `min_free` a small absolute floor. The
/// default, 1% of the filesystem, depends on how full the test machine's
/// disk is (a CI machine once had 0.6% free); the floor itself is tested
/// with `min_free: 1000TiB` below.
fn with_small_floor(agent_commands: &str) -> String {
    let lines: Vec<&str> = agent_commands.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        let next = lines.get(i + 1).map(|l| l.trim_start());
        if line.trim_start().starts_with("output:") && !next.is_some_and(|l| l.starts_with("min_free:")) {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}min_free: 16MiB\n"));
        }
    }
    out
}

#[test]
fn a_backup_run_is_measured_checksummed_and_exported_with_its_objective() {
    let d = deployment(
        "commands:\n  pg-dump:\n    argv: [@SCRIPT@]\n    env: {DUMP_PAUSE: \"5\"}\n    output: @OUT@\n",
        "  - {name: db01-postgres, agent: db01, run: pg-dump, max_age: 26h, retries: 0}\n",
    );
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));

    let (code, out, err) = d.cli(&["run", "db01-postgres", "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    // The command's progress while it ran: bytes written so far and its
    // last line of output.
    assert!(
        out.contains("running: 146.5 KiB written (1 file) | table orders done"),
        "{out}"
    );
    assert!(out.contains("succeeded"), "{out}");

    let dump = std::fs::read_dir(d.path("out"))
        .expect("out")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "dump"))
        .expect("the dump file");
    let bytes = std::fs::read(&dump).expect("read dump");
    assert_eq!(bytes.len(), 200_000);
    // The manifest names the file with its BLAKE3.
    let hash = blake3::hash(&bytes).to_hex().to_string();
    assert!(out.contains(&hash), "manifest with the dump's BLAKE3 {hash}:\n{out}");
    let run = d.runs("db01-postgres").remove(0);
    assert_eq!((run.bytes, run.files), (Some(200_000), Some(1)));
    let full = d.run(run.id);
    assert_eq!(full.artifacts.len(), 1);
    assert_eq!(full.artifacts[0].blake3, hash);

    let metrics = wait_until(Duration::from_secs(10), "backup scanned", || {
        let m = d.metrics();
        (sample(&m, "dicops_backup_artifacts", &labels("db01-postgres", "db01")) == Some(1.0)).then_some(m)
    });
    let l = labels("db01-postgres", "db01");
    assert_eq!(
        sample(&metrics, "dicops_backup_max_age_seconds", &l),
        Some(26.0 * 3600.0)
    );
    assert_eq!(sample(&metrics, "dicops_backup_last_size_bytes", &l), Some(200_000.0));
    assert_eq!(sample(&metrics, "dicops_backup_last_run_successful", &l), Some(1.0));
    let success = sample(&metrics, "dicops_backup_last_success_timestamp_seconds", &l).expect("last success");
    assert!((success - run.started_at.expect("started")).abs() < 1.0);
    let duration = sample(&metrics, "dicops_backup_last_duration_seconds", &l).expect("duration");
    assert!((5.0..30.0).contains(&duration), "the script pauses 5 s: {duration}");
    assert_eq!(
        sample(
            &metrics,
            "dicops_backup_runs_total",
            &[("job", "db01-postgres"), ("site", "dc1"), ("result", "succeeded")]
        ),
        Some(1.0)
    );
    promtool_check_metrics(&metrics);

    let (code, out, _) = d.cli(&["backups"]);
    assert_eq!(code, 0, "every backup is fresh: {out}");
    assert!(out.contains("db01-postgres"), "{out}");
    assert!(out.contains("fresh"), "{out}");
    assert!(out.contains("1 kept (195.3 KiB)"), "{out}");
}

#[test]
fn retention_waits_for_the_other_site_and_says_so() {
    let d = deployment(
        "commands:\n  pg-dump:\n    argv: [@SCRIPT@]\n    output: @OUT@\n    retention: {keep_last: 1}\n  scratch:\n    argv: [@SCRIPT@]\n    output: @ROOT@/scratch\n    retention: {keep_last: 1, wait_for_replication: false}\n",
        "  - {name: pg, agent: db01, run: pg-dump, max_age: 1h}\n  - {name: scratch, agent: db01, run: scratch, max_age: 1h}\n",
    );
    std::fs::create_dir_all(d.path("scratch")).expect("scratch");
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    for _ in 0..2 {
        for job in ["pg", "scratch"] {
            let (code, out, err) = d.cli(&["run", job, "--follow"]);
            assert_eq!(code, 0, "{out}{err}");
        }
    }
    let count = |dir: &str| std::fs::read_dir(d.path(dir)).expect("dir").count();
    // Not replicated anywhere yet: keep_last 1 is not allowed to delete.
    assert_eq!(count("out"), 2);
    // A backup that does not wait for replication is pruned.
    assert_eq!(count("scratch"), 1);

    let metrics = wait_until(Duration::from_secs(10), "retention state reported", || {
        let m = d.metrics();
        (sample(&m, "dicops_backup_retention_blocked", &labels("pg", "db01")) == Some(1.0)).then_some(m)
    });
    assert_eq!(
        sample(&metrics, "dicops_backup_artifacts", &labels("pg", "db01")),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_backup_retention_blocked_bytes", &labels("pg", "db01")),
        Some(200_000.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_backup_retention_blocked", &labels("scratch", "db01")),
        Some(0.0)
    );
    let (_, out, _) = d.cli(&["backups"]);
    assert!(
        out.contains("retention blocked: 1 backup(s), 195.3 KiB not yet in the other site"),
        "{out}"
    );
}

#[test]
fn faulty_backup_commands_fail_with_their_cause_and_the_agent_serves_on() {
    let d = deployment(
        "commands:
  missing:
    argv: [/nonexistent/pg_dump]
    output: @OUT@
  exits-3:
    argv: [/bin/sh, -c, \"echo half > $DICOPS_OUTPUT_DIR/half.dump; echo 'pg_dump: connection refused' >&2; exit 3\"]
    output: @OUT@
  hangs:
    argv: [/bin/sleep, \"300\"]
    output: @OUT@
    timeout: 2s
  floods-stderr:
    argv: [/bin/sh, -c, \"head -c 2G /dev/zero >&2; echo tail-marker >&2; echo ok > $DICOPS_OUTPUT_DIR/flood.dump\"]
    output: @OUT@
  leaves-child:
    argv: [/bin/sh, -c, \"sleep 321 & echo $! > @ROOT@/child.pid; echo x > $DICOPS_OUTPUT_DIR/child.dump\"]
    output: @OUT@
  writes-nothing:
    argv: [/bin/true]
    output: @OUT@
  disk-full:
    argv: [@SCRIPT@]
    output: @OUT@
    min_free: 1000TiB
",
        "  - {name: missing, agent: db01, run: missing, max_age: 1h, retries: 0}
  - {name: exits-3, agent: db01, run: exits-3, max_age: 1h, retries: 0}
  - {name: hangs, agent: db01, run: hangs, max_age: 1h, retries: 0}
  - {name: floods-stderr, agent: db01, run: floods-stderr, max_age: 1h, retries: 0}
  - {name: leaves-child, agent: db01, run: leaves-child, max_age: 1h, retries: 0}
  - {name: writes-nothing, agent: db01, run: writes-nothing, max_age: 1h, retries: 0}
  - {name: disk-full, agent: db01, run: disk-full, max_age: 1h, retries: 0}
  - {name: not-allowed, agent: db01, run: rm-rf, max_age: 1h, retries: 0}
",
    );
    let _controller = d.start_controller();
    let db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let expect = [
        (
            "missing",
            "failed",
            "cannot start /nonexistent/pg_dump: no such program",
        ),
        ("exits-3", "failed", "exited with status 3; it left 1 file(s), 5 B, in"),
        (
            "hangs",
            "failed",
            "ran longer than its timeout of 2 s and was killed with its process group",
        ),
        ("floods-stderr", "succeeded", ""),
        (
            "leaves-child",
            "failed",
            "left processes running in its process group; they were killed",
        ),
        (
            "writes-nothing",
            "failed",
            "exited 0 but wrote nothing into its output folder",
        ),
        ("disk-full", "failed", "not started: only"),
        (
            "not-allowed",
            "failed",
            "command \"rm-rf\" is not defined in this agent's config",
        ),
    ];
    for (job, status, error) in expect {
        let (_, out, err) = d.cli(&["run", job, "--follow"]);
        let run = d.runs(job).remove(0);
        assert_eq!(run.status, status, "{job}: {out}{err}");
        let text = run.error.clone().unwrap_or_default();
        assert!(text.contains(error), "{job}: {text:?}");
    }
    let exits = d.runs("exits-3").remove(0);
    assert!(exits.output_tail.unwrap_or_default().contains("connection refused"));
    assert!(d
        .runs("disk-full")
        .remove(0)
        .error
        .unwrap_or_default()
        .contains("below the floor min_free 1000.0 TiB"));

    // 2 GiB on stderr: only the tail is kept, and the agent stayed small.
    let flood = d.runs("floods-stderr").remove(0);
    let tail = flood.output_tail.unwrap_or_default();
    assert!(
        tail.len() <= 8 * 1024 && tail.ends_with("tail-marker\n"),
        "{} bytes",
        tail.len()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", db01.pid())).expect("agent status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib < 100 * 1024,
        "agent peak RSS {peak_kib} KiB after 2 GiB of output"
    );

    // The child left behind was killed with the command's group.
    let child: u32 = std::fs::read_to_string(d.path("child.pid"))
        .expect("child pid")
        .trim()
        .parse()
        .expect("pid");
    wait_until(Duration::from_secs(5), "leftover child killed", || {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });

    // Failed backups count as such; the agent still reports.
    let metrics = d.metrics();
    for job in [
        "missing",
        "exits-3",
        "hangs",
        "leaves-child",
        "writes-nothing",
        "disk-full",
        "not-allowed",
    ] {
        assert_eq!(
            sample(&metrics, "dicops_backup_last_run_successful", &labels(job, "db01")),
            Some(0.0),
            "{job}"
        );
        assert_eq!(
            sample(
                &metrics,
                "dicops_backup_last_success_timestamp_seconds",
                &labels(job, "db01")
            ),
            None,
            "{job} never succeeded"
        );
    }
    assert_eq!(sample(&metrics, "dicops_agent_up", &[("agent", "db01")]), Some(1.0));
    let (code, out, _) = d.cli(&["backups"]);
    assert_eq!(code, 1, "stale backups make `dicops backups` exit 1: {out}");
    let first_fresh = out.lines().position(|l| l.contains("floods-stderr")).expect("listed");
    let lines: Vec<&str> = out.lines().collect();
    let last_stale = lines.iter().rposition(|l| l.contains("STALE")).expect("stale ones");
    assert!(last_stale < first_fresh, "stale first:\n{out}");
}

#[test]
fn watched_folders_report_the_newest_backup_and_unreadable_ones_are_flagged() {
    let d = deployment(
        "watches:\n  exports: {path: @ROOT@/exports, glob: \"*.tar.zst\"}\n  gone: {path: @ROOT@/no-such-folder}\n  not-a-folder: {path: @ROOT@/dump.sh}\n  locked: {path: @ROOT@/locked}\n",
        "  - {name: appliance, agent: db01, watch: exports, max_age: 26h}\n  - {name: gone, agent: db01, watch: gone, max_age: 26h}\n  - {name: not-a-folder, agent: db01, watch: not-a-folder, max_age: 26h}\n  - {name: locked, agent: db01, watch: locked, max_age: 26h}\n  - {name: undefined, agent: db01, watch: nope, max_age: 26h}\n",
    );
    let exports = d.path("exports");
    std::fs::create_dir_all(&exports).expect("exports");
    let now = std::time::SystemTime::now();
    for (name, size, hours_ago) in [
        ("mon.tar.zst", 300, 50u64),
        ("tue.tar.zst", 500, 2),
        ("notes.txt", 7, 1),
    ] {
        let path = exports.join(name);
        std::fs::write(&path, vec![b'x'; size]).expect("write");
        let file = std::fs::File::options().write(true).open(&path).expect("open");
        file.set_modified(now - Duration::from_secs(hours_ago * 3600))
            .expect("mtime");
    }
    // A folder only root may read; the agent runs as nobody, as in production.
    let locked = d.path("locked");
    std::fs::create_dir_all(&locked).expect("locked");
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let _controller = d.start_controller();
    let _db01 = d.start_agent_as("db01", 65534, 65534);
    d.wait_agents_up(&["db01"], Duration::from_secs(20));

    let list = wait_until(Duration::from_secs(15), "watches scanned", || {
        let b = backups(&d);
        b.iter()
            .all(|b| b.local.is_some() || b.name == "undefined")
            .then_some(b)
    });
    let get = |name: &str| list.iter().find(|b| b.name == name).expect(name).clone();
    let appliance = get("appliance");
    let local = appliance.local.clone().expect("scan");
    assert_eq!((local.artifacts, local.bytes), (2, 800), "the glob skips notes.txt");
    assert_eq!(local.newest_name.as_deref(), Some("tue.tar.zst"));
    assert_eq!(appliance.last_size_bytes, Some(500));
    let expected = now - Duration::from_secs(2 * 3600);
    let expected = expected
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs_f64();
    assert!((appliance.last_success_at.expect("newest") - expected).abs() < 1.0);
    assert!(appliance.problem.is_none(), "{appliance:?}");

    assert!(get("gone")
        .problem
        .unwrap_or_default()
        .contains("no-such-folder does not exist"));
    assert!(get("not-a-folder")
        .problem
        .unwrap_or_default()
        .contains("dump.sh is not a folder"));
    assert!(
        get("locked")
            .problem
            .unwrap_or_default()
            .contains("cannot be read: permission denied"),
        "{:?}",
        get("locked")
    );
    assert!(get("undefined")
        .problem
        .unwrap_or_default()
        .contains("has no watch named \"nope\" under `watches:`"));

    let metrics = d.metrics();
    assert_eq!(
        sample(&metrics, "dicops_backup_artifacts", &labels("appliance", "db01")),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_backup_folder_readable", &labels("appliance", "db01")),
        Some(1.0)
    );
    for broken in ["gone", "not-a-folder", "locked"] {
        assert_eq!(
            sample(&metrics, "dicops_backup_folder_readable", &labels(broken, "db01")),
            Some(0.0),
            "{broken}"
        );
    }
    promtool_check_metrics(&metrics);
    let (code, out, _) = d.cli(&["backups"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.contains("appliance") && l.contains("fresh")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("locked") && l.contains("STALE")),
        "{out}"
    );
}

#[test]
fn an_agent_killed_mid_backup_records_the_run_interrupted_never_succeeded() {
    let d = deployment(
        "commands:\n  pg-dump:\n    argv: [@SCRIPT@]\n    env: {DUMP_PAUSE: \"300\"}\n    output: @OUT@\n",
        "  - {name: pg, agent: db01, run: pg-dump, max_age: 1h, retries: 0}\n",
    );
    let _controller = d.start_controller();
    let mut db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let (code, _, _) = d.cli(&["run", "pg"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "running", || {
        d.runs("pg").into_iter().find(|r| r.status == "running").map(|r| r.id)
    });
    let pid_file = d.path("agent-db01-state/spool/accepted").join(format!("{id}.pid"));
    wait_until(Duration::from_secs(10), "command started", || {
        pid_file.exists().then_some(())
    });
    db01.kill9();
    let _db01 = d.start_agent("db01");
    let done = wait_until(Duration::from_secs(30), "run ended", || {
        let r = d.run(id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "interrupted", "{done:?}");
    assert!(done.error.unwrap_or_default().contains("not counted as a success"));
    let metrics = d.metrics();
    assert_eq!(
        sample(
            &metrics,
            "dicops_backup_runs_total",
            &[("job", "pg"), ("result", "interrupted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "dicops_backup_last_success_timestamp_seconds",
            &labels("pg", "db01")
        ),
        None
    );
    // The half-written dump is not a backup.
    assert_eq!(
        sample(&metrics, "dicops_backup_artifacts", &labels("pg", "db01")).unwrap_or(0.0),
        0.0
    );
}

#[test]
fn a_backup_that_ends_while_the_controller_is_down_is_recorded_once_later() {
    let d = deployment(
        "commands:\n  pg-dump:\n    argv: [@SCRIPT@]\n    env: {DUMP_PAUSE: \"3\"}\n    output: @OUT@\n",
        "  - {name: pg, agent: db01, run: pg-dump, max_age: 1h, retries: 0}\n",
    );
    let mut controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let (code, _, _) = d.cli(&["run", "pg"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "running", || {
        d.runs("pg").into_iter().find(|r| r.status == "running").map(|r| r.id)
    });
    controller.kill9();
    let spooled = d.path("agent-db01-state/spool/results").join(format!("{id}.json"));
    wait_until(Duration::from_secs(20), "result kept in the agent's spool", || {
        spooled.exists().then_some(())
    });
    let _controller = d.start_controller();
    let done = wait_until(Duration::from_secs(60), "result delivered", || {
        let r = d.run(id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.bytes, Some(200_000));
    wait_until(Duration::from_secs(10), "spool emptied", || {
        (!spooled.exists()).then_some(())
    });
    assert_eq!(d.runs("pg").len(), 1, "recorded once");
    let metrics = d.metrics();
    assert_eq!(
        sample(
            &metrics,
            "dicops_backup_runs_total",
            &[("job", "pg"), ("result", "succeeded")]
        ),
        Some(1.0)
    );
    assert!(sample(
        &metrics,
        "dicops_backup_last_success_timestamp_seconds",
        &labels("pg", "db01")
    )
    .is_some());
}

/// The output folder of the `as-nobody` command, owned by nobody.
fn nobody_folder(d: &Deployment) -> std::path::PathBuf {
    let out = d.path("nobody-out");
    std::fs::create_dir_all(&out).expect("folder");
    std::os::unix::fs::chown(&out, Some(65534), Some(65534)).expect("chown");
    out
}

#[test]
fn a_backup_command_runs_as_its_user_in_a_minimal_environment() {
    let d = deployment(
        "commands:\n  as-nobody:\n    argv: [/bin/sh, -c, \"id -un > $DICOPS_OUTPUT_DIR/env.dump; env | sort >> $DICOPS_OUTPUT_DIR/env.dump\"]\n    user: nobody\n    env: {PGDATABASE: app}\n    output: @ROOT@/nobody-out\n",
        "  - {name: as-nobody, agent: db01, run: as-nobody, max_age: 1h, retries: 0}\n",
    );
    let out = nobody_folder(&d);
    std::fs::set_permissions(d.root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let (code, stdout, stderr) = d.cli(&["run", "as-nobody", "--follow"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let dump = out.join("env.dump");
    let text = std::fs::read_to_string(&dump).expect("dump");
    assert!(text.starts_with("nobody\n"), "{text}");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&dump).expect("meta")),
        65534
    );
    assert!(text.contains("\nPGDATABASE=app\n"), "{text}");
    assert!(text.contains("\nUSER=nobody\n"), "{text}");
    assert!(text.contains("\nDICOPS_JOB=as-nobody\n"), "{text}");
    // The agent's own environment (the test runner's) is not passed on.
    assert!(!text.contains("RUST_LOG") && !text.contains("CARGO"), "{text}");
}

/// An agent given CAP_SETUID and CAP_SETGID to run commands as other users
/// (the systemd drop-in's ambient capabilities) does not pass them on: the
/// command runs as its user with no capability, and cannot become root.
#[test]
fn a_command_run_as_another_user_gets_none_of_the_agent_s_capabilities() {
    let d = deployment(
        "commands:\n  as-nobody:\n    argv: [/bin/sh, -c, \"grep ^Cap /proc/self/status > $DICOPS_OUTPUT_DIR/caps.dump\"]\n    user: nobody\n    output: @ROOT@/nobody-out\n",
        "  - {name: as-nobody, agent: db01, run: as-nobody, max_age: 1h, retries: 0}\n",
    );
    let out = nobody_folder(&d);
    let _controller = d.start_controller();
    let _db01 = d.start_agent_with_setuid_capabilities("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let (code, stdout, stderr) = d.cli(&["run", "as-nobody", "--follow"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let text = std::fs::read_to_string(out.join("caps.dump")).expect("dump");
    // (The inheritable set stays: it grants nothing to a program without
    // file capabilities.)
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(set))
            .unwrap_or_else(|| panic!("{set} in {text}"));
        assert!(line.ends_with("0000000000000000"), "{set} of the command: {line}");
    }
}
