//! The aggregator's domain types: what it stores, correlates and serves. Times are Unix
//! epoch milliseconds (UTC); the API also renders them as RFC 3339.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use tocsin_agent::evaluate::State;
/// Events and check states are the same on both sides of the wire.
pub use tocsin_agent::event::{CheckStatus, Event};

/// Who an agent says it is (from its `Hello`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentHello {
    /// Stable agent identity.
    pub agent_id: String,
    /// Hostname of the node.
    pub hostname: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// tocsin-agent version.
    pub version: String,
    /// Kernel boot id of the node.
    pub boot_id: String,
    /// Random id of the agent process (new at every agent start).
    pub instance_id: String,
    /// The agent's heartbeat interval, ms.
    pub heartbeat_interval_ms: u32,
}

/// Incident severity, P1 (system unavailable, data at risk) to P4 (minor), per the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    /// System unavailable or data at risk: respond immediately.
    P1,
    /// Core function affected: respond within 30 minutes.
    P2,
    /// Non-core function affected: respond within 2 hours.
    P3,
    /// Minor: next business day.
    P4,
}

impl Severity {
    /// `"P1"` … `"P4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::P1 => "P1",
            Severity::P2 => "P2",
            Severity::P3 => "P3",
            Severity::P4 => "P4",
        }
    }

    /// Parses `"P1"` … `"P4"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "P1" => Some(Severity::P1),
            "P2" => Some(Severity::P2),
            "P3" => Some(Severity::P3),
            "P4" => Some(Severity::P4),
            _ => None,
        }
    }
}

/// Incident lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Open and not yet acknowledged.
    Triggered,
    /// Open; a person is on it.
    Acknowledged,
    /// Closed.
    Resolved,
}

impl Status {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Triggered => "triggered",
            Status::Acknowledged => "acknowledged",
            Status::Resolved => "resolved",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "triggered" => Some(Status::Triggered),
            "acknowledged" => Some(Status::Acknowledged),
            "resolved" => Some(Status::Resolved),
            _ => None,
        }
    }
}

/// An incident as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    /// Store id (increasing).
    pub id: i64,
    /// Fingerprint of the firing check: node, check and identifying labels.
    pub fingerprint: String,
    /// Dedup key used with notification channels: `tocsin-<install id>-<id>`, unique
    /// across aggregators and data resets.
    pub dedup_key: String,
    /// Agent id of the node.
    pub node: String,
    /// Check name.
    pub check: String,
    /// Node and check labels merged.
    pub labels: BTreeMap<String, String>,
    /// Severity.
    pub severity: Severity,
    /// Lifecycle status.
    pub status: Status,
    /// Latest firing state of the check (warning or critical).
    pub state: State,
    /// Latest value, in `unit`.
    pub value: Option<f64>,
    /// Unit.
    pub unit: String,
    /// Level crossed.
    pub threshold: Option<f64>,
    /// One-line summary.
    pub summary: String,
    /// Breach start on the node (Unix ms; 0 when unknown).
    pub breach_started_at_ms: i64,
    /// Opened (Unix ms): the first time, however often it was reopened since.
    pub triggered_at_ms: i64,
    /// When the current paging cycle began (Unix ms): `triggered_at_ms`, or the last
    /// reopen once the incident fired again within `[correlation] reopen_window`.
    pub cycle_triggered_at_ms: i64,
    /// Breach start on the node for the current paging cycle (Unix ms; 0 when unknown):
    /// `breach_started_at_ms`, or the reopening event's breach start once reopened.
    pub cycle_breach_started_at_ms: i64,
    /// Acknowledged (Unix ms).
    pub acknowledged_at_ms: Option<i64>,
    /// Resolved (Unix ms).
    pub resolved_at_ms: Option<i64>,
    /// What resolved it (the recovery event's message), once resolved.
    pub resolution: Option<String>,
}

/// One line of an incident's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// When (Unix ms).
    pub at_ms: i64,
    /// `triggered`, `severity`, `resolved`, `notified`, `notify_failed`, `routed`,
    /// `escalated`, `repeat`, `storm`, …
    pub kind: String,
    /// Who: `agent:<id>`, `aggregator`, a user name.
    pub actor: String,
    /// Details.
    pub note: String,
}

/// A notification in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    /// Outbox id.
    pub id: i64,
    /// Incident it belongs to.
    pub incident_id: i64,
    /// Channel name (`console`, a webhook name).
    pub channel: String,
    /// `trigger` (escalations included), `acknowledge`, `resolve`, `repeat` (an open,
    /// unacknowledged incident re-notified) or `storm_summary` (one per channel and storm
    /// window, for the triggers the storm guard held).
    pub kind: String,
    /// `pending`, `delivered`, `failed`, or `held` (a repeat the storm guard kept back).
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Payload (JSON) sent to the channel.
    #[serde(skip)]
    pub payload: String,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Created (Unix ms).
    pub created_at_ms: i64,
    /// Next attempt due (Unix ms).
    pub next_attempt_ms: i64,
    /// Delivered (Unix ms).
    pub delivered_at_ms: Option<i64>,
    /// Sent as `Idempotency-Key`: `<dedup key>-<kind>`, the same on every retry.
    pub idempotency_key: String,
}

/// A node as the aggregator knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// Agent id.
    pub agent_id: String,
    /// Hostname.
    pub hostname: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Agent version.
    pub version: String,
    /// Highest event sequence stored.
    pub last_seq: u64,
    /// Stream currently open.
    pub connected: bool,
    /// Last message of any kind (Unix ms).
    pub last_seen_ms: i64,
    /// Events stored for this agent (each `(agent, seq)` at most once).
    pub events_stored: u64,
}

/// Wall-clock now, Unix ms.
pub fn now_ms() -> i64 {
    tocsin_agent::event::now_ms()
}

pub use tocsin_agent::event::rfc3339;
