//! Config loading shared by every tocsin binary: figment merging (defaults → TOML file →
//! environment), error messages that name the file, key and accepted form, and the
//! typed parsers of the validation stage (durations, socket addresses, endpoints).
//!
//! It owns no config struct of its own: each daemon declares its raw struct (strings,
//! `deny_unknown_fields`) and converts it with a [`Validator`], which collects **every**
//! problem before failing.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The accepted form of a duration, quoted in error messages.
pub const DURATION_FORM: &str =
    "a number with a unit ms, s, m, h or d, e.g. \"500ms\", \"5s\", \"1m30s\"";

/// Longest duration any setting accepts (a typo such as "100000000000d" would otherwise
/// mean "never").
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A config that could not be loaded. `Display` lists every problem, one per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys or wrong types, and failed validations.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One config problem: where it came from, which key, what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// "FILE" or "FILE:LINE", "environment variable NAME", or "defaults".
    pub origin: String,
    /// Dotted key path, e.g. `aggregator.endpoints`; empty for whole-file errors.
    pub key: String,
    /// What is wrong, with the bad value and the accepted form.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.origin, self.key, self.message)
        }
    }
}

/// One environment variable as a figment provider. The value stays a string (so
/// `TOCSIN_AGENT_ID=1234` is the string "1234"; numeric fields accept it through
/// figment's lossy extraction), except that a value starting with `[` or `{` is parsed
/// as an array or table (`TOCSIN_AGENT_AGGREGATOR__ENDPOINTS='["http://a:7601"]'`).
#[derive(Debug, Clone)]
pub struct EnvVar {
    var: String,
    key: String,
    value: String,
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.var))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let trimmed = self.value.trim_start();
        let value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
            self.value
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(self.value.clone()))
        } else {
            Value::from(self.value.clone())
        };
        let dict = match figment::util::nest(&self.key, value) {
            Value::Dict(_, d) => d,
            _ => Dict::new(),
        };
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// Environment providers: variables under `prefix` (e.g. `TOCSIN_AGENT_`; `__`
/// separates nesting levels and names are lower-cased, so
/// `TOCSIN_AGENT_AGGREGATOR__BACKOFF_MAX` is `aggregator.backoff_max`), after `seed`:
/// variables of the seed's own names mapped onto keys. `PREFIX + CONFIG` (the `--config`
/// variable) is not a key.
pub fn env_providers(prefix: &str, seed: &[(&str, &str)]) -> Vec<EnvVar> {
    let mut out = Vec::new();
    for (var, key) in seed {
        if let Ok(value) = std::env::var(var) {
            out.push(EnvVar {
                var: (*var).to_owned(),
                key: (*key).to_owned(),
                value,
            });
        }
    }
    let mut prefixed: Vec<EnvVar> = std::env::vars()
        .filter_map(|(var, value)| {
            let rest = var.strip_prefix(prefix)?;
            if rest == "CONFIG" || rest.is_empty() {
                return None;
            }
            let key = rest.to_lowercase().replace("__", ".");
            Some(EnvVar { var, key, value })
        })
        .collect();
    prefixed.sort_by(|a, b| a.var.cmp(&b.var));
    out.extend(prefixed);
    out
}

/// Builds the figment for a binary: `defaults`, then the TOML `file` (which must exist
/// when given), then the environment providers (see [`env_providers`]).
///
/// # Errors
/// [`ConfigError::Read`] when `file` does not exist or cannot be read.
pub fn figment<T: Serialize>(
    defaults: &T,
    file: Option<&Path>,
    env: Vec<EnvVar>,
) -> Result<Figment, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        // figment silently skips a missing file; a missing --config is a mistake.
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        fig = fig.merge(Toml::file_exact(path));
    }
    for var in env {
        fig = fig.merge(var);
    }
    Ok(fig)
}

/// Most type problems [`extract`] reports from one config (a bound on its retries).
const MAX_TYPE_PROBLEMS: usize = 64;

