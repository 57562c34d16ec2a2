//! The drills API (see `crate::drill`).
//!
//! - `POST /api/v1/drills` with `{"by": "alice", "node": "web-1", "scenario":
//!   "process_crash" | "high_load" | "dependency_down" | "node_down" | "all",
//!   "duration_s": 20?, "wait_s": 60?, "target": "nginx"?, "page_real": false?,
//!   "detach": false?}` (same write access as acknowledge). `duration_s` is 1 to 600
//!   (default 20; a `node_down` fault is stretched past the node's liveness timeout
//!   when it is not given, and a given one shorter than that is refused); `wait_s` is
//!   1 to 3600 (default 60). `target` must name a process watch (`process_crash`) or a
//!   `[[tcp]]`/`[[http]]` check (`dependency_down`) the node reported. The drill runs
//!   on the server as its own task: a client that goes away does not stop it, and it
//!   records its report itself. Answers: with `detach: true`, 202 at once with
//!   `{"drill": row, "plan": {"scenarios": [{"scenario", "duration_s"}…], "wait_s",
//!   "notes": […]}}` (poll `GET /api/v1/drills/{id}`); without, 200 `{"drill": report}`
//!   when it is over (up to duration + wait per scenario), `report.status` `passed`,
//!   `failed`, `interrupted`, `inconclusive` or `refused`. 400 for a bad body,
//!   scenario, duration, wait or target; 404 when the node is not connected; 409 when
//!   a drill is already open on the node (the message names it). `page_real: true`
//!   pages the real routes at the real severity, P1 included; by default a drill never
//!   takes the P1 path (`[drills] channels`, or the real routes at most as a P2).
//! - `GET /api/v1/drills`: `{"drills": [row…]}`, newest first (at most 100); a row's
//!   `status` is `running`, `passed`, `failed`, `inconclusive`, `refused` or
//!   `interrupted`, with `page_real`, `until_ms` (end of the drill window),
//!   `restarted_ms` and `scope` (the checks its mark applies to).
//! - `GET /api/v1/drills/{id}`: `{"drill": row}`; 404 when there is no such drill.

use axum::extract::Path;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, valid_actor};
use crate::drill::{
    DEFAULT_WAIT, DrillError, DrillRequest, MAX_DURATION, MAX_WAIT, MIN_DURATION, MIN_WAIT,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    by: String,
    node: String,
    scenario: String,
    #[serde(default)]
    duration_s: Option<f64>,
    #[serde(default)]
    wait_s: Option<f64>,
    #[serde(default)]
    target: String,
    #[serde(default)]
    page_real: bool,
    #[serde(default)]
    detach: bool,
}

/// `v` seconds within `[min, max]`; `None` stays `None`.
fn seconds(
    v: Option<f64>,
    min: Duration,
    max: Duration,
    what: &str,
) -> Result<Option<Duration>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= min.as_secs_f64() && s <= max.as_secs_f64() => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(s) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{what} {s} must be at least {} and at most {} seconds",
                min.as_secs(),
                max.as_secs()
            ),
        )),
    }
}

pub(super) async fn start(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    st.writes.check(&headers)?;
    let req: StartBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "body must be JSON {{\"by\": \"name\", \"node\": \"web-1\", \"scenario\": \"process_crash\", \"duration_s\": 20}}: {e}"
            ),
        )
    })?;
    let by = req.by.trim().to_owned();
    if !valid_actor(&by) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`by` must name who runs it (1 to 128 printable characters)".into(),
        ));
    }
    let ask = DrillRequest {
        node: req.node,
        scenario: req.scenario,
        duration: seconds(req.duration_s, MIN_DURATION, MAX_DURATION, "duration_s")?,
        wait: seconds(req.wait_s, MIN_WAIT, MAX_WAIT, "wait_s")?.unwrap_or(DEFAULT_WAIT),
        target: req.target,
        by,
        page_real: req.page_real,
    };
    let started = match crate::drill::start(&st.store, &st.drills, ask).await {
        Ok(s) => s,
        Err(DrillError::Invalid(m)) => return Err(ApiError(StatusCode::BAD_REQUEST, m)),
        Err(DrillError::NotConnected(m)) => return Err(ApiError(StatusCode::NOT_FOUND, m)),
        Err(DrillError::Busy { message, .. }) => {
            return Err(ApiError(StatusCode::CONFLICT, message));
        }
        Err(DrillError::Store(e)) => return Err(e.into()),
    };
    if req.detach {
        let plan = json!({
            "scenarios": started.durations.iter().map(|(s, d)| json!({
                "scenario": s, "duration_s": d.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "wait_s": started.wait.as_secs_f64(),
            "notes": started.notes,
        });
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "drill": started.row, "plan": plan })),
        )
            .into_response());
    }
    // The run is its own task: if this client goes away, it still ends and records.
    match started.run.await {
        Ok(report) => Ok(Json(json!({ "drill": report })).into_response()),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the drill run failed: {e}"),
        )),
    }
}

pub(super) async fn list(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = st.store.call(|s| s.drills(100)).await?;
    Ok(Json(json!({ "drills": rows })))
}

pub(super) async fn one(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("drill id {id:?} is not a number"),
        )
    })?;
    match st.store.call(move |s| s.drill(id)).await? {
        Some(row) => Ok(Json(json!({ "drill": row }))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no drill {id}"))),
    }
}
