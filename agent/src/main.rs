//! `tocsin-agent`: parse the command line, load the config, run. Exit codes: 0 clean,
//! 64 bad usage or config, 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tocsin_agent::{config, telemetry};

/// The tocsin node agent: samples CPU, memory and watched processes, evaluates
/// thresholds locally and streams state changes to tocsin-aggregator.
#[derive(Debug, Parser)]
#[command(name = "tocsin-agent", version)]
struct Cli {
    /// TOML config file (TOCSIN_AGENT_… environment variables override it).
    #[arg(long, short, global = true, env = "TOCSIN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Run every check once and print where each stands (the quick diagnostic); exit
    /// code is the worst state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and exit 0, or print every problem and exit 64.
    CheckConfig,
    /// Print the effective config (defaults, file and environment merged) as TOML.
    PrintConfig,
    /// Liveness probe: exit 0 if the sampling loop of the agent using this config's
    /// state_dir completed a cycle recently (state_dir/alive), else 1.
    Probe,
}

fn main() -> ExitCode {
    let cli: Cli = match tocsin_agent::settings::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let file = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { json } => {
            let cfg = match config::load(file) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            match tocsin_agent::diagnose::run(&cfg) {
                Ok(rows) => {
                    let text = if json {
                        format!(
                            "{}\n",
                            serde_json::to_string_pretty(&rows).unwrap_or_default()
                        )
                    } else {
                        tocsin_agent::diagnose::table(&rows)
                    };
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
                    ExitCode::from(tocsin_agent::diagnose::exit_code(&rows))
                }
                Err(e) => {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("tocsin-agent: {e}\n").as_bytes(),
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => match config::load(file) {
            Ok(cfg) => {
                let what = file.map_or_else(
                    || "built-in defaults and environment (no --config given)".to_owned(),
                    |f| f.display().to_string(),
                );
                // Valid, but a drill could never work: warned, not failed.
                for (key, why) in tocsin_agent::drill::warnings(&cfg) {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("warning: {what}: {key}: {why}\n").as_bytes(),
                    );
                }
                let _ = std::io::Write::write_all(
                    &mut std::io::stdout(),
                    format!("config ok: {what}\n").as_bytes(),
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail_config(&e),
        },
        Command::Probe => match config::load(file) {
            Ok(c) => tocsin_agent::systemd::probe_exit(&c.state_dir, c.interval),
            Err(e) => fail_config(&e),
        },
        Command::PrintConfig => match config::effective(file) {
            Ok(raw) => {
                let text = toml_string(&raw);
                std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())
                    .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
            }
            Err(e) => fail_config(&e),
        },
        Command::Run => {
            let cfg = match config::load(file) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            telemetry::init(cfg.log.json, &cfg.log.level);
            tocsin_agent::shutdown::run_daemon_on(
                tocsin_agent::shutdown::agent_runtime(),
                "agent",
                |shutdown| tocsin_agent::run(cfg, shutdown),
            )
        }
    }
}

fn toml_string(raw: &config::RawConfig) -> String {
    toml::to_string_pretty(raw).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

fn fail_config(e: &tocsin_agent::settings::ConfigError) -> ExitCode {
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("tocsin-agent: invalid config:\n{e}\n").as_bytes(),
    );
    ExitCode::from(64)
}
