//! Recovery hooks end to end: a real aggregator, scripted nodes speaking real gRPC, real
//! hook scripts written into a temporary directory, a real webhook receiver, and the real
//! `tocsin` CLI. Shown: stdin is at EOF at once; a hook that ignores SIGTERM is killed
//! after the grace and recorded timed out; a background child does not survive its hook;
//! 10 MB of output is captured bounded (and marked) without the aggregator growing; a
//! label carrying shell syntax stays inert data; two incidents firing one hook at once
//! respect its concurrency (a third beyond the queue is refused and recorded);
//! remediate-verify-then-page (fixed → no page; failed → a page naming the hook; still
//! firing after a success → a page after verify_after, across a restart); a manual run by
//! CLI recorded with who ran it; `tocsin rollback` refusing without --yes on a non-TTY.
//! Regressions of the review of issue 6: hooks left running by a `kill -9` of the
//! aggregator killed at its restart (the concurrency limit holding, a queued rollback not
//! resumed); a `setsid` child killed after its hook; rollback needing a reason, a
//! confirmation and one at a time on every path; integer durations and line numbers in
//! config errors; a missing cwd named; colliding label names warned; CLI output.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{Aggregator, AggregatorToml, PATIENCE, WebhookReceiver, bin, eventually};

/// Writes an executable `/bin/sh` script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// A `[[hook]]` running `script`, with extra lines (`on = …`, `timeout = …`).
fn hook(name: &str, script: &Path, extra: &str) -> String {
    format!(
        "[[hook]]\nname = \"{name}\"\ncommand = [\"{}\"]\n{extra}\n",
        script.display()
    )
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

async fn node(agg: &Aggregator, id: &str, labels: &[(&str, &str)]) -> Result<ScriptedNode> {
    ScriptedNode::connect(
        &format!("http://{}", agg.grpc),
        id,
        labels,
        Duration::from_secs(600),
    )
    .await
}

/// The id of the newest incident of `check`.
async fn incident_of(agg: &Aggregator, check: &str) -> Result<i64> {
    eventually(&format!("an incident of {check}"), PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check)
            .and_then(|i| i["id"].as_i64())
    })
    .await
}

/// The runs of `query` (e.g. `incident=3`) once `n` of them have ended.
async fn ended_runs(agg: &Aggregator, query: &str, n: usize) -> Result<Vec<Value>> {
    eventually(
        &format!("{n} ended hook runs of {query}"),
        PATIENCE,
        || async {
            let body = agg.get(&format!("/api/v1/hooks/runs?{query}")).await.ok()?;
            let runs = body["runs"].as_array()?.clone();
            let ended = runs
                .iter()
                .filter(|r| !matches!(r["status"].as_str(), Some("queued" | "running")))
                .count();
            (runs.len() >= n && ended >= n).then_some(runs)
        },
    )
    .await
}

async fn timeline(agg: &Aggregator, id: i64) -> Result<Vec<Value>> {
    let body = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    Ok(body["timeline"].as_array().cloned().unwrap_or_default())
}

/// The incident timeline entries of `kind`, once one of them contains `needle`.
async fn wait_timeline(agg: &Aggregator, id: i64, kind: &str, needle: &str) -> Result<Value> {
    eventually(
        &format!("a {kind} timeline entry with {needle:?} on incident {id}"),
        PATIENCE,
        || async {
            timeline(agg, id).await.ok()?.into_iter().find(|t| {
                t["kind"] == kind && t["note"].as_str().is_some_and(|n| n.contains(needle))
            })
        },
    )
    .await
}

#[tokio::test]
async fn stdin_is_at_eof_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // `cat` would wait for ever on an open stdin; at EOF it returns at once.
    let s = script(
        dir.path(),
        "stdin.sh",
        "cat; if read line; then echo \"got $line\"; else echo eof; fi",
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook(
            "stdin",
            &s,
            "timeout = \"120s\"\non = { check = \"disk\" }",
        ))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[]).await?;
    n.send(&[("disk", "critical")]).await?;
    let id = incident_of(&agg, "disk").await?;
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    let r = &runs[0];
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["stdout"], "eof\n");
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["event"], "trigger");
    assert_eq!(r["started_by"], "aggregator");
    let entry = wait_timeline(&agg, id, "hook", "hook stdin run").await?;
    let note = entry["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("exit 0") && note.contains("started on trigger"),
        "{note}"
    );
    assert!(note.contains("stdout: eof"), "{note}");
    Ok(())
}

