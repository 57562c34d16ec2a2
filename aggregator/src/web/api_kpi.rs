//! The API of the CLI's reports: filtered incident lists, KPIs (`/api/v1/kpi`),
//! post-mortem drafts and links, and the one-screen status (`/api/v1/status`). The
//! definitions are [`crate::kpi`]'s; these handlers parse requests, load rows through the
//! store and render. `docs/API.md` documents every endpoint.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, AppState, IncidentView, MAX_LIST, parse_id, valid_actor};
use crate::kpi;
use crate::model::{Incident, Severity, Status, now_ms, rfc3339};
use crate::store::{Change, IncidentDetail, IncidentQuery, PostmortemLink};

/// Default KPI range when `since` is not given: the 30 days before `until` (the seed
/// states its availability target per month).
pub const DEFAULT_KPI_RANGE_MS: i64 = 30 * 86_400_000;

/// The post-mortem draft template, embedded.
const POSTMORTEM_TEMPLATE: &str = include_str!("../../templates/postmortem.md.j2");

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// Parses a time parameter: Unix ms (`1705276800000`), RFC 3339 in UTC
/// (`2024-01-15T00:00:00Z`) or a duration before `now` (`2h`, `30m`, `7d`).
///
/// # Errors
/// A message naming `param` and the accepted forms.
pub fn parse_time(param: &str, raw: &str, now: i64) -> Result<i64, String> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.chars().all(|c| c.is_ascii_digit()) {
        return raw
            .parse()
            .map_err(|_| format!("{param} {raw:?}: Unix milliseconds out of range"));
    }
    if let Some(d) = tocsin_agent::settings::parse_duration(raw) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now.saturating_sub(ms));
    }
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            format!(
                "{param} {raw:?}: expected RFC 3339 in UTC (2024-01-15T08:00:00Z), a duration before now (2h, 7d) or Unix milliseconds"
            )
        })
}

/// Parses a comma-separated severity list (`P1,P2`, case-insensitive).
///
/// # Errors
/// A message naming the bad item.
pub fn parse_severities(raw: &str) -> Result<Vec<Severity>, String> {
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let sev = Severity::parse(&part.to_ascii_uppercase())
            .ok_or_else(|| format!("severity {part:?}: expected P1, P2, P3 or P4"))?;
        if !out.contains(&sev) {
            out.push(sev);
        }
    }
    Ok(out)
}

/// Parses a comma-separated status list: `open` (triggered and acknowledged),
/// `triggered`, `acknowledged`, `resolved`, `all`.
///
/// # Errors
/// A message naming the bad item.
pub fn parse_statuses(raw: &str) -> Result<Vec<Status>, String> {
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: &[Status] = match part.to_ascii_lowercase().as_str() {
            "all" => &[Status::Triggered, Status::Acknowledged, Status::Resolved],
            "open" => &[Status::Triggered, Status::Acknowledged],
            "triggered" => &[Status::Triggered],
            "acknowledged" | "acked" => &[Status::Acknowledged],
            "resolved" => &[Status::Resolved],
            _ => {
                return Err(format!(
                    "status {part:?}: expected open, triggered, acknowledged, resolved or all"
                ));
            }
        };
        for s in add {
            if !out.contains(s) {
                out.push(*s);
            }
        }
    }
    Ok(out)
}

/// Query of `GET /api/v1/incidents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Comma list of `open`, `triggered`, `acknowledged`, `resolved`, `all` (default).
    status: Option<String>,
    /// Same as `status`.
    state: Option<String>,
    /// Comma list of `P1` … `P4`.
    severity: Option<String>,
    /// Opened at or after (see [`parse_time`]).
    since: Option<String>,
    /// At most this many (default and cap [`MAX_LIST`]).
    limit: Option<usize>,
}

/// What the KPI side adds to an incident's JSON: `peak_severity` (the highest it
/// reached) and `postmortem` (see [`kpi::postmortem_status`], judged on the peak; a
/// drill incident, `drill=true`, owes none, so it is never "post-mortem due").
pub(super) fn extras(
    incident: &Incident,
    peak: Option<Severity>,
    link: Option<&PostmortemLink>,
    now: i64,
) -> (Severity, Option<kpi::PostmortemStatus>) {
    let peak = peak.unwrap_or(incident.severity);
    // A drill incident owes no post-mortem (the drill's report is its record).
    let resolved = incident
        .resolved_at_ms
        .filter(|_| !kpi::is_drill(&incident.labels));
    let pm = kpi::postmortem_status(peak, resolved, link.map(|l| l.url.as_str()), now);
    (peak, pm)
}

