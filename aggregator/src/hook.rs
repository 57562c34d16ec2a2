//! Recovery hooks: commands from the aggregator's config (`[[hook]]`) that restart, fix or
//! roll back, started automatically on matching incidents (`on`), by a route before it
//! pages (`remediate`, see `store::hooks`), or by hand (API, `tocsin hook run`,
//! `tocsin rollback`).
//!
//! This module owns the config shapes and their validation, the environment a run gets
//! (pure: [`run_env`], [`incident_env`]) and the [`Runner`] task that starts queued runs
//! with `tocsin_agent::exec` (argv without a shell, stdin `/dev/null`, its own process
//! group, SIGTERM then SIGKILL after `kill_grace` on timeout, bounded capture, every
//! process of the group gone when it returns). What is queued, when, and what a finished
//! run does to its incident (timeline, remediation) is the store's (`store::hooks`): every
//! run is a `hook_runs` row, so a restart finds queued runs and marks interrupted ones.
//!
//! Concurrency: at most `max_concurrent` runs of a hook at once; further runs **queue**
//! (FIFO per hook, started as runs end), up to `max_queued` waiting; beyond that a run is
//! **refused and recorded** (status `refused`, on the incident's timeline).
//!
//! Incident fields reach the command only as environment variables, never in its argv:
//! `TOCSIN_INCIDENT_ID`, `TOCSIN_NODE`, `TOCSIN_CHECK`, `TOCSIN_SEVERITY`, `TOCSIN_STATE`,
//! `TOCSIN_STATUS`, `TOCSIN_SUMMARY`, `TOCSIN_DEDUP_KEY`, `TOCSIN_LABELS` (JSON object) and
//! `TOCSIN_LABEL_<NAME>` per label (name upper-cased, every character outside `A-Z0-9`
//! made `_`); about the run: `TOCSIN_HOOK`, `TOCSIN_RUN_ID`, `TOCSIN_EVENT` (`trigger`,
//! `resolve`, `remediate`, `manual`, `rollback`), `TOCSIN_STARTED_BY`, `TOCSIN_REASON`,
//! `TOCSIN_FORCE=1` when forced, and `TOCSIN_RUN_KEY` (the run's random key, by which
//! its processes are found: [`procs`]).
//!
//! No process of a run outlives it: its process group is killed when it ends (see
//! `tocsin_agent::exec`), then the processes that escaped the group (`setsid`) are found
//! by the run key and killed ([`procs`], recorded in the run's `cleanup`); and when the
//! aggregator starts, the runs the last process left `running` (it was killed with
//! `kill -9` or crashed) have their processes killed the same way before any queued run
//! starts, so `max_concurrent` holds across the restart.

pub mod procs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_agent::exec::{self, ExitKind};
use tocsin_agent::settings::Validator;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::model::{Incident, Severity, now_ms};
use crate::silence::Matcher;
use crate::store::StoreHandle;

/// Default timeout of a `recovery` hook (the seed's `RECOVERY_TIMEOUT=300`).
pub const DEFAULT_RECOVERY_TIMEOUT: &str = "300s";
/// Default timeout of a `rollback` hook (the seed's `ROLLBACK_TIMEOUT=600`).
pub const DEFAULT_ROLLBACK_TIMEOUT: &str = "600s";
/// Default time between SIGTERM and SIGKILL of a timed-out hook's process group.
pub const DEFAULT_KILL_GRACE: &str = "5s";
/// Default runs of one hook at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 1;
/// Default runs of one hook waiting for a free slot; beyond: refused and recorded.
pub const DEFAULT_MAX_QUEUED: usize = 10;
/// Bytes of stdout and of stderr kept per run in `hook_runs` (the rest is read and
/// discarded, and the text says `…[truncated, N bytes]`).
pub const MAX_OUTPUT: usize = 64 * 1024;
/// Bytes of each stream quoted in the run's timeline entry (the whole bounded capture is
/// in `hook_runs`, `GET /api/v1/hooks/runs/{id}`).
pub const TIMELINE_OUTPUT: usize = 4 * 1024;
/// How often the runner looks for queued runs when nothing woke it (runs queued inside
/// the store's transactions — on trigger, on resolve, before a page — wait at most this).
pub const POLL: Duration = Duration::from_millis(500);

