//! The on-call web view in a real headless Chromium (Debian `chromium`, driven over the
//! DevTools protocol with `chromiumoxide`), against a real aggregator fed by a real agent
//! whose watched process is killed: log in, click Acknowledge, see the change on the
//! page, in the API and on the timeline; a screenshot is kept under
//! `target/test-artifacts/`. The form protections (login, CSRF token, Origin) and the
//! public status pages are checked over plain HTTP as well.
//!
//! Chromium runs with a temporary profile, `--no-sandbox` only when the test runs as
//! root, and no network beyond 127.0.0.1 (background services off, every other host
//! unresolvable and sent to a dead proxy); it is killed by PID at the end.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use chromiumoxide::Page;
use chromiumoxide::browser::Browser;
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::ScreenshotParams;
use futures_util::StreamExt as _;
use serde_json::Value;
use tocsin_e2e::{
    AgentToml, Aggregator, AggregatorToml, Daemon, Dummy, PATIENCE, bin, eventually, start_agent,
};

const TOKEN: &str = "web-ui-test-token-7d1f";

/// An aggregator and an agent on node `node` (label `service=checkout`) watching a
/// dummy process, which is killed: returns once its incident is open.
struct Scene {
    agg: Aggregator,
    _agent: Daemon,
    _dummy: Dummy,
    incident: i64,
    base: String,
}

