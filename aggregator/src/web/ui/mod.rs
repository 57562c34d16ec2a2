//! The on-call web view: server-rendered HTML pages (minijinja templates embedded from
//! `aggregator/templates/ui/`), their forms, and the public status pages.
//!
//! Pages: `/` (open incidents by severity and age, with acknowledge / resolve / silence
//! buttons), `/incidents/{id}` (members, timeline, notifications and their delivery,
//! hook runs), `/nodes` (last heartbeat, connection, every check's state), `/silences`
//! (list, add, expire), `/kpi`, `/login`, and `/status/{service}` (public, rendered from
//! the status-page message template). `GET /api/v1/checks` serves the check states the
//! nodes page shows. Every page reads fine without JavaScript; `/ui/live.js` refreshes
//! the page's `<main>` every few seconds when it can.
//!
//! Who may read and change is [`auth`]'s business; what changes do is the store's (the
//! same calls as the JSON API). This module translates forms to store calls and store
//! data to HTML.

pub mod auth;
mod markdown;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use minijinja::{AutoEscape, Environment};
use serde::Deserialize;
use serde_json::{Value, json};

use self::auth::{ReadAccess, SESSION_COOKIE, SESSION_TTL, Session, Sessions, WebAuth};
use super::AppState;
use crate::model::{Incident, Severity, Status, now_ms, rfc3339};
use crate::notify::template::{Name, Templates};
use crate::store::IncidentFilter;

/// How often `live.js` refreshes a page, ms (also shown to the reader).
pub const LIVE_REFRESH_MS: u64 = 5_000;

/// Longest silence from a form (as in the JSON API).
const MAX_SILENCE: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// The page templates and assets, embedded at build time.
const PAGES: &[(&str, &str)] = &[
    (
        "base.html",
        include_str!("../../../templates/ui/base.html.j2"),
    ),
    (
        "index.html",
        include_str!("../../../templates/ui/index.html.j2"),
    ),
    (
        "incident.html",
        include_str!("../../../templates/ui/incident.html.j2"),
    ),
    (
        "nodes.html",
        include_str!("../../../templates/ui/nodes.html.j2"),
    ),
    (
        "silences.html",
        include_str!("../../../templates/ui/silences.html.j2"),
    ),
    (
        "kpi.html",
        include_str!("../../../templates/ui/kpi.html.j2"),
    ),
    (
        "login.html",
        include_str!("../../../templates/ui/login.html.j2"),
    ),
    (
        "message.html",
        include_str!("../../../templates/ui/message.html.j2"),
    ),
    (
        "status.html",
        include_str!("../../../templates/ui/status.html.j2"),
    ),
];
const STYLE_CSS: &str = include_str!("../../../templates/ui/style.css");
const LIVE_JS: &str = include_str!("../../../templates/ui/live.js");

/// Handler state of the web view.
#[derive(Debug, Clone)]
pub struct UiState {
    app: AppState,
    auth: Arc<WebAuth>,
    token: Option<tocsin_agent::config::Secret>,
    /// Name-only sign-in: a loopback listener with neither token nor users.
    open_login: bool,
    /// Whether `listen_http` is a loopback address.
    loopback: bool,
    sessions: Arc<Sessions>,
    templates: Arc<Templates>,
    pages: Arc<Environment<'static>>,
}

