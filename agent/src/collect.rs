//! The sampling loop: every `interval`, sample (on a blocking thread), evaluate every
//! rule, commit the resulting state-change events to the spool, and publish the current
//! status of every check for heartbeats.
//!
//! Owns the per-check evaluator state. It does not talk to the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::deathwatch::DeathWatch;
use crate::evaluate::{self, Direction, Rule, RuleState, State};
use crate::event::{CheckStatus, Event, now_ms};
use crate::sample::{Sample, Sampler};
use crate::spool::SpoolHandle;

/// One check's observation in one cycle, built from a [`Sample`] (or a probe result)
/// by [`RuleBook::readings`].
#[derive(Debug, Clone)]
pub struct Reading {
    /// Check name (`cpu`, `process:nginx`, `disk:/var`, …).
    pub check: String,
    /// Identifying labels of the check.
    pub labels: BTreeMap<String, String>,
    /// Unit of `value`: `percent`, `count`, `MiB`, `ms`, `status`.
    pub unit: &'static str,
    /// The rule the value is evaluated with.
    pub rule: Arc<Rule>,
    /// The value; `None` when collection failed (the check becomes UNKNOWN).
    pub value: Option<f64>,
    /// Text from the source for the event message (a probe's error, a plugin's summary).
    pub detail: Option<String>,
}

/// The rules of every configured check, shared by all cycles.
#[derive(Debug, Clone)]
pub struct RuleBook {
    cpu: Option<Arc<Rule>>,
    memory: Option<Arc<Rule>>,
    watches: Vec<WatchRules>,
}

#[derive(Debug, Clone)]
struct WatchRules {
    name: String,
    labels: BTreeMap<String, String>,
    count: Arc<Rule>,
    max: Option<Arc<Rule>>,
    restarts: Arc<Rule>,
    cpu: Option<Arc<Rule>>,
    rss: Option<Arc<Rule>>,
}

/// Check name of a process watch's live count.
pub fn process_check(name: &str) -> String {
    format!("process:{name}")
}

impl RuleBook {
    /// The rules `cfg` asks for.
    pub fn new(cfg: &AgentConfig) -> Self {
        let arc = |r: &Option<Rule>| r.clone().map(Arc::new);
        RuleBook {
            cpu: arc(&cfg.cpu),
            memory: arc(&cfg.memory),
            watches: cfg
                .processes
                .iter()
                .map(|p| WatchRules {
                    name: p.name.clone(),
                    labels: BTreeMap::from([("process".to_owned(), p.name.clone())]),
                    count: Arc::new(p.count_rule.clone()),
                    max: arc(&p.max_rule),
                    restarts: Arc::new(p.restarts_rule.clone()),
                    cpu: arc(&p.cpu_rule),
                    rss: arc(&p.rss_rule),
                })
                .collect(),
        }
    }

    /// Every check's reading in `sample`, in a stable order.
    pub fn readings(&self, sample: &Sample) -> Vec<Reading> {
        let mut out = Vec::new();
        let mut push = |check: String,
                        labels: &BTreeMap<String, String>,
                        unit,
                        rule: &Arc<Rule>,
                        value: Option<f64>,
                        detail: Option<String>| {
            out.push(Reading {
                check,
                labels: labels.clone(),
                unit,
                rule: Arc::clone(rule),
                value,
                detail,
            });
        };
        let none = BTreeMap::new();
        if let Some(r) = &self.cpu {
            push("cpu".into(), &none, "percent", r, sample.cpu_busy_pct, None);
        }
        if let Some(r) = &self.memory {
            push(
                "memory".into(),
                &none,
                "percent",
                r,
                sample.memory_used_pct,
                None,
            );
        }
        for (w, p) in self.watches.iter().zip(&sample.processes) {
            let count = Some(f64::from(p.count));
            push(
                process_check(&w.name),
                &w.labels,
                "count",
                &w.count,
                count,
                p.note.clone(),
            );
            if let Some(r) = &w.max {
                push(
                    format!("process_max:{}", w.name),
                    &w.labels,
                    "count",
                    r,
                    count,
                    None,
                );
            }
            push(
                format!("process_restarts:{}", w.name),
                &w.labels,
                "count",
                &w.restarts,
                Some(f64::from(p.restarts_in_window)),
                None,
            );
            if let Some(r) = &w.cpu {
                push(
                    format!("process_cpu:{}", w.name),
                    &w.labels,
                    "percent",
                    r,
                    p.cpu_pct,
                    None,
                );
            }
            if let Some(r) = &w.rss {
                push(
                    format!("process_rss:{}", w.name),
                    &w.labels,
                    "MiB",
                    r,
                    Some(p.rss_mib),
                    None,
                );
            }
        }
        out
    }
}

