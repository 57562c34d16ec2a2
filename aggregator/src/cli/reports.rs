//! The CLI's reports over the API: `incidents` (filtered by the aggregator), `kpi`,
//! `postmortem` and `status`; and [`Api`], the HTTP client every command uses, which
//! turns answers into exit codes (404 → 3, 409 → 4, 400 → 64, anything else → 1).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::{actor, api_token, complain, fail, say, text};

/// How long one API request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request that did not succeed: the exit code it maps to and what to print.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 1 (unreachable, refused, server error), 3 (404), 4 (409) or 64 (400).
    pub code: u8,
    /// For stderr.
    pub message: String,
    /// The API's JSON answer, when there was one.
    pub body: Option<Value>,
}

/// The exit code of an HTTP status that is not a success.
pub fn exit_code_of(status: u16) -> u8 {
    match status {
        404 => 3,
        409 => 4,
        400 | 422 => 64,
        _ => 1,
    }
}

/// The message of an API error answer: `{"error": {"message"}}`, or the older
/// `{"error": "…"}`.
pub fn error_text(body: &Value) -> String {
    let e = &body["error"];
    text(if e.is_object() { &e["message"] } else { e }, "")
}

/// The aggregator's API: base URL and the default token (TOCSIN_API_TOKEN, else the
/// config's `token_file`), sent with every request when set.
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://HOST:PORT`, no trailing slash.
    pub base: String,
    /// Bearer token.
    pub token: Option<String>,
}

impl Api {
    /// An API at `base` with `token`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    fn client() -> Result<reqwest::Client, Failure> {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot build the HTTP client: {e}"),
                body: None,
            })
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, Failure> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| Failure {
            code: 1,
            message: format!(
                "cannot reach {url}: {}",
                tocsin_agent::telemetry::chain(&e.without_url())
            ),
            body: None,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: Option<Value> = resp.json().await.ok();
        let message = body.as_ref().map(error_text).unwrap_or_default();
        let message = match status.as_u16() {
            404 | 409 | 400 if !message.is_empty() => message,
            _ => format!("{url}: HTTP {status}: {message}"),
        };
        Err(Failure {
            code: exit_code_of(status.as_u16()),
            message,
            body,
        })
    }

    /// `GET path` (with query) → the JSON answer.
    ///
    /// # Errors
    /// [`Failure`] with the exit code of the status.
    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(Self::client()?.get(&url), &url).await?;
        resp.json().await.map_err(|e| Failure {
            code: 1,
            message: format!("{url}: not an answer of the tocsin API ({e})"),
            body: None,
        })
    }

    /// `GET path` → the text answer (the post-mortem's Markdown).
    ///
    /// # Errors
    /// [`Failure`] with the exit code of the status.
    pub async fn get_text(&self, path: &str) -> Result<String, Failure> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(Self::client()?.get(&url), &url).await?;
        resp.text().await.map_err(|e| Failure {
            code: 1,
            message: format!("{url}: cannot read the answer ({e})"),
            body: None,
        })
    }

    /// `POST path` with a JSON `body`, as `token` (overrides the default) → the answer.
    ///
    /// # Errors
    /// [`Failure`] with the exit code of the status.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<String>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let api = Api {
            base: self.base.clone(),
            token: token.or_else(|| self.token.clone()),
        };
        let resp = api
            .send(Self::client()?.post(&url).json(body), &url)
            .await?;
        Ok(resp.json().await.unwrap_or_default())
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub(super) fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `?a=1&b=2` of the given pairs (`None` values left out).
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Arguments of `tocsin incidents`.
#[derive(Debug, clap::Args)]
pub struct IncidentsArgs {
    /// Comma list of open (triggered + acknowledged), triggered, acknowledged, resolved,
    /// all.
    #[arg(long, visible_alias = "state", default_value = "all")]
    pub status: String,
    /// Comma list of severities, e.g. P1,P2: the current severity (an incident that
    /// peaked at P1 and resolved at P2 matches P2; the table shows `P2 (peak P1)`).
    #[arg(long)]
    pub severity: Option<String>,
    /// Opened since: a duration before now (2h, 7d), RFC 3339 in UTC or Unix ms.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many (newest first; the aggregator caps at 1000).
    #[arg(long)]
    pub limit: Option<usize>,
}

fn fmt_value(v: &Value, unit: &Value) -> String {
    match v.as_f64() {
        Some(x) if unit.as_str() == Some("percent") => format!("{x:.1}%"),
        Some(x) => format!("{x}"),
        None => "-".into(),
    }
}

