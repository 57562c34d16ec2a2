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
    assert_eq!(entry["actor"], "api:alice", "{entry}");
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

    // The process comes back. (Resolved by hand while it still fired, the check may have
    // opened a new incident at the next heartbeat; that one is not this incident.)
    dummy.start()?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let of_this = |kind: &str| {
        receiver
            .events(kind, "node-life", &check)
            .iter()
            .filter(|e| e["incident"]["id"].as_i64() == Some(id))
            .count()
    };
    assert_eq!(
        (
            of_this("trigger"),
            of_this("acknowledge"),
            of_this("resolve")
        ),
        (1, 1, 1),
        "one of each for incident {id}"
    );
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
    // A web page cannot do it for a user: no form posts, no foreign origin.
    let form = client
        .post(&url)
        .bearer_auth("s3cret-api-token")
        .header("Content-Type", "text/plain")
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(form.status(), 415);
    let cross_site = client
        .post(&url)
        .bearer_auth("s3cret-api-token")
        .header("Origin", "https://evil.example")
        .json(&body)
        .send()
        .await?;
    assert_eq!(cross_site.status(), 403);
    let bad_body = client
        .post(&url)
        .bearer_auth("s3cret-api-token")
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await?;
    assert_eq!(bad_body.status(), 400);
    let err: Value = bad_body.json().await?;
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|e| e.contains("by")),
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
            "--by",
            "alice",
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
    let (code, _, _) = tocsin(&api, &["silence", "expire", "999999", "--by", "alice"])?;
    assert_eq!(code, Some(3));
    Ok(())
}

/// A receiver that behaves like PagerDuty's Events API v2: 429 with `Retry-After` on the
/// first request, 400 when the routing key is wrong or a limit is exceeded, 202
/// otherwise; records every accepted event.
async fn pagerduty_like(
    key: &'static str,
) -> Result<(String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>)> {
    use axum::http::StatusCode;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (s, f) = (seen.clone(), first.clone());
    let app = axum::Router::new().route(
        "/v2/enqueue",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (s, f) = (s.clone(), f.clone());
            async move {
                if f.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("Retry-After", "1")],
                        "rate limited".to_owned(),
                    );
                }
                let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                    return (
                        StatusCode::BAD_REQUEST,
                        [("Retry-After", "0")],
                        "not JSON".into(),
                    );
                };
                let summary_ok = v["payload"]["summary"]
                    .as_str()
                    .is_none_or(|t| t.chars().count() <= 1024);
                let key_ok = v["dedup_key"]
                    .as_str()
                    .is_some_and(|k| !k.is_empty() && k.len() <= 255);
                if v["routing_key"] != key || !summary_ok || !key_ok || body.len() > 512 * 1024 {
                    return (
                        StatusCode::BAD_REQUEST,
                        [("Retry-After", "0")],
                        format!("invalid event: {v}"),
                    );
                }
                s.lock().expect("lock").push(v);
                (
                    StatusCode::ACCEPTED,
                    [("Retry-After", "0")],
                    "{\"status\":\"success\"}".into(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v2/enqueue", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen))
}

/// PagerDuty (Events API v2) and Slack channels: one dedup key from trigger through
/// acknowledge to resolve, the 429 honoured, a CJK summary kept whole, Slack lines for
/// each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagerduty_and_slack_channels_follow_the_incident() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let slack = WebhookReceiver::start().await?;
    let (pd_url, pd) = pagerduty_like("PDKEY123").await?;
    let key_file = dir.path().join("pd.key");
    std::fs::write(&key_file, "PDKEY123\n")?;
    let agg_cfg = format!(
        "{}[notify]\nretry_min = \"100ms\"\nretry_max = \"2s\"\n\
         [[notify.webhook]]\nname = \"pd\"\nkind = \"pagerduty\"\nurl = \"{pd_url}\"\nrouting_key_file = \"{}\"\n\
         [[notify.webhook]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"{}\"\n",
        AggregatorToml::new(dir.path()).build(),
        key_file.display(),
        slack.url
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let plugin = "printf 'CRITICAL: '; i=0; while [ $i -lt 300 ]; do printf '服务'; i=$((i+1)); done; echo; exit 2";
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-pd", agg.grpc)
            .set(&format!(
                "[[exec]]\nname = \"cjk\"\ncommand = [\"/bin/sh\", \"-c\", \"{plugin}\"]\ninterval = \"1s\""
            ))
            .build(),
    )?;
    let trigger = eventually("a PagerDuty trigger", PATIENCE, || async {
        pd.lock()
            .expect("lock")
            .iter()
            .find(|e| e["event_action"] == "trigger")
            .cloned()
    })
    .await?;
    let dedup = trigger["dedup_key"]
        .as_str()
        .context("dedup key")?
        .to_owned();
    assert_eq!(trigger["payload"]["severity"], "error", "P2: {trigger}");
    assert_eq!(trigger["payload"]["source"], "node-pd");
    let summary = trigger["payload"]["summary"].as_str().context("summary")?;
    assert!(
        summary.contains("服务") && !summary.contains('\u{fffd}'),
        "{summary}"
    );

    let id = eventually("the incident", PATIENCE, || async {
        let body = agg.get("/api/v1/incidents?status=open").await.ok()?;
        body["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == "exec:cjk")?["id"]
            .as_i64()
    })
    .await?;
    let api = format!("http://{}", agg.http);
    let (code, _, err) = tocsin(&api, &["ack", &id.to_string(), "--by", "alice"])?;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = tocsin(&api, &["resolve", &id.to_string(), "--by", "alice"])?;
    assert_eq!(code, Some(0), "{err}");
    eventually("acknowledge and resolve at PagerDuty", PATIENCE, || async {
        let events = pd.lock().expect("lock").clone();
        let actions: Vec<&str> = events
            .iter()
            .filter(|e| e["dedup_key"] == dedup.as_str())
            .filter_map(|e| e["event_action"].as_str())
            .collect();
        (actions == ["trigger", "acknowledge", "resolve"]).then_some(())
    })
    .await?;
    let texts = eventually("three Slack messages", PATIENCE, || async {
        let texts: Vec<String> = slack
            .received()
            .iter()
            .filter_map(|v| v["text"].as_str().map(str::to_owned))
            .filter(|t| t.contains("exec:cjk"))
            .collect();
        (texts.len() >= 3).then_some(texts)
    })
    .await?;
    assert!(texts[0].contains("TRIGGERED P2"), "{texts:?}");
    assert!(texts[1].contains("ACKNOWLEDGED"), "{texts:?}");
    assert!(texts[2].contains("RESOLVED"), "{texts:?}");
    Ok(())
}

/// Regression: not every API error was JSON (axum's own rejections are plain text, e.g.
/// a body over the limit). Every error of `/api/v1` is `{"error": {"status": N,
/// "message": "…"}}` with that HTTP status and `Content-Type: application/json`: a bad
/// query, a bad JSON body, a wrong content type, a wrong method (with `Allow` kept), an
/// unknown path, a body over the limit, a body missing fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_error_is_json_with_its_status() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let api = format!("http://{}", agg.http);
    // No pooled connections: the server closes the one whose body it refused (413).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let json = "application/json";
    let big = format!("{{\"by\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "bad query",
            client.get(format!("{api}/api/v1/incidents?limit=-5")),
            400,
        ),
        (
            "bad JSON body",
            client
                .post(format!("{api}/api/v1/incidents/1/ack"))
                .header("content-type", json)
                .body("{bad"),
            400,
        ),
        (
            "wrong content type",
            client
                .post(format!("{api}/api/v1/silences"))
                .header("content-type", "text/plain")
                .body("matchers=node%3Dweb-1"),
            415,
        ),
        (
            "wrong method",
            client.delete(format!("{api}/api/v1/incidents")),
            405,
        ),
        (
            "unknown path",
            client.get(format!("{api}/api/v1/nope")),
            404,
        ),
        (
            "body over the limit",
            client
                .post(format!("{api}/api/v1/silences"))
                .header("content-type", json)
                .body(big),
            413,
        ),
        (
            "body missing fields",
            client
                .post(format!("{api}/api/v1/silences"))
                .header("content-type", json)
                .body("{}"),
            400,
        ),
    ];
    for (what, request, status) in cases {
        let resp = request.send().await.context(what)?;
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let allow = resp.headers().get("allow").cloned();
        let text = resp.text().await?;
        assert!(
            content_type.starts_with(json),
            "{what}: {content_type} {text}"
        );
        let body: Value = serde_json::from_str(&text).with_context(|| format!("{what}: {text}"))?;
        assert_eq!(body["error"]["status"], status, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.trim().is_empty()),
            "{what}: {body}"
        );
        if status == 405 {
            assert!(allow.is_some_and(|a| a.to_str().is_ok_and(|a| a.contains("GET"))));
        }
    }
    Ok(())
}

