//! Two real sites on one machine (harness/netns.rs): dc1 with db01 and
//! app01, dc2 with backup01, app02 and the controller, each process at its
//! own address in its site's network namespace, the sites joined by one
//! link shaped with tc tbf. Faults two data centres meet, each with
//! assertions on state, files and metrics:
//!
//! - a partition of the inter-site link during a replication;
//! - a slow link: a replication's bandwidth limit, and health reports
//!   crossing a link that a replication saturates;
//! - kill -9 of the controller and of either agent at random moments
//!   across many runs;
//! - a destination disk too small for the next snapshot;
//! - peers with valid certificates sending what they must not to a
//!   source's data port.
//!
//! Needs root and iproute2 (see harness/netns.rs). The tests here take
//! turns: they measure rates and delays, which a second test moving data
//! at the same time on two cores would distort.

mod harness;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::files::{assert_snapshots_whole, noise, tree, write_old, SmallDisk};
use harness::netns::{address, TwoSites};
use harness::{sample, wait_until, Deployment, Process};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const JOB: &str = "dumps-to-dc2";
const MIB: u64 = 1024 * 1024;

/// Both sites running: the controller, four agents, db01 exporting
/// `source` and backup01 writing under `replicas`.
struct Running {
    d: Deployment,
    source: PathBuf,
    replicas: PathBuf,
    _processes: Vec<Process>,
    /// Unmounted after the processes above are gone.
    _disk: Option<SmallDisk>,
}

fn start(net: &TwoSites, jobs: &[(&str, &str)]) -> Running {
    start_with_disk(net, jobs, None)
}

/// `disk`: the size in MiB of an ext4 disk mounted as backup01's
/// replication root.
/// `jobs`: replications of db01's `dumps` to backup01's `replicas`, each a
/// name and its policy fields (`bandwidth: 4MiB/s, retries: 0`).
fn start_with_disk(net: &TwoSites, jobs: &[(&str, &str)], disk: Option<u64>) -> Running {
    let mut d = net.deployment(&[("dc1", &["db01", "app01"]), ("dc2", &["backup01", "app02"])]);
    let source = d.path("source");
    let replicas = d.path("replicas");
    std::fs::create_dir_all(&source).expect("source");
    std::fs::create_dir_all(&replicas).expect("replicas");
    let disk = disk.map(|mib| SmallDisk::mount_ext4(&replicas, mib));
    let db01 = address("db01");
    d.agent_extras = vec![
        (
            "db01".into(),
            format!(
                "data: {{listen: \"{db01}:9444\", url: \"https://{db01}:9444\"}}\nexports: {{dumps: {}}}\n",
                source.display()
            ),
        ),
        (
            "backup01".into(),
            format!("roots: {{replicas: {}}}\n", replicas.display()),
        ),
    ];
    d.controller_extra = "replications:\n".to_string();
    for (name, policy) in jobs {
        let policy = if policy.is_empty() {
            String::new()
        } else {
            format!(", {policy}")
        };
        d.controller_extra.push_str(&format!(
            "  - {{name: {name}, source: {{agent: db01, export: dumps}}, destination: {{agent: backup01, root: replicas}}{policy}}}\n"
        ));
    }
    let mut processes = vec![d.start_controller()];
    for agent in ["db01", "app01", "backup01", "app02"] {
        processes.push(d.start_agent(agent));
    }
    d.wait_agents_up(&["db01", "app01", "backup01", "app02"], Duration::from_secs(30));
    Running {
        d,
        source,
        replicas,
        _processes: processes,
        _disk: disk,
    }
}

impl Running {
    /// `dicops run JOB`, not followed: the id of the run it created.
    fn trigger(&self, job: &str) -> i64 {
        let (code, out, err) = self.d.cli(&["run", job]);
        assert_eq!(code, 0, "{out}{err}");
        // "started run 12 of dumps-to-dc2"
        out.split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no run id in {out:?}"))
    }

