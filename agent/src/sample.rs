//! Sampling with `sysinfo`: CPU busy %, memory used % and watched processes.
//!
//! Owns one long-lived [`sysinfo::System`] (CPU usage is a difference between two
//! refreshes, so a fresh `System` per sample would always read 0). It does not evaluate
//! thresholds; it only turns the kernel's counters into values with units. Refreshing is
//! blocking work: callers run [`Sampler::sample`] on a blocking thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::time::Duration;

use sysinfo::{
    MemoryRefreshKind, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System, UpdateKind,
};

use crate::config::ProcessWatch;

/// One sampling cycle's values.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Busy percent 0–100 of all cores, from /proc/stat via sysinfo. `None` on the first
    /// cycle (a usage needs two readings) — never a fake 0.
    pub cpu_busy_pct: Option<f64>,
    /// Used percent 0–100 = (MemTotal − MemAvailable) / MemTotal, from /proc/meminfo via
    /// sysinfo; page cache is not "used". `None` when the total reads 0.
    pub memory_used_pct: Option<f64>,
    /// One entry per watch, in config order.
    pub processes: Vec<ProcessSample>,
}

/// What one process watch saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    /// The watch's name.
    pub name: String,
    /// Live matching processes (zombies are not live).
    pub count: u32,
    /// New process identities (PID + start time) seen within the watch's restart window.
    pub restarts_in_window: u32,
    /// PIDs of the live matching processes, ascending.
    pub pids: Vec<u32>,
}

/// Per-watch memory between cycles.
#[derive(Debug, Default)]
struct WatchState {
    /// (PID, start time in s since boot): a reused PID is a new process.
    known: HashSet<(u32, u64)>,
    /// Monotonic times of restarts, oldest first, pruned to the window.
    restarts: VecDeque<Duration>,
    /// Whether the first cycle happened (processes present then are not restarts).
    primed: bool,
}

/// The sampler; see the module docs.
#[derive(Debug)]
pub struct Sampler {
    sys: System,
    watches: Vec<ProcessWatch>,
    states: Vec<WatchState>,
    cpu_primed: bool,
}

/// sysinfo could not initialise (e.g. /proc is not mounted).
#[derive(Debug, thiserror::Error)]
#[error("cannot read system information: {0}")]
pub struct SamplerError(String);

impl Sampler {
    /// A sampler for the given watches.
    ///
    /// # Errors
    /// [`SamplerError`] when sysinfo cannot read the system.
    pub fn new(watches: Vec<ProcessWatch>) -> Result<Self, SamplerError> {
        let sys = System::new().map_err(|e| SamplerError(e.to_string()))?;
        let states = watches.iter().map(|_| WatchState::default()).collect();
        Ok(Sampler {
            sys,
            watches,
            states,
            cpu_primed: false,
        })
    }

    /// Refreshes and returns the current values. `now` is the monotonic time of this
    /// cycle, used for restart windows.
    pub fn sample(&mut self, now: Duration) -> Sample {
        self.sys.refresh_cpu_usage();
        let cpu_busy_pct = if self.cpu_primed {
            Some(f64::from(self.sys.global_cpu_usage()).clamp(0.0, 100.0))
        } else {
            self.cpu_primed = true;
            None
        };

        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = self.sys.total_memory();
        let memory_used_pct = (total > 0).then(|| {
            let used = total.saturating_sub(self.sys.available_memory());
            used as f64 * 100.0 / total as f64
        });

        let processes = if self.watches.is_empty() {
            Vec::new()
        } else {
            self.sample_processes(now)
        };
        Sample {
            cpu_busy_pct,
            memory_used_pct,
            processes,
        }
    }

    fn sample_processes(&mut self, now: Duration) -> Vec<ProcessSample> {
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .without_tasks()
                .with_exe(UpdateKind::OnlyIfNotSet)
                .with_cmd(UpdateKind::OnlyIfNotSet),
        );
        let mut live: HashMap<usize, Vec<(u32, u64)>> = HashMap::new();
        for (pid, p) in self.sys.processes() {
            if p.thread_kind().is_some() || p.status() == ProcessStatus::Zombie {
                continue;
            }
            for (i, w) in self.watches.iter().enumerate() {
                if matches_name(
                    &w.name,
                    p.name(),
                    p.exe().and_then(|e| e.file_name()),
                    p.cmd().first(),
                ) {
                    live.entry(i)
                        .or_default()
                        .push((pid.as_u32(), p.start_time()));
                }
            }
        }
        let mut out = Vec::with_capacity(self.watches.len());
        for (i, w) in self.watches.iter().enumerate() {
            let st = &mut self.states[i];
            let ids = live.remove(&i).unwrap_or_default();
            let current: HashSet<(u32, u64)> = ids.iter().copied().collect();
            if st.primed {
                for _ in current.difference(&st.known) {
                    st.restarts.push_back(now);
                }
            }
            st.primed = true;
            st.known = current;
            while st
                .restarts
                .front()
                .is_some_and(|&t| now.saturating_sub(t) > w.restarts_window)
            {
                st.restarts.pop_front();
            }
            let mut pids: Vec<u32> = ids.iter().map(|&(pid, _)| pid).collect();
            pids.sort_unstable();
            out.push(ProcessSample {
                name: w.name.clone(),
                count: u32::try_from(pids.len()).unwrap_or(u32::MAX),
                restarts_in_window: u32::try_from(st.restarts.len()).unwrap_or(u32::MAX),
                pids,
            });
        }
        out
    }
}

/// A process matches a watch name when its executable's file name, its `argv[0]` file
/// name or (for names that fit the kernel's 15-byte `comm`) its process name is equal.
fn matches_name(
    name: &str,
    comm: &OsStr,
    exe_file: Option<&OsStr>,
    argv0: Option<&std::ffi::OsString>,
) -> bool {
    let name = OsStr::new(name);
    exe_file == Some(name)
        || argv0.is_some_and(|a| std::path::Path::new(a).file_name() == Some(name))
        || (name.len() <= 15 && comm == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_matching() {
        let n = OsStr::new;
        assert!(matches_name("nginx", n("nginx"), None, None));
        assert!(matches_name(
            "a-very-long-daemon-name",
            n("a-very-long-dae"),
            Some(n("a-very-long-daemon-name")),
            None
        ));
        assert!(!matches_name(
            "a-very-long-daemon-name",
            n("a-very-long-dae"),
            None,
            None
        ));
        assert!(!matches_name(
            "nginx",
            n("bash"),
            Some(n("bash")),
            Some(&"bash".into())
        ));
        assert!(matches_name(
            "worker",
            n("python3"),
            Some(n("python3.11")),
            Some(&"/opt/worker".into())
        ));
    }

    #[test]
    fn first_cpu_sample_is_withheld_then_real() {
        let mut s = Sampler::new(Vec::new()).expect("sysinfo");
        let first = s.sample(Duration::ZERO);
        assert_eq!(first.cpu_busy_pct, None);
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL * 2);
        let second = s.sample(Duration::from_secs(1));
        let cpu = second.cpu_busy_pct.expect("second sample has a value");
        assert!((0.0..=100.0).contains(&cpu));
        let mem = second.memory_used_pct.expect("memory");
        assert!(mem > 0.0 && mem < 100.0, "{mem}");
    }
}
