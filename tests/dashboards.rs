//! The dashboards and alert rules under `dashboards/`, proven with the real
//! tools: every PromQL expression parses and names only metrics of the
//! controller's catalogue; `promtool` checks the rules and runs their unit
//! tests; and a real Prometheus scraping a running demo evaluates every
//! panel and fires AgentDown and BackupFailed.

mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::prometheus::{http_get, query};
use harness::{free_port, promtool_check_metrics, wait_until};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The dashboards shipped for Grafana.
fn dashboard_files() -> Vec<PathBuf> {
    let dir = repo().join("dashboards/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn rules_file() -> PathBuf {
    repo().join("dashboards/rules/dicops-alerts.yml")
}

/// One PromQL expression and where it comes from.
#[derive(Debug, Clone)]
struct Query {
    origin: String,
    expr: String,
}

fn load_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel of a dashboard, rows' collapsed panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<serde_json::Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner.iter().cloned());
        }
        out.push(panel);
    }
    out
}

/// The PromQL of every panel target and every query variable of every
/// dashboard (a variable's `label_values(SELECTOR, label)` gives SELECTOR).
fn dashboard_queries() -> Vec<Query> {
    let mut queries = Vec::new();
    for file in dashboard_files() {
        let name = file.file_name().expect("name").to_string_lossy().into_owned();
        let dashboard = load_json(&file);
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(Query {
                        origin: format!("{name}: panel {:?}", panel["title"].as_str().unwrap_or("")),
                        expr: expr.to_string(),
                    });
                }
            }
        }
        for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] != "query" {
                continue;
            }
            let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or("");
            let selector = match query.strip_prefix("label_values(") {
                Some(rest) => match rest.rfind(',') {
                    Some(comma) => rest[..comma].to_string(),
                    // label_values(label): no selector to check.
                    None => continue,
                },
                None => query.to_string(),
            };
            queries.push(Query {
                origin: format!("{name}: variable {:?}", var["name"].as_str().unwrap_or("")),
                expr: selector,
            });
        }
    }
    queries
}

