//! A closed channel: agents must present a valid token, and with mutual TLS a certificate
//! signed by the configured CA. Strangers are refused with a clear status and logged.
//! Certificates are made for the test with rcgen.

use std::path::Path;

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tocsin_e2e::{Aggregator, Dummy, WebhookReceiver, start_agent};

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn new_ca() -> Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn leaf(names: &[&str], issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

fn pki() -> Result<Pki> {
    let (ca, issuer) = new_ca()?;
    let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &issuer)?;
    let (client_cert, client_key) = leaf(&["agent-1"], &issuer)?;
    let (_, rogue_issuer) = new_ca()?;
    let (rogue_cert, rogue_key) = leaf(&["agent-1"], &rogue_issuer)?;
    Ok(Pki {
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

fn agent_config(state: &Path, id: &str, endpoint: &str, process: &str, extra: &str) -> String {
    format!(
        "agent_id = \"{id}\"\ninterval = \"250ms\"\nheartbeat_interval = \"500ms\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"{endpoint}\"]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n{extra}\n\
         [rules.cpu]\nenabled = false\n[rules.memory]\nenabled = false\n{quiet}[[process]]\nname = \"{process}\"\n",
        state.display(),
        quiet = tocsin_e2e::QUIET_HOST_RULES
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_on_connect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = WebhookReceiver::start().await?;
    let tokens = write(
        dir.path(),
        "tokens",
        "# agent tokens\nnode-good s3cr3t-good\n",
    )?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[auth]\ntokens_file = \"{tokens}\"\n\
         [notify]\nretry_min = \"100ms\"\n[[notify.webhook]]\nname = \"t\"\nurl = \"{}\"\n",
        dir.path().join("agg").display(),
        receiver.url
    );
    let mut agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let endpoint = format!("http://{}", agg.grpc);
    let mut dummy = Dummy::new(dir.path(), "t")?;
    dummy.start()?;

    let good_token = write(dir.path(), "good.token", "s3cr3t-good\n")?;
    let good_dir = dir.path().join("good");
    std::fs::create_dir_all(&good_dir)?;
    let extra = format!("token_file = \"{good_token}\"");
    let _good = start_agent(
        &good_dir,
        &agent_config(
            &good_dir.join("s"),
            "node-good",
            &endpoint,
            &dummy.name,
            &extra,
        ),
    )?;
    agg.wait_reported("node-good").await?;

    let bad_token = write(dir.path(), "bad.token", "guess\n")?;
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir)?;
    let extra = format!("token_file = \"{bad_token}\"");
    let mut bad = start_agent(
        &bad_dir,
        &agent_config(&bad_dir.join("s"), "node-good", &endpoint, "x", &extra),
    )?;
    let out = bad.wait_for_output("refused this agent").await?;
    assert!(
        out.contains("Unauthenticated") || out.contains("missing or wrong token"),
        "{out}"
    );
    let agg_out = agg
        .daemon
        .wait_for_output("agent refused: missing or wrong token")
        .await?;
    assert!(
        !agg_out.contains("guess") && !agg_out.contains("s3cr3t"),
        "tokens never logged"
    );

    let none_dir = dir.path().join("none");
    std::fs::create_dir_all(&none_dir)?;
    let mut none = start_agent(
        &none_dir,
        &agent_config(&none_dir.join("s"), "node-none", &endpoint, "x", ""),
    )?;
    none.wait_for_output("refused this agent").await?;

    // The legitimate agent still pages.
    dummy.kill();
    receiver
        .wait_for("trigger", "node-good", &format!("process:{}", dummy.name))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certificates_of_the_configured_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki()?;
    let receiver = WebhookReceiver::start().await?;
    let (ca, cert, key) = (
        write(dir.path(), "ca.pem", &pki.ca)?,
        write(dir.path(), "server.pem", &pki.server_cert)?,
        write(dir.path(), "server.key", &pki.server_key)?,
    );
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         [tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_ca_file = \"{ca}\"\n\
         [notify]\nretry_min = \"100ms\"\n[[notify.webhook]]\nname = \"t\"\nurl = \"{}\"\n",
        dir.path().join("agg").display(),
        receiver.url
    );
    let mut agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let endpoint = format!("https://localhost:{}", agg.grpc.port());
    let mut dummy = Dummy::new(dir.path(), "m")?;
    dummy.start()?;

    let (ccert, ckey) = (
        write(dir.path(), "client.pem", &pki.client_cert)?,
        write(dir.path(), "client.key", &pki.client_key)?,
    );
    let good_dir = dir.path().join("good");
    std::fs::create_dir_all(&good_dir)?;
    let extra =
        format!("tls_ca_file = \"{ca}\"\ntls_cert_file = \"{ccert}\"\ntls_key_file = \"{ckey}\"");
    let _good = start_agent(
        &good_dir,
        &agent_config(
            &good_dir.join("s"),
            "node-tls",
            &endpoint,
            &dummy.name,
            &extra,
        ),
    )?;
    agg.wait_reported("node-tls").await?;

    let (rcert, rkey) = (
        write(dir.path(), "rogue.pem", &pki.rogue_cert)?,
        write(dir.path(), "rogue.key", &pki.rogue_key)?,
    );
    let rogue_dir = dir.path().join("rogue");
    std::fs::create_dir_all(&rogue_dir)?;
    let extra =
        format!("tls_ca_file = \"{ca}\"\ntls_cert_file = \"{rcert}\"\ntls_key_file = \"{rkey}\"");
    let mut rogue = start_agent(
        &rogue_dir,
        &agent_config(&rogue_dir.join("s"), "node-rogue", &endpoint, "x", &extra),
    )?;
    rogue.wait_for_output("aggregator unreachable").await?;
    let refused = agg.daemon.wait_for_output("TLS handshake refused").await?;
    assert!(
        refused.contains("peer=127.0.0.1:"),
        "the refusal names the peer: {refused}"
    );

    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&plain_dir)?;
    let plain_endpoint = format!("http://{}", agg.grpc);
    let mut plain = start_agent(
        &plain_dir,
        &agent_config(&plain_dir.join("s"), "node-plain", &plain_endpoint, "x", ""),
    )?;
    plain.wait_for_output("aggregator unreachable").await?;

    let nodes = agg.get("/api/v1/nodes").await?;
    let ids: Vec<&str> = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["agent_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["node-tls"], "strangers never got in");

    dummy.kill();
    receiver
        .wait_for("trigger", "node-tls", &format!("process:{}", dummy.name))
        .await?;
    Ok(())
}

/// A key that does not belong to the certificate is caught by check-config (so the
/// systemd ExecStartPre stops it), naming the key.
#[test]
fn a_mismatched_tls_key_fails_check_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki()?;
    let cert = write(dir.path(), "server.pem", &pki.server_cert)?;
    let wrong_key = write(dir.path(), "client.key", &pki.client_key)?;
    let cfg = write(
        dir.path(),
        "aggregator.toml",
        &format!(
            "data_dir = \"{}\"\n[tls]\ncert_file = \"{cert}\"\nkey_file = \"{wrong_key}\"\n",
            dir.path().display()
        ),
    )?;
    let out = std::process::Command::new(tocsin_e2e::bin("tocsin-aggregator"))
        .args(["--config", &cfg, "check-config"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("tls.key_file"), "{stderr}");
    Ok(())
}
