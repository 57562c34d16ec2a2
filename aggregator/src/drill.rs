//! Drills (`tocsin drill NODE SCENARIO`): a fault injected for real on a node by its
//! agent, and a measured report of what the whole path did with it.
//!
//! [`start`] checks the request (scenario, durations, a `target` the node reported),
//! refuses a second drill on a node while one is open (one store call checks and
//! inserts), records the drill and spawns its run: **the run is its own task**, so the
//! HTTP client that asked may go away and the drill still ends and records its report.
//! The aggregator sends a `DrillCommand` down the node's stream ([`DrillHub`]); the
//! agent runs it only if its `[drills] allow` names the scenario, else it answers
//! `refused: drills not allowed on this node`.
//!
//! **The drill mark** (kept on the `drills` row, see `store::drills`) applies only to the
//! checks the scenario is expected to break, its [`scope`] (during `all`, the union of
//! the scenarios run so far): their incidents get the labels `drill=true` and
//! `drill_id=<id>`, say `[DRILL]` before their summary in every notification and are
//! reported apart by the KPIs. Anything else on the node stays real, and so does an
//! incident already open when the check fires.
//!
//! **Drills never page the real P1 path unless asked** (`route::DrillPaging`): with
//! `[drills] channels = [...]` in the aggregator's config, drill incidents are paged to
//! those channels only (no escalation, no repeat); without it they take the real routes
//! as if their severity were at most P2 (routes, escalation target and storm guard of a
//! P2; the incident and the report keep the real severity). A drill run with
//! `--page-real` (API `"page_real": true`, recorded on the `drills` row) takes the real
//! routes at the real severity, P1 included — still `[DRILL]`.
//!
//! **`node_down`** must outlast the node's liveness timeout: without a duration it is
//! stretched to [`node_down_needs`] (the report's `notes` say so); a shorter duration
//! given is refused.
//!
//! **The aggregator dying mid-drill**: the run dies with it; at the next start the row
//! left `running` is stamped, its mark lasts until the end of its window (the fault may
//! still be injected), and it then ends as `interrupted` (`store::drills`). **The agent
//! dying or restarting mid-fault** (its stream lost, or another agent process,
//! `Hello.instance_id`, connected before the end of the fault was reported) makes the
//! scenario `interrupted`, saying what happened.
//!
//! Each scenario is measured from the moment the agent injected the fault: time to
//! detect (the first firing event of an expected check stored; for `node_down`, the
//! liveness sweep opening the incident), to incident opened (or reopened within
//! `reopen_window`), to notification delivered (a trigger's `outbox.delivered_ms`), to
//! recovery hook started (`hook_runs`), to resolve. Expected steps: detect, incident,
//! notification, resolve; the hook is reported when one ran. A scenario passes when
//! every expected step happened within its wait; one whose notification never arrived
//! has failed, and its report says so first; one whose expected check already fired
//! before it is `inconclusive`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tocsin_proto::v1::{self, aggregator_message};
use tokio::sync::mpsc;
use tonic::Status;

use crate::model::{now_ms, rfc3339};
use crate::store::StoreHandle;
use crate::store::drills::Observed;

/// The scenarios, in the order `all` runs them.
pub const SCENARIOS: [&str; 4] = ["process_crash", "high_load", "dependency_down", "node_down"];

/// Default fault duration (`node_down`: stretched to [`node_down_needs`] when longer).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(20);

/// Shortest fault a drill may ask for.
pub const MIN_DURATION: Duration = Duration::from_secs(1);

/// Longest fault a drill may ask for (the agent caps it too).
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// Default time after the fault to wait for the remaining steps (resolve above all).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Shortest wait after the fault.
pub const MIN_WAIT: Duration = Duration::from_secs(1);

/// Longest wait after the fault.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// How long the agent has to answer a command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a `node_down` fault lasts beyond the node's timeout, so the liveness sweep
/// (every second) surely sees the silence: one sweep interval and a second of slack.
pub const NODE_DOWN_MARGIN: Duration = Duration::from_secs(2);

