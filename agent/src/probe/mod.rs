//! Active health checks: HTTP requests ([`http`]) and TCP connects ([`tcp`]) run against
//! endpoints the node should serve, plus the [`window`] that turns their results into an
//! error rate (%) and a P95 latency over a rolling period.
//!
//! This module owns the config of the checks (`[[http]]` and `[[tcp]]` tables: the raw
//! serde structs and their validation into typed [`HttpCheck`] / [`TcpCheck`]), the
//! one-line, redacted [`ProbeResult`] a probe yields, and running one probe. It does not
//! schedule probes (the caller runs each check every `interval`, one at a time), evaluate
//! thresholds (that is `evaluate`), or ship anything.
//!
//! Secrets: a check URL may carry `user:pass@` and tokens in its query string, and
//! request headers may carry `Authorization`. Neither ever reaches a [`ProbeResult`]
//! message, a validation message or a `Debug` output: URLs go through [`redact_url`],
//! header values are marked sensitive.

pub mod http;
pub mod tcp;
pub mod window;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{DURATION_FORM, Validator, parse_duration};

pub use http::HttpProbe;
pub use tcp::run_tcp;
pub use window::{MAX_WINDOW_ENTRIES, RollingWindow};

/// Seed (`HEALTH_CHECK_TIMEOUT`): how long one probe may take before it counts as failed.
/// The integrator passes the effective value as `default_timeout` to the validators.
pub const DEFAULT_TIMEOUT: &str = "10s";
/// Default time between two runs of one check.
pub const DEFAULT_INTERVAL: &str = "10s";
/// Default HTTP method.
pub const DEFAULT_METHOD: &str = "GET";
/// Default accepted statuses: success and redirects (a redirect not followed is an answer).
pub const DEFAULT_EXPECT_STATUS: &str = "200-399";
/// Default rolling window for the error rate and the P95 latency.
pub const DEFAULT_WINDOW: &str = "5m";
/// Seed (`ERROR_RATE_THRESHOLD`): error rate warning level, percent of probes in the window.
pub const ERROR_RATE_WARNING_PCT: f64 = 5.0;
/// Error rate critical level, percent of probes in the window.
pub const ERROR_RATE_CRITICAL_PCT: f64 = 20.0;
/// Seed: P95 latency warning level.
pub const LATENCY_WARNING: &str = "2s";
/// Seed: P95 latency critical level.
pub const LATENCY_CRITICAL: &str = "5s";
/// Methods a check may use.
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
/// Most redirects a check may follow.
pub const MAX_REDIRECTS: u32 = 20;
/// Longest check name, bytes.
pub const MAX_NAME_LEN: usize = 200;
/// Most bytes of a response body read (and matched against `body_contains` /
/// `body_regex`); reading stops there.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest [`ProbeResult::message`], bytes.
pub const MAX_MESSAGE_LEN: usize = 512;

/// One `[[http]]` table as written in TOML. Converted by [`RawHttpCheck::validate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttpCheck {
    /// Check name: required, unique among all checks, `[A-Za-z0-9_.:-]`, at most
    /// [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// `http://` or `https://` URL. May hold `user:pass@` (sent as Basic auth, never shown).
    pub url: String,
    /// One of [`METHODS`] (any case); default [`DEFAULT_METHOD`].
    pub method: String,
    /// Accepted statuses: `"200"`, `"2xx"` or `"200-299"`; default [`DEFAULT_EXPECT_STATUS`].
    pub expect_status: Vec<String>,
    /// The (first [`MAX_BODY_BYTES`] of the) body must contain this text.
    pub body_contains: Option<String>,
    /// The (first [`MAX_BODY_BYTES`] of the) body must match this `regex` crate pattern.
    pub body_regex: Option<String>,
    /// Probe timeout (duration); absent or blank = the `default_timeout` given to
    /// [`RawHttpCheck::validate`] (seed `HEALTH_CHECK_TIMEOUT`, [`DEFAULT_TIMEOUT`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Time between two runs (duration); default [`DEFAULT_INTERVAL`].
    pub interval: String,
    /// How long the check must keep failing before it fires (duration, default "0s").
    #[serde(rename = "for")]
    pub hold_for: String,
    /// Redirects followed: 0 (default) = a 3xx is the answer; N = follow up to N, and the
    /// response after the N-th hop is the answer even if it is a 3xx again.
    pub follow_redirects: u32,
    /// Verify the server certificate (default true). `false` accepts any certificate,
    /// expired or self-signed, for any name: the probe then proves only that something
    /// answers on that address, and a man in the middle sees headers and credentials.
    pub tls_verify: bool,
    /// Extra request headers (values are never logged).
    pub headers: BTreeMap<String, String>,
    /// Rolling window (duration) of the error rate and the P95; default [`DEFAULT_WINDOW`].
    pub window: String,
    /// Error rate warning level, percent 0–100; default `defaults.error_rate_warning`
    /// (`ERROR_RATE_THRESHOLD`, else [`ERROR_RATE_WARNING_PCT`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate_warning: Option<f64>,
    /// Error rate critical level, percent 0–100; default [`ERROR_RATE_CRITICAL_PCT`].
    pub error_rate_critical: f64,
    /// P95 latency warning level (duration); default [`LATENCY_WARNING`].
    pub latency_warning: String,
    /// P95 latency critical level (duration); default [`LATENCY_CRITICAL`].
    pub latency_critical: String,
}

