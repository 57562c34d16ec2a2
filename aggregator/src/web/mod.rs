//! The HTTP side: the JSON API (`/api/v1/…`) and `/health`.
//!
//! Handlers only translate HTTP to store calls; errors are JSON
//! `{"error": {"status": 404, "message": "…"}}` with that status code — every error,
//! including unknown paths (404), wrong methods (405) and what axum's extractors refuse
//! before a handler runs (a body over the limit, 413), by the `json_errors` layer. `docs/API.md`
//! documents every endpoint. The CLI's reports (filtered lists, KPIs, post-mortems,
//! status) are in `api_kpi`; the on-call web view (HTML pages, forms, status pages)
//! is [`ui`].

pub mod ui;

mod api_kpi;

pub use api_kpi::{parse_time, render_postmortem};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod drills;
mod hooks;

use crate::model::{Incident, Node, rfc3339};
use crate::store::{IncidentDetail, StoreHandle};

/// Most incidents one list request returns.
pub const MAX_LIST: usize = 1000;

/// Shared handler state.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Store access.
    pub store: StoreHandle,
    /// The aggregator's metrics, for `/metrics`.
    pub registry: std::sync::Arc<prometheus_client::registry::Registry>,
    /// Who may change things through the API.
    pub writes: WriteAccess,
    /// Bumped when a change enqueued notifications (wakes the dispatchers).
    pub outbox_wake: tokio::sync::watch::Sender<u64>,
    /// When the aggregator started (Unix ms), for `/api/v1/status`.
    pub started_ms: i64,
    /// The recovery hooks, and the runner's wake-up.
    pub hooks: crate::hook::Hooks,
    /// Connected agents, for drills (`POST /api/v1/drills`).
    pub drills: crate::drill::DrillHub,
}

/// Who may acknowledge and resolve through the API.
#[derive(Debug, Clone)]
pub enum WriteAccess {
    /// Requests bearing this token (`auth.api_token_file`).
    Token(tocsin_agent::config::Secret),
    /// Anyone who can connect: the API listens on loopback only.
    Loopback,
    /// Nobody: the API listens beyond loopback and no token is configured.
    Closed,
}

impl WriteAccess {
    /// The policy for an API on `listen` with an optional token.
    pub fn new(token: Option<tocsin_agent::config::Secret>, listen: std::net::SocketAddr) -> Self {
        match token {
            Some(t) => WriteAccess::Token(t),
            None if listen.ip().is_loopback() => WriteAccess::Loopback,
            None => WriteAccess::Closed,
        }
    }

    fn check(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        // A web page cannot make a browser send JSON to another site without a CORS
        // preflight (which this API never grants), and browsers name their origin: so
        // changes need `application/json` and no foreign `Origin` (cross-site request
        // forgery); in loopback mode the Host must be loopback too (DNS rebinding).
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if !json {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "changes need Content-Type: application/json".into(),
            ));
        }
        if headers.contains_key(axum::http::header::ORIGIN) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "changes from a web page (an Origin header) are refused".into(),
            ));
        }
        if matches!(self, WriteAccess::Loopback) {
            let host = headers
                .get(axum::http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let name = host
                .rsplit_once(':')
                .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
                .map_or(host, |(h, _)| h);
            let loopback = name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("changes need a loopback Host, not {host:?}"),
                ));
            }
        }
        match self {
            WriteAccess::Loopback => Ok(()),
            WriteAccess::Closed => Err(ApiError(
                StatusCode::FORBIDDEN,
                "changes are refused: the API listens beyond loopback and auth.api_token_file is not set".into(),
            )),
            WriteAccess::Token(t) => {
                let given = ui::auth::bearer(headers).unwrap_or("");
                let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), t.expose().as_bytes()).into();
                if ok {
                    Ok(())
                } else {
                    Err(ApiError(
                        StatusCode::UNAUTHORIZED,
                        "a valid `Authorization: Bearer TOKEN` is needed for changes".into(),
                    ))
                }
            }
        }
    }
}

/// Body of `POST /api/v1/incidents/{id}/ack` and `…/resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeRequest {
    /// Who does it (shown on the timeline).
    by: String,
    /// Why (optional).
    #[serde(default)]
    note: String,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/incidents", get(api_kpi::list_incidents))
        .route("/api/v1/incidents/{id}", get(get_incident))
        .route("/api/v1/incidents/{id}/ack", post(ack_incident))
        .route("/api/v1/incidents/{id}/resolve", post(resolve_incident))
        .route(
            "/api/v1/incidents/{id}/postmortem",
            get(api_kpi::get_postmortem).post(api_kpi::link_postmortem),
        )
        .route("/api/v1/kpi", get(api_kpi::kpi_report))
        .route("/api/v1/status", get(api_kpi::status))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/silences", get(list_silences).post(add_silence))
        .route("/api/v1/silences/{id}/expire", post(expire_silence))
        .route("/api/v1/drills", get(drills::list).post(drills::start))
        .route("/api/v1/drills/{id}", get(drills::one))
        .route("/api/v1/hooks", get(hooks::list))
        .route("/api/v1/hooks/runs", get(hooks::runs))
        .route("/api/v1/hooks/runs/{id}", get(hooks::run))
        .route("/api/v1/hooks/{name}/run", post(hooks::start))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// Largest error body [`json_errors`] reads to wrap it (axum's rejections are one line).
