//! Routing: which channels an incident's page goes to, when it is repeated, whom it
//! escalates to, and the per-channel storm budget. Pure: config shapes, validation and
//! decisions from (incident fields, severity, time) — no I/O, no clock.
//!
//! Owns the decisions only. The store records them (`store::paging`: which routes an
//! incident took, held triggers, escalations) and the sweep task (`escalate`) runs the
//! timers. Without any `[[route]]`, every page goes to every channel, as before routes
//! existed.
//!
//! - **Routes** (`[[route]]`) are tried in order; the first that matches wins, unless it
//!   says `continue = true`, then the next ones are tried too. A route matches an
//!   incident when its severity is in `severity` (empty: any) and every matcher of
//!   `match` holds on the incident's fields (`node`, `check`, `severity`, labels — the
//!   fields silences match, [`crate::silence::fields`]). An incident no route matches
//!   goes to every channel, so a page is never lost to a gap in the routes; a route with
//!   `channels = []` records the incident and pages no one.
//! - **Response targets** (`[response_targets]`): how long an incident of each severity
//!   may stay unacknowledged (seed: P1 immediately, P2 30 min, P3 2 h, P4 next business
//!   day). Past it, the page escalates to the route's `escalate_to` channels.
//! - **Storm budget**: at most `storm_budget` triggers per channel per `storm_window`;
//!   see [`Storm`].
//! - **Remediate first**: a route with `remediate = "HOOK"` runs that `[[hook]]` before
//!   its incident is paged and pages only if the incident still fires `verify_after`
//!   after the hook succeeded (`store::hooks` holds the page).
//! - **Drills** (incidents with the label `drill=true`, see `crate::drill`) never take
//!   the P1 path unless their drill asked for it (`tocsin drill --page-real`): with
//!   `[drills] channels` they go to those channels only (no escalation, no repeat);
//!   without, they take the real routes as if their severity were at most P2 — matched,
//!   escalated (P2's response target) and storm-guarded as a P2 — while the incident
//!   keeps its real severity. See [`DrillPaging`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_agent::settings::Validator;

use crate::model::Severity;
use crate::silence::Matcher;

/// Default triggers per channel per storm window (`notify.storm_budget`).
pub const DEFAULT_STORM_BUDGET: u32 = 20;
/// Default storm window (`notify.storm_window`).
pub const DEFAULT_STORM_WINDOW: &str = "5m";
/// Default period of the paging sweep (repeats, escalations, storm summaries).
pub const DEFAULT_PAGING_SWEEP_INTERVAL: &str = "1s";
/// Default `verify_after` of a route with `remediate`.
pub const DEFAULT_VERIFY_AFTER: &str = "30s";
/// Shortest `paging_sweep_interval`: faster sweeps only load the store.
pub const MIN_PAGING_SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `paging_sweep_interval`: repeats, escalations and storm summaries are late by
/// up to one sweep.
pub const MAX_PAGING_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest `repeat_interval` of a route: a reminder more often than this is a storm of
/// its own.
pub const MIN_REPEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Longest storm window (`storm_window`): a guard that holds pages for more than a day
/// hides an incident.
pub const MAX_STORM_WINDOW: Duration = Duration::from_secs(86_400);
/// Written in `[response_targets]` for "09:00 on the next weekday".
pub const NEXT_BUSINESS_DAY: &str = "next-business-day";
/// When a business day starts, in the configured time zone: 09:00.
pub const BUSINESS_DAY_START: Duration = Duration::from_secs(9 * 3600);

const DAY_MS: i64 = 86_400_000;

/// One `[[route]]` as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoute {
    /// Name shown on the timeline (default `route.<index>`).
    pub name: Option<String>,
    /// Severities this route takes (`"P1"` … `"P4"`, any case); empty: any.
    pub severity: Vec<String>,
    /// Matchers on the incident's fields (`service=~web.*`, `node!=db-1`, …); all must hold.
    #[serde(rename = "match")]
    pub matchers: Vec<String>,
    /// Channel names (of `[[notify.webhook]]`, or `console`) that get the page.
    pub channels: Vec<String>,
    /// Channels paged when the incident stays unacknowledged past its response target.
    pub escalate_to: Vec<String>,
    /// Re-notify the route's channels this often while the incident is open and
    /// unacknowledged (a duration, at least 10s); unset: once.
    #[serde(deserialize_with = "crate::config::opt_duration_text", default)]
    pub repeat_interval: Option<String>,
    /// Keep trying the next routes after this one matched.
    #[serde(rename = "continue")]
    pub continue_matching: bool,
    /// Name of a `[[hook]]` to run before paging: the page is held while it runs and
    /// `verify_after` after it succeeded, and goes out only if the incident still fires
    /// (see `store::hooks`).
    pub remediate: Option<String>,
    /// With `remediate`: how long after the hook succeeded the incident must still fire
    /// to be paged (a duration; default [`DEFAULT_VERIFY_AFTER`]).
    #[serde(deserialize_with = "crate::config::opt_duration_text", default)]
    pub verify_after: Option<String>,
}