impl Default for RawHttpCheck {
    fn default() -> Self {
        RawHttpCheck {
            name: String::new(),
            url: String::new(),
            method: DEFAULT_METHOD.to_owned(),
            expect_status: vec![DEFAULT_EXPECT_STATUS.to_owned()],
            body_contains: None,
            body_regex: None,
            timeout: None,
            interval: DEFAULT_INTERVAL.to_owned(),
            hold_for: "0s".to_owned(),
            follow_redirects: 0,
            tls_verify: true,
            headers: BTreeMap::new(),
            window: DEFAULT_WINDOW.to_owned(),
            error_rate_warning: None,
            error_rate_critical: ERROR_RATE_CRITICAL_PCT,
            latency_warning: LATENCY_WARNING.to_owned(),
            latency_critical: LATENCY_CRITICAL.to_owned(),
        }
    }
}

/// One `[[tcp]]` table as written in TOML. Converted by [`RawTcpCheck::validate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTcpCheck {
    /// Check name, same rules as [`RawHttpCheck::name`].
    pub name: String,
    /// `HOST:PORT` (`[v6]:PORT` for IPv6 literals); the host is resolved at each probe.
    pub address: String,
    /// Connect timeout (duration); absent or blank = `default_timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Time between two runs (duration); default [`DEFAULT_INTERVAL`].
    pub interval: String,
    /// How long the check must keep failing before it fires (duration, default "0s").
    #[serde(rename = "for")]
    pub hold_for: String,
}

impl Default for RawTcpCheck {
    fn default() -> Self {
        RawTcpCheck {
            name: String::new(),
            address: String::new(),
            timeout: None,
            interval: DEFAULT_INTERVAL.to_owned(),
            hold_for: "0s".to_owned(),
        }
    }
}

/// An inclusive range of accepted HTTP statuses, 100–599 (`"200"` is `200..=200`,
/// `"2xx"` is `200..=299`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    /// Lowest accepted status.
    pub low: u16,
    /// Highest accepted status.
    pub high: u16,
}

impl StatusRange {
    /// Parses `"200"`, `"2xx"` (any case) or `"200-299"`; `None` for anything else or
    /// outside 100–599.
    pub fn parse(raw: &str) -> Option<Self> {
        let s = raw.trim();
        let valid = |n: u16| (100..=599).contains(&n);
        let range = if let Some((lo, hi)) = s.split_once('-') {
            let low: u16 = lo.trim().parse().ok()?;
            let high: u16 = hi.trim().parse().ok()?;
            (low <= high).then_some(StatusRange { low, high })?
        } else if s.len() == 3 && s[1..].eq_ignore_ascii_case("xx") {
            let class: u16 = s[..1].parse().ok()?;
            StatusRange {
                low: class * 100,
                high: class * 100 + 99,
            }
        } else {
            let n: u16 = s.parse().ok()?;
            StatusRange { low: n, high: n }
        };
        (valid(range.low) && valid(range.high)).then_some(range)
    }

    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// A validated HTTP check. `Debug` shows the URL redacted and no header values.
#[derive(Clone)]
pub struct HttpCheck {
    /// Check name (validated, unique).
    pub name: String,
    /// URL, `http` or `https`, with a host. May hold credentials: show it only through
    /// [`redact_url`].
    pub url: reqwest::Url,
    /// Request method, one of [`METHODS`].
    pub method: reqwest::Method,
    /// Accepted statuses (at least one range).
    pub expect_status: Vec<StatusRange>,
    /// Text the body must contain.
    pub body_contains: Option<String>,
    /// Pattern the body must match.
    pub body_regex: Option<regex_lite::Regex>,
    /// Whole-probe timeout: connect, TLS, headers and the bounded body.
    pub timeout: Duration,
    /// Time between two runs.
    pub interval: Duration,
    /// How long the check must keep failing before it fires.
    pub hold_for: Duration,
    /// Redirects followed (0 = a 3xx is the answer).
    pub follow_redirects: u32,
    /// Verify the server certificate.
    pub tls_verify: bool,
    /// Extra request headers, values marked sensitive.
    pub headers: reqwest::header::HeaderMap,
    /// Rolling window of the error rate and the P95.
    pub window: Duration,
    /// Error rate warning level, percent 0–100.
    pub error_rate_warning: f64,
    /// Error rate critical level, percent 0–100, at least the warning level.
    pub error_rate_critical: f64,
    /// P95 latency warning level.
    pub latency_warning: Duration,
    /// P95 latency critical level, at least the warning level.
    pub latency_critical: Duration,
}

impl HttpCheck {
    /// The accepted statuses as written in messages, e.g. `"200-399"` or `"200, 204"`.
    pub fn expect_status_text(&self) -> String {
        self.expect_status
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for HttpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCheck")
            .field("name", &self.name)
            .field("url", &redact_url(self.url.as_str()))
            .field("method", &self.method)
            .field("expect_status", &self.expect_status_text())
            .field("body_contains", &self.body_contains)
            .field(
                "body_regex",
                &self.body_regex.as_ref().map(regex_lite::Regex::as_str),
            )
            .field("timeout", &self.timeout)
            .field("interval", &self.interval)
            .field("hold_for", &self.hold_for)
            .field("follow_redirects", &self.follow_redirects)
            .field("tls_verify", &self.tls_verify)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("window", &self.window)
            .field("error_rate_warning", &self.error_rate_warning)
            .field("error_rate_critical", &self.error_rate_critical)
            .field("latency_warning", &self.latency_warning)
            .field("latency_critical", &self.latency_critical)
            .finish()
    }
}

/// A validated TCP check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCheck {
    /// Check name (validated, unique).
    pub name: String,
    /// `HOST:PORT` as written (port 1–65535); resolved at each probe.
    pub address: String,
    /// Connect timeout, resolution included.
    pub timeout: Duration,
    /// Time between two runs.
    pub interval: Duration,
    /// How long the check must keep failing before it fires.
    pub hold_for: Duration,
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// The check passed.
    pub ok: bool,
    /// Time from the start of the probe to the full response (headers and bounded body)
    /// or to the connect; the timeout itself when the probe timed out.
    pub latency: Duration,
    /// One line, at most [`MAX_MESSAGE_LEN`] bytes, no control characters, no
    /// credentials, e.g. `HTTP 503 Service Unavailable (expected 200-399)`,
    /// `timed out after 2s`, `connection refused 127.0.0.1:9`.
    pub message: String,
    /// HTTP status of the answer (`None` for TCP and when no response came).
    pub status: Option<u16>,
}

