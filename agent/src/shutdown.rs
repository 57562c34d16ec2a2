//! Process lifecycle shared by the tocsin binaries: the async runtime, shutdown on
//! SIGTERM/SIGINT, and draining tasks within a grace period.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Logs under the target of the daemon `what` (`tocsin_aggregator::shutdown` for the
/// aggregator, else `tocsin_agent::shutdown`), so its lifecycle lines are filtered and
/// read with the rest of its logs (a tracing target must be a constant).
macro_rules! daemon_log {
    ($what:expr, $level:ident, $($arg:tt)+) => {
        if $what == "aggregator" {
            tracing::$level!(target: "tocsin_aggregator::shutdown", $($arg)+)
        } else {
            tracing::$level!(target: "tocsin_agent::shutdown", $($arg)+)
        }
    };
}

/// How long tasks get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The multi-threaded runtime every binary uses (two workers: the daemons are small).
///
/// # Errors
/// When the OS refuses threads or an event loop.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Runs a daemon: builds the runtime, cancels the token given to `daemon` on SIGTERM or
/// SIGINT, and maps the outcome to an exit code (0 clean, 1 failure, logged as `what`).
pub fn run_daemon<F, Fut, E>(what: &'static str, daemon: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    run_daemon_on(runtime(), what, daemon)
}

/// The agent's runtime: one thread for every task (the agent's async work is light: a
/// sample per second, a stream, probes), blocking work on tokio's blocking pool. Fewer
/// threads, fewer wake-ups and allocator arenas than [`runtime`].
///
/// # Errors
/// When the OS refuses a thread or an event loop.
pub fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
}

/// [`run_daemon`] on a given runtime.
pub fn run_daemon_on<F, Fut, E>(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    what: &'static str,
    daemon: F,
) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            daemon_log!(what, error, error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal_of(shutdown.clone(), what));
        match daemon(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                daemon_log!(what, error, error = %e, "{what} failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Closes `tracker`, waits up to [`SHUTDOWN_GRACE`] for its tasks, and names how many
/// were still running if the grace ran out.
pub async fn drain(tracker: &TaskTracker, what: &str) {
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        daemon_log!(
            what,
            warn,
            still_running = tracker.len(),
            "{what} tasks did not stop within the grace period"
        );
    }
    daemon_log!(what, info, "{what} stopped");
}

/// Cancels `token` on SIGTERM or SIGINT. SIGHUP does not reload: the config is read
/// once at start (listeners, state directories and rules are built from it), so a
/// SIGHUP is logged with the advice to restart, and the daemon keeps running.
pub async fn cancel_on_signal(token: CancellationToken) {
    cancel_on_signal_of(token, "agent").await;
}

/// [`cancel_on_signal`], logging under the target of the daemon `what` (`"aggregator"`,
/// `"agent"`).
pub async fn cancel_on_signal_of(token: CancellationToken, what: &str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        daemon_log!(what, error, "cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                daemon_log!(what, info, signal = "SIGTERM", "shutting down");
                break;
            }
            _ = int.recv() => {
                daemon_log!(what, info, signal = "SIGINT", "shutting down");
                break;
            }
            _ = hup.recv() => daemon_log!(
                what,
                warn,
                signal = "SIGHUP",
                "configuration is not reloaded; restart the daemon to apply changes"
            ),
        }
    }
    token.cancel();
}
