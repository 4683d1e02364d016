//! The scheduler with real processes: runs recorded exactly once across
//! crashes of the controller and of agents, catch-up, timeouts, reload.

mod harness;

use std::time::Duration;

use dicops_proto::{JobStatus, RunInfo};
use harness::{sample, wait_until, Deployment};

fn runs(d: &Deployment, job: &str) -> Vec<RunInfo> {
    d.runs(job)
}

fn run(d: &Deployment, id: i64) -> RunInfo {
    d.run(id)
}

fn cli(d: &Deployment, args: &[&str]) -> (i32, String, String) {
    d.cli(args)
}

const COMMANDS: &str = "commands:\n  ok:\n    argv: [/bin/echo, all good]\n  nap:\n    argv: [/bin/sleep, \"3\"]\n  fail:\n    argv: [/bin/sh, -c, \"echo disk full >&2; exit 3\"]\n  forever:\n    argv: [/bin/sleep, \"300\"]\n  orphan:\n    argv: [/bin/sleep, \"301\"]\n";

fn deployment(jobs: &str) -> Deployment {
    let mut d = Deployment::new(&[("dc1", &["db01"]), ("dc2", &["backup01"])]);
    d.controller_extra = format!("jobs:\n{jobs}");
    d.agent_extra = COMMANDS.to_string();
    d
}

