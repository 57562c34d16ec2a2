//! A scripted node: speaks `tocsin.v1` to the aggregator like an agent, but sends exactly
//! the check states a test asks for (real gRPC, real acks), so a test can make many
//! nodes fire, clear and fall silent on cue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow};
use tocsin_proto::v1::{self, agent_message, aggregator_message, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One scripted node with an open stream.
#[derive(Debug)]
pub struct ScriptedNode {
    /// Agent id.
    pub id: String,
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::AggregatorMessage>,
    seq: Arc<AtomicU64>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
}

/// A check state name for [`ScriptedNode::send`]: `ok`, `warning`, `critical`, `unknown`.
fn state(name: &str) -> v1::State {
    match name {
        "ok" => v1::State::Ok,
        "warning" => v1::State::Warning,
        "critical" => v1::State::Critical,
        "pending" => v1::State::Pending,
        _ => v1::State::Unknown,
    }
}

impl ScriptedNode {
    /// Connects to `endpoint` (`http://127.0.0.1:PORT`) as `id` with node `labels`,
    /// announcing `heartbeat_interval` (the aggregator's node_down timeout is at least 3
    /// of them). Sends no heartbeat until [`ScriptedNode::heartbeats`].
    ///
    /// # Errors
    /// When the connection fails or the aggregator does not answer `Welcome`.
    pub async fn connect(
        endpoint: &str,
        id: &str,
        labels: &[(&str, &str)],
        heartbeat_interval: Duration,
    ) -> Result<Self> {
        Self::connect_instance(
            endpoint,
            id,
            labels,
            heartbeat_interval,
            &format!("scripted-{id}"),
        )
        .await
    }

    /// [`ScriptedNode::connect`] as agent process `instance` (`Hello.instance_id`): a
    /// node that connects again with another instance is an agent that restarted.
    ///
    /// # Errors
    /// When the connection fails or the aggregator does not answer `Welcome`.
    pub async fn connect_instance(
        endpoint: &str,
        id: &str,
        labels: &[(&str, &str)],
        heartbeat_interval: Duration,
        instance: &str,
    ) -> Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut client = IngestClient::new(channel);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
        let hello = v1::Hello {
            agent_id: id.to_owned(),
            hostname: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            version: "scripted".into(),
            instance_id: instance.to_owned(),
            heartbeat_interval_ms: u32::try_from(heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            ..Default::default()
        };
        tx.send(v1::AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        })
        .await?;
        let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let last = match inbound.message().await? {
            Some(v1::AggregatorMessage {
                msg: Some(aggregator_message::Msg::Welcome(w)),
            }) => w.last_seq,
            other => return Err(anyhow!("expected Welcome, got {other:?}")),
        };
        Ok(ScriptedNode {
            id: id.to_owned(),
            tx,
            inbound,
            seq: Arc::new(AtomicU64::new(last)),
            heartbeats: None,
        })
    }

    /// Sends one batch of events `(check, state)` (states as in `ok`, `warning`,
    /// `critical`) and waits until the aggregator acks it (it is then committed, with
    /// the incident changes it caused).
    ///
    /// # Errors
    /// When the stream fails or closes before the ack.
    pub async fn send(&mut self, changes: &[(&str, &str)]) -> Result<()> {
        self.send_breach(changes, 0).await
    }

    /// [`ScriptedNode::send`] with a value per event `(check, state, value)` (every other
    /// send carries the value 1).
    ///
    /// # Errors
    /// When the stream fails or closes before the ack.
    pub async fn send_values(&mut self, changes: &[(&str, &str, f64)]) -> Result<()> {
        self.send_events(
            changes
                .iter()
                .map(|(check, name, value)| (*check, *name, *value, 0))
                .collect(),
        )
        .await
    }

    /// [`ScriptedNode::send`] with events that say their breach started at
    /// `breach_started_at_ms` (Unix ms; 0: unknown), as an agent's do once a rule's `for`
    /// duration has held.
    ///
    /// # Errors
    /// When the stream fails or closes before the ack.
    pub async fn send_breach(
        &mut self,
        changes: &[(&str, &str)],
        breach_started_at_ms: i64,
    ) -> Result<()> {
        self.send_events(
            changes
                .iter()
                .map(|(check, name)| (*check, *name, 1.0, breach_started_at_ms))
                .collect(),
        )
        .await
    }

    /// Sends `(check, state, value, breach_started_at_ms)` events in one batch and waits
    /// for the ack.
    async fn send_events(&mut self, changes: Vec<(&str, &str, f64, i64)>) -> Result<()> {
        let mut events = Vec::new();
        for (check, name, value, breach_started_at_ms) in changes {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            events.push(v1::Event {
                seq,
                check: check.to_owned(),
                state: state(name).into(),
                previous: v1::State::Ok.into(),
                value: Some(value),
                unit: "percent".into(),
                message: format!("{check} is {name} on {}", self.id),
                observed_at_ms: tocsin_agent::event::now_ms(),
                breach_started_at_ms,
                ..Default::default()
            });
        }
        let last = self.seq.load(Ordering::SeqCst);
        self.tx
            .send(v1::AgentMessage {
                msg: Some(agent_message::Msg::Events(v1::EventBatch { events })),
            })
            .await?;
        loop {
            match self.inbound.message().await? {
                Some(v1::AggregatorMessage {
                    msg: Some(aggregator_message::Msg::Ack(a)),
                }) if a.seq >= last => return Ok(()),
                Some(_) => {}
                None => return Err(anyhow!("{}: stream closed before the ack", self.id)),
            }
        }
    }

    /// Waits for the aggregator's next drill command (`tocsin drill`), skipping other
    /// messages, and answers it as an agent does when it starts one: accepted, the
    /// fault injected now. The test then plays the fault with [`ScriptedNode::send`].
    ///
    /// # Errors
    /// When no drill comes within `patience`, or the stream fails.
    pub async fn accept_drill(&mut self, patience: Duration) -> Result<v1::DrillCommand> {
        let cmd = tokio::time::timeout(patience, async {
            loop {
                match self.inbound.message().await? {
                    Some(v1::AggregatorMessage {
                        msg: Some(aggregator_message::Msg::Drill(cmd)),
                    }) => return Ok(cmd),
                    Some(_) => {}
                    None => return Err(anyhow!("{}: stream closed before a drill", self.id)),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("{}: no drill within {patience:?}", self.id))??;
        self.drill_report(&cmd, false, "scripted fault injected")
            .await?;
        Ok(cmd)
    }

    /// Tells the aggregator that the fault of drill `cmd` is over (`done`).
    ///
    /// # Errors
    /// When the stream is closed.
    pub async fn end_drill(&mut self, cmd: &v1::DrillCommand) -> Result<()> {
        self.drill_report(cmd, true, "scripted fault over").await
    }

    async fn drill_report(&self, cmd: &v1::DrillCommand, done: bool, message: &str) -> Result<()> {
        let report = v1::DrillReport {
            drill_id: cmd.drill_id,
            accepted: true,
            done,
            message: message.to_owned(),
            injected_at_ms: tocsin_agent::event::now_ms(),
        };
        self.tx
            .send(v1::AgentMessage {
                msg: Some(agent_message::Msg::DrillReport(report)),
            })
            .await?;
        Ok(())
    }

    /// Sends a heartbeat (no check states) every `interval` from now on, so the node
    /// stays alive; stops when the node is dropped.
    pub fn heartbeats(&mut self, interval: Duration) {
        self.heartbeats_with(interval, &[]);
    }

    /// [`ScriptedNode::heartbeats`] carrying the check states `(check, state)` (states as
    /// in [`ScriptedNode::send`]), as an agent's heartbeats do: the aggregator reconciles
    /// its incidents with them. Replaces any heartbeat task started before.
    pub fn heartbeats_with(&mut self, interval: Duration, checks: &[(&str, &str)]) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
        let checks: Vec<v1::CheckStatus> = checks
            .iter()
            .map(|(check, name)| v1::CheckStatus {
                check: (*check).to_owned(),
                state: state(name).into(),
                value: Some(1.0),
                unit: "percent".into(),
                since_ms: tocsin_agent::event::now_ms(),
                ..Default::default()
            })
            .collect();
        let (tx, seq) = (self.tx.clone(), self.seq.clone());
        self.heartbeats = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let hb = v1::Heartbeat {
                    sent_at_ms: tocsin_agent::event::now_ms(),
                    checks: checks.clone(),
                    last_seq: seq.load(Ordering::SeqCst),
                };
                let msg = v1::AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(hb)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }));
    }
}

impl Drop for ScriptedNode {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }
}
