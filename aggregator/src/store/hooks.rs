//! Recovery hook runs in the store: the `hook_runs` table (every run, queued to ended, with
//! who started it and its bounded output) and the `remediation` table (a route's
//! "remediate, verify, then page" hold, per incident and paging cycle).
//!
//! Runs are queued inside the transaction that decides them — an incident triggering
//! (`on`), resolving (`on_resolve`), a route remediating before its page — or by hand
//! ([`Store::queue_hook_run`]); the runner task (`crate::hook::Runner`) claims queued runs
//! within each hook's `max_concurrent` ([`Store::claim_hook_runs`]: they become `running`
//! with `started_ms`), runs them, and records the end ([`Store::finish_hook_run`]: status,
//! exit code, output, a `hook` timeline entry). A run still `running` when the aggregator
//! starts was cut short by the last stop: [`Store::interrupt_hook_runs`] marks it
//! `interrupted`.
//!
//! Statuses: `queued`, `running`, `succeeded` (exit 0), `failed` (another exit code, a
//! signal, or it could not start), `timed_out`, `interrupted`, `refused` (the hook's
//! slots and queue were full: recorded, never run), `skipped` (its incident resolved
//! before it could start; runs by hand and on resolve are never skipped).
//!
//! Remediation (a route's `remediate = HOOK`, `verify_after`): when the incident would be
//! paged, the hook is queued instead and the page is held (`waiting`); when the run ends
//! the hold becomes `verifying` until `verify_after` later — or until now when the run did
//! not succeed (nothing was fixed: paging waits no longer). Then, if the incident still
//! fires (and nobody acknowledged it), it is paged (`paged`) and the page says what was
//! tried (the payload's `remediation`); if it resolved meanwhile, it is never paged
//! (`fixed`). The hold lives in the store, so it survives a restart like a group wait.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use super::{Store, StoreError, load_incident_opt, timeline};
use crate::hook::{Hook, RunContext, RunResult, TIMELINE_OUTPUT};
use crate::model::{Incident, Status, rfc3339};
use crate::route::{Planned, Router};

/// Tables and indexes of hook runs and remediation holds; idempotent.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hook_runs (
    id               INTEGER PRIMARY KEY,
    hook             TEXT NOT NULL,
    incident_id      INTEGER REFERENCES incidents (id),
    cycle            INTEGER,
    event            TEXT NOT NULL,
    started_by       TEXT NOT NULL,
    reason           TEXT NOT NULL DEFAULT '',
    force            INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL,
    queued_ms        INTEGER NOT NULL,
    started_ms       INTEGER,
    ended_ms         INTEGER,
    exit_code        INTEGER,
    timed_out        INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    stdout           TEXT NOT NULL DEFAULT '',
    stderr           TEXT NOT NULL DEFAULT '',
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    run_key          TEXT,
    cleanup          TEXT
);
CREATE INDEX IF NOT EXISTS hook_runs_incident ON hook_runs (incident_id);
CREATE INDEX IF NOT EXISTS hook_runs_open ON hook_runs (hook, status) WHERE status IN ('queued', 'running');

CREATE TABLE IF NOT EXISTS remediation (
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    cycle       INTEGER NOT NULL,
    route       TEXT NOT NULL,
    hook        TEXT NOT NULL,
    run_id      INTEGER NOT NULL REFERENCES hook_runs (id),
    verify_ms   INTEGER NOT NULL,
    due_ms      INTEGER,
    state       TEXT NOT NULL,
    decided_ms  INTEGER,
    PRIMARY KEY (incident_id, cycle)
);
CREATE INDEX IF NOT EXISTS remediation_run ON remediation (run_id);
CREATE INDEX IF NOT EXISTS remediation_due ON remediation (due_ms) WHERE state = 'verifying';
";

/// SQL condition (on incident alias `i`) that holds when the incident's remediation hold
/// has run out: `store::apply::release_held` pages it then.
pub(super) const REMEDIATION_DUE: &str = "EXISTS (SELECT 1 FROM remediation rm
    WHERE rm.incident_id = i.id AND rm.cycle = i.reopened AND rm.state = 'verifying' AND rm.due_ms <= ?1)";

