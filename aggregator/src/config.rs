//! The aggregator's configuration: raw TOML/environment shape and validated
//! [`AggregatorConfig`].
//!
//! Sources, later ones win: built-in defaults, the TOML file given with `--config`, then
//! `TOCSIN_AGGREGATOR_…` variables (`__` for nesting, e.g.
//! `TOCSIN_AGGREGATOR_LISTEN_HTTP=127.0.0.1:9000`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_agent::settings::{self, ConfigError, Validator};

/// Prefix of the aggregator's environment variables.
pub const ENV_PREFIX: &str = "TOCSIN_AGGREGATOR_";
/// Default HTTP (API, on-call view) listen address: loopback only.
pub const DEFAULT_LISTEN_HTTP: &str = "127.0.0.1:7600";
/// Default gRPC (agent ingest) listen address: loopback only.
pub const DEFAULT_LISTEN_GRPC: &str = "127.0.0.1:7601";
/// Default silence after which a node is down.
pub const DEFAULT_NODE_TIMEOUT: &str = "30s";
/// Deserializes a duration key as written: a string (`"30s"`, `"5m"`, or for the hook
/// timeouts bare seconds `"300"`), or a TOML integer, read as **seconds** (`timeout = 30`
/// is `"30s"`), as the seed writes its timeouts. Every duration key of the aggregator's
/// config uses it (`#[serde(deserialize_with = …)]`); the typed value is checked later by
/// the `Validator`, with the key's name. A negative or fractional number is an error.
///
/// # Errors
/// The deserializer's, naming the accepted forms.
pub fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(DurationText)
}

/// [`duration_text`] for an optional key.
///
/// # Errors
/// As [`duration_text`].
pub fn opt_duration_text<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    d.deserialize_any(DurationText).map(Some)
}

/// Visitor of [`duration_text`].
struct DurationText;

impl serde::de::Visitor<'_> for DurationText {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration such as \"30s\", \"5m\", or a whole number of seconds")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(format!("{v}s"))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        u64::try_from(v).map(|v| format!("{v}s")).map_err(|_| {
            E::custom(format!(
                "invalid duration {v}: a number of seconds must not be negative"
            ))
        })
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Err(E::custom(format!(
            "invalid duration {v}: a number is whole seconds; write fractions as a duration (\"1500ms\")"
        )))
    }
}

/// Default per-request timeout of notification deliveries.
pub const DEFAULT_NOTIFY_TIMEOUT: &str = "10s";

/// The config as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// HTTP API listen address.
    pub listen_http: String,
    /// gRPC ingest listen address.
    pub listen_grpc: String,
    /// Directory of the SQLite store (`tocsin.db`).
    pub data_dir: String,
    /// Largest gRPC message accepted from an agent, bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval toward agents; a silent agent connection is
    /// closed after twice this.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub keepalive: String,
    /// A node whose agent sends no heartbeat for this long (and at least 3 of its
    /// heartbeat intervals) becomes a `node_down` incident.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub node_timeout: String,
    /// Notification channels.
    pub notify: RawNotify,
    /// Grouping of firing fingerprints into incidents.
    pub correlation: RawCorrelation,
    /// Severity rules (`[[severity]]`), first match wins; the seed's defaults follow.
    pub severity: Vec<RawSeverityRule>,
    /// Message templates.
    pub templates: RawTemplates,
    /// Agent authentication.
    pub auth: RawAuth,
    /// TLS on the gRPC ingest.
    pub tls: RawTls,
    /// Logging.
    pub log: tocsin_agent::telemetry::RawLog,
    /// Routes (`[[route]]`), in order; none: every page to every channel.
    pub route: Vec<crate::route::RawRoute>,
    /// Response targets per severity (`[response_targets]`), for escalation.
    pub response_targets: crate::route::RawResponseTargets,
    /// Period of the paging sweep: repeats, escalations, storm summaries (100ms to 60s).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub paging_sweep_interval: String,
    /// Recovery hooks (`[[hook]]`, see `crate::hook`).
    pub hook: Vec<crate::hook::RawHook>,
    /// Default timeout of `recovery` hooks (a duration, or seconds; the seed's
    /// `RECOVERY_TIMEOUT`).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub recovery_timeout: String,
    /// Default timeout of the `rollback` hook (the seed's `ROLLBACK_TIMEOUT`).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub rollback_timeout: String,
    /// Drills (`[drills]`): where their incidents are paged (see `crate::route`).
    pub drills: crate::route::RawDrills,
}

/// The seed's variables that set aggregator keys (beside `TOCSIN_AGGREGATOR_…`):
/// `RECOVERY_TIMEOUT` and `ROLLBACK_TIMEOUT` (seconds), the hooks' default timeouts.
pub const SEED_ENV: &[(&str, &str)] = &[
    ("RECOVERY_TIMEOUT", "recovery_timeout"),
    ("ROLLBACK_TIMEOUT", "rollback_timeout"),
];

/// `[correlation]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCorrelation {
    /// Firing fingerprints with the same values of these names share one incident:
    /// `node`, `check` or label names (default `["check"]`; at least one).
    pub group_by: Vec<String>,
    /// Hold a new incident's trigger this long so the page names every member that
    /// joins meanwhile ("0s": page at once; later members join without a second page).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub group_wait: String,
    /// A fingerprint that fires again within this time after its incident resolved
    /// reopens that incident ("0s": never).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub reopen_window: String,
}

