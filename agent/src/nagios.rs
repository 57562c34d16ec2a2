//! Exec checks in the Nagios plugin convention: the exit code is the state, the first
//! line of stdout is the summary, and performance data follows a `|`.
//!
//! Owns the interpretation of a finished plugin run ([`parse_output`],
//! [`parse_perfdata`]) and the `[[exec]]` check config ([`RawExecCheck`] →
//! [`ExecCheck`]). It does not run anything (see `exec`), schedule runs, nor evaluate
//! thresholds (the perfdata rules it builds are `evaluate::Rule`s the caller steps).
//!
//! Reference: the Monitoring Plugins Development Guidelines
//! (<https://www.monitoring-plugins.org/doc/guidelines.html>), sections "Plugin Return
//! Codes", "Plugin Output for Nagios" and "Performance data".

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::evaluate::{Direction, Rule, State};
use crate::exec::{ExitKind, Outcome, Spec};
use crate::settings::Validator;

/// Where Debian's `monitoring-plugins-basic` installs the standard plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/nagios/plugins";

/// Default check interval (Nagios' default `check_interval` of one minute).
pub const DEFAULT_EXEC_INTERVAL: &str = "60s";

/// Longest check name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Longest [`PluginOutput::summary`], in bytes (cut on a character boundary).
pub const MAX_SUMMARY_LEN: usize = 1024;

/// A plugin's verdict, from its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// Exit code 0.
    Ok,
    /// Exit code 1.
    Warning,
    /// Exit code 2.
    Critical,
    /// Exit code 3, and also: any other exit code, death by a signal, a timeout, or a
    /// program that could not be started. A check that cannot say is never OK.
    Unknown,
}

impl PluginState {
    /// The state a run ended in (see the variants for the mapping).
    pub fn from_exit(status: &ExitKind) -> Self {
        match status {
            ExitKind::Exited(0) => PluginState::Ok,
            ExitKind::Exited(1) => PluginState::Warning,
            ExitKind::Exited(2) => PluginState::Critical,
            _ => PluginState::Unknown,
        }
    }

    /// Upper-case name as plugins print it (`"OK"`, `"WARNING"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PluginState::Ok => "OK",
            PluginState::Warning => "WARNING",
            PluginState::Critical => "CRITICAL",
            PluginState::Unknown => "UNKNOWN",
        }
    }
}

impl From<PluginState> for State {
    /// The evaluator's state of the same name (a plugin does its own holding, so there is
    /// no `Pending`).
    fn from(s: PluginState) -> Self {
        match s {
            PluginState::Ok => State::Ok,
            PluginState::Warning => State::Warning,
            PluginState::Critical => State::Critical,
            PluginState::Unknown => State::Unknown,
        }
    }
}

/// One performance-data item, `'label'=value[UOM];[warn];[crit];[min];[max]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfDatum {
    /// Label, unquoted (`''` in a quoted label becomes `'`). Never empty.
    pub label: String,
    /// Value, finite, in `uom`.
    pub value: f64,
    /// Unit as printed: usually one of `s ms us % B KB MB TB c`, others (`GB`, `KiB`)
    /// kept as they are; empty for a plain number.
    pub uom: String,
    /// Warning range as printed (e.g. `"80"`, `"10:"`, `"@5:10"`); `None` when empty.
    pub warn: Option<String>,
    /// Critical range as printed; `None` when empty.
    pub crit: Option<String>,
    /// Minimum possible value; `None` when empty or not a number.
    pub min: Option<f64>,
    /// Maximum possible value; `None` when empty or not a number.
    pub max: Option<f64>,
}

/// A plugin run, interpreted.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOutput {
    /// From the exit status (see [`PluginState`]).
    pub state: PluginState,
    /// First line of stdout before any `|`, trimmed, at most [`MAX_SUMMARY_LEN`] bytes.
    /// When the run did not end with exit code 0–3 it says why first (`"exit code 127 is
    /// outside 0-3: …"`, `"killed by signal 9"`, `"timed out after 10.0s"`, `"cannot run:
    /// …"`); with no stdout at all it falls back to the first line of stderr.
    pub summary: String,
    /// Every valid item from the perfdata parts of stdout (after the first `|` of line 1,
    /// and after the first `|` in the long text up to the end). Empty unless the plugin
    /// exited by itself: a killed plugin's output may be cut anywhere.
    pub perfdata: Vec<PerfDatum>,
    /// Lines 2.. of stdout up to the perfdata `|`, trailing whitespace trimmed.
    pub long_text: String,
}

