//! `tocsin up`, the README's run command: one process with an aggregator and a local
//! agent, notifications on the console and to a webhook.

use anyhow::{Context, Result};
use tocsin_e2e::{Daemon, Dummy, PATIENCE, WebhookReceiver, bin, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_main_job_in_one_command() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "u")?;
    dummy.start()?;
    let data = dir.path().join("data");
    let mut up = Daemon::spawn(
        "tocsin-up",
        &bin("tocsin"),
        &[
            "up",
            "--data-dir",
            data.to_str().context("utf-8")?,
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--watch",
            &dummy.name,
            "--webhook",
            &receiver.url,
        ],
        dir.path(),
    )?;
    let out = up.wait_for_output("tocsin up: API http://").await?;
    let api = out
        .split("tocsin up: API ")
        .nth(1)
        .and_then(|s| s.split("/api/v1/incidents").next())
        .context("API address printed")?
        .to_owned();
    let check = format!("process:{}", dummy.name);
    up.wait_for_output(&format!("{check} ok")).await?;

    dummy.kill();
    let trigger = eventually("a trigger at the webhook", PATIENCE, || async {
        receiver
            .received()
            .into_iter()
            .find(|v| v["event"] == "trigger" && v["incident"]["check"] == check.as_str())
    })
    .await?;
    assert_eq!(trigger["incident"]["severity"], "P2");
    assert_eq!(
        trigger["incident"]["node"],
        hostname().as_str(),
        "agent_id defaults to the hostname"
    );
    up.wait_for_output("[tocsin] TRIGGER P2").await?;

    let body: serde_json::Value = reqwest::get(format!("{api}/api/v1/incidents?status=open"))
        .await?
        .json()
        .await?;
    // The default rules run too (a nearly full build disk may open `disk:/`): look for
    // the killed process among the open incidents.
    assert!(
        body["incidents"]
            .as_array()
            .is_some_and(|all| all.iter().any(|i| i["check"] == check.as_str())),
        "{body}"
    );

    // The CLI reads the same API.
    let cli = std::process::Command::new(bin("tocsin"))
        .args(["--api", &api, "incidents", "--status", "open"])
        .output()?;
    assert!(cli.status.success());
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(
        table.contains(&check) && table.contains("triggered"),
        "{table}"
    );

    assert_eq!(up.stop("TERM")?, Some(0), "SIGTERM drains and exits 0");
    assert!(data.join("aggregator/tocsin.db").exists() && data.join("agent/spool.db").exists());
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
