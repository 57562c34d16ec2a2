#![doc = include_str!("../README.md")]
//! tocsin-aggregator: the central service.
//!
//! Data path: `ingest` (gRPC stream per agent; `convert` validates wire messages) →
//! `store` (one SQLite writer thread; events, incidents via the pure `correlate`, and
//! the outbox in one transaction) → `notify` (one dispatcher per channel) and `web`
//! (JSON API and the on-call web view); `hook` runs recovery hooks (queued in the store,
//! started by its runner). `cli` is the on-call command line `tocsin`, including
//! `tocsin up`.

pub mod cli;
pub mod config;
pub mod convert;
pub mod correlate;
pub mod drill;
pub mod escalate;
pub mod hook;
pub mod ingest;
pub mod kpi;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod route;
pub mod silence;
pub mod store;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::time::Duration;

use tocsin_proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AggregatorConfig;
use crate::notify::{Dispatcher, Target};

/// The addresses the aggregator actually bound (useful with port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// HTTP API.
    pub http: SocketAddr,
    /// gRPC ingest.
    pub grpc: SocketAddr,
}

/// The aggregator could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        /// `listen_http` or `listen_grpc`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory is used by another aggregator.
    #[error(transparent)]
    Locked(#[from] tocsin_agent::settings::DirLockError),
    /// The TLS certificate or key was refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The system random source gave no key for web sessions.
    #[error("the system random source failed (web session key)")]
    Random,
    /// The HTTP client for notifications could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AggregatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AggregatorError::Listen { what, addr, source })
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the aggregator until `shutdown` is cancelled. `bound`, if given, receives the
/// listen addresses once both sockets are bound.
///
/// # Errors
/// [`AggregatorError`] when a listener, the store or the HTTP client cannot start.
pub async fn run(
    cfg: AggregatorConfig,
    shutdown: CancellationToken,
    bound: Option<oneshot::Sender<Bound>>,
) -> Result<(), AggregatorError> {
    install_crypto_provider();
    let started_ms = model::now_ms();
    let _lock =
        tocsin_agent::settings::lock_dir(&cfg.data_dir, "aggregator.lock", "tocsin-aggregator")?;
    let http_listener = bind("listen_http", cfg.listen_http).await?;
    let grpc_listener = bind("listen_grpc", cfg.listen_grpc).await?;
    let addrs = Bound {
        http: http_listener.local_addr().unwrap_or(cfg.listen_http),
        grpc: grpc_listener.local_addr().unwrap_or(cfg.listen_grpc),
    };

    let client = reqwest::Client::builder()
        .user_agent(concat!("tocsin/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        // A webhook that redirects is misconfigured; following it would turn the POST
        // into a GET elsewhere. The 3xx is reported instead.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut targets: Vec<(String, Target)> = Vec::new();
    if cfg.console {
        targets.push(("console".into(), Target::Console));
    }
    for w in &cfg.webhooks {
        let target = Target::Webhook {
            url: w.url.clone(),
            format: w.format.clone(),
            timeout: w.timeout,
            client: client.clone(),
        };
        targets.push((w.name.clone(), target));
    }
    for e in &cfg.emails {
        targets.push((e.name.clone(), Target::Email(Box::new(e.clone()))));
    }
    let channels: Vec<String> = targets.iter().map(|(name, _)| name.clone()).collect();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let kpi_metrics = kpi::KpiMetrics::register(&mut registry);
    let mut opened = store::Store::open(&cfg.data_dir, channels.clone())?
        .with_correlation(cfg.correlation.clone())
        .with_kpi_metrics(kpi_metrics);
    opened.set_router(route::Router {
        channels,
        routing: cfg.routing.clone(),
    });
    // Drills whose run died with the previous aggregator: marked until their window
    // ends, then `interrupted` (by the paging sweep).
    for (drill, node, until_ms) in opened.drills_after_restart(started_ms)? {
        tracing::warn!(
            drill,
            %node,
            until = %model::rfc3339(until_ms),
            "drill was running when the aggregator stopped: its node stays marked until its window ends, then it is recorded as interrupted"
        );
    }
    let store = store::spawn(opened)?;

    let (wake_tx, wake_rx) = watch::channel(0u64);
    let tracker = TaskTracker::new();
    for (name, target) in targets {
        metrics.channel(&name);
        let d = Dispatcher {
            name,
            target,
            store: store.clone(),
            wake: wake_rx.clone(),
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            give_up_after: cfg.give_up_after,
            metrics: metrics.clone(),
            templates: cfg.templates.clone(),
        };
        tracker.spawn(d.run(shutdown.clone()));
    }
    notify::alertmanager::spawn_reposters(
        &cfg.webhooks,
        &client,
        &store,
        &mut registry,
        &tracker,
        &shutdown,
    );

    let liveness = liveness::Liveness {
        store: store.clone(),
        outbox_wake: wake_tx.clone(),
        timeout: cfg.node_timeout,
        started_ms: model::now_ms(),
    };
    tracker.spawn(liveness.run(shutdown.clone()));
    let paging = escalate::Sweep {
        store: store.clone(),
        outbox_wake: wake_tx.clone(),
        interval: cfg.routing.sweep_interval,
    };
    tracker.spawn(paging.run(shutdown.clone()));
    if cfg.tokens.is_none() && !cfg.listen_grpc.ip().is_loopback() {
        tracing::warn!(listen_grpc = %addrs.grpc, "ingest is reachable from other machines and needs no token: set auth.tokens_file");
    }
    let (hook_wake, hook_wake_rx) = watch::channel(0u64);
    let hook_list = std::sync::Arc::new(cfg.routing.hooks.clone());
    let runner = hook::Runner {
        store: store.clone(),
        hooks: hook_list.clone(),
        wake: hook_wake_rx,
        wake_tx: hook_wake.clone(),
        outbox_wake: wake_tx.clone(),
        tracker: tracker.clone(),
    };
    tracker.spawn(runner.run(shutdown.clone()));
    let api_wake = wake_tx.clone();
    let drills = drill::DrillHub::new(cfg.node_timeout);
    let ingest = ingest::IngestService::new(
        store.clone(),
        wake_tx,
        cfg.tokens.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .with_drills(drills.clone());
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive))
        .http2_keepalive_timeout(Some(cfg.keepalive))
        .add_service(
            IngestServer::new(ingest)
                .max_decoding_message_size(cfg.max_message_bytes)
                .max_encoding_message_size(cfg.max_message_bytes),
        );
    let grpc_shutdown = shutdown.clone();
    match &cfg.tls {
        None => {
            tracker.spawn(async move {
                let incoming = TcpListenerStream::new(grpc_listener);
                let result = server
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC server failed");
                    grpc_shutdown.cancel();
                }
            });
        }
        Some(tls) => {
            let acceptor = tls::acceptor(tls)?;
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tracker.spawn(tls::accept_loop(
                grpc_listener,
                acceptor,
                tx,
                metrics.clone(),
                shutdown.clone(),
            ));
            tracker.spawn(async move {
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
                let result = server
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC server failed");
                    grpc_shutdown.cancel();
                }
            });
        }
    }

    let api_state = web::AppState {
        store: store.clone(),
        registry: std::sync::Arc::new(registry),
        writes: web::WriteAccess::new(cfg.api_token.clone(), cfg.listen_http),
        outbox_wake: api_wake,
        started_ms,
        hooks: hook::Hooks {
            list: hook_list,
            wake: hook_wake,
        },
        drills,
    };
    let ui_state = web::ui::UiState::new(
        api_state.clone(),
        cfg.web.clone(),
        cfg.api_token.clone(),
        cfg.listen_http.ip().is_loopback(),
        cfg.templates.clone(),
    )
    .map_err(|_| AggregatorError::Random)?;
    let app = web::router(api_state)
        .merge(web::ui::router(ui_state.clone()))
        .layer(axum::middleware::from_fn_with_state(
            ui_state,
            web::ui::read_guard,
        ));
    let http_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let serve = axum::serve(http_listener, app)
            .with_graceful_shutdown(http_shutdown.clone().cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
            http_shutdown.cancel();
        }
    });

    tracing::info!(http = %addrs.http, grpc = %addrs.grpc, data_dir = %cfg.data_dir.display(), "listening");
    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }
    // Healthy = the store thread answers; the HTTP and gRPC servers cancel `shutdown` if
    // they fail, so they need no check of their own.
    tracker.spawn(tocsin_agent::systemd::Watchdog::from_env(None).run(
        shutdown.clone(),
        move || {
            let store = store.clone();
            async move { store.call(|_| Ok(())).await.map_err(|e| e.to_string()) }
        },
    ));
    tocsin_agent::systemd::ready(&format!(
        "listening http={} grpc={}",
        addrs.http, addrs.grpc
    ));
    shutdown.cancelled().await;
    tocsin_agent::systemd::stopping();
    tocsin_agent::shutdown::drain(&tracker, "aggregator").await;
    Ok(())
}
