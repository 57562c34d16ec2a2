//! Store queries for the KPIs, filtered incident lists, post-mortem links and the
//! one-screen status; and the KPI histograms observed as changes commit. The KPI
//! definitions themselves live in [`crate::kpi`]; this file only loads rows.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{OptionalExtension, params};

use super::{
    Change, INCIDENT_COLUMN_COUNT, INCIDENT_COLUMNS, Store, StoreError, incident_from_row, timeline,
};
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
    /// 48 hours (due) and before that (overdue); drill incidents (`drill=true`) owe none.
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
        let rows: Vec<(Incident, String)> = self
            .conn
            .prepare(&format!(
                "SELECT {INCIDENT_COLUMNS}, peak_severity FROM incidents
                 WHERE triggered_at_ms < ?2 AND (resolved_at_ms IS NULL OR resolved_at_ms >= ?1)
                 ORDER BY id LIMIT ?3"
            ))
            .and_then(|mut st| {
                st.query_map(params![since_ms, until_ms, MAX_KPI_ROWS], |r| {
                    Ok((incident_from_row(r)?, r.get(INCIDENT_COLUMN_COUNT)?))
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
            .map(|(i, peak)| {
                let e = entries.remove(&i.id).unwrap_or_default();
                kpi_incident(&i, &peak, &e)
            })
            .collect())
    }

    /// The highest severity each of `ids` reached (see `peak_severity` in the schema).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn peak_severities(&self, ids: &[i64]) -> Result<HashMap<i64, Severity>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT peak_severity, severity FROM incidents WHERE id = ?1")
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for id in ids {
            let row: Option<(String, String)> = st
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(|e| self.err(e))?;
            if let Some((peak, sev)) = row
                && let Some(s) = Severity::parse(&peak).or_else(|| Severity::parse(&sev))
            {
                out.insert(*id, s);
            }
        }
        Ok(out)
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
            &format!("api:{by}"),
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
                 WHERE status = 'resolved' AND peak_severity IN ('P1', 'P2')
                   AND lower(coalesce(json_extract(i.labels, '$.drill'), '')) != 'true'
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

    /// Observes the KPI histograms for what just committed: MTTA of `acked` at its
    /// first acknowledgement; MTTR of the `resolved` and, at an incident's first resolve
    /// (its severity has settled by then), its MTTD. Drills are skipped. Never fails: a
    /// read error is logged.
    pub(super) fn observe_kpis(&self, acked: &[i64], resolved: &[i64]) {
        let Some(m) = &self.kpi_metrics else {
            return;
        };
        type Loaded = (Incident, i64, i64, String);
        let load = |id: i64| -> rusqlite::Result<Option<Loaded>> {
            self.conn
                .prepare_cached(&format!(
                    "SELECT {INCIDENT_COLUMNS}, reopened,
                         (SELECT count(*) FROM timeline t WHERE t.incident_id = incidents.id AND t.kind = 'acknowledged'),
                         peak_severity
                     FROM incidents WHERE id = ?1"
                ))?
                .query_row([id], |r| {
                    Ok((
                        incident_from_row(r)?,
                        r.get(INCIDENT_COLUMN_COUNT)?,
                        r.get(INCIDENT_COLUMN_COUNT + 1)?,
                        r.get(INCIDENT_COLUMN_COUNT + 2)?,
                    ))
                })
                .optional()
        };
        let each = |ids: &[i64], f: &mut dyn FnMut(&KpiIncident, i64, i64)| {
            for id in ids {
                match load(*id) {
                    Ok(Some((i, reopened, acks, peak))) if !kpi::is_drill(&i.labels) => {
                        f(&kpi_incident(&i, &peak, &[]), reopened, acks);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(incident = id, error = %e, "cannot read the incident for the KPI histograms");
                    }
                }
            }
        };
        each(acked, &mut |k, _, acks| {
            if let Some(s) = k.tta_s().filter(|_| acks == 1) {
                KpiMetrics::observe(&m.mtta, k.severity, s);
            }
        });
        each(resolved, &mut |k, reopened, _| {
            if let Some(s) = k.ttr_s() {
                KpiMetrics::observe(&m.mttr, k.severity, s);
            }
            if let Some(s) = k.ttd_s().filter(|_| reopened == 0) {
                KpiMetrics::observe(&m.mttd, k.severity, s);
            }
        });
    }
}

/// An incident row, its peak severity (`''` when unknown: the current one) and its
/// `(at_ms, kind)` timeline entries (acknowledged, resolved, reopened, recovery…,
/// hook…; in order) as a [`KpiIncident`].
fn kpi_incident(i: &Incident, peak: &str, entries: &[(i64, String)]) -> KpiIncident {
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
        severity: Severity::parse(peak).unwrap_or(i.severity),
        drill: kpi::is_drill(&i.labels),
        breach_started_at_ms: i.breach_started_at_ms,
        triggered_at_ms: i.triggered_at_ms,
        first_ack_ms: first_ack,
        recovery_started_ms: recovery,
        resolved_at_ms: i.resolved_at_ms,
        open_spans: kpi::open_spans(i.triggered_at_ms, i.resolved_at_ms, &transitions),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{AgentHello, Event, State};

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    /// 2024-01-15T00:00:00Z.
    const T0: i64 = 1_705_276_800_000;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), vec!["t".into()]).expect("open");
        (dir, s)
    }

    /// Inserts an incident with known times and its timeline `(at, kind)`.
    #[expect(clippy::too_many_arguments, reason = "one row of a test history")]
    fn insert(
        s: &Store,
        node: &str,
        labels: &[(&str, &str)],
        severity: &str,
        breach: i64,
        triggered: i64,
        acknowledged: Option<i64>,
        resolved: Option<i64>,
        entries: &[(i64, &str)],
    ) -> i64 {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let status = if resolved.is_some() {
            "resolved"
        } else if acknowledged.is_some() {
            "acknowledged"
        } else {
            "triggered"
        };
        s.conn
            .execute(
                "INSERT INTO incidents (fingerprint, node, check_name, labels, severity, status, state, unit,
                     summary, breach_started_at_ms, triggered_at_ms, acknowledged_at_ms, resolved_at_ms)
                 VALUES (?1 || '/http', ?1, 'http', ?2, ?3, ?4, 'critical', '', 'http failing', ?5, ?6, ?7, ?8)",
                params![
                    node,
                    serde_json::to_string(&labels).expect("json"),
                    severity,
                    status,
                    breach,
                    triggered,
                    acknowledged,
                    resolved
                ],
            )
            .expect("insert");
        let id = s.conn.last_insert_rowid();
        timeline(&s.conn, id, triggered, "triggered", "agent:x", "").expect("timeline");
        for (at, kind) in entries {
            timeline(&s.conn, id, *at, kind, "x", "").expect("timeline");
        }
        id
    }

    #[test]
    fn a_known_history_loads_and_reports_exact_kpis() {
        let (_dir, mut s) = store();
        let checkout = [("service", "checkout")];
        // P1: breach 10 min before opening; a hook at +2 min, acknowledged at +5 min,
        // resolved at +30 min.
        let p1 = insert(
            &s,
            "web-1",
            &checkout,
            "P1",
            T0 + HOUR - 10 * MIN,
            T0 + HOUR,
            Some(T0 + HOUR + 5 * MIN),
            Some(T0 + HOUR + 30 * MIN),
            &[
                (T0 + HOUR + 2 * MIN, "hook"),
                (T0 + HOUR + 5 * MIN, "acknowledged"),
                (T0 + HOUR + 30 * MIN, "resolved"),
            ],
        );
        // P2: resolved after 30 min, reopened 30 min later, resolved for good at +2 h.
        let p2 = insert(
            &s,
            "web-2",
            &checkout,
            "P2",
            0,
            T0 + 5 * HOUR,
            None,
            Some(T0 + 7 * HOUR),
            &[
                (T0 + 5 * HOUR + 30 * MIN, "resolved"),
                (T0 + 6 * HOUR, "reopened"),
                (T0 + 7 * HOUR, "resolved"),
            ],
        );
        let drill = insert(
            &s,
            "web-3",
            &[("service", "checkout"), ("drill", "true")],
            "P1",
            T0 + 9 * HOUR - MIN,
            T0 + 9 * HOUR,
            None,
            Some(T0 + 9 * HOUR + 20 * MIN),
            &[(T0 + 9 * HOUR + 20 * MIN, "resolved")],
        );
        // Before the range: not loaded.
        insert(
            &s,
            "db-1",
            &[],
            "P2",
            0,
            T0 - 3 * HOUR,
            None,
            Some(T0 - 2 * HOUR),
            &[(T0 - 2 * HOUR, "resolved")],
        );
        // Still open, on a node without a service label.
        let open = insert(&s, "db-1", &[], "P3", 0, T0 + 20 * HOUR, None, None, &[]);

        let rows = s.kpi_incidents(T0, T0 + 24 * HOUR).expect("rows");
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [p1, p2, drill, open]
        );
        let r1 = &rows[0];
        assert_eq!(r1.service, "checkout");
        assert_eq!(r1.first_ack_ms, Some(T0 + HOUR + 5 * MIN));
        assert_eq!(
            r1.recovery_started_ms,
            Some(T0 + HOUR + 2 * MIN),
            "the hook"
        );
        assert_eq!(r1.ttd_s(), Some(600.0));
        assert_eq!(
            rows[1].open_spans,
            [
                (T0 + 5 * HOUR, Some(T0 + 5 * HOUR + 30 * MIN)),
                (T0 + 6 * HOUR, Some(T0 + 7 * HOUR))
            ]
        );
        assert!(rows[2].drill);
        assert_eq!(rows[3].service, "db-1");

        let q = kpi::Query {
            since_ms: T0,
            until_ms: T0 + 24 * HOUR,
            ..kpi::Query::default()
        };
        let r = kpi::report(&rows, &q, T0 + 24 * HOUR);
        let o = &r.incidents.overall;
        assert_eq!((o.incidents, o.open, o.resolved), (3, 1, 2));
        assert_eq!(o.mttd.mean_seconds, Some(600.0));
        assert_eq!(o.mtta.mean_seconds, Some(300.0));
        assert_eq!(o.mttr.mean_seconds, Some((1800.0 + 7200.0) / 2.0));
        assert_eq!(
            o.mtbf.mean_seconds,
            Some(4.0 * 3600.0),
            "checkout: 1 h → 5 h"
        );
        assert_eq!(o.sla.p1_recovery_started.met, 1);
        assert_eq!(o.sla.p1_resolved.met, 1);
        assert_eq!(o.sla.p2_resolved.met, 1, "2 h is within 4 h");
        // checkout: P1 30 min, P2 30 min + 1 h (not the 30 min between): 2 h of 24 h.
        let checkout = &r.incidents.by_service["checkout"];
        assert_eq!(checkout.availability, Some(1.0 - 2.0 / 24.0));
        assert_eq!(r.incidents.by_service["db-1"].availability, Some(1.0));
        assert_eq!(r.drills.overall.incidents, 1);
        assert_eq!(r.drills.overall.mttd.mean_seconds, Some(60.0));

        // Filtered lists.
        let q = |statuses: Vec<Status>, severities: Vec<Severity>, since: Option<i64>| {
            s.incidents_where(&IncidentQuery {
                statuses,
                severities,
                since_ms: since,
                limit: 100,
            })
            .expect("list")
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>()
        };
        assert_eq!(q(vec![Status::Triggered], vec![], None), [open]);
        assert_eq!(q(vec![], vec![Severity::P1], None), [drill, p1]);
        assert_eq!(
            q(vec![Status::Resolved], vec![Severity::P2], Some(T0)),
            [p2]
        );
        assert_eq!(q(vec![], vec![], Some(T0 + 10 * HOUR)), [open]);

        // Post-mortems: every resolved P1/P2 (the one before the range too) but the
        // drill, which owes none.
        let now = T0 + 24 * HOUR;
        let c = s.status_counts(now).expect("counts");
        assert_eq!((c.postmortems_due, c.postmortems_overdue), (3, 0));
        assert_eq!(c.open["P3"]["triggered"], 1);
        let later = s.status_counts(T0 + 60 * HOUR).expect("counts");
        assert_eq!(later.postmortems_overdue, 3, "48 h after each resolve");
        assert_eq!(
            s.link_postmortem(p1, "https://wiki.example/pm/1", "alice")
                .expect("link"),
            Change::Done
        );
        assert!(matches!(
            s.link_postmortem(p1, "https://wiki.example/pm/1", "alice")
                .expect("link"),
            Change::Unchanged(_)
        ));
        assert_eq!(
            s.link_postmortem(999, "https://x", "alice").expect("link"),
            Change::NotFound
        );
        let links = s.postmortem_links(&[p1, p2]).expect("links");
        assert_eq!(links[&p1].url, "https://wiki.example/pm/1");
        assert!(!links.contains_key(&p2));
        assert_eq!(s.status_counts(now).expect("counts").postmortems_due, 2);
        let detail = s.incident(p1).expect("detail").expect("found");
        assert!(
            detail
                .timeline
                .iter()
                .any(|t| t.kind == "postmortem" && t.actor == "api:alice"),
            "{:?}",
            detail.timeline
        );
    }

    fn hello() -> AgentHello {
        AgentHello {
            agent_id: "web-1".into(),
            hostname: "web-1".into(),
            labels: BTreeMap::new(),
            version: "test".into(),
            boot_id: String::new(),
            instance_id: "i1".into(),
            heartbeat_interval_ms: 1000,
        }
    }

    fn event(seq: u64, state: State, breach: i64) -> Event {
        Event {
            seq,
            check: "cpu".into(),
            labels: BTreeMap::new(),
            state,
            previous: State::Ok,
            value: Some(99.0),
            unit: "percent".into(),
            threshold: Some(95.0),
            message: format!("cpu {}", state.as_str()),
            observed_at_ms: now_ms(),
            breach_started_at_ms: breach,
            flapping: false,
        }
    }

    fn sample(registry: &prometheus_client::registry::Registry, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[test]
    fn histograms_are_observed_as_changes_commit() {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = KpiMetrics::register(&mut registry);
        let (_dir, s) = store();
        let mut s = s.with_kpi_metrics(m);
        s.hello(&hello(), 1).expect("hello");
        let breach = now_ms() - 60_000;
        let out = s
            .ingest("web-1", &[event(1, State::Critical, breach)])
            .expect("ingest");
        let id = out.opened[0];
        let count = |s: &str| sample(&registry, s);
        let p2 = |name: &str| count(&format!("tocsin_incident_{name}{{severity=\"P2\"}}"));
        // Nothing yet: MTTD waits for the first resolve, when the severity has settled.
        assert_eq!(p2("mttd_seconds_count"), 0.0);
        assert_eq!(p2("mtta_seconds_count"), 0.0);
        s.acknowledge(id, "alice", "").expect("ack");
        s.acknowledge(id, "alice", "")
            .expect("ack again: unchanged");
        assert_eq!(p2("mtta_seconds_count"), 1.0);
        s.ingest("web-1", &[event(2, State::Ok, 0)]).expect("clear");
        assert_eq!(p2("mttr_seconds_count"), 1.0);
        assert_eq!(p2("mttd_seconds_count"), 1.0);
        let ttd = p2("mttd_seconds_sum");
        assert!((60.0..70.0).contains(&ttd), "breach 60 s before: {ttd}");
        assert_eq!(
            count("tocsin_incident_mttr_seconds_count{severity=\"P1\"}"),
            0.0
        );
    }
}