/// One hook run as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookRun {
    /// Run id.
    pub id: i64,
    /// Hook name.
    pub hook: String,
    /// The incident it ran for, if any.
    pub incident_id: Option<i64>,
    /// `trigger`, `resolve`, `remediate` or `manual`.
    pub event: String,
    /// `aggregator` (automatic runs) or the person who asked.
    pub started_by: String,
    /// Why (`--reason`, or what started it).
    pub reason: String,
    /// Run with `TOCSIN_FORCE=1`.
    pub force: bool,
    /// See the module docs.
    pub status: String,
    /// When it was queued (Unix ms).
    pub queued_ms: i64,
    /// When it started (Unix ms).
    pub started_ms: Option<i64>,
    /// When it ended (Unix ms).
    pub ended_ms: Option<i64>,
    /// `ended_ms - started_ms`.
    pub duration_ms: Option<i64>,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Its timeout ended it (process group SIGTERMed, then SIGKILLed after the grace).
    pub timed_out: bool,
    /// Why it failed without an exit code, or why it was refused or skipped.
    pub error: Option<String>,
    /// Standard output (at most 64 KiB, then `…[truncated, N bytes]`).
    pub stdout: String,
    /// Standard error, same bound.
    pub stderr: String,
    /// stdout was cut.
    pub stdout_truncated: bool,
    /// stderr was cut.
    pub stderr_truncated: bool,
    /// Processes of the run killed after it ended (escaped its process group, e.g. with
    /// `setsid`) or at the aggregator's restart (left running by a crash), e.g.
    /// `"killed 1 process: 4242 (sleep)"`; `null` when none (see `crate::hook::procs`).
    pub cleanup: Option<String>,
}

const RUN_COLUMNS: &str = "id, hook, incident_id, event, started_by, reason, force, status, queued_ms, \
    started_ms, ended_ms, exit_code, timed_out, error, stdout, stderr, stdout_truncated, stderr_truncated, cleanup";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HookRun> {
    let started_ms: Option<i64> = r.get(9)?;
    let ended_ms: Option<i64> = r.get(10)?;
    Ok(HookRun {
        id: r.get(0)?,
        hook: r.get(1)?,
        incident_id: r.get(2)?,
        event: r.get(3)?,
        started_by: r.get(4)?,
        reason: r.get(5)?,
        force: r.get(6)?,
        status: r.get(7)?,
        queued_ms: r.get(8)?,
        started_ms,
        ended_ms,
        duration_ms: started_ms.zip(ended_ms).map(|(s, e)| e - s),
        exit_code: r.get(11)?,
        timed_out: r.get(12)?,
        error: r.get(13)?,
        stdout: r.get(14)?,
        stderr: r.get(15)?,
        stdout_truncated: r.get(16)?,
        stderr_truncated: r.get(17)?,
        cleanup: r.get(18)?,
    })
}

fn load_run(conn: &Connection, id: i64) -> rusqlite::Result<Option<HookRun>> {
    conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM hook_runs WHERE id = ?1"
    ))?
    .query_row([id], run_from_row)
    .optional()
}

/// A run the runner may start now: its hook and its whole `TOCSIN_…` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookClaim {
    /// Run id.
    pub run_id: i64,
    /// Hook name.
    pub hook: String,
    /// Who started it (for the log).
    pub started_by: String,
    /// Its key (`TOCSIN_RUN_KEY`, stored before it starts; `crate::hook::procs`).
    pub run_key: String,
    /// Environment (see `crate::hook::run_env`).
    pub env: Vec<(String, String)>,
}

/// A run asked by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    /// Hook name.
    pub hook: String,
    /// Incident whose fields the run gets, if any.
    pub incident_id: Option<i64>,
    /// Who asks (recorded).
    pub by: String,
    /// Why (recorded; `TOCSIN_REASON`).
    pub reason: String,
    /// `TOCSIN_FORCE=1`.
    pub force: bool,
}

/// What [`Store::queue_hook_run`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Queued {
    /// Recorded: `status` `queued`, or `refused` when the hook's slots and queue are full.
    Run(Box<HookRun>),
    /// No hook of that name is configured.
    NoSuchHook,
    /// A rollback was asked while run `run_id` of the rollback hook is `status`
    /// (`queued` or `running`), without `force`: nothing recorded.
    RollbackBusy {
        /// The rollback run in the way.
        run_id: i64,
        /// Its status.
        status: String,
    },
    /// The incident does not exist.
    NoSuchIncident,
}

