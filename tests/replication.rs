//! Replication with real agents in two sites: the destination pulls over
//! mutual TLS from the source's data port and publishes snapshots.

mod harness;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::files::{assert_snapshots_whole, noise, tree, write, write_old, SmallDisk};
use harness::{free_port, promtool_check_metrics, sample, wait_until, Deployment, Process};

/// Pseudo-random bytes (xorshift), reproducible and incompressible.
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

/// The controller and both agents of [`sites`], running and reporting.
struct Running {
    _controller: Process,
    db01: Process,
    backup01: Process,
}

impl Sites {
    fn start(&self) -> Running {
        let d = &self.d;
        let running = Running {
            _controller: d.start_controller(),
            db01: d.start_agent("db01"),
            backup01: d.start_agent("backup01"),
        };
        d.wait_agents_up(&["db01", "backup01"], Duration::from_secs(20));
        running
    }
}

/// The source db01's log line of the last manifest it built.
fn last_manifest_line(d: &Deployment) -> String {
    let source_log = std::fs::read_to_string(d.path("agent-db01.log")).expect("log");
    source_log
        .lines()
        .rfind(|l| l.contains("manifest built"))
        .expect("manifest log")
        .to_string()
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
    write_old(&s.source.join("2026-11-27/db.dump"), &dump);
    for i in 0..40 {
        write_old(
            &s.source.join(format!("conf/file-{i:02}.txt")),
            format!("setting {i}\n").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("/etc/passwd", s.source.join("escape")).expect("symlink");
    let d = &s.d;
    let _running = s.start();

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
    write_old(&s.source.join("2026-11-28/db.dump"), &next);
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

    // Nothing changed: nothing crosses, not even the manifest, and no new
    // snapshot is made (it would be the newest one again).
    let third = run_job(d, "dumps-to-dc2");
    assert_eq!(third.bytes, Some(0), "{third:?}");
    // And the source did not read its unchanged tree again: chunk lists
    // came from its cache.
    let last = last_manifest_line(d);
    assert!(
        last.contains(" read=0 ")
            && last.contains("unchanged=true")
            && (last.contains("cache_hits=42") || last.contains("from the tree state alone")),
        "{last}"
    );
    let snapshot_names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(job_dir.join("snapshots"))
            .expect("snapshots")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(snapshot_names().len(), 2);
    assert_eq!(std::fs::canonicalize(job_dir.join("latest")).expect("latest"), latest2);

    // One file changes: a third snapshot, and keep_last 2 drops the first.
    write_old(&s.source.join("conf/file-00.txt"), b"setting 0 changed\n");
    let fourth = run_job(d, "dumps-to-dc2");
    let wire_fourth = fourth.bytes.expect("bytes");
    assert!(wire_fourth < 1024, "one small file changed: sent {wire_fourth} bytes");
    assert_eq!(snapshot_names().len(), 2);
    assert!(!latest.exists(), "the oldest snapshot went to retention");
    assert!(latest2.exists());
    assert_eq!(
        tree(&std::fs::canonicalize(job_dir.join("latest")).expect("latest")),
        tree(&s.source)
    );
    // Once no file changed in the last seconds, an unchanged tree is
    // recognised from one lstat per file: no chunk cache, no manifest.
    std::thread::sleep(Duration::from_millis(2500));
    run_job(d, "dumps-to-dc2");
    let fifth = run_job(d, "dumps-to-dc2");
    assert_eq!(fifth.bytes, Some(0), "{fifth:?}");
    let last = last_manifest_line(d);
    assert!(
        last.contains("from the tree state alone") && last.contains("files=42"),
        "{last}"
    );
    assert_eq!(snapshot_names().len(), 2);
    // Retention lowered by a reload applies at the next run, changed or not.
    let config = d.path("controller.yaml");
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("keep_last: 2", "keep_last: 1");
    std::fs::write(&config, text).expect("write");
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let sixth = run_job(d, "dumps-to-dc2");
    assert_eq!(sixth.bytes, Some(0), "{sixth:?}");
    let kept = snapshot_names();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::canonicalize(job_dir.join("latest")).expect("latest"),
        job_dir.join("snapshots").join(&kept[0])
    );

    let metrics = d.metrics();
    let l = [("job", "dumps-to-dc2"), ("site", "dc2"), ("source_site", "dc1")];
    assert_eq!(sample(&metrics, "dicops_snapshots", &l), Some(1.0));
    assert_eq!(sample(&metrics, "dicops_replication_max_lag_seconds", &l), Some(3600.0));
    let lag = sample(&metrics, "dicops_replication_lag_seconds", &l).expect("lag");
    assert!(lag < 120.0, "{lag}");
    let sent = sample(
        &metrics,
        "dicops_replication_bytes_sent_total",
        &[("job", "dumps-to-dc2")],
    )
    .expect("sent");
    assert_eq!(sent as u64, wire_first + wire_second + wire_fourth);
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
        Some(7.0)
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
        let run = d.run_failing(job);
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
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
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
    let running = s.start();
    let db01 = &running.db01;
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
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
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

/// What the fake source sends.
#[derive(Clone, Copy, PartialEq)]
enum Hostile {
    Traversal,
    Absolute,
    CorruptChunk,
    NotUtf8,
    Oversized,
    MoreThanAnnounced,
}

/// A source with a valid certificate that lies: it plays a compromised
/// db01 on its data port.
fn fake_source(d: &Deployment, port: u16, cert: &str, mode: std::sync::Arc<std::sync::Mutex<Hostile>>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let tls = dicops_net::TlsReloader::load(d.pki.files(cert)).expect("tls");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
            loop {
                let Ok((tcp, addr)) = listener.accept().await else { continue };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                let mode = mode.clone();
                tokio::spawn(async move {
                    let Ok((stream, peer)) = dicops_net::server::accept(&acceptor, tcp, addr).await else {
                        return;
                    };
                    let handler = move |req: hyper::Request<hyper::body::Incoming>, _peer| {
                        let mode = *mode.lock().expect("mode");
                        async move {
                            let path = req.uri().path().to_string();
                            let run: i64 = path.split('/').nth(4).and_then(|r| r.parse().ok()).unwrap_or(0);
                            let data = b"twelve bytes".to_vec();
                            let id = blake3::hash(&data).to_hex().to_string();
                            let body = if path.ends_with("/manifest") {
                                let header = format!(
                                    "{{\"version\":1,\"job\":\"from-fake\",\"run_id\":{run},\"source_agent\":\"db01\",\"export\":\"dumps\",\"taken_at\":1.0,\"files\":1}}\n"
                                );
                                let name = match mode {
                                    Hostile::Traversal => "../../escape.txt",
                                    Hostile::Absolute => "/tmp/dicops-hostile-absolute.txt",
                                    _ => "ok.txt",
                                };
                                let entry = format!(
                                    "{{\"path\":\"{name}\",\"size\":12,\"mode\":420,\"mtime_ns\":0,\"blake3\":\"{id}\",\"chunks\":[{{\"id\":\"{id}\",\"len\":12}}]}}\n"
                                );
                                let mut body = (header + &entry).into_bytes();
                                if mode == Hostile::NotUtf8 {
                                    body.extend_from_slice(b"{\"path\":\"\xff\xfe.txt\",\"size\":0}\n");
                                }
                                if mode == Hostile::MoreThanAnnounced {
                                    let extra = entry.replace("ok.txt", "extra.txt");
                                    body.extend_from_slice(extra.as_bytes());
                                }
                                if mode == Hostile::Oversized {
                                    body.resize(65 << 20, b' ');
                                }
                                body
                            } else {
                                // The frame of the one chunk, with other bytes than its id says.
                                let mut frame = blake3::hash(&data).as_bytes().to_vec();
                                frame.push(0);
                                frame.extend_from_slice(&12u32.to_le_bytes());
                                frame.extend_from_slice(b"evil content");
                                frame
                            };
                            hyper::Response::new(Full::new(Bytes::from(body)))
                        }
                    };
                    dicops_net::server::serve_http1(stream, peer, handler, tokio_util::sync::CancellationToken::new()).await;
                });
            }
        });
    });
    // The fake announces its data port to the controller as db01 would.
    let report = dicops_proto::Report {
        agent: "db01".into(),
        seq: 1,
        instance: format!("fake-{port}"),
        collected_at: 1.0,
        interval_seconds: 60.0,
        info: Default::default(),
        health: Default::default(),
        report_failures: Default::default(),
        backups: Vec::new(),
        exports: Vec::new(),
        data_url: Some(format!("https://127.0.0.1:{port}")),
        data_refusals: Default::default(),
        certificate_expiry_timestamp_seconds: None,
    };
    let mut client = d.client("agent-db01");
    let (status, _) = d
        .runtime
        .block_on(client.request(
            hyper::Method::POST,
            dicops_proto::REPORT_PATH,
            Some(serde_json::to_vec(&report).expect("json")),
        ))
        .expect("report");
    assert!(status.is_success(), "{status}");
}

