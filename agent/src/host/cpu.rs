//! CPU usage from two readings of `/proc/stat`.

use std::time::Duration;

/// CPU usage over the interval between two samples, from `/proc/stat`.
///
/// With Δ the counter differences between the two readings and
/// Δtotal = user + nice + system + idle + iowait + irq + softirq + steal (guest and
/// guest_nice are already counted inside user and nice, so they are not added again):
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUsage {
    /// Busy percent 0–100 of all cores: 100 × (Δtotal − Δidle − Δiowait) / Δtotal, from
    /// the `cpu` line. Time waiting for I/O is not busy (it is reported as `iowait_pct`).
    pub busy_pct: f64,
    /// Percent 0–100 of all cores' time spent idle with I/O outstanding: 100 × Δiowait /
    /// Δtotal. The kernel's iowait is approximate; use it as a hint, not a measure.
    pub iowait_pct: f64,
    /// Percent 0–100 of all cores' time the hypervisor ran something else while this VM
    /// wanted to run: 100 × Δsteal / Δtotal. 0 on bare metal.
    pub steal_pct: f64,
    /// Busy percent 0–100 per core, indexed by the CPU number `N` of the `cpuN` lines.
    /// `None` for a core that is offline now, was offline at the previous reading (its
    /// line is missing in one of them) or whose counters went backwards: such a core is
    /// skipped for this cycle rather than reported with a made-up value.
    pub per_core_busy_pct: Vec<Option<f64>>,
}

/// One `cpu`/`cpuN` line, in USER_HZ ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct CpuTimes {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
}

/// Shares of one interval, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shares {
    busy: f64,
    iowait: f64,
    steal: f64,
}

impl CpuTimes {
    /// Parses the numbers after `cpu`/`cpuN`. Kernels before 2.6.11 print fewer fields
    /// (no steal; before 2.5.41 no iowait/irq/softirq): missing trailing fields are 0.
    /// At least user, nice, system and idle are required.
    fn parse(fields: &str) -> Option<CpuTimes> {
        let mut it = fields.split_ascii_whitespace().map(str::parse::<u64>);
        let mut next = |required: bool| match it.next() {
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => None,
            None if required => None,
            None => Some(0),
        };
        Some(CpuTimes {
            user: next(true)?,
            nice: next(true)?,
            system: next(true)?,
            idle: next(true)?,
            iowait: next(false)?,
            irq: next(false)?,
            softirq: next(false)?,
            steal: next(false)?,
        })
    }

    /// Whether no counter is higher than in `later`.
    fn at_most(&self, later: &CpuTimes) -> bool {
        self.user <= later.user
            && self.nice <= later.nice
            && self.system <= later.system
            && self.idle <= later.idle
            && self.iowait <= later.iowait
            && self.irq <= later.irq
            && self.softirq <= later.softirq
            && self.steal <= later.steal
    }

    /// Shares of the interval from `prev` to `self`; `None` when any counter went
    /// backwards (hotplug, wrap) or no time passed.
    fn shares_since(&self, prev: &CpuTimes) -> Option<Shares> {
        let d = |now: u64, before: u64| now.checked_sub(before);
        let user = d(self.user, prev.user)?;
        let nice = d(self.nice, prev.nice)?;
        let system = d(self.system, prev.system)?;
        let idle = d(self.idle, prev.idle)?;
        let iowait = d(self.iowait, prev.iowait)?;
        let irq = d(self.irq, prev.irq)?;
        let softirq = d(self.softirq, prev.softirq)?;
        let steal = d(self.steal, prev.steal)?;
        let total = [user, nice, system, idle, iowait, irq, softirq, steal]
            .into_iter()
            .try_fold(0u64, u64::checked_add)?;
        if total == 0 {
            return None;
        }
        let pct = |part: u64| (part as f64 * 100.0 / total as f64).clamp(0.0, 100.0);
        Some(Shares {
            busy: pct(total - idle - iowait),
            iowait: pct(iowait),
            steal: pct(steal),
        })
    }
}

/// Highest CPU number accepted from a `cpuN` line; the kernel's NR_CPUS is at most 8192.
/// Guards the per-core vector against a garbled huge number.
const MAX_CPU_INDEX: usize = 65_535;

