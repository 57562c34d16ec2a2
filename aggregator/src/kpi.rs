//! Incident KPIs (the seed's: MTTD, MTTA, MTTR, MTBF, availability, SLA compliance) and
//! post-mortem due dates, as pure functions over incident rows; and the MTTD/MTTA/MTTR
//! histograms of `/metrics`.
//!
//! This module owns the definitions; the store only loads [`KpiIncident`]s (one per
//! incident, with the few timeline times the definitions need) and the API renders the
//! [`KpiReport`]. No I/O, no clock: `now` is an argument.
//!
//! ## Definitions (all durations in seconds)
//! - **Service** of an incident: its `service` label (node and check labels merged), else
//!   its node (agent id). **Drill**: label `drill=true`; drills are reported apart and
//!   never count toward the other figures.
//! - **Severity** of an incident: the highest it reached (P1 above P2), not the one it
//!   had when it resolved: members recovering one by one may calm a P1 to a P2.
//! - An incident **counts** in a range `[since, until)` when it was opened
//!   (`triggered_at_ms`) in it. A reopened incident is one incident: opened at its first
//!   trigger, resolved at its last resolve.
//! - **MTTD** (mean time to detect): breach start on the node (`breach_started_at_ms`) →
//!   incident opened; incidents whose breach start is unknown (0) are left out; a node
//!   clock ahead of the aggregator's counts as 0.
//! - **MTTA** (acknowledge): opened → first acknowledgement (by a person).
//! - **MTTR** (resolve): opened → resolved; open incidents are left out.
//! - **MTBF** (between failures): mean gap between the starts of consecutive incidents of
//!   the same service within the range; a group pools the gaps of its services; none
//!   with fewer than two incidents per service.
//! - **Availability** of a service: the fraction of `[since, until)` (the part before
//!   `now`) in which no P1 or P2 incident of that service was open; open spans come from
//!   the timeline (triggered → resolved, reopened → resolved) and may start before
//!   `since`. Overall: the fraction in which no service had one.
//! - **Recovery started**: the first acknowledgement or the first timeline entry of a
//!   `recovery…` or `hook…` kind (a recovery hook ran), whichever comes first.
//! - **SLA** (the seed's targets): a P1's recovery starts within 15 minutes of opening;
//!   a P1 resolves within 1 hour, a P2 within 4 hours. Each incident is `met`,
//!   `breached` (late, or still not done past the target at `now`) or `pending` (not done
//!   yet, target not passed); `compliance` = met / (met + breached).

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::model::{Severity, rfc3339};

/// The seed's KPI targets (`📈 关键性能指标`), seconds unless named otherwise.
pub mod targets {
    /// MTTD < 5 minutes.
    pub const MTTD_S: f64 = 300.0;
    /// MTTA < 10 minutes.
    pub const MTTA_S: f64 = 600.0;
    /// MTTR of P1 < 1 hour.
    pub const MTTR_P1_S: f64 = 3600.0;
    /// MTTR of P2 < 4 hours.
    pub const MTTR_P2_S: f64 = 4.0 * 3600.0;
    /// MTBF > 720 hours (30 days).
    pub const MTBF_S: f64 = 720.0 * 3600.0;
    /// P1 recovery starts within 15 minutes.
    pub const P1_RECOVERY_START_S: f64 = 900.0;
    /// Availability 99.95 % (monthly), as a fraction.
    pub const AVAILABILITY: f64 = 0.9995;
    /// A post-mortem is due 48 hours after a P1/P2 resolves (`事后复盘: 48小时内完成`).
    pub const POSTMORTEM_DUE_MS: i64 = 48 * 3600 * 1000;
}

/// Label that marks a drill incident (value `true`).
pub const DRILL_LABEL: &str = "drill";
/// Label that names an incident's service (the one severity rules use).
pub const SERVICE_LABEL: &str = crate::correlate::SERVICE_LABEL;

/// The service of an incident: its `service` label, else its node.
pub fn service_of(labels: &BTreeMap<String, String>, node: &str) -> String {
    labels
        .get(SERVICE_LABEL)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| node.to_owned())
}

