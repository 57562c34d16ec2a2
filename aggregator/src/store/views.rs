//! Read-only views for the on-call page: the current state of every check, and a
//! person's note on an incident's timeline (for changes the store does not record
//! itself, such as a silence added from an incident).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Store, StoreError};
use crate::model::{Node, State};

/// The current state of one check of one node, as the last event or heartbeat said
/// (the `checks` table).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckState {
    /// Fingerprint (`node/check{labels}`).
    pub fingerprint: String,
    /// Agent id of the node.
    pub node: String,
    /// Check name (`process:nginx`, `cpu`, `http:checkout`, …).
    pub check: String,
    /// Check labels.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: State,
    /// Latest value, in `unit`.
    pub value: Option<f64>,
    /// Unit of `value`.
    pub unit: String,
    /// In this state since (Unix ms, aggregator clock).
    pub since_ms: i64,
    /// Last reported (Unix ms, aggregator clock).
    pub updated_ms: i64,
}

impl Store {
    /// Every check of every node with its current state, by node then check name.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn checks(&self) -> Result<Vec<CheckState>, StoreError> {
        self.conn
            .prepare(
                "SELECT fingerprint, agent_id, check_name, labels, state, value, unit, since_ms, updated_ms
                 FROM checks ORDER BY agent_id, check_name, fingerprint",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(CheckState {
                        fingerprint: r.get(0)?,
                        node: r.get(1)?,
                        check: r.get(2)?,
                        labels: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                        state: super::parse_state(&r.get::<_, String>(4)?),
                        value: r.get(5)?,
                        unit: r.get(6)?,
                        since_ms: r.get(7)?,
                        updated_ms: r.get(8)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// Puts `last_seen_ms` of `nodes` up to date with the in-memory heartbeat times
    /// (the stored ones lag by up to [`super::SEEN_FLUSH_MS`]).
    pub(super) fn overlay_seen(&self, nodes: &mut [Node]) {
        for n in nodes {
            if let Some(&seen) = self.seen.get(&n.agent_id) {
                n.last_seen_ms = n.last_seen_ms.max(seen);
            }
        }
    }

    /// Adds a person's entry to incident `id`'s timeline (`actor` e.g. `user:alice`);
    /// `false` when there is no such incident.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn note(
        &mut self,
        id: i64,
        kind: &str,
        actor: &str,
        note: &str,
    ) -> Result<bool, StoreError> {
        let exists = self
            .conn
            .prepare_cached("SELECT 1 FROM incidents WHERE id = ?1")
            .and_then(|mut s| s.exists([id]))
            .map_err(|e| self.err(e))?;
        if exists {
            super::timeline(&self.conn, id, crate::model::now_ms(), kind, actor, note)
                .map_err(|e| self.err(e))?;
        }
        Ok(exists)
    }
}
