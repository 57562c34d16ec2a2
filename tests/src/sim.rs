//! A simulated agent speaking `tocsin.v1` directly, for load and fault tests: it holds
//! every event in memory until acked, resends from the `Welcome` sequence after each
//! reconnect (as the real agent's spool does), and measures ack latency per batch.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tocsin_proto::v1::{self, agent_message, aggregator_message, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One simulated agent.
#[derive(Debug, Clone)]
pub struct SimAgent {
    /// Agent id.
    pub id: String,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Events to deliver (sequence numbers 1..=total).
    pub total: u64,
    /// Events per batch message.
    pub batch: u64,
    /// Events per second, or as fast as acks allow.
    pub rate_per_s: Option<f64>,
    /// Batches in flight before waiting for an ack.
    pub window: usize,
}

/// What a simulated agent achieved.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Highest sequence acknowledged.
    pub acked: u64,
    /// Send → covering ack, per batch, microseconds.
    pub ack_latencies_us: Vec<u64>,
    /// Connections made.
    pub connections: u32,
    /// From start to the last ack.
    pub elapsed: Duration,
}

fn event(seq: u64) -> v1::Event {
    // Mostly OK, with a critical/ok pair every 100 events: realistic state changes.
    let state = if seq % 100 == 50 {
        v1::State::Critical
    } else {
        v1::State::Ok
    };
    v1::Event {
        seq,
        check: format!("sim:{}", seq % 10),
        state: state.into(),
        previous: v1::State::Ok.into(),
        value: Some(seq as f64),
        unit: "count".into(),
        message: format!("simulated event {seq}"),
        observed_at_ms: 1,
        ..Default::default()
    }
}

impl SimAgent {
    /// Delivers all events (reconnecting as needed) or stops at `deadline`.
    ///
    /// # Errors
    /// Only when the deadline passes before everything is acked.
    pub async fn run(self, deadline: Instant) -> Result<SimReport> {
        let start = Instant::now();
        let mut report = SimReport::default();
        let instance = format!("sim-{}", std::process::id());
        while report.acked < self.total {
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "{}: only {} of {} acked by the deadline",
                    self.id,
                    report.acked,
                    self.total
                ));
            }
            if let Err(e) = self.session(&instance, start, &mut report).await {
                tracing_free_log(&format!("{}: session ended: {e}", self.id));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    async fn session(&self, instance: &str, start: Instant, report: &mut SimReport) -> Result<()> {
        let channel = tonic::transport::Endpoint::from_shared(self.endpoint.clone())?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .connect()
            .await?;
        let mut client = IngestClient::new(channel);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(self.window + 4);
        let hello = v1::Hello {
            agent_id: self.id.clone(),
            hostname: self.id.clone(),
            version: "sim".into(),
            instance_id: instance.to_owned(),
            heartbeat_interval_ms: 5000,
            ..Default::default()
        };
        tx.send(v1::AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        })
        .await?;
        let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        report.connections += 1;
        let welcome = match inbound.message().await? {
            Some(v1::AggregatorMessage {
                msg: Some(aggregator_message::Msg::Welcome(w)),
            }) => w,
            other => return Err(anyhow!("expected Welcome, got {other:?}")),
        };
        report.acked = report.acked.max(welcome.last_seq);
        let mut next = report.acked + 1;
        let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
        while report.acked < self.total {
            while next <= self.total && inflight.len() < self.window {
                if let Some(rate) = self.rate_per_s {
                    let due = start + Duration::from_secs_f64((next - 1) as f64 / rate);
                    if due > Instant::now() {
                        break;
                    }
                }
                let last = (next + self.batch - 1).min(self.total);
                let events = (next..=last).map(event).collect();
                tx.send(v1::AgentMessage {
                    msg: Some(agent_message::Msg::Events(v1::EventBatch { events })),
                })
                .await?;
                inflight.push_back((last, Instant::now()));
                next = last + 1;
            }
            let wait = tokio::time::sleep(Duration::from_millis(if self.rate_per_s.is_some() {
                5
            } else {
                1000
            }));
            tokio::select! {
                m = inbound.message() => match m? {
                    Some(v1::AggregatorMessage { msg: Some(aggregator_message::Msg::Ack(a)) }) => {
                        report.acked = report.acked.max(a.seq);
                        while let Some(&(last, sent)) = inflight.front() {
                            if last > a.seq {
                                break;
                            }
                            report.ack_latencies_us.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                            inflight.pop_front();
                        }
                    }
                    Some(_) => {}
                    None => return Err(anyhow!("stream closed")),
                },
                () = wait => {}
            }
        }
        Ok(())
    }
}

