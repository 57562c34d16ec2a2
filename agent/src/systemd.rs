//! Service-manager integration shared by both daemons: readiness and stopping
//! notifications (`sd_notify`), the watchdog, and the liveness file that the agent's
//! `probe` subcommand reads (Kubernetes exec probe).
//!
//! Every notification is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd
//! with `Type=notify`), and a failed send is logged at DEBUG and otherwise ignored: the
//! daemon must not stop because the service manager went away.
//!
//! The watchdog is honest rather than clever: [`Watchdog::run`] pings only after a
//! health check of the daemon's main loop passed within one watchdog period. The agent
//! checks that its sampling loop completed a cycle recently ([`SamplingProgress`]); the
//! aggregator checks that its store thread answers. A wedged loop therefore stops the
//! pings and systemd restarts the service (`Restart=on-failure` covers a watchdog kill).
//!
//! What it does not own: signal handling ([`crate::shutdown`]) and the unit files
//! (`systemd/` in the repository).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::event::CheckStatus;

/// Longest time between two health checks (and liveness-file updates) when systemd asks
/// for no watchdog, e.g. under Kubernetes.
pub const MAX_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// Extra time, on top of three sampling intervals, that a sampling cycle may take before
/// the agent counts as stalled (a slow `/proc` under load is not a hang).
pub const STALL_SLACK: Duration = Duration::from_secs(10);

/// Name of the agent's liveness file inside `state_dir`: rewritten (content: Unix time in
/// seconds) after every passed health check.
pub const ALIVE_FILE: &str = "alive";

/// Tells the service manager that the daemon is ready (`READY=1`), with `status` as the
/// human-readable `STATUS=` line shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    tracing::debug!("notified the service manager: ready");
}

/// Tells the service manager that the daemon is shutting down (`STOPPING=1`).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "cannot notify the service manager");
    }
}

/// Pings the systemd watchdog (`WATCHDOG=1`) and refreshes a liveness file while the
/// daemon's main loop is healthy.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// Time between health checks: half of `WATCHDOG_USEC`, at most [`MAX_CHECK_PERIOD`].
    period: Duration,
    /// Whether systemd asked for pings (`WATCHDOG_USEC` set, `WATCHDOG_PID` ours or unset).
    systemd: bool,
    /// Liveness file to rewrite after each passed check, if any.
    alive_file: Option<PathBuf>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment; `alive_file`, if given,
    /// is rewritten after every passed check.
    pub fn from_env(alive_file: Option<PathBuf>) -> Self {
        Self::new(sd_notify::watchdog_enabled(), alive_file)
    }

    /// A watchdog for a systemd timeout of `watchdog` (`None`: no systemd watchdog; the
    /// health check still runs every [`MAX_CHECK_PERIOD`] for the liveness file).
    pub fn new(watchdog: Option<Duration>, alive_file: Option<PathBuf>) -> Self {
        let period = watchdog
            .map_or(MAX_CHECK_PERIOD, |w| w / 2)
            .clamp(Duration::from_millis(10), MAX_CHECK_PERIOD);
        Watchdog {
            period,
            systemd: watchdog.is_some(),
            alive_file,
        }
    }

    /// Time between two health checks.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Whether this watchdog does anything (systemd asked for pings, or a liveness file
    /// is kept).
    pub fn is_active(&self) -> bool {
        self.systemd || self.alive_file.is_some()
    }

    /// Every [`Watchdog::period`] until `shutdown`: runs `healthy` (given one period to
    /// answer); on `Ok` pings systemd and rewrites the liveness file, on `Err(reason)` or
    /// a timeout withholds both and logs the reason once per unhealthy spell.
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, mut healthy: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        if !self.is_active() {
            return;
        }
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_healthy = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let verdict = tokio::time::timeout(self.period, healthy())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.period)));
            match verdict {
                Ok(()) => {
                    if !was_healthy {
                        tracing::info!("main loop healthy again; watchdog pings resume");
                    }
                    was_healthy = true;
                    if self.systemd {
                        send(&[NotifyState::Watchdog]);
                    }
                    if let Some(path) = self.alive_file.clone() {
                        touch(path).await;
                    }
                }
                Err(reason) => {
                    if was_healthy {
                        tracing::warn!(%reason, "main loop unhealthy; withholding watchdog pings");
                    }
                    was_healthy = false;
                }
            }
        }
    }
}

async fn touch(path: PathBuf) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let written = tokio::task::spawn_blocking(move || {
        std::fs::write(&path, format!("{now}\n")).map_err(|e| (path, e))
    })
    .await;
    if let Ok(Err((path, error))) = written {
        tracing::warn!(%error, path = %path.display(), "cannot write the liveness file");
    }
}

/// Health of the agent's sampling loop: the collector publishes the state of every check
/// after each cycle; the loop counts as stalled when no cycle completed within
/// [`SamplingProgress::stall_after`].
#[derive(Debug)]
pub struct SamplingProgress {
    status: watch::Receiver<Arc<Vec<CheckStatus>>>,
    last_cycle: Instant,
    stall_after: Duration,
}

impl SamplingProgress {
    /// Watches `status` (a receiver of the collector's status channel) for a sampling
    /// `interval`.
    pub fn new(status: watch::Receiver<Arc<Vec<CheckStatus>>>, interval: Duration) -> Self {
        SamplingProgress {
            status,
            last_cycle: Instant::now(),
            stall_after: Self::stall_after(interval),
        }
    }

