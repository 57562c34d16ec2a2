//! The agent's active checks end to end: `[[http]]` against an HTTP server in the test
//! whose answers the test switches, `[[tcp]]` against a local listener, `[[exec]]` with
//! the real Nagios plugins of Debian's `monitoring-plugins-basic`, and the quick
//! diagnostic (`tocsin-agent check`). The real agent binary, and the real aggregator (and
//! webhook receiver) where an event or a page is what the agent must produce.
//!
//! The aggregator's API shows incidents (firing states) but not every event, nor the
//! `flapping` flag: OK and UNKNOWN events and the flag are read from the events the
//! aggregator stored (its SQLite file, opened read-only).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, WebhookReceiver, bin,
    eventually,
};

/// Where Debian's `monitoring-plugins-basic` installs the plugins.
const PLUGINS: &str = "/usr/lib/nagios/plugins";

/// Variables of the test's own environment that would change the agent's config.
const CONFIG_VARS: &[&str] = &[
    "CPU_ALERT_THRESHOLD",
    "MEMORY_ALERT_THRESHOLD",
    "ERROR_RATE_THRESHOLD",
    "HEALTH_CHECK_TIMEOUT",
    "RECOVERY_TIMEOUT",
    "NAMESPACE",
];

// ---------------------------------------------------------------------------------------
// An HTTP server the test steers.

/// How the test server answers every request (any method, any path).
#[derive(Debug, Clone)]
enum Answer {
    /// This status, at once.
    Status(u16),
    /// The statuses in turn, by request number (request N gets `statuses[N % len]`).
    Cycle(Vec<u16>),
    /// 200 after this delay.
    Slow(Duration),
}

/// A real HTTP server on 127.0.0.1:0, served on the test's runtime.
#[derive(Debug, Clone)]
struct Web {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<AtomicU64>,
}

impl Web {
    async fn start(answer: Answer) -> Result<Self> {
        let answer = Arc::new(Mutex::new(answer));
        let hits = Arc::new(AtomicU64::new(0));
        let (a, h) = (answer.clone(), hits.clone());
        let app = axum::Router::new().fallback(move || {
            let (a, h) = (a.clone(), h.clone());
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                let answer = a.lock().expect("answer lock").clone();
                let code = match answer {
                    Answer::Status(code) => code,
                    Answer::Cycle(codes) => {
                        codes[usize::try_from(n).unwrap_or(0) % codes.len().max(1)]
                    }
                    Answer::Slow(delay) => {
                        tokio::time::sleep(delay).await;
                        200
                    }
                };
                let status = axum::http::StatusCode::from_u16(code)
                    .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                (status, format!("answer {code}\n"))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Web { addr, answer, hits })
    }

    /// Changes how the following requests are answered.
    fn set(&self, answer: Answer) {
        *self.answer.lock().expect("answer lock") = answer;
    }

    /// Requests served (or being served) so far.
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
fn closed_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------
// Aggregator + agent.

/// An aggregator (paging `webhook`, if any) and an agent `id` with the check tables
/// `checks` (TOML appended to the harness's quiet agent config) and extra environment
/// `env`; returns once the aggregator stored the agent's first event.
async fn start_pair(
    dir: &Path,
    id: &str,
    checks: &str,
    env: &[(&str, &str)],
    webhook: Option<&WebhookReceiver>,
) -> Result<(Aggregator, Daemon)> {
    let mut agg_cfg = AggregatorToml::new(dir);
    if let Some(w) = webhook {
        agg_cfg = agg_cfg.webhook(&w.url);
    }
    let agg = Aggregator::start(dir, &agg_cfg.build()).await?;
    let cfg = write_agent_config(dir, &AgentToml::new(dir, id, agg.grpc).set(checks))?;
    let agent = Daemon::spawn_with_env(
        "tocsin-agent",
        &bin("tocsin-agent"),
        &["--config", cfg.to_str().context("utf-8 path")?],
        env,
        dir,
    )?;
    agg.wait_reported(id).await?;
    Ok((agg, agent))
}

fn write_agent_config(dir: &Path, toml: &AgentToml) -> Result<PathBuf> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml.build())?;
    Ok(path)
}

/// Waits for an incident of `check` for which `pred` holds (open or resolved).
async fn wait_incident(
    agg: &Aggregator,
    check: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let pred = &pred;
    eventually(what, PATIENCE, move || async move {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check && pred(i))
            .cloned()
    })
    .await
}

