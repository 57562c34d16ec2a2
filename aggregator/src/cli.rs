//! The on-call command line, `tocsin`: `up` runs an aggregator and a local agent in one
//! process with embedded defaults; the other commands read the aggregator's JSON API
//! (`docs/API.md`); the reports (`incidents`, `kpi`, `postmortem`, `status`) are in
//! `reports`.
//!
//! Exit codes ([`EXIT_CODES`]): 0 success, 1 runtime failure (API unreachable, refused,
//! daemon failed), 3 not found, 4 conflict, 5 not confirmed, 64 bad usage or config.

mod reports;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod drill;
pub mod hooks;
use serde::{Deserialize, Serialize};
use tocsin_agent::settings::{self, ConfigError, Validator};
use tokio_util::sync::CancellationToken;

/// Default API address of the CLI.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:7600";
/// Default data directory of `tocsin up`.
pub const DEFAULT_UP_DATA_DIR: &str = "./tocsin-data";
/// Prefix of the CLI's own environment variables (`TOCSIN_CLI_API_URL`); the shorter
/// `TOCSIN_API_URL` is accepted too.
pub const ENV_PREFIX: &str = "TOCSIN_CLI_";

/// Exit codes of `tocsin`, as printed by `tocsin --help`.
pub const EXIT_CODES: &str = "\
Exit codes (stable, for scripts):
  0   success (also: nothing to do, e.g. already acknowledged)
  1   runtime failure: aggregator unreachable, change refused (401/403), server error
  3   not found: no such incident or silence
  4   conflict: the incident's state forbids it (acknowledging a resolved incident), or a
      rollback is already queued or running
  5   not confirmed: a confirmation prompt (tocsin rollback, a rollback hook) was not
      answered \"yes\"; nothing was done
  64  bad usage: unknown flag or value, invalid config, request refused as invalid (400)

Aggregator address: --api, else TOCSIN_API_URL, else `api_url` in the config file
(--config or TOCSIN_CONFIG), else http://127.0.0.1:7600. Token for changes (and for reads
where the aggregator asks for one): --token-file, else TOCSIN_API_TOKEN, else `token_file`
in the config file.";