/// The paging cycle of incident `id` (its `reopened` count).
fn cycle_of(conn: &Connection, id: i64) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT reopened FROM incidents WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
}

fn actor(event: &str, by: &str) -> String {
    if matches!(event, "manual" | "rollback") {
        format!("api:{by}")
    } else {
        "aggregator".to_owned()
    }
}

/// Queues a run of `hook`, or records it `refused` when `max_concurrent` runs are running
/// and `max_queued` wait. Returns the run id and whether it was refused.
#[expect(
    clippy::too_many_arguments,
    reason = "one row's columns; a struct would only rename them"
)]
fn queue(
    conn: &Connection,
    hook: &Hook,
    incident: Option<i64>,
    event: &str,
    by: &str,
    reason: &str,
    force: bool,
    now: i64,
) -> rusqlite::Result<(i64, bool)> {
    let busy: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM hook_runs WHERE hook = ?1 AND status IN ('queued', 'running')",
        )?
        .query_row([&hook.name], |r| r.get(0))?;
    let room = i64::try_from(hook.max_concurrent + hook.max_queued).unwrap_or(i64::MAX);
    let refused = busy >= room;
    let error = refused.then(|| {
        format!(
            "refused: {} runs of {} already running (max_concurrent = {}) and {} waiting (max_queued = {})",
            hook.max_concurrent.min(usize::try_from(busy).unwrap_or(0)),
            hook.name,
            hook.max_concurrent,
            hook.max_queued,
            hook.max_queued
        )
    });
    let cycle = incident.map(|id| cycle_of(conn, id)).transpose()?;
    conn.prepare_cached(
        "INSERT INTO hook_runs (hook, incident_id, cycle, event, started_by, reason, force, status, queued_ms,
             ended_ms, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        hook.name,
        incident,
        cycle,
        event,
        by,
        reason,
        force,
        if refused { "refused" } else { "queued" },
        now,
        refused.then_some(now),
        error
    ])?;
    let id = conn.last_insert_rowid();
    if let Some(inc) = incident {
        if let Some(e) = &error {
            timeline(
                conn,
                inc,
                now,
                "hook",
                &actor(event, by),
                &format!(
                    "hook {} run #{id} ({}) {e}",
                    hook.name,
                    who(event, by, reason)
                ),
            )?;
        } else if matches!(event, "manual" | "rollback") {
            timeline(
                conn,
                inc,
                now,
                "hook",
                &actor(event, by),
                &format!(
                    "hook {} run #{id} asked ({})",
                    hook.name,
                    who(event, by, reason)
                ),
            )?;
        }
    }
    Ok((id, refused))
}

/// "manual, by alice: why" / "on trigger" / "remediation before paging" / "on resolve".
fn who(event: &str, by: &str, reason: &str) -> String {
    match event {
        "manual" if reason.is_empty() => format!("by hand, by {by}"),
        "manual" => format!("by hand, by {by}: {reason}"),
        "rollback" if reason.is_empty() => format!("rollback, by {by}"),
        "rollback" => format!("rollback, by {by}: {reason}"),
        "trigger" => "started on trigger".into(),
        "resolve" => "started on resolve".into(),
        "remediate" => "remediation before paging".into(),
        other => other.to_owned(),
    }
}

/// Queues, once per paging cycle, the runs of every hook whose `on` matches incident `id`
/// as it is now (called when it opens or reopens, and when its severity changes).
pub(super) fn on_trigger(
    conn: &Connection,
    router: &Router,
    id: i64,
    now: i64,
) -> rusqlite::Result<()> {
    let hooks = &router.routing.hooks;
    if !hooks.iter().any(|h| h.on.is_some()) {
        return Ok(());
    }
    let Some(inc) = load_incident_opt(conn, id)? else {
        return Ok(());
    };
    if inc.status == Status::Resolved {
        return Ok(());
    }
    let cycle = cycle_of(conn, id)?;
    for h in hooks
        .iter()
        .filter(|h| h.on.as_ref().is_some_and(|o| o.matches(&inc)))
    {
        let done: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM hook_runs
                                WHERE incident_id = ?1 AND hook = ?2 AND event = 'trigger' AND cycle = ?3)",
            )?
            .query_row(params![id, h.name, cycle], |r| r.get(0))?;
        if !done {
            let reason = format!(
                "incident #{id} triggered: {} {} on {}",
                inc.severity.as_str(),
                inc.check,
                inc.node
            );
            queue(
                conn,
                h,
                Some(id),
                "trigger",
                "aggregator",
                &reason,
                false,
                now,
            )?;
        }
    }
    Ok(())
}

