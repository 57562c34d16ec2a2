//! Identity and state: a lost agent state directory, two agents with one identity, two
//! daemons on one directory. Each used to lose pages silently.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, WebhookReceiver, bin, start_agent,
};

fn aggregator_config(dir: &Path, webhook: &str) -> String {
    AggregatorToml::new(dir).webhook(webhook).build()
}

fn agent_config(state: &Path, id: &str, grpc: std::net::SocketAddr, process: &str) -> String {
    AgentToml::new(state, id, grpc)
        .state_dir(state)
        .watch(process)
        .build()
}

/// Regression: after the agent's state directory was lost, the fresh spool's first
/// events were acked away as "already stored" before being renumbered, so the next
/// fault was never paged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_after_losing_the_agent_state_dir_is_still_paged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "s")?;
    dummy.start()?;
    let agg = Aggregator::start(dir.path(), &aggregator_config(dir.path(), &receiver.url)).await?;
    let state = dir.path().join("agent-state");
    let cfg = agent_config(&state, "node-lost", agg.grpc, &dummy.name);
    let mut agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-lost").await?;
    // Several state changes so the aggregator's sequence is ahead of a fresh spool.
    let check = format!("process:{}", dummy.name);
    for round in 1..=2 {
        dummy.kill();
        tocsin_e2e::eventually(
            "the trigger of this round",
            tocsin_e2e::PATIENCE,
            || async {
                (receiver.events("trigger", "node-lost", &check).len() >= round).then_some(())
            },
        )
        .await?;
        dummy.start()?;
        tocsin_e2e::eventually(
            "the resolve of this round",
            tocsin_e2e::PATIENCE,
            || async {
                (receiver.events("resolve", "node-lost", &check).len() >= round).then_some(())
            },
        )
        .await?;
    }
    agent.stop("TERM")?;
    std::fs::remove_dir_all(&state)?;
    let before = receiver.received().len();

    dummy.kill();
    let _agent = start_agent(dir.path(), &cfg)?;
    tocsin_e2e::eventually(
        "a new trigger after the state loss",
        tocsin_e2e::PATIENCE,
        || async {
            receiver.received()[before..]
                .iter()
                .find(|v| v["event"] == "trigger")
                .cloned()
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_identity_is_refused_and_the_first_keeps_paging() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "i")?;
    dummy.start()?;
    let mut agg =
        Aggregator::start(dir.path(), &aggregator_config(dir.path(), &receiver.url)).await?;
    let first_dir = dir.path().join("first");
    std::fs::create_dir_all(&first_dir)?;
    let _first = start_agent(
        &first_dir,
        &agent_config(&first_dir.join("state"), "node-twin", agg.grpc, &dummy.name),
    )?;
    agg.wait_reported("node-twin").await?;

    let twin_dir = dir.path().join("twin");
    std::fs::create_dir_all(&twin_dir)?;
    let mut twin = start_agent(
        &twin_dir,
        &agent_config(&twin_dir.join("state"), "node-twin", agg.grpc, "other"),
    )?;
    let out = twin.wait_for_output("refused this agent").await?;
    assert!(
        out.contains("already connected from another agent process"),
        "{out}"
    );
    agg.daemon
        .wait_for_output("second agent uses the identity")
        .await?;

    dummy.kill();
    let trigger = receiver
        .wait_for("trigger", "node-twin", &format!("process:{}", dummy.name))
        .await?;
    assert_eq!(trigger["incident"]["value"], 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_cannot_share_a_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let cfg = aggregator_config(dir.path(), &receiver.url);
    let _first = Aggregator::start(dir.path(), &cfg).await?;
    let path = dir.path().join("second.toml");
    std::fs::write(&path, &cfg)?;
    let out = Command::new(bin("tocsin-aggregator"))
        .args(["--config", path.to_str().context("utf-8")?])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another running tocsin-aggregator"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_stops_when_its_agent_cannot_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // A state directory that cannot be created (under /proc): valid as config, fatal at
    // run time, nothing the agent can repair by itself.
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(&agent_cfg, "state_dir = \"/proc/tocsin-e2e-nope/agent\"\n")?;
    let mut up = Daemon::spawn(
        "tocsin-up",
        &bin("tocsin"),
        &[
            "up",
            "--data-dir",
            data.to_str().context("utf-8")?,
            "--agent-config",
            agent_cfg.to_str().context("utf-8")?,
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ],
        dir.path(),
    )?;
    let out = up.wait_for_output("agent failed").await?;
    assert!(
        out.contains("/proc/tocsin-e2e-nope/agent"),
        "names the path: {out}"
    );
    let code = up.wait_exit().await?;
    assert_eq!(code, Some(1));
    Ok(())
}

/// A state directory that is a file is a config error (exit 64), caught before start.
#[test]
fn a_state_dir_that_is_a_file_is_a_config_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x")?;
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n", file.display()))?;
    let out = Command::new(bin("tocsin-agent"))
        .args(["--config", cfg.to_str().context("utf-8")?, "check-config"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("key `state_dir`") && stderr.contains("not a directory"),
        "{stderr}"
    );
    Ok(())
}
