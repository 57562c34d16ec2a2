//! The sampling loop: every `interval`, sample (on a blocking thread), evaluate every
//! rule, commit the resulting state-change events to the spool, and publish the current
//! status of every check for heartbeats.
//!
//! Owns the per-check evaluator state. It does not talk to the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::active::{ActiveCheck, Board};
use crate::config::AgentConfig;
use crate::deathwatch::DeathWatch;
use crate::evaluate::{self, Direction, Rule, RuleState, State};
use crate::event::{CheckStatus, Event, now_ms};
use crate::nagios::PluginState;
use crate::sample::{Discoverer, Found, Sample, Sampler};
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
    swap: Option<Arc<Rule>>,
    iowait: Option<Arc<Rule>>,
    steal: Option<Arc<Rule>>,
    cpu_core: Option<Arc<Rule>>,
    load: Option<Arc<Rule>>,
    disk: Option<Arc<Rule>>,
    inodes: Option<Arc<Rule>>,
    watches: Vec<WatchRules>,
    active: Vec<ActiveRules>,
}

#[derive(Debug, Clone)]
struct ActiveRules {
    /// `http`, `tcp` or `exec`.
    kind: &'static str,
    name: String,
    labels: BTreeMap<String, String>,
    status: Arc<Rule>,
    error_rate: Option<Arc<Rule>>,
    latency: Option<Arc<Rule>>,
    perf: Vec<(String, Arc<Rule>)>,
    /// Results needed in the window before the error rate and P95 mean something (one
    /// failed first probe is not "100 % errors"): 5, or fewer if the window holds fewer.
    min_samples: usize,
}

/// The rule of a Nagios-style status value (0 OK, 1 WARNING, 2 CRITICAL).
fn status_rule() -> Rule {
    Rule {
        direction: Direction::Above,
        warning: Some(1.0),
        critical: Some(2.0),
        hold_for: Duration::ZERO,
        clear: None,
        clear_for: Duration::ZERO,
        inclusive: true,
    }
}

impl ActiveRules {
    fn new(check: &ActiveCheck) -> Self {
        let (kind, name, hold_for) = match check {
            ActiveCheck::Http(h) => ("http", h.name.clone(), h.hold_for),
            ActiveCheck::Tcp(t) => ("tcp", t.name.clone(), t.hold_for),
            ActiveCheck::Exec(e) => ("exec", e.name.clone(), e.hold_for),
        };
        let above = |warning: f64, critical: f64| {
            Arc::new(Rule {
                direction: Direction::Above,
                warning: Some(warning),
                critical: Some(critical),
                hold_for: Duration::ZERO,
                clear: None,
                clear_for: Duration::ZERO,
                inclusive: false,
            })
        };
        let (error_rate, latency) = match check {
            ActiveCheck::Http(h) => (
                Some(above(h.error_rate_warning, h.error_rate_critical)),
                Some(above(
                    h.latency_warning.as_secs_f64() * 1000.0,
                    h.latency_critical.as_secs_f64() * 1000.0,
                )),
            ),
            _ => (None, None),
        };
        let perf = match check {
            ActiveCheck::Exec(e) => e
                .perf_rules
                .iter()
                .map(|(label, rule)| (label.clone(), Arc::new(rule.clone())))
                .collect(),
            _ => Vec::new(),
        };
        let min_samples = match check {
            ActiveCheck::Http(h) => {
                let fit = h.window.as_secs_f64() / h.interval.as_secs_f64().max(0.001);
                (fit.floor() as usize).clamp(1, 5)
            }
            _ => 1,
        };
        ActiveRules {
            min_samples,
            kind,
            labels: BTreeMap::from([(kind.to_owned(), name.clone())]),
            name,
            status: Arc::new(Rule {
                hold_for,
                ..status_rule()
            }),
            error_rate,
            latency,
            perf,
        }
    }
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
        let h = &cfg.host_rules;
        RuleBook {
            cpu: arc(&cfg.cpu),
            memory: arc(&cfg.memory),
            swap: arc(&h.swap),
            iowait: arc(&h.iowait),
            steal: arc(&h.steal),
            cpu_core: arc(&h.cpu_core),
            load: arc(&h.load),
            disk: arc(&h.disk),
            inodes: arc(&h.inodes),
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
            active: cfg.active.iter().map(ActiveRules::new).collect(),
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
        self.host_readings(sample, &mut push);
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
        for (a, snap) in self.active.iter().zip(&sample.active) {
            // Before the first run finished there is nothing to say (silence, not UNKNOWN).
            let Some(last) = &snap.last else { continue };
            let (status, detail) = if snap.stale {
                (
                    None,
                    "no recent result: the check hangs or takes longer than its interval"
                        .to_owned(),
                )
            } else {
                let value = match last.state {
                    PluginState::Ok => Some(0.0),
                    PluginState::Warning => Some(1.0),
                    PluginState::Critical => Some(2.0),
                    PluginState::Unknown => None,
                };
                (value, last.message.clone())
            };
            push(
                format!("{}:{}", a.kind, a.name),
                &a.labels,
                "status",
                &a.status,
                status,
                Some(detail),
            );
            let fresh = |v: Option<f64>| if snap.stale { None } else { v };
            // Until the window holds enough results, the rates are not evaluated at all.
            let enough = snap.stale || snap.samples >= a.min_samples;
            if let Some(r) = a.error_rate.as_ref().filter(|_| enough) {
                push(
                    format!("http_error_rate:{}", a.name),
                    &a.labels,
                    "percent",
                    r,
                    fresh(snap.error_rate_pct),
                    None,
                );
            }
            if let Some(r) = a.latency.as_ref().filter(|_| enough) {
                push(
                    format!("http_latency:{}", a.name),
                    &a.labels,
                    "ms",
                    r,
                    fresh(snap.p95_ms),
                    None,
                );
            }
            for (label, rule) in &a.perf {
                let value = fresh(last.perf.iter().find(|(l, _)| l == label).map(|&(_, v)| v));
                let detail = value
                    .is_none()
                    .then(|| format!("the plugin reported no perfdata {label:?}"));
                push(
                    format!("exec:{}:{label}", a.name),
                    &a.labels,
                    "perfdata",
                    rule,
                    value,
                    detail,
                );
            }
        }
        out
    }
}

