//! The SQLite store: agents, events, current check states, incidents with their
//! timelines, and the notification outbox.
//!
//! One thread owns the connection ([`spawn`]); everything else sends it closures through
//! a bounded channel and awaits the reply ([`StoreHandle::call`]), so writes are
//! serialised without locks. An event batch, the incident changes it causes and the
//! outbox rows for them commit in **one** transaction: when the agent gets its ack, the
//! page is already owed and survives a crash.

pub mod alertmanager;
mod apply;
pub mod drills;
mod hooks;
mod kpi;
mod paging;
mod schema;
mod views;

pub use views::CheckState;

pub use hooks::{HookClaim, HookRun, Queued, RunRequest};
pub use paging::{REPEAT, STORM_SUMMARY, SweepOutcome};

pub use kpi::{IncidentQuery, PostmortemLink, StatusCounts};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};

use crate::correlate;
use crate::model::{
    AgentHello, CheckStatus, Event, Incident, Node, Notification, Severity, State, Status,
    TimelineEntry, now_ms,
};
use crate::notify::payload;

/// How a person's change reached the aggregator, shown as the prefix of the timeline
/// actor: the web view (`user:NAME`, a signed-in session) or the JSON API (`api:NAME`,
/// a token or loopback client naming itself with `by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The on-call web view.
    Web,
    /// The JSON API (`/api/v1/…`, the `tocsin` CLI).
    Api,
}

impl Via {
    /// `user:` or `api:`.
    pub fn prefix(self) -> &'static str {
        match self {
            Via::Web => "user:",
            Via::Api => "api:",
        }
    }
}

/// What a change asked by a person did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Applied.
    Done,
    /// Nothing to do (already in that state), with why.
    Unchanged(String),
    /// Not possible in the incident's state (acknowledging a resolved incident).
    Conflict(String),
    /// No such incident.
    NotFound,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (with the database path).
    #[error("store {path}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another batch of the same group commit failed (its error is logged with it).
    #[error("store {path}: the shared commit failed")]
    GroupFailed {
        /// Database file.
        path: PathBuf,
    },
    /// The store thread is gone.
    #[error("store thread stopped")]
    Stopped,
}

/// The store (synchronous; owned by the store thread).
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Channels, routes, response targets and storm budgets.
    router: crate::route::Router,
    /// Random id of this store, made at creation: dedup keys are unique across
    /// installations and data resets (`tocsin-<install>-<incident id>`).
    install_id: String,
    /// Last time each agent was heard from (Unix ms), kept in memory so a heartbeat costs
    /// no write; flushed to `agents.last_seen_ms` every [`SEEN_FLUSH_MS`] by the
    /// liveness sweep (a restart then rebuilds timers at most that stale).
    seen: std::collections::HashMap<String, i64>,
    /// Agents in `seen` not yet flushed.
    seen_dirty: std::collections::HashSet<String>,
    /// When `seen` was last flushed.
    seen_flushed_ms: i64,
    /// Per agent, a hash of the check states of its last heartbeat that was reconciled
    /// with nothing in flight. A heartbeat with the same states needs no work; any event
    /// from the agent, and a resolve by hand of an incident with a member on the agent,
    /// forgets it.
    hb_memo: std::collections::HashMap<String, u64>,
    /// Agents with an open `node_down` incident.
    down: std::collections::HashSet<String>,
    /// Open agent streams: agent id → (instance id, session number). In memory only: after
    /// an aggregator restart no stream is open.
    sessions: std::collections::HashMap<String, (String, u64)>,
    /// Every silence, as stored (few; matched in memory).
    silences: Vec<crate::silence::Silence>,
    /// Grouping, group wait, re-open window and severity rules.
    correlation: correlate::Correlation,
    /// KPI histograms observed as changes commit (`with_kpi_metrics`).
    kpi_metrics: Option<crate::kpi::KpiMetrics>,
    /// Quiet fingerprints: no open incident has them as a member that is not OK (see
    /// `apply::apply_noting`), so an OK event that does not flap changes no incident and
    /// skips the member lookup. Filled by [`Store::ingest_group`] as it finds them;
    /// forgotten when the store changes outside it, when its transaction fails, and when
    /// an incident opens, reopens or resolves (the latest open incident of a fingerprint
    /// can change).
    quiet: Quiet,
    /// Members of incidents, kept between events (`apply::MemberCache`), valid and
    /// forgotten as `quiet` is (not at an open, reopen or resolve: members do not change
    /// with those).
    members: std::cell::RefCell<apply::MemberCache>,
}

/// The quiet fingerprints of [`Store`], valid while the store's write count is `changes`.
#[derive(Debug, Default)]
struct Quiet {
    /// Fingerprints known quiet.
    fingerprints: std::collections::HashSet<String>,
    /// `Connection::total_changes` when the set was last known valid.
    changes: u64,
}

/// At most this many quiet fingerprints are kept (then the set starts over).
const QUIET_MAX: usize = 1_000_000;

/// At most this many incidents' members are kept (then it starts over).
const MEMBERS_MAX: usize = 10_000;

/// Answer to an agent's `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloOutcome {
    /// Accepted; the highest sequence stored for this agent.
    Welcome(u64),
    /// Another agent process with the same identity has a stream open.
    Duplicate {
        /// Instance id of the connected agent.
        connected_instance: String,
    },
}

/// How often in-memory `last_seen` times are written to the store, ms.
pub const SEEN_FLUSH_MS: i64 = 10_000;

/// Check name of the incident a silent node raises.
pub const NODE_DOWN: &str = correlate::NODE_DOWN;

/// Resolves the node's firing `node_down` member (and its incident once no other member
/// fires), if any: it is talking again. Called after the node's events or heartbeat
/// states are applied, so that what it replays from its outage is inhibited; incidents
/// that still fire then page at the next [`Store::release_held`].
fn node_back(
    conn: &Connection,
    ctx: &apply::Context<'_>,
    agent_id: &str,
    out: &mut IngestOutcome,
) -> rusqlite::Result<()> {
    let open: bool = conn
        .prepare_cached(
            "SELECT 1 FROM incident_members m JOIN incidents i ON i.id = m.incident_id
             WHERE m.fingerprint = ?1 AND m.state != 'ok' AND i.status != 'resolved'",
        )?
        .query_row([format!("{agent_id}/{NODE_DOWN}")], |_| Ok(()))
        .optional()?
        .is_some();
    if !open {
        return Ok(());
    }
    let message = format!("node {agent_id} is back: the agent is talking again");
    let obs = apply::Observation {
        node: agent_id,
        check: NODE_DOWN,
        labels: &BTreeMap::new(),
        state: State::Ok,
        value: None,
        unit: "seconds",
        threshold: None,
        message: &message,
        breach_started_at_ms: 0,
        actor: "aggregator",
        reconcile: false,
        flapping: false,
    };
    apply::apply(conn, ctx, &obs, out)
}

/// The stored last sequence and labels of an agent (0 and none when unknown).
fn agent_row(
    conn: &Connection,
    agent_id: &str,
) -> rusqlite::Result<(u64, BTreeMap<String, String>)> {
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT last_seq, labels FROM agents WHERE agent_id = ?1")?
        .query_row([agent_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map_or((0, BTreeMap::new()), |(seq, labels)| {
        (
            u64::try_from(seq).unwrap_or(0),
            serde_json::from_str(&labels).unwrap_or_default(),
        )
    }))
}

/// What an ingested batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestOutcome {
    /// Highest sequence stored for the agent after this batch.
    pub last_seq: u64,
    /// Events newly stored (duplicates excluded).
    pub stored: usize,
    /// Incidents opened or reopened.
    pub opened: Vec<i64>,
    /// Incidents resolved.
    pub resolved: Vec<i64>,
    /// Outbox rows created.
    pub notifications: usize,
}

/// Filter for [`Store::incidents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncidentFilter {
    /// Every incident.
    #[default]
    All,
    /// Triggered or acknowledged.
    Open,
    /// Resolved.
    Resolved,
}

/// An incident with everything that happened to it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IncidentDetail {
    /// The incident.
    #[serde(flatten)]
    pub incident: Incident,
    /// Timeline, oldest first.
    pub timeline: Vec<TimelineEntry>,
    /// Notifications, oldest first.
    pub notifications: Vec<Notification>,
    /// Members (one per fingerprint), in join order.
    pub members: Vec<correlate::Member>,
}

fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens or creates `dir/tocsin.db` (WAL) with notification `channels`.
    ///
    /// # Errors
    /// [`StoreError`] naming the directory or file.
    pub fn open(dir: &Path, channels: Vec<String>) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("tocsin.db");
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        // Query-planner stability: without it, a statement whose bound parameter is
        // compared against a partial index's condition (or a LIKE pattern) is
        // re-prepared at every execution — 54 % of the store thread's time at 100
        // agents, ingest 8x slower (bench-ingest, BENCHMARKS.md).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let mut store = Store {
            conn,
            path,
            router: crate::route::Router::every_channel(channels),
            sessions: Default::default(),
            install_id: String::new(),
            seen: Default::default(),
            seen_dirty: Default::default(),
            seen_flushed_ms: 0,
            hb_memo: Default::default(),
            down: Default::default(),
            silences: Vec::new(),
            correlation: correlate::Correlation::default(),
            kpi_metrics: None,
            quiet: Quiet::default(),
            members: Default::default(),
        };
        store
            .conn
            .execute_batch(schema::SCHEMA)
            .map_err(|e| store.err(e))?;
        store
            .conn
            .execute_batch(paging::SCHEMA)
            .map_err(|e| store.err(e))?;
        store
            .conn
            .execute_batch(hooks::SCHEMA)
            .map_err(|e| store.err(e))?;
        store
            .conn
            .execute_batch(drills::SCHEMA)
            .map_err(|e| store.err(e))?;
        schema::migrate(&store.conn).map_err(|e| store.err(e))?;
        let fresh = format!("{:08x}", fastrand::u32(..));
        store
            .conn
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('install_id', ?1)",
                [&fresh],
            )
            .map_err(|e| store.err(e))?;
        store.install_id = store
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'install_id'", [], |r| {
                r.get(0)
            })
            .map_err(|e| store.err(e))?;
        store.down = store
            .conn
            .prepare(
                "SELECT m.node FROM incident_members m JOIN incidents i ON i.id = m.incident_id
                 WHERE m.check_name = ?1 AND m.state != 'ok' AND i.status != 'resolved'",
            )
            .and_then(|mut st| st.query_map([NODE_DOWN], |r| r.get(0))?.collect())
            .map_err(|e| store.err(e))?;
        store.silences = store.load_silences()?;
        Ok(store)
    }

    /// Pages by `router` from now on (routes, response targets, storm budgets) instead of
    /// every channel given to [`Store::open`].
    pub fn set_router(&mut self, router: crate::route::Router) {
        self.router = router;
    }

    /// Uses `correlation` (grouping, group wait, re-open window, severity rules) from now
    /// on; the default is [`correlate::Correlation::default`].
    #[must_use]
    pub fn with_correlation(mut self, correlation: correlate::Correlation) -> Self {
        self.correlation = correlation;
        self
    }

    fn load_silences(&self) -> Result<Vec<crate::silence::Silence>, StoreError> {
        type Row = (
            i64,
            String,
            i64,
            i64,
            String,
            String,
            Option<i64>,
            Option<String>,
        );
        let rows: Vec<Row> = self
            .conn
            .prepare(
                "SELECT id, matchers, starts_ms, ends_ms, created_by, reason, ends_with_incident, expired_by
                 FROM silences ORDER BY id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .filter_map(
                |(
                    id,
                    matchers,
                    starts_ms,
                    ends_ms,
                    created_by,
                    reason,
                    ends_with_incident,
                    expired_by,
                )| {
                    let texts: Vec<String> = serde_json::from_str(&matchers).ok()?;
                    let matchers = texts
                        .iter()
                        .map(|t| crate::silence::Matcher::parse(t))
                        .collect::<Result<_, _>>()
                        .ok()?;
                    Some(crate::silence::Silence {
                        id,
                        matchers,
                        starts_ms,
                        ends_ms,
                        created_by,
                        reason,
                        ends_with_incident,
                        expired_by,
                    })
                },
            )
            .collect())
    }

    /// Mirrors in memory what [`apply::resolved`] did in the store: the silences that
    /// end with one of the `resolved` incidents are expired at `now`.
    fn silences_end_with(&mut self, resolved: &[i64], now: i64) {
        for s in &mut self.silences {
            if let Some(id) = s.ends_with_incident
                && resolved.contains(&id)
                && s.ends_ms > now
            {
                s.ends_ms = now;
                s.starts_ms = s.starts_ms.min(s.ends_ms);
                s.expired_by
                    .get_or_insert_with(|| format!("incident #{id} resolved"));
            }
        }
    }

    /// Every label name a known node or check has (node labels from `Hello`, check
    /// labels from events and heartbeats), and the drill mark's (`drill`, `drill_id`:
    /// any node may carry them during a drill), for warning about silences that name a
    /// label nothing has.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn known_label_names(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let mut names: std::collections::BTreeSet<String> = self
            .conn
            .prepare(
                "SELECT DISTINCT j.key FROM agents, json_each(agents.labels) j
                 UNION SELECT DISTINCT j.key FROM checks, json_each(checks.labels) j",
            )
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        names.insert(crate::kpi::DRILL_LABEL.to_owned());
        names.insert(drills::DRILL_ID_LABEL.to_owned());
        Ok(names)
    }

    /// Adds a silence; returns its id. The matchers are already parsed.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn add_silence(
        &mut self,
        matchers: Vec<crate::silence::Matcher>,
        starts_ms: i64,
        ends_ms: i64,
        by: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        self.add_silence_with(matchers, starts_ms, ends_ms, by, reason, None)
    }

    /// [`Store::add_silence`], optionally ending when incident `ends_with_incident`
    /// resolves (expired then, recorded as expired by "incident #ID resolved").
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn add_silence_with(
        &mut self,
        matchers: Vec<crate::silence::Matcher>,
        starts_ms: i64,
        ends_ms: i64,
        by: &str,
        reason: &str,
        ends_with_incident: Option<i64>,
    ) -> Result<i64, StoreError> {
        let texts: Vec<&str> = matchers.iter().map(|m| m.text.as_str()).collect();
        self.conn
            .execute(
                "INSERT INTO silences (matchers, starts_ms, ends_ms, created_by, reason, created_ms, ends_with_incident)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    serde_json::to_string(&texts).unwrap_or_default(),
                    starts_ms,
                    ends_ms,
                    by,
                    reason,
                    now_ms(),
                    ends_with_incident
                ],
            )
            .map_err(|e| self.err(e))?;
        let id = self.conn.last_insert_rowid();
        self.silences.push(crate::silence::Silence {
            id,
            matchers,
            starts_ms,
            ends_ms,
            created_by: by.to_owned(),
            reason: reason.to_owned(),
            ends_with_incident,
            expired_by: None,
        });
        Ok(id)
    }

    /// Whether the trigger that notification `before` (an outbox id) follows up — the
    /// latest trigger of `incident_id` to `channel` queued before it, i.e. the trigger of
    /// its cycle — failed for good: then its acknowledge, resolve or repeat is not sent
    /// there either (never a lone one). A trigger that failed in an earlier cycle of a
    /// reopened incident does not count.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn trigger_failed(
        &self,
        incident_id: i64,
        channel: &str,
        before: i64,
    ) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT coalesce((SELECT status = 'failed' FROM outbox
                                  WHERE incident_id = ?1 AND channel = ?2 AND kind = 'trigger' AND id < ?3
                                  ORDER BY id DESC LIMIT 1), 0)",
            )
            .and_then(|mut st| st.query_row(params![incident_id, channel, before], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Every silence as the API shows it at `now`, newest first.
    pub fn silences(&self, now: i64) -> Vec<crate::silence::SilenceView> {
        self.silences
            .iter()
            .rev()
            .map(|s| crate::silence::SilenceView::of(s, now))
            .collect()
    }

    /// Ends silence `id` now (`by` recorded); `false` when there is no such silence.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn expire_silence(&mut self, id: i64, by: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let Some(s) = self.silences.iter_mut().find(|s| s.id == id) else {
            return Ok(false);
        };
        if s.ends_ms > now {
            s.ends_ms = now;
        }
        s.starts_ms = s.starts_ms.min(s.ends_ms);
        s.expired_by.get_or_insert_with(|| by.to_owned());
        let (starts, ends) = (s.starts_ms, s.ends_ms);
        self.conn
            .execute(
                "UPDATE silences SET starts_ms = ?2, ends_ms = ?3, expired_by = coalesce(expired_by, ?4)
                 WHERE id = ?1",
                params![id, starts, ends, by],
            )
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// [`Store::release_held`] (the name from before group waits and inhibition).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn release_silenced(&mut self, now: i64) -> Result<usize, StoreError> {
        self.release_held(now)
    }

    /// Pages, in one transaction, the open incidents whose trigger was held and is held
    /// no more: the group wait is over, no silence mutes them any more, or the node whose
    /// `node_down` inhibited them is back — and they still fire and nobody acknowledged
    /// them. Paged like any page: routed by the incident's severity now, through the
    /// storm guard. Run by the liveness sweep every second; the holds live in the store,
    /// so a restart resumes them. Returns the number of triggers queued.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn release_held(&mut self, now: i64) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let none = BTreeMap::new();
        let ctx = apply::Context {
            silences: &self.silences,
            router: &self.router,
            install_id: &self.install_id,
            node_labels: &none,
            now,
            correlation: &self.correlation,
            members: None,
        };
        let sent = apply::release_held(&tx, &ctx).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(sent)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Records an agent's `Hello` on stream `session`; refuses a second agent process with
    /// the identity of a connected one (a reconnect of the same process replaces its old
    /// stream).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn hello(&mut self, h: &AgentHello, session: u64) -> Result<HelloOutcome, StoreError> {
        if let Some((instance, _)) = self.sessions.get(&h.agent_id)
            && *instance != h.instance_id
        {
            return Ok(HelloOutcome::Duplicate {
                connected_instance: instance.clone(),
            });
        }
        self.sessions
            .insert(h.agent_id.clone(), (h.instance_id.clone(), session));
        let now = now_ms();
        let labels = serde_json::to_string(&h.labels).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO agents (agent_id, hostname, labels, version, boot_id, last_seq, first_seen_ms, last_seen_ms,
                     connected, heartbeat_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6, 1, ?7)
                 ON CONFLICT (agent_id) DO UPDATE SET hostname = ?2, labels = ?3, version = ?4, boot_id = ?5,
                     last_seen_ms = ?6, connected = 1, heartbeat_ms = ?7",
                params![h.agent_id, h.hostname, labels, h.version, h.boot_id, now, h.heartbeat_interval_ms],
            )
            .map_err(|e| self.err(e))?;
        let last: i64 = self
            .conn
            .query_row(
                "SELECT last_seq FROM agents WHERE agent_id = ?1",
                [&h.agent_id],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(HelloOutcome::Welcome(u64::try_from(last).unwrap_or(0)))
    }

    /// Marks stream `session` of an agent closed.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn disconnected(&mut self, agent_id: &str, session: u64) -> Result<(), StoreError> {
        // A newer stream of the same agent may have replaced this one already.
        if self
            .sessions
            .get(agent_id)
            .is_none_or(|(_, s)| *s != session)
        {
            return Ok(());
        }
        self.sessions.remove(agent_id);
        self.conn
            .execute(
                "UPDATE agents SET connected = 0, last_seen_ms = ?2 WHERE agent_id = ?1",
                params![agent_id, now_ms()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stores a batch of events from `agent_id`, dropping duplicates by (agent, seq), and
    /// applies the incident changes and outbox rows they cause — all in one transaction.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; nothing is committed then, so nothing may be acked.
    pub fn ingest(
        &mut self,
        agent_id: &str,
        events: &[Event],
    ) -> Result<IngestOutcome, StoreError> {
        let mut results = self.ingest_group(&[(agent_id, events)]);
        results.pop().unwrap_or(Err(StoreError::Stopped))
    }

    /// Group commit: several agents' batches in **one** transaction (one fsync), each
    /// with its own outcome. If the transaction fails, every batch fails and none is
    /// acked; the agents resend.
    pub fn ingest_group(
        &mut self,
        batches: &[(&str, &[Event])],
    ) -> Vec<Result<IngestOutcome, StoreError>> {
        let now = now_ms();
        if self.conn.total_changes() != self.quiet.changes
            || self.quiet.fingerprints.len() > QUIET_MAX
        {
            // Something else wrote (a resolve by hand, a heartbeat, a sweep …).
            self.quiet.fingerprints.clear();
            self.members.get_mut().clear();
        }
        if self.members.get_mut().len() > MEMBERS_MAX {
            self.members.get_mut().clear();
        }
        let result = (|| -> rusqlite::Result<Vec<IngestOutcome>> {
            let tx = self.conn.transaction()?;
            let outs = batches
                .iter()
                .map(|(agent, events)| {
                    ingest_in(
                        &tx,
                        &apply::Context {
                            silences: &self.silences,
                            router: &self.router,
                            install_id: &self.install_id,
                            node_labels: &BTreeMap::new(),
                            now,
                            correlation: &self.correlation,
                            members: Some(&self.members),
                        },
                        agent,
                        events,
                        &mut self.quiet.fingerprints,
                    )
                })
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(outs)
        })();
        if result.is_err() {
            // Rolled back: what was found inside the transaction may not hold.
            self.quiet.fingerprints.clear();
            self.members.get_mut().clear();
        }
        match result {
            Ok(outs) => {
                for out in &outs {
                    self.silences_end_with(&out.resolved, now);
                    self.observe_kpis(&[], &out.resolved);
                }
                for (agent, _) in batches {
                    self.hb_memo.remove(*agent);
                    self.down.remove(*agent);
                    self.seen.insert((*agent).to_owned(), now);
                }
                self.quiet.changes = self.conn.total_changes();
                outs.into_iter().map(Ok).collect()
            }
            Err(source) => {
                let mut results = vec![Err(StoreError::Sqlite {
                    path: self.path.clone(),
                    source,
                })];
                results.extend(batches.iter().skip(1).map(|_| {
                    Err(StoreError::GroupFailed {
                        path: self.path.clone(),
                    })
                }));
                results
            }
        }
    }

    /// Records a heartbeat: the agent is alive and these are its checks' states. When the
    /// heartbeat's `last_seq` shows no event in flight (the store has every event up to
    /// it), the incidents are reconciled with the checks' states: an OK check resolves a
    /// left-over incident, a firing one without an incident opens it. A node that was
    /// down is back.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn heartbeat(
        &mut self,
        agent_id: &str,
        last_seq: u64,
        checks: &[CheckStatus],
    ) -> Result<IngestOutcome, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_ms();
        self.seen.insert(agent_id.to_owned(), now);
        self.seen_dirty.insert(agent_id.to_owned());
        let memo = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for c in checks {
                (&c.check, &c.labels, c.state.as_str()).hash(&mut h);
            }
            h.finish()
        };
        if !self.down.contains(agent_id) && self.hb_memo.get(agent_id) == Some(&memo) {
            // Same states as the last reconciled heartbeat and no event since: nothing to
            // do, nothing to write. Cost grows with state changes, not with heartbeats.
            return Ok(IngestOutcome::default());
        }
        let tx = self.conn.transaction().map_err(err)?;
        let (stored_seq, node_labels) = agent_row(&tx, agent_id).map_err(err)?;
        let mut out = IngestOutcome {
            last_seq: stored_seq,
            ..IngestOutcome::default()
        };
        let ctx = apply::Context {
            silences: &self.silences,
            router: &self.router,
            install_id: &self.install_id,
            node_labels: &node_labels,
            now,
            correlation: &self.correlation,
            members: None,
        };
        let consistent = last_seq <= stored_seq;
        for c in checks {
            let fp = correlate::fingerprint(agent_id, &c.check, &c.labels);
            tx.prepare_cached(
                "INSERT INTO checks (fingerprint, agent_id, check_name, labels, state, value, unit, since_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (fingerprint) DO UPDATE SET state = ?5, value = ?6, unit = ?7, since_ms = ?8, updated_ms = ?9",
            )
            .and_then(|mut s| {
                s.execute(params![
                    fp,
                    agent_id,
                    c.check,
                    serde_json::to_string(&c.labels).unwrap_or_default(),
                    c.state.as_str(),
                    c.value,
                    c.unit,
                    c.since_ms,
                    now
                ])
            })
            .map_err(err)?;
            if consistent {
                let message = format!(
                    "reconciled from heartbeat: {} is {}",
                    c.check,
                    c.state.as_str()
                );
                let obs = apply::Observation {
                    node: agent_id,
                    check: &c.check,
                    labels: &c.labels,
                    state: c.state,
                    value: c.value,
                    unit: &c.unit,
                    threshold: None,
                    message: &message,
                    breach_started_at_ms: if c.state.is_firing() { c.since_ms } else { 0 },
                    actor: "aggregator",
                    reconcile: true,
                    flapping: last_event_flapping(&tx, agent_id, &c.check).map_err(err)?,
                };
                apply::apply(&tx, &ctx, &obs, &mut out).map_err(err)?;
            }
        }
        node_back(&tx, &ctx, agent_id, &mut out).map_err(err)?;
        tx.commit().map_err(err)?;
        self.silences_end_with(&out.resolved, now);
        self.observe_kpis(&[], &out.resolved);
        self.down.remove(agent_id);
        if consistent {
            self.hb_memo.insert(agent_id.to_owned(), memo);
        }
        Ok(out)
    }

    /// Opens a `node_down` incident for every agent silent longer than its timeout —
    /// `max(timeout_ms, 3 × its heartbeat interval)` — counting silence from no earlier
    /// than `started_ms` (the aggregator's start), so a restart neither forgets silent
    /// nodes (their timers are rebuilt from `last_seen`) nor flags every node at once.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn sweep_liveness(
        &mut self,
        now: i64,
        timeout_ms: i64,
        started_ms: i64,
    ) -> Result<IngestOutcome, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        if now - self.seen_flushed_ms >= SEEN_FLUSH_MS && !self.seen_dirty.is_empty() {
            for agent in self.seen_dirty.drain() {
                if let Some(&at) = self.seen.get(&agent) {
                    tx.prepare_cached("UPDATE agents SET last_seen_ms = max(last_seen_ms, ?2) WHERE agent_id = ?1")
                        .and_then(|mut st| st.execute(params![agent, at]))
                        .map_err(err)?;
                }
            }
            self.seen_flushed_ms = now;
        }
        let silent: Vec<(String, i64, i64, String)> = tx
            .prepare_cached(
                "SELECT a.agent_id, a.last_seen_ms, a.heartbeat_ms, a.labels FROM agents a
                 WHERE NOT EXISTS (SELECT 1 FROM incident_members m JOIN incidents i ON i.id = m.incident_id
                                   WHERE m.fingerprint = a.agent_id || '/node_down' AND m.state != 'ok'
                                     AND i.status != 'resolved')",
            )
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect())
            .map_err(err)?;
        let mut out = IngestOutcome::default();
        for (agent_id, last_seen, heartbeat_ms, labels) in silent {
            let last_seen = self
                .seen
                .get(&agent_id)
                .copied()
                .unwrap_or(last_seen)
                .max(last_seen);
            let timeout = timeout_ms.max(heartbeat_ms.saturating_mul(3));
            let silence = now - last_seen.max(started_ms);
            if silence <= timeout {
                continue;
            }
            let node_labels: BTreeMap<String, String> =
                serde_json::from_str(&labels).unwrap_or_default();
            let ctx = apply::Context {
                silences: &self.silences,
                router: &self.router,
                install_id: &self.install_id,
                node_labels: &node_labels,
                now,
                correlation: &self.correlation,
                members: None,
            };
            let message = format!(
                "node {agent_id} silent for {}s (no heartbeat; timeout {}s, last seen {})",
                (now - last_seen) / 1000,
                timeout / 1000,
                crate::model::rfc3339(last_seen)
            );
            let obs = apply::Observation {
                node: &agent_id,
                check: NODE_DOWN,
                labels: &BTreeMap::new(),
                state: State::Critical,
                value: Some((now - last_seen) as f64 / 1000.0),
                unit: "seconds",
                threshold: Some(timeout as f64 / 1000.0),
                message: &message,
                breach_started_at_ms: last_seen,
                actor: "aggregator",
                reconcile: false,
                flapping: false,
            };
            apply::apply(&tx, &ctx, &obs, &mut out).map_err(err)?;
            self.down.insert(agent_id.clone());
        }
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Incidents, newest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn incidents(
        &self,
        filter: IncidentFilter,
        limit: usize,
    ) -> Result<Vec<Incident>, StoreError> {
        let clause = match filter {
            IncidentFilter::All => "",
            IncidentFilter::Open => "WHERE status != 'resolved'",
            IncidentFilter::Resolved => "WHERE status = 'resolved'",
        };
        let sql =
            format!("SELECT {INCIDENT_COLUMNS} FROM incidents {clause} ORDER BY id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                [i64::try_from(limit).unwrap_or(i64::MAX)],
                incident_from_row,
            )
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// A person acknowledges incident `id`: status `acknowledged`, a timeline entry with
    /// who and why, and an `acknowledge` notification to every channel that got the
    /// trigger. Serialised with every other change of the incident (one store thread).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn acknowledge(&mut self, id: i64, by: &str, note: &str) -> Result<Change, StoreError> {
        self.change(Via::Web, id, by, note, "acknowledged")
    }

    /// [`Self::acknowledge`] or [`Self::resolve_by_hand`] (`to`: `acknowledged` or
    /// `resolved`) with the timeline actor naming the way it came: `user:NAME` from the
    /// web view, `api:NAME` from the JSON API.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn change_via(
        &mut self,
        via: Via,
        id: i64,
        by: &str,
        note: &str,
        to: &str,
    ) -> Result<Change, StoreError> {
        self.change(via, id, by, note, to)
    }

    /// A person resolves incident `id`: status `resolved`, the resolution says who and
    /// why, and a `resolve` goes to every channel that got the trigger. If the check
    /// still fires, the next heartbeat opens a new incident (and pages).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn resolve_by_hand(&mut self, id: i64, by: &str, note: &str) -> Result<Change, StoreError> {
        self.change(Via::Web, id, by, note, "resolved")
    }

    fn change(
        &mut self,
        via: Via,
        id: i64,
        by: &str,
        note: &str,
        to: &str,
    ) -> Result<Change, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_ms();
        let tx = self.conn.transaction().map_err(err)?;
        let Some(incident) = load_incident_opt(&tx, id).map_err(err)? else {
            return Ok(Change::NotFound);
        };
        let actor = format!("{}{by}", via.prefix());
        let why = if note.is_empty() {
            String::new()
        } else {
            format!(": {note}")
        };
        let mut forget_nodes: Vec<String> = Vec::new();
        let outcome = match (incident.status, to) {
            (Status::Resolved, "acknowledged") => Change::Conflict(format!(
                "incident {id} is resolved: there is nothing to acknowledge"
            )),
            (Status::Resolved, _) => {
                Change::Unchanged(format!("incident {id} was already resolved"))
            }
            (Status::Acknowledged, "acknowledged") => {
                Change::Unchanged(format!("incident {id} was already acknowledged"))
            }
            (_, "acknowledged") => {
                tx.execute(
                    "UPDATE incidents SET status = 'acknowledged', acknowledged_at_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(err)?;
                timeline(
                    &tx,
                    id,
                    now,
                    "acknowledged",
                    &actor,
                    &format!("acknowledged by {by}{why}"),
                )
                .map_err(err)?;
                notify_triggered(&tx, id, "acknowledge", now).map_err(err)?;
                Change::Done
            }
            _ => {
                // Every member's node: its next heartbeat is reconciled again, so a check
                // that still fires opens a new incident (and pages) instead of being
                // skipped as "same states as last time" until an aggregator restart.
                forget_nodes = tx
                    .prepare_cached(
                        "SELECT DISTINCT node FROM incident_members WHERE incident_id = ?1",
                    )
                    .and_then(|mut st| st.query_map([id], |r| r.get(0))?.collect())
                    .map_err(err)?;
                let resolution = format!("resolved by {by}{why}");
                tx.execute(
                    "UPDATE incidents SET status = 'resolved', resolved_at_ms = ?2, resolution = ?3 WHERE id = ?1",
                    params![id, now, resolution],
                )
                .map_err(err)?;
                timeline(&tx, id, now, "resolved", &actor, &resolution).map_err(err)?;
                notify_triggered(&tx, id, "resolve", now).map_err(err)?;
                apply::resolved(&tx, &self.router, id, now).map_err(err)?;
                Change::Done
            }
        };
        tx.commit().map_err(err)?;
        if to == "resolved" && outcome == Change::Done {
            for node in &forget_nodes {
                self.hb_memo.remove(node);
            }
            self.silences_end_with(&[id], now);
            self.observe_kpis(&[], &[id]);
        }
        if to == "acknowledged" && outcome == Change::Done {
            self.observe_kpis(&[id], &[]);
        }
        Ok(outcome)
    }

    /// One incident with its timeline and notifications.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn incident(&self, id: i64) -> Result<Option<IncidentDetail>, StoreError> {
        let Some(incident) = load_incident_opt(&self.conn, id).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let timeline = self
            .conn
            .prepare(
                "SELECT at_ms, kind, actor, note FROM timeline WHERE incident_id = ?1 ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([id], |r| {
                    Ok(TimelineEntry {
                        at_ms: r.get(0)?,
                        kind: r.get(1)?,
                        actor: r.get(2)?,
                        note: r.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        let notifications = self
            .conn
            .prepare(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident_id = ?1 ORDER BY id"
            ))
            .and_then(|mut s| s.query_map([id], notification_from_row)?.collect())
            .map_err(|e| self.err(e))?;
        let members = apply::members(&self.conn, id).map_err(|e| self.err(e))?;
        Ok(Some(IncidentDetail {
            incident,
            timeline,
            notifications,
            members,
        }))
    }

    /// Every known node.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.conn
            .prepare(
                "SELECT agent_id, hostname, labels, version, last_seq, connected, last_seen_ms,
                     (SELECT count(*) FROM events e WHERE e.agent_id = a.agent_id)
                 FROM agents a ORDER BY agent_id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(Node {
                        agent_id: r.get(0)?,
                        hostname: r.get(1)?,
                        labels: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                        version: r.get(3)?,
                        last_seq: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                        connected: r.get(5)?,
                        last_seen_ms: r.get(6)?,
                        events_stored: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
            .map(|mut nodes: Vec<Node>| {
                self.overlay_seen(&mut nodes);
                nodes
            })
    }

    /// The pending notification of `channel` to deliver next, due or not: among the
    /// oldest pending notification of each incident (a resolve never overtakes its
    /// trigger), the one due first. A notification that keeps failing therefore never
    /// holds up other incidents' pages on the same channel.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn next_pending(&self, channel: &str) -> Result<Option<Notification>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox o
                 WHERE o.channel = ?1 AND o.status = 'pending'
                   AND NOT EXISTS (SELECT 1 FROM outbox p
                                   WHERE p.channel = o.channel AND p.incident_id = o.incident_id
                                     AND p.status = 'pending' AND p.id < o.id)
                 ORDER BY o.next_attempt_ms, o.id LIMIT 1"
            ))
            .and_then(|mut s| s.query_row([channel], notification_from_row).optional())
            .map_err(|e| self.err(e))
    }

    /// Records a delivery attempt's outcome: delivered, retry at `retry_at_ms`, failed
    /// for good, or skipped on purpose; and adds it to the incident's timeline.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn record_attempt(&mut self, id: i64, outcome: &Attempt) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_ms();
        let tx = self.conn.transaction().map_err(err)?;
        let (incident_id, channel, kind): (i64, String, String) = tx
            .query_row(
                "SELECT incident_id, channel, kind FROM outbox WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(err)?;
        match outcome {
            Attempt::Delivered => {
                tx.execute(
                    "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_ms = ?2, last_error = NULL WHERE id = ?1",
                    params![id, now],
                )
                .map_err(err)?;
                timeline(
                    &tx,
                    incident_id,
                    now,
                    "notified",
                    "aggregator",
                    &format!("{kind} delivered to {channel}"),
                )
                .map_err(err)?;
            }
            Attempt::Retry { retry_at_ms, error } => {
                tx.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1",
                    params![id, retry_at_ms, error],
                )
                .map_err(err)?;
            }
            Attempt::Skipped { reason } => {
                tx.execute(
                    "UPDATE outbox SET status = 'skipped', last_error = ?2 WHERE id = ?1",
                    params![id, reason],
                )
                .map_err(err)?;
                timeline(
                    &tx,
                    incident_id,
                    now,
                    "notify_skipped",
                    "aggregator",
                    &format!("{kind} to {channel} not sent: {reason}"),
                )
                .map_err(err)?;
            }
            Attempt::Failed { error } => {
                tx.execute(
                    "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?2 WHERE id = ?1",
                    params![id, error],
                )
                .map_err(err)?;
                timeline(
                    &tx,
                    incident_id,
                    now,
                    "notify_failed",
                    "aggregator",
                    &format!("{kind} to {channel} failed: {error}"),
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}

/// Outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The channel accepted it.
    Delivered,
    /// Transient failure: try again at this time.
    Retry {
        /// Next attempt (Unix ms).
        retry_at_ms: i64,
        /// What went wrong.
        error: String,
    },
    /// Permanent failure (e.g. HTTP 400): give up and record it.
    Failed {
        /// What went wrong.
        error: String,
    },
    /// Deliberately not sent (status `skipped`, timeline `notify_skipped`): e.g. a storm
    /// summary of incidents that all resolved, to PagerDuty.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// Whether the last event of `check` on `agent_id` said it was flapping (heartbeats do
/// not carry the flag).
fn last_event_flapping(conn: &Connection, agent_id: &str, check: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT flapping FROM events WHERE agent_id = ?1 AND check_name = ?2 ORDER BY seq DESC LIMIT 1",
    )?
    .query_row(params![agent_id, check], |r| r.get::<_, bool>(0))
    .optional()
    .map(Option::unwrap_or_default)
}

/// The body of [`Store::ingest_group`] for one agent's batch, inside the transaction
/// (`base` gives everything but the node's labels, read here). An OK event that does not
/// flap, of a fingerprint in `quiet` (see [`Store`]), is stored without correlation: it
/// would change nothing. `quiet` is kept up to date with what the batch does.
fn ingest_in(
    tx: &Connection,
    base: &apply::Context<'_>,
    agent_id: &str,
    events: &[Event],
    quiet: &mut std::collections::HashSet<String>,
) -> rusqlite::Result<IngestOutcome> {
    let now = base.now;
    let node_labels: BTreeMap<String, String> = tx
        .query_row(
            "SELECT labels FROM agents WHERE agent_id = ?1",
            [agent_id],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut out = IngestOutcome::default();
    let actor = format!("agent:{agent_id}");
    let ctx = apply::Context {
        node_labels: &node_labels,
        ..*base
    };
    for e in events {
        let labels_json = serde_json::to_string(&e.labels).unwrap_or_default();
        let inserted = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO events (agent_id, seq, check_name, labels, state, previous, value, unit,
                         threshold, message, observed_at_ms, breach_started_at_ms, flapping, received_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        agent_id,
                        sql_u64(e.seq),
                        e.check,
                        labels_json,
                        e.state.as_str(),
                        e.previous.as_str(),
                        e.value,
                        e.unit,
                        e.threshold,
                        e.message,
                        e.observed_at_ms,
                        e.breach_started_at_ms,
                        e.flapping,
                        now
                    ])
                })
                ?;
        out.last_seq = out.last_seq.max(e.seq);
        if inserted == 0 {
            continue; // a replayed duplicate: already stored and correlated
        }
        out.stored += 1;
        let fp = correlate::fingerprint(agent_id, &e.check, &e.labels);
        tx.prepare_cached(
                "INSERT INTO checks (fingerprint, agent_id, check_name, labels, state, value, unit, since_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (fingerprint) DO UPDATE SET state = ?5, value = ?6, unit = ?7, since_ms = ?8, updated_ms = ?9",
            )
            .and_then(|mut s| s.execute(params![fp, agent_id, e.check, labels_json, e.state.as_str(), e.value, e.unit, e.observed_at_ms, now]))
            ?;
        if e.state == State::Ok && !e.flapping && quiet.contains(&fp) {
            continue; // `apply` would find it quiet and change nothing
        }

        let obs = apply::Observation {
            node: agent_id,
            check: &e.check,
            labels: &e.labels,
            state: e.state,
            value: e.value,
            unit: &e.unit,
            threshold: e.threshold,
            message: &e.message,
            breach_started_at_ms: e.breach_started_at_ms,
            actor: &actor,
            reconcile: false,
            flapping: e.flapping,
        };
        let changed = (out.opened.len(), out.resolved.len());
        if apply::apply_noting(tx, &ctx, &obs, &mut out)? {
            quiet.insert(fp);
        } else {
            quiet.remove(&fp);
            if changed != (out.opened.len(), out.resolved.len()) {
                // Another member's latest open incident may have changed.
                quiet.clear();
            }
        }
    }
    // After the batch: what the node replays from its outage is inhibited, not paged.
    let changed = (out.opened.len(), out.resolved.len());
    node_back(tx, &ctx, agent_id, &mut out)?;
    if changed != (out.opened.len(), out.resolved.len()) {
        quiet.clear();
    } else {
        quiet.remove(&format!("{agent_id}/{NODE_DOWN}"));
    }
    tx.execute(
        "UPDATE agents SET last_seq = max(last_seq, ?2), last_seen_ms = ?3 WHERE agent_id = ?1",
        params![agent_id, sql_u64(out.last_seq), now],
    )?;
    out.last_seq = tx
        .query_row(
            "SELECT last_seq FROM agents WHERE agent_id = ?1",
            [agent_id],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(out.last_seq, |s| u64::try_from(s).unwrap_or(0));
    Ok(out)
}