impl ProbeResult {
    /// A result whose message is made one line, control-free and bounded.
    pub fn new(ok: bool, latency: Duration, message: &str, status: Option<u16>) -> Self {
        ProbeResult {
            ok,
            latency,
            message: one_line(message),
            status,
        }
    }
}

/// A probe could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The HTTP client could not be built (TLS backend setup).
    #[error("HTTP client for check {name}: {source}")]
    Client {
        /// The check.
        name: String,
        /// reqwest's error.
        source: reqwest::Error,
    },
}

/// The validated checks of a config.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// `[[http]]` checks, in config order.
    pub http: Vec<HttpCheck>,
    /// `[[tcp]]` checks, in config order.
    pub tcp: Vec<TcpCheck>,
}

/// Validates every `[[http]]` (keys `http.N`) and `[[tcp]]` (keys `tcp.N`) table and
/// checks that names are unique across both kinds. Checks with problems are left out;
/// the problems are in `v`.
pub fn validate_checks(
    v: &mut Validator<'_>,
    http: &[RawHttpCheck],
    tcp: &[RawTcpCheck],
    default_timeout: Duration,
    default_error_rate_warning: f64,
) -> Checks {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut out = Checks::default();
    let names = http
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("http.{i}"), c.name.as_str()))
        .chain(
            tcp.iter()
                .enumerate()
                .map(|(i, c)| (format!("tcp.{i}"), c.name.as_str())),
        );
    for (key, name) in names {
        if !name.is_empty() && !seen.insert(name) {
            v.problem(
                &format!("{key}.name"),
                format!("check name {name:?} is used twice (names must be unique across [[http]] and [[tcp]])"),
            );
        }
    }
    for (i, raw) in http.iter().enumerate() {
        if let Some(c) = raw.validate(
            v,
            &format!("http.{i}"),
            default_timeout,
            default_error_rate_warning,
        ) {
            out.http.push(c);
        }
    }
    for (i, raw) in tcp.iter().enumerate() {
        if let Some(c) = raw.validate(v, &format!("tcp.{i}"), default_timeout) {
            out.tcp.push(c);
        }
    }
    out
}

/// Tracks whether validation of one check found a problem (the shared [`Validator`]
/// has no count of its own).
struct Checked<'v, 'a> {
    v: &'v mut Validator<'a>,
    key: &'v str,
    bad: bool,
}

