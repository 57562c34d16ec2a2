//! A hook run's processes, found by its **run key** and killed: the processes that
//! escaped its process group (`setsid`, a double fork into a new session) when the run
//! ends, and every process of a run the last aggregator left running (killed with
//! `kill -9`, crashed, the machine's OOM killer) when the aggregator starts again.
//!
//! Every run gets a random key (`hook_runs.run_key`, 128 bits as 32 hex digits) in its
//! environment as `TOCSIN_RUN_KEY`, stored before the process starts. Children inherit
//! the environment, so a process belongs to run `key` when
//! - its initial environment (`/proc/PID/environ`) holds `TOCSIN_RUN_KEY=key` — true of
//!   the hook's program and of every descendant that did not clear or replace its
//!   environment, whatever session or process group it moved to; or
//! - it is in the process group of such a process that leads its group (a descendant
//!   that cleared its environment but stayed in the hook's group).
//!
//! A process is signalled through a pidfd opened *before* it is checked, so a PID reused
//! between the check and the kill is never signalled (without pidfd, Linux < 5.3, a
//! plain `kill` follows the check: a window of microseconds).
//!
//! Limits (documented in `packaging/examples/aggregator.toml`): a descendant that
//! cleared its environment **and** left the hook's process group is not found; nor is
//! one whose environment cannot be read (another user: a setuid program, a hook that
//! changes user) — the aggregator is normally the only user whose processes carry its
//! keys. Output of a run cut short by a crash is lost (it was only in the aggregator's
//! memory). This module reads `/proc` and blocks: call it from `spawn_blocking`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

/// Environment variable carrying a run's key.
pub const RUN_KEY_VAR: &str = "TOCSIN_RUN_KEY";

/// How long [`kill_run`] waits for the processes it killed to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(3);

/// A fresh run key: 32 hex digits (128 random bits; unique, not secret).
pub fn new_key() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// One process of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`, at most 15 bytes).
    pub comm: String,
}

/// What [`kill_run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Killed {
    /// Processes sent SIGKILL.
    pub killed: Vec<Proc>,
    /// Processes still alive [`KILL_WAIT`] after (stuck in uninterruptible sleep, or
    /// not ours to signal).
    pub survivors: Vec<Proc>,
}

