//! Applying one observed check state to the incidents, inside the caller's transaction:
//! the single place where incidents open, change and resolve, with their timeline entries
//! and outbox rows. Used for agent events, heartbeat reconciliation and node liveness.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{IngestOutcome, load_incident, notify_triggered, timeline};
use crate::correlate::{self, Decision};
use crate::model::{Severity, State};

/// A check's state as observed, from whatever source.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// Agent id of the node.
    pub node: &'a str,
    /// Check name.
    pub check: &'a str,
    /// Identifying labels of the check.
    pub labels: &'a BTreeMap<String, String>,
    /// Observed state.
    pub state: State,
    /// Value, in `unit`.
    pub value: Option<f64>,
    /// Unit.
    pub unit: &'a str,
    /// Level crossed.
    pub threshold: Option<f64>,
    /// Summary.
    pub message: &'a str,
    /// Breach start on the node (Unix ms, 0 when unknown).
    pub breach_started_at_ms: i64,
    /// Timeline actor: `agent:<id>`, `aggregator`, …
    pub actor: &'a str,
    /// From a heartbeat, not an event: only opens and resolves (a refresh per heartbeat
    /// would flood the timeline).
    pub reconcile: bool,
    /// The check is flapping (the agent's flap detection): paging is held — an incident
    /// opens without a trigger and stays open through OK — until it settles.
    pub flapping: bool,
}

/// What the store passes along: routing, install id, node labels, the time.
#[derive(Debug)]
pub struct Context<'a> {
    /// Channels and routes for new triggers.
    pub router: &'a crate::route::Router,
    /// Install id for dedup keys.
    pub install_id: &'a str,
    /// Labels of the node, merged under the check's labels.
    pub node_labels: &'a BTreeMap<String, String>,
    /// Now (Unix ms).
    pub now: i64,
    /// Silences (active or not; checked against `now`).
    pub silences: &'a [crate::silence::Silence],
}

/// Sends the trigger of incident `id` to the channels its routes name (see
/// `paging::page`); returns how many triggers were queued.
fn page(conn: &Connection, ctx: &Context<'_>, id: i64, now: i64) -> rusqlite::Result<usize> {
    super::paging::page(conn, ctx.router, id, now)
}

/// Whether incident `id` was opened while flapping and never paged.
fn held(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let paged: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE incident_id = ?1 AND kind = 'trigger')
                 OR EXISTS (SELECT 1 FROM incidents WHERE id = ?1 AND status = 'acknowledged')",
        )?
        .query_row([id], |r| r.get(0))?;
    // An acknowledged incident is someone's already: it is never paged. An incident
    // paged under routing may have no trigger row (no channel, storm guard).
    if paged || super::paging::routed(conn, id)? {
        return Ok(false);
    }
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM timeline WHERE incident_id = ?1 AND kind = 'flapping')",
    )?
    .query_row([id], |r| r.get(0))
}