#[tokio::test]
async fn a_hook_ignoring_sigterm_is_killed_after_the_grace_and_recorded_timed_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("term.pid");
    let s = script(
        dir.path(),
        "stubborn.sh",
        &format!(
            "trap '' TERM\necho $$ > {}\necho ignoring TERM\nwhile :; do sleep 0.1; done",
            pid_file.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook(
            "stubborn",
            &s,
            "timeout = \"1s\"\nkill_grace = \"1s\"\non = { severity = [\"P2\"] }",
        ))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[]).await?;
    n.send(&[("cpu", "critical")]).await?;
    let id = incident_of(&agg, "cpu").await?;
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    let r = &runs[0];
    assert_eq!(r["status"], "timed_out", "{r}");
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["exit_code"], Value::Null);
    assert_eq!(r["stdout"], "ignoring TERM\n");
    let pid = read_pid(&pid_file).context("the hook wrote its pid")?;
    eventually("the hook process gone", PATIENCE, || async {
        (!pid_alive(pid)).then_some(())
    })
    .await?;
    wait_timeline(&agg, id, "hook", "timed out after 1s").await?;
    // The aggregator is still serving (a hung hook blocks nothing).
    agg.get("/health").await?;
    Ok(())
}

#[tokio::test]
async fn a_background_child_does_not_survive_its_hook() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let child_file = dir.path().join("child.pid");
    let s = script(
        dir.path(),
        "leaves-child.sh",
        &format!(
            "sleep 300 &\necho $! > {}\necho started a child\nexit 0",
            child_file.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook("leaver", &s, "on = {}"))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[]).await?;
    n.send(&[("mem", "critical")]).await?;
    let id = incident_of(&agg, "mem").await?;
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    assert_eq!(runs[0]["status"], "succeeded", "{}", runs[0]);
    let pid = read_pid(&child_file).context("the hook wrote its child's pid")?;
    eventually(
        &format!("background child {pid} gone"),
        PATIENCE,
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await?;
    Ok(())
}

/// Peak resident memory of `pid`, KiB.
fn vm_hwm(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

#[tokio::test]
async fn ten_megabytes_of_output_are_captured_bounded_and_marked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = script(
        dir.path(),
        "loud.sh",
        "head -c 10485760 /dev/zero | tr '\\000' x\necho to stderr >&2",
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook("loud", &s, "description = \"prints 10 MB\""))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let before = vm_hwm(agg.daemon.pid())?;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{}/api/v1/hooks/loud/run", agg.http))
        .json(&serde_json::json!({ "by": "tester" }))
        .send()
        .await?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.text().await?);
    let runs = ended_runs(&agg, "hook=loud", 1).await?;
    let r = &runs[0];
    assert_eq!(r["status"], "succeeded", "{}", r["error"]);
    assert_eq!(r["stdout_truncated"], true);
    let out = r["stdout"].as_str().unwrap_or_default();
    assert!(
        out.ends_with("…[truncated, 10485760 bytes]"),
        "{}",
        &out[out.len().saturating_sub(80)..]
    );
    assert!(out.len() <= 64 * 1024 + 64, "{} bytes kept", out.len());
    assert_eq!(r["stderr"], "to stderr\n");
    assert_eq!(r["stderr_truncated"], false);
    let after = vm_hwm(agg.daemon.pid())?;
    // Holding the 10 MB (let alone copies of it) would raise the peak by 10 MB or more.
    assert!(
        after < before + 8 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    Ok(())
}

#[tokio::test]
async fn a_label_with_shell_syntax_reaches_the_hook_as_inert_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("x");
    let got = dir.path().join("got");
    let labels = dir.path().join("labels");
    let value = format!("svc; touch {} #", marker.display());
    let s = script(
        dir.path(),
        "echo-label.sh",
        &format!(
            "printf '%s' \"$TOCSIN_LABEL_SVC\" > {}\nprintf '%s' \"$TOCSIN_LABELS\" > {}\necho \"$TOCSIN_NODE $TOCSIN_CHECK $TOCSIN_SEVERITY $TOCSIN_STATE\"",
            got.display(),
            labels.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook(
            "show-label",
            &s,
            "on = { match = [\"svc=~svc;.*\"] }",
        ))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[("svc", &value)]).await?;
    n.send(&[("http", "critical")]).await?;
    let id = incident_of(&agg, "http").await?;
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    assert_eq!(runs[0]["status"], "succeeded", "{}", runs[0]);
    assert_eq!(runs[0]["stdout"], "web-1 http P2 critical\n");
    assert_eq!(
        std::fs::read_to_string(&got)?,
        value,
        "the value arrives intact"
    );
    let all: Value = serde_json::from_str(&std::fs::read_to_string(&labels)?)?;
    assert_eq!(all["svc"], value.as_str());
    assert!(!marker.exists(), "the label was run by a shell");
    Ok(())
}

