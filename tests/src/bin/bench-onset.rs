//! Onset → page and resolve, side by side (issue 9, scenario 2): real CPU load from
//! `stress-ng --cpu 0` (every core) starts at T0; the figure is the time until a local
//! webhook receiver (a real HTTP server on 127.0.0.1 in this process,
//! [`tocsin_e2e::WebhookReceiver`]) has read the firing page. The load is held
//! [`HOLD`] plus a random 0–1 s after the page (so T1 falls at any phase of the
//! sampling and scrape clocks, as T0 does), then killed (its process group, by PID) at T1; the second
//! figure is T1 → the resolve notification at the receiver.
//!
//! Systems, each trial with fresh processes and temporary directories:
//! - **tocsin**: the release `tocsin-aggregator` and `tocsin-agent` next to this binary;
//!   agent interval 1 s (and its default `cpu_step`: the busy % of the last 1 s,
//!   evaluated every 200 ms), `[rules.cpu]` warning 80 / critical 95 with `for = "0s"` and
//!   `clear_for = "0s"` (the other host rules off), aggregator `group_wait = "0s"`
//!   (`reopen_window = "0s"`, so every page is a new incident whose timestamps are its
//!   own) and one generic webhook to the receiver.
//! - **Prometheus + Alertmanager tuned** (Debian's `prometheus`,
//!   `prometheus-node-exporter`, `prometheus-alertmanager`): scrape and evaluation every
//!   1 s, alert `100 * (1 - avg(rate(node_cpu_seconds_total{mode="idle"}[5s]))) > 80`
//!   with `for: 0s`, Alertmanager `group_wait: 0s`, `group_interval: 1s`,
//!   `resolve_timeout: 5s`, a webhook receiver with `send_resolved: true`. The 5 s window
//!   is about four scrape intervals (the usual minimum for `rate`, so a late or missed
//!   scrape still leaves two samples); the same stack with `irate(…[3s])` (the last two
//!   samples: as fast as Prometheus gets) is measured too.
//! - **Prometheus + Alertmanager defaults**, one trial (long: minutes): what a Debian user
//!   gets — `/etc/prometheus/prometheus.yml`'s 15 s scrape and evaluation intervals,
//!   `/etc/prometheus/alertmanager.yml`'s `group_wait: 30s`, `group_interval: 5m`,
//!   `repeat_interval: 3h` — and the widely copied HostHighCpuLoad rule
//!   (`rate(…[2m])`, threshold 80, `for: 0m`). Bounded: no page within 5 minutes (or no
//!   resolve within 6) is reported as `-`.
//!
//! Trials alternate (tocsin, tuned, tuned irate, tocsin, …). Before each T0 the machine
//! must be idle (below 50 % busy for two consecutive seconds; waits up to 5 minutes,
//! then goes on and says so), and each peer ready (`/-/ready`, the Alertmanager known to
//! Prometheus, at least 3 scrapes stored and the alert expression evaluating).
//!
//! Usage: `cargo build --release --bins && target/release/bench-onset [RUNS] [--tsv]
//! [--skip-defaults] [--only-tocsin] [--interval=1s] [--cpu-step=auto]` (RUNS default
//! 5; `--interval` is the agent's sampling interval, for a look beyond the issue's 1 s;
//! `--cpu-step` its `cpu_step`, e.g. `0s` for one CPU evaluation per interval, default:
//! the agent's default; `--only-tocsin` runs no peer). Installs the peers with apt-get when missing
//! (root). Loopback only (every daemon listens on 127.0.0.1, Alertmanager without
//! clustering, Prometheus without remote write); stops every process it starts, by PID,
//! also on errors. Progress on stderr; the table (or with `--tsv` the rows of
//! `/work/helper-notes/bench-format.md`'s shared format) on stdout.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tocsin_e2e::measure::{ensure_debian, median};
use tocsin_e2e::{Aggregator, QUIET_HOST_RULES, WebhookReceiver, start_agent};

