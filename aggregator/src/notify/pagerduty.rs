//! PagerDuty Events API v2: one stable `dedup_key` per incident (tocsin's, at most 255
//! characters) so trigger, acknowledge and resolve act on the same PagerDuty incident;
//! the summary is the P1 incident notice template (`incident.md.j2`) on one line, cut to
//! 1 024 characters on a character boundary; the whole body stays within 512 KB.

use serde_json::{Value, json};

use crate::notify::template::{Name, Templates};
use crate::notify::truncate::{Limit, truncate};

/// PagerDuty's Events API v2 endpoint (the default `url` of a `pagerduty` channel).
pub const EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// Longest `dedup_key` PagerDuty accepts, characters.
pub const MAX_DEDUP_KEY: usize = 255;
/// Longest `payload.summary` PagerDuty accepts, characters.
pub const MAX_SUMMARY: usize = 1024;
/// Largest event body PagerDuty accepts, bytes (512 KB).
pub const MAX_BODY: usize = 512 * 1024;
/// Longest multi-line notice kept in `custom_details.notice`, bytes.
pub const MAX_NOTICE: usize = 64 * 1024;

/// The event for one outbox payload (tocsin's JSON, see `payload`): `event_action` from
/// its event (`trigger`, `acknowledge`, `resolve`; a `repeat` is the incident's trigger
/// again, which PagerDuty de-duplicates into the open alert by its `dedup_key` and logs
/// — PagerDuty escalates and re-notifies by its own policies; a `storm_summary` is a
/// trigger of its own dedup key, one alert per channel and storm window, that tocsin
/// never resolves: someone resolves it in PagerDuty), PagerDuty severity from P1–P4
/// (critical, error, warning, info). A trigger's `payload.summary` is the rendered notice
/// with its lines joined by ` · `; the notice as rendered is in `custom_details.notice`.
pub fn body(payload: &str, routing_key: &str, templates: &Templates) -> String {
    let p: Value = serde_json::from_str(payload).unwrap_or_default();
    let i = &p["incident"];
    let action = match p["event"].as_str() {
        Some("acknowledge") => "acknowledge",
        Some("resolve") => "resolve",
        _ => "trigger",
    };
    let dedup_key = cut(p["dedup_key"].as_str().unwrap_or(""), MAX_DEDUP_KEY);
    let mut event = json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key,
    });
    if action == "trigger" {
        let severity = match i["severity"].as_str() {
            Some("P1") => "critical",
            Some("P2") => "error",
            Some("P3") => "warning",
            _ => "info",
        };
        let notice = templates.render(Name::Incident, &p, "pagerduty");
        let summary = notice
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" · ");
        // PagerDuty requires a source; a storm summary is about no one node.
        let source = match i["node"].as_str() {
            Some(node) if !node.is_empty() => node,
            _ => "tocsin",
        };
        event["payload"] = json!({
            "summary": truncate(&summary, Limit::Chars(MAX_SUMMARY)),
            "source": source,
            "severity": severity,
            "component": i["check"],
            "custom_details": {
                "incident": i["id"],
                "state": i["state"],
                "value": i["value"],
                "unit": i["unit"],
                "threshold": i["threshold"],
                "labels": i["labels"],
                "notice": truncate(&notice, Limit::Bytes(MAX_NOTICE)),
            },
        });
        // Labels and ids are bounded at ingest, so this only trips on a pathological
        // template; then the details go and the summary stays.
        if event.to_string().len() > MAX_BODY {
            event["payload"]["custom_details"] = json!({ "incident": i["id"] });
        }
    }
    event.to_string()
}