#[test]
fn a_lying_source_cannot_write_outside_the_root_or_publish_bad_data() {
    let s = sites(
        "  - {name: from-fake, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, retries: 0}\n",
    );
    let d = &s.d;
    let _controller = d.start_controller();
    let _backup01 = d.start_agent("backup01");
    d.wait_agents_up(&["backup01"], Duration::from_secs(20));
    let mode = std::sync::Arc::new(std::sync::Mutex::new(Hostile::Traversal));
    fake_source(d, s.data_port, "agent-db01", mode.clone());
    for (hostile, error) in [
        (Hostile::Traversal, "escapes the snapshot"),
        (Hostile::Absolute, "escapes the snapshot"),
        (Hostile::CorruptChunk, "damaged in transit"),
        (Hostile::NotUtf8, "malformed"),
        // 65 MiB of padding: read (manifests may reach 1 GiB), then refused.
        (Hostile::Oversized, "malformed"),
        (
            Hostile::MoreThanAnnounced,
            "more entries than the 1 its header announced",
        ),
    ] {
        *mode.lock().expect("mode") = hostile;
        let run = d.run_failing("from-fake");
        assert_eq!(run.status, "failed");
        assert!(
            run.error.clone().unwrap_or_default().contains(error),
            "{error}: {run:?}"
        );
    }
    // A data port that answers with another agent's certificate is not
    // the source the ticket names: refused before any request.
    let impostor = free_port();
    fake_source(d, impostor, "agent-app01", mode.clone());
    let refused = d.run_failing("from-fake");
    let error = refused.error.clone().unwrap_or_default();
    assert!(error.contains("app01") && error.contains("db01"), "{refused:?}");
    assert!(!d.path("escape.txt").exists() && !s.replicas.join("escape.txt").exists());
    assert!(!Path::new("/tmp/dicops-hostile-absolute.txt").exists());
    let snapshots = s.replicas.join("from-fake/snapshots");
    assert_eq!(
        std::fs::read_dir(&snapshots).map(|e| e.count()).unwrap_or(0),
        0,
        "nothing published"
    );
    // The destination agent is still serving everyone else.
    assert_eq!(
        sample(&d.metrics(), "dicops_agent_up", &[("agent", "backup01")]),
        Some(1.0)
    );
}

