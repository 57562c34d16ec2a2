//! A full disk under the agent's spool: the agent keeps the newest state in memory, the
//! page still goes out (heartbeat reconciliation), and once space returns the held events
//! are committed without a restart. Uses a 2 MiB tmpfs (the tests run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tocsin_e2e::{AgentToml, Aggregator, AggregatorToml, Dummy, WebhookReceiver, start_agent};

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(path)
            .status()?;
        if !status.success() {
            bail!(
                "mount tmpfs on {} failed (the tests need root)",
                path.display()
            );
        }
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    /// Fills the disk with one file; returns its path.
    fn fill(&self) -> Result<PathBuf> {
        let filler = self.path.join("filler");
        // dd stops with "No space left on device", which is the point.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()?;
        Ok(filler)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_spool_still_pages_and_recovers_without_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::mount(&dir.path().join("disk"))?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "f")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(dir.path())
        .webhook(&receiver.url)
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = AgentToml::new(dir.path(), "node-full", agg.grpc)
        .state_dir(&disk.path.join("state"))
        .watch(&dummy.name)
        .build();
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_reported("node-full").await?;

    let filler = disk.fill()?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let trigger = receiver.wait_for("trigger", "node-full", &check).await?;
    assert_eq!(trigger["incident"]["state"], "critical");
    agent.wait_for_output("cannot write the spool").await?;

    std::fs::remove_file(&filler).context("free the disk")?;
    dummy.start()?;
    receiver.wait_for("resolve", "node-full", &check).await?;
    agent.wait_for_output("spool writable again").await?;
    assert_eq!(receiver.events("trigger", "node-full", &check).len(), 1);
    Ok(())
}

/// An agent (re)started on a full disk: acknowledged events cannot be deleted from the
/// spool, which must not cut the node off — the stream stays up (no reconnect loop), a
/// new fault still pages, and heartbeats keep the node alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_on_a_full_disk_keeps_its_stream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::mount(&dir.path().join("disk"))?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "g")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(dir.path())
        .webhook(&receiver.url)
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = AgentToml::new(dir.path(), "node-refull", agg.grpc)
        .state_dir(&disk.path.join("state"))
        .watch(&dummy.name)
        .build();
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_reported("node-refull").await?;
    assert_eq!(agent.stop("TERM")?, Some(0));

    let _filler = disk.fill()?;
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agent.wait_for_output("connected to aggregator").await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let trigger = receiver.wait_for("trigger", "node-refull", &check).await?;
    assert_eq!(trigger["incident"]["state"], "critical");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let log = agent.output();
    // The log file holds both runs: one stream each, no reconnect loop.
    assert_eq!(
        log.matches("connected to aggregator").count(),
        2,
        "one stream per run, no reconnect loop:\n{log}"
    );
    Ok(())
}

/// An agent started on a disk so full that its spool cannot even be created: it keeps
/// monitoring and paging with a spool in memory, and says so on `/health` ("degraded",
/// spool "memory") and in `tocsin_spool_durable 0`, not only in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_usable_spool_pages_and_reports_degraded_health() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::mount(&dir.path().join("disk"))?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "m")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(dir.path())
        .webhook(&receiver.url)
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let state = disk.path.join("state");
    std::fs::create_dir_all(&state)?;
    let _filler = disk.fill()?;
    let agent_cfg = AgentToml::new(dir.path(), "node-nospool", agg.grpc)
        .state_dir(&state)
        .set("admin_listen = \"127.0.0.1:0\"")
        .watch(&dummy.name)
        .build();
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    let out = agent.wait_for_output("admin listening").await?;
    assert!(
        out.contains("keeping events in memory"),
        "the fallback is logged:\n{out}"
    );
    let addr = out
        .split("admin=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("admin address in the log")?
        .to_owned();
    let health: serde_json::Value = reqwest::get(format!("http://{addr}/health"))
        .await?
        .json()
        .await?;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["spool"], "memory", "{health}");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    assert!(metrics.contains("tocsin_spool_durable 0"), "{metrics}");
    agg.wait_reported("node-nospool").await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let trigger = receiver.wait_for("trigger", "node-nospool", &check).await?;
    assert_eq!(trigger["incident"]["state"], "critical");
    Ok(())
}

/// The aggregator's disk fills up: it stops acking (nothing it acked is lost, nothing is
/// dropped), the agent keeps the events spooled, and everything arrives once space
/// returns — without restarting either daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_aggregator_delays_but_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::mount(&dir.path().join("disk"))?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "g")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(&disk.path)
        .webhook(&receiver.url)
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = AgentToml::new(dir.path(), "node-aggfull", agg.grpc)
        .watch(&dummy.name)
        .build();
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_reported("node-aggfull").await?;

    let filler = disk.fill()?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let mut agg_daemon = agg.daemon;
    agg_daemon.wait_for_output("not acking").await?;
    agent.wait_for_output("events stay spooled").await?;

    std::fs::remove_file(&filler).context("free the disk")?;
    let trigger = receiver.wait_for("trigger", "node-aggfull", &check).await?;
    assert_eq!(trigger["incident"]["value"], 0.0);
    Ok(())
}