/// Regression: without `--by` and with `$USER` unset, `tocsin` sent "unknown" as the
/// owner of a silence and as the actor of an acknowledge or resolve. Now it refuses
/// (exit 64, "give --by NAME (no $USER)") before any request, and the API refuses a
/// silence owned by "unknown" (400) from older clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_without_a_name_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let api = format!("http://{}", agg.http);
    let no_user = |args: &[&str]| -> Result<(Option<i32>, String)> {
        let out = Command::new(bin("tocsin"))
            .arg("--api")
            .arg(&api)
            .args(args)
            .env_remove("TOCSIN_API_TOKEN")
            .env_remove("USER")
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let add = [
        "silence",
        "add",
        "--match",
        "node=web-1",
        "--for",
        "1h",
        "--reason",
        "maintenance",
    ];
    for args in [
        &add[..],
        &["silence", "expire", "1"],
        &["ack", "1"],
        &["resolve", "1", "--note", "fixed"],
        &["postmortem", "1", "--link", "https://wiki.example/pm/1"],
        &["ack", "1", "--by", "  "],
    ] {
        let (code, err) = no_user(args)?;
        assert_eq!(code, Some(64), "{args:?}: {err}");
        let want = if args.contains(&"--by") {
            "--by must not be empty"
        } else {
            "give --by NAME (no $USER)"
        };
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let silences = agg.get("/api/v1/silences").await?;
    assert_eq!(silences["silences"].as_array().map(Vec::len), Some(0));
    let with_by: Vec<&str> = add.iter().copied().chain(["--by", "alice"]).collect();
    let (code, err) = no_user(&with_by)?;
    assert_eq!(code, Some(0), "{err}");

    let resp = reqwest::Client::new()
        .post(format!("{api}/api/v1/silences"))
        .header("content-type", "application/json")
        .body(r#"{"matchers": ["node=web-1"], "duration": "1h", "by": "Unknown", "reason": "r"}"#)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("names no one")),
        "{body}"
    );
    let silences = agg.get("/api/v1/silences").await?;
    assert_eq!(silences["silences"].as_array().map(Vec::len), Some(1));
    Ok(())
}