/// An incident in API form plus [`extras`].
pub(super) fn incident_json(
    incident: Incident,
    peak: Option<Severity>,
    link: Option<&PostmortemLink>,
    now: i64,
) -> Value {
    let (peak, pm) = extras(&incident, peak, link, now);
    let mut v = serde_json::to_value(IncidentView::from(incident)).unwrap_or_default();
    v["peak_severity"] = json!(peak);
    v["postmortem"] = serde_json::to_value(pm).unwrap_or_default();
    v
}

/// `GET /api/v1/incidents?status=&severity=&since=&limit=`.
pub(super) async fn list_incidents(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let now = now_ms();
    let statuses = match (q.status.as_deref(), q.state.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(
                "give `status` or `state` (the same filter), not both".into()
            ));
        }
        (Some(s), _) | (None, Some(s)) => parse_statuses(s).map_err(bad)?,
        (None, None) => Vec::new(),
    };
    let query = IncidentQuery {
        statuses,
        severities: parse_severities(q.severity.as_deref().unwrap_or("")).map_err(bad)?,
        since_ms: q
            .since
            .as_deref()
            .map(|s| parse_time("since", s, now))
            .transpose()
            .map_err(bad)?,
        limit: q.limit.unwrap_or(MAX_LIST).min(MAX_LIST),
    };
    let (incidents, peaks, links) = st
        .store
        .call(move |s| {
            let incidents = s.incidents_where(&query)?;
            let ids: Vec<i64> = incidents.iter().map(|i| i.id).collect();
            Ok((
                incidents,
                s.peak_severities(&ids)?,
                s.postmortem_links(&ids)?,
            ))
        })
        .await?;
    let views: Vec<Value> = incidents
        .into_iter()
        .map(|i| {
            let (peak, link) = (peaks.get(&i.id).copied(), links.get(&i.id));
            incident_json(i, peak, link, now)
        })
        .collect();
    Ok(Json(json!({ "incidents": views })))
}

/// Adds `peak_severity` and `postmortem` (see [`extras`]) to `v`, the JSON of
/// `incident`, for `GET /api/v1/incidents/{id}`.
pub(super) async fn add_extras(
    st: &AppState,
    incident: &Incident,
    v: &mut Value,
) -> Result<(), ApiError> {
    let id = incident.id;
    let (peaks, links) = st
        .store
        .call(move |s| Ok((s.peak_severities(&[id])?, s.postmortem_links(&[id])?)))
        .await?;
    let (peak, pm) = extras(incident, peaks.get(&id).copied(), links.get(&id), now_ms());
    v["peak_severity"] = json!(peak);
    v["postmortem"] = serde_json::to_value(pm).unwrap_or_default();
    Ok(())
}

/// Query of `GET /api/v1/kpi`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KpiQuery {
    /// Range start (default: 30 days before `until`).
    since: Option<String>,
    /// Range end (default: now).
    until: Option<String>,
    /// Only this service (`service` label, else node).
    service: Option<String>,
    /// Comma list of severities.
    severity: Option<String>,
}

/// `GET /api/v1/kpi?since=&until=&service=&severity=`: a [`kpi::KpiReport`].
pub(super) async fn kpi_report(
    State(st): State<AppState>,
    q: Result<Query<KpiQuery>, QueryRejection>,
) -> Result<Json<kpi::KpiReport>, ApiError> {
    let Query(q) = q?;
    let now = now_ms();
    let until = q
        .until
        .as_deref()
        .map(|s| parse_time("until", s, now))
        .transpose()
        .map_err(bad)?
        .unwrap_or(now);
    let since = q
        .since
        .as_deref()
        .map(|s| parse_time("since", s, now))
        .transpose()
        .map_err(bad)?
        .unwrap_or(until.saturating_sub(DEFAULT_KPI_RANGE_MS));
    if since >= until {
        return Err(bad(format!(
            "since ({}) must be before until ({})",
            rfc3339(since),
            rfc3339(until)
        )));
    }
    let query = kpi::Query {
        since_ms: since,
        until_ms: until,
        service: q
            .service
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        severities: parse_severities(q.severity.as_deref().unwrap_or("")).map_err(bad)?,
    };
    let rows = st
        .store
        .call(move |s| s.kpi_incidents(since, until))
        .await?;
    Ok(Json(kpi::report(&rows, &query, now)))
}

