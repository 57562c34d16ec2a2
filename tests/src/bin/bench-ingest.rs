//! Aggregator ingest benchmark: N simulated agents stream events over loopback gRPC to a
//! real `tocsin-aggregator` (the binary next to this one: build with `--release`), as
//! fast as acks allow with 8 batches of 50 in flight each. Prints durable events/s, ack
//! latency p50/p99 and the aggregator's peak RSS, next to the same rows inserted straight
//! into SQLite in this process (same batch size, WAL, one transaction per batch) as the
//! in-run peer.
//!
//! Usage: `cargo build --release --bins && target/release/bench-ingest [AGENTS,..] [EVENTS_PER_AGENT] [--tsv]`
//! (defaults `1,10,100` and `2000`). With `--tsv` stdout gets only the issue-9 rows
//! (`ingest_rate` and `ingest_ack_p99`, no peer; scenario `ingest`, or `ingest_N` for N
//! agents when several counts are given; see `bench/side-by-side.sh`) and the table goes
//! to stderr. Loopback only; bounded; stops what it starts.

use std::time::{Duration, Instant};

use anyhow::Result;
use tocsin_e2e::measure::{Spread, take_flag, tsv_row};
use tocsin_e2e::sim::{SimAgent, percentile};
use tocsin_e2e::{Aggregator, eventually};

fn rss_peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Inserts `n` event rows in batches of 50 into a fresh SQLite file: the floor cost of
/// durable storage with the aggregator's own pragmas, without network or correlation.
fn sqlite_peer(dir: &std::path::Path, n: u64) -> Result<f64> {
    let conn = rusqlite::Connection::open(dir.join("peer.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE events (agent_id TEXT, seq INTEGER, body TEXT, PRIMARY KEY (agent_id, seq)) WITHOUT ROWID;",
    )?;
    let start = Instant::now();
    let mut conn = conn;
    let mut seq = 0;
    while seq < n {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO events VALUES ('peer', ?1, ?2)")?;
            for _ in 0..50 {
                seq += 1;
                st.execute(rusqlite::params![
                    seq as i64,
                    format!("simulated event {seq}")
                ])?;
            }
        }
        tx.commit()?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tsv = take_flag(&mut args, "--tsv");
    let (fleet, per_agent) =
        tocsin_e2e::sim::bench_args_from(args, "1,10,100", 2000, "EVENTS_PER_AGENT")?;
    let mut rows = String::new();

    let mut out = String::from(
        "| agents | events | seconds | durable events/s | ack p50 ms | ack p99 ms | aggregator peak RSS MiB | SQLite-only peer events/s | tocsin / peer |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &agents in &fleet {
        let dir = tempfile::tempdir()?;
        let cfg = format!(
            "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("agg").display()
        );
        let agg = Aggregator::start(
            dir.path(),
            &cfg.replace("level = \"warn\"", "level = \"info\""),
        )
        .await?;
        let endpoint = format!("http://{}", agg.grpc);
        let deadline = Instant::now() + Duration::from_secs(300);
        let start = Instant::now();
        let runs: Vec<_> = (0..agents)
            .map(|i| {
                let sim = SimAgent {
                    id: format!("bench-{i}"),
                    endpoint: endpoint.clone(),
                    total: per_agent,
                    batch: 50,
                    rate_per_s: None,
                    window: 8,
                };
                tokio::spawn(sim.run(deadline))
            })
            .collect();
        let mut latencies = Vec::new();
        for r in runs {
            let report = r.await??;
            latencies.extend(report.ack_latencies_us);
        }
        let secs = start.elapsed().as_secs_f64();
        let total = per_agent * agents as u64;
        // Durable means acked, which the aggregator does only after the commit; check the
        // store agrees before reporting.
        eventually("all events stored", Duration::from_secs(30), || async {
            let nodes = agg.get("/api/v1/nodes").await.ok()?;
            let stored: u64 = nodes["nodes"]
                .as_array()?
                .iter()
                .filter_map(|n| n["events_stored"].as_u64())
                .sum();
            (stored == total).then_some(())
        })
        .await?;
        let rss = rss_peak_mib(agg.daemon.pid());
        let peer = sqlite_peer(dir.path(), total)?;
        let rate = total as f64 / secs;
        let p99_ms = percentile(&mut latencies, 99.0) as f64 / 1000.0;
        out.push_str(&format!(
            "| {agents} | {total} | {secs:.2} | {rate:.0} | {:.1} | {p99_ms:.1} | {rss:.1} | {peer:.0} | {:.2} |\n",
            percentile(&mut latencies, 50.0) as f64 / 1000.0,
            rate / peer,
        ));
        let scenario = if fleet.len() == 1 {
            "ingest".to_owned()
        } else {
            format!("ingest_{agents}")
        };
        let one = |x: f64| Spread::of(&[x]);
        rows.push_str(&tsv_row(
            &scenario,
            "ingest_rate",
            "events/s",
            &one(rate),
            None,
            ">= 100000 events/s",
        ));
        rows.push_str(&tsv_row(
            &scenario,
            "ingest_ack_p99",
            "ms",
            &one(p99_ms),
            None,
            "-",
        ));
    }
    use std::io::Write;
    if tsv {
        std::io::stderr().write_all(out.as_bytes())?;
        std::io::stdout().write_all(rows.as_bytes())?;
    } else {
        std::io::stdout().write_all(out.as_bytes())?;
    }
    Ok(())
}