/// `[response_targets]` as written. Keys `P1` … `P4` (or `p1` … `p4`: environment
/// variables arrive lower-cased, and override the file's upper-case keys) and
/// `timezone`; any other key is refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct RawResponseTargets {
    /// P1 target: a duration or `next-business-day`.
    #[serde(rename = "P1")]
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub p1: String,
    /// P2 target.
    #[serde(rename = "P2")]
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub p2: String,
    /// P3 target.
    #[serde(rename = "P3")]
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub p3: String,
    /// P4 target.
    #[serde(rename = "P4")]
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub p4: String,
    /// UTC offset of business days (`"+08:00"`, `"-05:00"`, `"UTC"`).
    pub timezone: String,
}

impl TryFrom<BTreeMap<String, String>> for RawResponseTargets {
    type Error = String;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, String> {
        let mut t = RawResponseTargets::default();
        // Key order puts `P1` before `p1`: the lower-cased environment value wins.
        for (key, value) in map {
            let slot = match key.as_str() {
                "P1" | "p1" => &mut t.p1,
                "P2" | "p2" => &mut t.p2,
                "P3" | "p3" => &mut t.p3,
                "P4" | "p4" => &mut t.p4,
                "timezone" => &mut t.timezone,
                other => {
                    return Err(format!(
                        "unknown field `{other}`, expected `P1`, `P2`, `P3`, `P4` or `timezone`"
                    ));
                }
            };
            *slot = value;
        }
        Ok(t)
    }
}

impl Default for RawResponseTargets {
    fn default() -> Self {
        RawResponseTargets {
            p1: "0s".into(),
            p2: "30m".into(),
            p3: "2h".into(),
            p4: NEXT_BUSINESS_DAY.into(),
            timezone: "UTC".into(),
        }
    }
}

/// How long an incident may stay unacknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseTarget {
    /// This long after it triggered (zero: at once).
    After(Duration),
    /// 09:00 ([`BUSINESS_DAY_START`]) on the first Monday-to-Friday day after the day it
    /// triggered, in the configured time zone. No holiday calendar.
    NextBusinessDay,
}

/// The response target of each severity, and the time zone of business days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseTargets {
    /// P1 to P4, in order.
    pub by_severity: [ResponseTarget; 4],
    /// Offset of the business time zone from UTC, seconds (east positive).
    pub utc_offset_s: i32,
}

impl Default for ResponseTargets {
    /// The seed's: P1 immediately, P2 30 minutes, P3 2 hours, P4 next business day (UTC).
    fn default() -> Self {
        ResponseTargets {
            by_severity: [
                ResponseTarget::After(Duration::ZERO),
                ResponseTarget::After(Duration::from_secs(30 * 60)),
                ResponseTarget::After(Duration::from_secs(2 * 3600)),
                ResponseTarget::NextBusinessDay,
            ],
            utc_offset_s: 0,
        }
    }
}

impl ResponseTargets {
    /// The target of `severity`.
    pub fn of(&self, severity: Severity) -> ResponseTarget {
        self.by_severity[severity_index(severity)]
    }

    /// When an incident of `severity` that triggered at `triggered_ms` (Unix ms) must be
    /// acknowledged by (Unix ms).
    pub fn deadline(&self, severity: Severity, triggered_ms: i64) -> i64 {
        match self.of(severity) {
            ResponseTarget::After(d) => {
                triggered_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            }
            ResponseTarget::NextBusinessDay => next_business_day(triggered_ms, self.utc_offset_s),
        }
    }

