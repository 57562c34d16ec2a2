//! Routing and escalation: routes by severity and labels, repeats of open incidents,
//! escalation to the backup channel past the response target (once, across restarts),
//! and the per-channel storm guard — always with the invariant that acknowledge and
//! resolve go to a channel iff it got the trigger. Real aggregator, one real webhook
//! receiver per channel, simulated agents speaking real gRPC (and a real agent watching
//! a real process), all on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Dummy, PATIENCE, WebhookReceiver, eventually,
    start_agent,
};

/// A simulated agent (real gRPC, events acked one batch at a time) whose heartbeat
/// interval is long, so the aggregator never takes its quiet for a node down.
async fn sim_node(grpc: SocketAddr, id: &str, labels: &[(&str, &str)]) -> Result<ScriptedNode> {
    ScriptedNode::connect(
        &format!("http://{grpc}"),
        id,
        labels,
        Duration::from_secs(600),
    )
    .await
}

/// An aggregator config: fast paging sweep, fast retries, the given top-level lines
/// (routes, response targets) and one webhook channel per `(name, receiver, extra line)`.
fn config(dir: &std::path::Path, top: &str, channels: &[(&str, &WebhookReceiver, &str)]) -> String {
    let mut t = AggregatorToml::new(dir)
        .set("paging_sweep_interval = \"200ms\"")
        .set(top)
        .set("[notify]\nretry_min = \"100ms\"\nretry_max = \"1s\"");
    for (name, r, extra) in channels {
        t = t.set(&format!(
            "[[notify.webhook]]\nname = \"{name}\"\nurl = \"{}\"\n{extra}",
            r.url
        ));
    }
    t.build()
}