#[test]
fn scheduled_and_manual_runs_are_recorded_with_their_results() {
    let d = deployment(
        "  - {name: every-2s, agent: db01, command: ok, schedule: \"*/2 * * * * *\"}\n  - {name: broken, agent: db01, command: fail, retries: 0}\n  - {name: not-allowed, agent: backup01, command: rm-everything, retries: 0}\n",
    );
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    let _backup01 = d.start_agent("backup01");

    let done = wait_until(Duration::from_secs(30), "two scheduled runs", || {
        let r = runs(&d, "every-2s");
        (r.iter().filter(|r| r.status == "succeeded").count() >= 2).then_some(r)
    });
    assert!(done.iter().all(|r| r.trigger == "schedule"));
    let ok = done.iter().find(|r| r.status == "succeeded").expect("one");
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.output_tail.as_deref(), Some("all good\n"));

    // A failing command: exit status and stderr tail recorded, and the CLI's
    // --follow exits non-zero.
    let (code, out, _) = cli(&d, &["run", "broken", "--follow"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed"), "{out}");
    assert!(out.contains("/bin/sh exited with status 3"), "{out}");
    assert!(out.contains("disk full"), "{out}");

    // A command the agent's own config does not define: refused by the agent.
    let (code, out, _) = cli(&d, &["run", "not-allowed", "--follow"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("command \"rm-everything\" is not defined in this agent's config"),
        "{out}"
    );

    let metrics = d.metrics();
    assert!(
        sample(
            &metrics,
            "dicops_job_runs_total",
            &[("job", "every-2s"), ("result", "succeeded")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "dicops_job_runs_total",
            &[("job", "broken"), ("result", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_job_ever_succeeded", &[("job", "every-2s")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_job_ever_succeeded", &[("job", "broken")]),
        Some(0.0)
    );
    assert!(sample(
        &metrics,
        "dicops_job_next_run_timestamp_seconds",
        &[("job", "every-2s"), ("site", "dc1")]
    )
    .is_some());
    assert!(sample(
        &metrics,
        "dicops_job_expected_next_run_timestamp_seconds",
        &[("job", "every-2s")]
    )
    .is_some());
    assert!(sample(&metrics, "dicops_config_info", &[]).is_some());
    harness::promtool_check_metrics(&metrics);

    let (code, out, _) = cli(&d, &["jobs"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("broken") && l.contains("manual only") && l.contains("failed")),
        "{out}"
    );
}

#[test]
fn overlap_is_skipped_and_counted_and_pause_stops_fires() {
    let d = deployment("  - {name: slow, agent: db01, command: nap, schedule: \"* * * * * *\"}\n");
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    // A 3 s command fired every second: fires during the run are skipped.
    wait_until(Duration::from_secs(30), "overlap skips counted", || {
        (sample(
            &d.metrics(),
            "dicops_job_skipped_total",
            &[("job", "slow"), ("reason", "overlap")],
        )
        .unwrap_or(0.0)
            >= 2.0)
            .then_some(())
    });
    let history = runs(&d, "slow");
    let open = history
        .iter()
        .filter(|r| r.status == "running" || r.status == "queued")
        .count();
    assert!(open <= 1, "a job never overlaps itself: {history:?}");

    let (code, out, err) = cli(&d, &["pause", "slow"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(15), "paused skips", || {
        (sample(
            &d.metrics(),
            "dicops_job_skipped_total",
            &[("job", "slow"), ("reason", "paused")],
        )
        .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    let (status, body) = d.get("/api/v1/jobs");
    assert!(status.is_success());
    let jobs: Vec<JobStatus> = serde_json::from_slice(&body).expect("jobs");
    assert!(jobs[0].paused);
    let (code, _, _) = cli(&d, &["resume", "slow"]);
    assert_eq!(code, 0);
    // Who did it, from which certificate, is in the audit log.
    let store = rusqlite_audit(&d);
    assert!(
        store
            .iter()
            .any(|(who, action)| who == "operator ops" && action == "pause"),
        "{store:?}"
    );
    assert!(
        store
            .iter()
            .any(|(who, action)| who == "operator ops" && action == "resume"),
        "{store:?}"
    );
}

/// Reads the audit log straight from the database file, as an auditor would.
fn rusqlite_audit(d: &Deployment) -> Vec<(String, String)> {
    let out = std::process::Command::new("sqlite3")
        .arg(d.path("controller.db"))
        .arg("SELECT who || '|' || action || '|' || COALESCE(certificate, '') FROM audit ORDER BY id")
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut parts = l.split('|');
                let who = parts.next()?.to_string();
                let action = parts.next()?.to_string();
                let certificate = parts.next()?;
                assert!(!certificate.is_empty(), "the certificate serial is recorded");
                Some((who, action))
            })
            .collect(),
        _ => panic!("the sqlite3 command is needed to read the audit log (apt-get install sqlite3; the test command installs it)"),
    }
}

#[test]
fn a_controller_crash_keeps_the_open_run_and_catches_up_once_after_it() {
    let d = deployment("  - {name: tick, agent: db01, command: nap, schedule: \"*/4 * * * * *\", retries: 0}\n");
    let mut controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    let first = wait_until(Duration::from_secs(20), "a run in progress", || {
        runs(&d, "tick").into_iter().find(|r| r.status == "running")
    });
    controller.kill9();
    // Down across several fires; the agent finishes the run meanwhile and
    // keeps its result in its spool.
    std::thread::sleep(Duration::from_secs(9));
    let restarted_at = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let _controller = d.start_controller();

    // The run is followed, not failed: its result arrives from the spool.
    let done = wait_until(Duration::from_secs(60), "the open run's result", || {
        let r = run(&d, first.id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(done.finished_at.unwrap_or(0.0) >= restarted_at - 1.0);

    // Then the missed fires are caught up, once.
    let history = wait_until(Duration::from_secs(20), "a catch-up run", || {
        let h = runs(&d, "tick");
        h.iter().any(|r| r.trigger == "catch_up").then_some(h)
    });
    let catch_ups: Vec<&RunInfo> = history.iter().filter(|r| r.trigger == "catch_up").collect();
    assert_eq!(catch_ups.len(), 1, "caught up exactly once: {history:?}");
    assert!(catch_ups[0].created_at >= restarted_at - 1.0);
    // No run is duplicated, and every run before the crash is still there.
    let mut ids: Vec<i64> = history.iter().map(|r| r.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), history.len());
    assert!(history.iter().any(|r| r.id == first.id));
}

#[test]
fn a_retry_pending_when_the_controller_is_killed_runs_after_it_restarts() {
    // The retry waits 3 s: the controller dies in that window.
    let d = deployment("  - {name: flaky, agent: db01, command: fail, retries: 2, retry_backoff: 3s}\n");
    let mut controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(20));
    let (code, out, err) = cli(&d, &["run", "flaky"]);
    assert_eq!(code, 0, "{out}{err}");
    let failed = wait_until(Duration::from_secs(20), "the first attempt to fail", || {
        runs(&d, "flaky").into_iter().find(|r| r.status == "failed")
    });
    assert_eq!(failed.attempt, 0);
    controller.kill9();
    let _controller = d.start_controller();

    // Without the failed run's record the retry would be forgotten.
    let retries = wait_until(Duration::from_secs(30), "both retries after the restart", || {
        let history = runs(&d, "flaky");
        (history.iter().filter(|r| r.trigger == "retry").count() == 2 && history.iter().all(|r| r.status == "failed"))
            .then_some(history)
    });
    let attempts: Vec<u32> = retries.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [2, 1, 0], "newest first, one run per attempt: {retries:?}");
    // The backoff is kept: 3 s after the failure, then 6 s.
    let gap = retries[1].created_at - failed.finished_at.unwrap_or(0.0);
    assert!(gap >= 2.5, "the first retry came {gap:.1} s after the failure");
}

#[test]
fn a_result_held_by_a_killed_agent_arrives_exactly_once() {
    let d = deployment("  - {name: nap, agent: db01, command: nap, retries: 0}\n");
    let controller = d.start_controller();
    let mut db01 = d.start_agent("db01");
    wait_until(Duration::from_secs(20), "agent up", || {
        (sample(&d.metrics(), "dicops_agent_up", &[("agent", "db01")]) == Some(1.0)).then_some(())
    });
    let (code, out, err) = cli(&d, &["run", "nap"]);
    assert_eq!(code, 0, "{out}{err}");
    let id = wait_until(Duration::from_secs(10), "run on the agent", || {
        runs(&d, "nap")
            .into_iter()
            .find(|r| r.status == "running")
            .map(|r| r.id)
    });
    // The controller hangs (not dead: frozen), so the result cannot be delivered.
    controller.signal("STOP");
    let spooled = d.path("agent-db01-state/spool/results").join(format!("{id}.json"));
    wait_until(Duration::from_secs(15), "result spooled on the agent", || {
        spooled.exists().then_some(())
    });
    db01.kill9();
    controller.signal("CONT");
    assert_eq!(
        run(&d, id).status,
        "running",
        "nothing arrived while the agent was dead"
    );
    let _db01 = d.start_agent("db01");
    let done = wait_until(Duration::from_secs(30), "result delivered after restart", || {
        let r = run(&d, id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "succeeded");
    wait_until(Duration::from_secs(10), "spool emptied", || {
        (!spooled.exists()).then_some(())
    });
    assert_eq!(runs(&d, "nap").len(), 1);
    assert_eq!(
        sample(
            &d.metrics(),
            "dicops_job_runs_total",
            &[("job", "nap"), ("result", "succeeded")]
        ),
        Some(1.0)
    );
}

#[test]
fn an_agent_killed_mid_run_reports_the_run_interrupted() {
    let d = deployment("  - {name: long, agent: db01, command: orphan, retries: 0}\n");
    let _controller = d.start_controller();
    let mut db01 = d.start_agent("db01");
    wait_until(Duration::from_secs(20), "agent polling", || {
        (sample(&d.metrics(), "dicops_agent_up", &[("agent", "db01")]) == Some(1.0)).then_some(())
    });
    let (code, _, _) = cli(&d, &["run", "long"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "running", || {
        runs(&d, "long")
            .into_iter()
            .find(|r| r.status == "running")
            .map(|r| r.id)
    });
    // Kill the agent while its command runs.
    let pid_file = d.path("agent-db01-state/spool/accepted").join(format!("{id}.pid"));
    let command_pid = wait_until(Duration::from_secs(10), "command started", || {
        std::fs::read_to_string(&pid_file)
            .ok()?
            .split_whitespace()
            .next()?
            .parse::<u32>()
            .ok()
    });
    db01.kill9();
    let _db01 = d.start_agent("db01");
    let done = wait_until(Duration::from_secs(30), "interrupted run recorded", || {
        let r = run(&d, id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    // Stored by the agent before it died: "interrupted"; killed before it
    // stored the task: "lost". Either way a clear reason, right away.
    let error = done.error.clone().unwrap_or_default();
    assert!(
        (done.status == "interrupted" && error.contains("the agent stopped during the run"))
            || (done.status == "failed" && error.contains("does not hold this run")),
        "{done:?}"
    );
    // The command the killed agent left behind was stopped by the new one.
    wait_until(Duration::from_secs(10), "leftover command stopped", || {
        let stat = std::fs::read_to_string(format!("/proc/{command_pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its reaper.
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
}

#[test]
fn max_runtime_stops_a_run_and_records_it_timed_out() {
    let d = deployment("  - {name: stuck, agent: db01, command: forever, max_runtime: 2s, retries: 0}\n");
    let _controller = d.start_controller();
    let db01 = d.start_agent("db01");
    wait_until(Duration::from_secs(20), "agent up", || {
        (sample(&d.metrics(), "dicops_agent_up", &[("agent", "db01")]) == Some(1.0)).then_some(())
    });
    let (code, out, _) = cli(&d, &["run", "stuck", "--follow"]);
    assert_eq!(code, 1);
    assert!(out.contains("timed_out"), "{out}");
    assert!(out.contains("within max_runtime 2s"), "{out}");
    assert_eq!(
        sample(&d.metrics(), "dicops_job_timeouts_total", &[("job", "stuck")]),
        Some(1.0)
    );
    // The agent was told to cancel: its command is gone.
    wait_until(Duration::from_secs(40), "the agent's sleep 300 killed", || {
        let out = std::process::Command::new("pgrep")
            .args(["-P", &db01.pid().to_string(), "sleep"])
            .output()
            .ok()?;
        out.stdout.is_empty().then_some(())
    });
    // The agent enforces the deadline itself too, so whichever comes first
    // stops the command.
}

#[test]
fn reload_while_jobs_run_applies_a_valid_config_and_refuses_a_broken_one() {
    let d = deployment("  - {name: nap, agent: db01, command: nap, retries: 0}\n");
    let controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    wait_until(Duration::from_secs(20), "agent up", || {
        (sample(&d.metrics(), "dicops_agent_up", &[("agent", "db01")]) == Some(1.0)).then_some(())
    });
    let (_, _, _) = cli(&d, &["run", "nap"]);
    let id = wait_until(Duration::from_secs(10), "running", || {
        runs(&d, "nap")
            .into_iter()
            .find(|r| r.status == "running")
            .map(|r| r.id)
    });
    let config = d.path("controller.yaml");
    let good = std::fs::read_to_string(&config).expect("read");

    // Broken: refused, old config stays, the run goes on.
    std::fs::write(
        &config,
        good.replace("command: nap", "command: nap, schedule: \"99 * * * *\""),
    )
    .expect("write");
    let (code, _, err) = cli(&d, &["reload"]);
    assert_ne!(code, 0);
    assert!(err.contains("jobs[0].schedule"), "{err}");
    assert_eq!(
        sample(&d.metrics(), "dicops_config_last_reload_successful", &[]),
        Some(0.0)
    );

    // Valid, with a new job: applied at once by SIGHUP, the running run is kept.
    std::fs::write(
        &config,
        format!("{good}  - {{name: added, agent: db01, command: ok}}\n"),
    )
    .expect("write");
    controller.signal("HUP");
    wait_until(Duration::from_secs(10), "new job listed", || {
        let (_, body) = d.get("/api/v1/jobs");
        let jobs: Vec<JobStatus> = serde_json::from_slice(&body).ok()?;
        jobs.iter().any(|j| j.name == "added").then_some(())
    });
    assert_eq!(
        sample(&d.metrics(), "dicops_config_last_reload_successful", &[]),
        Some(1.0)
    );
    let done = wait_until(Duration::from_secs(15), "run finished", || {
        let r = run(&d, id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "succeeded");
    assert_eq!(runs(&d, "nap").len(), 1);
}
