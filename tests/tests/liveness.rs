//! Node liveness: a silent agent becomes a `node_down` incident, and its return resolves
//! it; an aggregator restart does not flag every node at once.

use std::time::Duration;

use anyhow::Result;
use tocsin_e2e::{AgentToml, Aggregator, AggregatorToml, WebhookReceiver, start_agent};

fn aggregator_config(dir: &std::path::Path, webhook: &str, grpc: &str) -> String {
    AggregatorToml::new(dir)
        .grpc(grpc)
        .set("node_timeout = \"2s\"")
        .webhook(webhook)
        .build()
}

fn agent_config(dir: &std::path::Path, id: &str, grpc: std::net::SocketAddr) -> String {
    AgentToml::new(dir, id, grpc).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_becomes_node_down_and_its_return_resolves_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let cfg = agent_config(dir.path(), "node-gone", agg.grpc);
    let mut agent = start_agent(dir.path(), &cfg)?;
    agg.wait_connected("node-gone").await?;
    assert!(receiver.received().is_empty());

    agent.stop("KILL")?;
    let trigger = receiver
        .wait_for("trigger", "node-gone", "node_down")
        .await?;
    assert_eq!(trigger["incident"]["state"], "critical");
    assert!(
        trigger["incident"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("silent")),
        "{trigger}"
    );

    let _agent = start_agent(dir.path(), &cfg)?;
    let resolve = receiver
        .wait_for("resolve", "node-gone", "node_down")
        .await?;
    assert_eq!(resolve["dedup_key"], trigger["dedup_key"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_restart_does_not_flag_nodes_that_come_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let grpc = agg.grpc;
    let _agent = start_agent(dir.path(), &agent_config(dir.path(), "node-stays", grpc))?;
    agg.wait_connected("node-stays").await?;

    agg.daemon.stop("KILL")?;
    // Longer than node_timeout: by last_seen alone the node would look down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, &grpc.to_string()),
    )
    .await?;
    agg.wait_connected("node-stays").await?;
    // Two more timeouts with the node talking: still nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        receiver
            .events("trigger", "node-stays", "node_down")
            .is_empty(),
        "{:?}",
        receiver.received()
    );
    Ok(())
}

/// Regression: a frozen aggregator (SIGSTOP longer than node_timeout) paged node_down
/// for every node when it thawed, though the silence was its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_aggregator_does_not_page_node_down_when_it_thaws() -> Result<()> {
    use std::process::Command;

    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let _agent = start_agent(dir.path(), &agent_config(dir.path(), "node-thaw", agg.grpc))?;
    agg.wait_connected("node-thaw").await?;
    let pid = agg.daemon.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()?
            .success()
    );
    tokio::time::sleep(Duration::from_secs(4)).await; // twice node_timeout
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()?
            .success()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        receiver
            .events("trigger", "node-thaw", "node_down")
            .is_empty(),
        "{:?}",
        receiver.received()
    );
    Ok(())
}
