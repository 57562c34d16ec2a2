//! Drills in the store: the `drills` table (one row per `tocsin drill` run), the drill
//! mark, and what a drill's scenario caused, read back for its report.
//!
//! **Drill mark**: a `drills` row that has not ended (`ended_ms` NULL) marks the checks
//! of its node named by its `scope` (SQL `LIKE` patterns, `drill::scope`; NULL for rows
//! from before scopes: every check) until `until_ms`, the end of the drill's window
//! (start + per scenario: the fault, the wait and the agent's answer time, plus a
//! margin). An incident that opens (or reopens) from such a check — from events,
//! heartbeats or liveness — gets the labels `drill=true` (`kpi::DRILL_LABEL`) and
//! `drill_id=<id>` ([`DRILL_ID_LABEL`]) on top of the node's labels (`mark_check`):
//! it is paged as a drill (`route::DrillPaging`), its notifications say `[DRILL]`, the
//! KPIs report it apart and it owes no post-mortem. A member joining an open incident
//! that does not carry this drill's mark stays real (`keep_real`): an incident open
//! before the drill never becomes one. The mark is kept apart from the node's own labels
//! (table `agents`), so a reconnecting agent's `Hello` does not end it; it ends with the
//! drill (`drill_end`) or at `until_ms`. A member of an incident takes the mark when it
//! starts firing and keeps it until it fires again (`member_labels`): a drill incident
//! that resolves after the drill ended is still a drill, and a real incident already
//! firing when a drill starts stays real.
//!
//! **Rows left running**: [`Store::drill_sweep`] ends as `interrupted` every row still
//! `running` past its `until_ms`, whatever the reason (see below for a restart).
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
    restarted_ms INTEGER,
    scope       TEXT
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
    /// The checks its mark applies to (SQL `LIKE` patterns, `\\` escapes), growing
    /// scenario by scenario during `all`; `None` (drills from before): every check.
    pub scope: Option<Vec<String>>,
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

const ROW_COLUMNS: &str = "id, node, scenario, started_by, started_ms, ended_ms, status, report, until_ms, page_real, restarted_ms, scope";

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
        scope: r
            .get::<_, Option<String>>(11)?
            .and_then(|s| serde_json::from_str(&s).ok()),
    })
}

/// The drill marking check `check` of `node` at `now` (Unix ms), if any: the newest
/// drill of the node not ended whose window (`until_ms`) is still open and whose scope
/// (the checks its scenarios expect, `drills.scope`; NULL: every check) names `check`.
pub(super) fn active_mark(
    conn: &Connection,
    node: &str,
    check: &str,
    now: i64,
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT id FROM drills d WHERE node = ?1 AND ended_ms IS NULL AND until_ms > ?2
           AND (scope IS NULL OR EXISTS (SELECT 1 FROM json_each(d.scope) j
                                         WHERE ?3 LIKE j.value ESCAPE '\\'))
         ORDER BY id DESC LIMIT 1",
    )?
    .query_row(params![node, now, check], |r| r.get(0))
    .optional()
}

/// Adds the drill mark (`drill=true`, `drill_id=<id>`) to `labels`, the labels an
/// observation of `check` on `node` gives its incident, when a drill marks that check
/// at `now` ([`active_mark`]); returns the drill's id.
pub(super) fn mark_check(
    conn: &Connection,
    node: &str,
    check: &str,
    now: i64,
    labels: &mut BTreeMap<String, String>,
) -> rusqlite::Result<Option<i64>> {
    let id = active_mark(conn, node, check, now)?;
    if let Some(id) = id {
        labels.insert(DRILL_LABEL.to_owned(), "true".to_owned());
        labels.insert(DRILL_ID_LABEL.to_owned(), id.to_string());
    }
    Ok(id)
}