/// Extracts the raw struct, turning figment's errors into [`Problem`]s.
///
/// serde stops at the first value of a wrong type or unknown key, so after a failure
/// the offending key is dropped from a copy of the merged data and the extraction is
/// tried again, until it succeeds (at most `MAX_TYPE_PROBLEMS` (64) rounds): every such
/// problem is reported at once, each with the origin of the key in the real config.
///
/// # Errors
/// [`ConfigError::Invalid`] with every problem found.
pub fn extract<T: DeserializeOwned>(fig: &Figment) -> Result<T, ConfigError> {
    let errors = match fig.extract_lossy::<T>() {
        Ok(value) => return Ok(value),
        Err(errors) => errors,
    };
    let mut problems: Vec<Problem> = errors
        .into_iter()
        .map(|e| problem_from_figment(fig, e))
        .collect();
    let profile = fig.profile().clone();
    let Some(mut data) = fig
        .data()
        .ok()
        .and_then(|mut by_profile| by_profile.remove(&profile))
    else {
        return Err(ConfigError::Invalid(problems));
    };
    while problems.len() < MAX_TYPE_PROBLEMS {
        let Some(last) = problems.last() else { break };
        if last.key.is_empty() || !remove_key(&mut data, &last.key) {
            break;
        }
        let retry = Figment::from(Serialized::from(&data, profile.clone()));
        let Err(errors) = retry.extract_lossy::<T>() else {
            break;
        };
        let before = problems.len();
        for mut e in errors {
            // The retry's data is serialized: name the origin from the real config.
            e.metadata = None;
            let p = problem_from_figment(fig, e);
            // A key dropped for its type is not also "missing".
            if !problems.iter().any(|q| q.key == p.key) {
                problems.push(p);
            }
        }
        if problems.len() == before {
            break;
        }
    }
    Err(ConfigError::Invalid(problems))
}

/// Removes the value at the dotted `key` (`process.1.min`) from `data`; whether it was
/// there.
fn remove_key(data: &mut Dict, key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((leaf, path)) = parts.split_last() else {
        return false;
    };
    let mut node: Option<&mut Value> = None;
    for (i, part) in path.iter().enumerate() {
        let next = if i == 0 {
            data.get_mut(*part)
        } else {
            match node {
                Some(Value::Dict(_, d)) => d.get_mut(*part),
                Some(Value::Array(_, a)) => part.parse::<usize>().ok().and_then(|n| a.get_mut(n)),
                _ => None,
            }
        };
        match next {
            Some(v) => node = Some(v),
            None => return false,
        }
    }
    match node {
        None => data.remove(*leaf).is_some(),
        Some(Value::Dict(_, d)) => d.remove(*leaf).is_some(),
        Some(Value::Array(_, a)) => match leaf.parse::<usize>() {
            Ok(n) if n < a.len() => {
                a.remove(n);
                true
            }
            _ => false,
        },
        Some(_) => false,
    }
}

fn problem_from_figment(fig: &Figment, e: figment::Error) -> Problem {
    use figment::error::Kind;
    let mut key = e.path.join(".");
    let message = match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path may or may not end with the unknown field itself.
            if !key.ends_with(field.as_str()) {
                key = if key.is_empty() {
                    field.clone()
                } else {
                    format!("{key}.{field}")
                };
            }
            let expected: Vec<String> = expected.iter().map(|k| format!("`{k}`")).collect();
            format!("unknown key (accepted here: {})", expected.join(", "))
        }
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    };
    let origin = match &e.metadata {
        Some(md) => origin_of(md, &key),
        // figment finds no metadata inside arrays (`process.1.min`): the nearest
        // enclosing key that it knows names the source, the line is searched for `key`.
        None => std::iter::successors(Some(key.as_str()), |k| k.rsplit_once('.').map(|(h, _)| h))
            .find_map(|k| fig.find_metadata(k))
            .map_or_else(|| "config".to_owned(), |md| origin_of(md, &key)),
    };
    Problem {
        origin,
        key,
        message,
    }
}

/// Names where the value of `key` came from: the file (with the line of the key when
/// it can be found), the environment variable, or the built-in defaults.
fn origin_of(md: &Metadata, key: &str) -> String {
    match &md.source {
        Some(Source::File(path)) => match line_of(path, key) {
            Some(line) => format!("{}:{line}", path.display()),
            None => path.display().to_string(),
        },
        Some(Source::Custom(s)) => s.clone(),
        // figment names serialized defaults after their Rust type.
        _ if md.name.contains("::") => "defaults or command-line flags".to_owned(),
        _ => md.name.to_string(),
    }
}

