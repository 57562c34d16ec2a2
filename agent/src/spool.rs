//! The on-disk spool: every event is committed here, with its per-agent sequence number,
//! before it is sent, and leaves only when the aggregator acknowledges it.
//!
//! Owns `STATE_DIR/spool.db` (SQLite, WAL, `synchronous=FULL`). The sequence comes from
//! an `AUTOINCREMENT` key, so it keeps rising across agent restarts and deletions. One
//! thread owns the connection ([`spawn`]); the rest of the agent talks to it through a
//! [`SpoolHandle`]. The spool is bounded by events and bytes ([`SpoolLimits`]): when
//! full, the oldest events are evicted, but never the latest event of a check, and the
//! loss is reported to the aggregator as one `spool_data_loss` event on the next
//! connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use crate::evaluate::State;
use crate::event::Event;

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// SQLite refused (open, read or write), with the spool's path.
    #[error("spool {path}: {source}")]
    Sqlite {
        /// The spool file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored event could not be decoded.
    #[error("spool {path}: damaged event {seq}: {source}")]
    Decode {
        /// The spool file.
        path: PathBuf,
        /// Its sequence number.
        seq: u64,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The spool file failed SQLite's integrity check.
    #[error("spool {path} is damaged: {detail}")]
    Damaged {
        /// The spool file.
        path: PathBuf,
        /// What `PRAGMA quick_check` said.
        detail: String,
    },
    /// The spool thread is gone (agent shutting down).
    #[error("spool thread stopped")]
    Stopped,
}

impl SpoolError {
    /// The file is damaged (not a database, corrupt): moving it aside is the cure.
    pub fn is_damage(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match self {
            SpoolError::Damaged { .. } => true,
            SpoolError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => {
                matches!(e.code, NotADatabase | DatabaseCorrupt)
            }
            _ => false,
        }
    }
}

/// Size bounds of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most events kept.
    pub max_events: u64,
    /// Most bytes of event bodies kept.
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_events: DEFAULT_MAX_EVENTS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Default most events kept.
pub const DEFAULT_MAX_EVENTS: u64 = 100_000;
/// Default most bytes kept (64 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Check name of the event that reports evicted events on the next connection.
pub const DATA_LOSS_CHECK: &str = "spool_data_loss";

/// Events evicted because the spool was full, not yet reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loss {
    /// How many.
    pub dropped: u64,
    /// Observation time of the first (Unix ms).
    pub first_ms: i64,
    /// Observation time of the last (Unix ms).
    pub last_ms: i64,
}

/// The spool itself (synchronous; owned by one thread).
#[derive(Debug)]
pub struct Spool {
    conn: Connection,
    path: PathBuf,
    limits: SpoolLimits,
    /// Events held (kept in step with the table).
    count: u64,
    /// Bytes of bodies held.
    bytes: u64,
    /// Evicted and not yet reported (persisted in `meta`).
    loss: Loss,
    /// Drops since the last log line, and when that was.
    unlogged_drops: u64,
    last_drop_log: Option<std::time::Instant>,
    /// `tocsin_spool_dropped_total` and `tocsin_spool_events`, when registered.
    metrics: Option<(
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::gauge::Gauge,
    )>,
}