impl UiState {
    /// The web view over the API's `app` state, with the `[auth]` policy `auth`, the API
    /// token (`auth.api_token_file`), whether `listen_http` is loopback, and the message
    /// templates (for the status pages).
    ///
    /// # Errors
    /// When the system random source cannot give a session key.
    pub fn new(
        app: AppState,
        auth: WebAuth,
        token: Option<tocsin_agent::config::Secret>,
        loopback: bool,
        templates: Arc<Templates>,
    ) -> Result<Self, ring::error::Unspecified> {
        let open_login = loopback && token.is_none() && auth.users.is_empty();
        Ok(UiState {
            app,
            auth: Arc::new(auth),
            token,
            open_login,
            loopback,
            sessions: Arc::new(Sessions::new()?),
            templates,
            pages: Arc::new(environment()),
        })
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    for (name, source) in PAGES {
        // Compiled and rendered by the unit tests; a broken one shows as an error page.
        let _ = env.add_template(name, source);
    }
    env
}

/// The web view's routes (merged into the API router, which owns the fallback).
pub fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/incidents/{id}", get(incident_page))
        .route("/incidents/{id}/ack", post(ack))
        .route("/incidents/{id}/resolve", post(resolve))
        .route("/incidents/{id}/silence", post(silence_incident))
        .route("/nodes", get(nodes_page))
        .route("/silences", get(silences_page).post(add_silence))
        .route("/silences/{id}/expire", post(expire_silence))
        .route("/kpi", get(kpi_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/status/{service}", get(status_page))
        .route(
            "/ui/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route(
            "/ui/live.js",
            get(|| asset("text/javascript; charset=utf-8", LIVE_JS)),
        )
        .route("/api/v1/checks", get(api_checks))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// The read policy for every request, as a layer over the whole HTTP router (API and
/// pages):
/// - on a loopback listener whose reads are public, a request naming a non-loopback
///   `Host` is refused with 403 (DNS rebinding: a foreign web page resolving its own name
///   to 127.0.0.1 must not read the API or the pages);
/// - with `auth.read_only = "login"`, reads of the JSON API (`GET`/`HEAD` `/api/…`) need
///   a valid session cookie or `Authorization: Bearer TOKEN` (the API token), else 401
///   (the pages send strangers to `/login` themselves).
///
/// Always open: `/health`, `/login`, `/status/…` (the public status pages) and the
/// `/ui/…` assets. `/metrics` follows the Host rule but needs no login (Prometheus
/// scrapes it; `docs/API.md`). Errors are JSON under `/api/` and `/metrics`, HTML pages
/// elsewhere.
pub async fn read_guard(
    State(st): State<UiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/health"
        || path == "/login"
        || path.starts_with("/status/")
        || path.starts_with("/ui/")
    {
        return next.run(req).await;
    }
    let api = path.starts_with("/api/") || path == "/metrics";
    let headers = req.headers();
    let refuse = |code: StatusCode, text: &str| {
        if api {
            (
                code,
                Json(json!({ "error": { "status": code.as_u16(), "message": text } })),
            )
                .into_response()
        } else {
            message(&st, None, code, "Refused", text)
        }
    };
    if st.loopback && st.auth.read == ReadAccess::Public && !auth::host_is_loopback(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this aggregator listens on loopback and answers only a loopback Host",
        );
    }
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if read && path.starts_with("/api/") && st.auth.read == ReadAccess::Login {
        let token_ok = st
            .token
            .as_ref()
            .zip(auth::bearer(headers))
            .is_some_and(|(t, given)| auth::ct_eq(given.as_bytes(), t.expose().as_bytes()));
        if !token_ok && session(&st, headers).is_none() {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "reading needs a login: a session cookie or `Authorization: Bearer TOKEN`",
            );
        }
    }
    next.run(req).await
}

/// No inline script or style, no framing (the buttons cannot be clickjacked), forms post
/// only here.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A name for the timeline: 1 to 128 bytes, no control characters and no invisible
/// format characters (zero-width, bidirectional overrides) that could disguise it.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
        })
}

/// A local path to go back to after a form (`/…`, never `//host` or a scheme), else `/`.
fn local_path(p: &str) -> String {
    let ok = p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && !p.chars().any(char::is_control);
    if ok { p.to_owned() } else { "/".to_owned() }
}

/// "45s", "12m", "3h 20m", "2d 4h": how long ago `then_ms` was.
pub fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The session of a request, if its cookie is valid.
fn session(st: &UiState, headers: &HeaderMap) -> Option<Session> {
    auth::cookie(headers, SESSION_COOKIE).and_then(|c| st.sessions.verify(c, now_ms()))
}

/// Who reads: the session if any; without one, a redirect to the login page when
/// reading needs a login.
#[expect(
    clippy::result_large_err,
    reason = "the error is the response to send, returned at once by the handler"
)]
fn reader(st: &UiState, headers: &HeaderMap, here: &str) -> Result<Option<Session>, Response> {
    let s = session(st, headers);
    if s.is_none() && st.auth.read == ReadAccess::Login {
        let next: String = url_encode(here);
        return Err(Redirect::to(&format!("/login?next={next}")).into_response());
    }
    Ok(s)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// [`writer`] for a change to the `what` ("incident", "silence") whose id is the path
/// segment `id`: the session and the id, or the page that refuses (403, or 400 when the
/// id is not a number).
#[expect(
    clippy::result_large_err,
    reason = "the error is the response to send, returned at once by the handler"
)]
fn writer_of(
    st: &UiState,
    headers: &HeaderMap,
    csrf: &str,
    id: &str,
    what: &str,
) -> Result<(Session, i64), Response> {
    let who = writer(st, headers, csrf)?;
    match id.parse::<i64>() {
        Ok(id) => Ok((who, id)),
        Err(_) => Err(message(
            st,
            Some(&who),
            StatusCode::BAD_REQUEST,
            "Bad request",
            &format!("The {what} id is not a number."),
        )),
    }
}

/// Refuses a form POST unless it is same-origin, signed in and carries the session's
/// CSRF token (403 otherwise); on a name-only (loopback) setup the Host must be loopback.
#[expect(
    clippy::result_large_err,
    reason = "the error is the response to send, returned at once by the handler"
)]
fn writer(st: &UiState, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
    if !auth::same_origin(headers) {
        return Err(message(
            st,
            None,
            StatusCode::FORBIDDEN,
            "Refused",
            "Cross-site form posts are refused.",
        ));
    }
    if st.open_login && !auth::host_is_loopback(headers) {
        return Err(message(
            st,
            None,
            StatusCode::FORBIDDEN,
            "Refused",
            "Changes need a loopback Host on this aggregator.",
        ));
    }
    let Some(s) = session(st, headers) else {
        return Err(message(
            st,
            None,
            StatusCode::FORBIDDEN,
            "Log in first",
            "Changing anything needs a login.",
        ));
    };
    if !st.sessions.check_csrf(&s, csrf) {
        return Err(message(
            st,
            Some(&s),
            StatusCode::FORBIDDEN,
            "Refused",
            "The form's CSRF token is missing or wrong: reload the page and try again.",
        ));
    }
    Ok(s)
}