/// Best-effort line number of `key` (`leaf = …`) in a TOML file. For keys inside an
/// array of tables (`process.1.name`) the search covers the second `[[process]]` only (up
/// to the next table header). A key not written as `leaf = …` of its own — inside an
/// inline table (`hook.0.env.TOCSIN_NODE`, `hook.0.on.match.0`) or missing (a required
/// `hook.0.name`) — gets the line of its nearest written parent (`env = {…}`, `on = {…}`),
/// else of its `[[hook]]` header.
fn line_of(path: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let segments: Vec<&str> = key.split('.').collect();
    let index_at = segments.iter().position(|s| s.parse::<usize>().is_ok());
    let (start, end) = match index_at {
        Some(pos) => {
            let index: usize = segments[pos].parse().ok()?;
            let header = format!("[[{}]]", segments[..pos].join("."));
            let start = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.trim() == header)
                .nth(index)
                .map(|(i, _)| i)?;
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(lines.len(), |n| start + 1 + n);
            (start, end)
        }
        None => (0, lines.len()),
    };
    let assigns = |leaf: &str| {
        lines[start..end]
            .iter()
            .position(|l| {
                let l = l.trim_start().trim_start_matches('"');
                l.strip_prefix(leaf).is_some_and(|rest| {
                    rest.trim_start()
                        .trim_start_matches('"')
                        .trim_start()
                        .starts_with('=')
                })
            })
            .map(|i| start + i + 1)
    };
    // The key itself, then its parents, down to the array element's header.
    for n in (1..=segments.len()).rev() {
        let leaf = segments[n - 1];
        if Some(n - 1) == index_at {
            return Some(start + 1);
        }
        if leaf.is_empty() || leaf.parse::<usize>().is_ok() {
            continue;
        }
        if let Some(line) = assigns(leaf) {
            return Some(line);
        }
    }
    None
}

/// Collects problems while a raw config is converted into typed values.
#[derive(Debug)]
pub struct Validator<'a> {
    fig: &'a Figment,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    /// A validator that attributes problems to the sources recorded in `fig`.
    pub fn new(fig: &'a Figment) -> Self {
        Validator {
            fig,
            problems: Vec::new(),
        }
    }

    /// Records a problem with `key`.
    pub fn problem(&mut self, key: &str, message: impl Into<String>) {
        // `process.0.name` may have no metadata of its own; the array `process` has.
        let table_key: String = key
            .split('.')
            .take_while(|seg| seg.parse::<usize>().is_err())
            .collect::<Vec<_>>()
            .join(".");
        let origin = self
            .fig
            .find_metadata(key)
            .or_else(|| self.fig.find_metadata(&table_key))
            .map_or_else(|| "config".to_owned(), |md| origin_of(md, key));
        self.problems.push(Problem {
            origin,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// Parses a duration; records a problem and returns `fallback` when invalid.
    pub fn duration(&mut self, key: &str, raw: &str, fallback: Duration) -> Duration {
        match parse_duration(raw) {
            Some(d) if d > MAX_DURATION => {
                self.problem(
                    key,
                    format!("{raw:?} is longer than the longest accepted duration, 365d"),
                );
                fallback
            }
            Some(d) => d,
            None => {
                self.problem(
                    key,
                    format!("invalid duration {raw:?} (expected {DURATION_FORM})"),
                );
                fallback
            }
        }
    }

    /// Like [`Validator::positive_duration`], but a bare number is seconds, as the
    /// seed writes its timeouts (`HEALTH_CHECK_TIMEOUT=10`).
    pub fn seconds_or_duration(&mut self, key: &str, raw: &str, fallback: Duration) -> Duration {
        match raw.trim().parse::<u64>() {
            Ok(secs) => self.positive_duration(key, &format!("{secs}s"), fallback),
            Err(_) => self.positive_duration(key, raw, fallback),
        }
    }

    /// Like [`Validator::duration`] but also requires a non-zero value.
    pub fn positive_duration(&mut self, key: &str, raw: &str, fallback: Duration) -> Duration {
        let d = self.duration(key, raw, fallback);
        if d.is_zero() && parse_duration(raw).is_some() {
            self.problem(key, format!("must be greater than zero, got {raw:?}"));
            return fallback;
        }
        d
    }

    /// Parses `IP:PORT`; records a problem and returns `None` when invalid.
    pub fn socket_addr(&mut self, key: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("invalid address {raw:?} (expected IP:PORT, e.g. \"127.0.0.1:7600\")"),
                );
                None
            }
        }
    }

    /// Checks an `http://HOST:PORT` or `https://HOST:PORT` endpoint URL.
    pub fn endpoint(&mut self, key: &str, raw: &str) -> Option<String> {
        let ok = ["http://", "https://"].iter().any(|scheme| {
            raw.strip_prefix(scheme).is_some_and(|rest| {
                let authority = rest.trim_end_matches('/');
                authority
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                    && !authority.contains('/')
            })
        });
        let ok = ok && raw.parse::<tonic::codegen::http::Uri>().is_ok();
        if ok {
            Some(raw.trim_end_matches('/').to_owned())
        } else {
            self.problem(
                key,
                format!(
                    "invalid endpoint {raw:?} (expected http://HOST:PORT or https://HOST:PORT, \
                     e.g. \"http://127.0.0.1:7601\" for the ingest or \"http://127.0.0.1:7600\" for the API)"
                ),
            );
            None
        }
    }

    /// Reads a secret file (token); trims surrounding whitespace. The content is never
    /// put in a message.
    pub fn secret_file(&mut self, key: &str, path: &str) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(e) => {
                self.problem(key, format!("cannot read {path}: {e}"));
                None
            }
        }
    }

    /// Reads a PEM file and checks that it holds a `-----BEGIN …{kind}-----` block.
    pub fn pem_file(&mut self, key: &str, path: &str, kind: &str) -> Option<String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.problem(key, format!("cannot read {path}: {e}"));
                return None;
            }
        };
        let has_block = text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.contains(kind));
        if has_block {
            Some(text)
        } else {
            self.problem(key, format!("{path} holds no PEM {kind} block"));
            None
        }
    }

    /// Ends validation: `Ok(value)` if no problem was recorded.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError::Invalid(self.problems))
        }
    }
}