    /// The target of `severity` as written in the config (`"30m"`, `"next-business-day"`),
    /// for timeline notes.
    pub fn describe(&self, severity: Severity) -> String {
        match self.of(severity) {
            ResponseTarget::After(d) => tocsin_agent::settings::format_duration(d),
            ResponseTarget::NextBusinessDay => NEXT_BUSINESS_DAY.to_owned(),
        }
    }
}

fn severity_index(s: Severity) -> usize {
    match s {
        Severity::P1 => 0,
        Severity::P2 => 1,
        Severity::P3 => 2,
        Severity::P4 => 3,
    }
}

/// 09:00 local time on the first weekday (Monday to Friday) strictly after the local day
/// of `at_ms`, where local time is UTC + `utc_offset_s`; returned as Unix ms. A Friday
/// evening or a weekend gives Monday 09:00; a Tuesday 03:00 gives Wednesday 09:00.
pub fn next_business_day(at_ms: i64, utc_offset_s: i32) -> i64 {
    let offset_ms = i64::from(utc_offset_s) * 1000;
    let day = at_ms.saturating_add(offset_ms).div_euclid(DAY_MS);
    // Day 0, 1970-01-01, was a Thursday; (day + 3) mod 7 counts from Monday = 0.
    let mut next = day + 1;
    while (next + 3).rem_euclid(7) >= 5 {
        next += 1;
    }
    let start_ms = i64::try_from(BUSINESS_DAY_START.as_millis()).unwrap_or(0);
    next * DAY_MS + start_ms - offset_ms
}

/// A channel's storm budget: at most `budget` triggers per `window`; repeats only use
/// what triggers left (they never take a trigger's place and are held first). P1
/// triggers are never held, though they spend the budget. Windows are fixed, aligned to
/// multiples of `window` since the Unix epoch; triggers beyond the budget are held, and
/// one summary per channel goes out when the window turns (none to PagerDuty when every
/// held incident resolved meanwhile). Their acknowledge and resolve are not sent either
/// (the channel never got them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storm {
    /// Triggers per window, at least 1.
    pub budget: u32,
    /// Window length.
    pub window: Duration,
}

impl Storm {
    /// Window length, ms (at least 1).
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// Start of the window holding `now` (Unix ms).
    pub fn window_start(&self, now: i64) -> i64 {
        now - now.rem_euclid(self.window_ms())
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name for the timeline.
    pub name: String,
    /// Severities taken; empty: any.
    pub severities: Vec<Severity>,
    /// All must match.
    pub matchers: Vec<Matcher>,
    /// Channels paged.
    pub channels: Vec<String>,
    /// Channels paged past the response target.
    pub escalate_to: Vec<String>,
    /// Re-notification period while open and unacknowledged.
    pub repeat_interval: Option<Duration>,
    /// Keep matching after this route.
    pub continue_matching: bool,
    /// Hook run before paging, and how long after it succeeded the incident must still
    /// fire to be paged.
    pub remediate: Option<(String, Duration)>,
}

impl Route {
    /// Whether an incident of `severity` with `fields` (see [`crate::silence::fields`])
    /// takes this route.
    pub fn matches(&self, fields: &BTreeMap<String, String>, severity: Severity) -> bool {
        (self.severities.is_empty() || self.severities.contains(&severity))
            && self.matchers.iter().all(|m| m.matches(fields))
    }
}

/// Routing config (validated): routes, response targets, storm budgets, sweep period.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Routes in order.
    pub routes: Vec<Route>,
    /// Response targets per severity.
    pub targets: ResponseTargets,
    /// Storm budget per channel name; a channel without one is unlimited.
    pub storm: BTreeMap<String, Storm>,
    /// Period of the paging sweep.
    pub sweep_interval: Duration,
    /// The `[[hook]]`s: which incidents start them (`on`), what routes remediate with.
    pub hooks: Vec<crate::hook::Hook>,
    /// `[drills] channels`: where drill incidents are paged instead of the routes
    /// (unless their drill pages real); empty: not set, drills take the real routes at
    /// most as a P2.
    pub drill_channels: Vec<String>,
}

impl Default for Routing {
    /// No routes (every channel), the seed's targets, no storm budget, 1 s sweeps.
    fn default() -> Self {
        Routing {
            routes: Vec::new(),
            targets: ResponseTargets::default(),
            storm: BTreeMap::new(),
            sweep_interval: Duration::from_secs(1),
            hooks: Vec::new(),
            drill_channels: Vec::new(),
        }
    }
}

