#![doc = include_str!("../README.md")]
//! tocsin-agent: the node agent.
//!
//! Data path: `sample` (/proc) → `collect` (evaluate every rule with the pure
//! `evaluate` state machine) → `spool` (SQLite, durable before send) → `ship` (one gRPC
//! stream to the aggregator, replay on reconnect, delete on ack). `config` and `settings`
//! load and validate the TOML/environment config; `convert` is the only place that
//! touches wire types.

pub mod active;
pub mod admin;
pub mod backoff;
pub mod collect;
pub mod config;
pub mod convert;
pub mod deathwatch;
pub mod diagnose;
pub mod drill;
pub mod evaluate;
pub mod event;
pub mod exec;
pub mod host;
pub mod nagios;
pub mod probe;
pub mod procscan;
pub mod recovery;
pub mod sample;
pub mod settings;
pub mod ship;
pub mod shutdown;
pub mod spool;
pub mod systemd;
pub mod telemetry;

use std::sync::Arc;

use tocsin_proto::v1;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::collect::Collector;
use crate::config::AgentConfig;
use crate::sample::Sampler;
use crate::ship::{ShipConfig, Shipper};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    /// /proc cannot be read.
    #[error(transparent)]
    Sampler(#[from] sample::SamplerError),
    /// The state directory is used by another agent.
    #[error(transparent)]
    Locked(#[from] settings::DirLockError),
    /// Invalid reconnect bounds.
    #[error("aggregator backoff: {0}")]
    Backoff(#[from] backoff::BackoffError),
}

/// Reads `/proc/sys/kernel/random/boot_id` (empty when unavailable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Runs the agent until `shutdown` is cancelled, then waits up to [`shutdown::SHUTDOWN_GRACE`]
/// for its tasks.
///
/// # Errors
/// [`AgentError`] when a part cannot start; runtime failures are logged and retried.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let _lock = settings::lock_dir(&cfg.state_dir, "agent.lock", "tocsin-agent")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = admin::Metrics::register(&mut registry);
    let (mut spool, moved) = match spool::Spool::open_or_recover(&cfg.state_dir, cfg.spool_limits) {
        Ok(opened) => opened,
        Err(error) => {
            // Monitoring and paging matter more than durability: go on with a spool in
            // memory, and say so loudly.
            tracing::error!(
                error = %telemetry::chain(&error),
                "cannot open the spool in state_dir (disk full? permissions?): keeping events in memory; they are lost if the agent stops before the aggregator has them"
            );
            (spool::Spool::in_memory(cfg.spool_limits)?, None)
        }
    };
    metrics.spool_durable.set(i64::from(spool.is_durable()));
    spool.set_metrics(metrics.spool_dropped.clone(), metrics.spool_events.clone());
    if let Some(aside) = moved {
        tracing::error!(
            moved_to = %aside.display(),
            "the spool was damaged: moved aside and started a fresh one; events it held are lost"
        );
    }
    let restored = collect::Restored {
        checks: spool.check_states()?,
        recovery_runs: spool.recovery_runs()?,
    };
    let spool = spool::spawn(spool)?;
    let sampler = Sampler::new(cfg.processes.clone(), cfg.disks.clone())?;
    let backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max)?;
    let (status_tx, status_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    registry.register_collector(Box::new(admin::CheckCollector::new(status_tx.subscribe())));

    let hello = v1::Hello {
        agent_id: cfg.agent_id.clone(),
        hostname: cfg.hostname.clone(),
        labels: cfg.labels.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: boot_id(),
        token: cfg
            .token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .unwrap_or_default(),
        instance_id: format!("{:016x}", fastrand::u64(..)),
        heartbeat_interval_ms: u32::try_from(cfg.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
    };
    let ship_cfg = ShipConfig {
        endpoints: cfg.endpoints.clone(),
        connect_timeout: cfg.connect_timeout,
        heartbeat_interval: cfg.heartbeat_interval,
        max_message_bytes: cfg.max_message_bytes,
        keepalive: cfg.keepalive,
        tls: cfg.tls.clone(),
        hello,
    };
    for (key, why) in drill::warnings(&cfg) {
        tracing::warn!(key, "drill setting can never work: {why}");
    }
    let (drills, drill_reports) = drill::Drills::new(&cfg);
    let (shipper, conn_state) = Shipper::new(ship_cfg, spool.clone(), status_rx, backoff);
    let shipper = shipper.with_drills(drills.clone(), drill_reports);
    let mut progress = systemd::SamplingProgress::new(status_tx.subscribe(), cfg.interval);
    let board = active::Board::new(&cfg.active, std::time::Instant::now());
    let collector = Collector::new(
        &cfg,
        sampler,
        spool,
        status_tx,
        &metrics,
        restored,
        board.clone(),
    );

    tracing::info!(
        agent_id = %cfg.agent_id,
        endpoints = ?cfg.endpoints,
        interval = ?cfg.interval,
        state_dir = %cfg.state_dir.display(),
        watches = cfg.processes.len(),
        active_checks = cfg.active.len(),
        "agent started"
    );
    let tracker = TaskTracker::new();
    // The drill's stand-in dependency first, so the checks watching it start out OK.
    tracker.spawn(drills.clone().hold_dependency(shutdown.clone()));
    active::spawn(&cfg.active, &board, &tracker, &shutdown);
    tracker.spawn(collector.run(shutdown.clone()));
    if let Some(addr) = cfg.admin_listen {
        tracker.spawn(admin::serve(
            addr,
            registry,
            conn_state,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(shipper.run(shutdown.clone()));
    let watchdog = systemd::Watchdog::from_env(Some(cfg.state_dir.join(systemd::ALIVE_FILE)));
    tracker.spawn(watchdog.run(shutdown.clone(), move || {
        std::future::ready(progress.check())
    }));
    systemd::ready("sampling");
    shutdown.cancelled().await;
    systemd::stopping();
    shutdown::drain(&tracker, "agent").await;
    Ok(())
}