impl<'v, 'a> Checked<'v, 'a> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.bad = true;
        self.v.problem(&format!("{}.{field}", self.key), message);
    }

    fn name(&mut self, name: &str) {
        if name.is_empty() {
            self.problem("name", "a check needs a name (letters, digits, _ . : -)");
        } else if name.len() > MAX_NAME_LEN {
            self.problem(
                "name",
                format!("{} bytes, at most {MAX_NAME_LEN}", name.len()),
            );
        } else if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
        {
            self.problem(
                "name",
                format!(
                    "{:?} contains {c:?} (accepted: letters, digits, _ . : -, e.g. \"api-health\")",
                    one_line(name)
                ),
            );
        }
    }

    /// A positive duration no longer than [`crate::settings::MAX_DURATION`].
    /// A `for` duration (zero allowed).
    fn hold_for(&mut self, raw: &str) -> Option<Duration> {
        match parse_duration(raw) {
            Some(d) if d <= crate::settings::MAX_DURATION => Some(d),
            _ => {
                self.problem(
                    "for",
                    format!("invalid duration {raw:?} (expected {DURATION_FORM})"),
                );
                None
            }
        }
    }

    fn duration(&mut self, field: &str, raw: &str) -> Option<Duration> {
        match parse_duration(raw) {
            Some(d) if d > crate::settings::MAX_DURATION => {
                self.problem(
                    field,
                    format!("{raw:?} is longer than the longest accepted duration, 365d"),
                );
                None
            }
            Some(d) if d.is_zero() => {
                self.problem(field, format!("must be greater than zero, got {raw:?}"));
                None
            }
            Some(d) => Some(d),
            None => {
                self.problem(
                    field,
                    format!("invalid duration {raw:?} (expected {DURATION_FORM})"),
                );
                None
            }
        }
    }

    fn timeout(&mut self, raw: Option<&str>, default_timeout: Duration) -> Option<Duration> {
        match raw {
            Some(t) if !t.trim().is_empty() => self.duration("timeout", t),
            _ => Some(default_timeout),
        }
    }
}

