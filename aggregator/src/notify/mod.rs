//! Notification delivery from the outbox.
//!
//! Outbox rows are written by the store in the same transaction as the incident change
//! (see `store`). One [`Dispatcher`] task per channel delivers that channel's rows in
//! order, so one slow channel never delays another; failures are retried with jittered
//! exponential backoff (honouring `Retry-After`), permanent failures are recorded on the
//! incident's timeline. Delivery is at-least-once: a crash between the send and the
//! record sends again, with the same `Idempotency-Key`.

pub mod alertmanager;
pub mod console;
pub mod email;
pub mod pagerduty;
pub mod payload;
pub mod slack;
pub mod template;
pub mod truncate;
pub mod webhook;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{Notification, now_ms};
use crate::store::{Attempt, StoreHandle};

/// How often an idle dispatcher looks at the outbox even without a wake-up.
pub const IDLE_POLL: Duration = Duration::from_secs(5);

/// Result of one delivery attempt, as a channel reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Accepted.
    Ok,
    /// Try again later.
    Transient {
        /// What went wrong.
        error: String,
        /// The receiver's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Will never succeed as sent (e.g. HTTP 400).
    Permanent {
        /// What went wrong.
        error: String,
    },
}

/// Where a channel delivers.
#[derive(Debug, Clone)]
pub enum Target {
    /// Standard output.
    Console,
    /// An HTTP receiver: tocsin's JSON, Slack or PagerDuty.
    Webhook {
        /// URL.
        url: String,
        /// The body the receiver understands.
        format: Format,
        /// Per-request timeout.
        timeout: Duration,
        /// Shared HTTP client.
        client: reqwest::Client,
    },
    /// An SMTP server (`[[notify.email]]`).
    Email(Box<email::EmailChannel>),
}

/// The body an HTTP channel sends.
#[derive(Debug, Clone)]
pub enum Format {
    /// tocsin's JSON ([`payload::render`]); with the HMAC secret of `secret_file`, each
    /// request is signed ([`webhook`]'s `X-Tocsin-Signature`).
    Generic(Option<tocsin_agent::config::Secret>),
    /// A Slack incoming-webhook message.
    Slack,
    /// A PagerDuty Events API v2 event, with this routing key.
    PagerDuty(tocsin_agent::config::Secret),
    /// Alertmanager API v2 alerts to `<url>/api/v2/alerts` ([`alertmanager`]).
    Alertmanager(alertmanager::Options),
}

/// Delivers one channel's outbox rows in order.
#[derive(Debug)]
pub struct Dispatcher {
    /// Channel name (outbox `channel` column).
    pub name: String,
    /// Where to deliver.
    pub target: Target,
    /// Store access.
    pub store: StoreHandle,
    /// Bumped whenever new outbox rows are committed.
    pub wake: watch::Receiver<u64>,
    /// First retry delay.
    pub retry_min: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// A notification still failing this long after it was queued fails for good (and
    /// says so on the incident's timeline) instead of retrying forever.
    pub give_up_after: Duration,
    /// Counters.
    pub metrics: crate::metrics::Metrics,
    /// Message templates (Slack text, PagerDuty summary, e-mail).
    pub templates: std::sync::Arc<template::Templates>,
}

