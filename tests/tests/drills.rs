//! Drills (`tocsin drill`): a real aggregator sends a drill down a real agent's stream;
//! the agent injects the fault for real (kills a watched process, stops its heartbeats,
//! burns CPU), the incident carries the drill mark, its notification says `[DRILL]`, and
//! the report measures every step. An agent that does not allow drills refuses. A drill
//! never pages the real P1 path unless run with `--page-real`; its mark survives an
//! agent reconnect; an aggregator killed mid-drill leaves the drill `interrupted`.
//! Regressions of the fresh-eyes review of issue 6 close the file: a killed CLI, the
//! mark's scope, a second drill on a node, node_down's duration, reopened incidents,
//! inconclusive and interrupted reports, input checks.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tocsin_e2e::scripted::ScriptedNode;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Dummy, PATIENCE, QUIET_HOST_RULES, WebhookReceiver, bin,
    eventually, start_agent,
};

/// `POST /api/v1/drills` on the API at `http`; waits for the report.
async fn start_drill(http: std::net::SocketAddr, body: Value) -> Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/drills"))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

fn step<'a>(scenario: &'a Value, name: &str) -> &'a Value {
    scenario["steps"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["step"] == name))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_crash_drill_kills_the_watched_process_and_measures_every_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let mut dummy = Dummy::new(dir.path(), "dc")?;
    dummy.start()?;
    let cfg = AgentToml::new(dir.path(), "node-drill", agg.grpc)
        .set("[drills]\nallow = [\"process_crash\", \"node_down\"]")
        .watch(&dummy.name)
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-drill").await?;

    let body = json!({"by": "drill-test", "node": "node-drill", "scenario": "process_crash",
                      "duration_s": 1, "wait_s": 30, "target": dummy.name});
    let drill = tokio::spawn(start_drill(agg.http, body));
    let check = format!("process:{}", dummy.name);
    let trigger = receiver.wait_for("trigger", "node-drill", &check).await?;
    assert_eq!(trigger["incident"]["labels"]["drill"], "true", "{trigger}");
    let summary = trigger["incident"]["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("[DRILL] "), "{summary}");
    // The killed process is reaped by its parent (this test) and restarted: recovery.
    dummy.kill();
    dummy.start()?;
    let (status, answer) = drill.await??;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "passed", "{r:#}");
    let s = &r["scenarios"][0];
    assert!(
        s["agent"].as_str().is_some_and(|a| a.contains("SIGKILL")),
        "{s:#}"
    );
    for name in ["detect", "incident", "notification", "resolve"] {
        let st = step(s, name);
        assert_eq!(st["happened"], true, "{name}: {s:#}");
        assert!(st["after_s"].as_f64().is_some(), "{name}: {s:#}");
    }
    assert_eq!(step(s, "hook")["happened"], false);
    let listed = agg.get("/api/v1/drills").await?;
    assert_eq!(listed["drills"][0]["status"], "passed", "{listed}");
    assert_eq!(listed["drills"][0]["started_by"], "drill-test");
    let incident = agg
        .get(&format!(
            "/api/v1/incidents/{}",
            s["observed"]["incident_id"]
        ))
        .await?;
    assert_eq!(incident["labels"]["drill"], "true", "{incident}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_drill_through_the_cli_raises_node_down_and_reports_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("node_timeout = \"1s\"")
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let cfg = AgentToml::new(dir.path(), "node-quiet", agg.grpc)
        .set("[drills]\nallow = [\"all\"]")
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_connected("node-quiet").await?;

    let api = format!("http://{}", agg.http);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args([
                "--api",
                &api,
                "drill",
                "node-quiet",
                "node_down",
                "--duration",
                "4s",
                "--wait",
                "30s",
                "--markdown",
                "--by",
                "cli-test",
            ])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("# Drill #"), "{stdout}");
    assert!(stdout.contains("| notification | yes |"), "{stdout}");
    assert!(stdout.contains("| resolve | yes |"), "{stdout}");
    let trigger = receiver
        .wait_for("trigger", "node-quiet", "node_down")
        .await?;
    assert_eq!(trigger["incident"]["labels"]["drill"], "true", "{trigger}");
    assert!(
        trigger["incident"]["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("[DRILL] ")),
        "{trigger}"
    );
    receiver
        .wait_for("resolve", "node-quiet", "node_down")
        .await?;
    // The mark ends with the drill: the node's labels no longer say drill.
    let nodes = agg.get("/api/v1/nodes").await?;
    ensure!(!nodes.to_string().contains("\"drill\""), "{nodes}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_allow_drills_refuses_and_nothing_happens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("node_timeout = \"1s\"")
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-prod", agg.grpc).build(),
    )?;
    agg.wait_connected("node-prod").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-prod", "scenario": "node_down", "duration_s": 4}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "refused", "{r:#}");
    assert_eq!(
        r["scenarios"][0]["agent"], "refused: drills not allowed on this node",
        "{r:#}"
    );
    // A node that is not connected: 404.
    let (status, _) = start_drill(
        agg.http,
        json!({"by": "t", "node": "nowhere", "scenario": "node_down", "duration_s": 4}),
    )
    .await?;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(receiver.received().is_empty(), "{:?}", receiver.received());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_load_drill_burns_cpu_until_the_cpu_rule_fires() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    // A CPU rule no idle machine breaks but every core busy does.
    let cfg = format!(
        "agent_id = \"node-hot\"\ninterval = \"250ms\"\nheartbeat_interval = \"500ms\"\nadmin_listen = \"\"\n\
         state_dir = \"{}\"\n[drills]\nallow = [\"high_load\"]\n\
         [aggregator]\nendpoints = [\"http://{}\"]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n\
         [rules.cpu]\nwarning = 97\ncritical = 98\nfor = \"0s\"\nclear_for = \"0s\"\n\
         [rules.memory]\nenabled = false\n[rules.cpu_core]\nenabled = false\n{QUIET_HOST_RULES}",
        dir.path().join("agent-hot").display(),
        agg.grpc
    );
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_connected("node-hot").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-hot", "scenario": "high_load", "duration_s": 3, "wait_s": 30}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let s = &answer["drill"]["scenarios"][0];
    assert!(
        s["agent"].as_str().is_some_and(|a| a.contains("burned")),
        "{s:#}"
    );
    assert_eq!(step(s, "incident")["happened"], true, "{s:#}");
    assert_eq!(step(s, "notification")["happened"], true, "{s:#}");
    let trigger = receiver.wait_for("trigger", "node-hot", "cpu").await?;
    assert_eq!(trigger["incident"]["labels"]["drill"], "true", "{trigger}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_down_drill_closes_the_port_the_agent_holds_and_the_tcp_check_pages()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = AgentToml::new(dir.path(), "node-dep", agg.grpc)
        .set(&format!(
            "[drills]\nallow = [\"dependency_down\"]\ndependency_listen = \"127.0.0.1:{port}\"\n\
             [[tcp]]\nname = \"db\"\naddress = \"127.0.0.1:{port}\"\ninterval = \"250ms\"\ntimeout = \"1s\"\nfor = \"500ms\""
        ))
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_reported("node-dep").await?;
    // The agent holds the port: the dependency is up.
    tocsin_e2e::eventually(
        "the stand-in dependency answers",
        tocsin_e2e::PATIENCE,
        || async { std::net::TcpStream::connect(("127.0.0.1", port)).ok() },
    )
    .await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-dep", "scenario": "dependency_down", "duration_s": 2,
               "wait_s": 30, "target": "db"}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "passed", "{r:#}");
    let s = &r["scenarios"][0];
    assert_eq!(s["observed"]["notified_channel"], "t", "{s:#}");
    let trigger = receiver.wait_for("trigger", "node-dep", "tcp:db").await?;
    assert_eq!(trigger["incident"]["labels"]["drill"], "true", "{trigger}");
    receiver.wait_for("resolve", "node-dep", "tcp:db").await?;
    // Open again after the drill.
    std::net::TcpStream::connect(("127.0.0.1", port))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_whose_notification_never_arrives_fails_loudly_with_exit_code_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The only channel refuses every delivery.
    let receiver = WebhookReceiver::scripted(vec![500; 10_000]).await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .set("node_timeout = \"1s\"")
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let cfg = AgentToml::new(dir.path(), "node-deaf", agg.grpc)
        .set("[drills]\nallow = [\"node_down\"]")
        .build();
    let _agent = start_agent(dir.path(), &cfg)?;
    agg.wait_connected("node-deaf").await?;
    let api = format!("http://{}", agg.http);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args([
                "--api",
                &api,
                "drill",
                "node-deaf",
                "node_down",
                "--duration",
                "4s",
                "--wait",
                "5s",
                "--by",
                "cli-test",
            ])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("NO NOTIFICATION ARRIVED"), "{stdout}");
    assert!(stderr.contains("A NOTIFICATION NEVER ARRIVED"), "{stderr}");
    assert!(!receiver.requests().is_empty(), "the page was tried");
    assert!(receiver.received().is_empty());
    Ok(())
}