const INCIDENT_COLUMNS: &str = "id, dedup_key, fingerprint, node, check_name, labels, severity, status, state, value, unit, threshold, \
     summary, breach_started_at_ms, triggered_at_ms, acknowledged_at_ms, resolved_at_ms, resolution, \
     coalesce(cycle_triggered_at_ms, triggered_at_ms), coalesce(cycle_breach_started_at_ms, breach_started_at_ms)";

/// How many columns [`INCIDENT_COLUMNS`] selects: the index of the first column after them.
const INCIDENT_COLUMN_COUNT: usize = 20;

const OUTBOX_COLUMNS: &str = "id, incident_id, channel, kind, status, attempts, payload, last_error, created_ms, next_attempt_ms, delivered_ms, idempotency_key";

/// Parses a stored state name (anything unknown is `Unknown`).
fn parse_state(s: &str) -> State {
    match s {
        "ok" => State::Ok,
        "pending" => State::Pending,
        "warning" => State::Warning,
        "critical" => State::Critical,
        _ => State::Unknown,
    }
}

fn incident_from_row(r: &Row<'_>) -> rusqlite::Result<Incident> {
    Ok(Incident {
        id: r.get(0)?,
        dedup_key: r.get(1)?,
        fingerprint: r.get(2)?,
        node: r.get(3)?,
        check: r.get(4)?,
        labels: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
        severity: Severity::parse(&r.get::<_, String>(6)?).unwrap_or(Severity::P4),
        status: Status::parse(&r.get::<_, String>(7)?).unwrap_or(Status::Triggered),
        state: parse_state(&r.get::<_, String>(8)?),
        value: r.get(9)?,
        unit: r.get(10)?,
        threshold: r.get(11)?,
        summary: r.get(12)?,
        breach_started_at_ms: r.get(13)?,
        triggered_at_ms: r.get(14)?,
        acknowledged_at_ms: r.get(15)?,
        resolved_at_ms: r.get(16)?,
        resolution: r.get(17)?,
        cycle_triggered_at_ms: r.get(18)?,
        cycle_breach_started_at_ms: r.get(19)?,
    })
}

