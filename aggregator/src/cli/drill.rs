//! `tocsin drill NODE SCENARIO [--duration 20s] [--wait 60s] [--target WATCH]
//! [--page-real] [--json|--markdown]`: the seed's `emergency-drill.sh`, run for real on
//! NODE by its agent (which must allow it: `[drills] allow`) through `POST
//! /api/v1/drills`; waits for the end and prints the report: a terminal table
//! (default), JSON (`--json`) or Markdown (`--markdown`). By default a drill never pages
//! the real P1 path (`[drills] channels`, or the real routes at most as a P2);
//! `--page-real` pages the real routes at the real severity, P1 included.
//!
//! `tocsin drill --show ID|last` prints a recorded drill (`GET /api/v1/drills/{id}`)
//! and exits with its status's code.
//!
//! Exit codes: 0 the drill passed (every expected step happened); 2 the drill FAILED (a
//! step never happened — a notification that never arrived is said first and loudest);
//! 3 refused by the agent, the node is not connected, or no such drill (`--show`); 4
//! INTERRUPTED: the aggregator went away during the drill (the connection was lost, or
//! the recorded drill says the aggregator restarted during it) — nothing was measured;
//! 5 still running (`--show`); 1 the API failed; 64 bad usage.

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
    #[arg(required_unless_present = "show")]
    pub node: Option<String>,
    /// process_crash, high_load, dependency_down, node_down, or all (in that order).
    #[arg(required_unless_present = "show")]
    pub scenario: Option<String>,
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
    /// Page the real routes at the real severity, P1 included (still marked [DRILL]);
    /// without it a drill never takes the P1 path.
    #[arg(long)]
    pub page_real: bool,
    /// Print the recorded drill ID (or `last`, the newest) instead of running one.
    #[arg(long, value_name = "ID|last", conflicts_with_all = ["node", "scenario", "page_real"])]
    pub show: Option<String>,
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
    if let Some(which) = &a.show {
        return show(api, token, which, json, a.markdown).await;
    }
    let (Some(node), Some(scenario)) = (a.node.clone(), a.scenario.clone()) else {
        complain("tocsin drill: give NODE and SCENARIO, or --show ID");
        return ExitCode::from(64);
    };
    let body = serde_json::json!({
        "by": a.by.clone().unwrap_or_else(|| "unknown".into()),
        "node": node,
        "scenario": scenario,
        "duration_s": a.duration.as_secs_f64(),
        "wait_s": a.wait.as_secs_f64(),
        "target": a.target,
        "page_real": a.page_real,
    });
    let runs = if scenario == "all" { 4 } else { 1 };
    let timeout = (a.duration + a.wait + Duration::from_secs(15)) * runs + Duration::from_secs(10);
    complain(&format!(
        "DRILL {scenario} on {node}: injecting the fault for {:?}, then waiting up to {:?} for the rest{}",
        a.duration,
        a.wait,
        if a.page_real {
            " (--page-real: the real routes at the real severity, P1 included)"
        } else {
            ""
        }
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
        Err(e) if e.is_connect() => {
            complain(&format!("cannot reach {url}: {e}"));
            return ExitCode::FAILURE;
        }
        Err(e) if e.is_timeout() => {
            complain(&format!(
                "{url}: no answer within {timeout:?}; the drill may still run: see `tocsin drill --show last`"
            ));
            return ExitCode::FAILURE;
        }
        Err(e) => return lost(&e.without_url().to_string()),
    };
    let status = resp.status();
    let answer: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) if status.is_success() => return lost(&e.without_url().to_string()),
        Err(_) => Value::Null,
    };
    if !status.is_success() {
        complain(&format!("{url}: HTTP {status}: {}", error_text(&answer)));
        return match status.as_u16() {
            404 => ExitCode::from(3),
            s => ExitCode::from(exit_code_of(s)),
        };
    }
    print_report(&answer["drill"], json, a.markdown)
}