#[tokio::test]
async fn two_incidents_firing_one_hook_at_once_respect_its_concurrency() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let lock = dir.path().join("lock");
    // mkdir is atomic: a second run inside the first would fail it.
    let s = script(
        dir.path(),
        "serial.sh",
        &format!(
            "mkdir {l} || {{ echo overlap; exit 9; }}\nsleep 1\nrmdir {l}\necho \"done $TOCSIN_CHECK\"",
            l = lock.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook(
            "serial",
            &s,
            "max_concurrent = 1\nmax_queued = 1\non = { match = [\"check=~q.*\"] }",
        ))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[]).await?;
    // Three incidents in one batch: one runs, one queues, the third finds the queue full.
    n.send(&[("q1", "critical"), ("q2", "critical"), ("q3", "critical")])
        .await?;
    let runs = ended_runs(&agg, "hook=serial", 3).await?;
    let mut statuses: Vec<&str> = runs.iter().filter_map(|r| r["status"].as_str()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["refused", "succeeded", "succeeded"], "{runs:?}");
    let mut done: Vec<&Value> = runs.iter().filter(|r| r["status"] == "succeeded").collect();
    done.sort_by_key(|r| r["id"].as_i64());
    let first_end = done[0]["ended_ms"].as_i64().context("ended")?;
    let second_start = done[1]["started_ms"].as_i64().context("started")?;
    assert!(
        second_start >= first_end,
        "the second run started at {second_start}, before the first ended at {first_end}"
    );
    for r in &done {
        assert!(
            r["stdout"]
                .as_str()
                .is_some_and(|o| o.starts_with("done q")),
            "{r}"
        );
    }
    let refused = runs
        .iter()
        .find(|r| r["status"] == "refused")
        .context("refused run")?;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_queued = 1")),
        "{refused}"
    );
    let id = refused["incident_id"].as_i64().context("incident")?;
    wait_timeline(&agg, id, "hook", "refused").await?;
    Ok(())
}

/// Waits until the receiver has a trigger for `check` and returns its body.
async fn trigger_for(rx: &WebhookReceiver, check: &str) -> Result<Value> {
    eventually(&format!("a trigger for {check}"), PATIENCE, || async {
        rx.received()
            .into_iter()
            .find(|b| b["event"] == "trigger" && b["incident"]["check"] == check)
    })
    .await
}

#[tokio::test]
async fn remediate_verify_then_page() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fixed = dir.path().join("fixed");
    std::fs::create_dir(&fixed)?;
    // The fix: leaves a mark the node (this test) sees, like a restarted service; it
    // cannot fix "remedy-broken".
    let s = script(
        dir.path(),
        "fix.sh",
        &format!(
            "echo \"fixing $TOCSIN_CHECK on $TOCSIN_NODE\"\n\
             if [ \"$TOCSIN_CHECK\" = remedy-broken ]; then echo 'cannot fix this' >&2; exit 1; fi\n\
             touch {}/\"$TOCSIN_CHECK\"",
            fixed.display()
        ),
    )?;
    let rx = WebhookReceiver::start().await?;
    let top = format!(
        "{}[[route]]\nname = \"remedy\"\nmatch = [\"check=~remedy-.*\"]\nchannels = [\"t\"]\n\
         remediate = \"fix\"\nverify_after = \"4s\"\n",
        hook("fix", &s, "max_concurrent = 3")
    );
    let cfg = AggregatorToml::new(dir.path())
        .webhook(&rx.url)
        .set(&top)
        .build();
    let mut agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[("service", "web")]).await?;
    n.send(&[
        ("remedy-fixable", "critical"),
        ("remedy-broken", "critical"),
        ("remedy-stubborn", "critical"),
    ])
    .await?;

    // Fixable: the hook fixes it, the node reports OK within verify_after: no page.
    let fixable = incident_of(&agg, "remedy-fixable").await?;
    let mark = fixed.join("remedy-fixable");
    eventually("the fix of remedy-fixable", PATIENCE, || async {
        mark.exists().then_some(())
    })
    .await?;
    n.send(&[("remedy-fixable", "ok")]).await?;
    wait_timeline(&agg, fixable, "remediation", "not paged").await?;

    // Broken: the hook fails: paged at once, and the page names the hook and its exit.
    let page = trigger_for(&rx, "remedy-broken").await?;
    let rem = &page["remediation"];
    assert_eq!(rem["hook"], "fix", "{page}");
    assert_eq!(rem["exit_code"], 1);
    assert_eq!(rem["status"], "failed");
    assert!(
        rem["result"]
            .as_str()
            .is_some_and(|t| t.contains("hook fix") && t.contains("exit 1")),
        "{rem}"
    );
    let broken = incident_of(&agg, "remedy-broken").await?;
    wait_timeline(&agg, broken, "hook", "cannot fix this").await?;

    // Stubborn: the hook succeeds but the incident still fires; the hold survives a
    // restart and the page goes out after verify_after, saying what was tried.
    let stubborn = incident_of(&agg, "remedy-stubborn").await?;
    wait_timeline(
        &agg,
        stubborn,
        "remediation",
        "succeeded: the page goes out at",
    )
    .await?;
    ensure!(
        rx.events("trigger", "web-1", "remedy-stubborn").is_empty(),
        "paged before verify_after"
    );
    agg.daemon.stop("TERM")?;
    agg = Aggregator::start(dir.path(), &cfg).await?;
    let page = trigger_for(&rx, "remedy-stubborn").await?;
    assert!(
        page["remediation"]["result"]
            .as_str()
            .is_some_and(|t| t.contains("exit 0") && t.contains("still firing 4s later")),
        "{page}"
    );
    wait_timeline(&agg, stubborn, "remediation", "still firing after hook fix").await?;

    // The fixable incident was never paged at all.
    ensure!(
        rx.events("trigger", "web-1", "remedy-fixable").is_empty(),
        "the fixed incident was paged"
    );
    let detail = agg.get(&format!("/api/v1/incidents/{fixable}")).await?;
    assert_eq!(detail["status"], "resolved");
    assert_eq!(detail["notifications"].as_array().map(Vec::len), Some(0));
    Ok(())
}

