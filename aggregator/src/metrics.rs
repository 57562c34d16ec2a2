//! The aggregator's own metrics, served on the HTTP port at `/metrics` (names
//! `tocsin_<subsystem>_<name>[_total]`, low-cardinality labels). The registry is built in
//! `run` and passed down; the parts that count hold clones of these handles.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a connection or stream was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// `token`, `tls`, `duplicate_identity`.
    pub reason: &'static str,
}

/// A delivery outcome on a channel.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Delivery {
    /// Channel name (from config: few values).
    pub channel: String,
    /// `delivered`, `retry`, `failed`, `skipped` (not sent on purpose).
    pub outcome: &'static str,
}

/// The handles. Cloning shares the values.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `tocsin_ingest_events_stored_total`: events stored (duplicates excluded).
    pub events_stored: Counter,
    /// `tocsin_ingest_refused_total{reason}`: agents refused.
    pub refused: Family<Refusal, Counter>,
    /// `tocsin_ingest_agents_connected`: open agent streams.
    pub agents_connected: Gauge,
    /// `tocsin_incidents_opened_total`.
    pub incidents_opened: Counter,
    /// `tocsin_notify_attempts_total{channel,outcome}`.
    pub notify_attempts: Family<Delivery, Counter>,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "tocsin_ingest_events_stored",
            "Events stored (duplicates excluded)",
            m.events_stored.clone(),
        );
        registry.register(
            "tocsin_ingest_refused",
            "Agents refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "tocsin_ingest_agents_connected",
            "Open agent streams",
            m.agents_connected.clone(),
        );
        registry.register(
            "tocsin_incidents_opened",
            "Incidents opened",
            m.incidents_opened.clone(),
        );
        registry.register(
            "tocsin_notify_attempts",
            "Notification delivery attempts, by channel and outcome",
            m.notify_attempts.clone(),
        );
        // Every series exists from the start, so rate() has something to work on.
        for reason in ["token", "tls", "duplicate_identity"] {
            drop(m.refused.get_or_create(&Refusal { reason }));
        }
        m
    }

    /// Creates the delivery series of `channel` at zero.
    pub fn channel(&self, channel: &str) {
        for outcome in ["delivered", "retry", "failed", "skipped"] {
            drop(self.notify_attempts.get_or_create(&Delivery {
                channel: channel.to_owned(),
                outcome,
            }));
        }
    }

    /// Counts one refusal; returns the new total for that reason.
    pub fn refuse(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&Refusal { reason }).inc() + 1
    }
}
