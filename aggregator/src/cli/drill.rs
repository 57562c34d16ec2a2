//! `tocsin drill NODE SCENARIO [--duration 20s] [--wait 60s] [--target WATCH]
//! [--page-real] [--json|--markdown]`: the seed's `emergency-drill.sh`, run for real on
//! NODE by its agent (which must allow it: `[drills] allow`) through `POST
//! /api/v1/drills` (`detach`): the arguments are checked here first, then by the
//! aggregator, and the drill is announced only once the aggregator accepted it; the
//! command then follows the drill (`GET /api/v1/drills/{id}`) to its end and prints the
//! report: a terminal table (default), JSON (`--json`) or Markdown (`--markdown`). The
//! drill runs on the aggregator: interrupting this command does not stop it (see
//! `tocsin drill --show ID`). By default a drill never pages the real P1 path
//! (`[drills] channels`, or the real routes at most as a P2); `--page-real` pages the
//! real routes at the real severity, P1 included. Without `--duration`, a `node_down`
//! fault is stretched past the node's liveness timeout (the output says so); a given
//! `--duration` too short for `node_down` is refused.
//!
//! `tocsin drill --show ID|last` prints a recorded drill (`GET /api/v1/drills/{id}`)
//! and exits with its status's code.
//!
//! Exit codes: 0 the drill passed (every expected step happened); 2 the drill FAILED (a
//! step never happened — a notification that never arrived is said first and loudest);
//! 3 refused (by the agent, or by the aggregator: another drill is open on the node),
//! the node is not connected, or no such drill (`--show`); 4 INTERRUPTED: the
//! aggregator went away during the drill (the connection was lost, or the recorded
//! drill says the aggregator restarted during it), or the agent was lost or restarted
//! during a fault — not everything was measured; 5 still running (`--show`); 6
//! INCONCLUSIVE: an expected check was already firing before the drill, so nothing new
//! could be measured; 1 the API failed; 64 bad usage (unknown scenario, a duration or
//! wait out of range, an unknown `--target`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::reports::{Api, exit_code_of};
use super::{api_token, complain, say, text};
use crate::drill::{
    ANSWER_TIMEOUT, INCONCLUSIVE, MAX_DURATION, MAX_WAIT, MIN_DURATION, MIN_WAIT, SCENARIOS,
};

/// `tocsin drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Node (agent id) to run the drill on.
    #[arg(required_unless_present = "show")]
    pub node: Option<String>,
    /// process_crash, high_load, dependency_down, node_down, or all (in that order).
    #[arg(required_unless_present = "show")]
    pub scenario: Option<String>,
    /// How long the fault lasts (CPU burn, port closed, heartbeats stopped), 1s to 600s
    /// [default: 20s; node_down: stretched past the node's liveness timeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How long after the fault to wait for the remaining steps (resolve above all),
    /// 1s to 3600s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// process_crash: the process watch whose process is killed (default: the first);
    /// dependency_down: the `[[tcp]]`/`[[http]]` check expected to fail (default: any).
    /// Must name one the node reports.
    #[arg(long, default_value = "")]
    pub target: String,
    /// Page the real routes at the real severity, P1 included (still marked `[DRILL]`);
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