impl Spool {
    /// Opens or creates `dir/spool.db` with the default limits.
    ///
    /// # Errors
    /// [`SpoolError`] naming the directory or file.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Ok(Self::open_or_recover(dir, SpoolLimits::default())?.0)
    }

    /// Opens `dir/spool.db`; a damaged file (not a database, corrupt, failing
    /// `PRAGMA quick_check`) is moved aside as `spool.db.damaged-<unix seconds>` and a
    /// fresh spool is created — once: a second failure is returned, never retried in a
    /// loop. Returns the spool and where a damaged file went.
    ///
    /// # Errors
    /// [`SpoolError`] naming the directory or file.
    pub fn open_or_recover(
        dir: &Path,
        limits: SpoolLimits,
    ) -> Result<(Self, Option<PathBuf>), SpoolError> {
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("spool.db");
        match Self::try_open(&path, limits) {
            Ok(spool) => Ok((spool, None)),
            Err(e) if e.is_damage() => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = dir.join(format!("spool.db.damaged-{stamp}"));
                std::fs::rename(&path, &aside).map_err(|source| SpoolError::Dir {
                    path: aside.clone(),
                    source,
                })?;
                for suffix in ["-wal", "-shm"] {
                    let side = dir.join(format!("spool.db{suffix}"));
                    if side.exists() {
                        let _ = std::fs::rename(
                            &side,
                            dir.join(format!("spool.db.damaged-{stamp}{suffix}")),
                        );
                    }
                }
                Ok((Self::try_open(&path, limits)?, Some(aside)))
            }
            Err(e) => Err(e),
        }
    }

    /// A spool in memory, for when the state directory cannot hold one (disk full, I/O
    /// errors, permissions): the agent keeps monitoring and delivering, but what it holds
    /// is lost if the agent stops before the aggregator acknowledged it.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`] if SQLite cannot even open a memory database.
    pub fn in_memory(limits: SpoolLimits) -> Result<Self, SpoolError> {
        Self::try_open(Path::new(":memory:"), limits)
    }

    /// Whether this spool is a file that survives the agent (false for [`Spool::in_memory`]).
    pub fn is_durable(&self) -> bool {
        self.path != Path::new(":memory:")
    }

    fn try_open(path: &Path, limits: SpoolLimits) -> Result<Self, SpoolError> {
        let conn = Connection::open(path).map_err(|source| SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let mut spool = Spool {
            conn,
            path: path.to_owned(),
            limits,
            count: 0,
            bytes: 0,
            loss: Loss::default(),
            unlogged_drops: 0,
            last_drop_log: None,
            metrics: None,
        };
        spool
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS events (
                     seq       INTEGER PRIMARY KEY AUTOINCREMENT,
                     body      TEXT NOT NULL,
                     check_key TEXT NOT NULL DEFAULT '',
                     size      INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE INDEX IF NOT EXISTS events_check ON events (check_key, seq);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS recovery_runs (
                     watch TEXT NOT NULL,
                     at_ms INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS check_state (
                     check_name TEXT PRIMARY KEY,
                     state      TEXT NOT NULL,
                     since_ms   INTEGER NOT NULL
                 );",
            )
            .map_err(|e| spool.err(e))?;
        let check: String = spool
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| spool.err(e))?;
        if check != "ok" {
            return Err(SpoolError::Damaged {
                path: path.to_owned(),
                detail: check,
            });
        }
        let (count, bytes): (i64, i64) = spool
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| spool.err(e))?;
        spool.count = u64::try_from(count).unwrap_or(0);
        spool.bytes = u64::try_from(bytes).unwrap_or(0);
        let meta = |key: &str| -> Result<i64, SpoolError> {
            spool
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map(Option::unwrap_or_default)
                .map_err(|e| spool.err(e))
        };
        spool.loss = Loss {
            dropped: u64::try_from(meta("loss_dropped")?).unwrap_or(0),
            first_ms: meta("loss_first_ms")?,
            last_ms: meta("loss_last_ms")?,
        };
        Ok(spool)
    }

    /// Reports evictions and the number of held events to these metrics.
    pub fn set_metrics(
        &mut self,
        dropped: prometheus_client::metrics::counter::Counter,
        held: prometheus_client::metrics::gauge::Gauge,
    ) {
        held.set(i64::try_from(self.count).unwrap_or(i64::MAX));
        self.metrics = Some((dropped, held));
    }

    fn publish(&self, dropped_now: u64) {
        if let Some((dropped, held)) = &self.metrics {
            dropped.inc_by(dropped_now);
            held.set(i64::try_from(self.count).unwrap_or(i64::MAX));
        }
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Commits `events` in one transaction, assigning consecutive sequence numbers, and
    /// evicts the oldest events if the spool is then over its limits — never the latest
    /// event of a check. Returns the events with `seq` set.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`] (e.g. disk full); nothing is committed then.
    pub fn append(&mut self, mut events: Vec<Event>) -> Result<Vec<Event>, SpoolError> {
        let path = self.path.clone();
        let err = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let last = self.last_seq()?;
        let (mut count, mut bytes, mut loss) = (self.count, self.bytes, self.loss);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (seq, body, check_key, size) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for (i, e) in events.iter_mut().enumerate() {
                e.seq = last + 1 + i as u64;
                // A huge check output must never become a message the aggregator refuses.
                e.message = crate::event::truncate_marked(
                    &e.message,
                    tocsin_proto::limits::MAX_MESSAGE_LEN,
                );
                let body = serde_json::to_string(e).unwrap_or_default();
                let key = format!(
                    "{}{}",
                    e.check,
                    serde_json::to_string(&e.labels).unwrap_or_default()
                );
                insert
                    .execute(params![to_sql(e.seq), body, key, body.len() as i64])
                    .map_err(err)?;
                if e.state != e.previous {
                    // The rule state survives a restart, committed with its event.
                    tx.prepare_cached(
                        "INSERT INTO check_state (check_name, state, since_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT (check_name) DO UPDATE SET state = ?2, since_ms = ?3",
                    )
                    .and_then(|mut st| {
                        st.execute(params![e.check, e.state.as_str(), e.observed_at_ms])
                    })
                    .map_err(err)?;
                }
                count += 1;
                bytes += body.len() as u64;
            }
        }
        let mut dropped_now = 0;
        while count > self.limits.max_events || bytes > self.limits.max_bytes {
            // Evict a tenth of the limit at a time, so a full spool does not evict on
            // every single append.
            let batch =
                (self.limits.max_events / 10).max(1) + count.saturating_sub(self.limits.max_events);
            let victims: Vec<(i64, i64, String)> = tx
                .prepare_cached(
                    "SELECT e.seq, e.size, e.body FROM events e
                     WHERE e.seq < (SELECT max(seq) FROM events l WHERE l.check_key = e.check_key)
                     ORDER BY e.seq LIMIT ?1",
                )
                .and_then(|mut st| {
                    st.query_map([to_sql(batch)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(err)?;
            if victims.is_empty() {
                break; // only the latest state of each check is left: keep it all
            }
            for (seq, size, body) in &victims {
                tx.execute("DELETE FROM events WHERE seq = ?1", [seq])
                    .map_err(err)?;
                count -= 1;
                bytes = bytes.saturating_sub(u64::try_from(*size).unwrap_or(0));
                let at = serde_json::from_str::<Event>(body).map_or(0, |e| e.observed_at_ms);
                loss.first_ms = if loss.dropped == 0 {
                    at
                } else {
                    loss.first_ms.min(at)
                };
                loss.last_ms = loss.last_ms.max(at);
                loss.dropped += 1;
                dropped_now += 1;
            }
        }
        if dropped_now > 0 {
            save_loss(&tx, &loss).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        (self.count, self.bytes, self.loss) = (count, bytes, loss);
        self.publish(dropped_now);
        if dropped_now > 0 {
            self.note_drops(dropped_now);
        }
        Ok(events)
    }

    /// Logs evictions at most once a minute.
    fn note_drops(&mut self, n: u64) {
        self.unlogged_drops += n;
        if self
            .last_drop_log
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60))
        {
            tracing::warn!(
                dropped = self.unlogged_drops,
                dropped_unreported = self.loss.dropped,
                max_events = self.limits.max_events,
                max_bytes = self.limits.max_bytes,
                "spool full: dropped the oldest events (the latest state of every check is kept)"
            );
            self.unlogged_drops = 0;
            self.last_drop_log = Some(std::time::Instant::now());
        }
    }

    /// The last committed state of every check and when it was entered (Unix ms), to
    /// restore the evaluators after a restart.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`] when the table cannot be read.
    pub fn check_states(&self) -> Result<HashMap<String, (State, i64)>, SpoolError> {
        let mut st = self
            .conn
            .prepare("SELECT check_name, state, since_ms FROM check_state")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(check, state, since)| {
                let state =
                    serde_json::from_value::<State>(serde_json::Value::String(state)).ok()?;
                Some((check, (state, since)))
            })
            .collect())
    }

    /// Records that the recovery action of `watch` ran at `at_ms` (Unix ms), so its
    /// restart budget survives a restart of the agent. Runs older than a day go.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`] (e.g. disk full).
    pub fn record_recovery(&mut self, watch: &str, at_ms: i64) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let err = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO recovery_runs (watch, at_ms) VALUES (?1, ?2)",
            params![watch, at_ms],
        )
        .map_err(err)?;
        tx.execute(
            "DELETE FROM recovery_runs WHERE at_ms < ?1",
            [at_ms - 86_400_000],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// When each watch's recovery action ran (Unix ms, oldest first), within the last day.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`] when the table cannot be read.
    pub fn recovery_runs(&self) -> Result<HashMap<String, Vec<i64>>, SpoolError> {
        let mut st = self
            .conn
            .prepare("SELECT watch, at_ms FROM recovery_runs ORDER BY at_ms")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
            .map_err(|e| self.err(e))?;
        let mut out: HashMap<String, Vec<i64>> = HashMap::new();
        for (watch, at) in rows {
            out.entry(watch).or_default().push(at);
        }
        Ok(out)
    }

    /// Events evicted and not yet reported.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// If events were evicted, appends one `spool_data_loss` event saying how many and
    /// between which times, and clears the record — in one transaction. Called when a
    /// connection is established.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn report_loss(&mut self) -> Result<Option<Event>, SpoolError> {
        let loss = self.loss;
        if loss.dropped == 0 {
            return Ok(None);
        }
        let event = Event {
            seq: 0,
            check: DATA_LOSS_CHECK.to_owned(),
            labels: Default::default(),
            state: crate::evaluate::State::Unknown,
            previous: crate::evaluate::State::Unknown,
            value: Some(loss.dropped as f64),
            unit: "count".to_owned(),
            threshold: None,
            message: format!(
                "data loss: {} events dropped between {} and {} (spool full)",
                loss.dropped,
                crate::event::rfc3339(loss.first_ms),
                crate::event::rfc3339(loss.last_ms)
            ),
            observed_at_ms: crate::event::now_ms(),
            breach_started_at_ms: 0,
            flapping: false,
        };
        self.loss = Loss::default();
        let cleared = save_loss(&self.conn, &self.loss).map_err(|e| self.err(e));
        if let Err(e) = cleared {
            self.loss = loss;
            return Err(e);
        }
        match self.append(vec![event]) {
            Ok(mut v) => Ok(v.pop()),
            Err(e) => {
                self.loss = loss;
                let _ = save_loss(&self.conn, &loss);
                Err(e)
            }
        }
    }

    /// Up to `limit` spooled events with `seq > after`, in order. Rows that no longer
    /// decode are dropped (and logged) rather than blocking delivery forever.
    ///
    /// # Errors
    /// [`SpoolError`] on a read failure.
    pub fn read_after(&mut self, after: u64, limit: usize) -> Result<Vec<Event>, SpoolError> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .map_err(|e| SpoolError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
            let rows = stmt
                .query_map(params![to_sql(after), limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(|e| SpoolError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
            for row in rows {
                let (seq, body) = row.map_err(|e| SpoolError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
                let seq = u64::try_from(seq).unwrap_or_default();
                match serde_json::from_str::<Event>(&body) {
                    Ok(mut event) => {
                        event.seq = seq;
                        out.push(event);
                    }
                    Err(source) => {
                        let error = SpoolError::Decode {
                            path: self.path.clone(),
                            seq,
                            source,
                        };
                        tracing::error!(error = %error, "dropping an undecodable spooled event");
                        damaged.push(seq);
                    }
                }
            }
        }
        for seq in damaged {
            self.delete_counted("DELETE FROM events WHERE seq = ?1 RETURNING size", seq)?;
        }
        Ok(out)
    }

    fn delete_counted(&mut self, sql: &str, seq: u64) -> Result<usize, SpoolError> {
        let sizes: Vec<i64> = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut st| st.query_map([to_sql(seq)], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        self.count = self.count.saturating_sub(sizes.len() as u64);
        self.publish(0);
        self.bytes = self
            .bytes
            .saturating_sub(sizes.iter().map(|s| u64::try_from(*s).unwrap_or(0)).sum());
        Ok(sizes.len())
    }

    /// Deletes every event with `seq <= upto`. Returns how many were deleted.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn ack(&mut self, upto: u64) -> Result<usize, SpoolError> {
        self.delete_counted("DELETE FROM events WHERE seq <= ?1 RETURNING size", upto)
    }

    /// The highest sequence number ever assigned (0 if none).
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn last_seq(&self) -> Result<u64, SpoolError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or_default()))
    }

    /// Number of events waiting for an ack.
    ///
    /// # Errors
    /// Never, today; kept fallible for symmetry with the other queries.
    pub fn len(&self) -> Result<u64, SpoolError> {
        Ok(self.count)
    }

    /// Whether no event waits for an ack.
    ///
    /// # Errors
    /// See [`Spool::len`].
    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.count == 0)
    }

    /// Called with the aggregator's last stored sequence. If it is above everything this
    /// spool ever assigned, the spool was lost or replaced (new disk, deleted state dir):
    /// the waiting events are renumbered above `floor` so the aggregator does not drop
    /// them as duplicates, and new events continue from there. Returns whether it did so.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn rebase(&mut self, floor: u64) -> Result<bool, SpoolError> {
        let last = self.last_seq()?;
        if floor <= last {
            return Ok(false);
        }
        let path = self.path.clone();
        let err = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        // Every new key is above every old one, so the update never collides.
        tx.execute("UPDATE events SET seq = seq + ?1", [to_sql(floor)])
            .map_err(err)?;
        let new_last = to_sql(floor.saturating_add(last));
        let updated = tx
            .execute(
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'events'",
                [new_last],
            )
            .map_err(err)?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?1)",
                [new_last],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(true)
    }
}

