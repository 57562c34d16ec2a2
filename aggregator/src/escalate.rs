//! The paging sweep: escalation past the response target, repeats of open incidents,
//! storm summaries when a window turns; and drills whose run died with an earlier
//! aggregator, ended as `interrupted` when their window passes (`store::drills`).
//!
//! Owns only the timer. Every deadline is computed by the store from what it recorded
//! (`triggered_at`, the routes an incident took, `escalated` timeline entries, repeat and
//! summary outbox rows; see `store::paging`), so after a restart an overdue escalation
//! fires once at the first sweep — never twice — and repeats and summaries pick up
//! where they were.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::now_ms;
use crate::store::StoreHandle;

/// The paging sweep task.
#[derive(Debug)]
pub struct Sweep {
    /// Store access.
    pub store: StoreHandle,
    /// Bumped when notifications are queued.
    pub outbox_wake: watch::Sender<u64>,
    /// Period (`paging_sweep_interval`, default 1 s): how late past a deadline an
    /// escalation, repeat or summary may go out.
    pub interval: Duration,
}

impl Sweep {
    /// Sweeps every [`Sweep::interval`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.store.call(|s| s.sweep_paging(now_ms())).await {
                Ok(out) => {
                    for incident in &out.escalated {
                        tracing::warn!(
                            incident,
                            "escalated: unacknowledged past its response target"
                        );
                    }
                    if out.summaries > 0 {
                        tracing::warn!(
                            summaries = out.summaries,
                            "storm guard: summaries of held triggers queued"
                        );
                    }
                    if out.notifications > 0 {
                        self.outbox_wake.send_modify(|n| *n += 1);
                    }
                }
                Err(e) => tracing::error!(error = %e, "paging sweep failed"),
            }
            match self.store.call(|s| s.drill_sweep(now_ms())).await {
                Ok(ended) => {
                    for drill in ended {
                        tracing::error!(
                            drill,
                            "DRILL INTERRUPTED: the aggregator restarted during the drill; its window is over"
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "drill sweep failed"),
            }
        }
    }
}
