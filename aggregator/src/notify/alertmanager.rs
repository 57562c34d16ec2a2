//! Alertmanager API v2 channel (`kind = "alertmanager"`): every incident is one alert,
//! `POST`ed as a JSON array to `<url>/api/v2/alerts`.
//!
//! - **Stable label set per incident**, taken from the first trigger this channel got
//!   (so a later severity change never forks the alert into a second Alertmanager
//!   fingerprint): `alertname` (the check), `node`, `severity` (P1–P4 at trigger time),
//!   `incident_id`, `dedup_key`, then the incident's labels with their names sanitised
//!   to Alertmanager's rule `[a-zA-Z_][a-zA-Z0-9_]*` (see [`label_name`]). Labels with an
//!   empty value are left out (Alertmanager drops them itself).
//! - **Annotations**: `summary`, `description` (current severity, state, value and
//!   threshold), `acknowledged_by` once a person acknowledged, `resolution` on resolve.
//!   tocsin does not know its own public URL, so there is no incident link and no
//!   `generatorURL`.
//! - `startsAt` is the incident's trigger time; a firing alert has no `endsAt`, so
//!   Alertmanager holds it for its `resolve_timeout` (default 5m). The [`Reposter`]
//!   therefore re-posts every open incident this channel was paged for every
//!   `repost_interval` (default [`DEFAULT_REPOST_INTERVAL`], which must stay below
//!   `resolve_timeout`). On resolve the same labels are posted with `endsAt` = the
//!   resolve time.
//! - **Acknowledge**: Alertmanager has no acknowledgement. The acknowledge notification
//!   is posted (still firing) with an `acknowledged_by` annotation, which the re-posts
//!   keep; muting is left to Alertmanager silences.
//! - **Repeat** (a route's `repeat_interval`): the incident's alert posted again, firing,
//!   like a re-post; Alertmanager's own `repeat_interval` decides whether its receivers
//!   hear it again.
//! - **Storm summary**: an alert of its own ([`storm_alert`]: `alertname` =
//!   `storm_summary`, `channel`, `severity` = the worst held, `dedup_key` of the channel
//!   and window), never re-posted, so Alertmanager resolves it after its
//!   `resolve_timeout`. The held incidents are not alerts here: this channel never got
//!   their trigger, so it gets no acknowledge or resolve for them either.
//!
//! Delivery of trigger, acknowledge and resolve goes through the outbox like every
//! channel (guaranteed, retried; HTTP statuses classified by [`webhook::deliver`]: 400
//! fails for good with Alertmanager's answer, 5xx and connection errors are retried).
//! The re-post is best effort: a failed round is logged and counted
//! (`tocsin_notify_alertmanager_reposts_total{outcome="failed"}`) and tried again next
//! interval. Re-posts and outbox deliveries of one channel are serialised, so a re-post
//! read before a resolve can never land after it and revive the alert.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::model::{Notification, now_ms};
use crate::notify::{Delivery, Format, payload, webhook};
use crate::store::StoreHandle;

/// Path of Alertmanager's alert endpoint, appended to the channel's base `url`.
pub const ALERTS_PATH: &str = "/api/v2/alerts";
/// Default `repost_interval`: well below Alertmanager's default `resolve_timeout` (5m).
pub const DEFAULT_REPOST_INTERVAL: &str = "1m";
/// Shortest accepted `repost_interval`.
pub const MIN_REPOST_INTERVAL: Duration = Duration::from_secs(1);
/// Most alerts in one re-post request.
pub const MAX_BATCH: usize = 500;

/// Settings of one Alertmanager channel (`Format::Alertmanager`). Clones share the lock
/// that serialises the channel's re-posts with its outbox deliveries.
#[derive(Debug, Clone)]
pub struct Options {
    /// Every open incident the channel was paged for is posted again this often
    /// (config `repost_interval`; must be below Alertmanager's `resolve_timeout`).
    pub repost_interval: Duration,
    serial: Arc<tokio::sync::Mutex<()>>,
}

impl Options {
    /// Options with this re-post interval.
    pub fn new(repost_interval: Duration) -> Self {
        Options {
            repost_interval,
            serial: Arc::default(),
        }
    }

