//! Active checks: runs every HTTP, TCP and exec (Nagios plugin) check on its own
//! interval, one run at a time per check, and keeps the latest result of each on a shared
//! [`Board`] that the collector reads every cycle.
//!
//! Owns the scheduling and the per-check rolling window (error rate, P95 latency). It
//! does not evaluate thresholds: the collector turns a [`Snapshot`] into readings.
//!
//! | check | value | unit | source |
//! |---|---|---|---|
//! | `http:NAME`, `tcp:NAME` | 0 up, 2 down (last probe) | status | the probe |
//! | `http_error_rate:NAME` | failed probes / probes in the window × 100 | percent | [`RollingWindow`] |
//! | `http_latency:NAME` | nearest-rank P95 of probe latencies in the window | ms | same |
//! | `exec:NAME` | plugin exit 0/1/2 (3 and failures: no value, UNKNOWN) | status | `nagios` |
//! | `exec:NAME:LABEL` | the perfdata value | the plugin's UOM | `nagios::parse_perfdata` |

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::nagios::{ExecCheck, PluginState};
use crate::probe::{HttpCheck, HttpProbe, RollingWindow, TcpCheck};

/// One active check, validated.
#[derive(Debug, Clone)]
pub enum ActiveCheck {
    /// `[[http]]`.
    Http(Box<HttpCheck>),
    /// `[[tcp]]`.
    Tcp(TcpCheck),
    /// `[[exec]]`.
    Exec(ExecCheck),
}

impl ActiveCheck {
    /// The check's configured name.
    pub fn name(&self) -> &str {
        match self {
            ActiveCheck::Http(c) => &c.name,
            ActiveCheck::Tcp(c) => &c.name,
            ActiveCheck::Exec(c) => &c.name,
        }
    }

    /// Time between two runs.
    pub fn interval(&self) -> Duration {
        match self {
            ActiveCheck::Http(c) => c.interval,
            ActiveCheck::Tcp(c) => c.interval,
            ActiveCheck::Exec(c) => c.interval,
        }
    }

    /// The longest one run may take.
    pub fn timeout(&self) -> Duration {
        match self {
            ActiveCheck::Http(c) => c.timeout,
            ActiveCheck::Tcp(c) => c.timeout,
            ActiveCheck::Exec(c) => c.spec.timeout + c.spec.kill_grace,
        }
    }

    /// A result older than this is stale (the check is UNKNOWN): two intervals plus
    /// the timeout plus a second.
    pub fn stale_after(&self) -> Duration {
        self.interval() * 2 + self.timeout() + Duration::from_secs(1)
    }
}

/// The outcome of one run, in a shape common to every kind.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// Monotonic time the run finished (since the agent started).
    pub at: Duration,
    /// Nagios-style state: OK, WARNING, CRITICAL or UNKNOWN.
    pub state: PluginState,
    /// One-line summary (probe error, plugin summary), redacted and bounded.
    pub message: String,
    /// How long the run took.
    pub latency: Duration,
    /// Perfdata of an exec check: (label, value).
    pub perf: Vec<(String, f64)>,
}

/// What the collector reads of one check each cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The latest run, `None` before the first one finished.
    pub last: Option<RunResult>,
    /// The latest run is older than [`ActiveCheck::stale_after`].
    pub stale: bool,
    /// Error rate of an HTTP check over its window, percent.
    pub error_rate_pct: Option<f64>,
    /// P95 latency of an HTTP check over its window, milliseconds.
    pub p95_ms: Option<f64>,
    /// Results in the window of an HTTP check.
    pub samples: usize,
}

#[derive(Debug)]
struct Slot {
    last: Option<RunResult>,
    window: Option<RollingWindow>,
    stale_after: Duration,
}

/// The latest result of every active check, in config order.
#[derive(Debug, Clone)]
pub struct Board {
    slots: Arc<Mutex<Vec<Slot>>>,
    start: Instant,
}

impl Board {
    /// A board for `checks`; `start` is the agent's monotonic origin.
    pub fn new(checks: &[ActiveCheck], start: Instant) -> Self {
        let slots = checks
            .iter()
            .map(|c| Slot {
                last: None,
                window: match c {
                    ActiveCheck::Http(h) => Some(RollingWindow::new(h.window)),
                    _ => None,
                },
                stale_after: c.stale_after(),
            })
            .collect();
        Board {
            slots: Arc::new(Mutex::new(slots)),
            start,
        }
    }