/// A small filesystem mounted for one test, unmounted when dropped.
#[test]
fn a_full_destination_disk_fails_the_run_and_keeps_earlier_snapshots() {
    let s = sites(
        "  - {name: fills, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, retries: 0}\n",
    );
    let _disk = SmallDisk::mount(&s.replicas, "6m");
    write(&s.source.join("small.dump"), &noise(2 << 20, 21));
    let d = &s.d;
    let _running = s.start();
    run_job(d, "fills");
    let first = std::fs::canonicalize(s.replicas.join("fills/latest")).expect("first snapshot");
    let before = tree(&first);

    // A dump that does not fit in what is left.
    write(&s.source.join("big.dump"), &noise(5 << 20, 22));
    let failed = d.run_failing("fills");
    assert!(
        failed
            .error
            .clone()
            .unwrap_or_default()
            .contains("No space left on device"),
        "{failed:?}"
    );
    assert_eq!(
        std::fs::canonicalize(s.replicas.join("fills/latest")).expect("latest"),
        first
    );
    assert_eq!(tree(&first), before, "the earlier snapshot is intact");

    // Once the big file is gone, the next run publishes.
    std::fs::remove_file(s.source.join("big.dump")).expect("rm");
    write(&s.source.join("note.txt"), b"after the disk filled\n");
    run_job(d, "fills");
    let latest = std::fs::canonicalize(s.replicas.join("fills/latest")).expect("latest");
    assert_ne!(latest, first);
    assert_eq!(tree(&latest), tree(&s.source));
}