impl RuleBook {
    /// Swap, iowait, steal, per-core, load, disk and inode readings.
    fn host_readings(
        &self,
        sample: &Sample,
        push: &mut impl FnMut(
            String,
            &BTreeMap<String, String>,
            &'static str,
            &Arc<Rule>,
            Option<f64>,
            Option<String>,
        ),
    ) {
        let none = BTreeMap::new();
        let host = &sample.host;
        let cpu = host.cpu.as_ref();
        if let Some(r) = &self.iowait {
            push(
                "cpu_iowait".into(),
                &none,
                "percent",
                r,
                cpu.map(|c| c.iowait_pct),
                None,
            );
        }
        if let Some(r) = &self.steal {
            push(
                "cpu_steal".into(),
                &none,
                "percent",
                r,
                cpu.map(|c| c.steal_pct),
                None,
            );
        }
        if let (Some(r), Some(c)) = (&self.cpu_core, cpu) {
            for (n, v) in c.per_core_busy_pct.iter().enumerate() {
                // A core skipped this cycle (offline, counters reset) keeps its last state.
                if let Some(v) = v {
                    let labels = BTreeMap::from([("core".to_owned(), n.to_string())]);
                    push(
                        format!("cpu_core:{n}"),
                        &labels,
                        "percent",
                        r,
                        Some(*v),
                        None,
                    );
                }
            }
        }
        if let (Some(r), Some(m)) = (&self.swap, &host.memory)
            && let Some(pct) = m.swap_used_pct
        {
            push("swap".into(), &none, "percent", r, Some(pct), None);
        }
        if let Some(r) = &self.load {
            let per_core = host
                .load
                .as_ref()
                .filter(|l| l.cores > 0)
                .map(|l| l.one / l.cores as f64);
            push("load".into(), &none, "per core", r, per_core, None);
        }
        for d in &host.disks {
            let labels = BTreeMap::from([
                ("mount".to_owned(), d.mount.clone()),
                ("device".to_owned(), d.device.clone()),
                ("fstype".to_owned(), d.fstype.clone()),
            ]);
            if let Some(r) = &self.disk {
                push(
                    format!("disk:{}", d.mount),
                    &labels,
                    "percent",
                    r,
                    Some(d.used_pct),
                    None,
                );
            }
            if let (Some(r), Some(pct)) = (&self.inodes, d.inodes_used_pct) {
                push(
                    format!("inodes:{}", d.mount),
                    &labels,
                    "percent",
                    r,
                    Some(pct),
                    None,
                );
            }
        }
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
    /// A value was seen since the agent started, or a first result without a value was
    /// reported as UNKNOWN.
    observed: bool,
    /// Set by the agent itself ([`Checks::set_external`]), not from readings.
    external: bool,
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
                        external: false,
                    })
                }
            };
            c.generation = generation;
            c.rule = r.rule;
            evaluate_one(
                c,
                r.value,
                r.detail.as_deref(),
                now,
                wall_ms,
                Record::Result,
                &mut events,
            );
        }
        for c in self
            .map
            .values_mut()
            .filter(|c| c.generation != generation && !c.external)
        {
            evaluate_one(
                c,
                None,
                Some("no longer collected"),
                now,
                wall_ms,
                Record::Result,
                &mut events,
            );
        }
        events
    }

    /// Evaluates a sub-interval value of the check `name` (the `cpu` rule at a
    /// `cpu_step`): the same rule, state, `for`/`clear_for` timers and event as a cycle's
    /// evaluation, but no other check is touched and the flap history records no result
    /// (a state change is only noted, see [`evaluate::FlapDetector::note_change`]; the
    /// next cycle records the result). Returns the event when the state changed. A
    /// check no cycle has created yet is left alone.
    pub fn evaluate_step(
        &mut self,
        name: &str,
        value: f64,
        now: Duration,
        wall_ms: i64,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(c) = self.map.get_mut(name).filter(|c| !c.external) {
            evaluate_one(
                c,
                Some(value),
                None,
                now,
                wall_ms,
                Record::Step,
                &mut events,
            );
        }
        events
    }

    /// Sets the state of a check the agent decides itself (a recovery action's outcome),
    /// not evaluated from readings. Returns the event to commit: always when `state`
    /// changed, and also for an unchanged state when `always` (each run is news).
    #[allow(clippy::too_many_arguments)]
    pub fn set_external(
        &mut self,
        name: &str,
        labels: &BTreeMap<String, String>,
        state: State,
        message: String,
        always: bool,
        now: Duration,
        wall_ms: i64,
    ) -> Option<Event> {
        let c = self.map.entry(name.to_owned()).or_insert_with(|| {
            let restored = self.restored.remove(name);
            Check {
                name: name.to_owned(),
                labels: labels.clone(),
                unit: "status",
                rule: Arc::new(status_rule()),
                state: restored.map_or_else(
                    || RuleState::restored(State::Ok, now),
                    |(s, _)| RuleState::restored(s, now),
                ),
                value: Some(0.0),
                since_ms: restored.map_or(wall_ms, |(_, since)| since),
                flap: evaluate::FlapDetector::default(),
                generation: 0,
                observed: true,
                external: true,
            }
        });
        let previous = c.state.state;
        if previous == state && !always {
            return None;
        }
        if previous != state {
            c.state = RuleState::restored(state, now);
            c.since_ms = wall_ms;
        }
        c.value = Some(match state {
            State::Warning => 1.0,
            State::Critical => 2.0,
            _ => 0.0,
        });
        Some(Event {
            seq: 0,
            check: name.to_owned(),
            labels: labels.clone(),
            state,
            previous,
            value: c.value,
            unit: "status".to_owned(),
            threshold: None,
            message: format!("{name} {}: {message}", state.as_str()),
            observed_at_ms: wall_ms,
            breach_started_at_ms: if state.is_firing() { wall_ms } else { 0 },
            flapping: false,
        })
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

/// Whether an evaluation is one of the check's results (a cycle), which the flap
/// history records, or a sub-interval step in between, which only notes a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    Result,
    Step,
}

