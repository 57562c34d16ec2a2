//! The agent's process watches end to end, against real processes: long and multi-byte
//! executable names, helper scripts that only mention the name, zombies, pidfiles, a
//! real cgroup for a unit watch, min/max counts, local recovery through pidfd with its
//! restart budget, restart counting, and an agent restart while a rule fires.
//!
//! Real binaries (agent, aggregator), real processes (copies of `/bin/sleep` under the
//! watched names, `sh`, `python3`), a real cgroup and, where a page matters, a real
//! webhook receiver. Each test has its own temporary directory, names and aggregator.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, WebhookReceiver, bin, eventually, start_agent,
};

/// How long one state change may take to reach the aggregator (a test stays < 60 s).
const WAIT: Duration = Duration::from_secs(20);

/// A tag unique to this test process and run, for names of processes and cgroups.
fn tag() -> String {
    format!("{:x}{:04x}", std::process::id() % 0xffff, fastrand::u16(..))
}

/// A copy of `/bin/sleep` under `name` and the instances of it this test started.
/// Dropping it SIGKILLs the instances and any other live process running this very file
/// (the ones a recovery action started with `setsid`), by PID.
#[derive(Debug)]
struct Sleeper {
    name: String,
    path: PathBuf,
    children: Vec<Child>,
}

impl Sleeper {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        fs::copy("/bin/sleep", &path).with_context(|| format!("copy sleep to {path:?}"))?;
        let path = fs::canonicalize(&path)?;
        Ok(Sleeper {
            name: name.to_owned(),
            path,
            children: Vec::new(),
        })
    }

    /// Starts one more instance (`NAME 3600`); returns its PID once it runs the copy.
    fn start(&mut self) -> Result<u32> {
        let child = Command::new(&self.path)
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {:?}", self.path))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// SIGKILLs and reaps the oldest instance this test started; returns its PID.
    fn kill_one(&mut self) -> Option<u32> {
        if self.children.is_empty() {
            return None;
        }
        let mut c = self.children.remove(0);
        let pid = c.id();
        let _ = c.kill();
        let _ = c.wait();
        Some(pid)
    }

    /// PIDs of live (non-zombie) processes executing this copy, from `/proc/PID/exe`.
    fn running(&self) -> Vec<u32> {
        processes_running(&self.path)
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        while self.kill_one().is_some() {}
        for pid in self.running() {
            kill_pid(pid);
        }
    }
}

/// PIDs of live processes whose executable is `path` (a zombie has no `exe` link).
fn processes_running(path: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == path))
        .collect()
}

/// SIGKILLs one process this test caused to exist (by PID).
fn kill_pid(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The one-letter state of a process from `/proc/PID/stat` (`Z` = zombie).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) S ...": comm may contain spaces and parentheses; the state follows the
    // last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Runs `tocsin-agent --config CONFIG check --json` and returns its rows; fails when its
/// output is not strict UTF-8 JSON.
fn check_json(config: &Path) -> Result<Vec<Value>> {
    let mut cmd = Command::new(bin("tocsin-agent"));
    cmd.arg("--config")
        .arg(config)
        .args(["check", "--json"])
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("TOCSIN_") || k.ends_with("_ALERT_THRESHOLD") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().context("run tocsin-agent check --json")?;
    let text = String::from_utf8(out.stdout).context("check --json printed invalid UTF-8")?;
    let rows: Vec<Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "check --json is not a JSON array:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(rows)
}

/// The row of `check` among `rows`.
fn row<'a>(rows: &'a [Value], check: &str) -> Result<&'a Value> {
    rows.iter()
        .find(|r| r["check"] == check)
        .with_context(|| format!("no row {check:?} in {rows:?}"))
}

/// Writes `config` to `dir/NAME` for `check --json`.
fn write_config(dir: &Path, name: &str, config: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    fs::write(&path, config)?;
    Ok(path)
}

