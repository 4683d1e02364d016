//! Scheduler benchmark (issue 3): 1,000 jobs firing every minute across
//! 2,000 agents. The real scheduler and SQLite store run in this process;
//! 2,000 simulated agents long-poll through the same `Scheduler::poll` the
//! HTTP handler uses and send a success result as soon as they get a task
//! (recorded under `block_in_place`, as the HTTP handler does).
//! No TLS or HTTP: this measures the scheduler, not the transport (the
//! report benchmark in bench/ measures that).
//!
//! Prints, per minute: process CPU seconds (scheduler + store + the cheap
//! simulated agents, so an upper bound for the scheduler), runs recorded,
//! and the delay from each fire's due time (the minute boundary) to the
//! moment its agent holds the task: p50, p99, max.
//!
//! Run: cargo bench -p dicops-controller --bench scheduler -- [MINUTES]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{Timelike, Utc};
use dicops_config::ControllerConfig;
use dicops_controller::scheduler::Scheduler;
use dicops_controller::store::Store;
use dicops_controller::Metrics;
use dicops_proto::{TaskOutcome, TaskResult};

const AGENTS: usize = 2000;
const JOBS: usize = 1000;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; clock ticks are 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let minutes: u32 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut yaml = String::from(
        "listen: 127.0.0.1:1\ntls: {ca: a, cert: b, key: c}\nstate: {database: controller.db}\nlimits: {concurrent_runs_per_site_pair: 2000}\nsites: [{name: dc1}, {name: dc2}]\nagents:\n",
    );
    for i in 0..AGENTS {
        yaml.push_str(&format!("  - {{id: a{i:04}, site: dc{}}}\n", 1 + i % 2));
    }
    yaml.push_str("jobs:\n");
    for j in 0..JOBS {
        yaml.push_str(&format!(
            "  - {{name: j{j:04}, agent: a{:04}, command: x, schedule: \"* * * * *\"}}\n",
            j * 2
        ));
    }
    let path = dir.path().join("controller.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let config = Arc::new(ControllerConfig::load_without_files(&path).expect("config"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = Arc::new(Store::open(&config.database).expect("store"));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let scheduler = Arc::new(Scheduler::start(store, config, &metrics, Utc::now()).expect("scheduler"));
        let delays: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));

        for i in 0..AGENTS {
            let scheduler = scheduler.clone();
            let metrics = metrics.clone();
            let delays = delays.clone();
            tokio::spawn(async move {
                let agent = format!("a{i:04}");
                loop {
                    let Ok(poll) = scheduler.poll(&agent, Duration::from_secs(25)).await else {
                        continue;
                    };
                    for task in poll.tasks {
                        let now = Utc::now();
                        let due = now.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap_or(now);
                        let delay = (now - due).num_microseconds().unwrap_or(0) as f64 / 1e6;
                        delays.lock().unwrap_or_else(|p| p.into_inner()).push(delay);
                        let at = now.timestamp_millis() as f64 / 1000.0;
                        let result = TaskResult {
                            run_id: task.run_id,
                            job: task.job.clone(),
                            outcome: TaskOutcome::Succeeded,
                            error: None,
                            exit_code: Some(0),
                            started_at: at,
                            finished_at: at,
                            output_tail: String::new(),
                            bytes: None,
                            files: None,
                            output_dir: None,
                            artifacts: Vec::new(),
                            artifacts_omitted: 0,
                            replication: None,
                            verify: None,
                        };
                        if let Err(e) = tokio::task::block_in_place(|| {
                            scheduler.record_result(&agent, &result, &metrics, Utc::now())
                        }) {
                            eprintln!("result refused: {e}");
                        }
                    }
                }
            });
        }
        // The scheduler loop, as in the controller.
        {
            let scheduler = scheduler.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                loop {
                    let now = Utc::now();
                    let next = scheduler
                        .tick(&metrics, now)
                        .unwrap_or(now + chrono::Duration::seconds(1));
                    let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::select! {
                        _ = scheduler.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            });
        }

        // Measure whole minutes: start at the next boundary + 30 s (mid-minute).
        let now = Utc::now();
        let to_mid = 90 - now.second() as i64;
        tokio::time::sleep(Duration::from_secs(to_mid as u64 % 60)).await;
        println!("{JOBS} jobs every minute on {AGENTS} agents; measuring {minutes} minute(s)");
        println!(
            "{:>6} {:>10} {:>8} {:>10} {:>10} {:>10}",
            "minute", "cpu_s", "runs", "p50_ms", "p99_ms", "max_ms"
        );
        let mut all = Vec::new();
        for minute in 1..=minutes {
            let cpu_before = cpu_seconds();
            delays.lock().unwrap_or_else(|p| p.into_inner()).clear();
            tokio::time::sleep(Duration::from_secs(60)).await;
            let cpu = cpu_seconds() - cpu_before;
            let mut got = std::mem::take(&mut *delays.lock().unwrap_or_else(|p| p.into_inner()));
            got.sort_by(f64::total_cmp);
            println!(
                "{minute:>6} {cpu:>10.3} {:>8} {:>10.1} {:>10.1} {:>10.1}",
                got.len(),
                percentile(&got, 0.5) * 1000.0,
                percentile(&got, 0.99) * 1000.0,
                got.last().copied().unwrap_or(f64::NAN) * 1000.0
            );
            all.extend(got);
        }
        all.sort_by(f64::total_cmp);
        println!(
            "all: {} dispatches, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            all.len(),
            percentile(&all, 0.5) * 1000.0,
            percentile(&all, 0.99) * 1000.0,
            all.last().copied().unwrap_or(f64::NAN) * 1000.0
        );
        std::process::exit(0);
    });
}
