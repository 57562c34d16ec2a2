//! Store queries for the KPIs, filtered incident lists, post-mortem links and the
//! one-screen status; and the KPI histograms observed as changes commit. The KPI
//! definitions themselves live in [`crate::kpi`]; this file only loads rows.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{OptionalExtension, params};

use super::{Change, INCIDENT_COLUMNS, Store, StoreError, incident_from_row, timeline};
use crate::kpi::{self, KpiIncident, KpiMetrics};
use crate::model::{Incident, Severity, Status, now_ms};

/// Which incidents `GET /api/v1/incidents` lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IncidentQuery {
    /// Only these statuses (empty: all).
    pub statuses: Vec<Status>,
    /// Only these severities (empty: all).
    pub severities: Vec<Severity>,
    /// Only incidents opened (first triggered) at or after this time, Unix ms.
    pub since_ms: Option<i64>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// A linked post-mortem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PostmortemLink {
    /// Where the post-mortem is (http or https URL).
    pub url: String,
    /// Who linked it.
    pub linked_by: String,
    /// When (Unix ms).
    pub linked_at_ms: i64,
}

/// The counts behind `tocsin status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct StatusCounts {
    /// Open incidents per severity and status: `{"P1": {"triggered": 1, …}}`.
    pub open: BTreeMap<String, BTreeMap<String, u64>>,
    /// Resolved P1/P2 incidents without a linked post-mortem, resolved within the last
    /// 48 hours (due) and before that (overdue).
    pub postmortems_due: u64,
    /// See `postmortems_due`.
    pub postmortems_overdue: u64,
    /// Agents with an open `node_down` incident.
    pub nodes_down: Vec<String>,
}

const MAX_KPI_ROWS: i64 = 100_000;

impl Store {
    /// Observes the KPI histograms of `metrics` from now on (see [`KpiMetrics`]).
    #[must_use]
    pub fn with_kpi_metrics(mut self, metrics: KpiMetrics) -> Self {
        self.kpi_metrics = Some(metrics);
        self
    }

