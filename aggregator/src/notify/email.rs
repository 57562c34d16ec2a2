//! The e-mail channel: one message per notification over SMTP (`lettre`, rustls, tokio),
//! body and subject from the user e-mail templates (`email.txt.j2`,
//! `email-subject.txt.j2`). Trigger, acknowledge, resolve and repeats (reminders) are
//! separate messages of one thread: each carries `References: <DEDUP_KEY@DOMAIN>`
//! (all but the trigger also `In-Reply-To`) and the dedup key in `X-Tocsin-Dedup-Key`, so
//! mail clients group them. A storm summary starts a thread of its own (its dedup key is
//! the channel's and window's, not an incident's).
//!
//! This module owns the `[[notify.email]]` config table, its validation and delivery; it
//! connects only to the configured server, when a notification is due, and binds nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tocsin_agent::config::Secret;
use tocsin_agent::settings::Validator;

use crate::model::Notification;
use crate::notify::Delivery;
use crate::notify::template::{Name, Templates};
use crate::notify::truncate::{Limit, truncate};

/// Default per-message timeout (connect, dialogue and data), a string as written.
pub const DEFAULT_TIMEOUT: &str = "30s";
/// Longest subject, bytes of UTF-8 before encoding (RFC 5322's line limit is 998).
pub const MAX_SUBJECT: usize = 998;
/// Longest body sent, bytes.
pub const MAX_BODY: usize = 256 * 1024;

/// One `[[notify.email]]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEmail {
    /// Channel name, unique among all channels.
    pub name: String,
    /// SMTP server host name or IP address.
    pub smtp_host: String,
    /// SMTP port; 0 means the default for `tls`: 25 (`none`), 587 (`starttls`),
    /// 465 (`tls`).
    pub smtp_port: u16,
    /// `none` (plain text; only to a loopback relay when a password is set), `starttls`
    /// (upgrade required) or `tls` (implicit TLS, "SMTPS").
    pub tls: String,
    /// PEM CA that signed the server's certificate, besides the system's roots.
    pub ca_file: Option<String>,
    /// SMTP AUTH user name (with `password_file`).
    pub username: Option<String>,
    /// File holding the SMTP password (never logged or printed).
    pub password_file: Option<String>,
    /// Sender, `addr@example.org` or `Name <addr@example.org>`.
    pub from: String,
    /// Recipients, same forms.
    pub to: Vec<String>,
    /// Per-message timeout.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub timeout: String,
}