/// The documented way to keep drills off the real paging path: a first route matching
/// the drill mark sends drill incidents to a drill channel only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_on_the_drill_mark_keeps_drill_pages_off_the_real_channel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let real = WebhookReceiver::start().await?;
    let drills = WebhookReceiver::start().await?;
    let cfg = format!(
        "{}[[notify.webhook]]\nname = \"drill-room\"\nurl = \"{}\"\n\
         [[route]]\nname = \"drills\"\nmatch = [\"drill=true\"]\nchannels = [\"drill-room\"]\n\
         [[route]]\nname = \"real\"\nchannels = [\"t\"]\n",
        AggregatorToml::new(dir.path())
            .set("node_timeout = \"1s\"")
            .webhook(&real.url)
            .build(),
        drills.url
    );
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-r", agg.grpc)
            .set("[drills]\nallow = [\"node_down\"]")
            .build(),
    )?;
    agg.wait_connected("node-r").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-r", "scenario": "node_down", "duration_s": 4, "wait_s": 30}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["drill"]["status"], "passed", "{answer:#}");
    assert_eq!(
        answer["drill"]["scenarios"][0]["observed"]["notified_channel"],
        "drill-room"
    );
    drills.wait_for("trigger", "node-r", "node_down").await?;
    assert!(real.received().is_empty(), "{:?}", real.received());
    Ok(())
}