/// One line about an incident's post-mortem (`postmortem` of the API), if any.
pub fn postmortem_note(pm: &Value) -> Option<String> {
    if pm.is_null() {
        return None;
    }
    if pm["linked"].is_string() {
        return Some(format!("post-mortem: {}", text(&pm["linked"], "")));
    }
    let due = text(&pm["due_at"], "?");
    Some(if pm["overdue"] == true {
        format!("post-mortem OVERDUE (was due {due})")
    } else {
        format!("post-mortem due by {due}")
    })
}

/// `tocsin incidents`.
pub async fn incidents(api: &Api, a: &IncidentsArgs, json: bool) -> ExitCode {
    let limit = a.limit.map(|l| l.to_string());
    let path = format!(
        "/api/v1/incidents{}",
        query(&[
            ("status", Some(a.status.as_str())),
            ("severity", a.severity.as_deref()),
            ("since", a.since.as_deref()),
            ("limit", limit.as_deref()),
        ])
    );
    let body = match api.get(&path).await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{}\n", body["incidents"]));
        return ExitCode::SUCCESS;
    }
    let mut out = format!(
        "{:<5} {:<4} {:<12} {:<20} {:<28} {:<9} {:>8}  {:<24}  {}\n",
        "ID", "SEV", "STATUS", "NODE", "CHECK", "STATE", "VALUE", "TRIGGERED", "NOTE"
    );
    for i in body["incidents"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<5} {:<4} {:<12} {:<20} {:<28} {:<9} {:>8}  {:<24}  {}\n",
            i["id"].to_string(),
            severity_cell(i),
            text(&i["status"], "?"),
            text(&i["node"], "?"),
            text(&i["check"], "?"),
            text(&i["state"], "?"),
            fmt_value(&i["value"], &i["unit"]),
            text(&i["triggered_at"], "?"),
            postmortem_note(&i["postmortem"]).unwrap_or_default(),
        ));
    }
    say(&out);
    ExitCode::SUCCESS
}

/// Arguments of `tocsin kpi`.
#[derive(Debug, clap::Args)]
pub struct KpiArgs {
    /// Range start: a duration before now (30d), RFC 3339 in UTC or Unix ms (default:
    /// 30 days before --until).
    #[arg(long)]
    pub since: Option<String>,
    /// Range end (default: now), same forms.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this service (`service` label, else node).
    #[arg(long)]
    pub service: Option<String>,
    /// Comma list of severities, e.g. P1,P2.
    #[arg(long)]
    pub severity: Option<String>,
}

/// A duration in seconds for a table: `4m30s`, `-` when absent.
fn dur(v: &Value) -> String {
    v.as_f64().map_or_else(
        || "-".to_owned(),
        |s| tocsin_agent::settings::format_duration(Duration::from_secs(s.max(0.0).round() as u64)),
    )
}

/// A stat cell: mean, with `!` when it misses its target.
fn stat(v: &Value) -> String {
    let mark = if v["met"] == false { " !" } else { "" };
    format!("{}{mark}", dur(&v["mean_seconds"]))
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |f| format!("{:.3}%", f * 100.0))
}

fn summary_row(name: &str, s: &Value) -> String {
    format!(
        "{:<22} {:>9} {:>5}  {:<10} {:<10} {:<10} {:<12} {}\n",
        name,
        s["incidents"].as_u64().unwrap_or(0),
        s["open"].as_u64().unwrap_or(0),
        stat(&s["mttd"]),
        stat(&s["mtta"]),
        stat(&s["mttr"]),
        stat(&s["mtbf"]),
        percent(&s["availability"]),
    )
}

fn compliance(c: &Value) -> String {
    let met = c["met"].as_u64().unwrap_or(0);
    let breached = c["breached"].as_u64().unwrap_or(0);
    let pct = c["compliance"]
        .as_f64()
        .map_or_else(|| "-".to_owned(), |f| format!("{:.1}%", f * 100.0));
    format!(
        "{met}/{} met ({pct}), {} pending",
        met + breached,
        c["pending"].as_u64().unwrap_or(0)
    )
}

fn section(title: &str, sec: &Value) -> String {
    let mut out = format!(
        "{title}\n{:<22} {:>9} {:>5}  {:<10} {:<10} {:<10} {:<12} {}\n",
        "", "INCIDENTS", "OPEN", "MTTD", "MTTA", "MTTR", "MTBF", "AVAILABILITY"
    );
    out.push_str(&summary_row("overall", &sec["overall"]));
    for (sev, s) in sec["by_severity"].as_object().into_iter().flatten() {
        out.push_str(&summary_row(&format!("severity {sev}"), s));
    }
    for (svc, s) in sec["by_service"].as_object().into_iter().flatten() {
        let name = tocsin_agent::event::printable(svc);
        out.push_str(&summary_row(&format!("service {name}"), s));
    }
    let sla = &sec["overall"]["sla"];
    out.push_str(&format!(
        "SLA  P1 recovery started within 15m: {}\n     P1 resolved within 1h: {}\n     P2 resolved within 4h: {}\n",
        compliance(&sla["p1_recovery_started"]),
        compliance(&sla["p1_resolved"]),
        compliance(&sla["p2_resolved"]),
    ));
    out
}