/// Interprets a finished plugin run: state from the exit status, summary, long text and
/// performance data from stdout (multi-line form included: `TEXT|PERF` on line 1, long
/// text lines after, and after a second `|` more perfdata to the end).
pub fn parse_output(exit: &Outcome) -> PluginOutput {
    let state = PluginState::from_exit(&exit.status);
    let mut lines = exit.stdout.lines();
    let first = lines.next().unwrap_or("");
    let (text, mut perf) = match first.split_once('|') {
        Some((t, p)) => (t.trim(), p.to_owned()),
        None => (first.trim(), String::new()),
    };
    let mut long = Vec::new();
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf.push(' ');
            perf.push_str(line);
        } else if let Some((t, p)) = line.split_once('|') {
            long.push(t);
            perf.push(' ');
            perf.push_str(p);
            in_perf = true;
        } else {
            long.push(line);
        }
    }
    let long_text = long.join("\n").trim_end().to_owned();

    let text = if text.is_empty() {
        exit.stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
    } else {
        text
    };
    let joined = |why: String| {
        if text.is_empty() {
            why
        } else {
            format!("{why}: {text}")
        }
    };
    let summary = match &exit.status {
        ExitKind::Exited(0..=3) if text.is_empty() => "(no output)".to_owned(),
        ExitKind::Exited(0..=3) => text.to_owned(),
        ExitKind::Exited(code) => joined(format!("exit code {code} is outside 0-3")),
        ExitKind::Signaled(sig) => joined(format!("killed by signal {sig}")),
        ExitKind::TimedOut => format!("timed out after {:.1}s", exit.duration.as_secs_f64()),
        ExitKind::SpawnFailed(m) => format!("cannot run: {m}"),
    };
    let perfdata = if matches!(exit.status, ExitKind::Exited(_)) {
        parse_perfdata(&perf)
    } else {
        Vec::new()
    };
    PluginOutput {
        state,
        summary: cut(summary, MAX_SUMMARY_LEN),
        perfdata,
        long_text,
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Parses space-separated perfdata items `'label'=value[UOM];[warn];[crit];[min];[max]`.
/// Lenient: malformed items (no `=`, unterminated quote, empty label, value `U` or not a
/// number, decimal comma) are skipped; never panics.
pub fn parse_perfdata(s: &str) -> Vec<PerfDatum> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return out;
        }
        let (label, after) = if let Some(quoted) = rest.strip_prefix('\'') {
            match quoted_label(quoted) {
                Some(pair) => pair,
                None => {
                    rest = skip_token(rest);
                    continue;
                }
            }
        } else {
            let end = rest
                .find(|c: char| c == '=' || c.is_whitespace())
                .unwrap_or(rest.len());
            (rest[..end].to_owned(), &rest[end..])
        };
        let Some(after) = after.strip_prefix('=') else {
            rest = skip_token(after);
            continue;
        };
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let (item, next) = after.split_at(end);
        rest = next;
        if let Some(d) = datum(label, item) {
            out.push(d);
        }
    }
}

/// After an opening quote: the label up to the closing quote (`''` is a literal quote) and
/// the text after it; `None` when unterminated.
fn quoted_label(s: &str) -> Option<(String, &str)> {
    let mut label = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                chars.next();
                label.push('\'');
            } else {
                return Some((label, &s[i + 1..]));
            }
        } else {
            label.push(c);
        }
    }
    None
}

fn skip_token(s: &str) -> &str {
    &s[s.find(char::is_whitespace).unwrap_or(s.len())..]
}

fn datum(label: String, item: &str) -> Option<PerfDatum> {
    if label.is_empty() {
        return None;
    }
    let mut fields = item.split(';');
    let (value, uom) = split_number(fields.next()?)?;
    if uom.chars().any(|c| c.is_ascii_digit() || c == ',') {
        return None; // "1,5s" (decimal comma), "1.2.3"
    }
    let range = |f: Option<&str>| {
        f.map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
    };
    let number = |f: Option<&str>| f.and_then(split_number).map(|(n, _)| n);
    Some(PerfDatum {
        label,
        value,
        uom: uom.to_owned(),
        warn: range(fields.next()),
        crit: range(fields.next()),
        min: number(fields.next()),
        max: number(fields.next()),
    })
}

/// A leading decimal number (`-1.5`, `.5`, `2e3`) and the rest; `None` when there is no
/// number or it is not finite.
fn split_number(s: &str) -> Option<(f64, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let mut n = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        n += digits(&mut i);
    }
    if n == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if digits(&mut j) > 0 {
            i = j;
        }
    }
    let v: f64 = s[..i].parse().ok()?;
    v.is_finite().then_some((v, &s[i..]))
}

/// One `[[exec]]` check as written in the config.
///
/// ```toml
/// [[exec]]
/// name = "postgres_connections"
/// command = ["/usr/lib/nagios/plugins/check_procs", "-w", "1:", "-c", "1:", "-C", "postgres"]
/// timeout = "10s"
/// interval = "60s"
/// env = { PGHOST = "/run/postgresql" }
/// [exec.perfdata.procs]
/// critical = 1
/// direction = "below"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawExecCheck {
    /// Unique check name: 1 to [`MAX_NAME_LEN`] bytes of `A-Z a-z 0-9 _ . : -`.
    pub name: String,
    /// Argument vector, run without a shell: `argv[0]` is an absolute path or a name
    /// looked up on the child's `PATH` at validation time.
    pub command: Vec<String>,
    /// Run time limit (e.g. `"10s"`); empty = the caller's default.
    pub timeout: String,
    /// Time between runs, default [`DEFAULT_EXEC_INTERVAL`].
    pub interval: String,
    /// How long a WARNING or CRITICAL result must last before the check fires.
    #[serde(rename = "for")]
    pub hold_for: String,
    /// Extra environment for the plugin (added to `PATH` and `LC_ALL=C`, see `exec`).
    pub env: BTreeMap<String, String>,
    /// Thresholds on perfdata values, by perfdata label.
    pub perfdata: BTreeMap<String, RawPerfRule>,
}