/// Whether the labels mark a drill (`drill=true`, case-insensitive).
pub fn is_drill(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(DRILL_LABEL)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// One incident as the KPIs see it (times in Unix ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KpiIncident {
    /// Incident id.
    pub id: i64,
    /// See [`service_of`].
    pub service: String,
    /// The highest severity it reached (a P1 that calms to P2 before it resolves is a
    /// P1 here).
    pub severity: Severity,
    /// See [`is_drill`].
    pub drill: bool,
    /// Breach start on the node; 0 when unknown.
    pub breach_started_at_ms: i64,
    /// Opened (first trigger).
    pub triggered_at_ms: i64,
    /// First acknowledgement (timeline `acknowledged`, else the incident's field).
    pub first_ack_ms: Option<i64>,
    /// See the module docs ("recovery started").
    pub recovery_started_ms: Option<i64>,
    /// Resolved (last resolve); `None` while open.
    pub resolved_at_ms: Option<i64>,
    /// Spans in which it was open: `(from, to)`, `to` `None` while open.
    pub open_spans: Vec<(i64, Option<i64>)>,
}

impl KpiIncident {
    /// Breach start → opened, seconds (`None` when the breach start is unknown).
    pub fn ttd_s(&self) -> Option<f64> {
        (self.breach_started_at_ms > 0)
            .then(|| secs((self.triggered_at_ms - self.breach_started_at_ms).max(0)))
    }

    /// Opened → first acknowledgement, seconds.
    pub fn tta_s(&self) -> Option<f64> {
        self.first_ack_ms
            .map(|a| secs((a - self.triggered_at_ms).max(0)))
    }

    /// Opened → resolved, seconds.
    pub fn ttr_s(&self) -> Option<f64> {
        self.resolved_at_ms
            .map(|r| secs((r - self.triggered_at_ms).max(0)))
    }

    /// Opened → recovery started, seconds.
    pub fn recovery_start_s(&self) -> Option<f64> {
        self.recovery_started_ms
            .map(|r| secs((r - self.triggered_at_ms).max(0)))
    }
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The open spans of an incident from its timeline: `transitions` are `(at_ms, kind)`
/// in timeline order; `resolved` and `reopened` entries close and open spans (others are
/// ignored). A span left open closes at `resolved_at_ms` when the incident is resolved.
pub fn open_spans(
    triggered_at_ms: i64,
    resolved_at_ms: Option<i64>,
    transitions: &[(i64, &str)],
) -> Vec<(i64, Option<i64>)> {
    let mut spans = Vec::new();
    let mut start = Some(triggered_at_ms);
    for (at, kind) in transitions {
        match (*kind, start) {
            ("resolved", Some(s)) => {
                spans.push((s, Some((*at).max(s))));
                start = None;
            }
            ("reopened", None) => start = Some(*at),
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, resolved_at_ms.map(|r| r.max(s))));
    }
    spans
}

/// Whether a timeline entry of `kind` means recovery started (see the module docs).
pub fn is_recovery_kind(kind: &str) -> bool {
    kind == "acknowledged" || kind.starts_with("recovery") || kind.starts_with("hook")
}

/// What the report covers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Query {
    /// Range start (Unix ms, inclusive).
    pub since_ms: i64,
    /// Range end (Unix ms, exclusive).
    pub until_ms: i64,
    /// Only this service.
    pub service: Option<String>,
    /// Only these severities (empty: all).
    pub severities: Vec<Severity>,
}

/// Count, mean, median and max of one duration, with its target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stat {
    /// Incidents (or gaps, for MTBF) measured.
    pub count: usize,
    /// Mean, seconds.
    pub mean_seconds: Option<f64>,
    /// Median, seconds.
    pub median_seconds: Option<f64>,
    /// Largest, seconds.
    pub max_seconds: Option<f64>,
    /// The seed's target, seconds (`None` where the seed sets none for this group).
    pub target_seconds: Option<f64>,
    /// Whether the mean meets the target (below it; above it for MTBF).
    pub met: Option<bool>,
}

impl Stat {
    fn of(mut values: Vec<f64>, target: Option<f64>, higher_is_better: bool) -> Stat {
        values.sort_by(f64::total_cmp);
        let count = values.len();
        let mean = (count > 0).then(|| values.iter().sum::<f64>() / count as f64);
        let median = (count > 0).then(|| {
            if count % 2 == 1 {
                values[count / 2]
            } else {
                (values[count / 2 - 1] + values[count / 2]) / 2.0
            }
        });
        let met = match (mean, target) {
            (Some(m), Some(t)) => Some(if higher_is_better { m > t } else { m < t }),
            _ => None,
        };
        Stat {
            count,
            mean_seconds: mean,
            median_seconds: median,
            max_seconds: values.last().copied(),
            target_seconds: target,
            met,
        }
    }
}

