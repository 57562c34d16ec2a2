//! Threshold evaluation: a pure state machine per rule.
//!
//! Owns the decision "which state is this check in now", given a value, the rule and the
//! previous state. It does no I/O and reads no clock: callers pass `now` as a monotonic
//! [`Duration`] (time since the agent started), so every path is unit-tested exactly.
//! It does not own sampling (see `sample`) nor delivery (see `spool` and `ship`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The state of one check, as shipped in events and heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The value is within limits.
    Ok,
    /// The value breaches a level but has not held it for the rule's `for` duration yet.
    Pending,
    /// The warning level is breached (and held for `for`).
    Warning,
    /// The critical level is breached (and held for `for`).
    Critical,
    /// Collection failed or produced no value.
    Unknown,
}

impl State {
    /// Warning and critical are "firing": they open or keep an incident.
    pub fn is_firing(self) -> bool {
        matches!(self, State::Warning | State::Critical)
    }

    /// Lower-case name, as used in logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Pending => "pending",
            State::Warning => "warning",
            State::Critical => "critical",
            State::Unknown => "unknown",
        }
    }
}

/// Which side of a level is a breach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Breach when the value is strictly greater than the level (CPU %, latency).
    Above,
    /// Breach when the value is strictly less than the level (live process count).
    Below,
}

/// A validated threshold rule.
///
/// Invariants (checked by the config validation that builds it): at least one of
/// `warning`/`critical` is set; when both are set, `critical` is at least as severe as
/// `warning`; `clear` is on the non-breaching side of (or equal to) the lowest level.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Breach side.
    pub direction: Direction,
    /// Warning level, in the check's unit.
    pub warning: Option<f64>,
    /// Critical level, in the check's unit.
    pub critical: Option<f64>,
    /// How long a breach must hold before the state becomes warning/critical.
    pub hold_for: Duration,
    /// Level a firing check must get back past to clear (hysteresis). Defaults to the
    /// lowest configured level.
    pub clear: Option<f64>,
    /// How long the value must stay cleared before the state returns to OK.
    pub clear_for: Duration,
    /// Reaching a level is a breach (`>=`/`<=`), for counts such as "3 restarts per
    /// hour"; otherwise only passing it is (`>`/`<`), as for "CPU above 80 %".
    pub inclusive: bool,
}

impl Rule {
    fn breaches(&self, value: f64, level: Option<f64>) -> bool {
        match (level, self.direction, self.inclusive) {
            (None, ..) => false,
            (Some(l), Direction::Above, false) => value > l,
            (Some(l), Direction::Above, true) => value >= l,
            (Some(l), Direction::Below, false) => value < l,
            (Some(l), Direction::Below, true) => value <= l,
        }
    }

    /// The level a firing check must get back past: `clear`, else warning, else critical.
    pub fn clear_level(&self) -> Option<f64> {
        self.clear.or(self.warning).or(self.critical)
    }

    fn cleared(&self, value: f64) -> bool {
        match (self.clear_level(), self.direction, self.inclusive) {
            (None, ..) => true,
            (Some(l), Direction::Above, false) => value <= l,
            (Some(l), Direction::Above, true) => value < l,
            (Some(l), Direction::Below, false) => value >= l,
            (Some(l), Direction::Below, true) => value > l,
        }
    }
}

/// What the evaluator remembers about one check between samples.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleState {
    /// Current state.
    pub state: State,
    /// Monotonic time the current state was entered.
    pub since: Duration,
    /// Start of the current continuous warning-or-worse breach.
    warn_since: Option<Duration>,
    /// Start of the current continuous critical breach.
    crit_since: Option<Duration>,
    /// Start of the current continuous "cleared" stretch while firing.
    clear_since: Option<Duration>,
}

impl RuleState {
    /// The state of a check before its first evaluation: unknown, so the first real
    /// state is always reported.
    pub fn initial(now: Duration) -> Self {
        RuleState {
            state: State::Unknown,
            since: now,
            warn_since: None,
            crit_since: None,
            clear_since: None,
        }
    }

    /// Monotonic start of the current breach (warning or worse), if any.
    pub fn breach_since(&self) -> Option<Duration> {
        self.warn_since.or(self.crit_since)
    }