/// Routes of the P1 path tests: P1 to `war`, the rest to `ops`; `[drills]` lines as
/// given; channels `war`, `ops` and `drill-room`.
fn p1_config(
    dir: &std::path::Path,
    drills: &str,
    war: &WebhookReceiver,
    ops: &WebhookReceiver,
    room: &WebhookReceiver,
) -> String {
    let mut t = AggregatorToml::new(dir)
        .set("node_timeout = \"1s\"")
        .set(drills)
        .set("[[route]]\nname = \"p1\"\nseverity = [\"P1\"]\nchannels = [\"war\"]")
        .set("[[route]]\nname = \"rest\"\nchannels = [\"ops\"]")
        .set("[notify]\nretry_min = \"100ms\"");
    for (name, r) in [("war", war), ("ops", ops), ("drill-room", room)] {
        t = t.set(&format!(
            "[[notify.webhook]]\nname = \"{name}\"\nurl = \"{}\"",
            r.url
        ));
    }
    t.build()
}

/// A real agent labelled `tier = "critical"` (its node_down is P1) that allows the
/// node_down drill.
fn critical_agent(dir: &std::path::Path, id: &str, agg: &Aggregator) -> Result<tocsin_e2e::Daemon> {
    start_agent(
        dir,
        &AgentToml::new(dir, id, agg.grpc)
            .set("[labels]\ntier = \"critical\"\n[drills]\nallow = [\"node_down\"]")
            .build(),
    )
}

/// Three receivers: the P1 route's, the rest's, the drill room's.
async fn p1_receivers() -> Result<(WebhookReceiver, WebhookReceiver, WebhookReceiver)> {
    Ok((
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
        WebhookReceiver::start().await?,
    ))
}

