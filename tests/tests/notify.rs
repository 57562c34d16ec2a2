//! Notification delivery against a real HTTP receiver that misbehaves: transient errors
//! are retried (honouring Retry-After) until delivered; a permanent 4xx is recorded on the
//! incident and not retried. A generic channel with `secret_file` signs every request
//! (HMAC-SHA256), verified here as a receiver would.

use std::time::Duration;

use anyhow::Result;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, WebhookReceiver, eventually,
    start_agent,
};

/// An aggregator paging `receiver` (fast retries, capped at 2 s) and an agent watching
/// `dummy`, with the agent's first events stored.
async fn start_pair(
    dir: &std::path::Path,
    receiver: &WebhookReceiver,
    id: &str,
    dummy: &Dummy,
) -> Result<(Aggregator, Daemon)> {
    let agg_cfg = AggregatorToml::new(dir)
        .webhook(&receiver.url)
        .notify("retry_max = \"2s\"")
        .build();
    let agg = Aggregator::start(dir, &agg_cfg).await?;
    let agent = start_agent(
        dir,
        &AgentToml::new(dir, id, agg.grpc).watch(&dummy.name).build(),
    )?;
    agg.wait_reported(id).await?;
    Ok((agg, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_delivered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::scripted(vec![500, 503, 429]).await?;
    let mut dummy = Dummy::new(dir.path(), "r")?;
    dummy.start()?;
    let (agg, _agent) = start_pair(dir.path(), &receiver, "node-retry", &dummy).await?;
    dummy.kill();

    let check = format!("process:{}", dummy.name);
    receiver.wait_for("trigger", "node-retry", &check).await?;
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        4,
        "three refusals, then the delivery: {requests:?}"
    );
    let key = &requests[0].1["dedup_key"];
    assert!(
        requests.iter().all(|(_, v)| &v["dedup_key"] == key),
        "every retry is the same notification"
    );
    let gap = requests[3].0.duration_since(requests[2].0);
    assert!(
        gap >= Duration::from_millis(900),
        "Retry-After: 1 honoured, waited {gap:?}"
    );

    let list = agg.get("/api/v1/incidents").await?;
    let id = list["incidents"][0]["id"].clone();
    let detail = eventually("delivery recorded", PATIENCE, || async {
        let d = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        (d["notifications"][0]["status"] == "delivered").then_some(d)
    })
    .await?;
    assert_eq!(detail["notifications"][0]["attempts"], 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_rejection_is_recorded_and_not_retried() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::scripted(vec![400]).await?;
    let mut dummy = Dummy::new(dir.path(), "p")?;
    dummy.start()?;
    let (agg, _agent) = start_pair(dir.path(), &receiver, "node-reject", &dummy).await?;
    dummy.kill();

    let detail = eventually("failure recorded", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        let id = list["incidents"][0]["id"].as_i64()?;
        let d = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        (d["notifications"][0]["status"] == "failed").then_some(d)
    })
    .await?;
    let error = detail["notifications"][0]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("400") && error.contains("scripted 400"),
        "status and response body recorded: {error}"
    );
    assert!(
        detail["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["kind"] == "notify_failed"),
        "{detail}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests().len(), 1, "a 400 is not retried");
    Ok(())
}

/// `secret_file` on a generic webhook: every attempt (the refused one and its retry)
/// carries `X-Tocsin-Timestamp` and `X-Tocsin-Signature: sha256=HEX`, the HMAC-SHA256 of
/// `"<timestamp>.<body>"` with the trimmed file content, which the receiver verifies
/// over the body exactly as received. `print-config` shows the path, never the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_webhooks_sign_every_request_with_hmac_sha256() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secret_path = dir.path().join("hook.secret");
    std::fs::write(&secret_path, "  e2e-Signing-Secret\n")?;
    let receiver = WebhookReceiver::scripted(vec![503]).await?;
    let mut dummy = Dummy::new(dir.path(), "s")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(dir.path())
        .webhook(&receiver.url)
        .webhook_line(&format!("secret_file = \"{}\"", secret_path.display()))
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-signed", agg.grpc)
            .watch(&dummy.name)
            .build(),
    )?;
    agg.wait_reported("node-signed").await?;
    dummy.kill();
    receiver
        .wait_for("trigger", "node-signed", &format!("process:{}", dummy.name))
        .await?;

    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"e2e-Signing-Secret");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let requests = receiver.raw_requests();
    assert!(requests.len() >= 2, "the 503 and its retry: {requests:?}");
    for r in &requests {
        let timestamp = r
            .headers
            .get("x-tocsin-timestamp")
            .expect("timestamp header");
        let ts: u64 = timestamp.parse()?;
        assert!(
            now.abs_diff(ts) < 300,
            "a current Unix time in seconds: {ts}"
        );
        let hex = r
            .headers
            .get("x-tocsin-signature")
            .and_then(|s| s.strip_prefix("sha256="))
            .expect("signature header sha256=HEX");
        assert_eq!(hex.len(), 64, "{hex}");
        let tag: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()?;
        let signed = format!("{timestamp}.{}", r.body);
        assert!(
            ring::hmac::verify(&key, signed.as_bytes(), &tag).is_ok(),
            "signature verifies over the body as received: {r:?}"
        );
        let forged = format!("{timestamp}.{}", r.body.replace("trigger", "resolve"));
        assert!(ring::hmac::verify(&key, forged.as_bytes(), &tag).is_err());
        assert_eq!(
            r.headers.get("idempotency-key"),
            requests[0].headers.get("idempotency-key"),
            "a retry is the same notification"
        );
    }

    let out = std::process::Command::new(tocsin_e2e::bin("tocsin-aggregator"))
        .args([
            "--config",
            &dir.path().join("aggregator.toml").display().to_string(),
        ])
        .arg("print-config")
        .output()?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(printed.contains("secret_file"), "{printed}");
    assert!(!printed.contains("e2e-Signing-Secret"), "{printed}");
    Ok(())
}