/// `tocsin kpi`.
pub async fn kpi(api: &Api, a: &KpiArgs, json: bool) -> ExitCode {
    let path = format!(
        "/api/v1/kpi{}",
        query(&[
            ("since", a.since.as_deref()),
            ("until", a.until.as_deref()),
            ("service", a.service.as_deref()),
            ("severity", a.severity.as_deref()),
        ])
    );
    let r = match api.get(&path).await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{r}\n"));
        return ExitCode::SUCCESS;
    }
    let mut out = format!(
        "KPIs {} → {}{}{}\n\n",
        text(&r["since"], "?"),
        text(&r["until"], "?"),
        r["service"]
            .as_str()
            .map(|s| format!(", service {}", tocsin_agent::event::printable(s)))
            .unwrap_or_default(),
        r["severities"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|a| {
                let names: Vec<String> = a.iter().map(|v| text(v, "?")).collect();
                format!(", severity {}", names.join(","))
            })
            .unwrap_or_default(),
    );
    out.push_str(&section("Incidents (means; ! = target missed)", &r));
    if r["drills"]["overall"]["incidents"].as_u64().unwrap_or(0) > 0 {
        out.push('\n');
        out.push_str(&section("Drills (label drill=true)", &r["drills"]));
    }
    out.push_str(
        "\nTargets: MTTD < 5m, MTTA < 10m, MTTR P1 < 1h and P2 < 4h, MTBF > 720h, \
         availability >= 99.95% (no open P1/P2).\n",
    );
    say(&out);
    ExitCode::SUCCESS
}

/// Arguments of `tocsin postmortem`.
#[derive(Debug, clap::Args)]
pub struct PostmortemArgs {
    /// Incident id.
    pub id: i64,
    /// Write the draft to this file instead of printing it.
    #[arg(long, short, conflicts_with = "link")]
    pub output: Option<PathBuf>,
    /// Link the finished post-mortem at this http(s) URL (ends "post-mortem due").
    #[arg(long, value_name = "URL")]
    pub link: Option<String>,
    /// Who links it (default: $USER; required with --link when that is unset).
    #[arg(long, env = "USER")]
    pub by: Option<String>,
    /// File holding the API token (for --link); also TOCSIN_API_TOKEN.
    #[arg(long, requires = "link")]
    pub token_file: Option<PathBuf>,
}