impl Default for RawCorrelation {
    fn default() -> Self {
        RawCorrelation {
            group_by: crate::correlate::DEFAULT_GROUP_BY
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            group_wait: crate::correlate::DEFAULT_GROUP_WAIT.into(),
            reopen_window: crate::correlate::DEFAULT_REOPEN_WINDOW.into(),
        }
    }
}

/// One `[[severity]]` rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSeverityRule {
    /// Matchers, all must match a firing member: `name=value`, `name!=value`,
    /// `name=~regex`, `name!~regex`; names `node`, `check`, `state` or a label.
    #[serde(rename = "match")]
    pub matchers: Vec<String>,
    /// `P1` … `P4`.
    pub level: String,
}

/// `[templates]`: overrides of the built-in message templates (see `notify::template`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTemplates {
    /// Directory of override files (`incident.md.j2`, `status.md.j2`, `email.txt.j2`,
    /// `email-subject.txt.j2`; any subset). Unset: the built-in templates.
    pub dir: Option<String>,
    /// Strings every template sees as `vars.NAME` (e.g. `contact`, `service`).
    pub vars: std::collections::BTreeMap<String, String>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// File of accepted agent tokens, one `AGENT_ID TOKEN` per line (`*` as the id
    /// accepts the token from any agent; `#` starts a comment). Unset: no token needed.
    pub tokens_file: Option<String>,
    /// File holding the token that changes need on the HTTP API (acknowledge, resolve):
    /// `Authorization: Bearer TOKEN`. Unset: changes are accepted only when
    /// `listen_http` is a loopback address.
    pub api_token_file: Option<String>,
    /// Who may read the on-call web view: `"public"` (anyone who can connect) or
    /// `"login"` (a signed-in user). Unset: public while `listen_http` is a loopback
    /// address, else login. The status pages (`/status/SERVICE`) are always public.
    pub read_only: Option<String>,
    /// Users of the on-call web view (`[[auth.user]]`), besides the API token.
    pub user: Vec<RawUser>,
}

/// One `[[auth.user]]` of the on-call web view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUser {
    /// Login name, shown on the timeline as `user:NAME` (1 to 128 printable characters).
    pub name: String,
    /// File holding the password: an argon2 PHC hash (`$argon2id$v=19$…`, e.g. from
    /// Debian's `argon2` command) or, failing that, the plain password itself.
    pub password_file: String,
}

/// `[tls]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// PEM certificate (chain) of the ingest endpoint.
    pub cert_file: Option<String>,
    /// PEM private key of that certificate.
    pub key_file: Option<String>,
    /// PEM CA for client certificates: when set, agents must present a certificate it
    /// signed (mutual TLS).
    pub client_ca_file: Option<String>,
}

/// `[notify]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNotify {
    /// Print notifications on standard output (on in `tocsin up`).
    pub console: bool,
    /// First retry delay.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub retry_min: String,
    /// Largest retry delay.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub retry_max: String,
    /// Give up on a notification still failing this long after it was queued.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub give_up_after: String,
    /// Generic JSON webhooks (`[[notify.webhook]]`).
    pub webhook: Vec<RawWebhook>,
    /// Default storm budget of every channel: triggers per `storm_window`; beyond it they
    /// are held and summarised. 0 turns the guard off.
    pub storm_budget: u32,
    /// Default storm window (a duration, at most 24h; `"0s"` only with `storm_budget = 0`).
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub storm_window: String,
    /// E-mail over SMTP (`[[notify.email]]`).
    pub email: Vec<crate::notify::email::RawEmail>,
}

/// One `[[notify.webhook]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWebhook {
    /// Channel name, unique (shown in the incident's notifications).
    pub name: String,
    /// `http://` or `https://` URL receiving a JSON POST.
    pub url: String,
    /// `generic` (tocsin's JSON), `slack` (an incoming-webhook URL), `pagerduty`
    /// (Events API v2; `url` defaults to PagerDuty's endpoint) or `alertmanager`
    /// (API v2; `url` is Alertmanager's base URL, e.g. `http://127.0.0.1:9093`).
    pub kind: String,
    /// For `pagerduty`: file holding the integration's routing key (or the seed's
    /// `PAGERDUTY_KEY` variable).
    pub routing_key_file: Option<String>,
    /// For `generic` only: file holding the HMAC-SHA256 secret (content trimmed; never
    /// logged or printed) that signs every request with `X-Tocsin-Timestamp` and
    /// `X-Tocsin-Signature` (see `notify::webhook`). Unset: requests are not signed.
    pub secret_file: Option<String>,
    /// For `alertmanager` only: every open incident the channel was paged for is posted
    /// again this often (default `1m`, at least `1s`), so Alertmanager does not resolve
    /// it by its `resolve_timeout` (default 5m): keep it below that.
    #[serde(deserialize_with = "crate::config::opt_duration_text", default)]
    pub repost_interval: Option<String>,
    /// Per-request timeout.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub timeout: String,
    /// This channel's storm budget (default `notify.storm_budget`; 0: no guard).
    pub storm_budget: Option<u32>,
    /// This channel's storm window (default `notify.storm_window`; at most 24h).
    #[serde(deserialize_with = "crate::config::opt_duration_text", default)]
    pub storm_window: Option<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen_http: DEFAULT_LISTEN_HTTP.into(),
            listen_grpc: DEFAULT_LISTEN_GRPC.into(),
            data_dir: "/var/lib/tocsin-aggregator".into(),
            node_timeout: DEFAULT_NODE_TIMEOUT.into(),
            max_message_bytes: 4 * 1024 * 1024,
            keepalive: "10s".into(),
            notify: RawNotify::default(),
            correlation: RawCorrelation::default(),
            severity: Vec::new(),
            templates: RawTemplates::default(),
            auth: RawAuth::default(),
            tls: RawTls::default(),
            log: tocsin_agent::telemetry::RawLog::default(),
            route: Vec::new(),
            response_targets: crate::route::RawResponseTargets::default(),
            paging_sweep_interval: crate::route::DEFAULT_PAGING_SWEEP_INTERVAL.into(),
            hook: Vec::new(),
            recovery_timeout: crate::hook::DEFAULT_RECOVERY_TIMEOUT.into(),
            rollback_timeout: crate::hook::DEFAULT_ROLLBACK_TIMEOUT.into(),
            drills: crate::route::RawDrills::default(),
        }
    }
}

