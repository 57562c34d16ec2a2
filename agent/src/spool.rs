//! The on-disk spool: every event is committed here, with its per-agent sequence number,
//! before it is sent, and leaves only when the aggregator acknowledges it.
//!
//! Owns `STATE_DIR/spool.db` (SQLite, WAL, `synchronous=FULL`). The sequence comes from
//! an `AUTOINCREMENT` key, so it keeps rising across agent restarts and deletions. One
//! thread owns the connection ([`spawn`]); the rest of the agent talks to it through a
//! [`SpoolHandle`]. Bounds and eviction belong to the delivery work that follows; this
//! module keeps everything until acked.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

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

/// The spool itself (synchronous; owned by one thread).
#[derive(Debug)]
pub struct Spool {
    conn: Connection,
    path: PathBuf,
}

impl Spool {
    /// Opens or creates `dir/spool.db`.
    ///
    /// # Errors
    /// [`SpoolError`] naming the directory or file.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Ok(Self::open_or_recover(dir)?.0)
    }

    /// Opens `dir/spool.db`; a damaged file (not a database, corrupt, failing
    /// `PRAGMA quick_check`) is moved aside as `spool.db.damaged-<unix seconds>` and a
    /// fresh spool is created — once: a second failure is returned, never retried in a
    /// loop. Returns the spool and where a damaged file went.
    ///
    /// # Errors
    /// [`SpoolError`] naming the directory or file.
    pub fn open_or_recover(dir: &Path) -> Result<(Self, Option<PathBuf>), SpoolError> {
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("spool.db");
        match Self::try_open(&path) {
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
                Ok((Self::try_open(&path)?, Some(aside)))
            }
            Err(e) => Err(e),
        }
    }

    fn try_open(path: &Path) -> Result<Self, SpoolError> {
        let conn = Connection::open(path).map_err(|source| SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let spool = Spool {
            conn,
            path: path.to_owned(),
        };
        spool
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS events (
                     seq  INTEGER PRIMARY KEY AUTOINCREMENT,
                     body TEXT NOT NULL
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
        Ok(spool)
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Commits `events` in one transaction, assigning consecutive sequence numbers.
    /// Returns the events with `seq` set.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`]; nothing is committed then.
    pub fn append(&mut self, mut events: Vec<Event>) -> Result<Vec<Event>, SpoolError> {
        let path = self.path.clone();
        let err = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let last = self.last_seq()?;
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO events (seq, body) VALUES (?1, ?2)")
                .map_err(err)?;
            for (i, e) in events.iter_mut().enumerate() {
                e.seq = last + 1 + i as u64;
                let body = serde_json::to_string(e).unwrap_or_default();
                insert.execute(params![to_sql(e.seq), body]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(events)
    }

    /// Up to `limit` spooled events with `seq > after`, in order.
    ///
    /// # Errors
    /// [`SpoolError`] on a read or decode failure.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![to_sql(after), limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(|e| self.err(e))?;
            let seq = u64::try_from(seq).unwrap_or_default();
            match serde_json::from_str::<Event>(&body) {
                Ok(mut event) => {
                    event.seq = seq;
                    out.push(event);
                }
                Err(source) => {
                    // One bad row must not stop delivery of the others forever.
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
        drop(stmt);
        for seq in damaged {
            self.conn
                .execute("DELETE FROM events WHERE seq = ?1", [to_sql(seq)])
                .map_err(|e| self.err(e))?;
        }
        Ok(out)
    }

    /// Deletes every event with `seq <= upto`. Returns how many were deleted.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn ack(&mut self, upto: u64) -> Result<usize, SpoolError> {
        self.conn
            .execute("DELETE FROM events WHERE seq <= ?1", [to_sql(upto)])
            .map_err(|e| self.err(e))
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
    /// [`SpoolError::Sqlite`].
    pub fn len(&self) -> Result<u64, SpoolError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Whether no event waits for an ack.
    ///
    /// # Errors
    /// [`SpoolError::Sqlite`].
    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.len()? == 0)
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

fn to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

enum Cmd {
    Append(Vec<Event>, oneshot::Sender<Result<Vec<Event>, SpoolError>>),
    ReadAfter(u64, usize, oneshot::Sender<Result<Vec<Event>, SpoolError>>),
    Ack(u64, oneshot::Sender<Result<usize, SpoolError>>),
    Rebase(u64, oneshot::Sender<Result<bool, SpoolError>>),
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
                    Cmd::ReadAfter(after, limit, reply) => {
                        let _ = reply.send(spool.read_after(after, limit));
                    }
                    Cmd::Ack(upto, reply) => {
                        let _ = reply.send(spool.ack(upto));
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
        let (mut s, moved) = Spool::open_or_recover(dir.path()).expect("recovers");
        let aside = moved.expect("moved aside");
        assert!(
            aside.exists()
                && aside
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("spool.db.damaged-"))
        );
        assert_eq!(s.append(vec![ev("a")]).expect("usable")[0].seq, 1);
        drop(s);
        let (_, moved) = Spool::open_or_recover(dir.path()).expect("reopen");
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
}
