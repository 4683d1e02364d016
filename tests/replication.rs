//! Replication with real agents in two sites: the destination pulls over
//! mutual TLS from the source's data port and publishes snapshots.

mod harness;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{free_port, promtool_check_metrics, sample, wait_until, Deployment};

/// Pseudo-random bytes (xorshift), reproducible and incompressible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Every regular file under `dir`, relative, sorted, with its content.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("meta");
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(dir).expect("rel").to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&path).expect("read")));
            }
        }
    }
    out.sort();
    out
}

struct Sites {
    d: Deployment,
    source: PathBuf,
    replicas: PathBuf,
    data_port: u16,
}

/// db01 in dc1 exports `dumps`; backup01 in dc2 may write under `replicas`.
fn sites(replications: &str) -> Sites {
    let mut d = Deployment::new(&[("dc1", &["db01", "app01"]), ("dc2", &["backup01"])]);
    let source = d.path("source");
    let replicas = d.path("replicas");
    std::fs::create_dir_all(&source).expect("source");
    std::fs::create_dir_all(&replicas).expect("replicas");
    let data_port = free_port();
    d.agent_extras = vec![
        (
            "db01".into(),
            format!(
                "data: {{listen: \"127.0.0.1:{data_port}\", url: \"https://127.0.0.1:{data_port}\"}}\nexports: {{dumps: {}}}\n",
                source.display()
            ),
        ),
        ("backup01".into(), format!("roots: {{replicas: {}}}\n", replicas.display())),
    ];
    d.controller_extra = format!("replications:\n{replications}");
    Sites {
        d,
        source,
        replicas,
        data_port,
    }
}

fn run_job(d: &Deployment, job: &str) -> dicops_proto::RunInfo {
    let (code, out, err) = d.cli(&["run", job, "--follow"]);
    let run = d.runs(job).remove(0);
    assert_eq!(code, 0, "{out}{err}\n{run:?}");
    run
}

