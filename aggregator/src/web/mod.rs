//! The HTTP side: the JSON API (`/api/v1/…`) and `/health`.
//!
//! Handlers only translate HTTP to store calls; errors are JSON `{"error": "…"}` with a
//! status code.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::{Incident, Node, rfc3339};
use crate::store::{IncidentDetail, IncidentFilter, StoreHandle};

/// Most incidents one list request returns.
pub const MAX_LIST: usize = 1000;

/// Shared handler state.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Store access.
    pub store: StoreHandle,
    /// The aggregator's metrics, for `/metrics`.
    pub registry: std::sync::Arc<prometheus_client::registry::Registry>,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/incidents", get(list_incidents))
        .route("/api/v1/incidents/{id}", get(get_incident))
        .route("/api/v1/nodes", get(list_nodes))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(state)
}

/// An API error rendered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({ "error": self.1, "status": self.0.as_u16() })),
        )
            .into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error in API");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())
    }
}

async fn metrics(State(st): State<AppState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    tocsin_agent::admin::render(&st.registry, &headers)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// `open`, `resolved` or `all` (default).
    status: Option<String>,
    /// At most this many (default and cap [`MAX_LIST`]).
    limit: Option<usize>,
}

/// An incident in API form: the stored fields plus RFC 3339 times.
#[derive(Debug, Serialize)]
pub struct IncidentView {
    #[serde(flatten)]
    incident: Incident,
    triggered_at: String,
    acknowledged_at: Option<String>,
    resolved_at: Option<String>,
}

impl From<Incident> for IncidentView {
    fn from(incident: Incident) -> Self {
        IncidentView {
            triggered_at: rfc3339(incident.triggered_at_ms),
            acknowledged_at: incident.acknowledged_at_ms.map(rfc3339),
            resolved_at: incident.resolved_at_ms.map(rfc3339),
            incident,
        }
    }
}

async fn list_incidents(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = match q.status.as_deref() {
        None | Some("all") => IncidentFilter::All,
        Some("open") => IncidentFilter::Open,
        Some("resolved") => IncidentFilter::Resolved,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("status {other:?}: expected open, resolved or all"),
            ));
        }
    };
    let limit = q.limit.unwrap_or(MAX_LIST).min(MAX_LIST);
    let incidents = st.store.call(move |s| s.incidents(filter, limit)).await?;
    let views: Vec<IncidentView> = incidents.into_iter().map(IncidentView::from).collect();
    Ok(Json(json!({ "incidents": views })))
}

async fn get_incident(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("incident id {id:?} is not a number"),
        )
    })?;
    let detail: Option<IncidentDetail> = st.store.call(move |s| s.incident(id)).await?;
    let Some(d) = detail else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no incident {id}")));
    };
    let mut v = serde_json::to_value(IncidentView::from(d.incident)).unwrap_or_default();
    v["timeline"] = serde_json::to_value(d.timeline).unwrap_or_default();
    v["notifications"] = serde_json::to_value(d.notifications).unwrap_or_default();
    Ok(Json(v))
}

async fn list_nodes(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes: Vec<Node> = st.store.call(|s| s.nodes()).await?;
    Ok(Json(json!({ "nodes": nodes })))
}