/// The harness has no tracing subscriber; notes go to stderr (shown for failing tests).
fn tracing_free_log(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The `p`-th percentile (0–100) of `values` (sorted in place); 0 when empty.
pub fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// Holds one agent connection that only sends heartbeats (4 checks, constant states)
/// every `interval` until `until`; returns how many heartbeats it sent.
///
/// # Errors
/// When the connection or the stream fails.
pub async fn heartbeat_only(
    endpoint: String,
    id: String,
    interval: Duration,
    until: Instant,
) -> Result<u64> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = IngestClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(4);
    let hello = v1::Hello {
        agent_id: id.clone(),
        hostname: id,
        version: "sim".into(),
        instance_id: "hb".into(),
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    tx.send(v1::AgentMessage {
        msg: Some(agent_message::Msg::Hello(hello)),
    })
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(v1::AggregatorMessage {
            msg: Some(aggregator_message::Msg::Welcome(_)),
        }) => {}
        other => return Err(anyhow!("expected Welcome, got {other:?}")),
    }
    let checks: Vec<v1::CheckStatus> = ["cpu", "memory", "process:sshd", "process_restarts:sshd"]
        .iter()
        .map(|c| v1::CheckStatus {
            check: (*c).to_owned(),
            state: v1::State::Ok.into(),
            value: Some(1.0),
            unit: "percent".into(),
            since_ms: 1,
            ..Default::default()
        })
        .collect();
    // Spread the fleet over the interval, as real agents started at different times are.
    tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
    let mut sent = 0;
    let mut tick = tokio::time::interval(interval);
    while Instant::now() < until {
        tick.tick().await;
        let hb = v1::Heartbeat {
            sent_at_ms: 0,
            checks: checks.clone(),
            last_seq: 0,
        };
        tx.send(v1::AgentMessage {
            msg: Some(agent_message::Msg::Heartbeat(hb)),
        })
        .await?;
        sent += 1;
    }
    drop(inbound);
    Ok(sent)
}

/// Benchmark arguments `[AGENTS,..] [N]`: the comma-separated agent counts (or
/// `default_fleet`) and one number (or `default_n`, named `what` in errors).
///
/// # Errors
/// When an argument is not a number.
pub fn bench_args(default_fleet: &str, default_n: u64, what: &str) -> Result<(Vec<usize>, u64)> {
    bench_args_from(std::env::args().skip(1), default_fleet, default_n, what)
}

/// [`bench_args`] on `args` (the arguments after the program name).
///
/// # Errors
/// When an argument is not a number.
pub fn bench_args_from(
    args: impl IntoIterator<Item = String>,
    default_fleet: &str,
    default_n: u64,
    what: &str,
) -> Result<(Vec<usize>, u64)> {
    let mut args = args.into_iter();
    let fleet = args
        .next()
        .unwrap_or_else(|| default_fleet.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| anyhow!("AGENTS must be a comma-separated list of numbers, got {s:?}"))
        })
        .collect::<Result<_>>()?;
    let n = match args.next() {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow!("{what} must be a number, got {s:?}"))?,
        None => default_n,
    };
    Ok((fleet, n))
}