/// Parses durations written as one or more `<number><unit>` parts, units `ms`, `s`,
/// `m`, `h`, `d` (e.g. `"250ms"`, `"5s"`, `"1m30s"`, `"0s"`). Returns `None` for anything
/// else, including unit words such as `"5minutes"` and bare numbers.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let s = raw.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::try_from_secs_f64(number * seconds_per_unit).ok()?)?;
    }
    Some(total)
}

/// Formats a duration in the form [`parse_duration`] reads back (e.g. `"1m30s"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_huge_duration_is_invalid_not_a_panic() {
        assert_eq!(
            parse_duration("10000000000000000000s10000000000000000000s"),
            None
        );
    }

    use super::*;

    #[test]
    fn durations_in_the_documented_form() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    }

    #[test]
    fn durations_rejected() {
        for bad in ["5minutes", "5", "", "s", "5 s", "-1s", "1x", "ms5"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [0, 1, 999, 1000, 90_000, 86_400_000 + 1] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Some(d));
        }
    }
}

/// Why a state directory could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the lock.
    #[error(
        "{dir} is in use by another running {what} (lock file {lock}); give each instance its own directory"
    )]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The kind of daemon.
        what: &'static str,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock {lock}: {source}")]
    Io {
        /// The lock file.
        lock: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// An exclusive claim on a state directory, released when dropped (or when the process
/// dies: it is an OS file lock, so a crash never leaves a stale lock behind).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Creates `dir` if needed and takes an exclusive lock on `dir/LOCK_NAME`, so two
/// daemons never share one store or spool.
///
/// # Errors
/// [`DirLockError::InUse`] when another process holds it.
pub fn lock_dir(dir: &Path, lock_name: &str, what: &'static str) -> Result<DirLock, DirLockError> {
    let lock = dir.join(lock_name);
    std::fs::create_dir_all(dir).map_err(|source| DirLockError::Io {
        lock: lock.clone(),
        source,
    })?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| DirLockError::Io {
            lock: lock.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(DirLockError::InUse {
            dir: dir.to_owned(),
            lock,
            what,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(DirLockError::Io { lock, source }),
    }
}

/// Parses the command line; on a usage error prints clap's message and returns exit code
/// 64 (help and version print and return 0).
///
/// # Errors
/// The exit code to return from `main`.
pub fn parse_args<P: clap::Parser>() -> Result<P, std::process::ExitCode> {
    P::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            std::process::ExitCode::from(64)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}