    /// Observation was interrupted until `now`: a breach (or a clearing stretch) in
    /// progress counts from `now`, so unobserved time never completes a `for`.
    pub fn restart_timers(&mut self, now: Duration) {
        for t in [
            &mut self.warn_since,
            &mut self.crit_since,
            &mut self.clear_since,
        ] {
            if t.is_some() {
                *t = Some(now);
            }
        }
    }

    /// A state restored from before an agent restart: `state` as it was, with any breach
    /// counting from `now` (a firing state stays firing; it does not go back to PENDING
    /// and does not fire again while the breach holds).
    pub fn restored(state: State, now: Duration) -> Self {
        let firing = state.is_firing();
        RuleState {
            state: if state == State::Pending {
                State::Ok
            } else {
                state
            },
            since: now,
            warn_since: firing.then_some(now),
            crit_since: (state == State::Critical).then_some(now),
            clear_since: None,
        }
    }
}

/// A state change produced by [`step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// The level that was crossed, for the event's `threshold` field.
    pub threshold: Option<f64>,
    /// Monotonic start of the breach that led here (None on recovery).
    pub breach_since: Option<Duration>,
}

/// Evaluates one new observation. `value` is `None` when collection failed.
///
/// Returns the transition when the state changed; `prev` is updated in place either way.
pub fn step(
    rule: &Rule,
    prev: &mut RuleState,
    value: Option<f64>,
    now: Duration,
) -> Option<Transition> {
    let Some(v) = value else {
        prev.warn_since = None;
        prev.crit_since = None;
        prev.clear_since = None;
        return set(prev, State::Unknown, None, now);
    };

    let breach_crit = rule.breaches(v, rule.critical);
    let breach_warn = breach_crit || rule.breaches(v, rule.warning);
    prev.crit_since = if breach_crit {
        prev.crit_since.or(Some(now))
    } else {
        None
    };
    prev.warn_since = if breach_warn {
        prev.warn_since.or(Some(now))
    } else {
        None
    };
    let held =
        |since: Option<Duration>| since.is_some_and(|s| now.saturating_sub(s) >= rule.hold_for);
    let crit_held = held(prev.crit_since);
    let warn_held = held(prev.warn_since);

    let firing = prev.state.is_firing();
    let cleared = firing && !breach_warn && rule.cleared(v);
    prev.clear_since = if cleared {
        prev.clear_since.or(Some(now))
    } else {
        None
    };

    let (next, threshold) = if firing {
        if crit_held || (prev.state == State::Critical && breach_crit) {
            (State::Critical, rule.critical)
        } else if cleared {
            let clear_held = prev
                .clear_since
                .is_some_and(|s| now.saturating_sub(s) >= rule.clear_for);
            if clear_held {
                (State::Ok, rule.clear_level())
            } else {
                (prev.state, None)
            }
        } else if rule.warning.is_some() {
            // Below critical but not cleared: in the warning band or the hysteresis band.
            (State::Warning, rule.warning)
        } else {
            (prev.state, None)
        }
    } else if crit_held {
        (State::Critical, rule.critical)
    } else if warn_held {
        (State::Warning, rule.warning)
    } else if breach_warn {
        (
            State::Pending,
            if breach_crit {
                rule.critical
            } else {
                rule.warning
            },
        )
    } else {
        (State::Ok, None)
    };
    set(prev, next, threshold, now)
}