/// One `[[hook]]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHook {
    /// Unique name (letters, digits, `-`, `_`, `.`): `tocsin hook run NAME`, a route's
    /// `remediate`.
    pub name: String,
    /// `recovery` (default) or `rollback` (run by `tocsin rollback`; at most one).
    pub kind: String,
    /// What it does, for `tocsin hook list`.
    pub description: String,
    /// Program and arguments, run without a shell; the program is an absolute path or a
    /// name found on `PATH`.
    pub command: Vec<String>,
    /// Working directory (absolute); default `/`.
    pub cwd: Option<String>,
    /// Extra environment variables (the environment is otherwise cleared but for `PATH`,
    /// `LC_ALL=C` and the `TOCSIN_…` variables; names may not start with `TOCSIN_`).
    pub env: BTreeMap<String, String>,
    /// Longest run (a duration, or seconds); default `recovery_timeout`
    /// (`RECOVERY_TIMEOUT`, 300 s), for `kind = "rollback"` `rollback_timeout`
    /// (`ROLLBACK_TIMEOUT`, 600 s).
    #[serde(deserialize_with = "crate::config::opt_duration_text", default)]
    pub timeout: Option<String>,
    /// Time between SIGTERM and SIGKILL of the process group after the timeout.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub kill_grace: String,
    /// Runs of this hook at once (1 to 64).
    pub max_concurrent: usize,
    /// Runs waiting for a free slot (0 to 1000); beyond, a run is refused and recorded.
    pub max_queued: usize,
    /// Which incidents start it automatically when they trigger (or reopen, or are raised
    /// to a matching severity); absent: never automatically.
    pub on: Option<RawOn>,
    /// Also run when a matching incident resolves (needs `on`).
    pub on_resolve: bool,
}

impl Default for RawHook {
    fn default() -> Self {
        RawHook {
            name: String::new(),
            kind: "recovery".into(),
            description: String::new(),
            command: Vec::new(),
            cwd: None,
            env: BTreeMap::new(),
            timeout: None,
            kill_grace: DEFAULT_KILL_GRACE.into(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_queued: DEFAULT_MAX_QUEUED,
            on: None,
            on_resolve: false,
        }
    }
}

/// `on = { … }` of a `[[hook]]`: all given conditions must hold; `on = {}` matches every
/// incident.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOn {
    /// Severities (`"P1"` … `"P4"`); empty: any.
    pub severity: Vec<String>,
    /// Matchers on the incident's fields (`node`, `check`, `severity`, labels), as
    /// silences and routes write them: `name=value`, `name!=value`, `name=~re`, `name!~re`.
    #[serde(rename = "match")]
    pub matchers: Vec<String>,
    /// The incident's check name, exactly.
    pub check: Option<String>,
}

/// What a hook is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Restart, fix (default).
    Recovery,
    /// Roll back a deployment: `tocsin rollback`.
    Rollback,
}

/// Which incidents start a hook.
#[derive(Debug, Clone)]
pub struct On {
    /// Severities; empty: any.
    pub severities: Vec<Severity>,
    /// All must match the incident's fields ([`crate::silence::fields`]).
    pub matchers: Vec<Matcher>,
    /// Exact check name.
    pub check: Option<String>,
}

impl On {
    /// Whether incident `i` (as it is now) matches.
    pub fn matches(&self, i: &Incident) -> bool {
        let fields = crate::silence::fields(&i.node, &i.check, i.severity.as_str(), &i.labels);
        (self.severities.is_empty() || self.severities.contains(&i.severity))
            && self.check.as_ref().is_none_or(|c| *c == i.check)
            && self.matchers.iter().all(|m| m.matches(&fields))
    }

    /// `severity in [P1] and service=web and check = x`, or `every incident`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.severities.is_empty() {
            let s: Vec<&str> = self.severities.iter().map(|s| s.as_str()).collect();
            parts.push(format!("severity in [{}]", s.join(", ")));
        }
        parts.extend(self.matchers.iter().map(|m| m.text.clone()));
        if let Some(c) = &self.check {
            parts.push(format!("check = {c}"));
        }
        if parts.is_empty() {
            "every incident".into()
        } else {
            parts.join(" and ")
        }
    }
}

/// A validated hook.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Unique name.
    pub name: String,
    /// Recovery or rollback.
    pub kind: Kind,
    /// What it does.
    pub description: String,
    /// Program (absolute, resolved at validation) and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Extra environment, before the `TOCSIN_…` variables.
    pub env: Vec<(String, String)>,
    /// Longest run before the process group gets SIGTERM.
    pub timeout: Duration,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// Runs at once.
    pub max_concurrent: usize,
    /// Runs waiting; beyond, refused.
    pub max_queued: usize,
    /// Automatic start on trigger; `None`: by hand or by a route's `remediate` only.
    pub on: Option<On>,
    /// Also on resolve.
    pub on_resolve: bool,
}

impl Hook {
    /// The process spec of one run with `env` (from [`run_env`]).
    pub fn spec(&self, env: Vec<(String, String)>) -> exec::Spec {
        let mut all = self.env.clone();
        all.extend(env);
        exec::Spec {
            argv: self.argv.clone(),
            env: all,
            cwd: Some(self.cwd.clone()),
            timeout: self.timeout,
            kill_grace: self.kill_grace,
            max_output: MAX_OUTPUT,
            keep_leftovers: false,
        }
    }
}

