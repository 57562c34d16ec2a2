//! Paging by route, inside the store's transactions: which channels get an incident's
//! trigger (per [`crate::route::Router::plan`]), the storm guard that holds triggers
//! beyond a channel's budget, and the paging sweep — repeats, escalations past the
//! response target, storm summaries when a window turns.
//!
//! Everything is recorded in the store, so every timer survives a restart:
//! - `routing`: one row per route an incident took when it was paged (channels,
//!   escalation channels, repeat period — a snapshot: later config changes do not
//!   re-route open incidents);
//! - `storm_held`: triggers held by the storm guard, until their window's summary;
//! - escalations: each `routing` row escalates once, its severity's response target
//!   after it paged (`routed_ms`); `escalated_ms` records it in the same transaction as
//!   the escalation triggers and the `escalated` timeline entry; repeats are `repeat`
//!   outbox rows (the next one is due a period after the last).
//!
//! All of it is per **paging cycle**: an incident that resolves and fires again within
//! the re-open window (`store::apply`) starts a new cycle — it is routed, paged, repeated
//! and escalated again, as if new. `routing` and `storm_held` rows carry the cycle they
//! belong to (the incident's `reopened` count then); outbox rows and timeline entries of
//! the current cycle are those after the incident's `outbox_mark` and `timeline_mark`.
//!
//! Drill incidents (`drill=true`) are paged as `route::DrillPaging` says: to `[drills]
//! channels` only, or through the routes at most as a P2 — routes, escalation target
//! and the storm guard's P1 exemption all read that severity — unless their drill pages
//! real (`store::drills::paging_of`).
//!
//! The invariant holds for everything here: acknowledge and resolve go to a channel iff
//! it was sent the trigger in the current cycle (`notify_triggered` reads that cycle's
//! `trigger` outbox rows). Escalation triggers are `trigger` rows; held triggers, repeats
//! and summaries are not.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use super::{Store, StoreError, enqueue, load_incident, timeline};
use crate::model::{Incident, Severity, rfc3339};
use crate::route::{DrillPaging, Router, Storm};

/// Tables and indexes of paging; idempotent, run at every open after the main schema.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS routing (
    id          INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    route       TEXT NOT NULL,
    channels    TEXT NOT NULL,
    escalate_to TEXT NOT NULL,
    repeat_ms   INTEGER,
    routed_ms   INTEGER NOT NULL,
    cycle       INTEGER NOT NULL DEFAULT 0,
    escalated_ms INTEGER
);
CREATE INDEX IF NOT EXISTS routing_incident ON routing (incident_id);

CREATE TABLE IF NOT EXISTS storm_held (
    id            INTEGER PRIMARY KEY,
    channel       TEXT NOT NULL,
    incident_id   INTEGER NOT NULL REFERENCES incidents (id),
    severity      TEXT NOT NULL,
    held_ms       INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    summary_id    INTEGER,
    cycle         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS storm_held_incident ON storm_held (incident_id);
CREATE INDEX IF NOT EXISTS storm_held_pending ON storm_held (window_end_ms) WHERE summary_id IS NULL;
CREATE INDEX IF NOT EXISTS outbox_channel_created ON outbox (channel, created_ms);
CREATE INDEX IF NOT EXISTS incidents_triggered ON incidents (id) WHERE status = 'triggered';
";

/// Outbox kind of a re-notification of a still open, unacknowledged incident.
pub const REPEAT: &str = "repeat";
/// Outbox kind of the one message per channel and storm window that stands for the
/// triggers the storm guard held.
pub const STORM_SUMMARY: &str = "storm_summary";
/// Incidents named one by one in a storm summary; the rest are counted.
pub const SUMMARY_LISTED: usize = 10;

/// Pages incident `id`: records the routes it takes and sends its trigger to their
/// channels (each at most once), holding it where a channel's storm budget is spent.
/// Returns how many triggers were queued.
pub(super) fn page(
    conn: &Connection,
    router: &Router,
    id: i64,
    now: i64,
) -> rusqlite::Result<usize> {
    let incident = load_incident(conn, id)?;
    let fields = crate::silence::fields(
        &incident.node,
        &incident.check,
        incident.severity.as_str(),
        &incident.labels,
    );
    let drill = super::drills::paging_of(conn, &incident.labels)?;
    let as_sev = router.paging_severity(incident.severity, drill);
    let plans = router.plan_for(&fields, incident.severity, drill);
    // A route that remediates first holds the page while its hook runs and verifies.
    if super::hooks::remediate_gate(conn, router, &incident, &plans, now)? {
        return Ok(0);
    }
    let mut channels: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    if let Some(note) = drill_note(router, incident.severity, drill) {
        notes.push(note);
    }
    for p in &plans {
        record_route(conn, id, p, now)?;
        let mut note = format!(
            "{} → {}",
            p.name,
            if p.channels.is_empty() {
                "no channel".to_owned()
            } else {
                p.channels.join(", ")
            }
        );
        if !p.escalate_to.is_empty() {
            note.push_str(&format!(
                "; escalates to {} if unacknowledged past the {} target ({})",
                p.escalate_to.join(", "),
                as_sev.as_str(),
                router.routing.targets.describe(as_sev)
            ));
        }
        if let Some(every) = p.repeat_interval {
            note.push_str(&format!(
                "; repeats every {}",
                tocsin_agent::settings::format_duration(every)
            ));
        }
        notes.push(note);
        for c in &p.channels {
            if !channels.contains(c) {
                channels.push(c.clone());
            }
        }
    }
    if !router.routing.routes.is_empty() || drill != DrillPaging::Real {
        timeline(
            conn,
            id,
            now,
            "routed",
            "aggregator",
            &notes.join("; then "),
        )?;
    }
    let mut sent = 0;
    for ch in &channels {
        if send_trigger(conn, router, &incident, ch, now)? == Sent::Queued {
            sent += 1;
        }
    }
    Ok(sent)
}

/// The timeline's word on how a drill incident of `severity` is paged (`None` when it
/// is not a drill).
fn drill_note(router: &Router, severity: Severity, drill: DrillPaging) -> Option<String> {
    match drill {
        DrillPaging::Real => None,
        DrillPaging::DrillPageReal => Some(format!(
            "drill paging real (--page-real): the real routes at its real severity {}",
            severity.as_str()
        )),
        DrillPaging::Drill if !router.routing.drill_channels.is_empty() => Some(format!(
            "drill: paged to the drill channels only ([drills] channels: {})",
            router.routing.drill_channels.join(", ")
        )),
        DrillPaging::Drill => {
            let as_sev = router.paging_severity(severity, drill);
            Some(if as_sev == severity {
                format!(
                    "drill: the real routes at {} (a drill never takes the P1 path unless run with --page-real)",
                    severity.as_str()
                )
            } else {
                format!(
                    "drill: routed as {} although it is {} (a drill never takes the P1 path unless run with --page-real)",
                    as_sev.as_str(),
                    severity.as_str()
                )
            })
        }
    }
}

/// Records that incident `id` takes route `p` in its current cycle, paged at `now`
/// (Unix ms; its response target counts from there).
fn record_route(
    conn: &Connection,
    id: i64,
    p: &crate::route::Planned,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO routing (incident_id, route, channels, escalate_to, repeat_ms, routed_ms, cycle)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT reopened FROM incidents WHERE id = ?1))",
    )?
    .execute(params![
        id,
        p.name,
        serde_json::to_string(&p.channels).unwrap_or_default(),
        serde_json::to_string(&p.escalate_to).unwrap_or_default(),
        p.repeat_interval
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        now
    ])?;
    Ok(())
}