impl Default for RawEmail {
    fn default() -> Self {
        RawEmail {
            name: String::new(),
            smtp_host: String::new(),
            smtp_port: 0,
            tls: "starttls".into(),
            ca_file: None,
            username: None,
            password_file: None,
            from: String::new(),
            to: Vec::new(),
            timeout: DEFAULT_TIMEOUT.into(),
        }
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text.
    None,
    /// `STARTTLS`, required: a server that does not offer it is an error.
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// A validated e-mail channel. `Debug` never shows the password.
#[derive(Debug, Clone)]
pub struct EmailChannel {
    /// Channel name.
    pub name: String,
    /// SMTP host.
    pub host: String,
    /// SMTP port.
    pub port: u16,
    /// Connection protection.
    pub tls: SmtpTls,
    /// Extra trusted CA (PEM), from `ca_file`.
    pub ca_pem: Option<String>,
    /// SMTP AUTH user name and password, from `username` and `password_file`.
    pub credentials: Option<(String, Secret)>,
    /// Sender.
    pub from: Mailbox,
    /// Recipients (at least one).
    pub to: Vec<Mailbox>,
    /// Per-message timeout.
    pub timeout: Duration,
}

/// Validates `raw` (keys `notify.email.N.…`), recording every problem in `v`; channel
/// names must not be in `taken` (the other channels' names), and are added to it.
pub fn validate(
    v: &mut Validator<'_>,
    raw: &[RawEmail],
    taken: &mut BTreeSet<String>,
) -> Vec<EmailChannel> {
    let mut out = Vec::new();
    for (i, e) in raw.iter().enumerate() {
        let key = format!("notify.email.{i}");
        let name = if e.name.is_empty() {
            format!("email-{}", i + 1)
        } else {
            e.name.clone()
        };
        if !taken.insert(name.clone()) || name == "console" {
            v.problem(
                &format!("{key}.name"),
                format!("channel name {name:?} is used twice"),
            );
        }
        let host = e.smtp_host.trim();
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
            v.problem(
                &format!("{key}.smtp_host"),
                format!("invalid host {:?} (expected a host name or IP address, e.g. \"smtp.example.org\")", e.smtp_host),
            );
        }
        let tls = match e.tls.as_str() {
            "none" => SmtpTls::None,
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Implicit,
            other => {
                v.problem(
                    &format!("{key}.tls"),
                    format!("invalid value {other:?} (expected \"none\", \"starttls\" or \"tls\")"),
                );
                SmtpTls::StartTls
            }
        };
        let port = match (e.smtp_port, tls) {
            (0, SmtpTls::None) => 25,
            (0, SmtpTls::StartTls) => 587,
            (0, SmtpTls::Implicit) => 465,
            (p, _) => p,
        };
        let ca_pem = e
            .ca_file
            .as_deref()
            .and_then(|f| v.pem_file(&format!("{key}.ca_file"), f, "CERTIFICATE"));
        if let Some(pem) = &ca_pem
            && let Err(err) = Certificate::from_pem(pem.as_bytes())
        {
            v.problem(
                &format!("{key}.ca_file"),
                format!("not a usable certificate: {err}"),
            );
        }
        let credentials = match (&e.username, &e.password_file) {
            (Some(u), Some(f)) => v
                .secret_file(&format!("{key}.password_file"), f)
                .map(|p| (u.clone(), Secret::new(p))),
            (None, None) => None,
            _ => {
                v.problem(
                    &format!("{key}.username"),
                    "username and password_file go together",
                );
                None
            }
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        if tls == SmtpTls::None && credentials.is_some() && !loopback {
            v.problem(
                &format!("{key}.tls"),
                format!("\"none\" would send the password in clear text to {host}: use \"starttls\" or \"tls\""),
            );
        }
        let mut mailbox = |field: &str, text: &str| match text.trim().parse::<Mailbox>() {
            Ok(m) => Some(m),
            Err(err) => {
                v.problem(
                    &format!("{key}.{field}"),
                    format!("invalid address {text:?} ({err}; expected \"ops@example.org\" or \"Ops <ops@example.org>\")"),
                );
                None
            }
        };
        let from = mailbox("from", &e.from);
        let to: Vec<Mailbox> =
            e.to.iter()
                .enumerate()
                .filter_map(|(j, t)| mailbox(&format!("to.{j}"), t))
                .collect();
        if e.to.is_empty() {
            v.problem(&format!("{key}.to"), "needs at least one recipient");
        }
        let timeout = v.positive_duration(
            &format!("{key}.timeout"),
            &e.timeout,
            Duration::from_secs(30),
        );
        if let Some(from) = from {
            out.push(EmailChannel {
                name,
                host: host.to_owned(),
                port,
                tls,
                ca_pem,
                credentials,
                from,
                to,
                timeout,
            });
        }
    }
    out
}

/// `X-Tocsin-Dedup-Key`: the incident's dedup key, for filters and scripts.
#[derive(Debug, Clone)]
struct DedupKeyHeader(String);

impl Header for DedupKeyHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Tocsin-Dedup-Key")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(DedupKeyHeader(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// `X-Tocsin-Event`: `trigger`, `acknowledge`, `resolve`, `repeat` or `storm_summary`.
#[derive(Debug, Clone)]
struct EventHeader(String);

impl Header for EventHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Tocsin-Event")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(EventHeader(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Only characters that are safe inside a message id's left part.
fn id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.+=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The thread id all messages of one incident refer to: `<DEDUP_KEY@DOMAIN>` with the
/// sender's domain.
pub fn thread_id(dedup_key: &str, from: &Mailbox) -> String {
    format!("<{}@{}>", id_part(dedup_key), from.email.domain())
}

/// Builds the message for one outbox row: subject and body from the templates, headers
/// for threading. `Message-ID` is `<DEDUP_KEY.KIND.OUTBOX_ID@DOMAIN>`: the same on every
/// retry of one notification, distinct between notifications.
///
/// # Errors
/// When lettre refuses the message (it should not: addresses are validated at startup).
pub fn message(
    ch: &EmailChannel,
    templates: &Templates,
    n: &Notification,
) -> Result<Message, lettre::error::Error> {
    let p: serde_json::Value = serde_json::from_str(&n.payload).unwrap_or_default();
    let dedup_key = p["dedup_key"].as_str().unwrap_or_default().to_owned();
    let subject = templates.render(Name::EmailSubject, &p, "email");
    // One line: a template (or a check name) cannot add headers.
    let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
    let subject = truncate(&subject, Limit::Bytes(MAX_SUBJECT));
    let body = truncate(
        &templates.render(Name::Email, &p, "email"),
        Limit::Bytes(MAX_BODY),
    );
    let thread = thread_id(&dedup_key, &ch.from);
    let mut b = Message::builder()
        .from(ch.from.clone())
        .subject(subject)
        .message_id(Some(format!(
            "<{}.{}.{}@{}>",
            id_part(&dedup_key),
            id_part(&n.kind),
            n.id,
            ch.from.email.domain()
        )))
        .references(thread.clone())
        .header(DedupKeyHeader(dedup_key))
        .header(EventHeader(n.kind.clone()))
        .header(ContentType::TEXT_PLAIN)
        .user_agent(concat!("tocsin/", env!("CARGO_PKG_VERSION")).to_owned());
    if n.kind != "trigger" && n.kind != crate::store::STORM_SUMMARY {
        b = b.in_reply_to(thread);
    }
    for to in &ch.to {
        b = b.to(to.clone());
    }
    b.body(body)
}

fn transport(
    ch: &EmailChannel,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, lettre::transport::smtp::Error> {
    let params = || {
        let mut p = TlsParameters::builder(ch.host.clone());
        if let Some(pem) = &ch.ca_pem {
            p = p.add_root_certificate(Certificate::from_pem(pem.as_bytes())?);
        }
        p.build_rustls()
    };
    let tls = match ch.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::StartTls => Tls::Required(params()?),
        SmtpTls::Implicit => Tls::Wrapper(params()?),
    };
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(ch.host.clone())
        .port(ch.port)
        .tls(tls)
        .timeout(Some(ch.timeout));
    if let Some((user, password)) = &ch.credentials {
        b = b.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
    }
    Ok(b.build())
}

/// Sends one notification. Accepted (2xx) is delivered; a 4xx reply, a refused or broken
/// connection, a timeout or a TLS failure is retried; a 5xx reply fails for good with the
/// server's reply text.
pub async fn deliver(ch: &EmailChannel, templates: &Templates, n: &Notification) -> Delivery {
    let msg = match message(ch, templates, n) {
        Ok(m) => m,
        Err(e) => {
            return Delivery::Permanent {
                error: format!("cannot build the message: {e}"),
            };
        }
    };
    let server = format!("smtp://{}:{}", ch.host, ch.port);
    let transport = match transport(ch) {
        Ok(t) => t,
        Err(e) => {
            return Delivery::Permanent {
                error: format!("{server}: TLS setup: {e}"),
            };
        }
    };
    // lettre's own timeout covers each command; this bounds the whole dialogue.
    let sent = tokio::time::timeout(ch.timeout.saturating_mul(2), transport.send(msg)).await;
    match sent {
        Ok(Ok(_)) => Delivery::Ok,
        Ok(Err(e)) if e.is_permanent() || e.is_client() => Delivery::Permanent {
            error: format!("{server}: {e}"),
        },
        Ok(Err(e)) => Delivery::Transient {
            error: format!("{server}: {e}"),
            retry_after: None,
        },
        Err(_) => Delivery::Transient {
            error: format!(
                "{server}: no answer within {:?}",
                ch.timeout.saturating_mul(2)
            ),
            retry_after: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> EmailChannel {
        EmailChannel {
            name: "mail".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: SmtpTls::None,
            ca_pem: None,
            credentials: Some(("ops".into(), Secret::new("hunter2".into()))),
            from: "tocsin <tocsin@example.org>".parse().expect("from"),
            to: vec!["ops@example.org".parse().expect("to")],
            timeout: Duration::from_secs(5),
        }
    }

    fn notification(kind: &str, payload: serde_json::Value) -> Notification {
        Notification {
            id: 42,
            incident_id: 7,
            channel: "mail".into(),
            kind: kind.into(),
            status: "pending".into(),
            attempts: 0,
            payload: payload.to_string(),
            last_error: None,
            created_at_ms: 0,
            next_attempt_ms: 0,
            delivered_at_ms: None,
            idempotency_key: format!("k-{kind}"),
        }
    }

    #[test]
    fn messages_of_one_incident_share_a_thread() {
        let t = Templates::defaults(Default::default());
        let ch = channel();
        let trigger = message(
            &ch,
            &t,
            &notification(
                "trigger",
                crate::notify::template::sample_payload("trigger"),
            ),
        )
        .expect("message");
        let resolve = message(
            &ch,
            &t,
            &notification(
                "resolve",
                crate::notify::template::sample_payload("resolve"),
            ),
        )
        .expect("message");
        let trigger = String::from_utf8(trigger.formatted()).expect("utf8");
        let resolve = String::from_utf8(resolve.formatted()).expect("utf8");
        let thread = "<tocsin-0123456789abcdef-7@example.org>";
        assert!(
            trigger.contains(&format!("References: {thread}")),
            "{trigger}"
        );
        assert!(!trigger.contains("In-Reply-To"), "{trigger}");
        assert!(
            resolve.contains(&format!("In-Reply-To: {thread}")),
            "{resolve}"
        );
        assert!(
            trigger.contains("Message-ID: <tocsin-0123456789abcdef-7.trigger.42@example.org>"),
            "{trigger}"
        );
        assert!(
            trigger.contains("X-Tocsin-Dedup-Key: tocsin-0123456789abcdef-7"),
            "{trigger}"
        );
        assert!(
            trigger.contains("Subject: [P1] Incident #7: http:checkout on web-1"),
            "{trigger}"
        );
        assert!(resolve.contains("Subject: [P1] Resolved #7"), "{resolve}");
        assert!(!format!("{ch:?}").contains("hunter2"));
    }

    #[test]
    fn a_repeat_is_a_reminder_in_the_thread_and_a_storm_summary_starts_its_own() {
        let t = Templates::defaults(Default::default());
        let ch = channel();
        let repeat = message(
            &ch,
            &t,
            &notification("repeat", crate::notify::template::sample_payload("repeat")),
        )
        .expect("message");
        let repeat = String::from_utf8(repeat.formatted()).expect("utf8");
        let thread = "<tocsin-0123456789abcdef-7@example.org>";
        assert!(
            repeat.contains(&format!("In-Reply-To: {thread}")),
            "{repeat}"
        );
        assert!(
            repeat.contains("Subject: [P1] Reminder #7: http:checkout on web-1"),
            "{repeat}"
        );
        let storm = message(
            &ch,
            &t,
            &notification(
                "storm_summary",
                crate::notify::template::sample_payload("storm_summary"),
            ),
        )
        .expect("message");
        let storm = String::from_utf8(storm.formatted()).expect("utf8");
        assert!(!storm.contains("In-Reply-To"), "{storm}");
        assert!(
            storm.contains(
                "References: <tocsin-0123456789abcdef-storm-war-room-1705313100000@example.org>"
            ),
            "{storm}"
        );
        assert!(
            storm.contains("Subject: [P1] Storm on war-room: 23 more incidents"),
            "{storm}"
        );
    }

    #[test]
    fn long_emoji_subjects_stay_within_the_line_limit() {
        let t = Templates::defaults(Default::default());
        let mut p = crate::notify::template::sample_payload("trigger");
        p["incident"]["check"] = serde_json::json!(format!(
            "exec:{}\r\nBcc: evil@example.org",
            "🔥".repeat(4000)
        ));
        let m = message(&channel(), &t, &notification("trigger", p)).expect("message");
        let raw = m.formatted();
        let text = String::from_utf8(raw).expect("utf8");
        for line in text.split("\r\n") {
            assert!(line.len() <= 998, "a line of {} bytes", line.len());
        }
        assert!(!text.contains("\r\nBcc:"), "no header injection");
    }
}