fn save_loss(conn: &Connection, loss: &Loss) -> rusqlite::Result<()> {
    for (key, value) in [
        (
            "loss_dropped",
            i64::try_from(loss.dropped).unwrap_or(i64::MAX),
        ),
        ("loss_first_ms", loss.first_ms),
        ("loss_last_ms", loss.last_ms),
    ] {
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
    }
    Ok(())
}

fn to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

enum Cmd {
    Append(Vec<Event>, oneshot::Sender<Result<Vec<Event>, SpoolError>>),
    ReadAfter(u64, usize, oneshot::Sender<Result<Vec<Event>, SpoolError>>),
    Ack(u64, oneshot::Sender<Result<usize, SpoolError>>),
    Rebase(u64, oneshot::Sender<Result<bool, SpoolError>>),
    ReportLoss(oneshot::Sender<Result<Option<Event>, SpoolError>>),
    RecordRecovery(String, i64, oneshot::Sender<Result<(), SpoolError>>),
}

/// Async access to the spool thread. Cloneable; the thread ends when every handle is
/// dropped.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Cmd>,
    latest: watch::Receiver<u64>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("spool command")
    }
}

/// Moves `spool` onto its own thread and returns a handle to it.
///
/// # Errors
/// [`SpoolError`] if the last sequence cannot be read.
pub fn spawn(mut spool: Spool) -> Result<SpoolHandle, SpoolError> {
    let (tx, mut rx) = mpsc::channel::<Cmd>(64);
    let (latest_tx, latest) = watch::channel(spool.last_seq()?);
    std::thread::Builder::new()
        .name("tocsin-spool".into())
        .spawn(move || {
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Cmd::Append(events, reply) => {
                        let r = spool.append(events);
                        if let Ok(Some(last)) = r.as_ref().map(|e| e.last().map(|e| e.seq)) {
                            latest_tx.send_replace(last);
                        }
                        let _ = reply.send(r);
                    }
                    Cmd::ReportLoss(reply) => {
                        let r = spool.report_loss();
                        if let Ok(Some(e)) = &r {
                            latest_tx.send_replace(e.seq);
                        }
                        let _ = reply.send(r);
                    }
                    Cmd::ReadAfter(after, limit, reply) => {
                        let _ = reply.send(spool.read_after(after, limit));
                    }
                    Cmd::Ack(upto, reply) => {
                        let _ = reply.send(spool.ack(upto));
                    }
                    Cmd::RecordRecovery(watch, at_ms, reply) => {
                        let _ = reply.send(spool.record_recovery(&watch, at_ms));
                    }
                    Cmd::Rebase(floor, reply) => {
                        let r = spool.rebase(floor);
                        if let Ok(last) = spool.last_seq() {
                            latest_tx.send_replace(last);
                        }
                        let _ = reply.send(r);
                    }
                }
            }
        })
        .map_err(|source| SpoolError::Dir {
            path: PathBuf::from("<spool thread>"),
            source,
        })?;
    Ok(SpoolHandle { tx, latest })
}