/// How many incidents met one SLA target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Compliance {
    /// Target, seconds.
    pub target_seconds: f64,
    /// Done within the target.
    pub met: usize,
    /// Done late, or not done and past the target at `now`.
    pub breached: usize,
    /// Not done, target not yet passed.
    pub pending: usize,
    /// `met / (met + breached)`; `None` when both are 0.
    pub compliance: Option<f64>,
}

impl Compliance {
    /// Classifies each `(opened_ms, done_after_s)` against `target_s` at `now_ms`.
    fn of(items: &[(i64, Option<f64>)], target_s: f64, now_ms: i64) -> Compliance {
        let (mut met, mut breached, mut pending) = (0, 0, 0);
        for (opened, done) in items {
            match done {
                Some(d) if *d <= target_s => met += 1,
                Some(_) => breached += 1,
                None if secs(now_ms - opened) > target_s => breached += 1,
                None => pending += 1,
            }
        }
        Compliance {
            target_seconds: target_s,
            met,
            breached,
            pending,
            compliance: (met + breached > 0).then(|| met as f64 / (met + breached) as f64),
        }
    }
}

/// SLA compliance of a group (the seed's targets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sla {
    /// P1 recovery started within 15 minutes.
    pub p1_recovery_started: Compliance,
    /// P1 resolved within 1 hour.
    pub p1_resolved: Compliance,
    /// P2 resolved within 4 hours.
    pub p2_resolved: Compliance,
}

/// The KPIs of one group of incidents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Incidents opened in the range.
    pub incidents: usize,
    /// Of those, still open.
    pub open: usize,
    /// Of those, resolved.
    pub resolved: usize,
    /// Breach start → opened.
    pub mttd: Stat,
    /// Opened → first acknowledgement.
    pub mtta: Stat,
    /// Opened → resolved (target: P1 1 h, P2 4 h; only in a one-severity group).
    pub mttr: Stat,
    /// Between incident starts of the same service.
    pub mtbf: Stat,
    /// Fraction 0–1 of the range without an open P1/P2 (service groups and overall).
    pub availability: Option<f64>,
    /// The seed's availability target (0.9995) where `availability` is given.
    pub availability_target: Option<f64>,
    /// SLA compliance.
    pub sla: Sla,
}

/// One section: overall, per severity, per service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    /// All incidents of the section.
    pub overall: Summary,
    /// Per severity (`P1` … `P4`, only those with incidents).
    pub by_severity: BTreeMap<String, Summary>,
    /// Per service (those with incidents, and the `service` asked for).
    pub by_service: BTreeMap<String, Summary>,
}

/// `GET /api/v1/kpi`: the KPIs of a range, drills apart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KpiReport {
    /// Range start, Unix ms (inclusive).
    pub since_ms: i64,
    /// Range end, Unix ms (exclusive).
    pub until_ms: i64,
    /// `since_ms` as RFC 3339.
    pub since: String,
    /// `until_ms` as RFC 3339.
    pub until: String,
    /// The service asked for, if any.
    pub service: Option<String>,
    /// The severities asked for (empty: all).
    pub severities: Vec<Severity>,
    /// Incidents that are not drills.
    #[serde(flatten)]
    pub incidents: Section,
    /// Drill incidents (label `drill=true`), the same figures.
    pub drills: Section,
}

/// The KPIs of `incidents` (any incident overlapping the range; see the module docs) for
/// `query`, judged at `now_ms`.
pub fn report(incidents: &[KpiIncident], query: &Query, now_ms: i64) -> KpiReport {
    let selected: Vec<&KpiIncident> = incidents
        .iter()
        .filter(|i| query.service.as_ref().is_none_or(|s| *s == i.service))
        .filter(|i| query.severities.is_empty() || query.severities.contains(&i.severity))
        .collect();
    let (drills, real): (Vec<&KpiIncident>, Vec<&KpiIncident>) =
        selected.into_iter().partition(|i| i.drill);
    KpiReport {
        since_ms: query.since_ms,
        until_ms: query.until_ms,
        since: rfc3339(query.since_ms),
        until: rfc3339(query.until_ms),
        service: query.service.clone(),
        severities: query.severities.clone(),
        incidents: section(&real, query, now_ms),
        drills: section(&drills, query, now_ms),
    }
}

