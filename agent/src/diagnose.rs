//! `tocsin-agent check`: the seed's quick diagnostic. Runs every configured check once
//! (CPU needs two readings, so it takes about a quarter of a second), ignores `for`
//! durations — it shows where each value stands now — and prints a table or JSON.
//! The exit code is the worst state, in the Nagios convention: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN.

use std::time::Duration;

use serde::Serialize;

use crate::collect::{Reading, RuleBook};
use crate::config::AgentConfig;
use crate::evaluate::{self, RuleState, State};
use crate::sample::{Sampler, SamplerError};

/// One row of the diagnostic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Check name.
    pub check: String,
    /// Where the value stands now (no `for`).
    pub state: State,
    /// The value, in `unit`.
    pub value: Option<f64>,
    /// Unit.
    pub unit: String,
    /// Warning level.
    pub warning: Option<f64>,
    /// Critical level.
    pub critical: Option<f64>,
    /// What the source said (a probe's error, a plugin's summary); empty if nothing.
    pub message: String,
}

/// Samples twice (CPU usage needs two readings) and evaluates every check once.
///
/// # Errors
/// [`SamplerError`] when the system cannot be read.
pub fn run(cfg: &AgentConfig) -> Result<Vec<Row>, SamplerError> {
    let mut sampler = Sampler::new(cfg.processes.clone())?;
    sampler.sample(Duration::ZERO, true);
    std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL + Duration::from_millis(50));
    let sample = sampler.sample(Duration::from_millis(250), false);
    let book = RuleBook::new(cfg);
    Ok(rows(book.readings(&sample)))
}

/// Evaluates each reading once, ignoring `for` and `clear_for`.
pub fn rows(readings: Vec<Reading>) -> Vec<Row> {
    readings
        .into_iter()
        .map(|r| {
            let mut rule = (*r.rule).clone();
            rule.hold_for = Duration::ZERO;
            rule.clear_for = Duration::ZERO;
            let mut state = RuleState::initial(Duration::ZERO);
            evaluate::step(&rule, &mut state, r.value, Duration::from_secs(1));
            let message = r.detail.clone().unwrap_or_default();
            Row {
                check: r.check,
                state: state.state,
                value: r.value,
                unit: r.unit.to_owned(),
                warning: rule.warning,
                critical: rule.critical,
                message,
            }
        })
        .collect()
}

/// Nagios-style exit code of the worst state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
pub fn exit_code(rows: &[Row]) -> u8 {
    rows.iter()
        .map(|r| match r.state {
            State::Ok | State::Pending => 0,
            State::Warning => 1,
            State::Critical => 2,
            State::Unknown => 3,
        })
        .max_by_key(|&code| match code {
            // CRITICAL outranks UNKNOWN: a known failure is the louder news.
            2 => 4,
            c => c,
        })
        .unwrap_or(0)
}

/// The human table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<32} {:<9} {:>10} {:>9} {:>9}  {}\n",
        "CHECK", "STATE", "VALUE", "WARNING", "CRITICAL", "MESSAGE"
    );
    let level = |l: Option<f64>| l.map_or_else(|| "-".to_owned(), |v| format!("{v}"));
    for r in rows {
        let value = match (r.value, r.unit.as_str()) {
            (Some(v), "percent") => format!("{v:.1}%"),
            (Some(v), "count" | "status") => format!("{v:.0}"),
            (Some(v), unit) => format!("{v:.1} {unit}"),
            (None, _) => "-".to_owned(),
        };
        let line = format!(
            "{:<32} {:<9} {:>10} {:>9} {:>9}  {}",
            crate::event::printable(&r.check),
            r.state.as_str(),
            value,
            level(r.warning),
            level(r.critical),
            crate::event::printable(&r.message)
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: State) -> Row {
        Row {
            check: "x".into(),
            state,
            value: None,
            unit: String::new(),
            warning: None,
            critical: None,
            message: String::new(),
        }
    }

    #[test]
    fn exit_code_is_the_worst_state() {
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[row(State::Ok), row(State::Warning)]), 1);
        assert_eq!(exit_code(&[row(State::Unknown), row(State::Warning)]), 3);
        assert_eq!(exit_code(&[row(State::Unknown), row(State::Critical)]), 2);
    }
}