const MAX_WRAPPED_ERROR: usize = 4096;

/// Makes every error answer of the API JSON: a 4xx or 5xx whose body is not
/// `application/json` (axum's extractor rejections are plain text, e.g. 413 "Failed to
/// buffer the request body: length limit exceeded") becomes
/// `{"error": {"status": N, "message": "<that text>"}}` with the same status and the
/// same other headers (`Allow`, `WWW-Authenticate`); an empty body gets the status'
/// reason phrase as its message. JSON answers pass untouched.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_WRAPPED_ERROR)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut wrapped = ApiError(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            wrapped.headers_mut().append(name.clone(), value.clone());
        }
    }
    wrapped
}

/// An API error rendered as `{"error": {"status": 404, "message": "…"}}` with that
/// HTTP status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({ "error": { "status": self.0.as_u16(), "message": self.1 } })),
        )
            .into_response()
    }
}

/// A query string axum could not parse (an unknown parameter, a bad number) is a JSON
/// error like every other.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.body_text())
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
    let mut v = serde_json::to_value(IncidentView::from(d.incident.clone())).unwrap_or_default();
    api_kpi::add_extras(&st, &d.incident, &mut v).await?;
    v["timeline"] = serde_json::to_value(d.timeline).unwrap_or_default();
    v["notifications"] = serde_json::to_value(d.notifications).unwrap_or_default();
    v["members"] = serde_json::to_value(d.members).unwrap_or_default();
    Ok(Json(v))
}

/// A name for the timeline: 1 to 128 bytes, no control characters, no `<` or `>`
/// (markup), and no invisible format characters (zero-width, bidirectional overrides)
/// that could disguise it.
fn valid_actor(by: &str) -> bool {
    !by.is_empty()
        && by.len() <= 128
        && !by.chars().any(|c| {
            c.is_control()
                || c == '<'
                || c == '>'
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
        })
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("incident id {id:?} is not a number"),
        )
    })
}

async fn ack_incident(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    change(st, &id, &headers, &body, "acknowledged").await
}

async fn resolve_incident(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    change(st, &id, &headers, &body, "resolved").await
}

/// Applies an acknowledge or resolve asked through the API: 200 with the incident
/// (`result` `done` or `unchanged`), 404, 409 when the state forbids it, 400 for a bad
/// body, 401/403 without the right to change.
async fn change(
    st: AppState,
    id: &str,
    headers: &axum::http::HeaderMap,
    body: &[u8],
    to: &'static str,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.writes.check(headers)?;
    let id = parse_id(id)?;
    let req: ChangeRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("body must be JSON {{\"by\": \"name\", \"note\": \"why\"}}: {e}"),
        )
    })?;
    let by = req.by.trim().to_owned();
    if !valid_actor(&by) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`by` must name who does it (1 to 128 printable characters)".into(),
        ));
    }
    let note = crate::convert::clip_text(&req.note);
    let outcome = st
        .store
        .call(move |s| s.change_via(crate::store::Via::Api, id, &by, &note, to))
        .await?;
    let (result, message) = match outcome {
        crate::store::Change::Done => {
            st.outbox_wake.send_modify(|n| *n += 1);
            ("done", format!("incident {id} {to}"))
        }
        crate::store::Change::Unchanged(m) => ("unchanged", m),
        crate::store::Change::Conflict(m) => return Err(ApiError(StatusCode::CONFLICT, m)),
        crate::store::Change::NotFound => {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no incident {id}")));
        }
    };
    let detail: Option<IncidentDetail> = st.store.call(move |s| s.incident(id)).await?;
    let incident = detail
        .map(|d| serde_json::to_value(IncidentView::from(d.incident)).unwrap_or_default())
        .unwrap_or_default();
    Ok(Json(
        json!({ "result": result, "message": message, "incident": incident }),
    ))
}

/// Body of `POST /api/v1/silences`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceRequest {
    /// `name=value`, `name!=value`, `name=~regex`, `name!~regex`; all must match.
    matchers: Vec<String>,
    /// How long from `starts_at_ms` (e.g. `"2h"`); optional with `ends_with_incident`
    /// (then the longest silence, 30 days, unless the incident resolves first).
    #[serde(default)]
    duration: Option<String>,
    /// The silence ends when this incident resolves (it must exist and be open).
    #[serde(default)]
    ends_with_incident: Option<i64>,
    /// Start (Unix ms); default now.
    #[serde(default)]
    starts_at_ms: Option<i64>,
    /// Owner.
    by: String,
    /// Why (required).
    reason: String,
}

/// Longest silence: a forgotten silence must not mute a node for ever.
const MAX_SILENCE: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