/// One measured time of the post-mortem: human text, seconds, target, met.
#[derive(Debug, Serialize)]
struct Measured {
    text: String,
    seconds: f64,
    target: Option<String>,
    met: Option<bool>,
}

pub(super) fn human(seconds: f64) -> String {
    let whole = std::time::Duration::from_secs(seconds.max(0.0).round() as u64);
    tocsin_agent::settings::format_duration(whole)
}

fn measured(seconds: Option<f64>, target: Option<f64>) -> Option<Measured> {
    seconds.map(|s| Measured {
        text: human(s),
        seconds: s,
        target: target.map(|t| format!("< {}", human(t))),
        met: target.map(|t| s <= t),
    })
}

/// Renders the post-mortem draft of `d` (the highest severity it reached `peak`, its
/// linked post-mortem `link`, at `now`) as Markdown.
///
/// # Errors
/// minijinja's, should the embedded template fail (a bug the unit test catches).
pub fn render_postmortem(
    d: &IncidentDetail,
    peak: Option<Severity>,
    link: Option<&PostmortemLink>,
    now: i64,
) -> Result<String, minijinja::Error> {
    let i = &d.incident;
    let peak = peak.unwrap_or(i.severity);
    let k = {
        let entries: Vec<(i64, String)> = d
            .timeline
            .iter()
            .map(|t| (t.at_ms, t.kind.clone()))
            .collect();
        let first_ack = entries
            .iter()
            .find(|(_, k)| k == "acknowledged")
            .map(|(at, _)| *at)
            .or(i.acknowledged_at_ms);
        let recovery = entries
            .iter()
            .find(|(_, k)| kpi::is_recovery_kind(k))
            .map(|(at, _)| *at);
        kpi::KpiIncident {
            id: i.id,
            service: kpi::service_of(&i.labels, &i.node),
            severity: peak,
            drill: kpi::is_drill(&i.labels),
            breach_started_at_ms: i.breach_started_at_ms,
            triggered_at_ms: i.triggered_at_ms,
            first_ack_ms: first_ack,
            recovery_started_ms: recovery.into_iter().chain(first_ack).min(),
            resolved_at_ms: i.resolved_at_ms,
            open_spans: Vec::new(),
        }
    };
    let mttr_target = match peak {
        Severity::P1 => Some(kpi::targets::MTTR_P1_S),
        Severity::P2 => Some(kpi::targets::MTTR_P2_S),
        _ => None,
    };
    let recovery_target = (peak == Severity::P1).then_some(kpi::targets::P1_RECOVERY_START_S);
    let mut nodes: Vec<&str> = d.members.iter().map(|m| m.node.as_str()).collect();
    if nodes.is_empty() {
        nodes.push(&i.node);
    }
    nodes.sort_unstable();
    nodes.dedup();
    let timeline: Vec<Value> = d
        .timeline
        .iter()
        .map(
            |t| json!({ "at": rfc3339(t.at_ms), "kind": t.kind, "actor": t.actor, "note": t.note }),
        )
        .collect();
    let recovery: Vec<Value> = d
        .timeline
        .iter()
        .filter(|t| kpi::is_recovery_kind(&t.kind) && t.kind != "acknowledged")
        .map(
            |t| json!({ "at": rfc3339(t.at_ms), "kind": t.kind, "actor": t.actor, "note": t.note }),
        )
        .collect();
    let open_for = i.resolved_at_ms.unwrap_or(now) - i.triggered_at_ms;
    let ctx = json!({
        "incident": {
            "id": i.id,
            "severity": peak.as_str(),
            "current_severity": i.severity.as_str(),
            "status": i.status.as_str(),
            "node": i.node,
            "check": i.check,
            "service": k.service,
            "drill": k.drill,
            "summary": i.summary,
            "labels": i.labels,
            "dedup_key": i.dedup_key,
            "breach_started_at": (i.breach_started_at_ms > 0).then(|| rfc3339(i.breach_started_at_ms)),
            "triggered_at": rfc3339(i.triggered_at_ms),
            "acknowledged_at": k.first_ack_ms.map(rfc3339),
            "resolved_at": i.resolved_at_ms.map(rfc3339),
            "resolution": i.resolution,
        },
        "nodes": nodes,
        "members": d.members.iter().map(|m| json!({
            "node": m.node, "check": m.check, "state": m.state.as_str(), "message": m.message,
        })).collect::<Vec<_>>(),
        "duration": human(open_for.max(0) as f64 / 1000.0),
        "times": {
            "detect": measured(k.ttd_s(), Some(kpi::targets::MTTD_S)),
            "acknowledge": measured(k.tta_s(), Some(kpi::targets::MTTA_S)),
            "recovery_started": measured(k.recovery_start_s(), recovery_target),
            "recover": measured(k.ttr_s(), mttr_target),
        },
        "timeline": timeline,
        "recovery": recovery,
        "notifications": d.notifications.iter().map(|n| json!({
            "channel": n.channel, "kind": n.kind, "status": n.status,
            "attempts": n.attempts, "last_error": n.last_error,
        })).collect::<Vec<_>>(),
        "postmortem": kpi::postmortem_status(peak, i.resolved_at_ms, link.map(|l| l.url.as_str()), now),
        "generated_at": rfc3339(now),
    });
    let mut env = minijinja::Environment::new();
    env.add_filter("md", |v: minijinja::Value| md_inline(&plain(&v)));
    env.add_filter("code", |v: minijinja::Value| md_code(&plain(&v)));
    env.add_filter("note", |v: minijinja::Value, indent: String| {
        md_note(&plain(&v), &indent)
    });
    env.add_template("postmortem.md.j2", POSTMORTEM_TEMPLATE)?;
    let text = env
        .get_template("postmortem.md.j2")?
        .render(minijinja::Value::from(minijinja::value::Serde(&ctx)))?;
    Ok(format!("{}\n", text.trim()))
}

