//! The agent's one edge to the wire format: domain types → `tocsin.v1` messages.

use tocsin_proto::v1;

use crate::evaluate::State;
use crate::event::{CheckStatus, Event};

/// Wire enum of a [`State`].
pub fn state(s: State) -> v1::State {
    match s {
        State::Ok => v1::State::Ok,
        State::Pending => v1::State::Pending,
        State::Warning => v1::State::Warning,
        State::Critical => v1::State::Critical,
        State::Unknown => v1::State::Unknown,
    }
}

/// Wire form of an [`Event`].
pub fn event(e: &Event) -> v1::Event {
    v1::Event {
        seq: e.seq,
        check: e.check.clone(),
        labels: e.labels.clone().into_iter().collect(),
        state: state(e.state).into(),
        previous: state(e.previous).into(),
        value: e.value,
        unit: e.unit.clone(),
        threshold: e.threshold,
        message: e.message.clone(),
        observed_at_ms: e.observed_at_ms,
        breach_started_at_ms: e.breach_started_at_ms,
        flapping: e.flapping,
    }
}

/// Wire form of a [`CheckStatus`].
pub fn check_status(c: &CheckStatus) -> v1::CheckStatus {
    v1::CheckStatus {
        check: c.check.clone(),
        labels: c.labels.clone().into_iter().collect(),
        state: state(c.state).into(),
        value: c.value,
        unit: c.unit.clone(),
        since_ms: c.since_ms,
    }
}
