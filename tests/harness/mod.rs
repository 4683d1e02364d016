//! Test harness: a PKI in a temporary folder made with the real `dicops pki`,
//! real controller and agent processes that are waited for (never a fixed
//! sleep) and killed on drop, and small HTTPS clients for the checks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod files;
pub mod netns;
pub mod prometheus;
pub mod systemd;

use dicops_net::{HttpsClient, TlsFiles, TlsReloader};
use dicops_proto::Identity;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};

pub fn bin(name: &str) -> PathBuf {
    match name {
        "dicops" => PathBuf::from(env!("CARGO_BIN_EXE_dicops")),
        "dicops-agent" => PathBuf::from(env!("CARGO_BIN_EXE_dicops-agent")),
        "dicops-controller" => PathBuf::from(env!("CARGO_BIN_EXE_dicops-controller")),
        other => panic!("unknown binary {other}"),
    }
}

/// Runs `dicops ARGS` and returns its output.
pub fn dicops(args: &[&str]) -> Output {
    Command::new(bin("dicops"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dicops")
}

/// Runs `command`, which must exit 0; `needs` says what the test needs
/// for it and is shown with the command's stderr when it fails.
pub fn run_ok(command: &mut Command, needs: &str) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} ({needs})"));
    assert!(
        out.status.success(),
        "{command:?} ({needs}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `check` until it returns Some, or panics with `what` after `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if started.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kill -SIGNAL PID`, which must succeed.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The processes whose command line contains every one of `needles`:
/// (pid, command line with spaces between its arguments).
pub fn processes_matching(needles: &[&str]) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            needles.iter().all(|n| cmdline.contains(n)).then_some((pid, cmdline))
        })
        .collect()
}