/// What one `/proc/stat` reading gave.
#[derive(Debug)]
pub(super) struct CpuReading {
    /// Usage since the previous reading (see [`super::HostSample::cpu`]).
    pub(super) usage: Option<CpuUsage>,
    /// Number of `cpuN` lines: the online CPUs.
    pub(super) online: usize,
    /// Why `usage` is `None` when that is worth telling.
    pub(super) note: Option<String>,
}

/// The `/proc/stat` readings CPU usage is a difference of.
///
/// The aggregate (`cpu` line) busy, iowait and steal percentages are taken over a
/// sliding window: the tracker keeps a small ring of (monotonic time, counters) readings
/// and compares each new reading with the newest kept reading that is at least
/// `window − slack` old (see [`set_window`](Self::set_window)). With the default window
/// of zero that is simply the previous reading (one value per call, as `diagnose` and
/// the tests use it); the agent sets the window to its `interval` and the slack to half
/// a `cpu_step`, and reads the aggregate line every step ([`step`](Self::step)), so the
/// busy percent over the last interval is known every step instead of once per
/// interval.
///
/// Per-core values stay per call of [`update`](Self::update) (the agent's cycle): each
/// core is compared with its counters at the previous `update`, not at a step.
///
/// Ring arithmetic:
/// - warm-up: until some kept reading is old enough, there is no value (`None`) —
///   never a value over a shorter span, never a fake 0 from a first reading;
/// - readings older than the chosen baseline are dropped (a later reading never
///   reaches further back), and a reading less than `slack` after the newest one
///   replaces it (an extra cycle right after a step), so the ring holds at most about
///   2 × (window / step) + 3 readings and never grows after the first interval;
/// - any aggregate counter lower than in the newest reading (CPU hotplug, wrap) empties
///   the ring and starts over from the new reading, with a note: the next value comes
///   one window later.
#[derive(Debug, Default)]
pub(super) struct CpuTracker {
    /// Aggregate readings, oldest first, counters non-decreasing.
    ring: std::collections::VecDeque<(Duration, CpuTimes)>,
    /// Span a value covers; zero: since the previous reading.
    window: Duration,
    /// Tolerance for timer jitter: a baseline may be this much younger than `window`,
    /// and a reading this close to the newest one replaces it.
    slack: Duration,
    /// Why the ring was emptied by a [`step`](Self::step), for the next `update`.
    note: Option<String>,
    prev_cores: Vec<Option<CpuTimes>>,
    cores: Vec<Option<CpuTimes>>,
}

/// Message of a reset of the ring by counters going backwards.
const BACKWARDS: &str = "cpu: /proc/stat total counters went backwards (CPU hotplug?); \
                         usage skipped this cycle";

impl CpuTracker {
    /// Values cover `window` (monotonic time between two readings), give or take
    /// `slack` of timer jitter; `slack` should be half the time between readings.
    /// Keeps the readings already taken.
    pub(super) fn set_window(&mut self, window: Duration, slack: Duration) {
        self.window = window;
        self.slack = slack.min(window / 2);
        // Enough for every reading of one window at half-slack spacing: no
        // reallocation once running.
        let steps = if slack.is_zero() {
            1
        } else {
            usize::try_from(window.as_nanos() / slack.as_nanos()).unwrap_or(64)
        };
        self.ring.reserve(steps.min(256) + 4);
    }

    /// Takes one `/proc/stat` text read at monotonic time `now`, returns the usage over
    /// the window (aggregate) and since the previous `update` (per core), and keeps this
    /// one's counters.
    ///
    /// # Errors
    /// A message when the text has no parsable `cpu` line; the previous counters are then
    /// kept, so the next good reading gives the usage over the longer interval.
    pub(super) fn update_at(&mut self, text: &str, now: Duration) -> Result<CpuReading, String> {
        let total = parse_stat(text, &mut self.cores)?;
        let online = self.cores.iter().filter(|c| c.is_some()).count();
        let usage = self.push(now, total).map(|all| {
            let per_core_busy_pct = self
                .cores
                .iter()
                .enumerate()
                .map(|(i, now)| {
                    let before = self.prev_cores.get(i).copied().flatten()?;
                    now.as_ref()?.shares_since(&before).map(|s| s.busy)
                })
                .collect();
            CpuUsage {
                busy_pct: all.busy,
                iowait_pct: all.iowait,
                steal_pct: all.steal,
                per_core_busy_pct,
            }
        });
        std::mem::swap(&mut self.prev_cores, &mut self.cores);
        Ok(CpuReading {
            usage,
            online,
            note: self.note.take(),
        })
    }

