//! The main job end to end: a real node fault becomes an incident and a delivered
//! notification. Real binaries, 127.0.0.1, port 0, a real HTTP webhook receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use tocsin_e2e::{Aggregator, Dummy, QUIET_HOST_RULES, WebhookReceiver, start_agent};

fn aggregator_config(dir: &std::path::Path, webhook: &str, grpc: &str) -> String {
    format!(
        r#"listen_http = "127.0.0.1:0"
listen_grpc = "{grpc}"
data_dir = "{data}"

[notify]
retry_min = "100ms"
retry_max = "1s"

[[notify.webhook]]
name = "test-receiver"
url = "{webhook}"
timeout = "5s"
"#,
        data = dir.join("aggregator-data").display(),
    )
}

/// An agent config with fast sampling, quick reconnects and only the rules a test asks
/// for (`rules` is appended verbatim).
fn agent_config(
    dir: &std::path::Path,
    agent_id: &str,
    grpc: std::net::SocketAddr,
    rules: &str,
) -> String {
    format!(
        r#"agent_id = "{agent_id}"
interval = "250ms"
heartbeat_interval = "1s"
state_dir = "{state}"

[labels]
service = "e2e"

[aggregator]
endpoints = ["http://{grpc}"]
connect_timeout = "1s"
backoff_min = "100ms"
backoff_max = "500ms"

{rules}
"#,
        state = dir.join("agent-state").display(),
    )
}

const NO_RESOURCE_RULES: &str = "[rules.cpu]\nenabled = false\n[rules.memory]\nenabled = false\n";

fn process_rules(name: &str) -> String {
    format!("{NO_RESOURCE_RULES}{QUIET_HOST_RULES}\n[[process]]\nname = \"{name}\"\nmin = 1\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_triggers_once_and_restart_resolves_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "k")?;
    dummy.start()?;
    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let _agent = start_agent(
        dir.path(),
        &agent_config(
            dir.path(),
            "node-kill",
            agg.grpc,
            &process_rules(&dummy.name),
        ),
    )?;
    agg.wait_connected("node-kill").await?;
    let check = format!("process:{}", dummy.name);
    agg.wait_reported("node-kill").await?;
    assert!(
        receiver.received().is_empty(),
        "nothing is wrong yet, nothing may page: {:?}",
        receiver.received()
    );

    dummy.kill();
    let trigger = receiver.wait_for("trigger", "node-kill", &check).await?;
    assert_eq!(trigger["incident"]["severity"], "P2");
    assert_eq!(trigger["incident"]["state"], "critical");
    assert_eq!(trigger["incident"]["value"], 0.0);
    assert_eq!(
        trigger["incident"]["labels"]["service"], "e2e",
        "node labels reach the incident"
    );
    assert!(
        trigger["dedup_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("tocsin-"))
    );

    dummy.start()?;
    let resolve = receiver.wait_for("resolve", "node-kill", &check).await?;
    assert_eq!(
        resolve["dedup_key"], trigger["dedup_key"],
        "resolve names the same incident"
    );

    // Let any duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.events("trigger", "node-kill", &check).len(),
        1,
        "{:?}",
        receiver.received()
    );
    assert_eq!(
        receiver.events("resolve", "node-kill", &check).len(),
        1,
        "{:?}",
        receiver.received()
    );

    let list = agg.get("/api/v1/incidents").await?;
    let incidents = list["incidents"].as_array().cloned().unwrap_or_default();
    assert_eq!(incidents.len(), 1, "{list}");
    let i = &incidents[0];
    assert_eq!(i["status"], "resolved");
    assert_eq!(i["node"], "node-kill");
    assert_eq!(i["check"], check.as_str());
    let (t, r) = (
        i["triggered_at_ms"].as_i64().unwrap_or(0),
        i["resolved_at_ms"].as_i64().unwrap_or(0),
    );
    assert!(t > 0 && r >= t, "both timestamps, in order: {i}");
    assert!(
        i["triggered_at"].is_string() && i["resolved_at"].is_string(),
        "{i}"
    );

    let detail = agg.get(&format!("/api/v1/incidents/{}", i["id"])).await?;
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"triggered") && kinds.contains(&"resolved"),
        "{kinds:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_load_triggers_and_its_end_resolves() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let rules = r#"[rules.memory]
enabled = false
[rules.cpu]
warning = 75
critical = 85
clear = 60
for = "0s"
"#
    .to_owned()
        + QUIET_HOST_RULES;
    let _agent = start_agent(
        dir.path(),
        &agent_config(dir.path(), "node-cpu", agg.grpc, &rules),
    )?;
    agg.wait_connected("node-cpu").await?;
    agg.wait_reported("node-cpu").await?;

    // Burn every core from this process.
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                x
            })
        })
        .collect();
    let trigger = receiver.wait_for("trigger", "node-cpu", "cpu").await;
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    let trigger = trigger?;
    assert!(
        trigger["incident"]["value"].as_f64().unwrap_or(0.0) > 75.0,
        "{trigger}"
    );
    assert_eq!(trigger["incident"]["unit"], "percent");

    let resolve = receiver.wait_for("resolve", "node-cpu", "cpu").await?;
    assert_eq!(resolve["dedup_key"], trigger["dedup_key"]);
    assert!(
        resolve["incident"]["value"].as_f64().unwrap_or(100.0) <= 60.0,
        "{resolve}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_while_aggregator_down_is_delivered_after_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "d")?;
    dummy.start()?;
    let mut agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, "127.0.0.1:0"),
    )
    .await?;
    let grpc = agg.grpc;
    let _agent = start_agent(
        dir.path(),
        &agent_config(dir.path(), "node-down", grpc, &process_rules(&dummy.name)),
    )?;
    agg.wait_connected("node-down").await?;
    let check = format!("process:{}", dummy.name);
    agg.wait_reported("node-down").await?;

    // The aggregator dies hard; the fault happens while nobody listens.
    agg.daemon.stop("KILL")?;
    dummy.kill();
    // Give the agent time to detect the fault and spool it while disconnected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.events("trigger", "node-down", &check).is_empty());

    let agg = Aggregator::start(
        dir.path(),
        &aggregator_config(dir.path(), &receiver.url, &grpc.to_string()),
    )
    .await?;
    assert_eq!(agg.grpc, grpc, "restarted on the same address");
    let trigger = receiver.wait_for("trigger", "node-down", &check).await?;
    assert_eq!(trigger["incident"]["value"], 0.0);
    let list = agg.get("/api/v1/incidents?status=open").await?;
    assert_eq!(
        list["incidents"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    Ok(())
}
