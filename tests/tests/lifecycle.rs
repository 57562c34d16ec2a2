//! Incident lifecycle by hand: acknowledge and resolve through the API and the `tocsin`
//! CLI, recorded with who and why, notified exactly once to the channels that got the
//! trigger, and refused when the state forbids it. Real aggregator, agent, webhook
//! receiver and CLI binary on 127.0.0.1.

use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Dummy, PATIENCE, WebhookReceiver, bin, eventually,
    start_agent,
};

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

/// An aggregator (configured by `agg`) and an agent `node` watching a running dummy
/// process; returns once the aggregator stored the agent's first event.
struct Node {
    agg: Aggregator,
    dummy: Dummy,
    _agent: tocsin_e2e::Daemon,
}

async fn watched_node(dir: &std::path::Path, node: &str, agg: AggregatorToml) -> Result<Node> {
    let mut dummy = Dummy::new(dir, &node[node.len().saturating_sub(1)..])?;
    dummy.start()?;
    let agg = Aggregator::start(dir, &agg.build()).await?;
    let agent = start_agent(
        dir,
        &AgentToml::new(dir, node, agg.grpc)
            .watch(&dummy.name)
            .build(),
    )?;
    agg.wait_reported(node).await?;
    Ok(Node {
        agg,
        dummy,
        _agent: agent,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledge_and_resolve_by_hand_are_recorded_and_notified_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let Node {
        agg,
        mut dummy,
        _agent,
    } = watched_node(
        dir.path(),
        "node-life",
        AggregatorToml::new(dir.path()).webhook(&receiver.url),
    )
    .await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let trigger = receiver.wait_for("trigger", "node-life", &check).await?;
    let id = trigger["incident"]["id"]
        .as_i64()
        .context("incident id in the trigger")?;
    let api = format!("http://{}", agg.http);
    let id_s = id.to_string();

    let (code, out, err) = tocsin(&api, &["ack", &id_s, "--by", "alice", "--note", "on it"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    let ack = receiver
        .wait_for("acknowledge", "node-life", &check)
        .await?;
    assert_eq!(ack["incident"]["status"], "acknowledged", "{ack}");
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(detail["status"], "acknowledged", "{detail}");
    let entry = detail["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["kind"] == "acknowledged"))
        .cloned()
        .context("an acknowledged entry on the timeline")?;
    assert_eq!(entry["actor"], "user:alice", "{entry}");
    assert!(
        entry["note"].as_str().is_some_and(|n| n.contains("on it")),
        "{entry}"
    );

    // Again: a no-op, said so, nothing sent.
    let (code, out, _) = tocsin(&api, &["ack", &id_s, "--by", "bob"])?;
    assert_eq!(code, Some(0));
    assert!(out.contains("already acknowledged"), "{out}");

    let (code, out, err) = tocsin(&api, &["resolve", &id_s, "--by", "bob", "--note", "fixed"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    receiver.wait_for("resolve", "node-life", &check).await?;
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(detail["status"], "resolved", "{detail}");
    assert!(
        detail["resolution"]
            .as_str()
            .is_some_and(|r| r.contains("resolved by bob: fixed")),
        "{detail}"
    );

    // An ack that comes after the resolve never reopens it: 409, exit 4.
    let (code, _, err) = tocsin(&api, &["ack", &id_s, "--by", "carol"])?;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("resolved"), "{err}");
    let (code, _, err) = tocsin(&api, &["ack", "999999", "--by", "carol"])?;
    assert_eq!(code, Some(3), "{err}");

    // The process comes back: the incident is already resolved, no second resolve.
    dummy.start()?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(receiver.events("trigger", "node-life", &check).len(), 1);
    assert_eq!(receiver.events("acknowledge", "node-life", &check).len(), 1);
    assert_eq!(receiver.events("resolve", "node-life", &check).len(), 1);
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(detail["status"], "resolved");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_the_api_token_when_one_is_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("api.token");
    std::fs::write(&token, "s3cret-api-token\n")?;
    let Node {
        agg,
        mut dummy,
        _agent,
    } = watched_node(
        dir.path(),
        "node-tok",
        AggregatorToml::new(dir.path())
            .set(&format!("[auth]\napi_token_file = \"{}\"", token.display())),
    )
    .await?;
    dummy.kill();
    let check = format!("process:{}", dummy.name);
    let id = eventually("an open incident", PATIENCE, || async {
        let body = agg.get("/api/v1/incidents?status=open").await.ok()?;
        body["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check.as_str())
            .and_then(|i| i["id"].as_i64())
    })
    .await?;
    let api = format!("http://{}", agg.http);
    let url = format!("{api}/api/v1/incidents/{id}/ack");
    let client = reqwest::Client::new();
    let body = serde_json::json!({ "by": "mallory" });
    let no_token = client.post(&url).json(&body).send().await?;
    assert_eq!(no_token.status(), 401);
    let wrong = client
        .post(&url)
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let bad_body = client
        .post(&url)
        .bearer_auth("s3cret-api-token")
        .body("{}")
        .send()
        .await?;
    assert_eq!(bad_body.status(), 400);
    let err: Value = bad_body.json().await?;
    assert!(
        err["error"].as_str().is_some_and(|e| e.contains("by")),
        "{err}"
    );

    let (code, out, err) = tocsin(
        &api,
        &[
            "ack",
            &id.to_string(),
            "--by",
            "alice",
            "--token-file",
            token.to_str().context("utf-8")?,
        ],
    )?;
    assert_eq!(code, Some(0), "{out}{err}");
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(detail["status"], "acknowledged", "{detail}");
    Ok(())
}

/// A silence mutes paging, never recording: the incident opens and is listed, its page
/// is held; when the silence is expired while the check still fires, the page goes out.
/// A silence without a reason is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_holds_the_page_until_it_ends() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let Node {
        agg,
        mut dummy,
        _agent,
    } = watched_node(
        dir.path(),
        "node-quiet",
        AggregatorToml::new(dir.path()).webhook(&receiver.url),
    )
    .await?;
    let api = format!("http://{}", agg.http);

    let (code, _, err) = tocsin(
        &api,
        &[
            "silence",
            "add",
            "--match",
            "node=node-quiet",
            "--for",
            "1h",
            "--reason",
            "",
        ],
    )?;
    assert_eq!(code, Some(64), "a reason is required: {err}");
    let (code, out, err) = tocsin(
        &api,
        &[
            "silence",
            "add",
            "--match",
            "node=node-quiet",
            "--match",
            "check=~process:.*",
            "--for",
            "1h",
            "--reason",
            "planned maintenance",
            "--by",
            "alice",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}{err}");
    let id = out
        .split_whitespace()
        .nth(1)
        .context("silence id printed")?
        .to_owned();

    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let incident = eventually("the incident is recorded", PATIENCE, || async {
        let body = agg.get("/api/v1/incidents?status=open").await.ok()?;
        body["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check.as_str())
            .cloned()
    })
    .await?;
    let iid = incident["id"].as_i64().context("id")?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        receiver.events("trigger", "node-quiet", &check).is_empty(),
        "silenced: no page"
    );
    let detail = agg.get(&format!("/api/v1/incidents/{iid}")).await?;
    assert!(
        detail["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "silenced")),
        "{detail}"
    );
    let (code, out, _) = tocsin(&api, &["silence", "list"])?;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("active") && out.contains("planned maintenance"),
        "{out}"
    );

    let (code, out, err) = tocsin(&api, &["silence", "expire", &id, "--by", "alice"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    let trigger = receiver.wait_for("trigger", "node-quiet", &check).await?;
    assert_eq!(trigger["incident"]["id"].as_i64(), Some(iid));
    let (_, out, _) = tocsin(&api, &["silence", "list"])?;
    assert!(out.contains("expired"), "{out}");
    let (code, _, _) = tocsin(&api, &["silence", "expire", "999999"])?;
    assert_eq!(code, Some(3));
    Ok(())
}