/// Pages incident `id`, already paged in this cycle, on the routes its severity — which
/// just rose from `from` (e.g. P2 → P1) — takes and it did not take yet: records them
/// (`routing` rows, so their repeats and escalation apply, the response target counting
/// from now) and sends the trigger to each of their channels that has not had this
/// cycle's trigger (a channel already paged is not paged again; the storm guard applies).
/// Adds a `rerouted` timeline entry ("now P1 (was P2): route p1 → paged war-room,
/// pagerduty"). Without any `[[route]]` every channel already had the trigger: nothing
/// to do. Returns how many triggers were queued.
pub(super) fn reroute(
    conn: &Connection,
    router: &Router,
    id: i64,
    from: Option<Severity>,
    now: i64,
) -> rusqlite::Result<usize> {
    if router.routing.routes.is_empty() {
        return Ok(0);
    }
    let incident = load_incident(conn, id)?;
    let fields = crate::silence::fields(
        &incident.node,
        &incident.check,
        incident.severity.as_str(),
        &incident.labels,
    );
    let taken: Vec<String> = conn
        .prepare_cached(
            "SELECT r.route FROM routing r, incidents i
             WHERE i.id = ?1 AND r.incident_id = i.id AND r.cycle = i.reopened",
        )?
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut names = Vec::new();
    let mut channels: Vec<String> = Vec::new();
    let drill = super::drills::paging_of(conn, &incident.labels)?;
    for p in router.plan_for(&fields, incident.severity, drill) {
        if taken.contains(&p.name) {
            continue;
        }
        record_route(conn, id, &p, now)?;
        for c in &p.channels {
            if !channels.contains(c) {
                channels.push(c.clone());
            }
        }
        names.push(p.name);
    }
    if names.is_empty() {
        return Ok(0);
    }
    let (queued, mut what) = trigger_each(conn, router, &incident, &channels, now, "paged")?;
    if what.is_empty() {
        "no channel".clone_into(&mut what);
    }
    let was = from.map_or(String::new(), |f| format!(" (was {})", f.as_str()));
    timeline(
        conn,
        id,
        now,
        "rerouted",
        "aggregator",
        &format!(
            "now {}{was}: {} {} → {what}",
            incident.severity.as_str(),
            if names.len() == 1 { "route" } else { "routes" },
            names.join(", "),
        ),
    )?;
    Ok(queued)
}

/// Sends the trigger of `incident` to each of `channels` (see [`send_trigger`]); answers
/// how many were queued, and what became of each channel for the timeline ("paged a, b;
/// held by the storm guard for c; d already paged or not configured"; empty without
/// channels). `verb` says "paged" or "paging".
fn trigger_each(
    conn: &Connection,
    router: &Router,
    incident: &Incident,
    channels: &[String],
    now: i64,
    verb: &str,
) -> rusqlite::Result<(usize, String)> {
    let (mut paged, mut held, mut had) = (Vec::new(), Vec::new(), Vec::new());
    for ch in channels {
        match send_trigger(conn, router, incident, ch, now)? {
            Sent::Queued => paged.push(ch.as_str()),
            Sent::Held => held.push(ch.as_str()),
            Sent::Skipped => had.push(ch.as_str()),
        }
    }
    let mut parts = Vec::new();
    if !paged.is_empty() {
        parts.push(format!("{verb} {}", paged.join(", ")));
    }
    if !held.is_empty() {
        parts.push(format!("held by the storm guard for {}", held.join(", ")));
    }
    if !had.is_empty() {
        parts.push(format!(
            "{} already paged or not configured",
            had.join(", ")
        ));
    }
    Ok((paged.len(), parts.join("; ")))
}

/// Whether incident `id` was paged under routing in its current cycle (it has a
/// `routing` row of the cycle), even if no trigger went out (a route without channels,
/// every trigger held by the storm guard).
pub(super) fn routed(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM routing r, incidents i
                        WHERE i.id = ?1 AND r.incident_id = i.id AND r.cycle = i.reopened)",
    )?
    .query_row([id], |r| r.get(0))
}

/// What became of one trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Queued in the outbox.
    Queued,
    /// Held by the storm guard, for the window's summary.
    Held,
    /// Not sent: the channel already has this incident's trigger (queued, sent, failed
    /// or held), or it is gone from the config.
    Skipped,
}

/// Queues the trigger of `incident` to `channel` unless the channel already has it or
/// is gone from the config; holds it when the channel's storm budget is spent.
fn send_trigger(
    conn: &Connection,
    router: &Router,
    incident: &Incident,
    channel: &str,
    now: i64,
) -> rusqlite::Result<Sent> {
    if !router.has_channel(channel) || has_page(conn, incident.id, channel)? {
        return Ok(Sent::Skipped);
    }
    // A P1 is never held by the storm guard (it still spends the budget); a drill is
    // paged as at most a P2 (unless it pages real), so it may be.
    let drill = super::drills::paging_of(conn, &incident.labels)?;
    if router.paging_severity(incident.severity, drill) != Severity::P1
        && let Some(storm) = router.storm(channel)
        && !admit(conn, storm, channel, now, Kind::Trigger)?
    {
        let window_end = storm.window_start(now) + storm.window_ms();
        conn.prepare_cached(
            "INSERT INTO storm_held (channel, incident_id, severity, held_ms, window_end_ms, cycle)
             VALUES (?1, ?2, ?3, ?4, ?5, (SELECT reopened FROM incidents WHERE id = ?2))",
        )?
        .execute(params![
            channel,
            incident.id,
            incident.severity.as_str(),
            now,
            window_end
        ])?;
        timeline(
            conn,
            incident.id,
            now,
            "storm",
            "aggregator",
            &format!(
                "trigger to {channel} held by the storm guard ({} triggers per {} spent): \
                 counted in the summary at {}; no acknowledge or resolve goes there",
                storm.budget,
                tocsin_agent::settings::format_duration(storm.window),
                rfc3339(window_end)
            ),
        )?;
        return Ok(Sent::Held);
    }
    enqueue(conn, incident, channel, "trigger", now)?;
    Ok(Sent::Queued)
}