/// Every incident the aggregator holds for `check`, newest first.
async fn incidents(agg: &Aggregator, check: &str) -> Vec<Value> {
    agg.get("/api/v1/incidents")
        .await
        .ok()
        .and_then(|l| l["incidents"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["check"] == check)
        .collect()
}

fn is_open(i: &Value) -> bool {
    i["status"] != "resolved"
}

/// Waits for an open incident of `check` and returns it.
async fn wait_open(agg: &Aggregator, check: &str) -> Result<Value> {
    eventually(&format!("an open incident for {check}"), WAIT, || async {
        incidents(agg, check).await.into_iter().find(is_open)
    })
    .await
}

/// Waits until `check` has no open incident and at least `resolved` resolutions (an
/// outage that came back within the re-open window reopens its incident: each outage
/// counts once, as a `resolved` entry on its incident's timeline).
async fn wait_resolved(agg: &Aggregator, check: &str, resolved: usize) -> Result<()> {
    eventually(
        &format!("{resolved} resolved outage(s) for {check} and none open"),
        WAIT,
        || async {
            let list = incidents(agg, check).await;
            if list.iter().any(is_open) {
                return None;
            }
            let mut resolutions = 0;
            for i in &list {
                let d = agg
                    .get(&format!("/api/v1/incidents/{}", i["id"]))
                    .await
                    .ok()?;
                resolutions += d["timeline"]
                    .as_array()?
                    .iter()
                    .filter(|e| e["kind"] == "resolved")
                    .count();
            }
            (resolutions >= resolved).then_some(())
        },
    )
    .await
}

/// Fails when `check` has an open incident now.
async fn assert_none_open(agg: &Aggregator, check: &str, why: &str) -> Result<()> {
    let open: Vec<Value> = incidents(agg, check)
        .await
        .into_iter()
        .filter(is_open)
        .collect();
    ensure!(
        open.is_empty(),
        "{why}: {check} has open incidents {open:?}"
    );
    Ok(())
}

/// `[[process]]` table text: `name` plus extra `key = value` lines.
fn process_table(name: &str, lines: &[&str]) -> String {
    let mut s = format!("[[process]]\nname = \"{name}\"");
    for l in lines {
        s.push('\n');
        s.push_str(l);
    }
    s
}

/// A long executable name (more than the kernel's 15-byte `comm`) is matched by its
/// full name: counted while running, a SIGKILL is critical at the aggregator, a restart
/// resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_executable_name_is_watched_by_its_full_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-long-sleeper-{}", tag());
    assert!(name.len() > 15);
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    let pid = sleeper.start()?;
    eventually("the copy runs", WAIT, || async {
        (!sleeper.running().is_empty()).then_some(())
    })
    .await?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    assert_eq!(
        comm.trim_end(),
        &name[..15],
        "the kernel truncates comm: only the full name can match"
    );

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let cfg = AgentToml::new(dir.path(), "node-long", agg.grpc)
        .watch(&name)
        .build();
    let check = format!("process:{name}");
    let rows = check_json(&write_config(dir.path(), "check.toml", &cfg)?)?;
    let r = row(&rows, &check)?;
    assert_eq!(r["value"], 1.0, "counted while running: {r}");
    assert_eq!(r["state"], "ok", "{r}");

    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-long").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_none_open(&agg, &check, "the process runs").await?;

    sleeper.kill_one();
    let incident = wait_open(&agg, &check).await?;
    assert_eq!(incident["state"], "critical", "{incident}");
    assert_eq!(incident["value"], 0.0, "{incident}");
    assert_eq!(incident["labels"]["process"], name.as_str(), "{incident}");

    sleeper.start()?;
    wait_resolved(&agg, &check, 1).await?;
    Ok(())
}

/// A name with multi-byte characters (whose 15-byte `comm` ends inside a character)
/// stays valid UTF-8 and byte-for-byte equal in `check --json`, the aggregator's API and
/// the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multibyte_name_stays_valid_utf8_everywhere() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-dümmy-服务-{}", tag());
    assert!(
        !name.is_char_boundary(15),
        "comm (15 bytes) must cut a character in two"
    );
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    sleeper.start()?;
    eventually("the copy runs", WAIT, || async {
        (!sleeper.running().is_empty()).then_some(())
    })
    .await?;

    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let cfg = AgentToml::new(dir.path(), "node-utf8", agg.grpc)
        .watch(&name)
        .build();
    let check = format!("process:{name}");
    let rows = check_json(&write_config(dir.path(), "check.toml", &cfg)?)?;
    let r = row(&rows, &check)?;
    assert_eq!(r["check"].as_str(), Some(check.as_str()));
    assert_eq!(r["value"], 1.0, "counted while running: {r}");
    for want in [
        format!("process_restarts:{name}"),
        format!("process:{name}"),
    ] {
        row(&rows, &want)?;
    }

    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-utf8").await?;
    sleeper.kill_one();
    let trigger = receiver.wait_for("trigger", "node-utf8", &check).await?;
    assert_eq!(trigger["incident"]["check"].as_str(), Some(check.as_str()));
    assert_eq!(
        trigger["incident"]["labels"]["process"].as_str(),
        Some(name.as_str())
    );
    let summary = trigger["incident"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&name), "{summary}");

    // The API's raw bytes: strict UTF-8, no replacement characters, the name verbatim.
    let raw = reqwest::get(format!("http://{}/api/v1/incidents", agg.http))
        .await?
        .bytes()
        .await?;
    let text = String::from_utf8(raw.to_vec()).context("the API answered invalid UTF-8")?;
    assert!(!text.contains('\u{fffd}'), "{text}");
    let list: Value = serde_json::from_str(&text)?;
    let incident = &list["incidents"][0];
    assert_eq!(incident["check"].as_str(), Some(check.as_str()), "{list}");
    assert_eq!(incident["labels"]["process"].as_str(), Some(name.as_str()));

    sleeper.start()?;
    let resolve = receiver.wait_for("resolve", "node-utf8", &check).await?;
    assert_eq!(resolve["incident"]["check"].as_str(), Some(check.as_str()));
    Ok(())
}

