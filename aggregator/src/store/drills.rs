//! Drills in the store: the `drills` table (one row per `tocsin drill` run), the drill
//! mark on a node, and what a drill's scenario caused, read back for its report.
//!
//! **Drill mark**: a `drills` row that has not ended (`ended_ms` NULL) marks its node
//! until `until_ms`, the end of the drill's window (start + per scenario: duration, wait
//! and the agent's answer time, plus a margin). Every incident that opens from a marked
//! node — from its events, heartbeats or its liveness — gets the labels `drill=true`
//! (`kpi::DRILL_LABEL`) and `drill_id=<id>` ([`DRILL_ID_LABEL`]) on top of the node's
//! labels: it is paged as a drill (`route::DrillPaging`), its notifications say
//! `[DRILL]`, and the KPIs report it apart. The mark is kept apart from the node's own
//! labels (table `agents`), so a reconnecting agent's `Hello`, which replaces those,
//! does not end it; it ends with the drill (`drill_end`) or at `until_ms`.
//!
//! **Aggregator restarts**: a row still `running` when the aggregator starts belongs to
//! a run that died with the previous process ([`Store::drills_after_restart`] stamps it
//! `restarted_ms`). Its mark stays until `until_ms` — the agent may still inject the
//! fault, and its incidents are still drills — and then [`Store::drill_sweep`] ends it
//! as `interrupted`, with a report saying the aggregator restarted during the drill.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Store, StoreError};
use crate::kpi::DRILL_LABEL;
use crate::model::rfc3339;

/// Label naming the drill (`drills.id`) an incident belongs to, set with `drill=true`.
pub const DRILL_ID_LABEL: &str = "drill_id";

/// Status of a drill whose run died with the aggregator (see the module docs).
pub const INTERRUPTED: &str = "interrupted";

/// The `drills` table (columns added later are also in `schema::ADDED_COLUMNS`).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS drills (
    id          INTEGER PRIMARY KEY,
    node        TEXT NOT NULL,
    scenario    TEXT NOT NULL,
    started_by  TEXT NOT NULL,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    status      TEXT NOT NULL,
    report      TEXT,
    until_ms    INTEGER,
    page_real   INTEGER NOT NULL DEFAULT 0,
    restarted_ms INTEGER
);
CREATE INDEX IF NOT EXISTS drills_open ON drills (node) WHERE ended_ms IS NULL;
";

/// One row of `drills`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillRow {
    /// Drill id.
    pub id: i64,
    /// Agent id of the node.
    pub node: String,
    /// Scenario asked for (`process_crash`, …, `all`).
    pub scenario: String,
    /// Who started it (`by` of the API request).
    pub started_by: String,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms (`None` while running).
    pub ended_ms: Option<i64>,
    /// `running`, `passed`, `failed`, `refused` or `interrupted` (the aggregator
    /// restarted during the drill).
    pub status: String,
    /// The report (JSON of `drill::DrillReport`), once ended.
    pub report: Option<serde_json::Value>,
    /// End of the drill window, Unix ms: the mark lasts until then at most.
    pub until_ms: Option<i64>,
    /// Whether its incidents took the real routes at their real severity, P1 included
    /// (`--page-real`).
    pub page_real: bool,
    /// When an aggregator started while it was running (its run died), Unix ms.
    pub restarted_ms: Option<i64>,
}

/// What a scenario caused on its node, read from the store (all times Unix ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Observed {
    /// First firing event of the expected check stored from the node (`received_at_ms`);
    /// for `node_down`, when its incident opened (the liveness sweep detects it).
    pub detected_ms: Option<i64>,
    /// The drill-marked incident of the expected check opened in the window.
    pub incident_id: Option<i64>,
    /// Its severity (P1–P4).
    pub severity: Option<String>,
    /// Its summary.
    pub summary: Option<String>,
    /// When it opened.
    pub incident_ms: Option<i64>,
    /// First delivered trigger notification of it (`outbox.delivered_ms`).
    pub notified_ms: Option<i64>,
    /// Channel of that delivery.
    pub notified_channel: Option<String>,
    /// Trigger notifications queued for it (delivered or not).
    pub notifications: i64,
    /// First recovery hook run of it that started (`hook_runs.started_ms`).
    pub hook_ms: Option<i64>,
    /// That hook's name.
    pub hook: Option<String>,
    /// When it resolved.
    pub resolved_ms: Option<i64>,
}

const ROW_COLUMNS: &str =
    "id, node, scenario, started_by, started_ms, ended_ms, status, report, until_ms, page_real, restarted_ms";