fn tocsin(agg: &Aggregator, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(bin("tocsin"))
        .arg("--api")
        .arg(format!("http://{}", agg.http))
        .args(args)
        .env_remove("TOCSIN_API_TOKEN")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn a_manual_run_by_cli_is_recorded_with_who_ran_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = script(
        dir.path(),
        "restart-all.sh",
        "echo \"restarting for incident $TOCSIN_INCIDENT_ID by $TOCSIN_STARTED_BY: $TOCSIN_REASON\"",
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&format!(
            "{}{}",
            hook(
                "restart-all",
                &s,
                "description = \"the seed's --restart-all\""
            ),
            hook("fix-pods", &s, "description = \"the seed's --fix-pods\"")
        ))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut n = node(&agg, "web-1", &[]).await?;
    n.send(&[("api", "critical")]).await?;
    let id = incident_of(&agg, "api").await?;

    let (code, out, err) = tocsin(&agg, &["hook", "list"])?;
    ensure!(code == Some(0), "hook list: {err}");
    assert!(
        out.contains("restart-all") && out.contains("fix-pods"),
        "{out}"
    );

    let (code, out, err) = tocsin(
        &agg,
        &[
            "hook",
            "run",
            "restart-all",
            "--incident",
            &id.to_string(),
            "--by",
            "alice",
            "--reason",
            "api down",
        ],
    )?;
    ensure!(code == Some(0), "hook run: {out}{err}");
    assert!(
        out.contains(&format!("restarting for incident {id} by alice: api down")),
        "{out}"
    );
    let entry = wait_timeline(&agg, id, "hook", "(by hand, by alice: api down): exit 0").await?;
    assert_eq!(entry["actor"], "api:alice", "the API, not a web login");
    assert!(
        entry["note"].as_str().is_some_and(|n| n.contains("exit 0")),
        "{entry}"
    );
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    assert_eq!(runs[0]["started_by"], "alice");
    assert_eq!(runs[0]["event"], "manual");

    let (code, _, err) = tocsin(&agg, &["hook", "run", "no-such-hook", "--by", "alice"])?;
    assert_eq!(code, Some(3), "{err}");
    Ok(())
}