/// `TOCSIN_LABEL_<NAME>` for label `name`: upper-cased, every character outside `A-Z0-9`
/// made `_` (`app.kubernetes.io/name` → `TOCSIN_LABEL_APP_KUBERNETES_IO_NAME`). Two labels
/// that map to the same variable (`evil-2` and `evil_2`, `Service` and `service`): the
/// variable carries the value of the label whose name comes **last in byte order**
/// (`evil_2` over `evil-2`, `service` over `Service`), the others are left out, a warning
/// goes on the run's incident timeline ([`label_collisions`]), and `TOCSIN_LABELS` has
/// them all.
pub fn label_var(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TOCSIN_LABEL_{clean}")
}

/// A value as an environment variable can carry it: NUL bytes (which would make the
/// spawn fail) removed; everything else passed byte for byte.
fn env_value(s: &str) -> String {
    s.replace('\0', "")
}

/// The incident's variables (see the module docs).
pub fn incident_env(i: &Incident) -> Vec<(String, String)> {
    let mut env = vec![
        ("TOCSIN_INCIDENT_ID".to_owned(), i.id.to_string()),
        ("TOCSIN_NODE".to_owned(), env_value(&i.node)),
        ("TOCSIN_CHECK".to_owned(), env_value(&i.check)),
        ("TOCSIN_SEVERITY".to_owned(), i.severity.as_str().to_owned()),
        ("TOCSIN_STATE".to_owned(), i.state.as_str().to_owned()),
        ("TOCSIN_STATUS".to_owned(), i.status.as_str().to_owned()),
        ("TOCSIN_SUMMARY".to_owned(), env_value(&i.summary)),
        ("TOCSIN_DEDUP_KEY".to_owned(), env_value(&i.dedup_key)),
        (
            "TOCSIN_LABELS".to_owned(),
            env_value(&serde_json::to_string(&i.labels).unwrap_or_default()),
        ),
    ];
    // `labels` iterates in byte order of the names: the last of a collision wins.
    let mut vars: BTreeMap<String, &str> = BTreeMap::new();
    for (k, v) in &i.labels {
        vars.insert(label_var(k), v);
    }
    env.extend(vars.into_iter().map(|(k, v)| (k, env_value(v))));
    env
}

/// One warning per `TOCSIN_LABEL_…` variable that two or more labels map to, e.g.
/// `labels "evil-2", "evil_2" all map to TOCSIN_LABEL_EVIL_2: it carries "evil_2"'s
/// value (every label is in TOCSIN_LABELS)`; empty when there is no collision.
pub fn label_collisions(labels: &BTreeMap<String, String>) -> Vec<String> {
    let mut by_var: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for k in labels.keys() {
        by_var.entry(label_var(k)).or_default().push(k);
    }
    by_var
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(var, names)| {
            let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            format!(
                "labels {} all map to {var}: it carries {}'s value (every label is in TOCSIN_LABELS)",
                list.join(", "),
                list.last().map_or("", String::as_str)
            )
        })
        .collect()
}

/// Why and by whom a run was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunContext {
    /// `hook_runs.id`.
    pub run_id: i64,
    /// Hook name.
    pub hook: String,
    /// `trigger`, `resolve`, `remediate`, `manual`, or `rollback` (a run of the
    /// rollback hook by hand).
    pub event: String,
    /// `aggregator`, or the person who ran it.
    pub started_by: String,
    /// Why (free text; empty when none).
    pub reason: String,
    /// `--force` asked.
    pub force: bool,
    /// The run's key (`TOCSIN_RUN_KEY`, see [`procs`]).
    pub run_key: String,
}

/// The whole `TOCSIN_…` environment of a run: about the run, then the incident's (if any).
pub fn run_env(run: &RunContext, incident: Option<&Incident>) -> Vec<(String, String)> {
    let mut env = vec![
        ("TOCSIN_HOOK".to_owned(), run.hook.clone()),
        ("TOCSIN_RUN_ID".to_owned(), run.run_id.to_string()),
        ("TOCSIN_EVENT".to_owned(), run.event.clone()),
        ("TOCSIN_STARTED_BY".to_owned(), env_value(&run.started_by)),
        ("TOCSIN_REASON".to_owned(), env_value(&run.reason)),
        (procs::RUN_KEY_VAR.to_owned(), run.run_key.clone()),
    ];
    if run.force {
        env.push(("TOCSIN_FORCE".to_owned(), "1".to_owned()));
    }
    if let Some(i) = incident {
        env.extend(incident_env(i));
    }
    env
}

