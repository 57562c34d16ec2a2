//! A frozen aggregator (SIGSTOP): the agent notices within its keepalive bound, keeps the
//! fault spooled, and delivers it after SIGCONT.

use std::process::Command;

use anyhow::Result;
use tocsin_e2e::{Aggregator, Dummy, WebhookReceiver, start_agent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_aggregator_is_detected_and_the_fault_delivered_after_it_thaws() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "z")?;
    dummy.start()?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nkeepalive = \"1s\"\n\
         [notify]\nretry_min = \"100ms\"\n[[notify.webhook]]\nname = \"t\"\nurl = \"{}\"\n",
        dir.path().join("agg").display(),
        receiver.url
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = format!(
        "agent_id = \"node-frozen\"\ninterval = \"250ms\"\nheartbeat_interval = \"500ms\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{}\"]\nkeepalive = \"1s\"\nconnect_timeout = \"1s\"\n\
         backoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n\
         [rules.cpu]\nenabled = false\n[rules.memory]\nenabled = false\n[[process]]\nname = \"{}\"\n",
        dir.path().join("agent").display(),
        agg.grpc,
        dummy.name
    );
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_reported("node-frozen").await?;

    let pid = agg.daemon.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()?
            .success()
    );
    let thaw = Thaw(pid.clone());
    dummy.kill();
    // keepalive 1s: the dead stream is noticed within about 2s.
    agent
        .wait_for_output("aggregator unreachable, events stay spooled")
        .await?;
    assert!(
        receiver.received().is_empty(),
        "nothing can be delivered while frozen"
    );

    drop(thaw); // SIGCONT
    let trigger = receiver
        .wait_for("trigger", "node-frozen", &format!("process:{}", dummy.name))
        .await?;
    assert_eq!(trigger["incident"]["value"], 0.0);
    Ok(())
}

/// Sends SIGCONT when dropped, so a failing test never leaves a stopped process behind.
struct Thaw(String);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}