type Outbound = mpsc::Sender<Result<v1::AggregatorMessage, Status>>;

/// The connected agents' streams, for drill commands, and the drills awaiting answers.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DrillHub {
    inner: Arc<Mutex<Hub>>,
}

/// One agent's current stream.
#[derive(Debug, Clone)]
struct Conn {
    session: u64,
    /// The agent process (`Hello.instance_id`): another one means the agent restarted.
    instance: String,
    /// Its heartbeat interval, ms (the liveness timeout is at least 3 of them).
    heartbeat_ms: u64,
    tx: Outbound,
}

#[derive(Debug, Default)]
struct Hub {
    /// Agent id → its current stream.
    agents: HashMap<String, Conn>,
    /// Agent id → when its last stream ended (Unix ms), while it has none.
    lost: HashMap<String, i64>,
    /// Drill id → where its agent's reports go.
    waiting: HashMap<i64, mpsc::UnboundedSender<v1::DrillReport>>,
    /// `node_timeout` of the aggregator (zero: [`DEFAULT_NODE_TIMEOUT`]).
    node_timeout: Duration,
}

/// `node_timeout` assumed by a hub built with `Default`.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an agent's stream stands, for a running drill.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    /// Connected, as agent process `instance`.
    Connected { instance: String },
    /// No stream since `since_ms` (Unix ms; 0 when unknown).
    Lost { since_ms: i64 },
}

