//! The sampling loop: every `interval`, sample (on a blocking thread), evaluate every
//! rule, commit the resulting state-change events to the spool, and publish the current
//! status of every check for heartbeats.
//!
//! Owns the per-check evaluator state. It does not talk to the network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::evaluate::{self, Direction, Rule, RuleState, State};
use crate::event::{CheckStatus, Event, now_ms};
use crate::sample::{Sample, Sampler};
use crate::spool::SpoolHandle;

/// Where a check's value comes from in a [`Sample`].
#[derive(Debug, Clone)]
enum Source {
    Cpu,
    Memory,
    ProcessCount(usize),
    ProcessRestarts(usize),
}

/// One evaluated check.
#[derive(Debug)]
pub struct Check {
    /// Check name (`cpu`, `memory`, `process:NAME`, `process_restarts:NAME`).
    pub name: String,
    labels: BTreeMap<String, String>,
    unit: &'static str,
    source: Source,
    rule: Rule,
    state: RuleState,
    value: Option<f64>,
    since_ms: i64,
    /// Flap detection over this check's recent states.
    flap: evaluate::FlapDetector,
}

impl Check {
    /// The rule this check is evaluated with.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Unit of the check's value.
    pub fn unit(&self) -> &'static str {
        self.unit
    }

    /// This check's value in `sample` (`None` when not collected).
    pub fn value_in(&self, sample: &Sample) -> Option<f64> {
        match self.source {
            Source::Cpu => sample.cpu_busy_pct,
            Source::Memory => sample.memory_used_pct,
            Source::ProcessCount(i) => sample.processes.get(i).map(|p| f64::from(p.count)),
            Source::ProcessRestarts(i) => sample
                .processes
                .get(i)
                .map(|p| f64::from(p.restarts_in_window)),
        }
    }
}

/// Builds the checks the config asks for, in a stable order.
pub fn checks(cfg: &AgentConfig) -> Vec<Check> {
    let mut out = Vec::new();
    let mut add = |name: String, labels: BTreeMap<String, String>, unit, source, rule: &Rule| {
        out.push(Check {
            name,
            labels,
            unit,
            source,
            rule: rule.clone(),
            state: RuleState::initial(Duration::ZERO),
            value: None,
            since_ms: now_ms(),
            flap: evaluate::FlapDetector::default(),
        });
    };
    if let Some(r) = &cfg.cpu {
        add("cpu".into(), BTreeMap::new(), "percent", Source::Cpu, r);
    }
    if let Some(r) = &cfg.memory {
        add(
            "memory".into(),
            BTreeMap::new(),
            "percent",
            Source::Memory,
            r,
        );
    }
    for (i, p) in cfg.processes.iter().enumerate() {
        let labels = BTreeMap::from([("process".to_owned(), p.name.clone())]);
        add(
            format!("process:{}", p.name),
            labels.clone(),
            "count",
            Source::ProcessCount(i),
            &p.count_rule,
        );
        add(
            format!("process_restarts:{}", p.name),
            labels,
            "count",
            Source::ProcessRestarts(i),
            &p.restarts_rule,
        );
    }
    out
}

/// Evaluates one sample against every check; returns the events of the checks that
/// changed state. `now` is monotonic (for `for` durations), `wall_ms` the wall clock.
pub fn evaluate_sample(
    checks: &mut [Check],
    sample: &Sample,
    now: Duration,
    wall_ms: i64,
) -> Vec<Event> {
    let mut events = Vec::new();
    for c in checks.iter_mut() {
        let value = c.value_in(sample);
        // The first CPU cycle has no value yet: stay silent rather than report unknown.
        if value.is_none() && c.state.state == State::Unknown {
            continue;
        }
        c.value = value;
        let transition = evaluate::step(&c.rule, &mut c.state, value, now);
        let was_flapping = c.flap.is_flapping();
        let flapping = c.flap.observe(c.state.state);
        let Some(t) = transition else {
            if flapping != was_flapping {
                // No state change, but the check starts or stops flapping: say so, so the
                // aggregator can stop (or resume) paging on every change.
                let note = if flapping {
                    "started flapping"
                } else {
                    "stopped flapping"
                };
                events.push(Event {
                    seq: 0,
                    check: c.name.clone(),
                    labels: c.labels.clone(),
                    state: c.state.state,
                    previous: c.state.state,
                    value,
                    unit: c.unit.to_owned(),
                    threshold: None,
                    message: format!(
                        "{} {note} ({:.0}% state changes)",
                        c.name,
                        c.flap.change_pct()
                    ),
                    observed_at_ms: wall_ms,
                    breach_started_at_ms: 0,
                    flapping,
                });
            }
            continue;
        };
        c.since_ms = wall_ms;
        let breach_started_at_ms = t.breach_since.map_or(0, |b| {
            wall_ms - i64::try_from(now.saturating_sub(b).as_millis()).unwrap_or(0)
        });
        events.push(Event {
            seq: 0,
            check: c.name.clone(),
            labels: c.labels.clone(),
            state: t.to,
            previous: t.from,
            value,
            unit: c.unit.to_owned(),
            threshold: t.threshold,
            message: message(&c.name, c.unit, &c.rule, t.to, value, t.threshold),
            observed_at_ms: wall_ms,
            breach_started_at_ms,
            flapping,
        });
    }
    events
}