/// How an incident is paged with respect to drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillPaging {
    /// Not a drill: its routes at its severity.
    Real,
    /// A drill: `[drills] channels` if set, else the routes at most as a P2.
    Drill,
    /// A drill run with `--page-real`: its routes at its real severity, P1 included.
    DrillPageReal,
}

/// Name of the plan that sends drill incidents to `[drills] channels`.
pub const DRILL_ROUTE: &str = "drills";

/// Where one route sends an incident: the decision the store records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Index of the `[[route]]`, or `None` when no route applies (every channel).
    pub index: Option<usize>,
    /// Route name, or `default` when no route applies.
    pub name: String,
    /// Channels paged now.
    pub channels: Vec<String>,
    /// Channels paged past the response target.
    pub escalate_to: Vec<String>,
    /// Re-notification period.
    pub repeat_interval: Option<Duration>,
    /// Hook to run before paging, and the verification delay (the route's `remediate`).
    pub remediate: Option<(String, Duration)>,
}

/// Routing with the channel list: what the store consults when it pages.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Every channel, in dispatcher order (`console` first when on).
    pub channels: Vec<String>,
    /// The routing config.
    pub routing: Routing,
}

impl Router {
    /// Every page to every one of `channels`, no storm budget: the behaviour without
    /// routing config.
    pub fn every_channel(channels: Vec<String>) -> Self {
        Router {
            channels,
            routing: Routing::default(),
        }
    }

    /// The routes an incident of `severity` with `fields` takes, in order: the first
    /// matching route, and the ones after it while matched routes say `continue`. No
    /// routes configured, or none matching: one plan to every channel.
    pub fn plan(&self, fields: &BTreeMap<String, String>, severity: Severity) -> Vec<Planned> {
        let mut out = Vec::new();
        for (i, r) in self.routing.routes.iter().enumerate() {
            if !r.matches(fields, severity) {
                continue;
            }
            out.push(Planned {
                index: Some(i),
                name: r.name.clone(),
                channels: r.channels.clone(),
                escalate_to: r.escalate_to.clone(),
                repeat_interval: r.repeat_interval,
                remediate: r.remediate.clone(),
            });
            if !r.continue_matching {
                break;
            }
        }
        if out.is_empty() {
            out.push(Planned {
                index: None,
                name: "default".into(),
                channels: self.channels.clone(),
                escalate_to: Vec::new(),
                repeat_interval: None,
                remediate: None,
            });
        }
        out
    }

    /// The severity an incident of `severity` is paged as: a drill (`DrillPaging::Drill`)
    /// at most as P2, so it never takes the P1 path (P1 routes, P1 response target, the
    /// storm guard's P1 exemption); otherwise `severity` itself.
    pub fn paging_severity(&self, severity: Severity, drill: DrillPaging) -> Severity {
        if drill == DrillPaging::Drill && severity == Severity::P1 {
            Severity::P2
        } else {
            severity
        }
    }

    /// [`Router::plan`] for an incident that may be a drill: a drill
    /// ([`DrillPaging::Drill`]) goes to `[drills] channels` only when they are set (one
    /// plan named [`DRILL_ROUTE`], no escalation, no repeat, no remediation), else takes
    /// the routes of [`Router::paging_severity`] (its `severity` field read as that
    /// severity too); anything else plans as [`Router::plan`].
    pub fn plan_for(
        &self,
        fields: &BTreeMap<String, String>,
        severity: Severity,
        drill: DrillPaging,
    ) -> Vec<Planned> {
        if drill != DrillPaging::Drill {
            return self.plan(fields, severity);
        }
        if !self.routing.drill_channels.is_empty() {
            return vec![Planned {
                index: None,
                name: DRILL_ROUTE.into(),
                channels: self.routing.drill_channels.clone(),
                escalate_to: Vec::new(),
                repeat_interval: None,
                remediate: None,
            }];
        }
        let as_sev = self.paging_severity(severity, drill);
        let mut fields = fields.clone();
        fields.insert("severity".into(), as_sev.as_str().to_owned());
        self.plan(&fields, as_sev)
    }

    /// The storm budget of `channel`, if it has one.
    pub fn storm(&self, channel: &str) -> Option<Storm> {
        self.routing.storm.get(channel).copied()
    }

