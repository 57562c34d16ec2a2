//! Applying one observed check state to the incidents, inside the caller's transaction:
//! the single place where incidents open, gather members, change, reopen and resolve,
//! with their timeline entries and outbox rows. Used for agent events, heartbeat
//! reconciliation and node liveness; [`release_held`] pages what was held once nothing
//! holds it any more.
//!
//! A firing fingerprint joins, in this order: the open incident it is already a member
//! of; the open incident of its group key (`[correlation] group_by`); the incident it
//! cleared from within `reopen_window` (which reopens); else a new incident. The
//! incident stays open while any member fires and resolves when every member is OK.
//!
//! Paging is held — the incident is recorded, its trigger is not sent — while the group
//! gathers (`group_wait`), while the check flaps, while silences mute every firing
//! member, or while every firing member's node has an open `node_down` incident
//! (inhibition). [`page`] is the one place that pages: it routes the trigger
//! (`store::paging`: routes, storm guard) and enqueues it.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{IngestOutcome, load_incident, notify_triggered, parse_state, timeline};
use crate::correlate::{self, Correlation, Member, MemberFacts, NODE_DOWN};
use crate::model::{Severity, State, Status};

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
    /// From a heartbeat, not an event: only opens, joins and resolves (a refresh per
    /// heartbeat would flood the timeline).
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
    /// Grouping, group wait, re-open window and severity rules.
    pub correlation: &'a Correlation,
    /// The members of incidents as stored, kept between observations by the store
    /// thread ([`MemberCache`]); `None` reads them from the store every time.
    pub members: Option<&'a std::cell::RefCell<MemberCache>>,
}

/// The member rows of incidents, as [`member_rows`] reads them, kept in memory by the
/// store thread so that one member's state change does not reload a large group's
/// members. Only [`upsert_member`] and [`update_value`] write members, and they keep
/// it in step (or forget the incident); the store forgets all of it when anything else
/// writes or a transaction fails (`Store::ingest_group`).
#[derive(Debug, Default)]
pub struct MemberCache {
    /// Incident id → its members.
    incidents: std::collections::HashMap<i64, MemberRows>,
}

impl MemberCache {
    /// Forgets everything.
    pub(super) fn clear(&mut self) {
        self.incidents.clear();
    }

    /// How many incidents are kept.
    pub(super) fn len(&self) -> usize {
        self.incidents.len()
    }

    /// Member `fp` of incident `id` as kept, if the incident is kept: `Err(())` when
    /// the incident is kept without it (then it is forgotten: a new member).
    fn member(&mut self, id: i64, fp: &str) -> Option<Result<(&mut Member, &mut RowExtra), ()>> {
        let found = self
            .incidents
            .get(&id)?
            .members
            .iter()
            .position(|m| m.fingerprint == fp);
        let Some(i) = found else {
            self.incidents.remove(&id);
            return Some(Err(()));
        };
        let MemberRows { members, extra } = self.incidents.get_mut(&id)?;
        Some(Ok((&mut members[i], &mut extra[i])))
    }
}

/// Runs `f` on the members of incident `id`, from `ctx.members` (loading them once)
/// or from the store.
fn with_rows<T>(
    conn: &Connection,
    ctx: &Context<'_>,
    id: i64,
    f: impl FnOnce(&MemberRows) -> T,
) -> rusqlite::Result<T> {
    let Some(cache) = ctx.members else {
        return Ok(f(&member_rows(conn, id)?));
    };
    if !cache.borrow().incidents.contains_key(&id) {
        let rows = member_rows(conn, id)?;
        cache.borrow_mut().incidents.insert(id, rows);
    }
    let cache = cache.borrow();
    match cache.incidents.get(&id) {
        Some(rows) => Ok(f(rows)),
        None => Ok(f(&MemberRows::default())),
    }
}

/// A REAL as SQLite stores and returns it (NaN is stored as NULL).
fn stored_real(v: Option<f64>) -> Option<f64> {
    v.filter(|v| !v.is_nan())
}

/// Routes and sends the trigger of incident `id` (see `paging::page`: the channels its
/// routes name, held where a channel's storm budget is spent); returns how many triggers
/// were queued.
fn page(conn: &Connection, ctx: &Context<'_>, id: i64, now: i64) -> rusqlite::Result<usize> {
    super::paging::page(conn, ctx.router, id, now)
}

/// Whether incident `id` was paged in its current cycle (since it opened or last
/// reopened): it was routed (a `routing` row of the cycle, even when no trigger went out
/// — a route without channels, every trigger held by the storm guard), or it has a
/// trigger of the cycle (incidents paged before routing existed).
fn paged(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    if super::paging::routed(conn, id)? {
        return Ok(true);
    }
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM outbox o, incidents i
                        WHERE i.id = ?1 AND o.incident_id = i.id AND o.kind = 'trigger' AND o.id > i.outbox_mark)",
    )?
    .query_row([id], |r| r.get(0))
}

