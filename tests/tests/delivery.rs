//! Delivery guarantees of the outbox, end to end (issue 5, "Shown by tests"): a resolve
//! that arrives while the aggregator is down is sent exactly once after the restart; a
//! kill -9 between the commit and the delivery still delivers once (with one stable
//! `Idempotency-Key`); an acknowledge racing a resolve never reopens the incident; a
//! slow channel never delays another. Real aggregator binary, real agents or scripted
//! nodes over real gRPC, real HTTP receivers on 127.0.0.1.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tocsin_e2e::recorder::{Answer, Recorder, Request};
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, eventually, start_agent,
};

/// Turns the storm guard off, so every trigger goes out one by one.
fn no_storm_guard(toml: AggregatorToml) -> AggregatorToml {
    toml.notify("storm_budget = 0")
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

/// Whether every notification of an incident detail is delivered.
fn all_delivered(detail: &Value) -> bool {
    detail["notifications"]
        .as_array()
        .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["status"] == "delivered"))
}

/// How many requests in `requests` carry each idempotency key.
fn by_key(requests: &[Request]) -> HashMap<String, usize> {
    let mut keys = HashMap::new();
    for r in requests {
        *keys.entry(r.idempotency_key.clone()).or_insert(0) += 1;
    }
    keys
}

/// Asserts what a receiver accepted for incident `id` over its whole life: exactly one
/// trigger and one resolve (in that order, same dedup key), nothing else, and every
/// accepted notification under an idempotency key of its own.
fn assert_one_trigger_one_resolve(receiver: &Recorder, id: i64) -> Result<()> {
    let accepted: Vec<Request> = receiver
        .accepted()
        .into_iter()
        .filter(|r| r.incident_id() == id)
        .collect();
    let events: Vec<&str> = accepted.iter().map(Request::event).collect();
    ensure!(
        events == ["trigger", "resolve"],
        "incident {id}: one trigger, then one resolve, got {events:?}"
    );
    ensure!(
        accepted[0].dedup_key() == accepted[1].dedup_key() && !accepted[0].dedup_key().is_empty(),
        "one dedup key per incident: {accepted:?}"
    );
    let keys = by_key(&accepted);
    ensure!(
        keys.len() == 2 && keys.values().all(|&n| n == 1) && !keys.contains_key(""),
        "each accepted notification has its own Idempotency-Key: {keys:?}"
    );
    // Every request about the incident, accepted or not, is one of those two.
    let dedup = accepted[0].dedup_key();
    for r in receiver.requests() {
        if r.dedup_key() == dedup || r.incident_id() == id {
            ensure!(
                keys.contains_key(&r.idempotency_key),
                "a request outside the trigger and the resolve: {r:?}"
            );
        }
    }
    Ok(())
}

/// An aggregator paging `receiver`, an agent `node` watching a running `dummy`; the
/// aggregator's config is written for `grpc` (port 0 first, then the port it got).
struct Setup {
    agg: Aggregator,
    agent: Daemon,
    dummy: Dummy,
    grpc: std::net::SocketAddr,
    check: String,
}

fn agg_config(dir: &Path, url: &str, grpc: &str) -> String {
    AggregatorToml::new(dir)
        .grpc(grpc)
        .webhook(url)
        .notify("retry_max = \"1s\"")
        .build()
}

async fn setup(dir: &Path, url: &str, node: &str, tag: &str) -> Result<Setup> {
    let mut dummy = Dummy::new(dir, tag)?;
    dummy.start()?;
    let agg = Aggregator::start(dir, &agg_config(dir, url, "127.0.0.1:0")).await?;
    let grpc = agg.grpc;
    let agent = start_agent(
        dir,
        &AgentToml::new(dir, node, grpc).watch(&dummy.name).build(),
    )?;
    agg.wait_reported(node).await?;
    let check = format!("process:{}", dummy.name);
    Ok(Setup {
        agg,
        agent,
        dummy,
        grpc,
        check,
    })
}

/// Restarts the aggregator on the same data directory and gRPC port.
async fn restart(dir: &Path, url: &str, grpc: std::net::SocketAddr) -> Result<Aggregator> {
    Aggregator::start(dir, &agg_config(dir, url, &grpc.to_string())).await
}

/// Waits until the agent logged that `check` went from critical to OK.
async fn wait_agent_saw_ok(agent: &Daemon, check: &str) -> Result<()> {
    eventually(&format!("the agent sees {check} OK"), PATIENCE, || async {
        agent
            .output()
            .lines()
            .any(|l| {
                l.contains(&format!("check={check} "))
                    && l.contains("from=\"critical\"")
                    && l.contains("to=\"ok\"")
            })
            .then_some(())
    })
    .await
}