/// Processes whose command line merely mentions the watched name (a shell snippet, an
/// interpreter given the name as an argument) are not instances of an executable-name
/// watch; a `cmdline` pattern watch counts them; neither the agent nor `check` counts
/// itself, although both have the name in their own command lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpers_mentioning_the_name_count_only_for_a_cmdline_pattern() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-helper-{}", tag());
    let pattern_watch = format!("pattern-{name}");
    // The agent's (and `check`'s) own command line holds the name: `--config .../cfg-NAME/agent.toml`.
    let cfg_dir = dir.path().join(format!("cfg-{name}"));
    fs::create_dir(&cfg_dir)?;

    // Helpers that block on stdin, without children of their own. (`/bin/sleep 30 NAME`
    // is not usable: GNU sleep rejects the extra argument and exits.)
    let file_arg = dir.path().join(&name);
    let argvs: Vec<Vec<String>> = vec![
        vec!["sh".into(), "-c".into(), format!("read x; : {name}")],
        vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "import sys; sys.stdin.read()".into(),
            name.clone(),
        ],
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "read x".into(),
            file_arg.display().to_string(),
        ],
    ];
    let mut helpers = Vec::new();
    for argv in &argvs {
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {argv:?}"))?;
        helpers.push(KillOnDrop(child));
    }
    let expected = argvs.len() as f64;
    let pids: Vec<u32> = helpers.iter().map(|h| h.0.id()).collect();
    eventually("helpers' command lines hold the name", WAIT, || async {
        pids.iter()
            .all(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&name))
            })
            .then_some(())
    })
    .await?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let max = format!("max = {}", argvs.len());
    let min = format!("min = {}", argvs.len());
    let cmdline = format!("cmdline = \"{name}\"");
    let cfg = AgentToml::new(dir.path(), "node-helpers", agg.grpc)
        .set(&process_table(&name, &[]))
        .set(&process_table(
            &pattern_watch,
            &[&cmdline, &min, &max, "discovery_interval = \"250ms\""],
        ))
        .build();

    // `check` runs from a config path that holds the name, before the agent runs.
    let rows = check_json(&write_config(&cfg_dir, "check.toml", &cfg)?)?;
    let exe_row = row(&rows, &format!("process:{name}"))?;
    assert_eq!(
        exe_row["value"], 0.0,
        "helpers are not instances: {exe_row}"
    );
    assert_eq!(exe_row["state"], "critical", "{exe_row}");
    let pattern_row = row(&rows, &format!("process:{pattern_watch}"))?;
    assert_eq!(
        pattern_row["value"], expected,
        "the pattern counts every helper and not `check` itself: {pattern_row}"
    );
    assert_eq!(
        row(&rows, &format!("process_max:{pattern_watch}"))?["state"],
        "ok"
    );

    let _agent = start_agent(&cfg_dir, &cfg)?;
    let exe_incident = wait_open(&agg, &format!("process:{name}")).await?;
    assert_eq!(exe_incident["value"], 0.0, "{exe_incident}");
    // Evaluated in the same cycle: counting the agent would make max+1 (a warning), and
    // not counting the helpers would be below min (critical).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_none_open(
        &agg,
        &format!("process_max:{pattern_watch}"),
        "agent counted",
    )
    .await?;
    assert_none_open(&agg, &format!("process:{pattern_watch}"), "helpers missed").await?;

    // One helper fewer: the count drops to min - 1, not to min (the agent is no instance).
    drop(helpers.pop());
    let incident = wait_open(&agg, &format!("process:{pattern_watch}")).await?;
    assert_eq!(incident["state"], "critical", "{incident}");
    assert_eq!(incident["value"], expected - 1.0, "{incident}");
    Ok(())
}