fn section(incidents: &[&KpiIncident], q: &Query, now: i64) -> Section {
    let mut by_severity: BTreeMap<String, Vec<&KpiIncident>> = BTreeMap::new();
    let mut by_service: BTreeMap<String, Vec<&KpiIncident>> = BTreeMap::new();
    if let Some(s) = &q.service {
        by_service.insert(s.clone(), Vec::new());
    }
    for i in incidents {
        if counts(i, q) {
            by_severity
                .entry(i.severity.as_str().to_owned())
                .or_default()
                .push(i);
        }
        by_service.entry(i.service.clone()).or_default().push(i);
    }
    Section {
        overall: summary(incidents, q, now, None, true),
        by_severity: by_severity
            .into_iter()
            .map(|(sev, group)| {
                let s = summary(&group, q, now, Severity::parse(&sev), false);
                (sev, s)
            })
            .collect(),
        by_service: by_service
            .into_iter()
            .map(|(svc, group)| {
                let s = summary(&group, q, now, None, true);
                (svc, s)
            })
            .collect(),
    }
}

/// Whether `i` was opened in the range (and so counts in the figures).
fn counts(i: &KpiIncident, q: &Query) -> bool {
    (q.since_ms..q.until_ms).contains(&i.triggered_at_ms)
}

fn summary(
    all: &[&KpiIncident],
    q: &Query,
    now: i64,
    severity: Option<Severity>,
    with_availability: bool,
) -> Summary {
    let counted: Vec<&KpiIncident> = all.iter().copied().filter(|i| counts(i, q)).collect();
    let mttr_target = match severity {
        Some(Severity::P1) => Some(targets::MTTR_P1_S),
        Some(Severity::P2) => Some(targets::MTTR_P2_S),
        _ => None,
    };
    let of_sev = |s: Severity| counted.iter().filter(move |i| i.severity == s);
    let sla = Sla {
        p1_recovery_started: Compliance::of(
            &of_sev(Severity::P1)
                .map(|i| (i.triggered_at_ms, i.recovery_start_s()))
                .collect::<Vec<_>>(),
            targets::P1_RECOVERY_START_S,
            now,
        ),
        p1_resolved: Compliance::of(
            &of_sev(Severity::P1)
                .map(|i| (i.triggered_at_ms, i.ttr_s()))
                .collect::<Vec<_>>(),
            targets::MTTR_P1_S,
            now,
        ),
        p2_resolved: Compliance::of(
            &of_sev(Severity::P2)
                .map(|i| (i.triggered_at_ms, i.ttr_s()))
                .collect::<Vec<_>>(),
            targets::MTTR_P2_S,
            now,
        ),
    };
    let end = q.until_ms.min(now);
    let availability = with_availability
        .then(|| {
            let spans = all
                .iter()
                .filter(|i| matches!(i.severity, Severity::P1 | Severity::P2))
                .flat_map(|i| i.open_spans.iter().copied());
            up_fraction(spans, q.since_ms, end, now)
        })
        .flatten();
    Summary {
        incidents: counted.len(),
        open: counted
            .iter()
            .filter(|i| i.resolved_at_ms.is_none())
            .count(),
        resolved: counted
            .iter()
            .filter(|i| i.resolved_at_ms.is_some())
            .count(),
        mttd: Stat::of(
            counted.iter().filter_map(|i| i.ttd_s()).collect(),
            Some(targets::MTTD_S),
            false,
        ),
        mtta: Stat::of(
            counted.iter().filter_map(|i| i.tta_s()).collect(),
            Some(targets::MTTA_S),
            false,
        ),
        mttr: Stat::of(
            counted.iter().filter_map(|i| i.ttr_s()).collect(),
            mttr_target,
            false,
        ),
        mtbf: Stat::of(gaps(&counted), Some(targets::MTBF_S), true),
        availability,
        availability_target: availability.map(|_| targets::AVAILABILITY),
        sla,
    }
}

/// Gaps (seconds) between consecutive incident starts of the same service.
fn gaps(incidents: &[&KpiIncident]) -> Vec<f64> {
    let mut starts: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for i in incidents {
        starts
            .entry(i.service.as_str())
            .or_default()
            .push(i.triggered_at_ms);
    }
    starts
        .into_values()
        .flat_map(|mut s| {
            s.sort_unstable();
            s.windows(2).map(|w| secs(w[1] - w[0])).collect::<Vec<_>>()
        })
        .collect()
}