impl DrillHub {
    /// A hub for an aggregator whose `node_timeout` is `node_timeout` (a `node_down`
    /// drill must outlast it).
    pub fn new(node_timeout: Duration) -> Self {
        let hub = DrillHub::default();
        hub.lock().node_timeout = node_timeout;
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Agent `agent` (process `instance`, heartbeats every `heartbeat_ms`) is connected
    /// on stream `session`, answering through `tx`.
    pub fn register(
        &self,
        agent: &str,
        session: u64,
        instance: &str,
        heartbeat_ms: u64,
        tx: Outbound,
    ) {
        let mut hub = self.lock();
        hub.lost.remove(agent);
        hub.agents.insert(
            agent.to_owned(),
            Conn {
                session,
                instance: instance.to_owned(),
                heartbeat_ms,
                tx,
            },
        );
    }

    /// Stream `session` of `agent` ended (a newer stream of the agent stays).
    pub fn unregister(&self, agent: &str, session: u64) {
        let mut hub = self.lock();
        if hub.agents.get(agent).is_some_and(|c| c.session == session) {
            hub.agents.remove(agent);
            hub.lost.insert(agent.to_owned(), now_ms());
        }
    }

    /// A report from an agent.
    pub fn report(&self, agent: &str, r: v1::DrillReport) {
        tracing::info!(agent, drill = r.drill_id, accepted = r.accepted, done = r.done, message = %r.message, "drill report");
        if let Some(tx) = self.lock().waiting.get(&r.drill_id) {
            let _ = tx.send(r);
        }
    }

    fn presence(&self, node: &str) -> Presence {
        let hub = self.lock();
        match hub.agents.get(node) {
            Some(c) => Presence::Connected {
                instance: c.instance.clone(),
            },
            None => Presence::Lost {
                since_ms: hub.lost.get(node).copied().unwrap_or(0),
            },
        }
    }

    /// The silence after which `node` is down: `node_timeout`, at least 3 of its
    /// heartbeat intervals (as the liveness sweep counts it).
    fn node_down_after(&self, node: &str) -> Duration {
        let hub = self.lock();
        let timeout = if hub.node_timeout.is_zero() {
            DEFAULT_NODE_TIMEOUT
        } else {
            hub.node_timeout
        };
        let hb = hub.agents.get(node).map_or(0, |c| c.heartbeat_ms);
        timeout.max(Duration::from_millis(hb.saturating_mul(3)))
    }

    /// Sends `cmd` to `node`; returns the receiver of its reports and the agent
    /// process (`instance`) it went to.
    async fn send(
        &self,
        node: &str,
        cmd: v1::DrillCommand,
    ) -> Result<(mpsc::UnboundedReceiver<v1::DrillReport>, String), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (out, instance) = {
            let mut hub = self.lock();
            let Some(conn) = hub.agents.get(node).cloned() else {
                return Err(format!("node {node} is not connected"));
            };
            hub.waiting.insert(cmd.drill_id, tx);
            (conn.tx, conn.instance)
        };
        let m = v1::AggregatorMessage {
            msg: Some(aggregator_message::Msg::Drill(cmd)),
        };
        out.send(Ok(m))
            .await
            .map_err(|_| format!("node {node} disconnected"))?;
        Ok((rx, instance))
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
    /// How long the fault lasts; `None`: [`DEFAULT_DURATION`] (`node_down`: stretched
    /// to outlast the node's timeout, see [`node_down_needs`]).
    pub duration: Option<Duration>,
    /// How long after the fault the remaining steps may take.
    pub wait: Duration,
    /// `process_crash`: the process watch (empty: the agent's first);
    /// `dependency_down`: the name of the `[[tcp]]`/`[[http]]` check expected to fail
    /// (empty: any).
    pub target: String,
    /// Who runs it.
    pub by: String,
    /// Page the real routes at the real severity, P1 included (`--page-real`).
    pub page_real: bool,
}

/// Extra time after the last scenario's window before the mark lapses on its own (when
/// the run died with the aggregator).
pub const MARK_MARGIN: Duration = Duration::from_secs(5);

/// End of the drill window of a drill started at `started_ms` (Unix ms) whose
/// scenarios last `durations` (their faults): per scenario the agent's answer time, the
/// fault and `wait`, plus [`MARK_MARGIN`]. The drill mark lasts until then at most.
pub fn window_end(started_ms: i64, durations: &[Duration], wait: Duration) -> i64 {
    let total = durations
        .iter()
        .fold(MARK_MARGIN, |t, d| t + ANSWER_TIMEOUT + *d + wait);
    started_ms.saturating_add(i64::try_from(total.as_millis()).unwrap_or(i64::MAX))
}

/// The fault a `node_down` drill needs on a node declared down after `down_after` of
/// silence: that plus [`NODE_DOWN_MARGIN`].
pub fn node_down_needs(down_after: Duration) -> Duration {
    down_after + NODE_DOWN_MARGIN
}

/// `s` as a literal inside a SQL `LIKE` pattern (`\` escapes).
fn like_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The checks whose incidents `scenario` is expected to cause (SQL `LIKE` patterns,
/// `\` escapes), the drill mark's scope: `process_crash` the watch's check and its
/// restarts check (`process:T`, `process_restarts:T`; every watch without a
/// `target`); `high_load` the `cpu`, `cpu_core:*` and `load` checks;
/// `dependency_down` the `[[tcp]]`/`[[http]]` check named `target` (any without);
/// `node_down` `node_down`.
pub fn scope(scenario: &str, target: &str) -> Vec<String> {
    let t = if target.is_empty() {
        "%".to_owned()
    } else {
        like_literal(target)
    };
    match scenario {
        "process_crash" => vec![format!("process:{t}"), format!("process\\_restarts:{t}")],
        "high_load" => vec!["cpu".into(), "cpu\\_core:%".into(), "load".into()],
        "dependency_down" => vec![format!("tcp:{t}"), format!("http:{t}")],
        _ => vec!["node\\_down".into()],
    }
}

/// What [`start`] decided: the drill's id, its row, each scenario's fault and notes
/// on the plan (a stretched `node_down`), and its run, spawned.
#[derive(Debug)]
pub struct Started {
    /// The `drills` row as recorded (status `running`).
    pub row: crate::store::drills::DrillRow,
    /// Scenario → its fault's duration.
    pub durations: Vec<(String, Duration)>,
    /// The wait after each fault.
    pub wait: Duration,
    /// Notes on the plan (e.g. a `node_down` duration stretched past the timeout).
    pub notes: Vec<String>,
    /// The run, which records the report itself whatever becomes of the caller.
    pub run: tokio::task::JoinHandle<DrillReport>,
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
    /// The checks whose incident was expected, comma-separated SQL `LIKE` patterns
    /// (`%` any text; see [`scope`]).
    pub check: String,
    /// How long the fault was asked to last, ms.
    pub duration_ms: u64,
    /// `passed`, `failed` (a step missing), `inconclusive` (an expected check was
    /// already firing before the drill: nothing new could show), `interrupted` (the
    /// agent restarted or was lost during the fault) or `refused` (not run).
    pub status: String,
    /// What the agent said (what it did, or why it refused); for an interrupted
    /// scenario, what really happened.
    pub agent: String,
    /// When the fault was injected (agent clock, Unix ms; 0 when refused).
    pub injected_ms: i64,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// What the store saw.
    pub observed: Observed,
    /// Why it did not pass, loudest first (empty when it passed).
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
    /// `passed`, `failed` (a step missing), `interrupted` (the agent was lost or
    /// restarted during a fault, or the aggregator restarted: `store::drills`),
    /// `inconclusive` (an expected check already fired before the drill) or `refused`
    /// (not run) — the first that applies of refused, failed, interrupted,
    /// inconclusive.
    pub status: String,
    /// Whether its incidents took the real routes at their real severity (`--page-real`).
    pub page_real: bool,
    /// How its incidents were paged: `drill channels: a, b`, `real routes, at most P2`
    /// or `real routes, real severity (--page-real)`.
    pub paging: String,
    /// Notes on the plan, e.g. a `node_down` fault stretched past the node's timeout.
    pub notes: Vec<String>,
    /// Whether some scenario's notification never arrived (the loudest failure).
    pub notification_missing: bool,
    /// One per scenario run.
    pub scenarios: Vec<ScenarioReport>,
}

/// Why a drill could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Bad request (unknown scenario, duration out of range, unknown target).
    #[error("{0}")]
    Invalid(String),
    /// The node is unknown or not connected.
    #[error("{0}")]
    NotConnected(String),
    /// A drill is already open on the node (its id; the message names it).
    #[error("{message}")]
    Busy {
        /// The running drill.
        id: i64,
        /// What to tell the caller.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The scenarios `scenario` runs, in order.
fn scenarios_of(scenario: &str) -> Result<Vec<&'static str>, DrillError> {
    if scenario == "all" {
        return Ok(SCENARIOS.to_vec());
    }
    SCENARIOS
        .iter()
        .find(|s| **s == scenario)
        .map(|s| vec![*s])
        .ok_or_else(|| {
            DrillError::Invalid(format!(
                "unknown scenario {scenario:?}: use {} or all",
                SCENARIOS.join(", ")
            ))
        })
}

/// Each scenario (name) with its fault's duration, in order.
type Plan = Vec<(String, Duration)>;

/// Each scenario's fault duration, and notes: `req.duration` (default
/// [`DEFAULT_DURATION`]); a `node_down` fault must outlast `down_after` (the node's
/// liveness timeout) by [`NODE_DOWN_MARGIN`]: stretched when no duration was given,
/// refused when the one given is shorter.
fn durations(
    req: &DrillRequest,
    scenarios: &[&str],
    down_after: Duration,
) -> Result<(Plan, Vec<String>), DrillError> {
    let asked = req.duration.unwrap_or(DEFAULT_DURATION);
    if !(MIN_DURATION..=MAX_DURATION).contains(&asked) {
        return Err(DrillError::Invalid(format!(
            "duration {asked:?} must be at least {MIN_DURATION:?} and at most {MAX_DURATION:?}"
        )));
    }
    if !(MIN_WAIT..=MAX_WAIT).contains(&req.wait) {
        return Err(DrillError::Invalid(format!(
            "wait {:?} must be at least {MIN_WAIT:?} and at most {MAX_WAIT:?}",
            req.wait
        )));
    }
    let needs = node_down_needs(down_after);
    let mut notes = Vec::new();
    let mut out = Vec::new();
    for s in scenarios {
        let mut d = asked;
        if *s == "node_down" && d < needs {
            if needs > MAX_DURATION {
                return Err(DrillError::Invalid(format!(
                    "node_down needs a fault of {needs:?} (node {} is declared down after {down_after:?} \
                     without heartbeat, plus {NODE_DOWN_MARGIN:?}), more than the {MAX_DURATION:?} a drill may last",
                    req.node
                )));
            }
            if req.duration.is_some() {
                return Err(DrillError::Invalid(format!(
                    "duration {asked:?} is too short for node_down: node {} is declared down only after \
                     {down_after:?} without heartbeat (node_timeout, or 3 heartbeat intervals), so the \
                     drill could never pass; give a duration of at least {needs:?}, or none (node_down \
                     is then stretched to {needs:?})",
                    req.node
                )));
            }
            notes.push(format!(
                "node_down: the fault lasts {needs:?}, not {asked:?}: node {} is declared down only after \
                 {down_after:?} without heartbeat (node_timeout, or 3 heartbeat intervals), plus \
                 {NODE_DOWN_MARGIN:?}",
                req.node
            ));
            d = needs;
        }
        out.push(((*s).to_owned(), d));
    }
    Ok((out, notes))
}

/// Checks `req`, records the drill (refused while another drill is open on the node)
/// and spawns its run, which measures every scenario and records the report whatever
/// happens to the caller (an HTTP client that goes away does not stop it).
///
/// # Errors
/// [`DrillError`] when it cannot start; a refusal by the agent or a missing step is a
/// report.
pub async fn start(
    store: &StoreHandle,
    hub: &DrillHub,
    req: DrillRequest,
) -> Result<Started, DrillError> {
    let scenarios = scenarios_of(&req.scenario)?;
    let (plan, notes) = durations(&req, &scenarios, hub.node_down_after(&req.node))?;
    if !hub.lock().agents.contains_key(&req.node) {
        return Err(DrillError::NotConnected(format!(
            "node {} is not connected",
            req.node
        )));
    }
    check_target(store, &req, &scenarios).await?;
    let started = now_ms();
    let faults: Vec<Duration> = plan.iter().map(|(_, d)| *d).collect();
    let until = window_end(started, &faults, req.wait);
    let (node, scenario, by) = (req.node.clone(), req.scenario.clone(), req.by.clone());
    let page_real = req.page_real;
    let first_scope = scope(scenarios[0], &req.target);
    // One store call: no second drill can slip in between the check and the insert.
    let begun = store
        .call(move |s| {
            if let Some(open) = s.drill_open_on(&node, started)? {
                return Ok(Err(open));
            }
            let id = s.drill_begin(&node, &scenario, &by, started, until, page_real)?;
            s.drill_scope(id, &first_scope)?;
            Ok(Ok(s.drill(id)?))
        })
        .await?;
    let row = match begun {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Err(DrillError::Invalid("the drill vanished".into()));
        }
        Err(open) => {
            return Err(DrillError::Busy {
                id: open.id,
                message: format!(
                    "node {} is already running drill #{} ({}, by {}, since {}; its window ends {}): \
                     one drill per node at a time",
                    open.node,
                    open.id,
                    open.scenario,
                    open.started_by,
                    rfc3339(open.started_ms),
                    open.until_ms.map_or_else(|| "—".to_owned(), rfc3339)
                ),
            });
        }
    };
    let (store2, hub2, plan2, notes2) = (store.clone(), hub.clone(), plan.clone(), notes.clone());
    let (id, wait) = (row.id, req.wait);
    let run =
        tokio::spawn(async move { run(&store2, &hub2, req, id, started, plan2, notes2).await });
    Ok(Started {
        row,
        durations: plan,
        wait,
        notes,
        run,
    })
}

/// A `target` must name something the node reported: `process_crash` a process watch
/// (its check `process:TARGET`), `dependency_down` a `[[tcp]]`/`[[http]]` check.
async fn check_target(
    store: &StoreHandle,
    req: &DrillRequest,
    scenarios: &[&str],
) -> Result<(), DrillError> {
    if req.target.is_empty() {
        return Ok(());
    }
    for s in scenarios {
        let (what, prefixes): (&str, &[&str]) = match *s {
            "process_crash" => ("process watch", &["process:"]),
            "dependency_down" => ("[[tcp]] or [[http]] check", &["tcp:", "http:"]),
            _ => continue,
        };
        let mut known = Vec::new();
        let mut found = false;
        for prefix in prefixes {
            let (node, pattern, pre) = (
                req.node.clone(),
                format!("{prefix}{}", like_literal(&req.target)),
                (*prefix).to_owned(),
            );
            let (hit, names) = store
                .call(move |st| st.drill_known_check(&node, &pattern, &pre))
                .await?;
            found |= hit;
            known.extend(names.into_iter().map(|n| {
                n.split_once(':')
                    .map_or(n.clone(), |(_, name)| name.to_owned())
            }));
        }
        if !found {
            return Err(DrillError::Invalid(format!(
                "target {:?}: node {} reports no {what} of that name ({s}; known: {})",
                req.target,
                req.node,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Runs drill `id` (started at `started`, Unix ms) to the end and records its report.
async fn run(
    store: &StoreHandle,
    hub: &DrillHub,
    req: DrillRequest,
    id: i64,
    started: i64,
    plan: Plan,
    notes: Vec<String>,
) -> DrillReport {
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
    let mut scoped: Vec<String> = Vec::new();
    for (scenario, duration) in &plan {
        // During `all` the mark covers the scenarios so far (their incidents may still
        // be resolving) and the one starting.
        for p in scope(scenario, &req.target) {
            if !scoped.contains(&p) {
                scoped.push(p);
            }
        }
        let sc = scoped.clone();
        if let Err(e) = store.call(move |s| s.drill_scope(id, &sc)).await {
            tracing::error!(drill = id, error = %e, "cannot record the drill's scope");
        }
        let r = run_one(store, hub, &req, id, scenario, *duration).await;
        let stop = matches!(r.status.as_str(), "refused" | "interrupted");
        reports.push(r);
        if stop {
            break;
        }
    }
    let any = |st: &str| reports.iter().any(|r| r.status == st);
    let status = if any("refused") {
        "refused"
    } else if any("failed") {
        "failed"
    } else if any(INTERRUPTED) {
        INTERRUPTED
    } else if any(INCONCLUSIVE) {
        INCONCLUSIVE
    } else {
        "passed"
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
        notes,
        notification_missing: reports.iter().any(|r| {
            r.status == "failed"
                && r.steps
                    .iter()
                    .any(|s| s.step == "notification" && !s.happened)
        }),
        scenarios: reports,
    };
    let json = serde_json::to_value(&report).unwrap_or_default();
    let (ended, st) = (report.ended_ms, status.to_owned());
    if let Err(e) = store
        .call(move |s| s.drill_end(id, ended, &st, &json))
        .await
    {
        tracing::error!(drill = id, error = %e, "cannot record the drill's report");
    }
    if report.notification_missing {
        tracing::error!(drill = id, node = %report.node, "DRILL FAILED: a notification never arrived");
    }
    report
}

/// Status of a scenario (and drill) whose expected check already fired before it.
pub const INCONCLUSIVE: &str = "inconclusive";

use crate::store::drills::INTERRUPTED;

async fn run_one(
    store: &StoreHandle,
    hub: &DrillHub,
    req: &DrillRequest,
    id: i64,
    scenario: &str,
    duration: Duration,
) -> ScenarioReport {
    let patterns = scope(scenario, &req.target);
    let mut report = ScenarioReport {
        scenario: scenario.to_owned(),
        check: patterns.join(", ").replace('\\', ""),
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        status: "refused".to_owned(),
        agent: String::new(),
        injected_ms: 0,
        steps: Vec::new(),
        observed: Observed::default(),
        problems: Vec::new(),
    };
    // Expected checks already firing: the fault cannot raise anything new.
    let (n, p) = (req.node.clone(), patterns.clone());
    let firing_before = store
        .call(move |s| s.drill_firing(&n, &p))
        .await
        .unwrap_or_default();
    let cmd = v1::DrillCommand {
        drill_id: id,
        scenario: scenario.to_owned(),
        duration_ms: u32::try_from(duration.as_millis()).unwrap_or(u32::MAX),
        target: req.target.clone(),
    };
    let since = now_ms();
    let (mut rx, instance) = match hub.send(&req.node, cmd).await {
        Ok(r) => r,
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
    let deadline = tokio::time::Instant::now() + duration + req.wait;
    let node = req.node.clone();
    let mut agent_done = first.done;
    // Why the agent's word on the fault cannot be trusted, if it cannot.
    let mut lost: Option<String> = None;
    loop {
        let (n, p) = (node.clone(), patterns.clone());
        if let Ok(o) = store.call(move |s| s.drill_observe(&n, &p, from, id)).await {
            report.observed = o;
        }
        if !agent_done {
            match hub.presence(&node) {
                Presence::Connected { instance: now } if now != instance => {
                    lost = Some(format!(
                        "INTERRUPTED: the agent on {node} restarted during the fault (a new agent \
                         process connected as {now}); the fault it was injecting ended with the old \
                         process, earlier than the {duration:?} asked, and it never reported the end \
                         (it had said: {:?})",
                        report.agent
                    ));
                    break;
                }
                Presence::Connected { .. } => lost = None,
                Presence::Lost { since_ms } => {
                    lost = Some(format!(
                        "INTERRUPTED: lost the agent on {node}: its stream dropped at {} during the \
                         fault and it never reported the end of the fault (it had said: {:?})",
                        if since_ms > 0 {
                            rfc3339(since_ms)
                        } else {
                            "an unknown time".to_owned()
                        },
                        report.agent
                    ));
                }
            }
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
                    lost = None;
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
    let missing: Vec<&'static str> = report
        .steps
        .iter()
        .filter(|s| s.expected && !s.happened)
        .map(|s| s.step)
        .collect();
    if let Some(why) = lost {
        report.agent = why.clone();
        report.problems.push(why);
        for s in &missing {
            report.problems.push(format!("step {s} never happened"));
        }
        report.status = INTERRUPTED.to_owned();
        return report;
    }
    if !missing.is_empty() && o.incident_id.is_none() && !firing_before.is_empty() {
        let list: Vec<String> = firing_before
            .iter()
            .map(|(c, st, since)| format!("{c} {st} since {}", rfc3339(*since)))
            .collect();
        report.problems.push(format!(
            "inconclusive: check already firing before the drill ({}): its incident was open \
             already, so the fault could not raise a new one to measure",
            list.join("; ")
        ));
        report.status = INCONCLUSIVE.to_owned();
        return report;
    }
    if o.notified_ms.is_none() {
        report.problems.push(format!(
            "NO NOTIFICATION ARRIVED for the {scenario} incident ({} queued, none delivered)",
            o.notifications
        ));
    }
    for s in missing {
        if s != "notification" {
            report.problems.push(format!("step {s} never happened"));
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
/// missing, a notification that never arrived above all); 4 interrupted (the
/// aggregator restarted, or the agent was lost or restarted, during the drill: not
/// everything was measured); 5 still running (`--show`); 6 inconclusive (an expected
/// check already fired before the drill); 3 refused or not run.
pub fn exit_code(status: &str) -> i32 {
    match status {
        "passed" => 0,
        "failed" => 2,
        INTERRUPTED => 4,
        "running" => 5,
        INCONCLUSIVE => 6,
        _ => 3,
    }
}