/// A child process that is SIGKILLed and reaped on drop.
#[derive(Debug)]
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A watched process that exited but was not reaped by its parent (a zombie) is not
/// running: count 0, critical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_not_a_running_instance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-zombie-{}", tag());
    let sleeper = Sleeper::new(dir.path(), &name)?;
    // The parent forks, execs the watched copy in the child, prints its PID and never
    // waits for it.
    let script = "import os, sys, time\n\
                  pid = os.fork()\n\
                  if pid == 0:\n    os.execv(sys.argv[1], [sys.argv[1], '3600'])\n\
                  print(pid, flush=True)\n\
                  time.sleep(3600)\n";
    let mut parent = KillOnDrop(
        Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&sleeper.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(parent.0.stdout.take().context("stdout")?).read_line(&mut line)?;
    let child: u32 = line.trim().parse().context("child pid")?;
    eventually("the child runs the copy", WAIT, || async {
        sleeper.running().contains(&child).then_some(())
    })
    .await?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let cfg = AgentToml::new(dir.path(), "node-zombie", agg.grpc)
        .watch(&name)
        .build();
    let check = format!("process:{name}");
    let check_cfg = write_config(dir.path(), "check.toml", &cfg)?;
    assert_eq!(row(&check_json(&check_cfg)?, &check)?["value"], 1.0);
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-zombie").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_none_open(&agg, &check, "the child runs").await?;

    kill_pid(child);
    eventually("the child is a zombie", WAIT, || async {
        (proc_state(child) == Some('Z')).then_some(())
    })
    .await?;
    let incident = wait_open(&agg, &check).await?;
    assert_eq!(incident["state"], "critical", "{incident}");
    assert_eq!(incident["value"], 0.0, "{incident}");
    let r = check_json(&check_cfg)?;
    assert_eq!(row(&r, &check)?["value"], 0.0);
    assert_eq!(
        proc_state(child),
        Some('Z'),
        "the zombie still exists while it is not counted"
    );
    drop(parent);
    Ok(())
}

/// A pidfile watch: a live PID is ok; the process killed, a stale pidfile naming a dead
/// PID, and a missing pidfile are critical (the last with the path in the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pidfile_watch_follows_the_pid_in_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tag();
    let watch = format!("pf-{t}");
    let pidfile = dir.path().join(format!("daemon-{t}.pid"));
    let mut sleeper = Sleeper::new(dir.path(), &format!("tocsin-pidfile-{t}"))?;
    let first = sleeper.start()?;
    fs::write(&pidfile, format!("{first}\n"))?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let cfg = AgentToml::new(dir.path(), "node-pidfile", agg.grpc)
        .set(&process_table(
            &watch,
            &[&format!("pidfile = \"{}\"", pidfile.display())],
        ))
        .build();
    let check = format!("process:{watch}");
    let check_cfg = write_config(dir.path(), "check.toml", &cfg)?;
    let r = check_json(&check_cfg)?;
    assert_eq!(row(&r, &check)?["value"], 1.0, "{r:?}");
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-pidfile").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_none_open(&agg, &check, "the PID in the file lives").await?;

    // Killed: the file names a dead process.
    sleeper.kill_one();
    let killed = wait_open(&agg, &check).await?;
    assert_eq!(killed["value"], 0.0, "{killed}");
    let second = sleeper.start()?;
    fs::write(&pidfile, format!("{second}\n"))?;
    wait_resolved(&agg, &check, 1).await?;

    // Stale: the file names a process that exited long ago (started and reaped here).
    let mut gone = Command::new("true").spawn()?;
    let dead = gone.id();
    gone.wait()?;
    ensure!(
        !Path::new(&format!("/proc/{dead}")).exists(),
        "PID {dead} was reused"
    );
    fs::write(&pidfile, format!("{dead}\n"))?;
    let stale = wait_open(&agg, &check).await?;
    assert_eq!(stale["state"], "critical", "{stale}");
    assert_eq!(stale["value"], 0.0, "{stale}");
    fs::write(&pidfile, format!("{second}\n"))?;
    wait_resolved(&agg, &check, 2).await?;

    // Missing: critical, and the message names the file.
    fs::remove_file(&pidfile)?;
    let missing = wait_open(&agg, &check).await?;
    let path = pidfile.display().to_string();
    let summary = missing["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&path), "the path in {summary:?}");
    assert_eq!(missing["state"], "critical", "{missing}");
    let r = check_json(&check_cfg)?;
    let r = row(&r, &check)?;
    assert_eq!(r["state"], "critical", "{r}");
    assert!(
        r["message"].as_str().is_some_and(|m| m.contains(&path)),
        "{r}"
    );
    Ok(())
}

