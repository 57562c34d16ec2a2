//! The JSON body of a notification, rendered when the outbox row is written, so a late
//! delivery still says what was true when it was owed.

use serde_json::json;

use crate::model::{Incident, rfc3339};

/// Payload format version (`"version"` field).
pub const PAYLOAD_VERSION: &str = "1";

/// Every notification event (outbox kind): `trigger` (escalations included),
/// `acknowledge`, `resolve`, `repeat` (a reminder of an open, unacknowledged incident)
/// and `storm_summary` (the triggers a channel's storm guard held; see `store::paging`).
pub const EVENTS: [&str; 5] = [
    "trigger",
    "acknowledge",
    "resolve",
    crate::store::REPEAT,
    crate::store::STORM_SUMMARY,
];

/// The summary a notification shows: `[DRILL] ` before it when the incident is a drill
/// (label `drill=true`, see `kpi::is_drill`), so nobody mistakes a drill for a real page.
pub fn drill_summary(i: &Incident) -> String {
    if crate::kpi::is_drill(&i.labels) {
        format!("{DRILL_PREFIX}{}", i.summary)
    } else {
        i.summary.clone()
    }
}

/// Prefix of a drill incident's summary in notifications.
pub const DRILL_PREFIX: &str = "[DRILL] ";

/// Renders the generic webhook body for `kind` (`trigger`, `acknowledge`, `resolve` or
/// `repeat`; a storm summary has its own shape, see `store::paging`):
///
/// ```json
/// {"version":"1","event":"trigger","dedup_key":"tocsin-7","created_at":"…",
///  "incident":{"id":7,"status":"triggered","severity":"P2","node":"web-1",
///              "check":"process:nginx","state":"critical","value":0.0,"unit":"count",
///              "threshold":1.0,"summary":"…","labels":{…},"fingerprint":"…",
///              "triggered_at":"…","acknowledged_at":null,"resolved_at":null,
///              "breach_started_at":"…","first_triggered_at":"…"}}
/// ```
///
/// `triggered_at` and `breach_started_at` are those of the current paging cycle: for an
/// incident reopened within `[correlation] reopen_window`, the reopen and the breach
/// start the reopening event reported (`null` when unknown); `first_triggered_at` is
/// when the incident first opened (the same as `triggered_at` until it reopens).
pub fn render(kind: &str, i: &Incident, now_ms: i64) -> String {
    render_with(kind, i, now_ms, None)
}

/// [`render`], with the top-level `remediation` field when a route ran a hook before
/// paging (`store::hooks`): `{"hook", "route", "run_id", "status", "exit_code",
/// "timed_out", "verify_after", "result"}`, `result` saying what was tried in one line
/// (`"hook restart-web (run #4): exit 1; still firing"`); `null` otherwise.
pub fn render_with(
    kind: &str,
    i: &Incident,
    now_ms: i64,
    remediation: Option<serde_json::Value>,
) -> String {
    json!({
        "remediation": remediation,
        "version": PAYLOAD_VERSION,
        "event": kind,
        "dedup_key": i.dedup_key,
        "created_at": rfc3339(now_ms),
        "incident": {
            "id": i.id,
            "status": i.status.as_str(),
            "severity": i.severity.as_str(),
            "node": i.node,
            "check": i.check,
            "state": i.state.as_str(),
            "value": i.value,
            "unit": i.unit,
            "threshold": i.threshold,
            "summary": drill_summary(i),
            "labels": i.labels,
            "fingerprint": i.fingerprint,
            "triggered_at": rfc3339(i.cycle_triggered_at_ms),
            "acknowledged_at": i.acknowledged_at_ms.map(rfc3339),
            "resolved_at": i.resolved_at_ms.map(rfc3339),
            "resolution": i.resolution,
            "breach_started_at": (i.cycle_breach_started_at_ms > 0).then(|| rfc3339(i.cycle_breach_started_at_ms)),
            "first_triggered_at": rfc3339(i.triggered_at_ms),
        }
    })
    .to_string()
}