/// Renders page `name` with the common context (user, CSRF token, time) and `ctx`.
fn render(
    st: &UiState,
    who: Option<&Session>,
    status: StatusCode,
    name: &str,
    title: &str,
    ctx: Value,
) -> Response {
    let now = now_ms();
    let mut base = json!({
        "title": title,
        "user": who.map(|s| s.user.clone()),
        "csrf": who.map(|s| st.sessions.csrf(s)).unwrap_or_default(),
        "can_login": st.open_login || st.token.is_some() || !st.auth.users.is_empty(),
        "now": rfc3339(now),
        "live": false,
        "refresh_s": LIVE_REFRESH_MS / 1000,
    });
    if let (Some(b), Value::Object(extra)) = (base.as_object_mut(), ctx) {
        b.extend(extra);
    }
    let here = local_path(base["here"].as_str().unwrap_or("/"));
    base["login_href"] = json!(format!("/login?next={}", url_encode(&here)));
    let html = st
        .pages
        .get_template(name)
        .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&base))));
    match html {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "web page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "page failed to render").into_response()
        }
    }
}

fn message(
    st: &UiState,
    who: Option<&Session>,
    status: StatusCode,
    title: &str,
    text: &str,
) -> Response {
    render(
        st,
        who,
        status,
        "message.html",
        title,
        json!({ "message": text, "code": status.as_u16() }),
    )
}

fn store_down(st: &UiState, who: Option<&Session>, e: &crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "store error in the web view");
    message(
        st,
        who,
        StatusCode::SERVICE_UNAVAILABLE,
        "Store unavailable",
        "The store did not answer; try again.",
    )
}

fn incident_row(i: &Incident, now: i64) -> Value {
    json!({
        "id": i.id,
        "severity": i.severity.as_str(),
        "status": i.status.as_str(),
        "state": i.state.as_str(),
        "node": i.node,
        "check": i.check,
        "summary": i.summary,
        "labels": i.labels,
        "service": i.labels.get("service"),
        "triggered_at": rfc3339(i.triggered_at_ms),
        "age": age(now, i.triggered_at_ms),
        "acknowledged_at": i.acknowledged_at_ms.map(rfc3339),
        "resolved_at": i.resolved_at_ms.map(rfc3339),
        "resolution": i.resolution,
        "open": i.status != Status::Resolved,
    })
}

async fn index(State(st): State<UiState>, headers: HeaderMap) -> Response {
    let who = match reader(&st, &headers, "/") {
        Ok(w) => w,
        Err(r) => return r,
    };
    // Open incidents, and the recently resolved ones with their peak and post-mortem
    // link (for "post-mortem due").
    let found = st
        .app
        .store
        .call(|s| {
            let open = s.incidents(IncidentFilter::Open, super::MAX_LIST)?;
            let resolved = s.incidents_where(&crate::store::IncidentQuery {
                statuses: vec![Status::Resolved],
                severities: Vec::new(),
                since_ms: None,
                limit: 200,
            })?;
            let ids: Vec<i64> = resolved.iter().map(|i| i.id).collect();
            let peaks = s.peak_severities(&ids)?;
            let links = s.postmortem_links(&ids)?;
            Ok((open, resolved, peaks, links))
        })
        .await;
    let (mut open, resolved, peaks, links) = match found {
        Ok(v) => v,
        Err(e) => return store_down(&st, who.as_ref(), &e),
    };
    open.sort_by_key(|i| (i.severity, i.triggered_at_ms, i.id));
    let now = now_ms();
    let postmortems_due: Vec<Value> = resolved
        .iter()
        .filter_map(|i| {
            let peak = peaks.get(&i.id).copied();
            let (peak, pm) = super::api_kpi::extras(i, peak, links.get(&i.id), now);
            let pm = pm.filter(|p| p.due_at.is_some() && p.linked.is_none())?;
            Some(json!({
                "id": i.id, "severity": peak.as_str(), "check": i.check, "node": i.node,
                "due_at": pm.due_at, "overdue": pm.overdue,
            }))
        })
        .collect();
    let counts: Vec<Value> = [Severity::P1, Severity::P2, Severity::P3, Severity::P4]
        .into_iter()
        .map(|s| json!({"severity": s.as_str(), "count": open.iter().filter(|i| i.severity == s).count()}))
        .collect();
    let rows: Vec<Value> = open.iter().map(|i| incident_row(i, now)).collect();
    render(
        &st,
        who.as_ref(),
        StatusCode::OK,
        "index.html",
        "Open incidents",
        json!({
            "incidents": rows, "counts": counts, "live": true, "here": "/",
            "postmortems_due": postmortems_due,
        }),
    )
}