/// What follows incident `id`'s resolution: a remediation hold of its cycle ends without
/// a page (`fixed`), and the hooks with `on_resolve` whose `on` matches are queued.
pub(super) fn on_resolved(
    conn: &Connection,
    router: &Router,
    id: i64,
    now: i64,
) -> rusqlite::Result<()> {
    let hold: Option<(String, i64, String)> = conn
        .prepare_cached(
            "SELECT rm.hook, rm.run_id, rm.state FROM remediation rm JOIN incidents i ON i.id = rm.incident_id
             WHERE rm.incident_id = ?1 AND rm.cycle = i.reopened AND rm.state IN ('waiting', 'verifying')",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((hook, run, state)) = hold {
        conn.execute(
            "UPDATE remediation SET state = 'fixed', decided_ms = ?2
             WHERE incident_id = ?1 AND cycle = (SELECT reopened FROM incidents WHERE id = ?1)",
            params![id, now],
        )?;
        let when = if state == "waiting" {
            "while it ran"
        } else {
            "within verify_after"
        };
        timeline(
            conn,
            id,
            now,
            "remediation",
            "aggregator",
            &format!("resolved after remediation by hook {hook} (run #{run}), {when}: not paged"),
        )?;
    }
    let hooks = &router.routing.hooks;
    if !hooks.iter().any(|h| h.on_resolve) {
        return Ok(());
    }
    let Some(inc) = load_incident_opt(conn, id)? else {
        return Ok(());
    };
    for h in hooks
        .iter()
        .filter(|h| h.on_resolve && h.on.as_ref().is_some_and(|o| o.matches(&inc)))
    {
        let reason = format!("incident #{id} resolved");
        queue(
            conn,
            h,
            Some(id),
            "resolve",
            "aggregator",
            &reason,
            false,
            now,
        )?;
    }
    Ok(())
}