    /// Whether `channel` exists (has a dispatcher).
    pub fn has_channel(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| c == channel)
    }
}

/// Parses a UTC offset: `UTC`, `Z`, `+HH:MM`, `-HH:MM`, `+HH` (at most 14 h); seconds.
pub fn parse_utc_offset(raw: &str) -> Option<i32> {
    let s = raw.trim();
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let all_digits =
        |t: &str| !t.is_empty() && t.len() <= 2 && t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(h) || !all_digits(m) {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 || h * 60 + m > 14 * 60 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

/// Validates `[[route]]`, `[response_targets]` and `paging_sweep_interval` (100ms to
/// 60s) against the known channel names, recording every problem in `v` (keys
/// `route.<index>.<field>`, 0-based like `notify.webhook.<index>`); `storm` is the
/// per-channel budgets already validated with the channels; `hook_names` the names of
/// every `[[hook]]` written, which a route's `remediate` may name (a route naming a hook
/// that is itself invalid gets no second problem of its own). Route severities are read
/// in any case (`"p1"` is P1), like `[response_targets]` keys. The returned `hooks` are
/// empty: the caller sets the validated ones.
pub fn validate(
    v: &mut Validator<'_>,
    raw_routes: &[RawRoute],
    raw_targets: &RawResponseTargets,
    sweep_interval: &str,
    channels: &[String],
    storm: BTreeMap<String, Storm>,
    hook_names: &[&str],
) -> Routing {
    // Each name once, in order (a name configured twice is reported where it is defined).
    let mut known: Vec<&str> = Vec::new();
    for c in channels {
        if !known.contains(&c.as_str()) {
            known.push(c);
        }
    }
    let mut routes = Vec::new();
    for (i, r) in raw_routes.iter().enumerate() {
        let key = format!("route.{i}");
        let mut severities = Vec::new();
        for s in &r.severity {
            match Severity::parse(&s.trim().to_ascii_uppercase()) {
                Some(sev) => severities.push(sev),
                None => v.problem(
                    &format!("{key}.severity"),
                    format!("invalid severity {s:?} (expected \"P1\", \"P2\", \"P3\" or \"P4\")"),
                ),
            }
        }
        let mut matchers = Vec::new();
        for m in &r.matchers {
            match Matcher::parse(m) {
                Ok(m) => matchers.push(m),
                Err(e) => v.problem(&format!("{key}.match"), e),
            }
        }
        for (field, names) in [("channels", &r.channels), ("escalate_to", &r.escalate_to)] {
            for name in names {
                if !channels.contains(name) {
                    v.problem(
                        &format!("{key}.{field}"),
                        format!(
                            "route {i} names unknown channel {name:?} (channels: {})",
                            if known.is_empty() {
                                "none configured".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
        }
        let repeat_interval = r.repeat_interval.as_deref().map(|raw| {
            let key = format!("{key}.repeat_interval");
            let fallback = Duration::from_secs(3600);
            let d = v.duration(&key, raw, fallback);
            if d < MIN_REPEAT_INTERVAL {
                v.problem(
                    &key,
                    format!("{raw:?} is below the minimum of 10s (a reminder that often is a storm of its own)"),
                );
                return fallback;
            }
            d
        });
        let verify_after = v.positive_duration(
            &format!("{key}.verify_after"),
            r.verify_after.as_deref().unwrap_or(DEFAULT_VERIFY_AFTER),
            Duration::from_secs(30),
        );
        if r.verify_after.is_some() && r.remediate.is_none() {
            v.problem(&format!("{key}.verify_after"), "only with `remediate`");
        }
        let remediate = r.remediate.as_ref().and_then(|h| {
            if hook_names.contains(&h.as_str()) {
                Some((h.clone(), verify_after))
            } else {
                v.problem(
                    &format!("{key}.remediate"),
                    format!(
                        "route {i} names unknown hook {h:?} (hooks: {})",
                        if hook_names.is_empty() {
                            "none configured".to_owned()
                        } else {
                            hook_names.join(", ")
                        }
                    ),
                );
                None
            }
        });
        routes.push(Route {
            name: r
                .name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| key.clone()),
            severities,
            matchers,
            channels: r.channels.clone(),
            escalate_to: r.escalate_to.clone(),
            repeat_interval,
            continue_matching: r.continue_matching,
            remediate,
        });
    }
    let defaults = ResponseTargets::default();
    let mut by_severity = defaults.by_severity;
    for (i, (name, raw)) in [
        ("P1", &raw_targets.p1),
        ("P2", &raw_targets.p2),
        ("P3", &raw_targets.p3),
        ("P4", &raw_targets.p4),
    ]
    .into_iter()
    .enumerate()
    {
        if raw.trim() == NEXT_BUSINESS_DAY {
            by_severity[i] = ResponseTarget::NextBusinessDay;
        } else if tocsin_agent::settings::parse_duration(raw).is_some() {
            by_severity[i] = ResponseTarget::After(v.duration(
                &format!("response_targets.{name}"),
                raw,
                Duration::ZERO,
            ));
        } else {
            v.problem(
                &format!("response_targets.{name}"),
                format!(
                    "invalid response target {raw:?} (expected a duration such as \"0s\" or \
                     \"30m\", or \"{NEXT_BUSINESS_DAY}\")"
                ),
            );
        }
    }
    let utc_offset_s = parse_utc_offset(&raw_targets.timezone).unwrap_or_else(|| {
        v.problem(
            "response_targets.timezone",
            format!(
                "invalid time zone {:?} (expected a UTC offset such as \"+08:00\", \"-05:00\" \
                 or \"UTC\")",
                raw_targets.timezone
            ),
        );
        0
    });
    let raw_sweep = sweep_interval;
    let mut sweep_interval = v.duration("paging_sweep_interval", raw_sweep, Duration::from_secs(1));
    if tocsin_agent::settings::parse_duration(raw_sweep).is_some()
        && !(MIN_PAGING_SWEEP_INTERVAL..=MAX_PAGING_SWEEP_INTERVAL).contains(&sweep_interval)
    {
        v.problem(
            "paging_sweep_interval",
            format!(
                "{raw_sweep:?} is outside 100ms to 60s (repeats, escalations and storm \
                 summaries are late by up to one sweep)"
            ),
        );
        sweep_interval = Duration::from_secs(1);
    }
    Routing {
        routes,
        targets: ResponseTargets {
            by_severity,
            utc_offset_s,
        },
        storm,
        sweep_interval,
        hooks: Vec::new(),
        drill_channels: Vec::new(),
    }
}

/// `[drills]` of the aggregator as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDrills {
    /// Channels that get drill incidents instead of the real routes (unless a drill
    /// pages real); unset: the real routes, at most as a P2.
    pub channels: Option<Vec<String>>,
}

/// Validates `[drills] channels` against the known channel names (problems under
/// `drills.channels`: an unknown name, or an empty list — a drill with nowhere to page
/// fails); returns the channels, empty when the key is not set.
pub fn validate_drills(v: &mut Validator<'_>, raw: &RawDrills, channels: &[String]) -> Vec<String> {
    let Some(list) = &raw.channels else {
        return Vec::new();
    };
    if list.is_empty() {
        v.problem(
            "drills.channels",
            "names no channel: name at least one, or remove the key (drills then take the \
             real routes, at most as a P2)",
        );
    }
    let mut known: Vec<&str> = Vec::new();
    for c in channels {
        if !known.contains(&c.as_str()) {
            known.push(c);
        }
    }
    let mut out = Vec::new();
    for name in list {
        if !channels.contains(name) {
            v.problem(
                "drills.channels",
                format!(
                    "unknown channel {name:?} (channels: {})",
                    if known.is_empty() {
                        "none configured".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        } else if !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(sev: &[Severity], matchers: &[&str], channels: &[&str], cont: bool) -> Route {
        Route {
            name: channels.join("+"),
            severities: sev.to_vec(),
            matchers: matchers
                .iter()
                .map(|m| Matcher::parse(m).expect("matcher"))
                .collect(),
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            escalate_to: vec!["backup".into()],
            repeat_interval: None,
            continue_matching: cont,
            remediate: None,
        }
    }

    fn router(routes: Vec<Route>) -> Router {
        Router {
            channels: vec!["oncall".into(), "tickets".into(), "backup".into()],
            routing: Routing {
                routes,
                ..Routing::default()
            },
        }
    }

    fn fields(service: &str, severity: Severity) -> BTreeMap<String, String> {
        crate::silence::fields(
            "web-1",
            "process:nginx",
            severity.as_str(),
            &BTreeMap::from([("service".to_owned(), service.to_owned())]),
        )
    }

    fn names(plan: &[Planned]) -> Vec<&str> {
        plan.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn first_match_wins_unless_continue() {
        let r = router(vec![
            route(&[Severity::P1, Severity::P2], &[], &["oncall"], false),
            route(&[], &["service=~web.*"], &["tickets"], false),
        ]);
        assert_eq!(
            names(&r.plan(&fields("web", Severity::P2), Severity::P2)),
            ["oncall"]
        );
        assert_eq!(
            names(&r.plan(&fields("web", Severity::P3), Severity::P3)),
            ["tickets"]
        );
        let r = router(vec![
            route(&[Severity::P1, Severity::P2], &[], &["oncall"], true),
            route(&[], &["service=~web.*"], &["tickets"], false),
            route(&[], &[], &["backup"], false),
        ]);
        assert_eq!(
            names(&r.plan(&fields("web", Severity::P2), Severity::P2)),
            ["oncall", "tickets"],
            "continue keeps matching, and the first match after it stops"
        );
        assert_eq!(
            names(&r.plan(&fields("db", Severity::P1), Severity::P1)),
            ["oncall", "backup"]
        );
    }

    #[test]
    fn no_match_or_no_routes_pages_every_channel() {
        let r = router(vec![route(
            &[Severity::P1],
            &["service=db"],
            &["oncall"],
            false,
        )]);
        let plan = r.plan(&fields("web", Severity::P1), Severity::P1);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].index, None);
        assert_eq!(plan[0].channels, ["oncall", "tickets", "backup"]);
        assert!(plan[0].escalate_to.is_empty());
        let none = router(Vec::new()).plan(&fields("db", Severity::P4), Severity::P4);
        assert_eq!(none[0].channels.len(), 3);
    }

    #[test]
    fn matchers_see_node_check_severity_and_labels() {
        let r = route(
            &[],
            &[
                "node=web-1",
                "check=~process:.*",
                "severity!=P4",
                "service!~db.*",
            ],
            &["oncall"],
            false,
        );
        assert!(r.matches(&fields("web", Severity::P3), Severity::P3));
        assert!(!r.matches(&fields("web", Severity::P4), Severity::P4));
        assert!(!r.matches(&fields("db-main", Severity::P3), Severity::P3));
        let sev_only = route(&[Severity::P2], &[], &["oncall"], false);
        assert!(!sev_only.matches(&fields("web", Severity::P1), Severity::P1));
    }

    /// 2024-01-15 was a Monday.
    const MON: i64 = 1_705_276_800_000;
    const H: i64 = 3_600_000;

    #[test]
    fn next_business_day_skips_weekends_at_nine() {
        assert_eq!(
            next_business_day(MON + 3 * H, 0),
            MON + DAY_MS + 9 * H,
            "Mon → Tue 09:00"
        );
        assert_eq!(next_business_day(MON + 23 * H, 0), MON + DAY_MS + 9 * H);
        let fri = MON + 4 * DAY_MS;
        let next_mon = MON + 7 * DAY_MS + 9 * H;
        assert_eq!(next_business_day(fri + 17 * H, 0), next_mon, "Fri → Mon");
        assert_eq!(
            next_business_day(fri + DAY_MS + 12 * H, 0),
            next_mon,
            "Sat → Mon"
        );
        assert_eq!(
            next_business_day(fri + 2 * DAY_MS, 0),
            next_mon,
            "Sun → Mon"
        );
        assert_eq!(
            next_business_day(MON + 3 * DAY_MS, 0),
            fri + 9 * H,
            "Thu → Fri"
        );
    }

    #[test]
    fn next_business_day_in_a_time_zone() {
        let plus8 = 8 * 3600;
        // Sunday 20:00 UTC is Monday 04:00 at +08:00: Tuesday 09:00 there (01:00 UTC).
        let sun_20_utc = MON - 4 * H;
        assert_eq!(next_business_day(sun_20_utc, 0), MON + 9 * H);
        assert_eq!(
            next_business_day(sun_20_utc, plus8),
            MON + DAY_MS + 9 * H - 8 * H
        );
        // Friday 22:00 at -05:00 is Saturday 03:00 UTC: Monday 09:00 -05:00 = 14:00 UTC.
        let minus5 = -5 * 3600;
        let fri_22_local = MON + 4 * DAY_MS + 22 * H + 5 * H;
        assert_eq!(
            next_business_day(fri_22_local, minus5),
            MON + 7 * DAY_MS + 9 * H + 5 * H
        );
    }

    #[test]
    fn deadlines_by_severity() {
        let t = ResponseTargets::default();
        assert_eq!(t.deadline(Severity::P1, MON), MON);
        assert_eq!(t.deadline(Severity::P2, MON), MON + H / 2);
        assert_eq!(t.deadline(Severity::P3, MON), MON + 2 * H);
        assert_eq!(t.deadline(Severity::P4, MON + 10 * H), MON + DAY_MS + 9 * H);
        assert_eq!(t.describe(Severity::P2), "30m");
        assert_eq!(t.describe(Severity::P4), NEXT_BUSINESS_DAY);
    }

    #[test]
    fn utc_offsets() {
        assert_eq!(parse_utc_offset("UTC"), Some(0));
        assert_eq!(parse_utc_offset("+08:00"), Some(28_800));
        assert_eq!(parse_utc_offset("-05:30"), Some(-19_800));
        assert_eq!(parse_utc_offset("+9"), Some(32_400));
        for bad in [
            "08:00",
            "+15:00",
            "+08:60",
            "Asia/Shanghai",
            "",
            "+",
            "+1:2:3",
        ] {
            assert_eq!(parse_utc_offset(bad), None, "{bad}");
        }
    }

    fn check(raw: &[RawRoute], sweep: &str, channels: &[&str]) -> Result<Routing, String> {
        let fig = figment::Figment::new();
        let mut v = Validator::new(&fig);
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let routing = validate(
            &mut v,
            raw,
            &RawResponseTargets::default(),
            sweep,
            &channels,
            BTreeMap::new(),
            &[],
        );
        v.finish(routing).map_err(|e| e.to_string())
    }

    #[test]
    fn route_severities_in_any_case_and_bounded_intervals() {
        let raw = |sev: &[&str], repeat: Option<&str>| RawRoute {
            severity: sev.iter().map(|s| (*s).to_owned()).collect(),
            channels: vec!["oncall".into()],
            repeat_interval: repeat.map(str::to_owned),
            ..RawRoute::default()
        };
        let ok = check(
            &[raw(&["p1", " P2 ", "p3"], Some("10s"))],
            "60s",
            &["oncall"],
        )
        .expect("valid");
        assert_eq!(
            ok.routes[0].severities,
            [Severity::P1, Severity::P2, Severity::P3]
        );
        assert_eq!(ok.routes[0].repeat_interval, Some(Duration::from_secs(10)));
        assert_eq!(ok.sweep_interval, Duration::from_secs(60));
        assert_eq!(
            check(&[], "100ms", &[]).expect("valid").sweep_interval,
            Duration::from_millis(100)
        );
        for (routes, sweep, want) in [
            (vec![raw(&["p5"], None)], "1s", "route.0.severity"),
            (vec![raw(&[], Some("9s"))], "1s", "minimum of 10s"),
            (vec![raw(&[], Some("0s"))], "1s", "route.0.repeat_interval"),
            (vec![], "99ms", "outside 100ms to 60s"),
            (vec![], "0s", "paging_sweep_interval"),
            (vec![], "61s", "outside 100ms to 60s"),
        ] {
            let err = check(&routes, sweep, &["oncall"]).expect_err(want);
            assert!(err.contains(want), "{want:?} missing in {err}");
        }
    }

    /// Regression: the known channels were listed as configured, repeats included
    /// ("(channels: a, a)").
    #[test]
    fn unknown_channels_list_each_known_channel_once() {
        let raw = RawRoute {
            channels: vec!["nope".into()],
            ..RawRoute::default()
        };
        let err = check(&[raw], "1s", &["a", "b", "a"]).expect_err("unknown");
        assert!(err.contains("(channels: a, b)"), "{err}");
    }

    #[test]
    fn storm_windows_are_aligned() {
        let s = Storm {
            budget: 5,
            window: Duration::from_secs(300),
        };
        assert_eq!(s.window_start(MON + 299_999), MON);
        assert_eq!(s.window_start(MON + 300_000), MON + 300_000);
    }
}