/// `(event, check)` of everything `r` received, sorted; `storm_summary` has no check.
fn got(r: &WebhookReceiver) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = r
        .received()
        .iter()
        .map(|b| {
            (
                b["event"].as_str().unwrap_or("?").to_owned(),
                b["incident"]["check"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    v.sort();
    v
}

fn count(r: &WebhookReceiver, event: &str, check: &str) -> usize {
    r.received()
        .iter()
        .filter(|b| b["event"] == event && b["incident"]["check"] == check)
        .count()
}

/// Waits until `r` got `n` notifications `event` for `check`.
async fn wait_count(r: &WebhookReceiver, event: &str, check: &str, n: usize) -> Result<()> {
    eventually(&format!("{n} × {event} {check}"), PATIENCE, || async {
        (count(r, event, check) >= n).then_some(())
    })
    .await
}

async fn incident_id(agg: &Aggregator, check: &str) -> Result<i64> {
    eventually(&format!("an incident for {check}"), PATIENCE, || async {
        let body = agg.get("/api/v1/incidents").await.ok()?;
        body["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check)
            .and_then(|i| i["id"].as_i64())
    })
    .await
}

async fn ack(agg: &Aggregator, id: i64) -> Result<()> {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/incidents/{id}/ack", agg.http))
        .json(&serde_json::json!({ "by": "alice", "note": "on it" }))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("ack {id}: {}", resp.status());
    }
    Ok(())
}

fn timeline_kinds(detail: &Value, kind: &str) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|e| e["kind"] == kind)
                .map(|e| e["note"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Routes by severity and labels send each page to its channels only; a route with
/// `continue` lets the next one match too; an incident no route matches goes to every
/// channel; each resolve goes exactly where the trigger went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_severity_and_labels_reach_only_their_channels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (oncall, web, tickets) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let routes = r#"
[[route]]
name = "web-critical"
severity = ["P1", "P2"]
match = ["service=~web.*"]
channels = ["oncall"]
continue = true
[[route]]
match = ["service=~web.*"]
channels = ["web"]
[[route]]
severity = ["P3"]
channels = ["tickets"]
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            routes,
            &[
                ("oncall", &oncall, ""),
                ("web", &web, ""),
                ("tickets", &tickets, ""),
            ],
        ),
    )
    .await?;
    let mut front = sim_node(agg.grpc, "node-front", &[("service", "web-frontend")]).await?;
    let mut db = sim_node(agg.grpc, "node-db", &[("service", "db")]).await?;
    front
        .send(&[("web-crit", "critical"), ("web-warn", "warning")])
        .await?;
    db.send(&[("db-warn", "warning"), ("db-crit", "critical")])
        .await?;
    // web-crit (P2, web): web-critical, then (continue) the web route.
    // web-warn (P3, web): the web route, which stops there (not tickets).
    // db-warn (P3, db): tickets. db-crit (P2, db): no route: every channel.
    wait_count(&oncall, "trigger", "db-crit", 1).await?;
    wait_count(&web, "trigger", "db-crit", 1).await?;
    wait_count(&tickets, "trigger", "db-crit", 1).await?;
    wait_count(&oncall, "trigger", "web-crit", 1).await?;
    wait_count(&web, "trigger", "web-warn", 1).await?;
    wait_count(&tickets, "trigger", "db-warn", 1).await?;

    let detail = agg
        .get(&format!(
            "/api/v1/incidents/{}",
            incident_id(&agg, "web-crit").await?
        ))
        .await?;
    let routed = timeline_kinds(&detail, "routed");
    assert!(
        routed.len() == 1
            && routed[0].contains("web-critical → oncall")
            && routed[0].contains("route.1 → web"),
        "{routed:?}"
    );

    front
        .send(&[("web-crit", "ok"), ("web-warn", "ok")])
        .await?;
    db.send(&[("db-warn", "ok"), ("db-crit", "ok")]).await?;
    wait_count(&oncall, "resolve", "db-crit", 1).await?;
    wait_count(&web, "resolve", "db-crit", 1).await?;
    wait_count(&tickets, "resolve", "db-crit", 1).await?;
    wait_count(&oncall, "resolve", "web-crit", 1).await?;
    wait_count(&web, "resolve", "web-warn", 1).await?;
    wait_count(&tickets, "resolve", "db-warn", 1).await?;
    // Let anything misrouted arrive before the final comparison.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        got(&oncall),
        pairs(&[
            ("trigger", "web-crit"),
            ("resolve", "web-crit"),
            ("trigger", "db-crit"),
            ("resolve", "db-crit")
        ])
    );
    assert_eq!(
        got(&web),
        pairs(&[
            ("trigger", "web-crit"),
            ("resolve", "web-crit"),
            ("trigger", "web-warn"),
            ("resolve", "web-warn"),
            ("trigger", "db-crit"),
            ("resolve", "db-crit")
        ])
    );
    assert_eq!(
        got(&tickets),
        pairs(&[
            ("trigger", "db-warn"),
            ("resolve", "db-warn"),
            ("trigger", "db-crit"),
            ("resolve", "db-crit")
        ])
    );
    Ok(())
}

/// A route's `repeat_interval` re-notifies its channel while the incident is open and
/// unacknowledged (a real agent watching a real process that died), and stops at the
/// acknowledge; the other channel, on a route without repeats, gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_interval_renotifies_until_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (oncall, log) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let routes = r#"
[[route]]
channels = ["oncall"]
repeat_interval = "10s"
continue = true
[[route]]
channels = ["log"]
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            routes,
            &[("oncall", &oncall, ""), ("log", &log, "")],
        ),
    )
    .await?;
    let mut dummy = Dummy::new(dir.path(), "r")?;
    dummy.start()?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-rep", agg.grpc)
            .watch(&dummy.name)
            .build(),
    )?;
    agg.wait_reported("node-rep").await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    oncall.wait_for("trigger", "node-rep", &check).await?;
    wait_count(&oncall, "repeat", &check, 2).await?;
    let id = incident_id(&agg, &check).await?;
    ack(&agg, id).await?;
    oncall.wait_for("acknowledge", "node-rep", &check).await?;
    log.wait_for("acknowledge", "node-rep", &check).await?;
    let repeats = count(&oncall, "repeat", &check);
    // More than a period (10s, the shortest allowed) and many sweeps: no repeat after
    // the acknowledge.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    let acked_at = detail["acknowledged_at_ms"]
        .as_i64()
        .context("acknowledged")?;
    let after_ack = detail["notifications"]
        .as_array()
        .context("notifications")?
        .iter()
        .filter(|n| n["kind"] == "repeat" && n["created_at_ms"].as_i64() > Some(acked_at))
        .count();
    assert_eq!(after_ack, 0, "{detail}");
    assert_eq!(count(&oncall, "repeat", &check), repeats);
    assert!(timeline_kinds(&detail, "repeat").len() >= 2, "{detail}");
    assert_eq!(
        count(&log, "repeat", &check),
        0,
        "no repeats on a route without them"
    );
    assert_eq!(
        count(&oncall, "trigger", &check),
        1,
        "a repeat is not a second trigger"
    );
    Ok(())
}

