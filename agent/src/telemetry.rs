//! Logging setup shared by the tocsin binaries: plain or JSON lines on stderr, filtered
//! by a tracing directive (`RUST_LOG` wins over the config's level).

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::Validator;

/// `[log]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `"plain"` or `"json"`.
    pub format: String,
    /// A tracing filter, e.g. `"info"` or `"tocsin_agent=debug"`.
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "plain".into(),
            level: "info".into(),
        }
    }
}

/// Validated log settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// JSON lines instead of plain text.
    pub json: bool,
    /// tracing filter directive.
    pub level: String,
}

/// Validates `[log]`, recording problems under `log.*`.
pub fn validate(v: &mut Validator<'_>, raw: &RawLog) -> LogConfig {
    let json = match raw.format.as_str() {
        "plain" => false,
        "json" => true,
        other => {
            v.problem(
                "log.format",
                format!("invalid value {other:?} (expected \"plain\" or \"json\")"),
            );
            false
        }
    };
    if !valid_filter(&raw.level) {
        v.problem(
            "log.level",
            format!(
                "invalid filter {:?} (expected a level trace, debug, info, warn, error or off, \
                 optionally per target: \"info,tocsin_agent=debug\")",
                raw.level
            ),
        );
    }
    LogConfig {
        json,
        level: raw.level.clone(),
    }
}

/// Whether `filter` is a list of `LEVEL` or `TARGET=LEVEL` directives. Stricter than
/// tracing's `EnvFilter`, which reads a typo such as `"warnings"` as a target name and then logs
/// nothing at all.
pub fn valid_filter(filter: &str) -> bool {
    let level = |l: &str| {
        ["trace", "debug", "info", "warn", "error", "off"]
            .contains(&l.trim().to_ascii_lowercase().as_str())
    };
    !filter.trim().is_empty()
        && filter.split(',').all(|d| match d.split_once('=') {
            Some((target, l)) => !target.trim().is_empty() && level(l),
            None => level(d),
        })
}

/// Installs the global tracing subscriber. Safe to call more than once (later calls are
/// ignored), so tests and `tocsin up` can share it.
pub fn init(json: bool, level: &str) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty());
    let bad_env = from_env
        .as_deref()
        .filter(|f| !valid_filter(f))
        .map(str::to_owned);
    let chosen = from_env
        .filter(|f| valid_filter(f))
        .unwrap_or_else(|| level.to_owned());
    // `Targets` takes exactly the `LEVEL` / `TARGET=LEVEL` directives `valid_filter`
    // accepts, without the regex engine `EnvFilter` links in (agent RSS, issue 3).
    let directives: Vec<String> = chosen
        .split(',')
        .map(|d| match d.split_once('=') {
            Some((target, level)) => format!("{}={}", target.trim(), level.trim()),
            None => d.trim().to_owned(),
        })
        .collect();
    let filter: Targets = directives
        .join(",")
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry.with(layer.json()).try_init()
    } else {
        registry.with(layer).try_init()
    };
    if let Some(bad) = bad_env {
        tracing::warn!(rust_log = %bad, using = %chosen, "RUST_LOG is not a valid filter; ignored");
    }
}

/// An error and all its sources, joined with ": " (what `{:#}` gives for anyhow).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::valid_filter;

    #[test]
    fn filters() {
        for ok in [
            "info",
            "WARN",
            "info,tocsin_agent=debug",
            "tocsin_aggregator::notify=trace",
            "off",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["warnings", "verbose!!", "", "info,", "=debug", "x=loud"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }
}