fn plain(v: &minijinja::Value) -> String {
    if v.is_none() || v.is_undefined() {
        String::new()
    } else {
        v.to_string()
    }
}

/// One line of untrusted text (check output, notes, node names) for Markdown that may
/// be rendered to HTML: `&`, `<`, `>` become entities; Markdown punctuation that could
/// start emphasis, code, links or table cells is backslash-escaped, as is a line start
/// that would open a heading, list or quote; line breaks become spaces.
pub fn md_inline(text: &str) -> String {
    let one_line = text
        .split(['\n', '\r'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let t = one_line.trim();
    let mut out = String::with_capacity(t.len() + 8);
    for c in t.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '~' => {
                out.push('\\');
                out.push(c);
            }
            _ if c.is_control() => out.push(' '),
            _ => out.push(c),
        }
    }
    // A line start that would make a heading, list item or thematic break.
    if out.starts_with(['#', '-', '+', '=']) {
        out.insert(0, '\\');
    } else if let Some(n) = out.find(|c: char| !c.is_ascii_digit())
        && n > 0
        && out[n..].starts_with(['.', ')'])
    {
        out.insert(n, '\\');
    }
    out
}

/// A Markdown code span of `text` (one line), delimited by more backticks than any run
/// inside it.
pub fn md_code(text: &str) -> String {
    let line = text.replace(['\n', '\r'], " ");
    let fence = "`".repeat(longest_backtick_run(&line) + 1);
    format!("{fence} {line} {fence}")
}

/// A note or check output after `: ` in a list item: one line as [`md_inline`]; several
/// lines as a fenced code block indented by `indent` (the list item's continuation),
/// fenced by more backticks (at least three) than any run inside.
pub fn md_note(text: &str, indent: &str) -> String {
    let text = text.trim_end();
    if !text.contains(['\n', '\r']) {
        return md_inline(text);
    }
    let fence = "`".repeat((longest_backtick_run(text) + 1).max(3));
    let mut out = format!("\n\n{indent}{fence}text\n");
    for line in text.lines() {
        out.push_str(indent);
        out.push_str(&line.replace(|c: char| c.is_control() && c != '\t', " "));
        out.push('\n');
    }
    out.push_str(indent);
    out.push_str(&fence);
    out.push('\n');
    out
}

