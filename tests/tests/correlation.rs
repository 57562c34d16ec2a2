//! Correlation end to end: firing fingerprints grouped into one incident with members,
//! group wait, severity P1–P4 from rules and the seed's defaults, `node_down`
//! inhibition, the re-open window and silences that end with their incident. Real
//! aggregator binary, scripted nodes speaking real gRPC, a real webhook receiver, the
//! real `tocsin` CLI, all on 127.0.0.1.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{Aggregator, AggregatorToml, PATIENCE, WebhookReceiver, bin, eventually};

/// Heartbeat interval the scripted nodes announce.
const HEARTBEAT: Duration = Duration::from_millis(300);

fn endpoint(agg: &Aggregator) -> String {
    format!("http://{}", agg.grpc)
}

/// Bodies at the receiver of `kind` for incident `id`.
fn sent(receiver: &WebhookReceiver, kind: &str, id: i64) -> Vec<Value> {
    receiver
        .received()
        .into_iter()
        .filter(|v| v["event"] == kind && v["incident"]["id"] == id)
        .collect()
}

/// Requests at the receiver (answered or not) for incident `id`.
fn requests_for(receiver: &WebhookReceiver, id: i64) -> usize {
    receiver
        .requests()
        .iter()
        .filter(|(_, v)| v["incident"]["id"] == id)
        .count()
}

/// The open or resolved incident whose `check` field is `check`, newest first.
async fn incident_of(agg: &Aggregator, check: &str) -> Result<Value> {
    eventually(&format!("an incident for {check}"), PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        let found = list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check)?
            .clone();
        agg.get(&format!("/api/v1/incidents/{}", found["id"]))
            .await
            .ok()
    })
    .await
}

/// Waits until incident `id` satisfies `pred`; returns its detail.
async fn wait_incident(
    agg: &Aggregator,
    id: i64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    eventually(what, PATIENCE, || async {
        let d = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        pred(&d).then_some(d)
    })
    .await
}

fn id_of(v: &Value) -> Result<i64> {
    v["id"].as_i64().context("incident id")
}