    /// [`update_at`](Self::update_at) with every reading at the same time: for a tracker
    /// with a zero window, where time does not matter.
    #[cfg(test)]
    pub(super) fn update(&mut self, text: &str) -> Result<CpuReading, String> {
        self.update_at(text, Duration::ZERO)
    }

    /// A sub-interval reading: only the aggregate `cpu` line is parsed; returns the busy
    /// percent over the window, `None` during warm-up or after a reset.
    ///
    /// # Errors
    /// A message when the text has no parsable `cpu` line (the ring is kept).
    pub(super) fn step(&mut self, text: &str, now: Duration) -> Result<Option<f64>, String> {
        let total = parse_total(text)?;
        Ok(self.push(now, total).map(|s| s.busy))
    }

    /// Keeps `total` (read at `now`) in the ring; the shares since the baseline.
    fn push(&mut self, now: Duration, total: CpuTimes) -> Option<Shares> {
        if let Some((_, newest)) = self.ring.back()
            && !newest.at_most(&total)
        {
            self.ring.clear();
            self.note = Some(BACKWARDS.to_owned());
        }
        let reach = self.window.saturating_sub(self.slack);
        // The newest reading old enough to span the window.
        let baseline = self
            .ring
            .iter()
            .rposition(|&(t, _)| t <= now && now - t >= reach);
        let shares = baseline.and_then(|i| total.shares_since(&self.ring[i].1));
        if let Some(i) = baseline {
            self.ring.drain(..i);
        }
        // Never the baseline (index 0): it is at least `reach` ≥ `slack` old.
        let len = self.ring.len();
        match self.ring.back_mut() {
            Some(newest) if len > 1 && now.saturating_sub(newest.0) < self.slack => {
                *newest = (now, total);
            }
            _ => self.ring.push_back((now, total)),
        }
        shares
    }

    /// Readings kept (for tests of the ring's bounds).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.ring.len()
    }
}

/// Parses only the aggregate `cpu` line of `/proc/stat` (the first `cpu` line).
///
/// # Errors
/// A message when there is no parsable aggregate `cpu` line.
fn parse_total(text: &str) -> Result<CpuTimes, String> {
    text.lines()
        .skip_while(|l| !l.starts_with("cpu"))
        .take_while(|l| l.starts_with("cpu"))
        .find_map(|l| {
            let rest = l.strip_prefix("cpu")?;
            rest.starts_with([' ', '\t'])
                .then(|| CpuTimes::parse(rest))
                .flatten()
        })
        .ok_or_else(|| "no parsable aggregate \"cpu\" line".to_owned())
}

