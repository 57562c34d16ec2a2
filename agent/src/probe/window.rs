//! The rolling window of probe results behind a check's error rate (%) and P95 latency.
//!
//! Owns only arithmetic over pushed results: no clock (callers pass `now`, a monotonic
//! duration since agent start) and no thresholds.
//!
//! Cost: `push` is amortised O(1) (expired entries leave from the front); the error rate
//! and the length are O(log n) (binary search for the first live entry plus a running
//! error count); the P95 is O(n) (selection on a copy of the live latencies). Memory is
//! bounded by [`MAX_WINDOW_ENTRIES`].

use std::collections::VecDeque;
use std::time::Duration;

/// Most results one window keeps (≈ 48 bytes each, so at most ≈ 480 KB per check). A
/// check run every 10 s fills a 5 m window with 30; only a short interval with a long
/// window (100 ms over 1 h) reaches the cap, and then the window covers the latest
/// 10 000 results rather than the whole period.
pub const MAX_WINDOW_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the result was pushed (monotonic, since agent start).
    at: Duration,
    latency: Duration,
    /// Failed results pushed before this one (running count).
    errors_before: u64,
}

/// Results of one check over the last `window`: a result pushed at `t` counts at `now`
/// while `now - t < window`.
#[derive(Debug, Clone)]
pub struct RollingWindow {
    window: Duration,
    entries: VecDeque<Entry>,
    /// Failed results ever pushed.
    errors_total: u64,
}