fn is_drill_page(trigger: &Value) -> bool {
    trigger["incident"]["labels"]["drill"] == "true"
        && trigger["incident"]["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("[DRILL] "))
}

/// By default a drill incident that is a P1 (node_down of a tier=critical node) takes
/// the real routes as a P2: the P1 route's receiver gets nothing, the incident keeps P1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p1_drill_incident_does_not_reach_the_p1_route_by_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (war, ops, room) = p1_receivers().await?;
    let agg = Aggregator::start(dir.path(), &p1_config(dir.path(), "", &war, &ops, &room)).await?;
    let _agent = critical_agent(dir.path(), "node-p1", &agg)?;
    agg.wait_connected("node-p1").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-p1", "scenario": "node_down", "duration_s": 4, "wait_s": 30}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(r["page_real"], false, "{r:#}");
    assert_eq!(r["paging"], "real routes, at most P2", "{r:#}");
    let o = &r["scenarios"][0]["observed"];
    assert_eq!(
        o["severity"], "P1",
        "the report shows the real severity: {o:#}"
    );
    assert_eq!(o["notified_channel"], "ops", "{o:#}");
    let trigger = ops.wait_for("trigger", "node-p1", "node_down").await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    assert_eq!(trigger["incident"]["severity"], "P1", "{trigger}");
    ops.wait_for("resolve", "node-p1", "node_down").await?;
    let detail = agg
        .get(&format!("/api/v1/incidents/{}", o["incident_id"]))
        .await?;
    assert!(
        detail["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "routed"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("routed as P2 although it is P1")))),
        "{detail:#}"
    );
    assert!(war.received().is_empty(), "{:?}", war.received());
    assert!(room.received().is_empty(), "{:?}", room.received());
    Ok(())
}

/// With `[drills] channels`, drill incidents go to those channels only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drill_channels_a_p1_drill_incident_reaches_only_the_drill_channel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (war, ops, room) = p1_receivers().await?;
    let cfg = p1_config(
        dir.path(),
        "[drills]\nchannels = [\"drill-room\"]",
        &war,
        &ops,
        &room,
    );
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let _agent = critical_agent(dir.path(), "node-room", &agg)?;
    agg.wait_connected("node-room").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-room", "scenario": "node_down", "duration_s": 4, "wait_s": 30}),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(r["paging"], "drill channels: drill-room", "{r:#}");
    assert_eq!(
        r["scenarios"][0]["observed"]["notified_channel"],
        "drill-room"
    );
    let trigger = room.wait_for("trigger", "node-room", "node_down").await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    room.wait_for("resolve", "node-room", "node_down").await?;
    assert!(war.received().is_empty(), "{:?}", war.received());
    assert!(ops.received().is_empty(), "{:?}", ops.received());
    Ok(())
}

/// `tocsin drill --page-real`: the drill's P1 incident takes the P1 route, still
/// `[DRILL]`, and the drill row records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_run_with_page_real_reaches_the_p1_route() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (war, ops, room) = p1_receivers().await?;
    let cfg = p1_config(
        dir.path(),
        "[drills]\nchannels = [\"drill-room\"]",
        &war,
        &ops,
        &room,
    );
    let agg = Aggregator::start(dir.path(), &cfg).await?;
    let _agent = critical_agent(dir.path(), "node-real", &agg)?;
    agg.wait_connected("node-real").await?;
    let api = format!("http://{}", agg.http);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args([
                "--api",
                &api,
                "drill",
                "node-real",
                "node_down",
                "--duration",
                "4s",
                "--wait",
                "30s",
                "--page-real",
                "--by",
                "cli-test",
            ])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("paging: real routes, real severity (--page-real)"),
        "{stdout}"
    );
    let trigger = war.wait_for("trigger", "node-real", "node_down").await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    assert_eq!(trigger["incident"]["severity"], "P1", "{trigger}");
    let listed = agg.get("/api/v1/drills").await?;
    assert_eq!(listed["drills"][0]["page_real"], true, "{listed}");
    assert!(room.received().is_empty(), "{:?}", room.received());
    assert!(ops.received().is_empty(), "{:?}", ops.received());
    Ok(())
}

/// The drill mark is kept apart from the node's labels: an agent that reconnects
/// mid-drill (its Hello replaces the node's labels) still raises drill incidents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_mark_survives_an_agent_reconnect_mid_drill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let endpoint = format!("http://{}", agg.grpc);
    let node = |labels: &'static [(&'static str, &'static str)]| {
        let endpoint = endpoint.clone();
        async move {
            ScriptedNode::connect(&endpoint, "node-back", labels, Duration::from_secs(600)).await
        }
    };
    let mut first = node(&[("service", "web")]).await?;
    // The watch `app` is known to the aggregator (a target must name one).
    first.send(&[("process:app", "ok")]).await?;
    let body = json!({"by": "t", "node": "node-back", "scenario": "process_crash",
                      "duration_s": 2, "wait_s": 30, "target": "app"});
    let drill = tokio::spawn(start_drill(agg.http, body));
    let cmd = first.accept_drill(PATIENCE).await?;
    // The agent reconnects mid-drill, with labels of its own (no drill mark).
    drop(first);
    let mut back = eventually("the agent reconnects", PATIENCE, || async {
        node(&[("service", "web"), ("zone", "b")]).await.ok()
    })
    .await?;
    let nodes = agg.get("/api/v1/nodes").await?;
    ensure!(!nodes.to_string().contains("\"drill\""), "{nodes}");
    back.send(&[("process:app", "critical")]).await?;
    let trigger = receiver
        .wait_for("trigger", "node-back", "process:app")
        .await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    assert_eq!(trigger["incident"]["labels"]["zone"], "b", "{trigger}");
    assert_eq!(
        trigger["incident"]["labels"]["drill_id"],
        cmd.drill_id.to_string(),
        "{trigger}"
    );
    back.send(&[("process:app", "ok")]).await?;
    back.end_drill(&cmd).await?;
    let (status, answer) = drill.await??;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["drill"]["status"], "passed", "{answer:#}");
    // After the drill, the same node's incidents are real again.
    back.send(&[("process:other", "critical")]).await?;
    let real = receiver
        .wait_for("trigger", "node-back", "process:other")
        .await?;
    assert!(real["incident"]["labels"].get("drill").is_none(), "{real}");
    Ok(())
}