/// An incident still unacknowledged past its severity's response target escalates to the
/// route's backup channel (timeline `escalated`, naming the target); its resolve then
/// goes to the backup too. One acknowledged in time never escalates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_incident_escalates_to_the_backup_channel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (primary, backup) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let top = r#"
[response_targets]
P2 = "2s"
P3 = "6s"
[[route]]
name = "commander"
channels = ["primary"]
escalate_to = ["backup"]
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            top,
            &[("primary", &primary, ""), ("backup", &backup, "")],
        ),
    )
    .await?;
    let mut node = sim_node(agg.grpc, "node-esc", &[]).await?;
    // P3 (warning), acknowledged as soon as it is paged: within its 6 s target.
    node.send(&[("acked-in-time", "warning")]).await?;
    wait_count(&primary, "trigger", "acked-in-time", 1).await?;
    let quick = incident_id(&agg, "acked-in-time").await?;
    ack(&agg, quick).await?;
    // P2 (critical), never acknowledged: past 2 s the backup is paged.
    node.send(&[("ignored", "critical")]).await?;
    wait_count(&primary, "trigger", "ignored", 1).await?;
    wait_count(&backup, "trigger", "ignored", 1).await?;
    let late = incident_id(&agg, "ignored").await?;
    let detail = agg.get(&format!("/api/v1/incidents/{late}")).await?;
    let escalated = timeline_kinds(&detail, "escalated");
    assert!(
        escalated.len() == 1
            && escalated[0].contains("P2 response target (2s")
            && escalated[0].contains("paging backup"),
        "{escalated:?}"
    );
    // The quick one's target has passed by now (wait for it): it never escalates.
    let quick_detail = agg.get(&format!("/api/v1/incidents/{quick}")).await?;
    let triggered = quick_detail["triggered_at_ms"]
        .as_i64()
        .context("triggered")?;
    let acked = quick_detail["acknowledged_at_ms"]
        .as_i64()
        .context("acked")?;
    assert!(
        acked < triggered + 6_000,
        "precondition: the acknowledge came within the target ({} ms)",
        acked - triggered
    );
    eventually("the P3 target passed and swept", PATIENCE, || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        (i64::try_from(now).ok()? > triggered + 7_000).then_some(())
    })
    .await?;
    let quick_detail = agg.get(&format!("/api/v1/incidents/{quick}")).await?;
    assert!(
        timeline_kinds(&quick_detail, "escalated").is_empty(),
        "{quick_detail}"
    );
    assert_eq!(count(&backup, "trigger", "acked-in-time"), 0);

    node.send(&[("ignored", "ok"), ("acked-in-time", "ok")])
        .await?;
    wait_count(&primary, "resolve", "ignored", 1).await?;
    wait_count(&backup, "resolve", "ignored", 1).await?;
    wait_count(&primary, "resolve", "acked-in-time", 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        got(&backup),
        pairs(&[("trigger", "ignored"), ("resolve", "ignored")]),
        "the backup hears only of what escalated to it"
    );
    Ok(())
}