/// tocsin: emergency response for Linux fleets. `tocsin up` runs everything locally; the
/// other commands talk to an aggregator's API.
#[derive(Debug, Parser)]
#[command(name = "tocsin", version, after_long_help = EXIT_CODES)]
pub struct Cli {
    /// CLI config file (TOML: `api_url = "http://HOST:PORT"`, `token_file = "PATH"`).
    #[arg(long, short, global = true, env = "TOCSIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Aggregator API URL (overrides the config file and TOCSIN_API_URL).
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `tocsin` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an aggregator and an agent for this node in one process (loopback only,
    /// SQLite in a local directory, notifications on the console and to --webhook).
    Up(UpArgs),
    /// List incidents, newest first (filtered by the aggregator).
    Incidents(reports::IncidentsArgs),
    /// Show one incident with its timeline and notifications.
    Show {
        /// Incident id.
        id: i64,
    },
    /// KPIs over a time range: MTTD, MTTA, MTTR, MTBF, availability and SLA compliance
    /// (the seed's targets), overall, per severity and per service; drills apart.
    Kpi(reports::KpiArgs),
    /// Print (or write) an incident's post-mortem draft in Markdown, or link the
    /// finished post-mortem (--link URL).
    Postmortem(reports::PostmortemArgs),
    /// One-screen summary: open incidents by severity, nodes, silences, the aggregator.
    Status,
    /// List nodes (agents) and when they were last heard from.
    Nodes,
    /// Acknowledge an incident: someone is on it (recorded with who and why).
    Ack(ChangeArgs),
    /// Resolve an incident by hand (recorded with who and why; a check that still fires
    /// opens a new incident, and pages, at its agent's next heartbeat).
    Resolve(ChangeArgs),
    /// Silences: mute paging (never recording) for incidents that match.
    #[command(subcommand)]
    Silence(SilenceCommand),
    /// Recovery hooks: list them, run one by hand (`tocsin hook run restart-all`), list
    /// runs.
    #[command(subcommand)]
    Hook(hooks::HookCommand),
    /// Run the rollback hook (`[[hook]] kind = "rollback"`) with a reason; asks for
    /// confirmation unless --yes (and refuses without a terminal and without --yes).
    Rollback(hooks::RollbackArgs),
    /// Run a drill for real on a node through its agent (process_crash, high_load,
    /// dependency_down, node_down or all) and print its measured report; exit 2 when it failed.
    Drill(drill::DrillArgs),
    /// Validate the CLI config and exit 0, or print every problem and exit 64.
    CheckConfig,
}

/// `tocsin silence …`.
#[derive(Debug, clap::Subcommand)]
pub enum SilenceCommand {
    /// Add a silence: `--match node=web-1 --match check=~disk:.* --for 2h --reason "…"`.
    Add {
        /// Matcher (repeatable, all must match): name=value, name!=value, name=~regex,
        /// name!~regex; names are node, check, severity or a label.
        #[arg(long = "match", required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 30m, 2h (at most 30d); optional with --until-resolved.
        #[arg(long = "for", required_unless_present = "until_resolved")]
        duration: Option<String>,
        /// End the silence when incident ID resolves (at the latest after --for, or 30d).
        #[arg(long = "until-resolved", value_name = "ID")]
        until_resolved: Option<i64>,
        /// Why (required).
        #[arg(long)]
        reason: String,
        /// Owner (default: $USER; required when that is unset).
        #[arg(long, env = "USER")]
        by: Option<String>,
        /// File holding the API token; also TOCSIN_API_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// List silences: active, pending and expired.
    List,
    /// End a silence now.
    Expire {
        /// Silence id.
        id: i64,
        /// Who (default: $USER; required when that is unset).
        #[arg(long, env = "USER")]
        by: Option<String>,
        /// File holding the API token; also TOCSIN_API_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

/// Arguments of `tocsin ack` and `tocsin resolve`.
#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// Incident id.
    pub id: i64,
    /// Why (shown on the timeline).
    #[arg(long, default_value = "")]
    pub note: String,
    /// Who (default: the login name from $USER; required when that is unset).
    #[arg(long, env = "USER")]
    pub by: Option<String>,
    /// File holding the API token (`auth.api_token_file` of the aggregator); also
    /// TOCSIN_API_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Arguments of `tocsin up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory for the aggregator's store and the agent's spool.
    #[arg(long, default_value = DEFAULT_UP_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Aggregator config file (TOML), optional.
    #[arg(long)]
    pub aggregator_config: Option<PathBuf>,
    /// Agent config file (TOML), optional.
    #[arg(long)]
    pub agent_config: Option<PathBuf>,
    /// HTTP API address (default 127.0.0.1:7600; port 0 picks a free one).
    #[arg(long)]
    pub http: Option<String>,
    /// gRPC ingest address (default 127.0.0.1:7601).
    #[arg(long)]
    pub grpc: Option<String>,
    /// Also send notifications to this JSON webhook URL (repeatable).
    #[arg(long)]
    pub webhook: Vec<String>,
    /// Watch a process by executable name (repeatable): fewer than one running is critical.
    #[arg(long)]
    pub watch: Vec<String>,
}

/// The CLI config as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCliConfig {
    /// Aggregator API URL.
    pub api_url: String,
    /// File holding the API token (`auth.api_token_file` of the aggregator); empty:
    /// none. `--token-file` and TOCSIN_API_TOKEN win.
    pub token_file: String,
}

impl Default for RawCliConfig {
    fn default() -> Self {
        RawCliConfig {
            api_url: DEFAULT_API_URL.into(),
            token_file: String::new(),
        }
    }
}

/// The CLI config, validated.
#[derive(Debug, Clone, Default)]
pub struct CliConfig {
    /// Aggregator API URL (`http://HOST:PORT`).
    pub api_url: String,
    /// The token read from `token_file`, if one is set.
    pub token: Option<tocsin_agent::config::Secret>,
}

/// Loads the CLI config: defaults, `file`, `TOCSIN_API_URL` and `TOCSIN_CLI_<KEY>`; the
/// token file is read here.
///
/// # Errors
/// [`ConfigError`] naming the origin and key of each problem.
pub fn load_cli_config(file: Option<&Path>) -> Result<CliConfig, ConfigError> {
    let fig = settings::figment(&RawCliConfig::default(), file, cli_env())?;
    let raw: RawCliConfig = settings::extract(&fig)?;
    let mut v = Validator::new(&fig);
    let url = v.endpoint("api_url", &raw.api_url);
    let token = (!raw.token_file.trim().is_empty())
        .then(|| v.secret_file("token_file", raw.token_file.trim()))
        .flatten()
        .map(tocsin_agent::config::Secret::new);
    v.finish(CliConfig {
        api_url: url.unwrap_or_default(),
        token,
    })
}

/// Validates `--api` like the config key.
fn check_api_flag(raw: &str) -> Result<String, ConfigError> {
    let fig = figment::Figment::new();
    let mut v = Validator::new(&fig);
    let url = v.endpoint("--api", raw);
    v.finish(url.unwrap_or_default())
}

fn cli_env() -> Vec<settings::EnvVar> {
    // Only TOCSIN_API_URL belongs to the CLI; the daemons have their own prefixes.
    settings::env_providers(ENV_PREFIX, &[("TOCSIN_API_URL", "api_url")])
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn complain(text: &str) {
    let _ = std::io::stderr().write_all(format!("tocsin: {text}\n").as_bytes());
}

/// Runs the CLI; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    crate::install_crypto_provider();
    let runtime = match tocsin_agent::shutdown::runtime() {
        Ok(r) => r,
        Err(e) => {
            complain(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if let Command::Up(args) = cli.command {
        return runtime.block_on(up(args));
    }
    let loaded = load_cli_config(cli.config.as_deref()).and_then(|mut c| {
        if let Some(flag) = &cli.api {
            c.api_url = check_api_flag(flag)?;
        }
        Ok(c)
    });
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            complain(&format!("invalid config:\n{e}"));
            return ExitCode::from(64);
        }
    };
    let api = config.api_url.trim_end_matches('/').to_owned();
    // TOCSIN_API_TOKEN, else the config's token file (a change's --token-file wins).
    let token = std::env::var("TOCSIN_API_TOKEN")
        .ok()
        .or_else(|| config.token.as_ref().map(|t| t.expose().to_owned()));
    runtime.block_on(async move {
        let json = cli.json;
        let api = reports::Api::new(&api, token);
        match cli.command {
            Command::CheckConfig => ExitCode::SUCCESS,
            Command::Incidents(a) => reports::incidents(&api, &a, json).await,
            Command::Show { id } => show(&api, id, json).await,
            Command::Kpi(a) => reports::kpi(&api, &a, json).await,
            Command::Postmortem(a) => reports::postmortem(&api, a, json).await,
            Command::Status => reports::status(&api, json).await,
            Command::Nodes => nodes(&api, json).await,
            Command::Silence(c) => silence(&api, c, json).await,
            Command::Ack(a) => change(&api, a, "ack", json).await,
            Command::Resolve(a) => change(&api, a, "resolve", json).await,
            Command::Hook(c) => hooks::hook(&api, c, json).await,
            Command::Rollback(a) => hooks::rollback(&api, a, json).await,
            Command::Drill(a) => drill::drill(&api, a, json).await,
            Command::Up(_) => ExitCode::FAILURE,
        }
    })
}

/// The API token for a change: `--token-file`, else the default of `api`
/// (TOCSIN_API_TOKEN, else the config's `token_file`); `Err` exit code 64 when the
/// `--token-file` cannot be read.
fn api_token(file: Option<&Path>, api: &reports::Api) -> Result<Option<String>, ExitCode> {
    match file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => Ok(Some(t.trim().to_owned())),
            Err(e) => {
                complain(&format!("--token-file {}: {e}", f.display()));
                Err(ExitCode::from(64))
            }
        },
        None => Ok(api.token.clone()),
    }
}

/// Who does a change: `--by NAME`, else the login name from `$USER` (clap reads it for
/// `--by`). Neither (or only blanks): refused with exit 64 — a silence needs an owner and
/// the timeline a name, never a made-up "unknown".
fn actor(by: Option<String>) -> Result<String, ExitCode> {
    // clap ignores an empty $USER: a blank value here was given as --by.
    match by.map(|b| b.trim().to_owned()) {
        Some(b) if !b.is_empty() => Ok(b),
        Some(_) => {
            complain("--by must not be empty: give --by NAME");
            Err(ExitCode::from(64))
        }
        None => {
            complain("give --by NAME (no $USER)");
            Err(ExitCode::from(64))
        }
    }
}

/// Prints the failure of a request and returns its exit code.
fn fail(f: &reports::Failure) -> ExitCode {
    complain(&f.message);
    ExitCode::from(f.code)
}

async fn silence(api: &reports::Api, c: SilenceCommand, json: bool) -> ExitCode {
    let (path, body, token) = match c {
        SilenceCommand::List => {
            let body = match api.get("/api/v1/silences").await {
                Ok(b) => b,
                Err(f) => return fail(&f),
            };
            if json {
                say(&format!("{}\n", body["silences"]));
                return ExitCode::SUCCESS;
            }
            let mut out = format!(
                "{:<5} {:<8} {:<21} {:<12} {:<40} {}\n",
                "ID", "STATE", "ENDS", "BY", "MATCHERS", "REASON"
            );
            for s in body["silences"].as_array().into_iter().flatten() {
                let matchers: Vec<String> = s["matchers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| text(m, ""))
                    .collect();
                out.push_str(&format!(
                    "{:<5} {:<8} {:<21} {:<12} {:<40} {}\n",
                    s["id"].as_i64().unwrap_or(0),
                    text(&s["state"], ""),
                    s["ends_at_ms"].as_i64().map_or_else(String::new, |ms| {
                        crate::model::rfc3339(ms).chars().take(19).collect()
                    }),
                    text(&s["created_by"], ""),
                    matchers.join(" "),
                    match s["ends_with_incident"].as_i64() {
                        Some(id) =>
                            format!("{} (until incident {id} resolves)", text(&s["reason"], "")),
                        None => text(&s["reason"], ""),
                    }
                ));
            }
            say(&out);
            return ExitCode::SUCCESS;
        }
        SilenceCommand::Add {
            matchers,
            duration,
            until_resolved,
            reason,
            by,
            token_file,
        } => {
            let by = match actor(by) {
                Ok(b) => b,
                Err(code) => return code,
            };
            let token = match api_token(token_file.as_deref(), api) {
                Ok(t) => t,
                Err(code) => return code,
            };
            (
                "/api/v1/silences".to_owned(),
                serde_json::json!({
                    "matchers": matchers,
                    "duration": duration,
                    "ends_with_incident": until_resolved,
                    "reason": reason,
                    "by": by,
                }),
                token,
            )
        }
        SilenceCommand::Expire { id, by, token_file } => {
            let by = match actor(by) {
                Ok(b) => b,
                Err(code) => return code,
            };
            let token = match api_token(token_file.as_deref(), api) {
                Ok(t) => t,
                Err(code) => return code,
            };
            (
                format!("/api/v1/silences/{id}/expire"),
                serde_json::json!({ "by": by }),
                token,
            )
        }
    };
    let answer = match api.post(&path, &body, token).await {
        Ok(a) => a,
        Err(f) => return fail(&f),
    };
    for w in answer["warnings"].as_array().into_iter().flatten() {
        complain(&format!("warning: {}", text(w, "")));
    }
    if json {
        say(&format!("{answer}\n"));
    } else if let Some(id) = answer["silence"]["id"].as_i64() {
        say(&format!("silence {id} added\n"));
    } else {
        say("silence expired\n");
    }
    ExitCode::SUCCESS
}

/// `tocsin ack|resolve ID`: exit 0 when done or already so, 1 on failure, 3 when the
/// incident does not exist, 4 when its state forbids it (acknowledging a resolved one).
async fn change(api: &reports::Api, a: ChangeArgs, verb: &str, json: bool) -> ExitCode {
    let by = match actor(a.by.clone()) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let token = match api_token(a.token_file.as_deref(), api) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let path = format!("/api/v1/incidents/{}/{verb}", a.id);
    let body = serde_json::json!({ "by": by, "note": a.note });
    match api.post(&path, &body, token).await {
        Ok(body) => {
            if json {
                say(&format!("{body}\n"));
            } else {
                say(&format!("{}\n", text(&body["message"], "done")));
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            if json && let Some(body) = &f.body {
                say(&format!("{body}\n"));
            }
            fail(&f)
        }
    }
}

/// A JSON string field for a terminal: control characters escaped, so a name or message
/// can never forge lines or colours on the on-call's screen.
fn text(v: &serde_json::Value, default: &str) -> String {
    tocsin_agent::event::printable(v.as_str().unwrap_or(default)).into_owned()
}

async fn show(api: &reports::Api, id: i64, json: bool) -> ExitCode {
    let body = match api.get(&format!("/api/v1/incidents/{id}")).await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{body}\n"));
        return ExitCode::SUCCESS;
    }
    let mut out = format!(
        "incident #{} {} {} — {} {}\n  {}\n  triggered {}  resolved {}\n",
        body["id"],
        text(&body["severity"], "?"),
        text(&body["status"], "?"),
        text(&body["node"], "?"),
        text(&body["check"], "?"),
        text(&body["summary"], ""),
        text(&body["triggered_at"], "-"),
        text(&body["resolved_at"], "-"),
    );
    if let Some(pm) = reports::postmortem_note(&body["postmortem"]) {
        out.push_str(&format!("  {pm}\n"));
    }
    out.push_str("\ntimeline:\n");
    for t in body["timeline"].as_array().into_iter().flatten() {
        // A note may hold lines (a hook's output): the first on the entry's line, the
        // rest indented below it, each sanitised (no escape sequences reach the terminal).
        let note = t["note"].as_str().unwrap_or("");
        let mut lines = note.lines();
        out.push_str(&format!(
            "  {}  {:<14} {:<20} {}\n",
            crate::model::rfc3339(t["at_ms"].as_i64().unwrap_or(0)),
            text(&t["kind"], "?"),
            text(&t["actor"], "?"),
            tocsin_agent::event::printable(lines.next().unwrap_or("")),
        ));
        for line in lines {
            out.push_str(&format!("      {}\n", tocsin_agent::event::printable(line)));
        }
    }
    out.push_str("\nnotifications:\n");
    for n in body["notifications"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<8} {:<16} {:<10} attempts {}  {}\n",
            text(&n["kind"], "?"),
            text(&n["channel"], "?"),
            text(&n["status"], "?"),
            n["attempts"],
            text(&n["last_error"], ""),
        ));
    }
    // A group incident lists its members (one per fingerprint), in join order.
    let members = body["members"].as_array().map_or(&[][..], Vec::as_slice);
    if members.len() > 1 {
        out.push_str("\nmembers:\n");
        for m in members {
            out.push_str(&format!(
                "  {:<9} {:<24} {:<20} {}\n",
                text(&m["state"], "?"),
                text(&m["node"], "?"),
                text(&m["check"], "?"),
                text(&m["message"], ""),
            ));
        }
    }
    say(&out);
    ExitCode::SUCCESS
}

