//! Drills (`tocsin drill NODE SCENARIO`): a fault injected for real on a node by its
//! agent, and a measured report of what the whole path did with it.
//!
//! The aggregator sends a `DrillCommand` down the node's stream ([`DrillHub`]); the
//! agent runs it only if its `[drills] allow` names the scenario, else it answers
//! `refused: drills not allowed on this node`. During the drill window the node carries
//! the drill mark (kept on the `drills` row, not in the node's labels, so an agent that
//! reconnects mid-drill keeps it; see `store::drills`): its incidents get the labels
//! `drill=true` and `drill_id=<id>`, say `[DRILL]` before their summary in every
//! notification and are reported apart by the KPIs.
//!
//! **Drills never page the real P1 path unless asked** (`route::DrillPaging`): with
//! `[drills] channels = [...]` in the aggregator's config, drill incidents are paged to
//! those channels only (no escalation, no repeat); without it they take the real routes
//! as if their severity were at most P2 (routes, escalation target and storm guard of a
//! P2; the incident and the report keep the real severity). A drill run with
//! `--page-real` (API `"page_real": true`, recorded on the `drills` row) takes the real
//! routes at the real severity, P1 included — still `[DRILL]`.
//!
//! **The aggregator dying mid-drill**: the run dies with it; at the next start the row
//! left `running` is stamped, its mark lasts until the end of its window (the fault may
//! still be injected), and it then ends as `interrupted` (`store::drills`).
//!
//! Each scenario is measured from the moment the agent injected the fault: time to
//! detect (the first firing event of the expected check stored; for `node_down`, the
//! liveness sweep opening the incident), to incident opened, to notification delivered
//! (a trigger's `outbox.delivered_ms`), to recovery hook started (`hook_runs`), to
//! resolve. Expected steps: detect, incident, notification, resolve; the hook is reported
//! when one ran. A drill passes when every expected step happened within its wait; a
//! drill whose notification never arrived has failed, and its report says so first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tocsin_proto::v1::{self, aggregator_message};
use tokio::sync::mpsc;
use tonic::Status;

use crate::model::now_ms;
use crate::store::StoreHandle;
use crate::store::drills::Observed;

/// The scenarios, in the order `all` runs them.
pub const SCENARIOS: [&str; 4] = ["process_crash", "high_load", "dependency_down", "node_down"];

/// Default fault duration.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(20);

/// Longest fault a drill may ask for (the agent caps it too).
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// Default time after the fault to wait for the remaining steps (resolve above all).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// How long the agent has to answer a command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

type Outbound = mpsc::Sender<Result<v1::AggregatorMessage, Status>>;

/// The connected agents' streams, for drill commands, and the drills awaiting answers.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DrillHub {
    inner: Arc<Mutex<Hub>>,
}

#[derive(Debug, Default)]
struct Hub {
    /// Agent id → (stream number, its outbound channel).
    agents: HashMap<String, (u64, Outbound)>,
    /// Drill id → where its agent's reports go.
    waiting: HashMap<i64, mpsc::UnboundedSender<v1::DrillReport>>,
}

impl DrillHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Agent `agent` is connected on stream `session`, answering through `tx`.
    pub fn register(&self, agent: &str, session: u64, tx: Outbound) {
        self.lock().agents.insert(agent.to_owned(), (session, tx));
    }

    /// Stream `session` of `agent` ended (a newer stream of the agent stays).
    pub fn unregister(&self, agent: &str, session: u64) {
        let mut hub = self.lock();
        if hub.agents.get(agent).is_some_and(|(s, _)| *s == session) {
            hub.agents.remove(agent);
        }
    }

    /// A report from an agent.
    pub fn report(&self, agent: &str, r: v1::DrillReport) {
        tracing::info!(agent, drill = r.drill_id, accepted = r.accepted, done = r.done, message = %r.message, "drill report");
        if let Some(tx) = self.lock().waiting.get(&r.drill_id) {
            let _ = tx.send(r);
        }
    }

    /// Sends `cmd` to `node`; returns the receiver of its reports.
    async fn send(
        &self,
        node: &str,
        cmd: v1::DrillCommand,
    ) -> Result<mpsc::UnboundedReceiver<v1::DrillReport>, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = {
            let mut hub = self.lock();
            let Some((_, out)) = hub.agents.get(node).cloned() else {
                return Err(format!("node {node} is not connected"));
            };
            hub.waiting.insert(cmd.drill_id, tx);
            out
        };
        let m = v1::AggregatorMessage {
            msg: Some(aggregator_message::Msg::Drill(cmd)),
        };
        out.send(Ok(m))
            .await
            .map_err(|_| format!("node {node} disconnected"))?;
        Ok(rx)
    }

    fn done(&self, drill_id: i64) {
        self.lock().waiting.remove(&drill_id);
    }
}