/// Timeline entries of `kind` as `(at_ms, note)`.
fn timeline_at(detail: &Value, kind: &str) -> Vec<(i64, String)> {
    detail["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|e| e["kind"] == kind)
                .map(|e| {
                    (
                        e["at_ms"].as_i64().unwrap_or(0),
                        e["note"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Regression: the response target counted from the trigger, not from the page, so a
/// page held by a group wait longer than the target escalated to the backup at the next
/// sweep after the primary was paged. Now the primary gets the whole target from its
/// page: the escalation comes at least the target after the `routed` entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_counts_from_the_page_after_a_group_wait() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (primary, backup) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let top = r#"
[correlation]
group_wait = "3s"
[response_targets]
P2 = "2s"
[[route]]
name = "commander"
channels = ["primary"]
escalate_to = ["backup"]
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            top,
            &[("primary", &primary, ""), ("backup", &backup, "")],
        ),
    )
    .await?;
    let mut node = sim_node(agg.grpc, "node-gw", &[]).await?;
    node.send(&[("held-then-paged", "critical")]).await?;
    wait_count(&primary, "trigger", "held-then-paged", 1).await?;
    wait_count(&backup, "trigger", "held-then-paged", 1).await?;
    let id = incident_id(&agg, "held-then-paged").await?;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    let triggered = detail["triggered_at_ms"].as_i64().context("triggered")?;
    let routed = timeline_at(&detail, "routed");
    let escalated = timeline_at(&detail, "escalated");
    let (Some((routed_at, _)), Some((escalated_at, note))) = (routed.first(), escalated.first())
    else {
        bail!("routed and escalated entries: {detail}");
    };
    assert!(
        *routed_at >= triggered + 3_000,
        "precondition: paged after the group wait: {detail}"
    );
    assert!(
        *escalated_at >= routed_at + 2_000,
        "escalated {} ms after the page, before the 2 s target: {note}",
        escalated_at - routed_at
    );
    Ok(())
}

/// Regression: an incident whose severity rose after its page (P2 → P1 when half of a
/// service's nodes went critical) never reached the P1 route. Now the P1 route's
/// channel gets the trigger once, the P2 route's channel is not paged again, and the
/// resolve goes to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_severity_that_rises_to_p1_pages_the_p1_route() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (war, general) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let top = r#"
[[route]]
name = "p1"
severity = ["P1"]
channels = ["war"]
[[route]]
name = "rest"
severity = ["P2", "P3", "P4"]
channels = ["general"]
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            top,
            &[("war", &war, ""), ("general", &general, "")],
        ),
    )
    .await?;
    let mut nodes = Vec::new();
    for n in 1..=4 {
        nodes.push(sim_node(agg.grpc, &format!("web-{n}"), &[("service", "web")]).await?);
    }
    // One of four web nodes critical: P2, the rest route.
    nodes[0].send(&[("cpu", "critical")]).await?;
    wait_count(&general, "trigger", "cpu", 1).await?;
    let id = incident_id(&agg, "cpu").await?;
    // Two of four: critical on half the service, P1.
    nodes[1].send(&[("cpu", "critical")]).await?;
    let p1 = war
        .wait_for("trigger", "2 nodes", "cpu")
        .await
        .context("the P1 route's page")?;
    assert_eq!(p1["incident"]["severity"], "P1", "{p1}");
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    let rerouted = timeline_kinds(&detail, "rerouted");
    assert!(
        rerouted.len() == 1 && rerouted[0].starts_with("now P1 (was P2): route p1 → paged war"),
        "{rerouted:?}"
    );
    for n in &mut nodes[..2] {
        n.send(&[("cpu", "ok")]).await?;
    }
    wait_count(&general, "resolve", "cpu", 1).await?;
    wait_count(&war, "resolve", "cpu", 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(got(&war), pairs(&[("trigger", "cpu"), ("resolve", "cpu")]));
    assert_eq!(
        got(&general),
        pairs(&[("trigger", "cpu"), ("resolve", "cpu")]),
        "not paged a second time"
    );
    Ok(())
}

/// Regression: a storm summary went to PagerDuty as a trigger even when every incident
/// it stood for had resolved in the window — an alert nothing would ever resolve. Now
/// PagerDuty gets nothing for such a window (the outbox row is `skipped`), and a chat
/// channel gets "1 incident held, all resolved".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_whose_held_incidents_all_resolved_sends_pagerduty_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pd, chat) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let key = dir.path().join("pd.key");
    std::fs::write(&key, "PDKEY123")?;
    let storm = "storm_budget = 1\nstorm_window = \"4s\"";
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            "",
            &[
                (
                    "pd",
                    &pd,
                    &format!(
                        "kind = \"pagerduty\"\nrouting_key_file = \"{}\"\n{storm}",
                        key.display()
                    ),
                ),
                ("chat", &chat, storm),
            ],
        ),
    )
    .await?;
    let mut node = sim_node(agg.grpc, "node-storm", &[]).await?;
    // Early in a 4 s window, so that both fire and clear inside it.
    eventually("the start of a storm window", PATIENCE, || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        (now % 4_000 < 500).then_some(())
    })
    .await?;
    node.send(&[("first", "critical"), ("held", "critical")])
        .await?;
    node.send(&[("first", "ok"), ("held", "ok")]).await?;
    let summary = eventually("the chat summary", PATIENCE, || async {
        chat.received()
            .into_iter()
            .find(|b| b["event"] == "storm_summary")
    })
    .await?;
    assert!(
        summary["incident"]["summary"]
            .as_str()
            .is_some_and(|t| t.starts_with("1 incident held, all resolved")),
        "{summary}"
    );
    let held = incident_id(&agg, "held").await?;
    let detail = eventually("the PagerDuty summary skipped", PATIENCE, || async {
        let d = agg.get(&format!("/api/v1/incidents/{held}")).await.ok()?;
        d["notifications"]
            .as_array()?
            .iter()
            .any(|n| {
                n["channel"] == "pd" && n["kind"] == "storm_summary" && n["status"] == "skipped"
            })
            .then_some(d)
    })
    .await?;
    assert_eq!(
        timeline_kinds(&detail, "notify_skipped").len(),
        1,
        "{detail}"
    );
    eventually("PagerDuty's trigger and resolve", PATIENCE, || async {
        (pd.received().len() >= 2).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let actions: Vec<String> = pd
        .received()
        .iter()
        .map(|b| {
            format!(
                "{} {}",
                b["event_action"].as_str().unwrap_or("?"),
                b["payload"]["component"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(actions, ["trigger first", "resolve -"], "{actions:?}");
    Ok(())
}

/// An escalation that fell due while the aggregator was down fires once after the
/// restart, and a second restart does not fire it again; the acknowledge then reaches
/// both the primary and the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_fires_exactly_once_across_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (primary, backup) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let top = r#"
[response_targets]
P2 = "3s"
[[route]]
channels = ["primary"]
escalate_to = ["backup"]
"#;
    let cfg = config(
        dir.path(),
        top,
        &[("primary", &primary, ""), ("backup", &backup, "")],
    );
    let mut agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut node = sim_node(agg.grpc, "node-rs", &[]).await?;
    node.send(&[("overdue", "critical")]).await?;
    wait_count(&primary, "trigger", "overdue", 1).await?;
    let id = incident_id(&agg, "overdue").await?;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    let triggered = detail["triggered_at_ms"].as_i64().context("triggered")?;
    drop(node);
    agg.daemon.stop("TERM")?;
    let before = count(&backup, "trigger", "overdue");
    // Down past the target.
    eventually("the P2 target passed while down", PATIENCE, || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        (i64::try_from(now).ok()? > triggered + 4_000).then_some(())
    })
    .await?;

    let mut agg = Aggregator::start(dir.path(), &cfg).await?;
    wait_count(&backup, "trigger", "overdue", 1).await?;
    agg.daemon.stop("TERM")?;
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    // Many sweeps of the new process.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(timeline_kinds(&detail, "escalated").len(), 1, "{detail}");
    assert_eq!(
        (before, count(&backup, "trigger", "overdue")),
        (0, 1),
        "escalated once, after the first restart"
    );
    ack(&agg, id).await?;
    wait_count(&primary, "acknowledge", "overdue", 1).await?;
    wait_count(&backup, "acknowledge", "overdue", 1).await?;
    Ok(())
}

/// A check that clears and fires again within the re-open window reopens its incident:
/// a new paging cycle. It is routed and paged again, repeats again and escalates again
/// past the response target counted from the reopen; and a cycle acknowledged in time
/// is not escalated, so its acknowledge and resolve reach the primary only — never the
/// backup that an earlier cycle escalated to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_incident_is_routed_and_escalated_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (primary, backup) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let top = r#"
[response_targets]
P2 = "3s"
[correlation]
reopen_window = "10m"
[[route]]
name = "commander"
channels = ["primary"]
escalate_to = ["backup"]
repeat_interval = "10s"
"#;
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            top,
            &[("primary", &primary, ""), ("backup", &backup, "")],
        ),
    )
    .await?;
    let mut node = sim_node(agg.grpc, "node-reopen", &[]).await?;
    // Cycle 1: paged, repeated, escalated; resolved to both.
    node.send(&[("again", "critical")]).await?;
    wait_count(&primary, "trigger", "again", 1).await?;
    wait_count(&primary, "repeat", "again", 1).await?;
    wait_count(&backup, "trigger", "again", 1).await?;
    let id = incident_id(&agg, "again").await?;
    node.send(&[("again", "ok")]).await?;
    wait_count(&primary, "resolve", "again", 1).await?;
    wait_count(&backup, "resolve", "again", 1).await?;

    // Cycle 2: the same incident, paged, repeated and escalated again.
    node.send(&[("again", "critical")]).await?;
    wait_count(&primary, "trigger", "again", 2).await?;
    assert_eq!(incident_id(&agg, "again").await?, id, "reopened, not new");
    let repeats = count(&primary, "repeat", "again");
    wait_count(&primary, "repeat", "again", repeats + 1).await?;
    wait_count(&backup, "trigger", "again", 2).await?;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(timeline_kinds(&detail, "reopened").len(), 1, "{detail}");
    assert_eq!(timeline_kinds(&detail, "routed").len(), 2, "{detail}");
    assert_eq!(timeline_kinds(&detail, "escalated").len(), 2, "{detail}");
    node.send(&[("again", "ok")]).await?;
    wait_count(&primary, "resolve", "again", 2).await?;
    wait_count(&backup, "resolve", "again", 2).await?;

    // Cycle 3: acknowledged as soon as it is paged, within the 3 s target.
    node.send(&[("again", "critical")]).await?;
    wait_count(&primary, "trigger", "again", 3).await?;
    ack(&agg, id).await?;
    wait_count(&primary, "acknowledge", "again", 1).await?;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    let reopened_at = detail["timeline"]
        .as_array()
        .and_then(|t| t.iter().rev().find(|e| e["kind"] == "reopened"))
        .and_then(|e| e["at_ms"].as_i64())
        .context("reopened entry")?;
    let acked = detail["acknowledged_at_ms"].as_i64().context("acked")?;
    assert!(
        acked < reopened_at + 3_000,
        "precondition: the acknowledge came within the target ({} ms)",
        acked - reopened_at
    );
    // Past the target, with many sweeps: no third escalation.
    eventually("the P2 target of cycle 3 passed", PATIENCE, || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        (i64::try_from(now).ok()? > reopened_at + 4_000).then_some(())
    })
    .await?;
    node.send(&[("again", "ok")]).await?;
    wait_count(&primary, "resolve", "again", 3).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(timeline_kinds(&detail, "escalated").len(), 2, "{detail}");
    assert_eq!(
        got(&backup),
        pairs(&[
            ("trigger", "again"),
            ("resolve", "again"),
            ("trigger", "again"),
            ("resolve", "again")
        ]),
        "the backup hears only of the cycles that escalated to it"
    );
    assert_eq!(count(&primary, "acknowledge", "again"), 1);
    Ok(())
}

