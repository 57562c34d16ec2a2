//! Notices the exit of a watched process the moment it happens, through a pidfd
//! (`pidfd_open(2)`, Linux ≥ 5.3): the fd becomes readable when the process exits.
//!
//! Owns one small task per watched PID; the collector reconciles the set after every
//! sample ([`DeathWatch::track`]) and starts a cycle when [`DeathWatch::next_death`]
//! yields. Where pidfds are unavailable (old kernel, seccomp), exits are still seen at
//! the next sample; that is logged once.

use std::collections::HashMap;

use rustix::process::{Pid, PidfdFlags, pidfd_open};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The set of pidfds; see the module docs.
#[derive(Debug)]
pub struct DeathWatch {
    watching: HashMap<u32, AbortHandle>,
    tx: mpsc::UnboundedSender<u32>,
    rx: mpsc::UnboundedReceiver<u32>,
    unsupported_logged: bool,
}

impl Default for DeathWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl DeathWatch {
    /// An empty watch.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        DeathWatch {
            watching: HashMap::new(),
            tx,
            rx,
            unsupported_logged: false,
        }
    }

    /// Watches exactly `pids` from now on: opens pidfds for new ones, drops the others.
    /// Must be called within a Tokio runtime.
    pub fn track(&mut self, pids: impl IntoIterator<Item = u32>) {
        let wanted: std::collections::HashSet<u32> = pids.into_iter().collect();
        self.watching.retain(|pid, task| {
            let keep = wanted.contains(pid) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for pid in wanted {
            if self.watching.contains_key(&pid) {
                continue;
            }
            let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
                continue;
            };
            let fd = match pidfd_open(raw, PidfdFlags::empty()) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::SRCH) => {
                    // Already gone: that is news too.
                    let _ = self.tx.send(pid);
                    continue;
                }
                Err(e) => {
                    if !self.unsupported_logged {
                        tracing::warn!(error = %e, "pidfd_open failed: process exits are seen at the next sample instead of at once");
                        self.unsupported_logged = true;
                    }
                    continue;
                }
            };
            let tx = self.tx.clone();
            let task = tokio::spawn(async move {
                // Deprecated because a borrowed fd could be closed behind the reactor's
                // back; an `OwnedFd` moved into the `AsyncFd` cannot be, so this use is
                // sound (and `unsafe` is forbidden in this workspace).
                #[allow(deprecated)]
                let registered = AsyncFd::with_interest(fd, Interest::READABLE);
                match registered {
                    Ok(afd) => {
                        if afd.readable().await.is_ok() {
                            let _ = tx.send(pid);
                        }
                    }
                    Err(e) => tracing::debug!(pid, error = %e, "cannot poll pidfd"),
                }
            });
            self.watching.insert(pid, task.abort_handle());
        }
    }

    /// Waits for the next exit of a watched process and returns its PID. Pending
    /// forever while nothing is watched.
    pub async fn next_death(&mut self) -> u32 {
        match self.rx.recv().await {
            Some(pid) => {
                if let Some(task) = self.watching.remove(&pid) {
                    task.abort();
                }
                pid
            }
            // The sender lives in `self`: never closed.
            None => std::future::pending().await,
        }
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        for task in self.watching.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[tokio::test]
    async fn an_exit_is_seen_within_milliseconds() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let mut w = DeathWatch::new();
        w.track([pid]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let killed = Instant::now();
        child.kill().expect("kill");
        let got = tokio::time::timeout(Duration::from_secs(5), w.next_death())
            .await
            .expect("death noticed");
        let took = killed.elapsed();
        assert_eq!(got, pid);
        let _ = child.wait();
        // Generous bound: this is a correctness check, the speed is benchmarked.
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn untracked_pids_are_dropped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let mut w = DeathWatch::new();
        w.track([pid]);
        w.track([]);
        child.kill().expect("kill");
        let _ = child.wait();
        let got = tokio::time::timeout(Duration::from_millis(300), w.next_death()).await;
        assert!(got.is_err(), "an untracked exit is not reported");
    }
}