impl Default for RawNotify {
    fn default() -> Self {
        RawNotify {
            console: false,
            retry_min: "1s".into(),
            retry_max: "5m".into(),
            give_up_after: "24h".into(),
            webhook: Vec::new(),
            storm_budget: crate::route::DEFAULT_STORM_BUDGET,
            storm_window: crate::route::DEFAULT_STORM_WINDOW.into(),
            email: Vec::new(),
        }
    }
}

impl Default for RawWebhook {
    fn default() -> Self {
        RawWebhook {
            name: String::new(),
            url: String::new(),
            kind: "generic".into(),
            routing_key_file: None,
            secret_file: None,
            repost_interval: None,
            timeout: DEFAULT_NOTIFY_TIMEOUT.into(),
            storm_budget: None,
            storm_window: None,
        }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// HTTP API listen address.
    pub listen_http: SocketAddr,
    /// gRPC ingest listen address.
    pub listen_grpc: SocketAddr,
    /// Store directory.
    pub data_dir: PathBuf,
    /// Silence after which a node is down.
    pub node_timeout: Duration,
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive interval.
    pub keepalive: Duration,
    /// Print notifications on stdout.
    pub console: bool,
    /// Retry delay bounds for failed deliveries.
    pub retry_min: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Give up after this long.
    pub give_up_after: Duration,
    /// Webhook channels.
    pub webhooks: Vec<Webhook>,
    /// Grouping, group wait, re-open window and severity rules.
    pub correlation: crate::correlate::Correlation,
    /// E-mail channels.
    pub emails: Vec<crate::notify::email::EmailChannel>,
    /// Message templates, compiled (built-in, overridden from `templates.dir`).
    pub templates: std::sync::Arc<crate::notify::template::Templates>,
    /// Accepted agent tokens; `None` when no token is needed.
    pub tokens: Option<Tokens>,
    /// Token that API changes need (`auth.api_token_file`); never logged.
    pub api_token: Option<tocsin_agent::config::Secret>,
    /// Who may read the on-call web view and who may sign in to change things.
    pub web: crate::web::ui::auth::WebAuth,
    /// TLS on the gRPC ingest.
    pub tls: Option<ServerTls>,
    /// Log settings.
    pub log: tocsin_agent::telemetry::LogConfig,
    /// Routes, response targets, storm budgets per channel, paging sweep period.
    pub routing: crate::route::Routing,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &crate::notify::webhook::redact_url(&self.url))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Accepted agent tokens: per agent id, and for any agent (`*`).
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} entries, redacted)", self.entries.len())
    }
}

impl Tokens {
    /// Parses the tokens file text; reports every bad line at once.
    ///
    /// # Errors
    /// A message naming each bad line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(token), None) => {
                    let id = id.to_lowercase();
                    if entries.iter().any(|(seen, t)| *seen == id && t == token) {
                        problems.push(format!("line {}: the same token for {id} again", i + 1));
                    }
                    entries.push((id, token.to_owned()));
                }
                _ => problems.push(format!(
                    "line {}: expected `AGENT_ID TOKEN` (or `* TOKEN`)",
                    i + 1
                )),
            }
        }
        if entries.is_empty() && problems.is_empty() {
            problems.push("no token in the file".to_owned());
        }
        if problems.is_empty() {
            Ok(Tokens { entries })
        } else {
            Err(problems.join("; "))
        }
    }

    /// Whether `token` is accepted for `agent_id` (constant-time per comparison). An id
    /// with lines of its own accepts only those tokens: the fleet token (`*`) cannot be
    /// used to pose as it.
    pub fn accepts(&self, agent_id: &str, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let agent_id = agent_id.to_lowercase();
        let own = self.entries.iter().any(|(id, _)| *id == agent_id);
        self.entries
            .iter()
            .filter(|(id, _)| if own { *id == agent_id } else { id == "*" })
            .fold(false, |ok, (_, t)| {
                ok | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
            })
    }
}

