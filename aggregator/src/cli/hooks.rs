//! `tocsin hook list|run|runs` and `tocsin rollback`: the seed's
//! `emergency-recovery.sh --restart-all` / `--fix-pods` (hooks of those names) and
//! `emergency-rollback.sh -r REASON -f -y` (the hook of kind `rollback`), over the
//! aggregator's API. Every run is recorded there with who ran it (`--by`, default
//! `$USER`) and why.
//!
//! The rollback hook (`kind = "rollback"`) asks the same wherever it is run from
//! (`tocsin rollback`, or `tocsin hook run NAME`): a non-blank `--reason` and a typed
//! `yes` (or `--yes`); one rollback at a time unless `--force`.
//!
//! Exit codes: 0 the hook succeeded (or was queued, with `--no-wait`); 1 it failed, timed
//! out or was refused at its concurrency limit, or the API failed; 3 no such hook or
//! incident; 4 another rollback is queued or running (without `--force`); 5 the
//! confirmation was not answered `yes` (nothing was run); 64 bad usage — including a
//! rollback without `--yes` when stdin is not a terminal (it cannot ask) or without a
//! reason.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::reports::{Api, enc};
use super::{actor, api_token, complain, fail, say, text};

/// How often `run` and `rollback` poll the run until it ends.
const POLL: Duration = Duration::from_millis(300);

/// `tocsin hook …`.
#[derive(Debug, clap::Subcommand)]
pub enum HookCommand {
    /// List the recovery hooks configured on the aggregator, with runs in progress.
    List,
    /// Run a hook by hand (e.g. `restart-all`, `fix-pods`) and wait for its end; its
    /// output is printed. With --incident the hook gets that incident's fields. The
    /// rollback hook asks as `tocsin rollback` does: --reason, and "yes" or --yes.
    Run {
        /// Hook name.
        name: String,
        /// Incident whose fields the hook gets (TOCSIN_INCIDENT_ID, …); the run lands on
        /// its timeline.
        #[arg(long)]
        incident: Option<i64>,
        /// Who runs it (default: $USER; required when that is unset).
        #[arg(long, env = "USER")]
        by: Option<String>,
        /// Why (TOCSIN_REASON; required for the rollback hook).
        #[arg(long, default_value = "")]
        reason: String,
        /// Pass TOCSIN_FORCE=1 (for the rollback hook also: queue it even while another
        /// rollback is queued or running).
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation (the rollback hook only; required when stdin is not
        /// a terminal).
        #[arg(long, short)]
        yes: bool,
        /// Return once queued instead of waiting for the end.
        #[arg(long)]
        no_wait: bool,
        /// File holding the API token; also TOCSIN_API_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// List runs, newest first (of an incident, of a hook).
    Runs {
        /// Runs of this incident.
        #[arg(long)]
        incident: Option<i64>,
        /// Runs of this hook.
        #[arg(long)]
        hook: Option<String>,
    },
}

/// `tocsin rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Why (required; TOCSIN_REASON; recorded).
    #[arg(long, short)]
    pub reason: String,
    /// Pass TOCSIN_FORCE=1 to the rollback hook, and queue it even while another
    /// rollback is queued or running.
    #[arg(long, short)]
    pub force: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Incident the rollback answers (its fields reach the hook; the run lands on its
    /// timeline).
    #[arg(long)]
    pub incident: Option<i64>,
    /// Who rolls back (default: $USER; required when that is unset).
    #[arg(long, env = "USER")]
    pub by: Option<String>,
    /// Return once queued instead of waiting for the end.
    #[arg(long)]
    pub no_wait: bool,
    /// File holding the API token; also TOCSIN_API_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `tocsin hook …`.
pub async fn hook(api: &Api, c: HookCommand, json: bool) -> ExitCode {
    match c {
        HookCommand::List => list(api, json).await,
        HookCommand::Runs { incident, hook } => runs(api, incident, hook.as_deref(), json).await,
        HookCommand::Run {
            name,
            incident,
            by,
            reason,
            force,
            yes,
            no_wait,
            token_file,
        } => {
            let ask = Ask {
                name,
                incident,
                by,
                reason,
                force,
                no_wait,
                token_file,
            };
            hook_run(api, ask, yes, json).await
        }
    }
}

async fn list(api: &Api, json: bool) -> ExitCode {
    let body = match api.get("/api/v1/hooks").await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{}\n", body["hooks"]));
        return ExitCode::SUCCESS;
    }
    let mut out = format!(
        "{:<20} {:<9} {:>8} {:>5} {:>9}  {:<40} {}\n",
        "NAME", "KIND", "TIMEOUT", "MAX", "RUN/QUEUE", "ON", "DESCRIPTION"
    );
    for h in body["hooks"].as_array().into_iter().flatten() {
        let on = match h["on"].as_str() {
            Some(on) if h["on_resolve"] == true => format!("{on} (and on resolve)"),
            Some(on) => on.to_owned(),
            None => "by hand or remediate only".to_owned(),
        };
        out.push_str(&format!(
            "{:<20} {:<9} {:>8} {:>5} {:>9}  {:<40} {}\n",
            text(&h["name"], "?"),
            text(&h["kind"], "?"),
            text(&h["timeout"], "?"),
            h["max_concurrent"],
            format!("{}/{}", h["running"], h["queued"]),
            tocsin_agent::event::printable(&on),
            text(&h["description"], ""),
        ));
    }
    say(&out);
    ExitCode::SUCCESS
}

async fn runs(api: &Api, incident: Option<i64>, hook: Option<&str>, json: bool) -> ExitCode {
    let mut path = "/api/v1/hooks/runs?limit=50".to_owned();
    if let Some(i) = incident {
        path.push_str(&format!("&incident={i}"));
    }
    if let Some(h) = hook {
        path.push_str(&format!("&hook={}", enc(h)));
    }
    let body = match api.get(&path).await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{}\n", body["runs"]));
        return ExitCode::SUCCESS;
    }
    // Values are rendered to strings first: a JSON value ignores width and alignment.
    let mut out = format!(
        "{:<6} {:<20} {:<9} {:<12} {:<10} {:<16} {:>6}  {}\n",
        "RUN", "HOOK", "INCIDENT", "STATUS", "EVENT", "BY", "EXIT", "STARTED"
    );
    for r in body["runs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<6} {:<20} {:<9} {:<12} {:<10} {:<16} {:>6}  {}\n",
            r["id"].as_i64().map_or("?".into(), |i| i.to_string()),
            text(&r["hook"], "?"),
            r["incident_id"]
                .as_i64()
                .map_or("-".into(), |i| i.to_string()),
            text(&r["status"], "?"),
            text(&r["event"], "?"),
            text(&r["started_by"], "?"),
            r["exit_code"]
                .as_i64()
                .map_or("-".into(), |c| c.to_string()),
            r["started_ms"]
                .as_i64()
                .map_or("-".into(), crate::model::rfc3339),
        ));
    }
    say(&out);
    ExitCode::SUCCESS
}