fn evaluate_one(
    c: &mut Check,
    value: Option<f64>,
    detail: Option<&str>,
    now: Duration,
    wall_ms: i64,
    record: Record,
    events: &mut Vec<Event>,
) {
    if record == Record::Step && value.is_none() {
        // A step without a value says nothing: UNKNOWN is the cycle's to decide.
        return;
    }
    // The first CPU cycle has no value yet: stay silent rather than report unknown (also
    // for a state restored from before a restart).
    if value.is_none() && (c.state.state == State::Unknown || !c.observed) {
        // But a first result without a value that says why (a plugin answering UNKNOWN
        // or hanging from its first run) is news, once: a check broken from the start
        // must not be invisible.
        if let Some(d) = detail
            && !c.observed
            && c.state.state == State::Unknown
        {
            c.observed = true;
            c.since_ms = wall_ms;
            events.push(Event {
                seq: 0,
                check: c.name.clone(),
                labels: c.labels.clone(),
                state: State::Unknown,
                previous: State::Unknown,
                value: None,
                unit: c.unit.to_owned(),
                threshold: None,
                message: format!("{} {}: {d}", c.name, State::Unknown.as_str()),
                observed_at_ms: wall_ms,
                breach_started_at_ms: 0,
                flapping: false,
            });
        }
        return;
    }
    c.observed |= value.is_some();
    c.value = value;
    let transition = evaluate::step(&c.rule, &mut c.state, value, now);
    let was_flapping = c.flap.is_flapping();
    let flapping = match record {
        Record::Result => c.flap.observe(c.state.state),
        Record::Step => {
            if transition.is_some() {
                c.flap.note_change();
            }
            was_flapping
        }
    };
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
                // Say where the check stands too: when it settles firing, this is the
                // message the held page carries.
                message: {
                    let now_text = match (c.unit, detail) {
                        ("status", Some(d)) => {
                            format!("{} {}: {d}", c.name, c.state.state.as_str())
                        }
                        (_, Some(d)) => format!(
                            "{} ({d})",
                            message(&c.name, c.unit, &c.rule, c.state.state, value, None)
                        ),
                        (_, None) => message(&c.name, c.unit, &c.rule, c.state.state, value, None),
                    };
                    format!(
                        "{now_text}; {note} ({:.0}% state changes)",
                        c.flap.change_pct()
                    )
                },
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
    let unit = match unit {
        "percent" => "%",
        "ms" => " ms",
        "MiB" => " MiB",
        _ => "",
    };
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
    /// Ticks per interval: every tick but each `cpu_steps`-th is a CPU step (one read
    /// of `/proc/stat`, only the `cpu` rule evaluated); 1 without sub-interval steps.
    cpu_steps: u32,
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
    /// `tocsin_cycle_duration_seconds`.
    cycle_seconds: prometheus_client::metrics::histogram::Histogram,
    /// pidfds of the watched processes: a death starts a cycle at once.
    deaths: DeathWatch,
    /// Monotonic time of the last cycle or CPU step, to notice gaps in observation.
    last_cycle: Option<Duration>,
    /// Latest results of the active checks.
    board: Board,
    /// Local recovery actions of the process watches.
    recoverers: Vec<Recoverer>,
    /// Finished recovery runs: (recoverer index, outcome).
    recovery_done: (
        mpsc::UnboundedSender<RunDone>,
        mpsc::UnboundedReceiver<RunDone>,
    ),
    /// Identity passed to recovery actions.
    agent_id: String,
    /// Finds new processes of the watches; `None` while a scan runs.
    discoverer: Option<Discoverer>,
    /// The scan in progress.
    discovery: Option<tokio::task::JoinHandle<(Discoverer, Found)>>,
    /// Monotonic time the last scan started.
    last_discovery: Option<Duration>,
    /// A scan should start at the next cycle (a process exited, a watch is short).
    discovery_wanted: bool,
    /// A finished scan not yet used by a cycle.
    scanned: Option<Result<(Discoverer, Found), tokio::task::JoinError>>,
}