/// A real cgroup named like a systemd unit, removed (after its processes are killed) on
/// drop.
#[derive(Debug)]
struct TestCgroup {
    dir: PathBuf,
    children: Vec<Child>,
}

impl TestCgroup {
    /// Creates `ROOT/UNIT` in the first hierarchy that takes it: the v1 named `systemd`
    /// hierarchy, the unified (v2) one, or a v2 `/sys/fs/cgroup`.
    fn create(unit: &str) -> Result<Self> {
        let mut tried = Vec::new();
        for root in [
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ] {
            let root = Path::new(root);
            if !root.join("cgroup.procs").is_file() {
                tried.push(format!("{}: not a cgroup hierarchy", root.display()));
                continue;
            }
            let dir = root.join(unit);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(TestCgroup {
                        dir,
                        children: Vec::new(),
                    });
                }
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
        bail!(
            "no writable cgroup hierarchy to create {unit} in (this test needs root and a \
             cgroup mount): {}",
            tried.join("; ")
        )
    }

    /// Starts `program 3600` and moves it into `self.dir/sub` (created when given).
    fn start_in(&mut self, program: &Path, sub: Option<&str>) -> Result<u32> {
        let dir = match sub {
            Some(s) => {
                let d = self.dir.join(s);
                if !d.is_dir() {
                    fs::create_dir(&d)?;
                }
                d
            }
            None => self.dir.clone(),
        };
        let child = Command::new(program)
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("move {pid} into {}", dir.display()))?;
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        ensure!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "{pid} not in {}: {procs}",
            dir.display()
        );
        Ok(pid)
    }

    fn kill_all(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.kill_all();
        // Sub-cgroups first; an emptied cgroup may stay busy for a moment.
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.push(self.dir.clone());
        for d in dirs {
            for _ in 0..100 {
                if fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A unit watch counts the processes of a real cgroup named after the unit (and its
/// sub-cgroups), from `cgroup.procs` at every cycle: a process moved out no longer counts,
/// and killing them is critical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_watch_counts_the_processes_of_its_cgroup() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tag();
    let unit = format!("tocsin-test-{t}.service");
    let sleeper = Sleeper::new(dir.path(), &format!("tocsin-unit-{t}"))?;
    let mut cgroup = TestCgroup::create(&unit)?;
    cgroup.start_in(&sleeper.path, None)?;
    let in_sub = cgroup.start_in(&sleeper.path, Some("sub"))?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let watch = format!("unit-{t}");
    let cfg = AgentToml::new(dir.path(), "node-unit", agg.grpc)
        .set(&process_table(
            &watch,
            &[&format!("unit = \"{unit}\""), "min = 2"],
        ))
        .build();
    let check = format!("process:{watch}");
    let r = check_json(&write_config(dir.path(), "check.toml", &cfg)?)?;
    let r = row(&r, &check)?;
    assert_eq!(
        r["value"],
        2.0,
        "both processes of {} and its sub-cgroup: {r}",
        cgroup.dir.display()
    );
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-unit").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_none_open(&agg, &check, "the unit's processes run").await?;

    // A process moved out of the unit (still running) is no longer the unit's.
    let root = cgroup.dir.parent().context("hierarchy root")?.to_owned();
    fs::write(root.join("cgroup.procs"), in_sub.to_string())?;
    let moved = wait_open(&agg, &check).await?;
    assert_eq!(
        moved["value"], 1.0,
        "only the process left in the unit: {moved}"
    );
    fs::write(
        cgroup.dir.join("sub").join("cgroup.procs"),
        in_sub.to_string(),
    )?;
    wait_resolved(&agg, &check, 1).await?;

    cgroup.kill_all();
    let incident = wait_open(&agg, &check).await?;
    assert_eq!(incident["state"], "critical", "{incident}");
    // The kills land one after the other: the trigger may carry 1 or 0; the unit is
    // empty now.
    let v = incident["value"].as_f64().unwrap_or(f64::NAN);
    assert!(v == 0.0 || v == 1.0, "{incident}");
    let r = check_json(&write_config(dir.path(), "check.toml", &cfg)?)?;
    assert_eq!(row(&r, &check)?["value"], 0.0, "nothing left in the unit");
    Ok(())
}

/// `min = 2, max = 3`: one instance is critical, two and three are ok, four is a
/// `process_max` warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_and_max_bound_the_instance_count() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-minmax-{}", tag());
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    sleeper.start()?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let cfg = AgentToml::new(dir.path(), "node-minmax", agg.grpc)
        .set(&process_table(
            &name,
            &["min = 2", "max = 3", "discovery_interval = \"250ms\""],
        ))
        .build();
    let (count, max) = (format!("process:{name}"), format!("process_max:{name}"));
    let check_cfg = write_config(dir.path(), "check.toml", &cfg)?;
    let _agent = start_agent(dir.path(), &cfg)?;

    let low = wait_open(&agg, &count).await?;
    assert_eq!(low["state"], "critical", "{low}");
    assert_eq!(low["value"], 1.0, "{low}");

    sleeper.start()?;
    wait_resolved(&agg, &count, 1).await?;
    sleeper.start()?;
    eventually("3 instances running", WAIT, || async {
        (sleeper.running().len() == 3).then_some(())
    })
    .await?;
    let rows = check_json(&check_cfg)?;
    for check in [&count, &max] {
        let r = row(&rows, check)?;
        assert_eq!(r["state"], "ok", "3 is within [2, 3]: {r}");
        assert_eq!(r["value"], 3.0, "{r}");
    }

    sleeper.start()?;
    let high = wait_open(&agg, &max).await?;
    assert_eq!(high["state"], "warning", "{high}");
    assert_eq!(high["value"], 4.0, "{high}");
    assert_eq!(high["severity"], "P3", "{high}");
    assert_none_open(&agg, &count, "4 is not below min").await?;

    sleeper.kill_one();
    wait_resolved(&agg, &max, 1).await?;
    Ok(())
}

/// Prints a measured value (the runner shows it with `--no-capture` or on failure).
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Rewrites the harness's 250 ms sampling interval.
fn with_interval(config: String, interval: &str) -> Result<String> {
    let from = "\ninterval = \"250ms\"\n";
    ensure!(config.contains(from), "no interval line in {config}");
    Ok(config.replacen(from, &format!("\ninterval = \"{interval}\"\n"), 1))
}

/// Polls `/proc` until a process other than `old` runs `sleeper`'s copy; returns its PID
/// and how long after `since` it was seen.
async fn time_until_running(
    sleeper: &Sleeper,
    since: Instant,
    old: u32,
) -> Result<(u32, Duration)> {
    loop {
        if let Some(&pid) = sleeper.running().iter().find(|&&p| p != old) {
            return Ok((pid, since.elapsed()));
        }
        if since.elapsed() > WAIT {
            bail!("no replacement of {} within {WAIT:?}", sleeper.name);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A watched sleeper `name`, an aggregator, and the agent `node` watching it with a
/// `setsid -f` recovery action allowed `max_runs` times in 10 minutes (`interval`
/// overrides the sampling interval); returns once the first cycle's events are stored.
struct Recovering {
    name: String,
    sleeper: Sleeper,
    agg: Aggregator,
    agent: tocsin_e2e::Daemon,
    cfg: String,
}

async fn recovering(
    dir: &Path,
    prefix: &str,
    node: &str,
    max_runs: u32,
    interval: Option<&str>,
) -> Result<Recovering> {
    let name = format!("{prefix}-{}", tag());
    let mut sleeper = Sleeper::new(dir, &name)?;
    sleeper.start()?;
    let agg = Aggregator::start(dir, &AggregatorToml::new(dir).build()).await?;
    let recover = format!(
        "recover = {{ command = [\"setsid\", \"-f\", \"{}\", \"3600\"], max_runs = {max_runs}, window = \"10m\" }}",
        sleeper.path.display()
    );
    let mut cfg = AgentToml::new(dir, node, agg.grpc)
        .set(&process_table(&name, &[&recover]))
        .build();
    if let Some(i) = interval {
        cfg = with_interval(cfg, i)?;
    }
    let agent = start_agent(dir, &cfg)?;
    // The first cycle's events are stored: the PID is tracked by a pidfd now.
    agg.wait_reported(node).await?;
    Ok(Recovering {
        name,
        sleeper,
        agg,
        agent,
        cfg,
    })
}

/// The restart budget survives a restart of the agent (a config change needs one):
/// with `max_runs = 1`, the run spent before the restart still counts after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_budget_survives_an_agent_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Recovering {
        name,
        mut sleeper,
        agg,
        mut agent,
        cfg,
    } = recovering(dir.path(), "tocsin-budget", "node-budget", 1, None).await?;
    let original = sleeper.kill_one().context("the original instance")?;
    let (replacement, _) = time_until_running(&sleeper, Instant::now(), original).await?;
    let check = format!("process:{name}");
    wait_resolved(&agg, &check, 1).await?;
    assert_eq!(agent.stop("TERM")?, Some(0));

    let mut agent = start_agent(dir.path(), &cfg)?;
    agent.wait_for_output("connected to aggregator").await?;
    kill_pid(replacement);
    let exhausted = wait_open(&agg, &format!("recovery:{name}")).await?;
    assert!(
        exhausted["summary"]
            .as_str()
            .is_some_and(|s| s.contains("budget exhausted")),
        "{exhausted}"
    );
    assert!(
        sleeper.running().is_empty(),
        "the budget was spent before the restart: nothing restarts it"
    );
    agent.stop("TERM")?;
    Ok(())
}

/// Local recovery: a SIGKILL is noticed through the pidfd and the recovery action has
/// the replacement running well within one 5 s sampling interval. Two more kills exhaust
/// the budget of 2: a CRITICAL `recovery:NAME` says so, nothing restarts the process,
/// and monitoring goes on (a manual start resolves both checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_restarts_at_once_through_pidfd_until_the_budget_is_spent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Recovering {
        name,
        mut sleeper,
        agg,
        mut agent,
        ..
    } = recovering(dir.path(), "tocsin-recover", "node-recover", 2, Some("5s")).await?;
    let (check, recovery) = (format!("process:{name}"), format!("recovery:{name}"));

    let killed_at = Instant::now();
    let original = sleeper.kill_one().context("the original instance")?;
    let (first, took) = time_until_running(&sleeper, killed_at, original).await?;
    report(&format!(
        "kill → replacement running (pidfd path): {took:?}"
    ));
    assert!(
        took < Duration::from_secs(2),
        "the replacement took {took:?}: not the pidfd path (the interval is 5 s)"
    );
    // The next cycle counts the replacement.
    wait_resolved(&agg, &check, 1).await?;

    // Second kill: the budget's last run.
    let killed_at = Instant::now();
    kill_pid(first);
    let (second, took) = time_until_running(&sleeper, killed_at, first).await?;
    report(&format!(
        "second kill → replacement running: {took:?} (a run waits until 10 s after the end \
         of the previous one, then for the next tick)"
    ));
    wait_resolved(&agg, &check, 2).await?;

    // Third kill: the budget is spent.
    kill_pid(second);
    eventually("the second replacement is gone", WAIT, || async {
        sleeper.running().is_empty().then_some(())
    })
    .await?;
    let exhausted = wait_open(&agg, &recovery).await?;
    assert_eq!(exhausted["state"], "critical", "{exhausted}");
    let summary = exhausted["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("budget exhausted"),
        "the message says so: {summary:?}"
    );
    assert_eq!(exhausted["labels"]["process"], name.as_str(), "{exhausted}");
    let down = wait_open(&agg, &check).await?;
    assert_eq!(down["state"], "critical", "{down}");
    assert!(
        sleeper.running().is_empty(),
        "nothing restarted it: {:?}",
        sleeper.running()
    );
    assert!(
        proc_state(agent.pid()).is_some_and(|s| s != 'Z'),
        "the agent keeps running:\n{}",
        agent.output()
    );

    // Monitoring continues: a manual start is seen and resolves both checks.
    sleeper.start()?;
    wait_resolved(&agg, &check, 3).await?;
    wait_resolved(&agg, &recovery, 1).await?;
    agent.stop("TERM")?;
    Ok(())
}

/// The recovery action gets the event in its environment (`TOCSIN_CHECK`,
/// `TOCSIN_PROCESS`, …) and nothing of the agent's own environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_action_sees_the_event_in_its_environment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-renv-{}", tag());
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    sleeper.start()?;
    let env_file = dir.path().join("recovery.env");

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    // A fixed argv written by the test (never built from event data).
    let recover = format!(
        "recover = {{ command = [\"/bin/sh\", \"-c\", \"env > {}\"], max_runs = 1 }}",
        env_file.display()
    );
    let cfg = AgentToml::new(dir.path(), "node-renv", agg.grpc)
        .set(&process_table(&name, &[&recover]))
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-renv").await?;
    sleeper.kill_one();

    let env = eventually(
        "the recovery action wrote its environment",
        WAIT,
        || async {
            fs::read_to_string(&env_file)
                .ok()
                .filter(|t| t.contains("TOCSIN_PROCESS"))
        },
    )
    .await?;
    let vars: Vec<&str> = env.lines().collect();
    for want in [
        format!("TOCSIN_CHECK=process:{name}"),
        format!("TOCSIN_PROCESS={name}"),
        "TOCSIN_NODE=node-renv".to_owned(),
        "TOCSIN_STATE=critical".to_owned(),
        "TOCSIN_VALUE=0".to_owned(),
    ] {
        assert!(vars.contains(&want.as_str()), "{want} in:\n{env}");
    }
    assert!(
        vars.iter()
            .any(|v| v.starts_with("TOCSIN_MESSAGE=") && v.contains(&name)),
        "{env}"
    );
    assert!(
        !vars.iter().any(|v| v.starts_with("RUST_LOG=")),
        "the agent's own environment (RUST_LOG) is not passed on:\n{env}"
    );
    Ok(())
}