impl Default for RawExecCheck {
    fn default() -> Self {
        RawExecCheck {
            name: String::new(),
            command: Vec::new(),
            timeout: String::new(),
            interval: DEFAULT_EXEC_INTERVAL.to_owned(),
            hold_for: "0s".to_owned(),
            env: BTreeMap::new(),
            perfdata: BTreeMap::new(),
        }
    }
}

/// A threshold on one perfdata label, e.g. `connections`: warning 80, critical 100.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPerfRule {
    /// Warning level, in the datum's unit.
    pub warning: Option<f64>,
    /// Critical level, in the datum's unit.
    pub critical: Option<f64>,
    /// `"above"` (default) or `"below"`.
    pub direction: String,
    /// How long a breach must hold (e.g. `"2m"`), default `"0s"`.
    #[serde(rename = "for")]
    pub hold_for: String,
}

impl Default for RawPerfRule {
    fn default() -> Self {
        RawPerfRule {
            warning: None,
            critical: None,
            direction: "above".to_owned(),
            hold_for: "0s".to_owned(),
        }
    }
}

/// A validated exec check.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecCheck {
    /// Unique name.
    pub name: String,
    /// What to run: `argv[0]` resolved to an absolute path, the check's `env`, the
    /// timeout, and the `exec` defaults for kill grace and output size.
    pub spec: Spec,
    /// Time between runs.
    pub interval: Duration,
    /// How long a WARNING or CRITICAL result must last before the check fires.
    pub hold_for: Duration,
    /// Thresholds by perfdata label, in label order.
    pub perf_rules: Vec<(String, Rule)>,
}

impl RawExecCheck {
    /// Converts into an [`ExecCheck`], recording every problem under `key` (e.g.
    /// `"exec.0"`, problems at `"exec.0.command"`, `"exec.0.perfdata.load1.warning"`).
    /// `default_timeout` applies when `timeout` is empty. Returns `None` when a problem
    /// was recorded. Name uniqueness across checks is [`validate_exec_checks`]'s job.
    pub fn validate(
        &self,
        v: &mut Validator<'_>,
        key: &str,
        default_timeout: Duration,
    ) -> Option<ExecCheck> {
        let mut ok = true;
        let problem = |v: &mut Validator<'_>, ok: &mut bool, field: &str, msg: String| {
            *ok = false;
            v.problem(&format!("{key}.{field}"), msg);
        };

        if self.name.is_empty() {
            problem(v, &mut ok, "name", "an exec check needs a name".to_owned());
        } else if self.name.len() > MAX_NAME_LEN {
            problem(
                v,
                &mut ok,
                "name",
                format!("{} bytes, at most {MAX_NAME_LEN}", self.name.len()),
            );
        } else if let Some(bad) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
        {
            problem(
                v,
                &mut ok,
                "name",
                format!(
                    "{:?} contains {bad:?}: use only letters, digits and _ . : -",
                    self.name
                ),
            );
        }

        let mut env = Vec::new();
        for (k, val) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || val.contains('\0') {
                problem(
                    v,
                    &mut ok,
                    &format!("env.{k}"),
                    "variable names must be non-empty without `=` or NUL, values without NUL"
                        .to_owned(),
                );
            } else {
                env.push((k.clone(), val.clone()));
            }
        }

        let mut argv = self.command.clone();
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            problem(
                v,
                &mut ok,
                "command",
                format!("argument {i} contains a NUL byte"),
            );
        }
        match argv.first().map(String::as_str) {
            None | Some("") => problem(
                v,
                &mut ok,
                "command",
                "needs the program and its arguments, e.g. \
                 [\"/usr/lib/nagios/plugins/check_load\", \"-w\", \"5,4,3\", \"-c\", \"10,8,6\"]"
                    .to_owned(),
            ),
            Some(program) => {
                let path = self
                    .env
                    .get("PATH")
                    .cloned()
                    .unwrap_or_else(crate::exec::child_path);
                match resolve_program(program, &path) {
                    Ok(abs) => argv[0] = abs,
                    Err(msg) => problem(v, &mut ok, "command", msg),
                }
            }
        }

        let timeout = if self.timeout.is_empty() {
            Some(default_timeout)
        } else {
            checked_duration(v, &format!("{key}.timeout"), &self.timeout, true)
        };
        let interval = checked_duration(v, &format!("{key}.interval"), &self.interval, true);
        let hold_for = checked_duration(v, &format!("{key}.for"), &self.hold_for, false);

        let mut perf_rules = Vec::new();
        for (label, raw) in &self.perfdata {
            let rkey = format!("{key}.perfdata.{label}");
            if label.is_empty() {
                problem(
                    v,
                    &mut ok,
                    &format!("perfdata.{label}"),
                    "a perfdata rule needs a non-empty label".to_owned(),
                );
            }
            match perf_rule(v, &rkey, raw) {
                Some(rule) => perf_rules.push((label.clone(), rule)),
                None => ok = false,
            }
        }
        let (Some(timeout), Some(interval), Some(hold_for)) = (timeout, interval, hold_for) else {
            return None;
        };

        ok.then(|| ExecCheck {
            name: self.name.clone(),
            spec: Spec {
                argv,
                env,
                cwd: None,
                timeout,
                kill_grace: crate::exec::DEFAULT_KILL_GRACE,
                max_output: crate::exec::DEFAULT_MAX_OUTPUT,
                keep_leftovers: false,
            },
            interval,
            hold_for,
            perf_rules,
        })
    }
}

