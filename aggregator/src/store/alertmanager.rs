//! Read-only queries for the Alertmanager channel (`notify::alertmanager`): which open
//! incidents a channel has paged, with the payload of the trigger it got (the source of
//! the alert's stable label set) and who acknowledged them. Writes nothing.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, load_incident_opt};
use crate::model::Incident;

/// An open incident whose trigger a channel got.
#[derive(Debug, Clone, PartialEq)]
pub struct Paged {
    /// The incident as it is now.
    pub incident: Incident,
    /// The payload (tocsin's JSON, see `notify::payload`) of the first trigger delivered
    /// to the channel: what the channel was told when it was paged.
    pub trigger_payload: String,
    /// Who acknowledged it (the user of the latest `acknowledged` timeline entry, without
    /// the `user:` prefix); `None` while unacknowledged.
    pub acknowledged_by: Option<String>,
}

/// First trigger of an incident delivered to a channel, and who acknowledged it.
const FIRST_TRIGGER: &str = "SELECT o.payload FROM outbox o
     WHERE o.incident_id = ?1 AND o.channel = ?2 AND o.kind = 'trigger' AND o.status = 'delivered'
     ORDER BY o.id LIMIT 1";
/// Only this paging cycle's: a reopened incident is nobody's until acknowledged again.
const ACKNOWLEDGED_BY: &str = "SELECT t.actor FROM timeline t, incidents i
     WHERE i.id = ?1 AND t.incident_id = i.id AND t.kind = 'acknowledged' AND t.id > i.timeline_mark
     ORDER BY t.id DESC LIMIT 1";

impl Store {
    /// Every open (triggered or acknowledged) incident whose trigger of the current
    /// paging cycle was delivered to `channel`, oldest first (a reopened incident whose
    /// new trigger is held, or routed elsewhere, is not re-posted). For the Alertmanager
    /// channel's re-post.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn paged_open(&self, channel: &str) -> Result<Vec<Paged>, StoreError> {
        let ids: Vec<i64> = self
            .conn
            .prepare_cached(
                "SELECT i.id FROM incidents i
                 WHERE i.status != 'resolved'
                   AND EXISTS (SELECT 1 FROM outbox o WHERE o.incident_id = i.id AND o.channel = ?1
                                   AND o.kind = 'trigger' AND o.status = 'delivered'
                                   AND o.id > i.outbox_mark)
                 ORDER BY i.id",
            )
            .and_then(|mut st| st.query_map([channel], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.paged(id, channel)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Incident `id` with the first trigger delivered to `channel`; `None` when the
    /// incident does not exist or the channel has not (yet) been paged for it.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn paged(&self, id: i64, channel: &str) -> Result<Option<Paged>, StoreError> {
        let Some(incident) = load_incident_opt(&self.conn, id).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let trigger_payload: Option<String> = self
            .conn
            .prepare_cached(FIRST_TRIGGER)
            .and_then(|mut st| st.query_row(params![id, channel], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        let Some(trigger_payload) = trigger_payload else {
            return Ok(None);
        };
        let acknowledged_by: Option<String> = self
            .conn
            .prepare_cached(ACKNOWLEDGED_BY)
            .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(Some(Paged {
            incident,
            trigger_payload,
            acknowledged_by: acknowledged_by.map(|a| {
                a.strip_prefix("user:")
                    .or_else(|| a.strip_prefix("api:"))
                    .map_or(a.clone(), str::to_owned)
            }),
        }))
    }
}