/// The remediation gate of paging (`store::paging::page`): whether incident `incident`'s
/// page must be held now because the first of its `plans` with `remediate` is still
/// remediating or verifying. The first time, it queues the hook and starts the hold.
pub(super) fn remediate_gate(
    conn: &Connection,
    router: &Router,
    incident: &Incident,
    plans: &[Planned],
    now: i64,
) -> rusqlite::Result<bool> {
    let Some((plan, hook_name, verify)) = plans
        .iter()
        .find_map(|p| p.remediate.as_ref().map(|(h, v)| (p, h, *v)))
    else {
        return Ok(false);
    };
    let id = incident.id;
    let cycle = cycle_of(conn, id)?;
    let row: Option<(String, Option<i64>, i64, String, i64)> = conn
        .prepare_cached(
            "SELECT state, due_ms, run_id, hook, verify_ms FROM remediation WHERE incident_id = ?1 AND cycle = ?2",
        )?
        .query_row(params![id, cycle], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let verify_ms = i64::try_from(verify.as_millis()).unwrap_or(i64::MAX);
    match row {
        None => {
            let Some(hook) = router.routing.hooks.iter().find(|h| h.name == *hook_name) else {
                // Validation names only configured hooks; without it, page at once.
                return Ok(false);
            };
            let reason = format!("route {}: remediate before paging", plan.name);
            let (run, refused) = queue(
                conn,
                hook,
                Some(id),
                "remediate",
                "aggregator",
                &reason,
                false,
                now,
            )?;
            conn.prepare_cached(
                "INSERT INTO remediation (incident_id, cycle, route, hook, run_id, verify_ms, due_ms, state, decided_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7)",
            )?
            .execute(params![
                id,
                cycle,
                plan.name,
                hook.name,
                run,
                verify_ms,
                refused.then_some(now),
                if refused { "paged" } else { "waiting" }
            ])?;
            let note = if refused {
                format!(
                    "route {}: hook {} could not run (run #{run} refused): paging now",
                    plan.name, hook.name
                )
            } else {
                format!(
                    "route {}: running hook {} (run #{run}) before paging; the page goes out {} after it \
                     succeeds (at once if it fails) if the incident still fires",
                    plan.name,
                    hook.name,
                    tocsin_agent::settings::format_duration(verify)
                )
            };
            timeline(conn, id, now, "remediation", "aggregator", &note)?;
            Ok(!refused)
        }
        Some((state, due, run, hook, verify_ms)) => match state.as_str() {
            "waiting" => Ok(true),
            "verifying" if due.is_none_or(|d| d > now) => Ok(true),
            "verifying" => {
                conn.execute(
                    "UPDATE remediation SET state = 'paged', decided_ms = ?3 WHERE incident_id = ?1 AND cycle = ?2",
                    params![id, cycle, now],
                )?;
                let outcome = load_run(conn, run)?.map_or_else(String::new, |r| outcome(&r));
                let verify =
                    std::time::Duration::from_millis(u64::try_from(verify_ms).unwrap_or(0));
                timeline(
                    conn,
                    id,
                    now,
                    "remediation",
                    "aggregator",
                    &format!(
                        "still firing after hook {hook} (run #{run}: {outcome}{}): paging now",
                        if outcome.starts_with("exit 0") {
                            format!(
                                ", verified {} later",
                                tocsin_agent::settings::format_duration(verify)
                            )
                        } else {
                            String::new()
                        }
                    ),
                )?;
                Ok(false)
            }
            _ => Ok(false),
        },
    }
}

/// How a run ended, in words: `exit 0`, `exit 3`, `timed out after 5m: …`, `could not
/// start: …`, `refused: …`, `still running`.
pub fn outcome(r: &HookRun) -> String {
    match (r.status.as_str(), r.exit_code, &r.error) {
        ("queued", ..) => "queued".into(),
        ("running", ..) => "still running".into(),
        (_, Some(code), _) => format!("exit {code}"),
        (_, None, Some(e)) => e.clone(),
        (status, None, None) => status.to_owned(),
    }
}

/// The payload's `remediation` for incident `id` (its current cycle), if a route
/// remediated it: `{"hook", "route", "run_id", "status", "exit_code", "timed_out",
/// "verify_after", "result"}`; `result` says what was tried in one line, e.g.
/// `"hook restart-web (run #4): exit 1; still firing"`.
pub(super) fn remediation_json(
    conn: &Connection,
    id: i64,
) -> rusqlite::Result<Option<serde_json::Value>> {
    let row: Option<(String, String, i64, i64, String)> = conn
        .prepare_cached(
            "SELECT rm.hook, rm.route, rm.run_id, rm.verify_ms, rm.state FROM remediation rm
             JOIN incidents i ON i.id = rm.incident_id
             WHERE rm.incident_id = ?1 AND rm.cycle = i.reopened",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((hook, route, run_id, verify_ms, state)) = row else {
        return Ok(None);
    };
    let Some(run) = load_run(conn, run_id)? else {
        return Ok(None);
    };
    let verify = tocsin_agent::settings::format_duration(std::time::Duration::from_millis(
        u64::try_from(verify_ms).unwrap_or(0),
    ));
    let what = outcome(&run);
    let after = match state.as_str() {
        "paged" if run.status == "succeeded" => format!("; still firing {verify} later"),
        "paged" => "; still firing".into(),
        "fixed" => "; resolved".into(),
        _ => String::new(),
    };
    Ok(Some(json!({
        "hook": hook,
        "route": route,
        "run_id": run_id,
        "status": run.status,
        "exit_code": run.exit_code,
        "timed_out": run.timed_out,
        "verify_after": verify,
        "result": format!("hook {hook} (run #{run_id}): {what}{after}"),
    })))
}

/// `text` cut to at most `max` bytes on a character boundary, with a note when cut.
fn excerpt(text: &str, max: usize, run: i64) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}…[cut at {max} bytes; the whole capture is in hook run #{run}]",
        &text[..end]
    )
}

