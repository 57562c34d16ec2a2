//! The recovery hooks API: list the hooks, start one by hand, read runs.
//!
//! - `GET /api/v1/hooks`: `{"hooks": [{name, kind, description, program, timeout,
//!   kill_grace, max_concurrent, max_queued, on, on_resolve, remediates_for, running,
//!   queued}]}` (the program only, not its arguments: they may carry secrets).
//! - `POST /api/v1/hooks/{name}/run` with `{"by": "alice", "incident_id": 7?, "reason":
//!   "…"?, "force": false?}` (same write access as acknowledge): 202 `{"result": "queued",
//!   "run": …}`; 409 `{"error", "run"}` when refused (the hook's slots and queue are full;
//!   the refusal is recorded); 404 for an unknown hook or incident; 400 for a bad body.
//!   The rollback hook (`kind = "rollback"`, event `rollback`) needs a non-blank
//!   `reason` (else 400), and is refused with 409 `{"error", "busy_run_id"}` (nothing
//!   recorded) while another of its runs is queued or running, unless `force`.
//! - `GET /api/v1/hooks/runs?incident=ID&hook=NAME&limit=N`: `{"runs": […]}`, newest first
//!   (default and most [`MAX_RUNS`]); 404 when incident `ID` does not exist.
//! - `GET /api/v1/hooks/runs/{id}`: `{"run": …}`, 404.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, valid_actor};
use crate::store::{Queued, RunRequest};

/// Most runs one list request returns.
pub const MAX_RUNS: usize = 200;

pub(super) async fn list(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = st.store.call(|s| s.hook_run_counts()).await?;
    let hooks: Vec<serde_json::Value> = st
        .hooks
        .list
        .iter()
        .map(|h| {
            let (running, queued) = counts.get(&h.name).copied().unwrap_or_default();
            json!({
                "name": h.name,
                "kind": h.kind,
                "description": h.description,
                "program": h.argv.first(),
                "timeout": tocsin_agent::settings::format_duration(h.timeout),
                "kill_grace": tocsin_agent::settings::format_duration(h.kill_grace),
                "max_concurrent": h.max_concurrent,
                "max_queued": h.max_queued,
                "on": h.on.as_ref().map(crate::hook::On::describe),
                "on_resolve": h.on_resolve,
                "running": running,
                "queued": queued,
            })
        })
        .collect();
    Ok(Json(json!({ "hooks": hooks })))
}

/// Body of `POST /api/v1/hooks/{name}/run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// Who runs it (recorded, `TOCSIN_STARTED_BY`).
    by: String,
    /// The incident whose fields the hook gets.
    #[serde(default)]
    incident_id: Option<i64>,
    /// Why (`TOCSIN_REASON`).
    #[serde(default)]
    reason: String,
    /// `TOCSIN_FORCE=1`.
    #[serde(default)]
    force: bool,
}

pub(super) async fn start(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    st.writes.check(&headers)?;
    let req: RunBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "body must be JSON {{\"by\": \"name\", \"incident_id\": 7, \"reason\": \"why\", \"force\": false}}: {e}"
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
    let Some(hook) = st.hooks.get(&name) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no hook {name:?}")));
    };
    if hook.kind == crate::hook::Kind::Rollback && req.reason.trim().is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "hook {name:?} is the rollback hook: `reason` must say why (it is recorded and reaches the hook as TOCSIN_REASON)"
            ),
        ));
    }
    let ask = RunRequest {
        hook: name.clone(),
        incident_id: req.incident_id,
        by,
        reason: crate::convert::clip_text(req.reason.trim()),
        force: req.force,
    };
    let queued = st.store.call(move |s| s.queue_hook_run(&ask)).await?;
    match queued {
        Queued::NoSuchHook => Err(ApiError(StatusCode::NOT_FOUND, format!("no hook {name:?}"))),
        Queued::RollbackBusy { run_id, status } => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!(
                    "refused: rollback run #{run_id} is {status}; one rollback at a time \
                     (wait for it, or force to queue another)"
                ),
                "status": 409,
                "busy_run_id": run_id,
            })),
        )
            .into_response()),
        Queued::NoSuchIncident => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no incident {}", req.incident_id.unwrap_or_default()),
        )),
        Queued::Run(run) if run.status == "refused" => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": run.error.clone().unwrap_or_default(),
                "status": 409,
                "run": run,
            })),
        )
            .into_response()),
        Queued::Run(run) => {
            st.hooks.wake.send_modify(|n| *n += 1);
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "result": "queued", "run": run })),
            )
                .into_response())
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RunsQuery {
    /// Runs of this incident.
    incident: Option<i64>,
    /// Runs of this hook.
    hook: Option<String>,
    /// At most this many (default and cap [`MAX_RUNS`]).
    limit: Option<usize>,
}

pub(super) async fn runs(
    State(st): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(MAX_RUNS).min(MAX_RUNS);
    let incident = q.incident;
    let runs = st
        .store
        .call(move |s| {
            // An incident that does not exist is a 404, not an empty list.
            if let Some(id) = q.incident
                && !s.incident_exists(id)?
            {
                return Ok(None);
            }
            s.hook_runs(q.incident, q.hook.as_deref(), limit).map(Some)
        })
        .await?;
    match runs {
        Some(runs) => Ok(Json(json!({ "runs": runs }))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no incident {}", incident.unwrap_or_default()),
        )),
    }
}

pub(super) async fn run(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("run id {id:?} is not a number"),
        )
    })?;
    match st.store.call(move |s| s.hook_run(id)).await? {
        Some(run) => Ok(Json(json!({ "run": run }))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no hook run {id}"))),
    }
}