/// A member joining (or firing again in) the open incident `id` stays real unless that
/// incident already carries drill `mark`: an incident open before the drill — or opened
/// during it by a check the drill does not expect — is never turned into a drill.
/// Removes the mark [`mark_check`] added to `labels` in that case.
pub(super) fn keep_real(
    conn: &Connection,
    id: i64,
    mark: Option<i64>,
    labels: &mut BTreeMap<String, String>,
) -> rusqlite::Result<()> {
    let Some(mark) = mark else {
        return Ok(());
    };
    let incident_mark: Option<String> = conn
        .prepare_cached("SELECT json_extract(labels, '$.' || ?2) FROM incidents WHERE id = ?1")?
        .query_row(params![id, DRILL_ID_LABEL], |r| r.get(0))
        .optional()?
        .flatten();
    if incident_mark.as_deref() != Some(mark.to_string().as_str()) {
        labels.remove(DRILL_LABEL);
        labels.remove(DRILL_ID_LABEL);
    }
    Ok(())
}

/// The labels member `fp` of incident `id` takes from an observation (`firing`: warning
/// or critical) whose labels are `labels`: the drill mark (`drill`, `drill_id`) of a
/// member is decided when it starts firing (a new member, or one that was not firing)
/// and kept until it starts firing again. So a member that fired during a drill stays
/// a drill through its recovery, even after the mark ended (its resolve still says
/// `[DRILL]` and the KPIs keep it apart), and a member already firing when a drill
/// starts stays real (a real incident never turns into a drill).
pub(super) fn member_labels(
    conn: &Connection,
    id: i64,
    fp: &str,
    firing: bool,
    labels: &BTreeMap<String, String>,
) -> rusqlite::Result<BTreeMap<String, String>> {
    let before: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT labels, state FROM incident_members WHERE incident_id = ?1 AND fingerprint = ?2",
        )?
        .query_row(params![id, fp], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let mut out = labels.clone();
    let Some((old, state)) = before else {
        return Ok(out);
    };
    let was_firing = matches!(state.as_str(), "warning" | "critical");
    if firing && !was_firing {
        return Ok(out);
    }
    let old: BTreeMap<String, String> = serde_json::from_str(&old).unwrap_or_default();
    for key in [DRILL_LABEL, DRILL_ID_LABEL] {
        match old.get(key) {
            Some(v) => out.insert(key.to_owned(), v.clone()),
            None => out.remove(key),
        };
    }
    Ok(out)
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

    /// The drill still open on `node` at `now` (Unix ms): not ended and its window
    /// (`until_ms`) not over. A second drill on the node is refused while there is one.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_open_on(&self, node: &str, now: i64) -> Result<Option<DrillRow>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM drills WHERE node = ?1 AND ended_ms IS NULL
                       AND coalesce(until_ms, started_ms) > ?2 ORDER BY id DESC LIMIT 1"
                ),
                params![node, now],
                drill_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records drill `id`'s scope: the checks its mark applies to, SQL `LIKE` patterns
    /// (`\` escapes) — see the module docs.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_scope(&mut self, id: i64, patterns: &[String]) -> Result<(), StoreError> {
        let scope = serde_json::to_string(patterns).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "UPDATE drills SET scope = ?2 WHERE id = ?1",
                params![id, scope],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
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

    /// Ends, as `interrupted`, every drill still `running` whose window (`until_ms`)
    /// has passed at `now`: its run died with an earlier aggregator (`restarted_ms`
    /// set; the report says so), or it stopped without recording its report for any
    /// other reason. Its steps were not measured. Returns the ids ended. Run at start
    /// and by the paging sweep. A run that still records its report later replaces
    /// this one ([`Store::drill_end`]).
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
                 WHERE ended_ms IS NULL AND coalesce(until_ms, started_ms) <= ?1 ORDER BY id"
            ))
            .and_then(|mut st| st.query_map([now], drill_row)?.collect())
            .map_err(err)?;
        let mut ended = Vec::new();
        for d in due {
            let until = rfc3339(d.until_ms.unwrap_or(now));
            let message = match d.restarted_ms {
                Some(restarted) => format!(
                    "INTERRUPTED: the aggregator restarted during the drill (at {}); the drill \
                     run died with it, so its steps were not measured. The drill window ended at \
                     {until}; until then the node's incidents were still marked as drills.",
                    rfc3339(restarted),
                ),
                None => format!(
                    "INTERRUPTED: the drill was still running when its window ended ({until}) \
                     and never recorded its report, so its steps were not measured; its mark \
                     ended with the window."
                ),
            };
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
                "restarted_ms": d.restarted_ms,
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

    /// The checks of `node` matching `patterns` (SQL `LIKE`, `\\` escapes) that fire
    /// now (warning or critical in the node's last reported states): `(check, state,
    /// since_ms)`. A drill of such a check cannot show anything new.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_firing(
        &self,
        node: &str,
        patterns: &[String],
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let scope = serde_json::to_string(patterns).unwrap_or_else(|_| "[]".into());
        self.conn
            .prepare(
                "SELECT check_name, state, since_ms FROM checks c
                 WHERE agent_id = ?1 AND state IN ('warning', 'critical')
                   AND EXISTS (SELECT 1 FROM json_each(?2) j WHERE c.check_name LIKE j.value ESCAPE '\\')
                 ORDER BY check_name",
            )
            .and_then(|mut st| {
                st.query_map(params![node, scope], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// Whether `node` reported a check matching `pattern` (SQL `LIKE`, `\\` escapes)
    /// in its states, and the names of its checks starting with `prefix` (for the
    /// error naming the known ones).
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_known_check(
        &self,
        node: &str,
        pattern: &str,
        prefix: &str,
    ) -> Result<(bool, Vec<String>), StoreError> {
        let e = |e| self.err(e);
        let known: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM checks WHERE agent_id = ?1 AND check_name LIKE ?2 ESCAPE '\\')",
                params![node, pattern],
                |r| r.get(0),
            )
            .map_err(e)?;
        let names = self
            .conn
            .prepare(
                "SELECT check_name FROM checks WHERE agent_id = ?1 AND substr(check_name, 1, length(?2)) = ?2
                 ORDER BY check_name",
            )
            .and_then(|mut st| st.query_map(params![node, prefix], |r| r.get(0))?.collect())
            .map_err(e)?;
        Ok((known, names))
    }

    /// What drill `drill` caused on `node` since `since_ms` for the checks matching
    /// `patterns` (SQL `LIKE`, `\\` escapes): see [`Observed`]. Its incident is the
    /// one carrying its mark (`drill_id`) that opened — or reopened (`reopen_window`:
    /// the same check firing again soon after its incident resolved) — since
    /// `since_ms`; its incident time is then the reopen, and its notification the
    /// first trigger delivered after it.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub fn drill_observe(
        &self,
        node: &str,
        patterns: &[String],
        since_ms: i64,
        drill: i64,
    ) -> Result<Observed, StoreError> {
        let e = |e| self.err(e);
        let scope = serde_json::to_string(patterns).unwrap_or_else(|_| "[]".into());
        let mut o = Observed {
            detected_ms: self
                .conn
                .query_row(
                    "SELECT min(received_at_ms) FROM events e
                     WHERE agent_id = ?1 AND received_at_ms >= ?3 AND state IN ('warning', 'critical')
                       AND EXISTS (SELECT 1 FROM json_each(?2) j WHERE e.check_name LIKE j.value ESCAPE '\\')",
                    params![node, scope, since_ms],
                    |r| r.get(0),
                )
                .map_err(e)?,
            ..Observed::default()
        };
        let incident: Option<(i64, String, String, i64, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT id, severity, summary, opened, resolved_at_ms FROM (
                     SELECT i.id, i.severity, i.summary, i.resolved_at_ms,
                            CASE WHEN i.triggered_at_ms >= ?3 THEN i.triggered_at_ms
                                 ELSE (SELECT min(t.at_ms) FROM timeline t WHERE t.incident_id = i.id
                                         AND t.kind = 'reopened' AND t.at_ms >= ?3) END AS opened
                     FROM incidents i
                     WHERE json_extract(i.labels, '$.' || ?4) = ?5
                       AND EXISTS (SELECT 1 FROM incident_members m, json_each(?2) j
                                   WHERE m.incident_id = i.id AND m.node = ?1
                                     AND m.check_name LIKE j.value ESCAPE '\\'))
                 WHERE opened IS NOT NULL ORDER BY opened, id LIMIT 1",
                params![node, scope, since_ms, DRILL_ID_LABEL, drill.to_string()],
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
                 WHERE incident_id = ?1 AND kind = 'trigger' AND delivered_ms >= ?2
                 ORDER BY delivered_ms LIMIT 1",
                params![id, opened],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?;
        o.notified_ms = delivered.as_ref().map(|d| d.0);
        o.notified_channel = delivered.map(|d| d.1);
        o.notifications = self
            .conn
            .query_row(
                "SELECT count(*) FROM outbox WHERE incident_id = ?1 AND kind = 'trigger'
                   AND id > (SELECT outbox_mark FROM incidents WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )
            .map_err(e)?;
        let hook: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT started_ms, hook FROM hook_runs
                 WHERE incident_id = ?1 AND started_ms >= ?2 ORDER BY started_ms LIMIT 1",
                params![id, opened],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?;
        o.hook_ms = hook.as_ref().map(|h| h.0);
        o.hook = hook.map(|h| h.1);
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Store;
    use super::INTERRUPTED;
    use crate::model::{AgentHello, Event, Severity, State, now_ms};
    use crate::route::{Route, Router, Routing};

    fn hello(labels: &[(&str, &str)]) -> AgentHello {
        AgentHello {
            agent_id: "a".into(),
            hostname: "a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            version: "test".into(),
            boot_id: String::new(),
            instance_id: "i1".into(),
            heartbeat_interval_ms: 1000,
        }
    }

    fn event(seq: u64, check: &str, state: State) -> Event {
        Event {
            seq,
            check: check.into(),
            labels: BTreeMap::new(),
            state,
            previous: State::Ok,
            value: Some(1.0),
            unit: "count".into(),
            threshold: Some(1.0),
            message: format!("{check} {}", state.as_str()),
            observed_at_ms: 1,
            breach_started_at_ms: 1,
            flapping: false,
        }
    }

    fn route(name: &str, severities: &[Severity], channels: &[&str], escalate: &[&str]) -> Route {
        Route {
            name: name.into(),
            severities: severities.to_vec(),
            matchers: Vec::new(),
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            escalate_to: escalate.iter().map(|c| (*c).to_owned()).collect(),
            repeat_interval: None,
            continue_matching: false,
            remediate: None,
        }
    }

    /// A store whose check `boom` is P1 (a `[[severity]]` rule), with a P1 route to
    /// `war` and a route for the rest to `ops` that escalates to `war`; channels `war`,
    /// `ops` and `drill-room`; `[drills] channels` as given.
    fn store(drill_channels: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let channels: Vec<String> = vec!["war".into(), "ops".into(), "drill-room".into()];
        let correlation = crate::correlate::Correlation {
            severity: vec![crate::correlate::SeverityRule {
                matchers: vec![crate::silence::Matcher::parse("check=boom").expect("m")],
                level: Severity::P1,
            }],
            ..crate::correlate::Correlation::default()
        };
        let mut s = Store::open(dir.path(), channels.clone())
            .expect("open")
            .with_correlation(correlation);
        s.set_router(Router {
            channels,
            routing: Routing {
                routes: vec![
                    route("p1", &[Severity::P1], &["war"], &[]),
                    route("rest", &[], &["ops"], &["war"]),
                ],
                drill_channels: drill_channels.iter().map(|c| (*c).to_owned()).collect(),
                ..Routing::default()
            },
        });
        s.hello(&hello(&[("service", "web")]), 1).expect("hello");
        (dir, s)
    }

    fn triggers(s: &Store, id: i64) -> Vec<String> {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .notifications
            .into_iter()
            .filter(|n| n.kind == "trigger")
            .map(|n| n.channel)
            .collect()
    }

    fn routed_note(s: &Store, id: i64) -> String {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .timeline
            .into_iter()
            .filter(|t| t.kind == "routed")
            .map(|t| t.note)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Opens a P1 incident (`boom` critical) on node `a` during a drill started with
    /// `page_real`; returns (drill id, incident id).
    fn drill_p1(s: &mut Store, page_real: bool) -> (i64, i64) {
        let now = now_ms();
        let drill = s
            .drill_begin("a", "process_crash", "t", now, now + 60_000, page_real)
            .expect("begin");
        let out = s
            .ingest("a", &[event(1, "boom", State::Critical)])
            .expect("ingest");
        assert_eq!(out.opened.len(), 1);
        (drill, out.opened[0])
    }

    #[test]
    fn a_drill_is_routed_as_at_most_p2_and_never_escalates_as_a_p1() {
        let (_dir, mut s) = store(&[]);
        let (drill, id) = drill_p1(&mut s, false);
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(d.incident.severity, Severity::P1, "the real severity stays");
        assert_eq!(
            d.incident.labels.get("drill").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            d.incident.labels.get("drill_id"),
            Some(&drill.to_string()),
            "{:?}",
            d.incident.labels
        );
        assert_eq!(triggers(&s, id), ["ops"], "the P2 route, not the P1 one");
        let note = routed_note(&s, id);
        assert!(note.contains("routed as P2 although it is P1"), "{note}");
        // P1's target is 0s: a P1 would escalate to war at the first sweep; as a P2
        // (30m) it does not.
        let out = s.sweep_paging(now_ms() + 60_000).expect("sweep");
        assert!(out.escalated.is_empty(), "{out:?}");
        assert_eq!(triggers(&s, id), ["ops"]);
        let later = s.sweep_paging(now_ms() + 31 * 60_000).expect("sweep");
        assert_eq!(later.escalated, [id], "P2's target: 30m");
    }

    #[test]
    fn with_drill_channels_a_drill_pages_only_them() {
        let (_dir, mut s) = store(&["drill-room"]);
        let (_, id) = drill_p1(&mut s, false);
        assert_eq!(triggers(&s, id), ["drill-room"]);
        assert!(routed_note(&s, id).contains("drill channels only"));
        let out = s.sweep_paging(now_ms() + 31 * 60_000).expect("sweep");
        assert!(out.escalated.is_empty(), "no escalation: {out:?}");
    }

    #[test]
    fn a_drill_that_pages_real_takes_the_p1_route() {
        let (_dir, mut s) = store(&["drill-room"]);
        let (drill, id) = drill_p1(&mut s, true);
        assert_eq!(triggers(&s, id), ["war"]);
        assert!(routed_note(&s, id).contains("--page-real"));
        assert!(s.drill(drill).expect("r").expect("e").page_real);
    }

    #[test]
    fn the_mark_survives_a_reconnect_and_ends_with_the_drill() {
        let (_dir, mut s) = store(&[]);
        let now = now_ms();
        let drill = s
            .drill_begin("a", "node_down", "t", now, now + 60_000, false)
            .expect("begin");
        // The agent reconnects mid-drill: its Hello replaces the node's labels.
        s.hello(&hello(&[("service", "api")]), 2).expect("hello");
        let out = s
            .ingest("a", &[event(1, "c1", State::Critical)])
            .expect("ingest");
        let d = s.incident(out.opened[0]).expect("r").expect("e");
        assert_eq!(
            d.incident.labels.get("drill").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            d.incident.labels.get("service").map(String::as_str),
            Some("api")
        );
        s.drill_end(drill, now_ms(), "passed", &serde_json::json!({}))
            .expect("end");
        let out = s
            .ingest("a", &[event(2, "c2", State::Critical)])
            .expect("ingest");
        let d = s.incident(out.opened[0]).expect("r").expect("e");
        assert!(
            !d.incident.labels.contains_key("drill"),
            "{:?}",
            d.incident.labels
        );
    }

    fn labels_of(s: &Store, id: i64) -> BTreeMap<String, String> {
        s.incident(id).expect("r").expect("e").incident.labels
    }

    #[test]
    fn a_member_keeps_the_mark_it_started_firing_with() {
        let (_dir, mut s) = store(&[]);
        // Real, and firing before the drill: stays real while the drill runs.
        let real = s
            .ingest("a", &[event(1, "c1", State::Warning)])
            .expect("ingest")
            .opened[0];
        let now = now_ms();
        let drill = s
            .drill_begin("a", "high_load", "t", now, now + 60_000, false)
            .expect("begin");
        s.ingest("a", &[event(2, "c1", State::Critical)])
            .expect("ingest");
        assert!(!labels_of(&s, real).contains_key("drill"));
        // Opened during the drill: a drill, through its resolve after the drill ended.
        let marked = s
            .ingest("a", &[event(3, "c2", State::Critical)])
            .expect("ingest")
            .opened[0];
        s.drill_end(drill, now_ms(), "failed", &serde_json::json!({}))
            .expect("end");
        s.ingest(
            "a",
            &[event(4, "c2", State::Warning), event(5, "c2", State::Ok)],
        )
        .expect("ingest");
        let d = s.incident(marked).expect("r").expect("e");
        assert_eq!(d.incident.status.as_str(), "resolved");
        assert_eq!(
            d.incident.labels.get("drill").map(String::as_str),
            Some("true")
        );
        // Firing again after the drill (a new episode; here a new incident): real.
        let again = s
            .ingest("a", &[event(6, "c2", State::Critical)])
            .expect("ingest")
            .opened;
        let id = again.first().copied().unwrap_or(marked);
        assert!(
            !labels_of(&s, id).contains_key("drill"),
            "{:?}",
            labels_of(&s, id)
        );
    }

    #[test]
    fn a_drill_left_running_is_marked_until_its_window_then_interrupted() {
        let (dir, mut s) = store(&[]);
        let now = now_ms();
        let open = s
            .drill_begin("a", "node_down", "t", now, now + 60_000, false)
            .expect("begin");
        let passed = s
            .drill_begin("b", "node_down", "t", now - 120_000, now - 1, false)
            .expect("begin");
        drop(s);
        // The aggregator restarts.
        let mut s = Store::open(dir.path(), vec!["ops".into()]).expect("reopen");
        let stamped = s.drills_after_restart(now).expect("restart");
        assert_eq!(stamped.len(), 2);
        let row = s.drill(passed).expect("r").expect("e");
        assert_eq!(row.status, INTERRUPTED, "its window had passed");
        let report = row.report.expect("a report");
        assert!(
            report["message"]
                .as_str()
                .is_some_and(|m| m.contains("the aggregator restarted during the drill")),
            "{report}"
        );
        let row = s.drill(open).expect("r").expect("e");
        assert_eq!(row.status, "running", "its window is still open");
        assert_eq!(row.restarted_ms, Some(now));
        // Still a drill: an incident of the node carries the mark.
        s.hello(&hello(&[]), 1).expect("hello");
        let out = s
            .ingest("a", &[event(1, "c1", State::Critical)])
            .expect("ingest");
        let d = s.incident(out.opened[0]).expect("r").expect("e");
        assert_eq!(d.incident.labels.get("drill_id"), Some(&open.to_string()));
        assert!(s.drill_sweep(now + 59_000).expect("sweep").is_empty());
        assert_eq!(s.drill_sweep(now + 60_000).expect("sweep"), [open]);
        assert_eq!(s.drill(open).expect("r").expect("e").status, INTERRUPTED);
        // A second restart leaves ended drills alone.
        assert!(
            s.drills_after_restart(now + 70_000)
                .expect("again")
                .is_empty()
        );
    }

    #[test]
    fn an_old_drills_table_is_migrated_and_its_running_drill_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = rusqlite::Connection::open(dir.path().join("tocsin.db")).expect("open");
            conn.execute_batch(
                "CREATE TABLE drills (id INTEGER PRIMARY KEY, node TEXT NOT NULL,
                     scenario TEXT NOT NULL, started_by TEXT NOT NULL, started_ms INTEGER NOT NULL,
                     ended_ms INTEGER, status TEXT NOT NULL, report TEXT);
                 INSERT INTO drills (node, scenario, started_by, started_ms, status)
                 VALUES ('a', 'all', 't', 1, 'running');",
            )
            .expect("old table");
        }
        let mut s = Store::open(dir.path(), vec![]).expect("migrate");
        s.drills_after_restart(now_ms()).expect("restart");
        let row = s.drill(1).expect("r").expect("e");
        assert_eq!(row.status, INTERRUPTED);
        assert!(!row.page_real);
        assert_eq!(
            s.drill_begin("a", "all", "t", 2, 3, true)
                .expect("new columns"),
            2
        );
    }

    fn scoped_drill(s: &mut Store, scenario: &str, target: &str) -> i64 {
        let now = now_ms();
        let id = s
            .drill_begin("a", scenario, "t", now, now + 60_000, false)
            .expect("begin");
        s.drill_scope(id, &crate::drill::scope(scenario, target))
            .expect("scope");
        id
    }

    /// Regression (review of issue 6, finding 2): during a drill every incident of the
    /// node was a drill — a real incident open before it, a real node_down.
    #[test]
    fn a_drill_marks_only_the_checks_its_scenario_causes() {
        let (_dir, mut s) = store(&[]);
        // Node b, not drilled, has a real load incident open; node a's joins it later.
        let mut b = hello(&[]);
        b.agent_id = "b".into();
        s.hello(&b, 2).expect("hello b");
        let real_load = s
            .ingest("b", &[event(1, "load", State::Critical)])
            .expect("ingest")
            .opened[0];
        let drill = scoped_drill(&mut s, "high_load", "");
        let cpu = s
            .ingest("a", &[event(1, "cpu", State::Critical)])
            .expect("ingest")
            .opened[0];
        assert_eq!(labels_of(&s, cpu).get("drill_id"), Some(&drill.to_string()));
        // Not the scenario's check: real.
        let disk = s
            .ingest("a", &[event(2, "disk:/", State::Critical)])
            .expect("ingest")
            .opened[0];
        assert!(
            !labels_of(&s, disk).contains_key("drill"),
            "{:?}",
            labels_of(&s, disk)
        );
        // The scenario's check joining a real incident open before: stays real.
        let out = s
            .ingest("a", &[event(3, "load", State::Critical)])
            .expect("ingest");
        assert!(out.opened.is_empty(), "joined: {out:?}");
        assert!(!labels_of(&s, real_load).contains_key("drill"));
        let members = super::super::apply::members(&s.conn, real_load).expect("members");
        assert!(
            members.iter().all(|m| !m.labels.contains_key("drill")),
            "{members:?}"
        );
        // A real node_down during a high_load drill pages for real.
        let down = s
            .sweep_liveness(now_ms() + 600_000, 1_000, 0)
            .expect("sweep")
            .opened;
        assert_eq!(down.len(), 1, "one node_down incident (grouped by check)");
        let members = super::super::apply::members(&s.conn, down[0]).expect("members");
        let a = members.iter().find(|m| m.node == "a").expect("a is down");
        assert!(!a.labels.contains_key("drill"), "{members:?}");
        assert!(!labels_of(&s, down[0]).contains_key("drill"));
        assert!(!triggers(&s, down[0]).is_empty(), "paged");
    }

    /// Regression (finding 1): a drill whose run stopped without a report (its HTTP
    /// client went away before the run was its own task) stayed `running` forever.
    #[test]
    fn a_drill_left_running_past_its_window_is_interrupted_without_a_restart() {
        let (_dir, mut s) = store(&[]);
        let now = now_ms();
        let id = s
            .drill_begin("a", "high_load", "t", now - 60_000, now - 1, false)
            .expect("begin");
        assert!(
            s.drill_open_on("a", now).expect("open").is_none(),
            "window over"
        );
        assert_eq!(s.drill_sweep(now).expect("sweep"), [id]);
        let row = s.drill(id).expect("r").expect("e");
        assert_eq!(row.status, INTERRUPTED);
        let report = row.report.expect("report");
        assert!(
            report["message"]
                .as_str()
                .is_some_and(|m| m.contains("never recorded its report")),
            "{report}"
        );
        // A run that records its report after all replaces the sweep's.
        s.drill_end(
            id,
            now + 1,
            "passed",
            &serde_json::json!({"status": "passed"}),
        )
        .expect("end");
        assert_eq!(s.drill(id).expect("r").expect("e").status, "passed");
    }

    /// Regression (finding 5): a drill whose incident reopened an incident resolved
    /// within `reopen_window` was reported "incident MISSING".
    #[test]
    fn a_drill_incident_that_reopens_an_incident_is_the_drills_incident() {
        let (_dir, mut s) = store(&["drill-room"]);
        let first = s
            .ingest("a", &[event(1, "process:app", State::Critical)])
            .expect("ingest")
            .opened[0];
        s.ingest("a", &[event(2, "process:app", State::Ok)])
            .expect("ingest");
        let since = now_ms();
        let drill = scoped_drill(&mut s, "process_crash", "app");
        let out = s
            .ingest("a", &[event(3, "process:app", State::Critical)])
            .expect("ingest");
        assert_eq!(out.opened, [first], "reopened");
        assert_eq!(
            labels_of(&s, first).get("drill_id"),
            Some(&drill.to_string())
        );
        let o = s
            .drill_observe(
                "a",
                &crate::drill::scope("process_crash", "app"),
                since,
                drill,
            )
            .expect("observe");
        assert_eq!(o.incident_id, Some(first), "{o:?}");
        assert!(o.incident_ms.is_some_and(|t| t >= since), "{o:?}");
        assert_eq!(
            o.notifications, 1,
            "the trigger of the reopened cycle: {o:?}"
        );
        assert!(o.detected_ms.is_some(), "{o:?}");
    }

    /// Regression (finding 14): drill incidents counted as "post-mortems due".
    #[test]
    fn drill_incidents_owe_no_post_mortem() {
        let (_dir, mut s) = store(&[]);
        scoped_drill(&mut s, "process_crash", "");
        let drill = s
            .ingest(
                "a",
                &[
                    event(1, "boom", State::Critical),
                    event(2, "process:x", State::Critical),
                ],
            )
            .expect("ingest")
            .opened;
        assert_eq!(drill.len(), 2);
        s.ingest(
            "a",
            &[
                event(3, "boom", State::Ok),
                event(4, "process:x", State::Ok),
            ],
        )
        .expect("ingest");
        let counts = s.status_counts(now_ms()).expect("counts");
        // `boom` (P1, real: not the scenario's check) is due; the drill's is not.
        assert_eq!(counts.postmortems_due, 1, "{counts:?}");
    }
}