fn set(
    prev: &mut RuleState,
    next: State,
    threshold: Option<f64>,
    now: Duration,
) -> Option<Transition> {
    if prev.state == next {
        return None;
    }
    let t = Transition {
        from: prev.state,
        to: next,
        threshold,
        breach_since: if next == State::Ok || next == State::Unknown {
            None
        } else {
            prev.breach_since()
        },
    };
    prev.state = next;
    prev.since = now;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn cpu(hold: u64) -> Rule {
        Rule {
            direction: Direction::Above,
            warning: Some(80.0),
            critical: Some(95.0),
            hold_for: s(hold),
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        }
    }

    /// Feeds (second, value) pairs and returns the states after each.
    fn run(rule: &Rule, seq: &[(u64, Option<f64>)]) -> Vec<State> {
        let mut st = RuleState::initial(Duration::ZERO);
        seq.iter()
            .map(|&(t, v)| {
                step(rule, &mut st, v, s(t));
                st.state
            })
            .collect()
    }

    #[test]
    fn first_value_reports_ok_from_unknown() {
        let mut st = RuleState::initial(Duration::ZERO);
        let t = step(&cpu(0), &mut st, Some(10.0), s(1)).expect("transition");
        assert_eq!((t.from, t.to), (State::Unknown, State::Ok));
        assert_eq!(step(&cpu(0), &mut st, Some(11.0), s(2)), None);
    }

    #[test]
    fn zero_is_a_value_not_unknown() {
        assert_eq!(run(&cpu(0), &[(1, Some(0.0))]), vec![State::Ok]);
    }

    #[test]
    fn level_is_exclusive() {
        assert_eq!(
            run(&cpu(0), &[(1, Some(80.0)), (2, Some(80.1))]),
            vec![State::Ok, State::Warning]
        );
    }

    #[test]
    fn no_hold_fires_at_once_with_the_right_level() {
        let states = run(
            &cpu(0),
            &[
                (1, Some(50.0)),
                (2, Some(90.0)),
                (3, Some(99.0)),
                (4, Some(10.0)),
            ],
        );
        assert_eq!(
            states,
            vec![State::Ok, State::Warning, State::Critical, State::Ok]
        );
    }

    #[test]
    fn breach_must_hold_for_the_for_duration() {
        let states = run(
            &cpu(3),
            &[
                (1, Some(99.0)),
                (2, Some(99.0)),
                (3, Some(99.0)),
                (4, Some(99.0)),
                (5, Some(99.0)),
            ],
        );
        assert_eq!(
            states,
            vec![
                State::Pending,
                State::Pending,
                State::Pending,
                State::Critical,
                State::Critical
            ]
        );
    }

    #[test]
    fn a_dip_restarts_the_for_timer() {
        let states = run(
            &cpu(2),
            &[
                (1, Some(99.0)),
                (2, Some(10.0)),
                (3, Some(99.0)),
                (4, Some(99.0)),
                (5, Some(99.0)),
            ],
        );
        assert_eq!(
            states,
            vec![
                State::Pending,
                State::Ok,
                State::Pending,
                State::Pending,
                State::Critical
            ]
        );
    }

    #[test]
    fn warning_held_while_critical_pending() {
        // Value jumps straight to the critical band: warning and critical timers start
        // together, so critical wins once the hold passes.
        let states = run(
            &cpu(2),
            &[
                (0, Some(85.0)),
                (2, Some(99.0)),
                (3, Some(99.0)),
                (4, Some(99.0)),
            ],
        );
        assert_eq!(
            states,
            vec![
                State::Pending,
                State::Warning,
                State::Warning,
                State::Critical
            ]
        );
    }

    #[test]
    fn hysteresis_keeps_firing_until_the_clear_level() {
        let rule = Rule {
            clear: Some(70.0),
            ..cpu(0)
        };
        let states = run(&rule, &[(1, Some(90.0)), (2, Some(75.0)), (3, Some(70.0))]);
        assert_eq!(states, vec![State::Warning, State::Warning, State::Ok]);
    }

    #[test]
    fn critical_steps_down_to_warning() {
        let states = run(&cpu(0), &[(1, Some(99.0)), (2, Some(85.0))]);
        assert_eq!(states, vec![State::Critical, State::Warning]);
    }

    #[test]
    fn clear_for_delays_recovery() {
        let rule = Rule {
            clear_for: s(2),
            ..cpu(0)
        };
        let states = run(
            &rule,
            &[
                (1, Some(99.0)),
                (2, Some(10.0)),
                (3, Some(10.0)),
                (4, Some(10.0)),
            ],
        );
        assert_eq!(
            states,
            vec![State::Critical, State::Critical, State::Critical, State::Ok]
        );
    }

    #[test]
    fn below_rule_for_process_count() {
        let rule = Rule {
            direction: Direction::Below,
            warning: None,
            critical: Some(1.0),
            hold_for: Duration::ZERO,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        };
        let states = run(&rule, &[(1, Some(1.0)), (2, Some(0.0)), (3, Some(2.0))]);
        assert_eq!(states, vec![State::Ok, State::Critical, State::Ok]);
    }

    #[test]
    fn inclusive_levels_fire_on_reaching_them() {
        let rule = Rule {
            direction: Direction::Above,
            warning: Some(3.0),
            critical: Some(10.0),
            hold_for: Duration::ZERO,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: true,
        };
        let states = run(
            &rule,
            &[
                (1, Some(2.0)),
                (2, Some(3.0)),
                (3, Some(10.0)),
                (4, Some(3.0)),
                (5, Some(2.0)),
            ],
        );
        assert_eq!(
            states,
            vec![
                State::Ok,
                State::Warning,
                State::Critical,
                State::Warning,
                State::Ok
            ]
        );
    }

    #[test]
    fn failed_collection_is_unknown_and_recovers() {
        let states = run(&cpu(0), &[(1, Some(99.0)), (2, None), (3, Some(10.0))]);
        assert_eq!(states, vec![State::Critical, State::Unknown, State::Ok]);
    }

    #[test]
    fn transition_carries_breach_start() {
        let mut st = RuleState::initial(Duration::ZERO);
        let rule = cpu(2);
        step(&rule, &mut st, Some(99.0), s(10));
        step(&rule, &mut st, Some(99.0), s(11));
        let t = step(&rule, &mut st, Some(99.0), s(12)).expect("fires");
        assert_eq!(t.to, State::Critical);
        assert_eq!(t.breach_since, Some(s(10)));
        assert_eq!(t.threshold, Some(95.0));
    }
}