/// Every incident of `check`.
async fn incidents_of(agg: &Aggregator, check: &str) -> Result<Vec<Value>> {
    let list = agg.get("/api/v1/incidents").await?;
    Ok(list["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["check"] == check)
        .cloned()
        .collect())
}

/// One event as the aggregator stored it.
#[derive(Debug, Clone)]
struct Stored {
    seq: i64,
    check: String,
    state: String,
    previous: String,
    value: Option<f64>,
    message: String,
    flapping: bool,
}

/// The events of `agent` the aggregator (data in `dir/agg`) stored, in sequence order.
fn stored_events(dir: &Path, agent: &str) -> Result<Vec<Stored>> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("agg").join("tocsin.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT seq, check_name, state, previous, value, message, flapping FROM events \
         WHERE agent_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([agent], |r| {
        Ok(Stored {
            seq: r.get(0)?,
            check: r.get(1)?,
            state: r.get(2)?,
            previous: r.get(3)?,
            value: r.get(4)?,
            message: r.get(5)?,
            flapping: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Waits until the aggregator stored an event of `agent` for which `pred` holds.
async fn wait_stored(
    dir: &Path,
    agent: &str,
    what: &str,
    pred: impl Fn(&Stored) -> bool,
) -> Result<Stored> {
    let pred = &pred;
    eventually(what, PATIENCE, move || async move {
        stored_events(dir, agent)
            .ok()?
            .into_iter()
            .find(|e| pred(e))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The agent's command line (diagnostic, print-config).

/// Runs `tocsin-agent --config CONFIG ARGS` with the config variables of the test's own
/// environment removed and `env` added; returns (exit code, stdout, stderr). Bounded.
async fn agent_cli(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Option<i32>, String, String)> {
    let mut cmd = tokio::process::Command::new(bin("tocsin-agent"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOCSIN_") || CONFIG_VARS.contains(&k.as_str()) {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output())
        .await
        .with_context(|| format!("tocsin-agent {args:?} still runs after 40s"))??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The diagnostic row of `check`.
fn row<'a>(rows: &'a Value, check: &str) -> Result<&'a Value> {
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["check"] == check)
        .with_context(|| format!("no row {check} in {rows:#}"))
}

/// `word` occurs in `s` delimited by non-alphanumeric characters (so random hex ids
/// such as `…0abc3…` do not count).
fn has_word(s: &str, word: &str) -> bool {
    s.match_indices(word).any(|(i, _)| {
        let before = s[..i].chars().next_back();
        let after = s[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Processes a plugin left behind.

/// Processes whose command line contains `needle` and that still run (zombies, already
/// dead and waiting to be reaped, do not count): (pid, command line).
fn running_with(needle: &str) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(())?;
            alive(pid).then_some((pid, cmdline))
        })
        .collect()
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the command name in parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// SIGKILLs, when dropped, every process whose command line contains the needle (only
/// the test's own plugins, under its temporary directory), so a failing test leaves
/// nothing running.
#[derive(Debug)]
struct KillLeftovers(String);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        kill_running_with(&self.0);
    }
}

/// SIGKILLs every running process whose command line contains `needle`.
fn kill_running_with(needle: &str) {
    for (pid, _) in running_with(needle) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// A plugin script in `plugins/` that answers OK until the file `hang` exists next to it,
/// and from then on starts a copy of `sleep 30` (named `hangsleep`, so its command line
/// names the directory too) and waits for it; each hanging run appends "SHELL_PID
/// SLEEP_PID" to `pids`. Returns the script's path.
fn hanging_plugin(plugins: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(plugins)?;
    let sleep = plugins.join("hangsleep");
    std::fs::copy("/bin/sleep", &sleep)?;
    let script = plugins.join("hang.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e {flag} ]; then\n  {sleep} 30 &\n  echo \"$$ $!\" >> {pids}\n  wait\nfi\n\
             echo 'OK: not hanging yet'\n",
            flag = plugins.join("hang").display(),
            sleep = sleep.display(),
            pids = plugins.join("pids").display(),
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// The pids ("SHELL SLEEP") of the first hanging run recorded in `plugins/pids`.
fn first_hanging_run(plugins: &Path) -> Result<Vec<u32>> {
    let pids = std::fs::read_to_string(plugins.join("pids"))?;
    let first = pids.lines().next().context("no hanging run recorded")?;
    let pids: Vec<u32> = first
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if pids.len() != 2 {
        bail!("expected a shell and a sleep pid, got {first:?}");
    }
    Ok(pids)
}

/// Waits (a few seconds at most: the run already ended) until none of `pids` runs.
async fn wait_gone(pids: &[u32]) -> Result<()> {
    eventually(
        &format!("the plugin's processes {pids:?} gone"),
        Duration::from_secs(5),
        || async { pids.iter().all(|&p| !alive(p)).then_some(()) },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// HTTP.

/// An HTTP check against a server answering 500 goes critical with the status in the
/// message and pages; once the server answers 200 it is OK and the incident resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500_is_critical_with_the_status_and_200_resolves_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let web = Web::start(Answer::Status(500)).await?;
    let checks = format!(
        "[[http]]\nname = \"web\"\nurl = \"{}\"\ninterval = \"250ms\"\ntimeout = \"5s\"\n",
        web.url("/health")
    );
    let (agg, _agent) = start_pair(dir.path(), "node-http", &checks, &[], Some(&receiver)).await?;

    let incident = wait_incident(&agg, "http:web", "http:web critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    let summary = text(&incident["summary"]);
    assert!(
        summary.contains("http:web critical") && summary.contains("HTTP 500"),
        "the probe's finding is the summary: {incident}"
    );
    let page = receiver
        .wait_for("trigger", "node-http", "http:web")
        .await?;
    assert!(text(&page["incident"]["summary"]).contains("500"), "{page}");

    web.set(Answer::Status(200));
    receiver
        .wait_for("resolve", "node-http", "http:web")
        .await?;
    wait_incident(&agg, "http:web", "http:web resolved", |i| {
        i["status"] == "resolved"
    })
    .await?;
    let ok = wait_stored(dir.path(), "node-http", "http:web ok event", |e| {
        e.check == "http:web" && e.state == "ok" && e.previous == "critical"
    })
    .await?;
    assert!(ok.message.contains("http:web ok"), "{ok:?}");
    Ok(())
}

/// A server failing 3 requests in 10 (deterministically): over a 10 s window of probes
/// every 200 ms, the error rate check fires with the rate as its value and settles
/// critical near 30 % (warning 5 %, critical 20 % by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_error_rate_over_the_window_fires_with_the_rate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Seven successes first, so the first firing value is a rate, not a lone failure.
    let mut cycle = vec![200; 7];
    cycle.extend([500; 3]);
    let web = Web::start(Answer::Cycle(cycle)).await?;
    let checks = format!(
        "[[http]]\nname = \"api\"\nurl = \"{}\"\ninterval = \"200ms\"\nwindow = \"10s\"\ntimeout = \"5s\"\n",
        web.url("/")
    );
    let (agg, _agent) = start_pair(dir.path(), "node-rate", &checks, &[], None).await?;

    let first = wait_stored(dir.path(), "node-rate", "error rate firing", |e| {
        e.check == "http_error_rate:api" && (e.state == "warning" || e.state == "critical")
    })
    .await?;
    let v = first.value.context("the event carries the rate")?;
    assert!(
        v > 5.0 && v < 50.0,
        "a rate of a few failures among successes: {first:?}"
    );
    assert!(first.message.contains('%'), "{first:?}");

    let incident = wait_incident(
        &agg,
        "http_error_rate:api",
        "error rate critical near 30 %",
        |i| {
            i["state"] == "critical"
                && i["value"]
                    .as_f64()
                    .is_some_and(|v| (20.0..=45.0).contains(&v))
        },
    )
    .await?;
    assert_eq!(incident["unit"], "percent", "{incident}");
    assert!(
        web.hits() >= 9,
        "critical takes two failures after seven successes (2 of 9 > 20 %)"
    );
    Ok(())
}

/// A server answering after 1.5 s: P95 above latency_warning (1 s) is a latency warning
/// while the status stays OK; `timeout = "500ms"` makes the same server a "timed out"
/// failure; and a check without its own timeout takes `HEALTH_CHECK_TIMEOUT` (the seed's
/// variable, bare seconds) from the agent's environment, which `print-config` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_are_latency_warnings_or_timeouts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let web = Web::start(Answer::Slow(Duration::from_millis(1500))).await?;
    let url = web.url("/slow");
    let checks = format!(
        "[[http]]\nname = \"slow\"\nurl = \"{url}\"\ninterval = \"500ms\"\ntimeout = \"4s\"\n\
         latency_warning = \"1s\"\nlatency_critical = \"5s\"\n\
         [[http]]\nname = \"short\"\nurl = \"{url}\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\n\
         [[http]]\nname = \"dflt\"\nurl = \"{url}\"\ninterval = \"500ms\"\n"
    );
    let env = [("HEALTH_CHECK_TIMEOUT", "1")];
    let (agg, _agent) = start_pair(dir.path(), "node-slow", &checks, &env, None).await?;

    let latency = wait_incident(&agg, "http_latency:slow", "latency warning", |i| {
        i["state"] == "warning"
    })
    .await?;
    let p95 = latency["value"].as_f64().context("P95 value")?;
    assert!(
        (1000.0..5000.0).contains(&p95),
        "P95 in ms, above the warning level, below critical: {latency}"
    );
    assert_eq!(latency["unit"], "ms");

    let short = wait_incident(&agg, "http:short", "http:short critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(
        text(&short["summary"]).contains("timed out after 500ms"),
        "{short}"
    );
    let dflt = wait_incident(&agg, "http:dflt", "http:dflt critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(
        text(&dflt["summary"]).contains("timed out after 1s"),
        "HEALTH_CHECK_TIMEOUT=1 is the default timeout: {dflt}"
    );
    let ok = wait_stored(dir.path(), "node-slow", "http:slow ok", |e| {
        e.check == "http:slow" && e.state == "ok"
    })
    .await?;
    assert!(ok.message.contains("HTTP 200"), "{ok:?}");
    assert!(
        incidents_of(&agg, "http:slow").await?.is_empty(),
        "a slow answer within the timeout is not a failure"
    );

    let cfg = dir.path().join("agent.toml");
    let (code, out, err) = agent_cli(&cfg, &["print-config"], &env).await?;
    assert_eq!(code, Some(0), "{err}");
    let defaults = out
        .split("[defaults]")
        .nth(1)
        .context("a [defaults] table")?;
    assert!(
        defaults.contains("health_check_timeout = \"1\""),
        "the variable's value, as given: {out}"
    );
    let (_, out, _) = agent_cli(&cfg, &["print-config"], &[]).await?;
    assert!(out.contains("health_check_timeout = \"10s\""), "{out}");
    Ok(())
}

/// A server alternating 200/500 on every request, probed every 200 ms: the status check
/// changes state all the time and its events carry `flapping = true`; once the server is
/// steady the check is OK and a "stopped flapping" event follows.
///
/// The aggregator stores the flag with each event but shows it in no API or page, so it is
/// read from the stored events; the agent's log has the messages too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_check_is_flagged_and_says_when_it_stopped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let web = Web::start(Answer::Cycle(vec![200, 500])).await?;
    let checks = format!(
        "[[http]]\nname = \"flappy\"\nurl = \"{}\"\ninterval = \"200ms\"\ntimeout = \"5s\"\n",
        web.url("/")
    );
    let (_agg, mut agent) = start_pair(dir.path(), "node-flap", &checks, &[], None).await?;

    let flagged = wait_stored(dir.path(), "node-flap", "a flapping event", |e| {
        e.check == "http:flappy" && e.flapping
    })
    .await?;
    let before: Vec<Stored> = stored_events(dir.path(), "node-flap")?
        .into_iter()
        .filter(|e| e.check == "http:flappy" && e.seq < flagged.seq)
        .collect();
    assert!(
        before.len() >= 5 && before.iter().all(|e| !e.flapping),
        "it flaps after many changes, not at the first: {before:#?}"
    );

    web.set(Answer::Status(200));
    let stopped = wait_stored(dir.path(), "node-flap", "stopped flapping", |e| {
        e.check == "http:flappy" && e.message.contains("stopped flapping")
    })
    .await?;
    assert!(!stopped.flapping, "{stopped:?}");
    assert_eq!(stopped.state, "ok", "{stopped:?}");
    let last = stored_events(dir.path(), "node-flap")?
        .into_iter()
        .rfind(|e| e.check == "http:flappy" && e.state == "ok" && e.previous != "ok")
        .context("an ok transition")?;
    assert!(
        last.seq < stopped.seq,
        "steady OK first, then calm: {last:?}"
    );
    agent.wait_for_output("; stopped flapping").await?;
    Ok(())
}

/// Flapping does not page on every change: once the agent flags the check, the
/// aggregator holds paging (one incident stays open through the flaps), pages once when
/// the check settles while firing, and resolves it once when it is steady OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_check_pages_once_not_on_every_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let web = Web::start(Answer::Cycle(vec![200, 500])).await?;
    let checks = format!(
        "[[http]]\nname = \"flappy\"\nurl = \"{}\"\ninterval = \"200ms\"\ntimeout = \"5s\"\n\
         error_rate_critical = 100.0\nerror_rate_warning = 100.0\n",
        web.url("/")
    );
    let (agg, _agent) = start_pair(dir.path(), "node-flap2", &checks, &[], Some(&receiver)).await?;
    wait_stored(dir.path(), "node-flap2", "a flapping event", |e| {
        e.check == "http:flappy" && e.flapping
    })
    .await?;
    // Let the pages of the changes before the flag settle, then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = receiver
        .events("trigger", "node-flap2", "http:flappy")
        .len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = receiver
        .events("trigger", "node-flap2", "http:flappy")
        .len();
    assert_eq!(
        during, before,
        "about 20 changes while flapping, no new page ({before} before the flag)"
    );
    // Flap detection needs 11 evaluations (250 ms each here) of which more than half
    // are changes: a handful of pages come first.
    assert!(before <= 8, "{before} pages before the agent flagged it");

    // Steady failure: it settles while firing and is paged (or stays paged) once.
    web.set(Answer::Status(500));
    let open = eventually("one open incident, paged", PATIENCE, || async {
        let open: Vec<Value> = incidents_of(&agg, "http:flappy")
            .await
            .ok()?
            .into_iter()
            .filter(|i| i["status"] != "resolved")
            .collect();
        let id = open.first()?["id"].as_i64()?;
        // Paged in this cycle: the re-open window keeps the id, so a trigger from a cycle
        // before the flag does not count (a cycle whose page flapping held resolves
        // silently). Each paged cycle has a trigger, then its resolve.
        let of = |kind: &str| {
            receiver
                .events(kind, "node-flap2", "http:flappy")
                .iter()
                .filter(|t| t["incident"]["id"].as_i64() == Some(id))
                .count()
        };
        let paged = of("trigger") > of("resolve");
        (open.len() == 1 && paged).then_some(id)
    })
    .await?;
    // The changes before the flag reopen the same incident (re-open window), each cycle
    // with its own resolve, delivered long before now: count from here.
    let resolves_of = |id: i64| {
        receiver
            .events("resolve", "node-flap2", "http:flappy")
            .iter()
            .filter(|r| r["incident"]["id"].as_i64() == Some(id))
            .count()
    };
    let earlier = resolves_of(open);
    web.set(Answer::Status(200));
    eventually("the incident resolves", PATIENCE, || async {
        (resolves_of(open) > earlier).then_some(())
    })
    .await?;
    assert_eq!(resolves_of(open), earlier + 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// TCP.

/// A TCP check against a local listener is OK; once the listener is closed it pages
/// critical with "connection refused".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_is_ok_until_the_listener_closes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let checks = format!(
        "[[tcp]]\nname = \"db\"\naddress = \"{addr}\"\ninterval = \"250ms\"\ntimeout = \"2s\"\n"
    );
    let (agg, _agent) = start_pair(dir.path(), "node-tcp", &checks, &[], Some(&receiver)).await?;

    let ok = wait_stored(dir.path(), "node-tcp", "tcp:db ok", |e| {
        e.check == "tcp:db" && e.state == "ok"
    })
    .await?;
    assert!(
        ok.message.contains(&format!("connected to {addr}")),
        "{ok:?}"
    );
    assert!(incidents_of(&agg, "tcp:db").await?.is_empty());

    drop(listener);
    let page = receiver.wait_for("trigger", "node-tcp", "tcp:db").await?;
    assert_eq!(page["incident"]["state"], "critical");
    assert!(
        text(&page["incident"]["summary"]).contains(&format!("connection refused {addr}")),
        "{page}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Exec: real Nagios plugins.

/// Real plugins: `check_load` with unreachable levels is OK, and a perfdata rule on its
/// `load1` (critical above -1) is critical with the load as value; `check_tcp` to a closed
/// port is critical with the plugin's summary; `check_procs` counts a uniquely named
/// process (OK with one, CRITICAL with none, and its `procs` perfdata follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nagios_plugins_report_their_state_summary_and_perfdata() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut dummy = Dummy::new(dir.path(), "p")?;
    dummy.start()?;
    let port = closed_port()?;
    let checks = format!(
        "[[exec]]\nname = \"load\"\ncommand = [\"{PLUGINS}/check_load\", \"-w\", \"1000,1000,1000\", \"-c\", \"2000,2000,2000\"]\n\
         interval = \"500ms\"\ntimeout = \"10s\"\n\
         [exec.perfdata.load1]\ncritical = -1.0\n\
         [[exec]]\nname = \"port\"\ncommand = [\"{PLUGINS}/check_tcp\", \"-H\", \"127.0.0.1\", \"-p\", \"{port}\"]\n\
         interval = \"500ms\"\ntimeout = \"10s\"\n\
         [[exec]]\nname = \"procs\"\ncommand = [\"{PLUGINS}/check_procs\", \"-c\", \"1:1\", \"-C\", \"{name}\"]\n\
         interval = \"500ms\"\ntimeout = \"10s\"\n\
         [exec.perfdata.procs]\ncritical = 1.0\ndirection = \"below\"\n",
        name = dummy.name
    );
    let (agg, _agent) = start_pair(dir.path(), "node-exec", &checks, &[], None).await?;

    let load = wait_stored(dir.path(), "node-exec", "exec:load ok", |e| {
        e.check == "exec:load" && e.state == "ok"
    })
    .await?;
    assert!(
        load.message.contains("LOAD OK"),
        "the plugin's summary: {load:?}"
    );
    let load1 = wait_incident(&agg, "exec:load:load1", "load1 critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(
        load1["value"].as_f64().is_some_and(|v| v >= 0.0),
        "the load average is the value: {load1}"
    );
    assert_eq!(load1["threshold"], -1.0, "{load1}");

    let port_incident = wait_incident(&agg, "exec:port", "exec:port critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    let summary = text(&port_incident["summary"]);
    assert!(
        summary.contains("Connection refused") && summary.contains(&port.to_string()),
        "check_tcp's own summary: {port_incident}"
    );

    let procs = wait_stored(dir.path(), "node-exec", "exec:procs ok", |e| {
        e.check == "exec:procs" && e.state == "ok"
    })
    .await?;
    assert!(
        procs.message.contains("PROCS OK: 1 process"),
        "one {} running: {procs:?}",
        dummy.name
    );
    wait_stored(dir.path(), "node-exec", "procs perfdata ok", |e| {
        e.check == "exec:procs:procs" && e.state == "ok" && e.value == Some(1.0)
    })
    .await?;
    assert!(incidents_of(&agg, "exec:procs").await?.is_empty());

    dummy.kill();
    let gone = wait_incident(&agg, "exec:procs", "exec:procs critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(
        text(&gone["summary"]).contains("PROCS CRITICAL: 0 processes"),
        "{gone}"
    );
    let perf = wait_incident(&agg, "exec:procs:procs", "procs perfdata critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert_eq!(perf["value"], 0.0, "{perf}");
    Ok(())
}

/// A plugin that hangs, with `timeout = "1s"`: the running agent reports it UNKNOWN
/// "timed out" (it answered OK before), and the diagnostic too (hanging from its first
/// run); each time the plugin's whole process group is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_plugin_is_unknown_and_leaves_nothing_running() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    let needle = format!("{}/", plugins.display());
    let _leftovers = KillLeftovers(needle.clone());
    let script = hanging_plugin(&plugins)?;
    let checks = format!(
        "[[exec]]\nname = \"hang\"\ncommand = [\"{}\"]\ninterval = \"2s\"\ntimeout = \"1s\"\n",
        script.display()
    );
    let (_agg, agent) = start_pair(dir.path(), "node-hang", &checks, &[], None).await?;

    wait_stored(dir.path(), "node-hang", "exec:hang ok", |e| {
        e.check == "exec:hang" && e.state == "ok"
    })
    .await?;
    std::fs::write(plugins.join("hang"), "")?;
    let unknown = wait_stored(dir.path(), "node-hang", "exec:hang unknown", |e| {
        e.check == "exec:hang" && e.state == "unknown"
    })
    .await?;
    assert!(
        unknown.message.contains("timed out"),
        "UNKNOWN says why: {unknown:?}"
    );
    wait_gone(&first_hanging_run(&plugins)?).await?;
    // A run in progress when the agent is killed (SIGKILL) is not its to clean up.
    drop(agent);
    kill_running_with(&needle);

    // The diagnostic, with the plugin hanging from its first run.
    std::fs::remove_file(plugins.join("pids"))?;
    let cfg = dir.path().join("agent.toml");
    let (code, out, err) = agent_cli(&cfg, &["check", "--json"], &[]).await?;
    assert_eq!(code, Some(3), "UNKNOWN is the worst state: {out}{err}");
    let rows: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let hang = row(&rows, "exec:hang")?;
    assert_eq!(hang["state"], "unknown", "{hang}");
    assert!(text(&hang["message"]).contains("timed out"), "{hang}");
    let pids = first_hanging_run(&plugins)?;
    wait_gone(&pids).await?;
    Ok(())
}

/// Regression: a plugin UNKNOWN from its very first run (it exits 3, or it hangs) was
/// never reported by the running agent: no event, no log line, nothing at the aggregator,
/// while `check` showed it UNKNOWN. Now its first result is reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_plugin_unknown_from_its_first_run_is_reported() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    let _leftovers = KillLeftovers(format!("{}/", plugins.display()));
    let script = hanging_plugin(&plugins)?;
    std::fs::write(plugins.join("hang"), "")?;
    let bad = plugins.join("bad.sh");
    std::fs::write(
        &bad,
        "#!/bin/sh\necho 'UNKNOWN: invalid argument -x'\nexit 3\n",
    )?;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755))?;
    let checks = format!(
        "[[exec]]\nname = \"hang\"\ncommand = [\"{}\"]\ninterval = \"2s\"\ntimeout = \"1s\"\n\
         [[exec]]\nname = \"bad\"\ncommand = [\"{}\"]\ninterval = \"500ms\"\n",
        script.display(),
        bad.display()
    );
    let (_agg, mut agent) = start_pair(dir.path(), "node-unk", &checks, &[], None).await?;

    let bad = wait_stored(dir.path(), "node-unk", "exec:bad unknown", |e| {
        e.check == "exec:bad" && e.state == "unknown"
    })
    .await?;
    assert!(bad.message.contains("invalid argument -x"), "{bad:?}");
    let hang = wait_stored(dir.path(), "node-unk", "exec:hang unknown", |e| {
        e.check == "exec:hang" && e.state == "unknown"
    })
    .await?;
    assert!(hang.message.contains("timed out"), "{hang:?}");
    agent
        .wait_for_output("exec:bad unknown: UNKNOWN: invalid argument")
        .await?;
    // Reported once, not every run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad_events = stored_events(dir.path(), "node-unk")?
        .into_iter()
        .filter(|e| e.check == "exec:bad")
        .count();
    assert_eq!(bad_events, 1);
    Ok(())
}

/// Regression: stopping the agent (SIGTERM) while a plugin ran killed only the plugin
/// (the process-group leader), and the processes it had started ran on, orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_plugin_children_do_not_outlive_the_agent_shutdown() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    let _leftovers = KillLeftovers(format!("{}/", plugins.display()));
    let script = hanging_plugin(&plugins)?;
    std::fs::write(plugins.join("hang"), "")?;
    let toml = AgentToml::new(
        dir.path(),
        "node-stop",
        format!("127.0.0.1:{}", closed_port()?),
    )
    .set(&format!(
        "[[exec]]\nname = \"hang\"\ncommand = [\"{}\"]\ninterval = \"1s\"\ntimeout = \"20s\"\n",
        script.display()
    ));
    let cfg = write_agent_config(dir.path(), &toml)?;
    let mut agent = Daemon::spawn(
        "tocsin-agent",
        &bin("tocsin-agent"),
        &["--config", cfg.to_str().context("utf-8 path")?],
        dir.path(),
    )?;
    let pids = eventually("the plugin running", PATIENCE, || async {
        first_hanging_run(&plugins).ok()
    })
    .await?;
    assert!(pids.iter().all(|&p| alive(p)), "{pids:?} run");

    assert_eq!(agent.stop("TERM")?, Some(0), "a clean stop");
    wait_gone(&pids).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The quick diagnostic and secrets.

/// `check --json` with a failing HTTP check, a TCP check to a closed port and an OK
/// plugin: exit code 2 and one row per check with state and message; the table has a
/// MESSAGE column with the same messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diagnostic_runs_active_checks_and_shows_their_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let web = Web::start(Answer::Status(500)).await?;
    let port = closed_port()?;
    let toml = AgentToml::new(dir.path(), "node-diag", "127.0.0.1:9").set(&format!(
        "[[http]]\nname = \"web\"\nurl = \"{}\"\ntimeout = \"5s\"\n\
         [[tcp]]\nname = \"db\"\naddress = \"127.0.0.1:{port}\"\ntimeout = \"5s\"\n\
         [[exec]]\nname = \"fine\"\ncommand = [\"{PLUGINS}/check_dummy\", \"0\", \"all good\"]\n",
        web.url("/health")
    ));
    let cfg = write_agent_config(dir.path(), &toml)?;

    let (code, out, err) = agent_cli(&cfg, &["check", "--json"], &[]).await?;
    assert_eq!(code, Some(2), "CRITICAL is the worst state: {out}{err}");
    let rows: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let web_row = row(&rows, "http:web")?;
    assert_eq!(web_row["state"], "critical", "{web_row}");
    assert!(text(&web_row["message"]).contains("HTTP 500"), "{web_row}");
    // One probe is no error rate: the rolling checks wait for 5 results.
    assert!(
        row(&rows, "http_error_rate:web").is_err() && row(&rows, "http_latency:web").is_err(),
        "{rows}"
    );
    let db = row(&rows, "tcp:db")?;
    assert_eq!(db["state"], "critical", "{db}");
    assert!(
        text(&db["message"]).contains(&format!("connection refused 127.0.0.1:{port}")),
        "{db}"
    );
    let fine = row(&rows, "exec:fine")?;
    assert_eq!(fine["state"], "ok", "{fine}");
    assert!(text(&fine["message"]).contains("all good"), "{fine}");
    for r in [web_row, db, fine] {
        for field in [
            "check", "state", "value", "unit", "warning", "critical", "message",
        ] {
            assert!(r.get(field).is_some(), "{field} in {r}");
        }
    }

    let (code, table, _) = agent_cli(&cfg, &["check"], &[]).await?;
    assert_eq!(code, Some(2), "{table}");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("CHECK") && header.trim_end().ends_with("MESSAGE"),
        "{table}"
    );
    let line = |check: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{check} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("http:web").contains("critical") && line("http:web").contains("HTTP 500"),
        "{table}"
    );
    assert!(line("tcp:db").contains("connection refused"), "{table}");
    assert!(line("exec:fine").contains("all good"), "{table}");
    Ok(())
}

/// Credentials in a check URL (`user:secret@`, `?token=abc`) never show: not in the
/// diagnostic (table or JSON), not in the running agent's log (debug level for the
/// agent), not at the aggregator, not in `print-config`, which shows the URL redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_never_show() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let web = Web::start(Answer::Status(500)).await?;
    let closed = closed_port()?;
    let checks = format!(
        "[[http]]\nname = \"auth\"\nurl = \"http://user:secret@{addr}/health?token=abc\"\n\
         interval = \"250ms\"\ntimeout = \"5s\"\n\
         [[http]]\nname = \"gone\"\nurl = \"http://user:secret@127.0.0.1:{closed}/x?token=abc\"\n\
         interval = \"250ms\"\ntimeout = \"5s\"\n",
        addr = web.addr
    );
    // Paths hold random letters: take the temporary directory out before searching.
    let scrub = |s: &str| s.replace(&dir.path().display().to_string(), "<dir>");
    let leaks = |what: &str, s: &str| {
        let s = scrub(s);
        assert!(
            !has_word(&s, "secret") && !has_word(&s, "abc") && !s.contains("token="),
            "{what} shows a credential:\n{s}"
        );
    };

    let env = [("RUST_LOG", "info,tocsin_agent=debug")];
    let (agg, agent) = start_pair(dir.path(), "node-cred", &checks, &env, None).await?;
    let auth = wait_incident(&agg, "http:auth", "http:auth critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(text(&auth["summary"]).contains("HTTP 500"), "{auth}");
    let gone = wait_incident(&agg, "http:gone", "http:gone critical", |i| {
        i["state"] == "critical"
    })
    .await?;
    assert!(
        text(&gone["summary"]).contains("connection refused"),
        "{gone}"
    );
    leaks(
        "the aggregator's incidents",
        &agg.get("/api/v1/incidents").await?.to_string(),
    );
    for e in stored_events(dir.path(), "node-cred")? {
        leaks("a stored event", &e.message);
    }
    let log = agent.output();
    assert!(
        log.contains("http:auth"),
        "the log talks about the check: {log}"
    );
    leaks("the agent's log", &log);
    drop(agent);

    let cfg = dir.path().join("agent.toml");
    let (code, out, err) = agent_cli(&cfg, &["check", "--json"], &[]).await?;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("HTTP 500"), "{out}");
    leaks("check --json", &format!("{out}{err}"));
    let (_, out, err) = agent_cli(&cfg, &["check"], &[]).await?;
    assert!(out.contains("connection refused"), "{out}");
    leaks("check", &format!("{out}{err}"));
    let (code, out, err) = agent_cli(&cfg, &["print-config"], &[]).await?;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("http://***@{}/health?***", web.addr)),
        "the URL shows, redacted: {out}"
    );
    leaks("print-config", &format!("{out}{err}"));
    Ok(())
}

/// An exec check's environment (`env = { TOKEN = "s3cr3t" }`) and HTTP header values
/// reach the plugin and the server but `print-config` shows them redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_env_and_header_secrets_are_redacted_by_print_config() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let plugin = dir.path().join("token.sh");
    std::fs::write(
        &plugin,
        "#!/bin/sh\nif [ \"$TOKEN\" = s3cr3t ]; then echo 'OK: token received'; exit 0; fi\n\
         echo 'CRITICAL: no token'; exit 2\n",
    )?;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))?;
    let toml = AgentToml::new(dir.path(), "node-env", "127.0.0.1:9").set(&format!(
        "[[exec]]\nname = \"tok\"\ncommand = [\"{}\"]\nenv = {{ TOKEN = \"s3cr3t\" }}\n\
         [[http]]\nname = \"hdr\"\nurl = \"http://127.0.0.1:{}/\"\ntimeout = \"2s\"\n\
         [http.headers]\nAuthorization = \"Bearer hunter2\"\n",
        plugin.display(),
        closed_port()?
    ));
    let cfg = write_agent_config(dir.path(), &toml)?;

    let (code, out, err) = agent_cli(&cfg, &["print-config"], &[]).await?;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains("s3cr3t") && !out.contains("hunter2"),
        "secrets in print-config:\n{out}"
    );
    assert!(
        out.contains("TOKEN = \"<redacted>\"") && out.contains("Authorization = \"<redacted>\""),
        "the keys show, the values do not:\n{out}"
    );

    let (_, out, err) = agent_cli(&cfg, &["check", "--json"], &[]).await?;
    let rows: Value = serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
    let tok = row(&rows, "exec:tok")?;
    assert_eq!(tok["state"], "ok", "the plugin got the real value: {tok}");
    assert!(!out.contains("s3cr3t") && !out.contains("hunter2"), "{out}");
    Ok(())
}