/// Records the end of run `id` in the caller's transaction: its row, a `hook` timeline
/// entry on its incident, and for a remediation run the start of verification.
fn finish_in(conn: &Connection, id: i64, r: &RunResult, now: i64) -> rusqlite::Result<()> {
    let updated = conn.execute(
        "UPDATE hook_runs SET status = ?2, ended_ms = ?3, exit_code = ?4, timed_out = ?5, error = ?6,
             stdout = ?7, stderr = ?8, stdout_truncated = ?9, stderr_truncated = ?10, cleanup = ?11,
             started_ms = CASE WHEN ?2 IN ('skipped', 'refused') THEN started_ms
                               ELSE coalesce(started_ms, ?3) END
         WHERE id = ?1 AND status IN ('queued', 'running')",
        params![
            id,
            r.status,
            now,
            r.exit_code,
            r.timed_out,
            r.error,
            r.stdout,
            r.stderr,
            r.stdout_truncated,
            r.stderr_truncated,
            r.cleanup
        ],
    )?;
    if updated == 0 {
        return Ok(());
    }
    let Some(run) = load_run(conn, id)? else {
        return Ok(());
    };
    let Some(inc) = run.incident_id else {
        return Ok(());
    };
    let took = run
        .duration_ms
        .map(|ms| {
            let d = tocsin_agent::settings::format_duration(std::time::Duration::from_millis(
                u64::try_from(ms).unwrap_or(0),
            ));
            // An interrupted run was found later (at the next start): not its duration.
            if run.status == "interrupted" {
                format!(" (recorded {d} after it started)")
            } else {
                format!(" after {d}")
            }
        })
        .unwrap_or_default();
    let mut note = format!(
        "hook {} run #{id} ({}): {}{took}",
        run.hook,
        who(&run.event, &run.started_by, &run.reason),
        outcome(&run)
    );
    if let Some(c) = &run.cleanup {
        note.push_str(&format!("\ncleanup: {c}"));
    }
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        if !text.is_empty() {
            note.push_str(&format!(
                "\n{name}: {}",
                excerpt(text.trim_end(), TIMELINE_OUTPUT, id)
            ));
        }
    }
    timeline(
        conn,
        inc,
        now,
        "hook",
        &actor(&run.event, &run.started_by),
        &note,
    )?;
    if run.event == "remediate" {
        // A run that did not succeed fixed nothing: no reason to wait before paging.
        let due_sql = if run.status == "succeeded" {
            "?2 + verify_ms"
        } else {
            "?2"
        };
        let changed = conn.execute(
            &format!(
                "UPDATE remediation SET state = 'verifying', due_ms = {due_sql}
                 WHERE run_id = ?1 AND state = 'waiting'"
            ),
            params![id, now],
        )?;
        if changed > 0 {
            let due: i64 = conn
                .prepare_cached("SELECT due_ms FROM remediation WHERE run_id = ?1")?
                .query_row([id], |r| r.get(0))?;
            let note = if due > now {
                format!(
                    "hook {} succeeded: the page goes out at {} if the incident still fires",
                    run.hook,
                    rfc3339(due)
                )
            } else {
                format!(
                    "hook {} did not succeed ({}): paging now if the incident still fires",
                    run.hook,
                    outcome(&run)
                )
            };
            timeline(conn, inc, now, "remediation", "aggregator", &note)?;
        }
    }
    Ok(())
}