fn drill_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DrillRow> {
    Ok(DrillRow {
        id: r.get(0)?,
        node: r.get(1)?,
        scenario: r.get(2)?,
        started_by: r.get(3)?,
        started_ms: r.get(4)?,
        ended_ms: r.get(5)?,
        status: r.get(6)?,
        report: r
            .get::<_, Option<String>>(7)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        until_ms: r.get(8)?,
        page_real: r.get(9)?,
        restarted_ms: r.get(10)?,
    })
}

/// The drill marking `node` at `now` (Unix ms), if any: the newest drill of the node not
/// ended whose window (`until_ms`) is still open.
pub(super) fn active_mark(conn: &Connection, node: &str, now: i64) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT id FROM drills WHERE node = ?1 AND ended_ms IS NULL AND until_ms > ?2
         ORDER BY id DESC LIMIT 1",
    )?
    .query_row(params![node, now], |r| r.get(0))
    .optional()
}

/// Adds the drill mark (`drill=true`, `drill_id=<id>`) to `labels`, the labels of
/// `node` an incident would take, when a drill marks the node at `now`.
pub(super) fn mark_labels(
    conn: &Connection,
    node: &str,
    now: i64,
    labels: &mut BTreeMap<String, String>,
) -> rusqlite::Result<()> {
    if let Some(id) = active_mark(conn, node, now)? {
        labels.insert(DRILL_LABEL.to_owned(), "true".to_owned());
        labels.insert(DRILL_ID_LABEL.to_owned(), id.to_string());
    }
    Ok(())
}

/// How an incident with `labels` is paged: not a drill (no `drill=true`); a drill that
/// pages real (its `drill_id` names a drill run with `--page-real`); else a drill (also
/// when `drill=true` comes without a known drill, e.g. from a node's own labels).
pub(super) fn paging_of(
    conn: &Connection,
    labels: &BTreeMap<String, String>,
) -> rusqlite::Result<crate::route::DrillPaging> {
    use crate::route::DrillPaging;
    if !crate::kpi::is_drill(labels) {
        return Ok(DrillPaging::Real);
    }
    let Some(id) = labels
        .get(DRILL_ID_LABEL)
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return Ok(DrillPaging::Drill);
    };
    let real: Option<bool> = conn
        .prepare_cached("SELECT page_real FROM drills WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(if real == Some(true) {
        DrillPaging::DrillPageReal
    } else {
        DrillPaging::Drill
    })
}

impl Store {
    /// `[drills] channels` of the routing in use (empty: not set).
    pub fn drill_channels(&self) -> Vec<String> {
        self.router.routing.drill_channels.clone()
    }