/// Lets replays, heartbeats and the dispatcher run for a while, so a duplicate trigger
/// or resolve would have shown up (waits for nothing in particular: it only widens the
/// window in which a wrong send would be seen).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Issue 5: "resolve arriving while the aggregator is down → exactly one resolve after
/// restart". The trigger is delivered and recorded; the aggregator stops (`signal`);
/// the watched process comes back meanwhile and the agent spools the OK; after the
/// restart the receiver gets exactly one resolve for the incident, and no second
/// trigger.
async fn resolve_while_down(signal: &str, node: &str, tag: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = Recorder::start(Answer::Status(200)).await?;
    let Setup {
        mut agg,
        agent,
        mut dummy,
        grpc,
        check,
    } = setup(dir.path(), &receiver.url, node, tag).await?;

    dummy.kill();
    let trigger = receiver.wait_accepted("trigger", &check).await?;
    let id = trigger.incident_id();
    wait_incident(&agg, id, "the trigger recorded as delivered", all_delivered).await?;

    agg.daemon.stop(signal)?;
    dummy.start()?;
    wait_agent_saw_ok(&agent, &check).await?;
    ensure!(
        receiver.accepted_of("resolve", id).is_empty(),
        "nobody could send the resolve yet"
    );

    let agg = restart(dir.path(), &receiver.url, grpc).await?;
    receiver.wait_accepted("resolve", &check).await?;
    let detail = wait_incident(&agg, id, "every notification delivered", all_delivered).await?;
    settle().await;

    assert_one_trigger_one_resolve(&receiver, id)?;
    let detail_now = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    ensure!(detail_now["status"] == "resolved", "{detail_now}");
    ensure!(
        detail_now["notifications"] == detail["notifications"],
        "nothing queued after the resolve: {detail_now}"
    );
    let list = agg.get("/api/v1/incidents").await?;
    let of_check = list["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["check"] == check.as_str())
        .count();
    ensure!(of_check == 1, "one incident for {check}: {list}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_that_arrives_while_the_aggregator_is_stopped_is_sent_once() -> Result<()> {
    resolve_while_down("TERM", "node-down-term", "t").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_that_arrives_while_the_aggregator_is_killed_is_sent_once() -> Result<()> {
    resolve_while_down("KILL", "node-down-kill", "k").await
}

/// Issue 5: "kill -9 between commit and delivery → delivered once". The receiver
/// answers `first` (a 503, or no answer at all) while the trigger is committed to the
/// outbox and attempted; the aggregator is killed with SIGKILL; restarted with the
/// receiver healthy, the trigger is accepted exactly once, then the resolve exactly
/// once.
///
/// Delivery is at-least-once: a request that reached the receiver but was never
/// answered (the hanging case) is sent again after the restart. The contract is that
/// the repeat carries the same `Idempotency-Key` and dedup key, so the receiver can
/// drop it; the receiver here accepts one copy.
async fn killed_before_delivery(first: Answer, node: &str, tag: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = Recorder::start(first).await?;
    let Setup {
        mut agg,
        agent: _agent,
        mut dummy,
        grpc,
        check,
    } = setup(dir.path(), &receiver.url, node, tag).await?;

    dummy.kill();
    let attempt = receiver
        .wait_request(
            &format!("a first attempt of the trigger for {check}"),
            |r| r.event() == "trigger" && r.body["incident"]["check"] == check.as_str(),
        )
        .await?;
    let id = attempt.incident_id();
    agg.daemon.stop("KILL")?;
    ensure!(
        receiver.accepted().is_empty(),
        "nothing accepted before the kill"
    );

    receiver.answer(Answer::Status(200));
    let agg = restart(dir.path(), &receiver.url, grpc).await?;
    let trigger = receiver.wait_accepted("trigger", &check).await?;
    ensure!(
        trigger.incident_id() == id,
        "the same incident: {trigger:?}"
    );
    ensure!(
        trigger.idempotency_key == attempt.idempotency_key
            && trigger.dedup_key() == attempt.dedup_key(),
        "the re-sent trigger is the same notification: {attempt:?} then {trigger:?}"
    );
    // Every attempt at the trigger, before and after the kill, is one notification.
    let trigger_keys = by_key(
        &receiver
            .requests()
            .into_iter()
            .filter(|r| r.event() == "trigger")
            .collect::<Vec<_>>(),
    );
    ensure!(
        trigger_keys.len() == 1,
        "one idempotency key for the trigger: {trigger_keys:?}"
    );

    dummy.start()?;
    receiver.wait_accepted("resolve", &check).await?;
    wait_incident(&agg, id, "every notification delivered", all_delivered).await?;
    settle().await;
    assert_one_trigger_one_resolve(&receiver, id)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_receiver_fails_delivers_the_trigger_once() -> Result<()> {
    killed_before_delivery(Answer::Status(503), "node-kill-503", "f").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_receiver_hangs_delivers_the_trigger_once() -> Result<()> {
    killed_before_delivery(Answer::Hold, "node-kill-hang", "h").await
}

/// How one round of the race ended, as the API answered the acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckOutcome {
    /// 200, `result` `done`: the acknowledge came first.
    Done,
    /// 409: the incident was already resolved.
    Conflict,
}

/// Issue 5: "ack racing resolve 100 times → always resolved". 100 incidents; on each an
/// acknowledge through the API races the resolve (the node's OK, or a resolve through
/// the API), sent at the same time in alternating order. The incident always ends
/// resolved; the acknowledge either won (200 `done`) or got 409; the timeline never
/// shows an acknowledge or a reopen after the resolve; the receiver gets exactly one
/// trigger, at most one acknowledge (exactly one when it won) and exactly one resolve
/// per incident, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledge_racing_a_resolve_never_reopens_the_incident() -> Result<()> {
    const ROUNDS: usize = 100;
    let dir = tempfile::tempdir()?;
    let receiver = Recorder::start(Answer::Status(200)).await?;
    let cfg = no_storm_guard(
        AggregatorToml::new(dir.path())
            .set("[correlation]\ngroup_wait = \"0s\"\nreopen_window = \"0s\"")
            .webhook(&receiver.url),
    )
    .build();
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut node = ScriptedNode::connect(
        &format!("http://{}", agg.grpc),
        "node-race",
        &[],
        Duration::from_secs(1),
    )
    .await?;
    node.heartbeats(Duration::from_millis(300));
    let client = reqwest::Client::new();
    let api = format!("http://{}/api/v1/incidents", agg.http);
    let by = serde_json::json!({ "by": "racer" });

    let mut outcomes: Vec<(i64, AckOutcome)> = Vec::new();
    for round in 0..ROUNDS {
        let check = format!("race-{round}");
        node.send(&[(&check, "critical")]).await?;
        let id = eventually(&format!("the incident of {check}"), PATIENCE, || async {
            let list = agg.get("/api/v1/incidents?status=open").await.ok()?;
            list["incidents"]
                .as_array()?
                .iter()
                .find(|i| i["check"] == check.as_str())?["id"]
                .as_i64()
        })
        .await?;

        let ack = async {
            let r = client
                .post(format!("{api}/{id}/ack"))
                .json(&by)
                .send()
                .await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            anyhow::Ok((status, body))
        };
        let by_node = round % 2 == 0;
        let resolve = async {
            if by_node {
                node.send(&[(&check, "ok")]).await?;
                return anyhow::Ok(200);
            }
            let r = client
                .post(format!("{api}/{id}/resolve"))
                .json(&by)
                .send()
                .await?;
            anyhow::Ok(r.status().as_u16())
        };
        // Alternate which request goes out first.
        let ((ack_status, ack_body), resolved) = if round % 4 < 2 {
            let (a, r) = tokio::join!(ack, resolve);
            (a?, r?)
        } else {
            let (r, a) = tokio::join!(resolve, ack);
            (a?, r?)
        };
        ensure!(
            resolved == 200,
            "round {round}: resolve answered {resolved}"
        );
        let outcome = match (ack_status, ack_body["result"].as_str()) {
            (200, Some("done")) => AckOutcome::Done,
            (409, _) => AckOutcome::Conflict,
            other => bail!("round {round}: the acknowledge answered {other:?}: {ack_body}"),
        };
        let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
        ensure!(
            detail["status"] == "resolved",
            "round {round} ({outcome:?}): incident {id} must end resolved: {detail}"
        );
        let kinds: Vec<&str> = detail["timeline"]
            .as_array()
            .context("timeline")?
            .iter()
            .filter_map(|e| e["kind"].as_str())
            .collect();
        let resolved_at = kinds
            .iter()
            .position(|k| *k == "resolved")
            .context("a resolved entry")?;
        ensure!(
            !kinds[resolved_at..]
                .iter()
                .any(|k| matches!(*k, "acknowledged" | "reopened" | "triggered" | "opened")),
            "round {round}: nothing after the resolve but notes: {kinds:?}"
        );
        ensure!(
            kinds.iter().filter(|k| **k == "acknowledged").count()
                == usize::from(outcome == AckOutcome::Done),
            "round {round}: {outcome:?} and the timeline {kinds:?}"
        );
        outcomes.push((id, outcome));
    }

    let won = outcomes
        .iter()
        .filter(|(_, o)| *o == AckOutcome::Done)
        .count();
    // Shown with --nocapture: both orders should occur.
    let _ = writeln!(
        std::io::stderr(),
        "the acknowledge won {won} of {ROUNDS} races"
    );
    ensure!(
        won > 0 && won < ROUNDS,
        "both orders must occur, or the race was not exercised: the acknowledge won {won} of {ROUNDS}"
    );
    // Trigger and resolve of each, and the acknowledges that won.
    let owed = 2 * ROUNDS + won;
    eventually("every notification at the receiver", PATIENCE, || async {
        (receiver.accepted().len() >= owed).then_some(())
    })
    .await?;
    settle().await;

    let accepted = receiver.accepted();
    for (id, outcome) in &outcomes {
        let events: Vec<&str> = accepted
            .iter()
            .filter(|r| r.incident_id() == *id)
            .map(Request::event)
            .collect();
        let expected: &[&str] = match outcome {
            AckOutcome::Done => &["trigger", "acknowledge", "resolve"],
            AckOutcome::Conflict => &["trigger", "resolve"],
        };
        ensure!(
            events == expected,
            "incident {id} ({outcome:?}): the receiver got {events:?}"
        );
    }
    ensure!(
        accepted.len() == owed,
        "nothing else was sent: {} requests for {owed} notifications",
        accepted.len()
    );
    let open = agg.get("/api/v1/incidents?status=open").await?;
    ensure!(
        open["incidents"].as_array().is_some_and(Vec::is_empty),
        "no incident reopened: {open}"
    );
    let keys = by_key(&accepted);
    ensure!(
        keys.values().all(|&n| n == 1),
        "no notification accepted twice: {keys:?}"
    );
    Ok(())
}

/// Issue 5: "one slow channel never delays another". Two channels: the first never
/// answers until the test lets it (its timeout is a minute, so the aggregator keeps
/// waiting on it), the second answers at once. Two incidents fire and clear: the fast
/// receiver gets both triggers and both resolves while the slow one still holds its
/// first request unanswered; once released, the slow one gets everything too, each
/// exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_channel_never_delays_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let slow = Recorder::start(Answer::Hold).await?;
    let fast = Recorder::start(Answer::Status(200)).await?;
    // The slow channel is listed first, so a dispatcher that served channels one after
    // another would be stuck on it.
    let cfg = format!(
        "{}[notify]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n\
         [[notify.webhook]]\nname = \"slow\"\nurl = \"{}\"\ntimeout = \"60s\"\n\
         [[notify.webhook]]\nname = \"fast\"\nurl = \"{}\"\ntimeout = \"60s\"\n",
        AggregatorToml::new(dir.path()).build(),
        slow.url,
        fast.url
    );
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut node = ScriptedNode::connect(
        &format!("http://{}", agg.grpc),
        "node-slow",
        &[],
        Duration::from_secs(1),
    )
    .await?;
    node.heartbeats(Duration::from_millis(300));

    node.send(&[("first", "critical")]).await?;
    let held = slow
        .wait_request("the slow channel holding the first trigger", |r| {
            r.event() == "trigger"
        })
        .await?;
    ensure!(held.body["incident"]["check"] == "first", "{held:?}");
    fast.wait_accepted("trigger", "first").await?;
    node.send(&[("second", "critical")]).await?;
    fast.wait_accepted("trigger", "second").await?;
    node.send(&[("first", "ok"), ("second", "ok")]).await?;
    fast.wait_accepted("resolve", "first").await?;
    fast.wait_accepted("resolve", "second").await?;
    let slow_so_far = slow.requests();
    ensure!(
        slow_so_far.iter().all(|r| r.answered.is_none()),
        "the slow receiver still hangs: {slow_so_far:?}"
    );

    slow.answer(Answer::Status(200));
    slow.release();
    for check in ["first", "second"] {
        slow.wait_accepted("resolve", check).await?;
    }
    let ids: Vec<i64> = ["first", "second"]
        .iter()
        .map(|c| {
            fast.accepted()
                .iter()
                .find(|r| r.body["incident"]["check"] == *c)
                .map(Request::incident_id)
                .context("incident id")
        })
        .collect::<Result<_>>()?;
    for id in &ids {
        wait_incident(&agg, *id, "every notification delivered", all_delivered).await?;
    }
    settle().await;
    for id in ids {
        assert_one_trigger_one_resolve(&fast, id)?;
        assert_one_trigger_one_resolve(&slow, id)?;
    }
    Ok(())
}
