//! `tocsin drill NODE SCENARIO [--duration 20s] [--wait 60s] [--target WATCH]
//! [--json|--markdown]`: the seed's `emergency-drill.sh`, run for real on NODE by its
//! agent (which must allow it: `[drills] allow`) through `POST /api/v1/drills`; waits
//! for the end and prints the report: a terminal table (default), JSON (`--json`) or
//! Markdown (`--markdown`).
//!
//! Exit codes: 0 the drill passed (every expected step happened); 2 the drill FAILED (a
//! step never happened — a notification that never arrived is said first and loudest);
//! 3 refused by the agent, or the node is not connected; 1 the API failed; 64 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::reports::{Api, error_text, exit_code_of};
use super::{api_token, complain, say, text};

/// `tocsin drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Node (agent id) to run the drill on.
    pub node: String,
    /// process_crash, high_load, dependency_down, node_down, or all (in that order).
    pub scenario: String,
    /// How long the fault lasts (CPU burn, heartbeats stopped).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long after the fault to wait for the remaining steps (resolve above all).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// process_crash: the process watch whose process is killed (default: the first);
    /// dependency_down: the check expected to fail (default: any tcp check).
    #[arg(long, default_value = "")]
    pub target: String,
    /// Print the report in Markdown (the global --json prints it as JSON).
    #[arg(long)]
    pub markdown: bool,
    /// Who runs it (default: $USER).
    #[arg(long, env = "USER")]
    pub by: Option<String>,
    /// File holding the API token; also TOCSIN_API_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Runs `tocsin drill`; see the module docs for exit codes.
pub async fn drill(api: &Api, a: DrillArgs, json: bool) -> ExitCode {
    let token = match api_token(a.token_file.as_deref(), api) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "by": a.by.clone().unwrap_or_else(|| "unknown".into()),
        "node": a.node,
        "scenario": a.scenario,
        "duration_s": a.duration.as_secs_f64(),
        "wait_s": a.wait.as_secs_f64(),
        "target": a.target,
    });
    let runs = if a.scenario == "all" { 4 } else { 1 };
    let timeout = (a.duration + a.wait + Duration::from_secs(15)) * runs + Duration::from_secs(10);
    complain(&format!(
        "DRILL {} on {}: injecting the fault for {:?}, then waiting up to {:?} for the rest",
        a.scenario, a.node, a.duration, a.wait
    ));
    let url = format!("{}/api/v1/drills", api.base);
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => {
            complain(&format!("cannot build the HTTP client: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let mut req = client.post(&url).json(&body);
    if let Some(t) = token.or_else(|| api.token.clone()) {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            complain(&format!("cannot reach {url}: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        complain(&format!("{url}: HTTP {status}: {}", error_text(&answer)));
        return match status.as_u16() {
            404 => ExitCode::from(3),
            s => ExitCode::from(exit_code_of(s)),
        };
    }
    let report = &answer["drill"];
    if json {
        say(&format!("{report}\n"));
    } else if a.markdown {
        say(&markdown(report));
    } else {
        say(&table(report));
    }
    let st = report["status"].as_str().unwrap_or("failed");
    if st == "failed" {
        if report["notification_missing"] == true {
            complain("DRILL FAILED: A NOTIFICATION NEVER ARRIVED — nobody would have been paged");
        } else {
            complain("DRILL FAILED: an expected step never happened");
        }
    }
    ExitCode::from(u8::try_from(crate::drill::exit_code(st)).unwrap_or(1))
}

fn secs(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "—".to_owned(), |s| format!("{s:.1}s"))
}

fn mark(step: &Value) -> &'static str {
    match (step["happened"].as_bool(), step["expected"].as_bool()) {
        (Some(true), _) => "yes",
        (_, Some(true)) => "MISSING",
        _ => "no",
    }
}

/// The report as a terminal table.
pub fn table(r: &Value) -> String {
    let mut out = format!(
        "drill #{} on {} ({}) by {}: {}\n",
        r["id"],
        text(&r["node"], "?"),
        text(&r["scenario"], "?"),
        text(&r["started_by"], "?"),
        text(&r["status"], "?").to_uppercase()
    );
    for s in r["scenarios"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n{}: {}  (agent: {})\n",
            text(&s["scenario"], "?"),
            text(&s["status"], "?").to_uppercase(),
            text(&s["agent"], "")
        ));
        if let Some(id) = s["observed"]["incident_id"].as_i64() {
            out.push_str(&format!(
                "  incident #{id} {} {}\n",
                text(&s["observed"]["severity"], ""),
                text(&s["observed"]["summary"], "")
            ));
        }
        if !s["steps"].as_array().is_some_and(|a| a.is_empty()) {
            out.push_str(&format!(
                "  {:<14} {:<9} {:>10}\n",
                "STEP", "HAPPENED", "AFTER"
            ));
        }
        for st in s["steps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<14} {:<9} {:>10}\n",
                text(&st["step"], "?"),
                mark(st),
                secs(&st["after_s"])
            ));
        }
        for p in s["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!("  !! {}\n", text(p, "")));
        }
    }
    out
}

/// The report in Markdown.
pub fn markdown(r: &Value) -> String {
    let mut out = format!(
        "# Drill #{} on {}: {}\n\n- Scenario: {}\n- Run by: {}\n- Result: **{}**\n",
        r["id"],
        text(&r["node"], "?"),
        text(&r["scenario"], "?"),
        text(&r["scenario"], "?"),
        text(&r["started_by"], "?"),
        text(&r["status"], "?").to_uppercase()
    );
    if r["notification_missing"] == true {
        out.push_str("\n> **FAILED: a notification never arrived.**\n");
    }
    for s in r["scenarios"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n## {} — {}\n\nAgent: {}\n\n| Step | Happened | After fault |\n|---|---|---|\n",
            text(&s["scenario"], "?"),
            text(&s["status"], "?"),
            text(&s["agent"], "")
        ));
        for st in s["steps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                text(&st["step"], "?"),
                mark(st),
                secs(&st["after_s"])
            ));
        }
        for p in s["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!("\n- **{}**", text(p, "")));
        }
        out.push('\n');
    }
    out
}