    /// Three dumps of `mib` MiB each that do not compress, written at the
    /// source as `{prefix}-0.sql` and on, from seeds `seed` and on.
    fn write_dumps(&self, prefix: &str, mib: u64, seed: u64) {
        for i in 0..3 {
            write_old(
                &self.source.join(format!("{prefix}-{i}.sql")),
                &noise((mib * MIB) as usize, seed + i),
            );
        }
    }

    /// Bytes in `job`'s staging folder at the destination.
    fn staged(&self, job: &str) -> u64 {
        bytes_under(&self.replicas.join(job).join("staging"))
    }
}

/// Bytes under `dir`, recursively (a missing folder holds none).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// "… 12.3 MiB sent (…), 4.5 MiB reused, …" -> bytes reused.
fn reused_bytes(output: &str) -> f64 {
    let before = output
        .split(" reused")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .unwrap_or_else(|| panic!("no 'reused' in {output:?}"));
    let (number, unit) = before.trim().split_once(' ').expect("number and unit");
    let number: f64 = number.parse().expect("number");
    number
        * match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => MIB as f64,
            "GiB" => (MIB * 1024) as f64,
            other => panic!("unit {other}"),
        }
}

#[test]
fn two_sites_a_partition_fails_the_run_cleanly_and_healing_resumes_it_without_resending() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let net = TwoSites::new("100mbit");
    let run = start(
        &net,
        &[(
            JOB,
            "stall_timeout: 3s, retries: 8, retry_backoff: 2s, retry_backoff_max: 8s",
        )],
    );
    let d = &run.d;
    // 96 MiB that does not compress: about 8 s on 100 Mbit/s.
    run.write_dumps("dump", 32, 40);
    run.trigger(JOB);

    // Cut the link once a third has arrived in staging.
    wait_until(Duration::from_secs(60), "a third of the data in staging", || {
        (run.staged(JOB) > 32 * MIB).then_some(())
    });
    net.partition();
    let cut = Instant::now();
    let staged_at_cut = run.staged(JOB);

    // dc1's agents are marked down; dc2's stay up.
    wait_until(Duration::from_secs(20), "dc1 agents marked down", || {
        let metrics = d.metrics();
        let up = |a: &str| sample(&metrics, "dicops_agent_up", &[("agent", a)]);
        (up("db01") == Some(0.0) && up("app01") == Some(0.0)).then_some(())
    });
    let metrics = d.metrics();
    for agent in ["backup01", "app02"] {
        assert_eq!(
            sample(&metrics, "dicops_agent_up", &[("agent", agent)]),
            Some(1.0),
            "{agent} in dc2 must stay up"
        );
    }
    assert_eq!(
        sample(&metrics, "dicops_site_reachable", &[("site", "dc1")]),
        Some(0.0),
        "dc1 is unreachable from the controller's site"
    );

    // The attempt under way fails with a reason naming the source.
    let failed = wait_until(Duration::from_secs(30), "the attempt to fail", || {
        d.runs(JOB).into_iter().find(|r| r.status == "failed")
    });
    let reason = failed.error.clone().unwrap_or_default() + &failed.output_tail.clone().unwrap_or_default();
    assert!(
        reason.contains(address("db01")) || reason.contains("db01"),
        "the failure must name the peer: {failed:?}"
    );
    // Nothing half-copied is visible.
    let snapshots = run.replicas.join(JOB).join("snapshots");
    assert_eq!(
        std::fs::read_dir(&snapshots).map(|e| e.count()).unwrap_or(0),
        0,
        "no snapshot may be published while the link is down"
    );

    // Long enough for a retry or two to fail against the cut link.
    while cut.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(200));
    }
    net.heal();

    // No operator action: the retries finish the job.
    let done = wait_until(Duration::from_secs(120), "a succeeded attempt after healing", || {
        d.runs(JOB).into_iter().find(|r| r.status == "succeeded")
    });
    d.wait_agents_up(&["db01", "app01"], Duration::from_secs(20));

    // Retries backed off: each wait at least as long as the one before.
    let mut attempts = d.runs(JOB);
    attempts.sort_by_key(|r| r.attempt);
    assert!(attempts.len() >= 2, "at least one retry expected: {attempts:?}");
    let starts: Vec<f64> = attempts.iter().filter_map(|r| r.started_at).collect();
    let gaps: Vec<f64> = attempts
        .windows(2)
        .filter_map(|w| Some(w[1].started_at? - w[0].finished_at?))
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 1.5),
        "retries must wait their backoff (2s, then more): gaps {gaps:?}, starts {starts:?}"
    );
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0] - 0.5),
        "backoff must not shrink: {gaps:?}"
    );

    // The retry resumed: what was verified in staging was not sent again.
    let output = done.output_tail.clone().unwrap_or_default();
    let reused = reused_bytes(&output);
    assert!(
        reused >= (staged_at_cut / 2) as f64,
        "the retry must reuse the verified chunks in staging ({staged_at_cut} B at the cut): {output}"
    );

    // The published snapshot is whole and equal to the source.
    assert_snapshots_whole(&run.replicas.join(JOB));
    assert_eq!(tree(&run.replicas.join(JOB).join("latest")), tree(&run.source));
}