fn message(
    check: &str,
    unit: &str,
    rule: &Rule,
    state: State,
    value: Option<f64>,
    threshold: Option<f64>,
) -> String {
    let unit = if unit == "percent" { "%" } else { "" };
    let Some(v) = value else {
        return format!("{check} {}: no value (collection failed)", state.as_str());
    };
    let side = match (state, rule.direction, rule.inclusive) {
        (State::Ok, Direction::Above, false) => "at or below",
        (State::Ok, Direction::Above, true) => "below",
        (State::Ok, Direction::Below, false) => "at or above",
        (State::Ok, Direction::Below, true) => "above",
        (_, Direction::Above, false) => "above",
        (_, Direction::Above, true) => "at or above",
        (_, Direction::Below, false) => "below",
        (_, Direction::Below, true) => "at or below",
    };
    match threshold {
        Some(t) => format!(
            "{check} {}: {v}{unit} {side} {t}{unit}",
            state.as_str(),
            v = round1(v)
        ),
        None => format!("{check} {}: {v}{unit}", state.as_str(), v = round1(v)),
    }
}

/// One decimal for fractions, none for whole numbers ("0", "97.3").
fn round1(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Most events held in memory while the spool cannot be written.
pub const MAX_BACKLOG: usize = 10_000;

/// Keeps, in order, only the newest event of each check (at most `max`).
fn newest_per_check(events: Vec<Event>, max: usize) -> Vec<Event> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<Event> = events
        .into_iter()
        .rev()
        .filter(|e| seen.insert((e.check.clone(), e.labels.clone())))
        .take(max)
        .collect();
    kept.reverse();
    kept
}

/// The collector task.
#[derive(Debug)]
pub struct Collector {
    interval: Duration,
    sampler: Option<Sampler>,
    checks: Vec<Check>,
    spool: SpoolHandle,
    status_tx: watch::Sender<Arc<Vec<CheckStatus>>>,
    start: Instant,
    /// Events the spool refused (disk full, I/O error), retried every cycle; only the
    /// newest of each check is kept.
    backlog: Vec<Event>,
    last_spool_error_log: Option<Instant>,
    /// `tocsin_events_total`.
    events_total: prometheus_client::metrics::counter::Counter,
}

impl Collector {
    /// A collector for `cfg`, committing events to `spool` and publishing status on
    /// `status_tx`.
    pub fn new(
        cfg: &AgentConfig,
        sampler: Sampler,
        spool: SpoolHandle,
        status_tx: watch::Sender<Arc<Vec<CheckStatus>>>,
        events_total: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Collector {
            events_total,
            interval: cfg.interval,
            sampler: Some(sampler),
            checks: checks(cfg),
            spool,
            status_tx,
            start: Instant::now(),
            backlog: Vec::new(),
            last_spool_error_log: None,
        }
    }