    /// How long without a completed cycle counts as stalled: three `interval`s plus
    /// [`STALL_SLACK`].
    pub fn stall_after(interval: Duration) -> Duration {
        interval.saturating_mul(3).saturating_add(STALL_SLACK)
    }

    /// `Ok` when a cycle completed within the stall limit, else the reason.
    ///
    /// # Errors
    /// A description of the stall (seconds since the last completed cycle).
    pub fn check(&mut self) -> Result<(), String> {
        if self.status.has_changed().unwrap_or(false) {
            self.status.mark_unchanged();
            self.last_cycle = Instant::now();
        }
        let idle = self.last_cycle.elapsed();
        if idle <= self.stall_after {
            Ok(())
        } else {
            Err(format!(
                "no sampling cycle completed for {}s (limit {}s)",
                idle.as_secs(),
                self.stall_after.as_secs()
            ))
        }
    }
}

/// Oldest liveness file that `probe` accepts for a sampling `interval`: the stall limit
/// plus one health-check period.
pub fn probe_max_age(interval: Duration) -> Duration {
    SamplingProgress::stall_after(interval).saturating_add(MAX_CHECK_PERIOD)
}

/// The agent's exec probe: `Ok(age)` of `state_dir/`[`ALIVE_FILE`] when it is at most
/// `max_age` old, else an explanation.
///
/// # Errors
/// When the file is missing, unreadable or too old.
pub fn probe(state_dir: &Path, max_age: Duration) -> Result<Duration, String> {
    let path = state_dir.join(ALIVE_FILE);
    let modified = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age <= max_age {
        Ok(age)
    } else {
        Err(format!(
            "{} is {}s old (limit {}s): the sampling loop is stalled or the agent is not running",
            path.display(),
            age.as_secs(),
            max_age.as_secs()
        ))
    }
}

/// Runs [`probe`] for an agent with `state_dir` and sampling `interval`, writes one line
/// to stdout (alive) or stderr (not), and returns exit code 0 or 1.
pub fn probe_exit(state_dir: &Path, interval: Duration) -> ExitCode {
    use std::io::Write;
    match probe(state_dir, probe_max_age(interval)) {
        Ok(age) => {
            let _ = writeln!(
                std::io::stdout(),
                "tocsin-agent: alive (last healthy cycle {}s ago)",
                age.as_secs()
            );
            ExitCode::SUCCESS
        }
        Err(reason) => {
            let _ = writeln!(std::io::stderr(), "tocsin-agent: not alive: {reason}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_half_the_watchdog_and_bounded() {
        let w = Watchdog::new(Some(Duration::from_secs(30)), None);
        assert_eq!(w.period(), Duration::from_secs(10));
        let w = Watchdog::new(Some(Duration::from_secs(4)), None);
        assert_eq!(w.period(), Duration::from_secs(2));
        assert!(w.is_active());
        let w = Watchdog::new(None, None);
        assert!(!w.is_active());
        assert_eq!(w.period(), MAX_CHECK_PERIOD);
    }

    #[test]
    fn sampling_progress_stalls_without_cycles() {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let mut p = SamplingProgress::new(rx, Duration::from_secs(1));
        assert!(p.check().is_ok());
        assert_eq!(p.stall_after, Duration::from_secs(13));
        tx.send_replace(Arc::new(Vec::new()));
        assert!(p.check().is_ok());
        p.last_cycle = Instant::now()
            .checked_sub(Duration::from_secs(20))
            .unwrap_or_else(Instant::now);
        let err = p.check();
        assert!(
            err.as_ref().is_err_and(|e| e.contains("limit 13s")),
            "{err:?}"
        );
        tx.send_replace(Arc::new(Vec::new()));
        assert!(p.check().is_ok());
    }

    #[test]
    fn probe_accepts_fresh_and_rejects_missing_or_old_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = probe(dir.path(), Duration::from_secs(60));
        assert!(missing.is_err_and(|e| e.contains(ALIVE_FILE)));
        std::fs::write(dir.path().join(ALIVE_FILE), "0\n").expect("write");
        assert!(probe(dir.path(), Duration::from_secs(60)).is_ok());
        let old = SystemTime::now() - Duration::from_secs(600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(ALIVE_FILE))
            .and_then(|f| f.set_modified(old))
            .expect("set mtime");
        let stale = probe(dir.path(), Duration::from_secs(60));
        assert!(stale.is_err_and(|e| e.contains("limit 60s")), "stale");
    }

    #[tokio::test]
    async fn watchdog_writes_the_alive_file_only_while_healthy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(ALIVE_FILE);
        let shutdown = CancellationToken::new();
        let w = Watchdog {
            period: Duration::from_millis(20),
            systemd: false,
            alive_file: Some(file.clone()),
        };
        let task = tokio::spawn(w.run(shutdown.clone(), || async {
            Err::<(), _>("sick".to_owned())
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !file.exists(),
            "an unhealthy loop must not refresh the file"
        );
        shutdown.cancel();
        task.await.expect("watchdog task");

        let shutdown = CancellationToken::new();
        let w = Watchdog {
            period: Duration::from_millis(20),
            systemd: false,
            alive_file: Some(file.clone()),
        };
        let task = tokio::spawn(w.run(shutdown.clone(), || async { Ok(()) }));
        for _ in 0..100 {
            if file.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.expect("watchdog task");
        assert!(file.exists(), "a healthy loop refreshes the file");
    }
}
