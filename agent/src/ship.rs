//! Shipping: the connection to the aggregator as an explicit state machine.
//!
//! `Disconnected { next_attempt }` → connect (endpoint connect timeout, HTTP/2 keepalive)
//! → `Hello` → `Welcome { last_seq }` → `Connected`: replay the spool above `last_seq`,
//! then stream new events as the spool commits them, send heartbeats, and delete events
//! from the spool as `Ack`s arrive. Any error drops back to `Disconnected` with a jittered
//! exponential backoff, trying the next endpoint. Events are never lost here: they stay
//! in the spool until acked.

use std::sync::Arc;
use std::time::Duration;

use tocsin_proto::v1::{self, agent_message, aggregator_message, ingest_client::IngestClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::convert;
use crate::event::{CheckStatus, now_ms};
use crate::spool::{SpoolError, SpoolHandle};

/// Events per batch message.
pub const BATCH_EVENTS: usize = 512;
/// Batches sent but not yet acked before the shipper waits for acks.
pub const MAX_INFLIGHT_BATCHES: u64 = 8;
/// A session that lasted this long before failing was healthy: backoff starts over.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// How long to wait for `Welcome` after `Hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session with the aggregator ended.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The endpoint URL could not be used.
    #[error("invalid endpoint {endpoint}: {source}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// TCP/HTTP2 connection failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// The aggregator answered with an error status.
    #[error("aggregator {endpoint} refused the stream: {status}")]
    Status {
        /// The endpoint.
        endpoint: String,
        /// gRPC status.
        status: tonic::Status,
    },
    /// The stream ended or broke.
    #[error("stream to {endpoint} closed: {reason}")]
    Closed {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl ShipError {
    /// The aggregator refused this agent (bad identity, duplicate, malformed data): a
    /// problem retrying alone will not fix.
    pub fn is_refusal(&self) -> bool {
        use tonic::Code;
        matches!(self, ShipError::Status { status, .. }
            if matches!(status.code(), Code::InvalidArgument | Code::AlreadyExists | Code::Unauthenticated | Code::PermissionDenied))
    }
}

/// Identity and settings the shipper needs.
#[derive(Clone)]
pub struct ShipConfig {
    /// Aggregator endpoints in failover order.
    pub endpoints: Vec<String>,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Largest gRPC message sent or accepted, bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive: ping interval; a peer that does not answer within the same
    /// time again is dead (so a half-open or frozen aggregator is noticed within twice
    /// this).
    pub keepalive: Duration,
    /// TLS toward the aggregator.
    pub tls: Option<crate::config::ClientTls>,
    /// The Hello sent on every connect.
    pub hello: v1::Hello,
}

impl std::fmt::Debug for ShipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Hello carries the token: never print it.
        f.debug_struct("ShipConfig")
            .field("endpoints", &self.endpoints)
            .field("agent_id", &self.hello.agent_id)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Connection state, for logs and `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected; the next attempt is due after the delay.
    Disconnected {
        /// Delay before the next attempt.
        next_attempt: Duration,
    },
    /// Streaming to this endpoint.
    Connected {
        /// The endpoint.
        endpoint: String,
    },
}

/// The shipper task.
#[derive(Debug)]
pub struct Shipper {
    cfg: ShipConfig,
    spool: SpoolHandle,
    status: watch::Receiver<Arc<Vec<CheckStatus>>>,
    backoff: Backoff,
    state_tx: watch::Sender<ConnState>,
    /// When the current or last session got its Welcome.
    connected_at: Option<std::time::Instant>,
    /// When a failed spool ack was last logged (logged at most once a minute).
    ack_error_logged: Option<std::time::Instant>,
    /// Drill runner (`None`: drill commands are refused) and its reports to send.
    drills: Option<(
        crate::drill::Drills,
        mpsc::UnboundedReceiver<v1::DrillReport>,
    )>,
}

impl Shipper {
    /// A shipper reading from `spool` and the current check `status`.
    pub fn new(
        cfg: ShipConfig,
        spool: SpoolHandle,
        status: watch::Receiver<Arc<Vec<CheckStatus>>>,
        backoff: Backoff,
    ) -> (Self, watch::Receiver<ConnState>) {
        let (state_tx, state_rx) = watch::channel(ConnState::Disconnected {
            next_attempt: Duration::ZERO,
        });
        (
            Shipper {
                cfg,
                spool,
                status,
                backoff,
                state_tx,
                connected_at: None,
                ack_error_logged: None,
                drills: None,
            },
            state_rx,
        )
    }

    /// Hands drill commands from the aggregator to `drills` and sends its `reports`.
    pub fn with_drills(
        mut self,
        drills: crate::drill::Drills,
        reports: mpsc::UnboundedReceiver<v1::DrillReport>,
    ) -> Self {
        self.drills = Some((drills, reports));
        self
    }

    /// Whether a `node_down` drill holds heartbeats and events back now.
    fn muted(&self) -> bool {
        self.drills.as_ref().is_some_and(|(d, _)| d.muted())
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut index = 0usize;
        let mut failures = 0u64;
        loop {
            let endpoint = self.cfg.endpoints[index % self.cfg.endpoints.len()].clone();
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.session(&endpoint, &shutdown) => r,
            };
            let Err(error) = result else { return };
            let was_connected = self.connected_at.take();
            if was_connected.is_some() {
                failures = 0;
            }
            if was_connected.is_some_and(|t| t.elapsed() >= STABLE_SESSION) {
                self.backoff.reset();
            }
            failures += 1;
            let delay = self.backoff.next_delay();
            let refused = error.is_refusal();
            let error = crate::telemetry::chain(&error);
            if refused {
                // The aggregator refuses us: a config problem someone must fix.
                tracing::error!(%endpoint, %error, retry_in = ?delay, "aggregator refused this agent, events stay spooled");
            } else if failures == 1 {
                tracing::warn!(%endpoint, %error, retry_in = ?delay, "aggregator unreachable, events stay spooled");
            } else {
                tracing::debug!(%endpoint, %error, retry_in = ?delay, failures, "reconnect failed");
            }
            self.state_tx.send_replace(ConnState::Disconnected {
                next_attempt: delay,
            });
            index = index.wrapping_add(1);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: returns `Ok` only on shutdown.
    async fn session(
        &mut self,
        endpoint: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        let ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|source| ShipError::Endpoint {
                endpoint: endpoint.to_owned(),
                source,
            })?
            .connect_timeout(self.cfg.connect_timeout)
            .http2_keep_alive_interval(self.cfg.keepalive)
            .keep_alive_timeout(self.cfg.keepalive)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let ep = match &self.cfg.tls {
            None => ep,
            Some(tls) => {
                use tonic::transport::{Certificate, ClientTlsConfig, Identity};
                let mut t =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    t = t.identity(Identity::from_pem(cert, key.expose()));
                }
                if let Some(domain) = &tls.domain {
                    t = t.domain_name(domain.clone());
                }
                ep.tls_config(t).map_err(|source| ShipError::Endpoint {
                    endpoint: endpoint.to_owned(),
                    source,
                })?
            }
        };
        let channel = ep.connect().await.map_err(|source| ShipError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        let mut client = IngestClient::new(channel)
            .max_encoding_message_size(self.cfg.max_message_bytes)
            .max_decoding_message_size(self.cfg.max_message_bytes);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(MAX_INFLIGHT_BATCHES as usize * 2 + 4);
        let closed = |reason: &str| ShipError::Closed {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        tx.send(msg(agent_message::Msg::Hello(self.cfg.hello.clone())))
            .await
            .map_err(|_| closed("send failed"))?;
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|status| ShipError::Status {
                endpoint: endpoint.to_owned(),
                status,
            })?
            .into_inner();

        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(closed("no Welcome within 10s")),
            Ok(Err(status)) => {
                return Err(ShipError::Status {
                    endpoint: endpoint.to_owned(),
                    status,
                });
            }
            Ok(Ok(None)) => return Err(closed("closed before Welcome")),
            Ok(Ok(Some(v1::AggregatorMessage {
                msg: Some(aggregator_message::Msg::Welcome(w)),
            }))) => w,
            Ok(Ok(Some(_))) => return Err(closed("first message was not a Welcome")),
        };
        // Renumber first: a spool that lost its state has low sequence numbers that the
        // ack below would otherwise delete as "already stored".
        if self.spool.rebase(welcome.last_seq).await? {
            tracing::warn!(
                aggregator_last_seq = welcome.last_seq,
                "spool was behind the aggregator (state lost?); renumbered waiting events"
            );
        }
        self.ack(welcome.last_seq).await?;
        match self.spool.report_loss().await {
            Ok(Some(loss)) => tracing::warn!(seq = loss.seq, "{}", loss.message),
            Ok(None) => {}
            Err(SpoolError::Stopped) => return Err(ShipError::Spool(SpoolError::Stopped)),
            // Reported on a later connection; the stream (and heartbeats) go on.
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::chain(&e), "cannot record the data-loss report in the spool (disk full?); it is sent later")
            }
        }
        self.connected_at = Some(std::time::Instant::now());
        self.state_tx.send_replace(ConnState::Connected {
            endpoint: endpoint.to_owned(),
        });
        tracing::info!(%endpoint, aggregator_version = %welcome.version, last_seq = welcome.last_seq, "connected to aggregator");

        let mut sent = welcome.last_seq;
        let mut acked = welcome.last_seq;
        let mut inflight: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
        let mut latest = self.spool.latest();
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Send what the spool holds beyond what this stream already carried, within
            // the in-flight window.
            let muted = self.muted();
            if muted {
                // Seen: `latest.changed()` must not wake this loop over and over; the
                // events go out at the first turn after the drill.
                latest.borrow_and_update();
            }
            while !muted
                && sent < *latest.borrow_and_update()
                && (inflight.len() as u64) < MAX_INFLIGHT_BATCHES
            {
                let batch = self.spool.read_after(sent, BATCH_EVENTS).await?;
                let Some(first) = batch.first().map(|e| e.seq) else {
                    break;
                };
                // Cut the batch so no message exceeds the size limit both ends enforce.
                let budget = self.cfg.max_message_bytes.saturating_sub(1024);
                let mut events = Vec::with_capacity(batch.len());
                let mut size = 0usize;
                let mut last = first;
                for e in &batch {
                    let wire = convert::event(e);
                    let len = prost::Message::encoded_len(&wire) + 8;
                    if !events.is_empty() && size + len > budget {
                        break;
                    }
                    size += len;
                    last = e.seq;
                    events.push(wire);
                }
                tx.send(msg(agent_message::Msg::Events(v1::EventBatch { events })))
                    .await
                    .map_err(|_| closed("send failed"))?;
                tracing::debug!(from = first, to = last, bytes = size, "sent events");
                sent = last;
                inflight.push_back(last);
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                r = latest.changed() => {
                    if r.is_err() {
                        return Err(ShipError::Spool(SpoolError::Stopped));
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(v1::AggregatorMessage { msg: Some(aggregator_message::Msg::Ack(a)) })) => {
                        // An ack proves the stream works: only now may backoff start over
                        // (an aggregator that refuses every batch must not be hammered).
                        self.backoff.reset();
                        if a.seq > acked {
                            acked = a.seq;
                            self.ack(a.seq).await?;
                        }
                        while inflight.front().is_some_and(|&s| s <= acked) {
                            inflight.pop_front();
                        }
                    }
                    Ok(Some(v1::AggregatorMessage { msg: Some(aggregator_message::Msg::Drill(cmd)) })) => {
                        match &self.drills {
                            Some((d, _)) => d.start(cmd),
                            None => {
                                let r = v1::DrillReport { drill_id: cmd.drill_id, done: true, message: crate::drill::REFUSED.to_owned(), ..Default::default() };
                                tx.send(msg(agent_message::Msg::DrillReport(r))).await.map_err(|_| closed("send failed"))?;
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(closed("aggregator ended the stream")),
                    Err(status) => return Err(ShipError::Status { endpoint: endpoint.to_owned(), status }),
                },
                Some(r) = next_report(&mut self.drills) => {
                    tx.send(msg(agent_message::Msg::DrillReport(r))).await.map_err(|_| closed("send failed"))?;
                }
                _ = heartbeat.tick() => {
                    if self.muted() {
                        continue;
                    }
                    let checks = self.status.borrow().iter().map(convert::check_status).collect();
                    let hb = v1::Heartbeat { sent_at_ms: now_ms(), checks, last_seq: *latest.borrow() };
                    tx.send(msg(agent_message::Msg::Heartbeat(hb))).await.map_err(|_| closed("send failed"))?;
                }
            }
        }
    }
}

impl Shipper {
    /// Deletes acknowledged events from the spool. A local failure (disk full: even a
    /// DELETE needs room in SQLite's journal) must not cut the node off from the
    /// aggregator: the events stay until a later ack can delete them (the aggregator
    /// drops duplicates by sequence number), and the stream goes on.
    ///
    /// # Errors
    /// Only when the spool task is gone.
    async fn ack(&mut self, seq: u64) -> Result<(), ShipError> {
        match self.spool.ack(seq).await {
            Ok(_) => Ok(()),
            Err(SpoolError::Stopped) => Err(ShipError::Spool(SpoolError::Stopped)),
            Err(e) => {
                if self
                    .ack_error_logged
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    tracing::error!(
                        error = %crate::telemetry::chain(&e),
                        "cannot delete acknowledged events from the spool (disk full?); they stay until it can, and streaming goes on"
                    );
                    self.ack_error_logged = Some(std::time::Instant::now());
                }
                Ok(())
            }
        }
    }
}

/// The next drill report to send; pending forever without a drill runner.
async fn next_report(
    drills: &mut Option<(
        crate::drill::Drills,
        mpsc::UnboundedReceiver<v1::DrillReport>,
    )>,
) -> Option<v1::DrillReport> {
    match drills {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn msg(m: agent_message::Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}