/// Whether the current cycle of incident `id` has a timeline entry of `kind`.
fn noted(conn: &Connection, id: i64, kind: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM timeline t, incidents i
                        WHERE i.id = ?1 AND t.incident_id = i.id AND t.kind = ?2 AND t.id > i.timeline_mark)",
    )?
    .query_row(params![id, kind], |r| r.get(0))
}

/// Whether incident `id` is held by flapping (never for an acknowledged incident: it is
/// someone's already and is never paged).
fn held(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM incidents WHERE id = ?1 AND flapping_hold = 1 AND status = 'triggered')",
    )?
    .query_row([id], |r| r.get(0))
}

/// The open `node_down` incident of `node`, if any.
fn node_down_incident(conn: &Connection, node: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT i.id FROM incident_members m JOIN incidents i ON i.id = m.incident_id
         WHERE m.node = ?1 AND m.check_name = ?2 AND m.state IN ('warning', 'critical')
           AND i.status != 'resolved'
         ORDER BY i.id LIMIT 1",
    )?
    .query_row(params![node, NODE_DOWN], |r| r.get(0))
    .optional()
}

/// Members of incident `id`, in join order.
pub(super) fn members(conn: &Connection, id: i64) -> rusqlite::Result<Vec<Member>> {
    Ok(member_rows(conn, id)?.members)
}

/// The members of an incident as stored, in join order; `extra[i]` goes with
/// `members[i]`.
#[derive(Debug, Default)]
struct MemberRows {
    members: Vec<Member>,
    extra: Vec<RowExtra>,
}

/// What a stored member has besides [`Member`].
#[derive(Debug)]
struct RowExtra {
    /// `incident_members.id` (join order).
    id: i64,
    /// NULL for members from before the column.
    unit: Option<String>,
    threshold: Option<f64>,
    /// The labels as stored (JSON).
    labels_json: String,
}

/// [`members`] with their row ids, units, thresholds and stored labels.
fn member_rows(conn: &Connection, id: i64) -> rusqlite::Result<MemberRows> {
    let mut rows = MemberRows::default();
    let mut stmt = conn.prepare_cached(
        "SELECT fingerprint, node, check_name, labels, state, value, message, since_ms, updated_ms,
             id, unit, threshold
         FROM incident_members WHERE incident_id = ?1 ORDER BY id",
    )?;
    let mut q = stmt.query([id])?;
    while let Some(r) = q.next()? {
        let labels_json: String = r.get(3)?;
        rows.members.push(Member {
            fingerprint: r.get(0)?,
            node: r.get(1)?,
            check: r.get(2)?,
            labels: serde_json::from_str(&labels_json).unwrap_or_default(),
            state: parse_state(&r.get::<_, String>(4)?),
            value: r.get(5)?,
            message: r.get(6)?,
            since_ms: r.get(7)?,
            updated_ms: r.get(8)?,
        });
        rows.extra.push(RowExtra {
            id: r.get(9)?,
            unit: r.get(10)?,
            threshold: r.get(11)?,
            labels_json,
        });
    }
    Ok(rows)
}