#[tokio::test]
async fn rollback_refuses_without_yes_on_a_non_tty_and_runs_with_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env_file = dir.path().join("rollback.env");
    let s = script(
        dir.path(),
        "rollback.sh",
        &format!(
            "env | grep '^TOCSIN_' | sort > {}\necho rolled back",
            env_file.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook("rollback", &s, "kind = \"rollback\""))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let (code, _, err) = tocsin(&agg, &["rollback", "--reason", "bad deploy"])?;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--yes"), "{err}");
    let runs = agg.get("/api/v1/hooks/runs").await?;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "{runs}");
    ensure!(!env_file.exists(), "the rollback ran without confirmation");

    let (code, out, err) = tocsin(
        &agg,
        &["rollback", "-r", "bad deploy", "-f", "-y", "--by", "bob"],
    )?;
    ensure!(code == Some(0), "rollback --yes: {out}{err}");
    assert!(out.contains("rolled back"), "{out}");
    let env = std::fs::read_to_string(&env_file)?;
    for line in [
        "TOCSIN_FORCE=1",
        "TOCSIN_REASON=bad deploy",
        "TOCSIN_STARTED_BY=bob",
        "TOCSIN_HOOK=rollback",
        "TOCSIN_EVENT=rollback",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing in:\n{env}");
    }
    let runs = ended_runs(&agg, "hook=rollback", 1).await?;
    assert_eq!(runs[0]["started_by"], "bob");
    assert_eq!(runs[0]["force"], true);
    assert_eq!(runs[0]["reason"], "bad deploy");
    if runs.len() != 1 {
        bail!("one run expected: {runs:?}");
    }
    Ok(())
}

/// POSTs a manual run of `name` with `body`; returns the status and the answer.
async fn post_run(agg: &Aggregator, name: &str, body: Value) -> Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/hooks/{name}/run", agg.http))
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Waits until `path` holds a pid.
async fn wait_pid(path: &Path) -> Result<i32> {
    eventually(
        &format!("a pid in {}", path.display()),
        PATIENCE,
        || async { read_pid(path) },
    )
    .await
}

fn kill_pid(pid: i32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

#[tokio::test]
async fn regression_hooks_left_by_a_kill_9_are_killed_at_restart_and_the_limit_holds() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let lock = d.join("lock");
    // Holds an flock (inherited by its child) for as long as any of its processes lives:
    // a second run inside the first fails to take it. With reason "short" it ends at once.
    let s = script(
        d,
        "hang.sh",
        &format!(
            "exec 9>{lock}\nflock -n 9 || {{ echo overlap; exit 9; }}\n\
             [ \"$TOCSIN_REASON\" = short ] && {{ echo alone; exit 0; }}\n\
             echo $$ > {d}/hang.pid\nsleep 300 &\necho $! > {d}/sleep.pid\nwait",
            lock = lock.display(),
            d = d.display()
        ),
    )?;
    let stubborn = script(
        d,
        "stubborn.sh",
        &format!(
            "trap '' TERM\necho $$ > {}/stubborn.pid\nwhile :; do sleep 0.1; done",
            d.display()
        ),
    )?;
    let rollback = script(
        d,
        "rollback.sh",
        &format!("echo $$ >> {}/rollback.pids\nsleep 300", d.display()),
    )?;
    let cfg = AggregatorToml::new(d)
        .set(&format!(
            "{}{}{}",
            hook("hang", &s, "timeout = \"600s\"\nmax_concurrent = 1"),
            hook("stubborn", &stubborn, "timeout = \"600s\""),
            hook("rollback", &rollback, "kind = \"rollback\""),
        ))
        .build();
    let mut agg = Aggregator::start(d, &cfg).await?;
    let by = |reason: &str| serde_json::json!({ "by": "tester", "reason": reason });
    let (code, first) = post_run(&agg, "hang", by("long")).await?;
    ensure!(code == 202, "{first}");
    let (code, queued) = post_run(&agg, "hang", by("short")).await?;
    ensure!(code == 202, "{queued}");
    let (code, _) = post_run(&agg, "stubborn", by("")).await?;
    ensure!(code == 202);
    let (code, rb) = post_run(&agg, "rollback", by("bad deploy")).await?;
    ensure!(code == 202, "{rb}");
    let (code, rb2) = post_run(
        &agg,
        "rollback",
        serde_json::json!({ "by": "tester", "reason": "again", "force": true }),
    )
    .await?;
    ensure!(code == 202, "{rb2}");
    let hang = wait_pid(&d.join("hang.pid")).await?;
    let sleep = wait_pid(&d.join("sleep.pid")).await?;
    let stub = wait_pid(&d.join("stubborn.pid")).await?;
    let rb_pid = wait_pid(&d.join("rollback.pids")).await?;

    agg.daemon.stop("KILL")?;
    // The aggregator is gone; its hooks are not (nothing can kill them at a kill -9).
    for pid in [hang, sleep, stub, rb_pid] {
        ensure!(pid_alive(pid), "{pid} died with the aggregator");
    }
    agg = Aggregator::start(d, &cfg).await?;
    let gone = eventually("the orphaned hooks killed", PATIENCE, || async {
        [hang, sleep, stub, rb_pid]
            .iter()
            .all(|p| !pid_alive(*p))
            .then_some(())
    })
    .await;
    if gone.is_err() {
        for pid in [hang, sleep, stub, rb_pid] {
            kill_pid(pid);
        }
    }
    gone?;
    let runs = ended_runs(&agg, "hook=hang", 2).await?;
    let first_id = first["run"]["id"].as_i64().context("id")?;
    let r1 = runs
        .iter()
        .find(|r| r["id"] == first_id)
        .context("first run")?;
    assert_eq!(r1["status"], "interrupted", "{r1}");
    let cleanup = r1["cleanup"].as_str().unwrap_or_default();
    for pid in [hang, sleep] {
        assert!(cleanup.contains(&pid.to_string()), "{pid} not in {cleanup}");
    }
    assert!(
        r1["error"]
            .as_str()
            .is_some_and(|e| e.contains("killed or crashed")),
        "{r1}"
    );
    // The queued run started only after the orphan was killed: it got the lock.
    let r2 = runs
        .iter()
        .find(|r| r["id"] != first_id)
        .context("second")?;
    assert_eq!(r2["status"], "succeeded", "{r2}");
    assert_eq!(r2["stdout"], "alone\n");
    // The queued rollback was not resumed.
    let rbs = ended_runs(&agg, "hook=rollback", 2).await?;
    let rb2_id = rb2["run"]["id"].as_i64().context("id")?;
    let r = rbs.iter().find(|r| r["id"] == rb2_id).context("rb2")?;
    assert_eq!(r["status"], "skipped", "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("never resumed")),
        "{r}"
    );
    assert_eq!(r["started_ms"], Value::Null, "{r}");
    let pids = std::fs::read_to_string(d.join("rollback.pids"))?;
    assert_eq!(pids.lines().count(), 1, "the queued rollback ran: {pids}");
    Ok(())
}