/// kill -9 of the aggregator mid-drill: `tocsin drill` says the drill was interrupted
/// (exit 4); after the restart the node stays marked while the drill window is open (its
/// node_down is still a drill), then the drill row becomes `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_killed_mid_drill_leaves_an_interrupted_drill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cfg = AggregatorToml::new(dir.path())
        .grpc(grpc)
        .set("node_timeout = \"1s\"")
        .webhook(&receiver.url)
        .build();
    let mut agg = Aggregator::start(dir.path(), &cfg).await?;
    let mut agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-k", grpc)
            .set("[drills]\nallow = [\"node_down\"]")
            .build(),
    )?;
    agg.wait_connected("node-k").await?;
    let api = format!("http://{}", agg.http);
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args([
                "--api",
                &api,
                "drill",
                "node-k",
                "node_down",
                "--duration",
                "10s",
                "--wait",
                "2s",
                "--by",
                "cli-test",
            ])
            .output()
    });
    agent.wait_for_output("DRILL: injecting a fault").await?;
    let running = agg.get("/api/v1/drills").await?;
    assert_eq!(running["drills"][0]["status"], "running", "{running}");
    let id = running["drills"][0]["id"].as_i64().unwrap_or(0);
    agg.daemon.stop("KILL")?;
    let out = cli.await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("DRILL INTERRUPTED")
            && stderr.contains("connection to the aggregator was lost"),
        "{stderr}"
    );

    let agg = Aggregator::start(dir.path(), &cfg).await?;
    // The fault is still injected (no heartbeats): node_down opens, still a drill.
    let trigger = receiver.wait_for("trigger", "node-k", "node_down").await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    let row = agg.get(&format!("/api/v1/drills/{id}")).await?;
    assert_eq!(row["drill"]["status"], "running", "{row}");
    assert!(row["drill"]["restarted_ms"].as_i64().is_some(), "{row}");
    receiver.wait_for("resolve", "node-k", "node_down").await?;
    // Window: 10s answer + 10s fault + 2s wait + 5s margin from the start.
    let ended = eventually("the drill ends interrupted", PATIENCE, || async {
        let row = agg.get(&format!("/api/v1/drills/{id}")).await.ok()?;
        (row["drill"]["status"] == "interrupted").then_some(row)
    })
    .await?;
    assert!(
        ended["drill"]["report"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the aggregator restarted during the drill")),
        "{ended}"
    );
    let api = format!("http://{}", agg.http);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args(["--api", &api, "drill", "--show", &id.to_string()])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(stdout.contains("INTERRUPTED"), "{stdout}");
    assert!(
        stdout.contains("the aggregator restarted during the drill"),
        "{stdout}"
    );
    Ok(())
}

/// An aggregator (`node_timeout` 1s) with a webhook receiver, and a scripted node `id`
/// (heartbeats every 300 ms) that reported `checks` (so a `--target` can name them).
async fn scripted_setup(
    dir: &std::path::Path,
    id: &str,
    checks: &[(&str, &str)],
) -> Result<(Aggregator, WebhookReceiver, ScriptedNode)> {
    let receiver = WebhookReceiver::start().await?;
    let agg = Aggregator::start(
        dir,
        &AggregatorToml::new(dir)
            .set("node_timeout = \"1s\"")
            .webhook(&receiver.url)
            .build(),
    )
    .await?;
    let mut node = ScriptedNode::connect(
        &format!("http://{}", agg.grpc),
        id,
        &[],
        Duration::from_millis(300),
    )
    .await?;
    node.heartbeats(Duration::from_millis(300));
    if !checks.is_empty() {
        node.send(checks).await?;
    }
    Ok((agg, receiver, node))
}