/// For a critical member on a node of a service: how many distinct known nodes of that
/// service are critical on `check` (current check states, plus open `node_down`
/// members), and how many nodes of that service are known.
fn service_share(conn: &Connection, check: &str, service: &str) -> rusqlite::Result<(u64, u64)> {
    let (critical, total): (i64, i64) = conn
        .prepare_cached(
            "SELECT
                 (SELECT count(DISTINCT n.node) FROM (
                      SELECT agent_id AS node FROM checks WHERE check_name = ?1 AND state = 'critical'
                      UNION
                      SELECT m.node FROM incident_members m JOIN incidents i ON i.id = m.incident_id
                      WHERE m.check_name = ?1 AND m.state = 'critical' AND i.status != 'resolved') n
                  JOIN agents a ON a.agent_id = n.node
                  WHERE json_extract(a.labels, '$.' || ?3) = ?2),
                 (SELECT count(*) FROM agents WHERE json_extract(labels, '$.' || ?3) = ?2)",
        )?
        .query_row(params![check, service, correlate::SERVICE_LABEL], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok((
        u64::try_from(critical).unwrap_or(0),
        u64::try_from(total).unwrap_or(0),
    ))
}

/// What [`refresh`] did besides describing the incident.
#[derive(Debug, Clone, Copy, Default)]
struct Refreshed {
    /// The severity rose (e.g. P2 → P1).
    rose: bool,
    /// Triggers queued to the routes of the higher severity (see `paging::reroute`).
    queued: usize,
}

/// Recomputes incident `id`'s severity (recording a reclassification on the timeline)
/// and description (node, check, labels, summary, state) from its members; `obs`
/// supplies the latest value, unit and threshold. With `note_reclassify` (an incident
/// that already exists), a severity that rises on a triggered incident already paged in
/// this cycle pages the routes of the new severity (`paging::reroute`); a severity that
/// drops un-pages nothing.
fn refresh(
    conn: &Connection,
    ctx: &Context<'_>,
    id: i64,
    obs: &Observation<'_>,
    note_reclassify: bool,
) -> rusqlite::Result<Refreshed> {
    let mut done = Refreshed::default();
    let Some((worst, d, sev)) = with_rows(conn, ctx, id, |rows| refresh_facts(conn, ctx, rows))??
    else {
        return Ok(done);
    };
    let current: String = conn
        .prepare_cached("SELECT severity FROM incidents WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let before = Severity::parse(&current);
    if let Some(sev) = sev
        && before != Some(sev)
    {
        done.rose = before.is_some_and(|b| sev < b);
        conn.execute(
            "UPDATE incidents SET severity = ?2 WHERE id = ?1",
            params![id, sev.as_str()],
        )?;
        // A hook whose `on` wants this severity starts now (once per paging cycle).
        super::hooks::on_trigger(conn, ctx.router, id, ctx.now)?;
        if note_reclassify {
            timeline(
                conn,
                id,
                ctx.now,
                "severity",
                obs.actor,
                &format!("now {} ({})", sev.as_str(), d.summary),
            )?;
        }
    }
    conn.execute(
        "UPDATE incidents SET node = ?2, check_name = ?3, labels = ?4, summary = ?5,
             state = coalesce(?6, state)
         WHERE id = ?1",
        params![
            id,
            d.node,
            d.check,
            serde_json::to_string(&d.labels).unwrap_or_default(),
            d.summary,
            d.state.map(State::as_str),
        ],
    )?;
    if let Some((value, unit, threshold)) = worst {
        // As `worst_value` does, without scanning the members again.
        conn.prepare_cached(
            "UPDATE incidents SET value = ?2, unit = coalesce(?3, unit),
                 threshold = CASE WHEN ?3 IS NULL THEN threshold ELSE ?4 END
             WHERE id = ?1",
        )?
        .execute(params![id, value, unit, threshold])?;
    }
    if done.rose && note_reclassify {
        let status: String = conn
            .prepare_cached("SELECT status FROM incidents WHERE id = ?1")?
            .query_row([id], |r| r.get(0))?;
        if status == Status::Triggered.as_str() && paged(conn, id)? {
            done.queued = super::paging::reroute(conn, ctx.router, id, before, ctx.now)?;
        }
    }
    Ok(done)
}

/// The worst firing member's value, unit and threshold; the description; the severity.
type Facts = (
    Option<(Option<f64>, Option<String>, Option<f64>)>,
    correlate::Description,
    Option<Severity>,
);

/// What [`refresh`] computes from an incident's members `rows`: the worst firing
/// member's value, unit and threshold (as `worst_value` picks it), the description and
/// the severity; `None` without members.
fn refresh_facts(
    conn: &Connection,
    ctx: &Context<'_>,
    rows: &MemberRows,
) -> rusqlite::Result<Option<Facts>> {
    let all = &rows.members;
    let worst = all
        .iter()
        .zip(&rows.extra)
        .filter(|(m, _)| m.state.is_firing())
        .max_by_key(|(m, x)| (m.state == State::Critical, m.updated_ms, x.id));
    let worst = worst.map(|(m, x)| (m.value, x.unit.clone(), x.threshold));
    let Some(d) = correlate::describe(all) else {
        return Ok(None);
    };
    // One count per (check, service), however many members share it.
    let mut counted: std::collections::HashMap<(&str, &str), (u64, u64)> = Default::default();
    let mut shares = Vec::with_capacity(all.len());
    for m in all {
        let share = match m.labels.get(correlate::SERVICE_LABEL) {
            Some(service) if m.state == State::Critical => {
                let key = (m.check.as_str(), service.as_str());
                if let Some(s) = counted.get(&key) {
                    Some(*s)
                } else {
                    let s = service_share(conn, &m.check, service)?;
                    counted.insert(key, s);
                    Some(s)
                }
            }
            _ => None,
        };
        shares.push(share);
    }
    let facts: Vec<MemberFacts<'_>> = all
        .iter()
        .zip(shares)
        .map(|(m, service_share)| MemberFacts {
            node: &m.node,
            check: &m.check,
            state: m.state,
            labels: &m.labels,
            service_share,
        })
        .collect();
    let sev = correlate::incident_severity(&facts, &ctx.correlation.severity);
    Ok(Some((worst, d, sev)))
}

/// Whether a member of incident `id` is not OK (firing, pending or unknown).
fn any_not_ok(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM incident_members WHERE incident_id = ?1 AND state != 'ok')",
    )?
    .query_row([id], |r| r.get(0))
}

