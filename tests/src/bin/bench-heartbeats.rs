//! Many connected agents, heartbeats only: the aggregator's CPU and memory with N agents
//! each sending the state of 4 checks every 10 s (nothing changes). Baseline row: the
//! same aggregator with no agent, measured in the same run.
//!
//! Usage: `cargo build --release --bins && target/release/bench-heartbeats [AGENTS,..] [SECONDS]`
//! (defaults `0,1000,10000` and `60`). Loopback only; bounded; stops what it starts.

use std::time::{Duration, Instant};

use anyhow::Result;
use tocsin_e2e::Aggregator;
use tocsin_e2e::measure::{cpu_seconds, rss_mib};
use tocsin_e2e::sim::heartbeat_only;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    let (fleets, seconds) = tocsin_e2e::sim::bench_args("0,1000,10000", 60, "SECONDS")?;
    let interval = Duration::from_secs(10);
    let mut out = String::from(
        "| agents | heartbeats/s | aggregator CPU % of one core | RSS MiB | peak RSS MiB | connect s |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for &agents in &fleets {
        let dir = tempfile::tempdir()?;
        let cfg = format!(
            "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nnode_timeout = \"60s\"\n[log]\nlevel = \"warn,tocsin_aggregator=info\"\n",
            dir.path().join("agg").display()
        );
        let agg = Aggregator::start(dir.path(), &cfg).await?;
        let endpoint = format!("http://{}", agg.grpc);
        let connect_start = Instant::now();
        let until = Instant::now() + Duration::from_secs(seconds) + Duration::from_secs(120);
        let mut tasks = Vec::with_capacity(agents);
        for i in 0..agents {
            tasks.push(tokio::spawn(heartbeat_only(
                endpoint.clone(),
                format!("hb-{i:05}"),
                interval,
                until,
            )));
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(20)).await; // no SYN flood
            }
        }
        // Wait until every agent is connected.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let nodes = agg.get("/api/v1/nodes").await?;
            let n = nodes["nodes"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|n| n["connected"] == true).count());
            if n >= agents || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let connect = connect_start.elapsed().as_secs_f64();
        // Settle one interval, then measure.
        tokio::time::sleep(interval).await;
        let pid = agg.daemon.pid();
        let (c0, t0) = (cpu_seconds(pid), Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let cpu = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
        out.push_str(&format!(
            "| {agents} | {:.0} | {cpu:.2} | {:.1} | {:.1} | {connect:.1} |\n",
            agents as f64 / interval.as_secs_f64(),
            rss_mib(pid, "VmRSS:"),
            rss_mib(pid, "VmHWM:"),
        ));
        for t in tasks {
            t.abort();
        }
        drop(agg);
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
