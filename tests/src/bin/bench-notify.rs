//! Ingest-to-page benchmark: N firing fingerprints, each its own incident and page, from
//! the event leaving a simulated agent to the trigger arriving at a generic webhook.
//!
//! Simulated nodes (`tocsin_e2e::scripted`, real gRPC, spread over up to NODES nodes)
//! connect to a real `tocsin-aggregator` (the binary next to this one: build with
//! `--release`), then all at once send one event batch each (as the real agent does: one
//! batch of up to 512 events) turning N distinct checks critical. `[correlation]
//! group_by = ["node", "check"]`, so every fingerprint (`node/check`) opens its own
//! incident and pages once. An HTTP receiver in this process records the instant each
//! trigger arrives, by the payload's `incident.fingerprint`. Per fingerprint it reports
//! send → delivered (the batch handed to the gRPC stream → the webhook request read: an
//! upper bound of ingest → delivered, since on loopback the aggregator receives the batch
//! within the send unless it queues) and ack → delivered (the aggregator acks after the
//! commit that also writes the outbox row, so this is the notification path alone), the
//! throughput (N / first send → last page), and as the floor the same number of bare
//! HTTP POSTs of a real payload from this process to the same receiver, one after the
//! other like the per-channel dispatcher.
//!
//! Usage: `cargo build --release --bins && target/release/bench-notify [FINGERPRINTS,..] [RUNS] [NODES]`
//! (defaults `1,100,10000`, `3` and `100`; every figure is the median of the runs, each
//! with a fresh aggregator and store). Loopback only; bounded (a run gives up after
//! 120 s); stops every process it starts, by PID.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;
use tocsin_e2e::Aggregator;
use tocsin_e2e::measure::median;
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::sim::percentile;

/// A run that has not seen every page after this long fails.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// What the in-process webhook receiver saw.
#[derive(Debug, Default)]
struct Seen {
    /// First arrival of a trigger, by `incident.fingerprint`.
    triggers: HashMap<String, Instant>,
    /// Triggers for a fingerprint that had one already (should stay 0).
    duplicates: usize,
    /// Other requests (resolves, anything unexpected).
    other: usize,
    /// One trigger body as sent, for the HTTP floor.
    sample: Option<String>,
}

/// A real HTTP receiver on 127.0.0.1: `POST /hook` records trigger arrivals, `POST
/// /floor` only parses the body (the bare round trip).
#[derive(Debug, Clone)]
struct Receiver {
    base: String,
    seen: Arc<Mutex<Seen>>,
    triggers: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> Result<Self> {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let triggers: Arc<AtomicUsize> = Arc::default();
        let (s, t) = (seen.clone(), triggers.clone());
        let app = axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(move |body: String| {
                    let (seen, count) = (s.clone(), t.clone());
                    async move {
                        let at = Instant::now();
                        let v: Value = serde_json::from_str(&body).unwrap_or_default();
                        let mut seen = seen.lock().expect("receiver lock");
                        match (v["event"].as_str(), v["incident"]["fingerprint"].as_str()) {
                            (Some("trigger"), Some(fp)) => {
                                if seen.triggers.insert(fp.to_owned(), at).is_some() {
                                    seen.duplicates += 1;
                                } else {
                                    count.fetch_add(1, Ordering::SeqCst);
                                }
                                if seen.sample.is_none() {
                                    seen.sample = Some(body);
                                }
                            }
                            _ => seen.other += 1,
                        }
                        "ok"
                    }
                }),
            )
            .route(
                "/floor",
                axum::routing::post(|body: String| async move {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    if v["event"].is_string() { "ok" } else { "?" }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            base,
            seen,
            triggers,
        })
    }
}