/// With a budget of 5 triggers per window, 30 incidents at once give 5 triggers and one
/// summary ("+25 more incidents") when the window turns; their resolves go only to the
/// 5 that were paged. A channel without a budget gets all 30 of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_guard_sends_the_budget_then_one_summary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (flood, calm) = (
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    );
    let agg = Aggregator::start(
        dir.path(),
        &config(
            dir.path(),
            "",
            &[
                ("flood", &flood, "storm_budget = 5\nstorm_window = \"2s\""),
                ("calm", &calm, "storm_budget = 0"),
            ],
        ),
    )
    .await?;
    let mut node = sim_node(agg.grpc, "node-storm", &[]).await?;
    let checks: Vec<String> = (0..30).map(|i| format!("storm-{i:02}")).collect();
    let firing: Vec<(&str, &str)> = checks.iter().map(|c| (c.as_str(), "critical")).collect();
    // One batch: one transaction, one window.
    node.send(&firing).await?;
    let summary = eventually("the storm summary", PATIENCE, || async {
        flood
            .received()
            .into_iter()
            .find(|b| b["event"] == "storm_summary")
    })
    .await?;
    let text = summary["incident"]["summary"].as_str().unwrap_or("");
    assert!(text.starts_with("+25 more incidents: 25 P2"), "{summary}");
    assert_eq!(summary["storm"]["held"], 25, "{summary}");
    assert_eq!(summary["storm"]["by_severity"]["P2"], 25, "{summary}");
    eventually("30 triggers on the calm channel", PATIENCE, || async {
        (calm
            .received()
            .iter()
            .filter(|b| b["event"] == "trigger")
            .count()
            == 30)
            .then_some(())
    })
    .await?;
    let paged: Vec<String> = flood
        .received()
        .iter()
        .filter(|b| b["event"] == "trigger")
        .filter_map(|b| b["incident"]["check"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(paged.len(), 5, "{:?}", flood.received());

    // A held incident says so on its timeline, and the summary is in the outbox.
    let held_check = checks
        .iter()
        .find(|c| !paged.contains(c))
        .context("a held check")?;
    let held = agg
        .get(&format!(
            "/api/v1/incidents/{}",
            incident_id(&agg, held_check).await?
        ))
        .await?;
    assert!(
        timeline_kinds(&held, "storm")
            .first()
            .is_some_and(|n| n.contains("held by the storm guard")),
        "{held}"
    );
    let first_held = summary["incident"]["id"]
        .as_i64()
        .context("summary incident")?;
    let outbox = agg.get(&format!("/api/v1/incidents/{first_held}")).await?;
    assert!(
        outbox["notifications"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n["kind"] == "storm_summary" && n["channel"] == "flood")),
        "{outbox}"
    );

    let clearing: Vec<(&str, &str)> = checks.iter().map(|c| (c.as_str(), "ok")).collect();
    node.send(&clearing).await?;
    eventually("30 resolves on the calm channel", PATIENCE, || async {
        (calm
            .received()
            .iter()
            .filter(|b| b["event"] == "resolve")
            .count()
            == 30)
            .then_some(())
    })
    .await?;
    wait_count_any(&flood, "resolve", 5).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut resolved: Vec<String> = flood
        .received()
        .iter()
        .filter(|b| b["event"] == "resolve")
        .filter_map(|b| b["incident"]["check"].as_str().map(str::to_owned))
        .collect();
    resolved.sort();
    let mut paged = paged;
    paged.sort();
    assert_eq!(resolved, paged, "resolves only where the trigger went");
    let kinds: BTreeMap<String, usize> =
        flood.received().iter().fold(BTreeMap::new(), |mut m, b| {
            *m.entry(b["event"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            m
        });
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("resolve".to_owned(), 5),
            ("storm_summary".to_owned(), 1),
            ("trigger".to_owned(), 5)
        ])
    );
    Ok(())
}