impl Killed {
    /// `"killed 2 processes: 4242 (hang.sh), 4243 (sleep)"` (and the survivors), or
    /// `None` when nothing was found.
    pub fn describe(&self) -> Option<String> {
        if self.killed.is_empty() && self.survivors.is_empty() {
            return None;
        }
        let list = |ps: &[Proc]| {
            ps.iter()
                .map(|p| format!("{} ({})", p.pid, p.comm))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.killed.is_empty() {
            let n = self.killed.len();
            parts.push(format!(
                "killed {n} process{}: {}",
                if n == 1 { "" } else { "es" },
                list(&self.killed)
            ));
        }
        if !self.survivors.is_empty() {
            parts.push(format!(
                "still running after SIGKILL: {}",
                list(&self.survivors)
            ));
        }
        Some(parts.join("; "))
    }
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone)]
struct Stat {
    comm: String,
    state: char,
    pgid: i32,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp …`; comm may contain spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgid = rest.next()?.parse().ok()?;
    Some(Stat { comm, state, pgid })
}

/// Whether process `pid`'s initial environment holds `TOCSIN_RUN_KEY=key`.
fn has_key(pid: i32, key: &str) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{RUN_KEY_VAR}={key}");
    env.split(|b| *b == 0).any(|v| v == want.as_bytes())
}

fn pids() -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me && *p > 1)
        .collect()
}

/// The live (not zombie) processes of run `key`, by the rules of the module docs.
pub fn find(key: &str) -> Vec<Proc> {
    let all: Vec<(i32, Stat)> = pids()
        .into_iter()
        .filter_map(|p| Some((p, stat(p)?)))
        .filter(|(_, s)| s.state != 'Z' && s.state != 'X')
        .collect();
    let keyed: BTreeSet<i32> = all
        .iter()
        .filter(|(p, _)| has_key(*p, key))
        .map(|(p, _)| *p)
        .collect();
    // Groups led by one of the run's processes: their members are the run's too.
    let groups: BTreeSet<i32> = all
        .iter()
        .filter(|(p, s)| keyed.contains(p) && s.pgid == *p)
        .map(|(p, _)| *p)
        .collect();
    all.into_iter()
        .filter(|(p, s)| keyed.contains(p) || groups.contains(&s.pgid))
        .map(|(pid, s)| Proc { pid, comm: s.comm })
        .collect()
}

/// SIGKILLs process `p` if it still belongs to run `key` (checked after a pidfd pins
/// it). Whether a signal was sent.
fn kill_checked(p: &Proc, key: &str, groups: &BTreeSet<i32>) -> bool {
    let Some(pid) = Pid::from_raw(p.pid) else {
        return false;
    };
    let ours = || has_key(p.pid, key) || stat(p.pid).is_some_and(|s| groups.contains(&s.pgid));
    match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => ours() && rustix::process::pidfd_send_signal(&fd, Signal::KILL).is_ok(),
        Err(rustix::io::Errno::SRCH) => false,
        // No pidfd (old kernel, seccomp): check, then kill at once.
        Err(_) => ours() && rustix::process::kill_process(pid, Signal::KILL).is_ok(),
    }
}

/// Kills every process of run `key` (SIGKILL; repeated while new ones appear, as a
/// process may fork while its siblings die) and waits up to [`KILL_WAIT`] for them to be
/// gone. Blocking.
pub fn kill_run(key: &str) -> Killed {
    let mut killed: Vec<Proc> = Vec::new();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let found = find(key);
        let groups: BTreeSet<i32> = found
            .iter()
            .filter(|p| stat(p.pid).is_some_and(|s| s.pgid == p.pid) && has_key(p.pid, key))
            .map(|p| p.pid)
            .collect();
        let fresh: Vec<Proc> = found
            .iter()
            .filter(|p| !killed.iter().any(|k| k.pid == p.pid))
            .cloned()
            .collect();
        for p in &fresh {
            if kill_checked(p, key, &groups) {
                killed.push(p.clone());
            }
        }
        if found.is_empty() {
            return Killed {
                killed,
                survivors: Vec::new(),
            };
        }
        if Instant::now() >= deadline {
            return Killed {
                killed: killed
                    .into_iter()
                    .filter(|k| !found.iter().any(|f| f.pid == k.pid))
                    .collect(),
                survivors: found,
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_hex() {
        let (a, b) = (new_key(), new_key());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_run_s_escaped_processes_are_found_and_killed_others_not() {
        let key = new_key();
        // An escaped session (setsid) carrying the key, and a bystander without it.
        let mut ours = std::process::Command::new("setsid")
            .args(["sleep", "60"])
            .env(RUN_KEY_VAR, &key)
            .spawn()
            .expect("spawn setsid sleep");
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .env(RUN_KEY_VAR, new_key())
            .spawn()
            .expect("spawn sleep");
        let ours_pid = i32::try_from(ours.id()).expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !find(&key).iter().any(|p| p.pid == ours_pid) {
            assert!(Instant::now() < deadline, "not found: {:?}", find(&key));
            std::thread::sleep(Duration::from_millis(20));
        }
        let k = kill_run(&key);
        assert!(k.killed.iter().any(|p| p.pid == ours_pid), "{k:?}");
        assert!(k.survivors.is_empty(), "{k:?}");
        assert!(ours.wait().expect("wait").code().is_none(), "killed");
        assert!(
            other.try_wait().expect("try_wait").is_none(),
            "bystander killed"
        );
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(
            k.describe()
                .as_deref()
                .map(|d| d.starts_with("killed 1 process: ")),
            Some(true),
            "{k:?}"
        );
        assert_eq!(Killed::default().describe(), None);
    }
}