async fn incident_page(
    State(st): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let here = format!("/incidents/{id}");
    let who = match reader(&st, &headers, &here) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<i64>() else {
        return message(
            &st,
            who.as_ref(),
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The incident id is not a number.",
        );
    };
    let found = st
        .app
        .store
        .call(move |s| {
            let Some(d) = s.incident(id)? else {
                return Ok(None);
            };
            let peak = s.peak_severities(&[id])?.remove(&id);
            let link = s.postmortem_links(&[id])?.remove(&id);
            let runs = s.hook_runs(Some(id), None, super::MAX_LIST)?;
            Ok(Some((d, peak, link, runs)))
        })
        .await;
    let (detail, peak, link, runs) = match found {
        Ok(Some(d)) => d,
        Ok(None) => {
            return message(
                &st,
                who.as_ref(),
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("There is no incident {id}."),
            );
        }
        Err(e) => return store_down(&st, who.as_ref(), &e),
    };
    let now = now_ms();
    let members: Vec<Value> = detail
        .members
        .iter()
        .map(|m| {
            json!({
                "node": m.node, "check": m.check, "state": m.state.as_str(), "value": m.value,
                "message": m.message, "labels": m.labels,
                "since": rfc3339(m.since_ms), "since_age": age(now, m.since_ms),
                "updated_age": age(now, m.updated_ms),
            })
        })
        .collect();
    let timeline: Vec<Value> = detail
        .timeline
        .iter()
        .map(|t| {
            // Hook and recovery runs carry their command output: shown preformatted.
            let output =
                t.kind.contains("hook") || t.kind.contains("recovery") || t.note.contains('\n');
            json!({
                "at": rfc3339(t.at_ms), "age": age(now, t.at_ms), "kind": t.kind,
                "actor": t.actor, "note": t.note, "output": output,
            })
        })
        .collect();
    let notifications: Vec<Value> = detail
        .notifications
        .iter()
        .map(|n| {
            json!({
                "channel": n.channel, "kind": n.kind, "status": n.status, "attempts": n.attempts,
                "last_error": n.last_error, "created": rfc3339(n.created_at_ms),
                "delivered": n.delivered_at_ms.map(rfc3339),
                "next_attempt": (n.status == "pending").then(|| rfc3339(n.next_attempt_ms)),
            })
        })
        .collect();
    let (peak, postmortem) = super::api_kpi::extras(&detail.incident, peak, link.as_ref(), now);
    let hook_runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "hook": r.hook, "event": r.event, "status": r.status,
                "started_by": r.started_by, "exit_code": r.exit_code, "timed_out": r.timed_out,
                "duration_s": r.duration_ms.map(|ms| format!("{:.1}", ms as f64 / 1000.0)),
                "queued": rfc3339(r.queued_ms), "error": r.error,
                "stdout": r.stdout, "stderr": r.stderr,
            })
        })
        .collect();
    let mut row = incident_row(&detail.incident, now);
    row["peak_severity"] = json!(peak);
    row["dedup_key"] = json!(detail.incident.dedup_key);
    row["breach_started_at"] = json!(
        (detail.incident.breach_started_at_ms > 0)
            .then(|| rfc3339(detail.incident.breach_started_at_ms))
    );
    row["value"] = json!(detail.incident.value);
    row["unit"] = json!(detail.incident.unit);
    row["threshold"] = json!(detail.incident.threshold);
    render(
        &st,
        who.as_ref(),
        StatusCode::OK,
        "incident.html",
        &format!("Incident #{id}"),
        json!({
            "incident": row, "members": members, "timeline": timeline,
            "notifications": notifications, "live": true, "here": here,
            "postmortem": postmortem, "hook_runs": hook_runs,
        }),
    )
}

async fn nodes_page(State(st): State<UiState>, headers: HeaderMap) -> Response {
    let who = match reader(&st, &headers, "/nodes") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let data = st.app.store.call(|s| Ok((s.nodes()?, s.checks()?))).await;
    let (nodes, checks) = match data {
        Ok(d) => d,
        Err(e) => return store_down(&st, who.as_ref(), &e),
    };
    let now = now_ms();
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let mine: Vec<Value> = checks
                .iter()
                .filter(|c| c.node == n.agent_id)
                .map(|c| {
                    json!({
                        "check": c.check, "state": c.state.as_str(), "value": c.value,
                        "unit": c.unit, "labels": c.labels,
                        "since_age": age(now, c.since_ms), "updated_age": age(now, c.updated_ms),
                    })
                })
                .collect();
            json!({
                "agent_id": n.agent_id, "hostname": n.hostname, "labels": n.labels,
                "version": n.version, "connected": n.connected,
                "last_seen": rfc3339(n.last_seen_ms), "last_seen_age": age(now, n.last_seen_ms),
                "checks": mine,
            })
        })
        .collect();
    render(
        &st,
        who.as_ref(),
        StatusCode::OK,
        "nodes.html",
        "Nodes",
        json!({ "nodes": rows, "live": true, "here": "/nodes" }),
    )
}