fn longest_backtick_run(text: &str) -> usize {
    text.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

/// `GET /api/v1/incidents/{id}/postmortem`: the Markdown draft
/// (`text/markdown; charset=utf-8`).
pub(super) async fn get_postmortem(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let found = st
        .store
        .call(move |s| {
            let Some(d) = s.incident(id)? else {
                return Ok(None);
            };
            let peak = s.peak_severities(&[id])?.remove(&id);
            let link = s.postmortem_links(&[id])?.remove(&id);
            Ok(Some((d, peak, link)))
        })
        .await?;
    let Some((detail, peak, link)) = found else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no incident {id}")));
    };
    let text = render_postmortem(&detail, peak, link.as_ref(), now_ms()).map_err(|e| {
        tracing::error!(error = %e, incident = id, "post-mortem template failed");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the post-mortem template failed".into(),
        )
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
        text,
    )
        .into_response())
}

/// Body of `POST /api/v1/incidents/{id}/postmortem`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    /// Where the post-mortem is: an http or https URL.
    url: String,
    /// Who links it.
    by: String,
}

/// Longest post-mortem URL accepted.
const MAX_URL: usize = 2048;

/// `POST /api/v1/incidents/{id}/postmortem {"url", "by"}`: links a post-mortem (same
/// write access as acknowledge). 200 `{"result": "done"|"unchanged", "message",
/// "incident"}`, 400, 401/403, 404.
pub(super) async fn link_postmortem(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    st.writes.check(&headers)?;
    let id = parse_id(&id)?;
    let req: LinkRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "body must be JSON {{\"url\": \"https://…\", \"by\": \"name\"}}: {e}"
        ))
    })?;
    let by = req.by.trim().to_owned();
    if !valid_actor(&by) {
        return Err(bad(
            "`by` must name who links it (1 to 128 printable characters)".into(),
        ));
    }
    let url = req.url.trim().to_owned();
    let ok = url.len() <= MAX_URL
        && reqwest::Url::parse(&url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if !ok {
        return Err(bad(format!(
            "url {:?}: expected an http:// or https:// URL of at most {MAX_URL} bytes",
            tocsin_agent::event::printable(&url.chars().take(200).collect::<String>())
        )));
    }
    let outcome = st
        .store
        .call(move |s| s.link_postmortem(id, &url, &by))
        .await?;
    let (result, message) = match outcome {
        Change::Done => ("done", format!("post-mortem linked to incident {id}")),
        Change::Unchanged(m) => ("unchanged", m),
        Change::Conflict(m) => return Err(ApiError(StatusCode::CONFLICT, m)),
        Change::NotFound => {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no incident {id}")));
        }
    };
    let now = now_ms();
    let found = st
        .store
        .call(move |s| {
            let Some(d) = s.incident(id)? else {
                return Ok(None);
            };
            let peak = s.peak_severities(&[id])?.remove(&id);
            let link = s.postmortem_links(&[id])?.remove(&id);
            Ok(Some((d.incident, peak, link)))
        })
        .await?;
    let incident = match found {
        Some((i, peak, link)) => incident_json(i, peak, link.as_ref(), now),
        None => Value::Null,
    };
    Ok(Json(
        json!({ "result": result, "message": message, "incident": incident }),
    ))
}

