//! The agent's own `/metrics` and `/health`: valid for Prometheus (checked with the real
//! `promtool`), and they tell whether the agent is connected and what it holds.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use tocsin_e2e::{Aggregator, PATIENCE, eventually, start_agent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_pass_promtool_and_health_reports_the_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        dir.path().join("agg").display()
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = format!(
        "agent_id = \"node-metrics\"\ninterval = \"250ms\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{}\"]\n[rules.cpu]\nenabled = false\n",
        dir.path().join("agent").display(),
        agg.grpc
    );
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    let out = agent.wait_for_output("admin listening").await?;
    let addr = out
        .split("admin=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("admin address in the log")?
        .to_owned();
    agg.wait_reported("node-metrics").await?;

    let health: serde_json::Value = eventually("health says connected", PATIENCE, || async {
        let h: serde_json::Value = reqwest::get(format!("http://{addr}/health"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (h["connected"] == true).then_some(h)
    })
    .await?;
    assert_eq!(health["status"], "ok");

    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    for name in [
        "tocsin_spool_dropped_total",
        "tocsin_spool_events",
        "tocsin_events_total",
        "tocsin_ship_connected 1",
    ] {
        assert!(body.contains(name), "{name} missing in:\n{body}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) must be installed: tests/run.sh does it")?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(body.as_bytes())?;
    let result = promtool.wait_with_output()?;
    assert!(
        result.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(())
}