/// Three kill-and-restart cycles within the window are a `process_restarts` warning
/// (default `restarts_warning = 3`); two are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_restarts_in_the_window_are_a_warning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-restart-{}", tag());
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    sleeper.start()?;

    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let cfg = AgentToml::new(dir.path(), "node-restarts", agg.grpc)
        .watch(&name)
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-restarts").await?;
    let (check, restarts) = (
        format!("process:{name}"),
        format!("process_restarts:{name}"),
    );

    for round in 1..=3 {
        sleeper.kill_one();
        wait_open(&agg, &check).await?;
        sleeper.start()?;
        wait_resolved(&agg, &check, round).await?;
        if round < 3 {
            ensure!(
                incidents(&agg, &restarts).await.is_empty(),
                "{round} restart(s) are below the warning level"
            );
        }
    }
    let warning = wait_open(&agg, &restarts).await?;
    assert_eq!(warning["state"], "warning", "{warning}");
    assert_eq!(warning["value"], 3.0, "{warning}");
    Ok(())
}

/// The agent restarts (SIGTERM, same state directory) while a process watch fires: the
/// webhook gets one trigger, the aggregator holds one open incident, and the process's
/// return is one resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_while_firing_neither_repages_nor_reopens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("tocsin-arestart-{}", tag());
    let mut sleeper = Sleeper::new(dir.path(), &name)?;
    sleeper.start()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let node = "node-arestart";
    let cfg = AgentToml::new(dir.path(), node, agg.grpc)
        .watch(&name)
        .build();
    let mut agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported(node).await?;
    let check = format!("process:{name}");

    sleeper.kill_one();
    receiver.wait_for("trigger", node, &check).await?;
    let code = agent.stop("TERM")?;
    assert_eq!(code, Some(0), "a clean stop:\n{}", agent.output());
    drop(agent);

    let marker = "connected to aggregator";
    let before = fs::read_to_string(dir.path().join("tocsin-agent.log"))?
        .matches(marker)
        .count();
    let agent = start_agent(dir.path(), &cfg)?;
    eventually("the restarted agent connects", WAIT, || async {
        (agent.output().matches(marker).count() > before).then_some(())
    })
    .await?;
    // At least 3 s of 250 ms samples with the process still down.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let triggers = receiver.events("trigger", node, &check);
    assert_eq!(triggers.len(), 1, "{:?}", receiver.received());
    let list = incidents(&agg, &check).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(is_open(&list[0]), "{list:?}");

    sleeper.start()?;
    receiver.wait_for("resolve", node, &check).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.events("resolve", node, &check).len(), 1);
    assert_eq!(receiver.events("trigger", node, &check).len(), 1);
    let list = incidents(&agg, &check).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["status"], "resolved", "{list:?}");
    Ok(())
}