/// How a run ended, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// `succeeded` (exit 0), `failed` (other exit, signal, spawn failure), `timed_out`,
    /// `interrupted` (the aggregator stopped while it ran).
    pub status: &'static str,
    /// Exit code when it exited.
    pub exit_code: Option<i32>,
    /// The timeout killed its process group.
    pub timed_out: bool,
    /// Why it failed without an exit code (signal, spawn error, interruption).
    pub error: Option<String>,
    /// Captured stdout (bounded, see [`MAX_OUTPUT`]).
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// stdout was cut.
    pub stdout_truncated: bool,
    /// stderr was cut.
    pub stderr_truncated: bool,
    /// What was killed after the run ([`procs::Killed::describe`]).
    pub cleanup: Option<String>,
}

impl RunResult {
    /// From the process runner's outcome.
    pub fn from_outcome(o: exec::Outcome, timeout: Duration) -> Self {
        let (status, exit_code, timed_out, error) = match o.status {
            ExitKind::Exited(0) => ("succeeded", Some(0), false, None),
            ExitKind::Exited(c) => ("failed", Some(c), false, None),
            ExitKind::Signaled(s) => ("failed", None, false, Some(format!("killed by signal {s}"))),
            ExitKind::TimedOut => (
                "timed_out",
                None,
                true,
                Some(format!(
                    "timed out after {}: its process group was terminated",
                    tocsin_agent::settings::format_duration(timeout)
                )),
            ),
            ExitKind::SpawnFailed(m) => {
                ("failed", None, false, Some(format!("could not start: {m}")))
            }
        };
        RunResult {
            status,
            exit_code,
            timed_out,
            error,
            stdout: o.stdout,
            stderr: o.stderr,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            cleanup: None,
        }
    }

    /// A run that ended without a result (`status` `interrupted` or `failed`).
    pub fn without_result(status: &'static str, why: &str) -> Self {
        RunResult {
            status,
            exit_code: None,
            timed_out: false,
            error: Some(why.to_owned()),
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            cleanup: None,
        }
    }
}