/// Flap detection, Nagios-style: over the last [`FLAP_WINDOW`] evaluations, the weighted
/// share of evaluations whose state differed from the one before (recent changes weigh
/// more, from 0.8 for the oldest to 1.2 for the newest). A check starts flapping above
/// `high` percent and stops below `low` percent (hysteresis). Pure: the caller feeds it
/// every evaluated state.
///
/// A check evaluated more often than it records results (the `cpu` rule at every
/// `cpu_step`, while results are recorded once per interval) reports the state changes
/// in between with [`note_change`](Self::note_change): the next recorded result counts
/// as a change even when the state came back in the meantime. So each recorded result
/// is at most one change: evaluating five times per interval neither dilutes the
/// history (it still holds one result per interval) nor makes flapping easier (a
/// result cannot count as more than one change).
#[derive(Debug, Clone, PartialEq)]
pub struct FlapDetector {
    /// Recorded states, oldest first, each with whether it is a change from the one
    /// before (a different state, or a change noted in between).
    history: std::collections::VecDeque<(State, bool)>,
    /// A change noted since the last recorded result.
    noted: bool,
    flapping: bool,
    low: f64,
    high: f64,
}

/// Evaluations remembered by a [`FlapDetector`].
pub const FLAP_WINDOW: usize = 21;
/// Fewest recorded states before a check can be called flapping: half the window, so a
/// check that flaps from the start is recognised after about five pages, not ten.
pub const FLAP_MIN_SAMPLES: usize = 11;
/// Default percent state change below which a flapping check calms down.
pub const FLAP_LOW_PCT: f64 = 25.0;
/// Default percent state change above which a check is flapping.
pub const FLAP_HIGH_PCT: f64 = 50.0;

impl Default for FlapDetector {
    fn default() -> Self {
        FlapDetector::new(FLAP_LOW_PCT, FLAP_HIGH_PCT)
    }
}

impl FlapDetector {
    /// A detector with the given thresholds, percent (`low` ≤ `high`).
    pub fn new(low: f64, high: f64) -> Self {
        FlapDetector {
            history: std::collections::VecDeque::with_capacity(FLAP_WINDOW),
            noted: false,
            flapping: false,
            low,
            high,
        }
    }