    /// Delivers one outbox notification: the incident's alert, firing (trigger,
    /// acknowledge) or ended (resolve), to `<base_url>/api/v2/alerts`. The label set
    /// comes from the first trigger delivered to `channel` (read from the store), or from
    /// this notification when it is that first trigger.
    pub async fn deliver(
        &self,
        channel: &str,
        store: &StoreHandle,
        client: &reqwest::Client,
        base_url: &str,
        timeout: Duration,
        n: &Notification,
    ) -> Delivery {
        let _serial = self.serial.lock().await;
        if n.kind == crate::store::STORM_SUMMARY {
            let current: Value = serde_json::from_str(&n.payload).unwrap_or_default();
            let body = Value::Array(vec![storm_alert(&current)]).to_string();
            return webhook::deliver(
                client,
                &endpoint(base_url),
                timeout,
                &n.idempotency_key,
                &body,
            )
            .await;
        }
        let (id, ch) = (n.incident_id, channel.to_owned());
        let paged = match store.call(move |s| s.paged(id, &ch)).await {
            Ok(p) => p,
            Err(e) => {
                return Delivery::Transient {
                    error: format!("cannot read the incident from the store: {e}"),
                    retry_after: None,
                };
            }
        };
        let current: Value = serde_json::from_str(&n.payload).unwrap_or_default();
        let first: Option<Value> = paged
            .as_ref()
            .and_then(|p| serde_json::from_str(&p.trigger_payload).ok());
        let acknowledged_by = paged.as_ref().and_then(|p| p.acknowledged_by.as_deref());
        let alert = alert(
            first.as_ref().unwrap_or(&current),
            &current,
            acknowledged_by,
        );
        let body = Value::Array(vec![alert]).to_string();
        webhook::deliver(
            client,
            &endpoint(base_url),
            timeout,
            &n.idempotency_key,
            &body,
        )
        .await
    }
}

/// `<base>/api/v2/alerts` (a trailing `/` of `base` is dropped).
pub fn endpoint(base: &str) -> String {
    format!("{}{ALERTS_PATH}", base.trim_end_matches('/'))
}

/// `raw` as a valid Alertmanager label name (`[a-zA-Z_][a-zA-Z0-9_]*`): every other
/// character becomes `_`, and a name that is empty or starts with a digit gets a leading
/// `_`. Deterministic, so the same incident always gets the same names.
pub fn label_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// The stable label set of an incident from a notification payload (tocsin's JSON, see
/// [`payload::render`]): `alertname`, `node`, `severity`, `incident_id`, `dedup_key`,
/// then the incident's labels in name order, names sanitised by [`label_name`]. A
/// sanitised name already taken (by the fixed labels or an earlier label) gets `_2`,
/// `_3`, … appended; empty values are left out.
pub fn labels(payload: &Value) -> Map<String, Value> {
    let i = &payload["incident"];
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut out = Map::new();
    for (name, value) in [
        ("alertname", text(&i["check"])),
        ("node", text(&i["node"])),
        ("severity", text(&i["severity"])),
        ("incident_id", text(&i["id"])),
        ("dedup_key", text(&payload["dedup_key"])),
    ] {
        if !value.is_empty() {
            out.insert(name.to_owned(), Value::String(value));
        }
    }
    if let Some(extra) = i["labels"].as_object() {
        // In name order whatever the JSON map's order, so collisions resolve the same way
        // every time.
        let sorted: std::collections::BTreeMap<&String, &Value> = extra.iter().collect();
        for (raw, value) in sorted {
            let value = text(value);
            if value.is_empty() {
                continue;
            }
            let base = label_name(raw);
            let mut name = base.clone();
            let mut n = 2;
            while out.contains_key(&name) {
                name = format!("{base}_{n}");
                n += 1;
            }
            out.insert(name, Value::String(value));
        }
    }
    out
}