#[tokio::test]
async fn regression_a_setsid_child_does_not_survive_its_hook() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let child_file = dir.path().join("child.pid");
    let s = script(
        dir.path(),
        "setsid.sh",
        &format!(
            // Exits only once the child has its own session (else the run's process-group
            // kill, not the run-key search, would be what ends it).
            "setsid sleep 300 >/dev/null 2>&1 </dev/null &\npid=$!\necho $pid > {}\n\
             until [ \"$(cut -d' ' -f6 /proc/$pid/stat)\" = \"$pid\" ]; do sleep 0.01; done\n\
             echo started\nexit 0",
            child_file.display()
        ),
    )?;
    let cfg = AggregatorToml::new(dir.path())
        .set(&hook("escaper", &s, ""))
        .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let (code, body) = post_run(&agg, "escaper", serde_json::json!({ "by": "t" })).await?;
    ensure!(code == 202, "{body}");
    let runs = ended_runs(&agg, "hook=escaper", 1).await?;
    let pid = read_pid(&child_file).context("the hook wrote its child's pid")?;
    let gone = eventually(&format!("setsid child {pid} gone"), PATIENCE, || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    if gone.is_err() {
        kill_pid(pid);
    }
    gone?;
    assert_eq!(runs[0]["status"], "succeeded", "{}", runs[0]);
    assert!(
        runs[0]["cleanup"]
            .as_str()
            // The name is `sleep`, or `setsid`/the shell when the scan caught the child
            // between fork and exec (machine under load): the PID is what counts.
            .is_some_and(|c| c.contains(&format!("{pid} ("))),
        "{}",
        runs[0]
    );
    Ok(())
}