    /// Records one evaluated state; returns whether the check is flapping now. Until
    /// [`FLAP_MIN_SAMPLES`] states are recorded nothing is called flapping (one incident,
    /// open then resolved, is never flapping).
    pub fn observe(&mut self, state: State) -> bool {
        let changed = std::mem::take(&mut self.noted)
            || self.history.back().is_some_and(|&(s, _)| s != state);
        if self.history.len() == FLAP_WINDOW {
            self.history.pop_front();
        }
        self.history.push_back((state, changed));
        if self.history.len() < FLAP_MIN_SAMPLES {
            return self.flapping;
        }
        let pct = self.change_pct();
        if self.flapping && pct < self.low {
            self.flapping = false;
        } else if !self.flapping && pct > self.high {
            self.flapping = true;
        }
        self.flapping
    }

    /// Weighted percent of state changes in the window.
    pub fn change_pct(&self) -> f64 {
        let n = self.history.len();
        if n < 2 {
            return 0.0;
        }
        let (mut changed, mut total) = (0.0, 0.0);
        for i in 1..n {
            let weight = 0.8 + 0.4 * (i - 1) as f64 / (n - 2).max(1) as f64;
            total += weight;
            if self.history[i].1 {
                changed += weight;
            }
        }
        changed * 100.0 / total
    }

    /// A state change between two recorded results (an evaluation that does not record
    /// one): the next [`observe`](Self::observe) counts as a change whatever its state.
    pub fn note_change(&mut self) {
        self.noted = true;
    }

    /// Whether the check is flapping.
    pub fn is_flapping(&self) -> bool {
        self.flapping
    }
}

#[cfg(test)]
mod flap_tests {
    use super::*;

    #[test]
    fn a_steady_check_never_flaps() {
        let mut f = FlapDetector::default();
        assert!((0..100).all(|_| !f.observe(State::Ok)));
    }

    #[test]
    fn alternating_states_flap_and_calm_down_with_hysteresis() {
        let mut f = FlapDetector::default();
        let mut flapped_at = None;
        for i in 0..40 {
            let s = if i % 2 == 0 {
                State::Critical
            } else {
                State::Ok
            };
            if f.observe(s) && flapped_at.is_none() {
                flapped_at = Some(i);
            }
        }
        assert_eq!(
            flapped_at,
            Some(FLAP_MIN_SAMPLES - 1),
            "flapping as soon as enough states are recorded"
        );
        // Settles: stays flapping while changes are still in the window, then stops.
        let mut calm_at = None;
        for i in 0..40 {
            if !f.observe(State::Ok) && calm_at.is_none() {
                calm_at = Some(i);
            }
        }
        let calm_at = calm_at.expect("calms down");
        assert!(
            calm_at > 5 && calm_at < FLAP_WINDOW,
            "hysteresis: {calm_at}"
        );
        assert!(!f.is_flapping());
    }

    #[test]
    fn changes_noted_between_results_count_once_per_result() {
        // A change that reverts between two recorded results still counts...
        let mut f = FlapDetector::default();
        for _ in 0..FLAP_MIN_SAMPLES {
            f.note_change();
            f.note_change();
            f.observe(State::Ok);
        }
        assert!(f.is_flapping(), "{}", f.change_pct());
        assert!((f.change_pct() - 100.0).abs() < 1e-9);
        // ...as one change only: any number of noted changes is at most 100 %.
        let mut f = FlapDetector::default();
        for i in 0..FLAP_WINDOW {
            if i % 3 == 0 {
                for _ in 0..5 {
                    f.note_change();
                }
            }
            f.observe(State::Ok);
        }
        assert!(f.change_pct() < 40.0, "{}", f.change_pct());
        assert!(!f.is_flapping());
        // A noted change that the recorded state also shows is not counted twice.
        let mut f = FlapDetector::default();
        f.observe(State::Ok);
        f.note_change();
        f.observe(State::Critical);
        f.observe(State::Critical);
        let mut g = FlapDetector::default();
        for s in [State::Ok, State::Critical, State::Critical] {
            g.observe(s);
        }
        assert_eq!(f.change_pct(), g.change_pct());
    }

    #[test]
    fn one_real_incident_is_not_flapping() {
        let mut f = FlapDetector::default();
        let states = [State::Ok; 10]
            .into_iter()
            .chain([State::Critical; 5])
            .chain([State::Ok; 10]);
        assert!(states.map(|s| f.observe(s)).all(|flapping| !flapping));
    }
}