/// A duration through the validator (which records any problem); `None` when invalid.
fn checked_duration(
    v: &mut Validator<'_>,
    key: &str,
    raw: &str,
    positive: bool,
) -> Option<Duration> {
    let d = if positive {
        v.positive_duration(key, raw, Duration::ZERO)
    } else {
        v.duration(key, raw, Duration::ZERO)
    };
    // Same acceptance as the validator's, so `None` exactly when it recorded a problem.
    crate::settings::parse_duration(raw)
        .is_some_and(|p| p <= crate::settings::MAX_DURATION && !(positive && p.is_zero()))
        .then_some(d)
}

/// Validates every `[[exec]]` entry (keys `"{prefix}.{index}"`) and that names are unique.
/// Returns the valid checks; every problem is recorded in `v`.
pub fn validate_exec_checks(
    raw: &[RawExecCheck],
    v: &mut Validator<'_>,
    prefix: &str,
    default_timeout: Duration,
) -> Vec<ExecCheck> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, check) in raw.iter().enumerate() {
        let key = format!("{prefix}.{i}");
        if !check.name.is_empty() && !seen.insert(check.name.as_str()) {
            v.problem(
                &format!("{key}.name"),
                format!("exec check {:?} is defined twice", check.name),
            );
        }
        out.extend(check.validate(v, &key, default_timeout));
    }
    out
}

/// `program` as an absolute path to an executable file: checked as is when it contains
/// a `/` (it must then be absolute), else looked up in the `:`-separated `path`. Also used
/// by the aggregator's recovery hooks.
///
/// # Errors
/// A message naming the program and why it cannot be run (relative path, missing, not a
/// regular file, not executable, not on `path`).
pub fn resolve_program(program: &str, path: &str) -> Result<String, String> {
    if program.contains('/') {
        if !program.starts_with('/') {
            return Err(format!(
                "{program:?} is a relative path: give an absolute path or a bare name found on PATH"
            ));
        }
        return executable(Path::new(program)).map(|()| program.to_owned());
    }
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p).is_ok())
        .and_then(|p| p.to_str().map(str::to_owned))
        .ok_or_else(|| {
            format!(
                "{program:?} not found on PATH {path:?}: give an absolute path, e.g. \"{PLUGIN_DIR}/{program}\""
            )
        })
}

fn executable(p: &Path) -> Result<(), String> {
    let md = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", p.display()));
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", p.display()));
    }
    Ok(())
}

