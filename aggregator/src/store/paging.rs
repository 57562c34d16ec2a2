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
//! - escalations are the `escalated` timeline entry (written once, in the same
//!   transaction as the escalation triggers); repeats are `repeat` outbox rows (the next
//!   one is due a period after the last).
//!
//! The invariant holds for everything here: acknowledge and resolve go to a channel iff
//! it was sent the trigger (`notify_triggered` reads `trigger` outbox rows). Escalation
//! triggers are `trigger` rows; held triggers, repeats and summaries are not.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use super::{Store, StoreError, enqueue, load_incident, timeline};
use crate::model::{Incident, Severity, rfc3339};
use crate::route::{Router, Storm};

/// Tables and indexes of paging; idempotent, run at every open after the main schema.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS routing (
    id          INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    route       TEXT NOT NULL,
    channels    TEXT NOT NULL,
    escalate_to TEXT NOT NULL,
    repeat_ms   INTEGER,
    routed_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS routing_incident ON routing (incident_id);

CREATE TABLE IF NOT EXISTS storm_held (
    id            INTEGER PRIMARY KEY,
    channel       TEXT NOT NULL,
    incident_id   INTEGER NOT NULL REFERENCES incidents (id),
    severity      TEXT NOT NULL,
    held_ms       INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    summary_id    INTEGER
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
    let plans = router.plan(&fields, incident.severity);
    let mut channels: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for p in &plans {
        conn.prepare_cached(
            "INSERT INTO routing (incident_id, route, channels, escalate_to, repeat_ms, routed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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
                incident.severity.as_str(),
                router.routing.targets.describe(incident.severity)
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
    if !router.routing.routes.is_empty() {
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
        if send_trigger(conn, router, &incident, ch, now)? {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Whether incident `id` was paged under routing (it has a `routing` row), even if no
/// trigger went out (a route without channels, every trigger held by the storm guard).
pub(super) fn routed(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM routing WHERE incident_id = ?1)")?
        .query_row([id], |r| r.get(0))
}

/// Queues the trigger of `incident` to `channel` unless the channel already has it
/// (sent or held) or the channel is gone from the config; holds it when the channel's
/// storm budget is spent. `true` when a trigger was queued.
fn send_trigger(
    conn: &Connection,
    router: &Router,
    incident: &Incident,
    channel: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    if !router.has_channel(channel) || has_page(conn, incident.id, channel)? {
        return Ok(false);
    }
    if let Some(storm) = router.storm(channel)
        && !admit(conn, storm, channel, now)?
    {
        let window_end = storm.window_start(now) + storm.window_ms();
        conn.prepare_cached(
            "INSERT INTO storm_held (channel, incident_id, severity, held_ms, window_end_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
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
        return Ok(false);
    }
    enqueue(conn, incident, channel, "trigger", now)?;
    Ok(true)
}

/// Whether `channel` already has the trigger of incident `id`, queued, sent, failed or
/// held by the storm guard: it never gets a second one.
fn has_page(conn: &Connection, id: i64, channel: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE incident_id = ?1 AND channel = ?2 AND kind = 'trigger')
             OR EXISTS (SELECT 1 FROM storm_held WHERE incident_id = ?1 AND channel = ?2)",
    )?
    .query_row(params![id, channel], |r| r.get(0))
}

/// Whether one more trigger or repeat fits in `channel`'s budget for the window of `now`.
fn admit(conn: &Connection, storm: Storm, channel: &str, now: i64) -> rusqlite::Result<bool> {
    let used: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM outbox
             WHERE channel = ?1 AND created_ms >= ?2 AND kind IN ('trigger', 'repeat') AND status != 'held'",
        )?
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
    /// unacknowledged past their severity's response target (measured from
    /// `triggered_at`; once per incident, so a restart never escalates twice), queues the
    /// repeats that are due, and sends a summary for every channel whose storm window
    /// ended with held triggers. Run by [`crate::escalate::Sweep`].
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
    let due: Vec<i64> = tx
        .prepare_cached(
            "SELECT i.id FROM incidents i
             WHERE i.status = 'triggered'
               AND EXISTS (SELECT 1 FROM routing r WHERE r.incident_id = i.id AND r.escalate_to != '[]')
               AND NOT EXISTS (SELECT 1 FROM timeline t WHERE t.incident_id = i.id AND t.kind = 'escalated')",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in due {
        let incident = load_incident(tx, id)?;
        let targets = &router.routing.targets;
        let deadline = targets.deadline(incident.severity, incident.triggered_at_ms);
        // A silence mutes escalation as it mutes the page: it goes out when it ends.
        if now < deadline || muted(silences, &incident, now) {
            continue;
        }
        let mut to: Vec<String> = Vec::new();
        let rows: Vec<String> = tx
            .prepare_cached("SELECT escalate_to FROM routing WHERE incident_id = ?1 ORDER BY id")?
            .query_map([id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for ch in rows.iter().flat_map(|r| json_list(r)) {
            if !to.contains(&ch) {
                to.push(ch);
            }
        }
        let mut paged = Vec::new();
        for ch in &to {
            if send_trigger(tx, router, &incident, ch, now)? {
                paged.push(ch.as_str());
                out.notifications += 1;
            }
        }
        let what = if paged.is_empty() {
            "every escalation channel already has the page or holds it".to_owned()
        } else {
            format!("paging {}", paged.join(", "))
        };
        timeline(
            tx,
            id,
            now,
            "escalated",
            "aggregator",
            &format!(
                "unacknowledged past the {} response target ({}, due {}): {what}",
                incident.severity.as_str(),
                targets.describe(incident.severity),
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
            "SELECT r.incident_id, r.channels, r.escalate_to, r.repeat_ms FROM routing r
             JOIN incidents i ON i.id = r.incident_id
             WHERE r.repeat_ms IS NOT NULL AND i.status = 'triggered'
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
        // Only where the trigger went (and did not fail): never a lone repeat.
        let last: Option<i64> = tx
            .prepare_cached(
                "SELECT max(created_ms) FROM outbox WHERE incident_id = ?1 AND channel = ?2
                   AND kind IN ('trigger', 'repeat')
                   AND EXISTS (SELECT 1 FROM outbox t WHERE t.incident_id = ?1 AND t.channel = ?2
                               AND t.kind = 'trigger' AND t.status != 'failed')",
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
            && !admit(tx, storm, &ch, now)?
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

/// The summary's one-line text and its JSON payload. The payload carries an `incident`
/// object shaped like a trigger's (id of the first held incident, worst severity, the
/// text as `summary`), so every channel format renders it, plus a `storm` object:
///
/// ```json
/// {"version":"1","event":"storm_summary","dedup_key":"tocsin-ab12cd34-storm-ops-1705277100000",
///  "storm":{"channel":"ops","held":37,"open":30,"by_severity":{"P2":20,"P3":17},
///           "window_start":"…","window_end":"…","incidents":[12,13,…]},
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
    let mut text = format!(
        "+{} more incidents: {}; {} still open",
        held.len(),
        counts.join(", "),
        open.len()
    );
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
        },
        "incident": {
            "id": first.id,
            "status": "triggered",
            "severity": worst.as_str(),
            "node": "",
            "check": STORM_SUMMARY,
            "state": "critical",
            "summary": text,
            "labels": {},
            "fingerprint": "",
            "triggered_at": rfc3339(window_start),
        }
    })
    .to_string();
    (text, payload)
}
