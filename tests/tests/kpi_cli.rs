//! The `tocsin` CLI's reports and the JSON API behind them, end to end: filtered incident
//! lists, KPIs (MTTD, MTTA, MTTR, availability, SLA; drills apart), the one-screen status,
//! post-mortem drafts and links, JSON errors, exit codes, the token from the CLI config
//! file, and the KPI histograms on `/metrics` (checked by the real promtool). Real
//! aggregator binary, scripted nodes speaking real gRPC (their events carry a known
//! breach start), the real `tocsin` binary; all on 127.0.0.1.
//!
//! Exact KPI values over a history with fixed timestamps are checked by the unit tests
//! of `kpi` and `store::kpi`; here the times come from a live run, so the checks are
//! bounds around the known breach starts.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{Aggregator, AggregatorToml, PATIENCE, bin, eventually};

/// Heartbeat interval the scripted nodes announce (and keep).
const HEARTBEAT: Duration = Duration::from_millis(300);

/// Runs `tocsin ARGS` with the CLI config `config` (no --api: the address and the token
/// come from the file); returns exit code, stdout, stderr.
fn tocsin(config: &Path, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(bin("tocsin"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TOCSIN_API_TOKEN")
        .env_remove("TOCSIN_API_URL")
        .env_remove("TOCSIN_CONFIG")
        .env("USER", "kpi-test")
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `tocsin ARGS --json`, parsed; fails unless it exits 0.
fn tocsin_json(config: &Path, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = tocsin(config, &all)?;
    anyhow::ensure!(
        code == Some(0),
        "tocsin {args:?}: exit {code:?}\n{out}{err}"
    );
    serde_json::from_str(&out).with_context(|| format!("tocsin {args:?} printed {out}"))
}

/// The id of the incident whose check is `check`, once it exists.
async fn incident_of(agg: &Aggregator, check: &str) -> Result<i64> {
    eventually(&format!("an incident for {check}"), PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check)?["id"]
            .as_i64()
    })
    .await
}

fn sorted(ids: &[i64]) -> Vec<i64> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

fn ids(list: &Value) -> Vec<i64> {
    let mut v: Vec<i64> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_i64())
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_incidents_kpis_status_and_postmortems() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("api.token");
    std::fs::write(&token, "kpi-s3cret\n")?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("[auth]")
            .set(&format!("api_token_file = \"{}\"", token.display()))
            .build(),
    )
    .await?;
    let api = format!("http://{}", agg.http);
    let config = dir.path().join("tocsin.toml");
    std::fs::write(
        &config,
        format!(
            "api_url = \"{api}\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    )?;
    let no_token = dir.path().join("no-token.toml");
    std::fs::write(&no_token, format!("api_url = \"{api}\"\n"))?;

    let ep = format!("http://{}", agg.grpc);
    let checkout = [("service", "checkout")];
    let mut web1 = ScriptedNode::connect(&ep, "web-1", &checkout, HEARTBEAT).await?;
    let mut web2 = ScriptedNode::connect(&ep, "web-2", &checkout, HEARTBEAT).await?;
    let mut db1 = ScriptedNode::connect(&ep, "db-1", &[("service", "db")], HEARTBEAT).await?;
    let mut drill = ScriptedNode::connect(
        &ep,
        "drill-1",
        &[("service", "checkout"), ("drill", "true")],
        HEARTBEAT,
    )
    .await?;
    for n in [&mut web1, &mut web2, &mut db1, &mut drill] {
        n.heartbeats(HEARTBEAT);
    }

    // A: P2 on web-1, its breach began 90 s before it was sent.
    let now = tocsin_agent::event::now_ms();
    web1.send_breach(&[("cpu", "critical")], now - 90_000)
        .await?;
    let a = incident_of(&agg, "cpu").await?;
    // B: critical on two of checkout's three nodes: one P1 group incident.
    web1.send_breach(&[("http", "critical")], now - 30_000)
        .await?;
    web2.send_breach(&[("http", "critical")], now - 30_000)
        .await?;
    let b = incident_of(&agg, "http").await?;
    // C: a P3 (warning) and E: a P2 on db-1, both left open; D: a drill P2.
    db1.send(&[("disk", "warning"), ("memory", "critical")])
        .await?;
    let c = incident_of(&agg, "disk").await?;
    let e = incident_of(&agg, "memory").await?;
    drill
        .send_breach(&[("drill_cpu", "critical")], now - 10_000)
        .await?;
    let d = incident_of(&agg, "drill_cpu").await?;
    let detail = agg.get(&format!("/api/v1/incidents/{b}")).await?;
    assert_eq!(detail["severity"], "P1", "{detail}");

    // Changes need the token: without it the CLI exits 1; from the config file it works.
    let (code, _, err) = tocsin(&no_token, &["ack", &a.to_string(), "--by", "eve"])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("401"), "{err}");
    for id in [a, b] {
        let (code, out, err) = tocsin(&config, &["ack", &id.to_string(), "--note", "on it"])?;
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let (code, out, err) = tocsin(&config, &["resolve", &a.to_string(), "--note", "scaled"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    web1.send(&[("http", "ok")]).await?;
    web2.send(&[("http", "ok")]).await?;
    eventually("B resolves", PATIENCE, || async {
        let d = agg.get(&format!("/api/v1/incidents/{b}")).await.ok()?;
        (d["status"] == "resolved").then_some(())
    })
    .await?;

    // Server-side filters.
    let open_p2 = tocsin_json(
        &config,
        &["incidents", "--status", "open", "--severity", "P2"],
    )?;
    assert_eq!(ids(&open_p2), sorted(&[d, e]), "{open_p2}");
    let acked = tocsin_json(&config, &["incidents", "--state", "acknowledged"])?;
    assert_eq!(ids(&acked), Vec::<i64>::new(), "{acked}");
    let resolved = tocsin_json(&config, &["incidents", "--status", "resolved"])?;
    assert_eq!(ids(&resolved), sorted(&[a, b]), "{resolved}");
    let recent = tocsin_json(&config, &["incidents", "--since", "1h", "--severity", "p3"])?;
    assert_eq!(ids(&recent), [c], "{recent}");
    // B calmed to P2 as its members recovered one by one; it stays a P1 for the KPIs.
    let b_json = resolved
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["id"] == b)
        .context("B listed")?;
    assert_eq!(b_json["peak_severity"], "P1", "{b_json}");
    let future = tocsin_json(&config, &["incidents", "--since", "2999-01-01T00:00:00Z"])?;
    assert_eq!(ids(&future), Vec::<i64>::new());
    // The post-mortem of the resolved P1 and P2 is due 48 h after their resolve.
    let pm = &resolved[0]["postmortem"];
    assert!(
        pm["due_at"].is_string() && pm["linked"].is_null(),
        "{resolved}"
    );
    assert_eq!(pm["overdue"], false);
    let open_list = tocsin_json(&config, &["incidents", "--status", "open"])?;
    assert!(
        open_list
            .as_array()
            .into_iter()
            .flatten()
            .all(|i| i["postmortem"].is_null()),
        "{open_list}"
    );
    let (code, out, _) = tocsin(&config, &["incidents", "--status", "resolved"])?;
    assert_eq!(code, Some(0));
    assert!(out.contains("post-mortem due by"), "{out}");

    // KPIs.
    let k = tocsin_json(&config, &["kpi", "--since", "1h"])?;
    let o = &k["overall"];
    assert_eq!(o["incidents"], 4, "A, B, C, E (the drill apart): {k:#}");
    assert_eq!(
        (o["open"].as_u64(), o["resolved"].as_u64()),
        (Some(2), Some(2))
    );
    let mttd = &o["mttd"];
    assert_eq!(mttd["count"], 2, "A and B carry a breach start: {mttd}");
    let mean = mttd["mean_seconds"].as_f64().context("mttd mean")?;
    let patience = PATIENCE.as_secs_f64();
    assert!(
        (60.0..60.0 + patience).contains(&mean),
        "MTTD mean of 90 s and 30 s breaches, plus the delivery: {mean}"
    );
    assert!(
        mttd["max_seconds"].as_f64().unwrap_or(0.0) >= 90.0,
        "{mttd}"
    );
    assert_eq!(mttd["target_seconds"], 300.0);
    assert_eq!(o["mtta"]["count"], 2);
    assert_eq!(o["mttr"]["count"], 2);
    assert_eq!(k["by_severity"]["P1"]["mttr"]["target_seconds"], 3600.0);
    let sla = &o["sla"];
    assert_eq!(
        sla["p1_recovery_started"]["met"], 1,
        "acknowledged at once: {sla}"
    );
    assert_eq!(sla["p1_resolved"]["met"], 1, "{sla}");
    assert_eq!(sla["p2_resolved"]["met"], 1, "A; E is pending: {sla}");
    assert_eq!(sla["p2_resolved"]["pending"], 1, "{sla}");
    let services: Vec<&String> = k["by_service"]
        .as_object()
        .context("by_service")?
        .keys()
        .collect();
    assert_eq!(services, ["checkout", "db"]);
    let avail = k["by_service"]["checkout"]["availability"]
        .as_f64()
        .context("availability")?;
    assert!(
        avail < 1.0 && avail > 0.5,
        "checkout had a P1 and a P2: {avail}"
    );
    assert_eq!(k["drills"]["overall"]["incidents"], 1, "{k:#}");
    assert!(k["drills"]["by_service"]["checkout"].is_object());

    let db = tocsin_json(&config, &["kpi", "--service", "db"])?;
    assert_eq!(db["overall"]["incidents"], 2);
    let p1 = tocsin_json(&config, &["kpi", "--severity", "P1"])?;
    assert_eq!(p1["overall"]["incidents"], 1);
    let (code, out, err) = tocsin(&config, &["kpi"])?;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "service checkout",
        "severity P1",
        "SLA  P1 recovery started",
        "Drills",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    let (code, _, err) = tocsin(&config, &["kpi", "--since", "last tuesday"])?;
    assert_eq!(code, Some(64), "a bad time is a usage error: {err}");
    assert!(err.contains("since"), "{err}");

    // Status.
    let st = tocsin_json(&config, &["status"])?;
    assert_eq!(st["incidents"]["open"], 3, "C, D, E: {st:#}");
    assert_eq!(st["incidents"]["by_severity"]["P2"]["open"], 2);
    assert_eq!(st["incidents"]["postmortems_due"], 2, "A and B");
    assert_eq!(st["nodes"]["total"], 4);
    assert_eq!(st["nodes"]["connected"], 4);
    let (code, out, err) = tocsin(&config, &["status"])?;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "open incidents: 3",
        "nodes: 4 total, 4 connected, 0 down",
        "silences: 0 active",
        "post-mortems: 2 due",
        "memory",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }

    // Post-mortem draft of B: printed, and written to a file.
    let (code, md, err) = tocsin(&config, &["postmortem", &b.to_string()])?;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        format!("# Post-mortem: incident #{b} — http on "),
        "**Severity:** P1".into(),
        "**Nodes (2):** web-1, web-2".into(),
        "| Time to detect (breach → opened) |".into(),
        "**acknowledged** (api:kpi-test): acknowledged by kpi-test: on it".into(),
        "## Root cause".into(),
        "## Actions".into(),
    ] {
        assert!(md.contains(&needle), "{needle} missing:\n{md}");
    }
    let file = dir.path().join("pm.md");
    let (code, _, err) = tocsin(
        &config,
        &[
            "postmortem",
            &b.to_string(),
            "--output",
            file.to_str().context("utf-8")?,
        ],
    )?;
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(&file)?.contains("## Timeline (UTC)"));
    let (code, _, _) = tocsin(&config, &["postmortem", "999999"])?;
    assert_eq!(code, Some(3), "no such incident");

    // Linking it ends "post-mortem due".
    let (code, out, err) = tocsin(
        &config,
        &[
            "postmortem",
            &b.to_string(),
            "--link",
            "https://wiki.example/pm/b",
            "--by",
            "alice",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}{err}");
    let detail = agg.get(&format!("/api/v1/incidents/{b}")).await?;
    assert_eq!(
        detail["postmortem"]["linked"], "https://wiki.example/pm/b",
        "{detail}"
    );
    assert!(
        detail["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["kind"] == "postmortem" && t["actor"] == "api:alice"),
        "{detail}"
    );
    let (code, _, err) = tocsin(
        &config,
        &["postmortem", &b.to_string(), "--link", "ftp://x"],
    )?;
    assert_eq!(code, Some(64), "{err}");
    let st = tocsin_json(&config, &["status"])?;
    assert_eq!(st["incidents"]["postmortems_due"], 1);

    // Errors are JSON with a status and a message.
    let resp = reqwest::get(format!("{api}/api/v1/incidents/999999")).await?;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["status"], 404, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let resp = reqwest::get(format!("{api}/api/v1/incidents?severity=P9")).await?;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["status"], 400, "{body}");
    let resp = reqwest::get(format!("{api}/api/v1/kpi?bogus=1")).await?;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await?;
    assert!(body["error"]["message"].is_string(), "{body}");
    let (code, _, _) = tocsin(&config, &["show", "999999"])?;
    assert_eq!(code, Some(3));
    let (code, _, _) = tocsin(&config, &["ack", &a.to_string()])?;
    assert_eq!(code, Some(4), "acknowledging a resolved incident");

    // The histograms, as the aggregator observed the changes.
    let metrics = reqwest::get(format!("{api}/metrics")).await?.text().await?;
    tocsin_e2e::promtool_check(&metrics)?;
    for line in [
        "tocsin_incident_mttd_seconds_count{severity=\"P1\"} 1",
        "tocsin_incident_mtta_seconds_count{severity=\"P1\"} 1",
        "tocsin_incident_mtta_seconds_count{severity=\"P2\"} 1",
        "tocsin_incident_mttr_seconds_count{severity=\"P1\"} 1",
        "tocsin_incident_mttr_seconds_count{severity=\"P2\"} 1",
        "tocsin_incident_mttr_seconds_count{severity=\"P3\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // MTTD at the first resolve: A (P2) and B (P1) only; E is open, the drill never.
    assert!(
        metrics.contains("tocsin_incident_mttd_seconds_count{severity=\"P2\"} 1"),
        "{metrics}"
    );
    Ok(())
}
