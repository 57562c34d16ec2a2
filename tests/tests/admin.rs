//! The agent's own `/metrics` and `/health`: valid for Prometheus (checked with the real
//! `promtool`), and they tell whether the agent is connected and what it holds.

use std::process::Command;

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
         [aggregator]\nendpoints = [\"http://{}\"]\n[rules.cpu]\nenabled = false\n{}\
         [[process]]\nname = 'we\"ird\\ näme'\n",
        dir.path().join("agent").display(),
        agg.grpc,
        tocsin_e2e::QUIET_HOST_RULES
    );
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    let addr = admin_addr(&mut agent).await?;
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
    assert_eq!(health["spool"], "disk");

    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    for name in [
        "tocsin_spool_dropped_total",
        "tocsin_spool_events",
        "tocsin_events_total",
        "tocsin_ship_connected 1",
        "tocsin_check_value{check=\"memory\",unit=\"percent\"}",
        "tocsin_check_state{check=\"memory\",state=\"ok\"} 1",
        // Label values are escaped: a process name with a quote and a backslash.
        "tocsin_check_state{check=\"process:we\\\"ird\\\\ näme\",state=\"critical\"} 1",
    ] {
        assert!(body.contains(name), "{name} missing in:\n{body}");
    }
    tocsin_e2e::promtool_check(&body)?;
    Ok(())
}

/// `tocsin-agent check`: the quick diagnostic prints every check and exits with the worst
/// state (Nagios convention).
#[test]
fn the_quick_diagnostic_exits_with_the_worst_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut dummy = tocsin_e2e::Dummy::new(dir.path(), "q")?;
    dummy.start()?;
    let cfg = dir.path().join("agent.toml");
    let write = |watch: &str| -> Result<()> {
        std::fs::write(
            &cfg,
            format!(
                "state_dir = \"{}\"\n[rules.cpu]\nenabled = false\n[rules.memory]\nwarning = 99\ncritical = 99.9\n{}\
                 [[process]]\nname = \"{watch}\"\n",
                dir.path().join("s").display(),
                tocsin_e2e::QUIET_HOST_RULES
            ),
        )?;
        Ok(())
    };
    let run = |json: bool| -> Result<(Option<i32>, String)> {
        let mut args = vec!["--config", cfg.to_str().context("utf-8")?, "check"];
        if json {
            args.push("--json");
        }
        let out = Command::new(tocsin_e2e::bin("tocsin-agent"))
            .args(&args)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };

    write(&dummy.name)?;
    let (code, table) = run(false)?;
    assert_eq!(code, Some(0), "{table}");
    assert!(
        table.contains(&format!("process:{}", dummy.name)) && table.contains("memory"),
        "{table}"
    );

    dummy.kill();
    let (code, json) = run(true)?;
    assert_eq!(code, Some(2), "a missing process is critical: {json}");
    let rows: serde_json::Value = serde_json::from_str(&json)?;
    let row = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["check"] == format!("process:{}", dummy.name).as_str());
    let row = row.context("the process row")?;
    assert_eq!(row["state"], "critical");
    assert_eq!(row["value"], 0.0);
    Ok(())
}

/// The aggregator's `/metrics`: valid for promtool, and it counts what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_metrics_count_events_incidents_deliveries_and_refusals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = tocsin_e2e::WebhookReceiver::start().await?;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "node-m good-token\n")?;
    let token = dir.path().join("token");
    std::fs::write(&token, "good-token\n")?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[auth]\ntokens_file = \"{}\"\n\
         [notify]\nretry_min = \"100ms\"\n[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\n",
        dir.path().join("agg").display(),
        tokens.display(),
        receiver.url
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let mut dummy = tocsin_e2e::Dummy::new(dir.path(), "m")?;
    dummy.start()?;
    let agent_cfg = format!(
        "agent_id = \"node-m\"\ninterval = \"250ms\"\nadmin_listen = \"\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{}\"]\ntoken_file = \"{}\"\n[rules.cpu]\nenabled = false\n{}\
         [[process]]\nname = \"{}\"\n",
        dir.path().join("agent").display(),
        agg.grpc,
        token.display(),
        tocsin_e2e::QUIET_HOST_RULES,
        dummy.name
    );
    let _agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_reported("node-m").await?;
    dummy.kill();
    receiver
        .wait_for("trigger", "node-m", &format!("process:{}", dummy.name))
        .await?;
    // A stranger without a token.
    let stranger_dir = dir.path().join("stranger");
    std::fs::create_dir_all(&stranger_dir)?;
    let stranger_cfg = format!(
        "agent_id = \"intruder\"\nadmin_listen = \"\"\nstate_dir = \"{}\"\n[aggregator]\nendpoints = [\"http://{}\"]\n",
        stranger_dir.join("s").display(),
        agg.grpc
    );
    let mut stranger = start_agent(&stranger_dir, &stranger_cfg)?;
    stranger.wait_for_output("refused this agent").await?;

    let url = format!("http://{}/metrics", agg.http);
    let body = eventually("delivery counted", PATIENCE, || async {
        let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
        body.contains("tocsin_notify_attempts_total{channel=\"ops\",outcome=\"delivered\"} 1")
            .then_some(body)
    })
    .await?;
    for line in [
        "tocsin_ingest_refused_total{reason=\"token\"}",
        "tocsin_incidents_opened_total 1",
        "tocsin_ingest_agents_connected 1",
        "tocsin_ingest_events_stored_total",
    ] {
        assert!(body.contains(line), "{line} missing in:\n{body}");
    }
    tocsin_e2e::promtool_check(&body)?;
    Ok(())
}

/// Regression (review 2026-11-30): connections held open with half a request must not
/// take the agent's file descriptors (process discovery, the spool and the liveness file
/// need them). Beyond the admin endpoint's connection cap, new connections are closed.
#[tokio::test]
async fn regression_held_admin_connections_do_not_exhaust_the_agents_descriptors() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir()?;
    let agent_cfg = format!(
        "agent_id = \"node-fds\"\ninterval = \"250ms\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://127.0.0.1:9\"]\n[rules.cpu]\nenabled = false\n{}",
        dir.path().join("agent").display(),
        tocsin_e2e::QUIET_HOST_RULES
    );
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    let addr = admin_addr(&mut agent).await?;
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map(|d| d.count());
    let before = fds()?;
    let mut held = Vec::new();
    for _ in 0..300 {
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let _ = s.write_all(b"GET /metr").await;
        held.push(s);
    }
    // Let the agent accept (and close) everything it was sent.
    let settled = eventually(
        "the agent has accepted the held connections",
        PATIENCE,
        || async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let a = fds().ok()?;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let b = fds().ok()?;
            (a == b && a > before).then_some(b)
        },
    )
    .await?;
    assert!(
        settled <= before + 64 + 4,
        "{settled} descriptors with 300 held connections (was {before}): no cap"
    );
    drop(held);
    Ok(())
}

/// The agent's admin address (`host:port`), from its "admin listening" log line.
async fn admin_addr(agent: &mut tocsin_e2e::Daemon) -> Result<String> {
    let out = agent.wait_for_output("admin listening").await?;
    Ok(out
        .split("admin=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("admin address in the log")?
        .to_owned())
}
