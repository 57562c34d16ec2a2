//! The agent's own HTTP endpoint on a loopback port: `/metrics` (Prometheus text format,
//! via `prometheus-client`) and `/health` (JSON), so the node stays observable when the
//! aggregator or Prometheus is down, and Prometheus can scrape it.
//!
//! Owns the metric handles ([`Metrics`]) and the registry; the parts that count (spool,
//! collector, shipper) get clones of the handles. A port that cannot be bound is logged
//! and skipped: monitoring goes on without the endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ship::ConnState;

/// Default admin address (loopback).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7602";

/// Upper bounds (seconds) of the cycle-duration histogram buckets.
pub const CYCLE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The agent's metrics. Cloning shares the underlying values.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `tocsin_cycle_duration_seconds`: wall time of one sample-and-evaluate cycle
    /// (sampling on its blocking thread, evaluation, spool commit).
    pub cycle_seconds: prometheus_client::metrics::histogram::Histogram,
    /// `tocsin_spool_dropped_total`: events evicted from a full spool.
    pub spool_dropped: Counter,
    /// `tocsin_spool_events`: events waiting for an ack.
    pub spool_events: Gauge,
    /// `tocsin_events_total`: state-change events produced.
    pub events: Counter,
    /// `tocsin_ship_connected`: 1 while a stream to an aggregator is open.
    pub connected: Gauge,
    /// `tocsin_spool_durable`: 1 when the spool is on disk in `state_dir`, 0 when it could
    /// not be opened and events are kept in memory only (lost if the agent stops).
    pub spool_durable: Gauge,
}

impl Metrics {
    /// Registers every metric in `registry` under the `tocsin_` names above.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            cycle_seconds: prometheus_client::metrics::histogram::Histogram::new(CYCLE_BUCKETS),
            spool_dropped: Counter::default(),
            spool_events: Gauge::default(),
            events: Counter::default(),
            connected: Gauge::default(),
            spool_durable: Gauge::default(),
        };
        registry.register(
            "tocsin_spool_durable",
            "1 when the spool is on disk, 0 when events are kept in memory only",
            m.spool_durable.clone(),
        );
        registry.register(
            "tocsin_cycle_duration_seconds",
            "Wall time of one sample-evaluate-commit cycle",
            m.cycle_seconds.clone(),
        );
        registry.register(
            "tocsin_spool_dropped",
            "Events evicted from a full spool",
            m.spool_dropped.clone(),
        );
        registry.register(
            "tocsin_spool_events",
            "Events in the spool waiting for an ack",
            m.spool_events.clone(),
        );
        registry.register(
            "tocsin_events",
            "State-change events produced by the agent",
            m.events.clone(),
        );
        registry.register(
            "tocsin_ship_connected",
            "1 while a stream to an aggregator is open",
            m.connected.clone(),
        );
        m
    }
}

/// Exposes the current value and state of every check at scrape time, from the status
/// the collector publishes after each cycle:
/// `tocsin_check_value{check,unit}` (the last value, in `unit`; checks without a value
/// are absent) and `tocsin_check_state{check,state}` (1 for the current state).
#[derive(Debug)]
pub struct CheckCollector {
    status: watch::Receiver<Arc<Vec<crate::event::CheckStatus>>>,
}

impl CheckCollector {
    /// A collector reading `status` (the collector's published check status).
    pub fn new(status: watch::Receiver<Arc<Vec<crate::event::CheckStatus>>>) -> Self {
        CheckCollector { status }
    }
}