impl RawHttpCheck {
    /// Converts this table (config key `key`, e.g. `http.0`) into an [`HttpCheck`],
    /// recording every problem as `v.problem("{key}.FIELD", …)` with the bad value and
    /// the accepted form. `default_timeout` is used when `timeout` is absent or blank
    /// (seed `HEALTH_CHECK_TIMEOUT`). Returns `None` when any problem was found. Name
    /// uniqueness is checked by [`validate_checks`].
    pub fn validate(
        &self,
        v: &mut Validator<'_>,
        key: &str,
        default_timeout: Duration,
        default_error_rate_warning: f64,
    ) -> Option<HttpCheck> {
        let error_rate_warning = self
            .error_rate_warning
            .unwrap_or(default_error_rate_warning);
        let mut c = Checked { v, key, bad: false };
        c.name(&self.name);

        let url = match reqwest::Url::parse(self.url.trim()) {
            _ if self.url.trim().is_empty() => {
                c.problem(
                    "url",
                    "a check needs a url (http://HOST[:PORT]/PATH or https://…)",
                );
                None
            }
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                c.problem(
                    "url",
                    format!(
                        "{:?} has scheme {:?} (expected http:// or https://, e.g. \"http://127.0.0.1:8080/health\")",
                        redact_url(&self.url),
                        u.scheme()
                    ),
                );
                None
            }
            Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                c.problem(
                    "url",
                    format!(
                        "{:?} has no host (expected http://HOST[:PORT]/PATH or https://…)",
                        redact_url(&self.url)
                    ),
                );
                None
            }
            Ok(u) => Some(u),
            Err(e) => {
                c.problem(
                    "url",
                    format!(
                        "invalid URL {:?}: {e} (expected http://HOST[:PORT]/PATH or https://…, e.g. \"http://127.0.0.1:8080/health\")",
                        redact_url(&self.url)
                    ),
                );
                None
            }
        };

        let upper = self.method.trim().to_ascii_uppercase();
        let method = if METHODS.contains(&upper.as_str()) {
            reqwest::Method::from_bytes(upper.as_bytes()).ok()
        } else {
            None
        };
        if method.is_none() {
            c.problem(
                "method",
                format!(
                    "invalid method {:?} (expected one of {})",
                    one_line(&self.method),
                    METHODS.join(", ")
                ),
            );
        }

        let mut expect_status = Vec::new();
        if self.expect_status.is_empty() {
            c.problem(
                "expect_status",
                "needs at least one status, e.g. [\"200-399\"]",
            );
        }
        for raw in &self.expect_status {
            match StatusRange::parse(raw) {
                Some(r) => expect_status.push(r),
                None => c.problem(
                    "expect_status",
                    format!(
                        "invalid status {:?} (expected a status \"200\", a class \"2xx\" or a range \"200-299\", within 100-599)",
                        one_line(raw)
                    ),
                ),
            }
        }

        let is_head = method.as_ref() == Some(&reqwest::Method::HEAD);
        if let Some(text) = &self.body_contains {
            if text.is_empty() {
                c.problem(
                    "body_contains",
                    "is empty: it would match every body (leave it out instead)",
                );
            } else if is_head {
                c.problem(
                    "body_contains",
                    "a HEAD response has no body (use method \"GET\")",
                );
            }
        }
        let body_regex = match &self.body_regex {
            None => None,
            Some(_) if is_head => {
                c.problem(
                    "body_regex",
                    "a HEAD response has no body (use method \"GET\")",
                );
                None
            }
            Some(pattern) => match regex_lite::Regex::new(pattern) {
                Ok(re) => Some(re),
                Err(e) => {
                    c.problem(
                        "body_regex",
                        format!(
                            "invalid regular expression {:?}: {} (syntax of the Rust regex-lite crate)",
                            one_line(pattern),
                            one_line(&e.to_string())
                        ),
                    );
                    None
                }
            },
        };

        let timeout = c.timeout(self.timeout.as_deref(), default_timeout);
        let interval = c.duration("interval", &self.interval);
        let hold_for = c.hold_for(&self.hold_for);
        if self.follow_redirects > MAX_REDIRECTS {
            c.problem(
                "follow_redirects",
                format!("{} is more than {MAX_REDIRECTS}", self.follow_redirects),
            );
        }
        let window = c.duration("window", &self.window);
        if let (Some(window), Some(interval)) = (window, interval)
            && window < interval
        {
            c.problem(
                "window",
                format!(
                    "{:?} is shorter than the interval {:?}: the window would hold at most one result",
                    self.window, self.interval
                ),
            );
        }

        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            let Ok(hname) = reqwest::header::HeaderName::from_bytes(name.as_bytes()) else {
                c.problem(
                    &field,
                    format!(
                        "invalid header name {:?} (expected a token such as \"X-Probe\")",
                        one_line(name)
                    ),
                );
                continue;
            };
            match reqwest::header::HeaderValue::from_str(value) {
                Ok(mut hv) => {
                    hv.set_sensitive(true);
                    headers.insert(hname, hv);
                }
                // The value may be a secret: it is not quoted.
                Err(_) => c.problem(
                    &field,
                    "invalid header value (visible ASCII and spaces only, no line breaks)",
                ),
            }
        }

        for (field, pct) in [
            ("error_rate_warning", error_rate_warning),
            ("error_rate_critical", self.error_rate_critical),
        ] {
            if !(pct.is_finite() && (0.0..=100.0).contains(&pct)) {
                c.problem(field, format!("{pct} is outside 0 to 100 (percent)"));
            }
        }
        if error_rate_warning > self.error_rate_critical {
            c.problem(
                "error_rate_warning",
                format!(
                    "warning level {} % is above the critical level {} %",
                    error_rate_warning, self.error_rate_critical
                ),
            );
        }
        let latency_warning = c.duration("latency_warning", &self.latency_warning);
        let latency_critical = c.duration("latency_critical", &self.latency_critical);
        if let (Some(w), Some(cr)) = (latency_warning, latency_critical)
            && w > cr
        {
            c.problem(
                "latency_warning",
                format!(
                    "warning level {:?} is above the critical level {:?}",
                    self.latency_warning, self.latency_critical
                ),
            );
        }

        if c.bad {
            return None;
        }
        Some(HttpCheck {
            name: self.name.clone(),
            url: url?,
            method: method?,
            expect_status,
            body_contains: self.body_contains.clone(),
            body_regex,
            timeout: timeout?,
            interval: interval?,
            hold_for: hold_for?,
            follow_redirects: self.follow_redirects,
            tls_verify: self.tls_verify,
            headers,
            window: window?,
            error_rate_warning,
            error_rate_critical: self.error_rate_critical,
            latency_warning: latency_warning?,
            latency_critical: latency_critical?,
        })
    }
}

impl RawTcpCheck {
    /// Converts this table (config key `key`, e.g. `tcp.0`) into a [`TcpCheck`],
    /// recording every problem under `{key}.FIELD`. `default_timeout` is used when
    /// `timeout` is absent or blank. Returns `None` when any problem was found.
    pub fn validate(
        &self,
        v: &mut Validator<'_>,
        key: &str,
        default_timeout: Duration,
    ) -> Option<TcpCheck> {
        let mut c = Checked { v, key, bad: false };
        c.name(&self.name);
        if !valid_host_port(self.address.trim()) {
            c.problem(
                "address",
                format!(
                    "invalid address {:?} (expected HOST:PORT with a port 1-65535, e.g. \"127.0.0.1:5432\", \"db.local:5432\" or \"[::1]:5432\")",
                    one_line(&self.address)
                ),
            );
        }
        let timeout = c.timeout(self.timeout.as_deref(), default_timeout);
        let interval = c.duration("interval", &self.interval);
        let hold_for = c.hold_for(&self.hold_for);
        if c.bad {
            return None;
        }
        Some(TcpCheck {
            name: self.name.clone(),
            address: self.address.trim().to_owned(),
            timeout: timeout?,
            interval: interval?,
            hold_for: hold_for?,
        })
    }
}