async fn add_silence(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    st.writes.check(&headers)?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let req: SilenceRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "body must be JSON {{\"matchers\": [\"node=web-1\"], \"duration\": \"2h\", \"by\": \"name\", \"reason\": \"why\"}}: {e}"
        ))
    })?;
    if req.matchers.is_empty() {
        return Err(bad("a silence needs at least one matcher".into()));
    }
    let matchers = req
        .matchers
        .iter()
        .map(|m| crate::silence::Matcher::parse(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let by = req.by.trim().to_owned();
    let reason = crate::convert::clip_text(req.reason.trim());
    if !valid_actor(&by) {
        return Err(bad(
            "`by` must name the owner (1 to 128 printable characters)".into(),
        ));
    }
    // Older CLIs sent "unknown" when $USER was unset: a silence needs a real owner.
    if by.eq_ignore_ascii_case("unknown") {
        return Err(bad(
            "`by` must name the owner: \"unknown\" names no one".into()
        ));
    }
    if reason.is_empty() {
        return Err(bad("`reason` is required: say why paging is muted".into()));
    }
    let duration = match (&req.duration, req.ends_with_incident) {
        (None, Some(_)) => MAX_SILENCE,
        (None, None) => {
            return Err(bad(
                "`duration` is required (e.g. \"2h\") unless the silence ends with an incident (`ends_with_incident`)".into(),
            ));
        }
        (Some(d), _) => tocsin_agent::settings::parse_duration(d)
            .filter(|d| !d.is_zero() && *d <= MAX_SILENCE)
            .ok_or_else(|| {
                bad(format!(
                    "duration {d:?}: expected e.g. \"30m\" or \"2h\", at most 30d"
                ))
            })?,
    };
    if let Some(incident) = req.ends_with_incident {
        let detail: Option<IncidentDetail> = st.store.call(move |s| s.incident(incident)).await?;
        match detail {
            None => return Err(bad(format!("ends_with_incident: no incident {incident}"))),
            Some(d) if d.incident.status == crate::model::Status::Resolved => {
                return Err(bad(format!(
                    "ends_with_incident: incident {incident} is already resolved"
                )));
            }
            Some(_) => {}
        }
    }
    // A matcher on a label that no known node or check has is probably a typo: the
    // silence is added, and the answer warns.
    let known = st.store.call(|s| s.known_label_names()).await?;
    let warnings: Vec<String> = matchers
        .iter()
        .filter(|m| {
            !crate::silence::FIELD_NAMES.contains(&m.name.as_str()) && !known.contains(&m.name)
        })
        .map(|m| {
            format!(
                "matcher {:?}: no known node or check has a label {:?}",
                m.text, m.name
            )
        })
        .collect();
    let now = crate::model::now_ms();
    let starts = req.starts_at_ms.unwrap_or(now);
    let year_ms = 365 * 86_400_000;
    if starts < now - 86_400_000 || starts > now + year_ms {
        return Err(bad(
            "starts_at_ms must be within a day before and a year after now (Unix ms)".into(),
        ));
    }
    let ends = starts.saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX));
    let until = req.ends_with_incident;
    let id = st
        .store
        .call(move |s| s.add_silence_with(matchers, starts, ends, &by, &reason, until))
        .await?;
    let views = st
        .store
        .call(move |s| Ok(s.silences(crate::model::now_ms())))
        .await?;
    let view = views.into_iter().find(|v| v.id == id);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "silence": view, "warnings": warnings })),
    ))
}

async fn list_silences(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let views = st
        .store
        .call(|s| Ok(s.silences(crate::model::now_ms())))
        .await?;
    Ok(Json(json!({ "silences": views })))
}

async fn expire_silence(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.writes.check(&headers)?;
    let id: i64 = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("silence id {id:?} is not a number"),
        )
    })?;
    let by = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["by"].as_str().map(|b| b.trim().to_owned()))
        .unwrap_or_default();
    if !valid_actor(&by) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`by` must name who ends it (1 to 128 printable characters)".into(),
        ));
    }
    let found = st.store.call(move |s| s.expire_silence(id, &by)).await?;
    if !found {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no silence {id}")));
    }
    Ok(Json(json!({ "result": "expired", "id": id })))
}

async fn list_nodes(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes: Vec<Node> = st.store.call(|s| s.nodes()).await?;
    Ok(Json(json!({ "nodes": nodes })))
}

#[cfg(test)]
mod actor_tests {
    use super::valid_actor;

    #[test]
    fn actors_are_visible_names() {
        assert!(valid_actor("alice"));
        assert!(valid_actor("Zoë 张"));
        assert!(!valid_actor(""));
        assert!(!valid_actor("a\nb"));
        assert!(!valid_actor("\u{1b}[31malice"));
        assert!(!valid_actor("ali\u{202E}ecila"));
        assert!(!valid_actor("ali\u{200B}ce"));
        assert!(!valid_actor(&"x".repeat(129)));
        assert!(!valid_actor("<script>alice"));
        assert!(!valid_actor("alice>"));
    }
}