/// Validates every `[[hook]]` (keys `hook.<index>.<field>`); `recovery_timeout` and
/// `rollback_timeout` are the defaults (top-level keys, or the seed's `RECOVERY_TIMEOUT`
/// and `ROLLBACK_TIMEOUT` in seconds). Returns the valid hooks; every problem is recorded.
pub fn validate(
    v: &mut Validator<'_>,
    raw: &[RawHook],
    recovery_timeout: &str,
    rollback_timeout: &str,
) -> Vec<Hook> {
    let recovery_default = v.seconds_or_duration(
        "recovery_timeout",
        recovery_timeout,
        Duration::from_secs(300),
    );
    let rollback_default = v.seconds_or_duration(
        "rollback_timeout",
        rollback_timeout,
        Duration::from_secs(600),
    );
    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    let mut rollback: Option<String> = None;
    for (i, h) in raw.iter().enumerate() {
        let key = format!("hook.{i}");
        let mut ok = true;
        let mut bad = |v: &mut Validator<'_>, field: &str, msg: String| {
            v.problem(&format!("{key}.{field}"), msg);
            ok = false;
        };
        if h.name.trim().is_empty() {
            bad(
                v,
                "name",
                "missing or empty: every [[hook]] needs a name (1 to 64 letters, digits, -, _ or .)"
                    .into(),
            );
        } else if h.name.len() > 64
            || !h
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bad(
                v,
                "name",
                format!(
                    "{:?} is not a hook name (1 to 64 letters, digits, -, _ or .)",
                    h.name
                ),
            );
        } else if !names.insert(h.name.clone()) {
            bad(v, "name", format!("hook {:?} is defined twice", h.name));
        }
        let kind = match h.kind.as_str() {
            "recovery" => Kind::Recovery,
            "rollback" => {
                if let Some(first) = &rollback {
                    bad(
                        v,
                        "kind",
                        format!(
                            "hook {first:?} is already the rollback hook: at most one hook has kind = \"rollback\""
                        ),
                    );
                }
                rollback.get_or_insert_with(|| h.name.clone());
                Kind::Rollback
            }
            other => {
                bad(
                    v,
                    "kind",
                    format!("invalid value {other:?} (expected \"recovery\" or \"rollback\")"),
                );
                Kind::Recovery
            }
        };
        let mut argv = h.command.clone();
        if let Some(j) = argv.iter().position(|a| a.contains('\0')) {
            bad(v, "command", format!("argument {j} contains a NUL byte"));
        }
        match argv.first().map(String::as_str) {
            None | Some("") => bad(
                v,
                "command",
                "needs the program and its arguments, e.g. [\"/usr/local/lib/tocsin/hooks/restart-all\"] (no shell)".into(),
            ),
            Some(program) => {
                let path = h
                    .env
                    .get("PATH")
                    .cloned()
                    .unwrap_or_else(exec::child_path);
                match tocsin_agent::nagios::resolve_program(program, &path) {
                    Ok(abs) => argv[0] = abs,
                    Err(m) => bad(v, "command", m),
                }
            }
        }
        let cwd = match &h.cwd {
            None => PathBuf::from("/"),
            Some(dir) => {
                let p = PathBuf::from(dir);
                if !p.is_absolute() {
                    bad(v, "cwd", format!("{dir:?} is not an absolute path"));
                } else if !p.is_dir() {
                    bad(v, "cwd", format!("{dir:?} is not a directory"));
                }
                p
            }
        };
        let mut env = Vec::new();
        for (name, value) in &h.env {
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bad(
                    v,
                    &format!("env.{name}"),
                    format!("{name:?} is not a variable name (letters, digits, _)"),
                );
            } else if name.starts_with("TOCSIN_") {
                bad(
                    v,
                    &format!("env.{name}"),
                    "names starting with TOCSIN_ are the run's own (incident fields, reason)"
                        .into(),
                );
            } else if value.contains('\0') {
                bad(
                    v,
                    &format!("env.{name}"),
                    "the value contains a NUL byte".into(),
                );
            } else {
                env.push((name.clone(), value.clone()));
            }
        }
        let default_timeout = match kind {
            Kind::Recovery => recovery_default,
            Kind::Rollback => rollback_default,
        };
        let timeout = match &h.timeout {
            None => default_timeout,
            Some(raw) => v.seconds_or_duration(&format!("{key}.timeout"), raw, default_timeout),
        };
        let kill_grace = v.positive_duration(
            &format!("{key}.kill_grace"),
            &h.kill_grace,
            Duration::from_secs(5),
        );
        if !(1..=64).contains(&h.max_concurrent) {
            bad(
                v,
                "max_concurrent",
                format!("{} is outside 1 to 64", h.max_concurrent),
            );
        }
        if h.max_queued > 1000 {
            bad(v, "max_queued", format!("{} is above 1000", h.max_queued));
        }
        let on = h.on.as_ref().map(|o| {
            let mut severities = Vec::new();
            for s in &o.severity {
                match Severity::parse(s.trim()) {
                    Some(sev) => severities.push(sev),
                    None => bad(
                        v,
                        "on.severity",
                        format!(
                            "invalid severity {s:?} (expected \"P1\", \"P2\", \"P3\" or \"P4\")"
                        ),
                    ),
                }
            }
            let mut matchers = Vec::new();
            for (j, m) in o.matchers.iter().enumerate() {
                match Matcher::parse(m) {
                    Ok(m) => matchers.push(m),
                    Err(e) => bad(v, &format!("on.match.{j}"), e),
                }
            }
            if o.check.as_deref().is_some_and(|c| c.trim().is_empty()) {
                bad(
                    v,
                    "on.check",
                    "must not be empty (omit it to match any check)".into(),
                );
            }
            On {
                severities,
                matchers,
                check: o.check.clone(),
            }
        });
        if kind == Kind::Rollback
            && on.as_ref().is_some_and(|o| {
                o.severities.is_empty() && o.matchers.is_empty() && o.check.is_none()
            })
        {
            bad(
                v,
                "on",
                "a rollback hook may not run on every incident (`on = {}`): give it narrow \
                 conditions (severity, match, check), or run it by hand (tocsin rollback)"
                    .into(),
            );
        }
        if h.on_resolve && on.is_none() {
            bad(
                v,
                "on_resolve",
                "needs `on` (which incidents start the hook)".into(),
            );
        }
        if ok {
            out.push(Hook {
                name: h.name.clone(),
                kind,
                description: h.description.clone(),
                argv,
                cwd,
                env,
                timeout,
                kill_grace,
                max_concurrent: h.max_concurrent,
                max_queued: h.max_queued,
                on,
                on_resolve: h.on_resolve,
            });
        }
    }
    out
}

/// Rejects a route whose `remediate` names the rollback hook (`route.<i>.remediate`):
/// routes match broadly and remediation runs without a reason or a confirmation, while a
/// rollback is run by hand (`tocsin rollback`) or by a deliberately narrow `on`.
/// The hooks as written (`raw`) count, so an invalid rollback hook is named here too.
pub fn validate_remediate(v: &mut Validator<'_>, raw: &[RawHook], routing: &crate::route::Routing) {
    for (i, r) in routing.routes.iter().enumerate() {
        let Some((name, _)) = &r.remediate else {
            continue;
        };
        if raw.iter().any(|h| h.name == *name && h.kind == "rollback") {
            v.problem(
                &format!("route.{i}.remediate"),
                format!(
                    "hook {name:?} is the rollback hook (kind = \"rollback\"): a route may not \
                     remediate with it (run it by hand: tocsin rollback)"
                ),
            );
        }
    }
}