/// At most `max` characters, cut on a character boundary.
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_and_resolve_share_the_dedup_key_and_summaries_are_cut_on_characters() {
        let long = "服务".repeat(900);
        let payload = json!({
            "event": "trigger", "dedup_key": "tocsin-ab-7",
            "incident": {"id": 7, "severity": "P2", "node": "web-1", "check": "process:x",
                         "summary": long, "labels": {}}
        })
        .to_string();
        let templates = Templates::defaults(Default::default());
        let t: Value = serde_json::from_str(&body(&payload, "KEY", &templates)).expect("json");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "tocsin-ab-7");
        assert_eq!(t["payload"]["severity"], "error");
        let summary = t["payload"]["summary"].as_str().expect("summary");
        assert_eq!(summary.chars().count(), MAX_SUMMARY);
        let r = json!({"event": "resolve", "dedup_key": "tocsin-ab-7", "incident": {}}).to_string();
        let r: Value = serde_json::from_str(&body(&r, "KEY", &templates)).expect("json");
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], "tocsin-ab-7");
        assert!(r.get("payload").is_none());
    }

    #[test]
    fn the_summary_is_the_notice_on_one_line() {
        let templates = Templates::defaults(Default::default());
        let p = crate::notify::template::sample_payload("trigger").to_string();
        let t: Value = serde_json::from_str(&body(&p, "KEY", &templates)).expect("json");
        let summary = t["payload"]["summary"].as_str().expect("summary");
        assert!(
            summary.starts_with("🚨 TRIGGERED P1 #7: http:checkout on web-1"),
            "{summary}"
        );
        assert!(summary.contains(" · Severity: P1"), "{summary}");
        assert!(
            !summary.contains('\n') && !summary.contains('*'),
            "{summary}"
        );
        let notice = t["payload"]["custom_details"]["notice"]
            .as_str()
            .expect("notice");
        assert!(notice.contains("\nImpact: "), "{notice}");
    }

    #[test]
    fn a_repeat_re_triggers_the_incident_and_a_storm_summary_is_an_alert_of_its_own() {
        let templates = Templates::defaults(Default::default());
        let p = crate::notify::template::sample_payload("repeat").to_string();
        let t: Value = serde_json::from_str(&body(&p, "KEY", &templates)).expect("json");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "tocsin-0123456789abcdef-7", "de-duplicated");
        let p = crate::notify::template::sample_payload("storm_summary").to_string();
        let t: Value = serde_json::from_str(&body(&p, "KEY", &templates)).expect("json");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(
            t["dedup_key"],
            "tocsin-0123456789abcdef-storm-war-room-1705313100000"
        );
        assert_eq!(t["payload"]["source"], "tocsin");
        let summary = t["payload"]["summary"].as_str().expect("summary");
        assert!(summary.starts_with("🌀 STORM on war-room"), "{summary}");
    }

    /// Issue 5: 200-character node names still give valid dedup keys (the key is the
    /// incident's, not built from the node name) and a summary within the limit.
    #[test]
    fn long_node_names_keep_the_dedup_key_within_255_characters() {
        let templates = Templates::defaults(Default::default());
        let node = "n".repeat(200);
        let mut p = crate::notify::template::sample_payload("trigger");
        p["incident"]["node"] = json!(node);
        p["incident"]["check"] = json!(format!("process:{}", "c".repeat(200)));
        for event in ["trigger", "acknowledge", "resolve"] {
            p["event"] = json!(event);
            let t: Value =
                serde_json::from_str(&body(&p.to_string(), "KEY", &templates)).expect("json");
            let key = t["dedup_key"].as_str().expect("dedup key");
            assert!(
                !key.is_empty() && key.chars().count() <= MAX_DEDUP_KEY,
                "{key}"
            );
            assert_eq!(key, "tocsin-0123456789abcdef-7");
            if let Some(s) = t["payload"]["summary"].as_str() {
                assert!(s.chars().count() <= MAX_SUMMARY);
                assert!(s.contains(&node));
            }
        }
        // Even a dedup key that were too long is cut, never sent as is.
        p["dedup_key"] = json!("k".repeat(400));
        let t: Value =
            serde_json::from_str(&body(&p.to_string(), "KEY", &templates)).expect("json");
        assert_eq!(
            t["dedup_key"].as_str().map(|k| k.chars().count()),
            Some(MAX_DEDUP_KEY)
        );
    }
}
