//! CPU usage from two readings of `/proc/stat`.

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

/// The previous `/proc/stat` counters, and a spare per-core buffer reused every cycle.
#[derive(Debug, Default)]
pub(super) struct CpuTracker {
    prev: Option<CpuTimes>,
    prev_cores: Vec<Option<CpuTimes>>,
    cores: Vec<Option<CpuTimes>>,
}

impl CpuTracker {
    /// Takes one `/proc/stat` text, returns the usage since the previous one and keeps
    /// this one's counters.
    ///
    /// # Errors
    /// A message when the text has no parsable `cpu` line; the previous counters are then
    /// kept, so the next good reading gives the usage over the longer interval.
    pub(super) fn update(&mut self, text: &str) -> Result<CpuReading, String> {
        let total = parse_stat(text, &mut self.cores)?;
        let online = self.cores.iter().filter(|c| c.is_some()).count();
        let mut note = None;
        let usage = match &self.prev {
            None => None,
            Some(prev) => match total.shares_since(prev) {
                None => {
                    if total != *prev {
                        note = Some(
                            "cpu: /proc/stat total counters went backwards (CPU hotplug?); \
                             usage skipped this cycle"
                                .to_owned(),
                        );
                    }
                    None
                }
                Some(all) => {
                    let per_core_busy_pct = self
                        .cores
                        .iter()
                        .enumerate()
                        .map(|(i, now)| {
                            let before = self.prev_cores.get(i).copied().flatten()?;
                            now.as_ref()?.shares_since(&before).map(|s| s.busy)
                        })
                        .collect();
                    Some(CpuUsage {
                        busy_pct: all.busy,
                        iowait_pct: all.iowait,
                        steal_pct: all.steal,
                        per_core_busy_pct,
                    })
                }
            },
        };
        self.prev = Some(total);
        std::mem::swap(&mut self.prev_cores, &mut self.cores);
        Ok(CpuReading {
            usage,
            online,
            note,
        })
    }
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