/// A value-only update: member `fp` of the open incident `id` fires in the state it
/// already had (not flapping, the incident not held by flapping) with the labels it
/// already has. Nothing that decides the incident changes — its members, their states
/// and labels, hence its severity and description — so the members are not reloaded
/// and the severity is not recomputed ([`refresh`]): the member takes the new value,
/// message, unit and threshold; the incident its lone member's message as summary and
/// its worst firing member's value (as [`refresh`] does); the timeline a `state` entry.
///
/// Returns `false` (nothing written) when [`refresh`] must run after all: the labels
/// changed (e.g. the node's), or a critical member of the incident has a `service`
/// label, whose severity depends on the other nodes of its service (`service_share`)
/// and is recomputed at every event of the incident.
fn update_value(
    conn: &Connection,
    ctx: &Context<'_>,
    id: i64,
    fp: &str,
    obs: &Observation<'_>,
    labels: &BTreeMap<String, String>,
) -> rusqlite::Result<bool> {
    // The member keeps its drill mark while it fires (`drills::member_labels`).
    let labels = super::drills::member_labels(conn, id, fp, true, labels)?;
    let labels = serde_json::to_string(&labels).unwrap_or_default();
    let (members, shared): (i64, bool) = conn
        .prepare_cached(
            "SELECT count(*),
                 coalesce(max(state = 'critical' AND json_extract(labels, '$.' || ?2) IS NOT NULL), 0)
             FROM incident_members WHERE incident_id = ?1",
        )?
        .query_row(params![id, correlate::SERVICE_LABEL], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    if shared {
        return Ok(false);
    }
    let updated = conn
        .prepare_cached(
            "UPDATE incident_members SET value = ?4, message = ?5, updated_ms = ?6, unit = ?7, threshold = ?8
             WHERE incident_id = ?1 AND fingerprint = ?2 AND labels = ?3 AND state = ?9",
        )?
        .execute(params![
            id,
            fp,
            labels,
            obs.value,
            obs.message,
            ctx.now,
            obs.unit,
            obs.threshold,
            obs.state.as_str()
        ])?;
    if updated == 0 {
        return Ok(false); // the labels changed
    }
    if let Some(cache) = ctx.members
        && let Some(Ok((m, x))) = cache.borrow_mut().member(id, fp)
    {
        m.value = stored_real(obs.value);
        m.message = obs.message.to_owned();
        m.updated_ms = ctx.now;
        x.unit = Some(obs.unit.to_owned());
        x.threshold = stored_real(obs.threshold);
    }
    if members == 1 {
        // A lone member's message is the incident's summary (`correlate::describe`).
        conn.prepare_cached("UPDATE incidents SET summary = ?2 WHERE id = ?1")?
            .execute(params![id, obs.message])?;
    }
    worst_value(conn, id)?;
    timeline(conn, id, ctx.now, "state", obs.actor, obs.message)?;
    Ok(true)
}

/// Sets incident `id`'s value, unit and threshold to its worst firing member's
/// (critical over warning; the latest report among equals) — not to whichever member
/// reported last, e.g. one that just recovered. No member fires (pending, unknown):
/// kept as they are.
fn worst_value(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE incidents SET value = w.value, unit = coalesce(w.unit, incidents.unit),
             threshold = CASE WHEN w.unit IS NULL THEN incidents.threshold ELSE w.threshold END
         FROM (SELECT value, unit, threshold FROM incident_members
               WHERE incident_id = ?1 AND state IN ('critical', 'warning')
               ORDER BY CASE state WHEN 'critical' THEN 2 ELSE 1 END DESC, updated_ms DESC, id DESC
               LIMIT 1) AS w
         WHERE incidents.id = ?1",
    )?
    .execute([id])?;
    Ok(())
}

