//! Drills (`tocsin drill`): a real aggregator sends a drill down a real agent's stream;
//! the agent injects the fault for real (kills a watched process, stops its heartbeats,
//! burns CPU), the incident carries the drill mark, its notification says `[DRILL]`, and
//! the report measures every step. An agent that does not allow drills refuses. A drill
//! never pages the real P1 path unless run with `--page-real`; its mark survives an
//! agent reconnect; an aggregator killed mid-drill leaves the drill `interrupted`.

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
                "3s",
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
        json!({"by": "t", "node": "node-prod", "scenario": "node_down", "duration_s": 2}),
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
        json!({"by": "t", "node": "nowhere", "scenario": "node_down", "duration_s": 2}),
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
                "3s",
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
        json!({"by": "t", "node": "node-r", "scenario": "node_down", "duration_s": 3, "wait_s": 30}),
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
        json!({"by": "t", "node": "node-p1", "scenario": "node_down", "duration_s": 3, "wait_s": 30}),
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
        json!({"by": "t", "node": "node-room", "scenario": "node_down", "duration_s": 3, "wait_s": 30}),
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
                "3s",
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
