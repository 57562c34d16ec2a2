//! Test harness for the end-to-end tests: runs the **real** tocsin binaries (built by
//! `cargo build --workspace`) as child processes on 127.0.0.1 with port 0 and temporary
//! directories, and a real HTTP webhook receiver in the test process.
//!
//! Waiting is always on state ([`eventually`]), never on fixed sleeps; a daemon's stderr
//! is printed when a test fails.

pub mod measure;
pub mod recorder;
pub mod scripted;
pub mod sim;
pub mod smtp;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// How long [`eventually`] waits by default; generous because CI machines are slow.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Installs the rustls crypto provider the HTTP client needs. Idempotent; called by
/// the harness's constructors.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/NAME`).
///
/// # Panics
/// When the binary was not built (run `cargo build --workspace` first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables live in target/<profile>/deps, bench binaries in target/<profile>.
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, or fails after `patience` with `what`.
///
/// # Errors
/// When `patience` runs out.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > patience {
            bail!("timed out after {patience:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process whose stderr goes to a file; killed (SIGKILL) on drop, and its
/// output printed then (the runner shows it only for failing tests).
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` with `args`, stdout and stderr to `log_dir/NAME.log`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(name: &str, program: &Path, args: &[&str], log_dir: &Path) -> Result<Self> {
        Self::spawn_with_env(name, program, args, &[], log_dir)
    }

    /// Like [`Daemon::spawn`], with extra environment variables `env` (name, value),
    /// set after the inherited `TOCSIN_…` variables were removed.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("RUST_LOG", "info");
        for (k, _) in std::env::vars() {
            if k.starts_with("TOCSIN_") || k.ends_with("_ALERT_THRESHOLD") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        Ok(Daemon {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `needle`; returns the output.
    ///
    /// # Errors
    /// On timeout, or when the process exits first.
    pub async fn wait_for_output(&mut self, needle: &str) -> Result<String> {
        let start = Instant::now();
        loop {
            let out = self.output();
            if out.contains(needle) {
                return Ok(out);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited with {status} before printing {needle:?}:\n{out}",
                    self.name
                );
            }
            if start.elapsed() > PATIENCE {
                bail!(
                    "{} did not print {needle:?} within {PATIENCE:?}:\n{out}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the process to exit on its own; returns its exit code (`None` when a
    /// signal ended it).
    ///
    /// # Errors
    /// When it is still running after [`PATIENCE`].
    pub async fn wait_exit(&mut self) -> Result<Option<i32>> {
        let start = Instant::now();
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("{} was already stopped", self.name))?;
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > PATIENCE {
                bail!("{} still runs after {PATIENCE:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. `"TERM"`, `"KILL"`) and waits for the exit; returns the exit
    /// code (`None` when killed by a signal).
    ///
    /// # Errors
    /// When `kill` cannot be run.
    pub fn stop(&mut self, signal: &str) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", child.id());
        }
        Ok(child.wait()?.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The test runner shows captured stderr only for failing tests, so always dump:
        // a test that fails by returning `Err` does not panic.
        let _ = writeln!(
            std::io::stderr(),
            "----- {} output -----\n{}",
            self.name,
            self.output()
        );
    }
}

/// A running `tocsin-aggregator`.
#[derive(Debug)]
pub struct Aggregator {
    /// The process.
    pub daemon: Daemon,
    /// Bound HTTP API address.
    pub http: SocketAddr,
    /// Bound gRPC address.
    pub grpc: SocketAddr,
}

/// Parses `KEY=ADDR` out of the aggregator's "listening" log line.
fn addr_after(out: &str, key: &str) -> Result<SocketAddr> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("listening"))
        .ok_or_else(|| anyhow!("no listening line"))?;
    let start = line
        .find(key)
        .ok_or_else(|| anyhow!("no {key} in {line:?}"))?
        + key.len();
    let addr: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.parse().with_context(|| format!("address {addr:?}"))
}

impl Aggregator {
    /// Writes `config` to `dir/aggregator.toml` and starts the aggregator with it; waits
    /// until it listens.
    ///
    /// # Errors
    /// When it does not start.
    pub async fn start(dir: &Path, config: &str) -> Result<Self> {
        init();
        let path = dir.join("aggregator.toml");
        std::fs::write(&path, config)?;
        let mut daemon = Daemon::spawn(
            "tocsin-aggregator",
            &bin("tocsin-aggregator"),
            &["--config", path.to_str().unwrap_or_default()],
            dir,
        )?;
        // The log is appended across restarts: count listening lines to find the new one.
        let before = daemon.output().matches(" listening ").count();
        let start = Instant::now();
        loop {
            let out = daemon.wait_for_output("listening").await?;
            if out.matches(" listening ").count() > before {
                return Ok(Aggregator {
                    http: addr_after(&out, "http=")?,
                    grpc: addr_after(&out, "grpc=")?,
                    daemon,
                });
            }
            if start.elapsed() > PATIENCE {
                bail!("aggregator did not listen:\n{out}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET` a JSON API path such as `/api/v1/incidents`.
    ///
    /// # Errors
    /// When the request fails or the answer is not JSON.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("http://{}{path}", self.http);
        Ok(reqwest::get(&url).await?.json().await?)
    }

    /// Waits until the aggregator has stored at least one event of `agent_id` (every
    /// check reports its first state at start, so the agent's checks are then live).
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_reported(&self, agent_id: &str) -> Result<()> {
        eventually(&format!("first events of {agent_id}"), PATIENCE, || async {
            let nodes = self.get("/api/v1/nodes").await.ok()?;
            nodes["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["agent_id"] == agent_id && n["last_seq"].as_u64().unwrap_or(0) >= 1)
                .then_some(())
        })
        .await
    }

    /// Waits until the API lists `agent_id` as connected.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_connected(&self, agent_id: &str) -> Result<()> {
        eventually(&format!("agent {agent_id} connected"), PATIENCE, || async {
            let nodes = self.get("/api/v1/nodes").await.ok()?;
            nodes["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["agent_id"] == agent_id && n["connected"] == true)
                .then_some(())
        })
        .await
    }
}