/// `GET /api/v1/status`: the one-screen summary of `tocsin status`.
pub(super) async fn status(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let (counts, nodes, silences, open) = st
        .store
        .call(move |s| {
            let open = s.incidents_where(&IncidentQuery {
                statuses: vec![Status::Triggered, Status::Acknowledged],
                limit: 20,
                ..IncidentQuery::default()
            })?;
            Ok((s.status_counts(now)?, s.nodes()?, s.silences(now), open))
        })
        .await?;
    let mut by_severity: BTreeMap<&str, Value> = BTreeMap::new();
    let mut open_total = 0;
    for sev in ["P1", "P2", "P3", "P4"] {
        let per = counts.open.get(sev);
        let get = |k: &str| per.and_then(|m| m.get(k)).copied().unwrap_or(0);
        let (t, a) = (get("triggered"), get("acknowledged"));
        open_total += t + a;
        by_severity.insert(
            sev,
            json!({ "open": t + a, "triggered": t, "acknowledged": a }),
        );
    }
    let connected = nodes.iter().filter(|n| n.connected).count();
    let count_state = |state: &str| silences.iter().filter(|s| s.state == state).count();
    let mut open_list: Vec<Incident> = open;
    open_list.sort_by_key(|i| (i.severity, i.triggered_at_ms));
    let uptime_ms = (now - st.started_ms).max(0);
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(st.started_ms),
        "uptime_seconds": uptime_ms / 1000,
        "now": rfc3339(now),
        "incidents": {
            "open": open_total,
            "by_severity": by_severity,
            "postmortems_due": counts.postmortems_due,
            "postmortems_overdue": counts.postmortems_overdue,
            "oldest_open": open_list.into_iter().map(|i| json!({
                "id": i.id,
                "severity": i.severity,
                "status": i.status,
                "node": i.node,
                "check": i.check,
                "summary": i.summary,
                "triggered_at": rfc3339(i.triggered_at_ms),
                "age_seconds": (now - i.triggered_at_ms).max(0) / 1000,
            })).collect::<Vec<_>>(),
        },
        "nodes": {
            "total": nodes.len(),
            "connected": connected,
            "disconnected": nodes.len() - connected,
            "down": counts.nodes_down,
        },
        "silences": {
            "active": count_state("active"),
            "pending": count_state("pending"),
        },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{State as CheckState, TimelineEntry};

    #[test]
    fn times_parse_as_ms_rfc3339_or_duration_ago() {
        let now = 1_705_276_800_000;
        assert_eq!(parse_time("since", "1705276800000", now), Ok(now));
        assert_eq!(parse_time("since", "2024-01-15T00:00:00Z", now), Ok(now));
        assert_eq!(
            parse_time("since", "2024-01-15T01:00:00.500Z", now),
            Ok(now + 3_600_500)
        );
        assert_eq!(parse_time("since", "2h", now), Ok(now - 7_200_000));
        let e = parse_time("since", "yesterday", now).expect_err("not a time");
        assert!(e.contains("since \"yesterday\""), "{e}");
    }

    #[test]
    fn severities_and_statuses_parse_as_lists() {
        assert_eq!(
            parse_severities("p1, P2,P1"),
            Ok(vec![Severity::P1, Severity::P2])
        );
        assert!(parse_severities("P5").is_err());
        assert_eq!(
            parse_statuses("open"),
            Ok(vec![Status::Triggered, Status::Acknowledged])
        );
        assert_eq!(
            parse_statuses("acknowledged,resolved"),
            Ok(vec![Status::Acknowledged, Status::Resolved])
        );
        assert!(parse_statuses("closed").is_err());
    }

    fn detail() -> IncidentDetail {
        let t0 = 1_705_276_800_000;
        let mut labels = BTreeMap::new();
        labels.insert("service".to_owned(), "checkout".to_owned());
        IncidentDetail {
            incident: Incident {
                id: 7,
                fingerprint: "web-1/http".into(),
                dedup_key: "tocsin-abc-7".into(),
                node: "web-1".into(),
                check: "http".into(),
                labels,
                severity: Severity::P1,
                status: Status::Resolved,
                state: CheckState::Critical,
                value: Some(42.0),
                unit: "percent".into(),
                threshold: Some(20.0),
                summary: "error rate 42% over 20%".into(),
                breach_started_at_ms: t0 - 90_000,
                triggered_at_ms: t0,
                cycle_triggered_at_ms: t0,
                cycle_breach_started_at_ms: t0 - 90_000,
                acknowledged_at_ms: Some(t0 + 240_000),
                resolved_at_ms: Some(t0 + 2_700_000),
                resolution: Some("resolved by bob: rolled back".into()),
            },
            timeline: vec![
                TimelineEntry {
                    at_ms: t0,
                    kind: "triggered".into(),
                    actor: "agent:web-1".into(),
                    note: "P1 critical".into(),
                },
                TimelineEntry {
                    at_ms: t0 + 120_000,
                    kind: "hook".into(),
                    actor: "aggregator".into(),
                    note: "rollback exited 0".into(),
                },
                TimelineEntry {
                    at_ms: t0 + 240_000,
                    kind: "acknowledged".into(),
                    actor: "user:alice".into(),
                    note: "acknowledged by alice".into(),
                },
                TimelineEntry {
                    at_ms: t0 + 2_700_000,
                    kind: "resolved".into(),
                    actor: "user:bob".into(),
                    note: "resolved by bob: rolled back".into(),
                },
            ],
            notifications: Vec::new(),
            members: Vec::new(),
        }
    }

    #[test]
    fn the_postmortem_draft_has_every_section_and_this_incidents_times() {
        let d = detail();
        let now = d.incident.resolved_at_ms.unwrap_or(0) + 3_600_000;
        let md = render_postmortem(&d, None, None, now).expect("renders");
        for section in [
            "# Post-mortem: incident #7 — http on web-1",
            "## Summary",
            "## Impact",
            "## Detection and response",
            "## Timeline (UTC)",
            "## What recovery and hooks did",
            "## Root cause",
            "## Actions",
        ] {
            assert!(md.contains(section), "{section} missing:\n{md}");
        }
        assert!(md.contains("**Severity:** P1"), "{md}");
        assert!(md.contains("**Service:** checkout"), "{md}");
        assert!(md.contains("**Duration:** 45m"), "{md}");
        assert!(md.contains("**Nodes (1):** web-1"), "{md}");
        assert!(
            md.contains("| Time to detect (breach → opened) | 1m30s | < 5m | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| Time to acknowledge (opened → ack) | 4m | < 10m | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| Recovery started (opened → ack or hook) | 2m | < 15m | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| Time to resolve (opened → resolved) | 45m | < 1h | yes |"),
            "{md}"
        );
        assert!(
            md.contains("**hook** (aggregator): rollback exited 0"),
            "{md}"
        );
        assert!(md.contains("Due: 2024-01-17T00:45:00.000Z"), "{md}");
    }

    #[test]
    fn untrusted_text_cannot_inject_markdown_or_html() {
        let mut d = detail();
        d.incident.summary = "## Owned\n- injected item <script>alert(1)</script>".into();
        d.incident.node = "-web-1".into();
        d.timeline[1].note = "line one\n## not a heading\n```\n<b>x</b>\n````".into();
        d.timeline[2].note = "# heading & *bold* [link](http://x)".into();
        let md = render_postmortem(&d, None, None, d.incident.triggered_at_ms + 60_000)
            .expect("renders");
        for line in md.lines() {
            assert!(
                !line.starts_with("## Owned") && !line.starts_with("- injected"),
                "{md}"
            );
        }
        assert!(!md.contains("<script>"), "{md}");
        assert!(md.contains("&lt;script&gt;"), "{md}");
        assert!(
            md.contains(": \\# heading &amp; \\*bold\\* \\[link\\](http://x)"),
            "{md}"
        );
        assert!(md.contains("on \\-web-1"), "{md}");
        // The hook's multi-line output sits in a fence longer than its backtick runs.
        assert!(
            md.contains("\n  `````text\n  line one\n  ## not a heading\n"),
            "{md}"
        );
        assert!(md.contains("\n  <b>x</b>\n  ````\n  `````\n"), "{md}");
        assert_eq!(md_code("a`b"), "`` a`b ``");
        assert_eq!(md_inline("1. first"), "1\\. first");
    }

    #[test]
    fn an_open_incident_without_response_renders_too() {
        let mut d = detail();
        d.incident.status = Status::Triggered;
        d.incident.resolved_at_ms = None;
        d.incident.acknowledged_at_ms = None;
        d.incident.breach_started_at_ms = 0;
        d.incident.resolution = None;
        d.timeline.truncate(1);
        let md = render_postmortem(&d, None, None, d.incident.triggered_at_ms + 60_000)
            .expect("renders");
        assert!(md.contains("**Duration:** 1m so far (still open)"), "{md}");
        assert!(md.contains("No recovery hook ran"), "{md}");
        assert!(!md.contains("**acknowledged**"), "{md}");
        assert!(
            md.contains("**Started (breach on the node):** unknown"),
            "{md}"
        );
        assert!(!md.contains("Due:"), "{md}");
    }
}