fn notification_from_row(r: &Row<'_>) -> rusqlite::Result<Notification> {
    Ok(Notification {
        id: r.get(0)?,
        incident_id: r.get(1)?,
        channel: r.get(2)?,
        kind: r.get(3)?,
        status: r.get(4)?,
        attempts: r.get(5)?,
        payload: r.get(6)?,
        last_error: r.get(7)?,
        created_at_ms: r.get(8)?,
        next_attempt_ms: r.get(9)?,
        delivered_at_ms: r.get(10)?,
        idempotency_key: r.get(11)?,
    })
}

fn load_incident_opt(conn: &Connection, id: i64) -> rusqlite::Result<Option<Incident>> {
    conn.prepare_cached(&format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id = ?1"
    ))?
    .query_row([id], incident_from_row)
    .optional()
}

fn load_incident(conn: &Connection, id: i64) -> rusqlite::Result<Incident> {
    load_incident_opt(conn, id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

fn timeline(
    conn: &Connection,
    incident_id: i64,
    at: i64,
    kind: &str,
    actor: &str,
    note: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO timeline (incident_id, at_ms, kind, actor, note) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![incident_id, at, kind, actor, note])?;
    Ok(())
}

/// Enqueues `kind` for `id` on every channel that was sent (or may still send) the
/// trigger: never a lone acknowledge or resolve. Returns how many were enqueued.
fn notify_triggered(conn: &Connection, id: i64, kind: &str, now: i64) -> rusqlite::Result<usize> {
    let incident = load_incident(conn, id)?;
    // Only this cycle's triggers: a reopened incident's resolve goes to the channels of
    // its new trigger.
    let channels: Vec<String> = conn
        .prepare_cached(
            "SELECT o.channel FROM outbox o, incidents i
             WHERE i.id = ?1 AND o.incident_id = i.id AND o.kind = 'trigger' AND o.status != 'failed'
               AND o.id > i.outbox_mark
             ORDER BY o.id",
        )?
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for ch in &channels {
        enqueue(conn, &incident, ch, kind, now)?;
    }
    Ok(channels.len())
}

fn enqueue(
    conn: &Connection,
    incident: &Incident,
    channel: &str,
    kind: &str,
    now: i64,
) -> rusqlite::Result<()> {
    let body = payload::render_with(
        kind,
        incident,
        now,
        hooks::remediation_json(conn, incident.id)?,
    );
    // Each cycle of a reopened incident has idempotency keys of its own, so that a
    // receiver that drops repeats still gets the new trigger and resolve.
    let reopened: i64 = conn
        .prepare_cached("SELECT reopened FROM incidents WHERE id = ?1")?
        .query_row([incident.id], |r| r.get(0))?;
    let key = if reopened == 0 {
        format!("{}-{kind}", incident.dedup_key)
    } else {
        format!("{}-{kind}-{}", incident.dedup_key, reopened + 1)
    };
    conn.prepare_cached(
        "INSERT INTO outbox (incident_id, channel, kind, status, attempts, payload, created_ms, next_attempt_ms,
             idempotency_key)
         VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?5, ?6)",
    )?
    .execute(params![incident.id, channel, kind, body, now, key])?;
    Ok(())
}

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// Most agents' batches committed in one transaction.
pub const MAX_GROUP: usize = 64;