/// The result of the scan in progress; pending forever when none runs.
async fn discovery_done(
    scan: &mut Option<tokio::task::JoinHandle<(Discoverer, Found)>>,
) -> Result<(Discoverer, Found), tokio::task::JoinError> {
    match scan {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// What the agent remembers from before a restart (read from the spool at start).
#[derive(Debug, Default)]
pub struct Restored {
    /// Check name → (state, since Unix ms).
    pub checks: HashMap<String, (State, i64)>,
    /// Watch name → Unix ms of its recovery runs, oldest first.
    pub recovery_runs: HashMap<String, Vec<i64>>,
}

/// A finished recovery run: (recoverer index, outcome).
type RunDone = (usize, crate::exec::Outcome);

/// Shortest time between the end of a recovery run and the next attempt while the
/// process is still down (the budget bounds the total).
pub const RECOVERY_RETRY_AFTER: Duration = Duration::from_secs(10);

/// One watch's local recovery action and its restart budget.
#[derive(Debug)]
struct Recoverer {
    /// Watch name.
    watch: String,
    /// The check that triggers it (`process:NAME`).
    check: String,
    /// The check that reports on it (`recovery:NAME`).
    name: String,
    labels: BTreeMap<String, String>,
    cfg: crate::config::Recovery,
    budget: crate::recovery::RestartBudget,
    running: bool,
    last_finished: Option<Duration>,
    exhausted: bool,
}

impl Collector {
    /// A collector for `cfg`, committing events to `spool` and publishing status on
    /// `status_tx`.
    pub fn new(
        cfg: &AgentConfig,
        sampler: Sampler,
        spool: SpoolHandle,
        status_tx: watch::Sender<Arc<Vec<CheckStatus>>>,
        metrics: &crate::admin::Metrics,
        restored: Restored,
        board: Board,
    ) -> Self {
        let wall = now_ms();
        // Steps only serve the `cpu` rule.
        let cpu_steps = if cfg.cpu.is_some() {
            cfg.cpu_steps.max(1)
        } else {
            1
        };
        let sampler = if cpu_steps > 1 {
            sampler.with_cpu_window(cfg.interval, cfg.interval / cpu_steps)
        } else {
            sampler
        };
        Collector {
            events_total: metrics.events.clone(),
            cycle_seconds: metrics.cycle_seconds.clone(),
            interval: cfg.interval,
            cpu_steps,
            sampler: Some(sampler),
            book: RuleBook::new(cfg),
            checks: Checks::with_restored(restored.checks),
            spool,
            status_tx,
            start: board.start(),
            backlog: Vec::new(),
            last_spool_error_log: None,
            deaths: DeathWatch::new(),
            last_cycle: None,
            board,
            recoverers: cfg
                .processes
                .iter()
                .filter_map(|p| {
                    let r = p.recover.clone()?;
                    let mut budget = crate::recovery::RestartBudget::new(r.max_runs, r.window);
                    let ages: Vec<Duration> = restored
                        .recovery_runs
                        .get(&p.name)
                        .map(|runs| {
                            runs.iter()
                                .map(|&at| {
                                    Duration::from_millis(u64::try_from(wall - at).unwrap_or(0))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    budget.restore(&ages, Duration::ZERO);
                    Some(Recoverer {
                        watch: p.name.clone(),
                        check: process_check(&p.name),
                        name: format!("recovery:{}", p.name),
                        labels: BTreeMap::from([("process".to_owned(), p.name.clone())]),
                        budget,
                        cfg: r,
                        running: false,
                        last_finished: None,
                        exhausted: false,
                    })
                })
                .collect(),
            recovery_done: mpsc::unbounded_channel(),
            agent_id: cfg.agent_id.clone(),
            discoverer: Some(Discoverer::new(cfg.processes.clone())),
            discovery: None,
            last_discovery: None,
            discovery_wanted: false,
            scanned: None,
        }
    }

    /// Samples every interval, and at once when a watched process exits, until
    /// `shutdown` is cancelled; in between, every `cpu_step`, re-evaluates the `cpu` rule
    /// on the busy percent over the last interval (see `Collector::cpu_step`).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval / self.cpu_steps);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            let mut step = false;
            let rediscover = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    step = !ticks.is_multiple_of(u64::from(self.cpu_steps));
                    ticks += 1;
                    false
                }
                pid = self.deaths.next_death() => {
                    tracing::debug!(pid, "watched process exited");
                    true
                }
                done = discovery_done(&mut self.discovery) => {
                    // New processes are counted at once, not at the next tick.
                    self.discovery = None;
                    self.scanned = Some(done);
                    false
                }
                Some((i, outcome)) = self.recovery_done.1.recv() => {
                    let events = self.recovery_finished(i, &outcome);
                    self.commit(events).await;
                    // The action may have started the replacement: look for it now.
                    true
                }
            };
            if step {
                self.cpu_step().await;
            } else if !self.cycle(rediscover).await {
                return;
            }
        }
    }

    /// One sub-interval step: reads the busy percent over the last interval (one
    /// `/proc/stat` read, inline: no blocking thread for a `/proc` read) and evaluates
    /// only the `cpu` rule with it; a state change is committed like a cycle's events.
    /// Silent without a value (warm-up, reset, read error): the next cycle decides.
    async fn cpu_step(&mut self) {
        let Some(value) = self.sampler.as_mut().and_then(Sampler::cpu_busy) else {
            return;
        };
        let now = self.start.elapsed();
        self.observed_at(now);
        let events = self.checks.evaluate_step("cpu", value, now, now_ms());
        if !events.is_empty() {
            self.commit(events).await;
        }
    }

    /// Notes an observation at `now`; after a pause longer than [`max_gap`] (the agent
    /// was stopped, the VM paused) the `for` timers restart.
    fn observed_at(&mut self, now: Duration) {
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
    }

    /// One sample-evaluate-commit cycle; false when sampling can no longer run.
    async fn cycle(&mut self, rediscover: bool) -> bool {
        let Some(mut sampler) = self.sampler.take() else {
            return false;
        };
        let now = self.start.elapsed();
        let began = Instant::now();
        let (found, first_scan) = self.discovery_step(now, rediscover).await;
        let joined = tokio::task::spawn_blocking(move || {
            // The very first scan runs before the first sample: a watched process must
            // not look absent for a cycle.
            let found = match first_scan {
                Some(mut d) => {
                    let f = d.scan();
                    return (sampler.sample(now, Some(f)), sampler, Some(d));
                }
                None => found,
            };
            (sampler.sample(now, found), sampler, None)
        })
        .await;
        let Ok((mut sample, sampler, first)) = joined else {
            tracing::error!("sampler thread panicked; collection stopped");
            return false;
        };
        if let Some(d) = first {
            self.discoverer = Some(d);
        }
        self.discovery_wanted = sampler.wants_discovery();
        self.sampler = Some(sampler);
        sample.active = self.board.snapshot(now);
        self.deaths
            .track(sample.processes.iter().flat_map(|p| p.pids.iter().copied()));
        self.observed_at(now);
        let wall = now_ms();
        let readings = self.book.readings(&sample);
        let mut events = self.checks.evaluate(readings, now, wall);
        let mut extra = Vec::new();
        self.recover(&events, now, wall, &mut extra);
        events.extend(extra);
        self.commit(events).await;
        self.cycle_seconds.observe(began.elapsed().as_secs_f64());
        true
    }

    /// Collects a finished process scan and starts the next one when due (every
    /// discovery period, after a watched process exited, or while a watch is short of
    /// its minimum). Returns the finished scan's result, or — before the first scan —
    /// the discoverer, to scan in line with the first sample.
    async fn discovery_step(
        &mut self,
        now: Duration,
        exited: bool,
    ) -> (Option<Found>, Option<Discoverer>) {
        let mut found = None;
        let finished = match self.scanned.take() {
            Some(done) => Some(done),
            None if self.discovery.as_ref().is_some_and(|h| h.is_finished()) => {
                match self.discovery.take() {
                    Some(handle) => Some(handle.await),
                    None => None,
                }
            }
            None => None,
        };
        if let Some(done) = finished {
            match done {
                Ok((d, f)) => {
                    self.discoverer = Some(d);
                    found = Some(f);
                }
                Err(e) => {
                    tracing::error!(error = %e, "process discovery failed; new processes are no longer found");
                }
            }
        }
        let Some(d) = self.discoverer.as_ref().filter(|d| d.is_needed()) else {
            return (found, None);
        };
        if self.last_discovery.is_none() {
            self.last_discovery = Some(now);
            return (found, self.discoverer.take());
        }
        let since = self
            .last_discovery
            .map_or(Duration::MAX, |t| now.saturating_sub(t));
        // A short watch is looked after at most once per sampling interval (a scan's end
        // starts a cycle: no back-to-back scanning while a process stays down).
        let due =
            exited || (self.discovery_wanted && since >= self.interval) || since >= d.period();
        if due && let Some(mut d) = self.discoverer.take() {
            self.last_discovery = Some(now);
            self.discovery = Some(tokio::task::spawn_blocking(move || {
                let f = d.scan();
                (d, f)
            }));
        }
        (found, None)
    }

    /// Starts recovery actions of watches whose count is critical, within their budgets;
    /// reports an exhausted budget once (CRITICAL) and a recovered watch (OK).
    fn recover(&mut self, events: &[Event], now: Duration, wall: i64, out: &mut Vec<Event>) {
        for i in 0..self.recoverers.len() {
            let r = &self.recoverers[i];
            let Some(state) = self.checks.get(&r.check).map(Check::state) else {
                continue;
            };
            // Act as soon as the breach starts: with a `for` on the watch, a restart that
            // works resolves it before anyone is paged (remediate, verify, then page).
            if !matches!(state, State::Critical | State::Pending) {
                if state == State::Ok {
                    let r = &mut self.recoverers[i];
                    r.exhausted = false;
                    // The process is back: a new crash is acted on at once.
                    r.last_finished = None;
                    let recovered = self
                        .checks
                        .get(&r.name)
                        .is_some_and(|c| c.state() != State::Ok);
                    if recovered
                        && let Some(e) = self.checks.set_external(
                            &r.name,
                            &r.labels,
                            State::Ok,
                            format!("process {} is running again", r.watch),
                            false,
                            now,
                            wall,
                        )
                    {
                        out.push(e);
                    }
                }
                continue;
            }
            if r.running
                || r.last_finished
                    .is_some_and(|t| now.saturating_sub(t) < RECOVERY_RETRY_AFTER)
            {
                continue;
            }
            let r = &mut self.recoverers[i];
            if !r.budget.try_acquire(now) {
                if !r.exhausted {
                    r.exhausted = true;
                    let again = r.budget.available_at(now).map_or_else(String::new, |t| {
                        format!(
                            "; next attempt allowed in {}s",
                            t.saturating_sub(now).as_secs()
                        )
                    });
                    let message = format!(
                        "restart budget exhausted ({} runs in {}): not acting, process {} is still down{again}",
                        r.cfg.max_runs,
                        crate::settings::format_duration(r.cfg.window),
                        r.watch
                    );
                    tracing::error!(watch = %r.watch, "{message}");
                    if let Some(e) = self.checks.set_external(
                        &r.name,
                        &r.labels,
                        State::Critical,
                        message,
                        true,
                        now,
                        wall,
                    ) {
                        out.push(e);
                    }
                }
                continue;
            }
            r.running = true;
            r.exhausted = false;
            let trigger = events.iter().find(|e| e.check == r.check);
            let mut env = vec![
                ("TOCSIN_NODE".to_owned(), self.agent_id.clone()),
                ("TOCSIN_CHECK".to_owned(), r.check.clone()),
                ("TOCSIN_PROCESS".to_owned(), r.watch.clone()),
                ("TOCSIN_STATE".to_owned(), state.as_str().to_owned()),
            ];
            if let Some(e) = trigger {
                env.push(("TOCSIN_MESSAGE".to_owned(), e.message.clone()));
                if let Some(v) = e.value {
                    env.push(("TOCSIN_VALUE".to_owned(), format!("{v}")));
                }
            }
            // The budget survives a restart of the agent (config changes need one).
            let spool = self.spool.clone();
            let watch = r.watch.clone();
            tokio::spawn(async move {
                if let Err(e) = spool.record_recovery(watch, wall).await {
                    tracing::warn!(error = %crate::telemetry::chain(&e), "cannot record the recovery run in the spool; after a restart the budget may allow it again");
                }
            });
            let mut spec = crate::exec::Spec::new(r.cfg.command.clone());
            spec.env = env;
            spec.timeout = r.cfg.timeout;
            // It may start the daemon itself: what it leaves running is the point.
            spec.keep_leftovers = true;
            tracing::info!(watch = %r.watch, command = ?r.cfg.command, "running the recovery action");
            let tx = self.recovery_done.0.clone();
            tokio::spawn(async move {
                let outcome = crate::exec::run(&spec).await;
                let _ = tx.send((i, outcome));
            });
        }
    }

    /// Records a finished recovery run as an event on `recovery:NAME`.
    fn recovery_finished(&mut self, i: usize, outcome: &crate::exec::Outcome) -> Vec<Event> {
        let now = self.start.elapsed();
        let wall = now_ms();
        let Some(r) = self.recoverers.get_mut(i) else {
            return Vec::new();
        };
        r.running = false;
        r.last_finished = Some(now);
        let took = format!("{:.1}s", outcome.duration.as_secs_f64());
        let program = r.cfg.command.first().cloned().unwrap_or_default();
        let first_line = |t: &str| t.lines().next().unwrap_or("").trim().to_owned();
        let (state, message) = match &outcome.status {
            crate::exec::ExitKind::Exited(0) => (
                State::Ok,
                format!("recovery action {program} succeeded in {took}"),
            ),
            crate::exec::ExitKind::Exited(code) => (
                State::Warning,
                format!(
                    "recovery action {program} failed with exit code {code} in {took}: {}",
                    first_line(&outcome.stderr)
                ),
            ),
            crate::exec::ExitKind::Signaled(sig) => (
                State::Warning,
                format!("recovery action {program} was killed by signal {sig} after {took}"),
            ),
            crate::exec::ExitKind::TimedOut => (
                State::Warning,
                format!(
                    "recovery action {program} timed out after {} and was killed",
                    crate::settings::format_duration(r.cfg.timeout)
                ),
            ),
            crate::exec::ExitKind::SpawnFailed(e) => (
                State::Warning,
                format!("recovery action could not start: {e}"),
            ),
        };
        if state == State::Ok {
            tracing::info!(watch = %r.watch, "{message}");
        } else {
            tracing::warn!(watch = %r.watch, "{message}");
        }
        let (name, labels) = (r.name.clone(), r.labels.clone());
        self.checks
            .set_external(&name, &labels, state, message, true, now, wall)
            .into_iter()
            .collect()
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
            host: crate::host::HostSample::default(),
            active: Vec::new(),
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
mod step_tests {
    use std::time::Duration;

    use super::*;
    use crate::evaluate::{Direction, Rule};

    fn book() -> RuleBook {
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
        RuleBook::new(&cfg)
    }

    fn sample(cpu: Option<f64>) -> Sample {
        Sample {
            cpu_busy_pct: cpu,
            memory_used_pct: None,
            processes: Vec::new(),
            host: crate::host::HostSample::default(),
            active: Vec::new(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One interval of 1 s from `start_ms`: steps at +200…+800 ms with `steps`, then the
    /// cycle at +1000 ms with `cycle`. Returns every event.
    fn interval(
        checks: &mut Checks,
        book: &RuleBook,
        start_ms: u64,
        steps: [f64; 4],
        cycle: f64,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for (k, v) in steps.into_iter().enumerate() {
            let at = start_ms + 200 * (k as u64 + 1);
            events.extend(checks.evaluate_step("cpu", v, ms(at), at as i64));
        }
        let at = start_ms + 1000;
        events.extend(checks.evaluate(book.readings(&sample(Some(cycle))), ms(at), at as i64));
        events
    }

    #[test]
    fn a_step_fires_between_cycles_through_the_same_rule() {
        let book = book();
        let mut checks = Checks::default();
        // Warm-up: the first cycle has no value; steps then have nothing to evaluate.
        assert!(
            checks
                .evaluate(book.readings(&sample(None)), ms(0), 0)
                .is_empty()
        );
        let ev = interval(&mut checks, &book, 0, [5.0, 5.0, 5.0, 5.0], 5.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].previous, ev[0].state), (State::Unknown, State::Ok));
        // The load starts: the step at 1.6 s sees the window above 90 %.
        let ev = interval(&mut checks, &book, 1000, [40.0, 70.0, 95.0, 100.0], 100.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].previous, ev[0].state), (State::Ok, State::Critical));
        assert_eq!(ev[0].observed_at_ms, 1600);
        assert_eq!(ev[0].breach_started_at_ms, 1600);
        assert_eq!(ev[0].message, "cpu critical: 95% above 90%");
        assert!(!ev[0].flapping);
        // It ends: the step at 2.4 s clears it.
        let ev = interval(&mut checks, &book, 2000, [95.0, 60.0, 20.0, 5.0], 5.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].state, ev[0].observed_at_ms), (State::Ok, 2400));
        // A check that no cycle created is left to the cycle.
        assert!(
            checks
                .evaluate_step("memory", 99.0, ms(3100), 3100)
                .is_empty()
        );
    }

    #[test]
    fn a_step_respects_for_and_clear_for_on_the_monotonic_clock() {
        let mut book = book();
        book.cpu = Some(Arc::new(Rule {
            hold_for: Duration::from_secs(1),
            clear_for: ms(500),
            ..(*book.cpu.clone().expect("cpu")).clone()
        }));
        let mut checks = Checks::default();
        checks.evaluate(book.readings(&sample(Some(5.0))), ms(0), 0);
        let ev = interval(&mut checks, &book, 0, [5.0, 95.0, 95.0, 95.0], 95.0);
        assert_eq!(ev.len(), 1, "pending at 0.4 s: {ev:?}");
        assert_eq!(ev[0].state, State::Pending);
        // 1 s after the breach began (0.4 s): the step at 1.4 s fires.
        let ev = interval(&mut checks, &book, 1000, [95.0, 95.0, 95.0, 95.0], 95.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].state, ev[0].observed_at_ms), (State::Critical, 1400));
        assert_eq!(ev[0].breach_started_at_ms, 400);
        // Cleared from 2.2 s; OK 500 ms later, at the step at 2.8 s.
        let ev = interval(&mut checks, &book, 2000, [50.0, 50.0, 50.0, 50.0], 50.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].state, ev[0].observed_at_ms), (State::Ok, 2800));
    }

    /// Per-interval alternation whose crossings a step sees first (mid-interval) is
    /// flapping exactly as before: a step's change counts for the next cycle's result.
    /// (Had steps recorded results of their own, half the entries would be no change,
    /// 50 %, and the check would never be called flapping.)
    #[test]
    fn steps_do_not_dilute_the_flap_history() {
        let book = book();
        let mut checks = Checks::default();
        let mut events = Vec::new();
        for i in 0..30u64 {
            let v = if i % 2 == 0 { 99.0 } else { 10.0 };
            let prev = if i % 2 == 0 { 10.0 } else { 99.0 };
            events.extend(interval(&mut checks, &book, 1000 * i, [prev, v, v, v], v));
        }
        let changes = events.iter().filter(|e| e.state != e.previous).count();
        assert_eq!(changes, 30, "one change per interval, at its step");
        let first = events.iter().position(|e| e.flapping).expect("flapping");
        // The 11th result (FLAP_MIN_SAMPLES) is the first that can say so.
        assert!(first <= 12, "{first}: {events:?}");
        let pct = checks.get("cpu").map(|c| c.flap.change_pct());
        assert!(pct.is_some_and(|p| p > 90.0), "{pct:?}");
    }

    /// Five evaluations per interval add no results: nine intervals of crossings back
    /// and forth at steps are, with the first cycle, ten results (fewer than
    /// FLAP_MIN_SAMPLES: not yet flapping), each one change however often the steps
    /// changed state; the eleventh result makes it flapping.
    #[test]
    fn steps_do_not_make_flapping_easier() {
        let book = book();
        let mut checks = Checks::default();
        checks.evaluate(book.readings(&sample(Some(5.0))), ms(0), 0);
        let mut events = Vec::new();
        for i in 0..9u64 {
            events.extend(interval(
                &mut checks,
                &book,
                1000 * i,
                [99.0, 5.0, 99.0, 5.0],
                5.0,
            ));
        }
        assert_eq!(events.len(), 36, "every step change is an event");
        assert!(events.iter().all(|e| !e.flapping), "10 results only");
        let ev = interval(&mut checks, &book, 9000, [99.0, 5.0, 99.0, 5.0], 5.0);
        let last = ev.last().expect("events");
        assert!(
            last.flapping && last.message.contains("started flapping"),
            "{ev:?}"
        );
        // One real incident seen by steps: never flapping.
        let mut checks = Checks::default();
        let mut events = Vec::new();
        checks.evaluate(book.readings(&sample(Some(5.0))), ms(0), 0);
        for i in 0..30u64 {
            let (steps, cycle) = match i {
                10 => ([5.0, 95.0, 99.0, 99.0], 99.0),
                11..=14 => ([99.0; 4], 99.0),
                15 => ([99.0, 40.0, 5.0, 5.0], 5.0),
                _ => ([5.0; 4], 5.0),
            };
            events.extend(interval(&mut checks, &book, 1000 * i, steps, cycle));
        }
        assert_eq!(events.len(), 2, "{events:?}");
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
            host: crate::host::HostSample::default(),
            active: Vec::new(),
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
    fn regression_a_check_unknown_from_its_first_result_is_reported_once() {
        let rule = Arc::new(status_rule());
        let mut checks = Checks::default();
        let reading = |v: Option<f64>, detail: Option<&str>| Reading {
            check: "exec:hang".into(),
            labels: BTreeMap::new(),
            unit: "status",
            rule: Arc::clone(&rule),
            value: v,
            detail: detail.map(str::to_owned),
        };
        let timed_out = Some("timed out after 1.0s");
        let ev = checks.evaluate(vec![reading(None, timed_out)], Duration::ZERO, 0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].state, State::Unknown);
        assert_eq!(ev[0].message, "exec:hang unknown: timed out after 1.0s");
        for i in 1..4 {
            let ev = checks.evaluate(vec![reading(None, timed_out)], Duration::from_secs(i), 0);
            assert!(ev.is_empty(), "reported once: {ev:?}");
        }
        let ev = checks.evaluate(
            vec![reading(Some(0.0), Some("OK"))],
            Duration::from_secs(5),
            0,
        );
        assert_eq!((ev[0].previous, ev[0].state), (State::Unknown, State::Ok));
        // Without a reason (CPU's first cycle) a missing value stays silent.
        let mut checks = Checks::default();
        assert!(
            checks
                .evaluate(vec![reading(None, None)], Duration::ZERO, 0)
                .is_empty()
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