    /// Incidents matching `q`, newest first.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn incidents_where(&self, q: &IncidentQuery) -> Result<Vec<Incident>, StoreError> {
        // The lists hold enum names only (never request text), so they are spliced.
        let mut clauses = vec!["triggered_at_ms >= ?1".to_owned()];
        if !q.statuses.is_empty() {
            let names: Vec<String> = q
                .statuses
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            clauses.push(format!("status IN ({})", names.join(", ")));
        }
        if !q.severities.is_empty() {
            let names: Vec<String> = q
                .severities
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            clauses.push(format!("severity IN ({})", names.join(", ")));
        }
        let sql = format!(
            "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE {} ORDER BY id DESC LIMIT ?2",
            clauses.join(" AND ")
        );
        self.conn
            .prepare(&sql)
            .and_then(|mut st| {
                st.query_map(
                    params![
                        q.since_ms.unwrap_or(i64::MIN),
                        i64::try_from(q.limit).unwrap_or(i64::MAX)
                    ],
                    incident_from_row,
                )?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// Every incident open at some time in `[since_ms, until_ms)` (opened before
    /// `until_ms`, not resolved before `since_ms`) as the KPIs see it, oldest first (at
    /// most 100 000).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn kpi_incidents(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<KpiIncident>, StoreError> {
        let err = |e| self.err(e);
        let rows: Vec<(Incident, i64)> = self
            .conn
            .prepare(&format!(
                "SELECT {INCIDENT_COLUMNS}, reopened FROM incidents
                 WHERE triggered_at_ms < ?2 AND (resolved_at_ms IS NULL OR resolved_at_ms >= ?1)
                 ORDER BY id LIMIT ?3"
            ))
            .and_then(|mut st| {
                st.query_map(params![since_ms, until_ms, MAX_KPI_ROWS], |r| {
                    Ok((incident_from_row(r)?, r.get(18)?))
                })?
                .collect()
            })
            .map_err(err)?;
        let mut entries: HashMap<i64, Vec<(i64, String)>> = HashMap::new();
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT t.incident_id, t.at_ms, t.kind FROM timeline t JOIN incidents i ON i.id = t.incident_id
                     WHERE i.triggered_at_ms < ?2 AND (i.resolved_at_ms IS NULL OR i.resolved_at_ms >= ?1)
                       AND (t.kind IN ('acknowledged', 'resolved', 'reopened')
                            OR t.kind LIKE 'recovery%' OR t.kind LIKE 'hook%')
                     ORDER BY t.id",
                )
                .map_err(err)?;
            let mut q = st.query(params![since_ms, until_ms]).map_err(err)?;
            while let Some(r) = q.next().map_err(err)? {
                entries
                    .entry(r.get(0).map_err(err)?)
                    .or_default()
                    .push((r.get(1).map_err(err)?, r.get(2).map_err(err)?));
            }
        }
        Ok(rows
            .into_iter()
            .map(|(i, _)| {
                let e = entries.remove(&i.id).unwrap_or_default();
                kpi_incident(&i, &e)
            })
            .collect())
    }

    /// The linked post-mortems of `ids`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn postmortem_links(
        &self,
        ids: &[i64],
    ) -> Result<HashMap<i64, PostmortemLink>, StoreError> {
        let mut out = HashMap::new();
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT url, linked_by, linked_at_ms FROM postmortems WHERE incident_id = ?1",
            )
            .map_err(|e| self.err(e))?;
        for id in ids {
            let link = st
                .query_row([id], |r| {
                    Ok(PostmortemLink {
                        url: r.get(0)?,
                        linked_by: r.get(1)?,
                        linked_at_ms: r.get(2)?,
                    })
                })
                .optional()
                .map_err(|e| self.err(e))?;
            if let Some(l) = link {
                out.insert(*id, l);
            }
        }
        Ok(out)
    }

    /// Links the post-mortem at `url` to incident `id` (replacing an earlier link), with
    /// a `postmortem` timeline entry naming `by`. `Done`, or `NotFound`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn link_postmortem(&mut self, id: i64, url: &str, by: &str) -> Result<Change, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_ms();
        let tx = self.conn.transaction().map_err(err)?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM incidents WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )
            .map_err(err)?;
        if !exists {
            return Ok(Change::NotFound);
        }
        let same: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM postmortems WHERE incident_id = ?1 AND url = ?2)",
                params![id, url],
                |r| r.get(0),
            )
            .map_err(err)?;
        if same {
            return Ok(Change::Unchanged(format!(
                "incident {id} already links that post-mortem"
            )));
        }
        tx.execute(
            "INSERT INTO postmortems (incident_id, url, linked_by, linked_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (incident_id) DO UPDATE SET url = ?2, linked_by = ?3, linked_at_ms = ?4",
            params![id, url, by, now],
        )
        .map_err(err)?;
        timeline(
            &tx,
            id,
            now,
            "postmortem",
            &format!("user:{by}"),
            &format!("post-mortem linked by {by}: {url}"),
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Change::Done)
    }

    /// Counts for the one-screen status at `now`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn status_counts(&self, now: i64) -> Result<StatusCounts, StoreError> {
        let err = |e| self.err(e);
        let mut out = StatusCounts::default();
        let rows: Vec<(String, String, i64)> = self
            .conn
            .prepare(
                "SELECT severity, status, count(*) FROM incidents WHERE status != 'resolved'
                 GROUP BY severity, status",
            )
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(err)?;
        for (sev, status, n) in rows {
            out.open
                .entry(sev)
                .or_default()
                .insert(status, u64::try_from(n).unwrap_or(0));
        }
        let (due, overdue): (i64, i64) = self
            .conn
            .query_row(
                "SELECT coalesce(sum(resolved_at_ms + ?2 >= ?1), 0), coalesce(sum(resolved_at_ms + ?2 < ?1), 0)
                 FROM incidents i
                 WHERE status = 'resolved' AND severity IN ('P1', 'P2')
                   AND NOT EXISTS (SELECT 1 FROM postmortems p WHERE p.incident_id = i.id)",
                params![now, kpi::targets::POSTMORTEM_DUE_MS],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        out.postmortems_due = u64::try_from(due).unwrap_or(0);
        out.postmortems_overdue = u64::try_from(overdue).unwrap_or(0);
        out.nodes_down = self.down.iter().cloned().collect();
        out.nodes_down.sort();
        Ok(out)
    }

    /// Observes the KPI histograms for what just committed: MTTD of the `opened`
    /// incidents (not reopened ones), MTTA of `acked` at its first acknowledgement, MTTR
    /// of the `resolved`. Drills are skipped. Never fails: a read error is logged.
    pub(super) fn observe_kpis(&self, opened: &[i64], acked: &[i64], resolved: &[i64]) {
        let Some(m) = &self.kpi_metrics else {
            return;
        };
        if opened.is_empty() && acked.is_empty() && resolved.is_empty() {
            return;
        }
        let load = |id: i64| -> rusqlite::Result<Option<(Incident, i64, i64)>> {
            self.conn
                .prepare_cached(&format!(
                    "SELECT {INCIDENT_COLUMNS}, reopened,
                         (SELECT count(*) FROM timeline t WHERE t.incident_id = incidents.id AND t.kind = 'acknowledged')
                     FROM incidents WHERE id = ?1"
                ))?
                .query_row([id], |r| Ok((incident_from_row(r)?, r.get(18)?, r.get(19)?)))
                .optional()
        };
        let each = |ids: &[i64], f: &mut dyn FnMut(&Incident, i64, i64)| {
            for id in ids {
                match load(*id) {
                    Ok(Some((i, reopened, acks))) if !kpi::is_drill(&i.labels) => {
                        f(&i, reopened, acks);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(incident = id, error = %e, "cannot read the incident for the KPI histograms");
                    }
                }
            }
        };
        each(opened, &mut |i, reopened, _| {
            let k = kpi_incident(i, &[]);
            if let Some(s) = k.ttd_s().filter(|_| reopened == 0) {
                KpiMetrics::observe(&m.mttd, i.severity, s);
            }
        });
        each(acked, &mut |i, _, acks| {
            let k = kpi_incident(i, &[]);
            if let Some(s) = k.tta_s().filter(|_| acks == 1) {
                KpiMetrics::observe(&m.mtta, i.severity, s);
            }
        });
        each(resolved, &mut |i, _, _| {
            if let Some(s) = kpi_incident(i, &[]).ttr_s() {
                KpiMetrics::observe(&m.mttr, i.severity, s);
            }
        });
    }
}