enum Msg {
    Job(Job),
    Ingest {
        agent_id: String,
        events: Vec<Event>,
        reply: oneshot::Sender<Result<IngestOutcome, StoreError>>,
    },
}

/// Async access to the store thread. Cloneable.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").finish_non_exhaustive()
    }
}

/// Moves `store` onto its own thread. The thread ends when every handle is dropped.
/// Event batches that queue up while a commit runs are committed together (group
/// commit: one transaction and one fsync for many agents).
///
/// # Errors
/// [`StoreError::Dir`] if the thread cannot be started.
pub fn spawn(mut store: Store) -> Result<StoreHandle, StoreError> {
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    std::thread::Builder::new()
        .name("tocsin-store".into())
        .spawn(move || {
            let mut next = rx.blocking_recv();
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Job(job) => job(&mut store),
                    Msg::Ingest {
                        agent_id,
                        events,
                        reply,
                    } => {
                        let mut group = vec![(agent_id, events, reply)];
                        while group.len() < MAX_GROUP {
                            match rx.try_recv() {
                                Ok(Msg::Ingest {
                                    agent_id,
                                    events,
                                    reply,
                                }) => group.push((agent_id, events, reply)),
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let batches: Vec<(&str, &[Event])> = group
                            .iter()
                            .map(|(a, e, _)| (a.as_str(), e.as_slice()))
                            .collect();
                        let results = store.ingest_group(&batches);
                        for ((_, _, reply), result) in group.into_iter().zip(results) {
                            let _ = reply.send(result);
                        }
                    }
                }
                if next.is_none() {
                    next = rx.blocking_recv();
                }
            }
        })
        .map_err(|source| StoreError::Dir {
            path: PathBuf::from("<store thread>"),
            source,
        })?;
    Ok(StoreHandle { tx })
}