async fn scene(dir: &Path, node: &str, auth: &str) -> Result<Scene> {
    let mut dummy = Dummy::new(dir, &node[node.len() - 1..])?;
    dummy.start()?;
    let agg = Aggregator::start(dir, &AggregatorToml::new(dir).set(auth).build()).await?;
    let agent = start_agent(
        dir,
        &AgentToml::new(dir, node, agg.grpc)
            .set("[labels]\nservice = \"checkout\"")
            .watch(&dummy.name)
            .build(),
    )?;
    // (Aggregator::wait_reported reads without the token, which read_only = "login" refuses.)
    eventually(&format!("first events of {node}"), PATIENCE, || async {
        let nodes = api(&agg, "/api/v1/nodes").await.ok()?;
        nodes["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["agent_id"] == node && n["last_seq"].as_u64().unwrap_or(0) >= 1)
            .then_some(())
    })
    .await?;
    let check = format!("process:{}", dummy.name);
    dummy.kill();
    let incident = eventually("the incident of the killed process", PATIENCE, || async {
        let list = api(&agg, "/api/v1/incidents?status=open").await.ok()?;
        list["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == check.as_str())
            .and_then(|i| i["id"].as_i64())
    })
    .await?;
    let base = format!("http://{}", agg.http);
    Ok(Scene {
        agg,
        _agent: agent,
        _dummy: dummy,
        incident,
        base,
    })
}

/// `GET path` on the aggregator's API with the test token (reads need it under
/// `read_only = "login"`; the scheme is sent in lower case, which must be accepted).
async fn api(agg: &Aggregator, path: &str) -> Result<Value> {
    let res = reqwest::Client::new()
        .get(format!("http://{}{path}", agg.http))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await?;
    anyhow::ensure!(res.status().is_success(), "GET {path}: {}", res.status());
    Ok(res.json().await?)
}

fn auth_with_token(dir: &Path) -> Result<String> {
    let token = dir.join("api.token");
    std::fs::write(&token, format!("{TOKEN}\n"))?;
    Ok(format!("[auth]\napi_token_file = \"{}\"", token.display()))
}

/// `target/test-artifacts/`, next to the binaries' profile directory.
fn artifacts() -> Result<PathBuf> {
    let profile = bin("tocsin-aggregator")
        .parent()
        .context("profile dir")?
        .to_owned();
    let dir = profile
        .parent()
        .context("target dir")?
        .join("test-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A headless Chromium we started, connected over the DevTools protocol.
struct Chromium {
    child: Child,
    browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn launch() -> Result<Self> {
        let exe = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("chromium is missing: apt-get install chromium")?;
        let profile = tempfile::tempdir()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--no-pings",
            "--metrics-recording-only",
            "--safebrowsing-disable-auto-update",
            "--password-store=basic",
            "--use-mock-keychain",
            "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
            // Nothing but 127.0.0.1: other names do not resolve, and any other address
            // goes to a proxy that is not there (loopback bypasses proxies).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            // A phone's viewport: the page must read there.
            "--window-size=412,915",
        ]);
        if std::fs::metadata("/proc/self")?.uid() == 0 {
            // Chromium's sandbox refuses to run as root.
            cmd.arg("--no-sandbox");
        }
        cmd.arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .env("HOME", profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("start chromium")?;
        let port_file = profile.path().join("DevToolsActivePort");
        let ws = eventually("chromium's DevToolsActivePort", PATIENCE, || {
            let port_file = port_file.clone();
            async move {
                let text = std::fs::read_to_string(&port_file).ok()?;
                let mut lines = text.lines();
                let port = lines.next()?.trim().to_owned();
                let path = lines.next()?.trim().to_owned();
                Some(format!("ws://127.0.0.1:{port}{path}"))
            }
        })
        .await;
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let (browser, mut handler) = match Browser::connect(ws).await {
            Ok(b) => b,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("connect to chromium: {e}");
            }
        };
        // The handler drives the protocol connection; messages it cannot decode (newer
        // Chromium events) are skipped.
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Ok(Chromium {
            child,
            browser,
            handler,
            _profile: profile,
        })
    }

    /// Ends the browser: closes it, then kills its process by PID (and reaps it).
    async fn stop(mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.browser.close()).await;
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.handler.abort();
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects the page's console errors, uncaught exceptions and error log entries
/// (failed loads, CSP violations).
async fn watch_errors(page: &Page) -> Result<Arc<Mutex<Vec<String>>>> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    page.enable_log().await?;
    page.enable_runtime().await?;
    let mut console = page.event_listener::<EventConsoleApiCalled>().await?;
    let mut thrown = page.event_listener::<EventExceptionThrown>().await?;
    let mut log = page.event_listener::<EventEntryAdded>().await?;
    let e = errors.clone();
    tokio::spawn(async move {
        while let Some(ev) = console.next().await {
            if matches!(
                ev.r#type,
                ConsoleApiCalledType::Error | ConsoleApiCalledType::Assert
            ) {
                e.lock()
                    .expect("errors")
                    .push(format!("console: {:?}", ev.args));
            }
        }
    });
    let e = errors.clone();
    tokio::spawn(async move {
        while let Some(ev) = thrown.next().await {
            e.lock()
                .expect("errors")
                .push(format!("exception: {}", ev.exception_details.text));
        }
    });
    let e = errors.clone();
    tokio::spawn(async move {
        while let Some(ev) = log.next().await {
            if ev.entry.level == LogEntryLevel::Error {
                e.lock().expect("errors").push(format!(
                    "log: {} {}",
                    ev.entry.text,
                    ev.entry.url.clone().unwrap_or_default()
                ));
            }
        }
    });
    Ok(errors)
}

async fn text_of(page: &Page, selector: &str) -> Result<String> {
    Ok(page
        .find_element(selector)
        .await
        .with_context(|| format!("find {selector}"))?
        .inner_text()
        .await?
        .unwrap_or_default())
}

/// Waits until `selector` is on the page and its text satisfies `ok` (the page may be
/// navigating meanwhile: a form POST, its redirect, a live refresh); answers the text.
async fn wait_text(page: &Page, selector: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let found = eventually(&format!("{selector} on the page"), PATIENCE, || async {
        let text = text_of(page, selector).await.ok()?;
        ok(&text).then_some(text)
    })
    .await;
    match found {
        Ok(t) => Ok(t),
        Err(e) => {
            let html = page.content().await.unwrap_or_default();
            let url = page.url().await.ok().flatten().unwrap_or_default();
            Err(e.context(format!("page {url}:\n{html}")))
        }
    }
}

/// Clicks `selector` (a link or a form's button: the browser navigates).
async fn click(page: &Page, selector: &str) -> Result<()> {
    page.find_element(selector)
        .await
        .with_context(|| format!("find {selector}"))?
        .click()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_logs_in_acknowledges_and_sees_the_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = scene(dir.path(), "node-web", &auth_with_token(dir.path())?).await?;
    let id = s.incident;
    let chromium = Chromium::launch().await?;
    let result = async {
        let page = chromium.browser.new_page("about:blank").await?;
        let errors = watch_errors(&page).await?;
        page.goto(format!("{}/", s.base)).await?;
        let row = format!("#incident-{id}");
        wait_text(&page, &format!("{row} .status"), |t| {
            t.eq_ignore_ascii_case("triggered")
        })
        .await?;
        // Reading needs no login on loopback, but nothing can be changed without one.
        assert!(
            page.find_elements("button.ack").await?.is_empty(),
            "no Acknowledge button before login"
        );

        click(&page, "#login-link").await?;
        wait_text(&page, "h1", |t| t == "Log in").await?;
        page.find_element("input[name=name]")
            .await?
            .click()
            .await?
            .type_str("alice")
            .await?;
        page.find_element("input[name=secret]")
            .await?
            .click()
            .await?
            .type_str(TOKEN)
            .await?;
        click(&page, "#login-button").await?;
        wait_text(&page, ".user", |t| t == "alice").await?;

        click(&page, &format!("{row} button.ack")).await?;
        wait_text(&page, &format!("{row} .status"), |t| {
            t.eq_ignore_ascii_case("acknowledged")
        })
        .await?;
        assert!(
            page.find_elements(&format!("{row} button.ack"))
                .await?
                .is_empty(),
            "no second Acknowledge"
        );
        let shots = artifacts()?;
        let list_shot = shots.join("web_ui-incidents.png");
        page.save_screenshot(
            ScreenshotParams::builder().full_page(true).build(),
            &list_shot,
        )
        .await?;

        let detail = api(&s.agg, &format!("/api/v1/incidents/{id}")).await?;
        assert_eq!(detail["status"], "acknowledged", "in the API: {detail}");
        let entry = detail["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["kind"] == "acknowledged"))
            .cloned()
            .context("an acknowledged entry on the timeline")?;
        assert_eq!(entry["actor"], "user:alice", "{entry}");

        page.goto(format!("{}/incidents/{id}", s.base)).await?;
        wait_text(&page, "#timeline", |t| t.contains("acknowledged by alice")).await?;
        let detail_shot = shots.join("web_ui-incident.png");
        page.save_screenshot(
            ScreenshotParams::builder().full_page(true).build(),
            &detail_shot,
        )
        .await?;
        #[expect(
            clippy::print_stdout,
            reason = "the test names its artifacts (shown with --nocapture)"
        )]
        {
            println!(
                "screenshots: {} {}",
                list_shot.display(),
                detail_shot.display()
            );
        }

        // The KPI page counts the incident, and its acknowledgement gives an MTTA.
        page.goto(format!("{}/kpi", s.base)).await?;
        let all = wait_text(&page, "table.kpi tbody tr", |t| t.starts_with("all")).await?;
        let cells: Vec<&str> = all.split('\t').map(str::trim).collect();
        assert_eq!(cells.get(1), Some(&"1"), "one incident: {cells:?}");
        assert!(
            cells
                .get(4)
                .is_some_and(|mtta| *mtta != "—" && !mtta.is_empty()),
            "an MTTA from the acknowledgement: {cells:?}"
        );

        // The public status page shows the incident of its service, through the
        // status-page template, and none of the internal timeline.
        page.goto(format!("{}/status/checkout", s.base)).await?;
        let body = wait_text(&page, "main h1", |t| t == "checkout status").await?;
        let body = body + &text_of(&page, "main").await?;
        assert!(body.contains("Identified"), "{body}");
        assert!(body.contains("checkout"), "{body}");
        assert!(!body.contains("operational"), "{body}");
        assert!(!body.contains("alice"), "no internal details: {body}");
        page.goto(format!("{}/status/billing", s.base)).await?;
        wait_text(&page, "#operational", |t| t == "All systems operational.").await?;

        // Let a live refresh run on the nodes page, then look for script errors.
        page.goto(format!("{}/nodes", s.base)).await?;
        wait_text(&page, "#node-node-web", |t| t.contains("connected")).await?;
        tokio::time::sleep(std::time::Duration::from_millis(5_500)).await;
        let errors = errors.lock().expect("errors").clone();
        assert!(errors.is_empty(), "browser errors: {errors:#?}");
        anyhow::Ok(())
    }
    .await;
    chromium.stop().await;
    result
}

/// Posts a form; answers status, `Location` and body.
async fn post_form(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
    form: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut req = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let location = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((status, location, res.text().await?))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_need_a_login_the_csrf_token_and_this_origin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let password = dir.path().join("carol.password");
    std::fs::write(&password, "carol's plain secret\n")?;
    let auth = format!(
        "{}\nread_only = \"login\"\n[[auth.user]]\nname = \"carol\"\npassword_file = \"{}\"",
        auth_with_token(dir.path())?,
        password.display()
    );
    let s = scene(dir.path(), "node-csrf", &auth).await?;
    let id = s.incident;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ack_url = format!("{}/incidents/{id}/ack", s.base);
    let status = || async {
        let d = api(&s.agg, &format!("/api/v1/incidents/{id}")).await?;
        anyhow::Ok(d["status"].as_str().unwrap_or("").to_owned())
    };

    // read_only = "login": pages send a stranger to the login page; status pages stay
    // public.
    let res = client.get(format!("{}/", s.base)).send().await?;
    assert_eq!(res.status().as_u16(), 303);
    assert_eq!(res.headers()["location"], "/login?next=/");
    let res = client
        .get(format!("{}/status/checkout", s.base))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.text().await?.contains("Investigating"));
    // … and so do API reads: 401 JSON without a token or a session; /health stays open.
    for path in [
        "/api/v1/incidents",
        &format!("/api/v1/incidents/{id}"),
        "/api/v1/checks",
    ] {
        let res = client.get(format!("{}{path}", s.base)).send().await?;
        assert_eq!(res.status().as_u16(), 401, "{path}");
        let body: Value = res.json().await?;
        assert_eq!(body["error"]["status"], 401, "{path}: {body}");
    }
    let res = client
        .get(format!("{}/api/v1/incidents", s.base))
        .header("authorization", "Bearer wrong")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 401);
    let res = client.get(format!("{}/health", s.base)).send().await?;
    assert_eq!(res.status().as_u16(), 200);

    // No session: refused.
    let (code, _, _) = post_form(&client, &ack_url, None, None, &[("csrf", "x")]).await?;
    assert_eq!(code, 403);
    assert_eq!(status().await?, "triggered");

    // Wrong password, and the token under a configured user's name: refused.
    let login = format!("{}/login", s.base);
    let (code, _, _) = post_form(
        &client,
        &login,
        None,
        None,
        &[("name", "carol"), ("secret", "nope")],
    )
    .await?;
    assert_eq!(code, 401);
    let (code, _, _) = post_form(
        &client,
        &login,
        None,
        None,
        &[("name", "carol"), ("secret", TOKEN)],
    )
    .await?;
    assert_eq!(code, 401, "the token does not sign in as a configured user");
    // Cross-site login form: refused.
    let (code, _, _) = post_form(
        &client,
        &login,
        None,
        Some("http://evil.example"),
        &[("name", "carol"), ("secret", "carol's plain secret")],
    )
    .await?;
    assert_eq!(code, 403);

    let res = client
        .post(&login)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "name=carol&secret={}&next=/",
            enc("carol's plain secret")
        ))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 303);
    let set = res.headers()["set-cookie"].to_str()?.to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().context("cookie")?.to_owned();

    let page = client
        .get(format!("{}/", s.base))
        .header("cookie", &cookie)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        page.contains(&format!("/incidents/{id}/ack")),
        "buttons once logged in"
    );
    let res = client
        .get(format!("{}/api/v1/incidents/{id}", s.base))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200, "a session reads the API");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("a CSRF token in the page")?
        .to_owned();

    // Logged in, but without the token, with a wrong one, or from another origin.
    let (code, _, _) = post_form(&client, &ack_url, Some(&cookie), None, &[("note", "x")]).await?;
    assert_eq!(code, 403, "no CSRF token");
    let (code, _, _) = post_form(
        &client,
        &ack_url,
        Some(&cookie),
        None,
        &[("csrf", "forged")],
    )
    .await?;
    assert_eq!(code, 403, "wrong CSRF token");
    let (code, _, _) = post_form(
        &client,
        &ack_url,
        Some(&cookie),
        Some("http://evil.example"),
        &[("csrf", &csrf)],
    )
    .await?;
    assert_eq!(code, 403, "foreign Origin");
    assert_eq!(status().await?, "triggered");

    // Everything right: done, by carol.
    let origin = s.base.clone();
    let (code, location, _) = post_form(
        &client,
        &ack_url,
        Some(&cookie),
        Some(&origin),
        &[
            ("csrf", &csrf),
            ("note", "from the form"),
            ("back", "//evil.example/"),
        ],
    )
    .await?;
    assert_eq!(code, 303);
    assert_eq!(location, "/", "the way back stays on this site");
    let d = api(&s.agg, &format!("/api/v1/incidents/{id}")).await?;
    assert_eq!(d["status"], "acknowledged", "{d}");
    let entry = d["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["kind"] == "acknowledged"))
        .cloned()
        .context("acknowledged entry")?;
    assert_eq!(entry["actor"], "user:carol", "{entry}");
    assert!(
        entry["note"]
            .as_str()
            .is_some_and(|n| n.contains("from the form")),
        "{entry}"
    );

    // Silence it from the incident, then expire the silence: both by carol.
    let (code, _, body) = post_form(
        &client,
        &format!("{}/incidents/{id}/silence", s.base),
        Some(&cookie),
        Some(&origin),
        &[
            ("csrf", &csrf),
            ("duration", "1h"),
            ("back", &format!("/incidents/{id}")),
        ],
    )
    .await?;
    assert_eq!(code, 303, "{body}");
    let silences: Value = api(&s.agg, "/api/v1/silences").await?;
    let silence = silences["silences"][0].clone();
    assert_eq!(silence["created_by"], "carol", "{silence}");
    assert_eq!(silence["ends_with_incident"], id, "{silence}");
    let sid = silence["id"].as_i64().context("silence id")?;
    let (code, _, _) = post_form(
        &client,
        &format!("{}/silences/{sid}/expire", s.base),
        Some(&cookie),
        Some(&origin),
        &[("csrf", &csrf)],
    )
    .await?;
    assert_eq!(code, 303);
    let silences: Value = api(&s.agg, "/api/v1/silences").await?;
    assert_eq!(silences["silences"][0]["state"], "expired", "{silences}");
    assert_eq!(silences["silences"][0]["expired_by"], "carol", "{silences}");
    let d = api(&s.agg, &format!("/api/v1/incidents/{id}")).await?;
    assert!(
        d["timeline"].as_array().is_some_and(|t| t
            .iter()
            .any(|e| e["kind"] == "silence_added" && e["actor"] == "user:carol")),
        "{d}"
    );

    // The check states behind the nodes page.
    let checks: Value = api(&s.agg, "/api/v1/checks").await?;
    assert!(
        checks["checks"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["node"] == "node-csrf" && c["state"] == "critical")),
        "{checks}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_reads_need_a_loopback_host() -> Result<()> {
    // No auth on a loopback listener: reads are public, but only to a loopback Host — a
    // page on evil.example rebinding its name to 127.0.0.1 reads nothing (DNS rebinding).
    let dir = tempfile::tempdir()?;
    let agg = Aggregator::start(dir.path(), &AggregatorToml::new(dir.path()).build()).await?;
    let base = format!("http://{}", agg.http);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    for path in [
        "/",
        "/nodes",
        "/kpi",
        "/api/v1/incidents",
        "/api/v1/status",
        "/metrics",
    ] {
        let res = client
            .get(format!("{base}{path}"))
            .header("host", "evil.example:7600")
            .send()
            .await?;
        assert_eq!(res.status().as_u16(), 403, "{path}");
        let res = client.get(format!("{base}{path}")).send().await?;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        let res = client
            .get(format!("{base}{path}"))
            .header("host", format!("localhost:{}", agg.http.port()))
            .send()
            .await?;
        assert_eq!(res.status().as_u16(), 200, "{path} with Host localhost");
    }
    let res = client
        .get(format!("{base}/api/v1/incidents"))
        .header("host", "evil.example")
        .send()
        .await?;
    let body: Value = res.json().await?;
    assert_eq!(body["error"]["status"], 403, "{body}");
    let res = client
        .get(format!("{base}/health"))
        .header("host", "evil.example")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200, "/health stays open");
    Ok(())
}