/// The fraction of `[since, end)` not covered by any of `spans` (an open span ends at
/// `now`); 1 for an empty range.
fn up_fraction(
    spans: impl Iterator<Item = (i64, Option<i64>)>,
    since: i64,
    end: i64,
    now: i64,
) -> Option<f64> {
    // An empty range, or one wholly in the future: nothing was measured.
    if end <= since {
        return None;
    }
    let mut clipped: Vec<(i64, i64)> = spans
        .map(|(a, b)| (a.max(since), b.unwrap_or(now).min(end)))
        .filter(|(a, b)| a < b)
        .collect();
    clipped.sort_unstable();
    let mut down = 0i64;
    let mut current: Option<(i64, i64)> = None;
    for (a, b) in clipped {
        current = match current {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                down += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((ca, cb)) = current {
        down += cb - ca;
    }
    Some(1.0 - down as f64 / (end - since) as f64)
}

/// `postmortem` of an incident in the API: due 48 hours after a P1/P2 resolves, until a
/// post-mortem is linked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PostmortemStatus {
    /// When it is due (RFC 3339); `None` when none is due (not a resolved P1/P2).
    pub due_at: Option<String>,
    /// `due_at` as Unix ms.
    pub due_at_ms: Option<i64>,
    /// URL of the linked post-mortem.
    pub linked: Option<String>,
    /// Due, not linked and past `due_at`.
    pub overdue: bool,
}

/// The post-mortem status of an incident of `severity` resolved at `resolved_at_ms`
/// with the `linked` URL, at `now_ms`: `None` when nothing is due and nothing linked.
pub fn postmortem_status(
    severity: Severity,
    resolved_at_ms: Option<i64>,
    linked: Option<&str>,
    now_ms: i64,
) -> Option<PostmortemStatus> {
    let due = resolved_at_ms
        .filter(|_| matches!(severity, Severity::P1 | Severity::P2))
        .map(|r| r.saturating_add(targets::POSTMORTEM_DUE_MS));
    if due.is_none() && linked.is_none() {
        return None;
    }
    Some(PostmortemStatus {
        due_at: due.map(rfc3339),
        due_at_ms: due,
        linked: linked.map(str::to_owned),
        overdue: linked.is_none() && due.is_some_and(|d| now_ms > d),
    })
}

/// Label of the KPI histograms.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    /// `P1` … `P4`.
    pub severity: &'static str,
}

/// Histogram buckets, seconds: 10 s to 1 day, dense around the seed's targets (5 min,
/// 10 min, 15 min, 1 h, 4 h).
pub const BUCKETS: [f64; 14] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    43200.0, 86400.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// `tocsin_incident_{mttd,mtta,mttr}_seconds{severity}`: observed by the store as it
/// commits the change, with the incident's severity at that moment — MTTA at the first
/// acknowledgement; MTTR each time it resolves (a reopened incident is observed again,
/// first opened → this resolve); MTTD at its first resolve (severity settled; an
/// incident still open is not in it yet). Drills are not observed. In memory: empty
/// after a restart (`/api/v1/kpi` computes from the store instead).
#[derive(Debug, Clone)]
pub struct KpiMetrics {
    /// Breach start → opened.
    pub mttd: Family<SeverityLabel, Histogram, fn() -> Histogram>,
    /// Opened → first acknowledgement.
    pub mtta: Family<SeverityLabel, Histogram, fn() -> Histogram>,
    /// Opened → resolved.
    pub mttr: Family<SeverityLabel, Histogram, fn() -> Histogram>,
}

impl KpiMetrics {
    /// Registers the three histograms (every severity's series exists from the start).
    pub fn register(registry: &mut Registry) -> Self {
        let new = || Family::new_with_constructor(histogram as fn() -> Histogram);
        let m = KpiMetrics {
            mttd: new(),
            mtta: new(),
            mttr: new(),
        };
        registry.register(
            "tocsin_incident_mttd_seconds",
            "Time to detect: breach start on the node to incident opened, by severity",
            m.mttd.clone(),
        );
        registry.register(
            "tocsin_incident_mtta_seconds",
            "Time to acknowledge: incident opened to first acknowledgement, by severity",
            m.mtta.clone(),
        );
        registry.register(
            "tocsin_incident_mttr_seconds",
            "Time to resolve: incident opened to resolved, by severity",
            m.mttr.clone(),
        );
        for sev in [Severity::P1, Severity::P2, Severity::P3, Severity::P4] {
            let l = SeverityLabel {
                severity: sev.as_str(),
            };
            for f in [&m.mttd, &m.mtta, &m.mttr] {
                drop(f.get_or_create(&l));
            }
        }
        m
    }