/// The problems of the arguments, each naming its flag (checked before anything is
/// sent).
fn check_args(scenario: &str, a: &DrillArgs) -> Vec<String> {
    let mut out = Vec::new();
    if scenario != "all" && !SCENARIOS.contains(&scenario) {
        out.push(format!(
            "SCENARIO {scenario:?}: use {} or all",
            SCENARIOS.join(", ")
        ));
    }
    if let Some(d) = a.duration
        && !(MIN_DURATION..=MAX_DURATION).contains(&d)
    {
        out.push(format!(
            "--duration {}: must be at least {} and at most {}",
            humantime::format_duration(d),
            humantime::format_duration(MIN_DURATION),
            humantime::format_duration(MAX_DURATION)
        ));
    }
    if !(MIN_WAIT..=MAX_WAIT).contains(&a.wait) {
        out.push(format!(
            "--wait {}: must be at least {} and at most {}",
            humantime::format_duration(a.wait),
            humantime::format_duration(MIN_WAIT),
            humantime::format_duration(MAX_WAIT)
        ));
    }
    out
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
    let problems = check_args(&scenario, &a);
    if !problems.is_empty() {
        for p in problems {
            complain(&format!("tocsin drill: {p}"));
        }
        return ExitCode::from(64);
    }
    let mut body = serde_json::json!({
        "by": a.by.clone().unwrap_or_else(|| "unknown".into()),
        "node": node,
        "scenario": scenario,
        "wait_s": a.wait.as_secs_f64(),
        "target": a.target,
        "page_real": a.page_real,
        "detach": true,
    });
    if let Some(d) = a.duration {
        body["duration_s"] = serde_json::json!(d.as_secs_f64());
    }
    let api = Api::new(&api.base, token.or_else(|| api.token.clone()));
    let accepted = match api.post("/api/v1/drills", &body, None).await {
        Ok(v) => v,
        Err(f) => {
            complain(&format!("tocsin drill: {}", f.message));
            // Another drill open on the node is a refusal, like the agent's.
            let code = if f.body.is_some() && f.code == exit_code_of(409) {
                3
            } else {
                f.code
            };
            return ExitCode::from(code);
        }
    };
    let id = accepted["drill"]["id"].as_i64().unwrap_or(0);
    let plan = &accepted["plan"];
    let faults: Vec<(String, f64)> = plan["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                text(&s["scenario"], "?"),
                s["duration_s"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let what: Vec<String> = faults
        .iter()
        .map(|(s, d)| format!("{s} {}", human_s(*d)))
        .collect();
    complain(&format!(
        "DRILL #{id} {scenario} on {node}: injecting the fault ({}), then waiting up to {} for the rest{}",
        what.join(", "),
        humantime::format_duration(a.wait),
        if a.page_real {
            " (--page-real: the real routes at the real severity, P1 included)"
        } else {
            ""
        }
    ));
    for n in plan["notes"].as_array().into_iter().flatten() {
        complain(&format!("  note: {}", text(n, "")));
    }
    complain(&format!(
        "  (the drill runs on the aggregator: interrupting this command does not stop it; \
         `tocsin drill --show {id}` prints it)"
    ));
    let total: f64 = faults
        .iter()
        .map(|(_, d)| d + a.wait.as_secs_f64() + ANSWER_TIMEOUT.as_secs_f64())
        .sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(total + 30.0);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match api.get(&format!("/api/v1/drills/{id}")).await {
            Ok(v) if v["drill"]["status"] != "running" && !v["drill"]["report"].is_null() => {
                return print_report(&v["drill"]["report"], json, a.markdown);
            }
            Ok(_) => {}
            Err(f) if f.body.is_none() => return lost(&f.message),
            Err(f) => {
                complain(&f.message);
                return ExitCode::from(f.code);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            complain(&format!(
                "drill #{id} is still running past its expected end; see `tocsin drill --show {id}`"
            ));
            return ExitCode::from(u8::try_from(crate::drill::exit_code("running")).unwrap_or(1));
        }
    }
}

/// Seconds as `43 ms` below one second, else `1.2s`.
fn human_s(s: f64) -> String {
    if s < 1.0 {
        format!("{} ms", (s * 1000.0).round() as i64)
    } else {
        format!("{s:.1}s")
    }
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
            "DRILL INTERRUPTED: the aggregator restarted, or the agent was lost or restarted, \
             during the drill; not everything was measured",
        ),
        INCONCLUSIVE => complain(
            "DRILL INCONCLUSIVE: an expected check was already firing before the drill; \
             nothing new could be measured",
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

/// A step's time after the fault: `43 ms` below one second, else `1.2s`.
fn secs(v: &Value) -> String {
    v.as_f64().map_or_else(|| "—".to_owned(), human_s)
}

/// A Unix ms time as RFC 3339, `—` when absent.
fn at(v: &Value) -> String {
    v.as_i64()
        .filter(|t| *t > 0)
        .map_or_else(|| "—".to_owned(), crate::model::rfc3339)
}

/// The scenario's incident: `#12 P2 summary (opened T)`, or `none`.
fn incident_line(s: &Value) -> String {
    let o = &s["observed"];
    match o["incident_id"].as_i64() {
        Some(id) => format!(
            "#{id} {} {} (opened {})",
            text(&o["severity"], ""),
            text(&o["summary"], ""),
            at(&o["incident_ms"])
        ),
        None => "none".to_owned(),
    }
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
        "drill #{} on {} ({}) by {}: {}\nstarted: {}\n",
        r["id"],
        text(&r["node"], "?"),
        text(&r["scenario"], "?"),
        text(&r["started_by"], "?"),
        text(&r["status"], "?").to_uppercase(),
        at(&r["started_ms"])
    );
    if let Some(p) = r["paging"].as_str() {
        out.push_str(&format!("paging: {p}\n"));
    }
    for n in r["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("note: {}\n", text(n, "")));
    }
    if let Some(m) = r["message"].as_str() {
        out.push_str(&format!("!! {m}\n"));
    }
    for s in r["scenarios"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n{}: {}  (agent: {})\n  fault injected: {}\n  incident: {}\n",
            text(&s["scenario"], "?"),
            text(&s["status"], "?").to_uppercase(),
            text(&s["agent"], ""),
            at(&s["injected_ms"]),
            incident_line(s)
        ));
        if !s["steps"].as_array().is_some_and(|a| a.is_empty()) {
            out.push_str(&format!(
                "  {:<14} {:<9} {:>10}  {}\n",
                "STEP", "HAPPENED", "AFTER", "AT"
            ));
        }
        for st in s["steps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<14} {:<9} {:>10}  {}\n",
                text(&st["step"], "?"),
                mark(st),
                secs(&st["after_s"]),
                at(&st["at_ms"])
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
        "# Drill #{} on {}: {}\n\n- Scenario: {}\n- Run by: {}\n- Started: {}\n- Result: **{}**\n",
        r["id"],
        text(&r["node"], "?"),
        text(&r["scenario"], "?"),
        text(&r["scenario"], "?"),
        text(&r["started_by"], "?"),
        at(&r["started_ms"]),
        text(&r["status"], "?").to_uppercase()
    );
    if let Some(p) = r["paging"].as_str() {
        out.push_str(&format!("- Paging: {p}\n"));
    }
    for n in r["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("- Note: {}\n", text(n, "")));
    }
    if r["notification_missing"] == true {
        out.push_str("\n> **FAILED: a notification never arrived.**\n");
    }
    if let Some(m) = r["message"].as_str() {
        out.push_str(&format!("\n> **{m}**\n"));
    }
    for s in r["scenarios"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n## {} — {}\n\n- Agent: {}\n- Fault injected: {}\n- Incident: {}\n\n\
             | Step | Happened | After fault | At |\n|---|---|---|---|\n",
            text(&s["scenario"], "?"),
            text(&s["status"], "?"),
            text(&s["agent"], ""),
            at(&s["injected_ms"]),
            incident_line(s)
        ));
        for st in s["steps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                text(&st["step"], "?"),
                mark(st),
                secs(&st["after_s"]),
                at(&st["at_ms"])
            ));
        }
        for p in s["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!("\n- **{}**", text(p, "")));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{markdown, table};

    fn report() -> serde_json::Value {
        serde_json::json!({
            "id": 7, "node": "web-1", "scenario": "process_crash", "started_by": "alice",
            "started_ms": 1_700_000_000_000_i64, "status": "passed",
            "paging": "real routes, at most P2", "notes": ["node_down: the fault lasts 32s"],
            "scenarios": [{
                "scenario": "process_crash", "status": "passed", "agent": "killed PID 4",
                "injected_ms": 1_700_000_000_100_i64,
                "observed": {"incident_id": 12, "severity": "P2", "summary": "[DRILL] app down",
                             "incident_ms": 1_700_000_000_143_i64},
                "steps": [
                    {"step": "detect", "expected": true, "happened": true,
                     "at_ms": 1_700_000_000_143_i64, "after_s": 0.043},
                    {"step": "resolve", "expected": true, "happened": true,
                     "at_ms": 1_700_000_002_600_i64, "after_s": 2.5},
                ],
                "problems": [],
            }],
        })
    }

    /// Regression (review of issue 6, finding 8): steps under 100 ms read "0.0s";
    /// Markdown had no incident id and no times.
    #[test]
    fn reports_show_milliseconds_incident_ids_and_times() {
        let r = report();
        for out in [markdown(&r), table(&r)] {
            assert!(out.contains("43 ms"), "{out}");
            assert!(out.contains("2.5s"), "{out}");
            assert!(!out.contains("0.0s"), "{out}");
            assert!(out.contains("#12 P2 [DRILL] app down"), "{out}");
            assert!(out.contains("2023-11-14T22:13:20.000Z"), "started: {out}");
            assert!(out.contains("2023-11-14T22:13:20.143Z"), "step time: {out}");
            assert!(out.contains("node_down: the fault lasts 32s"), "{out}");
        }
    }
}