/// Mirrors `config::validate_rule` for a perfdata threshold (no range limit: perfdata
/// units are the plugin's).
fn perf_rule(v: &mut Validator<'_>, key: &str, raw: &RawPerfRule) -> Option<Rule> {
    let mut ok = true;
    let direction = match raw.direction.as_str() {
        "above" => Direction::Above,
        "below" => Direction::Below,
        other => {
            v.problem(
                &format!("{key}.direction"),
                format!("invalid value {other:?} (expected \"above\" or \"below\")"),
            );
            ok = false;
            Direction::Above
        }
    };
    let hold_for = checked_duration(v, &format!("{key}.for"), &raw.hold_for, false);
    for (name, level) in [("warning", raw.warning), ("critical", raw.critical)] {
        if let Some(l) = level
            && !l.is_finite()
        {
            v.problem(
                &format!("{key}.{name}"),
                format!("{l} is not a finite number"),
            );
            ok = false;
        }
    }
    if raw.warning.is_none() && raw.critical.is_none() {
        v.problem(key, "needs a warning or a critical level");
        ok = false;
    }
    if let (Some(w), Some(c)) = (raw.warning, raw.critical) {
        let beyond = match direction {
            Direction::Above => w > c,
            Direction::Below => w < c,
        };
        if beyond {
            v.problem(
                &format!("{key}.warning"),
                format!(
                    "warning level {w} is beyond the critical level {c} for direction {:?}",
                    raw.direction
                ),
            );
            ok = false;
        }
    }
    let hold_for = hold_for?;
    ok.then_some(Rule {
        direction,
        warning: raw.warning,
        critical: raw.critical,
        hold_for,
        clear: None,
        clear_for: Duration::ZERO,
        inclusive: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::{RuleState, step};
    use proptest::prelude::*;

    fn outcome(status: ExitKind, stdout: &str) -> Outcome {
        Outcome {
            status,
            stdout: stdout.to_owned(),
            stderr: String::new(),
            duration: Duration::from_millis(5),
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    fn datum(label: &str, value: f64, uom: &str) -> PerfDatum {
        PerfDatum {
            label: label.to_owned(),
            value,
            uom: uom.to_owned(),
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }

    // ---- exit codes and output ----

    #[test]
    fn exit_codes_map_to_states() {
        for (code, state) in [
            (0, PluginState::Ok),
            (1, PluginState::Warning),
            (2, PluginState::Critical),
            (3, PluginState::Unknown),
            (4, PluginState::Unknown),
            (127, PluginState::Unknown),
            (-1, PluginState::Unknown),
        ] {
            assert_eq!(
                PluginState::from_exit(&ExitKind::Exited(code)),
                state,
                "{code}"
            );
        }
        for status in [
            ExitKind::Signaled(9),
            ExitKind::TimedOut,
            ExitKind::SpawnFailed("x".into()),
        ] {
            assert_eq!(PluginState::from_exit(&status), PluginState::Unknown);
        }
    }

    #[test]
    fn guideline_multi_line_example() {
        // The example of the plugin guidelines, "Plugin Output for Nagios".
        let out = parse_output(&outcome(
            ExitKind::Exited(0),
            "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
             / 15272 MB (77%);\n\
             /boot 68 MB (69%);\n\
             /home 69357 MB (27%);\n\
             /var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
             /home=69357MB;253404;253409;0;253414 \n\
             /var/log=818MB;970;975;0;980\n",
        ));
        assert_eq!(out.state, PluginState::Ok);
        assert_eq!(out.summary, "DISK OK - free space: / 3326 MB (56%);");
        assert_eq!(
            out.long_text,
            "/ 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%);\n/var/log 819 MB (84%); "
                .trim_end()
        );
        let labels: Vec<&str> = out.perfdata.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["/", "/boot", "/home", "/var/log"]);
        assert_eq!(
            out.perfdata[0],
            PerfDatum {
                label: "/".into(),
                value: 2643.0,
                uom: "MB".into(),
                warn: Some("5948".into()),
                crit: Some("5958".into()),
                min: Some(0.0),
                max: Some(5968.0),
            }
        );
        assert_eq!(out.perfdata[3].max, Some(980.0));
    }

    #[test]
    fn summary_without_perfdata_and_long_text() {
        let out = parse_output(&outcome(ExitKind::Exited(1), "  WARNING: hello  \n"));
        assert_eq!(out.state, PluginState::Warning);
        assert_eq!(out.summary, "WARNING: hello");
        assert!(out.perfdata.is_empty());
        assert_eq!(out.long_text, "");
    }

    #[test]
    fn failures_explain_themselves() {
        let mut o = outcome(ExitKind::Exited(127), "");
        o.stderr = "\nsh: 1: check_x: not found\n".into();
        let out = parse_output(&o);
        assert_eq!(out.state, PluginState::Unknown);
        assert_eq!(
            out.summary,
            "exit code 127 is outside 0-3: sh: 1: check_x: not found"
        );

        let out = parse_output(&outcome(ExitKind::Signaled(9), "OK | a=1"));
        assert_eq!(out.summary, "killed by signal 9: OK");
        assert!(
            out.perfdata.is_empty(),
            "a killed plugin's perfdata is not trusted"
        );

        let mut o = outcome(ExitKind::TimedOut, "partial | a=1");
        o.duration = Duration::from_millis(10_250);
        let out = parse_output(&o);
        assert_eq!(out.state, PluginState::Unknown);
        assert_eq!(out.summary, "timed out after 10.2s");

        let out = parse_output(&outcome(ExitKind::SpawnFailed("/x: denied".into()), ""));
        assert_eq!(out.summary, "cannot run: /x: denied");

        let out = parse_output(&outcome(ExitKind::Exited(0), ""));
        assert_eq!(out.summary, "(no output)");
    }

    #[test]
    fn summary_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(MAX_SUMMARY_LEN);
        let out = parse_output(&outcome(ExitKind::Exited(0), &long));
        assert_eq!(out.summary.len(), MAX_SUMMARY_LEN);
        let out = parse_output(&outcome(ExitKind::Exited(0), &format!("x{long}")));
        assert_eq!(out.summary.len(), MAX_SUMMARY_LEN - 1);
    }

    // ---- perfdata ----

    #[test]
    fn perfdata_forms() {
        let got = parse_perfdata(
            "time=0.000123s;;;0.000000;10.000000 'with space'=5% 'it''s'=3c \
             size=1.5GB;;;0 neg=-2.5e3;@1:2;~:5 bare=7",
        );
        assert_eq!(
            got,
            vec![
                PerfDatum {
                    min: Some(0.0),
                    max: Some(10.0),
                    ..datum("time", 0.000123, "s")
                },
                datum("with space", 5.0, "%"),
                datum("it's", 3.0, "c"),
                PerfDatum {
                    min: Some(0.0),
                    ..datum("size", 1.5, "GB")
                },
                PerfDatum {
                    warn: Some("@1:2".into()),
                    crit: Some("~:5".into()),
                    ..datum("neg", -2500.0, "")
                },
                datum("bare", 7.0, ""),
            ]
        );
    }

    #[test]
    fn malformed_items_are_skipped() {
        let got = parse_perfdata(
            "unknown=U;1;2 comma=1,5s noequals =3 ''=4 nan=nan x=1.2.3 \
             empty= ok=1 inf=inf big=1e999 after='quoted'",
        );
        let labels: Vec<&str> = got.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["ok"]);
    }

    #[test]
    fn unterminated_quote_skips_one_token() {
        let got = parse_perfdata("'a b=1 c=2");
        let labels: Vec<&str> = got.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["b", "c"]);
    }

    #[test]
    fn min_max_with_units_and_garbage() {
        let got = parse_perfdata("a=1;;;0%;x");
        assert_eq!(got[0].min, Some(0.0));
        assert_eq!(got[0].max, None);
    }

    fn label_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_/ '=;.-]{1,12}"
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = parse_perfdata(&s);
            let _ = parse_output(&outcome(ExitKind::Exited(0), &s));
        }

        #[test]
        fn arbitrary_perf_like_strings_never_panic(s in "[ a-z'=;.,0-9%|U@:~-]{0,64}") {
            for d in parse_perfdata(&s) {
                prop_assert!(!d.label.is_empty());
                prop_assert!(d.value.is_finite());
            }
        }

        /// Items written the way the guidelines say are read back exactly.
        #[test]
        fn well_formed_items_round_trip(
            items in proptest::collection::vec(
                (
                    label_strategy(),
                    -1e12f64..1e12,
                    proptest::sample::select(vec!["", "s", "ms", "us", "%", "B", "KB", "MB", "TB", "c", "GB"]),
                    proptest::option::of(0u32..1000),
                    proptest::option::of(-5.0f64..5.0),
                ),
                0..8,
            )
        ) {
            let text: Vec<String> = items
                .iter()
                .map(|(label, value, uom, warn, min)| {
                    format!(
                        "'{}'={value}{uom};{};;{};",
                        label.replace('\'', "''"),
                        warn.map(|w| w.to_string()).unwrap_or_default(),
                        min.map(|m| m.to_string()).unwrap_or_default(),
                    )
                })
                .collect();
            let got = parse_perfdata(&text.join(" "));
            let want: Vec<PerfDatum> = items
                .iter()
                .map(|(label, value, uom, warn, min)| PerfDatum {
                    warn: warn.map(|w| w.to_string()),
                    min: *min,
                    ..datum(label, *value, uom)
                })
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    // ---- config ----

    fn validate(raw: &[RawExecCheck]) -> Result<Vec<ExecCheck>, Vec<(String, String)>> {
        let fig = figment::Figment::new();
        let mut v = Validator::new(&fig);
        let checks = validate_exec_checks(raw, &mut v, "exec", Duration::from_secs(10));
        v.finish(checks).map_err(|e| match e {
            crate::settings::ConfigError::Invalid(ps) => {
                ps.into_iter().map(|p| (p.key, p.message)).collect()
            }
            other => vec![(String::new(), other.to_string())],
        })
    }

    fn raw(name: &str, command: &[&str]) -> RawExecCheck {
        RawExecCheck {
            name: name.into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..RawExecCheck::default()
        }
    }

    fn one_problem(raw: RawExecCheck) -> (String, String) {
        let mut problems = validate(&[raw]).expect_err("invalid");
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.remove(0)
    }

    #[test]
    fn valid_check_with_defaults() {
        let checks = validate(&[raw("true", &["/bin/true"])]).expect("valid");
        let c = &checks[0];
        assert_eq!(c.name, "true");
        assert_eq!(c.spec.argv, ["/bin/true"]);
        assert_eq!(c.spec.timeout, Duration::from_secs(10));
        assert_eq!(c.interval, Duration::from_secs(60));
        assert!(c.perf_rules.is_empty());
    }

    #[test]
    fn config_from_toml() {
        #[derive(Deserialize)]
        struct Doc {
            exec: Vec<RawExecCheck>,
        }
        let doc: Doc = toml::from_str(
            r#"
            [[exec]]
            name = "db:connections"
            command = ["sh", "-c", "echo 'OK | connections=42;80;100'"]
            timeout = "3s"
            interval = "30s"
            env = { PGHOST = "/run/postgresql" }
            [exec.perfdata.connections]
            warning = 80
            critical = 100
            for = "1m"
            "#,
        )
        .expect("toml");
        let checks = validate(&doc.exec).expect("valid");
        let c = &checks[0];
        assert!(c.spec.argv[0].starts_with('/') && c.spec.argv[0].ends_with("/sh"));
        assert_eq!(c.spec.timeout, Duration::from_secs(3));
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(
            c.spec.env,
            [("PGHOST".to_owned(), "/run/postgresql".to_owned())]
        );
        let (label, rule) = &c.perf_rules[0];
        assert_eq!(label, "connections");
        assert_eq!(rule.direction, Direction::Above);
        assert_eq!((rule.warning, rule.critical), (Some(80.0), Some(100.0)));
        assert_eq!(rule.hold_for, Duration::from_secs(60));

        let unknown: Result<Doc, _> = toml::from_str("[[exec]]\nname = \"a\"\ncmd = [\"x\"]\n");
        assert!(unknown.is_err(), "unknown keys are refused");
    }

    #[test]
    fn invalid_names() {
        let (k, m) = one_problem(raw("", &["/bin/true"]));
        assert_eq!(
            (k.as_str(), m.as_str()),
            ("exec.0.name", "an exec check needs a name")
        );
        let (k, m) = one_problem(raw("has space", &["/bin/true"]));
        assert_eq!(k, "exec.0.name");
        assert!(m.contains("' '"), "{m}");
        let (_, m) = one_problem(raw(&"a".repeat(201), &["/bin/true"]));
        assert_eq!(m, "201 bytes, at most 200");
        assert!(validate(&[raw(&"a".repeat(200), &["/bin/true"])]).is_ok());
    }

    #[test]
    fn duplicate_names() {
        let problems =
            validate(&[raw("a", &["/bin/true"]), raw("a", &["/bin/true"])]).expect_err("dup");
        assert_eq!(
            problems,
            [(
                "exec.1.name".to_owned(),
                "exec check \"a\" is defined twice".to_owned()
            )]
        );
    }

    #[test]
    fn invalid_commands_name_key_and_path() {
        let (k, m) = one_problem(raw("a", &[]));
        assert_eq!(k, "exec.0.command");
        assert!(m.starts_with("needs the program"), "{m}");
        let (k, m) = one_problem(raw("a", &["/nonexistent/check_x"]));
        assert_eq!(k, "exec.0.command");
        assert!(m.starts_with("/nonexistent/check_x: No such file"), "{m}");
        let (_, m) = one_problem(raw("a", &["bin/true"]));
        assert!(m.contains("relative path"), "{m}");
        let (_, m) = one_problem(raw("a", &["/tmp"]));
        assert_eq!(m, "/tmp is not a regular file");
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").expect("write");
        let (_, m) = one_problem(raw("a", &[plain.to_str().expect("utf-8")]));
        assert!(m.ends_with("plain is not executable"), "{m}");

        let mut r = raw("a", &["tocsin_no_such_plugin"]);
        r.env.insert("PATH".into(), "/usr/bin:/bin".into());
        let (k, m) = one_problem(r);
        assert_eq!(k, "exec.0.command");
        assert_eq!(
            m,
            "\"tocsin_no_such_plugin\" not found on PATH \"/usr/bin:/bin\": give an absolute path, \
             e.g. \"/usr/lib/nagios/plugins/tocsin_no_such_plugin\""
        );
    }

    #[test]
    fn bare_names_resolve_on_the_check_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prog = dir.path().join("check_here");
        std::fs::write(&prog, "#!/bin/sh\necho OK\n").expect("write");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut r = raw("a", &["check_here", "-v"]);
        r.env.insert(
            "PATH".into(),
            format!("relative:{}:/bin", dir.path().display()),
        );
        let checks = validate(&[r]).expect("valid");
        assert_eq!(checks[0].spec.argv, [prog.to_str().expect("utf-8"), "-v"]);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut r = raw("bad name", &["/nonexistent"]);
        r.timeout = "0s".into();
        r.interval = "5 minutes".into();
        r.env.insert("A=B".into(), "x".into());
        r.perfdata.insert(
            "load1".into(),
            RawPerfRule {
                warning: Some(5.0),
                critical: Some(1.0),
                direction: "sideways".into(),
                hold_for: "soon".into(),
            },
        );
        r.perfdata.insert("empty".into(), RawPerfRule::default());
        r.perfdata.insert(
            "inf".into(),
            RawPerfRule {
                critical: Some(f64::INFINITY),
                ..RawPerfRule::default()
            },
        );
        let problems = validate(&[r]).expect_err("invalid");
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "exec.0.name",
                "exec.0.env.A=B",
                "exec.0.command",
                "exec.0.timeout",
                "exec.0.interval",
                "exec.0.perfdata.empty",
                "exec.0.perfdata.inf.critical",
                "exec.0.perfdata.load1.direction",
                "exec.0.perfdata.load1.for",
                "exec.0.perfdata.load1.warning",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn below_rules_order_levels_the_other_way() {
        let mut r = raw("a", &["/bin/true"]);
        r.perfdata.insert(
            "free".into(),
            RawPerfRule {
                warning: Some(20.0),
                critical: Some(10.0),
                direction: "below".into(),
                ..RawPerfRule::default()
            },
        );
        let checks = validate(&[r]).expect("valid");
        assert_eq!(checks[0].perf_rules[0].1.direction, Direction::Below);
    }

    // ---- real plugins (Debian monitoring-plugins-basic) ----

    /// The path of a standard plugin; fails (never skips) when the package is missing.
    fn plugin(name: &str) -> String {
        let path = format!("{PLUGIN_DIR}/{name}");
        assert!(
            Path::new(&path).exists(),
            "{path} is missing: these tests need the Nagios plugins; install them with \
             `apt-get install monitoring-plugins-basic`"
        );
        path
    }

    async fn run_plugin(argv: &[&str]) -> PluginOutput {
        let mut spec = Spec::new(argv.iter().map(|s| (*s).to_owned()).collect());
        spec.timeout = Duration::from_secs(20);
        let out = crate::exec::run(&spec).await;
        parse_output(&out)
    }

    fn perf<'a>(out: &'a PluginOutput, label: &str) -> &'a PerfDatum {
        out.perfdata
            .iter()
            .find(|d| d.label == label)
            .unwrap_or_else(|| panic!("no perfdata {label:?} in {out:#?}"))
    }

    #[tokio::test]
    async fn check_load_ok_with_perfdata() {
        let out = run_plugin(&[
            &plugin("check_load"),
            "-w",
            "1000,1000,1000",
            "-c",
            "2000,2000,2000",
        ])
        .await;
        assert_eq!(out.state, PluginState::Ok, "{out:#?}");
        assert!(out.summary.starts_with("LOAD OK"), "{out:#?}");
        for label in ["load1", "load5", "load15"] {
            let d = perf(&out, label);
            assert!(d.value >= 0.0);
            assert_eq!(d.uom, "");
            assert_eq!(d.warn.as_deref(), Some("1000.000"));
            assert_eq!(d.crit.as_deref(), Some("2000.000"));
            assert_eq!(d.min, Some(0.0));
        }
    }

    #[tokio::test]
    async fn check_load_zero_thresholds_alert() {
        let out = run_plugin(&[&plugin("check_load"), "-w", "0,0,0", "-c", "0,0,0"]).await;
        assert!(
            matches!(out.state, PluginState::Critical | PluginState::Warning),
            "{out:#?}"
        );
        assert_eq!(perf(&out, "load1").warn.as_deref(), Some("0.000"));
    }

    #[tokio::test]
    async fn check_disk_root() {
        let out = run_plugin(&[&plugin("check_disk"), "-w", "1%", "-c", "1%", "-p", "/"]).await;
        assert_ne!(out.state, PluginState::Unknown, "{out:#?}");
        assert!(out.summary.starts_with("DISK"), "{out:#?}");
        let d = perf(&out, "/");
        assert!(
            ["B", "KB", "MB", "GB", "TB"].contains(&d.uom.as_str()),
            "{d:?}"
        );
        assert!(d.value > 0.0);
        assert!(d.max.is_some_and(|m| m >= d.value), "{d:?}");
    }

    #[tokio::test]
    async fn check_procs_counts_a_process_we_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A copy of sleep under a unique command name.
        let name = format!("tocsin{}", std::process::id() % 100_000);
        let bin = dir.path().join(&name);
        std::fs::copy("/bin/sleep", &bin).expect("copy sleep");
        let mut sleeper = std::process::Command::new(&bin)
            .arg("30")
            .spawn()
            .expect("spawn");
        let check = plugin("check_procs");
        let argv = [check.as_str(), "-w", "1:", "-c", "1:", "-C", name.as_str()];
        let running = run_plugin(&argv).await;
        sleeper.kill().expect("kill");
        sleeper.wait().expect("reap");
        let gone = run_plugin(&argv).await;

        assert_eq!(running.state, PluginState::Ok, "{running:#?}");
        assert_eq!(perf(&running, "procs").value, 1.0);
        assert_eq!(gone.state, PluginState::Critical, "{gone:#?}");
        assert_eq!(perf(&gone, "procs").value, 0.0);
        assert_eq!(perf(&gone, "procs").crit.as_deref(), Some("1:"));
    }

    #[tokio::test]
    async fn check_tcp_open_and_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().expect("addr").port().to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port().to_string()
        };
        let check = plugin("check_tcp");
        let up = run_plugin(&[&check, "-H", "127.0.0.1", "-p", &open, "-t", "5"]).await;
        assert_eq!(up.state, PluginState::Ok, "{up:#?}");
        assert_eq!(perf(&up, "time").uom, "s");
        let down = run_plugin(&[&check, "-H", "127.0.0.1", "-p", &closed, "-t", "5"]).await;
        assert_eq!(down.state, PluginState::Critical, "{down:#?}");
        assert!(down.summary.contains("Connection refused"), "{down:#?}");
        drop(listener);
    }

    #[tokio::test]
    async fn exec_check_end_to_end_with_perf_rule() {
        // A bare plugin name resolved on the check's own PATH, run, parsed and evaluated.
        let mut r = raw(
            "load",
            &["check_load", "-w", "1000,1000,1000", "-c", "2000,2000,2000"],
        );
        let _ = plugin("check_load");
        r.env
            .insert("PATH".into(), format!("{PLUGIN_DIR}:/usr/bin:/bin"));
        r.perfdata.insert(
            "load1".into(),
            RawPerfRule {
                warning: Some(-2.0),
                critical: Some(-1.0),
                ..RawPerfRule::default()
            },
        );
        let checks = validate(&[r]).expect("valid");
        let check = &checks[0];
        assert_eq!(check.spec.argv[0], format!("{PLUGIN_DIR}/check_load"));
        let out = parse_output(&crate::exec::run(&check.spec).await);
        assert_eq!(out.state, PluginState::Ok, "{out:#?}");
        let (label, rule) = &check.perf_rules[0];
        let value = perf(&out, label).value;
        let mut st = RuleState::initial(Duration::ZERO);
        let t = step(rule, &mut st, Some(value), Duration::ZERO).expect("transition");
        // A load is never below zero, so a critical level of -1 "above" always breaches.
        assert_eq!(t.to, State::Critical);
    }

    #[tokio::test]
    async fn a_hung_plugin_is_unknown() {
        let mut spec = Spec::new(vec!["/bin/sleep".into(), "30".into()]);
        spec.timeout = Duration::from_millis(100);
        spec.kill_grace = Duration::from_millis(100);
        let out = parse_output(&crate::exec::run(&spec).await);
        assert_eq!(out.state, PluginState::Unknown);
        assert!(out.summary.starts_with("timed out after"), "{out:#?}");
    }
}