#[test]
fn two_sites_a_slow_link_honours_the_bandwidth_limit_and_reports_keep_arriving() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let net = TwoSites::new("100mbit");
    let limit = 4 * MIB;
    let run = start(&net, &[(JOB, "bandwidth: 4MiB/s"), ("unlimited", "")]);
    let d = &run.d;
    // 48 MiB: 12 s at 4 MiB/s.
    run.write_dumps("dump", 16, 70);

    // (a) The job's limit, measured on the wire (dc1's end of the link),
    // over the middle of the transfer: within 10 %.
    run.trigger(JOB);
    wait_until(Duration::from_secs(60), "the transfer under way", || {
        (run.staged(JOB) > 4 * MIB).then_some(())
    });
    let (t0, b0) = (Instant::now(), net.dc1_bytes_sent());
    std::thread::sleep(Duration::from_secs(6));
    let (t1, b1) = (Instant::now(), net.dc1_bytes_sent());
    let rate = (b1 - b0) as f64 / (t1 - t0).as_secs_f64();
    eprintln!("limited replication: {:.2} MiB/s on the wire", rate / MIB as f64);
    assert!(
        (0.9 * limit as f64..=1.1 * limit as f64).contains(&rate),
        "bandwidth: 4MiB/s must be honoured within 10%: measured {:.2} MiB/s",
        rate / MIB as f64
    );
    wait_until(Duration::from_secs(60), "the limited run to succeed", || {
        d.runs(JOB).into_iter().find(|r| r.status == "succeeded")
    });

    // (b) A replication with no limit fills the 100 Mbit/s link; the health
    // reports of both dc1 agents cross it all along, on time.
    run.write_dumps("next", 32, 90);
    run.trigger("unlimited");
    let started = Instant::now();
    let mut worst_age: f64 = 0.0;
    let mut peak: f64 = 0.0;
    let mut last = (Instant::now(), net.dc1_bytes_sent());
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let metrics = d.metrics();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        for agent in ["db01", "app01"] {
            let at = sample(
                &metrics,
                "dicops_agent_last_report_timestamp_seconds",
                &[("agent", agent)],
            )
            .expect("last report");
            worst_age = worst_age.max(now - at);
            assert_eq!(
                sample(&metrics, "dicops_agent_up", &[("agent", agent)]),
                Some(1.0),
                "{agent} marked down while the link is busy"
            );
        }
        let sent = (Instant::now(), net.dc1_bytes_sent());
        peak = peak.max((sent.1 - last.1) as f64 / (sent.0 - last.0).as_secs_f64());
        last = sent;
        let runs = d.runs("unlimited");
        if runs.iter().any(|r| r.status == "succeeded") {
            break;
        }
        assert!(
            runs.iter().all(|r| r.status != "failed"),
            "the unlimited run failed: {runs:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the unlimited run took too long"
        );
    }
    eprintln!(
        "unlimited replication: peak {:.2} MiB/s on the wire; oldest dc1 report seen: {worst_age:.2} s",
        peak / MIB as f64
    );
    assert!(
        peak > 0.7 * 12.5e6,
        "the unlimited replication should fill most of the 100 Mbit/s link: peak {:.2} MB/s",
        peak / 1e6
    );
    // Reports every 1 s; one late report is allowed, a missed interval is not.
    assert!(
        worst_age < 2.5,
        "health reports from dc1 fell behind while the link was busy: {worst_age:.2} s old"
    );
    assert_snapshots_whole(&run.replicas.join("unlimited"));
    assert_eq!(tree(&run.replicas.join("unlimited").join("latest")), tree(&run.source));
}