impl SpoolHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Cmd,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    /// See [`Spool::append`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Event>, SpoolError> {
        self.call(|r| Cmd::Append(events, r)).await
    }

    /// See [`Spool::read_after`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, SpoolError> {
        self.call(|r| Cmd::ReadAfter(after, limit, r)).await
    }

    /// See [`Spool::ack`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub async fn ack(&self, upto: u64) -> Result<usize, SpoolError> {
        self.call(|r| Cmd::Ack(upto, r)).await
    }

    /// See [`Spool::report_loss`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub async fn report_loss(&self) -> Result<Option<Event>, SpoolError> {
        self.call(Cmd::ReportLoss).await
    }

    /// See [`Spool::record_recovery`].
    ///
    /// # Errors
    /// As [`Spool::record_recovery`], or [`SpoolError::Stopped`].
    pub async fn record_recovery(&self, watch: String, at_ms: i64) -> Result<(), SpoolError> {
        self.call(|r| Cmd::RecordRecovery(watch, at_ms, r)).await
    }

    /// See [`Spool::rebase`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub async fn rebase(&self, floor: u64) -> Result<bool, SpoolError> {
        self.call(|r| Cmd::Rebase(floor, r)).await
    }

    /// The highest sequence assigned so far; `changed()` on it wakes on every append.
    pub fn latest(&self) -> watch::Receiver<u64> {
        self.latest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::State;

    fn ev(check: &str) -> Event {
        Event {
            seq: 0,
            check: check.into(),
            labels: Default::default(),
            state: State::Critical,
            previous: State::Ok,
            value: Some(1.0),
            unit: "count".into(),
            threshold: None,
            message: String::new(),
            observed_at_ms: 1,
            breach_started_at_ms: 0,
            flapping: false,
        }
    }

    #[test]
    fn check_states_are_committed_with_their_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut sp = Spool::open(dir.path()).expect("open");
            let mut e = ev("cpu");
            e.state = State::Critical;
            e.previous = State::Ok;
            sp.append(vec![e]).expect("append");
        }
        let sp = Spool::open(dir.path()).expect("reopen");
        let states = sp.check_states().expect("states");
        assert_eq!(states.get("cpu").map(|s| s.0), Some(State::Critical));
    }

    #[test]
    fn sequence_survives_reopen_and_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path()).expect("open");
        let got = s.append(vec![ev("a"), ev("b")]).expect("append");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.ack(2).expect("ack"), 2);
        drop(s);
        let mut s = Spool::open(dir.path()).expect("reopen");
        assert!(s.is_empty().expect("len"));
        let got = s.append(vec![ev("c")]).expect("append");
        assert_eq!(got[0].seq, 3, "sequence numbers are never reused");
        assert_eq!(s.read_after(0, 10).expect("read")[0].check, "c");
    }

    #[test]
    fn a_damaged_spool_is_moved_aside_once_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("spool.db"), vec![0x5a_u8; 8192]).expect("write garbage");
        let (mut s, moved) =
            Spool::open_or_recover(dir.path(), SpoolLimits::default()).expect("recovers");
        let aside = moved.expect("moved aside");
        assert!(
            aside.exists()
                && aside
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("spool.db.damaged-"))
        );
        assert_eq!(s.append(vec![ev("a")]).expect("usable")[0].seq, 1);
        drop(s);
        let (_, moved) =
            Spool::open_or_recover(dir.path(), SpoolLimits::default()).expect("reopen");
        assert!(moved.is_none(), "a healthy spool stays");
    }

    #[test]
    fn an_undecodable_event_is_dropped_not_retried_forever() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path()).expect("open");
        s.append(vec![ev("a"), ev("b"), ev("c")]).expect("append");
        s.conn
            .execute("UPDATE events SET body = '{broken' WHERE seq = 2", [])
            .expect("damage a row");
        let got: Vec<u64> = s
            .read_after(0, 10)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, vec![1, 3]);
        assert_eq!(s.len().expect("len"), 2, "the bad row is gone");
    }

    #[test]
    fn rebase_renumbers_above_the_aggregator_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path()).expect("open");
        s.append(vec![ev("a"), ev("b")]).expect("append");
        assert!(!s.rebase(2).expect("no-op"));
        assert!(s.rebase(100).expect("rebase"));
        let seqs: Vec<u64> = s
            .read_after(100, 10)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![101, 102]);
        assert_eq!(s.append(vec![ev("c")]).expect("append")[0].seq, 103);
    }

    #[test]
    fn a_full_spool_evicts_the_oldest_but_keeps_each_checks_latest_and_reports_the_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = SpoolLimits {
            max_events: 100,
            max_bytes: DEFAULT_MAX_BYTES,
        };
        let (mut s, _) = Spool::open_or_recover(dir.path(), limits).expect("open");
        let lone = s.append(vec![ev("rare")]).expect("append")[0].seq;
        for i in 0..300 {
            let mut e = ev("busy");
            e.observed_at_ms = 1000 + i;
            s.append(vec![e]).expect("append");
        }
        assert!(s.len().expect("len") <= 100);
        let all = s.read_after(0, 1000).expect("read");
        assert!(
            all.iter().any(|e| e.seq == lone),
            "the only event of a check is never evicted"
        );
        assert_eq!(
            all.last().map(|e| e.observed_at_ms),
            Some(1299),
            "the newest event stays"
        );
        let loss = s.loss();
        assert!(loss.dropped >= 200 && loss.first_ms == 1000, "{loss:?}");
        drop(s);

        let (mut s, _) = Spool::open_or_recover(dir.path(), limits).expect("reopen");
        assert_eq!(s.loss(), loss, "the loss record survives a restart");
        let report = s.report_loss().expect("report").expect("an event");
        assert_eq!(report.check, DATA_LOSS_CHECK);
        assert!(
            report
                .message
                .contains(&format!("{} events dropped", loss.dropped)),
            "{}",
            report.message
        );
        assert_eq!(s.loss(), Loss::default());
        assert!(s.report_loss().expect("again").is_none(), "reported once");
    }

    #[test]
    fn byte_limit_also_evicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = SpoolLimits {
            max_events: 1_000_000,
            max_bytes: 20_000,
        };
        let (mut s, _) = Spool::open_or_recover(dir.path(), limits).expect("open");
        for _ in 0..200 {
            let mut e = ev("big");
            e.message = "x".repeat(500);
            s.append(vec![e]).expect("append");
        }
        assert!(s.bytes <= 20_000, "{}", s.bytes);
        assert!(s.loss().dropped > 0);
    }

    mod model {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            Append(Vec<u8>),
            Ack(u8),
            Reopen,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => proptest::collection::vec(0u8..4, 1..6).prop_map(Op::Append),
                2 => (0u8..=255).prop_map(Op::Ack),
                1 => Just(Op::Reopen),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

            /// Without eviction the spool behaves like an ordered map: append assigns
            /// the next sequence numbers, ack removes a prefix, a reopen (as after a
            /// crash: every append was committed) changes nothing, numbers are never
            /// reused.
            #[test]
            fn behaves_like_an_ordered_map(ops in proptest::collection::vec(op(), 1..40)) {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut s = Spool::open(dir.path()).expect("open");
                let mut model: BTreeMap<u64, String> = BTreeMap::new();
                let mut next = 1u64;
                for op in ops {
                    match op {
                        Op::Append(checks) => {
                            let events: Vec<Event> = checks.iter().map(|c| ev(&format!("c{c}"))).collect();
                            let got = s.append(events).expect("append");
                            for e in got {
                                prop_assert_eq!(e.seq, next);
                                model.insert(next, e.check);
                                next += 1;
                            }
                        }
                        Op::Ack(k) => {
                            let upto = u64::from(k) % next.max(1);
                            s.ack(upto).expect("ack");
                            model.retain(|&seq, _| seq > upto);
                        }
                        Op::Reopen => {
                            drop(s);
                            s = Spool::open(dir.path()).expect("reopen");
                        }
                    }
                    let got: Vec<(u64, String)> =
                        s.read_after(0, 10_000).expect("read").into_iter().map(|e| (e.seq, e.check)).collect();
                    let want: Vec<(u64, String)> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
                    prop_assert_eq!(got, want);
                    prop_assert_eq!(s.len().expect("len"), model.len() as u64);
                }
            }

            /// With a tight bound, eviction keeps the invariants: within the limit
            /// unless only latest-per-check events are left, the latest event of every
            /// check present, order kept, and evicted + held = appended - acked.
            #[test]
            fn eviction_keeps_the_latest_of_every_check(ops in proptest::collection::vec(op(), 1..60)) {
                let dir = tempfile::tempdir().expect("tempdir");
                let limits = SpoolLimits { max_events: 10, max_bytes: DEFAULT_MAX_BYTES };
                let (mut s, _) = Spool::open_or_recover(dir.path(), limits).expect("open");
                let mut latest: BTreeMap<String, u64> = BTreeMap::new();
                let mut acked = 0u64;
                for op in ops {
                    match op {
                        Op::Append(checks) => {
                            let events: Vec<Event> = checks.iter().map(|c| ev(&format!("c{c}"))).collect();
                            for e in s.append(events).expect("append") {
                                latest.insert(e.check, e.seq);
                            }
                        }
                        Op::Ack(k) => {
                            acked = acked.max(u64::from(k) % (s.last_seq().expect("last") + 1));
                            s.ack(acked).expect("ack");
                        }
                        Op::Reopen => {
                            drop(s);
                            s = Spool::open_or_recover(dir.path(), limits).expect("reopen").0;
                        }
                    }
                    let held = s.read_after(0, 10_000).expect("read");
                    let seqs: Vec<u64> = held.iter().map(|e| e.seq).collect();
                    prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
                    for (check, seq) in &latest {
                        if *seq > acked {
                            prop_assert!(seqs.contains(seq), "latest {} of {} evicted", seq, check);
                        }
                    }
                    prop_assert!(held.len() <= 10 || held.len() <= latest.len());
                    prop_assert_eq!(s.len().expect("len"), held.len() as u64);
                }
            }
        }
    }
}