/// A remediate route that can match a P1 holds its page for up to the hook's timeout
/// plus `verify_after`; beyond this, `check-config` warns ([`warnings`]).
pub const P1_HOLD_WARNING: Duration = Duration::from_secs(60);

/// Warnings about a valid config (printed by `check-config`, logged at start): a
/// remediate route that can match a P1 (its `severity` is empty or has `"P1"`) whose
/// hook's timeout plus `verify_after` exceeds [`P1_HOLD_WARNING`] — a P1 page may wait
/// that long.
pub fn warnings(routing: &crate::route::Routing) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in routing.routes.iter().enumerate() {
        let Some((name, verify)) = &r.remediate else {
            continue;
        };
        let Some(hook) = routing.hooks.iter().find(|h| h.name == *name) else {
            continue;
        };
        let p1 = r.severities.is_empty() || r.severities.contains(&Severity::P1);
        let hold = hook.timeout + *verify;
        if p1 && hold > P1_HOLD_WARNING {
            let f = tocsin_agent::settings::format_duration;
            out.push(format!(
                "route.{i}.remediate: route {:?} can hold a P1 page for up to {} (hook {name} \
                 timeout {} + verify_after {}); give the hook a shorter timeout, or leave P1 \
                 out of the route's severity",
                r.name,
                f(hold),
                f(hook.timeout),
                f(*verify)
            ));
        }
    }
    out
}

/// The hooks and the runner's wake-up, for the API.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Every configured hook.
    pub list: Arc<Vec<Hook>>,
    /// Bumped after a run was queued by hand: the runner starts it at once.
    pub wake: watch::Sender<u64>,
}

impl Hooks {
    /// The hook named `name`.
    pub fn get(&self, name: &str) -> Option<&Hook> {
        self.list.iter().find(|h| h.name == name)
    }
}

/// The task that starts queued hook runs: each run in a task of its own (a hung hook
/// blocks nothing else), within each hook's `max_concurrent` (the store decides which
/// queued runs may start). At start it marks the runs the previous process left
/// `running` as `interrupted`.
#[derive(Debug)]
pub struct Runner {
    /// Store access.
    pub store: StoreHandle,
    /// The hooks (argv, limits) by name.
    pub hooks: Arc<Vec<Hook>>,
    /// Bumped when a run was queued by hand or a run ended.
    pub wake: watch::Receiver<u64>,
    /// The sender of `wake`, for runs that end.
    pub wake_tx: watch::Sender<u64>,
    /// Bumped when a run's end may have queued notifications.
    pub outbox_wake: watch::Sender<u64>,
    /// Where the runs' tasks are spawned (the aggregator's tracker: shutdown waits for
    /// them, and a run cut short by shutdown has its process group killed).
    pub tracker: TaskTracker,
}