/// Progress on stderr (the table goes to stdout).
macro_rules! note {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    }};
}

const PROMETHEUS: &str = "/usr/bin/prometheus";
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const STRESS_NG: &str = "/usr/bin/stress-ng";

/// How long the load stays on after the page, before T1 (plus a random 0–999 ms: the
/// page follows a sample or an evaluation, so a whole number of seconds would put T1 at
/// the same phase of that clock every time).
const HOLD: Duration = Duration::from_secs(5);
/// The machine counts as idle below this busy percent (all cores, from `/proc/stat`).
const IDLE_BUSY_PCT: f64 = 50.0;
/// Longest wait for an idle machine (and a quiet alert) before a trial gives up: the
/// machine is shared, and CPU load of others would be measured as the onset.
const IDLE_PATIENCE: Duration = Duration::from_secs(1800);
/// Longest wait for a peer to become ready.
const READY_PATIENCE: Duration = Duration::from_secs(180);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// First line of `PROGRAM --version` (both streams: Prometheus prints to stderr).
fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A peer daemon, output to `LOG_DIR/NAME.log`; killed (SIGKILL, by PID) and reaped on
/// drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, program: &str, args: &[String], log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {program}"))?;
        Ok(Proc { name, child, log })
    }

    /// Fails (with the tail of its log) when the process has exited.
    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let out = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited with {status}:\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stress-ng --cpu 0` in its own process group; the whole group (the stress-ng parent
/// and its workers) gets SIGKILL on [`Load::end`] or on drop.
struct Load {
    child: Option<Child>,
}

impl Load {
    fn start(bound: Duration) -> Result<Self> {
        let child = Command::new(STRESS_NG)
            .args(["--cpu", "0", "--timeout"])
            .arg(format!("{}s", bound.as_secs().max(1)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("spawn stress-ng")?;
        Ok(Load { child: Some(child) })
    }

    /// Kills the process group (its id is the stress-ng PID) and reaps the parent.
    fn end(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.end();
    }
}

/// (busy, total) jiffies of the `cpu` line of `/proc/stat`.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Busy percent of all cores over the next second.
async fn busy_pct_1s() -> Result<f64> {
    let (b0, t0) = cpu_jiffies()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b1, t1) = cpu_jiffies()?;
    Ok((b1 - b0) as f64 * 100.0 / (t1 - t0).max(1) as f64)
}

/// Waits until the machine is below [`IDLE_BUSY_PCT`] for two consecutive seconds
/// (at most [`IDLE_PATIENCE`]); returns the last reading (busy percent) and whether it
/// was idle.
async fn wait_idle() -> Result<(f64, bool)> {
    let start = Instant::now();
    let mut calm = 0;
    let mut told = Instant::now();
    loop {
        let busy = busy_pct_1s().await?;
        if told.elapsed() >= Duration::from_secs(60) {
            note!("  waiting for an idle machine ({busy:.0} % busy now)");
            told = Instant::now();
        }
        calm = if busy < IDLE_BUSY_PCT { calm + 1 } else { 0 };
        if calm >= 2 {
            return Ok((busy, true));
        }
        if start.elapsed() > IDLE_PATIENCE {
            note!("  machine still {busy:.0} % busy after {IDLE_PATIENCE:?}: going on");
            return Ok((busy, false));
        }
    }
}

/// What a notification at the receiver is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Firing,
    Resolved,
}

/// Which system a trial runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    Tocsin,
    Peer(Peer),
}

/// A Prometheus + Alertmanager setup.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Peer {
    /// Name in the table and the TSV rows.
    name: &'static str,
    scrape_interval: &'static str,
    evaluation_interval: &'static str,
    /// The alert expression without `> 80`.
    expr: &'static str,
    group_wait: &'static str,
    group_interval: &'static str,
    repeat_interval: &'static str,
    resolve_timeout: &'static str,
    /// No page this long after T0: the trial gives up (`-`).
    onset_bound: Duration,
    /// No resolve this long after T1: `-`.
    resolve_bound: Duration,
}

const TUNED: Peer = Peer {
    name: "prometheus+alertmanager tuned",
    scrape_interval: "1s",
    evaluation_interval: "1s",
    expr: r#"100 * (1 - avg(rate(node_cpu_seconds_total{mode="idle"}[5s])))"#,
    group_wait: "0s",
    group_interval: "1s",
    repeat_interval: "1h",
    resolve_timeout: "5s",
    onset_bound: Duration::from_secs(60),
    resolve_bound: Duration::from_secs(60),
};

const TUNED_IRATE: Peer = Peer {
    name: "prometheus+alertmanager tuned irate",
    expr: r#"100 * (1 - avg(irate(node_cpu_seconds_total{mode="idle"}[3s])))"#,
    ..TUNED
};

const DEFAULTS: Peer = Peer {
    name: "prometheus+alertmanager defaults",
    scrape_interval: "15s",
    evaluation_interval: "15s",
    expr: r#"100 * (1 - avg(rate(node_cpu_seconds_total{mode="idle"}[2m])))"#,
    group_wait: "30s",
    group_interval: "5m",
    repeat_interval: "3h",
    resolve_timeout: "5m",
    onset_bound: Duration::from_secs(300),
    resolve_bound: Duration::from_secs(360),
};

/// tocsin's own stages of one trial, from the payload's timestamps (ms).
#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    /// T0 → `incident.breach_started_at` (the agent's sample that crossed 80 %).
    sample: Option<f64>,
    /// breach start → `incident.triggered_at` (evaluation, spool, gRPC, aggregator store
    /// and correlation).
    ingest: Option<f64>,
    /// triggered_at → the page read by the receiver (group_wait, outbox, HTTP POST).
    deliver: Option<f64>,
    /// T1 → `incident.resolved_at` (sampling, evaluation, transport, store).
    resolve_ingest: Option<f64>,
    /// resolved_at → the resolve read by the receiver.
    resolve_deliver: Option<f64>,
}

/// One trial's result, ms.
#[derive(Debug, Default, Clone, Copy)]
struct Trial {
    onset: Option<f64>,
    resolve: Option<f64>,
    stages: Stages,
}

/// `time` (RFC 3339) as Unix ms.
fn unix_ms_of(time: &Value) -> Option<f64> {
    let t = humantime::parse_rfc3339(time.as_str()?).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The kind of a received body: tocsin's `event` of the `cpu` check, or Alertmanager's
/// `status`.
fn kind_of(system: System, body: &Value) -> Option<Kind> {
    match system {
        System::Tocsin => {
            if body["incident"]["check"] != "cpu" {
                return None;
            }
            match body["event"].as_str()? {
                "trigger" => Some(Kind::Firing),
                "resolve" => Some(Kind::Resolved),
                _ => None,
            }
        }
        System::Peer(_) => match body["status"].as_str()? {
            "firing" => Some(Kind::Firing),
            "resolved" => Some(Kind::Resolved),
            _ => None,
        },
    }
}

/// The first `kind` request that arrived after `after`, within `bound` from `since`.
async fn wait_kind(
    receiver: &WebhookReceiver,
    system: System,
    kind: Kind,
    after: Instant,
    bound: Duration,
) -> Option<(Instant, Value)> {
    loop {
        let found = receiver
            .requests()
            .into_iter()
            .find(|(at, body)| *at >= after && kind_of(system, body) == Some(kind));
        if found.is_some() {
            return found;
        }
        if after.elapsed() > bound {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The processes of one system, stopped on drop.
enum Running {
    Tocsin {
        _agg: Aggregator,
        _agent: tocsin_e2e::Daemon,
    },
    Peer {
        _procs: Vec<Proc>,
    },
}

/// `sampling`: the agent config's `interval` (and `cpu_step`) lines.
async fn start_tocsin(dir: &Path, receiver: &WebhookReceiver, sampling: &str) -> Result<Running> {
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         [correlation]\ngroup_wait = \"0s\"\nreopen_window = \"0s\"\n\
         [notify]\nretry_min = \"100ms\"\n\
         [[notify.webhook]]\nname = \"bench\"\nurl = \"{}\"\n\
         [log]\nlevel = \"warn\"\n",
        dir.join("agg").display(),
        receiver.url
    );
    let agg = Aggregator::start(dir, &agg_cfg).await?;
    let agent_cfg = format!(
        "agent_id = \"onset\"\n{sampling}admin_listen = \"\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{}\"]\n\
         [rules.cpu]\nenabled = true\nwarning = 80.0\ncritical = 95.0\nfor = \"0s\"\nclear_for = \"0s\"\n\
         [rules.memory]\nenabled = false\n{QUIET_HOST_RULES}\
         [log]\nlevel = \"warn\"\n",
        dir.join("agent-state").display(),
        agg.grpc
    );
    let agent = start_agent(dir, &agent_cfg)?;
    agg.wait_connected("onset").await?;
    agg.wait_reported("onset").await?;
    // The first CPU reading has no usage (it is a difference of two): two more cycles.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    Ok(Running::Tocsin {
        _agg: agg,
        _agent: agent,
    })
}

/// `GET` a Prometheus API path with `query` as the `query` parameter; the JSON answer.
async fn prom_get(client: &reqwest::Client, base: &str, path: &str, query: &str) -> Option<Value> {
    let url =
        reqwest::Url::parse_with_params(&format!("{base}{path}"), &[("query", query)]).ok()?;
    client.get(url).send().await.ok()?.json().await.ok()
}

async fn ok_status(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Starts node_exporter, Alertmanager and Prometheus for `peer`; waits until they are
/// ready. Returns them and Prometheus's base URL.
async fn start_peer(
    dir: &Path,
    peer: Peer,
    receiver: &WebhookReceiver,
) -> Result<(Running, String)> {
    let (ne_port, am_port, prom_port) = (free_port()?, free_port()?, free_port()?);
    let am_cfg = dir.join("alertmanager.yml");
    std::fs::write(
        &am_cfg,
        format!(
            "global:\n  resolve_timeout: {}\nroute:\n  receiver: hook\n  group_by: ['alertname']\n  \
             group_wait: {}\n  group_interval: {}\n  repeat_interval: {}\nreceivers:\n  - name: hook\n    \
             webhook_configs:\n      - url: '{}'\n        send_resolved: true\n",
            peer.resolve_timeout,
            peer.group_wait,
            peer.group_interval,
            peer.repeat_interval,
            receiver.url
        ),
    )?;
    let rules = dir.join("rules.yml");
    std::fs::write(
        &rules,
        format!(
            "groups:\n  - name: bench\n    rules:\n      - alert: CpuBusy\n        expr: '{} > 80'\n        for: 0s\n",
            peer.expr
        ),
    )?;
    let prom_cfg = dir.join("prometheus.yml");
    let scrape_timeout = if peer.scrape_interval == "1s" {
        "1s"
    } else {
        "10s"
    };
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: {}\n  scrape_timeout: {scrape_timeout}\n  evaluation_interval: {}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             rule_files: ['{}']\nscrape_configs:\n  - job_name: node\n    static_configs:\n      \
             - targets: ['127.0.0.1:{ne_port}']\n",
            peer.scrape_interval,
            peer.evaluation_interval,
            rules.display()
        ),
    )?;
    let mut procs = vec![
        Proc::spawn(
            "node_exporter",
            NODE_EXPORTER,
            &[format!("--web.listen-address=127.0.0.1:{ne_port}")],
            dir,
        )?,
        Proc::spawn(
            "alertmanager",
            ALERTMANAGER,
            &[
                format!("--config.file={}", am_cfg.display()),
                format!("--storage.path={}", dir.join("am-data").display()),
                format!("--web.listen-address=127.0.0.1:{am_port}"),
                "--cluster.listen-address=".into(),
            ],
            dir,
        )?,
        Proc::spawn(
            "prometheus",
            PROMETHEUS,
            &[
                format!("--config.file={}", prom_cfg.display()),
                format!("--storage.tsdb.path={}", dir.join("prom-data").display()),
                format!("--web.listen-address=127.0.0.1:{prom_port}"),
            ],
            dir,
        )?,
    ];
    let client = reqwest::Client::new();
    let prom = format!("http://127.0.0.1:{prom_port}");
    let am = format!("http://127.0.0.1:{am_port}");
    let start = Instant::now();
    loop {
        for p in &mut procs {
            p.alive()?;
        }
        if ok_status(&client, &format!("{am}/-/ready")).await
            && ok_status(&client, &format!("{prom}/-/ready")).await
            && peer_ready(&client, &prom, peer).await
        {
            break;
        }
        if start.elapsed() > READY_PATIENCE {
            bail!("{} not ready after {READY_PATIENCE:?}", peer.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    note!(
        "  {} ready after {:.1}s",
        peer.name,
        start.elapsed().as_secs_f64()
    );
    Ok((Running::Peer { _procs: procs }, prom))
}

/// Prometheus knows the Alertmanager, has at least 3 scrapes of node_exporter stored,
/// and the alert expression has a value.
async fn peer_ready(client: &reqwest::Client, prom: &str, peer: Peer) -> bool {
    let active = async {
        let url = format!("{prom}/api/v1/alertmanagers");
        let v: Value = client.get(url).send().await.ok()?.json().await.ok()?;
        Some(!v["data"]["activeAlertmanagers"].as_array()?.is_empty())
    };
    if active.await != Some(true) {
        return false;
    }
    let scrapes = prom_get(
        client,
        prom,
        "/api/v1/query",
        r#"count_over_time(node_cpu_seconds_total{mode="idle",cpu="0"}[1h])"#,
    )
    .await;
    let enough = scrapes
        .as_ref()
        .and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        })
        .is_some_and(|n| n >= 3.0);
    if !enough {
        return false;
    }
    prom_get(client, prom, "/api/v1/query", peer.expr)
        .await
        .is_some_and(|v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        })
}

/// Waits until the machine is idle (see [`wait_idle`]) and the alert is quiet: the last
/// notification at the receiver (if any) is not a firing one and, for a peer, Prometheus
/// has no pending or firing alert. Start-up itself (Prometheus's above all) can make
/// the rule fire; a trial must start from a resolved rule. Bounded by `patience` plus
/// [`IDLE_PATIENCE`].
async fn wait_quiet(
    system: System,
    receiver: &WebhookReceiver,
    prom: Option<&str>,
    patience: Duration,
) -> Result<()> {
    let start = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let (busy, idle) = wait_idle().await?;
        let last = receiver
            .requests()
            .into_iter()
            .filter_map(|(_, b)| kind_of(system, &b))
            .next_back();
        let alerts = match prom {
            None => Some(0),
            Some(base) => {
                async {
                    let url = format!("{base}/api/v1/alerts");
                    let v: Value = client.get(url).send().await.ok()?.json().await.ok()?;
                    Some(v["data"]["alerts"].as_array()?.len())
                }
                .await
            }
        };
        if last != Some(Kind::Firing) && alerts == Some(0) {
            if idle {
                note!("  machine idle ({busy:.0} % busy), alert quiet");
            }
            return Ok(());
        }
        if start.elapsed() > patience + IDLE_PATIENCE {
            bail!(
                "the alert did not go quiet before the load (last notification {last:?}, alerts {alerts:?})"
            );
        }
    }
}

/// One trial of `system`: fresh processes, load at T0, page, hold, load end at T1,
/// resolve; every process stopped before it returns.
async fn trial(system: System, sampling: &str) -> Result<Trial> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let (onset_bound, resolve_bound) = match system {
        System::Tocsin => (Duration::from_secs(60), Duration::from_secs(60)),
        System::Peer(p) => (p.onset_bound, p.resolve_bound),
    };
    let (running, prom) = match system {
        System::Tocsin => (start_tocsin(dir.path(), &receiver, sampling).await?, None),
        System::Peer(p) => {
            let (running, prom) = start_peer(dir.path(), p, &receiver).await?;
            (running, Some(prom))
        }
    };
    wait_quiet(system, &receiver, prom.as_deref(), resolve_bound).await?;
    let t0_wall = SystemTime::now();
    let t0 = Instant::now();
    let mut load = Load::start(onset_bound + HOLD + Duration::from_secs(11))?;
    let mut out = Trial::default();
    let Some((paged, page)) = wait_kind(&receiver, system, Kind::Firing, t0, onset_bound).await
    else {
        note!("  no page within {onset_bound:?}");
        load.end();
        drop(running);
        return Ok(out);
    };
    let onset = paged.duration_since(t0).as_secs_f64() * 1000.0;
    out.onset = Some(onset);
    note!("  onset → page {onset:.0} ms");
    let wall_of = |at: Instant| unix_ms(t0_wall) + at.duration_since(t0).as_secs_f64() * 1000.0;
    if system == System::Tocsin {
        let breach = unix_ms_of(&page["incident"]["breach_started_at"]);
        let triggered = unix_ms_of(&page["incident"]["triggered_at"]);
        out.stages.sample = breach.map(|b| b - unix_ms(t0_wall));
        out.stages.ingest = breach.zip(triggered).map(|(b, t)| t - b);
        out.stages.deliver = triggered.map(|t| wall_of(paged) - t);
    }
    tokio::time::sleep(HOLD + Duration::from_millis(fastrand::u64(0..1000))).await;
    load.end();
    let t1 = Instant::now();
    match wait_kind(&receiver, system, Kind::Resolved, t1, resolve_bound).await {
        Some((resolved, body)) => {
            let ms = resolved.duration_since(t1).as_secs_f64() * 1000.0;
            out.resolve = Some(ms);
            note!("  load end → resolve {ms:.0} ms");
            if system == System::Tocsin
                && let Some(r) = unix_ms_of(&body["incident"]["resolved_at"])
            {
                out.stages.resolve_ingest = Some(r - wall_of(t1));
                out.stages.resolve_deliver = Some(wall_of(resolved) - r);
            }
        }
        None => {
            // Why: still firing at the source (the machine busy again?), or held back.
            let alerts = match &prom {
                Some(base) => match reqwest::get(format!("{base}/api/v1/alerts")).await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .ok()
                        .map(|v| v["data"]["alerts"].to_string()),
                    Err(_) => None,
                },
                None => None,
            };
            note!(
                "  no resolve within {resolve_bound:?} (machine {:.0} % busy now; Prometheus alerts {alerts:?})",
                busy_pct_1s().await.unwrap_or(f64::NAN)
            );
        }
    }
    drop(running);
    Ok(out)
}

/// median, min, max of the values present; `None` when there is none.
fn summary(values: &[Option<f64>]) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median(&v), min, max))
}

fn cells(s: Option<(f64, f64, f64)>, sep: &str) -> String {
    match s {
        Some((m, lo, hi)) => format!("{m:.1}{sep}{lo:.1}{sep}{hi:.1}"),
        None => ["-"; 3].join(sep),
    }
}

/// One comparison row: scenario, metric, tocsin's values, the peer's, the target.
struct Row {
    scenario: &'static str,
    metric: &'static str,
    tocsin: Option<(f64, f64, f64)>,
    peer: &'static str,
    peer_values: Option<(f64, f64, f64)>,
    target: &'static str,
}

fn list(values: &[Option<f64>]) -> String {
    let v: Vec<String> = values
        .iter()
        .map(|v| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.0}")))
        .collect();
    v.join(", ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    // On SIGINT or SIGTERM the benchmark future is dropped, so every guard stops its
    // processes before the exit.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT); every process stopped"),
        _ = term.recv() => bail!("terminated (SIGTERM); every process stopped"),
    }
}

/// The whole benchmark: arguments, trials, output.
async fn run() -> Result<()> {
    let mut runs = 5u32;
    let mut tsv = false;
    let mut skip_defaults = false;
    let mut only_tocsin = false;
    let mut interval = "1s".to_owned();
    let mut cpu_step = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--tsv" => tsv = true,
            "--skip-defaults" => skip_defaults = true,
            "--only-tocsin" => only_tocsin = true,
            a if a.starts_with("--interval=") => interval = a["--interval=".len()..].to_owned(),
            a if a.starts_with("--cpu-step=") => {
                cpu_step = Some(a["--cpu-step=".len()..].to_owned());
            }
            n => {
                runs = n
                    .parse()
                    .with_context(|| format!("RUNS must be a number, got {n:?}"))?;
            }
        }
    }
    ensure_debian(&[
        (PROMETHEUS, "prometheus"),
        (NODE_EXPORTER, "prometheus-node-exporter"),
        (ALERTMANAGER, "prometheus-alertmanager"),
        (STRESS_NG, "stress-ng"),
    ])?;
    for p in [PROMETHEUS, ALERTMANAGER, NODE_EXPORTER, STRESS_NG] {
        note!("{p}: {}", version(p));
    }

    // Without --cpu-step the agent's default applies (and an older agent, without the
    // key, still runs).
    let sampling = format!(
        "interval = \"{interval}\"\n{}",
        cpu_step
            .as_ref()
            .map_or_else(String::new, |s| format!("cpu_step = \"{s}\"\n"))
    );
    let sampling_note = format!(
        "interval {interval}, cpu_step {}",
        cpu_step.as_deref().unwrap_or("default")
    );
    let peers: &[Peer] = if only_tocsin {
        &[]
    } else {
        &[TUNED, TUNED_IRATE]
    };
    let mut tocsin: Vec<Trial> = Vec::new();
    let mut peer_trials: Vec<Vec<Trial>> = vec![Vec::new(); peers.len()];
    for r in 0..runs {
        note!("run {} of {runs}: tocsin ({sampling_note})", r + 1);
        tocsin.push(trial(System::Tocsin, &sampling).await?);
        for (i, p) in peers.iter().enumerate() {
            note!("run {} of {runs}: {}", r + 1, p.name);
            peer_trials[i].push(trial(System::Peer(*p), &sampling).await?);
        }
    }
    let defaults = if skip_defaults || only_tocsin {
        None
    } else {
        note!("one trial: {} (minutes)", DEFAULTS.name);
        Some(trial(System::Peer(DEFAULTS), &sampling).await?)
    };

    let onset = |t: &[Trial]| t.iter().map(|t| t.onset).collect::<Vec<_>>();
    let resolve = |t: &[Trial]| t.iter().map(|t| t.resolve).collect::<Vec<_>>();
    let t_onset = summary(&onset(&tocsin));
    let t_resolve = summary(&resolve(&tocsin));
    let mut rows = Vec::new();
    for (p, trials) in peers.iter().zip(&peer_trials) {
        rows.push(Row {
            scenario: "onset_to_page",
            metric: "cpu load start to webhook page",
            tocsin: t_onset,
            peer: p.name,
            peer_values: summary(&onset(trials)),
            target: "<= 1000 ms, <= 0.25 x peer",
        });
    }
    let d = [defaults.unwrap_or_default()];
    rows.push(Row {
        scenario: "onset_to_page",
        metric: "cpu load start to webhook page",
        tocsin: t_onset,
        peer: DEFAULTS.name,
        peer_values: defaults.and_then(|_| summary(&onset(&d))),
        target: "<= 1000 ms",
    });
    for (p, trials) in peers.iter().zip(&peer_trials) {
        rows.push(Row {
            scenario: "resolve",
            metric: "cpu load end to webhook resolve",
            tocsin: t_resolve,
            peer: p.name,
            peer_values: summary(&resolve(trials)),
            target: "<= 1500 ms",
        });
    }
    rows.push(Row {
        scenario: "resolve",
        metric: "cpu load end to webhook resolve",
        tocsin: t_resolve,
        peer: DEFAULTS.name,
        peer_values: defaults.and_then(|_| summary(&resolve(&d))),
        target: "<= 1500 ms",
    });

    let mut out = String::new();
    if tsv {
        for r in &rows {
            out.push_str(&format!(
                "{}\t{}\tms\t{}\t{}\t{}\t{}\n",
                r.scenario,
                r.metric,
                cells(r.tocsin, "\t"),
                r.peer,
                cells(r.peer_values, "\t"),
                r.target
            ));
        }
    } else {
        out.push_str(&format!(
            "Onset → page and resolve, ms ({runs} alternating trials per system; defaults: {} trial)\n\n\
             | scenario | peer | tocsin median | min | max | peer median | min | max | ratio tocsin/peer | target |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
            if defaults.is_some() { "1" } else { "no" }
        ));
        for r in &rows {
            let ratio = match (r.tocsin, r.peer_values) {
                (Some(t), Some(p)) if p.0 > 0.0 => format!("{:.2}", t.0 / p.0),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {ratio} | {} |\n",
                r.scenario,
                r.peer,
                cells(r.tocsin, " | "),
                cells(r.peer_values, " | "),
                r.target
            ));
        }
        let stage = |f: fn(&Stages) -> Option<f64>| {
            let v: Vec<Option<f64>> = tocsin.iter().map(|t| f(&t.stages)).collect();
            format!("{} | {}", cells(summary(&v), " | "), list(&v))
        };
        out.push_str(
            "\ntocsin's stages (ms, from the payload's timestamps; ms resolution)\n\n\
             | stage | median | min | max | trials |\n|---|---:|---:|---:|---|\n",
        );
        for (name, f) in [
            (
                "T0 → breach_started_at (the sample that crossed)",
                (|s: &Stages| s.sample) as fn(&Stages) -> Option<f64>,
            ),
            (
                "breach_started_at → triggered_at (agent → aggregator)",
                |s| s.ingest,
            ),
            ("triggered_at → page at the receiver", |s| s.deliver),
            ("T1 → resolved_at (sample, agent → aggregator)", |s| {
                s.resolve_ingest
            }),
            ("resolved_at → resolve at the receiver", |s| {
                s.resolve_deliver
            }),
        ] {
            out.push_str(&format!("| {name} | {} |\n", stage(f)));
        }
        out.push_str("\nEvery trial (ms, in order):\n\n");
        out.push_str(&format!(
            "- tocsin: onset {}; resolve {}\n",
            list(&onset(&tocsin)),
            list(&resolve(&tocsin))
        ));
        for (p, trials) in peers.iter().zip(&peer_trials) {
            out.push_str(&format!(
                "- {}: onset {}; resolve {}\n",
                p.name,
                list(&onset(trials)),
                list(&resolve(trials))
            ));
        }
        if defaults.is_some() {
            out.push_str(&format!(
                "- {}: onset {}; resolve {}\n",
                DEFAULTS.name,
                list(&onset(&d)),
                list(&resolve(&d))
            ));
        }
    }
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    Ok(())
}