    /// Records a run of check `i`.
    pub fn record(&self, i: usize, result: RunResult) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = slots.get_mut(i) {
            if let Some(w) = &mut slot.window {
                w.push(result.at, result.state == PluginState::Ok, result.latency);
            }
            slot.last = Some(result);
        }
    }

    /// Every check's snapshot at monotonic `now`, in config order.
    pub fn snapshot(&self, now: Duration) -> Vec<Snapshot> {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .iter()
            .map(|s| Snapshot {
                last: s.last.clone(),
                stale: s
                    .last
                    .as_ref()
                    .is_some_and(|l| now.saturating_sub(l.at) > s.stale_after),
                error_rate_pct: s.window.as_ref().and_then(|w| w.error_rate_pct(now)),
                p95_ms: s
                    .window
                    .as_ref()
                    .and_then(|w| w.p95(now))
                    .map(|d| d.as_secs_f64() * 1000.0),
                samples: s.window.as_ref().map_or(0, |w| w.len(now)),
            })
            .collect()
    }

    /// The monotonic origin of this board's clock (the agent's start).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Monotonic now on this board's clock.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A check ready to run (an HTTP client is built once per check).
#[derive(Debug)]
pub enum Runner {
    /// HTTP.
    Http(Box<HttpProbe>),
    /// TCP.
    Tcp(TcpCheck),
    /// Exec.
    Exec(ExecCheck),
}

impl Runner {
    /// Prepares `check`.
    ///
    /// # Errors
    /// [`crate::probe::ProbeError`] when the HTTP client cannot be built.
    pub fn new(check: &ActiveCheck) -> Result<Self, crate::probe::ProbeError> {
        Ok(match check {
            ActiveCheck::Http(h) => Runner::Http(Box::new(HttpProbe::new((**h).clone())?)),
            ActiveCheck::Tcp(t) => Runner::Tcp(t.clone()),
            ActiveCheck::Exec(e) => Runner::Exec(e.clone()),
        })
    }

    /// Runs the check once; `now` gives the monotonic finish time.
    pub async fn run(&self, now: impl Fn() -> Duration) -> RunResult {
        match self {
            Runner::Http(p) => {
                let r = p.run().await;
                probe_result(r, now())
            }
            Runner::Tcp(t) => {
                let r = crate::probe::run_tcp(t).await;
                probe_result(r, now())
            }
            Runner::Exec(e) => {
                let outcome = crate::exec::run(&e.spec).await;
                let out = crate::nagios::parse_output(&outcome);
                RunResult {
                    at: now(),
                    state: out.state,
                    message: out.summary,
                    latency: outcome.duration,
                    perf: out
                        .perfdata
                        .into_iter()
                        .map(|p| (p.label, p.value))
                        .collect(),
                }
            }
        }
    }
}

fn probe_result(r: crate::probe::ProbeResult, at: Duration) -> RunResult {
    RunResult {
        at,
        state: if r.ok {
            PluginState::Ok
        } else {
            PluginState::Critical
        },
        message: r.message,
        latency: r.latency,
        perf: Vec::new(),
    }
}

/// Starts one task per check on `tracker`; each runs its check every interval until
/// `shutdown`. A check whose HTTP client cannot be built is logged and recorded as
/// UNKNOWN (monitoring never stops silently).
pub fn spawn(
    checks: &[ActiveCheck],
    board: &Board,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    for (i, check) in checks.iter().enumerate() {
        let board = board.clone();
        let shutdown = shutdown.clone();
        let interval = check.interval();
        let runner = Runner::new(check);
        let name = check.name().to_owned();
        tracker.spawn(async move {
            let runner = match runner {
                Ok(r) => r,
                Err(e) => {
                    let message = crate::event::truncate_marked(&crate::telemetry::chain(&e), 512);
                    tracing::error!(check = %name, error = %message, "cannot prepare the check");
                    board.record(
                        i,
                        RunResult {
                            at: board.now(),
                            state: PluginState::Unknown,
                            message,
                            latency: Duration::ZERO,
                            perf: Vec::new(),
                        },
                    );
                    return;
                }
            };
            // Spread the first runs over a second so checks do not all fire at once.
            let offset = Duration::from_millis(
                fastrand::u64(0..1000).min(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)),
            );
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let result = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = runner.run(|| board.now()) => r,
                };
                tracing::debug!(check = %name, state = result.state.as_str(), "{}", result.message);
                board.record(i, result);
            }
        });
    }
}
