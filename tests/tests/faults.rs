//! A frozen aggregator (SIGSTOP): the agent notices within its keepalive bound, keeps the
//! fault spooled, and delivers it after SIGCONT.

use std::process::Command;

use anyhow::Result;
use tocsin_e2e::{AgentToml, Aggregator, AggregatorToml, Dummy, WebhookReceiver, start_agent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_aggregator_is_detected_and_the_fault_delivered_after_it_thaws() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "z")?;
    dummy.start()?;
    let agg_cfg = AggregatorToml::new(dir.path())
        .set("keepalive = \"1s\"")
        .webhook(&receiver.url)
        .build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = AgentToml::new(dir.path(), "node-frozen", agg.grpc)
        .link("keepalive = \"1s\"")
        .link("connect_timeout = \"1s\"")
        .watch(&dummy.name)
        .build();
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

/// kill -9 of the aggregator in the middle of a 1 000 events/s stream, then a restart on
/// the same address: every event is stored exactly once (the simulated agent resends
/// from the Welcome sequence; duplicates are dropped by (agent, seq)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_stores_every_event_exactly_once() -> Result<()> {
    use std::time::{Duration, Instant};

    use tocsin_e2e::sim::SimAgent;

    let dir = tempfile::tempdir()?;
    let cfg = |grpc: &str| AggregatorToml::new(dir.path()).grpc(grpc).build();
    let mut agg = Aggregator::start(dir.path(), &cfg("127.0.0.1:0")).await?;
    let grpc = agg.grpc;
    let total = 5_000;
    let sim = SimAgent {
        id: "sim-kill".into(),
        endpoint: format!("http://{grpc}"),
        total,
        batch: 50,
        rate_per_s: Some(1000.0),
        window: 8,
    };
    let run = tokio::spawn(sim.run(Instant::now() + Duration::from_secs(60)));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    agg.daemon.stop("KILL")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agg = Aggregator::start(dir.path(), &cfg(&grpc.to_string())).await?;

    let report = run.await??;
    assert_eq!(report.acked, total);
    assert!(
        report.connections >= 2,
        "the kill broke the stream: {report:?}"
    );
    let nodes = agg.get("/api/v1/nodes").await?;
    let node = &nodes["nodes"][0];
    assert_eq!(node["agent_id"], "sim-kill");
    assert_eq!(node["last_seq"], total);
    assert_eq!(
        node["events_stored"], total,
        "each event stored exactly once: {node}"
    );
    Ok(())
}

/// The first endpoint is dead: the agent fails over to the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_to_the_next_endpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?; // closed again at once
    let agg_cfg = AggregatorToml::new(dir.path()).build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let agent_cfg = AgentToml::new(dir.path(), "node-failover", agg.grpc)
        .endpoints(&[format!("http://{dead}"), format!("http://{}", agg.grpc)])
        .build();
    let _agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_connected("node-failover").await?;
    Ok(())
}

/// Garbage on the gRPC port neither crashes nor stalls the aggregator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_is_harmless() -> Result<()> {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir()?;
    let agg_cfg = AggregatorToml::new(dir.path()).build();
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let mut noise: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    noise.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(agg.grpc).await?;
        let _ = s.write_all(&noise).await;
        idle.push(tokio::net::TcpStream::connect(agg.grpc).await?); // and connections that say nothing
    }
    let health = agg.get("/health").await?;
    assert_eq!(health["status"], "ok");
    let agent_cfg = AgentToml::new(dir.path(), "node-after-noise", agg.grpc).build();
    let _agent = start_agent(dir.path(), &agent_cfg)?;
    agg.wait_connected("node-after-noise").await?;
    drop(idle);
    Ok(())
}

/// The agent starts first, while nothing listens: it keeps collecting, and the fault it
/// saw in the meantime is delivered once the aggregator comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_the_aggregator_delivers_what_it_saw() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "e")?;
    dummy.start()?;
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?; // free again at once
    let agent_cfg = AgentToml::new(dir.path(), "node-early", grpc)
        .watch(&dummy.name)
        .build();
    let mut agent = start_agent(dir.path(), &agent_cfg)?;
    agent.wait_for_output("aggregator unreachable").await?;
    dummy.kill();
    agent.wait_for_output("critical").await?;

    let agg_cfg = AggregatorToml::new(dir.path())
        .grpc(grpc)
        .webhook(&receiver.url)
        .build();
    let _agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let trigger = receiver
        .wait_for("trigger", "node-early", &format!("process:{}", dummy.name))
        .await?;
    assert_eq!(trigger["incident"]["value"], 0.0);
    Ok(())
}