/// One evaluated check.
#[derive(Debug)]
pub struct Check {
    /// Check name (`cpu`, `memory`, `process:NAME`, `process_restarts:NAME`, …).
    pub name: String,
    labels: BTreeMap<String, String>,
    unit: &'static str,
    rule: Arc<Rule>,
    state: RuleState,
    value: Option<f64>,
    since_ms: i64,
    /// Flap detection over this check's recent states.
    flap: evaluate::FlapDetector,
    /// The cycle that last gave this check a reading.
    generation: u64,
    /// A value was seen since the agent started.
    observed: bool,
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

    /// Current state.
    pub fn state(&self) -> State {
        self.state.state
    }
}

/// Every check's evaluator state, keyed by check name. Checks appear with their first
/// reading (a disk mounted later gets its check then); a check that stops getting
/// readings is evaluated as "no value" (UNKNOWN).
#[derive(Debug, Default)]
pub struct Checks {
    map: BTreeMap<String, Check>,
    generation: u64,
    /// States from before a restart (check name → state, since Unix ms), applied when
    /// the check first appears.
    restored: HashMap<String, (State, i64)>,
}

impl Checks {
    /// Checks that resume the states committed before a restart: a firing check stays
    /// firing without a new event while its breach holds.
    pub fn with_restored(restored: HashMap<String, (State, i64)>) -> Self {
        Checks {
            restored,
            ..Checks::default()
        }
    }

    /// The check named `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.map.get(name)
    }

    /// Every check, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Check> {
        self.map.values()
    }

    /// The observation was interrupted (agent stopped, VM paused, clock stepped): time
    /// that was not observed does not count toward any `for`.
    pub fn observation_gap(&mut self, now: Duration) {
        for c in self.map.values_mut() {
            c.state.restart_timers(now);
        }
    }

    /// Evaluates one cycle's readings; returns the events of the checks that changed
    /// state (or started or stopped flapping). `now` is monotonic (for `for`
    /// durations), `wall_ms` the wall clock.
    pub fn evaluate(&mut self, readings: Vec<Reading>, now: Duration, wall_ms: i64) -> Vec<Event> {
        self.generation += 1;
        let generation = self.generation;
        let mut events = Vec::new();
        for r in readings {
            let c = match self.map.get_mut(&r.check) {
                Some(c) => c,
                None => {
                    let (state, since_ms) = match self.restored.remove(&r.check) {
                        Some((state, since)) => (RuleState::restored(state, now), since),
                        None => (RuleState::initial(now), wall_ms),
                    };
                    self.map.entry(r.check.clone()).or_insert(Check {
                        name: r.check.clone(),
                        labels: r.labels.clone(),
                        unit: r.unit,
                        rule: Arc::clone(&r.rule),
                        state,
                        value: None,
                        since_ms,
                        flap: evaluate::FlapDetector::default(),
                        generation,
                        observed: false,
                    })
                }
            };
            c.generation = generation;
            c.rule = r.rule;
            evaluate_one(c, r.value, r.detail.as_deref(), now, wall_ms, &mut events);
        }
        for c in self.map.values_mut().filter(|c| c.generation != generation) {
            evaluate_one(
                c,
                None,
                Some("no longer collected"),
                now,
                wall_ms,
                &mut events,
            );
        }
        events
    }

    /// The current status of every check that has produced a state.
    pub fn status(&self) -> Vec<CheckStatus> {
        self.map
            .values()
            .filter(|c| c.value.is_some() || c.state.state != State::Unknown)
            .map(|c| CheckStatus {
                check: c.name.clone(),
                labels: c.labels.clone(),
                state: c.state.state,
                value: c.value,
                unit: c.unit.to_owned(),
                since_ms: c.since_ms,
            })
            .collect()
    }
}