/// `HOST:PORT` with a non-empty host (no spaces, `/` or `@`) and a port 1–65535; IPv6
/// literals in brackets.
fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains(':')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    port_ok && host_ok
}

/// A URL fit for messages and logs: user info becomes `***@` and a query string
/// becomes `?***`. Text that does not parse as a URL is redacted the same way by
/// position (after `://` up to `@`, from `?`), so credentials never show.
pub fn redact_url(url: &str) -> String {
    let text = match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let had_userinfo = !u.username().is_empty() || u.password().is_some();
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("***"));
            }
            u.set_fragment(None);
            let s = u.to_string();
            if had_userinfo {
                s.replacen("://", "://***@", 1)
            } else {
                s
            }
        }
        Err(_) => {
            let mut s = url.split(['?', '#']).next().unwrap_or_default().to_owned();
            if url.contains('?') {
                s.push_str("?***");
            }
            let start = s.find("://").map_or(0, |i| i + 3);
            let end = s[start..].find('/').map_or(s.len(), |i| start + i);
            if let Some(at) = s[start..end].rfind('@') {
                s.replace_range(start..start + at, "***");
            }
            s
        }
    };
    one_line(&text)
}

/// `s` on one line: control characters become spaces, and it is cut (with `…`) to at
/// most [`MAX_MESSAGE_LEN`] bytes on a character boundary.
pub fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_MESSAGE_LEN {
        let ellipsis = "…";
        let mut cut = MAX_MESSAGE_LEN - ellipsis.len();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(ellipsis);
    }
    out
}

