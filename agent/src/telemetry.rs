//! Logging setup shared by the tocsin binaries: plain or JSON lines on stderr, filtered
//! by a tracing directive (`RUST_LOG` wins over the config's level).

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

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
    if EnvFilter::try_new(&raw.level).is_err() {
        v.problem(
            "log.level",
            format!(
                "invalid filter {:?} (expected e.g. \"info\" or \"tocsin_agent=debug\")",
                raw.level
            ),
        );
    }
    LogConfig {
        json,
        level: raw.level.clone(),
    }
}

/// Installs the global tracing subscriber. Safe to call more than once (later calls are
/// ignored), so tests and `tocsin up` can share it.
pub fn init(json: bool, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