/// PEM material for TLS on the ingest.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain.
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
    /// CA for client certificates (mutual TLS), if required.
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A validated webhook channel. `Debug` shows the URL redacted.
#[derive(Clone)]
pub struct Webhook {
    /// Channel name.
    pub name: String,
    /// Target URL.
    pub url: String,
    /// The receiver's format.
    pub format: crate::notify::Format,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Loads and validates with `defaults` as the lowest layer.
///
/// # Errors
/// [`ConfigError`] listing every problem with its origin and key.
pub fn load_with(
    defaults: &RawConfig,
    file: Option<&Path>,
) -> Result<AggregatorConfig, ConfigError> {
    let fig = settings::figment(
        defaults,
        file,
        settings::env_providers(ENV_PREFIX, SEED_ENV),
    )?;
    let raw: RawConfig = settings::extract(&fig)?;
    raw.validate(&fig)
}

/// [`load_with`] the built-in defaults.
///
/// # Errors
/// See [`load_with`].
pub fn load(file: Option<&Path>) -> Result<AggregatorConfig, ConfigError> {
    load_with(&RawConfig::default(), file)
}

/// The effective raw config, for `print-config`.
///
/// # Errors
/// See [`load_with`].
pub fn effective(file: Option<&Path>) -> Result<RawConfig, ConfigError> {
    let fig = settings::figment(
        &RawConfig::default(),
        file,
        settings::env_providers(ENV_PREFIX, SEED_ENV),
    )?;
    settings::extract(&fig)
}

impl RawConfig {
    /// Converts into typed values, reporting every problem at once.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`].
    pub fn validate(self, fig: &figment::Figment) -> Result<AggregatorConfig, ConfigError> {
        let mut v = Validator::new(fig);
        let listen_http = v.socket_addr("listen_http", &self.listen_http);
        let listen_grpc = v.socket_addr("listen_grpc", &self.listen_grpc);
        if listen_http.is_some()
            && listen_http == listen_grpc
            && listen_http.is_some_and(|a| a.port() != 0)
        {
            v.problem(
                "listen_grpc",
                format!(
                    "{:?} is also listen_http: give the API and ingest different ports",
                    self.listen_grpc
                ),
            );
        }
        let keepalive = v.positive_duration("keepalive", &self.keepalive, Duration::from_secs(10));
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            v.problem(
                "max_message_bytes",
                format!("{} is outside 65536 to 67108864", self.max_message_bytes),
            );
        }
        let node_timeout =
            v.positive_duration("node_timeout", &self.node_timeout, Duration::from_secs(30));
        let retry_min = v.positive_duration(
            "notify.retry_min",
            &self.notify.retry_min,
            Duration::from_secs(1),
        );
        let give_up_after = v.positive_duration(
            "notify.give_up_after",
            &self.notify.give_up_after,
            Duration::from_secs(86_400),
        );
        let retry_max = v.positive_duration(
            "notify.retry_max",
            &self.notify.retry_max,
            Duration::from_secs(300),
        );
        if retry_min > retry_max {
            v.problem(
                "notify.retry_min",
                format!(
                    "{:?} is above notify.retry_max {:?}",
                    self.notify.retry_min, self.notify.retry_max
                ),
            );
        }
        let mut webhooks = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        let notify_window = storm_window(
            &mut v,
            "notify.storm_window",
            &self.notify.storm_window,
            self.notify.storm_budget,
        );
        let default_storm = (self.notify.storm_budget > 0).then_some(crate::route::Storm {
            budget: self.notify.storm_budget,
            window: notify_window,
        });
        let mut storms = std::collections::BTreeMap::new();
        if self.notify.console
            && let Some(s) = default_storm
        {
            storms.insert("console".to_owned(), s);
        }
        // The seed's variables add a Slack and a PagerDuty channel.
        let mut raw_hooks = self.notify.webhook.clone();
        if let Ok(url) = std::env::var("SLACK_WEBHOOK_URL")
            && !url.trim().is_empty()
            && !raw_hooks.iter().any(|w| w.name == "slack")
        {
            raw_hooks.push(RawWebhook {
                name: "slack".into(),
                url: url.trim().to_owned(),
                kind: "slack".into(),
                ..RawWebhook::default()
            });
        }
        let seed_pd_key = std::env::var("PAGERDUTY_KEY")
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty());
        if seed_pd_key.is_some() && !raw_hooks.iter().any(|w| w.name == "pagerduty") {
            raw_hooks.push(RawWebhook {
                name: "pagerduty".into(),
                kind: "pagerduty".into(),
                ..RawWebhook::default()
            });
        }
        for (i, w) in raw_hooks.iter().enumerate() {
            let key = format!("notify.webhook.{i}");
            let mut w = w.clone();
            if w.kind == "pagerduty" && w.url.is_empty() {
                crate::notify::pagerduty::EVENTS_URL.clone_into(&mut w.url);
            }
            let format = match w.kind.as_str() {
                "generic" => {
                    crate::notify::Format::Generic(w.secret_file.as_deref().and_then(|f| {
                        let key = format!("{key}.secret_file");
                        let secret = v.secret_file(&key, f)?;
                        if secret.is_empty() {
                            v.problem(&key, format!("{f} is empty"));
                            return None;
                        }
                        Some(tocsin_agent::config::Secret::new(secret))
                    }))
                }
                "slack" => crate::notify::Format::Slack,
                "pagerduty" => {
                    let key_text = match &w.routing_key_file {
                        Some(f) => v.secret_file(&format!("{key}.routing_key_file"), f),
                        None => seed_pd_key.clone(),
                    };
                    match key_text {
                        Some(k) if !k.is_empty() && k.len() <= 64 => {
                            crate::notify::Format::PagerDuty(tocsin_agent::config::Secret::new(k))
                        }
                        Some(_) => {
                            v.problem(
                                &format!("{key}.routing_key_file"),
                                "the routing key must be 1 to 64 characters",
                            );
                            crate::notify::Format::Generic(None)
                        }
                        None => {
                            if w.routing_key_file.is_none() {
                                v.problem(
                                    &format!("{key}.routing_key_file"),
                                    "a pagerduty channel needs its routing key: routing_key_file, or PAGERDUTY_KEY",
                                );
                            }
                            crate::notify::Format::Generic(None)
                        }
                    }
                }
                "alertmanager" => {
                    crate::notify::Format::Alertmanager(crate::notify::alertmanager::Options::new(
                        repost_interval(&mut v, &key, w.repost_interval.as_deref()),
                    ))
                }
                other => {
                    v.problem(
                        &format!("{key}.kind"),
                        format!("invalid value {other:?} (expected \"generic\", \"slack\", \"pagerduty\" or \"alertmanager\")"),
                    );
                    crate::notify::Format::Generic(None)
                }
            };
            if w.kind != "generic" && w.secret_file.is_some() {
                v.problem(
                    &format!("{key}.secret_file"),
                    format!(
                        "only for kind = \"generic\" (a {:?} receiver does not check tocsin's signature)",
                        w.kind
                    ),
                );
            }
            if w.kind != "alertmanager" && w.repost_interval.is_some() {
                v.problem(
                    &format!("{key}.repost_interval"),
                    "only for kind = \"alertmanager\"",
                );
            }
            let w = &w;
            let name = if w.name.is_empty() {
                format!("webhook-{}", i + 1)
            } else {
                w.name.clone()
            };
            if !names.insert(name.clone()) || name == "console" {
                v.problem(
                    &format!("{key}.name"),
                    format!("channel name {name:?} is used twice"),
                );
            }
            let url_ok = reqwest::Url::parse(&w.url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !url_ok {
                v.problem(
                    &format!("{key}.url"),
                    format!(
                        "invalid URL {:?} (expected http://HOST[:PORT]/PATH or https://…)",
                        w.url
                    ),
                );
            }
            let timeout = v.positive_duration(
                &format!("{key}.timeout"),
                &w.timeout,
                Duration::from_secs(10),
            );
            let channel_storm = if w.storm_budget.is_some() || w.storm_window.is_some() {
                let budget = w.storm_budget.unwrap_or(self.notify.storm_budget);
                let window = match w.storm_window.as_deref() {
                    Some(raw) => storm_window(&mut v, &format!("{key}.storm_window"), raw, budget),
                    None => {
                        // notify.storm_window is checked above; "0s" is fine there only
                        // because notify's own guard is off.
                        if budget > 0 && notify_window.is_zero() {
                            v.problem(
                                &format!("{key}.storm_budget"),
                                format!(
                                    "a budget needs a window: set this channel's storm_window \
                                     (notify.storm_window is {:?})",
                                    self.notify.storm_window
                                ),
                            );
                        }
                        notify_window
                    }
                };
                (budget > 0 && !window.is_zero()).then_some(crate::route::Storm { budget, window })
            } else {
                default_storm
            };
            if let Some(s) = channel_storm {
                storms.insert(name.clone(), s);
            }
            webhooks.push(Webhook {
                name,
                url: w.url.clone(),
                format,
                timeout,
            });
        }
        let emails = crate::notify::email::validate(&mut v, &self.notify.email, &mut names);
        let templates = match crate::notify::template::Templates::load(
            self.templates.dir.as_deref().map(Path::new),
            self.templates.vars.clone(),
        ) {
            Ok(t) => t,
            Err(errors) => {
                for e in errors {
                    v.problem("templates.dir", e.to_string());
                }
                crate::notify::template::Templates::defaults(self.templates.vars.clone())
            }
        };
        let mut channel_names: Vec<String> = Vec::new();
        if self.notify.console {
            channel_names.push("console".into());
        }
        channel_names.extend(webhooks.iter().map(|w| w.name.clone()));
        channel_names.extend(emails.iter().map(|e| e.name.clone()));
        // E-mail channels take the default storm budget.
        if let Some(s) = default_storm {
            for e in &emails {
                storms.insert(e.name.clone(), s);
            }
        }
        let hooks = crate::hook::validate(
            &mut v,
            &self.hook,
            &self.recovery_timeout,
            &self.rollback_timeout,
        );
        let routing = crate::route::validate(
            &mut v,
            &self.route,
            &self.response_targets,
            &self.paging_sweep_interval,
            &channel_names,
            storms,
            &self
                .hook
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>(),
        );
        let drill_channels = crate::route::validate_drills(&mut v, &self.drills, &channel_names);
        let routing = crate::route::Routing {
            hooks,
            drill_channels,
            ..routing
        };
        crate::hook::validate_remediate(&mut v, &self.hook, &routing);
        let log = tocsin_agent::telemetry::validate(&mut v, &self.log);
        let correlation = self.validate_correlation(&mut v);
        let api_token = self.auth.api_token_file.as_deref().and_then(|f| {
            let t = v.secret_file("auth.api_token_file", f)?;
            if t.is_empty() {
                v.problem("auth.api_token_file", format!("{f} is empty"));
                return None;
            }
            Some(tocsin_agent::config::Secret::new(t))
        });
        let web = crate::web::ui::auth::validate(
            &mut v,
            &self.auth,
            listen_http.is_none_or(|a| a.ip().is_loopback()),
        );
        let tokens = self.auth.tokens_file.as_deref().and_then(|f| {
            let text = v.secret_file("auth.tokens_file", f)?;
            match Tokens::parse(&text) {
                Ok(t) => Some(t),
                Err(e) => {
                    v.problem("auth.tokens_file", format!("{f}: {e}"));
                    None
                }
            }
        });
        let tls = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(c), Some(k)) => {
                let cert = v.pem_file("tls.cert_file", c, "CERTIFICATE");
                let key = v.pem_file("tls.key_file", k, "PRIVATE KEY");
                let client_ca = self
                    .tls
                    .client_ca_file
                    .as_deref()
                    .map(|f| v.pem_file("tls.client_ca_file", f, "CERTIFICATE"));
                match (cert, key, client_ca) {
                    (Some(cert_pem), Some(key_pem), None) => Some(ServerTls {
                        cert_pem,
                        key_pem,
                        client_ca_pem: None,
                    }),
                    (Some(cert_pem), Some(key_pem), Some(Some(ca))) => Some(ServerTls {
                        cert_pem,
                        key_pem,
                        client_ca_pem: Some(ca),
                    }),
                    _ => None,
                }
            }
            (None, None) => {
                if self.tls.client_ca_file.is_some() {
                    v.problem("tls.client_ca_file", "needs tls.cert_file and tls.key_file");
                }
                None
            }
            _ => {
                v.problem(
                    "tls.cert_file",
                    "tls.cert_file and tls.key_file go together",
                );
                None
            }
        };
        // Build the TLS acceptor now, so check-config catches a key that does not belong
        // to the certificate instead of the daemon failing at start.
        let tls = tls.filter(|t| match crate::tls::acceptor(t) {
            Ok(_) => true,
            Err(e) => {
                v.problem("tls.key_file", e.to_string());
                false
            }
        });
        if std::path::Path::new(&self.data_dir).exists()
            && !std::path::Path::new(&self.data_dir).is_dir()
        {
            v.problem(
                "data_dir",
                format!("{} exists and is not a directory", self.data_dir),
            );
        }
        if self.data_dir.trim().is_empty() {
            v.problem("data_dir", "must not be empty");
        }
        let fallback: SocketAddr = ([127, 0, 0, 1], 0).into();
        v.finish(AggregatorConfig {
            listen_http: listen_http.unwrap_or(fallback),
            listen_grpc: listen_grpc.unwrap_or(fallback),
            data_dir: PathBuf::from(self.data_dir),
            node_timeout,
            max_message_bytes: self.max_message_bytes,
            keepalive,
            console: self.notify.console,
            retry_min,
            retry_max,
            give_up_after,
            webhooks,
            correlation,
            emails,
            templates: std::sync::Arc::new(templates),
            tokens,
            api_token,
            web,
            tls,
            log,
            routing,
        })
    }
}