/// A small xorshift, seeded from the clock and printed, so a failing round
/// can be replayed with DICOPS_CRASH_SEED.
fn random_source() -> impl FnMut() -> u64 {
    let mut seed = std::env::var("DICOPS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        })
        | 1;
    eprintln!("DICOPS_CRASH_SEED={seed}");
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[test]
fn two_sites_kill_9_of_the_controller_and_either_agent_loses_no_run_and_publishes_no_partial_snapshot() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The long variant: DICOPS_CRASH_ITERATIONS=60 cargo test --test two_sites crash
    let rounds: usize = std::env::var("DICOPS_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let net = TwoSites::new("100mbit");
    let mut run = start(
        &net,
        &[(
            JOB,
            "bandwidth: 8MiB/s, stall_timeout: 5s, retries: 10, retry_backoff: 1s, retry_backoff_max: 2s",
        )],
    );
    let mut random = random_source();
    let job_dir = run.replicas.join(JOB);
    let mut triggered: Vec<i64> = Vec::new();
    // _processes: controller, db01, app01, backup01, app02.
    let victims = [(0, "controller"), (1, "db01"), (3, "backup01")];
    for round in 0..rounds {
        // The source changes every round: a new dump of 2-6 MiB.
        let size = (2 + random() % 5) as usize * MIB as usize;
        write_old(&run.source.join(format!("day-{round:02}.sql")), &noise(size, random()));
        let newest = run.d.runs(JOB).first().map_or(0, |r| r.id);
        triggered.push(run.trigger(JOB));

        std::thread::sleep(Duration::from_millis(200 + random() % 2500));
        let (slot, name) = victims[(random() % 3) as usize];
        eprintln!("round {round}: kill -9 {name}");
        run._processes[slot].kill9();
        run._processes[slot] = if name == "controller" {
            run.d.start_controller()
        } else {
            run.d.start_agent(name)
        };
        // Never a half copy, even right after a crash.
        assert_snapshots_whole(&job_dir);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !run.d.runs(JOB).iter().any(|r| r.id > newest && r.status == "succeeded") {
            assert!(
                Instant::now() < deadline,
                "round {round}: no run succeeded within 120 s after kill -9 {name}:\n{:#?}\ncontroller log:\n{}",
                run.d.runs(JOB).iter().take(4).collect::<Vec<_>>(),
                run._processes[0]
                    .log_text()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let latest = std::fs::canonicalize(job_dir.join("latest")).expect("latest");
        assert_eq!(
            tree(&latest),
            tree(&run.source),
            "round {round}: the snapshot must equal the source"
        );
    }

    // Every run asked for is recorded once, and every run has ended: none
    // lost with the controller, none left running, no id twice.
    let runs = run.d.runs(JOB);
    let mut ids: Vec<i64> = runs.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "a run id is listed twice: {runs:?}");
    for id in &triggered {
        assert!(ids.contains(id), "run {id} was asked for and is not recorded: {runs:?}");
    }
    for r in &runs {
        assert!(
            ["succeeded", "failed", "interrupted", "timed_out"].contains(&r.status.as_str()),
            "run {} is still {} after every round ended: {r:?}",
            r.id,
            r.status
        );
    }
    // Each snapshot is whole, and each of its files is the source's file of
    // that name (dumps never change once written).
    assert_snapshots_whole(&job_dir);
    for snapshot in std::fs::read_dir(job_dir.join("snapshots"))
        .expect("snapshots")
        .flatten()
    {
        for (path, bytes) in tree(&snapshot.path()) {
            assert_eq!(
                std::fs::read(run.source.join(&path)).expect("source file"),
                bytes,
                "{path} in snapshot {:?}",
                snapshot.file_name()
            );
        }
    }
}

#[test]
fn two_sites_a_full_destination_disk_fails_the_run_keeps_earlier_snapshots_and_shows_in_the_space_metrics() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let net = TwoSites::new("100mbit");
    let run = start_with_disk(&net, &[(JOB, "retention: {keep_last: 1}, retries: 0")], Some(24));
    let d = &run.d;
    let job_dir = run.replicas.join(JOB);
    let mountpoint = run.replicas.display().to_string();
    let space = || {
        let metrics = d.metrics();
        let labels = [("agent", "backup01"), ("mountpoint", mountpoint.as_str())];
        let avail = sample(&metrics, "dicops_host_filesystem_avail_bytes", &labels)?;
        let size = sample(&metrics, "dicops_host_filesystem_size_bytes", &labels)?;
        Some(avail / size)
    };

    write_old(&run.source.join("monday.sql"), &noise(6 * MIB as usize, 501));
    let (code, out, err) = d.cli(&["run", JOB, "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    let first = std::fs::canonicalize(job_dir.join("latest")).expect("first snapshot");
    let first_tree = tree(&first);

    // 6 + 20 MiB on a 24 MiB disk: the run fails and says why.
    write_old(&run.source.join("tuesday.sql"), &noise(20 * MIB as usize, 502));
    let failed = d.run_failing(JOB);
    assert!(
        failed
            .error
            .clone()
            .unwrap_or_default()
            .contains("No space left on device"),
        "the reason must say the disk is full: {failed:?}"
    );
    assert_eq!(std::fs::canonicalize(job_dir.join("latest")).expect("latest"), first);
    assert_eq!(tree(&first), first_tree, "the earlier snapshot is intact");
    assert_snapshots_whole(&job_dir);
    // What HostFilesystemAlmostFull reads (avail / size < 0.05) shows the
    // full disk once the agent reports it.
    let full = wait_until(Duration::from_secs(15), "the full disk in the metrics", || {
        space().filter(|ratio| *ratio < 0.05)
    });
    eprintln!("replication root after the failed run: {:.1}% free", full * 100.0);
    let metrics = d.metrics();
    assert_eq!(
        sample(&metrics, "dicops_replication_last_run_successful", &[("job", JOB)]),
        Some(0.0),
        "ReplicationFailed reads this"
    );

    // The big dump goes; the next run fits, publishes, and retention
    // (keep_last: 1) removes the older snapshot.
    std::fs::remove_file(run.source.join("tuesday.sql")).expect("rm");
    write_old(&run.source.join("wednesday.sql"), &noise(4 * MIB as usize, 503));
    let (code, out, err) = d.cli(&["run", JOB, "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    let latest = std::fs::canonicalize(job_dir.join("latest")).expect("latest");
    assert_ne!(latest, first);
    assert_eq!(tree(&latest), tree(&run.source));
    let snapshots = std::fs::read_dir(job_dir.join("snapshots")).expect("snapshots").count();
    assert_eq!(snapshots, 1, "keep_last: 1 keeps only the newest snapshot");
    assert_snapshots_whole(&job_dir);
    let after = wait_until(Duration::from_secs(15), "space back in the metrics", || {
        space().filter(|ratio| *ratio > 0.05)
    });
    eprintln!("replication root after the next run: {:.1}% free", after * 100.0);
}

#[test]
fn two_sites_peers_with_valid_certificates_sending_garbage_to_a_data_port_are_refused_logged_and_counted() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let net = TwoSites::new("100mbit");
    net.reach_sites_from_here();
    let run = start(&net, &[(JOB, "bandwidth: 1MiB/s")]);
    let d = &run.d;
    write_old(&run.source.join("dump.sql"), &noise(12 * MIB as usize, 900));
    run.trigger(JOB);
    // The real pull is under way: db01 holds a grant for backup01.
    let id = wait_until(Duration::from_secs(30), "the transfer under way", || {
        (run.staged(JOB) > MIB).then_some(())?;
        d.runs(JOB).into_iter().find(|r| r.status == "running").map(|r| r.id)
    });

    // app02 (a valid certificate, no grant) and a compromised backup01 (its
    // own certificate, from outside its agent) at db01's data port.
    let peer = |stem: &str| {
        let tls = dicops_net::TlsReloader::load(d.pki.files(stem)).expect("tls");
        let url = format!("https://{}:9444", address("db01"));
        dicops_net::HttpsClient::new(&url, dicops_proto::Identity::Agent("db01".into()), tls).expect("client")
    };
    let (mut app02, mut backup01) = (peer("agent-app02"), peer("agent-backup01"));
    let ask = |client: &mut dicops_net::HttpsClient, method: hyper::Method, path: &str, body: Option<Vec<u8>>| {
        let (status, body) = d
            .runtime
            .block_on(client.request(method, path, body))
            .expect("an answer");
        let reason = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (status.as_u16(), reason)
    };
    let manifest = format!("/data/v1/runs/{id}/manifest");
    let chunks = format!("/data/v1/runs/{id}/chunks");
    // (what db01 answered, what it must answer): HTTP status and reason.
    type Answer = (u16, String);
    let cases: Vec<(Answer, (u16, &str))> = vec![
        (
            ask(&mut app02, hyper::Method::GET, &manifest, None),
            (403, "wrong_peer"),
        ),
        (
            ask(&mut backup01, hyper::Method::GET, "/data/v1/runs/999999/manifest", None),
            (404, "no_grant"),
        ),
        (
            ask(
                &mut backup01,
                hyper::Method::GET,
                "/data/v1/runs/../../etc/passwd",
                None,
            ),
            (404, "not_found"),
        ),
        (
            ask(&mut backup01, hyper::Method::POST, &chunks, Some(b"{not json".to_vec())),
            (400, "malformed"),
        ),
        (
            ask(&mut backup01, hyper::Method::POST, &chunks, Some(vec![b'x'; 5 << 20])),
            (400, "malformed"),
        ),
        (
            ask(
                &mut backup01,
                hyper::Method::POST,
                &chunks,
                Some(format!("{{\"ids\":[\"{}\"],\"compress\":false}}", "ab".repeat(32)).into_bytes()),
            ),
            (404, "unknown_chunk"),
        ),
    ];
    for (got, (status, reason)) in &cases {
        assert_eq!(got.1, *reason, "{got:?}");
        assert_eq!(got.0, *status, "{got:?}");
    }

    // Counted: in db01's next reports, on the controller's /metrics.
    let expected: Vec<(&str, f64)> = vec![
        ("wrong_peer", 1.0),
        ("no_grant", 1.0),
        ("not_found", 1.0),
        ("malformed", 2.0),
        ("unknown_chunk", 1.0),
    ];
    wait_until(Duration::from_secs(15), "db01's refusals on /metrics", || {
        let metrics = d.metrics();
        expected
            .iter()
            .all(|(reason, n)| {
                sample(
                    &metrics,
                    "dicops_agent_data_refusals_total",
                    &[("agent", "db01"), ("reason", reason)],
                ) >= Some(*n)
            })
            .then_some(())
    });
    // Logged, with the reason.
    let log = std::fs::read_to_string(d.path("agent-db01.log")).expect("db01 log");
    for (reason, _) in &expected {
        assert!(
            log.lines()
                .any(|l| l.contains("data request refused") && l.contains(reason)),
            "db01 must log the {reason} refusal"
        );
    }
    // Nothing crashed, and the real run, from the real backup01, completes.
    wait_until(Duration::from_secs(60), "the real run to succeed", || {
        d.runs(JOB).into_iter().find(|r| r.id == id && r.status == "succeeded")
    });
    assert_eq!(tree(&run.replicas.join(JOB).join("latest")), tree(&run.source));
    assert_snapshots_whole(&run.replicas.join(JOB));
}
