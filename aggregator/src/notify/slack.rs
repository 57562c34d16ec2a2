//! Slack incoming webhooks: one line of text per notification, cut to a length Slack
//! shows in full, on a character boundary.

use serde_json::{Value, json};

/// Longest message text sent, characters (Slack truncates long messages itself).
pub const MAX_TEXT: usize = 3000;

/// The message for one outbox payload (tocsin's JSON, see `payload`).
pub fn body(payload: &str) -> String {
    let p: Value = serde_json::from_str(payload).unwrap_or_default();
    let i = &p["incident"];
    let (mark, verb) = match p["event"].as_str() {
        Some("resolve") => (":white_check_mark:", "RESOLVED"),
        Some("acknowledge") => (":eyes:", "ACKNOWLEDGED"),
        Some("repeat") => (":repeat:", "STILL OPEN"),
        Some("storm_summary") => (":cyclone:", "STORM"),
        _ => (":rotating_light:", "TRIGGERED"),
    };
    let text = format!(
        "{mark} {verb} {} #{} {} {}: {}",
        i["severity"].as_str().unwrap_or(""),
        i["id"],
        i["node"].as_str().unwrap_or(""),
        i["check"].as_str().unwrap_or(""),
        i["summary"].as_str().unwrap_or("")
    );
    json!({ "text": text.chars().take(MAX_TEXT).collect::<String>() }).to_string()
}