impl Dispatcher {
    /// Delivers until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let name = self.name.clone();
            let next = self.store.call(move |s| s.next_pending(&name)).await;
            let wait = match next {
                Err(error) => {
                    tracing::error!(channel = %self.name, error = %error, "cannot read the outbox");
                    Duration::from_secs(1)
                }
                Ok(None) => IDLE_POLL,
                Ok(Some(n)) if n.next_attempt_ms > now_ms() => {
                    Duration::from_millis(u64::try_from(n.next_attempt_ms - now_ms()).unwrap_or(0))
                }
                Ok(Some(n)) => {
                    let attempt = self.attempt(&n).await;
                    let outcome = match attempt {
                        Attempt::Delivered => "delivered",
                        Attempt::Retry { .. } => "retry",
                        Attempt::Failed { .. } => "failed",
                        Attempt::Skipped { .. } => "skipped",
                    };
                    let labels = crate::metrics::Delivery {
                        channel: self.name.clone(),
                        outcome,
                    };
                    self.metrics.notify_attempts.get_or_create(&labels).inc();
                    let id = n.id;
                    if let Err(error) = self
                        .store
                        .call(move |s| s.record_attempt(id, &attempt))
                        .await
                    {
                        tracing::error!(channel = %self.name, notification = id, error = %error, "cannot record delivery");
                        Duration::from_secs(1)
                    } else {
                        continue;
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = self.wake.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn attempt(&self, n: &Notification) -> Attempt {
        // A storm summary stands for triggers this channel never got: it follows none.
        if n.kind != "trigger" && n.kind != crate::store::STORM_SUMMARY {
            let (id, channel, before) = (n.incident_id, self.name.clone(), n.id);
            if let Ok(true) = self
                .store
                .call(move |s| s.trigger_failed(id, &channel, before))
                .await
            {
                return Attempt::Failed {
                    error: "not sent: the trigger to this channel failed, so no lone acknowledge or resolve"
                        .into(),
                };
            }
        }
        // A storm summary of incidents that all resolved would be a PagerDuty alert
        // nothing ever resolves: not sent there (chat channels get "all resolved").
        if n.kind == crate::store::STORM_SUMMARY
            && matches!(
                &self.target,
                Target::Webhook {
                    format: Format::PagerDuty(_),
                    ..
                }
            )
            && serde_json::from_str::<serde_json::Value>(&n.payload)
                .is_ok_and(|p| p["storm"]["all_resolved"] == true)
        {
            return Attempt::Skipped {
                reason: "every incident the storm guard held resolved within the window: \
                         no PagerDuty alert that nothing would resolve"
                    .into(),
            };
        }
        let delivery = match &self.target {
            Target::Console => console::deliver(&n.payload),
            Target::Webhook {
                url,
                format: Format::Alertmanager(am),
                timeout,
                client,
            } => {
                am.deliver(&self.name, &self.store, client, url, *timeout, n)
                    .await
            }
            Target::Webhook {
                url,
                format,
                timeout,
                client,
            } => {
                let (body, secret) = match format {
                    Format::Generic(secret) => (n.payload.clone(), secret.as_ref()),
                    // Delivered by the arm above.
                    Format::Alertmanager(_) => (n.payload.clone(), None),
                    Format::Slack => (slack::body(&n.payload, &self.templates), None),
                    Format::PagerDuty(key) => (
                        pagerduty::body(&n.payload, key.expose(), &self.templates),
                        None,
                    ),
                };
                webhook::deliver_signed(client, url, *timeout, &n.idempotency_key, &body, secret)
                    .await
            }
            Target::Email(ch) => email::deliver(ch, &self.templates, n).await,
        };
        match delivery {
            Delivery::Ok => {
                tracing::info!(channel = %self.name, incident = n.incident_id, kind = %n.kind, attempts = n.attempts + 1, "notification delivered");
                Attempt::Delivered
            }
            Delivery::Permanent { error } => {
                tracing::error!(channel = %self.name, incident = n.incident_id, kind = %n.kind, error = %error, "notification failed permanently");
                Attempt::Failed { error }
            }
            Delivery::Transient { error, .. }
                if now_ms() - n.created_at_ms
                    > i64::try_from(self.give_up_after.as_millis()).unwrap_or(i64::MAX) =>
            {
                let error = format!(
                    "gave up after {} attempts over {}: {error}",
                    n.attempts + 1,
                    tocsin_agent::settings::format_duration(self.give_up_after)
                );
                tracing::error!(channel = %self.name, incident = n.incident_id, kind = %n.kind, error = %error, "notification failed for good");
                Attempt::Failed { error }
            }
            Delivery::Transient { error, retry_after } => {
                let delay = retry_after.map_or_else(
                    || self.backoff(n.attempts),
                    |ra| honour_retry_after(ra, self.retry_min, self.retry_max),
                );
                tracing::warn!(channel = %self.name, incident = n.incident_id, kind = %n.kind, attempts = n.attempts + 1, retry_in = ?delay, error = %error, "notification not delivered, will retry");
                Attempt::Retry {
                    retry_at_ms: now_ms()
                        + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                    error,
                }
            }
        }
    }

    /// Jittered exponential delay for the `attempts`-th retry, within [min, max].
    fn backoff(&self, attempts: u32) -> Duration {
        let ceiling = self
            .retry_min
            .saturating_mul(1u32 << attempts.min(20))
            .min(self.retry_max);
        let span = ceiling.saturating_sub(self.retry_min);
        self.retry_min + span.mul_f64(fastrand::f64())
    }
}

/// The wait a receiver's `Retry-After` of `retry_after` asks for, kept within
/// [`retry_min`, `retry_max`]. While this notification waits, `store::next_pending` hands
/// the dispatcher other incidents' notifications on the channel (earliest due first), but
/// the later notifications of the *same* incident on this channel (its acknowledge, its
/// resolve) wait behind it, as per-incident order requires: so "come back tomorrow" cannot
/// be obeyed without holding that incident's resolve for a day. And a `Retry-After: 0`
/// must not turn the retries into a busy loop against the receiver and the store.
fn honour_retry_after(retry_after: Duration, retry_min: Duration, retry_max: Duration) -> Duration {
    retry_after.max(retry_min).min(retry_max)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::honour_retry_after;

    /// Regression: a 503 with `Retry-After: 0` was retried at once, again and again (a
    /// busy loop of HTTP requests and store writes until the receiver recovered).
    #[test]
    fn retry_after_zero_waits_at_least_retry_min() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(honour_retry_after(Duration::ZERO, min, max), min);
        assert_eq!(
            honour_retry_after(Duration::from_secs(1), min, max),
            Duration::from_secs(1)
        );
        assert_eq!(honour_retry_after(Duration::from_secs(3600), min, max), max);
    }
}
