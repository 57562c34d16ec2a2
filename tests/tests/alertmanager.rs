//! The Alertmanager API v2 channel against a real Alertmanager (Debian's
//! `prometheus-alertmanager`, installed by tests/run.sh) on 127.0.0.1, clustering off,
//! routing to a real webhook receiver in the test: a real aggregator and agent watch a
//! dummy process; killing it raises an alert with a stable label set that Alertmanager
//! holds (re-posted past a short `resolve_timeout`) and notifies; restarting it ends
//! the alert.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, WebhookReceiver, eventually,
    start_agent,
};

/// A running `prometheus-alertmanager`, stopped by PID when dropped ([`Daemon`]).
struct Alertmanager {
    daemon: Daemon,
    /// `http://127.0.0.1:PORT`.
    url: String,
}

/// Path of the Alertmanager binary; fails (never skips) when it is not installed.
fn alertmanager_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus-alertmanager"))
        .find(|p| p.is_file());
    path.context(
        "prometheus-alertmanager is not installed: run tests/run.sh, which installs Debian's \
         prometheus-alertmanager package (apt-get install prometheus-alertmanager)",
    )
}

/// A free port on 127.0.0.1 (bound, then released for the child to bind).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Alertmanager {
    /// Starts Alertmanager on `port` with `resolve_timeout`, routing every alert (grouped
    /// per incident, no group wait, 1 s group interval) to the webhook at `receiver`.
    /// Cluster gossip is off, so it talks to nothing but 127.0.0.1.
    async fn start(dir: &Path, port: u16, resolve_timeout: &str, receiver: &str) -> Result<Self> {
        let bin = alertmanager_bin()?;
        let home = dir.join(format!("am-{port}"));
        std::fs::create_dir_all(home.join("data"))?;
        let config = home.join("am.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  resolve_timeout: {resolve_timeout}\n\
                 route:\n  receiver: hook\n  group_by: ['incident_id']\n  group_wait: 0s\n  \
                 group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: hook\n    webhook_configs:\n      - url: '{receiver}'\n        \
                 send_resolved: true\n"
            ),
        )?;
        let url = format!("http://127.0.0.1:{port}");
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", home.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            format!("--web.external-url={url}/"),
            "--cluster.listen-address=".to_owned(),
            "--log.level=debug".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn("alertmanager", &bin, &args, &home)?;
        let am = Alertmanager { daemon, url };
        eventually("Alertmanager ready", PATIENCE, || async {
            let r = reqwest::get(format!("{}/-/ready", am.url)).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
        Ok(am)
    }

    /// Alertmanager's current (not resolved) alerts: `GET /api/v2/alerts`.
    async fn alerts(&self) -> Result<Vec<Value>> {
        let v: Value = reqwest::get(format!("{}/api/v2/alerts", self.url))
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The current alert of tocsin incident `id`, if any.
    async fn alert_of(&self, id: i64) -> Result<Option<Value>> {
        let id = id.to_string();
        Ok(self
            .alerts()
            .await?
            .into_iter()
            .find(|a| a["labels"]["incident_id"] == id.as_str()))
    }
}

/// Alertmanager's webhook notifications (`status` `firing`/`resolved`) for incident
/// `id` that the receiver got.
fn notifications(receiver: &WebhookReceiver, id: i64, status: &str) -> Vec<Value> {
    let id = id.to_string();
    receiver
        .received()
        .into_iter()
        .filter_map(|n| {
            n["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["incident_id"] == id.as_str() && a["status"] == status)
                .cloned()
        })
        .collect()
}

/// The aggregator config with one Alertmanager channel `am` (fast retries).
fn aggregator_config(dir: &Path, am_url: &str, repost: &str) -> String {
    format!(
        "{}[notify]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n\
         [[notify.webhook]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"{am_url}\"\n\
         repost_interval = \"{repost}\"\n",
        AggregatorToml::new(dir).build()
    )
}

/// Node labels with names Alertmanager does not accept as they are.
const ODD_LABELS: &str = "labels = { \"team.name\" = \"ops/sre\", \"9zone\" = \"eu west 1\", \
     \"ünï-cødé\" = \"🚨 服务 \\\"q\\\"\", \"a-b\" = \"dash\", \"a_b\" = \"under\", \
     severity = \"sev-label\", empty = \"\" }";

/// An RFC 3339 UTC time with its fraction as exactly 3 digits: Alertmanager's webhook
/// trims trailing zeros (`.12Z`, `Z`), tocsin writes milliseconds (`.120Z`).
fn millis(t: &Value) -> String {
    let t = t.as_str().unwrap_or_default();
    let body = t.strip_suffix('Z').unwrap_or(t);
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    format!("{secs}.{:0<3.3}Z", frac)
}

fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incidents_become_alerts_with_stable_labels_kept_alive_and_ended_on_resolve() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let resolve_timeout = Duration::from_secs(3);
    let am = Alertmanager::start(dir.path(), free_port()?, "3s", &receiver.url).await?;

    // 200 characters, the most an agent id comfortably carries as a label value.
    let node: String = format!("n{}", "web-1.example.".repeat(14)) + "xyz";
    assert_eq!(node.chars().count(), 200);
    let mut dummy = Dummy::new(dir.path(), "am")?;
    dummy.start()?;
    let agg = Aggregator::start(dir.path(), &aggregator_config(dir.path(), &am.url, "1s")).await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), &node, agg.grpc)
            .watch(&dummy.name)
            .set(ODD_LABELS)
            .build(),
    )?;
    agg.wait_reported(&node).await?;
    let check = format!("process:{}", dummy.name);

    dummy.kill();
    let incident = eventually("the incident in tocsin", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents?status=open").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["node"] == node.as_str() && i["check"] == check.as_str())
            .cloned()
    })
    .await?;
    let id = incident["id"].as_i64().context("incident id")?;
    let alert = eventually("the alert in Alertmanager", PATIENCE, || async {
        am.alert_of(id).await.ok().flatten()
    })
    .await?;

    // The stable label set: fixed names, then the incident's labels sanitised.
    let labels: BTreeMap<String, String> = serde_json::from_value(alert["labels"].clone())?;
    let expected_fixed = [
        ("alertname", check.as_str()),
        ("node", node.as_str()),
        (
            "severity",
            incident["severity"].as_str().context("severity")?,
        ),
        ("incident_id", &id.to_string()),
        (
            "dedup_key",
            incident["dedup_key"].as_str().context("dedup_key")?,
        ),
        ("team_name", "ops/sre"),
        ("_9zone", "eu west 1"),
        ("_n__c_d_", "🚨 服务 \"q\""),
        ("a_b", "dash"),
        ("a_b_2", "under"),
        ("severity_2", "sev-label"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    for (k, v) in &expected_fixed {
        assert_eq!(labels.get(k), Some(v), "label {k} in {labels:#?}");
    }
    assert!(!labels.contains_key("empty"), "{labels:#?}");
    assert!(labels.keys().all(|k| valid_label_name(k)), "{labels:#?}");
    let tocsin_labels = incident["labels"].as_object().context("labels")?;
    let non_empty = tocsin_labels
        .values()
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .count();
    assert_eq!(
        labels.len(),
        5 + non_empty,
        "{labels:#?} from {tocsin_labels:#?}"
    );
    for v in tocsin_labels.values().filter_map(Value::as_str) {
        assert!(
            v.is_empty() || labels.values().any(|l| l == v),
            "{v:?} missing"
        );
    }
    assert_eq!(
        millis(&alert["startsAt"]),
        millis(&incident["triggered_at"]),
        "{alert:#}"
    );
    assert_eq!(alert["status"]["state"], "active", "{alert:#}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{alert:#}"
    );

    // Alertmanager routes it to the receiver.
    let fired = eventually("Alertmanager's firing notification", PATIENCE, || async {
        notifications(&receiver, id, "firing").into_iter().next()
    })
    .await?;
    assert_eq!(fired["labels"], alert["labels"]);

    // Re-posts keep it active for several resolve_timeouts: without them Alertmanager
    // would resolve it after 3 s. Each re-post pushes Alertmanager's endsAt forward.
    let watch_until = Instant::now() + resolve_timeout * 3;
    let mut ends_seen = std::collections::BTreeSet::new();
    while Instant::now() < watch_until {
        let Some(a) = am.alert_of(id).await? else {
            bail!("Alertmanager dropped the alert of open incident {id}");
        };
        assert_eq!(a["status"]["state"], "active", "{a:#}");
        assert_eq!(a["labels"], alert["labels"], "the label set changed");
        ends_seen.insert(a["endsAt"].as_str().unwrap_or_default().to_owned());
        ensure!(
            notifications(&receiver, id, "resolved").is_empty(),
            "Alertmanager resolved the open incident {id}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        ends_seen.len() >= 2,
        "no re-post moved endsAt: {ends_seen:?}"
    );

    // Acknowledge: still firing, with who acknowledged.
    let ack = reqwest::Client::new()
        .post(format!("http://{}/api/v1/incidents/{id}/ack", agg.http))
        .json(&json!({"by": "alice", "note": "on it"}))
        .send()
        .await?;
    assert!(ack.status().is_success(), "{:?}", ack.text().await);
    let acked = eventually("acknowledged_by in Alertmanager", PATIENCE, || async {
        let a = am.alert_of(id).await.ok().flatten()?;
        (a["annotations"]["acknowledged_by"] == "alice").then_some(a)
    })
    .await?;
    assert_eq!(acked["labels"], alert["labels"]);
    assert_eq!(acked["status"]["state"], "active");

    // Recovery: the same labels with endsAt = tocsin's resolve time.
    dummy.start()?;
    let resolved = eventually("Alertmanager's resolved notification", PATIENCE, || async {
        notifications(&receiver, id, "resolved").into_iter().next()
    })
    .await?;
    assert_eq!(resolved["labels"], alert["labels"]);
    let detail = agg.get(&format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(detail["status"], "resolved", "{detail:#}");
    assert_eq!(
        millis(&resolved["endsAt"]),
        millis(&detail["resolved_at"]),
        "{resolved:#}"
    );
    assert!(
        am.alert_of(id).await?.is_none(),
        "a resolved alert is no longer listed"
    );
    let notes = detail["notifications"]
        .as_array()
        .context("notifications")?;
    let kinds: Vec<(&str, &str)> = notes
        .iter()
        .map(|n| {
            (
                n["kind"].as_str().unwrap_or(""),
                n["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("trigger", "delivered"),
            ("acknowledge", "delivered"),
            ("resolve", "delivered")
        ],
        "{notes:#?}"
    );

    let metrics = reqwest::get(format!("http://{}/metrics", agg.http))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "tocsin_notify_alertmanager_reposts_total{channel=\"am\",outcome=\"posted\"}"
        ) && !l.ends_with(" 0")),
        "{metrics}"
    );
    tocsin_e2e::promtool_check(&metrics)?;
    let mut am = am;
    am.daemon.stop("TERM")?;
    Ok(())
}

/// Alertmanager down when the incident opens: the trigger is retried (connection
/// refused) and delivered once Alertmanager is up, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_waits_for_alertmanager_to_come_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let port = free_port()?;
    let am_url = format!("http://127.0.0.1:{port}");
    let mut dummy = Dummy::new(dir.path(), "ad")?;
    dummy.start()?;
    let agg = Aggregator::start(dir.path(), &aggregator_config(dir.path(), &am_url, "1m")).await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-amdown", agg.grpc)
            .watch(&dummy.name)
            .build(),
    )?;
    agg.wait_reported("node-amdown").await?;
    dummy.kill();
    let id = eventually("a failed delivery attempt", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents?status=open").await.ok()?;
        let id = list["incidents"].as_array()?.first()?["id"].as_i64()?;
        let detail = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        detail["notifications"].as_array()?.iter().find(|n| {
            n["channel"] == "am"
                && n["status"] == "pending"
                && n["attempts"].as_u64().unwrap_or(0) >= 1
                && n["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("/api/v2/alerts"))
        })?;
        Some(id)
    })
    .await?;
    let mut am = Alertmanager::start(dir.path(), port, "5m", &receiver.url).await?;
    let alert = eventually("the alert in Alertmanager", PATIENCE, || async {
        am.alert_of(id).await.ok().flatten()
    })
    .await?;
    assert_eq!(alert["labels"]["node"], "node-amdown");
    eventually("the trigger recorded as delivered", PATIENCE, || async {
        let detail = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        detail["notifications"]
            .as_array()?
            .iter()
            .any(|n| n["kind"] == "trigger" && n["status"] == "delivered")
            .then_some(())
    })
    .await?;
    eventually("Alertmanager's firing notification", PATIENCE, || async {
        notifications(&receiver, id, "firing").into_iter().next()
    })
    .await?;
    am.daemon.stop("TERM")?;
    Ok(())
}
