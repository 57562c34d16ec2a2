//! Notification delivery against a real HTTP receiver that misbehaves: transient errors
//! are retried (honouring Retry-After) until delivered; a permanent 4xx is recorded on the
//! incident and not retried.

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