/// Inserts or updates the member `fp` of incident `id` from `obs`.
fn upsert_member(
    conn: &Connection,
    ctx: &Context<'_>,
    id: i64,
    fp: &str,
    obs: &Observation<'_>,
    labels: &BTreeMap<String, String>,
    now: i64,
) -> rusqlite::Result<()> {
    // The drill mark is decided when the member starts firing (`store::drills`).
    let labels = super::drills::member_labels(conn, id, fp, obs.state.is_firing(), labels)?;
    let labels_json = serde_json::to_string(&labels).unwrap_or_default();
    conn.prepare_cached(
        "INSERT INTO incident_members
             (incident_id, fingerprint, node, check_name, labels, state, value, message, since_ms, updated_ms,
              unit, threshold)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11)
         ON CONFLICT (incident_id, fingerprint) DO UPDATE SET
             labels = ?5, value = ?7, message = ?8, updated_ms = ?9, unit = ?10, threshold = ?11,
             since_ms = CASE WHEN state = ?6 THEN since_ms ELSE ?9 END, state = ?6",
    )?
    .execute(params![
        id,
        fp,
        obs.node,
        obs.check,
        labels_json,
        obs.state.as_str(),
        obs.value,
        obs.message,
        now,
        obs.unit,
        obs.threshold
    ])?;
    // The kept rows as the statement left them (a new member: forgotten, reloaded).
    if let Some(cache) = ctx.members
        && let Some(Ok((m, x))) = cache.borrow_mut().member(id, fp)
    {
        if m.state != obs.state {
            m.since_ms = now;
        }
        m.state = obs.state;
        m.labels = labels;
        m.value = stored_real(obs.value);
        m.message = obs.message.to_owned();
        m.updated_ms = now;
        x.unit = Some(obs.unit.to_owned());
        x.threshold = stored_real(obs.threshold);
        x.labels_json = labels_json;
    }
    Ok(())
}