/// Figures of one run, milliseconds unless named otherwise.
#[derive(Debug, Clone, Copy)]
struct RunFigures {
    send_p50: f64,
    send_p99: f64,
    send_max: f64,
    ack_p50: f64,
    ack_p99: f64,
    per_s: f64,
    floor_p50: f64,
    floor_p99: f64,
    floor_per_s: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn us_between(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

/// One run: a fresh aggregator, `fingerprints` checks over `nodes` nodes fire at once.
async fn run(fingerprints: usize, nodes: usize) -> Result<RunFigures> {
    let dir = tempfile::tempdir()?;
    let receiver = Receiver::start().await?;
    // group_by node+check: one incident, one page per fingerprint. retry_min low so a
    // refused request would not hide for a second (none is expected).
    // storm_budget = 0: the storm guard would fold all but the first pages into one
    // summary.
    let cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         node_timeout = \"10m\"\n\
         [notify]\nretry_min = \"100ms\"\nstorm_budget = 0\n\
         [[notify.webhook]]\nname = \"bench\"\nkind = \"generic\"\nurl = \"{}/hook\"\ntimeout = \"10s\"\n\
         [correlation]\ngroup_by = [\"node\", \"check\"]\n",
        dir.path().join("agg").display(),
        receiver.base
    );
    let mut agg = Aggregator::start(dir.path(), &cfg).await?;
    let endpoint = format!("http://{}", agg.grpc);

    // Fingerprint i is check `bench:{i / nodes}` on node `i % nodes`.
    let nodes = nodes.clamp(1, fingerprints.max(1));
    let mut connected = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let mut node = ScriptedNode::connect(
            &endpoint,
            &format!("bench-{n:03}"),
            &[],
            Duration::from_secs(5),
        )
        .await?;
        node.heartbeats(Duration::from_secs(5));
        connected.push(node);
    }
    let start = Arc::new(tokio::sync::Barrier::new(nodes + 1));
    let mut tasks = Vec::with_capacity(nodes);
    for (n, mut node) in connected.into_iter().enumerate() {
        let checks: Vec<String> = (n..fingerprints)
            .step_by(nodes)
            .map(|i| format!("bench:{}", i / nodes))
            .collect();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let changes: Vec<(&str, &str)> =
                checks.iter().map(|c| (c.as_str(), "critical")).collect();
            let sent = Instant::now();
            node.send(&changes).await?;
            let acked = Instant::now();
            let fps: Vec<String> = checks.iter().map(|c| format!("{}/{c}", node.id)).collect();
            anyhow::Ok((node, fps, sent, acked))
        }));
    }
    start.wait().await;
    let first_send = Instant::now();
    let mut batches = Vec::with_capacity(nodes);
    for t in tasks {
        batches.push(t.await??);
    }

    let deadline = first_send + RUN_LIMIT;
    while receiver.triggers.load(Ordering::SeqCst) < fingerprints {
        if Instant::now() > deadline {
            bail!(
                "{fingerprints} fingerprints: only {} pages within {RUN_LIMIT:?}",
                receiver.triggers.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut from_send, mut from_ack, mut last) = (Vec::new(), Vec::new(), first_send);
    let sample = {
        let seen = receiver.seen.lock().expect("receiver lock");
        if seen.duplicates > 0 || seen.other > 0 {
            bail!(
                "unexpected requests: {} duplicate triggers, {} others",
                seen.duplicates,
                seen.other
            );
        }
        for (_, fps, sent, acked) in &batches {
            for fp in fps {
                let at = *seen
                    .triggers
                    .get(fp)
                    .ok_or_else(|| anyhow!("no page for {fp}"))?;
                from_send.push(us_between(*sent, at));
                from_ack.push(us_between(*acked, at));
                last = last.max(at);
            }
        }
        seen.sample.clone().unwrap_or_default()
    };
    let per_s = fingerprints as f64 / last.duration_since(first_send).as_secs_f64();
    drop(batches); // closes the node streams
    agg.daemon.stop("TERM")?;
    // Stopped already; dropping would print its log (a line per page) to stderr.
    std::mem::forget(agg);

    // The floor: the same number of POSTs of a real payload, one at a time.
    let client = reqwest::Client::new();
    let url = format!("{}/floor", receiver.base);
    let mut floor = Vec::with_capacity(fingerprints);
    let floor_start = Instant::now();
    for i in 0..fingerprints {
        let t = Instant::now();
        let r = client
            .post(&url)
            .timeout(Duration::from_secs(10))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", format!("floor-{i}"))
            .body(sample.clone())
            .send()
            .await?;
        r.error_for_status()?.bytes().await?;
        floor.push(us_between(t, Instant::now()));
    }
    let floor_per_s = fingerprints as f64 / floor_start.elapsed().as_secs_f64();

    Ok(RunFigures {
        send_p50: ms(percentile(&mut from_send, 50.0)),
        send_p99: ms(percentile(&mut from_send, 99.0)),
        send_max: ms(percentile(&mut from_send, 100.0)),
        ack_p50: ms(percentile(&mut from_ack, 50.0)),
        ack_p99: ms(percentile(&mut from_ack, 99.0)),
        per_s,
        floor_p50: ms(percentile(&mut floor, 50.0)),
        floor_p99: ms(percentile(&mut floor, 99.0)),
        floor_per_s,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    let (sizes, runs) = tocsin_e2e::sim::bench_args("1,100,10000", 3, "RUNS")?;
    let nodes: usize = match std::env::args().nth(3) {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow!("NODES must be a number, got {s:?}"))?,
        None => 100,
    };
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    let mut out = String::from(
        "| fingerprints | nodes | runs | send→delivered p50 ms | p99 ms | max ms | ack→delivered p50 ms | p99 ms | pages/s | bare HTTP POST p50 ms | p99 ms | bare POSTs/s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &sizes {
        let mut all = Vec::new();
        for r in 1..=runs {
            let f = run(n, nodes).await?;
            // Progress and every run's figures on stderr; the table on stdout.
            let _ = writeln!(std::io::stderr(), "{n} fingerprints, run {r}: {f:?}");
            all.push(f);
        }
        let med = |get: fn(&RunFigures) -> f64| median(&all.iter().map(get).collect::<Vec<_>>());
        out.push_str(&format!(
            "| {n} | {} | {runs} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} |\n",
            nodes.clamp(1, n.max(1)),
            med(|f| f.send_p50),
            med(|f| f.send_p99),
            med(|f| f.send_max),
            med(|f| f.ack_p50),
            med(|f| f.ack_p99),
            med(|f| f.per_s),
            med(|f| f.floor_p50),
            med(|f| f.floor_p99),
            med(|f| f.floor_per_s),
        ));
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