/// The storm window at `key` (`notify.storm_window` or `notify.webhook.<i>.storm_window`)
/// for a guard of `budget` triggers: a duration up to [`crate::route::MAX_STORM_WINDOW`]
/// (24h), and above zero unless `budget` is 0 (the guard is off, so `"0s"` is fine).
/// Invalid: the problem is recorded and 5 minutes returned.
fn storm_window(v: &mut Validator<'_>, key: &str, raw: &str, budget: u32) -> Duration {
    let fallback = Duration::from_secs(300);
    let window = if budget == 0 {
        v.duration(key, raw, fallback)
    } else {
        v.positive_duration(key, raw, fallback)
    };
    if window > crate::route::MAX_STORM_WINDOW {
        v.problem(
            key,
            format!("{raw:?} is above the maximum of 24h (held pages would wait that long for their summary)"),
        );
        return fallback;
    }
    window
}

impl RawConfig {
    /// `[correlation]` and `[[severity]]`, each problem recorded with its key.
    fn validate_correlation(&self, v: &mut Validator<'_>) -> crate::correlate::Correlation {
        let c = &self.correlation;
        if c.group_by.is_empty() {
            v.problem(
                "correlation.group_by",
                "needs at least one name; use [\"node\", \"check\"] to group nothing (one incident per node and check)",
            );
        }
        for (i, name) in c.group_by.iter().enumerate() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                v.problem(
                    &format!("correlation.group_by.{i}"),
                    format!("{name:?} is not a name (expected node, check or a label name: letters, digits, _)"),
                );
            }
        }
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let group_wait = v.duration("correlation.group_wait", &c.group_wait, Duration::ZERO);
        let reopen_window = v.duration(
            "correlation.reopen_window",
            &c.reopen_window,
            Duration::from_secs(300),
        );
        let mut severity = Vec::new();
        for (i, rule) in self.severity.iter().enumerate() {
            let key = format!("severity.{i}");
            let level = crate::model::Severity::parse(rule.level.trim());
            if level.is_none() {
                v.problem(
                    &format!("{key}.level"),
                    format!(
                        "invalid value {:?} (expected \"P1\", \"P2\", \"P3\" or \"P4\")",
                        rule.level
                    ),
                );
            }
            if rule.matchers.is_empty() {
                v.problem(
                    &format!("{key}.match"),
                    "a rule needs at least one matcher, e.g. match = [\"check=node_down\"]",
                );
            }
            let mut matchers = Vec::new();
            for (j, text) in rule.matchers.iter().enumerate() {
                match crate::silence::Matcher::parse(text) {
                    Ok(m) => matchers.push(m),
                    Err(e) => v.problem(&format!("{key}.match.{j}"), e),
                }
            }
            if let Some(level) = level
                && matchers.len() == rule.matchers.len()
            {
                severity.push(crate::correlate::SeverityRule { matchers, level });
            }
        }
        crate::correlate::Correlation {
            group_by: c.group_by.clone(),
            group_wait_ms: ms(group_wait),
            reopen_window_ms: ms(reopen_window),
            severity,
        }
    }
}