/// Starts `tocsin-agent` with `config` written to `dir/agent.toml`.
///
/// # Errors
/// When it cannot be started.
pub fn start_agent(dir: &Path, config: &str) -> Result<Daemon> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config)?;
    Daemon::spawn(
        "tocsin-agent",
        &bin("tocsin-agent"),
        &["--config", path.to_str().unwrap_or_default()],
        dir,
    )
}

/// One request as it reached a [`WebhookReceiver`]: headers (names lower-case) and the
/// body exactly as sent.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Header name (lower-case) → value (headers that are not UTF-8 are left out).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The body text.
    pub body: String,
}

/// A real HTTP server that records every JSON body POSTed to it.
#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    /// `http://127.0.0.1:PORT/hook`.
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<Vec<(Instant, Value)>>>,
    raw: Arc<Mutex<Vec<RawRequest>>>,
}

impl WebhookReceiver {
    /// Binds 127.0.0.1:0 and serves in the background (on the test's runtime).
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start() -> Result<Self> {
        Self::scripted(Vec::new()).await
    }

    /// Like [`WebhookReceiver::start`], but the first requests are answered with
    /// `statuses` in order (e.g. `[500, 429]`; a 429 carries `Retry-After: 1`), and only
    /// then with 200. Only bodies answered 2xx count as received; every request counts
    /// in [`WebhookReceiver::requests`].
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn scripted(statuses: Vec<u16>) -> Result<Self> {
        init();
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let requests: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
        let raw: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(statuses)));
        let (sink, log, raw_log) = (received.clone(), requests.clone(), raw.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (sink, log, script) = (sink.clone(), log.clone(), script.clone());
                let raw_log = raw_log.clone();
                async move {
                    raw_log.lock().expect("receiver lock").push(RawRequest {
                        headers: headers
                            .iter()
                            .filter_map(|(k, v)| {
                                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                            })
                            .collect(),
                        body: body.clone(),
                    });
                    let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
                    log.lock()
                        .expect("receiver lock")
                        .push((Instant::now(), v.clone()));
                    let status = script
                        .lock()
                        .expect("script lock")
                        .pop_front()
                        .unwrap_or(200);
                    if status < 300 {
                        sink.lock().expect("receiver lock").push(v);
                    }
                    let code = axum::http::StatusCode::from_u16(status)
                        .unwrap_or(axum::http::StatusCode::OK);
                    let retry_after = if status == 429 { "1" } else { "0" };
                    (
                        code,
                        [("retry-after", retry_after)],
                        format!("scripted {status}"),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(WebhookReceiver {
            url,
            received,
            requests,
            raw,
        })
    }

    /// Every request so far with its headers and exact body, in arrival order.
    pub fn raw_requests(&self) -> Vec<RawRequest> {
        self.raw.lock().expect("receiver lock").clone()
    }

    /// Every request so far, answered or refused, with its arrival time.
    pub fn requests(&self) -> Vec<(Instant, Value)> {
        self.requests.lock().expect("receiver lock").clone()
    }

    /// Every body received so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().expect("receiver lock").clone()
    }

    /// Bodies whose `event` is `kind` (`trigger`/`resolve`) for `check` on `node`.
    pub fn events(&self, kind: &str, node: &str, check: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|v| {
                v["event"] == kind
                    && v["incident"]["node"] == node
                    && v["incident"]["check"] == check
            })
            .collect()
    }

    /// Waits until at least one `kind` notification for `check` on `node` arrived.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_for(&self, kind: &str, node: &str, check: &str) -> Result<Value> {
        eventually(
            &format!("{kind} for {node}/{check} at the webhook"),
            PATIENCE,
            || async { self.events(kind, node, check).into_iter().next() },
        )
        .await
    }
}