impl Store {
    fn tx_err(&self) -> impl Fn(rusqlite::Error) -> StoreError + use<> {
        let path = self.path.clone();
        move |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// Queues a run asked by hand (API, CLI), recorded with who asked and why; refused
    /// (and recorded) when the hook's slots and queue are full.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn queue_hook_run(&mut self, req: &RunRequest) -> Result<Queued, StoreError> {
        let err = self.tx_err();
        let Some(hook) = self
            .router
            .routing
            .hooks
            .iter()
            .find(|h| h.name == req.hook)
            .cloned()
        else {
            return Ok(Queued::NoSuchHook);
        };
        let now = crate::model::now_ms();
        let tx = self.conn.transaction().map_err(&err)?;
        if let Some(id) = req.incident_id
            && load_incident_opt(&tx, id).map_err(&err)?.is_none()
        {
            return Ok(Queued::NoSuchIncident);
        }
        let rollback = hook.kind == crate::hook::Kind::Rollback;
        if rollback && !req.force {
            let busy: Option<(i64, String)> = tx
                .prepare_cached(
                    "SELECT id, status FROM hook_runs WHERE hook = ?1 AND status IN ('queued', 'running')
                     ORDER BY id LIMIT 1",
                )
                .and_then(|mut st| {
                    st.query_row([&hook.name], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(&err)?;
            if let Some((run_id, status)) = busy {
                return Ok(Queued::RollbackBusy { run_id, status });
            }
        }
        let (id, _) = queue(
            &tx,
            &hook,
            req.incident_id,
            if rollback { "rollback" } else { "manual" },
            &req.by,
            &req.reason,
            req.force,
            now,
        )
        .map_err(&err)?;
        let run = load_run(&tx, id).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(run.map_or(Queued::NoSuchHook, |r| Queued::Run(Box::new(r))))
    }

    /// Claims, in one transaction, the queued runs that may start at `now` — per hook, the
    /// oldest, while fewer than `max_concurrent` run — marking them `running`. Runs of a
    /// hook no longer configured fail; automatic runs whose incident resolved meanwhile
    /// are `skipped`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; nothing is claimed then.
    pub fn claim_hook_runs(&mut self, now: i64) -> Result<Vec<HookClaim>, StoreError> {
        let err = self.tx_err();
        let hooks = self.router.routing.hooks.clone();
        let tx = self.conn.transaction().map_err(&err)?;
        type Queue = Vec<(i64, String, Option<i64>, String, String, String, bool)>;
        let queued: Queue = tx
            .prepare_cached(
                "SELECT id, hook, incident_id, event, started_by, reason, force FROM hook_runs
                 WHERE status = 'queued' ORDER BY id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?
                .collect()
            })
            .map_err(&err)?;
        let mut running: BTreeMap<String, usize> = BTreeMap::new();
        for h in &hooks {
            let n: i64 = tx
                .prepare_cached(
                    "SELECT count(*) FROM hook_runs WHERE hook = ?1 AND status = 'running'",
                )
                .and_then(|mut st| st.query_row([&h.name], |r| r.get(0)))
                .map_err(&err)?;
            running.insert(h.name.clone(), usize::try_from(n).unwrap_or(0));
        }
        let mut claims = Vec::new();
        for (id, name, incident_id, event, by, reason, force) in queued {
            let Some(hook) = hooks.iter().find(|h| h.name == name) else {
                let r = RunResult::without_result("failed", "the hook is no longer configured");
                finish_in(&tx, id, &r, now).map_err(&err)?;
                continue;
            };
            let slots = running.entry(name.clone()).or_insert(0);
            if *slots >= hook.max_concurrent {
                continue;
            }
            let incident = match incident_id {
                Some(i) => load_incident_opt(&tx, i).map_err(&err)?,
                None => None,
            };
            if matches!(event.as_str(), "trigger" | "remediate")
                && incident
                    .as_ref()
                    .is_some_and(|i| i.status == Status::Resolved)
            {
                let r = RunResult::without_result(
                    "skipped",
                    "skipped: the incident resolved before the run could start",
                );
                finish_in(&tx, id, &r, now).map_err(&err)?;
                continue;
            }
            // The key is stored before the process starts: after a crash, the next start
            // finds the run's processes by it (`crate::hook::procs`).
            let run_key = crate::hook::procs::new_key();
            tx.execute(
                "UPDATE hook_runs SET status = 'running', started_ms = ?2, run_key = ?3 WHERE id = ?1",
                params![id, now, run_key],
            )
            .map_err(&err)?;
            *slots += 1;
            if let Some(inc) = &incident {
                for warning in crate::hook::label_collisions(&inc.labels) {
                    timeline(
                        &tx,
                        inc.id,
                        now,
                        "hook",
                        "aggregator",
                        &format!("hook {name} run #{id}: {warning}"),
                    )
                    .map_err(&err)?;
                }
            }
            let ctx = RunContext {
                run_id: id,
                hook: name.clone(),
                event,
                started_by: by.clone(),
                reason,
                force,
                run_key: run_key.clone(),
            };
            claims.push(HookClaim {
                run_id: id,
                hook: name,
                started_by: by,
                run_key,
                env: crate::hook::run_env(&ctx, incident.as_ref()),
            });
        }
        tx.commit().map_err(&err)?;
        Ok(claims)
    }

    /// Records how run `id` ended at `now` (see the module docs); a run already ended is
    /// left as it is.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn finish_hook_run(&mut self, id: i64, r: &RunResult, now: i64) -> Result<(), StoreError> {
        let err = self.tx_err();
        let tx = self.conn.transaction().map_err(&err)?;
        finish_in(&tx, id, r, now).map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// The runs the last process left `running` (it was killed or crashed while they
    /// ran): `(run id, hook, run key)`, oldest first; the key is `None` for runs from
    /// before run keys.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn orphaned_hook_runs(&self) -> Result<Vec<(i64, String, Option<String>)>, StoreError> {
        self.conn
            .prepare("SELECT id, hook, run_key FROM hook_runs WHERE status = 'running' ORDER BY id")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// At start: the queued runs of the rollback hook (`kind = "rollback"`) become
    /// `skipped` with a timeline entry — a rollback is never resumed automatically after
    /// the aggregator restarted; whoever wants it runs `tocsin rollback` again. Returns
    /// how many.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn skip_queued_rollbacks(&mut self, now: i64) -> Result<usize, StoreError> {
        let err = self.tx_err();
        let rollbacks: Vec<String> = self
            .router
            .routing
            .hooks
            .iter()
            .filter(|h| h.kind == crate::hook::Kind::Rollback)
            .map(|h| h.name.clone())
            .collect();
        let tx = self.conn.transaction().map_err(&err)?;
        let mut ids = Vec::new();
        for hook in &rollbacks {
            let mut more: Vec<i64> = tx
                .prepare(
                    "SELECT id FROM hook_runs WHERE status = 'queued' AND hook = ?1 ORDER BY id",
                )
                .and_then(|mut st| st.query_map([hook], |r| r.get(0))?.collect())
                .map_err(&err)?;
            ids.append(&mut more);
        }
        let r = RunResult::without_result(
            "skipped",
            "not run: the aggregator restarted before this queued rollback started, and a \
             rollback is never resumed automatically (run `tocsin rollback` again if it is still wanted)",
        );
        for id in &ids {
            finish_in(&tx, *id, &r, now).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(ids.len())
    }

    /// Runs, newest first, at most `limit`: of incident `incident` and/or hook `hook` when
    /// given.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn hook_runs(
        &self,
        incident: Option<i64>,
        hook: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HookRun>, StoreError> {
        self.conn
            .prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM hook_runs
                 WHERE (?1 IS NULL OR incident_id = ?1) AND (?2 IS NULL OR hook = ?2)
                 ORDER BY id DESC LIMIT ?3"
            ))
            .and_then(|mut st| {
                st.query_map(
                    params![incident, hook, i64::try_from(limit).unwrap_or(i64::MAX)],
                    run_from_row,
                )?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// Whether incident `id` exists.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn incident_exists(&self, id: i64) -> Result<bool, StoreError> {
        load_incident_opt(&self.conn, id)
            .map(|i| i.is_some())
            .map_err(|e| self.err(e))
    }

    /// Run `id`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn hook_run(&self, id: i64) -> Result<Option<HookRun>, StoreError> {
        load_run(&self.conn, id).map_err(|e| self.err(e))
    }

    /// Per hook name: runs `(running, queued)` now.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn hook_run_counts(&self) -> Result<BTreeMap<String, (u64, u64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = self
            .conn
            .prepare(
                "SELECT hook, status, count(*) FROM hook_runs
                 WHERE status IN ('queued', 'running') GROUP BY hook, status",
            )
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (hook, status, n) in rows {
            let n = u64::try_from(n).unwrap_or(0);
            let e = out.entry(hook).or_default();
            if status == "running" {
                e.0 = n;
            } else {
                e.1 = n;
            }
        }
        Ok(out)
    }
}