/// Every snapshot folder holds exactly what its manifest says.
#[test]
fn agents_killed_at_random_moments_never_leave_a_partial_snapshot() {
    let iterations: usize = std::env::var("DICOPS_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let s = sites(
        "  - {name: crashy, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, bandwidth: 4MiB/s, retries: 10, retry_backoff: 1s, retry_backoff_max: 2s}\n",
    );
    let d = &s.d;
    let Running {
        _controller,
        mut db01,
        mut backup01,
    } = s.start();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let job_dir = s.replicas.join("crashy");
    for i in 0..iterations {
        // The source changes: a new dump, and the running one grows.
        write(&s.source.join(format!("day-{i:02}.dump")), &noise(1 << 20, random()));
        let newest = d.runs("crashy").first().map_or(0, |r| r.id);
        let (code, out, _) = d.cli(&["run", "crashy"]);
        assert_eq!(code, 0, "{out}");
        std::thread::sleep(Duration::from_millis(100 + random() % 900));
        if random() % 2 == 0 {
            db01.kill9();
            db01 = d.start_agent("db01");
        } else {
            backup01.kill9();
            backup01 = d.start_agent("backup01");
        }
        assert_snapshots_whole(&job_dir);
        let done = wait_until(Duration::from_secs(90), "a run of this round succeeds", || {
            d.runs("crashy")
                .into_iter()
                .find(|r| r.id > newest && r.status == "succeeded")
        });
        let latest = std::fs::canonicalize(job_dir.join("latest")).expect("latest");
        assert_eq!(tree(&latest), tree(&s.source), "round {i}, run {}", done.id);
        assert_snapshots_whole(&job_dir);
    }
}