/// A drill to run.
#[derive(Debug, Clone)]
pub struct DrillRequest {
    /// Agent id of the node.
    pub node: String,
    /// A scenario of [`SCENARIOS`] or `all`.
    pub scenario: String,
    /// How long the fault lasts.
    pub duration: Duration,
    /// How long after the fault the remaining steps may take.
    pub wait: Duration,
    /// `process_crash`: the process watch (empty: the agent's first).
    pub target: String,
    /// Who runs it.
    pub by: String,
    /// Page the real routes at the real severity, P1 included (`--page-real`).
    pub page_real: bool,
}

/// Extra time after the last scenario's window before the mark lapses on its own (when
/// the run died with the aggregator).
pub const MARK_MARGIN: Duration = Duration::from_secs(5);

/// End of the drill window of `req` running `scenarios` scenarios from `started_ms`
/// (Unix ms): per scenario the agent's answer time, the fault and the wait, plus
/// [`MARK_MARGIN`]. The drill mark lasts until then at most.
pub fn window_end(started_ms: i64, req: &DrillRequest, scenarios: usize) -> i64 {
    let per = ANSWER_TIMEOUT + req.duration + req.wait;
    let total = per * u32::try_from(scenarios).unwrap_or(u32::MAX) + MARK_MARGIN;
    started_ms.saturating_add(i64::try_from(total.as_millis()).unwrap_or(i64::MAX))
}

/// One measured step: when it happened and how long after the fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// `detect`, `incident`, `notification`, `hook` or `resolve`.
    pub step: &'static str,
    /// Whether this step must happen for the drill to pass.
    pub expected: bool,
    /// Whether it happened.
    pub happened: bool,
    /// When (Unix ms).
    pub at_ms: Option<i64>,
    /// Seconds after the fault was injected.
    pub after_s: Option<f64>,
}

/// The result of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub scenario: String,
    /// The check whose incident was expected (`process:%` is any check of a watch).
    pub check: String,
    /// `passed`, `failed` or `refused`.
    pub status: String,
    /// What the agent said (what it did, or why it refused).
    pub agent: String,
    /// When the fault was injected (agent clock, Unix ms; 0 when refused).
    pub injected_ms: i64,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// What the store saw.
    pub observed: Observed,
    /// Why it failed, loudest first (empty when it passed).
    pub problems: Vec<String>,
}

/// The report of a drill (`POST /api/v1/drills`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillReport {
    /// Drill id (`drills` table).
    pub id: i64,
    /// Node.
    pub node: String,
    /// Scenario asked for.
    pub scenario: String,
    /// Who ran it.
    pub started_by: String,
    /// Start and end, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms.
    pub ended_ms: i64,
    /// `passed`, `failed` (a step missing) or `refused` (not run); a drill whose run died
    /// with the aggregator ends `interrupted` (`store::drills`).
    pub status: String,
    /// Whether its incidents took the real routes at their real severity (`--page-real`).
    pub page_real: bool,
    /// How its incidents were paged: `drill channels: a, b`, `real routes, at most P2`
    /// or `real routes, real severity (--page-real)`.
    pub paging: String,
    /// Whether some scenario's notification never arrived (the loudest failure).
    pub notification_missing: bool,
    /// One per scenario run.
    pub scenarios: Vec<ScenarioReport>,
}