async fn wait_count_any(r: &WebhookReceiver, event: &str, n: usize) -> Result<()> {
    eventually(&format!("{n} × {event}"), PATIENCE, || async {
        (r.received().iter().filter(|b| b["event"] == event).count() >= n).then_some(())
    })
    .await
}

/// A route naming a channel that does not exist is a config error naming the route's
/// index and the name; every such problem is reported at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_channels_are_config_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hook = WebhookReceiver::start().await?;
    let top = r#"
[response_targets]
P4 = "next-week"
timezone = "Mars/Olympus"
[[route]]
channels = ["ops"]
[[route]]
severity = ["P5"]
channels = ["ops", "pager"]
escalate_to = ["backup"]
"#;
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config(dir.path(), top, &[("ops", &hook, "")]))?;
    let out = std::process::Command::new(tocsin_e2e::bin("tocsin-aggregator"))
        .args([
            "--config",
            path.to_str().unwrap_or_default(),
            "check-config",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for needle in [
        "key `route.1.channels`: route 1 names unknown channel \"pager\" (channels: ops)",
        "key `route.1.escalate_to`: route 1 names unknown channel \"backup\"",
        "key `route.1.severity`: invalid severity \"P5\"",
        "key `response_targets.P4`: invalid response target \"next-week\"",
        "key `response_targets.timezone`: invalid time zone \"Mars/Olympus\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!err.contains("route.0"), "route 0 is fine:\n{err}");
    Ok(())
}