#[test]
fn snapshots_are_published_whole_and_later_runs_send_only_what_changed() {
    let s = sites(
        "  - {name: dumps-to-dc2, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, max_lag: 1h, retention: {keep_last: 2}}\n",
    );
    let dump = noise(2 << 20, 7);
    write(&s.source.join("2026-11-27/db.dump"), &dump);
    for i in 0..40 {
        write(
            &s.source.join(format!("conf/file-{i:02}.txt")),
            format!("setting {i}\n").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("/etc/passwd", s.source.join("escape")).expect("symlink");
    let d = &s.d;
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    let _backup01 = d.start_agent("backup01");
    d.wait_agents_up(&["db01", "backup01"], Duration::from_secs(20));

    let first = run_job(d, "dumps-to-dc2");
    let job_dir = s.replicas.join("dumps-to-dc2");
    let latest = std::fs::canonicalize(job_dir.join("latest")).expect("latest points at a snapshot");
    assert!(latest.starts_with(job_dir.join("snapshots")), "{}", latest.display());
    let expected: Vec<(String, Vec<u8>)> = tree(&s.source);
    assert_eq!(tree(&latest), expected, "byte-identical, without the symlink");
    assert!(!latest.join("escape").exists());
    let wire_first = first.bytes.expect("bytes on the wire");
    assert!(wire_first >= 2 << 20, "the first run sends everything: {wire_first}");
    let snapshot_file = latest.join("2026-11-27/db.dump");
    assert!(
        std::fs::metadata(&snapshot_file)
            .expect("meta")
            .permissions()
            .readonly(),
        "snapshots are read only"
    );

    // A new dump under a new name, 5% of it changed: only that crosses.
    let mut next = dump.clone();
    for byte in &mut next[1 << 20..(1 << 20) + (100 << 10)] {
        *byte = byte.wrapping_add(1);
    }
    write(&s.source.join("2026-11-28/db.dump"), &next);
    let second = run_job(d, "dumps-to-dc2");
    let wire_second = second.bytes.expect("bytes");
    assert!(
        wire_second < 512 << 10,
        "100 KiB changed in a 2 MiB dump under a new name: sent {wire_second} bytes"
    );
    let latest2 = std::fs::canonicalize(job_dir.join("latest")).expect("latest");
    assert_ne!(latest, latest2);
    assert_eq!(tree(&latest2), tree(&s.source));
    // Unchanged files are hard links to the previous snapshot.
    let linked = std::fs::metadata(latest2.join("conf/file-00.txt")).expect("meta");
    assert_eq!(linked.nlink(), 2, "linked, not copied");
    assert_eq!(
        linked.ino(),
        std::fs::metadata(latest.join("conf/file-00.txt")).expect("meta").ino()
    );

    // Nothing changed: nothing crosses; keep_last 2 drops the first snapshot.
    let third = run_job(d, "dumps-to-dc2");
    assert_eq!(third.bytes, Some(0), "{third:?}");
    let names: Vec<String> = std::fs::read_dir(job_dir.join("snapshots"))
        .expect("snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!latest.exists(), "the oldest snapshot went to retention");

    let metrics = d.metrics();
    let l = [("job", "dumps-to-dc2"), ("site", "dc2"), ("source_site", "dc1")];
    assert_eq!(sample(&metrics, "dicops_snapshots", &l), Some(2.0));
    assert_eq!(sample(&metrics, "dicops_replication_max_lag_seconds", &l), Some(3600.0));
    let lag = sample(&metrics, "dicops_replication_lag_seconds", &l).expect("lag");
    assert!(lag < 120.0, "{lag}");
    let sent = sample(
        &metrics,
        "dicops_replication_bytes_sent_total",
        &[("job", "dumps-to-dc2")],
    )
    .expect("sent");
    assert_eq!(sent as u64, wire_first + wire_second);
    let reused = sample(
        &metrics,
        "dicops_replication_bytes_reused_total",
        &[("job", "dumps-to-dc2")],
    )
    .expect("reused");
    assert!(reused > (4 << 20) as f64, "{reused}");
    assert_eq!(
        sample(
            &metrics,
            "dicops_replication_runs_total",
            &[("job", "dumps-to-dc2"), ("result", "succeeded")]
        ),
        Some(3.0)
    );
    promtool_check_metrics(&metrics);

    // The cross-site audit: what the source site holds that the other
    // site does not.
    let audited = |files: f64| {
        wait_until(Duration::from_secs(15), "the source's audit", || {
            let m = d.metrics();
            (sample(&m, "dicops_replication_unreplicated_files", &l) == Some(files)).then_some(m)
        })
    };
    audited(0.0);
    let (code, out, _) = d.cli(&["audit"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dumps-to-dc2") && out.contains("nothing"), "{out}");
    write(&s.source.join("2026-11-29/db.dump"), &noise(300_000, 9));
    let metrics = audited(1.0);
    assert_eq!(
        sample(&metrics, "dicops_replication_unreplicated_bytes", &l),
        Some(300_000.0)
    );
    let (_, out, _) = d.cli(&["audit"]);
    assert!(out.contains("1 file(s), 293.0 KiB"), "{out}");
}

#[test]
fn agents_refuse_what_their_own_config_does_not_allow() {
    let s = sites(
        "  - {name: secret, source: {agent: db01, export: etc}, destination: {agent: backup01, root: replicas}, retries: 0}\n  - {name: elsewhere, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: tmp}, retries: 0}\n  - {name: no-port, source: {agent: app01, export: dumps}, destination: {agent: backup01, root: replicas}, retries: 0}\n  - {name: slow, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, bandwidth: 256KiB/s, retries: 0}\n",
    );
    write(&s.source.join("db.dump"), &noise(3 << 20, 3));
    let d = &s.d;
    let _controller = d.start_controller();
    let _db01 = d.start_agent("db01");
    let _app01 = d.start_agent("app01");
    let _backup01 = d.start_agent("backup01");
    d.wait_agents_up(&["db01", "app01", "backup01"], Duration::from_secs(20));
    for (job, error) in [
        ("secret", "export \"etc\" is not in the `exports:` of agent db01"),
        (
            "elsewhere",
            "root \"tmp\" is not in the `roots:` of this agent's config",
        ),
        ("no-port", "source agent app01 has not announced a data port"),
    ] {
        let (code, out, _) = d.cli(&["run", job, "--follow"]);
        assert_eq!(code, 1, "{out}");
        let run = d.runs(job).remove(0);
        assert_eq!(run.status, "failed");
        assert!(run.error.clone().unwrap_or_default().contains(error), "{job}: {run:?}");
    }
    assert!(!s
        .replicas
        .join("secret")
        .join("snapshots")
        .read_dir()
        .is_ok_and(|mut e| e.next().is_some()));

    // While a run is granted to backup01, another agent of the deployment
    // is refused by the source, and nothing but that run is served.
    let (code, _, _) = d.cli(&["run", "slow"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(15), "transfer going", || {
        d.runs("slow")
            .into_iter()
            .find(|r| r.status == "running" && r.started_at.is_some())
            .map(|r| r.id)
    });
    let url = format!("https://127.0.0.1:{}", s.data_port);
    let tls = dicops_net::TlsReloader::load(d.pki.files("agent-app01")).expect("tls");
    let mut intruder =
        dicops_net::HttpsClient::new(&url, dicops_proto::Identity::Agent("db01".into()), tls).expect("client");
    let (status, body) = d
        .runtime
        .block_on(intruder.request(hyper::Method::GET, &format!("/data/v1/runs/{id}/manifest"), None))
        .expect("answer");
    assert_eq!(status.as_u16(), 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("wrong_peer"));
    let (status, _) = d
        .runtime
        .block_on(intruder.request(hyper::Method::GET, "/data/v1/runs/999999/manifest", None))
        .expect("answer");
    assert_eq!(status.as_u16(), 404);

    // The bandwidth limit holds: 3 MiB at 256 KiB/s takes about 12 s.
    let done = wait_until(Duration::from_secs(60), "slow run done", || {
        let r = d.run(id);
        (r.status != "running").then_some(r)
    });
    assert_eq!(done.status, "succeeded", "{done:?}");
    let took = done.finished_at.expect("end") - done.started_at.expect("start");
    assert!(took >= 10.0, "3 MiB at 256 KiB/s took {took} s");
}

#[test]
fn a_stalled_transfer_is_aborted_and_its_retry_resumes_without_resending() {
    let s = sites(
        "  - {name: stalls, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, bandwidth: 512KiB/s, stall_timeout: 5s, retries: 1, retry_backoff: 4s}\n",
    );
    write(&s.source.join("db.dump"), &noise(4 << 20, 11));
    let d = &s.d;
    let _controller = d.start_controller();
    let db01 = d.start_agent("db01");
    let _backup01 = d.start_agent("backup01");
    d.wait_agents_up(&["db01", "backup01"], Duration::from_secs(20));
    let (code, _, _) = d.cli(&["run", "stalls"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "run started", || {
        d.runs("stalls").first().map(|r| r.id)
    });
    let first = wait_until(Duration::from_secs(20), "a megabyte moved", || {
        let r = d.run(id);
        (r.progress.as_ref().and_then(|p| p.bytes).unwrap_or(0) >= 1 << 20).then_some(r)
    });
    // The source freezes (a hung process, a dead link that never resets).
    db01.signal("STOP");
    let failed = wait_until(Duration::from_secs(30), "stall detected", || {
        let r = d.run(first.id);
        (r.status != "running").then_some(r)
    });
    db01.signal("CONT");
    assert_eq!(failed.status, "failed");
    assert!(
        failed
            .error
            .clone()
            .unwrap_or_default()
            .contains("no data moved for 5 s (stall_timeout)"),
        "{failed:?}"
    );
    assert!(
        !s.replicas.join("stalls/latest").exists(),
        "nothing published by the stalled run"
    );
    let retry = wait_until(Duration::from_secs(60), "the retry succeeds", || {
        d.runs("stalls")
            .into_iter()
            .find(|r| r.trigger == "retry" && r.status == "succeeded")
    });
    let latest = std::fs::canonicalize(s.replicas.join("stalls/latest")).expect("published");
    assert_eq!(tree(&latest), tree(&s.source));
    let resent = retry.bytes.expect("bytes");
    assert!(
        resent <= (3 << 20) + (512 << 10),
        "the chunks verified before the stall are not sent again: the retry sent {resent} of 4 MiB"
    );
}