/// An incident row and its `(at_ms, kind)` timeline entries (acknowledged, resolved,
/// reopened, recovery…, hook…; in order) as a [`KpiIncident`].
fn kpi_incident(i: &Incident, entries: &[(i64, String)]) -> KpiIncident {
    let first_ack = entries
        .iter()
        .find(|(_, k)| k == "acknowledged")
        .map(|(at, _)| *at)
        .or(i.acknowledged_at_ms);
    let recovery = entries
        .iter()
        .find(|(_, k)| kpi::is_recovery_kind(k))
        .map(|(at, _)| *at)
        .into_iter()
        .chain(first_ack)
        .min();
    let transitions: Vec<(i64, &str)> = entries.iter().map(|(at, k)| (*at, k.as_str())).collect();
    KpiIncident {
        id: i.id,
        service: kpi::service_of(&i.labels, &i.node),
        severity: i.severity,
        drill: kpi::is_drill(&i.labels),
        breach_started_at_ms: i.breach_started_at_ms,
        triggered_at_ms: i.triggered_at_ms,
        first_ack_ms: first_ack,
        recovery_started_ms: recovery,
        resolved_at_ms: i.resolved_at_ms,
        open_spans: kpi::open_spans(i.triggered_at_ms, i.resolved_at_ms, &transitions),
    }
}