/// One run asked by hand.
#[derive(Debug)]
struct Ask {
    name: String,
    incident: Option<i64>,
    by: Option<String>,
    reason: String,
    force: bool,
    no_wait: bool,
    token_file: Option<PathBuf>,
}

async fn run(api: &Api, ask: Ask, json: bool) -> ExitCode {
    let token = match api_token(ask.token_file.as_deref(), api) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let by = match actor(ask.by.clone()) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let path = format!("/api/v1/hooks/{}/run", enc(&ask.name));
    let body = serde_json::json!({
        "by": by,
        "incident_id": ask.incident,
        "reason": ask.reason,
        "force": ask.force,
    });
    let answer = match api.post(&path, &body, token).await {
        Ok(a) => a,
        // 409: refused at the hook's concurrency limit; the run is recorded.
        Err(f) if f.code == 4 && f.body.as_ref().is_some_and(|b| b["run"]["id"].is_i64()) => {
            let run = f
                .body
                .as_ref()
                .map_or(serde_json::Value::Null, |b| b["run"]["id"].clone());
            complain(&format!("hook {} run #{run} {}", ask.name, f.message));
            return ExitCode::FAILURE;
        }
        Err(f) => return fail(&f),
    };
    let id = answer["run"]["id"].as_i64().unwrap_or(0);
    if ask.no_wait {
        if json {
            say(&format!("{}\n", answer["run"]));
        } else {
            say(&format!("hook {} run #{id} queued\n", ask.name));
        }
        return ExitCode::SUCCESS;
    }
    complain(&format!(
        "hook {} run #{id} queued; waiting for its end (Ctrl-C stops waiting, not the run)",
        ask.name
    ));
    let run = loop {
        match api.get(&format!("/api/v1/hooks/runs/{id}")).await {
            Ok(b) if !matches!(b["run"]["status"].as_str(), Some("queued" | "running")) => {
                break b["run"].clone();
            }
            Ok(_) => {}
            Err(f) => return fail(&f),
        }
        tokio::time::sleep(POLL).await;
    };
    if json {
        say(&format!("{run}\n"));
    } else {
        let mut out = format!(
            "hook {} run #{id}: {}{} after {} ms\n",
            text(&run["hook"], "?"),
            text(&run["status"], "?"),
            match (run["exit_code"].as_i64(), run["error"].as_str()) {
                (Some(c), _) => format!(" (exit {c})"),
                (None, Some(e)) => format!(" ({})", tocsin_agent::event::printable(e)),
                (None, None) => String::new(),
            },
            run["duration_ms"].as_i64().unwrap_or(0),
        );
        if let Some(c) = run["cleanup"].as_str() {
            out.push_str(&format!("cleanup: {}\n", tocsin_agent::event::printable(c)));
        }
        for stream in ["stdout", "stderr"] {
            let t = run[stream].as_str().unwrap_or("");
            if !t.is_empty() {
                out.push_str(&format!("--- {stream} ---\n"));
                for line in t.lines() {
                    out.push_str(&tocsin_agent::event::printable(line));
                    out.push('\n');
                }
            }
        }
        say(&out);
    }
    if run["status"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `tocsin hook run NAME`: the rollback hook asks as `tocsin rollback` does.
async fn hook_run(api: &Api, mut ask: Ask, yes: bool, json: bool) -> ExitCode {
    let body = match api.get("/api/v1/hooks").await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    let Some(hook) = body["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["name"] == ask.name.as_str())
        .cloned()
    else {
        complain(&format!(
            "no hook {:?} (tocsin hook list)",
            tocsin_agent::event::printable(&ask.name)
        ));
        return ExitCode::from(3);
    };
    if hook["kind"] == "rollback" {
        ask.reason = match confirm_rollback(&hook, &ask.reason, ask.force, yes) {
            Ok(r) => r,
            Err(code) => return code,
        };
    }
    run(api, ask, json).await
}

/// The checks and the question before a rollback: a non-blank reason (64 without), and
/// unless `yes` a terminal on stdin (64 without) where the answer is exactly `yes` (5
/// otherwise). Returns the trimmed reason.
fn confirm_rollback(
    hook: &serde_json::Value,
    reason: &str,
    force: bool,
    yes: bool,
) -> Result<String, ExitCode> {
    let reason = reason.trim().to_owned();
    if reason.is_empty() {
        complain(
            "--reason must say why you roll back (it is recorded and reaches the hook as TOCSIN_REASON)",
        );
        return Err(ExitCode::from(64));
    }
    if yes {
        return Ok(reason);
    }
    if !std::io::stdin().is_terminal() {
        complain(
            "refusing to roll back: stdin is not a terminal, so nobody can confirm; pass --yes to roll back without asking",
        );
        return Err(ExitCode::from(64));
    }
    let mut prompt = std::io::stderr().lock();
    let _ = std::io::Write::write_all(
        &mut prompt,
        format!(
            "Roll back with hook {} ({}, timeout {}){}?\nReason: {}\nType \"yes\" to roll back: ",
            text(&hook["name"], "?"),
            text(&hook["program"], "?"),
            text(&hook["timeout"], "?"),
            if force {
                ", forced (TOCSIN_FORCE=1)"
            } else {
                ""
            },
            tocsin_agent::event::printable(&reason),
        )
        .as_bytes(),
    );
    let _ = std::io::Write::flush(&mut prompt);
    let mut line = String::new();
    let answered = std::io::stdin().lock().read_line(&mut line).is_ok();
    if !answered || !confirmed(&line) {
        complain("rollback not confirmed (only \"yes\" confirms): nothing was run");
        return Err(ExitCode::from(5));
    }
    Ok(reason)
}

/// Whether the answer to the rollback question confirms: exactly `yes` (surrounding
/// blanks ignored). `y`, `YES`, `yes please` do not: a rollback is not undone by a typo.
fn confirmed(answer: &str) -> bool {
    answer.trim() == "yes"
}

/// `tocsin rollback --reason TEXT [--force] [--yes]`: runs the hook of kind `rollback`.
pub async fn rollback(api: &Api, a: RollbackArgs, json: bool) -> ExitCode {
    if a.reason.trim().is_empty() {
        complain(
            "--reason must say why you roll back (it is recorded and reaches the hook as TOCSIN_REASON)",
        );
        return ExitCode::from(64);
    }
    if !a.yes && !std::io::stdin().is_terminal() {
        complain(
            "refusing to roll back: stdin is not a terminal, so nobody can confirm; pass --yes to roll back without asking",
        );
        return ExitCode::from(64);
    }
    let body = match api.get("/api/v1/hooks").await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    let Some(hook) = body["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["kind"] == "rollback")
        .cloned()
    else {
        complain(
            "no hook of kind \"rollback\" is configured on the aggregator ([[hook]] kind = \"rollback\")",
        );
        return ExitCode::from(3);
    };
    let reason = match confirm_rollback(&hook, &a.reason, a.force, a.yes) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let ask = Ask {
        name: text(&hook["name"], ""),
        incident: a.incident,
        by: a.by,
        reason,
        force: a.force,
        no_wait: a.no_wait,
        token_file: a.token_file,
    };
    run(api, ask, json).await
}

#[cfg(test)]
mod tests {
    use super::confirmed;

    #[test]
    fn regression_only_yes_confirms_a_rollback() {
        assert!(confirmed("yes\n"));
        assert!(confirmed("  yes  \r\n"));
        for no in ["y\n", "Y", "YES", "Yes", "yes please", "", "\n", "no"] {
            assert!(!confirmed(no), "{no:?} confirmed");
        }
    }
}