impl Runner {
    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.recover().await;
        loop {
            match self.store.call(|s| s.claim_hook_runs(now_ms())).await {
                Ok(claims) => {
                    for c in claims {
                        self.start(c, &shutdown);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot claim queued hook runs"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.wake.changed() => if r.is_err() { return; },
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// At start, before any queued run is claimed: kills the processes of the runs the
    /// last process left `running` and records each run `interrupted`, saying what was
    /// killed; skips the queued rollbacks (never resumed automatically).
    async fn recover(&self) {
        let orphans = match self.store.call(|s| s.orphaned_hook_runs()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the hook runs left running");
                Vec::new()
            }
        };
        let mut changed = !orphans.is_empty();
        for (id, hook, key) in orphans {
            let killed = match key {
                Some(key) => tokio::task::spawn_blocking(move || procs::kill_run(&key))
                    .await
                    .unwrap_or_default(),
                None => procs::Killed::default(),
            };
            let mut result = RunResult::without_result(
                "interrupted",
                "interrupted: the aggregator was stopped without a clean shutdown (killed or \
                 crashed) while it ran; found at the next start; its output was lost",
            );
            result.cleanup = Some(
                killed
                    .describe()
                    .unwrap_or_else(|| "no process of the run was left at the restart".to_owned()),
            );
            tracing::warn!(hook = %hook, run = id, cleanup = result.cleanup.as_deref().unwrap_or(""),
                "hook run left running by the last stop: interrupted");
            if let Err(e) = self
                .store
                .call(move |s| s.finish_hook_run(id, &result, now_ms()))
                .await
            {
                tracing::error!(error = %e, run = id, "cannot record an interrupted hook run");
            }
        }
        match self.store.call(|s| s.skip_queued_rollbacks(now_ms())).await {
            Ok(0) => {}
            Ok(n) => {
                changed = true;
                tracing::warn!(runs = n, "queued rollbacks not resumed after the restart");
            }
            Err(e) => tracing::error!(error = %e, "cannot skip queued rollbacks"),
        }
        if changed {
            self.outbox_wake.send_modify(|n| *n += 1);
        }
    }

    fn start(&self, claim: crate::store::HookClaim, shutdown: &CancellationToken) {
        let store = self.store.clone();
        let wake = self.wake_tx.clone();
        let outbox = self.outbox_wake.clone();
        let shutdown = shutdown.clone();
        let hook = self.hooks.iter().find(|h| h.name == claim.hook).cloned();
        let span = tracing::info_span!("hook", hook = %claim.hook, run = claim.run_id);
        let task = async move {
            let id = claim.run_id;
            let key = claim.run_key.clone();
            let mut result = match hook {
                None => RunResult::without_result("failed", "the hook is no longer configured"),
                Some(hook) => {
                    tracing::info!(by = %claim.started_by, "hook run started");
                    let spec = hook.spec(claim.env);
                    tokio::select! {
                        // Dropping the run kills its whole process group.
                        () = shutdown.cancelled() => RunResult::without_result(
                            "interrupted",
                            "the aggregator stopped while it ran: its process group was killed",
                        ),
                        o = exec::run(&spec) => {
                            let mut r = RunResult::from_outcome(o, hook.timeout);
                            if r.status == "failed" && r.exit_code.is_none() {
                                blame_cwd(&mut r, &hook.cwd);
                            }
                            r
                        }
                    }
                }
            };
            // Processes that left the run's process group (`setsid`) outlive the group
            // kill: find them by the run key.
            let killed = tokio::task::spawn_blocking(move || procs::kill_run(&key))
                .await
                .unwrap_or_default();
            result.cleanup = killed
                .describe()
                .map(|d| format!("{d} (left running by the run outside its process group)"));
            tracing::info!(status = result.status, exit_code = ?result.exit_code,
                cleanup = result.cleanup.as_deref().unwrap_or(""), "hook run ended");
            if let Err(e) = store
                .call(move |s| s.finish_hook_run(id, &result, now_ms()))
                .await
            {
                tracing::error!(error = %e, "cannot record the end of a hook run");
            }
            wake.send_modify(|n| *n += 1);
            outbox.send_modify(|n| *n += 1);
        };
        self.tracker
            .spawn(tracing::Instrument::instrument(task, span));
    }
}

/// A spawn that failed because the working directory is gone (removed after the config
/// was checked) names the directory, not the program: the OS reports both as "No such
/// file or directory".
fn blame_cwd(r: &mut RunResult, cwd: &std::path::Path) {
    let Some(err) = &r.error else { return };
    if !err.starts_with("could not start: ") {
        return;
    }
    let why = match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => return,
        Ok(_) => "not a directory".to_owned(),
        Err(e) => e.to_string(),
    };
    r.error = Some(format!("could not start: cwd {}: {why}", cwd.display()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{State, Status};

    fn incident(labels: &[(&str, &str)]) -> Incident {
        Incident {
            id: 7,
            fingerprint: "web-1/cpu".into(),
            dedup_key: "tocsin-x-7".into(),
            node: "web-1".into(),
            check: "cpu".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            severity: Severity::P1,
            status: Status::Triggered,
            state: State::Critical,
            value: Some(99.0),
            unit: "percent".into(),
            threshold: Some(95.0),
            summary: "cpu critical".into(),
            breach_started_at_ms: 0,
            triggered_at_ms: 0,
            cycle_triggered_at_ms: 0,
            cycle_breach_started_at_ms: 0,
            acknowledged_at_ms: None,
            resolved_at_ms: None,
            resolution: None,
        }
    }

    #[test]
    fn label_names_are_sanitised_and_values_kept_intact() {
        assert_eq!(label_var("service"), "TOCSIN_LABEL_SERVICE");
        assert_eq!(
            label_var("app.kubernetes.io/name"),
            "TOCSIN_LABEL_APP_KUBERNETES_IO_NAME"
        );
        assert_eq!(label_var("a b;c$(x)"), "TOCSIN_LABEL_A_B_C__X_");
        let env = incident_env(&incident(&[
            ("svc", "svc; touch /tmp/x #"),
            ("nul", "a\0b"),
        ]));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TOCSIN_LABEL_SVC"), Some("svc; touch /tmp/x #"));
        assert_eq!(get("TOCSIN_LABEL_NUL"), Some("ab"));
        assert_eq!(get("TOCSIN_SEVERITY"), Some("P1"));
        assert_eq!(get("TOCSIN_INCIDENT_ID"), Some("7"));
        let labels: BTreeMap<String, String> =
            serde_json::from_str(get("TOCSIN_LABELS").unwrap_or("")).expect("json");
        assert_eq!(labels["svc"], "svc; touch /tmp/x #");
    }

    #[test]
    fn on_matches_severity_matchers_and_check() {
        let on = On {
            severities: vec![Severity::P1],
            matchers: vec![Matcher::parse("service=web").expect("matcher")],
            check: Some("cpu".into()),
        };
        assert!(on.matches(&incident(&[("service", "web")])));
        assert!(!on.matches(&incident(&[("service", "db")])));
        let mut p2 = incident(&[("service", "web")]);
        p2.severity = Severity::P2;
        assert!(!on.matches(&p2));
        let mut other = incident(&[("service", "web")]);
        other.check = "memory".into();
        assert!(!on.matches(&other));
        let any = On {
            severities: Vec::new(),
            matchers: Vec::new(),
            check: None,
        };
        assert!(any.matches(&other));
        assert_eq!(any.describe(), "every incident");
        assert_eq!(
            on.describe(),
            "severity in [P1] and service=web and check = cpu"
        );
    }

    #[test]
    fn run_env_names_the_run_and_force_only_when_asked() {
        let run = RunContext {
            run_id: 3,
            hook: "restart-all".into(),
            event: "manual".into(),
            started_by: "alice".into(),
            reason: "deploy went bad".into(),
            force: false,
            run_key: "k".into(),
        };
        let env = run_env(&run, None);
        assert!(
            env.iter()
                .any(|(k, v)| k == "TOCSIN_REASON" && v == "deploy went bad")
        );
        assert!(!env.iter().any(|(k, _)| k == "TOCSIN_FORCE"));
        assert!(!env.iter().any(|(k, _)| k == "TOCSIN_INCIDENT_ID"));
        let forced = run_env(&RunContext { force: true, ..run }, Some(&incident(&[])));
        assert!(forced.iter().any(|(k, v)| k == "TOCSIN_FORCE" && v == "1"));
        assert!(
            forced
                .iter()
                .any(|(k, v)| k == "TOCSIN_NODE" && v == "web-1")
        );
    }

    fn load(text: &str) -> Result<Vec<Hook>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("aggregator.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        crate::config::load(Some(&path))
            .map(|c| c.routing.hooks)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn hooks_get_defaults_by_kind() {
        let hooks = load(
            "[[hook]]\nname = \"restart-all\"\ncommand = [\"true\"]\n\
             [[hook]]\nname = \"rollback\"\nkind = \"rollback\"\ncommand = [\"/bin/true\", \"x\"]\n\
             [[hook]]\nname = \"fix\"\ncommand = [\"true\"]\ntimeout = \"20\"\non = { severity = [\"P1\"] }\non_resolve = true\n",
        )
        .expect("valid");
        assert_eq!(hooks.len(), 3);
        assert_eq!(hooks[0].timeout, Duration::from_secs(300));
        assert!(hooks[0].argv[0].starts_with('/'), "{:?}", hooks[0].argv);
        assert_eq!(hooks[0].max_concurrent, 1);
        assert_eq!(hooks[0].cwd, PathBuf::from("/"));
        assert_eq!(hooks[1].timeout, Duration::from_secs(600));
        assert_eq!(hooks[1].kind, Kind::Rollback);
        assert_eq!(
            hooks[2].timeout,
            Duration::from_secs(20),
            "seconds, as the seed writes them"
        );
        assert!(hooks[2].on.is_some() && hooks[2].on_resolve);
    }

    #[test]
    fn bad_hooks_are_all_reported_with_their_keys() {
        let err = load(
            "[[hook]]\nname = \"a b\"\ncommand = []\n\
             [[hook]]\nname = \"x\"\ncommand = [\"/nonexistent/fix\"]\ncwd = \"relative\"\nmax_concurrent = 0\n\
             env = { TOCSIN_NODE = \"x\" }\non = { severity = [\"P7\"], match = [\"bad\"] }\n\
             [[hook]]\nname = \"x\"\nkind = \"undo\"\ncommand = [\"true\"]\non_resolve = true\ntimeout = \"soon\"\n\
             [[hook]]\nname = \"e\"\ncommand = [\"true\"]\non = { check = \"\" }\n\
             [[hook]]\nname = \"r1\"\nkind = \"rollback\"\ncommand = [\"true\"]\n\
             [[hook]]\nname = \"r2\"\nkind = \"rollback\"\ncommand = [\"true\"]\n\
             [[route]]\nremediate = \"nope\"\nverify_after = \"0s\"\n",
        )
        .expect_err("invalid");
        for key in [
            "hook.0.name",
            "hook.0.command",
            "hook.1.command",
            "hook.1.cwd",
            "hook.1.max_concurrent",
            "hook.1.env.TOCSIN_NODE",
            "hook.1.on.severity",
            "hook.1.on.match.0",
            "hook.2.name",
            "hook.2.kind",
            "hook.2.on_resolve",
            "hook.2.timeout",
            "hook.3.on.check",
            "hook.5.kind",
            "route.0.remediate",
            "route.0.verify_after",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }
}