impl prometheus_client::collector::Collector for CheckCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::gauge::ConstGauge;
        let status = Arc::clone(&self.status.borrow());
        {
            let mut family = encoder.encode_descriptor(
                "tocsin_check_value",
                "Last value of each check, in the unit of the unit label",
                None,
                MetricType::Gauge,
            )?;
            for c in status.iter() {
                if let Some(v) = c.value.filter(|v| v.is_finite()) {
                    let labels = [("check", c.check.as_str()), ("unit", c.unit.as_str())];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "tocsin_check_state",
            "Current state of each check (1 for the state in the state label)",
            None,
            MetricType::Gauge,
        )?;
        for c in status.iter() {
            let labels = [("check", c.check.as_str()), ("state", c.state.as_str())];
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    conn: watch::Receiver<ConnState>,
    connected: Gauge,
    spool_durable: Gauge,
}

/// `/metrics`: the registry, with `tocsin_ship_connected` refreshed first.
fn metrics(st: &AdminState, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    st.connected.set(i64::from(matches!(
        *st.conn.borrow(),
        ConnState::Connected { .. }
    )));
    let ([(name, value)], body) = render(&st.registry, headers);
    reply(StatusCode::OK, Some((name, value)), body)
}

/// A response with `status`, an optional header and `body`.
fn reply(
    status: StatusCode,
    header: Option<(header::HeaderName, &'static str)>,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Some((name, value)) = header {
        response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Routes one request: `GET` (or `HEAD`) `/metrics` and `/health`; 405 with `Allow` for
/// other methods on them, 404 elsewhere.
fn route(st: &AdminState, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/metrics" && path != "/health" {
        return reply(StatusCode::NOT_FOUND, None, Bytes::new());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Some((header::ALLOW, "GET,HEAD")),
            Bytes::new(),
        );
    }
    if path == "/metrics" {
        metrics(st, request.headers())
    } else {
        health(st)
    }
}

/// Encodes `registry` for a scrape: OpenMetrics when the client asks for it (Prometheus
/// does), else the classic text format (curl, `promtool check metrics`). Shared with the
/// aggregator's `/metrics`.
pub fn render(
    registry: &Registry,
    headers: &http::HeaderMap,
) -> ([(header::HeaderName, &'static str); 1], String) {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|media| {
                let mut parts = media.split(';').map(str::trim);
                parts.next() == Some("application/openmetrics-text")
                    && !parts.any(|p| {
                        p.strip_prefix("q=")
                            .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0))
                    })
            })
        });
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            classic_text(&body),
        )
    }
}

/// Turns `prometheus-client`'s OpenMetrics text into the classic Prometheus text format:
/// counter families are named with their `_total` suffix in `# HELP`/`# TYPE` (as their
/// samples are), and the `# EOF` marker goes.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// `/health`: `{"status": "ok"|"degraded", "connected": bool, "spool": "disk"|"memory"}`,
/// always HTTP 200 while the agent serves (it still samples and pages); "degraded" when
/// the spool is in memory only (state_dir unusable: disk full, permissions).
fn health(st: &AdminState) -> Response<Full<Bytes>> {
    let connected = matches!(*st.conn.borrow(), ConnState::Connected { .. });
    let durable = st.spool_durable.get() == 1;
    let body = serde_json::json!({
        "status": if durable { "ok" } else { "degraded" },
        "connected": connected,
        "spool": if durable { "disk" } else { "memory" },
    });
    reply(
        StatusCode::OK,
        Some((header::CONTENT_TYPE, "application/json")),
        body.to_string(),
    )
}

/// Most admin connections open at once; more are closed as soon as they are accepted.
/// A scraper needs one, `tocsin-agent probe` one.
const MAX_CONNECTIONS: usize = 64;

/// Longest life of one admin connection (seconds of a request, or of keep-alive).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a connection gets to finish its request once the agent stops.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `/metrics` and `/health` (HTTP/1.1, hyper) on `addr` until `shutdown`, then
/// lets the requests in flight finish; logs where it listens.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    conn: watch::Receiver<ConnState>,
    gauges: Metrics,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen for /metrics and /health (admin_listen); continuing without them");
            return;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(admin = %bound, "admin listening (/metrics, /health)");
    let state = AdminState {
        registry: Arc::new(registry),
        conn,
        connected: gauges.connected.clone(),
        spool_durable: gauges.spool_durable.clone(),
    };
    let connections = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "admin endpoint cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Beyond MAX_CONNECTIONS open at once, a new connection is closed at once: a
        // local client holding many connections must not take the file descriptors the
        // collector needs (process discovery, the spool, the liveness file).
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                std::future::ready(Ok::<_, std::convert::Infallible>(route(&state, &request)))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            // A connection lives at most CONNECTION_LIFETIME (a half-sent request or an
            // idle keep-alive holds nothing longer), and gets SHUTDOWN_WAIT to finish its
            // request once the agent stops.
            let done = tokio::select! {
                done = tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut()) => done.ok(),
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_WAIT, connection).await.ok()
                }
            };
            match done {
                Some(Err(e)) => tracing::debug!(error = %e, "admin connection ended with an error"),
                None => tracing::debug!("admin connection closed: too long"),
                Some(Ok(())) => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::classic_text;

    #[test]
    fn counters_get_their_total_name_in_help_and_type() {
        let om = "# HELP a_dropped Dropped.\n# TYPE a_dropped counter\na_dropped_total 3\n\
                  # HELP a_held Held.\n# TYPE a_held gauge\na_held 1\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_dropped_total Dropped.\n# TYPE a_dropped_total counter\na_dropped_total 3\n\
             # HELP a_held Held.\n# TYPE a_held gauge\na_held 1\n"
        );
    }
}