fn rules() -> Vec<serde_yaml::Value> {
    let path = rules_file();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    doc["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

fn rule_queries() -> Vec<Query> {
    rules()
        .iter()
        .map(|rule| Query {
            origin: format!(
                "dicops-alerts.yml: {}",
                rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or("?")
            ),
            expr: rule["expr"].as_str().expect("every rule has an expr").to_string(),
        })
        .collect()
}

/// Grafana's variables replaced as Grafana would, with values that match
/// everything.
fn substitute(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h");
    for var in ["site", "agent", "job", "mountpoint", "device", "source_site"] {
        out = out
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    out
}

/// The metric names an expression reads.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    use promql_parser::parser::{self, Expr};
    fn selector(vs: &promql_parser::parser::VectorSelector, names: &mut BTreeSet<String>) {
        if let Some(name) = &vs.name {
            names.insert(name.clone());
        }
        for m in &vs.matchers.matchers {
            if m.name == "__name__" {
                names.insert(m.value.clone());
            }
        }
    }
    fn walk(expr: &Expr, names: &mut BTreeSet<String>) {
        match expr {
            Expr::Aggregate(a) => {
                walk(&a.expr, names);
                if let Some(p) = &a.param {
                    walk(p, names);
                }
            }
            Expr::Unary(u) => walk(&u.expr, names),
            Expr::Binary(b) => {
                walk(&b.lhs, names);
                walk(&b.rhs, names);
            }
            Expr::Paren(p) => walk(&p.expr, names),
            Expr::Subquery(s) => walk(&s.expr, names),
            Expr::VectorSelector(vs) => selector(vs, names),
            Expr::MatrixSelector(ms) => selector(&ms.vs, names),
            Expr::Call(c) => {
                for arg in &c.args.args {
                    walk(arg, names);
                }
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let parsed = parser::parse(expr)?;
    let mut names = BTreeSet::new();
    walk(&parsed, &mut names);
    Ok(names)
}

/// A name the controller exports: a catalogue entry, or a histogram's
/// `_bucket`, `_sum` or `_count` series.
fn in_catalogue(name: &str) -> bool {
    use dicops_controller::metrics::{Kind, CATALOGUE};
    CATALOGUE.iter().any(|def| {
        def.name == name
            || (def.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(def.name)))
    })
}

#[test]
fn every_expression_parses_and_reads_only_catalogued_metrics() {
    let queries: Vec<Query> = dashboard_queries().into_iter().chain(rule_queries()).collect();
    assert!(queries.len() > 40, "only {} expressions found", queries.len());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for q in &queries {
        match metric_names(&substitute(&q.expr)) {
            Err(e) => problems.push(format!("{}: does not parse: {e}\n    {}", q.origin, q.expr)),
            Ok(names) => {
                for name in names {
                    if name.starts_with("dicops_") && !in_catalogue(&name) {
                        problems.push(format!("{}: {name} is not in the catalogue", q.origin));
                    }
                    used.insert(name);
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check above cannot pass by reading nothing.
    assert!(
        used.iter().filter(|n| n.starts_with("dicops_")).count() > 30,
        "{used:?}"
    );
}

#[test]
fn the_issue_s_alerts_are_all_there_with_severity_summary_and_runbook() {
    let wanted = [
        "AgentDown",
        "SiteDown",
        "ControllerDown",
        "HostFilesystemWillFillIn24h",
        "HostFilesystemAlmostFull",
        "HostHighCPU",
        "HostMemoryPressure",
        "ServiceDown",
        "BackupFailed",
        "BackupStale",
        "ReplicationFailed",
        "ReplicationLagHigh",
        "ReplicationStuck",
        "SnapshotVerifyErrors",
        "ConfigReloadFailed",
        "CertificateExpiresSoon",
    ];
    let rules = rules();
    for name in wanted {
        let rule = rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no alert {name}"));
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for field in ["summary", "description"] {
            assert!(
                rule["annotations"][field].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no {field}"
            );
        }
        let runbook = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let page = runbook
            .split("dashboards/runbooks/")
            .nth(1)
            .unwrap_or_else(|| panic!("{name}: runbook_url {runbook:?} is not a page of dashboards/runbooks/"));
        assert!(
            repo().join("dashboards/runbooks").join(page).is_file(),
            "{name}: runbook {page} is missing"
        );
        // No alert pages on a single missed scrape.
        let hold = rule["for"].as_str().unwrap_or("0s");
        assert!(hold != "0s" && hold != "0m", "{name}: no `for:`");
    }
}

#[test]
fn dashboards_are_ready_for_file_provisioning() {
    let files = dashboard_files();
    assert!(files.len() >= 3, "{files:?}");
    let mut uids = BTreeSet::new();
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(&file).expect("read");
        // Import placeholders break file provisioning.
        assert!(!text.contains("${DS_"), "{name}: ${{DS_...}} placeholder");
        let d = load_json(&file);
        assert!(d.get("__inputs").is_none(), "{name}: __inputs");
        assert!(d["id"].is_null(), "{name}: id must be null");
        let uid = d["uid"].as_str().unwrap_or("");
        assert!(
            !uid.is_empty() && uids.insert(uid.to_string()),
            "{name}: uid {uid:?} missing or taken"
        );
        let vars = d["templating"]["list"].as_array().cloned().unwrap_or_default();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{name}: no datasource variable"
        );
        for panel in panels(&d) {
            let kind = panel["type"].as_str().unwrap_or("");
            if kind == "row" || kind == "text" {
                continue;
            }
            let title = panel["title"].as_str().unwrap_or("");
            assert_eq!(
                panel["datasource"]["uid"].as_str(),
                Some("${datasource}"),
                "{name}: panel {title:?} does not use the datasource variable"
            );
            assert!(
                panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()),
                "{name}: panel {title:?} has no unit"
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or("");
                for f in ["rate(", "irate(", "increase("] {
                    if expr.contains(f) {
                        assert!(
                            expr.contains("[$__rate_interval]"),
                            "{name}: panel {title:?}: {f} without $__rate_interval: {expr}"
                        );
                    }
                }
            }
        }
        for var in vars.iter().filter(|v| v["type"] == "query") {
            assert_eq!(
                var["datasource"]["uid"].as_str(),
                Some("${datasource}"),
                "{name}: variable {:?} does not use the datasource variable",
                var["name"]
            );
        }
    }
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool is required (apt-get install prometheus); the README's test command installs it");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("dashboards/rules");
    let checked = promtool(&["check", "rules", "dicops-alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "dicops-alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test where it fires and one where it stays
    // silent.
    let text = std::fs::read_to_string(dir.join("dicops-alerts.test.yml")).expect("tests");
    let tests: serde_yaml::Value = serde_yaml::from_str(&text).expect("tests yaml");
    let cases: Vec<(String, bool)> = tests["tests"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_sequence().cloned().unwrap_or_default())
        .map(|case| {
            let fires = case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            (case["alertname"].as_str().unwrap_or("").to_string(), fires)
        })
        .collect();
    for rule in rules() {
        if let Some(name) = rule["alert"].as_str() {
            for fires in [true, false] {
                assert!(
                    cases.iter().any(|(n, f)| n == name && *f == fires),
                    "{name} has no promtool unit test where it {}",
                    if fires { "fires" } else { "stays silent" }
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus against a running demo
// ---------------------------------------------------------------------------

/// The shipped rules with every `for:` shortened, for a test that cannot
/// wait minutes; the expressions are the shipped ones.
fn fast_rules(hold: &str) -> String {
    let text = std::fs::read_to_string(rules_file()).expect("rules");
    text.lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: {hold}", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain HTTP GET to Prometheus on loopback: (status, body).
/// The alerts Prometheus holds: (name, state, labels).
fn alerts(port: u16) -> Vec<(String, String, serde_json::Value)> {
    let Some((_, body)) = http_get(port, "/api/v1/alerts") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                a["state"].as_str().unwrap_or("").to_string(),
                a["labels"].clone(),
            )
        })
        .collect()
}

/// A child killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo, stopped with Ctrl-C on drop (also when the test fails), so
/// that it stops the controller and agents it started: SIGKILL would leave
/// them running.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // Not send_signal: a drop must not panic.
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let stopped = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            matches!(self.0.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Panels that may rightly show nothing on the test machine, with why.
const MAY_BE_EMPTY: &[(&str, &str)] = &[(
    "dicops_service_up",
    "no systemd runs on the test machine, so agents report no service states",
)];

#[test]
fn a_real_prometheus_scrapes_the_demo_evaluates_every_panel_and_fires_alerts() {
    let work = tempfile::tempdir().expect("tempdir");
    let demo_dir = work.path().join("demo");
    let port = free_port();
    let (demo, mut lines) = harness::spawn_demo(&[
        "--interval",
        "1",
        "--port",
        &port.to_string(),
        "--dir",
        demo_dir.to_str().expect("utf8"),
    ]);
    let demo = Demo(demo);
    for line in lines.by_ref() {
        if line.expect("line").contains("press Ctrl-C to stop") {
            break;
        }
    }
    // Keep reading the demo's output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    // The live /metrics passes promtool.
    let pki = demo_dir.join("pki");
    harness::install_crypto();
    let tls = dicops_net::TlsReloader::load(dicops_net::TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join("operator-demo.pem"),
        key: pki.join("operator-demo-key.pem"),
    })
    .expect("tls");
    let mut operator = dicops_net::HttpsClient::new(
        &format!("https://127.0.0.1:{port}"),
        dicops_proto::Identity::Controller,
        tls,
    )
    .expect("client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, body) = runtime
        .block_on(operator.request(hyper::Method::GET, "/metrics", None))
        .expect("metrics");
    assert_eq!(status.as_u16(), 200);
    promtool_check_metrics(&String::from_utf8_lossy(&body));

    // Every kind of job has run once, so every panel has series.
    let cli = demo_dir.join("cli.yaml");
    let cli = cli.to_str().expect("utf8");
    for job in [
        "db01-app-dump",
        "app02-crm-dump",
        "db01-dumps-to-backup01",
        "verify-db01-dumps",
    ] {
        // The demo's own schedule may be running it: then run it after.
        wait_until(Duration::from_secs(120), job, || {
            let out = harness::dicops(&["run", job, "--follow", "--config", cli]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if text.contains("already_running") {
                return None;
            }
            assert!(out.status.success(), "{job}: {text}");
            Some(())
        });
    }

    // A real Prometheus, scraping the controller over mutual TLS with the
    // shipped rules (their `for:` shortened).
    let prom_dir = work.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("mkdir");
    std::fs::write(prom_dir.join("rules.yml"), fast_rules("3s")).expect("rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: dicops-controller\n    scheme: https\n    honor_labels: true\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
        ca = pki.join("ca.pem").display(),
        cert = pki.join("operator-demo.pem").display(),
        key = pki.join("operator-demo-key.pem").display(),
    );
    std::fs::write(prom_dir.join("prometheus.yml"), config).expect("config");
    let prom_port = free_port();
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).expect("log");
    let _prometheus = Child(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .current_dir(&prom_dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus is required (apt-get install prometheus); the README's test command installs it"),
    );
    wait_until(Duration::from_secs(30), "Prometheus ready", || {
        http_get(prom_port, "/-/ready").filter(|(s, _)| *s == 200)
    });
    wait_until(Duration::from_secs(30), "the controller scraped", || {
        query(prom_port, "up{job=\"dicops-controller\"} == 1")
            .ok()
            .filter(|r| !r.is_empty())
    });
    // Enough samples for every rate over 1m.
    std::thread::sleep(Duration::from_secs(12));

    // (a) Every panel's query parses in Prometheus and returns data.
    let mut problems = Vec::new();
    for q in dashboard_queries() {
        let expr = substitute(&q.expr);
        match query(prom_port, &expr) {
            Err(e) => problems.push(format!("{}: {e}\n    {expr}", q.origin)),
            Ok(result) if result.is_empty() => {
                if !MAY_BE_EMPTY.iter().any(|(name, _)| expr.contains(name)) {
                    problems.push(format!("{}: no data\n    {expr}", q.origin));
                }
            }
            Ok(_) => {}
        }
    }
    // The rules load and evaluate: Prometheus reports no rule errors.
    let (_, body) = http_get(prom_port, "/api/v1/rules").expect("rules");
    let v: serde_json::Value = serde_json::from_str(&body).expect("rules json");
    for group in v["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if rule["health"] != "ok" && rule["health"] != "unknown" {
                problems.push(format!(
                    "rule {}: {} {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Nothing fires on a healthy demo except what the test machine causes.
    let firing: Vec<String> = alerts(prom_port)
        .into_iter()
        .filter(|(name, state, _)| {
            state == "firing"
                && !["HostHighCPU", "HostFilesystemAlmostFull", "HostMemoryPressure"].contains(&name.as_str())
        })
        .map(|(name, _, labels)| format!("{name} {labels}"))
        .collect();
    assert!(firing.is_empty(), "firing on a healthy demo: {firing:?}");

    // (b) An agent killed: AgentDown for it.
    let config = demo_dir.join("agent-app01.yaml");
    let (pid, _) = harness::processes_matching(&["dicops-agent", config.to_str().expect("utf8")])
        .into_iter()
        .next()
        .expect("the demo's agent app01");
    harness::send_signal(pid, "KILL");
    wait_until(Duration::from_secs(60), "AgentDown for app01", || {
        alerts(prom_port).into_iter().find(|(name, state, labels)| {
            name == "AgentDown" && (state == "pending" || state == "firing") && labels["agent"] == "app01"
        })
    });

    // (c) A backup that fails: BackupFailed for its job.
    std::fs::write(
        demo_dir.join("bin/demo-pg-dump.sh"),
        "#!/bin/sh\necho 'pg_dump: error: connection to server failed: Connection refused' >&2\nexit 1\n",
    )
    .expect("break the dump tool");
    wait_until(Duration::from_secs(120), "the broken dump run", || {
        let out = harness::dicops(&["run", "app02-crm-dump", "--follow", "--config", cli]);
        if String::from_utf8_lossy(&out.stderr).contains("already_running") {
            return None;
        }
        assert!(!out.status.success(), "the broken dump must fail");
        Some(())
    });
    let (_, _, labels) = wait_until(Duration::from_secs(60), "BackupFailed firing", || {
        alerts(prom_port).into_iter().find(|(name, state, labels)| {
            name == "BackupFailed" && state == "firing" && labels["job"] == "app02-crm-dump"
        })
    });
    assert_eq!(labels["site"], "dc2", "{labels}");
    assert_eq!(labels["agent"], "app02", "{labels}");

    drop(demo);
}