/// `tocsin drill ARGS…` against `agg`, as a child process (stdout and stderr piped).
fn spawn_cli(agg: &Aggregator, args: &[&str]) -> Result<std::process::Child> {
    let api = format!("http://{}", agg.http);
    Ok(std::process::Command::new(bin("tocsin"))
        .args(["--api", &api, "drill"])
        .args(args)
        .args(["--by", "cli-test"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// Waits for `child` to exit; (exit code, stdout, stderr).
async fn cli_output(child: std::process::Child) -> Result<(Option<i32>, String, String)> {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Drill `id` once it ended (not `running`).
async fn ended_drill(agg: &Aggregator, id: i64) -> Result<Value> {
    eventually("the drill ends", PATIENCE, || async {
        let row = agg.get(&format!("/api/v1/drills/{id}")).await.ok()?;
        (row["drill"]["status"] != "running").then(|| row["drill"].clone())
    })
    .await
}

/// Finding 1: killing `tocsin drill` left the node in drill mode and the row `running`.
/// The drill now runs on the aggregator as its own task: it ends, records its report and
/// its mark ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_cli_mid_drill_leaves_no_node_in_drill_mode() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, receiver, mut node) =
        scripted_setup(dir.path(), "node-cli", &[("process:app", "ok")]).await?;
    let mut cli = spawn_cli(
        &agg,
        &[
            "node-cli",
            "process_crash",
            "--target",
            "app",
            "--duration",
            "1s",
            "--wait",
            "20s",
        ],
    )?;
    let cmd = node.accept_drill(PATIENCE).await?;
    cli.kill()?; // SIGKILL: the client is gone
    let _ = cli.wait();
    node.send(&[("process:app", "critical")]).await?;
    let trigger = receiver
        .wait_for("trigger", "node-cli", "process:app")
        .await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    node.send(&[("process:app", "ok")]).await?;
    node.end_drill(&cmd).await?;
    let row = ended_drill(&agg, cmd.drill_id).await?;
    assert_eq!(row["status"], "passed", "{row:#}");
    assert_eq!(row["report"]["scenarios"][0]["status"], "passed", "{row:#}");
    // The mark ended with the drill: the next incident of the node is real.
    node.send(&[("process:app", "critical")]).await?;
    let real = eventually("a page that is no drill", PATIENCE, || async {
        receiver
            .events("trigger", "node-cli", "process:app")
            .into_iter()
            .find(|r| r["incident"]["labels"].get("drill").is_none())
    })
    .await?;
    assert!(!is_drill_page(&real), "{real}");
    Ok(())
}

/// Finding 2: a real incident open before the drill stayed real only by luck of
/// routing; a real node_down during a high_load drill (the agent died) paged as a
/// drill. Now the mark covers only the scenario's checks, and the drill whose agent
/// was lost ends `interrupted`, naming it (finding 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_high_load_drill_real_incidents_stay_real_and_a_lost_agent_interrupts_it()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, receiver, mut node) =
        scripted_setup(dir.path(), "node-mix", &[("load", "ok"), ("cpu", "ok")]).await?;
    // A real incident of a check the drill expects, open before the drill.
    node.send(&[("cpu", "warning")]).await?;
    receiver.wait_for("trigger", "node-mix", "cpu").await?;
    let drill = tokio::spawn(start_drill(
        agg.http,
        json!({"by": "t", "node": "node-mix", "scenario": "high_load", "duration_s": 1, "wait_s": 8}),
    ));
    let cmd = node.accept_drill(PATIENCE).await?;
    node.send(&[("cpu", "critical"), ("load", "critical")])
        .await?;
    let load = receiver.wait_for("trigger", "node-mix", "load").await?;
    assert!(is_drill_page(&load), "{load}");
    // The agent dies mid-fault (never reports the end): its node_down is real.
    drop(node);
    let down = receiver
        .wait_for("trigger", "node-mix", "node_down")
        .await?;
    assert!(down["incident"]["labels"].get("drill").is_none(), "{down}");
    assert!(
        !down["incident"]["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("[DRILL]"),
        "{down}"
    );
    for r in receiver.received() {
        if r["incident"]["check"] == "cpu" && r["incident"]["node"] == "node-mix" {
            assert!(r["incident"]["labels"].get("drill").is_none(), "{r}");
        }
    }
    let (status, answer) = drill.await??;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "interrupted", "{r:#}");
    let s = &r["scenarios"][0];
    assert!(
        s["agent"]
            .as_str()
            .is_some_and(|a| a.contains("lost the agent on node-mix")),
        "{s:#}"
    );
    let _ = cmd;
    Ok(())
}

/// Finding 3: a second drill on a node was accepted while the first waited, and its
/// refusal cleared the first one's mark. Now the aggregator refuses it (409 naming the
/// running drill; the CLI exits 3) and the first drill's mark is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_drill_on_a_node_is_refused_and_leaves_the_first_ones_mark() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, receiver, mut node) =
        scripted_setup(dir.path(), "node-two", &[("process:app", "ok")]).await?;
    let first = tokio::spawn(start_drill(
        agg.http,
        json!({"by": "t", "node": "node-two", "scenario": "process_crash", "target": "app",
               "duration_s": 1, "wait_s": 30}),
    ));
    let cmd = node.accept_drill(PATIENCE).await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-two", "scenario": "node_down", "duration_s": 60}),
    )
    .await?;
    assert_eq!(status, 409, "{answer}");
    let msg = answer.to_string();
    assert!(msg.contains(&format!("drill #{}", cmd.drill_id)), "{msg}");
    let (code, _, stderr) = cli_output(spawn_cli(
        &agg,
        &["node-two", "high_load", "--duration", "2s"],
    )?)
    .await?;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("drill #{}", cmd.drill_id)),
        "{stderr}"
    );
    assert!(
        !stderr.contains("injecting"),
        "announced before it was accepted: {stderr}"
    );
    // The first drill's mark holds.
    node.send(&[("process:app", "critical")]).await?;
    let trigger = receiver
        .wait_for("trigger", "node-two", "process:app")
        .await?;
    assert!(is_drill_page(&trigger), "{trigger}");
    node.send(&[("process:app", "ok")]).await?;
    node.end_drill(&cmd).await?;
    let (status, answer) = first.await??;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["drill"]["status"], "passed", "{answer:#}");
    let listed = agg.get("/api/v1/drills").await?;
    assert_eq!(
        listed["drills"].as_array().map(Vec::len),
        Some(1),
        "the refused drill left no row: {listed:#}"
    );
    Ok(())
}