/// One Alertmanager alert (`postableAlert`): labels from `first` (the payload of the
/// first trigger the channel got), annotations, `startsAt` and, for a `resolve`
/// event, `endsAt` from `current` (the payload being delivered, or the incident as it
/// is now when re-posting). `endsAt` is never before `startsAt` (Alertmanager would
/// refuse the alert with 400).
pub fn alert(first: &Value, current: &Value, acknowledged_by: Option<&str>) -> Value {
    let i = &current["incident"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut annotations = Map::new();
    annotations.insert("summary".into(), Value::String(s(&i["summary"])));
    let value = match (&i["value"], s(&i["unit"])) {
        (Value::Null, _) => "no value".to_owned(),
        (v, unit) if unit.is_empty() => v.to_string(),
        (v, unit) => format!("{v} {unit}"),
    };
    let threshold = match &i["threshold"] {
        Value::Null => String::new(),
        t => format!(" (threshold {t})"),
    };
    annotations.insert(
        "description".into(),
        Value::String(format!(
            "{} {} on {}: {} is {value}{threshold}; tocsin incident {} is {}",
            s(&i["severity"]),
            s(&i["state"]),
            s(&i["node"]),
            s(&i["check"]),
            i["id"],
            s(&i["status"]),
        )),
    );
    let resolved = current["event"] == "resolve";
    if let Some(by) = acknowledged_by.filter(|_| !resolved) {
        annotations.insert("acknowledged_by".into(), Value::String(by.to_owned()));
    }
    if resolved && let Some(r) = i["resolution"].as_str() {
        annotations.insert("resolution".into(), Value::String(r.to_owned()));
    }
    let starts_at = i["triggered_at"]
        .as_str()
        .or_else(|| first["incident"]["triggered_at"].as_str())
        .unwrap_or("")
        .to_owned();
    let mut alert = json!({
        "labels": labels(first),
        "annotations": annotations,
        "startsAt": starts_at,
    });
    if resolved {
        let ends = i["resolved_at"]
            .as_str()
            .or_else(|| current["created_at"].as_str())
            .unwrap_or("")
            .to_owned();
        // Both are RFC 3339 UTC with milliseconds (`model::rfc3339`): text order is
        // time order.
        alert["endsAt"] = Value::String(if ends < starts_at { starts_at } else { ends });
    }
    alert
}

/// The alert of a storm summary (payload of `store::paging`, with its `storm` object):
/// labels `alertname` = `storm_summary`, `channel`, `severity` (the worst held) and
/// `dedup_key` (one per channel and window); annotations `summary` (the held incidents,
/// counted and listed) and `description`; `startsAt` the window's start; no `endsAt`.
pub fn storm_alert(payload: &Value) -> Value {
    let i = &payload["incident"];
    let storm = &payload["storm"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut labels = Map::new();
    for (name, value) in [
        ("alertname", crate::store::STORM_SUMMARY.to_owned()),
        ("channel", s(&storm["channel"])),
        ("severity", s(&i["severity"])),
        ("dedup_key", s(&payload["dedup_key"])),
    ] {
        if !value.is_empty() {
            labels.insert(name.to_owned(), Value::String(value));
        }
    }
    json!({
        "labels": labels,
        "annotations": {
            "summary": s(&i["summary"]),
            "description": format!(
                "tocsin's storm guard held {} triggers to channel {} between {} and {}; \
                 they are not alerts here (no acknowledge or resolve follows)",
                storm["held"],
                s(&storm["channel"]),
                s(&storm["window_start"]),
                s(&storm["window_end"]),
            ),
        },
        "startsAt": s(&storm["window_start"]),
    })
}

/// A re-post round's outcome per channel, for `tocsin_notify_alertmanager_reposts_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepostLabels {
    /// Channel name (from config).
    pub channel: String,
    /// `posted` or `failed`.
    pub outcome: &'static str,
}

/// Re-posts every open incident an Alertmanager channel was paged for, so that
/// Alertmanager does not resolve it by `resolve_timeout` while it is still open.
#[derive(Debug)]
pub struct Reposter {
    /// Channel name (outbox `channel` column).
    pub channel: String,
    /// Alertmanager base URL (config `url`).
    pub url: String,
    /// The channel's options (interval and the lock shared with its dispatcher).
    pub options: Options,
    /// Per-request timeout (config `timeout`).
    pub timeout: Duration,
    /// Shared HTTP client.
    pub client: reqwest::Client,
    /// Store access.
    pub store: StoreHandle,
    /// `tocsin_notify_alertmanager_reposts_total{channel,outcome}`: alerts re-posted.
    pub reposts: Family<RepostLabels, Counter>,
}

impl Reposter {
    /// Re-posts every `repost_interval` until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let every = self.options.repost_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A round waiting on a slow Alertmanager must not hold up shutdown.
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = self.round() => {}
            }
        }
    }

    /// One round: posts the alert of every open incident whose trigger this channel got,
    /// in requests of at most [`MAX_BATCH`] alerts. Returns how many were accepted. A
    /// failure is logged and counted; the rest of the round is skipped after a failure
    /// that will recur (Alertmanager down), to be tried again next round.
    pub async fn round(&self) -> usize {
        let _serial = self.options.serial.lock().await;
        let ch = self.channel.clone();
        let paged = match self.store.call(move |s| s.paged_open(&ch)).await {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(channel = %self.channel, error = %error, "cannot read the open incidents to re-post");
                return 0;
            }
        };
        let now = now_ms();
        let alerts: Vec<Value> = paged
            .iter()
            .map(|p| {
                let first: Value = serde_json::from_str(&p.trigger_payload).unwrap_or_default();
                let current: Value =
                    serde_json::from_str(&payload::render("trigger", &p.incident, now))
                        .unwrap_or_default();
                alert(&first, &current, p.acknowledged_by.as_deref())
            })
            .collect();
        let url = endpoint(&self.url);
        let mut posted = 0;
        for (n, chunk) in alerts.chunks(MAX_BATCH).enumerate() {
            let body = Value::Array(chunk.to_vec()).to_string();
            let key = format!("{}-repost-{now}-{n}", self.channel);
            let outcome = webhook::deliver(&self.client, &url, self.timeout, &key, &body).await;
            let (label, stop) = match &outcome {
                Delivery::Ok => ("posted", false),
                Delivery::Transient { error, .. } => {
                    tracing::warn!(channel = %self.channel, alerts = chunk.len(), retry_in = ?self.options.repost_interval, error = %error, "re-post to Alertmanager failed");
                    ("failed", true)
                }
                Delivery::Permanent { error } => {
                    tracing::error!(channel = %self.channel, alerts = chunk.len(), error = %error, "Alertmanager refused the re-post");
                    ("failed", false)
                }
            };
            self.reposts
                .get_or_create(&RepostLabels {
                    channel: self.channel.clone(),
                    outcome: label,
                })
                .inc_by(chunk.len() as u64);
            if label == "posted" {
                posted += chunk.len();
            }
            if stop {
                break;
            }
        }
        tracing::debug!(channel = %self.channel, open = alerts.len(), posted, "re-posted open incidents to Alertmanager");
        posted
    }
}

