//! gRPC ingest: the `tocsin.v1.Ingest/Stream` service.
//!
//! Per agent stream: expect `Hello` first (within [`HELLO_TIMEOUT`]), answer `Welcome`
//! with the last stored sequence, then store each `EventBatch` through the store thread
//! and answer `Ack` with the highest sequence **after** the commit; heartbeats refresh
//! the node's liveness and check states. A store failure ends the stream with
//! `UNAVAILABLE` and no ack, so the agent keeps the events and replays them.

use std::pin::Pin;
use std::time::Duration;

use tocsin_proto::v1::{self, agent_message, aggregator_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Tokens;
use crate::convert;
use crate::metrics::Metrics;
use crate::store::{HelloOutcome, IngestOutcome, StoreHandle};

/// How long a new stream may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The ingest service.
#[derive(Debug, Clone)]
pub struct IngestService {
    store: StoreHandle,
    sessions: std::sync::Arc<std::sync::atomic::AtomicU64>,
    outbox_wake: watch::Sender<u64>,
    /// Accepted tokens; `None`: no token needed.
    tokens: Option<std::sync::Arc<Tokens>>,
    /// Counters.
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Connected streams, for drill commands.
    drills: crate::drill::DrillHub,
}

impl IngestService {
    /// A service writing to `store`; `outbox_wake` is bumped when notifications are due.
    pub fn new(
        store: StoreHandle,
        outbox_wake: watch::Sender<u64>,
        tokens: Option<Tokens>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        IngestService {
            store,
            sessions: Default::default(),
            outbox_wake,
            tokens: tokens.map(std::sync::Arc::new),
            metrics,
            shutdown,
            drills: Default::default(),
        }
    }

    /// Registers connected agents with `drills` (drill commands go down their streams).
    pub fn with_drills(mut self, drills: crate::drill::DrillHub) -> Self {
        self.drills = drills;
        self
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<v1::AggregatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl v1::ingest_server::Ingest for IngestService {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let session = Session {
            id: self
                .sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            store: self.store.clone(),
            outbox_wake: self.outbox_wake.clone(),
            tokens: self.tokens.clone(),
            metrics: self.metrics.clone(),
            peer,
            tx,
            drills: self.drills.clone(),
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = session.run(inbound) => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    /// Stream number, unique within this aggregator process.
    id: u64,
    store: StoreHandle,
    tokens: Option<std::sync::Arc<Tokens>>,
    metrics: Metrics,
    outbox_wake: watch::Sender<u64>,
    peer: String,
    tx: mpsc::Sender<Result<v1::AggregatorMessage, Status>>,
    drills: crate::drill::DrillHub,
}

fn reply(m: aggregator_message::Msg) -> Result<v1::AggregatorMessage, Status> {
    Ok(v1::AggregatorMessage { msg: Some(m) })
}

impl Session {
    async fn run(self, mut inbound: Streaming<v1::AgentMessage>) {
        let peer = self.peer.clone();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(v1::AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return self
                    .refuse(Status::invalid_argument("the first message must be Hello"))
                    .await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                tracing::debug!(%peer, error = %status, "stream failed before Hello");
                return;
            }
            Err(_) => {
                return self
                    .refuse(Status::deadline_exceeded("no Hello within 10s"))
                    .await;
            }
        };
        let hello = match convert::hello(&first) {
            Ok(h) => h,
            Err(e) => return self.refuse(Status::invalid_argument(e.to_string())).await,
        };
        if let Some(tokens) = &self.tokens
            && !tokens.accepts(&hello.agent_id, &first.token)
        {
            let n = self.metrics.refuse("token");
            tracing::warn!(
                %peer,
                agent = %hello.agent_id,
                token_given = !first.token.is_empty(),
                refused_total = n,
                "agent refused: missing or wrong token"
            );
            let msg = format!("missing or wrong token for agent {:?}", hello.agent_id);
            return self.refuse(Status::unauthenticated(msg)).await;
        }
        let agent_id = hello.agent_id.clone();
        let h = hello.clone();
        let session = self.id;
        let last_seq = match self.store.call(move |s| s.hello(&h, session)).await {
            Ok(HelloOutcome::Welcome(seq)) => seq,
            Ok(HelloOutcome::Duplicate { connected_instance }) => {
                self.metrics.refuse("duplicate_identity");
                tracing::error!(
                    %peer,
                    agent = %agent_id,
                    hostname = %hello.hostname,
                    connected_instance = %connected_instance,
                    refused_instance = %hello.instance_id,
                    "a second agent uses the identity of a connected one: refused"
                );
                let msg = format!(
                    "agent_id {agent_id:?} is already connected from another agent process; \
                     give each node a unique agent_id"
                );
                return self.refuse(Status::already_exists(msg)).await;
            }
            Err(e) => {
                tracing::error!(%peer, agent = %agent_id, error = %e, "cannot record Hello");
                return self.refuse(Status::unavailable("store unavailable")).await;
            }
        };
        tracing::info!(%peer, agent = %agent_id, hostname = %hello.hostname, version = %hello.version, last_seq, "agent connected");
        let welcome = v1::Welcome {
            last_seq,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        if self
            .tx
            .send(reply(aggregator_message::Msg::Welcome(welcome)))
            .await
            .is_err()
        {
            return;
        }
        self.metrics.agents_connected.inc();
        self.drills.register(
            &agent_id,
            session,
            &hello.instance_id,
            u64::from(hello.heartbeat_interval_ms),
            self.tx.clone(),
        );
        let reason = self.serve(&agent_id, &mut inbound).await;
        self.drills.unregister(&agent_id, session);
        self.metrics.agents_connected.dec();
        tracing::info!(%peer, agent = %agent_id, reason, "agent disconnected");
        let id = agent_id.clone();
        if let Err(e) = self.store.call(move |s| s.disconnected(&id, session)).await {
            tracing::warn!(agent = %agent_id, error = %e, "cannot record disconnect");
        }
    }

    async fn serve(
        &self,
        agent_id: &str,
        inbound: &mut Streaming<v1::AgentMessage>,
    ) -> &'static str {
        loop {
            let msg = match inbound.message().await {
                Ok(Some(v1::AgentMessage { msg: Some(m) })) => m,
                Ok(Some(_)) => continue,
                Ok(None) => return "stream ended",
                Err(status) => {
                    tracing::debug!(agent = %agent_id, error = %status, "stream error");
                    return "stream error";
                }
            };
            match msg {
                agent_message::Msg::Hello(_) => {
                    self.refuse(Status::invalid_argument("Hello sent twice"))
                        .await;
                    return "protocol error";
                }
                agent_message::Msg::Events(batch) => {
                    let events: Result<Vec<_>, _> =
                        batch.events.iter().map(convert::event).collect();
                    let events = match events {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(agent = %agent_id, error = %e, "malformed event batch refused");
                            self.refuse(Status::invalid_argument(e.to_string())).await;
                            return "malformed events";
                        }
                    };
                    for e in events
                        .iter()
                        .filter(|e| e.check == tocsin_agent::spool::DATA_LOSS_CHECK)
                    {
                        tracing::warn!(agent = %agent_id, dropped = ?e.value, "{}", e.message);
                    }
                    match self.store.ingest(agent_id.to_owned(), events).await {
                        Ok(out) => {
                            self.announce(agent_id, &out);
                            let ack = v1::Ack { seq: out.last_seq };
                            if self
                                .tx
                                .send(reply(aggregator_message::Msg::Ack(ack)))
                                .await
                                .is_err()
                            {
                                return "agent gone";
                            }
                        }
                        Err(e) => {
                            tracing::error!(agent = %agent_id, error = %e, "cannot store events; not acking");
                            self.refuse(Status::unavailable("store unavailable, retry later"))
                                .await;
                            return "store error";
                        }
                    }
                }
                agent_message::Msg::DrillReport(r) => self.drills.report(agent_id, r),
                agent_message::Msg::Heartbeat(hb) => {
                    let checks = match convert::checks(&hb) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(agent = %agent_id, error = %e, "malformed heartbeat ignored");
                            continue;
                        }
                    };
                    let id = agent_id.to_owned();
                    let last_seq = hb.last_seq;
                    match self
                        .store
                        .call(move |s| s.heartbeat(&id, last_seq, &checks))
                        .await
                    {
                        Ok(out) => self.announce(agent_id, &out),
                        Err(e) => {
                            tracing::warn!(agent = %agent_id, error = %e, "cannot record heartbeat")
                        }
                    }
                }
            }
        }
    }

    /// Wakes the outbox and logs incident changes of a store outcome.
    fn announce(&self, agent_id: &str, out: &IngestOutcome) {
        self.metrics.events_stored.inc_by(out.stored as u64);
        self.metrics
            .incidents_opened
            .inc_by(out.opened.len() as u64);
        if out.notifications > 0 {
            self.outbox_wake.send_modify(|n| *n += 1);
        }
        for incident in &out.opened {
            tracing::info!(agent = %agent_id, incident, "incident opened");
        }
        for incident in &out.resolved {
            tracing::info!(agent = %agent_id, incident, "incident resolved");
        }
    }

    async fn refuse(&self, status: Status) {
        tracing::warn!(peer = %self.peer, code = ?status.code(), message = status.message(), "stream refused");
        let _ = self.tx.send(Err(status)).await;
    }
}