async fn nodes(api: &reports::Api, json: bool) -> ExitCode {
    let body = match api.get("/api/v1/nodes").await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{}\n", body["nodes"]));
        return ExitCode::SUCCESS;
    }
    let mut out = format!(
        "{:<24} {:<24} {:<10} {:>8}  {}\n",
        "AGENT", "HOSTNAME", "CONNECTED", "LAST_SEQ", "LAST_SEEN"
    );
    for n in body["nodes"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<24} {:<24} {:<10} {:>8}  {}\n",
            text(&n["agent_id"], "?"),
            text(&n["hostname"], "?"),
            if n["connected"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            n["last_seq"].to_string(),
            crate::model::rfc3339(n["last_seen_ms"].as_i64().unwrap_or(0)),
        ));
    }
    say(&out);
    ExitCode::SUCCESS
}

/// `tocsin up`: aggregator + local agent in one process until Ctrl-C / SIGTERM.
async fn up(args: UpArgs) -> ExitCode {
    let data_dir = args.data_dir.clone();
    let mut agg_defaults = crate::config::RawConfig {
        data_dir: data_dir.join("aggregator").display().to_string(),
        ..Default::default()
    };
    agg_defaults.notify.console = true;
    let mut agg = match crate::config::load_with(&agg_defaults, args.aggregator_config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            complain(&format!("invalid aggregator config:\n{e}"));
            return ExitCode::from(64);
        }
    };
    let mut problems = Vec::new();
    for (flag, value, slot) in [
        ("--http", &args.http, &mut agg.listen_http),
        ("--grpc", &args.grpc, &mut agg.listen_grpc),
    ] {
        if let Some(v) = value {
            match v.parse() {
                Ok(a) => *slot = a,
                Err(_) => problems.push(format!(
                    "{flag} {v:?}: expected IP:PORT, e.g. 127.0.0.1:7600"
                )),
            }
        }
    }
    for addr in [agg.listen_http, agg.listen_grpc] {
        if !addr.ip().is_loopback() {
            complain(&format!(
                "warning: listening on {addr}, reachable from other machines (tocsin up is meant for loopback)"
            ));
        }
    }
    for name in &args.watch {
        if name.trim().is_empty() {
            problems.push("--watch \"\": give an executable name, e.g. --watch nginx".to_owned());
        }
    }
    for (i, url) in args.webhook.iter().enumerate() {
        let ok = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            problems.push(format!(
                "--webhook {url:?}: expected an http:// or https:// URL"
            ));
        }
        agg.webhooks.push(crate::config::Webhook {
            name: format!("webhook-cli-{}", i + 1),
            url: url.clone(),
            format: crate::notify::Format::Generic(None),
            timeout: std::time::Duration::from_secs(10),
        });
    }
    if !problems.is_empty() {
        complain(&problems.join("\n"));
        return ExitCode::from(64);
    }
    let agent_defaults = tocsin_agent::config::RawConfig {
        state_dir: data_dir.join("agent").display().to_string(),
        process: args
            .watch
            .iter()
            .map(|name| tocsin_agent::config::RawProcessWatch {
                name: name.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut agent =
        match tocsin_agent::config::load_with(&agent_defaults, args.agent_config.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                complain(&format!("invalid agent config:\n{e}"));
                return ExitCode::from(64);
            }
        };
    tocsin_agent::telemetry::init(agg.log.json, &agg.log.level);

    let shutdown = CancellationToken::new();
    tokio::spawn(tocsin_agent::shutdown::cancel_on_signal(shutdown.clone()));
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let webhooks: Vec<String> = agg
        .webhooks
        .iter()
        .map(|w| crate::notify::webhook::redact_url(&w.url))
        .collect();
    let agg_task = tokio::spawn(crate::run(agg, shutdown.clone(), Some(bound_tx)));
    let Ok(bound) = bound_rx.await else {
        return match agg_task.await {
            Ok(Err(e)) => {
                complain(&format!("aggregator failed to start: {e}"));
                ExitCode::FAILURE
            }
            _ => ExitCode::FAILURE,
        };
    };
    agent.endpoints = vec![format!("http://{}", bound.grpc)];
    say(&format!(
        "tocsin up: API http://{http}/api/v1/incidents  (tocsin --api http://{http} incidents)\n\
         tocsin up: agent {id} → ingest {grpc}; data in {dir}; notifications: console{hooks}\n\
         tocsin up: Ctrl-C to stop\n",
        http = bound.http,
        grpc = bound.grpc,
        id = agent.agent_id,
        dir = data_dir.display(),
        hooks = webhooks
            .iter()
            .map(|w| format!(", {w}"))
            .collect::<String>(),
    ));
    let mut agent_task = tokio::spawn(tocsin_agent::run(agent, shutdown.clone()));
    let mut agg_task = agg_task;
    // Whichever half stops first (an error, or a signal) stops the other: a `tocsin up`
    // that serves an API with nothing monitored would be a silent failure.
    let (first, second) = tokio::select! {
        a = &mut agg_task => (describe("aggregator", a.map(|r| r.map_err(|e| e.to_string()))), None),
        b = &mut agent_task => (describe("agent", b.map(|r| r.map_err(|e| e.to_string()))), Some(())),
    };
    shutdown.cancel();
    let rest = if second.is_some() {
        describe(
            "aggregator",
            agg_task.await.map(|r| r.map_err(|e| e.to_string())),
        )
    } else {
        describe(
            "agent",
            agent_task.await.map(|r| r.map_err(|e| e.to_string())),
        )
    };
    for problem in [&first, &rest].into_iter().flatten() {
        complain(problem);
    }
    if first.is_none() && rest.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `None` for a clean stop, else what went wrong with `what`.
fn describe(
    what: &str,
    joined: Result<Result<(), String>, tokio::task::JoinError>,
) -> Option<String> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{what} failed: {e}")),
        Err(e) => Some(format!("{what} task ended abnormally: {e}")),
    }
}