async fn silences_page(State(st): State<UiState>, headers: HeaderMap) -> Response {
    let who = match reader(&st, &headers, "/silences") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let views = match st.app.store.call(|s| Ok(s.silences(now_ms()))).await {
        Ok(v) => v,
        Err(e) => return store_down(&st, who.as_ref(), &e),
    };
    let rows: Vec<Value> = views
        .iter()
        .map(|v| {
            json!({
                "id": v.id, "matchers": v.matchers, "state": v.state,
                "starts": rfc3339(v.starts_at_ms), "ends": rfc3339(v.ends_at_ms),
                "created_by": v.created_by, "reason": v.reason,
                "ends_with_incident": v.ends_with_incident, "expired_by": v.expired_by,
            })
        })
        .collect();
    render(
        &st,
        who.as_ref(),
        StatusCode::OK,
        "silences.html",
        "Silences",
        json!({ "silences": rows, "live": true, "here": "/silences" }),
    )
}

#[derive(Debug, Deserialize)]
struct KpiPageQuery {
    /// Range: the last this many days (default 30, at most 3 650).
    days: Option<u32>,
}

/// One row of the KPI tables: a group's figures, formatted for people.
fn kpi_row(group: &str, s: &crate::kpi::Summary) -> Value {
    let mean = |st: &crate::kpi::Stat| {
        st.mean_seconds
            .map(super::api_kpi::human)
            .unwrap_or_else(|| "—".to_owned())
    };
    let met = |st: &crate::kpi::Stat| st.met;
    let pct = |c: &crate::kpi::Compliance| {
        c.compliance
            .map(|f| format!("{:.1} % ({}/{})", f * 100.0, c.met, c.met + c.breached))
            .unwrap_or_else(|| "—".to_owned())
    };
    json!({
        "group": group,
        "incidents": s.incidents,
        "open": s.open,
        "mttd": mean(&s.mttd), "mttd_met": met(&s.mttd),
        "mtta": mean(&s.mtta), "mtta_met": met(&s.mtta),
        "mttr": mean(&s.mttr), "mttr_met": met(&s.mttr),
        "mtbf": mean(&s.mtbf), "mtbf_met": met(&s.mtbf),
        "availability": s.availability.map(|a| format!("{:.3} %", a * 100.0)),
        "availability_met": s.availability.zip(s.availability_target).map(|(a, t)| a >= t),
        "p1_recovery": pct(&s.sla.p1_recovery_started),
        "p1_resolved": pct(&s.sla.p1_resolved),
        "p2_resolved": pct(&s.sla.p2_resolved),
    })
}

fn kpi_rows(section: &crate::kpi::Section) -> Value {
    let mut rows = vec![kpi_row("all", &section.overall)];
    rows.extend(section.by_severity.iter().map(|(k, s)| kpi_row(k, s)));
    let services: Vec<Value> = section
        .by_service
        .iter()
        .map(|(k, s)| kpi_row(k, s))
        .collect();
    json!({ "severity": rows, "service": services })
}

/// `/kpi`: the seed's KPIs over the last `days` (default 30), from the store — the same
/// report as `GET /api/v1/kpi`, drills apart.
async fn kpi_page(
    State(st): State<UiState>,
    headers: HeaderMap,
    Query(q): Query<KpiPageQuery>,
) -> Response {
    let who = match reader(&st, &headers, "/kpi") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let days = q.days.unwrap_or(30).clamp(1, 3_650);
    let now = now_ms();
    let since = now - i64::from(days) * 86_400_000;
    let rows = match st
        .app
        .store
        .call(move |s| s.kpi_incidents(since, now))
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return render(
                &st,
                who.as_ref(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "message.html",
                "KPIs",
                json!({ "message": format!("cannot read the incidents: {e}") }),
            );
        }
    };
    let query = crate::kpi::Query {
        since_ms: since,
        until_ms: now,
        service: None,
        severities: Vec::new(),
    };
    let report = crate::kpi::report(&rows, &query, now);
    render(
        &st,
        who.as_ref(),
        StatusCode::OK,
        "kpi.html",
        "KPIs",
        json!({
            "here": "/kpi",
            "days": days,
            "since": report.since,
            "until": report.until,
            "incidents": kpi_rows(&report.incidents),
            "drills": kpi_rows(&report.drills),
            "has_drills": report.drills.overall.incidents > 0,
        }),
    )
}

#[derive(Debug, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login_page(
    State(st): State<UiState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let who = session(&st, &headers);
    login_form(
        &st,
        who.as_ref(),
        StatusCode::OK,
        q.next.as_deref().unwrap_or("/"),
        "",
    )
}

