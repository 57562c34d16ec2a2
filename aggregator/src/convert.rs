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
        agent_id: ident("hello.agent_id", &h.agent_id, false)?,
        hostname: ident("hello.hostname", &h.hostname, true)?,
        labels: labels("hello.labels", &h.labels)?,
        version: ident("hello.version", &h.version, true)?,
        boot_id: ident("hello.boot_id", &h.boot_id, true)?,
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
        check: ident("event.check", &e.check, false)?,
        labels: labels("event.labels", &e.labels)?,
        state: state(e.state),
        previous: state(e.previous),
        value: e.value.filter(|v| v.is_finite()),
        unit: ident("event.unit", &e.unit, true)?,
        threshold: e.threshold.filter(|v| v.is_finite()),
        message: truncate(e.message.clone(), MAX_MESSAGE_LEN),
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
                check: ident("heartbeat.check", &c.check, false)?,
                labels: labels("heartbeat.labels", &c.labels)?,
                state: state(c.state),
                value: c.value.filter(|v| v.is_finite()),
                unit: ident("heartbeat.unit", &c.unit, true)?,
                since_ms: c.since_ms,
            })
        })
        .collect()
}
