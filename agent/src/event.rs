//! The agent's domain types for what it ships: state-change events and the current
//! status of each check. Converted to wire types only in `convert`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::evaluate::State;

/// A state change of one check. Times are Unix epoch milliseconds (wall clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Per-agent sequence number assigned by the spool (0 until spooled).
    pub seq: u64,
    /// Check name, e.g. `cpu`, `memory`, `process:nginx`.
    pub check: String,
    /// Identifying labels of the check.
    pub labels: BTreeMap<String, String>,
    /// New state.
    pub state: State,
    /// State before.
    pub previous: State,
    /// The value that caused the change, in `unit`.
    pub value: Option<f64>,
    /// Unit of `value` and `threshold`: `percent`, `count`.
    pub unit: String,
    /// The level crossed.
    pub threshold: Option<f64>,
    /// Human-readable summary.
    pub message: String,
    /// When the change was observed.
    pub observed_at_ms: i64,
    /// When the breach began (before `for`); 0 when not breaching.
    pub breach_started_at_ms: i64,
    /// The check is flapping.
    pub flapping: bool,
}

/// Current state of one check, as carried by heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// Check name.
    pub check: String,
    /// Identifying labels.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: State,
    /// Last value, in `unit`.
    pub value: Option<f64>,
    /// Unit of `value`.
    pub unit: String,
    /// When the check entered `state` (Unix ms).
    pub since_ms: i64,
}

/// Wall-clock now as Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 rendering of a Unix ms time, e.g. `2026-11-29T16:40:39.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Cuts `text` to at most `max` bytes on a character boundary, ending with a marker that
/// gives the original size: `"…[truncated, 12345 bytes]"`. Shorter text is unchanged.
pub fn truncate_marked(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let marker = format!("…[truncated, {} bytes]", text.len());
    let keep = max.saturating_sub(marker.len());
    let cut = (0..=keep)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}{marker}", &text[..cut])
}

/// `text` with every control character written as an escape (`\u{1b}`, `\n`), for
/// single-line output on a terminal: no name or message can forge lines or colours.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::truncate_marked;

    #[test]
    fn truncation_keeps_utf8_and_says_how_much_there_was() {
        let text = "😀".repeat(3000);
        let cut = truncate_marked(&text, 4096);
        assert!(cut.len() <= 4096);
        assert!(
            cut.ends_with("…[truncated, 12000 bytes]"),
            "{}",
            &cut[cut.len() - 40..]
        );
        assert_eq!(truncate_marked("short", 4096), "short");
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(super::printable("plain"), "plain");
        assert_eq!(super::printable("a\nb\u{1b}[2K"), "a\\nb\\u{1b}[2K");
    }
}