fn login_form(
    st: &UiState,
    who: Option<&Session>,
    status: StatusCode,
    next: &str,
    error: &str,
) -> Response {
    render(
        st,
        who,
        status,
        "login.html",
        "Log in",
        json!({
            "next": local_path(next),
            "error": error,
            "open_login": st.open_login,
            "token_login": st.token.is_some(),
            "user_login": !st.auth.users.is_empty(),
        }),
    )
}

/// Fields of every form (each form uses some).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FormData {
    csrf: String,
    note: String,
    back: String,
    duration: String,
    reason: String,
    matchers: String,
    name: String,
    secret: String,
    next: String,
}

async fn login(State(st): State<UiState>, headers: HeaderMap, Form(f): Form<FormData>) -> Response {
    if !auth::same_origin(&headers) {
        return message(
            &st,
            None,
            StatusCode::FORBIDDEN,
            "Refused",
            "Cross-site form posts are refused.",
        );
    }
    let name = f.name.trim().to_owned();
    if !valid_name(&name) {
        return login_form(
            &st,
            None,
            StatusCode::BAD_REQUEST,
            &f.next,
            "Give your name: 1 to 128 printable characters.",
        );
    }
    let ok = if let Some(user) = st.auth.users.iter().find(|u| u.name == name).cloned() {
        // argon2 costs tens of milliseconds of CPU: off the runtime.
        let secret = f.secret.clone();
        tokio::task::spawn_blocking(move || user.verify(&secret))
            .await
            .unwrap_or(false)
    } else if let Some(token) = &st.token {
        subtle::ConstantTimeEq::ct_eq(f.secret.as_bytes(), token.expose().as_bytes()).into()
    } else {
        st.open_login && auth::host_is_loopback(&headers)
    };
    if !ok {
        tracing::warn!(user = %name, "web login refused");
        return login_form(
            &st,
            None,
            StatusCode::UNAUTHORIZED,
            &f.next,
            "Wrong name, password or token.",
        );
    }
    tracing::info!(user = %name, "web login");
    let cookie = st.sessions.issue(&name, now_ms());
    let set = format!(
        "{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, set)],
        Redirect::to(&local_path(&f.next)),
    )
        .into_response()
}