/// The connection to the aggregator broke while the drill ran: the aggregator went
/// away (killed, restarted). Exit code 4.
fn lost(why: &str) -> ExitCode {
    complain(&format!(
        "DRILL INTERRUPTED: the connection to the aggregator was lost during the drill ({why}). \
         The aggregator probably stopped or restarted: the drill run died with it and nothing \
         was measured. Its node stays marked as drilling until the drill window ends; the drill \
         is then recorded as interrupted. See `tocsin drill --show last` once the aggregator \
         is back."
    ));
    ExitCode::from(4)
}

/// Prints a drill's report in the asked format; the exit code of its status.
fn print_report(report: &Value, json: bool, markdown_out: bool) -> ExitCode {
    if json {
        say(&format!("{report}\n"));
    } else if markdown_out {
        say(&markdown(report));
    } else {
        say(&table(report));
    }
    let st = report["status"].as_str().unwrap_or("failed");
    match st {
        "failed" if report["notification_missing"] == true => {
            complain("DRILL FAILED: A NOTIFICATION NEVER ARRIVED — nobody would have been paged")
        }
        "failed" => complain("DRILL FAILED: an expected step never happened"),
        crate::store::drills::INTERRUPTED => complain(
            "DRILL INTERRUPTED: the aggregator restarted during the drill; nothing was measured",
        ),
        _ => {}
    }
    ExitCode::from(u8::try_from(crate::drill::exit_code(st)).unwrap_or(1))
}

/// `tocsin drill --show ID|last`.
async fn show(
    api: &Api,
    token: Option<String>,
    which: &str,
    json: bool,
    markdown_out: bool,
) -> ExitCode {
    let api = Api::new(&api.base, token.or_else(|| api.token.clone()));
    let row = if which == "last" {
        match api.get("/api/v1/drills").await {
            Ok(v) => v["drills"][0].clone(),
            Err(f) => {
                complain(&f.message);
                return ExitCode::from(f.code);
            }
        }
    } else {
        let Ok(id) = which.parse::<i64>() else {
            complain(&format!("--show {which:?}: give a drill id or `last`"));
            return ExitCode::from(64);
        };
        match api.get(&format!("/api/v1/drills/{id}")).await {
            Ok(v) => v["drill"].clone(),
            Err(f) => {
                complain(&f.message);
                return ExitCode::from(f.code);
            }
        }
    };
    if row.is_null() {
        complain("no drill recorded yet");
        return ExitCode::from(3);
    }
    if !row["report"].is_null() {
        return print_report(&row["report"], json, markdown_out);
    }
    if json {
        say(&format!("{row}\n"));
    } else {
        let mut out = format!(
            "drill #{} on {} ({}) by {}: RUNNING since {}; its window ends {}\n",
            row["id"],
            text(&row["node"], "?"),
            text(&row["scenario"], "?"),
            text(&row["started_by"], "?"),
            crate::model::rfc3339(row["started_ms"].as_i64().unwrap_or(0)),
            row["until_ms"]
                .as_i64()
                .map_or_else(|| "—".to_owned(), crate::model::rfc3339),
        );
        if let Some(at) = row["restarted_ms"].as_i64() {
            out.push_str(&format!(
                "  !! the aggregator restarted during the drill (at {}): it will be recorded \
                 as interrupted when its window ends\n",
                crate::model::rfc3339(at)
            ));
        }
        say(&out);
    }
    ExitCode::from(u8::try_from(crate::drill::exit_code("running")).unwrap_or(1))
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
    if let Some(p) = r["paging"].as_str() {
        out.push_str(&format!("paging: {p}\n"));
    }
    if let Some(m) = r["message"].as_str() {
        out.push_str(&format!("!! {m}\n"));
    }
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
    if let Some(p) = r["paging"].as_str() {
        out.push_str(&format!("- Paging: {p}\n"));
    }
    if r["notification_missing"] == true {
        out.push_str("\n> **FAILED: a notification never arrived.**\n");
    }
    if let Some(m) = r["message"].as_str() {
        out.push_str(&format!("\n> **{m}**\n"));
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