/// The `repost_interval` of an Alertmanager channel at `key` (default
/// [`crate::notify::alertmanager::DEFAULT_REPOST_INTERVAL`], at least
/// [`crate::notify::alertmanager::MIN_REPOST_INTERVAL`]).
fn repost_interval(v: &mut Validator<'_>, key: &str, raw: Option<&str>) -> Duration {
    use crate::notify::alertmanager::{DEFAULT_REPOST_INTERVAL, MIN_REPOST_INTERVAL};
    let key = format!("{key}.repost_interval");
    let raw = raw.unwrap_or(DEFAULT_REPOST_INTERVAL);
    let fallback = Duration::from_secs(60);
    let d = v.positive_duration(&key, raw, fallback);
    if d < MIN_REPOST_INTERVAL && settings::parse_duration(raw).is_some() {
        v.problem(
            &key,
            format!("{raw:?} is below the minimum of 1s (keep it below Alertmanager's resolve_timeout, default 5m)"),
        );
        return fallback;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::Tokens;

    #[test]
    fn tokens_per_agent_and_for_any_agent() {
        let t = Tokens::parse("# comment\nweb-1 aaa\n* fleet\n\n").expect("parses");
        assert!(t.accepts("web-1", "aaa"));
        assert!(t.accepts("WEB-1", "aaa"), "ids are case-insensitive");
        assert!(
            !t.accepts("web-1", "fleet"),
            "an id with its own token cannot be reached with the fleet token"
        );
        assert!(t.accepts("db-1", "fleet"));
        assert!(
            !t.accepts("db-1", "aaa"),
            "a token bound to web-1 is not db-1's"
        );
        assert!(!t.accepts("web-1", ""));
        assert!(!t.accepts("web-1", "aa"));
        assert!(format!("{t:?}").contains("redacted") && !format!("{t:?}").contains("aaa"));
    }

    #[test]
    fn alertmanager_channels_take_a_repost_interval_and_only_they_do() {
        use super::{RawConfig, RawWebhook};
        let hook = |kind: &str, repost: Option<&str>| RawWebhook {
            name: format!("{kind}-{}", repost.unwrap_or("default")),
            url: "http://127.0.0.1:9093".into(),
            kind: kind.into(),
            repost_interval: repost.map(str::to_owned),
            ..RawWebhook::default()
        };
        let mut raw = RawConfig::default();
        raw.notify.webhook = vec![
            hook("alertmanager", None),
            hook("alertmanager", Some("15s")),
        ];
        let cfg = raw
            .validate(&figment::Figment::new())
            .expect("valid config");
        let intervals: Vec<_> = cfg
            .webhooks
            .iter()
            .filter_map(|w| match &w.format {
                crate::notify::Format::Alertmanager(o) => Some(o.repost_interval),
                _ => None, // SLACK_WEBHOOK_URL / PAGERDUTY_KEY in the environment
            })
            .collect();
        assert_eq!(
            intervals,
            [
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(15)
            ]
        );
        let mut raw = RawConfig::default();
        raw.notify.webhook = vec![
            hook("alertmanager", Some("500ms")),
            hook("alertmanager", Some("0s")),
            hook("generic", Some("1m")),
        ];
        let err = raw
            .validate(&figment::Figment::new())
            .expect_err("refused")
            .to_string();
        for part in [
            "notify.webhook.0.repost_interval",
            "minimum of 1s",
            "notify.webhook.1.repost_interval",
            "greater than zero",
            "notify.webhook.2.repost_interval",
            "only for kind = \"alertmanager\"",
        ] {
            assert!(err.contains(part), "{part:?} missing in {err}");
        }
    }

    #[test]
    fn generic_webhooks_take_a_secret_file_and_only_they_do() {
        use super::{RawConfig, RawWebhook};
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "  s3cret-VALUE\n").expect("write");
        let empty = dir.path().join("empty.secret");
        std::fs::write(&empty, "\n").expect("write");
        let hook = |name: &str, kind: &str, file: &std::path::Path| RawWebhook {
            name: name.into(),
            url: "http://127.0.0.1:9099/hook".into(),
            kind: kind.into(),
            secret_file: Some(file.display().to_string()),
            routing_key_file: (kind == "pagerduty").then(|| secret.display().to_string()),
            ..RawWebhook::default()
        };
        let mut raw = RawConfig::default();
        raw.notify.webhook = vec![hook("signed", "generic", &secret)];
        let cfg = raw
            .validate(&figment::Figment::new())
            .expect("valid config");
        let signed = cfg.webhooks.iter().find(|w| w.name == "signed");
        let Some(crate::notify::Format::Generic(Some(key))) = signed.map(|w| &w.format) else {
            panic!("a signing secret: {:?}", cfg.webhooks)
        };
        assert_eq!(key.expose(), "s3cret-VALUE", "read at start, trimmed");
        assert!(
            !format!("{cfg:?}").contains("s3cret-VALUE"),
            "never in Debug output (logs)"
        );
        let mut raw = RawConfig::default();
        raw.notify.webhook = vec![
            hook("s", "slack", &secret),
            hook("p", "pagerduty", &secret),
            hook("e", "generic", &empty),
            hook("m", "generic", &dir.path().join("missing")),
        ];
        let err = raw
            .validate(&figment::Figment::new())
            .expect_err("refused")
            .to_string();
        for part in [
            "notify.webhook.0.secret_file",
            "only for kind = \"generic\"",
            "notify.webhook.1.secret_file",
            "notify.webhook.2.secret_file",
            "is empty",
            "notify.webhook.3.secret_file",
            "cannot read",
        ] {
            assert!(err.contains(part), "{part:?} missing in {err}");
        }
        assert!(!err.contains("s3cret-VALUE"), "{err}");
    }

    #[test]
    fn storm_windows_are_bounded_and_zero_only_without_a_guard() {
        let ok = load_text(
            "[notify]\nstorm_budget = 0\nstorm_window = \"0s\"\n\
             [[notify.webhook]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/a\"\nstorm_budget = 4\nstorm_window = \"24h\"\n\
             [[notify.webhook]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/b\"\n",
        )
        .expect("a guard off may have a 0s window");
        assert_eq!(
            ok.routing.storm.get("a").map(|s| s.window),
            Some(std::time::Duration::from_secs(86_400))
        );
        assert!(!ok.routing.storm.contains_key("b"), "no guard: no budget");
        let err = load_text(
            "[notify]\nstorm_budget = 0\nstorm_window = \"0s\"\n\
             [[notify.webhook]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/a\"\nstorm_budget = 4\n\
             [[notify.webhook]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/b\"\nstorm_window = \"25h\"\n",
        )
        .expect_err("invalid");
        for part in [
            "notify.webhook.0.storm_budget",
            "needs a window",
            "notify.webhook.1.storm_window",
            "maximum of 24h",
        ] {
            assert!(err.contains(part), "{part:?} missing in {err}");
        }
        assert!(!err.contains("`notify.storm_window`"), "{err}");
    }

    #[test]
    fn bad_token_files_name_the_line() {
        assert_eq!(
            Tokens::parse("web-1\n").err().as_deref(),
            Some("line 1: expected `AGENT_ID TOKEN` (or `* TOKEN`)")
        );
        assert!(Tokens::parse("# only comments\n").is_err());
        assert!(Tokens::parse("a b c\n").is_err());
        let all = Tokens::parse("a\nok t\nb c d\nok t\n")
            .err()
            .unwrap_or_default();
        assert!(
            all.contains("line 1") && all.contains("line 3") && all.contains("line 4"),
            "{all}"
        );
    }

    fn load_text(text: &str) -> Result<super::AggregatorConfig, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("aggregator.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        super::load(Some(&path)).map_err(|e| e.to_string())
    }

    #[test]
    fn correlation_defaults_and_rules() {
        let cfg = load_text("").expect("defaults");
        assert_eq!(cfg.correlation.group_by, vec!["check".to_owned()]);
        assert_eq!(cfg.correlation.group_wait_ms, 0);
        assert_eq!(cfg.correlation.reopen_window_ms, 300_000);
        let cfg = load_text(
            "[correlation]\ngroup_by = [\"service\", \"check\"]\ngroup_wait = \"30s\"\nreopen_window = \"0s\"\n\
             [[severity]]\nmatch = [\"check=node_down\", \"tier=critical\"]\nlevel = \"P1\"\n",
        )
        .expect("valid");
        assert_eq!(cfg.correlation.group_wait_ms, 30_000);
        assert_eq!(cfg.correlation.reopen_window_ms, 0);
        assert_eq!(cfg.correlation.severity.len(), 1);
        assert_eq!(
            cfg.correlation.severity[0].level,
            crate::model::Severity::P1
        );
    }

    #[test]
    fn bad_correlation_settings_are_all_reported_with_their_keys() {
        let err = load_text(
            "[correlation]\ngroup_by = [\"a b\"]\ngroup_wait = \"soon\"\n\
             [[severity]]\nmatch = [\"check=~([\"]\nlevel = \"P5\"\n[[severity]]\nlevel = \"P2\"\n",
        )
        .expect_err("invalid");
        for key in [
            "correlation.group_by.0",
            "correlation.group_wait",
            "severity.0.level",
            "severity.0.match.0",
            "severity.1.match",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn drill_channels_must_name_known_channels() {
        let hook = "[[notify.webhook]]\nname = \"drill-room\"\nurl = \"http://127.0.0.1:9/\"\n";
        let cfg = load_text("").expect("defaults");
        assert!(cfg.routing.drill_channels.is_empty(), "unset by default");
        let cfg =
            load_text(&format!("[drills]\nchannels = [\"drill-room\"]\n{hook}")).expect("valid");
        assert_eq!(cfg.routing.drill_channels, ["drill-room"]);
        let err = load_text(&format!(
            "[drills]\nchannels = [\"drill-room\", \"nope\"]\n{hook}"
        ))
        .expect_err("unknown");
        assert!(
            err.contains("drills.channels")
                && err.contains("\"nope\"")
                && err.contains("drill-room"),
            "{err}"
        );
        let err = load_text("[drills]\nchannels = []\n").expect_err("empty");
        assert!(err.contains("drills.channels"), "{err}");
    }
}
