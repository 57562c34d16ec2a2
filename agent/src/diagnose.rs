//! `tocsin-agent check`: the seed's quick diagnostic. Runs every configured check once
//! (CPU needs two readings, so it takes about a quarter of a second), ignores `for`
//! durations — it shows where each value stands now — and prints a table or JSON.
//! The exit code is the worst state, in the Nagios convention: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN.

use std::time::Duration;

use serde::Serialize;

use crate::active::{ActiveCheck, Board, RunResult, Runner, Snapshot};
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
    let mut sampler = Sampler::new(cfg.processes.clone(), cfg.disks.clone())?;
    let mut discoverer = crate::sample::Discoverer::new(cfg.processes.clone());
    sampler.sample(Duration::ZERO, Some(discoverer.scan()));
    // The active checks run (concurrently) while CPU usage gets its second reading.
    let started = std::time::Instant::now();
    let active = run_active(&cfg.active);
    let settle = crate::config::MIN_INTERVAL + Duration::from_millis(50);
    std::thread::sleep(settle.saturating_sub(started.elapsed()));
    let mut sample = sampler.sample(started.elapsed().max(settle), None);
    sample.active = active;
    let book = RuleBook::new(cfg);
    Ok(rows(book.readings(&sample)))
}

/// Runs every active check once, all at the same time, on a small runtime of its own.
fn run_active(checks: &[ActiveCheck]) -> Vec<Snapshot> {
    if checks.is_empty() {
        return Vec::new();
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let start = std::time::Instant::now();
        let board = Board::new(checks, start);
        let mut set = tokio::task::JoinSet::new();
        for (i, c) in checks.iter().cloned().enumerate() {
            let board = board.clone();
            set.spawn(async move {
                let result = match Runner::new(&c) {
                    Ok(r) => r.run(|| board.now()).await,
                    Err(e) => RunResult {
                        at: board.now(),
                        state: crate::nagios::PluginState::Unknown,
                        message: crate::telemetry::chain(&e),
                        latency: Duration::ZERO,
                        perf: Vec::new(),
                    },
                };
                board.record(i, result);
            });
        }
        set.join_all().await;
        board.snapshot(board.now())
    })
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

/// A perfdata value as the plugin would print it: whole numbers without decimals.
fn round_value(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The human table.
pub fn table(rows: &[Row]) -> String {
    let w = rows
        .iter()
        .map(|r| crate::event::printable(&r.check).chars().count())
        .max()
        .unwrap_or(0)
        .max("CHECK".len());
    let mut out = format!(
        "{:<w$} {:<9} {:>10} {:>9} {:>9}  {}\n",
        "CHECK", "STATE", "VALUE", "WARNING", "CRITICAL", "MESSAGE"
    );
    let level = |l: Option<f64>| l.map_or_else(|| "-".to_owned(), |v| format!("{v}"));
    for r in rows {
        let value = match (r.value, r.unit.as_str()) {
            (Some(v), "percent") => format!("{v:.1}%"),
            (Some(_), "status") => "-".to_owned(),
            (Some(v), "count") => format!("{v:.0}"),
            (Some(v), "perfdata") => round_value(v),
            (Some(v), unit) => format!("{v:.1} {unit}"),
            (None, _) => "-".to_owned(),
        };
        let status = r.unit == "status";
        let line = format!(
            "{:<w$} {:<9} {:>10} {:>9} {:>9}  {}",
            crate::event::printable(&r.check),
            r.state.as_str(),
            value,
            if status {
                "-".to_owned()
            } else {
                level(r.warning)
            },
            if status {
                "-".to_owned()
            } else {
                level(r.critical)
            },
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
