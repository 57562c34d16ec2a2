//! `tocsin-aggregator`: parse the command line, load the config, run. Exit codes: 0
//! clean, 64 bad usage or config, 1 runtime failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tocsin_aggregator::config;

/// The tocsin aggregator: ingests agent streams, opens and resolves incidents, sends
/// notifications and serves the API.
#[derive(Debug, Parser)]
#[command(name = "tocsin-aggregator", version)]
struct Cli {
    /// TOML config file (TOCSIN_AGGREGATOR_… environment variables override it).
    #[arg(long, short, global = true, env = "TOCSIN_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator (the default).
    Run,
    /// Validate the config and exit 0, or print every problem and exit 64.
    CheckConfig,
    /// Print the effective config (defaults, file and environment merged) as TOML.
    PrintConfig,
    /// Render a message template (`incident`, `status`, `email`, `email-subject`) with
    /// the configured overrides and vars, for a notification payload (the JSON a generic
    /// webhook receives) or a built-in sample incident; print it.
    RenderTemplate {
        /// Template: incident, status, email or email-subject.
        name: String,
        /// File holding a notification payload (tocsin's webhook JSON).
        #[arg(long, alias = "incident-json")]
        payload: Option<PathBuf>,
        /// Event of the sample payload: trigger, acknowledge, resolve, repeat or
        /// storm_summary.
        #[arg(long, default_value = "trigger")]
        event: String,
        /// The `channel` variable the template sees: slack, pagerduty, email or cli.
        #[arg(long, default_value = "cli")]
        channel: String,
    },
}

fn render_template(
    file: Option<&std::path::Path>,
    name: &str,
    payload: Option<&std::path::Path>,
    event: &str,
    channel: &str,
) -> ExitCode {
    use tocsin_aggregator::notify::template::{Name, sample_payload};
    let usage = |msg: String| {
        let _ = std::io::stderr().write_all(format!("tocsin-aggregator: {msg}\n").as_bytes());
        ExitCode::from(64)
    };
    let Some(name) = Name::parse(name) else {
        return usage(format!(
            "unknown template {name:?} (expected {})",
            Name::ALL.map(Name::short).join(", ")
        ));
    };
    let cfg = match config::load(file) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    let payload = match payload {
        None if tocsin_aggregator::notify::payload::EVENTS.contains(&event) => {
            sample_payload(event)
        }
        None => {
            return usage(format!(
                "unknown event {event:?} (expected {})",
                tocsin_aggregator::notify::payload::EVENTS.join(", ")
            ));
        }
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => return usage(format!("{}: {e}", path.display())),
        },
    };
    let text = cfg.templates.render(name, &payload, channel);
    std::io::stdout()
        .write_all(format!("{text}\n").as_bytes())
        .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

fn fail_config(e: &tocsin_agent::settings::ConfigError) -> ExitCode {
    let _ = std::io::stderr()
        .write_all(format!("tocsin-aggregator: invalid config:\n{e}\n").as_bytes());
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let cli: Cli = match tocsin_agent::settings::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let file = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => match config::load(file) {
            Ok(cfg) => {
                // Valid, but worth a look: said on stderr, exit 0.
                for w in tocsin_aggregator::hook::warnings(&cfg.routing) {
                    let _ = std::io::stderr()
                        .write_all(format!("tocsin-aggregator: warning: {w}\n").as_bytes());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail_config(&e),
        },
        Command::PrintConfig => match config::effective(file) {
            Ok(mut raw) => {
                // Webhook URLs often carry their token: never print it.
                for w in &mut raw.notify.webhook {
                    w.url = tocsin_aggregator::notify::webhook::redact_url(&w.url);
                }
                let text = toml::to_string_pretty(&raw)
                    .unwrap_or_else(|e| format!("# cannot render config: {e}\n"));
                std::io::stdout()
                    .write_all(text.as_bytes())
                    .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
            }
            Err(e) => fail_config(&e),
        },
        Command::RenderTemplate {
            name,
            payload,
            event,
            channel,
        } => render_template(file, &name, payload.as_deref(), &event, &channel),
        Command::Run => {
            let cfg = match config::load(file) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            tocsin_agent::telemetry::init(cfg.log.json, &cfg.log.level);
            for w in tocsin_aggregator::hook::warnings(&cfg.routing) {
                tracing::warn!(warning = %w, "config");
            }
            tocsin_agent::shutdown::run_daemon("aggregator", |shutdown| {
                tocsin_aggregator::run(cfg, shutdown, None)
            })
        }
    }
}
