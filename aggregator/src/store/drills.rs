//! Drills in the store: the `drills` table (one row per `tocsin drill` run), the drill
//! mark on a node, and what a drill's scenario caused, read back for its report.
//!
//! **Drill mark**: while a drill runs on a node, the node's labels (table `agents`)
//! carry `drill=true` (`kpi::DRILL_LABEL`), so every incident that opens from that
//! node in the drill window — from its events, heartbeats or its liveness — has the
//! label: it goes through the real routes, its notifications say `[DRILL]`, and the KPIs
//! report it apart. The mark is removed when the drill ends (a reconnecting agent's
//! `Hello` also replaces the node's labels, ending the mark early).

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Store, StoreError};
use crate::kpi::DRILL_LABEL;

/// The `drills` table.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS drills (
    id          INTEGER PRIMARY KEY,
    node        TEXT NOT NULL,
    scenario    TEXT NOT NULL,
    started_by  TEXT NOT NULL,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    status      TEXT NOT NULL,
    report      TEXT
);
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
    /// `running`, `passed`, `failed` or `refused`.
    pub status: String,
    /// The report (JSON of `drill::DrillReport`), once ended.
    pub report: Option<serde_json::Value>,
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

impl Store {
    /// Records a drill starting now on `node` (status `running`); returns its id.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_begin(
        &mut self,
        node: &str,
        scenario: &str,
        by: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO drills (node, scenario, started_by, started_ms, status)
                 VALUES (?1, ?2, ?3, ?4, 'running')",
                params![node, scenario, by, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Sets (`on`) or removes the drill mark (`drill=true`) on `node`'s labels; returns
    /// whether the node is known.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_mark(&mut self, node: &str, on: bool) -> Result<bool, StoreError> {
        let labels: Option<String> = self
            .conn
            .query_row(
                "SELECT labels FROM agents WHERE agent_id = ?1",
                [node],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(labels) = labels else {
            return Ok(false);
        };
        let mut labels: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&labels).unwrap_or_default();
        if on {
            labels.insert(DRILL_LABEL.to_owned(), "true".to_owned());
        } else {
            labels.remove(DRILL_LABEL);
        }
        self.conn
            .execute(
                "UPDATE agents SET labels = ?2 WHERE agent_id = ?1",
                params![node, serde_json::to_string(&labels).unwrap_or_default()],
            )
            .map_err(|e| self.err(e))?;
        Ok(true)
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
            .prepare(
                "SELECT id, node, scenario, started_by, started_ms, ended_ms, status, report
                 FROM drills ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
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
                })
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| self.err(e))?;
        Ok(rows)
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