/// `dicops demo ARGS` with its standard output piped: the child and its
/// lines.
pub fn spawn_demo(args: &[&str]) -> (Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
    use std::io::BufRead;
    let mut child = Command::new(bin("dicops"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run demo");
    let stdout = child.stdout.take().expect("stdout");
    (child, std::io::BufReader::new(stdout).lines())
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A deployment's PKI, made with the real CLI.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(root: &Path) -> Pki {
        let dir = root.join("pki");
        let out = dicops(&["pki", "init", "--dir", dir.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "pki init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pki { dir }
    }

    /// Issues a certificate; `who` is `--agent ID`, `--controller` or `--operator NAME`.
    pub fn issue(&self, who: &[&str]) {
        let mut args = vec!["pki", "issue", "--dir", self.dir.to_str().expect("utf8"), "--force"];
        args.extend_from_slice(who);
        let out = dicops(&args);
        assert!(
            out.status.success(),
            "pki issue {who:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn files(&self, stem: &str) -> TlsFiles {
        TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
        }
    }

    pub fn tls_yaml(&self, stem: &str) -> String {
        format!(
            "tls:\n  ca: {}\n  cert: {}\n  key: {}\n  reload_interval: 1s\n",
            self.dir.join("ca.pem").display(),
            self.dir.join(format!("{stem}.pem")).display(),
            self.dir.join(format!("{stem}-key.pem")).display()
        )
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(binary: &str, config: &Path, log: PathBuf) -> Process {
        Self::spawn_command(Command::new(bin(binary)), config, log)
    }

    /// Starts `command --config CONFIG` with its output in `log`.
    pub fn spawn_command(mut command: Command, config: &Path, log: PathBuf) -> Process {
        command.arg("--config").arg(config);
        Self::spawn_logged(command, log)
    }

    /// Starts `command` as it is, with its output in `log`.
    pub fn spawn_logged(mut command: Command, log: PathBuf) -> Process {
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file)
            .spawn()
            .expect("spawn");
        Process { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder with a PKI and configs for a controller and agents.
pub struct Deployment {
    pub root: tempfile::TempDir,
    pub pki: Pki,
    pub port: u16,
    /// (site, agent ids)
    pub sites: Vec<(String, Vec<String>)>,
    pub interval: &'static str,
    pub down_after: u32,
    /// YAML appended to the controller config (e.g. `jobs:`).
    pub controller_extra: String,
    /// YAML appended to every agent config (e.g. `commands:`).
    pub agent_extra: String,
    /// YAML appended to one agent's config: (agent id, YAML).
    pub agent_extras: Vec<(String, String)>,
    /// Where the controller listens (`listen:`), agents dial it, and this
    /// test reaches it: loopback, unless the sites are network namespaces.
    pub controller_listen: String,
    pub controller_host: String,
    pub operator_host: String,
    /// Process (`controller` or an agent id) -> network namespace it runs in.
    pub namespaces: Vec<(String, String)>,
    pub runtime: tokio::runtime::Runtime,
}

impl Deployment {
    pub fn new(sites: &[(&str, &[&str])]) -> Deployment {
        install_crypto();
        let root = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(root.path());
        pki.issue(&["--controller"]);
        pki.issue(&["--operator", "ops"]);
        let mut owned = Vec::new();
        for (site, agents) in sites {
            for agent in *agents {
                pki.issue(&["--agent", agent]);
            }
            owned.push((site.to_string(), agents.iter().map(|a| a.to_string()).collect()));
        }
        Deployment {
            root,
            pki,
            port: free_port(),
            sites: owned,
            interval: "1s",
            down_after: 3,
            controller_extra: String::new(),
            agent_extra: String::new(),
            agent_extras: Vec::new(),
            controller_listen: "127.0.0.1".into(),
            controller_host: "127.0.0.1".into(),
            operator_host: "127.0.0.1".into(),
            namespaces: Vec::new(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    pub fn controller_yaml(&self) -> String {
        let mut text = format!(
            "listen: {}:{}\nstate:\n  database: {}\n{}health:\n  report_interval: {}\n  down_after_missed_reports: {}\nlimits:\n  max_request_bytes: 64KiB\nsites:\n",
            self.controller_listen,
            self.port,
            self.root.path().join("controller.db").display(),
            self.pki.tls_yaml("controller"),
            self.interval,
            self.down_after
        );
        for (site, _) in &self.sites {
            text.push_str(&format!("  - name: {site}\n"));
        }
        text.push_str("agents:\n");
        for (site, agents) in &self.sites {
            for agent in agents {
                text.push_str(&format!("  - id: {agent}\n    site: {site}\n"));
            }
        }
        text.push_str(&self.controller_extra);
        text
    }

    pub fn start_controller(&self) -> Process {
        let config = self.path("controller.yaml");
        if !config.exists() {
            std::fs::write(&config, self.controller_yaml()).expect("write controller config");
        }
        let process = Process::spawn_command(
            self.command("controller", "dicops-controller"),
            &config,
            self.path("controller.log"),
        );
        let mut client = self.operator();
        wait_until(Duration::from_secs(20), "controller /readyz", || {
            match self.runtime.block_on(client.request(Method::GET, "/readyz", None)) {
                Ok((StatusCode::OK, _)) => Some(()),
                _ => None,
            }
        });
        process
    }

    pub fn agent_yaml(&self, id: &str) -> String {
        format!(
            "id: {id}\ncontroller:\n  url: https://{}:{}\nstate_dir: {}\n{}collect:\n  interval: {}\n  backups_interval: {}\n  paths: [{}]\n",
            self.controller_host,
            self.port,
            self.root.path().join(format!("agent-{id}-state")).display(),
            self.pki.tls_yaml(&format!("agent-{id}")),
            self.interval,
            self.interval,
            self.root.path().display()
        ) + &self.agent_extra
            + &self
                .agent_extras
                .iter()
                .filter(|(agent, _)| agent == id)
                .map(|(_, yaml)| yaml.as_str())
                .collect::<String>()
    }

    pub fn start_agent(&self, id: &str) -> Process {
        let config = self.path(&format!("agent-{id}.yaml"));
        std::fs::write(&config, self.agent_yaml(id)).expect("write agent config");
        Process::spawn_command(
            self.command(id, "dicops-agent"),
            &config,
            self.path(&format!("agent-{id}.log")),
        )
    }

    /// The command that starts `binary` for `process`: in its network
    /// namespace (`ip netns exec`, which execs it: the pid is the daemon's)
    /// when it has one.
    fn command(&self, process: &str, binary: &str) -> Command {
        match self.namespaces.iter().find(|(p, _)| p == process) {
            Some((_, namespace)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(bin(binary));
                command
            }
            None => Command::new(bin(binary)),
        }
    }

    /// Starts an agent as an unprivileged user, as production does. Its
    /// files (test keys included) are opened up to that user.
    pub fn start_agent_as(&self, id: &str, uid: u32, gid: u32) -> Process {
        use std::os::unix::process::CommandExt;
        let (binary, config) = self.prepare_agent_as(id, uid, gid);
        let mut command = Command::new(&binary);
        command.uid(uid).gid(gid);
        Process::spawn_command(command, &config, self.path(&format!("agent-{id}.log")))
    }

    /// The files an agent running as `uid`:`gid` reads or writes, opened to
    /// that user: (agent binary, config).
    fn prepare_agent_as(&self, id: &str, uid: u32, gid: u32) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let open = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        open(self.root.path(), 0o755);
        open(&self.pki.dir, 0o755);
        for entry in std::fs::read_dir(&self.pki.dir).expect("pki dir") {
            open(&entry.expect("entry").path(), 0o644);
        }
        let state = self.path(&format!("agent-{id}-state"));
        std::fs::create_dir_all(&state).expect("state dir");
        std::os::unix::fs::chown(&state, Some(uid), Some(gid)).expect("chown state");
        let config = self.path(&format!("agent-{id}.yaml"));
        std::fs::write(&config, self.agent_yaml(id)).expect("write agent config");
        open(&config, 0o644);
        // The build folder may sit in a private folder: run a copy.
        let binary = self.path("dicops-agent-copy");
        if !binary.exists() {
            std::fs::copy(bin("dicops-agent"), &binary).expect("copy the agent binary");
            open(&binary, 0o755);
        }
        (binary, config)
    }

    /// Starts an agent as user and group 1 (daemon) with CAP_SETUID and
    /// CAP_SETGID as ambient capabilities, as the systemd drop-in for
    /// commands with `user:` grants them.
    pub fn start_agent_with_setuid_capabilities(&self, id: &str) -> Process {
        let (binary, config) = self.prepare_agent_as(id, 1, 1);
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=1", "--regid=1", "--clear-groups"])
            .args(["--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid", "--"])
            .arg(&binary);
        Process::spawn_command(command, &config, self.path(&format!("agent-{id}-caps.log")))
    }

    pub fn client(&self, stem: &str) -> HttpsClient {
        let tls: Arc<TlsReloader> = TlsReloader::load(self.pki.files(stem)).expect("tls");
        let mut client = HttpsClient::new(
            &format!("https://{}:{}", self.operator_host, self.port),
            Identity::Controller,
            tls,
        )
        .expect("client");
        client.connect_timeout = Duration::from_secs(2);
        client.request_timeout = Duration::from_secs(5);
        client
    }

    pub fn operator(&self) -> HttpsClient {
        self.client("operator-ops")
    }

    pub fn get(&self, path: &str) -> (StatusCode, Bytes) {
        let mut client = self.operator();
        self.runtime
            .block_on(client.request(Method::GET, path, None))
            .expect("request")
    }

    /// The runs of a job, newest first.
    pub fn runs(&self, job: &str) -> Vec<dicops_proto::RunInfo> {
        let (status, body) = self.get(&format!("/api/v1/jobs/{job}/runs?limit=100"));
        assert!(status.is_success(), "{status}");
        serde_json::from_slice(&body).expect("runs")
    }

    /// `dicops run JOB --follow` for a run that must fail (the CLI exits
    /// 1): the run as the controller recorded it.
    pub fn run_failing(&self, job: &str) -> dicops_proto::RunInfo {
        let (code, out, _) = self.cli(&["run", job, "--follow"]);
        assert_eq!(code, 1, "run {job} must fail: {out}");
        self.runs(job).remove(0)
    }

    pub fn run(&self, id: i64) -> dicops_proto::RunInfo {
        let (_, body) = self.get(&format!("/api/v1/runs/{id}"));
        serde_json::from_slice(&body).expect("run")
    }

    /// Runs `dicops ARGS --config CLI.yaml`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.cli_yaml();
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().expect("utf8")]);
        let out = dicops(&all);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).expect("utf8")
    }

    pub fn status(&self) -> dicops_proto::StatusResponse {
        let (status, body) = self.get(dicops_proto::STATUS_PATH);
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).expect("status json")
    }

    pub fn wait_agents_up(&self, agents: &[&str], limit: Duration) {
        wait_until(limit, &format!("agents {agents:?} up"), || {
            let metrics = self.metrics();
            agents
                .iter()
                .all(|a| sample(&metrics, "dicops_agent_up", &[("agent", a)]) == Some(1.0))
                .then_some(())
        });
    }

    pub fn cli_yaml(&self) -> PathBuf {
        let path = self.path("cli.yaml");
        std::fs::write(
            &path,
            format!(
                "controller: https://{}:{}\n{}",
                self.operator_host,
                self.port,
                self.pki.tls_yaml("operator-ops")
            ),
        )
        .expect("write cli config");
        path
    }
}

/// The value of the first sample of `name` whose labels include all of `labels`.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Runs `promtool check metrics` on an exposition; panics with its
/// complaints. promtool comes from Debian's `prometheus` package, which the
/// test command installs.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (apt-get install prometheus); the README's test command installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics complained:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