/// Whether `channel` already has the trigger of incident `id` in its current cycle,
/// queued, sent, failed or held by the storm guard: it never gets a second one per cycle.
fn has_page(conn: &Connection, id: i64, channel: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM outbox o, incidents i
                        WHERE i.id = ?1 AND o.incident_id = i.id AND o.channel = ?2 AND o.kind = 'trigger'
                          AND o.id > i.outbox_mark)
             OR EXISTS (SELECT 1 FROM storm_held h, incidents i
                        WHERE i.id = ?1 AND h.incident_id = i.id AND h.channel = ?2 AND h.cycle = i.reopened)",
    )?
    .query_row(params![id, channel], |r| r.get(0))
}

/// What asks for a place in a storm budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A trigger: the budget counts triggers only (P1 ones included), so repeats never
    /// take a place a trigger needs.
    Trigger,
    /// A repeat: only what triggers and earlier repeats left of the budget; beyond it
    /// the repeat is held (recorded, not sent).
    Repeat,
}

/// Whether one more trigger or repeat fits in `channel`'s budget for the window of `now`:
/// a trigger fits while the window's triggers are under the budget; a repeat fits while
/// its triggers and repeats together are. Repeats are thus held first, and a window
/// carries at most `budget` triggers plus the repeats sent while room was left.
fn admit(
    conn: &Connection,
    storm: Storm,
    channel: &str,
    now: i64,
    kind: Kind,
) -> rusqlite::Result<bool> {
    let kinds = match kind {
        Kind::Trigger => "('trigger')",
        Kind::Repeat => "('trigger', 'repeat')",
    };
    let used: i64 = conn
        .prepare_cached(&format!(
            "SELECT count(*) FROM outbox
             WHERE channel = ?1 AND created_ms >= ?2 AND kind IN {kinds} AND status != 'held'"
        ))?
        .query_row(params![channel, storm.window_start(now)], |r| r.get(0))?;
    Ok(used < i64::from(storm.budget))
}

/// What one paging sweep queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Incidents escalated.
    pub escalated: Vec<i64>,
    /// Repeats queued.
    pub repeats: usize,
    /// Storm summaries queued.
    pub summaries: usize,
    /// Outbox rows queued in all (escalation triggers, repeats, summaries).
    pub notifications: usize,
}

impl Store {
    /// One paging sweep at `now` (Unix ms), in one transaction: escalates incidents still
    /// unacknowledged past their severity's response target (measured from when each
    /// route paged its channels; once per route and paging cycle, so a restart never
    /// escalates twice), queues the repeats that are due, and sends a
    /// summary for every channel whose storm window ended with held triggers. Run by
    /// [`crate::escalate::Sweep`].
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; nothing is committed then.
    pub fn sweep_paging(&mut self, now: i64) -> Result<SweepOutcome, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let mut out = SweepOutcome::default();
        escalate(&tx, &self.router, &self.silences, now, &mut out).map_err(err)?;
        repeat(&tx, &self.router, &self.silences, now, &mut out).map_err(err)?;
        summarise(&tx, &self.router, &self.install_id, now, &mut out).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(out)
    }
}