fn evaluate_one(
    c: &mut Check,
    value: Option<f64>,
    detail: Option<&str>,
    now: Duration,
    wall_ms: i64,
    events: &mut Vec<Event>,
) {
    // The first CPU cycle has no value yet: stay silent rather than report unknown (also
    // for a state restored from before a restart).
    if value.is_none() && (c.state.state == State::Unknown || !c.observed) {
        return;
    }
    c.observed |= value.is_some();
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
        return;
    };
    c.since_ms = wall_ms;
    let breach_started_at_ms = t.breach_since.map_or(0, |b| {
        wall_ms - i64::try_from(now.saturating_sub(b).as_millis()).unwrap_or(0)
    });
    let mut text = message(&c.name, c.unit, &c.rule, t.to, value, t.threshold);
    if let Some(d) = detail {
        text = if c.unit == "status" {
            format!("{} {}: {d}", c.name, t.to.as_str())
        } else {
            format!("{text} ({d})")
        };
    }
    events.push(Event {
        seq: 0,
        check: c.name.clone(),
        labels: c.labels.clone(),
        state: t.to,
        previous: t.from,
        value,
        unit: c.unit.to_owned(),
        threshold: t.threshold,
        message: text,
        observed_at_ms: wall_ms,
        breach_started_at_ms,
        flapping,
    });
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
    book: RuleBook,
    checks: Checks,
    spool: SpoolHandle,
    status_tx: watch::Sender<Arc<Vec<CheckStatus>>>,
    start: Instant,
    /// Events the spool refused (disk full, I/O error), retried every cycle; only the
    /// newest of each check is kept.
    backlog: Vec<Event>,
    last_spool_error_log: Option<Instant>,
    /// `tocsin_events_total`.
    events_total: prometheus_client::metrics::counter::Counter,
    /// pidfds of the watched processes: a death starts a cycle at once.
    deaths: DeathWatch,
    /// Monotonic time of the last cycle, to notice gaps in observation.
    last_cycle: Option<Duration>,
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
        restored: HashMap<String, (State, i64)>,
    ) -> Self {
        Collector {
            events_total,
            interval: cfg.interval,
            sampler: Some(sampler),
            book: RuleBook::new(cfg),
            checks: Checks::with_restored(restored),
            spool,
            status_tx,
            start: Instant::now(),
            backlog: Vec::new(),
            last_spool_error_log: None,
            deaths: DeathWatch::new(),
            last_cycle: None,
        }
    }

    /// Samples every interval, and at once when a watched process exits, until
    /// `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let rediscover = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                pid = self.deaths.next_death() => {
                    tracing::debug!(pid, "watched process exited");
                    true
                }
            };
            if !self.cycle(rediscover).await {
                return;
            }
        }
    }

    /// One sample-evaluate-commit cycle; false when sampling can no longer run.
    async fn cycle(&mut self, rediscover: bool) -> bool {
        let Some(mut sampler) = self.sampler.take() else {
            return false;
        };
        let now = self.start.elapsed();
        let joined = tokio::task::spawn_blocking(move || {
            let s = sampler.sample(now, rediscover);
            (sampler, s)
        })
        .await;
        let Ok((sampler, sample)) = joined else {
            tracing::error!("sampler thread panicked; collection stopped");
            return false;
        };
        self.sampler = Some(sampler);
        self.deaths
            .track(sample.processes.iter().flat_map(|p| p.pids.iter().copied()));
        // Monotonic time keeps running while the agent is stopped (SIGSTOP, a paused
        // VM): time nobody observed is not breach time.
        if let Some(last) = self.last_cycle
            && now.saturating_sub(last) > max_gap(self.interval)
        {
            tracing::warn!(
                gap = ?now.saturating_sub(last),
                "sampling was interrupted; `for` timers restart"
            );
            self.checks.observation_gap(now);
        }
        self.last_cycle = Some(now);
        let wall = now_ms();
        let readings = self.book.readings(&sample);
        let events = self.checks.evaluate(readings, now, wall);
        self.commit(events).await;
        true
    }

    async fn commit(&mut self, events: Vec<Event>) {
        if events.is_empty() && self.backlog.is_empty() {
            self.publish_status();
            return;
        }
        for e in &events {
            // PENDING comes and goes with every short spike: not worth an INFO line.
            if e.state == State::Pending || e.previous == State::Pending && e.state == State::Ok {
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

    fn publish_status(&self) {
        self.status_tx.send_replace(Arc::new(self.checks.status()));
    }
}

/// The longest pause between two cycles that still counts as continuous observation.
fn max_gap(interval: Duration) -> Duration {
    (interval * 3).max(interval + Duration::from_secs(2))
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
        let book = RuleBook::new(&cfg);
        let mut checks = Checks::default();
        let mut events = Vec::new();
        for i in 0..30u64 {
            let v = if i % 2 == 0 { 99.0 } else { 10.0 };
            events.extend(checks.evaluate(
                book.readings(&sample(v)),
                Duration::from_secs(i),
                1000 + i as i64,
            ));
        }
        assert!(events.iter().any(|e| e.flapping), "alternating states flap");
        let mut calm = Vec::new();
        for i in 30..70u64 {
            calm.extend(checks.evaluate(
                book.readings(&sample(10.0)),
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
        let book = RuleBook::new(&cfg);
        let mut checks = Checks::default();
        let mut events = Vec::new();
        for (i, v) in [10.0, 10.0, 99.0, 99.0, 99.0, 10.0, 10.0]
            .into_iter()
            .enumerate()
        {
            events.extend(checks.evaluate(
                book.readings(&sample(v)),
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

#[cfg(test)]
mod gap_tests {
    use super::*;

    #[test]
    fn a_gap_in_observation_does_not_count_as_breach_time() {
        let mut cfg = crate::config::load(None).expect("defaults");
        cfg.memory = None;
        cfg.processes.clear();
        cfg.cpu = Some(Rule {
            direction: Direction::Above,
            warning: None,
            critical: Some(90.0),
            hold_for: Duration::from_secs(60),
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        });
        let book = RuleBook::new(&cfg);
        let mut checks = Checks::default();
        let hot = Sample {
            cpu_busy_pct: Some(99.0),
            memory_used_pct: None,
            processes: Vec::new(),
        };
        let s = Duration::from_secs;
        checks.evaluate(book.readings(&hot), s(0), 0);
        checks.evaluate(book.readings(&hot), s(1), 1000);
        // The agent was stopped for 10 minutes; the next cycle notices the gap.
        checks.observation_gap(s(601));
        let events = checks.evaluate(book.readings(&hot), s(601), 601_000);
        assert!(
            events.iter().all(|e| e.state != State::Critical),
            "{events:?}"
        );
        assert_eq!(checks.get("cpu").map(Check::state), Some(State::Pending));
        let events = checks.evaluate(book.readings(&hot), s(661), 661_000);
        assert!(
            events.iter().any(|e| e.state == State::Critical),
            "{events:?}"
        );
    }

    #[test]
    fn a_check_without_readings_becomes_unknown() {
        let cfg = crate::config::load(None).expect("defaults");
        let rule = Arc::new(cfg.cpu.clone().expect("cpu"));
        let mut checks = Checks::default();
        let reading = |v| Reading {
            check: "disk:/mnt".into(),
            labels: BTreeMap::new(),
            unit: "percent",
            rule: Arc::clone(&rule),
            value: Some(v),
            detail: None,
        };
        let ev = checks.evaluate(vec![reading(10.0)], Duration::ZERO, 0);
        assert_eq!(ev.len(), 1);
        let ev = checks.evaluate(Vec::new(), Duration::from_secs(1), 1000);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].state, State::Unknown);
        assert!(
            ev[0].message.contains("no longer collected"),
            "{}",
            ev[0].message
        );
    }

    #[test]
    fn a_restored_firing_check_neither_goes_pending_nor_fires_again() {
        let rule = Arc::new(Rule {
            direction: Direction::Above,
            warning: Some(80.0),
            critical: Some(95.0),
            hold_for: Duration::from_secs(60),
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        });
        let reading = |v: Option<f64>| Reading {
            check: "cpu".into(),
            labels: BTreeMap::new(),
            unit: "percent",
            rule: Arc::clone(&rule),
            value: v,
            detail: None,
        };
        let mut checks =
            Checks::with_restored(HashMap::from([("cpu".to_owned(), (State::Critical, 5))]));
        // The first CPU cycle after the restart has no value: silence, not UNKNOWN.
        assert!(
            checks
                .evaluate(vec![reading(None)], Duration::ZERO, 100)
                .is_empty()
        );
        for i in 1..5 {
            let ev = checks.evaluate(vec![reading(Some(99.0))], Duration::from_secs(i), 100);
            assert!(ev.is_empty(), "{ev:?}");
        }
        assert_eq!(checks.get("cpu").map(Check::state), Some(State::Critical));
        let ev = checks.evaluate(vec![reading(Some(10.0))], Duration::from_secs(6), 200);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].previous, ev[0].state), (State::Critical, State::Ok));
    }
}