/// Installs the process-wide rustls crypto provider (ring) that reqwest's
/// `rustls-no-provider` build needs before a client is built. Idempotent: an already
/// installed provider is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::settings::{ConfigError, Problem};

    const DEFAULT_TIMEOUT_FOR_TESTS: Duration = Duration::from_secs(7);

    /// Validates `[[http]]` / `[[tcp]]` tables written in TOML; `Err` holds every problem.
    fn validate_toml(toml_text: &str) -> Result<Checks, Vec<Problem>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[serde(default)]
            http: Vec<RawHttpCheck>,
            #[serde(default)]
            tcp: Vec<RawTcpCheck>,
        }
        let doc: Doc = toml::from_str(toml_text).expect("TOML shape");
        let fig = figment::Figment::new();
        let mut v = Validator::new(&fig);
        let checks = validate_checks(&mut v, &doc.http, &doc.tcp, DEFAULT_TIMEOUT_FOR_TESTS, 5.0);
        match v.finish(checks) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid(p)) => Err(p),
            Err(other) => panic!("{other}"),
        }
    }

    fn problems(toml_text: &str) -> Vec<(String, String)> {
        validate_toml(toml_text)
            .expect_err("must be invalid")
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    /// The one problem of a config with one mistake.
    fn one_problem(toml_text: &str) -> (String, String) {
        let mut p = problems(toml_text);
        assert_eq!(p.len(), 1, "{p:?}");
        p.remove(0)
    }

    #[test]
    fn defaults_apply() {
        let c = validate_toml("[[http]]\nname = \"api\"\nurl = \"http://127.0.0.1:8080/health\"\n")
            .expect("valid");
        let h = &c.http[0];
        assert_eq!(h.method, reqwest::Method::GET);
        assert_eq!(
            h.expect_status,
            vec![StatusRange {
                low: 200,
                high: 399
            }]
        );
        assert_eq!(h.timeout, DEFAULT_TIMEOUT_FOR_TESTS);
        assert_eq!(h.interval, Duration::from_secs(10));
        assert_eq!(h.window, Duration::from_secs(300));
        assert_eq!((h.error_rate_warning, h.error_rate_critical), (5.0, 20.0));
        assert_eq!(
            (h.latency_warning, h.latency_critical),
            (Duration::from_secs(2), Duration::from_secs(5))
        );
        assert_eq!(h.follow_redirects, 0);
        assert!(h.tls_verify);
        assert!(h.body_contains.is_none() && h.body_regex.is_none());
    }

    #[test]
    fn a_full_check_validates() {
        let c = validate_toml(
            "[[http]]\nname = \"api:v1.health_x-y\"\nurl = \"https://u:p@example.test/h?x=1\"\n\
             method = \"patch\"\nexpect_status = [\"200\", \"2xx\", \"300-302\"]\n\
             body_contains = \"ok\"\nbody_regex = \"^o.$\"\ntimeout = \"1s\"\ninterval = \"30s\"\n\
             follow_redirects = 3\ntls_verify = false\nwindow = \"1h\"\n\
             error_rate_warning = 1.5\nerror_rate_critical = 1.5\n\
             latency_warning = \"100ms\"\nlatency_critical = \"1s\"\n\
             [http.headers]\nAuthorization = \"Bearer x\"\n\
             [[tcp]]\nname = \"db\"\naddress = \"[::1]:5432\"\n\
             [[tcp]]\nname = \"cache\"\naddress = \"localhost:6379\"\ntimeout = \"\"\ninterval = \"1s\"\n",
        )
        .expect("valid");
        let h = &c.http[0];
        assert_eq!(h.method, reqwest::Method::PATCH);
        assert_eq!(h.expect_status_text(), "200, 200-299, 300-302");
        assert_eq!(h.timeout, Duration::from_secs(1));
        assert_eq!(h.headers.len(), 1);
        assert!(h.headers["authorization"].is_sensitive());
        assert_eq!(c.tcp.len(), 2);
        assert_eq!(c.tcp[0].timeout, DEFAULT_TIMEOUT_FOR_TESTS);
        assert_eq!(
            c.tcp[1].timeout, DEFAULT_TIMEOUT_FOR_TESTS,
            "blank timeout = default"
        );
        assert_eq!(c.tcp[1].address, "localhost:6379");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err =
            toml::from_str::<RawHttpCheck>("name = \"a\"\nurl = \"http://x\"\nmethods = \"GET\"\n")
                .expect_err("unknown key");
        assert!(err.to_string().contains("methods"), "{err}");
        let err = toml::from_str::<RawTcpCheck>("name = \"a\"\nhost = \"x:1\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("host"), "{err}");
    }

    #[test]
    fn bad_url_scheme() {
        let (key, msg) = one_problem("[[http]]\nname = \"a\"\nurl = \"ftp://files.test/x\"\n");
        assert_eq!(key, "http.0.url");
        assert!(
            msg.contains("\"ftp\"") && msg.contains("http:// or https://"),
            "{msg}"
        );
        let (key, msg) = one_problem("[[http]]\nname = \"a\"\nurl = \"127.0.0.1:80/health\"\n");
        assert_eq!(key, "http.0.url");
        assert!(msg.contains("expected http://HOST"), "{msg}");
        let (key, _) = one_problem("[[http]]\nname = \"a\"\n");
        assert_eq!(key, "http.0.url");
    }

    #[test]
    fn url_problems_do_not_show_credentials() {
        for url in [
            "ftp://bob:hunter22@files.test/x?k=SECRETQ",
            "http://bob:hunter22@/x?k=SECRETQ",
            "http://bob:hunter22@ho st/?k=SECRETQ",
        ] {
            let (key, msg) = one_problem(&format!("[[http]]\nname = \"a\"\nurl = \"{url}\"\n"));
            assert_eq!(key, "http.0.url");
            assert!(
                !msg.contains("hunter22") && !msg.contains("SECRETQ"),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_status_forms() {
        for bad in [
            "2xxx", "99", "600", "abc", "300-200", "2x", "x00", "", "200-", "1xx-2xx",
        ] {
            let (key, msg) = one_problem(&format!(
                "[[http]]\nname = \"a\"\nurl = \"http://h\"\nexpect_status = [\"200\", \"{bad}\"]\n"
            ));
            assert_eq!(key, "http.0.expect_status");
            assert!(
                msg.contains(&format!("{bad:?}")) && msg.contains("\"2xx\""),
                "{msg}"
            );
        }
        let (key, _) =
            one_problem("[[http]]\nname = \"a\"\nurl = \"http://h\"\nexpect_status = []\n");
        assert_eq!(key, "http.0.expect_status");
        assert_eq!(
            StatusRange::parse("5XX"),
            Some(StatusRange {
                low: 500,
                high: 599
            })
        );
        assert_eq!(
            StatusRange::parse(" 204 "),
            Some(StatusRange {
                low: 204,
                high: 204
            })
        );
    }

    #[test]
    fn bad_regex_is_named() {
        let (key, msg) =
            one_problem("[[http]]\nname = \"a\"\nurl = \"http://h\"\nbody_regex = \"(unclosed\"\n");
        assert_eq!(key, "http.0.body_regex");
        assert!(
            msg.contains("\"(unclosed\"") && msg.contains("regex"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn names_are_checked_and_unique_across_kinds() {
        let (key, msg) = one_problem("[[http]]\nname = \"a b\"\nurl = \"http://h\"\n");
        assert_eq!(key, "http.0.name");
        assert!(msg.contains("' '"), "{msg}");
        let (key, _) = one_problem(&format!(
            "[[tcp]]\nname = \"{}\"\naddress = \"h:1\"\n",
            "x".repeat(201)
        ));
        assert_eq!(key, "tcp.0.name");
        let (key, _) = one_problem("[[tcp]]\naddress = \"h:1\"\n");
        assert_eq!(key, "tcp.0.name");
        let (key, msg) = one_problem(
            "[[http]]\nname = \"api\"\nurl = \"http://h\"\n[[tcp]]\nname = \"db\"\naddress = \"h:1\"\n\
             [[tcp]]\nname = \"api\"\naddress = \"h:2\"\n",
        );
        assert_eq!(key, "tcp.1.name");
        assert!(msg.contains("\"api\"") && msg.contains("twice"), "{msg}");
    }

    #[test]
    fn tcp_addresses() {
        for bad in [
            "localhost",
            ":80",
            "h:0",
            "h:65536",
            "::1:80",
            "[::1]",
            "[nothost]:80",
            "a b:1",
            "h:port",
            "user@h:1",
        ] {
            let (key, msg) = one_problem(&format!("[[tcp]]\nname = \"t\"\naddress = \"{bad}\"\n"));
            assert_eq!(key, "tcp.0.address", "{bad}");
            assert!(msg.contains("HOST:PORT"), "{msg}");
        }
        for good in ["127.0.0.1:1", "[::1]:65535", "db-1.internal_x:5432"] {
            validate_toml(&format!("[[tcp]]\nname = \"t\"\naddress = \"{good}\"\n")).expect(good);
        }
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let p = problems(
            "[[http]]\nname = \"\"\nurl = \"gopher://h\"\nmethod = \"FETCH\"\nexpect_status = [\"2yy\"]\n\
             body_regex = \"[\"\ntimeout = \"soon\"\ninterval = \"0s\"\nwindow = \"5 minutes\"\n\
             error_rate_warning = 150.0\nerror_rate_critical = -1.0\n\
             latency_warning = \"2\"\nlatency_critical = \"1000d\"\n\
             [http.headers]\n\"bad header\" = \"x\"\nX-Ok = \"SECRETVAL\\nx\"\n\
             [[tcp]]\nname = \"t\"\naddress = \"nope\"\ntimeout = \"0s\"\ninterval = \"x\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "http.0.name",
            "http.0.url",
            "http.0.method",
            "http.0.expect_status",
            "http.0.body_regex",
            "http.0.timeout",
            "http.0.interval",
            "http.0.window",
            "http.0.error_rate_warning",
            "http.0.error_rate_critical",
            "http.0.latency_warning",
            "http.0.latency_critical",
            "http.0.headers.bad header",
            "http.0.headers.X-Ok",
            "tcp.0.address",
            "tcp.0.timeout",
            "tcp.0.interval",
        ] {
            assert!(keys.contains(&key), "{key} missing from {p:#?}");
        }
        let msg = |key: &str| &p.iter().find(|(k, _)| k == key).expect(key).1;
        assert!(
            msg("http.0.method").contains("\"FETCH\"")
                && msg("http.0.method").contains("GET, HEAD")
        );
        assert!(
            msg("http.0.timeout").contains("\"soon\"") && msg("http.0.timeout").contains("\"5s\"")
        );
        assert!(msg("http.0.interval").contains("greater than zero"));
        assert!(msg("http.0.latency_critical").contains("365d"));
        assert!(msg("http.0.error_rate_warning").contains("150"));
        assert!(
            !msg("http.0.headers.X-Ok").contains("SECRETVAL"),
            "header values are not quoted"
        );
    }

    #[test]
    fn inconsistent_levels_and_window() {
        let base = "[[http]]\nname = \"a\"\nurl = \"http://h\"\n";
        let (key, _) = one_problem(&format!("{base}error_rate_warning = 30.0\n"));
        assert_eq!(key, "http.0.error_rate_warning");
        let (key, _) = one_problem(&format!("{base}latency_warning = \"6s\"\n"));
        assert_eq!(key, "http.0.latency_warning");
        let (key, msg) = one_problem(&format!("{base}interval = \"1m\"\nwindow = \"30s\"\n"));
        assert_eq!(key, "http.0.window");
        assert!(msg.contains("\"30s\"") && msg.contains("\"1m\""), "{msg}");
    }

    #[test]
    fn head_has_no_body_to_check() {
        let (key, _) = one_problem(
            "[[http]]\nname = \"a\"\nurl = \"http://h\"\nmethod = \"HEAD\"\nbody_contains = \"x\"\n",
        );
        assert_eq!(key, "http.0.body_contains");
        let (key, _) = one_problem(
            "[[http]]\nname = \"a\"\nurl = \"http://h\"\nmethod = \"HEAD\"\nbody_regex = \"x\"\n",
        );
        assert_eq!(key, "http.0.body_regex");
    }

    #[test]
    fn redaction_and_one_line() {
        assert_eq!(
            redact_url("https://u:p@h.test:8443/a/b?token=x#frag"),
            "https://***@h.test:8443/a/b?***"
        );
        assert_eq!(redact_url("http://h/ok"), "http://h/ok");
        assert_eq!(redact_url("/next?sig=abc"), "/next?***");
        assert_eq!(redact_url("http://u:p@ho st/x?q"), "http://***@ho st/x?***");
        assert_eq!(one_line("a\nb\tc\u{7}"), "a b c ");
        let long = one_line(&"é".repeat(400));
        assert!(
            long.len() <= MAX_MESSAGE_LEN && long.ends_with('…'),
            "{}",
            long.len()
        );
    }
}