/// Why a drill could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Bad request (unknown scenario, duration out of range).
    #[error("{0}")]
    Invalid(String),
    /// The node is unknown or not connected.
    #[error("{0}")]
    NotConnected(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The incident check expected for `scenario` (a SQL `LIKE` pattern): `process:%` (a
/// process watch), `cpu`, `tcp:%` (`dependency_down`; with a `target`, the check of that
/// name: `tcp:TARGET` or `http:TARGET`) or `node_down`.
fn expected_check(scenario: &str, target: &str) -> String {
    match scenario {
        "process_crash" => "process:%".to_owned(),
        "high_load" => "cpu".to_owned(),
        "dependency_down" if target.is_empty() => "tcp:%".to_owned(),
        "dependency_down" => format!("%:{}", target.replace(['%', '_'], "")),
        _ => crate::correlate::NODE_DOWN.to_owned(),
    }
}

/// Runs `req` to the end and records it; returns the report.
///
/// # Errors
/// [`DrillError`] when it cannot start; a refusal or a missing step is a report.
pub async fn run(
    store: &StoreHandle,
    hub: &DrillHub,
    req: DrillRequest,
) -> Result<DrillReport, DrillError> {
    let scenarios: Vec<&str> = if req.scenario == "all" {
        SCENARIOS.to_vec()
    } else if let Some(s) = SCENARIOS.iter().find(|s| **s == req.scenario) {
        vec![*s]
    } else {
        return Err(DrillError::Invalid(format!(
            "unknown scenario {:?}: use {} or all",
            req.scenario,
            SCENARIOS.join(", ")
        )));
    };
    if req.duration.is_zero() || req.duration > MAX_DURATION {
        return Err(DrillError::Invalid(format!(
            "duration {:?} must be above 0 and at most 600s",
            req.duration
        )));
    }
    if !hub.lock().agents.contains_key(&req.node) {
        return Err(DrillError::NotConnected(format!(
            "node {} is not connected",
            req.node
        )));
    }
    let started = now_ms();
    let until = window_end(started, &req, scenarios.len());
    let (node, scenario, by) = (req.node.clone(), req.scenario.clone(), req.by.clone());
    let page_real = req.page_real;
    let id = store
        .call(move |s| s.drill_begin(&node, &scenario, &by, started, until, page_real))
        .await?;
    let paging = if req.page_real {
        "real routes, real severity (--page-real)".to_owned()
    } else {
        let channels = store
            .call(|s| Ok(s.drill_channels()))
            .await
            .unwrap_or_default();
        if channels.is_empty() {
            "real routes, at most P2".to_owned()
        } else {
            format!("drill channels: {}", channels.join(", "))
        }
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        let r = run_one(store, hub, &req, id, scenario).await;
        let refused = r.status == "refused";
        reports.push(r);
        if refused {
            break;
        }
    }
    let status = if reports.iter().any(|r| r.status == "refused") {
        "refused"
    } else if reports.iter().all(|r| r.status == "passed") {
        "passed"
    } else {
        "failed"
    };
    let report = DrillReport {
        id,
        node: req.node.clone(),
        scenario: req.scenario.clone(),
        started_by: req.by.clone(),
        started_ms: started,
        ended_ms: now_ms(),
        status: status.to_owned(),
        page_real: req.page_real,
        paging,
        notification_missing: reports.iter().any(|r| {
            r.status != "refused"
                && r.steps
                    .iter()
                    .any(|s| s.step == "notification" && !s.happened)
        }),
        scenarios: reports,
    };
    let json = serde_json::to_value(&report).unwrap_or_default();
    let (ended, st) = (report.ended_ms, status.to_owned());
    store
        .call(move |s| s.drill_end(id, ended, &st, &json))
        .await?;
    if report.notification_missing {
        tracing::error!(drill = id, node = %report.node, "DRILL FAILED: a notification never arrived");
    }
    Ok(report)
}

async fn run_one(
    store: &StoreHandle,
    hub: &DrillHub,
    req: &DrillRequest,
    id: i64,
    scenario: &str,
) -> ScenarioReport {
    let check = expected_check(scenario, &req.target);
    let mut report = ScenarioReport {
        scenario: scenario.to_owned(),
        check: check.clone(),
        status: "refused".to_owned(),
        agent: String::new(),
        injected_ms: 0,
        steps: Vec::new(),
        observed: Observed::default(),
        problems: Vec::new(),
    };
    let cmd = v1::DrillCommand {
        drill_id: id,
        scenario: scenario.to_owned(),
        duration_ms: u32::try_from(req.duration.as_millis()).unwrap_or(u32::MAX),
        target: req.target.clone(),
    };
    let since = now_ms();
    let mut rx = match hub.send(&req.node, cmd).await {
        Ok(rx) => rx,
        Err(e) => {
            report.agent = e.clone();
            report.problems.push(e);
            return report;
        }
    };
    let first = tokio::time::timeout(ANSWER_TIMEOUT, rx.recv()).await;
    let first = match first {
        Ok(Some(r)) => r,
        _ => {
            hub.done(id);
            report.agent = "no answer from the agent".to_owned();
            report.problems.push(report.agent.clone());
            return report;
        }
    };
    report.agent = first.message.clone();
    if !first.accepted {
        hub.done(id);
        report.problems.push(first.message);
        return report;
    }
    report.injected_ms = first.injected_at_ms;
    let from = since.min(first.injected_at_ms);
    let deadline = tokio::time::Instant::now() + req.duration + req.wait;
    let node = req.node.clone();
    let mut agent_done = first.done;
    loop {
        let (n, c) = (node.clone(), check.clone());
        if let Ok(o) = store.call(move |s| s.drill_observe(&n, &c, from)).await {
            report.observed = o;
        }
        let o = &report.observed;
        if agent_done && o.resolved_ms.is_some() && o.notified_ms.is_some() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            r = rx.recv(), if !agent_done => match r {
                Some(r) if r.done => {
                    agent_done = true;
                    if !r.message.is_empty() {
                        report.agent = r.message;
                    }
                }
                Some(_) => {}
                None => agent_done = true,
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    hub.done(id);
    let o = &report.observed;
    let base = report.injected_ms;
    let step = |name: &'static str, expected: bool, at: Option<i64>| Step {
        step: name,
        expected,
        happened: at.is_some(),
        at_ms: at,
        after_s: at.map(|t| (t - base).max(0) as f64 / 1000.0),
    };
    report.steps = vec![
        step("detect", true, o.detected_ms),
        step("incident", true, o.incident_ms),
        step("notification", true, o.notified_ms),
        step("hook", false, o.hook_ms),
        step("resolve", true, o.resolved_ms),
    ];
    if o.notified_ms.is_none() {
        report.problems.push(format!(
            "NO NOTIFICATION ARRIVED for the {scenario} incident ({} queued, none delivered)",
            o.notifications
        ));
    }
    for s in &report.steps {
        if s.expected && !s.happened && s.step != "notification" {
            report
                .problems
                .push(format!("step {} never happened", s.step));
        }
    }
    report.status = if report.problems.is_empty() {
        "passed"
    } else {
        "failed"
    }
    .to_owned();
    report
}

/// Exit code of `tocsin drill` for a report `status`: 0 passed; 2 failed (a step
/// missing, a notification that never arrived above all); 4 interrupted (the aggregator
/// restarted during the drill: nothing was measured); 5 still running (`--show`); 3
/// refused or not run.
pub fn exit_code(status: &str) -> i32 {
    match status {
        "passed" => 0,
        "failed" => 2,
        crate::store::drills::INTERRUPTED => 4,
        "running" => 5,
        _ => 3,
    }
}