impl StoreHandle {
    /// Runs `f` on the store thread and returns its result.
    ///
    /// # Errors
    /// [`StoreError::Stopped`] when the store thread is gone, else `f`'s error.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            let _ = reply.send(f(s));
        });
        self.tx
            .send(Msg::Job(job))
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// [`Store::ingest`] through the group commit.
    ///
    /// # Errors
    /// [`StoreError`]; nothing of this batch is committed then.
    pub async fn ingest(
        &self,
        agent_id: String,
        events: Vec<Event>,
    ) -> Result<IngestOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Ingest {
                agent_id,
                events,
                reply,
            })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str) -> AgentHello {
        AgentHello {
            agent_id: id.into(),
            hostname: id.into(),
            labels: BTreeMap::from([("service".to_owned(), "web".to_owned())]),
            version: "test".into(),
            boot_id: String::new(),
            instance_id: "i1".into(),
            heartbeat_interval_ms: 1000,
        }
    }

    fn event(seq: u64, state: State) -> Event {
        Event {
            seq,
            check: "process:nginx".into(),
            labels: BTreeMap::new(),
            state,
            previous: State::Ok,
            value: Some(0.0),
            unit: "count".into(),
            threshold: Some(1.0),
            message: format!("nginx {}", state.as_str()),
            observed_at_ms: 1,
            breach_started_at_ms: 1,
            flapping: false,
        }
    }

    fn store(channels: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(
            dir.path(),
            channels.iter().map(|c| (*c).to_owned()).collect(),
        )
        .expect("open");
        (dir, s)
    }

    #[test]
    fn duplicates_by_agent_and_seq_are_stored_and_correlated_once() {
        let (_dir, mut s) = store(&["hook"]);
        assert_eq!(
            s.hello(&hello("a"), 1).expect("hello"),
            HelloOutcome::Welcome(0)
        );
        let batch = [event(1, State::Ok), event(2, State::Critical)];
        let first = s.ingest("a", &batch).expect("ingest");
        assert_eq!(
            (first.stored, first.last_seq, first.opened.len()),
            (2, 2, 1)
        );
        let replay = s.ingest("a", &batch).expect("replay");
        assert_eq!(
            (
                replay.stored,
                replay.last_seq,
                replay.opened.len(),
                replay.notifications
            ),
            (0, 2, 0, 0)
        );
        assert_eq!(
            s.hello(&hello("a"), 2).expect("hello"),
            HelloOutcome::Welcome(2),
            "Welcome carries the last stored seq"
        );
        assert_eq!(s.incidents(IncidentFilter::All, 10).expect("list").len(), 1);
    }

    #[test]
    fn trigger_then_resolve_with_timestamps_labels_and_outbox() {
        let (_dir, mut s) = store(&["console", "hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let opened = s.ingest("a", &[event(1, State::Critical)]).expect("ingest");
        assert_eq!(opened.notifications, 2);
        let id = opened.opened[0];
        let resolved = s.ingest("a", &[event(2, State::Ok)]).expect("ingest");
        assert_eq!(resolved.resolved, vec![id]);
        let d = s.incident(id).expect("read").expect("exists");
        assert_eq!(d.incident.status, Status::Resolved);
        assert_eq!(d.incident.severity, Severity::P2);
        assert_eq!(
            d.incident.labels.get("service").map(String::as_str),
            Some("web")
        );
        assert!(
            d.incident
                .resolved_at_ms
                .is_some_and(|r| r >= d.incident.triggered_at_ms)
        );
        let kinds: Vec<(&str, &str)> = d
            .notifications
            .iter()
            .map(|n| (n.channel.as_str(), n.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("console", "trigger"),
                ("hook", "trigger"),
                ("console", "resolve"),
                ("hook", "resolve")
            ]
        );
    }

    #[test]
    fn resolve_goes_only_to_channels_that_got_the_trigger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(dir.path(), vec!["old".into()]).expect("open");
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("ingest")
            .opened[0];
        drop(s);
        // Restarted with a different channel list: the resolve still goes to "old" only.
        let mut s = Store::open(dir.path(), vec!["new".into()]).expect("reopen");
        s.ingest("a", &[event(2, State::Ok)]).expect("ingest");
        let d = s.incident(id).expect("read").expect("exists");
        let resolves: Vec<&str> = d
            .notifications
            .iter()
            .filter(|n| n.kind == "resolve")
            .map(|n| n.channel.as_str())
            .collect();
        assert_eq!(resolves, vec!["old"]);
    }

    #[test]
    fn severity_follows_the_state_and_refire_after_the_reopen_window_opens_a_new_incident() {
        let (_dir, s) = store(&[]);
        let mut s = s.with_correlation(correlate::Correlation {
            reopen_window_ms: 0,
            ..correlate::Correlation::default()
        });
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Warning)])
            .expect("w")
            .opened[0];
        s.ingest("a", &[event(2, State::Critical)]).expect("c");
        assert_eq!(
            s.incident(id).expect("r").expect("e").incident.severity,
            Severity::P2
        );
        s.ingest("a", &[event(3, State::Ok)]).expect("ok");
        let again = s.ingest("a", &[event(4, State::Critical)]).expect("again");
        assert_eq!(again.opened.len(), 1);
        assert_ne!(again.opened[0], id);
    }

    fn hello_labels(id: &str, labels: &[(&str, &str)]) -> AgentHello {
        AgentHello {
            instance_id: format!("i-{id}"),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..hello(id)
        }
    }

    fn on(check: &str, seq: u64, state: State) -> Event {
        Event {
            check: check.into(),
            ..event(seq, state)
        }
    }

    fn kinds(s: &Store, id: i64) -> Vec<String> {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .timeline
            .into_iter()
            .map(|t| t.kind)
            .collect()
    }

    fn triggers(s: &Store, id: i64) -> usize {
        s.incident(id)
            .expect("read")
            .expect("exists")
            .notifications
            .iter()
            .filter(|n| n.kind == "trigger")
            .count()
    }

    #[test]
    fn one_check_on_many_nodes_is_one_incident_paged_once() {
        let (_dir, mut s) = store(&["hook"]);
        let mut ids = Vec::new();
        for n in 1..=12 {
            let node = format!("web-{n}");
            s.hello(&hello_labels(&node, &[("service", "web")]), n)
                .expect("hello");
            let out = s
                .ingest(&node, &[on("cpu", 1, State::Critical)])
                .expect("ingest");
            ids.extend(out.opened);
            // Only the first member pages; the others join without a second trigger.
            assert_eq!(out.notifications, usize::from(n == 1), "node {n}");
        }
        assert_eq!(ids.len(), 1, "one incident: {ids:?}");
        let d = s.incident(ids[0]).expect("r").expect("e");
        assert_eq!(d.members.len(), 12);
        assert_eq!(d.incident.node, "12 nodes");
        assert_eq!(d.incident.check, "cpu");
        assert!(
            d.incident
                .summary
                .starts_with("cpu critical on 12 nodes: web-1, web-2,"),
            "{}",
            d.incident.summary
        );
        assert_eq!(
            d.incident.severity,
            Severity::P1,
            "critical on every node of the service"
        );
        assert!(d.timeline.iter().any(|t| t.kind == "severity"));
        // All but one recover: still open; then the last: exactly one resolve.
        for n in 1..=11 {
            let out = s
                .ingest(&format!("web-{n}"), &[on("cpu", 2, State::Ok)])
                .expect("ok");
            assert!(out.resolved.is_empty());
        }
        let d = s.incident(ids[0]).expect("r").expect("e");
        assert_eq!(d.incident.status, Status::Triggered);
        assert_eq!(d.incident.severity, Severity::P2, "one of 12 is not half");
        let out = s.ingest("web-12", &[on("cpu", 2, State::Ok)]).expect("ok");
        assert_eq!(out.resolved, ids);
        assert_eq!(out.notifications, 1, "one resolve to the channel paged");
    }

    #[test]
    fn group_by_node_puts_a_nodes_checks_together_and_severity_follows_the_members() {
        let (_dir, s) = store(&["hook"]);
        let mut s = s.with_correlation(correlate::Correlation {
            group_by: vec!["node".into()],
            ..correlate::Correlation::default()
        });
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[on("cpu", 1, State::Warning)])
            .expect("w")
            .opened[0];
        s.ingest(
            "a",
            &[
                on("memory", 2, State::Critical),
                on("disk", 3, State::Warning),
            ],
        )
        .expect("more");
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!((d.members.len(), d.incident.severity), (3, Severity::P2));
        assert_eq!(d.incident.check, "3 checks");
        assert_eq!(triggers(&s, id), 1);
        let out = s
            .ingest("a", &[on("memory", 4, State::Ok)])
            .expect("memory ok");
        assert!(out.resolved.is_empty(), "two members still fire");
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(
            d.incident.severity,
            Severity::P3,
            "recomputed from the warnings"
        );
        assert!(
            d.timeline
                .iter()
                .any(|t| t.kind == "severity" && t.note.starts_with("now P3"))
        );
        s.ingest("a", &[on("cpu", 5, State::Ok)]).expect("cpu ok");
        let out = s.ingest("a", &[on("disk", 6, State::Ok)]).expect("disk ok");
        assert_eq!((out.resolved.len(), out.notifications), (1, 1));
    }

    #[test]
    fn a_group_that_clears_inside_group_wait_sends_nothing_and_a_held_group_pages_once() {
        let (_dir, s) = store(&["hook"]);
        let mut s = s.with_correlation(correlate::Correlation {
            group_wait_ms: 60_000,
            ..correlate::Correlation::default()
        });
        s.hello(&hello("a"), 1).expect("hello");
        s.hello(&hello_labels("b", &[]), 2).expect("hello");
        let id = s
            .ingest("a", &[on("cpu", 1, State::Critical)])
            .expect("c")
            .opened[0];
        assert_eq!(
            s.release_held(now_ms()).expect("release"),
            0,
            "still gathering"
        );
        let out = s.ingest("a", &[on("cpu", 2, State::Ok)]).expect("ok");
        assert_eq!(
            (out.resolved.len(), out.notifications),
            (1, 0),
            "no lone resolve"
        );
        assert_eq!(s.release_held(now_ms() + 120_000).expect("release"), 0);
        assert!(
            s.incident(id)
                .expect("r")
                .expect("e")
                .notifications
                .is_empty()
        );
        // Another group: two members gather, then one page names both.
        let id = s
            .ingest("a", &[on("memory", 3, State::Critical)])
            .expect("m")
            .opened[0];
        s.ingest("b", &[on("memory", 1, State::Critical)])
            .expect("m");
        assert_eq!(s.release_held(now_ms() + 120_000).expect("release"), 1);
        let d = s.incident(id).expect("r").expect("e");
        assert!(
            d.notifications[0]
                .payload
                .contains("memory critical on 2 nodes: a, b")
        );
        assert_eq!(s.release_held(now_ms() + 240_000).expect("again"), 0);
    }

    #[test]
    fn node_down_inhibits_the_nodes_other_alerts_until_it_is_back() {
        let (_dir, s) = store(&["hook"]);
        let mut s = s.with_correlation(correlate::Correlation {
            group_by: vec!["node".into(), "check".into()],
            ..correlate::Correlation::default()
        });
        s.hello(&hello("a"), 1).expect("hello");
        let seen = now_ms();
        let down = s
            .sweep_liveness(seen + 60_000, 5_000, seen)
            .expect("sweep")
            .opened[0];
        // A check that fires while the node is down (e.g. replayed from its outage
        // through a heartbeat that arrives before node_back) is recorded, not paged.
        let tx = s.conn.transaction().expect("tx");
        let none = BTreeMap::new();
        let correlation = s.correlation.clone();
        let ctx = apply::Context {
            silences: &[],
            router: &s.router,
            install_id: "x",
            node_labels: &none,
            now: now_ms(),
            correlation: &correlation,
            members: None,
        };
        let labels = BTreeMap::new();
        let obs = apply::Observation {
            node: "a",
            check: "http:api",
            labels: &labels,
            state: State::Critical,
            value: None,
            unit: "",
            threshold: None,
            message: "api down",
            breach_started_at_ms: 0,
            actor: "agent:a",
            reconcile: false,
            flapping: false,
        };
        let mut out = IngestOutcome::default();
        apply::apply(&tx, &ctx, &obs, &mut out).expect("apply");
        tx.commit().expect("commit");
        let id = out.opened[0];
        assert_eq!(out.notifications, 0);
        let d = s.incident(id).expect("r").expect("e");
        let entry = d
            .timeline
            .iter()
            .find(|t| t.kind == "inhibited")
            .expect("inhibited");
        assert!(entry.note.contains(&format!("#{down}")), "{}", entry.note);
        assert_eq!(s.release_held(now_ms()).expect("release"), 0, "still down");
        // An event batch from the node: what it replays is inhibited, then it is back.
        let out = s
            .ingest(
                "a",
                &[
                    on("memory", 1, State::Critical),
                    on("disk", 2, State::Critical),
                    on("disk", 3, State::Ok),
                ],
            )
            .expect("back");
        assert_eq!(out.resolved.len(), 2, "node_down and the disk that cleared");
        assert_eq!(out.notifications, 1, "only node_down's resolve");
        assert_eq!(
            s.release_held(now_ms()).expect("release"),
            2,
            "api and memory page now"
        );
        assert_eq!(triggers(&s, id), 1);
        assert!(kinds(&s, id).contains(&"uninhibited".to_owned()));
    }

    #[test]
    fn a_fingerprint_firing_again_inside_the_reopen_window_reopens_its_incident() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("c")
            .opened[0];
        s.ingest("a", &[event(2, State::Ok)]).expect("ok");
        let out = s.ingest("a", &[event(3, State::Critical)]).expect("again");
        assert_eq!((out.opened.clone(), out.notifications), (vec![id], 1));
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(d.incident.status, Status::Triggered);
        assert!(d.incident.resolved_at_ms.is_none());
        assert!(d.timeline.iter().any(|t| t.kind == "reopened"));
        let keys: Vec<&str> = d
            .notifications
            .iter()
            .map(|n| n.idempotency_key.as_str())
            .collect();
        assert_eq!(keys.len(), 3);
        assert_ne!(keys[0], keys[2], "the new trigger has a key of its own");
        let out = s.ingest("a", &[event(4, State::Ok)]).expect("ok again");
        assert_eq!((out.resolved.clone(), out.notifications), (vec![id], 1));
        assert_eq!(
            d.incident.dedup_key,
            s.incident(id).expect("r").expect("e").incident.dedup_key
        );
    }

    #[test]
    fn a_silence_ending_with_its_incident_expires_when_it_resolves() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("c")
            .opened[0];
        let m = crate::silence::Matcher::parse("node=a").expect("m");
        let now = now_ms();
        let sid = s
            .add_silence_with(vec![m], now, now + 3_600_000, "alice", "fixing", Some(id))
            .expect("add");
        s.ingest("a", &[event(2, State::Ok)]).expect("ok");
        let v = s
            .silences(now_ms() + 1)
            .into_iter()
            .find(|v| v.id == sid)
            .expect("listed");
        assert_eq!(v.state, "expired");
        assert_eq!(
            v.expired_by.as_deref(),
            Some(format!("incident #{id} resolved").as_str())
        );
        drop(s);
        let s = Store::open(_dir.path(), vec![]).expect("reopen");
        let v = s
            .silences(now_ms() + 1)
            .into_iter()
            .find(|v| v.id == sid)
            .expect("listed");
        assert_eq!((v.state, v.ends_with_incident), ("expired", Some(id)));
        assert!(s.known_label_names().expect("labels").contains("service"));
    }

    #[test]
    fn an_old_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join("tocsin.db")).expect("open");
            conn.execute_batch(schema::SCHEMA).expect("old schema");
            conn.execute_batch(
                "INSERT INTO incidents (fingerprint, node, check_name, labels, severity, status, state, unit,
                     summary, breach_started_at_ms, triggered_at_ms, dedup_key)
                 VALUES ('a/process:nginx', 'a', 'process:nginx', '{}', 'P2', 'triggered', 'critical', 'count',
                     'nginx down', 1, 1, 'tocsin-x-1');
                 INSERT INTO timeline (incident_id, at_ms, kind, actor, note) VALUES (1, 1, 'flapping', 'a', 'held');",
            )
            .expect("old incident");
        }
        let mut s = Store::open(dir.path(), vec!["hook".into()]).expect("migrate");
        let d = s.incident(1).expect("r").expect("e");
        assert_eq!(d.members.len(), 1, "its one member");
        s.hello(&hello("a"), 1).expect("hello");
        // It settles while firing: the held page goes out, into the same incident.
        let out = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("settled");
        assert_eq!((out.opened.len(), out.notifications), (0, 1));
        drop(s);
        Store::open(dir.path(), vec![]).expect("migrating again is a no-op");
    }

    #[test]
    fn a_second_agent_with_the_same_identity_is_refused_until_the_first_leaves() {
        let (_dir, mut s) = store(&[]);
        assert_eq!(
            s.hello(&hello("a"), 1).expect("first"),
            HelloOutcome::Welcome(0)
        );
        let twin = AgentHello {
            instance_id: "i2".into(),
            ..hello("a")
        };
        assert_eq!(
            s.hello(&twin, 2).expect("second"),
            HelloOutcome::Duplicate {
                connected_instance: "i1".into()
            }
        );
        // The same process reconnecting is not a duplicate.
        assert_eq!(
            s.hello(&hello("a"), 3).expect("reconnect"),
            HelloOutcome::Welcome(0)
        );
        // The stale stream 1 closing does not end session 3.
        s.disconnected("a", 1).expect("stale close");
        assert!(matches!(
            s.hello(&twin, 4).expect("still refused"),
            HelloOutcome::Duplicate { .. }
        ));
        s.disconnected("a", 3).expect("close");
        assert_eq!(
            s.hello(&twin, 5).expect("now free"),
            HelloOutcome::Welcome(0)
        );
    }

    #[test]
    fn an_ok_event_is_correlated_again_once_a_reopen_makes_its_member_fire() {
        // b's OK finds b in no open incident (quiet); in the same group commit c reopens
        // the incident resolved by hand, where b's member still fires. b's next OK must
        // recover that member, as it did before OK events of quiet checks were skipped.
        let (_dir, mut s) = store(&["hook"]);
        for (session, agent) in [(1, "a"), (2, "b"), (3, "c")] {
            s.hello(
                &AgentHello {
                    instance_id: format!("i{agent}"),
                    ..hello(agent)
                },
                session,
            )
            .expect("hello");
        }
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("a fires")
            .opened[0];
        s.ingest("b", &[event(1, State::Critical)])
            .expect("b joins");
        s.ingest("c", &[event(1, State::Critical), event(2, State::Ok)])
            .expect("c joins and recovers");
        assert_eq!(
            s.resolve_by_hand(id, "alice", "looks fine")
                .expect("resolve"),
            Change::Done
        );
        let ok = [event(2, State::Ok)];
        let fire = [event(3, State::Critical)];
        let outs = s.ingest_group(&[("b", &ok[..]), ("c", &fire[..])]);
        assert!(outs[0].as_ref().expect("b").opened.is_empty());
        assert_eq!(
            outs[1].as_ref().expect("c").opened,
            vec![id],
            "c reopens it"
        );
        let member = |s: &Store, node: &str| {
            s.incident(id)
                .expect("read")
                .expect("exists")
                .members
                .into_iter()
                .find(|m| m.node == node)
                .expect("member")
                .state
        };
        assert_eq!(
            member(&s, "b"),
            State::Critical,
            "b fired when it was resolved"
        );
        let recovered = kinds(&s, id).iter().filter(|k| *k == "member").count();
        s.ingest("b", &[event(3, State::Ok)]).expect("b ok");
        assert_eq!(member(&s, "b"), State::Ok, "b's OK is applied");
        assert_eq!(
            kinds(&s, id).iter().filter(|k| *k == "member").count(),
            recovered + 1,
            "and recorded as a recovery"
        );
    }

    #[test]
    fn kept_members_give_the_incident_a_reload_of_every_member_would() {
        // Store `kept` keeps members between events; `fresh` forgets them before each
        // event (each refresh reloads every member). Every step must agree.
        type Seen = (
            Vec<(i64, String, String, String, String, String, String)>,
            Vec<Vec<String>>,
        );
        fn seen(s: &Store) -> Seen {
            let all = s.incidents(IncidentFilter::All, 100).expect("list");
            let mut members = Vec::new();
            for i in &all {
                let d = s.incident(i.id).expect("read").expect("exists");
                members.push(
                    d.members
                        .iter()
                        .map(|m| {
                            format!(
                                "{} {} {:?} {}",
                                m.fingerprint,
                                m.state.as_str(),
                                m.value,
                                m.message
                            )
                        })
                        .chain(d.timeline.iter().map(|t| format!("{}: {}", t.kind, t.note)))
                        .collect(),
                );
            }
            let incidents = all
                .iter()
                .map(|i| {
                    (
                        i.id,
                        format!("{} {} {:?}", i.node, i.check, i.labels),
                        format!("{} {}", i.severity.as_str(), i.status.as_str()),
                        i.state.as_str().to_owned(),
                        format!("{:?} {} {:?}", i.value, i.unit, i.threshold),
                        i.summary.clone(),
                        i.fingerprint.clone(),
                    )
                })
                .collect();
            (incidents, members)
        }
        let (_d1, mut kept) = store(&["hook"]);
        let (_d2, mut fresh) = store(&["hook"]);
        for s in [&mut kept, &mut fresh] {
            for (session, agent) in [(1, "a"), (2, "b"), (3, "c")] {
                s.hello(
                    &AgentHello {
                        instance_id: format!("i{agent}"),
                        ..hello(agent)
                    },
                    session,
                )
                .expect("hello");
            }
        }
        let steps = [
            ("a", State::Critical, 1.0),
            ("b", State::Warning, 2.0),
            ("c", State::Critical, 3.0),
            ("a", State::Critical, 4.0), // a value update
            ("b", State::Critical, 5.0),
            ("c", State::Ok, 6.0),
            ("a", State::Warning, 7.0),
            ("c", State::Critical, 8.0),
            ("c", State::Critical, 9.0),
            ("b", State::Ok, 10.0),
            ("a", State::Ok, 11.0),
            ("c", State::Ok, 12.0),      // resolves
            ("b", State::Warning, 13.0), // reopens
            ("b", State::Ok, 14.0),
        ];
        for (seq, (agent, state, value)) in steps.into_iter().enumerate() {
            let e = [valued(seq as u64 + 1, state, value, "ms")];
            kept.ingest(agent, &e).expect("kept");
            fresh.members.get_mut().clear();
            fresh.ingest(agent, &e).expect("fresh");
            assert_eq!(seen(&kept), seen(&fresh), "after step {seq}");
        }
        assert_eq!(
            kept.incidents(IncidentFilter::All, 10).expect("list").len(),
            1,
            "one incident all along"
        );
    }

    fn status(check: &str, state: State) -> CheckStatus {
        CheckStatus {
            check: check.into(),
            labels: BTreeMap::new(),
            state,
            value: Some(1.0),
            unit: "count".into(),
            since_ms: 1,
        }
    }

    #[test]
    fn heartbeat_reconciles_only_when_no_event_is_in_flight() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("ingest")
            .opened[0];
        // The agent already has seq 2 (the recovery) but the store does not: no guess.
        let early = s
            .heartbeat("a", 2, &[status("process:nginx", State::Ok)])
            .expect("hb");
        assert!(early.resolved.is_empty());
        // The recovery event was lost for good (e.g. spool overflow): seq 2 was stored
        // as something else and the heartbeat is consistent: it resolves.
        s.ingest(
            "a",
            &[Event {
                check: "cpu".into(),
                ..event(2, State::Ok)
            }],
        )
        .expect("ingest");
        let out = s
            .heartbeat("a", 2, &[status("process:nginx", State::Ok)])
            .expect("hb");
        assert_eq!(out.resolved, vec![id]);
        assert_eq!(
            out.notifications, 1,
            "the resolve is owed to the channel that got the trigger"
        );
        // A firing check with no incident opens one; a repeat does not touch it.
        let opened = s
            .heartbeat("a", 2, &[status("memory", State::Warning)])
            .expect("hb");
        assert_eq!(opened.opened.len(), 1);
        let again = s
            .heartbeat("a", 2, &[status("memory", State::Warning)])
            .expect("hb");
        assert!(again.opened.is_empty() && again.notifications == 0);
        let d = s.incident(opened.opened[0]).expect("r").expect("e");
        assert_eq!(
            d.timeline.len(),
            1,
            "no timeline entry per heartbeat: {:?}",
            d.timeline
        );
    }

    /// Regression: a resolve by hand of a check that still fired went silent — the
    /// heartbeat shortcut skipped reconciliation while the agent's states were unchanged,
    /// so no new incident opened (until an aggregator restart paged a surprise).
    #[test]
    fn a_hand_resolve_of_a_still_firing_group_reopens_at_the_next_heartbeats() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello a");
        s.hello(
            &AgentHello {
                instance_id: "ib".into(),
                ..hello("b")
            },
            2,
        )
        .expect("hello b");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("a fires")
            .opened[0];
        s.ingest("b", &[event(1, State::Critical)])
            .expect("b joins");
        let firing = [status("process:nginx", State::Critical)];
        // Reconciled once each: nothing new, and the states are remembered.
        for agent in ["a", "b"] {
            let out = s.heartbeat(agent, 1, &firing).expect("hb");
            assert!(out.opened.is_empty() && out.notifications == 0);
        }
        assert_eq!(
            s.resolve_by_hand(id, "alice", "looks fine")
                .expect("resolve"),
            Change::Done
        );
        let again = s.heartbeat("a", 1, &firing).expect("hb a");
        assert_eq!(again.opened.len(), 1, "a new incident for what still fires");
        assert_ne!(again.opened[0], id);
        assert_eq!(again.notifications, 1, "and it pages");
        let joined = s.heartbeat("b", 1, &firing).expect("hb b");
        assert!(joined.opened.is_empty(), "b joins the new incident");
        let d = s.incident(again.opened[0]).expect("r").expect("e");
        assert_eq!(d.members.len(), 2, "every member that still fires");
        assert_eq!(triggers(&s, again.opened[0]), 1);
    }

    fn valued(seq: u64, state: State, value: f64, unit: &str) -> Event {
        Event {
            value: Some(value),
            unit: unit.into(),
            message: format!("nginx {} ({value} {unit})", state.as_str()),
            ..event(seq, state)
        }
    }

    /// The `resolve` payload queued for incident `id`.
    fn resolve_payload(s: &Store, id: i64) -> serde_json::Value {
        let n = s
            .incident(id)
            .expect("r")
            .expect("e")
            .notifications
            .into_iter()
            .find(|n| n.kind == "resolve")
            .expect("a resolve");
        serde_json::from_str(&n.payload).expect("json")
    }

    /// Regression: the incident's value came from whichever member reported last (one
    /// that just recovered showed "critical, value 0"), and the resolve carried the old
    /// firing text ("critical on 1 node: b").
    #[test]
    fn an_incident_shows_its_worst_firing_member_and_resolves_with_the_resolving_state() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello a");
        s.hello(
            &AgentHello {
                instance_id: "ib".into(),
                ..hello("b")
            },
            2,
        )
        .expect("hello b");
        let id = s
            .ingest("a", &[valued(1, State::Critical, 95.0, "percent")])
            .expect("a")
            .opened[0];
        s.ingest("b", &[valued(1, State::Warning, 70.0, "percent")])
            .expect("b");
        let i = s.incident(id).expect("r").expect("e").incident;
        assert_eq!(
            (i.state, i.value),
            (State::Critical, Some(95.0)),
            "worst, not latest"
        );
        s.ingest("a", &[valued(2, State::Ok, 0.0, "percent")])
            .expect("a recovers");
        let i = s.incident(id).expect("r").expect("e").incident;
        assert_eq!(
            (i.state, i.value, i.status),
            (State::Warning, Some(70.0), Status::Triggered),
            "the member still firing, not the one that recovered"
        );
        s.ingest("b", &[valued(2, State::Ok, 1.0, "percent")])
            .expect("b recovers");
        let i = s.incident(id).expect("r").expect("e").incident;
        assert_eq!((i.state, i.value), (State::Ok, Some(1.0)));
        assert_eq!(i.summary, "process:nginx ok on 2 nodes: a, b");
        let p = resolve_payload(&s, id);
        assert_eq!(
            p["incident"]["summary"], "process:nginx ok on 2 nodes: a, b",
            "{p}"
        );
        assert_eq!(p["incident"]["state"], "ok", "{p}");

        // A lone member resolves with its own recovery message.
        let lone = s
            .ingest(
                "a",
                &[Event {
                    check: "disk".into(),
                    ..valued(3, State::Critical, 99.0, "percent")
                }],
            )
            .expect("disk")
            .opened[0];
        s.ingest(
            "a",
            &[Event {
                check: "disk".into(),
                ..valued(4, State::Ok, 40.0, "percent")
            }],
        )
        .expect("disk ok");
        let p = resolve_payload(&s, lone);
        assert_eq!(p["incident"]["summary"], "nginx ok (40 percent)", "{p}");
    }

    /// A value-only update of a firing member (same state, same labels) takes the short
    /// path (no member reload, no severity recompute): the incident still shows the
    /// worst firing member's value, a lone member's latest message, and keeps severity
    /// and description; a state change still reclassifies.
    #[test]
    fn a_value_update_of_a_firing_member_keeps_the_incident_as_a_full_refresh_would() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello_labels("a", &[]), 1).expect("hello a");
        s.hello(&hello_labels("b", &[]), 2).expect("hello b");
        let id = s
            .ingest("a", &[valued(1, State::Warning, 70.0, "percent")])
            .expect("a")
            .opened[0];
        let out = s
            .ingest("a", &[valued(2, State::Warning, 75.0, "percent")])
            .expect("a again");
        assert_eq!((out.opened.len(), out.notifications), (0, 0));
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(
            (d.incident.severity, d.incident.state, d.incident.value),
            (Severity::P3, State::Warning, Some(75.0))
        );
        assert_eq!(d.incident.summary, "nginx warning (75 percent)");
        assert_eq!(d.members[0].value, Some(75.0));
        assert_eq!(
            d.timeline.iter().filter(|t| t.kind == "state").count(),
            1,
            "{:?}",
            d.timeline
        );

        s.ingest("b", &[valued(1, State::Critical, 95.0, "percent")])
            .expect("b joins");
        s.ingest("a", &[valued(3, State::Warning, 80.0, "percent")])
            .expect("a, a value");
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(
            (d.incident.severity, d.incident.state, d.incident.value),
            (Severity::P2, State::Critical, Some(95.0)),
            "the worst member's value, not the latest report's"
        );
        assert_eq!(
            d.incident.summary,
            "process:nginx critical on 2 nodes: a, b"
        );
        s.ingest("b", &[valued(2, State::Critical, 97.0, "percent")])
            .expect("b, a value");
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(
            (d.incident.severity, d.incident.value),
            (Severity::P2, Some(97.0))
        );
        assert_eq!(
            d.incident.summary,
            "process:nginx critical on 2 nodes: a, b"
        );
        assert_eq!(triggers(&s, id), 1, "paged once");

        // A state change still recomputes: b recovers, a (warning) is left: P3.
        s.ingest("b", &[valued(3, State::Ok, 1.0, "percent")])
            .expect("b recovers");
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(
            (d.incident.severity, d.incident.state, d.incident.value),
            (Severity::P3, State::Warning, Some(80.0))
        );
        assert_eq!(d.incident.summary, "process:nginx warning on 1 node: a");
    }

    #[test]
    fn unchanged_heartbeats_write_nothing_until_an_event_arrives() {
        let (_dir, mut s) = store(&[]);
        s.hello(&hello("a"), 1).expect("hello");
        let checks = [status("cpu", State::Ok), status("memory", State::Ok)];
        s.heartbeat("a", 0, &checks)
            .expect("first hb is reconciled and written");
        let before = s.conn.total_changes();
        for _ in 0..100 {
            s.heartbeat("a", 0, &checks).expect("hb");
        }
        assert_eq!(
            s.conn.total_changes(),
            before,
            "cost grows with state changes, not heartbeats"
        );
        s.ingest(
            "a",
            &[Event {
                check: "cpu".into(),
                ..event(1, State::Ok)
            }],
        )
        .expect("event");
        let after_event = s.conn.total_changes();
        s.heartbeat("a", 1, &checks)
            .expect("hb after an event is looked at again");
        assert!(s.conn.total_changes() > after_event);
    }

    #[test]
    fn a_silent_node_goes_down_after_the_timeout_and_comes_back() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let seen = now_ms();
        // Aggregator just started (grace): silence counts from the start.
        assert!(
            s.sweep_liveness(seen + 10_000, 5_000, seen + 8_000)
                .expect("sweep")
                .opened
                .is_empty()
        );
        let down = s.sweep_liveness(seen + 10_000, 5_000, seen).expect("sweep");
        assert_eq!(down.opened.len(), 1);
        let d = s.incident(down.opened[0]).expect("r").expect("e");
        assert_eq!(
            (d.incident.check.as_str(), d.incident.severity),
            (NODE_DOWN, Severity::P2)
        );
        assert!(
            s.sweep_liveness(seen + 20_000, 5_000, seen)
                .expect("sweep")
                .opened
                .is_empty(),
            "one incident per outage"
        );
        let back = s.heartbeat("a", 0, &[]).expect("hb");
        assert_eq!(back.resolved, down.opened);
    }

    #[test]
    fn the_timeout_is_at_least_three_heartbeats() {
        let (_dir, mut s) = store(&[]);
        s.hello(
            &AgentHello {
                heartbeat_interval_ms: 10_000,
                ..hello("slow")
            },
            1,
        )
        .expect("hello");
        let seen = now_ms();
        assert!(
            s.sweep_liveness(seen + 20_000, 5_000, 0)
                .expect("sweep")
                .opened
                .is_empty()
        );
        assert_eq!(
            s.sweep_liveness(seen + 31_000, 5_000, 0)
                .expect("sweep")
                .opened
                .len(),
            1
        );
    }

    #[test]
    fn a_group_commit_keeps_each_agents_outcome_apart() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello a");
        s.hello(
            &AgentHello {
                instance_id: "ib".into(),
                ..hello("b")
            },
            2,
        )
        .expect("hello b");
        let a = [event(1, State::Critical), event(2, State::Ok)];
        let b = [event(1, State::Ok)];
        let results = s.ingest_group(&[("a", &a), ("b", &b)]);
        let a_out = results[0].as_ref().expect("a");
        let b_out = results[1].as_ref().expect("b");
        assert_eq!(
            (
                a_out.last_seq,
                a_out.stored,
                a_out.opened.len(),
                a_out.resolved.len()
            ),
            (2, 2, 1, 1)
        );
        assert_eq!(
            (b_out.last_seq, b_out.stored, b_out.opened.len()),
            (1, 1, 0)
        );
    }

    /// Regression: one notification that kept failing blocked every later page on the
    /// same channel (head-of-line blocking).
    #[test]
    fn a_failing_page_does_not_hold_up_other_incidents() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let first = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("first")
            .opened[0];
        let n1 = s.next_pending("hook").expect("q").expect("pending");
        assert_eq!(n1.incident_id, first);
        s.record_attempt(
            n1.id,
            &Attempt::Retry {
                retry_at_ms: now_ms() + 3_600_000,
                error: "HTTP 500".into(),
            },
        )
        .expect("retry later");
        let other = Event {
            check: "memory".into(),
            ..event(2, State::Critical)
        };
        let second = s.ingest("a", &[other]).expect("second").opened[0];
        let n2 = s.next_pending("hook").expect("q").expect("pending");
        assert_eq!(
            n2.incident_id, second,
            "the other incident's page goes first"
        );
        // A resolve never overtakes its own trigger.
        s.record_attempt(n2.id, &Attempt::Delivered)
            .expect("delivered");
        s.ingest("a", &[event(3, State::Ok)])
            .expect("resolve first");
        let n3 = s.next_pending("hook").expect("q").expect("pending");
        assert_eq!((n3.incident_id, n3.kind.as_str()), (first, "trigger"));
    }

    #[test]
    fn delivery_attempts_are_recorded_in_order() {
        let (_dir, mut s) = store(&["hook"]);
        s.hello(&hello("a"), 1).expect("hello");
        let id = s
            .ingest("a", &[event(1, State::Critical)])
            .expect("ingest")
            .opened[0];
        let n = s.next_pending("hook").expect("q").expect("pending");
        s.record_attempt(
            n.id,
            &Attempt::Retry {
                retry_at_ms: 5,
                error: "HTTP 500".into(),
            },
        )
        .expect("retry");
        let again = s.next_pending("hook").expect("q").expect("still pending");
        assert_eq!(
            (again.id, again.attempts, again.next_attempt_ms),
            (n.id, 1, 5)
        );
        s.record_attempt(n.id, &Attempt::Delivered)
            .expect("delivered");
        assert!(s.next_pending("hook").expect("q").is_none());
        let d = s.incident(id).expect("r").expect("e");
        assert_eq!(d.notifications[0].status, "delivered");
        assert_eq!(d.notifications[0].attempts, 2);
        assert!(d.timeline.iter().any(|t| t.kind == "notified"));
    }
}
