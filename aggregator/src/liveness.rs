//! Node liveness: a node whose agent stops sending heartbeats becomes a `node_down`
//! incident; it resolves when the agent talks again (see `store::Store::heartbeat`).
//!
//! Owns only the sweep timer. The silence of each node is computed by the store from
//! its `last_seen`, so the timers survive an aggregator restart; silence is counted
//! from no earlier than this process's start, which is the restart grace period — and
//! from no earlier than the end of a stall of the aggregator itself (frozen, starved),
//! so its own silence never pages every node.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::now_ms;
use crate::store::StoreHandle;

/// How often silent nodes are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A sweep gap this long means the aggregator itself stood still.
pub const STALL: Duration = Duration::from_secs(3);

/// The liveness task.
#[derive(Debug)]
pub struct Liveness {
    /// Store access.
    pub store: StoreHandle,
    /// Bumped when notifications are queued.
    pub outbox_wake: watch::Sender<u64>,
    /// Silence after which a node is down (at least 3 of its heartbeat intervals).
    pub timeout: Duration,
    /// When this aggregator started (Unix ms).
    pub started_ms: i64,
}

impl Liveness {
    /// Sweeps every [`SWEEP_INTERVAL`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        let mut grace_from = self.started_ms;
        let mut last_sweep = std::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The aggregator itself was frozen (SIGSTOP, a stalled VM, a starved host):
            // the silence was ours, not the nodes'. Start a grace period as after a restart.
            if last_sweep.elapsed() > STALL {
                tracing::warn!(stalled = ?last_sweep.elapsed(), "the aggregator was stalled; node liveness starts over");
                grace_from = now_ms();
            }
            last_sweep = std::time::Instant::now();
            let started = grace_from;
            match self
                .store
                .call(move |s| s.sweep_liveness(now_ms(), timeout_ms, started))
                .await
            {
                Ok(out) => {
                    if out.notifications > 0 {
                        self.outbox_wake.send_modify(|n| *n += 1);
                    }
                    for incident in &out.opened {
                        tracing::warn!(incident, "node down: no heartbeat within the timeout");
                    }
                }
                Err(e) => tracing::error!(error = %e, "liveness sweep failed"),
            }
            // Pages that a group wait, a silence or a node_down held go out once nothing
            // holds them any more.
            match self.store.call(|s| s.release_held(now_ms())).await {
                Ok(0) => {}
                Ok(_) => self.outbox_wake.send_modify(|n| *n += 1),
                Err(e) => tracing::error!(error = %e, "releasing silenced pages failed"),
            }
        }
    }
}
