//! The drills API (see `crate::drill`).
//!
//! - `POST /api/v1/drills` with `{"by": "alice", "node": "web-1", "scenario":
//!   "process_crash" | "high_load" | "dependency_down" | "node_down" | "all",
//!   "duration_s": 20?, "wait_s": 60?, "target": "nginx"?, "page_real": false?}` (same
//!   write access as acknowledge): runs the drill and answers when it is over (up to
//!   duration + wait per scenario): 200 `{"drill": report}` with `report.status`
//!   `passed`, `failed` or `refused`, `report.page_real` and `report.paging` (how its
//!   incidents were paged); 400 for a bad body or scenario; 404 when the node is not
//!   connected. `page_real: true` pages the real routes at the real severity, P1
//!   included; by default a drill never takes the P1 path (`[drills] channels`, or the
//!   real routes at most as a P2).
//! - `GET /api/v1/drills`: `{"drills": [row…]}`, newest first (at most 100); a row's
//!   `status` is `running`, `passed`, `failed`, `refused` or `interrupted` (the
//!   aggregator restarted during the drill), with `page_real`, `until_ms` (end of the
//!   drill window) and `restarted_ms`.
//! - `GET /api/v1/drills/{id}`: `{"drill": row}`; 404 when there is no such drill.

use axum::extract::Path;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, valid_actor};
use crate::drill::{DEFAULT_DURATION, DEFAULT_WAIT, DrillError, DrillRequest};

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
}

fn seconds(v: Option<f64>, default: Duration, what: &str) -> Result<Duration, ApiError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{what} {s} must be above 0 and at most 3600 seconds"),
        )),
    }
}

pub(super) async fn start(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
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
        duration: seconds(req.duration_s, DEFAULT_DURATION, "duration_s")?,
        wait: seconds(req.wait_s, DEFAULT_WAIT, "wait_s")?,
        target: req.target,
        by,
        page_real: req.page_real,
    };
    match crate::drill::run(&st.store, &st.drills, ask).await {
        Ok(report) => Ok(Json(json!({ "drill": report }))),
        Err(DrillError::Invalid(m)) => Err(ApiError(StatusCode::BAD_REQUEST, m)),
        Err(DrillError::NotConnected(m)) => Err(ApiError(StatusCode::NOT_FOUND, m)),
        Err(DrillError::Store(e)) => Err(e.into()),
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