    /// Observes `seconds` in `family` for `severity`.
    pub fn observe(
        family: &Family<SeverityLabel, Histogram, fn() -> Histogram>,
        severity: Severity,
        seconds: f64,
    ) {
        family
            .get_or_create(&SeverityLabel {
                severity: severity.as_str(),
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    /// 2024-01-15T00:00:00Z.
    const T0: i64 = 1_705_276_800_000;

    fn inc(id: i64, service: &str, sev: Severity, opened: i64) -> KpiIncident {
        KpiIncident {
            id,
            service: service.into(),
            severity: sev,
            drill: false,
            breach_started_at_ms: 0,
            triggered_at_ms: opened,
            first_ack_ms: None,
            recovery_started_ms: None,
            resolved_at_ms: None,
            open_spans: vec![(opened, None)],
        }
    }

    fn resolved(mut i: KpiIncident, at: i64) -> KpiIncident {
        i.resolved_at_ms = Some(at);
        i.open_spans = vec![(i.triggered_at_ms, Some(at))];
        i
    }

    fn acked(mut i: KpiIncident, at: i64) -> KpiIncident {
        i.first_ack_ms = Some(at);
        i.recovery_started_ms = Some(i.recovery_started_ms.map_or(at, |r| r.min(at)));
        i
    }

    fn day() -> Query {
        Query {
            since_ms: T0,
            until_ms: T0 + 24 * HOUR,
            ..Query::default()
        }
    }

    #[test]
    fn service_is_the_label_else_the_node_and_drills_are_marked() {
        let mut l = BTreeMap::new();
        assert_eq!(service_of(&l, "web-1"), "web-1");
        l.insert("service".into(), "checkout".into());
        assert_eq!(service_of(&l, "web-1"), "checkout");
        assert!(!is_drill(&l));
        l.insert("drill".into(), "True".into());
        assert!(is_drill(&l));
        l.insert("drill".into(), "no".into());
        assert!(!is_drill(&l));
    }

    #[test]
    fn open_spans_follow_resolves_and_reopens() {
        assert_eq!(open_spans(10, None, &[]), vec![(10, None)]);
        assert_eq!(
            open_spans(10, Some(50), &[(20, "acknowledged"), (50, "resolved")]),
            vec![(10, Some(50))]
        );
        assert_eq!(
            open_spans(
                10,
                Some(90),
                &[(30, "resolved"), (60, "reopened"), (90, "resolved")]
            ),
            vec![(10, Some(30)), (60, Some(90))]
        );
        // Reopened and still open.
        assert_eq!(
            open_spans(10, None, &[(30, "resolved"), (60, "reopened")]),
            vec![(10, Some(30)), (60, None)]
        );
    }

    /// A known history: three P1/P2 incidents of `checkout` and one P3 of `web-2`, one
    /// drill, with every time chosen so the KPIs are exact.
    #[test]
    fn known_history_gives_exact_kpis() {
        let mut a = inc(1, "checkout", Severity::P1, T0 + HOUR);
        a.breach_started_at_ms = T0 + HOUR - 2 * MIN; // detected in 120 s
        let a = resolved(acked(a, T0 + HOUR + 5 * MIN), T0 + HOUR + 30 * MIN); // A 300 s, R 1800 s
        let mut b = inc(2, "checkout", Severity::P2, T0 + 5 * HOUR);
        b.breach_started_at_ms = T0 + 5 * HOUR - 4 * MIN; // 240 s
        let b = resolved(acked(b, T0 + 5 * HOUR + 15 * MIN), T0 + 10 * HOUR); // A 900 s, R 5 h
        let mut c = inc(3, "checkout", Severity::P1, T0 + 11 * HOUR);
        c.recovery_started_ms = Some(T0 + 11 * HOUR + 20 * MIN); // a hook, late
        let c = resolved(c, T0 + 11 * HOUR + 50 * MIN); // R 3000 s, no ack
        let d = inc(4, "web-2", Severity::P3, T0 + 23 * HOUR); // still open
        let mut drill = resolved(
            inc(5, "checkout", Severity::P1, T0 + 2 * HOUR),
            T0 + 3 * HOUR,
        );
        drill.drill = true;
        // Opened before the range, resolved 1 h into it: counts for availability only.
        let before = resolved(
            inc(6, "checkout", Severity::P2, T0 - 2 * HOUR),
            T0 + HOUR / 2,
        );
        let all = vec![a, b, c, d, drill, before];
        let now = T0 + 24 * HOUR;
        let r = report(&all, &day(), now);

        let o = &r.incidents.overall;
        assert_eq!((o.incidents, o.open, o.resolved), (4, 1, 3));
        assert_eq!(o.mttd.count, 2);
        assert_eq!(o.mttd.mean_seconds, Some(180.0));
        assert_eq!(o.mttd.met, Some(true));
        assert_eq!(o.mtta.count, 2);
        assert_eq!(o.mtta.mean_seconds, Some(600.0));
        assert_eq!(o.mtta.median_seconds, Some(600.0));
        assert_eq!(o.mtta.met, Some(false), "600 s is not below 600 s");
        assert_eq!(o.mttr.count, 3);
        assert_eq!(o.mttr.mean_seconds, Some((1800.0 + 18000.0 + 3000.0) / 3.0));
        assert_eq!(o.mttr.max_seconds, Some(18000.0));
        assert_eq!(
            o.mttr.target_seconds, None,
            "mixed severities: no single target"
        );
        // checkout starts at 1 h, 5 h, 11 h: gaps 4 h and 6 h; web-2 has one incident.
        assert_eq!(o.mtbf.count, 2);
        assert_eq!(o.mtbf.mean_seconds, Some(5.0 * 3600.0));
        assert_eq!(o.mtbf.met, Some(false));

        let p1 = &r.incidents.by_severity["P1"];
        assert_eq!(p1.incidents, 2);
        assert_eq!(p1.mttr.mean_seconds, Some(2400.0));
        assert_eq!(p1.mttr.target_seconds, Some(3600.0));
        assert_eq!(p1.mttr.met, Some(true));
        let p2 = &r.incidents.by_severity["P2"];
        assert_eq!(p2.mttr.mean_seconds, Some(18000.0));
        assert_eq!(p2.mttr.met, Some(false));

        // SLA: P1 #1 acked after 5 min (met), #3 recovery hook after 20 min (breached);
        // both resolved within 1 h; P2 #2 took 5 h (breached).
        let sla = &o.sla;
        assert_eq!(
            (
                sla.p1_recovery_started.met,
                sla.p1_recovery_started.breached
            ),
            (1, 1)
        );
        assert_eq!(sla.p1_recovery_started.compliance, Some(0.5));
        assert_eq!((sla.p1_resolved.met, sla.p1_resolved.breached), (2, 0));
        assert_eq!(sla.p1_resolved.compliance, Some(1.0));
        assert_eq!((sla.p2_resolved.met, sla.p2_resolved.breached), (0, 1));

        // checkout was down (P1/P2 open) 0:00–0:30 (#6), 1:00–1:30, 5:00–10:00,
        // 11:00–11:50: 6 h 50 min of 24 h. The drill does not count.
        let down = (30 + 30 + 300 + 50) as f64 / (24.0 * 60.0);
        let checkout = &r.incidents.by_service["checkout"];
        assert_eq!(checkout.incidents, 3);
        assert!((checkout.availability.unwrap_or(0.0) - (1.0 - down)).abs() < 1e-12);
        assert_eq!(checkout.availability_target, Some(0.9995));
        // web-2 only had a P3: fully available.
        assert_eq!(r.incidents.by_service["web-2"].availability, Some(1.0));
        assert!((o.availability.unwrap_or(0.0) - (1.0 - down)).abs() < 1e-12);

        // The drill is reported apart.
        assert_eq!(r.drills.overall.incidents, 1);
        assert_eq!(r.drills.overall.mttr.mean_seconds, Some(3600.0));
        assert_eq!(r.drills.by_service["checkout"].incidents, 1);
    }

    #[test]
    fn filters_select_service_and_severity() {
        let all = vec![
            resolved(inc(1, "checkout", Severity::P1, T0 + HOUR), T0 + 2 * HOUR),
            resolved(inc(2, "search", Severity::P2, T0 + HOUR), T0 + 3 * HOUR),
            inc(3, "search", Severity::P3, T0 + 4 * HOUR),
        ];
        let q = Query {
            service: Some("search".into()),
            ..day()
        };
        let r = report(&all, &q, T0 + 24 * HOUR);
        assert_eq!(r.incidents.overall.incidents, 2);
        assert_eq!(r.incidents.by_service.len(), 1);
        let q = Query {
            severities: vec![Severity::P1, Severity::P2],
            ..day()
        };
        let r = report(&all, &q, T0 + 24 * HOUR);
        assert_eq!(r.incidents.overall.incidents, 2);
        assert_eq!(
            r.incidents.by_severity.keys().collect::<Vec<_>>(),
            ["P1", "P2"]
        );
        // A service asked for with no incident is listed, fully available.
        let q = Query {
            service: Some("billing".into()),
            ..day()
        };
        let r = report(&all, &q, T0 + 24 * HOUR);
        assert_eq!(r.incidents.by_service["billing"].incidents, 0);
        assert_eq!(r.incidents.by_service["billing"].availability, Some(1.0));
        // Outside the range: nothing counts.
        let q = Query {
            since_ms: T0 + 30 * HOUR,
            until_ms: T0 + 40 * HOUR,
            ..Query::default()
        };
        assert_eq!(
            report(&all, &q, T0 + 50 * HOUR).incidents.overall.incidents,
            0
        );
    }

    #[test]
    fn open_incidents_are_pending_until_their_target_passes() {
        let p1 = inc(1, "checkout", Severity::P1, T0);
        let q = day();
        let early = report(std::slice::from_ref(&p1), &q, T0 + 10 * MIN);
        let sla = &early.incidents.overall.sla;
        assert_eq!(sla.p1_recovery_started.pending, 1);
        assert_eq!(sla.p1_resolved.pending, 1);
        assert_eq!(sla.p1_recovery_started.compliance, None);
        let late = report(std::slice::from_ref(&p1), &q, T0 + 20 * MIN);
        let sla = &late.incidents.overall.sla;
        assert_eq!(sla.p1_recovery_started.breached, 1);
        assert_eq!(sla.p1_resolved.pending, 1);
        // Availability stops at now: open for 20 of 20 minutes so far.
        assert_eq!(late.incidents.overall.availability, Some(0.0));
        // A range wholly in the future has no availability, not 100 %.
        let future = Query {
            since_ms: T0 + 30 * MIN,
            until_ms: T0 + 90 * MIN,
            ..q.clone()
        };
        let ahead = report(std::slice::from_ref(&p1), &future, T0 + 20 * MIN);
        assert_eq!(ahead.incidents.overall.availability, None);
        assert_eq!(ahead.incidents.overall.availability_target, None);
    }

    #[test]
    fn detection_time_ignores_unknown_breach_and_clamps_clock_skew() {
        let mut i = inc(1, "s", Severity::P2, T0);
        assert_eq!(i.ttd_s(), None);
        i.breach_started_at_ms = T0 + 5_000; // node clock ahead
        assert_eq!(i.ttd_s(), Some(0.0));
        i.breach_started_at_ms = T0 - 90_000;
        assert_eq!(i.ttd_s(), Some(90.0));
    }

    #[test]
    fn postmortems_are_due_48_hours_after_a_p1_or_p2_resolves() {
        assert_eq!(postmortem_status(Severity::P1, None, None, T0), None);
        assert_eq!(postmortem_status(Severity::P3, Some(T0), None, T0), None);
        let due = postmortem_status(Severity::P2, Some(T0), None, T0 + HOUR).expect("a status");
        assert_eq!(due.due_at_ms, Some(T0 + 48 * HOUR));
        assert_eq!(due.due_at.as_deref(), Some("2024-01-17T00:00:00.000Z"));
        assert!(!due.overdue);
        let late =
            postmortem_status(Severity::P1, Some(T0), None, T0 + 49 * HOUR).expect("a status");
        assert!(late.overdue);
        let linked = postmortem_status(
            Severity::P1,
            Some(T0),
            Some("https://wiki/pm/1"),
            T0 + 49 * HOUR,
        )
        .expect("a status");
        assert!(!linked.overdue);
        assert_eq!(linked.linked.as_deref(), Some("https://wiki/pm/1"));
        // A link on an incident that owes none is still shown.
        let extra = postmortem_status(Severity::P4, None, Some("https://x"), T0).expect("a status");
        assert_eq!(extra.due_at, None);
    }

    #[test]
    fn recovery_kinds() {
        assert!(is_recovery_kind("acknowledged"));
        assert!(is_recovery_kind("hook"));
        assert!(is_recovery_kind("hook_started"));
        assert!(is_recovery_kind("recovery"));
        assert!(!is_recovery_kind("triggered"));
        assert!(!is_recovery_kind("notified"));
    }
}
