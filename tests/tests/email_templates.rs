//! Message templates and the e-mail channel, end to end: the real aggregator and agent,
//! a real SMTP server (Debian's python3-aiosmtpd, see `tocsin_e2e::smtp`) and real HTTP
//! receivers standing in for Slack and PagerDuty, all on 127.0.0.1.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
use tocsin_e2e::smtp::{Mail, SmtpServer};
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, WebhookReceiver, bin,
    eventually, start_agent,
};

/// `[[notify.email]]` to the test SMTP server, plain text on loopback.
fn email_channel(name: &str, port: u16, to: &str) -> String {
    format!(
        "[[notify.email]]\nname = \"{name}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\n\
         tls = \"none\"\nfrom = \"tocsin <tocsin@example.org>\"\nto = [\"{to}\"]\ntimeout = \"5s\"\n"
    )
}

/// Every line of a raw message within RFC 5322's 998 bytes.
fn assert_line_limits(mail: &Mail) {
    for line in mail.raw.split("\r\n") {
        assert!(
            line.len() <= 998,
            "a line of {} bytes in\n{}",
            line.len(),
            mail.raw
        );
    }
}

/// An aggregator with `config` and an agent `node` watching the running `dummy`.
async fn start_pair(
    dir: &Path,
    config: &str,
    node: &str,
    dummy: &Dummy,
) -> Result<(Aggregator, Daemon)> {
    let agg = Aggregator::start(dir, config).await?;
    let agent = start_agent(
        dir,
        &AgentToml::new(dir, node, agg.grpc)
            .watch(&dummy.name)
            .build(),
    )?;
    agg.wait_reported(node).await?;
    Ok((agg, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_process_is_mailed_and_its_recovery_answers_in_the_same_thread() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start(dir.path()).await?;
    let mut dummy = Dummy::new(dir.path(), "m")?;
    dummy.start()?;
    let config = format!(
        "{}[templates.vars]\ncontact = \"@john.doe\"\n{}",
        AggregatorToml::new(dir.path()).build(),
        email_channel("mail", smtp.port, "oncall@example.org")
    );
    let (agg, _agent) = start_pair(dir.path(), &config, "node-mail", &dummy).await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();

    let trigger = smtp.wait_for("trigger").await?;
    let incident = eventually("the incident", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        list["incidents"].as_array()?.first().cloned()
    })
    .await?;
    let id = incident["id"].as_i64().context("id")?;
    let key = incident["dedup_key"]
        .as_str()
        .context("dedup key")?
        .to_owned();
    let severity = incident["severity"]
        .as_str()
        .context("severity")?
        .to_owned();
    assert_eq!(trigger.rcpt_tos, ["oncall@example.org"]);
    assert_eq!(
        trigger.header("Subject"),
        Some(format!("[{severity}] Incident #{id}: {check} on node-mail").as_str()),
        "{:?}",
        trigger.headers
    );
    assert_eq!(trigger.header("X-Tocsin-Dedup-Key"), Some(key.as_str()));
    let thread = format!("<{key}@example.org>");
    assert_eq!(trigger.header("References"), Some(thread.as_str()));
    for part in [
        format!("Incident:        #{id}"),
        format!("Severity:        {severity}"),
        format!("Impact:          {check} on node-mail is CRITICAL"),
        "Current status:  triggered".to_owned(),
        "Next update:".to_owned(),
        "Contact: @john.doe".to_owned(),
        format!("Reference:       {key}"),
    ] {
        assert!(
            trigger.body.contains(&part),
            "{part:?} in\n{}",
            trigger.body
        );
    }
    assert_line_limits(&trigger);

    dummy.start()?;
    let resolve = smtp.wait_for("resolve").await?;
    assert_eq!(
        resolve.header("In-Reply-To"),
        Some(thread.as_str()),
        "{:?}",
        resolve.headers
    );
    assert_eq!(resolve.header("References"), Some(thread.as_str()));
    assert_ne!(resolve.header("Message-ID"), trigger.header("Message-ID"));
    assert!(
        resolve
            .header("Subject")
            .is_some_and(|s| s.starts_with(&format!("[{severity}] Resolved #{id}"))),
        "{:?}",
        resolve.header("Subject")
    );
    assert!(
        resolve.body.contains("has been resolved"),
        "{}",
        resolve.body
    );
    assert!(
        resolve.body.contains("Current status:  resolved"),
        "{}",
        resolve.body
    );
    assert_line_limits(&resolve);
    // One of each: nothing else was mailed.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(smtp.messages().len(), 2, "{:?}", smtp.messages());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_4xx_is_retried_and_5xx_fails_with_the_servers_reply() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start(dir.path()).await?;
    let receiver = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "x")?;
    dummy.start()?;
    let config = format!(
        "{}{}{}",
        AggregatorToml::new(dir.path())
            .webhook(&receiver.url)
            .notify("retry_max = \"1s\"")
            .build(),
        email_channel("busy", smtp.port, "busy2@example.org"),
        email_channel("reject", smtp.port, "reject@example.org"),
    );
    let (agg, _agent) = start_pair(dir.path(), &config, "node-smtp", &dummy).await?;
    dummy.kill();

    let mail = smtp.wait_for("trigger").await?;
    assert_eq!(mail.rcpt_tos, ["busy2@example.org"]);
    let detail = eventually("both e-mail channels settled", PATIENCE, || async {
        let list = agg.get("/api/v1/incidents").await.ok()?;
        let id = list["incidents"][0]["id"].as_i64()?;
        let d = agg.get(&format!("/api/v1/incidents/{id}")).await.ok()?;
        let n = |ch: &str| {
            d["notifications"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["channel"] == ch)
                .cloned()
        };
        let (busy, reject) = (n("busy")?, n("reject")?);
        (busy["status"] == "delivered" && reject["status"] == "failed").then_some((busy, reject, d))
    })
    .await?;
    let (busy, reject, d) = detail;
    assert_eq!(
        busy["attempts"], 3,
        "two 451 replies, then accepted: {busy}"
    );
    assert_eq!(reject["attempts"], 1, "a 550 is not retried: {reject}");
    let error = reject["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("550") && error.contains("no such mailbox here"),
        "the server's reply is recorded: {error}"
    );
    assert!(
        d["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["kind"] == "notify_failed"),
        "{d}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_template_changes_what_slack_and_pagerduty_get() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates)?;
    std::fs::write(
        templates.join("incident.md.j2"),
        "CUSTOM {{ event }} {{ incident.node }} via {{ channel }}\n{{ vars.site }}\n",
    )?;
    let key_file = dir.path().join("pd.key");
    std::fs::write(&key_file, "R0UTINGKEY\n")?;
    let slack = WebhookReceiver::start().await?;
    let pd = WebhookReceiver::start().await?;
    let mut dummy = Dummy::new(dir.path(), "o")?;
    dummy.start()?;
    let config = format!(
        "{}[[notify.webhook]]\nname = \"slack\"\nkind = \"slack\"\nurl = \"{}\"\n\
         [[notify.webhook]]\nname = \"pd\"\nkind = \"pagerduty\"\nurl = \"{}\"\nrouting_key_file = \"{}\"\n\
         [templates]\ndir = \"{}\"\n[templates.vars]\nsite = \"eu-west\"\n",
        AggregatorToml::new(dir.path()).build(),
        slack.url,
        pd.url,
        key_file.display(),
        templates.display()
    );
    let (_agg, _agent) = start_pair(dir.path(), &config, "node-tpl", &dummy).await?;
    dummy.kill();

    let text = eventually("the Slack message", PATIENCE, || async {
        slack
            .received()
            .first()
            .map(|b| b["text"].as_str().unwrap_or_default().to_owned())
    })
    .await?;
    assert_eq!(text, "CUSTOM trigger node-tpl via slack\neu-west");
    let event = eventually("the PagerDuty event", PATIENCE, || async {
        pd.received().first().cloned()
    })
    .await?;
    assert_eq!(event["event_action"], "trigger");
    assert_eq!(
        event["payload"]["summary"], "CUSTOM trigger node-tpl via pagerduty · eu-west",
        "{event}"
    );
    dummy.start()?;
    eventually("the Slack resolve", PATIENCE, || async {
        slack
            .received()
            .iter()
            .any(|b| {
                b["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("CUSTOM resolve node-tpl"))
            })
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_broken_template_fails_check_config_naming_the_file_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates)?;
    std::fs::write(
        templates.join("email.txt.j2"),
        "Hello,\n\n{% for x in incident.labels %}\n{{ x }\n",
    )?;
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "{}[templates]\ndir = \"{}\"\n",
            AggregatorToml::new(dir.path()).build(),
            templates.display()
        ),
    )?;
    let out = Command::new(bin("tocsin-aggregator"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let file = templates.join("email.txt.j2");
    assert!(err.contains("templates.dir"), "{err}");
    assert!(
        err.contains(&format!("{}:4", file.display())),
        "file and line named: {err}"
    );

    // Regression: an override that renders only whitespace (here for a resolve) passed.
    std::fs::write(
        templates.join("email.txt.j2"),
        "{% if event != \"resolve\" %}Hello {{ incident.node }}{% endif %}\n  \n",
    )?;
    let out = Command::new(bin("tocsin-aggregator"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("templates.dir")
            && err.contains(&file.display().to_string())
            && err.contains("only whitespace for event \"resolve\""),
        "{err}"
    );

    // Fixed, it checks and renders.
    std::fs::write(
        templates.join("email.txt.j2"),
        "Hello {{ incident.node }}, {{ event }}\n",
    )?;
    let out = Command::new(bin("tocsin-aggregator"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("tocsin-aggregator"))
        .arg("--config")
        .arg(&config)
        .args(["render-template", "email", "--event", "resolve"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello web-1, resolve\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_emoji_in_check_output_give_valid_bounded_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let smtp = SmtpServer::start(dir.path()).await?;
    let slack = WebhookReceiver::start().await?;
    let pd = WebhookReceiver::start().await?;
    let key_file = dir.path().join("pd.key");
    std::fs::write(&key_file, "R0UTINGKEY\n")?;
    // The agent keeps 1 024 bytes of a plugin's first line (256 emoji); a template that
    // repeats it makes text far beyond Slack's and PagerDuty's limits.
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates)?;
    std::fs::write(
        templates.join("incident.md.j2"),
        "{% for n in range(200) %}{{ incident.summary }}\n{% endfor %}",
    )?;
    std::fs::write(
        templates.join("email-subject.txt.j2"),
        "{{ incident.summary }} {{ incident.summary }}",
    )?;
    let script = dir.path().join("emoji.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho '{}'\nexit 2\n", "🔥".repeat(4000)),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let config = format!(
        "{}[[notify.webhook]]\nname = \"slack\"\nkind = \"slack\"\nurl = \"{}\"\n\
         [[notify.webhook]]\nname = \"pd\"\nkind = \"pagerduty\"\nurl = \"{}\"\nrouting_key_file = \"{}\"\n{}\
         [templates]\ndir = \"{}\"\n",
        AggregatorToml::new(dir.path()).build(),
        slack.url,
        pd.url,
        key_file.display(),
        email_channel("mail", smtp.port, "oncall@example.org"),
        templates.display(),
    );
    let agg = Aggregator::start(dir.path(), &config).await?;
    let _agent = start_agent(
        dir.path(),
        &AgentToml::new(dir.path(), "node-emoji", agg.grpc)
            .set(&format!(
                "[[exec]]\nname = \"emoji\"\ncommand = [\"{}\"]\ninterval = \"500ms\"\n",
                script.display()
            ))
            .build(),
    )?;

    // The receivers record a body as a JSON value only when it parses; axum's String
    // extractor refuses invalid UTF-8.
    let text = eventually("the Slack message", PATIENCE, || async {
        slack.requests().first().map(|(_, b)| b.clone())
    })
    .await?;
    let text = text["text"]
        .as_str()
        .context("Slack body is JSON with a text")?;
    assert!(text.starts_with("exec:emoji critical: 🔥🔥🔥"), "{text}");
    assert_eq!(text.chars().count(), 40_000, "cut to Slack's limit");
    assert!(text.ends_with('…'));
    let event = eventually("the PagerDuty event", PATIENCE, || async {
        pd.requests().first().map(|(_, b)| b.clone())
    })
    .await?;
    let summary = event["payload"]["summary"]
        .as_str()
        .context("PD body is JSON with a summary")?;
    assert_eq!(
        summary.chars().count(),
        1024,
        "cut to PagerDuty's limit: {summary}"
    );
    assert!(summary.ends_with('…'), "{summary}");
    assert!(summary.contains("🔥🔥🔥"), "{summary}");
    assert!(event.to_string().len() <= 512 * 1024);
    assert!(event["dedup_key"].as_str().is_some_and(|k| k.len() <= 255));

    let mail = smtp.wait_for("trigger").await?;
    assert!(mail.raw_utf8, "the raw message is valid UTF-8");
    assert_line_limits(&mail);
    assert!(mail.body.contains("🔥🔥🔥"), "{}", mail.body);
    let subject = mail.header("Subject").context("subject")?;
    assert!(subject.len() <= 998 && subject.ends_with('…'), "{subject}");
    assert!(
        subject.starts_with("exec:emoji critical: 🔥🔥🔥"),
        "{subject}"
    );
    let _: Value = serde_json::to_value(&mail.body)?;
    Ok(())
}