/// Starts one [`Reposter`] per Alertmanager channel of `webhooks` on `tracker`, and
/// registers `tocsin_notify_alertmanager_reposts_total` in `registry` when there is any.
pub fn spawn_reposters(
    webhooks: &[crate::config::Webhook],
    client: &reqwest::Client,
    store: &StoreHandle,
    registry: &mut Registry,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let channels: Vec<_> = webhooks
        .iter()
        .filter_map(|w| match &w.format {
            Format::Alertmanager(o) => Some((w, o)),
            _ => None,
        })
        .collect();
    if channels.is_empty() {
        return;
    }
    let reposts = Family::<RepostLabels, Counter>::default();
    registry.register(
        "tocsin_notify_alertmanager_reposts",
        "Alerts of open incidents re-posted to Alertmanager, by channel and outcome",
        reposts.clone(),
    );
    for (w, options) in channels {
        for outcome in ["posted", "failed"] {
            drop(reposts.get_or_create(&RepostLabels {
                channel: w.name.clone(),
                outcome,
            }));
        }
        let r = Reposter {
            channel: w.name.clone(),
            url: w.url.clone(),
            options: options.clone(),
            timeout: w.timeout,
            client: client.clone(),
            store: store.clone(),
            reposts: reposts.clone(),
        };
        tracker.spawn(r.run(shutdown.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(event: &str) -> Value {
        json!({
            "version": "1", "event": event, "dedup_key": "tocsin-ab12cd34-7",
            "created_at": "2025-01-02T03:04:09.000Z",
            "incident": {
                "id": 7, "status": "triggered", "severity": "P2", "node": "web-1",
                "check": "process:nginx", "state": "critical", "value": 0.0, "unit": "count",
                "threshold": 1.0, "summary": "nginx is not running",
                "labels": {"team.name": "ops", "9lives": "cat", "team_name": "dup",
                           "node": "shadow", "empty": "", "ünï-cødé": "🚨 服务"},
                "triggered_at": "2025-01-02T03:04:05.000Z", "resolved_at": null,
                "resolution": null,
            }
        })
    }

    #[test]
    fn label_names_follow_alertmanagers_rule() {
        assert_eq!(label_name("team.name"), "team_name");
        assert_eq!(label_name("9lives"), "_9lives");
        assert_eq!(label_name(""), "_");
        assert_eq!(label_name("ünï-cødé"), "_n__c_d_");
        assert_eq!(label_name("ok_Name2"), "ok_Name2");
        for raw in ["a b", "ü", "0", "-", "x/y:z", "🚨"] {
            let n = label_name(raw);
            let mut chars = n.chars();
            let first = chars.next().expect("non-empty");
            assert!(first.is_ascii_alphabetic() || first == '_', "{n}");
            assert!(chars.all(|c| c.is_ascii_alphanumeric() || c == '_'), "{n}");
        }
    }

    #[test]
    fn the_label_set_is_fixed_names_then_sanitised_labels_without_collisions() {
        let l = labels(&payload("trigger"));
        assert_eq!(l["alertname"], "process:nginx");
        assert_eq!(l["node"], "web-1");
        assert_eq!(l["severity"], "P2");
        assert_eq!(l["incident_id"], "7");
        assert_eq!(l["dedup_key"], "tocsin-ab12cd34-7");
        assert_eq!(l["_9lives"], "cat");
        assert_eq!(l["team_name"], "ops", "team.name sorts before team_name");
        assert_eq!(l["team_name_2"], "dup");
        assert_eq!(l["node_2"], "shadow", "the fixed node label wins");
        assert_eq!(l["_n__c_d_"], "🚨 服务");
        assert!(!l.contains_key("empty"));
        assert_eq!(l.len(), 10);
    }

    #[test]
    fn resolve_keeps_the_first_triggers_labels_and_sets_ends_at() {
        let first = payload("trigger");
        let mut now = payload("resolve");
        now["incident"]["severity"] = json!("P1");
        now["incident"]["status"] = json!("resolved");
        now["incident"]["resolved_at"] = json!("2025-01-02T03:10:00.000Z");
        now["incident"]["resolution"] = json!("recovered");
        let a = alert(&first, &now, Some("alice"));
        assert_eq!(a["labels"], Value::Object(labels(&first)));
        assert_eq!(a["labels"]["severity"], "P2", "severity at trigger time");
        assert_eq!(a["startsAt"], "2025-01-02T03:04:05.000Z");
        assert_eq!(a["endsAt"], "2025-01-02T03:10:00.000Z");
        assert_eq!(a["annotations"]["resolution"], "recovered");
        assert!(a["annotations"].get("acknowledged_by").is_none());
        // A resolve time before the start (clock step) is clamped, not refused.
        now["incident"]["resolved_at"] = json!("2025-01-02T03:00:00.000Z");
        assert_eq!(alert(&first, &now, None)["endsAt"], a["startsAt"]);
    }

    #[test]
    fn a_firing_alert_has_no_end_and_says_who_acknowledged() {
        let first = payload("trigger");
        let a = alert(&first, &payload("acknowledge"), Some("alice"));
        assert!(a.get("endsAt").is_none());
        assert_eq!(a["annotations"]["acknowledged_by"], "alice");
        assert_eq!(a["annotations"]["summary"], "nginx is not running");
        let d = a["annotations"]["description"].as_str().expect("text");
        assert!(
            d.contains("P2 critical on web-1") && d.contains("threshold 1.0"),
            "{d}"
        );
    }

    #[test]
    fn a_storm_summary_is_an_alert_of_its_own() {
        let p = crate::notify::template::sample_payload("storm_summary");
        let a = storm_alert(&p);
        assert_eq!(a["labels"]["alertname"], "storm_summary");
        assert_eq!(a["labels"]["channel"], "war-room");
        assert_eq!(a["labels"]["severity"], "P1");
        assert!(a["labels"].get("incident_id").is_none());
        assert_eq!(a["startsAt"], "2024-01-15T10:00:00.000Z");
        assert!(a.get("endsAt").is_none());
        let summary = a["annotations"]["summary"].as_str().expect("summary");
        assert!(summary.starts_with("+23 more incidents"), "{summary}");
    }

    #[test]
    fn endpoint_appends_the_api_path() {
        assert_eq!(
            endpoint("http://127.0.0.1:9093"),
            "http://127.0.0.1:9093/api/v2/alerts"
        );
        assert_eq!(
            endpoint("http://127.0.0.1:9093/am/"),
            "http://127.0.0.1:9093/am/api/v2/alerts"
        );
    }
}