fn tocsin_in(
    agg: &Aggregator,
    args: &[&str],
    stdin: &str,
) -> Result<(Option<i32>, String, String)> {
    use std::io::Write as _;
    let mut child = Command::new(bin("tocsin"))
        .arg("--api")
        .arg(format!("http://{}", agg.http))
        .args(args)
        .env_remove("TOCSIN_API_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn regression_rollback_needs_a_reason_a_confirmation_and_one_at_a_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let release = d.join("release");
    let s = script(
        d,
        "rollback.sh",
        &format!(
            "echo \"$TOCSIN_RUN_ID $TOCSIN_EVENT $TOCSIN_REASON\" >> {}/ran\n\
             while [ ! -e {} ]; do sleep 0.1; done\necho rolled back",
            d.display(),
            release.display()
        ),
    )?;
    let cfg = AggregatorToml::new(d)
        .set(&hook("rollback", &s, "kind = \"rollback\""))
        .build();
    let agg = Aggregator::start(d, &cfg).await?;
    let ran = d.join("ran");

    // `hook run` on the rollback hook asks like `tocsin rollback`: not on a non-TTY,
    // not without a reason.
    let (code, _, err) = tocsin_in(&agg, &["hook", "run", "rollback", "--by", "a"], "")?;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--reason"), "{err}");
    let (code, _, err) = tocsin_in(
        &agg,
        &["hook", "run", "rollback", "--by", "a", "--reason", "x"],
        "yes\n",
    )?;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, body) = post_run(&agg, "rollback", serde_json::json!({ "by": "x" })).await?;
    assert_eq!(code, 400, "{body}");
    let (code, body) = post_run(
        &agg,
        "rollback",
        serde_json::json!({ "by": "x", "reason": "  " }),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    ensure!(
        !ran.exists(),
        "a rollback ran without reason or confirmation"
    );

    // One at a time: the second is refused naming the first, unless forced.
    let (code, out, err) = tocsin_in(
        &agg,
        &[
            "rollback",
            "--yes",
            "--reason",
            "bad deploy",
            "--no-wait",
            "--by",
            "a",
        ],
        "",
    )?;
    ensure!(code == Some(0), "{out}{err}");
    let first: i64 = out
        .split('#')
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .context(out.clone())?;
    let (code, _, err) = tocsin_in(
        &agg,
        &[
            "rollback",
            "--yes",
            "--reason",
            "again",
            "--no-wait",
            "--by",
            "a",
        ],
        "",
    )?;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains(&format!("rollback run #{first} is ")), "{err}");
    let (code, out, err) = tocsin_in(
        &agg,
        &[
            "hook",
            "run",
            "rollback",
            "-y",
            "--reason",
            "forced",
            "--force",
            "--no-wait",
            "--by",
            "a",
        ],
        "",
    )?;
    ensure!(code == Some(0), "{out}{err}");
    std::fs::write(&release, "")?;
    let runs = ended_runs(&agg, "hook=rollback", 2).await?;
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    assert!(runs.iter().all(|r| r["event"] == "rollback"), "{runs:?}");
    let lines = std::fs::read_to_string(&ran)?;
    assert!(
        lines.lines().any(|l| l.ends_with(" rollback bad deploy")),
        "TOCSIN_EVENT: {lines}"
    );
    assert_eq!(lines.lines().count(), 2, "{lines}");
    Ok(())
}

/// Runs `tocsin-aggregator check-config` on `text`; returns (exit code, stderr).
fn check_config(dir: &Path, text: &str) -> Result<(Option<i32>, String)> {
    let path = dir.join("check.toml");
    std::fs::write(&path, text)?;
    let out = Command::new(bin("tocsin-aggregator"))
        .args([
            "--config",
            path.to_str().unwrap_or_default(),
            "check-config",
        ])
        .env_remove("RECOVERY_TIMEOUT")
        .env_remove("ROLLBACK_TIMEOUT")
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn regression_hook_config_integers_lines_rollback_and_p1_hold() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let data = d.join("data");
    // TOML integers are seconds, as the seed writes RECOVERY_TIMEOUT=300.
    let (code, err) = check_config(
        d,
        &format!(
            "data_dir = \"{}\"\nrecovery_timeout = 300\nrollback_timeout = 600\nnode_timeout = 30\n\
             [[hook]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ntimeout = 30\nkill_grace = 2\n",
            data.display()
        ),
    )?;
    assert_eq!(code, Some(0), "{err}");
    // Every problem names its line, inline tables and a missing name included.
    let (code, err) = check_config(
        d,
        &format!(
            "data_dir = \"{}\"\n[[hook]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n\
             env = {{ TOCSIN_NODE = \"x\" }}\non = {{ severity = [\"P9\"], match = [\"x=~((\"] }}\n\
             [[hook]]\ncommand = [\"/bin/true\"]\n",
            data.display()
        ),
    )?;
    assert_eq!(code, Some(64), "{err}");
    for (key, line) in [
        ("hook.0.env.TOCSIN_NODE", 5),
        ("hook.0.on.severity", 6),
        ("hook.0.on.match.0", 6),
        ("hook.1.name", 7),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("check.toml:{line}: key `{key}`"))),
            "{key} at line {line}: {err}"
        );
    }
    let (code, err) = check_config(
        d,
        &format!(
            "data_dir = \"{}\"\n[[hook]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ntimeout = -5\n",
            data.display()
        ),
    )?;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("check.toml:5: key `hook.0.timeout`") && err.contains("must not be negative"),
        "{err}"
    );
    // A rollback hook neither runs on every incident nor remediates a route.
    let (code, err) = check_config(
        d,
        &format!(
            "data_dir = \"{}\"\n[[hook]]\nname = \"rb\"\nkind = \"rollback\"\ncommand = [\"/bin/true\"]\non = {{}}\n\
             [[route]]\nname = \"r\"\nchannels = []\nremediate = \"rb\"\n",
            data.display()
        ),
    )?;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("hook.0.on") && err.contains("every incident"),
        "{err}"
    );
    assert!(err.contains("route.0.remediate"), "{err}");
    // A remediate route that can match a P1 and holds its page long: a warning.
    let (code, err) = check_config(
        d,
        &format!(
            "data_dir = \"{}\"\n[[hook]]\nname = \"fix\"\ncommand = [\"/bin/true\"]\n\
             [[route]]\nname = \"r\"\nchannels = []\nremediate = \"fix\"\n\
             [[route]]\nname = \"quick\"\nchannels = []\nseverity = [\"P2\"]\nremediate = \"fix\"\n",
            data.display()
        ),
    )?;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: route.0.remediate") && err.contains("P1 page"),
        "{err}"
    );
    assert!(!err.contains("route.1"), "{err}");
    Ok(())
}