impl RollingWindow {
    /// An empty window of length `window` (from the check's `window` setting).
    pub fn new(window: Duration) -> Self {
        RollingWindow {
            window,
            entries: VecDeque::new(),
            errors_total: 0,
        }
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Records one result at `now` (monotonic time since agent start; a `now` earlier
    /// than the last push is taken as the last push's time, so order is kept). A
    /// timed-out probe is pushed with `ok = false` and `latency` = its timeout. Drops
    /// results that left the window, and the oldest one when [`MAX_WINDOW_ENTRIES`]
    /// are held.
    pub fn push(&mut self, now: Duration, ok: bool, latency: Duration) {
        let at = self.entries.back().map_or(now, |last| now.max(last.at));
        while let Some(front) = self.entries.front() {
            if at.saturating_sub(front.at) >= self.window
                || self.entries.len() >= MAX_WINDOW_ENTRIES
            {
                self.entries.pop_front();
            } else {
                break;
            }
        }
        self.entries.push_back(Entry {
            at,
            latency,
            errors_before: self.errors_total,
        });
        if !ok {
            self.errors_total += 1;
        }
    }

    /// Index of the first entry still in the window at `now`.
    fn first_live(&self, now: Duration) -> usize {
        self.entries
            .partition_point(|e| now.saturating_sub(e.at) >= self.window)
    }

    /// Number of results in the window at `now`.
    pub fn len(&self, now: Duration) -> usize {
        self.entries.len() - self.first_live(now)
    }

    /// Whether the window holds no result at `now`.
    pub fn is_empty(&self, now: Duration) -> bool {
        self.len(now) == 0
    }

    /// Failed results as a percentage 0–100 of the results in the window at `now`;
    /// `None` when the window is empty.
    pub fn error_rate_pct(&self, now: Duration) -> Option<f64> {
        let first = self.first_live(now);
        let live = self.entries.len() - first;
        let errors = self.errors_total - self.entries.get(first)?.errors_before;
        Some(errors as f64 * 100.0 / live as f64)
    }

    /// Nearest-rank 95th percentile of the latencies in the window at `now`: the
    /// smallest latency that at least 95 % of the results do not exceed (the
    /// `ceil(0.95 × n)`-th smallest). Timeouts count with their timeout. `None` when the
    /// window is empty.
    pub fn p95(&self, now: Duration) -> Option<Duration> {
        let first = self.first_live(now);
        let mut latencies: Vec<Duration> = self.entries.range(first..).map(|e| e.latency).collect();
        if latencies.is_empty() {
            return None;
        }
        let rank = (95 * latencies.len()).div_ceil(100);
        let (_, p95, _) = latencies.select_nth_unstable(rank - 1);
        Some(*p95)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::{MAX_WINDOW_ENTRIES, RollingWindow};

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }
    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn empty_window_has_no_figures() {
        let w = RollingWindow::new(s(60));
        assert_eq!(w.error_rate_pct(s(0)), None);
        assert_eq!(w.p95(s(0)), None);
        assert_eq!(w.len(s(0)), 0);
        assert!(w.is_empty(s(0)));
    }

    #[test]
    fn error_rate_and_p95_of_twenty_results() {
        let mut w = RollingWindow::new(s(300));
        for i in 0..20u64 {
            // Latencies 1..=20 ms; results 3 and 7 failed.
            w.push(s(i), i != 3 && i != 7, ms(i + 1));
        }
        assert_eq!(w.len(s(19)), 20);
        assert_eq!(w.error_rate_pct(s(19)), Some(10.0));
        // ceil(0.95 × 20) = 19th smallest.
        assert_eq!(w.p95(s(19)), Some(ms(19)));
    }

    #[test]
    fn p95_nearest_rank() {
        let mut w = RollingWindow::new(s(3600));
        w.push(s(0), true, ms(42));
        assert_eq!(w.p95(s(0)), Some(ms(42)));
        let mut w = RollingWindow::new(s(3600));
        // Pushed in reverse so that order of arrival does not matter.
        for i in (1..=100u64).rev() {
            w.push(s(0), true, ms(i));
        }
        assert_eq!(w.p95(s(0)), Some(ms(95)));
        w.push(s(0), false, s(10)); // a timeout: 101 results, rank ceil(95.95) = 96
        assert_eq!(w.p95(s(0)), Some(ms(96)));
    }

    #[test]
    fn old_results_leave_the_window() {
        let mut w = RollingWindow::new(s(10));
        w.push(s(0), false, ms(900));
        w.push(s(5), true, ms(100));
        assert_eq!(w.error_rate_pct(ms(9_999)), Some(50.0));
        assert_eq!(w.p95(ms(9_999)), Some(ms(900)));
        // At 10 s the first result is 10 s old: out.
        assert_eq!(w.len(s(10)), 1);
        assert_eq!(w.error_rate_pct(s(10)), Some(0.0));
        assert_eq!(w.p95(s(10)), Some(ms(100)));
        assert_eq!(w.error_rate_pct(s(15)), None);
        assert_eq!(w.p95(s(15)), None);
        // Pushing later drops the expired entries for good.
        w.push(s(30), false, ms(5));
        assert_eq!(w.entries.len(), 1);
        assert_eq!(w.error_rate_pct(s(30)), Some(100.0));
    }

    #[test]
    fn time_going_backwards_keeps_order() {
        let mut w = RollingWindow::new(s(10));
        w.push(s(20), true, ms(1));
        w.push(s(5), false, ms(2));
        assert_eq!(w.len(s(20)), 2);
        assert_eq!(w.error_rate_pct(s(29)), Some(50.0));
        assert_eq!(w.len(s(30)), 0);
    }

    #[test]
    fn memory_is_capped() {
        let mut w = RollingWindow::new(s(86_400));
        w.push(s(0), false, ms(1));
        for _ in 0..MAX_WINDOW_ENTRIES {
            w.push(s(1), true, ms(1));
        }
        assert_eq!(w.len(s(1)), MAX_WINDOW_ENTRIES);
        // The failed result was the oldest and was dropped.
        assert_eq!(w.error_rate_pct(s(1)), Some(0.0));
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(
            results in proptest::collection::vec((0u64..5_000, any::<bool>(), 0u64..10_000), 1..200),
            window_ms in 1u64..20_000,
            later in 0u64..20_000,
        ) {
            let mut w = RollingWindow::new(ms(window_ms));
            let mut at = 0;
            let mut pushed = Vec::new();
            for (step, ok, latency) in results {
                at += step;
                w.push(ms(at), ok, ms(latency));
                pushed.push((at, ok, latency));
            }
            let now = at + later;
            let live: Vec<_> = pushed.iter().filter(|(t, _, _)| now - t < window_ms).collect();
            prop_assert_eq!(w.len(ms(now)), live.len());
            if live.is_empty() {
                prop_assert_eq!(w.error_rate_pct(ms(now)), None);
                prop_assert_eq!(w.p95(ms(now)), None);
            } else {
                let errors = live.iter().filter(|(_, ok, _)| !ok).count();
                let rate = w.error_rate_pct(ms(now)).expect("rate");
                prop_assert!((rate - errors as f64 * 100.0 / live.len() as f64).abs() < 1e-9);
                // Definition: the smallest latency that at least 95 % do not exceed.
                let lat: Vec<u64> = live.iter().map(|(_, _, l)| *l).collect();
                let p95 = lat
                    .iter()
                    .copied()
                    .filter(|&v| lat.iter().filter(|&&l| l <= v).count() * 100 >= 95 * lat.len())
                    .min();
                prop_assert_eq!(w.p95(ms(now)), p95.map(ms));
            }
        }
    }
}
