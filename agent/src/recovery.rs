//! Restart budgets for local recovery actions: "at most N runs in any window of M".
//!
//! Owns only the counting. It does not run anything (see `exec`) nor decide when a
//! recovery is wanted. Like `evaluate`, it reads no clock: callers pass `now` as a
//! monotonic [`Duration`] (time since the agent started), so it is tested exactly.

use std::collections::VecDeque;
use std::time::Duration;

/// A sliding-window budget: at most `max_runs` acquisitions in any window of length
/// `window`. A run acquired at `t` counts against the budget for `[t, t + window)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartBudget {
    max_runs: u32,
    window: Duration,
    /// Monotonic times of the runs still inside the window, oldest first.
    runs: VecDeque<Duration>,
}

impl RestartBudget {
    /// A budget of `max_runs` runs per `window`. `max_runs == 0` never allows a run; a zero
    /// `window` always does (no run stays counted).
    pub fn new(max_runs: u32, window: Duration) -> Self {
        RestartBudget {
            max_runs,
            window,
            runs: VecDeque::new(),
        }
    }

    /// Counts runs that happened before the agent started, `ages` ago (oldest first):
    /// each counts from `now − age`, or from `now` when that would be before the
    /// monotonic origin — the budget never allows more than it would have.
    pub fn restore(&mut self, ages: &[Duration], now: Duration) {
        for &age in ages {
            if age < self.window {
                self.runs.push_back(now.saturating_sub(age));
            }
        }
    }

    /// The configured maximum runs per window.
    pub fn max_runs(&self) -> u32 {
        self.max_runs
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Takes one run from the budget at monotonic time `now` if one is left, and returns
    /// whether it did. A refused attempt does not count.
    pub fn try_acquire(&mut self, now: Duration) -> bool {
        while self.runs.front().is_some_and(|&t| !self.counts(t, now)) {
            self.runs.pop_front();
        }
        if self.used(now) >= self.max_runs {
            return false;
        }
        self.runs.push_back(now);
        true
    }

    /// Runs still allowed at `now` (0 to `max_runs`).
    pub fn remaining(&self, now: Duration) -> u32 {
        self.max_runs.saturating_sub(self.used(now))
    }

    /// No run is allowed at `now`.
    pub fn exhausted(&self, now: Duration) -> bool {
        self.remaining(now) == 0
    }

    /// Monotonic time from which a run will be allowed again: `now` when one is allowed
    /// now, `None` when `max_runs` is 0 (never).
    pub fn available_at(&self, now: Duration) -> Option<Duration> {
        if self.max_runs == 0 {
            return None;
        }
        if !self.exhausted(now) {
            return Some(now);
        }
        // Exhausted: the oldest counted run must leave the window first.
        let counted: Vec<Duration> = self
            .runs
            .iter()
            .copied()
            .filter(|&t| self.counts(t, now))
            .collect();
        let excess = counted.len() + 1 - self.max_runs as usize;
        counted
            .get(excess - 1)
            .map(|&t| t.saturating_add(self.window))
    }

    /// A run at `t` still counts at `now` (a `now` earlier than `t`, from a caller mixing
    /// clocks, counts it: the safe side).
    fn counts(&self, t: Duration, now: Duration) -> bool {
        now.saturating_sub(t) < self.window
    }

    fn used(&self, now: Duration) -> u32 {
        let n = self.runs.iter().filter(|&&t| self.counts(t, now)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn allows_n_runs_then_refuses() {
        let mut b = RestartBudget::new(3, 10 * MIN);
        assert_eq!(b.remaining(at(0)), 3);
        assert!(b.try_acquire(at(0)));
        assert!(b.try_acquire(at(60)));
        assert_eq!(b.remaining(at(60)), 1);
        assert!(b.try_acquire(at(120)));
        assert!(b.exhausted(at(120)));
        assert!(!b.try_acquire(at(180)));
        assert_eq!(b.remaining(at(180)), 0);
    }

    #[test]
    fn window_slides_run_by_run() {
        let mut b = RestartBudget::new(2, 10 * MIN);
        assert!(b.try_acquire(at(0)));
        assert!(b.try_acquire(at(300)));
        assert!(!b.try_acquire(at(599)));
        assert_eq!(b.available_at(at(599)), Some(at(600)));
        // The run at 0 leaves the window at exactly 600 s.
        assert!(b.try_acquire(at(600)));
        assert!(!b.try_acquire(at(899)));
        assert_eq!(b.available_at(at(899)), Some(at(900)));
        assert!(b.try_acquire(at(900)));
    }

    #[test]
    fn refused_attempts_do_not_count() {
        let mut b = RestartBudget::new(1, MIN);
        assert!(b.try_acquire(at(0)));
        for s in 1..60 {
            assert!(!b.try_acquire(at(s)));
        }
        assert!(b.try_acquire(at(60)));
    }

    #[test]
    fn zero_runs_never_allows() {
        let mut b = RestartBudget::new(0, MIN);
        assert!(b.exhausted(at(0)));
        assert!(!b.try_acquire(at(0)));
        assert_eq!(b.available_at(at(0)), None);
    }

    #[test]
    fn zero_window_always_allows() {
        let mut b = RestartBudget::new(1, Duration::ZERO);
        assert!(b.try_acquire(at(0)));
        assert!(b.try_acquire(at(0)));
        assert_eq!(b.remaining(at(0)), 1);
    }

    #[test]
    fn remaining_does_not_change_the_budget() {
        let mut b = RestartBudget::new(2, MIN);
        assert!(b.try_acquire(at(0)));
        assert_eq!(b.remaining(at(100)), 2);
        // Reading at a later time did not drop the run for an earlier `now`.
        assert_eq!(b.remaining(at(30)), 1);
    }

    proptest! {
        /// At most N runs fall in any window [t, t + M) and every refusal happened when N
        /// runs were already in [now - M, now].
        #[test]
        fn never_more_than_n_in_any_window(
            max in 1u32..5,
            window_s in 1u64..100,
            steps in proptest::collection::vec(0u64..40, 1..200),
        ) {
            let window = at(window_s);
            let mut b = RestartBudget::new(max, window);
            let mut now = Duration::ZERO;
            let mut granted: Vec<Duration> = Vec::new();
            for step in steps {
                now += at(step);
                let in_window = granted.iter().filter(|&&t| now - t < window).count();
                let ok = b.try_acquire(now);
                prop_assert_eq!(ok, in_window < max as usize);
                if ok {
                    granted.push(now);
                }
            }
            for &start in &granted {
                let n = granted.iter().filter(|&&t| t >= start && t - start < window).count();
                prop_assert!(n <= max as usize);
            }
        }
    }

    #[test]
    fn runs_before_a_restart_still_count() {
        let m = Duration::from_secs(60);
        let mut b = RestartBudget::new(2, m * 10);
        b.restore(&[m * 20, m * 3, m], Duration::ZERO);
        assert_eq!(b.remaining(Duration::ZERO), 0, "two runs within the window");
        assert!(!b.try_acquire(Duration::from_secs(1)));
        assert!(b.try_acquire(m * 10 + Duration::from_secs(1)));
    }
}