/// `tocsin postmortem ID [--output FILE | --link URL]`.
pub async fn postmortem(api: &Api, a: PostmortemArgs, json: bool) -> ExitCode {
    if let Some(url) = &a.link {
        let by = match actor(a.by.clone()) {
            Ok(b) => b,
            Err(code) => return code,
        };
        let token = match api_token(a.token_file.as_deref(), api) {
            Ok(t) => t,
            Err(code) => return code,
        };
        let body = serde_json::json!({
            "url": url,
            "by": by,
        });
        return match api
            .post(
                &format!("/api/v1/incidents/{}/postmortem", a.id),
                &body,
                token,
            )
            .await
        {
            Ok(answer) => {
                if json {
                    say(&format!("{answer}\n"));
                } else {
                    say(&format!("{}\n", text(&answer["message"], "linked")));
                }
                ExitCode::SUCCESS
            }
            Err(f) => fail(&f),
        };
    }
    let md = match api
        .get_text(&format!("/api/v1/incidents/{}/postmortem", a.id))
        .await
    {
        Ok(t) => t,
        Err(f) => return fail(&f),
    };
    match &a.output {
        Some(path) => match std::fs::write(path, &md) {
            Ok(()) => {
                if json {
                    say(&format!(
                        "{}\n",
                        serde_json::json!({ "id": a.id, "written": path.display().to_string() })
                    ));
                } else {
                    say(&format!(
                        "post-mortem draft of incident {} written to {}\n",
                        a.id,
                        path.display()
                    ));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                complain(&format!("cannot write {}: {e}", path.display()));
                ExitCode::FAILURE
            }
        },
        None if json => {
            say(&format!(
                "{}\n",
                serde_json::json!({ "id": a.id, "markdown": md })
            ));
            ExitCode::SUCCESS
        }
        None => {
            say(&md);
            ExitCode::SUCCESS
        }
    }
}

/// `tocsin status`.
pub async fn status(api: &Api, json: bool) -> ExitCode {
    let s = match api.get("/api/v1/status").await {
        Ok(b) => b,
        Err(f) => return fail(&f),
    };
    if json {
        say(&format!("{s}\n"));
        return ExitCode::SUCCESS;
    }
    let inc = &s["incidents"];
    let mut out = format!(
        "tocsin-aggregator {} at {}, up {} (since {})\n\n",
        text(&s["version"], "?"),
        api.base,
        dur(&s["uptime_seconds"]),
        text(&s["started_at"], "?"),
    );
    out.push_str(&format!("open incidents: {}\n", inc["open"]));
    for sev in ["P1", "P2", "P3", "P4"] {
        let b = &inc["by_severity"][sev];
        out.push_str(&format!(
            "  {sev}  {:>4} open ({} triggered, {} acknowledged)\n",
            b["open"].as_u64().unwrap_or(0),
            b["triggered"].as_u64().unwrap_or(0),
            b["acknowledged"].as_u64().unwrap_or(0)
        ));
    }
    let due = inc["postmortems_due"].as_u64().unwrap_or(0);
    let overdue = inc["postmortems_overdue"].as_u64().unwrap_or(0);
    if due + overdue > 0 {
        out.push_str(&format!("post-mortems: {due} due, {overdue} overdue\n"));
    }
    let n = &s["nodes"];
    let down: Vec<String> = n["down"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| text(d, "?"))
        .collect();
    out.push_str(&format!(
        "nodes: {} total, {} connected, {} down{}\n",
        n["total"],
        n["connected"],
        down.len(),
        if down.is_empty() {
            String::new()
        } else {
            format!(" ({})", down.join(", "))
        }
    ));
    out.push_str(&format!(
        "silences: {} active, {} pending\n",
        s["silences"]["active"], s["silences"]["pending"]
    ));
    let open = inc["oldest_open"].as_array().map_or(&[][..], Vec::as_slice);
    if !open.is_empty() {
        out.push_str(&format!(
            "\n{:<5} {:<4} {:<12} {:>8}  {:<20} {:<24} {}\n",
            "ID", "SEV", "STATUS", "AGE", "NODE", "CHECK", "SUMMARY"
        ));
        for i in open {
            out.push_str(&format!(
                "{:<5} {:<4} {:<12} {:>8}  {:<20} {:<24} {}\n",
                i["id"].to_string(),
                text(&i["severity"], "?"),
                text(&i["status"], "?"),
                dur(&i["age_seconds"]),
                text(&i["node"], "?"),
                text(&i["check"], "?"),
                text(&i["summary"], ""),
            ));
        }
    }
    say(&out);
    ExitCode::SUCCESS
}

/// The SEV cell of an incident row: its current severity, and the peak when that was
/// higher (`P2 (peak P1)`), from the API's `severity` and `peak_severity`.
fn severity_cell(i: &Value) -> String {
    let now = text(&i["severity"], "?");
    match i["peak_severity"].as_str() {
        Some(peak) if peak != now => format!("{now} (peak {peak})"),
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_severity_cell_shows_a_higher_peak() {
        let v = serde_json::json!({"severity": "P2", "peak_severity": "P1"});
        assert_eq!(severity_cell(&v), "P2 (peak P1)");
        let v = serde_json::json!({"severity": "P1", "peak_severity": "P1"});
        assert_eq!(severity_cell(&v), "P1");
        assert_eq!(severity_cell(&serde_json::json!({"severity": "P3"})), "P3");
    }

    #[test]
    fn exit_codes_follow_the_status() {
        assert_eq!(exit_code_of(404), 3);
        assert_eq!(exit_code_of(409), 4);
        assert_eq!(exit_code_of(400), 64);
        assert_eq!(exit_code_of(401), 1);
        assert_eq!(exit_code_of(503), 1);
    }

    #[test]
    fn errors_read_both_shapes() {
        let new = serde_json::json!({"error": {"status": 404, "message": "no incident 9"}});
        assert_eq!(error_text(&new), "no incident 9");
        let old = serde_json::json!({"error": "no incident 9", "status": 404});
        assert_eq!(error_text(&old), "no incident 9");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            query(&[
                ("since", Some("2024-01-15T00:00:00Z")),
                ("x", None),
                ("severity", Some("P1,P2"))
            ]),
            "?since=2024-01-15T00%3A00%3A00Z&severity=P1%2CP2"
        );
        assert_eq!(query(&[("a", None)]), "");
    }

    #[test]
    fn postmortem_notes() {
        assert_eq!(postmortem_note(&Value::Null), None);
        let due = serde_json::json!({"due_at": "2024-01-17T00:00:00.000Z", "linked": null, "overdue": false});
        assert_eq!(
            postmortem_note(&due).as_deref(),
            Some("post-mortem due by 2024-01-17T00:00:00.000Z")
        );
        let linked =
            serde_json::json!({"due_at": null, "linked": "https://wiki/pm", "overdue": false});
        assert_eq!(
            postmortem_note(&linked).as_deref(),
            Some("post-mortem: https://wiki/pm")
        );
    }
}
