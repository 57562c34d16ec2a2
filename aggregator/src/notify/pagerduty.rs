//! PagerDuty Events API v2: one stable `dedup_key` per incident (tocsin's, at most 255
//! characters) so trigger, acknowledge and resolve act on the same PagerDuty incident;
//! the summary cut to 1 024 characters on a character boundary.

use serde_json::{Value, json};

/// PagerDuty's Events API v2 endpoint (the default `url` of a `pagerduty` channel).
pub const EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// Longest `dedup_key` PagerDuty accepts, characters.
pub const MAX_DEDUP_KEY: usize = 255;
/// Longest `payload.summary` PagerDuty accepts, characters.
pub const MAX_SUMMARY: usize = 1024;

/// The event for one outbox payload (tocsin's JSON, see `payload`): `event_action` from
/// its event (`trigger`, `acknowledge`, `resolve`), PagerDuty severity from P1–P4
/// (critical, error, warning, info).
pub fn body(payload: &str, routing_key: &str) -> String {
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
        let summary = format!(
            "{} {} {}: {}",
            i["severity"].as_str().unwrap_or(""),
            i["node"].as_str().unwrap_or(""),
            i["check"].as_str().unwrap_or(""),
            i["summary"].as_str().unwrap_or("")
        );
        event["payload"] = json!({
            "summary": cut(&summary, MAX_SUMMARY),
            "source": i["node"],
            "severity": severity,
            "component": i["check"],
            "custom_details": {
                "incident": i["id"],
                "state": i["state"],
                "value": i["value"],
                "unit": i["unit"],
                "threshold": i["threshold"],
                "labels": i["labels"],
            },
        });
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
        let t: Value = serde_json::from_str(&body(&payload, "KEY")).expect("json");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "tocsin-ab-7");
        assert_eq!(t["payload"]["severity"], "error");
        let summary = t["payload"]["summary"].as_str().expect("summary");
        assert_eq!(summary.chars().count(), MAX_SUMMARY);
        let r = json!({"event": "resolve", "dedup_key": "tocsin-ab-7", "incident": {}}).to_string();
        let r: Value = serde_json::from_str(&body(&r, "KEY")).expect("json");
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], "tocsin-ab-7");
        assert!(r.get("payload").is_none());
    }
}