fn muted(silences: &[crate::silence::Silence], i: &Incident, now: i64) -> bool {
    let fields = crate::silence::fields(&i.node, &i.check, i.severity.as_str(), &i.labels);
    silences.iter().any(|s| s.mutes(&fields, now))
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn escalate(
    tx: &Connection,
    router: &Router,
    silences: &[crate::silence::Silence],
    now: i64,
    out: &mut SweepOutcome,
) -> rusqlite::Result<()> {
    // The routes of open, unacknowledged incidents (this cycle) that escalate and have
    // not escalated yet: each one's response target counts from when it paged its
    // channels (`routed_ms`), not from the trigger, so a page released after a silence,
    // an inhibition or a group wait — or a route added when the severity rose — gives
    // its channels the whole target.
    let rows: Vec<(i64, i64, String, i64)> = tx
        .prepare_cached(
            "SELECT r.id, r.incident_id, r.escalate_to, r.routed_ms FROM routing r JOIN incidents i ON i.id = r.incident_id
             WHERE i.status = 'triggered' AND r.cycle = i.reopened AND r.escalate_to != '[]'
               AND r.escalated_ms IS NULL
             ORDER BY r.incident_id, r.id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut by_incident: BTreeMap<i64, Vec<(i64, String, i64)>> = BTreeMap::new();
    for (row, id, escalate_to, routed_ms) in rows {
        by_incident
            .entry(id)
            .or_default()
            .push((row, escalate_to, routed_ms));
    }
    for (id, routes) in by_incident {
        let incident = load_incident(tx, id)?;
        let targets = &router.routing.targets;
        // A drill escalates as the severity it was paged as (at most P2).
        let drill = super::drills::paging_of(tx, &incident.labels)?;
        let as_sev = router.paging_severity(incident.severity, drill);
        let due: Vec<(i64, &str, i64)> = routes
            .iter()
            .map(|(row, to, routed)| (*row, to.as_str(), targets.deadline(as_sev, *routed)))
            .filter(|(_, _, deadline)| *deadline <= now)
            .collect();
        // A silence mutes escalation as it mutes the page: it goes out when it ends.
        let Some(deadline) = due.iter().map(|(_, _, d)| *d).min() else {
            continue;
        };
        if muted(silences, &incident, now) {
            continue;
        }
        let mut to: Vec<String> = Vec::new();
        for ch in due.iter().flat_map(|(_, list, _)| json_list(list)) {
            if !to.contains(&ch) {
                to.push(ch);
            }
        }
        for (row, _, _) in &due {
            tx.prepare_cached("UPDATE routing SET escalated_ms = ?2 WHERE id = ?1")?
                .execute(params![row, now])?;
        }
        let (queued, what) = trigger_each(tx, router, &incident, &to, now, "paging")?;
        out.notifications += queued;
        timeline(
            tx,
            id,
            now,
            "escalated",
            "aggregator",
            &format!(
                "unacknowledged past the {} response target ({}, due {}): {what}",
                as_sev.as_str(),
                targets.describe(as_sev),
                rfc3339(deadline)
            ),
        )?;
        out.escalated.push(id);
    }
    Ok(())
}

fn repeat(
    tx: &Connection,
    router: &Router,
    silences: &[crate::silence::Silence],
    now: i64,
    out: &mut SweepOutcome,
) -> rusqlite::Result<()> {
    let rows: Vec<(i64, String, String, i64)> = tx
        .prepare_cached(
            "SELECT r.incident_id, r.channels, r.escalate_to, r.repeat_ms
             FROM incidents i CROSS JOIN routing r ON r.incident_id = i.id
             WHERE i.status = 'triggered' AND r.repeat_ms IS NOT NULL AND r.cycle = i.reopened
             ORDER BY r.id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    // Per incident and channel, the shortest period of the routes that page it.
    let mut every: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for (id, channels, escalate_to, period) in rows {
        for ch in json_list(&channels)
            .into_iter()
            .chain(json_list(&escalate_to))
        {
            let e = every.entry((id, ch)).or_insert(period);
            *e = (*e).min(period);
        }
    }
    let mut incident: Option<Incident> = None;
    for ((id, ch), period) in every {
        // Only where the trigger of this cycle went (and did not fail): never a lone
        // repeat.
        let last: Option<i64> = tx
            .prepare_cached(
                "SELECT max(o.created_ms) FROM outbox o, incidents i
                 WHERE i.id = ?1 AND o.incident_id = i.id AND o.channel = ?2 AND o.id > i.outbox_mark
                   AND o.kind IN ('trigger', 'repeat')
                   AND EXISTS (SELECT 1 FROM outbox t WHERE t.incident_id = ?1 AND t.channel = ?2
                               AND t.kind = 'trigger' AND t.status != 'failed' AND t.id > i.outbox_mark)",
            )?
            .query_row(params![id, ch], |r| r.get(0))
            .optional()?
            .flatten();
        let Some(last) = last else { continue };
        if now - last < period || !router.has_channel(&ch) {
            continue;
        }
        if incident.as_ref().is_none_or(|i| i.id != id) {
            incident = Some(load_incident(tx, id)?);
        }
        let Some(i) = incident.as_ref() else { continue };
        if muted(silences, i, now) {
            continue;
        }
        let every = tocsin_agent::settings::format_duration(std::time::Duration::from_millis(
            u64::try_from(period).unwrap_or(0),
        ));
        let storm = router.storm(&ch);
        if let Some(storm) = storm
            && !admit(tx, storm, &ch, now, Kind::Repeat)?
        {
            // Recorded as a held repeat, so the next one is due a period later.
            insert(
                tx,
                i,
                &ch,
                REPEAT,
                "held",
                &crate::notify::payload::render(REPEAT, i, now),
                &format!("{}-repeat-{now}", i.dedup_key),
                now,
            )?;
            timeline(
                tx,
                id,
                now,
                "storm",
                "aggregator",
                &format!(
                    "repeat to {ch} held by the storm guard ({} per {} spent)",
                    storm.budget,
                    tocsin_agent::settings::format_duration(storm.window)
                ),
            )?;
            continue;
        }
        insert(
            tx,
            i,
            &ch,
            REPEAT,
            "pending",
            &crate::notify::payload::render(REPEAT, i, now),
            &format!("{}-repeat-{now}", i.dedup_key),
            now,
        )?;
        timeline(
            tx,
            id,
            now,
            "repeat",
            "aggregator",
            &format!("still open and unacknowledged: repeated to {ch} (every {every})"),
        )?;
        out.repeats += 1;
        out.notifications += 1;
    }
    Ok(())
}

/// An outbox row with its own status and idempotency key (repeats and summaries: each
/// one is a new message, unlike trigger/acknowledge/resolve).
#[expect(clippy::too_many_arguments, reason = "one column each")]
fn insert(
    conn: &Connection,
    incident: &Incident,
    channel: &str,
    kind: &str,
    status: &str,
    payload: &str,
    key: &str,
    now: i64,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO outbox (incident_id, channel, kind, status, attempts, payload, created_ms, next_attempt_ms,
             idempotency_key)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?6, ?7)",
    )?
    .execute(params![incident.id, channel, kind, status, payload, now, key])?;
    Ok(conn.last_insert_rowid())
}

/// One held trigger, as a summary lists it.
struct Held {
    id: i64,
    severity: String,
    status: String,
    node: String,
    check: String,
}

fn summarise(
    tx: &Connection,
    router: &Router,
    install_id: &str,
    now: i64,
    out: &mut SweepOutcome,
) -> rusqlite::Result<()> {
    let windows: Vec<(String, i64, i64)> = tx
        .prepare_cached(
            "SELECT channel, window_end_ms, min(held_ms) FROM storm_held
             WHERE summary_id IS NULL AND window_end_ms <= ?1
             GROUP BY channel, window_end_ms ORDER BY window_end_ms, channel",
        )?
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (channel, window_end, first_held) in windows {
        let held: Vec<Held> = tx
            .prepare_cached(
                "SELECT h.incident_id, h.severity, i.status, i.node, i.check_name
                 FROM storm_held h JOIN incidents i ON i.id = h.incident_id
                 WHERE h.channel = ?1 AND h.window_end_ms = ?2 AND h.summary_id IS NULL
                 ORDER BY h.id",
            )?
            .query_map(params![channel, window_end], |r| {
                Ok(Held {
                    id: r.get(0)?,
                    severity: r.get(1)?,
                    status: r.get(2)?,
                    node: r.get(3)?,
                    check: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let Some(first) = held.first() else { continue };
        let summary_id = if router.has_channel(&channel) {
            let first = load_incident(tx, first.id)?;
            let (text, payload) = summary(
                &channel,
                router.storm(&channel),
                &held,
                &first,
                first_held,
                window_end,
                install_id,
                now,
            );
            let id = insert(
                tx,
                &first,
                &channel,
                STORM_SUMMARY,
                "pending",
                &payload,
                &format!("tocsin-{install_id}-storm-{channel}-{window_end}"),
                now,
            )?;
            for h in &held {
                timeline(
                    tx,
                    h.id,
                    now,
                    "storm",
                    "aggregator",
                    &format!("counted in the storm summary to {channel}: {text}"),
                )?;
            }
            out.summaries += 1;
            out.notifications += 1;
            id
        } else {
            // The channel left the config: nothing to send, nothing left to owe.
            0
        };
        tx.prepare_cached(
            "UPDATE storm_held SET summary_id = ?3
             WHERE channel = ?1 AND window_end_ms = ?2 AND summary_id IS NULL",
        )?
        .execute(params![channel, window_end, summary_id])?;
    }
    Ok(())
}

/// The summary's one-line text and its JSON payload. When every held incident resolved
/// by the window's end the text says "N incidents held, all resolved", `all_resolved` is
/// true and the `incident` is `resolved`/`ok`: a PagerDuty channel then sends nothing
/// (an alert nothing would ever resolve), see `notify`. The payload carries an `incident`
/// object shaped like a trigger's (id of the first held incident, worst severity, the
/// text as `summary`), so every channel format renders it, plus a `storm` object:
///
/// ```json
/// {"version":"1","event":"storm_summary","dedup_key":"tocsin-ab12cd34-storm-ops-1705277100000",
///  "storm":{"channel":"ops","held":37,"open":30,"by_severity":{"P2":20,"P3":17},
///           "window_start":"…","window_end":"…","incidents":[12,13,…],"all_resolved":false},
///  "incident":{"id":12,"severity":"P2","check":"storm_summary","summary":"+37 more incidents: …",…}}
/// ```
#[expect(clippy::too_many_arguments, reason = "the parts of one message")]
fn summary(
    channel: &str,
    storm: Option<Storm>,
    held: &[Held],
    first: &Incident,
    first_held: i64,
    window_end: i64,
    install_id: &str,
    now: i64,
) -> (String, String) {
    let mut by_severity: BTreeMap<&str, usize> = BTreeMap::new();
    for h in held {
        *by_severity.entry(h.severity.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = by_severity
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let open: Vec<&Held> = held.iter().filter(|h| h.status != "resolved").collect();
    let listed: Vec<String> = open
        .iter()
        .take(SUMMARY_LISTED)
        .map(|h| format!("#{} {} {}", h.id, h.node, h.check))
        .collect();
    let window_start = storm.map_or(first_held, |s| window_end - s.window_ms());
    let mut text = if open.is_empty() {
        format!(
            "{} incident{} held, all resolved: {}",
            held.len(),
            if held.len() == 1 { "" } else { "s" },
            counts.join(", ")
        )
    } else {
        format!(
            "+{} more incidents: {}; {} still open",
            held.len(),
            counts.join(", "),
            open.len()
        )
    };
    if !listed.is_empty() {
        text.push_str(&format!(": {}", listed.join(", ")));
        if open.len() > listed.len() {
            text.push_str(&format!(", … {} more", open.len() - listed.len()));
        }
    }
    if let Some(s) = storm {
        text.push_str(&format!(
            " (storm guard on {channel}: {} triggers per {})",
            s.budget,
            tocsin_agent::settings::format_duration(s.window)
        ));
    }
    let worst = by_severity
        .keys()
        .filter_map(|s| Severity::parse(s))
        .min()
        .unwrap_or(Severity::P4);
    let payload = json!({
        "version": crate::notify::payload::PAYLOAD_VERSION,
        "event": STORM_SUMMARY,
        "dedup_key": format!("tocsin-{install_id}-storm-{channel}-{window_end}"),
        "created_at": rfc3339(now),
        "storm": {
            "channel": channel,
            "held": held.len(),
            "open": open.len(),
            "by_severity": by_severity,
            "window_start": rfc3339(window_start),
            "window_end": rfc3339(window_end),
            "incidents": held.iter().map(|h| h.id).collect::<Vec<_>>(),
            "all_resolved": open.is_empty(),
        },
        "incident": {
            "id": first.id,
            "status": if open.is_empty() { "resolved" } else { "triggered" },
            "severity": worst.as_str(),
            "node": "",
            "check": STORM_SUMMARY,
            "state": if open.is_empty() { "ok" } else { "critical" },
            "summary": text,
            "labels": {},
            "fingerprint": "",
            "triggered_at": rfc3339(window_start),
        }
    })
    .to_string();
    (text, payload)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::Store;
    use crate::model::{AgentHello, Event, Severity, State, now_ms};
    use crate::route::{ResponseTarget, Route, Router, Routing, Storm};

    const MIN: i64 = 60_000;

    fn hello() -> AgentHello {
        AgentHello {
            agent_id: "a".into(),
            hostname: "a".into(),
            labels: BTreeMap::from([("service".to_owned(), "web".to_owned())]),
            version: "test".into(),
            boot_id: String::new(),
            instance_id: "i1".into(),
            heartbeat_interval_ms: 1000,
        }
    }

    fn event(seq: u64, check: &str, state: State, flapping: bool) -> Event {
        Event {
            seq,
            check: check.into(),
            labels: BTreeMap::new(),
            state,
            previous: State::Ok,
            value: Some(0.0),
            unit: "count".into(),
            threshold: Some(1.0),
            message: format!("{check} {}", state.as_str()),
            observed_at_ms: 1,
            breach_started_at_ms: 1,
            flapping,
        }
    }

    fn route(channels: &[&str], escalate_to: &[&str], repeat: Option<Duration>) -> Route {
        Route {
            name: "r".into(),
            severities: Vec::new(),
            matchers: Vec::new(),
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            escalate_to: escalate_to.iter().map(|c| (*c).to_owned()).collect(),
            repeat_interval: repeat,
            continue_matching: false,
            remediate: None,
        }
    }

    fn store(channels: &[&str], routing: Routing) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let mut s = Store::open(dir.path(), channels.clone()).expect("open");
        s.set_router(Router { channels, routing });
        s.hello(&hello(), 1).expect("hello");
        (dir, s)
    }

    /// `(channel, kind, status)` of incident `id`'s outbox rows, in order.
    fn outbox(s: &Store, id: i64) -> Vec<(String, String, String)> {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .notifications
            .into_iter()
            .map(|n| (n.channel, n.kind, n.status))
            .collect()
    }

    fn row(channel: &str, kind: &str, status: &str) -> (String, String, String) {
        (channel.into(), kind.into(), status.into())
    }

    fn timeline_count(s: &Store, id: i64, kind: &str) -> usize {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .timeline
            .iter()
            .filter(|t| t.kind == kind)
            .count()
    }

    #[test]
    fn storm_guard_holds_beyond_the_budget_and_summarises_once_when_the_window_turns() {
        let routing = Routing {
            storm: BTreeMap::from([(
                "a".to_owned(),
                Storm {
                    budget: 2,
                    window: Duration::from_secs(3600),
                },
            )]),
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a", "b"], routing);
        let batch: Vec<Event> = (1..=5)
            .map(|i| event(i, &format!("c{i}"), State::Critical, false))
            .collect();
        let out = s.ingest("a", &batch).expect("ingest");
        assert_eq!(out.notifications, 2 + 5, "a: its budget of 2; b: unlimited");
        let ids = out.opened;
        assert_eq!(
            outbox(&s, ids[0]),
            [
                row("a", "trigger", "pending"),
                row("b", "trigger", "pending")
            ]
        );
        assert_eq!(outbox(&s, ids[2]), [row("b", "trigger", "pending")]);
        assert_eq!(timeline_count(&s, ids[2], "storm"), 1);
        let now = now_ms();
        assert_eq!(
            s.sweep_paging(now).expect("sweep").summaries,
            0,
            "window still open"
        );
        let turned = s.sweep_paging(now + 2 * 3_600_000).expect("sweep");
        assert_eq!((turned.summaries, turned.notifications), (1, 1));
        assert_eq!(
            s.sweep_paging(now + 3 * 3_600_000)
                .expect("sweep")
                .summaries,
            0,
            "one summary per window"
        );
        let summary = s
            .incident(ids[2])
            .expect("read")
            .expect("exists")
            .notifications
            .into_iter()
            .find(|n| n.kind == super::STORM_SUMMARY)
            .expect("the summary rides on the first held incident");
        let p: serde_json::Value = serde_json::from_str(&summary.payload).expect("json");
        assert_eq!(p["storm"]["held"], 3);
        assert!(
            p["incident"]["summary"]
                .as_str()
                .is_some_and(|t| t.starts_with("+3 more incidents: 3 P2; 3 still open")),
            "{p}"
        );
        // Resolves go where the triggers went: a for the first two only.
        let clear: Vec<Event> = (6..=10)
            .map(|i| event(i, &format!("c{}", i - 5), State::Ok, false))
            .collect();
        let resolved = s.ingest("a", &clear).expect("clear");
        assert_eq!(resolved.notifications, 2 + 5);
        assert!(
            !outbox(&s, ids[3])
                .iter()
                .any(|(ch, kind, _)| ch == "a" && kind == "resolve")
        );
    }

    fn storm(budget: u32, window: Duration) -> BTreeMap<String, Storm> {
        BTreeMap::from([("a".to_owned(), Storm { budget, window })])
    }

    /// Regression: the storm guard held P1 triggers like any other. A P1 is never held;
    /// it still spends the budget.
    #[test]
    fn the_storm_guard_never_holds_a_p1_but_counts_it() {
        let routing = Routing {
            storm: storm(1, Duration::from_secs(86_400)),
            ..Routing::default()
        };
        let (dir, s) = store(&["a"], routing.clone());
        drop(s);
        let correlation = crate::correlate::Correlation {
            severity: vec![crate::correlate::SeverityRule {
                matchers: vec![crate::silence::Matcher::parse("check=boom").expect("m")],
                level: Severity::P1,
            }],
            ..crate::correlate::Correlation::default()
        };
        let mut s = Store::open(dir.path(), vec!["a".into()])
            .expect("open")
            .with_correlation(correlation);
        s.set_router(Router {
            channels: vec!["a".into()],
            routing,
        });
        s.hello(&hello(), 1).expect("hello");
        let out = s
            .ingest(
                "a",
                &[
                    event(1, "c1", State::Critical, false),
                    event(2, "c2", State::Critical, false),
                    event(3, "boom", State::Critical, false),
                    event(4, "c3", State::Critical, false),
                ],
            )
            .expect("ingest");
        let ids = out.opened;
        assert_eq!(
            ids.iter()
                .map(|id| channels_of(&s, *id, "trigger").len())
                .collect::<Vec<_>>(),
            [1, 0, 1, 0],
            "c1 spends the budget; the P1 goes out anyway"
        );
        assert_eq!(timeline_count(&s, ids[2], "storm"), 0);
    }

    /// Regression: repeats spent the storm budget, so a repeat of an old incident could
    /// hold the trigger of a new one. Triggers count only triggers; repeats use what is
    /// left and are held first.
    #[test]
    fn repeats_never_take_the_budget_a_trigger_needs() {
        let routing = Routing {
            routes: vec![route(&["a"], &[], Some(Duration::from_secs(1)))],
            storm: storm(2, Duration::from_secs(86_400)),
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a"], routing);
        let first = s
            .ingest("a", &[event(1, "c1", State::Critical, false)])
            .expect("c1")
            .opened[0];
        let now = now_ms();
        assert_eq!(s.sweep_paging(now + 2_000).expect("sweep").repeats, 1);
        let second = s
            .ingest("a", &[event(2, "c2", State::Critical, false)])
            .expect("c2")
            .opened[0];
        assert_eq!(
            channels_of(&s, second, "trigger"),
            ["a"],
            "the repeat did not take the trigger's place"
        );
        assert_eq!(
            s.sweep_paging(now + 4_000).expect("sweep").repeats,
            0,
            "the budget is spent: repeats are held"
        );
        let third = s
            .ingest("a", &[event(3, "c3", State::Critical, false)])
            .expect("c3")
            .opened[0];
        assert!(channels_of(&s, third, "trigger").is_empty(), "held");
        assert_eq!(timeline_count(&s, first, "storm"), 1, "its repeat held");
    }

    /// A storm window whose held incidents all resolved is summarised as such (and
    /// flagged, so PagerDuty is sent nothing): no alert that nothing resolves.
    #[test]
    fn a_storm_summary_of_incidents_that_all_resolved_says_so() {
        let routing = Routing {
            storm: storm(1, Duration::from_secs(3600)),
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a"], routing);
        let out = s
            .ingest(
                "a",
                &[
                    event(1, "c1", State::Critical, false),
                    event(2, "c2", State::Critical, false),
                ],
            )
            .expect("fires");
        let held = out.opened[1];
        s.ingest(
            "a",
            &[
                event(3, "c1", State::Ok, false),
                event(4, "c2", State::Ok, false),
            ],
        )
        .expect("clears");
        assert_eq!(
            s.sweep_paging(now_ms() + 2 * 3_600_000)
                .expect("sweep")
                .summaries,
            1
        );
        let summary = s
            .incident(held)
            .expect("read")
            .expect("exists")
            .notifications
            .into_iter()
            .find(|n| n.kind == super::STORM_SUMMARY)
            .expect("summary");
        let p: serde_json::Value = serde_json::from_str(&summary.payload).expect("json");
        assert_eq!(p["storm"]["all_resolved"], true, "{p}");
        assert_eq!(p["incident"]["status"], "resolved", "{p}");
        assert!(
            p["incident"]["summary"]
                .as_str()
                .is_some_and(|t| t.starts_with("1 incident held, all resolved")),
            "{p}"
        );
    }

    #[test]
    fn escalation_fires_once_past_the_target_and_never_after_an_acknowledge() {
        let routing = Routing {
            routes: vec![route(&["primary"], &["backup"], None)],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["primary", "backup"], routing);
        let late = s
            .ingest("a", &[event(1, "late", State::Critical, false)])
            .expect("ingest")
            .opened[0];
        let quick = s
            .ingest("a", &[event(2, "quick", State::Critical, false)])
            .expect("ingest")
            .opened[0];
        s.acknowledge(quick, "alice", "").expect("ack");
        let now = now_ms();
        assert!(
            s.sweep_paging(now + 29 * MIN)
                .expect("sweep")
                .escalated
                .is_empty(),
            "P2: 30m"
        );
        assert_eq!(
            s.sweep_paging(now + 31 * MIN).expect("sweep").escalated,
            [late]
        );
        assert!(
            s.sweep_paging(now + 32 * MIN)
                .expect("sweep")
                .escalated
                .is_empty()
        );
        assert_eq!(
            outbox(&s, late),
            [
                row("primary", "trigger", "pending"),
                row("backup", "trigger", "pending")
            ]
        );
        assert_eq!(timeline_count(&s, quick, "escalated"), 0);
        s.acknowledge(late, "bob", "").expect("ack");
        let acks: Vec<String> = outbox(&s, late)
            .into_iter()
            .filter(|(_, kind, _)| kind == "acknowledge")
            .map(|(ch, _, _)| ch)
            .collect();
        assert_eq!(acks, ["primary", "backup"]);
    }

    /// Regression: the response target counted from the trigger, so a page released
    /// after a 2 h silence escalated at the next sweep, giving the primary no time.
    #[test]
    fn escalation_counts_from_when_the_route_paged_not_from_the_trigger() {
        let routing = Routing {
            routes: vec![route(&["primary"], &["backup"], None)],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["primary", "backup"], routing);
        let t0 = now_ms();
        let m = crate::silence::Matcher::parse("check=c").expect("matcher");
        s.add_silence(vec![m], t0 - 1000, t0 + 120 * MIN, "alice", "maintenance")
            .expect("silence");
        let id = s
            .ingest("a", &[event(1, "c", State::Critical, false)])
            .expect("ingest")
            .opened[0];
        assert!(outbox(&s, id).is_empty(), "silenced");
        let released = t0 + 121 * MIN;
        assert_eq!(s.release_held(released).expect("release"), 1);
        assert!(
            s.sweep_paging(released + MIN)
                .expect("sweep")
                .escalated
                .is_empty(),
            "the primary has its 30 minutes from the page"
        );
        assert!(
            s.sweep_paging(released + 29 * MIN)
                .expect("sweep")
                .escalated
                .is_empty()
        );
        assert_eq!(
            s.sweep_paging(released + 30 * MIN)
                .expect("sweep")
                .escalated,
            [id]
        );
        assert_eq!(channels_of(&s, id, "trigger"), ["primary", "backup"]);
    }

    fn by_severity(name: &str, severities: &[Severity], channels: &[&str]) -> Route {
        Route {
            name: name.into(),
            severities: severities.to_vec(),
            ..route(channels, &[], None)
        }
    }

    /// Regression: an incident whose severity rose after it was paged (P3 → P2 here;
    /// P2 → P1 when half a service goes critical) was never sent to the routes of the
    /// new severity — routes were planned once, at the first page.
    #[test]
    fn a_severity_that_rises_pages_the_routes_of_the_new_severity_once() {
        let mut urgent = by_severity("urgent", &[Severity::P1, Severity::P2], &["war"]);
        urgent.escalate_to = vec!["backup".into()];
        let routing = Routing {
            routes: vec![
                urgent,
                by_severity("rest", &[Severity::P3, Severity::P4], &["tickets"]),
            ],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["war", "tickets", "backup"], routing);
        let id = s
            .ingest("a", &[event(1, "c", State::Warning, false)])
            .expect("warning")
            .opened[0];
        assert_eq!(channels_of(&s, id, "trigger"), ["tickets"]);
        let rose = s
            .ingest("a", &[event(2, "c", State::Critical, false)])
            .expect("critical");
        assert_eq!(rose.notifications, 1, "the new route's channel");
        assert_eq!(channels_of(&s, id, "trigger"), ["tickets", "war"]);
        let d = s.incident(id).expect("read").expect("exists");
        let note = d
            .timeline
            .iter()
            .find(|t| t.kind == "rerouted")
            .expect("rerouted")
            .note
            .clone();
        assert!(
            note.starts_with("now P2 (was P3): route urgent → paged war"),
            "{note}"
        );
        // Down and up again: nothing is un-paged, nothing is paged twice.
        s.ingest("a", &[event(3, "c", State::Warning, false)])
            .expect("warning again");
        s.ingest("a", &[event(4, "c", State::Critical, false)])
            .expect("critical again");
        assert_eq!(channels_of(&s, id, "trigger"), ["tickets", "war"]);
        // The new route escalates, its 30 minutes counting from its page.
        let now = now_ms();
        assert_eq!(
            s.sweep_paging(now + 31 * MIN).expect("sweep").escalated,
            [id]
        );
        s.acknowledge(id, "alice", "").expect("ack");
        assert_eq!(
            channels_of(&s, id, "acknowledge"),
            ["tickets", "war", "backup"]
        );
    }

    /// An incident held by a silence on its old severity is paged as soon as its
    /// severity rises out of the silence, at the new severity's routes.
    #[test]
    fn a_silenced_incident_whose_severity_rises_out_of_the_silence_pages_at_once() {
        let routing = Routing {
            routes: vec![
                by_severity("urgent", &[Severity::P1, Severity::P2], &["war"]),
                by_severity("rest", &[Severity::P3, Severity::P4], &["tickets"]),
            ],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["war", "tickets"], routing);
        let t0 = now_ms();
        let m = crate::silence::Matcher::parse("severity=P3").expect("matcher");
        s.add_silence(vec![m], t0 - 1000, t0 + 60 * MIN, "alice", "noise")
            .expect("silence");
        let id = s
            .ingest("a", &[event(1, "c", State::Warning, false)])
            .expect("warning")
            .opened[0];
        assert!(outbox(&s, id).is_empty(), "silenced");
        let rose = s
            .ingest("a", &[event(2, "c", State::Critical, false)])
            .expect("critical");
        assert_eq!(rose.notifications, 1);
        assert_eq!(channels_of(&s, id, "trigger"), ["war"]);
    }

    /// Without any `[[route]]` every channel had the trigger: a rise sends nothing.
    #[test]
    fn without_routes_a_severity_rise_sends_nothing_more() {
        let (_dir, mut s) = store(&["a", "b"], Routing::default());
        let id = s
            .ingest("a", &[event(1, "c", State::Warning, false)])
            .expect("warning")
            .opened[0];
        let rose = s
            .ingest("a", &[event(2, "c", State::Critical, false)])
            .expect("critical");
        assert_eq!(rose.notifications, 0);
        assert_eq!(channels_of(&s, id, "trigger"), ["a", "b"]);
        assert_eq!(timeline_count(&s, id, "rerouted"), 0);
    }

    #[test]
    fn next_business_day_target_escalates_at_nine_on_the_next_weekday() {
        let mut routing = Routing {
            routes: vec![route(&["primary"], &["backup"], None)],
            ..Routing::default()
        };
        routing.targets.by_severity[2] = ResponseTarget::NextBusinessDay;
        routing.targets.utc_offset_s = 8 * 3600;
        let (_dir, mut s) = store(&["primary", "backup"], routing.clone());
        let id = s
            .ingest("a", &[event(1, "minor", State::Warning, false)])
            .expect("ingest")
            .opened[0];
        let triggered = s
            .incident(id)
            .expect("read")
            .expect("exists")
            .incident
            .triggered_at_ms;
        let due = crate::route::next_business_day(triggered, 8 * 3600);
        assert!(s.sweep_paging(due - 1).expect("sweep").escalated.is_empty());
        assert_eq!(s.sweep_paging(due).expect("sweep").escalated, [id]);
        let note = s
            .incident(id)
            .expect("read")
            .expect("exists")
            .timeline
            .into_iter()
            .find(|t| t.kind == "escalated")
            .expect("escalated")
            .note;
        assert!(
            note.contains("P3 response target (next-business-day"),
            "{note}"
        );
    }

    #[test]
    fn repeats_follow_the_interval_and_stop_at_the_acknowledge() {
        let routing = Routing {
            routes: vec![route(&["a"], &[], Some(Duration::from_secs(600)))],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a", "b"], routing);
        let id = s
            .ingest("a", &[event(1, "c", State::Critical, false)])
            .expect("ingest")
            .opened[0];
        let now = now_ms();
        assert_eq!(s.sweep_paging(now + 5 * MIN).expect("sweep").repeats, 0);
        assert_eq!(s.sweep_paging(now + 11 * MIN).expect("sweep").repeats, 1);
        assert_eq!(s.sweep_paging(now + 12 * MIN).expect("sweep").repeats, 0);
        assert_eq!(s.sweep_paging(now + 22 * MIN).expect("sweep").repeats, 1);
        s.acknowledge(id, "alice", "").expect("ack");
        assert_eq!(s.sweep_paging(now + 60 * MIN).expect("sweep").repeats, 0);
        let kinds: Vec<(String, String, String)> = outbox(&s, id);
        assert_eq!(
            kinds,
            [
                row("a", "trigger", "pending"),
                row("a", "repeat", "pending"),
                row("a", "repeat", "pending"),
                row("a", "acknowledge", "pending"),
            ],
            "b is on no route: nothing"
        );
    }

    fn channels_of(s: &Store, id: i64, kind: &str) -> Vec<String> {
        outbox(s, id)
            .into_iter()
            .filter(|(_, k, _)| k == kind)
            .map(|(ch, _, _)| ch)
            .collect()
    }

    /// A reopened incident is a new paging cycle: routed and paged again, repeated and
    /// escalated again (the first cycle's `escalated` entry and triggers do not count),
    /// and its acknowledge goes only to the channels paged in the new cycle.
    #[test]
    fn a_reopened_incident_is_routed_paged_repeated_and_escalated_again() {
        let routing = Routing {
            routes: vec![route(
                &["primary"],
                &["backup"],
                Some(Duration::from_secs(600)),
            )],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["primary", "backup"], routing);
        let id = s
            .ingest("a", &[event(1, "c", State::Critical, false)])
            .expect("fires")
            .opened[0];
        let t0 = now_ms();
        assert_eq!(
            s.sweep_paging(t0 + 31 * MIN).expect("sweep").escalated,
            [id]
        );
        let resolved = s
            .ingest("a", &[event(2, "c", State::Ok, false)])
            .expect("clears");
        assert_eq!(resolved.resolved, [id]);
        assert_eq!(channels_of(&s, id, "resolve"), ["primary", "backup"]);

        // Fires again within the re-open window: same incident, a new cycle.
        let again = s
            .ingest("a", &[event(3, "c", State::Critical, false)])
            .expect("fires again");
        assert_eq!((again.opened.clone(), again.notifications), (vec![id], 1));
        assert_eq!(timeline_count(&s, id, "routed"), 2);
        assert_eq!(
            channels_of(&s, id, "trigger"),
            ["primary", "backup", "primary"]
        );
        let t1 = now_ms();
        let early = s.sweep_paging(t1 + 11 * MIN).expect("sweep");
        assert!(early.escalated.is_empty(), "P2: 30 min from the reopen");
        assert_eq!(
            early.repeats, 1,
            "the new trigger's repeat, to primary only"
        );
        assert_eq!(
            s.sweep_paging(t1 + 31 * MIN).expect("sweep").escalated,
            [id],
            "escalates again in the new cycle"
        );
        assert!(
            s.sweep_paging(t1 + 32 * MIN)
                .expect("sweep")
                .escalated
                .is_empty()
        );
        assert_eq!(timeline_count(&s, id, "escalated"), 2);
        assert_eq!(
            channels_of(&s, id, "trigger"),
            ["primary", "backup", "primary", "backup"]
        );
        s.acknowledge(id, "alice", "").expect("ack");
        assert_eq!(channels_of(&s, id, "acknowledge"), ["primary", "backup"]);
    }

    /// A reopened incident acknowledged before its response target is not escalated
    /// again, and its acknowledge and resolve go only where this cycle's trigger went —
    /// not to the backup that the first cycle escalated to.
    #[test]
    fn a_reopened_incident_notifies_only_the_channels_of_its_new_cycle() {
        let routing = Routing {
            routes: vec![route(&["primary"], &["backup"], None)],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["primary", "backup"], routing);
        let id = s
            .ingest("a", &[event(1, "c", State::Critical, false)])
            .expect("fires")
            .opened[0];
        let t0 = now_ms();
        assert_eq!(
            s.sweep_paging(t0 + 31 * MIN).expect("sweep").escalated,
            [id]
        );
        s.ingest("a", &[event(2, "c", State::Ok, false)])
            .expect("clears");
        s.ingest("a", &[event(3, "c", State::Critical, false)])
            .expect("fires again");
        s.acknowledge(id, "alice", "").expect("ack");
        assert!(
            s.sweep_paging(t0 + 60 * MIN)
                .expect("sweep")
                .escalated
                .is_empty(),
            "acknowledged"
        );
        s.ingest("a", &[event(4, "c", State::Ok, false)])
            .expect("clears again");
        assert_eq!(channels_of(&s, id, "acknowledge"), ["primary"]);
        assert_eq!(
            channels_of(&s, id, "resolve"),
            ["primary", "backup", "primary"]
        );
    }

    /// A trigger held by the storm guard in one cycle does not count as this channel's
    /// page of the next: a reopened incident meets the guard again (held again while the
    /// budget is spent), and is not silently skipped.
    #[test]
    fn a_storm_hold_belongs_to_its_cycle() {
        let routing = Routing {
            storm: BTreeMap::from([(
                "a".to_owned(),
                Storm {
                    budget: 1,
                    window: Duration::from_secs(3600),
                },
            )]),
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a"], routing);
        let out = s
            .ingest(
                "a",
                &[
                    event(1, "first", State::Critical, false),
                    event(2, "second", State::Critical, false),
                ],
            )
            .expect("fires");
        let held = out.opened[1];
        assert_eq!(timeline_count(&s, held, "storm"), 1);
        s.ingest("a", &[event(3, "second", State::Ok, false)])
            .expect("clears");
        let again = s
            .ingest("a", &[event(4, "second", State::Critical, false)])
            .expect("fires again");
        assert_eq!(again.opened, [held]);
        assert_eq!(
            timeline_count(&s, held, "routed"),
            0,
            "no [[route]]: no note"
        );
        assert_eq!(
            timeline_count(&s, held, "storm"),
            2,
            "held again in the new cycle, not skipped"
        );
        let summary = s.sweep_paging(now_ms() + 2 * 3_600_000).expect("sweep");
        assert_eq!(summary.summaries, 1);
    }

    /// Regression: an incident paged to no channel (a route with `channels = []`) had no
    /// trigger row, so the flapping hold took it for never paged and paged it again at
    /// every event.
    #[test]
    fn an_incident_routed_to_no_channel_is_paged_once() {
        let routing = Routing {
            routes: vec![route(&[], &[], None)],
            ..Routing::default()
        };
        let (_dir, mut s) = store(&["a"], routing);
        let id = s
            .ingest("a", &[event(1, "f", State::Critical, true)])
            .expect("flapping")
            .opened[0];
        s.ingest("a", &[event(2, "f", State::Critical, false)])
            .expect("settled");
        s.ingest("a", &[event(3, "f", State::Warning, false)])
            .expect("again");
        s.ingest("a", &[event(4, "f", State::Critical, false)])
            .expect("again");
        assert_eq!(timeline_count(&s, id, "routed"), 1);
        assert_eq!(
            timeline_count(&s, id, "flapping"),
            2,
            "held, then paged once"
        );
        assert!(outbox(&s, id).is_empty());
    }
}