#[test]
fn a_file_changing_during_the_transfer_is_never_published_torn() {
    let s = sites(
        "  - {name: moving, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, bandwidth: 1MiB/s, retries: 2, retry_backoff: 1s}\n",
    );
    write(&s.source.join("live.dump"), &noise(4 << 20, 31));
    let d = &s.d;
    let _running = s.start();
    let (code, _, _) = d.cli(&["run", "moving"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "run started", || {
        d.runs("moving").first().map(|r| r.id)
    });
    wait_until(Duration::from_secs(20), "transfer under way", || {
        (d.run(id).progress.as_ref().and_then(|p| p.bytes).unwrap_or(0) > 0).then_some(())
    });
    // Rewritten in place while the destination is fetching it.
    let rewritten = noise(4 << 20, 32);
    std::fs::write(s.source.join("live.dump"), &rewritten).expect("rewrite");
    let first = wait_until(Duration::from_secs(30), "first attempt ended", || {
        let r = d.run(id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(first.status, "failed", "{first:?}");
    assert!(
        first
            .error
            .clone()
            .unwrap_or_default()
            .contains("changed since the manifest was taken"),
        "{first:?}"
    );
    wait_until(Duration::from_secs(60), "a retry publishes", || {
        d.runs("moving")
            .into_iter()
            .find(|r| r.trigger == "retry" && r.status == "succeeded")
    });
    let latest = std::fs::canonicalize(s.replicas.join("moving/latest")).expect("latest");
    assert_eq!(std::fs::read(latest.join("live.dump")).expect("read"), rewritten);
}

#[test]
fn the_link_budget_is_shared_and_a_reload_changes_it_without_restarting_the_run() {
    let mut s = sites(
        "  - {name: linked, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, retries: 0}\n",
    );
    s.d.controller_extra += "links:\n  - sites: [dc1, dc2]\n    bandwidth: 256KiB/s\n";
    write(&s.source.join("db.dump"), &noise(4 << 20, 41));
    let d = &s.d;
    let _running = s.start();
    let (code, _, _) = d.cli(&["run", "linked"]);
    assert_eq!(code, 0);
    let id = wait_until(Duration::from_secs(10), "run started", || {
        d.runs("linked").first().map(|r| r.id)
    });
    let moving = wait_until(Duration::from_secs(20), "transfer under way", || {
        let r = d.run(id);
        r.progress
            .as_ref()
            .and_then(|p| p.bytes)
            .filter(|b| *b > 0)
            .map(|_| std::time::Instant::now())
    });
    std::thread::sleep(Duration::from_secs(2));
    let early = d.run(id).progress.and_then(|p| p.bytes).unwrap_or(0);
    let elapsed = moving.elapsed().as_secs_f64() + 1.0;
    assert!(
        (early as f64) <= 256.0 * 1024.0 * (elapsed + 1.0),
        "{early} bytes in about {elapsed:.1} s at 256 KiB/s"
    );
    // The link is upgraded: a reload, and the running transfer speeds up.
    let config = d.path("controller.yaml");
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("256KiB/s", "8MiB/s");
    std::fs::write(&config, text).expect("write");
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let done = wait_until(Duration::from_secs(60), "run ended", || {
        let r = d.run(id);
        (!matches!(r.status.as_str(), "queued" | "running")).then_some(r)
    });
    assert_eq!(done.status, "succeeded", "{done:?}");
    let log = std::fs::read_to_string(d.path("agent-backup01.log")).expect("log");
    assert!(
        log.contains("bandwidth changed by the controller") && log.contains("Some(8388608)"),
        "the running pull took the new rate: {log}"
    );
}

#[test]
fn verify_finds_damage_repairs_from_the_source_and_reports_what_is_lost() {
    let s = sites(
        "  - {name: dumps-to-dc2, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}}\nverifications:\n  - {name: verify-dumps, replication: dumps-to-dc2, retries: 0}\n",
    );
    let a = noise(2 << 20, 51);
    write(&s.source.join("a.dump"), &a);
    write(&s.source.join("b.dump"), &noise(1 << 20, 52));
    write(&s.source.join("c.txt"), b"intact\n");
    let d = &s.d;
    let _running = s.start();
    run_job(d, "dumps-to-dc2");
    let (code, out, _) = d.cli(&["run", "verify-dumps", "--follow"]);
    assert_eq!(code, 0, "a clean snapshot verifies: {out}");

    // Bit rot in two files of the snapshot; the source has since deleted one.
    let snapshot = std::fs::canonicalize(s.replicas.join("dumps-to-dc2/latest")).expect("latest");
    for (name, at) in [("a.dump", 1_500_000usize), ("b.dump", 10usize)] {
        let path = snapshot.join(name);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).expect("rot");
    }
    std::fs::remove_file(s.source.join("b.dump")).expect("rm at the source");

    let run = d.run_failing("verify-dumps");
    assert!(run.error.clone().unwrap_or_default().contains("b.dump"), "{run:?}");
    assert!(
        run.output_tail
            .clone()
            .unwrap_or_default()
            .contains("2 damaged, 1 repaired from the source, 1 lost"),
        "{run:?}"
    );
    assert_eq!(
        std::fs::read(snapshot.join("a.dump")).expect("read"),
        a,
        "repaired in place"
    );
    let metrics = d.metrics();
    assert_eq!(
        sample(&metrics, "dicops_verify_errors_total", &[("job", "verify-dumps")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "dicops_verify_lost_files", &[("job", "verify-dumps")]),
        Some(1.0)
    );
    promtool_check_metrics(&metrics);
}

#[test]
fn chunks_travel_compressed_when_that_pays() {
    let s = sites(
        "  - {name: zstd, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}}\n  - {name: raw, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, compression: none}\n",
    );
    let rows: String = (0..40_000)
        .map(|i| format!("{i}\tcustomer-{:05}\tpaid\t2026-11-27\n", i % 9000))
        .collect();
    write(&s.source.join("orders.sql"), rows.as_bytes());
    let d = &s.d;
    let _running = s.start();
    let size = rows.len() as u64;
    let compressed = run_job(d, "zstd").bytes.expect("bytes");
    let raw = run_job(d, "raw").bytes.expect("bytes");
    assert!(
        compressed < size / 3,
        "{compressed} bytes on the wire for {size} bytes of SQL rows"
    );
    assert!(raw >= size, "compression: none sends {raw} bytes for {size}");
    for job in ["zstd", "raw"] {
        let latest = std::fs::canonicalize(s.replicas.join(job).join("latest")).expect("latest");
        assert_eq!(std::fs::read(latest.join("orders.sql")).expect("read"), rows.as_bytes());
    }
}

#[test]
fn a_flood_of_connections_to_the_data_port_is_refused_and_runs_go_on() {
    let s = sites(
        "  - {name: flooded, source: {agent: db01, export: dumps}, destination: {agent: backup01, root: replicas}, retries: 0}\n",
    );
    write(&s.source.join("db.dump"), &noise(256 << 10, 41));
    let d = &s.d;
    let _running = s.start();
    // More idle connections than the data port holds (64), none finishing
    // its TLS handshake.
    let flood: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", s.data_port)).expect("connect"))
        .collect();
    wait_until(Duration::from_secs(10), "the refusal logged", || {
        let log = std::fs::read_to_string(d.path("agent-db01.log")).unwrap_or_default();
        log.contains("data port: too many open connections; refusing")
            .then_some(())
    });
    // The agent still reports while its data port is full.
    d.wait_agents_up(&["db01"], Duration::from_secs(10));
    drop(flood);
    // The slots come back as the flood's connections close.
    let run = run_job(d, "flooded");
    assert_eq!(run.status, "succeeded", "{run:?}");
    let latest = std::fs::canonicalize(s.replicas.join("flooded/latest")).expect("latest");
    assert_eq!(tree(&latest), tree(&s.source));
}
