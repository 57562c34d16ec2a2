//! The aggregator's one edge to the wire format: `tocsin.v1` messages → domain types,
//! with the limits that keep a malformed or hostile message from doing harm.

use std::collections::BTreeMap;

use tocsin_proto::v1;

use crate::model::{AgentHello, CheckStatus, Event, State};

pub use tocsin_proto::limits::{MAX_ID_LEN, MAX_LABELS, MAX_MESSAGE_LEN};

/// A message broke the protocol's rules.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidMessage {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> InvalidMessage {
    InvalidMessage {
        field,
        problem: problem.into(),
    }
}

fn ident(field: &'static str, s: &str, allow_empty: bool) -> Result<String, InvalidMessage> {
    if s.is_empty() && !allow_empty {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("{} bytes, at most {MAX_ID_LEN}", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        // Terminal escapes or newlines in a name could forge lines on an on-call screen.
        return Err(invalid(field, "contains control characters"));
    }
    Ok(s.to_owned())
}

fn labels(
    field: &'static str,
    l: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidMessage> {
    if l.len() > MAX_LABELS {
        return Err(invalid(
            field,
            format!("{} labels, at most {MAX_LABELS}", l.len()),
        ));
    }
    l.iter()
        .map(|(k, v)| Ok((ident(field, k, false)?, ident(field, v, true)?)))
        .collect()
}

/// Event fields are clipped, never refused: refusing an event would refuse the whole
/// batch, and the agent would resend it forever (a poison message). Identifiers are cut
/// on a character boundary; labels beyond [`MAX_LABELS`] (in key order) are dropped;
/// an empty check name becomes `"unnamed"`.
fn clip_ident(s: &str) -> String {
    if s.is_empty() {
        return "unnamed".to_owned();
    }
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    truncate(clean, MAX_ID_LEN - '…'.len_utf8())
}

/// A person's note (acknowledge, resolve): control characters become `?` (newlines and
/// tabs stay), at most [`MAX_MESSAGE_LEN`] bytes, cut on a character boundary with a
/// marker.
pub fn clip_text(s: &str) -> String {
    tocsin_agent::event::truncate_marked(&clean_text(s), MAX_MESSAGE_LEN)
}

/// Free text (a check's message) keeps newlines and tabs; other control characters —
/// terminal escapes above all — become `?`.
fn clean_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

fn clip_labels(l: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    let sorted: BTreeMap<String, String> = l
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| {
            (
                clip_ident(k),
                if v.is_empty() {
                    String::new()
                } else {
                    clip_ident(v)
                },
            )
        })
        .collect();
    sorted.into_iter().take(MAX_LABELS).collect()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Domain state of a wire state; unspecified or unknown numbers are `Unknown`.
pub fn state(raw: i32) -> State {
    match v1::State::try_from(raw) {
        Ok(v1::State::Ok) => State::Ok,
        Ok(v1::State::Pending) => State::Pending,
        Ok(v1::State::Warning) => State::Warning,
        Ok(v1::State::Critical) => State::Critical,
        _ => State::Unknown,
    }
}

/// Validates a `Hello`.
///
/// # Errors
/// [`InvalidMessage`] naming the field.
pub fn hello(h: &v1::Hello) -> Result<AgentHello, InvalidMessage> {
    Ok(AgentHello {
        // Hostnames are case-insensitive: "Web-1" and "web-1" are one node.
        agent_id: ident("hello.agent_id", &h.agent_id, false)?.to_lowercase(),
        hostname: ident("hello.hostname", &h.hostname, true)?,
        labels: labels("hello.labels", &h.labels)?,
        version: ident("hello.version", &h.version, true)?,
        boot_id: ident("hello.boot_id", &h.boot_id, true)?,
        instance_id: ident("hello.instance_id", &h.instance_id, true)?,
        heartbeat_interval_ms: h.heartbeat_interval_ms,
    })
}

/// Validates an event.
///
/// # Errors
/// [`InvalidMessage`] naming the field.
pub fn event(e: &v1::Event) -> Result<Event, InvalidMessage> {
    if e.seq == 0 {
        return Err(invalid("event.seq", "must be at least 1"));
    }
    Ok(Event {
        seq: e.seq,
        check: clip_ident(&e.check),
        labels: clip_labels(&e.labels),
        state: state(e.state),
        previous: state(e.previous),
        value: e.value.filter(|v| v.is_finite()),
        unit: truncate(clip_ident(&e.unit).replace("unnamed", ""), 32),
        threshold: e.threshold.filter(|v| v.is_finite()),
        message: truncate(clean_text(&e.message), MAX_MESSAGE_LEN),
        observed_at_ms: e.observed_at_ms,
        breach_started_at_ms: e.breach_started_at_ms,
        flapping: e.flapping,
    })
}

/// Validates a heartbeat's check list.
///
/// # Errors
/// [`InvalidMessage`] naming the field.
pub fn checks(h: &v1::Heartbeat) -> Result<Vec<CheckStatus>, InvalidMessage> {
    h.checks
        .iter()
        .map(|c| {
            Ok(CheckStatus {
                check: clip_ident(&c.check),
                labels: clip_labels(&c.labels),
                state: state(c.state),
                value: c.value.filter(|v| v.is_finite()),
                unit: truncate(c.unit.clone(), 32),
                since_ms: c.since_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: an oversized check name refused the batch, and the agent resent it
    /// forever, so nothing else from that node was ever paged.
    #[test]
    fn oversized_event_fields_are_clipped_not_refused() {
        let long = "é".repeat(400);
        let e = v1::Event {
            seq: 7,
            check: format!("process:{long}"),
            labels: (0..40)
                .map(|i| (format!("k{i:02}"), long.clone()))
                .collect(),
            state: v1::State::Critical.into(),
            message: "x".repeat(10_000),
            ..Default::default()
        };
        let got = event(&e).expect("clipped, not refused");
        assert!(got.check.len() <= MAX_ID_LEN && got.check.ends_with('…'));
        assert_eq!(got.labels.len(), MAX_LABELS);
        assert!(got.labels.values().all(|v| v.len() <= MAX_ID_LEN));
        assert!(got.message.len() <= MAX_MESSAGE_LEN + '…'.len_utf8());
        assert_eq!(got.state, State::Critical);
    }

    #[test]
    fn control_characters_never_pass() {
        let h = v1::Hello {
            agent_id: "evil\n[tocsin] RESOLVE\u{1b}[2K".into(),
            ..Default::default()
        };
        assert_eq!(hello(&h).expect_err("refused").field, "hello.agent_id");
        let e = v1::Event {
            seq: 1,
            check: "process:\u{1b}[31mred".into(),
            message: "line one\nline two\u{1b}[2K".into(),
            ..Default::default()
        };
        let got = event(&e).expect("clipped");
        assert_eq!(got.check, "process:?[31mred");
        assert_eq!(got.message, "line one\nline two?[2K");
    }

    #[test]
    fn hello_without_identity_is_refused() {
        let err = hello(&v1::Hello::default()).expect_err("empty agent_id");
        assert_eq!(err.field, "hello.agent_id");
    }
}