fn incident_count(list: &Value) -> usize {
    list["incidents"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_nodes_critical_at_once_are_one_incident_and_one_page() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let mut nodes = Vec::new();
    for n in 1..=12 {
        let node = ScriptedNode::connect(
            &endpoint(&agg),
            &format!("web-{n}"),
            &[("service", "web")],
            HEARTBEAT,
        )
        .await?;
        nodes.push(node);
    }
    // All at once: each node sends from its own task.
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|mut n| {
            tokio::spawn(async move {
                n.send(&[("cpu", "critical")]).await?;
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(t.await??);
    }
    let first = incident_of(&agg, "cpu").await?;
    let id = id_of(&first)?;
    let d = wait_incident(&agg, id, "12 members", |d| {
        d["members"].as_array().is_some_and(|m| m.len() == 12)
    })
    .await?;
    assert_eq!(
        incident_count(&agg.get("/api/v1/incidents").await?),
        1,
        "{d}"
    );
    assert_eq!(d["node"], "12 nodes", "{d}");
    assert_eq!(d["severity"], "P1", "critical on the whole service: {d}");
    assert!(
        d["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("cpu critical on 12 nodes: ")),
        "{d}"
    );
    // Everything recovers: one resolve. It never overtakes its trigger on the channel,
    // so once it is in, every trigger that was ever owed is in too.
    for n in &mut nodes {
        n.send(&[("cpu", "ok")]).await?;
    }
    eventually("the resolve", PATIENCE, || async {
        (!sent(&receiver, "resolve", id).is_empty()).then_some(())
    })
    .await?;
    assert_eq!(sent(&receiver, "trigger", id).len(), 1, "one page");
    assert_eq!(sent(&receiver, "resolve", id).len(), 1, "one resolve");
    assert_eq!(requests_for(&receiver, id), 2, "{:?}", receiver.received());
    assert_eq!(receiver.requests().len(), 2, "no other incident paged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_checks_grouped_stay_open_while_one_fires_and_resolve_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .set("[correlation]")
            .set("group_by = [\"node\"]")
            .build(),
    )
    .await?;
    let mut node = ScriptedNode::connect(&endpoint(&agg), "db-1", &[], HEARTBEAT).await?;
    node.send(&[
        ("cpu", "warning"),
        ("memory", "critical"),
        ("disk", "warning"),
    ])
    .await?;
    let d = incident_of(&agg, "3 checks").await?;
    let id = id_of(&d)?;
    assert_eq!(d["severity"], "P2", "{d}");
    assert_eq!(d["node"], "db-1", "{d}");
    let (code, out, _) = tocsin(&format!("http://{}", agg.http), &["show", &id.to_string()])?;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("members:") && out.contains("memory is critical on db-1"),
        "{out}"
    );
    node.send(&[("memory", "ok")]).await?;
    let d = wait_incident(&agg, id, "P3 after memory recovered", |d| {
        d["severity"] == "P3"
    })
    .await?;
    assert_eq!(d["status"], "triggered", "two checks still fire: {d}");
    assert!(
        d["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "severity")),
        "the reclassification is on the timeline: {d}"
    );
    assert!(
        d["members"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["check"] == "memory" && m["state"] == "ok")),
        "{d}"
    );
    node.send(&[("cpu", "ok")]).await?;
    node.send(&[("disk", "ok")]).await?;
    wait_incident(&agg, id, "resolved", |d| d["status"] == "resolved").await?;
    eventually("the resolve", PATIENCE, || async {
        (!sent(&receiver, "resolve", id).is_empty()).then_some(())
    })
    .await?;
    assert_eq!(sent(&receiver, "trigger", id).len(), 1);
    assert_eq!(sent(&receiver, "resolve", id).len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_clear_inside_group_wait_sends_nothing_and_the_page_names_every_member()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .set("[correlation]")
            .set("group_wait = \"2s\"")
            .build(),
    )
    .await?;
    let mut a = ScriptedNode::connect(&endpoint(&agg), "app-1", &[], HEARTBEAT).await?;
    let mut b = ScriptedNode::connect(&endpoint(&agg), "app-2", &[], HEARTBEAT).await?;
    let mut c = ScriptedNode::connect(&endpoint(&agg), "app-3", &[], HEARTBEAT).await?;
    a.send(&[("http:api", "critical")]).await?;
    a.send(&[("http:api", "ok")]).await?;
    let cleared = incident_of(&agg, "http:api").await?;
    let cleared_id = id_of(&cleared)?;
    assert_eq!(cleared["status"], "resolved", "{cleared}");
    // Another group gathers three members; its one page names them all.
    a.send(&[("memory", "warning")]).await?;
    b.send(&[("memory", "warning")]).await?;
    c.send(&[("memory", "warning")]).await?;
    let id = id_of(&incident_of(&agg, "memory").await?)?;
    let page = eventually("the gathered page", PATIENCE, || async {
        sent(&receiver, "trigger", id).into_iter().next()
    })
    .await?;
    assert_eq!(
        page["incident"]["summary"], "memory warning on 3 nodes: app-1, app-2, app-3",
        "{page}"
    );
    // The gathered page came after the wait that held the cleared group: nothing was
    // ever owed for it, not even a lone resolve.
    assert_eq!(requests_for(&receiver, cleared_id), 0);
    let d = agg.get(&format!("/api/v1/incidents/{cleared_id}")).await?;
    assert_eq!(d["notifications"].as_array().map(Vec::len), Some(0), "{d}");
    assert_eq!(sent(&receiver, "trigger", id).len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_inhibits_the_nodes_other_alerts_then_releases_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"1s\"")
            .build(),
    )
    .await?;
    let mut node = ScriptedNode::connect(&endpoint(&agg), "edge-1", &[], HEARTBEAT).await?;
    node.send(&[("cpu", "ok")]).await?;
    // The node falls silent: node_down pages.
    let down = eventually("node_down paged", PATIENCE, || async {
        receiver
            .received()
            .into_iter()
            .find(|v| v["event"] == "trigger" && v["incident"]["check"] == "node_down")
    })
    .await?;
    let down_id = down["incident"]["id"].as_i64().context("node_down id")?;
    // It comes back replaying what fired during its outage: recorded, not paged while
    // it was down; what still fires pages once it is back, what cleared never pages.
    node.send(&[
        ("http:upstream", "critical"),
        ("disk", "critical"),
        ("disk", "ok"),
    ])
    .await?;
    node.heartbeats(HEARTBEAT);
    let upstream = incident_of(&agg, "http:upstream").await?;
    let up_id = id_of(&upstream)?;
    let inhibited = upstream["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["kind"] == "inhibited"))
        .cloned()
        .context("an inhibited entry")?;
    assert!(
        inhibited["note"]
            .as_str()
            .is_some_and(|n| n.contains(&format!("#{down_id}"))),
        "{inhibited}"
    );
    let disk = incident_of(&agg, "disk").await?;
    assert_eq!(disk["status"], "resolved", "{disk}");
    let page = eventually("the released page", PATIENCE, || async {
        sent(&receiver, "trigger", up_id).into_iter().next()
    })
    .await?;
    assert_eq!(page["incident"]["check"], "http:upstream");
    assert!(
        !sent(&receiver, "resolve", down_id).is_empty(),
        "node_down resolved before the release"
    );
    assert_eq!(
        requests_for(&receiver, id_of(&disk)?),
        0,
        "the cleared disk never paged"
    );
    let d = agg.get(&format!("/api/v1/incidents/{up_id}")).await?;
    assert!(
        d["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "uninhibited")),
        "{d}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_firing_again_inside_the_reopen_window_reopens_the_same_incident()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let mut node = ScriptedNode::connect(&endpoint(&agg), "api-1", &[], HEARTBEAT).await?;
    node.send(&[("process:api", "critical")]).await?;
    let id = id_of(&incident_of(&agg, "process:api").await?)?;
    node.send(&[("process:api", "ok")]).await?;
    eventually("trigger and resolve", PATIENCE, || async {
        (sent(&receiver, "resolve", id).len() == 1).then_some(())
    })
    .await?;
    node.send(&[("process:api", "critical")]).await?;
    let d = wait_incident(&agg, id, "reopened", |d| d["status"] == "triggered").await?;
    assert_eq!(
        incident_count(&agg.get("/api/v1/incidents").await?),
        1,
        "{d}"
    );
    assert!(
        d["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "reopened")),
        "{d}"
    );
    eventually("the second page", PATIENCE, || async {
        (sent(&receiver, "trigger", id).len() == 2).then_some(())
    })
    .await?;
    let keys: Vec<Value> = sent(&receiver, "trigger", id)
        .iter()
        .map(|v| v["dedup_key"].clone())
        .collect();
    assert_eq!(keys[0], keys[1], "one dedup key per incident");
    Ok(())
}

/// Unix ms of an RFC 3339 payload time.
fn unix_ms(v: &Value) -> Result<i64> {
    let t = humantime::parse_rfc3339(v.as_str().context("a time")?)?;
    Ok(i64::try_from(
        t.duration_since(std::time::UNIX_EPOCH)?.as_millis(),
    )?)
}

/// Regression (reopened page carried the first cycle's times): the page of a reopened
/// incident said the breach began at the first cycle's breach start and that it
/// triggered at its first opening, so a reader saw "breach began 184 s before" a load
/// that had just started. It now carries this cycle's breach start and trigger time,
/// and the first opening as `first_triggered_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_incident_pages_with_the_breach_start_and_trigger_time_of_its_new_cycle()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let mut node = ScriptedNode::connect(&endpoint(&agg), "api-1", &[], HEARTBEAT).await?;
    let first_breach = tocsin_agent::event::now_ms() - 60_000;
    node.send_breach(&[("process:api", "critical")], first_breach)
        .await?;
    let id = id_of(&incident_of(&agg, "process:api").await?)?;
    let first = eventually("the first page", PATIENCE, || async {
        sent(&receiver, "trigger", id).into_iter().next()
    })
    .await?;
    assert_eq!(
        unix_ms(&first["incident"]["breach_started_at"])?,
        first_breach,
        "{first}"
    );
    let first_triggered = unix_ms(&first["incident"]["triggered_at"])?;
    assert_eq!(
        unix_ms(&first["incident"]["first_triggered_at"])?,
        first_triggered,
        "{first}"
    );
    node.send(&[("process:api", "ok")]).await?;
    eventually("the resolve", PATIENCE, || async {
        (sent(&receiver, "resolve", id).len() == 1).then_some(())
    })
    .await?;
    // The second cycle's breach began after the first page went out.
    let second_breach = tocsin_agent::event::now_ms();
    assert!(second_breach > first_triggered);
    node.send_breach(&[("process:api", "critical")], second_breach)
        .await?;
    let second = eventually("the page of the reopened cycle", PATIENCE, || async {
        sent(&receiver, "trigger", id).into_iter().nth(1)
    })
    .await?;
    let d = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert!(
        d["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "reopened")),
        "the same incident, reopened: {d}"
    );
    assert_eq!(
        unix_ms(&second["incident"]["breach_started_at"])?,
        second_breach,
        "this cycle's breach start: {second}"
    );
    assert!(
        unix_ms(&second["incident"]["triggered_at"])? >= second_breach,
        "this cycle's trigger time: {second}"
    );
    assert_eq!(
        unix_ms(&second["incident"]["first_triggered_at"])?,
        first_triggered,
        "the first opening stays available: {second}"
    );
    assert_eq!(
        d["triggered_at_ms"].as_i64(),
        Some(first_triggered),
        "the incident still opened when it first did: {d}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn severity_comes_from_the_first_matching_rule_then_the_seeds_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("node_timeout = \"10m\"")
            .set("[correlation]")
            .set("group_by = [\"node\", \"check\"]")
            .set("[[severity]]")
            .set("match = [\"check=disk\", \"state=warning\"]")
            .set("level = \"P4\"")
            .set("[[severity]]")
            .set("match = [\"check=disk\"]")
            .set("level = \"P1\"")
            .build(),
    )
    .await?;
    let ep = endpoint(&agg);
    let mut s1 = ScriptedNode::connect(&ep, "pay-1", &[("service", "pay")], HEARTBEAT).await?;
    let mut s2 = ScriptedNode::connect(&ep, "pay-2", &[("service", "pay")], HEARTBEAT).await?;
    let _s3 = ScriptedNode::connect(&ep, "pay-3", &[("service", "pay")], HEARTBEAT).await?;
    let _s4 = ScriptedNode::connect(&ep, "pay-4", &[("service", "pay")], HEARTBEAT).await?;
    s1.send(&[
        ("disk", "warning"),
        ("cpu", "warning"),
        ("http:pay", "critical"),
    ])
    .await?;
    let severity = |node: &'static str, check: &'static str| {
        let agg = &agg;
        async move {
            let list = agg.get("/api/v1/incidents").await.ok()?;
            list["incidents"]
                .as_array()?
                .iter()
                .find(|i| i["node"] == node && i["check"] == check)
                .map(|i| i["severity"].clone())
        }
    };
    assert_eq!(
        severity("pay-1", "disk").await,
        Some("P4".into()),
        "user rule wins"
    );
    assert_eq!(
        severity("pay-1", "cpu").await,
        Some("P3".into()),
        "default: warning"
    );
    assert_eq!(
        severity("pay-1", "http:pay").await,
        Some("P2".into()),
        "critical on one of four nodes"
    );
    // A second node of four: half the service is critical on it.
    s2.send(&[("http:pay", "critical")]).await?;
    assert_eq!(severity("pay-2", "http:pay").await, Some("P1".into()));
    s1.send(&[("disk", "critical")]).await?;
    eventually("the second rule", PATIENCE, || async {
        (severity("pay-1", "disk").await == Some("P1".into())).then_some(())
    })
    .await?;
    Ok(())
}

fn tocsin(api: &str, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(bin("tocsin"))
        .arg("--api")
        .arg(api)
        .args(args)
        .env_remove("TOCSIN_API_TOKEN")
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_until_resolved_ends_with_its_incident_and_unknown_labels_warn() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let api = format!("http://{}", agg.http);
    let mut node =
        ScriptedNode::connect(&endpoint(&agg), "mail-1", &[("service", "mail")], HEARTBEAT).await?;
    node.send(&[("process:postfix", "critical")]).await?;
    let id = id_of(&incident_of(&agg, "process:postfix").await?)?;
    let id_s = id.to_string();
    let (code, out, err) = tocsin(
        &api,
        &[
            "silence",
            "add",
            "--match",
            "service=mail",
            "--until-resolved",
            &id_s,
            "--reason",
            "mail relay being rebuilt",
            "--by",
            "alice",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!err.contains("warning"), "service is a known label: {err}");
    let (code, out, err) = tocsin(
        &api,
        &[
            "silence", "add", "--match", "team=ops", "--for", "1h", "--reason", "typo?", "--by",
            "bob",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("warning") && err.contains("\"team\""),
        "a label no node or check has: {err}"
    );
    let (code, _, err) = tocsin(
        &api,
        &[
            "silence", "add", "--match", "node=x", "--reason", "r", "--by", "bob",
        ],
    )?;
    assert_eq!(code, Some(64), "neither --for nor --until-resolved: {err}");
    let (code, out, _) = tocsin(&api, &["silence", "list"])?;
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&format!("(until incident {id} resolves)")),
        "{out}"
    );
    node.send(&[("process:postfix", "ok")]).await?;
    let silence = eventually("the silence expired", PATIENCE, || async {
        let list = agg.get("/api/v1/silences").await.ok()?;
        list["silences"]
            .as_array()?
            .iter()
            .find(|s| s["ends_with_incident"] == id && s["state"] == "expired")
            .cloned()
    })
    .await?;
    assert_eq!(
        silence["expired_by"],
        format!("incident #{id} resolved"),
        "{silence}"
    );
    // A resolved incident cannot be waited for.
    let (code, _, err) = tocsin(
        &api,
        &[
            "silence",
            "add",
            "--match",
            "node=mail-1",
            "--until-resolved",
            &id_s,
            "--reason",
            "late",
            "--by",
            "bob",
        ],
    )?;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("already resolved"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_group_survives_an_aggregator_restart_and_pages_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let config = |grpc: String| {
        AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .grpc(grpc)
            .set("node_timeout = \"10m\"")
            .set("[correlation]")
            .set("group_wait = \"3s\"")
            .build()
    };
    let mut agg = Aggregator::start(dir.path(), &config("127.0.0.1:0".into())).await?;
    let grpc = agg.grpc;
    let mut a = ScriptedNode::connect(&endpoint(&agg), "q-1", &[], HEARTBEAT).await?;
    let mut b = ScriptedNode::connect(&endpoint(&agg), "q-2", &[], HEARTBEAT).await?;
    a.send(&[("queue:jobs", "critical")]).await?;
    b.send(&[("queue:jobs", "critical")]).await?;
    // Killed while the group gathers (or, on a slow machine, just after it paged: then
    // the restart must not page it again).
    agg.daemon.stop("KILL")?;
    drop((a, b));
    let agg = Aggregator::start(dir.path(), &config(grpc.to_string())).await?;
    let id = id_of(&incident_of(&agg, "queue:jobs").await?)?;
    let page = eventually("the page after the restart", PATIENCE, || async {
        sent(&receiver, "trigger", id).into_iter().next()
    })
    .await?;
    assert_eq!(
        page["incident"]["summary"], "queue:jobs critical on 2 nodes: q-1, q-2",
        "{page}"
    );
    // A resolve by hand queues behind the trigger on the channel: once it is in, any
    // second trigger would be too.
    let api = format!("http://{}", agg.http);
    let (code, out, err) = tocsin(&api, &["resolve", &id.to_string(), "--by", "ops"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    eventually("the resolve", PATIENCE, || async {
        (!sent(&receiver, "resolve", id).is_empty()).then_some(())
    })
    .await?;
    assert_eq!(sent(&receiver, "trigger", id).len(), 1);
    Ok(())
}

/// Regression: a resolve by hand (`POST /api/v1/incidents/{id}/resolve`) of a group
/// whose checks still fired went silent — the agents' unchanged heartbeats were skipped,
/// so no new incident opened until an aggregator restart paged a surprise. Now the next
/// heartbeats open a new incident for every member that still fires, and it pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_resolve_of_a_still_firing_group_opens_a_new_incident_and_pages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let mut nodes = Vec::new();
    for id in ["hr-1", "hr-2"] {
        let mut n = ScriptedNode::connect(&endpoint(&agg), id, &[], HEARTBEAT).await?;
        n.send(&[("exec:queue", "critical")]).await?;
        // The agents keep saying the check fires, as a real agent's heartbeats do.
        n.heartbeats_with(HEARTBEAT, &[("exec:queue", "critical")]);
        nodes.push(n);
    }
    let first = id_of(&incident_of(&agg, "exec:queue").await?)?;
    wait_incident(&agg, first, "2 members", |d| {
        d["members"].as_array().is_some_and(|m| m.len() == 2)
    })
    .await?;
    eventually("the first page", PATIENCE, || async {
        (!sent(&receiver, "trigger", first).is_empty()).then_some(())
    })
    .await?;
    // Let a few heartbeats be reconciled (and remembered) before the resolve.
    tokio::time::sleep(HEARTBEAT * 4).await;
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/incidents/{first}/resolve",
            agg.http
        ))
        .json(&serde_json::json!({ "by": "alice", "note": "looks fine" }))
        .send()
        .await?;
    assert!(resp.status().is_success(), "{}", resp.status());
    let second = eventually("a new incident for what still fires", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .filter(|i| i["check"] == "exec:queue" && i["status"] == "triggered")
            .find_map(|i| i["id"].as_i64().filter(|id| *id != first))
    })
    .await?;
    wait_incident(&agg, second, "both members in the new incident", |d| {
        d["members"].as_array().is_some_and(|m| m.len() == 2)
    })
    .await?;
    eventually("the new incident's page", PATIENCE, || async {
        (!sent(&receiver, "trigger", second).is_empty()).then_some(())
    })
    .await?;
    eventually("the first incident's resolve", PATIENCE, || async {
        (!sent(&receiver, "resolve", first).is_empty()).then_some(())
    })
    .await?;
    assert_eq!(sent(&receiver, "trigger", first).len(), 1);
    assert_eq!(sent(&receiver, "trigger", second).len(), 1);
    drop(nodes);
    Ok(())
}

/// Regression: after one member of a group recovered, the incident showed the value of
/// the member that recovered (critical, value 0), and the resolve sent out carried the
/// old firing text ("critical on 1 node: …"). Now the open incident shows its worst
/// firing member, and the resolve says every member is OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shows_its_worst_firing_member_and_resolves_with_every_member_ok() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .set("node_timeout = \"10m\"")
            .build(),
    )
    .await?;
    let mut one = ScriptedNode::connect(&endpoint(&agg), "val-1", &[], HEARTBEAT).await?;
    let mut two = ScriptedNode::connect(&endpoint(&agg), "val-2", &[], HEARTBEAT).await?;
    one.send_values(&[("disk", "critical", 97.0)]).await?;
    two.send_values(&[("disk", "critical", 91.0)]).await?;
    let id = id_of(&incident_of(&agg, "disk").await?)?;
    one.send_values(&[("disk", "ok", 12.0)]).await?;
    let d = wait_incident(&agg, id, "val-1 recovered", |d| {
        d["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["node"] == "val-1" && m["state"] == "ok"))
    })
    .await?;
    assert_eq!(d["status"], "triggered", "{d}");
    assert_eq!(
        (&d["state"], &d["value"]),
        (&Value::from("critical"), &Value::from(91.0)),
        "{d}"
    );
    two.send_values(&[("disk", "ok", 15.0)]).await?;
    let resolve = eventually("the resolve", PATIENCE, || async {
        sent(&receiver, "resolve", id).into_iter().next()
    })
    .await?;
    assert_eq!(
        resolve["incident"]["summary"], "disk ok on 2 nodes: val-1, val-2",
        "{resolve}"
    );
    assert_eq!(resolve["incident"]["state"], "ok", "{resolve}");
    assert_eq!(resolve["incident"]["value"], 15.0, "{resolve}");
    Ok(())
}