async fn logout(
    State(st): State<UiState>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    if let Err(r) = writer(&st, &headers, &f.csrf) {
        return r;
    }
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

async fn ack(
    State(st): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    change(st, &id, &headers, f, "acknowledged").await
}

async fn resolve(
    State(st): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    change(st, &id, &headers, f, "resolved").await
}

/// Acknowledge or resolve from a form: the same store call as the JSON API, by the
/// signed-in user; then back to the page the form came from.
async fn change(
    st: UiState,
    id: &str,
    headers: &HeaderMap,
    f: FormData,
    to: &'static str,
) -> Response {
    let (who, id) = match writer_of(&st, headers, &f.csrf, id, "incident") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by = who.user.clone();
    let note = crate::convert::clip_text(f.note.trim());
    let outcome = st
        .app
        .store
        .call(move |s| match to {
            "acknowledged" => s.acknowledge(id, &by, &note),
            _ => s.resolve_by_hand(id, &by, &note),
        })
        .await;
    match outcome {
        Ok(crate::store::Change::Done) => {
            st.app.outbox_wake.send_modify(|n| *n += 1);
            tracing::info!(incident = id, user = %who.user, to, "changed from the web view");
            Redirect::to(&local_path(&f.back)).into_response()
        }
        Ok(crate::store::Change::Unchanged(_)) => {
            Redirect::to(&local_path(&f.back)).into_response()
        }
        Ok(crate::store::Change::Conflict(m)) => {
            message(&st, Some(&who), StatusCode::CONFLICT, "Not possible", &m)
        }
        Ok(crate::store::Change::NotFound) => message(
            &st,
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no incident {id}."),
        ),
        Err(e) => store_down(&st, Some(&who), &e),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    tocsin_agent::settings::parse_duration(text.trim())
        .filter(|d| !d.is_zero() && *d <= MAX_SILENCE)
        .ok_or_else(|| format!("Duration {text:?}: expected e.g. \"30m\" or \"2h\", at most 30d."))
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Silences what an incident pages about: its shared node and check (from its members),
/// until the duration passes or the incident resolves; noted on the incident's timeline.
async fn silence_incident(
    State(st): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    let (who, id) = match writer_of(&st, &headers, &f.csrf, &id, "incident") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let duration = match parse_duration(if f.duration.is_empty() {
        "2h"
    } else {
        &f.duration
    }) {
        Ok(d) => d,
        Err(m) => return message(&st, Some(&who), StatusCode::BAD_REQUEST, "Bad request", &m),
    };
    let detail = match st.app.store.call(move |s| s.incident(id)).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return message(
                &st,
                Some(&who),
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("There is no incident {id}."),
            );
        }
        Err(e) => return store_down(&st, Some(&who), &e),
    };
    if detail.incident.status == Status::Resolved {
        return message(
            &st,
            Some(&who),
            StatusCode::CONFLICT,
            "Not possible",
            &format!("Incident {id} is resolved: there is nothing to silence."),
        );
    }
    let shared =
        |get: &dyn Fn(&crate::correlate::Member) -> &str, fallback: &str| -> Option<String> {
            let mut values = detail.members.iter().map(get);
            match values.next() {
                None => Some(fallback.to_owned()),
                Some(first) => values.all(|v| v == first).then(|| first.to_owned()),
            }
        };
    let mut texts = Vec::new();
    if let Some(node) = shared(&|m| m.node.as_str(), &detail.incident.node) {
        texts.push(format!("node={node}"));
    }
    if let Some(check) = shared(&|m| m.check.as_str(), &detail.incident.check) {
        texts.push(format!("check={check}"));
    }
    if texts.is_empty() {
        return message(
            &st,
            Some(&who),
            StatusCode::CONFLICT,
            "Not possible",
            "The incident's members share neither node nor check: add a silence with matchers on the Silences page.",
        );
    }
    let matchers = match texts
        .iter()
        .map(|t| crate::silence::Matcher::parse(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(m) => m,
        Err(e) => return message(&st, Some(&who), StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let reason = match f.reason.trim() {
        "" => format!("silenced from incident #{id} in the on-call view"),
        r => crate::convert::clip_text(r),
    };
    let by = who.user.clone();
    let now = now_ms();
    let ends = now.saturating_add(ms(duration));
    let note = format!(
        "silence by {by} for {} (or until resolved): {}; {reason}",
        humantime::format_duration(duration),
        texts.join(", ")
    );
    let result = st
        .app
        .store
        .call(move |s| {
            let sid = s.add_silence_with(matchers, now, ends, &by, &reason, Some(id))?;
            s.note(
                id,
                "silence_added",
                &format!("user:{by}"),
                &format!("{note} (silence #{sid})"),
            )?;
            Ok(sid)
        })
        .await;
    match result {
        Ok(_) => Redirect::to(&local_path(&f.back)).into_response(),
        Err(e) => store_down(&st, Some(&who), &e),
    }
}

async fn add_silence(
    State(st): State<UiState>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    let who = match writer(&st, &headers, &f.csrf) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let bad = |m: &str| message(&st, Some(&who), StatusCode::BAD_REQUEST, "Bad request", m);
    let texts: Vec<&str> = f
        .matchers
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if texts.is_empty() {
        return bad("A silence needs at least one matcher, e.g. node=web-1.");
    }
    let matchers = match texts
        .iter()
        .map(|t| crate::silence::Matcher::parse(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(m) => m,
        Err(e) => return bad(&e),
    };
    let duration = match parse_duration(&f.duration) {
        Ok(d) => d,
        Err(m) => return bad(&m),
    };
    let reason = crate::convert::clip_text(f.reason.trim());
    if reason.is_empty() {
        return bad("A reason is required: say why paging is muted.");
    }
    let by = who.user.clone();
    let now = now_ms();
    let ends = now.saturating_add(ms(duration));
    match st
        .app
        .store
        .call(move |s| s.add_silence_with(matchers, now, ends, &by, &reason, None))
        .await
    {
        Ok(_) => Redirect::to("/silences").into_response(),
        Err(e) => store_down(&st, Some(&who), &e),
    }
}

async fn expire_silence(
    State(st): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<FormData>,
) -> Response {
    let (who, id) = match writer_of(&st, &headers, &f.csrf, &id, "silence") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by = who.user.clone();
    match st.app.store.call(move |s| s.expire_silence(id, &by)).await {
        Ok(true) => Redirect::to("/silences").into_response(),
        Ok(false) => message(
            &st,
            Some(&who),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no silence {id}."),
        ),
        Err(e) => store_down(&st, Some(&who), &e),
    }
}

/// The public status page of `service`: each open incident whose `service` label is
/// `service`, rendered with the status-page message template (Markdown, raw HTML
/// dropped), or "All systems operational". Shows nothing the template does not.
async fn status_page(State(st): State<UiState>, Path(service): Path<String>) -> Response {
    let open = match st
        .app
        .store
        .call(|s| s.incidents(IncidentFilter::Open, super::MAX_LIST))
        .await
    {
        Ok(v) => v,
        Err(e) => return store_down(&st, None, &e),
    };
    let now = now_ms();
    let mut mine: Vec<&Incident> = open
        .iter()
        .filter(|i| i.labels.get("service") == Some(&service))
        .collect();
    mine.sort_by_key(|i| (i.severity, i.triggered_at_ms));
    let updates: Vec<String> = mine
        .iter()
        .map(|i| {
            let event = if i.status == Status::Acknowledged {
                "acknowledge"
            } else {
                "trigger"
            };
            // "Posted" is the incident's last change, not this request.
            let changed = i
                .triggered_at_ms
                .max(i.acknowledged_at_ms.unwrap_or(0))
                .max(i.resolved_at_ms.unwrap_or(0));
            let payload: Value =
                serde_json::from_str(&crate::notify::payload::render(event, i, changed))
                    .unwrap_or_default();
            markdown::to_html(&st.templates.render(Name::Status, &payload, "status-page"))
        })
        .collect();
    let html = st.pages.get_template("status.html").and_then(|t| {
        t.render(minijinja::context! {
            service => service,
            now => rfc3339(now),
            updates => updates.into_iter().map(minijinja::Value::from_safe_string).collect::<Vec<_>>(),
        })
    });
    match html {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "status page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "page failed to render").into_response()
        }
    }
}

/// `GET /api/v1/checks`: `{"checks": [CheckState…]}`, every check of every node with its
/// current state (times in Unix ms). Readable like the rest of the JSON API.
async fn api_checks(State(st): State<UiState>) -> Response {
    match st.app.store.call(|s| s.checks()).await {
        Ok(checks) => Json(json!({ "checks": checks })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "store error in API");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "store unavailable", "status": 503})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_template_compiles_and_renders() {
        let env = environment();
        let ctx = json!({
            "title": "t", "user": "alice", "csrf": "tok", "can_login": true, "now": "n",
            "live": true, "refresh_s": 5, "incidents": [], "counts": [], "nodes": [],
            "silences": [], "members": [], "timeline": [], "notifications": [],
            "incident": {"id": 1, "severity": "P1", "status": "triggered", "open": true},
            "message": "m", "code": 400, "next": "/", "error": "", "updates": [],
            "service": "checkout",
        });
        let mut anonymous = ctx.clone();
        anonymous["user"] = Value::Null;
        anonymous["login_href"] = json!("/login?next=/");
        for c in [&ctx, &anonymous] {
            for (name, _) in PAGES {
                let t = env
                    .get_template(name)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                t.render(minijinja::Value::from(minijinja::value::Serde(c)))
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            }
        }
    }

    #[test]
    fn the_incident_page_shows_post_mortem_state_and_hook_runs() {
        let env = environment();
        let ctx = json!({
            "incident": {"id": 3, "severity": "P2", "peak_severity": "P1", "status": "resolved",
                         "summary": "s", "labels": {}},
            "members": [], "timeline": [], "notifications": [],
            "postmortem": {"due_at": "2024-01-17T00:00:00.000Z", "linked": null, "overdue": true},
            "hook_runs": [{"id": 9, "hook": "restart", "event": "trigger", "status": "failed",
                           "exit_code": 2, "duration_s": "1.5", "queued": "t", "started_by": "aggregator",
                           "stdout": "out <x>\nline 2", "stderr": "", "error": null, "timed_out": false}],
            "user": null, "csrf": "", "live": true, "refresh_s": 5,
        });
        let html = env
            .get_template("incident.html")
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&ctx))))
            .expect("render");
        assert!(html.contains("<h2>Hook runs</h2>"), "{html}");
        assert!(html.contains("<pre>out &lt;x&gt;\nline 2</pre>"), "{html}");
        assert!(html.contains("1.5 s") && html.contains(">2<"), "{html}");
        assert!(html.contains("overdue</strong> since 2024-01-17"), "{html}");
        assert!(html.contains("<dt>Peak severity</dt><dd>P1</dd>"), "{html}");
        let ctx = json!({
            "incidents": [], "counts": [], "user": null, "csrf": "", "live": true, "refresh_s": 5,
            "postmortems_due": [{"id": 4, "severity": "P1", "check": "http", "node": "web-1",
                                 "due_at": "2024-01-17T00:00:00.000Z", "overdue": false}],
        });
        let html = env
            .get_template("index.html")
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&ctx))))
            .expect("render");
        assert!(html.contains("Post-mortems due:"), "{html}");
        assert!(html.contains("#4 http</a> (due by 2024-01-17"), "{html}");
    }

    #[test]
    fn pages_escape_what_agents_send() {
        let env = environment();
        let ctx = json!({
            "incidents": [{"id": 1, "severity": "P1", "status": "triggered", "open": true,
                           "summary": "<script>alert(1)</script>", "age": "1s"}],
            "counts": [], "user": null, "csrf": "", "live": true, "refresh_s": 5,
        });
        let html = env
            .get_template("index.html")
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&ctx))))
            .expect("render");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
    }

    #[test]
    fn back_paths_stay_local() {
        assert_eq!(local_path("/incidents/3"), "/incidents/3");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("/\\evil"), "/");
        assert_eq!(local_path(""), "/");
    }

    #[test]
    fn ages() {
        assert_eq!(age(61_000, 0), "1m");
        assert_eq!(age(59_000, 0), "59s");
        assert_eq!(age(3_600_000 + 120_000, 0), "1h 2m");
        assert_eq!(age(90_000_000, 0), "1d 1h");
        assert_eq!(age(0, 5_000), "0s");
    }
}
