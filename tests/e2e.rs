//! End to end: real controller and agent processes with real certificates.

mod harness;

use std::time::Duration;

use harness::{dicops, sample, wait_until, Deployment};

#[test]
fn two_sites_report_and_show_up_on_metrics_status_and_cli() {
    let d = Deployment::new(&[("dc1", &["db01", "app01"]), ("dc2", &["backup01", "app02"])]);
    let _controller = d.start_controller();
    let _agents: Vec<_> = ["db01", "app01", "backup01", "app02"]
        .iter()
        .map(|a| d.start_agent(a))
        .collect();
    d.wait_agents_up(&["db01", "app01", "backup01", "app02"], Duration::from_secs(30));

    let metrics = d.metrics();
    harness::promtool_check_metrics(&metrics);
    for site in ["dc1", "dc2"] {
        assert_eq!(sample(&metrics, "dicops_site_reachable", &[("site", site)]), Some(1.0));
        assert_eq!(sample(&metrics, "dicops_site_agents_up", &[("site", site)]), Some(2.0));
    }
    // Hosts are labelled with site and agent, never `instance`.
    let memory = sample(
        &metrics,
        "dicops_host_memory_total_bytes",
        &[("site", "dc2"), ("agent", "backup01")],
    )
    .expect("memory");
    assert!(memory > 0.0);
    assert!(!metrics.contains("instance=\""));
    let cpu = sample(&metrics, "dicops_host_cpu_usage_ratio", &[("agent", "db01")]).expect("cpu");
    assert!((0.0..=1.0).contains(&cpu));
    assert!(sample(
        &metrics,
        "dicops_host_filesystem_size_bytes",
        &[("agent", "db01"), ("mountpoint", "/")]
    )
    .is_some());
    // The configured path is measured with statvfs.
    let root = d.root.path().display().to_string();
    assert_eq!(
        sample(
            &metrics,
            "dicops_host_path_state",
            &[("agent", "app02"), ("path", &root), ("state", "ok")]
        ),
        Some(1.0)
    );
    assert!(sample(
        &metrics,
        "dicops_agent_info",
        &[("agent", "app01"), ("version", env!("CARGO_PKG_VERSION"))]
    )
    .is_some());
    let expiry = sample(
        &metrics,
        "dicops_tls_certificate_expiry_timestamp_seconds",
        &[("cert", "agent"), ("agent", "db01")],
    )
    .expect("agent expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now + 300.0 * 86400.0,
        "the default agent certificate lasts 397 days"
    );
    assert!(sample(
        &metrics,
        "dicops_tls_certificate_expiry_timestamp_seconds",
        &[("cert", "controller")]
    )
    .is_some());
    assert!(sample(&metrics, "process_resident_memory_bytes", &[]).is_some());
    assert!(sample(&metrics, "dicops_build_info", &[]).is_some());

    let (_, body) = d.get("/metrics");
    assert!(!body.is_empty());

    let cli = d.cli_yaml();
    let out = dicops(&["status", "--config", cli.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SITE dc1: 2/2 agents up"), "{text}");
    assert!(text.contains("SITE dc2: 2/2 agents up"), "{text}");
    for agent in ["db01", "app01", "backup01", "app02"] {
        assert!(
            text.lines().any(|l| l.contains(agent) && l.contains(" up ")),
            "{agent} in\n{text}"
        );
    }
}

#[test]
fn silent_agents_go_down_and_a_silent_site_is_unreachable() {
    let mut d = Deployment::new(&[("dc1", &["db01", "app01"]), ("dc2", &["backup01"])]);
    d.down_after = 2;
    let _controller = d.start_controller();
    let mut db01 = d.start_agent("db01");
    let mut app01 = d.start_agent("app01");
    let _backup01 = d.start_agent("backup01");
    d.wait_agents_up(&["db01", "app01", "backup01"], Duration::from_secs(30));

    // The whole of dc1 goes silent.
    db01.kill9();
    app01.kill9();
    let metrics = wait_until(Duration::from_secs(20), "dc1 unreachable", || {
        let m = d.metrics();
        (sample(&m, "dicops_site_reachable", &[("site", "dc1")]) == Some(0.0)).then_some(m)
    });
    assert_eq!(sample(&metrics, "dicops_agent_up", &[("agent", "db01")]), Some(0.0));
    assert_eq!(sample(&metrics, "dicops_agent_up", &[("agent", "app01")]), Some(0.0));
    // Their host gauges are no longer exported: a silent host never looks healthy.
    assert_eq!(
        sample(&metrics, "dicops_host_cpu_usage_ratio", &[("agent", "db01")]),
        None
    );
    assert_eq!(
        sample(&metrics, "dicops_host_memory_available_bytes", &[("agent", "app01")]),
        None
    );
    // Their last report time stays, so an operator sees how long ago it was.
    assert!(sample(
        &metrics,
        "dicops_agent_last_report_timestamp_seconds",
        &[("agent", "db01")]
    )
    .is_some());
    // The other site is fine.
    assert_eq!(sample(&metrics, "dicops_site_reachable", &[("site", "dc2")]), Some(1.0));
    assert_eq!(sample(&metrics, "dicops_agent_up", &[("agent", "backup01")]), Some(1.0));

    let status = d.status();
    let dc1 = status.sites.iter().find(|s| s.name == "dc1").expect("dc1");
    assert!(!dc1.reachable);
    let cli = d.cli_yaml();
    let out = dicops(&["status", "--config", cli.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SITE dc1: UNREACHABLE: 0/2 agents up"), "{text}");
}

#[test]
fn agents_reconnect_by_themselves_after_the_controller_restarts() {
    let d = Deployment::new(&[("dc1", &["db01"]), ("dc2", &["backup01"])]);
    let mut controller = d.start_controller();
    let _a = d.start_agent("db01");
    let _b = d.start_agent("backup01");
    d.wait_agents_up(&["db01", "backup01"], Duration::from_secs(30));

    controller.kill9();
    // Let the agents fail a few times against the dead port.
    std::thread::sleep(Duration::from_secs(3));
    let _controller = d.start_controller();
    d.wait_agents_up(&["db01", "backup01"], Duration::from_secs(30));
    // The outage is visible afterwards, classified as network, not TLS.
    let metrics = wait_until(Duration::from_secs(10), "failures reported", || {
        let m = d.metrics();
        (sample(
            &m,
            "dicops_agent_report_failures_total",
            &[("agent", "db01"), ("reason", "network")],
        )
        .unwrap_or(0.0)
            > 0.0)
            .then_some(m)
    });
    assert_eq!(
        sample(
            &metrics,
            "dicops_agent_report_failures_total",
            &[("agent", "db01"), ("reason", "tls")]
        ),
        Some(0.0)
    );
}

#[test]
fn graceful_stop_on_sigterm() {
    let d = Deployment::new(&[("dc1", &["db01"])]);
    let mut controller = d.start_controller();
    let mut agent = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(30));
    agent.signal("TERM");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log_text()
    );
    controller.signal("TERM");
    assert_eq!(
        controller.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        controller.log_text()
    );
}

#[test]
fn certificates_are_renewed_without_restart() {
    let d = Deployment::new(&[("dc1", &["db01"])]);
    let _controller = d.start_controller();
    let agent = d.start_agent("db01");
    d.wait_agents_up(&["db01"], Duration::from_secs(30));
    let metrics = d.metrics();
    let old_agent = sample(
        &metrics,
        "dicops_tls_certificate_expiry_timestamp_seconds",
        &[("cert", "agent")],
    )
    .expect("agent");
    let old_controller = sample(
        &metrics,
        "dicops_tls_certificate_expiry_timestamp_seconds",
        &[("cert", "controller")],
    )
    .expect("controller");

    // Renew both with a shorter validity, so the new expiry is recognisable.
    d.pki.issue(&["--agent", "db01", "--days", "30"]);
    d.pki.issue(&["--controller", "--days", "31"]);
    wait_until(Duration::from_secs(30), "renewed certificates in use", || {
        let m = d.metrics();
        let agent_now = sample(
            &m,
            "dicops_tls_certificate_expiry_timestamp_seconds",
            &[("cert", "agent")],
        )?;
        let controller_now = sample(
            &m,
            "dicops_tls_certificate_expiry_timestamp_seconds",
            &[("cert", "controller")],
        )?;
        (agent_now < old_agent - 300.0 * 86400.0 && controller_now < old_controller - 300.0 * 86400.0).then_some(())
    });
    assert!(agent.log_text().contains("reloaded TLS certificates"));
    assert_eq!(
        sample(&d.metrics(), "dicops_tls_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
}

#[test]
fn sighup_reloads_the_inventory_and_a_bad_file_keeps_the_old_one() {
    let d = Deployment::new(&[("dc1", &["db01", "app01"])]);
    // Start with app01 missing from the inventory.
    let config = d.path("controller.yaml");
    std::fs::write(
        &config,
        d.controller_yaml().replace("  - id: app01\n    site: dc1\n", ""),
    )
    .expect("write");
    let controller = d.start_controller();
    let app01 = d.start_agent("app01");
    wait_until(Duration::from_secs(20), "app01 refused as unknown", || {
        let m = d.metrics();
        (sample(&m, "dicops_requests_rejected_total", &[("reason", "unknown_agent")]).unwrap_or(0.0) >= 1.0)
            .then_some(())
    });
    wait_until(Duration::from_secs(10), "app01 logs the refusal", || {
        app01.log_text().contains("unknown_agent").then_some(())
    });

    // A broken edit: refused, the old config keeps running.
    std::fs::write(&config, "sites: [\n").expect("write");
    controller.signal("HUP");
    wait_until(Duration::from_secs(10), "reload failure visible", || {
        (sample(&d.metrics(), "dicops_config_last_reload_successful", &[]) == Some(0.0)).then_some(())
    });
    assert!(controller.log_text().contains("configuration reload failed"));

    // The fixed file with app01 added: app01 is accepted without any restart.
    std::fs::write(&config, d.controller_yaml()).expect("write");
    controller.signal("HUP");
    d.wait_agents_up(&["app01"], Duration::from_secs(30));
    assert_eq!(
        sample(&d.metrics(), "dicops_config_last_reload_successful", &[]),
        Some(1.0)
    );
}

#[test]
fn an_agent_with_someone_elses_certificate_refuses_to_start() {
    let d = Deployment::new(&[("dc1", &["db01", "app01"])]);
    let config = d.path("agent.yaml");
    // db01's config pointing at app01's certificate.
    std::fs::write(&config, d.agent_yaml("db01").replace("agent-db01", "agent-app01")).expect("write");
    let out = std::process::Command::new(harness::bin("dicops-agent"))
        .args(["--config", config.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the certificate is for agent app01, but this agent's id is \"db01\""),
        "{stderr}"
    );
}

#[test]
fn check_link_names_the_failing_step() {
    let d = Deployment::new(&[("dc1", &["db01"])]);
    std::fs::write(d.path("agent-db01.yaml"), d.agent_yaml("db01")).expect("write");
    let agent_config = d.path("agent-db01.yaml");
    let agent_config = agent_config.to_str().expect("utf8");

    // Nothing listens yet: the TCP step fails.
    let out = dicops(&["check-link", "--config", agent_config, "--timeout", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    dns"), "{text}");
    assert!(text.contains("FAIL  tcp"), "{text}");

    let _controller = d.start_controller();
    let out = dicops(&["check-link", "--config", agent_config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    identity  peer is controller"), "{text}");
    assert!(text.contains("link ok"), "{text}");

    // A certificate from another deployment's CA: the TLS step fails.
    let other = harness::Pki::new(&d.path("other"));
    other.issue(&["--agent", "db01"]);
    let files = other.files("agent-db01");
    let url = format!("https://127.0.0.1:{}", d.port);
    let out = dicops(&[
        "check-link",
        "--url",
        &url,
        "--ca",
        files.ca.to_str().expect("utf8"),
        "--cert",
        files.cert.to_str().expect("utf8"),
        "--key",
        files.key.to_str().expect("utf8"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    tcp"), "{text}");
    assert!(text.contains("FAIL  tls"), "{text}");
    assert!(text.contains("unknown_ca"), "{text}");
}

#[test]
fn demo_starts_two_sites_and_stops_cleanly() {
    let out = std::process::Command::new(harness::bin("dicops"))
        .args(["demo", "--duration", "2", "--interval", "1"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("SITE dc1 (primary data integration centre): 2/2 agents up"),
        "{text}"
    );
    assert!(text.contains("SITE dc2 (second site): 2/2 agents up"), "{text}");
    assert!(text.contains("/metrics"), "{text}");
    for name in ["controller stopped", "agent db01 stopped", "agent app02 stopped"] {
        assert!(text.contains(name), "{name} in {text}");
    }
    // The temporary folder is removed.
    let dir = text
        .lines()
        .find_map(|l| l.split("files in ").nth(1))
        .expect("folder line");
    assert!(!std::path::Path::new(dir.trim()).exists(), "{dir} left behind");
}

#[test]
fn demo_stops_cleanly_on_ctrl_c() {
    let (mut child, mut lines) = harness::spawn_demo(&["--interval", "1"]);
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("press Ctrl-C to stop") {
            break;
        }
    }
    assert!(seen.contains("2/2 agents up"), "{seen}");
    // What a terminal sends on Ctrl-C.
    harness::send_signal(child.id(), "INT");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
    let rest = rest.join("\n");
    for name in [
        "controller stopped",
        "agent db01 stopped",
        "agent app01 stopped",
        "agent backup01 stopped",
        "agent app02 stopped",
    ] {
        assert!(rest.contains(name), "{name} in {rest}");
    }
}

/// Ctrl-C while the demo is still starting its processes: the demo stops
/// what it started, removes its folder and exits cleanly; nothing it
/// started is left running.
#[test]
fn demo_ctrl_c_during_start_up_leaves_nothing_running() {
    let (mut child, mut lines) = harness::spawn_demo(&["--interval", "1"]);
    let first = lines.next().expect("first line").expect("line");
    let dir = first.split("files in ").nth(1).expect("folder line").trim().to_string();
    harness::send_signal(child.id(), "INT");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}: {rest:?}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    // No process still runs with a config from the demo's folder.
    let left = harness::processes_matching(&[&dir]);
    assert!(left.is_empty(), "still running: {left:?}");
}

/// An agent in a systemd-like sandbox (`ProtectSystem=strict`: `/`
/// remounted read-only for the agent alone, its own folder bind-mounted
/// writable) still reports `/` as a writable filesystem, so the disk-full
/// alerts keep working, and does not list its bind mount as a filesystem.
#[test]
fn an_agent_in_a_read_only_sandbox_reports_the_real_filesystem_state() {
    let d = Deployment::new(&[("dc1", &["db01"])]);
    let _controller = d.start_controller();
    let config = d.path("agent-db01.yaml");
    std::fs::write(&config, d.agent_yaml("db01")).expect("write agent config");
    let root = d.root.path().to_str().expect("utf8").to_string();
    let mut sandbox = std::process::Command::new("unshare");
    sandbox.args([
        "-m",
        "sh",
        "-c",
        "mount --make-rprivate / && mount --bind \"$ROOT\" \"$ROOT\" && mount -o remount,bind,ro / && exec \"$0\" \"$@\"",
    ]);
    sandbox.arg(harness::bin("dicops-agent")).env("ROOT", &root);
    let _agent = harness::Process::spawn_command(sandbox, &config, d.path("agent-db01.log"));
    d.wait_agents_up(&["db01"], Duration::from_secs(30));
    let metrics = wait_until(Duration::from_secs(10), "filesystems reported", || {
        let m = d.metrics();
        sample(
            &m,
            "dicops_host_filesystem_readonly",
            &[("agent", "db01"), ("mountpoint", "/")],
        )
        .map(|_| m)
    });
    assert_eq!(
        sample(
            &metrics,
            "dicops_host_filesystem_readonly",
            &[("agent", "db01"), ("mountpoint", "/")]
        ),
        Some(0.0),
        "/ is writable for everyone but the sandboxed agent"
    );
    assert!(
        !metrics.contains(&format!("mountpoint=\"{root}\"")),
        "the sandbox's bind mount {root} is not a filesystem of its own"
    );
}