/// Finding 4: with the default duration (20s) node_down could never pass on a node
/// declared down after 30s. Without a duration it is stretched (and the plan says so);
/// a given one too short is refused, naming the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_is_stretched_past_the_liveness_timeout_or_refused_when_too_short() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    // The default node_timeout (30s) is above 3 heartbeat intervals (27s): node_down
    // needs 30s + 5s.
    let mut node = ScriptedNode::connect(
        &format!("http://{}", agg.grpc),
        "node-slow",
        &[],
        Duration::from_secs(9),
    )
    .await?;
    node.heartbeats(Duration::from_secs(9));
    agg.wait_connected("node-slow").await?;
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-slow", "scenario": "all", "duration_s": 20}),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    let msg = answer.to_string();
    assert!(
        msg.contains("too short for node_down") && msg.contains("32s"),
        "{msg}"
    );
    let (code, _, stderr) = cli_output(spawn_cli(
        &agg,
        &["node-slow", "node_down", "--duration", "20s"],
    )?)
    .await?;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("too short for node_down"), "{stderr}");
    assert!(!stderr.contains("injecting"), "{stderr}");
    let (status, answer) = start_drill(
        agg.http,
        json!({"by": "t", "node": "node-slow", "scenario": "all", "detach": true}),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    let plan = &answer["plan"];
    let faults: Vec<(String, f64)> = plan["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["scenario"].as_str().unwrap_or_default().to_owned(),
                s["duration_s"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    assert_eq!(faults.len(), 4, "{plan:#}");
    assert_eq!(faults[0].1, 20.0, "{plan:#}");
    assert_eq!(faults[3], ("node_down".to_owned(), 32.0), "{plan:#}");
    assert!(
        plan["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("node_down: the fault lasts 32s")),
        "{plan:#}"
    );
    Ok(())
}

/// Finding 5: the same drill twice within `reopen_window` was "incident MISSING … NO
/// NOTIFICATION ARRIVED": its incident reopened the first one's. The reopened incident
/// is the drill's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_drill_twice_within_the_reopen_window_passes_twice() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, receiver, mut node) =
        scripted_setup(dir.path(), "node-again", &[("process:app", "ok")]).await?;
    let mut incidents = Vec::new();
    for round in 1..=2 {
        let drill = tokio::spawn(start_drill(
            agg.http,
            json!({"by": "t", "node": "node-again", "scenario": "process_crash", "target": "app",
                   "duration_s": 1, "wait_s": 30}),
        ));
        let cmd = node.accept_drill(PATIENCE).await?;
        node.send(&[("process:app", "critical")]).await?;
        let want = cmd.drill_id.to_string();
        eventually("the drill's trigger", PATIENCE, || async {
            let n = receiver
                .received()
                .iter()
                .filter(|r| r["incident"]["check"] == "process:app" && is_drill_page(r))
                .filter(|r| r["incident"]["labels"]["drill_id"] == want.as_str())
                .count();
            (n > 0).then_some(())
        })
        .await?;
        node.send(&[("process:app", "ok")]).await?;
        node.end_drill(&cmd).await?;
        let (status, answer) = drill.await??;
        assert_eq!(status, 200, "{answer}");
        let r = &answer["drill"];
        assert_eq!(r["status"], "passed", "round {round}: {r:#}");
        incidents.push(r["scenarios"][0]["observed"]["incident_id"].clone());
    }
    assert_eq!(
        incidents[0], incidents[1],
        "the second drill reopened the first's incident"
    );
    Ok(())
}

/// Finding 8: a high_load drill while `cpu` already fires was FAILED "NO NOTIFICATION
/// ARRIVED"; it is inconclusive (exit 6). An agent that restarts during the fault makes
/// the scenario interrupted (it was PASSED "closed for 30s").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_already_firing_is_inconclusive_and_an_agent_restart_interrupts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, _receiver, mut node) =
        scripted_setup(dir.path(), "node-hot2", &[("cpu", "ok"), ("tcp:db", "ok")]).await?;
    node.send(&[("cpu", "critical")]).await?;
    let cli = spawn_cli(
        &agg,
        &[
            "node-hot2",
            "high_load",
            "--duration",
            "1s",
            "--wait",
            "2s",
            "--markdown",
        ],
    )?;
    let cmd = node.accept_drill(PATIENCE).await?;
    node.end_drill(&cmd).await?;
    let (code, stdout, stderr) = cli_output(cli).await?;
    assert_eq!(code, Some(6), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("inconclusive: check already firing before the drill (cpu critical"),
        "{stdout}"
    );
    assert!(!stdout.contains("NO NOTIFICATION ARRIVED"), "{stdout}");
    assert!(stderr.contains("DRILL INCONCLUSIVE"), "{stderr}");
    node.send(&[("cpu", "ok")]).await?;

    // dependency_down; the agent restarts (a new agent process) mid-fault.
    let drill = tokio::spawn(start_drill(
        agg.http,
        json!({"by": "t", "node": "node-hot2", "scenario": "dependency_down", "target": "db",
               "duration_s": 30, "wait_s": 30}),
    ));
    let _cmd = node.accept_drill(PATIENCE).await?;
    // The stream is ordered: once this event is acknowledged, the aggregator has handled
    // the "fault injected" report before it (dropping the node at once could lose it).
    node.send(&[("tcp:db", "ok")]).await?;
    drop(node);
    let endpoint = format!("http://{}", agg.grpc);
    let mut back = eventually("the agent restarts", PATIENCE, || async {
        ScriptedNode::connect_instance(
            &endpoint,
            "node-hot2",
            &[],
            Duration::from_millis(300),
            "reborn",
        )
        .await
        .ok()
    })
    .await?;
    back.heartbeats(Duration::from_millis(300));
    let (status, answer) = drill.await??;
    assert_eq!(status, 200, "{answer}");
    let r = &answer["drill"];
    assert_eq!(r["status"], "interrupted", "{r:#}");
    let s = &r["scenarios"][0];
    assert_eq!(s["status"], "interrupted", "{s:#}");
    assert!(
        s["agent"]
            .as_str()
            .is_some_and(|a| a.contains("restarted during the fault") && a.contains("reborn")),
        "{s:#}"
    );
    Ok(())
}

/// Finding 13: bad input was announced ("DRILL … injecting the fault") before it was
/// refused, `--duration 1ms` was accepted and an unknown `--target` was a refusal
/// (exit 3). Arguments are checked first (exit 64, naming the flag), the drill is
/// announced once accepted, and an unknown target is bad input (exit 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_drill_input_is_refused_before_anything_is_announced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (agg, _receiver, _node) = scripted_setup(
        dir.path(),
        "node-in",
        &[("process:app", "ok"), ("tcp:db", "ok")],
    )
    .await?;
    for (args, needle) in [
        (&["node-in", "explode"][..], "SCENARIO \"explode\""),
        (
            &["node-in", "high_load", "--duration", "1ms"][..],
            "--duration 1ms",
        ),
        (
            &["node-in", "high_load", "--duration", "11m"][..],
            "--duration 11m",
        ),
        (&["node-in", "high_load", "--wait", "0s"][..], "--wait 0s"),
        (
            &["node-in", "process_crash", "--target", "nginx"][..],
            "target \"nginx\"",
        ),
        (
            &["node-in", "dependency_down", "--target", "cache"][..],
            "known: db",
        ),
    ] {
        let (code, stdout, stderr) = cli_output(spawn_cli(&agg, args)?).await?;
        assert_eq!(code, Some(64), "{args:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("DRILL"), "{args:?}: announced: {stderr}");
    }
    // The API agrees: duration_s is 1 to 600.
    for d in [0.001, 601.0] {
        let (status, answer) = start_drill(
            agg.http,
            json!({"by": "t", "node": "node-in", "scenario": "high_load", "duration_s": d}),
        )
        .await?;
        assert_eq!(status, 400, "{d}: {answer}");
    }
    // The aggregator unreachable: exit 1, nothing announced.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("tocsin"))
            .args([
                "--api",
                &format!("http://127.0.0.1:{port}"),
                "drill",
                "node-in",
                "high_load",
            ])
            .output()
    })
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("DRILL"), "{stderr}");
    assert!(
        agg.get("/api/v1/drills").await?["drills"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    Ok(())
}