/// Parses `/proc/stat`: returns the aggregate `cpu` line and fills `cores` (cleared
/// first) with the `cpuN` lines at index N, `None` for numbers without a line. A
/// malformed `cpuN` line leaves that core `None`.
///
/// # Errors
/// A message when there is no parsable aggregate `cpu` line.
pub(super) fn parse_stat(
    text: &str,
    cores: &mut Vec<Option<CpuTimes>>,
) -> Result<CpuTimes, String> {
    cores.clear();
    let mut total = None;
    let mut seen_cpu = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            // The cpu lines come first; the rest (intr, softirq…) can be long.
            if seen_cpu {
                break;
            }
            continue;
        };
        seen_cpu = true;
        if rest.starts_with([' ', '\t']) {
            total = CpuTimes::parse(rest);
            continue;
        }
        let (num, fields) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        let Ok(n) = num.parse::<usize>() else {
            continue;
        };
        if n > MAX_CPU_INDEX {
            continue;
        }
        if cores.len() <= n {
            cores.resize(n + 1, None);
        }
        cores[n] = CpuTimes::parse(fields);
    }
    total.ok_or_else(|| "no parsable aggregate \"cpu\" line".to_owned())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A `/proc/stat` text with the given aggregate and per-core fields (None = offline).
    fn stat(total: &str, cores: &[Option<&str>]) -> String {
        let mut s = format!("cpu  {total}\n");
        for (i, c) in cores.iter().enumerate() {
            if let Some(c) = c {
                s.push_str(&format!("cpu{i} {c}\n"));
            }
        }
        s.push_str("intr 12345 0 0 1 2\nctxt 999\nbtime 1700000000\nprocesses 42\n");
        s.push_str("procs_running 1\nprocs_blocked 0\nsoftirq 1 2 3\n");
        s
    }

    fn usage(t: &mut CpuTracker, text: &str) -> Option<CpuUsage> {
        t.update(text).expect("parses").usage
    }

    #[test]
    fn first_reading_has_no_usage_then_exact_shares() {
        let mut t = CpuTracker::default();
        let r = t
            .update(&stat(
                "100 0 100 700 100 0 0 0 0 0",
                &[Some("1 0 1 7 1 0 0 0 0 0")],
            ))
            .expect("parses");
        assert_eq!(r.usage, None, "one reading cannot give a usage");
        assert_eq!(r.online, 1);
        assert_eq!(r.note, None);
        // Δ: user 100, system 50, idle 300, iowait 50, steal 0 → total 500.
        let u = usage(
            &mut t,
            &stat(
                "200 0 150 1000 150 0 0 0 0 0",
                &[Some("2 0 1 8 1 0 0 0 0 0")],
            ),
        )
        .expect("second reading");
        assert!((u.busy_pct - 30.0).abs() < 1e-9, "{u:?}");
        assert!((u.iowait_pct - 10.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.steal_pct, 0.0);
        // core 0: Δ user 1, idle 1 → 50 %.
        assert_eq!(u.per_core_busy_pct, vec![Some(50.0)]);
    }

    #[test]
    fn guest_time_is_not_counted_twice() {
        // guest (9th field) is already inside user: a Δguest of 100 with Δuser 100 and
        // Δidle 100 is 50 % busy, not 66 %.
        let mut t = CpuTracker::default();
        usage(&mut t, &stat("0 0 0 0 0 0 0 0 0 0", &[]));
        let u = usage(&mut t, &stat("100 0 0 100 0 0 0 0 100 0", &[])).expect("usage");
        assert!((u.busy_pct - 50.0).abs() < 1e-9, "{u:?}");
    }

    #[test]
    fn steal_irq_softirq_and_nice() {
        let mut t = CpuTracker::default();
        usage(&mut t, &stat("0 0 0 0 0 0 0 0 0 0", &[]));
        // Δ nice 10, irq 10, softirq 10, steal 20, idle 50 → total 100: busy 50 (steal
        // is busy from the guest's view: the CPU was not available to it).
        let u = usage(&mut t, &stat("0 10 0 50 0 10 10 20 0 0", &[])).expect("usage");
        assert!((u.busy_pct - 50.0).abs() < 1e-9, "{u:?}");
        assert!((u.steal_pct - 20.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.iowait_pct, 0.0);
    }

    #[test]
    fn old_kernel_with_four_fields() {
        let mut t = CpuTracker::default();
        usage(&mut t, &stat("10 0 10 80", &[Some("10 0 10 80")]));
        let u = usage(&mut t, &stat("20 0 20 140", &[Some("20 0 20 140")])).expect("usage");
        assert!((u.busy_pct - 25.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.per_core_busy_pct, vec![Some(25.0)]);
    }

    #[test]
    fn a_core_going_offline_and_back_is_skipped_not_garbage() {
        // Every line moves by n busy + 2n idle ticks per step: 33.3 % busy.
        let c = |n: u64| format!("{n} 0 0 {} 0 0 0 0 0 0", 2 * n);
        let mut t = CpuTracker::default();
        let mut step = 0;
        let mut next = |t: &mut CpuTracker, cores: &[bool]| {
            step += 100;
            let lines: Vec<Option<String>> = cores.iter().map(|&on| on.then(|| c(step))).collect();
            let refs: Vec<Option<&str>> = lines.iter().map(Option::as_deref).collect();
            let r = t.update(&stat(&c(step * 4), &refs)).expect("parses");
            let per = r.usage.map(|u| u.per_core_busy_pct);
            (per, r.online)
        };
        let third = Some(100.0 / 3.0);
        let (per, online) = next(&mut t, &[true; 4]);
        assert_eq!((per, online), (None, 4));
        // cpu2 goes offline.
        let (per, online) = next(&mut t, &[true, true, false, true]);
        assert_eq!(online, 3);
        assert_eq!(per.expect("usage"), vec![third, third, None, third]);
        // cpu3 goes offline too: the vector is shorter.
        let (per, online) = next(&mut t, &[true, true]);
        assert_eq!(online, 2);
        assert_eq!(per.expect("usage"), vec![third, third]);
        // Both come back: no previous reading for them → None this cycle.
        let (per, online) = next(&mut t, &[true; 4]);
        assert_eq!(online, 4);
        assert_eq!(per.expect("usage"), vec![third, third, None, None]);
        let (per, _) = next(&mut t, &[true; 4]);
        assert_eq!(per.expect("usage"), vec![third; 4]);
    }

    #[test]
    fn counters_going_backwards_skip_the_value_for_that_cycle() {
        let mut t = CpuTracker::default();
        usage(
            &mut t,
            &stat(
                "100 0 100 100 0 0 0 0 0 0",
                &[Some("50 0 0 50"), Some("50 0 0 50")],
            ),
        );
        // cpu1's idle went backwards: only cpu1 is skipped.
        let u = usage(
            &mut t,
            &stat(
                "200 0 200 200 0 0 0 0 0 0",
                &[Some("100 0 0 100"), Some("100 0 0 10")],
            ),
        )
        .expect("aggregate still fine");
        assert_eq!(u.per_core_busy_pct[0], Some(50.0));
        assert_eq!(u.per_core_busy_pct[1], None);
        // The aggregate idle went backwards: no usage at all this cycle, with a note.
        let r = t
            .update(&stat(
                "300 0 300 300 0 0 0 0 0 0",
                &[Some("150 0 150 150"), Some("1 0 1 1")],
            ))
            .expect("parses");
        assert!(r.usage.is_some());
        let r = t
            .update(&stat(
                "400 0 400 200 0 0 0 0 0 0",
                &[Some("200 0 200 200"), Some("2 0 2 2")],
            ))
            .expect("parses");
        assert_eq!(r.usage, None);
        assert!(r.note.expect("note").contains("backwards"));
        // …and the cycle after compares with that reading, not the older one.
        let u = usage(
            &mut t,
            &stat(
                "500 0 500 300 0 0 0 0 0 0",
                &[Some("250 0 250 250"), Some("3 0 3 3")],
            ),
        )
        .expect("usage again");
        assert!((u.busy_pct - 200.0 / 3.0).abs() < 1e-9, "{u:?}");
    }

    #[test]
    fn no_time_passed_is_none_without_a_note() {
        let mut t = CpuTracker::default();
        let s = stat("1 2 3 4 5 6 7 8 0 0", &[]);
        usage(&mut t, &s);
        let r = t.update(&s).expect("parses");
        assert_eq!(r.usage, None);
        assert_eq!(r.note, None);
    }

    #[test]
    fn unparsable_stat_is_an_error_and_keeps_the_previous_reading() {
        let mut t = CpuTracker::default();
        usage(&mut t, &stat("0 0 0 0 0 0 0 0 0 0", &[]));
        assert!(t.update("intr 1 2 3\n").is_err());
        assert!(t.update("cpu  x y z w\n").is_err());
        assert!(t.update("").is_err());
        let u = usage(&mut t, &stat("10 0 0 10 0 0 0 0 0 0", &[])).expect("usage");
        assert!((u.busy_pct - 50.0).abs() < 1e-9);
    }

    #[test]
    fn garbled_core_lines_are_skipped() {
        let mut cores = Vec::new();
        let text = "cpu  1 1 1 1\ncpu0 1 1 1 1\ncpuX 1 1 1 1\ncpu1 a b c d\n\
                    cpu99999999999999999999 1 1 1 1\ncpu3 1 1\ncpu4 1 1 1 1 1 1 1 1 1 1 1 1\n";
        parse_stat(text, &mut cores).expect("aggregate parses");
        assert_eq!(cores.len(), 5);
        assert!(cores[0].is_some());
        assert_eq!(cores[1], None);
        assert_eq!(cores[2], None);
        assert_eq!(cores[3], None, "too few fields");
        assert!(
            cores[4].is_some(),
            "extra fields of future kernels are ignored"
        );
    }

    #[test]
    fn real_proc_stat_parses() {
        let text = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
        let mut cores = Vec::new();
        parse_stat(&text, &mut cores).expect("parses");
        let online = cores.iter().filter(|c| c.is_some()).count();
        assert!(online >= 1);
        let listed = text
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        assert_eq!(online, listed);
    }

    /// A `/proc/stat` text whose aggregate line has `busy` user and `idle` idle ticks.
    fn agg(busy: u64, idle: u64) -> String {
        stat(&format!("{busy} 0 0 {idle} 0 0 0 0 0 0"), &[])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A tracker over a 1 s window read every 200 ms, as the agent's default.
    fn sliding() -> CpuTracker {
        let mut t = CpuTracker::default();
        t.set_window(ms(1000), ms(100));
        t
    }

    #[test]
    fn sliding_window_warms_up_then_covers_one_window_at_every_step() {
        let mut t = sliding();
        // 20 ticks per 200 ms step: idle until 1 s, then fully busy.
        let (mut busy, mut idle) = (0, 0);
        let mut values = Vec::new();
        for k in 0..=15u64 {
            if k > 0 {
                if k <= 5 {
                    idle += 20;
                } else {
                    busy += 20;
                }
            }
            let v = if k % 5 == 0 {
                t.update_at(&agg(busy, idle), ms(200 * k))
                    .expect("parses")
                    .usage
                    .map(|u| u.busy_pct)
            } else {
                t.step(&agg(busy, idle), ms(200 * k)).expect("parses")
            };
            values.push(v);
        }
        // Warm-up: nothing until a reading one window old exists — no fake 0.
        assert!(values[..5].iter().all(Option::is_none), "{values:?}");
        // Then every step is the busy share of the last 1 s: 0, 20, 40, … 100 %.
        let pct: Vec<f64> = values[5..].iter().map(|v| v.expect("value")).collect();
        let want = [
            0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0,
        ];
        for (got, want) in pct.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{pct:?}");
        }
        // The ring stays bounded: the baseline and the readings since.
        assert!(t.kept() <= 7, "{}", t.kept());
    }

    #[test]
    fn late_timers_and_extra_readings_keep_the_window_about_one_interval() {
        let mut t = sliding();
        // 10 ticks per 100 ms, always 50 % busy; readings at irregular times.
        let at = |ms_: u64| agg(ms_ / 20, ms_ / 20);
        for m in [0, 200, 400, 610, 800] {
            assert_eq!(t.step(&at(m), ms(m)).expect("parses"), None, "{m}");
        }
        // 960 ms: the 0 ms reading is within half a step of a full window.
        assert_eq!(t.step(&at(960), ms(960)).expect("parses"), Some(50.0));
        // Extra readings close together (a cycle right after a step) are coalesced.
        for m in [1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070, 1080, 1090] {
            t.step(&at(m), ms(m)).expect("parses");
        }
        assert!(t.kept() <= 8, "{}", t.kept());
        // The window never shrinks below window − slack: at 1700 ms the 850 ms reading
        // is too young (850 ms < 900 ms), so the baseline is the 400 ms one.
        let mut t = sliding();
        let counters = [(0, 0), (400, 10_000), (850, 20_000), (1700, 20_010)];
        for (m, busy) in counters {
            let v = t.step(&agg(busy, m / 10), ms(m)).expect("parses");
            if m == 1700 {
                // From the 400 ms reading (1.3 s old): Δbusy 10010, Δidle 130.
                let want = 10_010.0 * 100.0 / 10_140.0;
                assert!((v.expect("value") - want).abs() < 1e-9, "{v:?}");
            }
        }
    }

    #[test]
    fn counters_going_backwards_restart_the_window_with_a_note() {
        let mut t = sliding();
        for k in 0..=5u64 {
            t.step(&agg(10 * k, 10 * k), ms(200 * k)).expect("parses");
        }
        assert_eq!(t.step(&agg(60, 60), ms(1200)).expect("parses"), Some(50.0));
        // A CPU went offline: the aggregate counters drop. No value, and none until a
        // new reading is a window old.
        assert_eq!(t.step(&agg(30, 30), ms(1400)).expect("parses"), None);
        assert_eq!(t.kept(), 1);
        for k in 1..5u64 {
            let v = t
                .step(&agg(30 + 20 * k, 30), ms(1400 + 200 * k))
                .expect("parses");
            assert_eq!(v, None, "warming up again");
        }
        // The next full reading says why it was skipped, and gives the value from the
        // reset on: 100 % busy since then.
        let r = t.update_at(&agg(130, 30), ms(2400)).expect("parses");
        assert!(r.note.expect("note").contains("backwards"));
        assert_eq!(r.usage.map(|u| u.busy_pct), Some(100.0));
        let r = t.update_at(&agg(150, 30), ms(2600)).expect("parses");
        assert_eq!(r.note, None, "reported once");
    }

    #[test]
    fn per_core_values_stay_per_update_while_steps_slide_the_aggregate() {
        let mut t = sliding();
        let line = |n: u64| format!("{n} 0 0 {n} 0 0 0 0 0 0");
        let text = |n: u64| stat(&line(2 * n), &[Some(&line(n)), Some(&line(n))]);
        t.update_at(&text(0), ms(0)).expect("parses");
        for k in 1..5u64 {
            t.step(&text(10 * k), ms(200 * k)).expect("parses");
        }
        let u = t
            .update_at(&text(50), ms(1000))
            .expect("parses")
            .usage
            .expect("usage");
        assert_eq!(u.busy_pct, 50.0);
        assert_eq!(u.per_core_busy_pct, vec![Some(50.0), Some(50.0)]);
        // Steps do not disturb the per-core baseline: it is the previous update's.
        for k in 6..10u64 {
            t.step(&text(10 * k), ms(200 * k)).expect("parses");
        }
        let u = t
            .update_at(&text(100), ms(2000))
            .expect("parses")
            .usage
            .expect("usage");
        assert_eq!(u.per_core_busy_pct, vec![Some(50.0), Some(50.0)]);
        // A step of an unparsable text is an error and keeps the ring.
        assert!(t.step("intr 1 2\n", ms(2100)).is_err());
        assert_eq!(t.step(&text(110), ms(2200)).expect("parses"), Some(50.0));
    }

    proptest! {
        /// Whatever the counters do, sliding values are None or in 0–100, and the ring
        /// never holds more than one window's readings (plus a few).
        #[test]
        fn sliding_values_are_in_range_and_the_ring_bounded(
            steps in proptest::collection::vec((0u64..400, 0u64..50, 0u64..50, any::<bool>()), 1..200),
        ) {
            let mut t = sliding();
            let (mut now, mut busy, mut idle) = (0u64, 0u64, 0u64);
            for (dt, db, di, back) in steps {
                now += dt;
                if back {
                    busy = busy.saturating_sub(db);
                } else {
                    busy += db;
                    idle += di;
                }
                if let Some(v) = t.step(&agg(busy, idle), ms(now)).expect("parses") {
                    prop_assert!((0.0..=100.0).contains(&v), "{v}");
                }
                prop_assert!(t.kept() <= 2 * 5 + 3, "{}", t.kept());
            }
        }
    }

    proptest! {
        /// Whatever the counters do between two readings, every value is None or a
        /// percentage in 0–100, and nothing panics.
        #[test]
        fn values_are_none_or_in_range(
            a in proptest::collection::vec(proptest::collection::vec(any::<u64>(), 10), 1..5),
            b in proptest::collection::vec(proptest::collection::vec(any::<u64>(), 10), 1..5),
            small in proptest::collection::vec(proptest::collection::vec(0u64..1000, 10), 1..5),
        ) {
            let line = |v: &Vec<u64>| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
            let text = |rows: &Vec<Vec<u64>>| {
                let mut s = format!("cpu  {}\n", line(&rows[0]));
                for (i, r) in rows.iter().enumerate().skip(1) {
                    s.push_str(&format!("cpu{} {}\n", i - 1, line(r)));
                }
                s
            };
            let mut t = CpuTracker::default();
            for rows in [&a, &b, &small, &a] {
                let r = t.update(&text(rows)).expect("parses");
                if let Some(u) = r.usage {
                    for v in [u.busy_pct, u.iowait_pct, u.steal_pct] {
                        prop_assert!((0.0..=100.0).contains(&v), "{v}");
                    }
                    for v in u.per_core_busy_pct.into_iter().flatten() {
                        prop_assert!((0.0..=100.0).contains(&v), "{v}");
                    }
                }
            }
        }
    }
}