/// A copy of `/bin/sleep` under a unique short name (≤ 15 bytes, so even the kernel's
/// `comm` matches), started as a process the agent can watch.
#[derive(Debug)]
pub struct Dummy {
    /// The executable name to watch.
    pub name: String,
    path: PathBuf,
    child: Option<Child>,
}

impl Dummy {
    /// Copies the executable into `dir`; does not start it.
    ///
    /// # Errors
    /// When the copy fails.
    pub fn new(dir: &Path, tag: &str) -> Result<Self> {
        let name = format!("td{tag}{:x}", std::process::id() % 0xffff);
        let name: String = name.chars().take(15).collect();
        let path = dir.join(&name);
        std::fs::copy("/bin/sleep", &path)?;
        Ok(Dummy {
            name,
            path,
            child: None,
        })
    }

    /// Starts one instance.
    ///
    /// # Errors
    /// When it cannot start.
    pub fn start(&mut self) -> Result<()> {
        self.child = Some(
            Command::new(&self.path)
                .arg("3600")
                .stdin(Stdio::null())
                .spawn()?,
        );
        Ok(())
    }

    /// Kills the instance with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the real `promtool check metrics` (Debian package `prometheus`) on a scrape.
///
/// # Errors
/// When promtool is missing or finds a problem (its output is in the error).
pub fn promtool_check(body: &str) -> Result<()> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) must be installed: tests/run.sh does it")?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(body.as_bytes())?;
    let out = promtool.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed:\n{}{}\n{body}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An aggregator config for tests: both listeners on 127.0.0.1 port 0, data in
/// `DIR/agg`; add a webhook (with 100 ms retries), a fixed gRPC address or any
/// top-level line.
#[derive(Debug, Clone)]
pub struct AggregatorToml {
    data_dir: PathBuf,
    grpc: String,
    top: Vec<String>,
    notify: Vec<String>,
    webhook: Option<String>,
    webhook_lines: Vec<String>,
}

impl AggregatorToml {
    /// Defaults for `dir`.
    pub fn new(dir: &Path) -> Self {
        AggregatorToml {
            data_dir: dir.join("agg"),
            grpc: "127.0.0.1:0".into(),
            top: Vec::new(),
            notify: Vec::new(),
            webhook: None,
            webhook_lines: Vec::new(),
        }
    }

    /// Listen for agents on this address (to restart on the same port).
    pub fn grpc(mut self, addr: impl std::fmt::Display) -> Self {
        self.grpc = addr.to_string();
        self
    }

    /// Send notifications to this webhook (channel `t`).
    pub fn webhook(mut self, url: &str) -> Self {
        self.webhook = Some(url.to_owned());
        self
    }

    /// Adds a top-level line, e.g. `node_timeout = "2s"`.
    pub fn set(mut self, line: &str) -> Self {
        self.top.push(line.to_owned());
        self
    }

    /// Adds a line to `[notify]` (with a webhook), e.g. `retry_max = "2s"`.
    pub fn notify(mut self, line: &str) -> Self {
        self.notify.push(line.to_owned());
        self
    }