#[tokio::test]
async fn regression_missing_cwd_colliding_labels_and_cli_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let gone = d.join("gone");
    std::fs::create_dir(&gone)?;
    let s = script(
        d,
        "env.sh",
        "printf 'line one\\nline \\033[31mtwo\\n'\necho \"v=$TOCSIN_LABEL_EVIL_2 s=$TOCSIN_LABEL_SERVICE\"",
    )?;
    let cfg = AggregatorToml::new(d)
        .set(&format!(
            "{}{}",
            hook("envdump", &s, "on = { check = \"disk\" }"),
            hook("nocwd", &s, &format!("cwd = \"{}\"", gone.display()))
        ))
        .build();
    let agg = Aggregator::start(d, &cfg).await?;
    std::fs::remove_dir(&gone)?;
    let (code, body) = post_run(&agg, "nocwd", serde_json::json!({ "by": "t" })).await?;
    ensure!(code == 202, "{body}");
    let runs = ended_runs(&agg, "hook=nocwd", 1).await?;
    let want = format!(
        "could not start: cwd {}: No such file or directory",
        gone.display()
    );
    assert!(
        runs[0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with(&want)),
        "{}",
        runs[0]
    );

    let mut n = node(
        &agg,
        "web-1",
        &[
            ("evil-2", "dash"),
            ("evil_2", "under"),
            ("Service", "big"),
            ("service", "small"),
        ],
    )
    .await?;
    n.send(&[("disk", "critical")]).await?;
    let id = incident_of(&agg, "disk").await?;
    let runs = ended_runs(&agg, &format!("incident={id}"), 1).await?;
    assert!(
        runs[0]["stdout"]
            .as_str()
            .is_some_and(|o| o.ends_with("v=under s=small\n")),
        "{}",
        runs[0]
    );
    wait_timeline(&agg, id, "hook", "all map to TOCSIN_LABEL_EVIL_2").await?;
    wait_timeline(&agg, id, "hook", "all map to TOCSIN_LABEL_SERVICE").await?;

    // `tocsin show`: the output as indented lines, escape sequences made inert.
    let (code, out, err) = tocsin(&agg, &["show", &id.to_string()])?;
    ensure!(code == Some(0), "{err}");
    assert!(out.contains("\n      stdout: line one\n"), "{out}");
    assert!(out.contains("\n      line \\u{1b}[31mtwo\n"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out}");

    // `hook runs`: aligned; an unknown incident is "not found".
    let (code, out, err) = tocsin(&agg, &["hook", "runs"])?;
    ensure!(code == Some(0), "{err}");
    let header = out.lines().next().unwrap_or_default();
    let col = header.find("HOOK").context("HOOK column")?;
    for line in out.lines().skip(1) {
        assert_eq!(
            line.find(" nocwd").or(line.find(" envdump")).map(|i| i + 1),
            Some(col),
            "{out}"
        );
    }
    let (code, _, err) = tocsin(&agg, &["hook", "runs", "--incident", "99999"])?;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("no incident 99999"), "{err}");
    let (code, _, err) = tocsin(&agg, &["hook", "run", "envdump", "--by", ""])?;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--by must not be empty"), "{err}");
    Ok(())
}