/// Opens, reclassifies, refreshes or resolves the incident of `obs`'s fingerprint as
/// [`correlate::decide`] says, recording timeline entries and outbox rows in `out`.
pub fn apply(
    conn: &Connection,
    ctx: &Context<'_>,
    obs: &Observation<'_>,
    out: &mut IngestOutcome,
) -> rusqlite::Result<()> {
    let fp = correlate::fingerprint(obs.node, obs.check, obs.labels);
    let open: Option<(i64, String)> = conn
        .prepare_cached(
            "SELECT id, severity FROM incidents WHERE fingerprint = ?1 AND status != 'resolved'",
        )?
        .query_row([&fp], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let open_sev = open.as_ref().and_then(|(_, s)| Severity::parse(s));
    let now = ctx.now;
    match (correlate::decide(obs.state, open_sev), open) {
        (Decision::Open(sev), _) => {
            let mut labels = ctx.node_labels.clone();
            labels.extend(obs.labels.clone());
            conn.execute(
                "INSERT INTO incidents (fingerprint, node, check_name, labels, severity, status, state, value, unit,
                     threshold, summary, breach_started_at_ms, triggered_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'triggered', ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    fp,
                    obs.node,
                    obs.check,
                    serde_json::to_string(&labels).unwrap_or_default(),
                    sev.as_str(),
                    obs.state.as_str(),
                    obs.value,
                    obs.unit,
                    obs.threshold,
                    obs.message,
                    obs.breach_started_at_ms,
                    now
                ],
            )?;
            let id = conn.last_insert_rowid();
            conn.execute(
                "UPDATE incidents SET dedup_key = ?2 WHERE id = ?1",
                params![id, format!("tocsin-{}-{id}", ctx.install_id)],
            )?;
            let note = format!("{} {}: {}", sev.as_str(), obs.state.as_str(), obs.message);
            timeline(conn, id, now, "triggered", obs.actor, &note)?;
            let fields = crate::silence::fields(obs.node, obs.check, sev.as_str(), &labels);
            if let Some(s) = ctx.silences.iter().find(|s| s.mutes(&fields, now)) {
                timeline(
                    conn,
                    id,
                    now,
                    "silenced",
                    obs.actor,
                    &format!(
                        "silenced by #{} ({}: {}): paging is held until it ends",
                        s.id, s.created_by, s.reason
                    ),
                )?;
            } else if obs.flapping {
                timeline(
                    conn,
                    id,
                    now,
                    "flapping",
                    obs.actor,
                    "the check is flapping: paging is held until it settles",
                )?;
            } else {
                out.notifications += page(conn, ctx, id, now)?;
            }
            out.opened.push(id);
        }
        // One incident for the whole flapping stretch, not one per flap.
        (Decision::Resolve, Some(_)) if obs.flapping && obs.reconcile => {}
        (Decision::Resolve, Some((id, _))) if obs.flapping => {
            timeline(
                conn,
                id,
                now,
                "state",
                obs.actor,
                &format!(
                    "ok while flapping, kept open until it settles: {}",
                    obs.message
                ),
            )?;
        }
        (Decision::Reclassify(_) | Decision::Refresh, Some((id, _)))
            if !obs.flapping && obs.state.is_firing() && held(conn, id)? =>
        {
            // It settled while firing: the page that flapping held goes out now.
            conn.execute(
                "UPDATE incidents SET state = ?2, value = ?3, threshold = ?4, summary = ?5 WHERE id = ?1",
                params![id, obs.state.as_str(), obs.value, obs.threshold, obs.message],
            )?;
            let incident = load_incident(conn, id)?;
            let fields = crate::silence::fields(
                &incident.node,
                &incident.check,
                incident.severity.as_str(),
                &incident.labels,
            );
            if let Some(s) = ctx.silences.iter().find(|s| s.mutes(&fields, now)) {
                timeline(
                    conn,
                    id,
                    now,
                    "silenced",
                    obs.actor,
                    &format!(
                        "settled while firing, silenced by #{} ({}: {}): paging is held until it ends",
                        s.id, s.created_by, s.reason
                    ),
                )?;
            } else {
                timeline(
                    conn,
                    id,
                    now,
                    "flapping",
                    obs.actor,
                    &format!("settled while firing, paging now: {}", obs.message),
                )?;
                out.notifications += page(conn, ctx, id, now)?;
            }
        }
        (Decision::Reclassify(sev), Some((id, _))) => {
            conn.execute(
                "UPDATE incidents SET severity = ?2, state = ?3, value = ?4, threshold = ?5, summary = ?6 WHERE id = ?1",
                params![id, sev.as_str(), obs.state.as_str(), obs.value, obs.threshold, obs.message],
            )?;
            timeline(
                conn,
                id,
                now,
                "severity",
                obs.actor,
                &format!("now {} ({})", sev.as_str(), obs.message),
            )?;
        }
        (Decision::Refresh, Some((id, _))) if !obs.reconcile => {
            conn.execute(
                "UPDATE incidents SET state = ?2, value = ?3, threshold = ?4, summary = ?5 WHERE id = ?1",
                params![id, obs.state.as_str(), obs.value, obs.threshold, obs.message],
            )?;
            timeline(conn, id, now, "state", obs.actor, obs.message)?;
        }
        (Decision::Resolve, Some((id, _))) => {
            conn.execute(
                "UPDATE incidents SET status = 'resolved', state = 'ok', resolved_at_ms = ?2, value = ?3, resolution = ?4
                 WHERE id = ?1",
                params![id, now, obs.value, obs.message],
            )?;
            timeline(conn, id, now, "resolved", obs.actor, obs.message)?;
            // A resolve goes exactly to the channels that were sent the trigger (or still
            // may be): never a lone resolve to a channel that refused the trigger.
            out.notifications += notify_triggered(conn, id, "resolve", now)?;
            out.resolved.push(id);
        }
        _ => {}
    }
    Ok(())
}