    /// Adds a line to the `[[notify.webhook]]` table (with a webhook), e.g.
    /// `secret_file = "/path"`.
    pub fn webhook_line(mut self, line: &str) -> Self {
        self.webhook_lines.push(line.to_owned());
        self
    }

    /// The TOML text.
    pub fn build(&self) -> String {
        let mut s = format!(
            "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"{}\"\ndata_dir = \"{}\"\n",
            self.grpc,
            self.data_dir.display()
        );
        for line in &self.top {
            s.push_str(line);
            s.push('\n');
        }
        if let Some(url) = &self.webhook {
            s.push_str("[notify]\nretry_min = \"100ms\"\n");
            for line in &self.notify {
                s.push_str(line);
                s.push('\n');
            }
            s.push_str(&format!(
                "[[notify.webhook]]\nname = \"t\"\nurl = \"{url}\"\n"
            ));
            for line in &self.webhook_lines {
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }
}

/// Agent config lines that turn off the host rules beyond CPU and memory (swap, iowait,
/// steal, load, disks, inodes), so a test sees only the checks it asks for even on a
/// busy or nearly full build machine.
pub const QUIET_HOST_RULES: &str = "[rules.swap]\nenabled = false\n[rules.iowait]\nenabled = false\n\
[rules.steal]\nenabled = false\n[rules.load]\nenabled = false\n[rules.disk]\nenabled = false\n\
[rules.inodes]\nenabled = false\n";

/// An agent config for tests: fast sampling (250 ms) and heartbeats (500 ms), quick
/// reconnects (100–500 ms), no admin port, CPU and memory rules off (so a busy test
/// machine pages nothing), state in `DIR/agent-<id>`; add a process watch, endpoints or
/// any top-level or `[aggregator]` line.
#[derive(Debug, Clone)]
pub struct AgentToml {
    id: String,
    state_dir: PathBuf,
    endpoints: Vec<String>,
    top: Vec<String>,
    link: Vec<String>,
    watch: Option<String>,
}

impl AgentToml {
    /// Defaults for agent `id` streaming to the aggregator's gRPC address `grpc`.
    pub fn new(dir: &Path, id: &str, grpc: impl std::fmt::Display) -> Self {
        AgentToml {
            id: id.to_owned(),
            state_dir: dir.join(format!("agent-{id}")),
            endpoints: vec![format!("http://{grpc}")],
            top: Vec::new(),
            link: Vec::new(),
            watch: None,
        }
    }

    /// Replaces the endpoint list (full URLs).
    pub fn endpoints(mut self, endpoints: &[String]) -> Self {
        self.endpoints = endpoints.to_vec();
        self
    }

    /// Keeps the spool here instead.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = dir.to_owned();
        self
    }

    /// Watches this executable name (fewer than 1 running is critical).
    pub fn watch(mut self, name: &str) -> Self {
        self.watch = Some(name.to_owned());
        self
    }

    /// Adds a top-level line.
    pub fn set(mut self, line: &str) -> Self {
        self.top.push(line.to_owned());
        self
    }

    /// Adds a line to `[aggregator]`, e.g. `keepalive = "1s"`.
    pub fn link(mut self, line: &str) -> Self {
        self.link.push(line.to_owned());
        self
    }

    /// The TOML text.
    pub fn build(&self) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let mut s = format!(
            "agent_id = \"{}\"\ninterval = \"250ms\"\nheartbeat_interval = \"500ms\"\nstate_dir = \"{}\"\n",
            self.id,
            self.state_dir.display()
        );
        // No admin port unless a test asks for one with `set("admin_listen = …")`.
        if !self.top.iter().any(|l| l.starts_with("admin_listen")) {
            s.push_str("admin_listen = \"\"\n");
        }
        for line in &self.top {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str(&format!(
            "[aggregator]\nendpoints = [{}]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n",
            endpoints.join(", ")
        ));
        for line in &self.link {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str("[rules.cpu]\nenabled = false\n[rules.memory]\nenabled = false\n");
        s.push_str(QUIET_HOST_RULES);
        if let Some(name) = &self.watch {
            s.push_str(&format!("[[process]]\nname = \"{name}\"\n"));
        }
        s
    }
}