    /// Samples every interval until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(mut sampler) = self.sampler.take() else {
                return;
            };
            let now = self.start.elapsed();
            let joined = tokio::task::spawn_blocking(move || {
                let s = sampler.sample(now);
                (sampler, s)
            })
            .await;
            let Ok((sampler, sample)) = joined else {
                tracing::error!("sampler thread panicked; collection stopped");
                return;
            };
            self.sampler = Some(sampler);
            let wall = now_ms();
            let events = evaluate_sample(&mut self.checks, &sample, now, wall);
            if events.is_empty() && self.backlog.is_empty() {
                self.publish_status();
                continue;
            }
            for e in &events {
                // PENDING comes and goes with every short spike: not worth an INFO line.
                if e.state == State::Pending || e.previous == State::Pending && e.state == State::Ok
                {
                    tracing::debug!(check = %e.check, from = e.previous.as_str(), to = e.state.as_str(), "{}", e.message);
                } else {
                    tracing::info!(check = %e.check, from = e.previous.as_str(), to = e.state.as_str(), "{}", e.message);
                }
            }
            self.events_total.inc_by(events.len() as u64);
            let mut batch = std::mem::take(&mut self.backlog);
            batch.extend(events);
            let held = batch.clone();
            match self.spool.append(batch).await {
                Ok(_) if !held.is_empty() && self.last_spool_error_log.is_some() => {
                    tracing::info!("spool writable again; held events committed");
                    self.last_spool_error_log = None;
                }
                Ok(_) => {}
                Err(error) => {
                    self.backlog = newest_per_check(held, MAX_BACKLOG);
                    if self
                        .last_spool_error_log
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                    {
                        tracing::error!(
                            error = %crate::telemetry::chain(&error),
                            held = self.backlog.len(),
                            "cannot write the spool (disk full?): holding the newest state of each check in memory"
                        );
                        self.last_spool_error_log = Some(Instant::now());
                    }
                }
            }
            // Only now: a heartbeat must never show a state whose event has no sequence
            // number yet, or the aggregator would reconcile ahead of the event.
            self.publish_status();
        }
    }

    fn publish_status(&self) {
        let status = self
            .checks
            .iter()
            .filter(|c| c.value.is_some() || c.state.state != State::Unknown)
            .map(|c| CheckStatus {
                check: c.name.clone(),
                labels: c.labels.clone(),
                state: c.state.state,
                value: c.value,
                unit: c.unit.to_owned(),
                since_ms: c.since_ms,
            })
            .collect();
        self.status_tx.send_replace(Arc::new(status));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::evaluate::{Direction, Rule};

    fn cpu_only() -> AgentConfig {
        let mut cfg = crate::config::load(None).expect("defaults");
        cfg.memory = None;
        cfg.processes.clear();
        cfg.cpu = Some(Rule {
            direction: Direction::Above,
            warning: None,
            critical: Some(90.0),
            hold_for: Duration::ZERO,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        });
        cfg
    }

    fn sample(cpu: f64) -> Sample {
        Sample {
            cpu_busy_pct: Some(cpu),
            memory_used_pct: None,
            processes: Vec::new(),
        }
    }

    #[test]
    fn a_flapping_check_says_so_and_says_when_it_stops() {
        let cfg = cpu_only();
        let mut checks = checks(&cfg);
        let mut events = Vec::new();
        for i in 0..30u64 {
            let v = if i % 2 == 0 { 99.0 } else { 10.0 };
            events.extend(evaluate_sample(
                &mut checks,
                &sample(v),
                Duration::from_secs(i),
                1000 + i as i64,
            ));
        }
        assert!(events.iter().any(|e| e.flapping), "alternating states flap");
        let mut calm = Vec::new();
        for i in 30..70u64 {
            calm.extend(evaluate_sample(
                &mut checks,
                &sample(10.0),
                Duration::from_secs(i),
                1000 + i as i64,
            ));
        }
        let stop = calm
            .iter()
            .find(|e| e.message.contains("stopped flapping"))
            .expect("a stop event");
        assert!(!stop.flapping);
        assert_eq!(stop.state, State::Ok);
    }

    #[test]
    fn a_single_incident_is_not_marked_flapping() {
        let cfg = cpu_only();
        let mut checks = checks(&cfg);
        let mut events = Vec::new();
        for (i, v) in [10.0, 10.0, 99.0, 99.0, 99.0, 10.0, 10.0]
            .into_iter()
            .enumerate()
        {
            events.extend(evaluate_sample(
                &mut checks,
                &sample(v),
                Duration::from_secs(i as u64),
                i as i64,
            ));
        }
        assert_eq!(
            events.iter().filter(|e| e.state == State::Critical).count(),
            1
        );
        assert!(events.iter().all(|e| !e.flapping));
    }
}