    /// Records a drill starting at `now` on `node` (status `running`), marking the node
    /// until `until_ms` (Unix ms; see the module docs); `page_real`: its incidents take
    /// the real routes at their real severity. Returns its id.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_begin(
        &mut self,
        node: &str,
        scenario: &str,
        by: &str,
        now: i64,
        until_ms: i64,
        page_real: bool,
    ) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO drills (node, scenario, started_by, started_ms, status, until_ms, page_real)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
                params![node, scenario, by, now, until_ms, page_real],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// At start (`now`, Unix ms): stamps every drill still `running` — its run died with
    /// the previous aggregator — with `restarted_ms`, and ends those whose window has
    /// passed ([`Store::drill_sweep`]). Returns `(id, node, until_ms)` of the stamped
    /// drills, for the log.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drills_after_restart(
        &mut self,
        now: i64,
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        let e = |e| self.err(e);
        let rows: Vec<(i64, String, i64)> = self
            .conn
            .prepare(
                "UPDATE drills SET restarted_ms = ?1 WHERE ended_ms IS NULL AND restarted_ms IS NULL
                 RETURNING id, node, coalesce(until_ms, started_ms)",
            )
            .and_then(|mut st| {
                st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(e)?;
        self.drill_sweep(now)?;
        Ok(rows)
    }

    /// Ends, as `interrupted`, every drill whose run died with an earlier aggregator
    /// (`restarted_ms` set) and whose window (`until_ms`) has passed at `now`; its report
    /// says the aggregator restarted during the drill and that its steps were not
    /// measured. Returns the ids ended. Run at start and by the paging sweep.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_sweep(&mut self, now: i64) -> Result<Vec<i64>, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let due: Vec<DrillRow> = tx
            .prepare(&format!(
                "SELECT {ROW_COLUMNS} FROM drills
                 WHERE ended_ms IS NULL AND restarted_ms IS NOT NULL
                   AND coalesce(until_ms, started_ms) <= ?1 ORDER BY id"
            ))
            .and_then(|mut st| st.query_map([now], drill_row)?.collect())
            .map_err(err)?;
        let mut ended = Vec::new();
        for d in due {
            let restarted = d.restarted_ms.unwrap_or(now);
            let message = format!(
                "INTERRUPTED: the aggregator restarted during the drill (at {}); the drill \
                 run died with it, so its steps were not measured. The drill window ended at \
                 {}; until then the node's incidents were still marked as drills.",
                rfc3339(restarted),
                rfc3339(d.until_ms.unwrap_or(now))
            );
            let report = serde_json::json!({
                "id": d.id,
                "node": d.node,
                "scenario": d.scenario,
                "started_by": d.started_by,
                "started_ms": d.started_ms,
                "ended_ms": now,
                "status": INTERRUPTED,
                "page_real": d.page_real,
                "notification_missing": false,
                "restarted_ms": restarted,
                "message": message,
                "scenarios": [],
            });
            tx.execute(
                "UPDATE drills SET ended_ms = ?2, status = ?3, report = ?4 WHERE id = ?1",
                params![d.id, now, INTERRUPTED, report.to_string()],
            )
            .map_err(err)?;
            ended.push(d.id);
        }
        tx.commit().map_err(err)?;
        Ok(ended)
    }

    /// Records the end of drill `id` with its `status` and `report`.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_end(
        &mut self,
        id: i64,
        now: i64,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE drills SET ended_ms = ?2, status = ?3, report = ?4 WHERE id = ?1",
                params![id, now, status, report.to_string()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The latest `limit` drills, newest first.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drills(&self, limit: usize) -> Result<Vec<DrillRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ROW_COLUMNS} FROM drills ORDER BY id DESC LIMIT ?1"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], drill_row)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Drill `id`, if it exists.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill(&self, id: i64) -> Result<Option<DrillRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {ROW_COLUMNS} FROM drills WHERE id = ?1"),
                [id],
                drill_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// What happened on `node` since `since_ms` for a check named `check` (a process
    /// watch's checks: `check` ending in `%`, a SQL `LIKE` pattern): see [`Observed`].
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_observe(
        &self,
        node: &str,
        check: &str,
        since_ms: i64,
    ) -> Result<Observed, StoreError> {
        let e = |e| self.err(e);
        let mut o = Observed {
            detected_ms: self
                .conn
                .query_row(
                    "SELECT min(received_at_ms) FROM events
                     WHERE agent_id = ?1 AND check_name LIKE ?2 AND received_at_ms >= ?3
                       AND state IN ('warning', 'critical')",
                    params![node, check, since_ms],
                    |r| r.get(0),
                )
                .map_err(e)?,
            ..Observed::default()
        };
        let incident: Option<(i64, String, String, i64, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT i.id, i.severity, i.summary, i.triggered_at_ms, i.resolved_at_ms
                 FROM incidents i
                 WHERE i.triggered_at_ms >= ?3
                   AND json_extract(i.labels, '$.' || ?4) = 'true'
                   AND EXISTS (SELECT 1 FROM incident_members m WHERE m.incident_id = i.id
                               AND m.node = ?1 AND m.check_name LIKE ?2)
                 ORDER BY i.id LIMIT 1",
                params![node, check, since_ms, DRILL_LABEL],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(e)?;
        let Some((id, severity, summary, opened, resolved)) = incident else {
            return Ok(o);
        };
        o.incident_id = Some(id);
        o.severity = Some(severity);
        o.summary = Some(summary);
        o.incident_ms = Some(opened);
        o.resolved_ms = resolved;
        if o.detected_ms.is_none() {
            o.detected_ms = Some(opened);
        }
        let delivered: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT delivered_ms, channel FROM outbox
                 WHERE incident_id = ?1 AND kind = 'trigger' AND delivered_ms IS NOT NULL
                 ORDER BY delivered_ms LIMIT 1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?;
        o.notified_ms = delivered.as_ref().map(|d| d.0);
        o.notified_channel = delivered.map(|d| d.1);
        o.notifications = self
            .conn
            .query_row(
                "SELECT count(*) FROM outbox WHERE incident_id = ?1 AND kind = 'trigger'",
                [id],
                |r| r.get(0),
            )
            .map_err(e)?;
        let hook: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT started_ms, hook FROM hook_runs
                 WHERE incident_id = ?1 AND started_ms IS NOT NULL ORDER BY started_ms LIMIT 1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?;
        o.hook_ms = hook.as_ref().map(|h| h.0);
        o.hook = hook.map(|h| h.1);
        Ok(o)
    }
}