/// Pages incident `id` unless something holds it: it is not `triggered` (acknowledged
/// incidents are never paged), it was paged in this cycle, it flaps, its group is still
/// gathering, silences mute every firing member, or every firing member's node is down
/// (inhibition). A new hold is recorded once on the timeline (`silenced`, `inhibited`);
/// paging after such a hold says so (`unsilenced`, `uninhibited`). Returns the number of
/// outbox rows.
pub(super) fn page_or_hold(
    conn: &Connection,
    ctx: &Context<'_>,
    id: i64,
    actor: &str,
) -> rusqlite::Result<usize> {
    let now = ctx.now;
    let (status, due, flapping): (String, Option<i64>, bool) = conn
        .prepare_cached("SELECT status, page_due_ms, flapping_hold FROM incidents WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    if status != Status::Triggered.as_str()
        || flapping
        || due.is_some_and(|d| d > now)
        || paged(conn, id)?
    {
        return Ok(0);
    }
    let severity: String = conn
        .prepare_cached("SELECT severity FROM incidents WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let mut silenced_by = None;
    let mut inhibited_by = None;
    let mut free = false;
    for m in members(conn, id)?.iter().filter(|m| m.state.is_firing()) {
        let fields = crate::silence::fields(&m.node, &m.check, &severity, &m.labels);
        if let Some(s) = ctx.silences.iter().find(|s| s.mutes(&fields, now)) {
            silenced_by.get_or_insert(s);
            continue;
        }
        if m.check != NODE_DOWN
            && let Some(down) = node_down_incident(conn, &m.node)?
            && down != id
        {
            inhibited_by.get_or_insert((down, m.node.clone()));
            continue;
        }
        free = true;
    }
    if free {
        if noted(conn, id, "silenced")? && !noted(conn, id, "unsilenced")? {
            timeline(
                conn,
                id,
                now,
                "unsilenced",
                actor,
                "no silence mutes it any more: paging now",
            )?;
        }
        if noted(conn, id, "inhibited")? && !noted(conn, id, "uninhibited")? {
            timeline(
                conn,
                id,
                now,
                "uninhibited",
                actor,
                "no node_down incident inhibits it any more: paging now",
            )?;
        }
        return page(conn, ctx, id, now);
    }
    if let Some(s) = silenced_by
        && !noted(conn, id, "silenced")?
    {
        timeline(
            conn,
            id,
            now,
            "silenced",
            actor,
            &format!(
                "silenced by #{} ({}: {}): paging is held until it ends",
                s.id, s.created_by, s.reason
            ),
        )?;
    }
    if let Some((down, node)) = inhibited_by
        && !noted(conn, id, "inhibited")?
    {
        timeline(
            conn,
            id,
            now,
            "inhibited",
            actor,
            &format!(
                "node {node} is down (node_down incident #{down}): paging is held until it is back"
            ),
        )?;
    }
    Ok(0)
}

/// What follows an incident's resolution in the same transaction: its group wait ends,
/// the silences that end with it (`ends_with_incident`) are expired, recorded as
/// expired by "incident #ID resolved", a remediation hold ends without a page, and the
/// hooks that run on resolve are queued (`store::hooks`).
pub(super) fn resolved(
    conn: &Connection,
    router: &crate::route::Router,
    id: i64,
    now: i64,
) -> rusqlite::Result<()> {
    super::hooks::on_resolved(conn, router, id, now)?;
    conn.execute(
        "UPDATE incidents SET page_due_ms = NULL WHERE id = ?1",
        [id],
    )?;
    conn.execute(
        "UPDATE silences SET ends_ms = min(ends_ms, ?2), starts_ms = min(starts_ms, min(ends_ms, ?2)),
             expired_by = coalesce(expired_by, ?3)
         WHERE ends_with_incident = ?1 AND ends_ms > ?2",
        params![id, now, format!("incident #{id} resolved")],
    )?;
    Ok(())
}

/// Opens a new incident for `obs` (fingerprint `fp`, group key `key`); returns its id.
fn open(
    conn: &Connection,
    ctx: &Context<'_>,
    obs: &Observation<'_>,
    fp: &str,
    key: &str,
    labels: &BTreeMap<String, String>,
) -> rusqlite::Result<i64> {
    let now = ctx.now;
    let sev = correlate::severity(obs.state);
    let due = (ctx.correlation.group_wait_ms > 0).then(|| now + ctx.correlation.group_wait_ms);
    conn.execute(
        "INSERT INTO incidents (fingerprint, node, check_name, labels, severity, status, state, value, unit,
             threshold, summary, breach_started_at_ms, triggered_at_ms, group_key, page_due_ms, flapping_hold,
             outbox_mark, timeline_mark)
         VALUES (?1, ?2, ?3, ?4, ?5, 'triggered', ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
             (SELECT coalesce(max(id), 0) FROM outbox), (SELECT coalesce(max(id), 0) FROM timeline))",
        params![
            fp,
            obs.node,
            obs.check,
            serde_json::to_string(labels).unwrap_or_default(),
            sev.as_str(),
            obs.state.as_str(),
            obs.value,
            obs.unit,
            obs.threshold,
            obs.message,
            obs.breach_started_at_ms,
            now,
            key,
            due,
            obs.flapping
        ],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "UPDATE incidents SET dedup_key = ?2 WHERE id = ?1",
        params![id, format!("tocsin-{}-{id}", ctx.install_id)],
    )?;
    upsert_member(conn, ctx, id, fp, obs, labels, now)?;
    refresh(conn, ctx, id, obs, false)?; // new: not paged yet, nothing to re-route
    let sev = load_incident(conn, id)?.severity;
    let note = format!("{} {}: {}", sev.as_str(), obs.state.as_str(), obs.message);
    timeline(conn, id, now, "triggered", obs.actor, &note)?;
    Ok(id)
}

/// Records that `obs` flaps on a new or reopened incident: paging is held.
fn note_flapping(conn: &Connection, id: i64, now: i64, actor: &str) -> rusqlite::Result<()> {
    timeline(
        conn,
        id,
        now,
        "flapping",
        actor,
        "the check is flapping: paging is held until it settles",
    )
}

/// Applies `obs` to the incidents: opens, joins, reopens, refreshes or resolves as the
/// module docs say, recording timeline entries and outbox rows in `out`.
pub fn apply(
    conn: &Connection,
    ctx: &Context<'_>,
    obs: &Observation<'_>,
    out: &mut IngestOutcome,
) -> rusqlite::Result<()> {
    apply_noting(conn, ctx, obs, out).map(|_| ())
}

/// [`apply`], telling whether the fingerprint of a state that does not fire was found
/// **quiet** and nothing was written: it is no open incident's member, or its member
/// in the latest open incident is OK. For a quiet fingerprint, an OK observation that
/// does not flap is a no-op (what `store::ingest_in`'s `quiet` set relies on).
pub(super) fn apply_noting(
    conn: &Connection,
    ctx: &Context<'_>,
    obs: &Observation<'_>,
    out: &mut IngestOutcome,
) -> rusqlite::Result<bool> {
    let fp = correlate::fingerprint(obs.node, obs.check, obs.labels);
    let now = ctx.now;
    let mut labels = ctx.node_labels.clone();
    labels.extend(obs.labels.clone());
    // The open incident this fingerprint is a member of, with the member's state.
    let member: Option<(i64, String)> = conn
        .prepare_cached(
            "SELECT i.id, m.state FROM incident_members m JOIN incidents i ON i.id = m.incident_id
             WHERE m.fingerprint = ?1 AND i.status != 'resolved' ORDER BY i.id DESC LIMIT 1",
        )?
        .query_row([&fp], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if obs.state.is_firing() {
        if let Some((id, state)) = &member
            && !obs.reconcile
            && !obs.flapping
            && *state == obs.state.as_str()
            && !held(conn, *id)?
            && update_value(conn, ctx, *id, &fp, obs, &labels)?
        {
            return Ok(false);
        }
        // The drill mark, when a drill running on the node expects this check. Only a
        // member that starts firing takes it (`drills::member_labels`), so it is looked
        // up here and not for the value updates above or for what does not fire.
        let mark = super::drills::mark_check(conn, obs.node, obs.check, now, &mut labels)?;
        match member {
            Some((id, _)) if !obs.flapping && held(conn, id)? => {
                // It settled while firing: the page that flapping held goes out now
                // (unless something else holds it).
                super::drills::keep_real(conn, id, mark, &mut labels)?;
                upsert_member(conn, ctx, id, &fp, obs, &labels, now)?;
                conn.execute("UPDATE incidents SET flapping_hold = 0 WHERE id = ?1", [id])?;
                out.notifications += refresh(conn, ctx, id, obs, true)?.queued;
                timeline(
                    conn,
                    id,
                    now,
                    "flapping",
                    obs.actor,
                    &format!("settled while firing: {}", obs.message),
                )?;
                out.notifications += page_or_hold(conn, ctx, id, obs.actor)?;
            }
            Some((id, state)) => {
                if obs.reconcile && state == obs.state.as_str() {
                    return Ok(false); // nothing new: no write per heartbeat
                }
                // An open incident that is not this drill's stays real.
                super::drills::keep_real(conn, id, mark, &mut labels)?;
                upsert_member(conn, ctx, id, &fp, obs, &labels, now)?;
                let refreshed = refresh(conn, ctx, id, obs, true)?;
                out.notifications += refreshed.queued;
                if !obs.reconcile {
                    timeline(conn, id, now, "state", obs.actor, obs.message)?;
                }
                if refreshed.rose {
                    // Held (e.g. by a silence on the old severity) and held no more:
                    // paged now, at the new severity.
                    out.notifications += page_or_hold(conn, ctx, id, obs.actor)?;
                }
            }
            None => join_or_open(conn, ctx, obs, &fp, &mut labels, mark, out)?,
        }
        return Ok(false);
    }
    let Some((id, state)) = member else {
        return Ok(true);
    };
    if obs.state != State::Ok {
        // Pending, unknown: the member says so; the incident stays as it is.
        if state != obs.state.as_str() {
            upsert_member(conn, ctx, id, &fp, obs, &labels, now)?;
        }
        return Ok(false);
    }
    if obs.flapping {
        // One incident for the whole flapping stretch, not one per flap.
        if !obs.reconcile {
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
        return Ok(false);
    }
    if state == State::Ok.as_str() {
        return Ok(true);
    }
    upsert_member(conn, ctx, id, &fp, obs, &labels, now)?;
    if any_not_ok(conn, id)? {
        out.notifications += refresh(conn, ctx, id, obs, true)?.queued;
        timeline(
            conn,
            id,
            now,
            "member",
            obs.actor,
            &format!("{fp} recovered: {}", obs.message),
        )?;
        return Ok(false);
    }
    // The resolve says what resolved it: the last observation's message for a lone
    // member, else every member OK ("cpu ok on 12 nodes: …"); state, value, unit and
    // threshold of the last observation — not the firing text of before.
    let all = members(conn, id)?;
    let summary = match all.as_slice() {
        [_] => obs.message.to_owned(),
        _ => correlate::describe(&all).map_or_else(|| obs.message.to_owned(), |d| d.summary),
    };
    conn.execute(
        "UPDATE incidents SET status = 'resolved', state = 'ok', resolved_at_ms = ?2, value = ?3, resolution = ?4,
             summary = ?5, unit = ?6, threshold = ?7
         WHERE id = ?1",
        params![id, now, obs.value, obs.message, summary, obs.unit, obs.threshold],
    )?;
    timeline(conn, id, now, "resolved", obs.actor, obs.message)?;
    // A resolve goes exactly to the channels that were sent the trigger (or still may
    // be): never a lone resolve to a channel that refused the trigger, and none at all
    // for a group that cleared while it was still gathering.
    out.notifications += notify_triggered(conn, id, "resolve", now)?;
    resolved(conn, ctx.router, id, now)?;
    if let Some(cache) = ctx.members {
        cache.borrow_mut().incidents.remove(&id); // kept for open incidents only
    }
    out.resolved.push(id);
    Ok(false)
}

/// A firing fingerprint that is no open incident's member: joins its group's open
/// incident, reopens the incident it recently cleared from, or opens a new one.
fn join_or_open(
    conn: &Connection,
    ctx: &Context<'_>,
    obs: &Observation<'_>,
    fp: &str,
    labels: &mut BTreeMap<String, String>,
    mark: Option<i64>,
    out: &mut IngestOutcome,
) -> rusqlite::Result<()> {
    let now = ctx.now;
    let key = correlate::group_key(&ctx.correlation.group_by, obs.node, obs.check, labels);
    let group: Option<i64> = conn
        .prepare_cached(
            "SELECT id FROM incidents WHERE group_key = ?1 AND status != 'resolved' ORDER BY id DESC LIMIT 1",
        )?
        .query_row([&key], |r| r.get(0))
        .optional()?;
    if let Some(id) = group {
        // Joining an open incident that is not this drill's: the member stays real.
        super::drills::keep_real(conn, id, mark, labels)?;
        let labels = &*labels;
        upsert_member(conn, ctx, id, fp, obs, labels, now)?;
        out.notifications += refresh(conn, ctx, id, obs, true)?.queued;
        timeline(
            conn,
            id,
            now,
            "member",
            obs.actor,
            &format!("{fp} joined ({}): {}", obs.state.as_str(), obs.message),
        )?;
        // A group held only by inhibition or silences pages once a free member joins;
        // one already paged is not paged again.
        out.notifications += page_or_hold(conn, ctx, id, obs.actor)?;
        return Ok(());
    }
    let window = ctx.correlation.reopen_window_ms;
    let recent: Option<i64> = if window > 0 {
        conn.prepare_cached(
            "SELECT i.id FROM incident_members m JOIN incidents i ON i.id = m.incident_id
             WHERE m.fingerprint = ?1 AND m.state = 'ok' AND i.status = 'resolved' AND i.resolved_at_ms >= ?2
             ORDER BY i.resolved_at_ms DESC, i.id DESC LIMIT 1",
        )?
        .query_row(params![fp, now - window], |r| r.get(0))
        .optional()?
    } else {
        None
    };
    let id = if let Some(id) = recent {
        let due = (ctx.correlation.group_wait_ms > 0).then(|| now + ctx.correlation.group_wait_ms);
        conn.execute(
            "UPDATE incidents SET status = 'triggered', resolved_at_ms = NULL, resolution = NULL,
                 acknowledged_at_ms = NULL, page_due_ms = ?2, flapping_hold = ?3, reopened = reopened + 1,
                 outbox_mark = (SELECT coalesce(max(id), 0) FROM outbox),
                 timeline_mark = (SELECT coalesce(max(id), 0) FROM timeline),
                 cycle_triggered_at_ms = ?4, cycle_breach_started_at_ms = ?5
             WHERE id = ?1",
            params![id, due, obs.flapping, now, obs.breach_started_at_ms],
        )?;
        upsert_member(conn, ctx, id, fp, obs, labels, now)?;
        // A new cycle, not paged yet: the page below routes it by its severity now.
        refresh(conn, ctx, id, obs, true)?;
        timeline(
            conn,
            id,
            now,
            "reopened",
            obs.actor,
            &format!(
                "{fp} fired again within the re-open window ({}): {}",
                obs.state.as_str(),
                obs.message
            ),
        )?;
        id
    } else {
        open(conn, ctx, obs, fp, &key, labels)?
    };
    // Hooks whose `on` matches start with the trigger (once per paging cycle), whatever
    // holds the page.
    super::hooks::on_trigger(conn, ctx.router, id, now)?;
    if obs.flapping {
        note_flapping(conn, id, now, obs.actor)?;
    } else {
        out.notifications += page_or_hold(conn, ctx, id, obs.actor)?;
    }
    out.opened.push(id);
    Ok(())
}

/// Pages, at `ctx.now`, every open incident whose trigger was held and is held no more:
/// its group wait is over, the silences or the `node_down` incident that held it
/// ended, or its remediation hook ran and the verification time passed (an aggregator
/// restart resumes these from the store). Returns the number of outbox rows.
pub(super) fn release_held(conn: &Connection, ctx: &Context<'_>) -> rusqlite::Result<usize> {
    let now = ctx.now;
    let candidates: Vec<i64> = conn
        .prepare_cached(&format!(
            "SELECT i.id FROM incidents i
             WHERE i.status = 'triggered' AND i.flapping_hold = 0
               AND ((i.page_due_ms IS NOT NULL AND i.page_due_ms <= ?1)
                    OR EXISTS (SELECT 1 FROM timeline t WHERE t.incident_id = i.id AND t.id > i.timeline_mark
                                 AND t.kind IN ('silenced', 'inhibited'))
                    OR {remediation_due})
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.incident_id = i.id AND o.kind = 'trigger'
                                 AND o.id > i.outbox_mark)
               AND NOT EXISTS (SELECT 1 FROM routing r WHERE r.incident_id = i.id AND r.cycle = i.reopened)
             ORDER BY i.id",
            remediation_due = super::hooks::REMEDIATION_DUE
        ))?
        .query_map([now], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut sent = 0;
    for id in candidates {
        conn.execute(
            "UPDATE incidents SET page_due_ms = NULL WHERE id = ?1 AND page_due_ms <= ?2",
            params![id, now],
        )?;
        sent += page_or_hold(conn, ctx, id, "aggregator")?;
    }
    Ok(sent)
}
