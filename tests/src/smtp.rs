//! A real SMTP server for the e-mail tests: Debian's `python3-aiosmtpd` run as a child
//! process on 127.0.0.1 with a small recording handler
//! (`tests/fixtures/smtp/smtp_recorder.py`): every accepted message is written as JSON
//! (raw text, decoded headers, decoded body). Recipients named `rejectN…@` are refused
//! with 550, `busyN…@` get 451 for their first N attempts. Stopped by PID on drop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Daemon, PATIENCE, eventually};

/// The Debian interpreter that has `aiosmtpd` (a `python3` earlier on `PATH` may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// A running SMTP server.
#[derive(Debug)]
pub struct SmtpServer {
    /// Port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
    _daemon: Daemon,
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The message as sent (CRLF line ends), lossy UTF-8.
    pub raw: String,
    /// Whether the raw bytes were valid UTF-8.
    pub raw_utf8: bool,
    /// Envelope recipients.
    pub rcpt_tos: Vec<String>,
    /// Headers, names as sent, values decoded.
    pub headers: Vec<(String, String)>,
    /// The text/plain body, decoded.
    pub body: String,
}

impl Mail {
    /// The first header named `name` (case-insensitive), decoded.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl SmtpServer {
    /// Starts the server on a free port, recording into `dir/smtp-out`; waits until it
    /// accepts connections.
    ///
    /// # Errors
    /// When python3-aiosmtpd is missing (tests/run.sh installs it) or it does not start.
    pub async fn start(dir: &Path) -> Result<Self> {
        let importable = std::process::Command::new(PYTHON)
            .args(["-c", "import aiosmtpd"])
            .status()
            .is_ok_and(|s| s.success());
        if !importable {
            bail!(
                "{PYTHON} cannot import aiosmtpd: install python3-aiosmtpd (tests/run.sh does it)"
            );
        }
        let out = dir.join("smtp-out");
        std::fs::create_dir_all(&out)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/smtp");
        let listen = format!("127.0.0.1:{port}");
        let out_s = out.to_str().context("utf-8 path")?.to_owned();
        let fixtures_s = fixtures.to_str().context("utf-8 path")?.to_owned();
        let daemon = Daemon::spawn_with_env(
            "aiosmtpd",
            Path::new(PYTHON),
            &[
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &listen,
                "-c",
                "smtp_recorder.Recorder",
                &out_s,
            ],
            &[("PYTHONPATH", &fixtures_s)],
            dir,
        )
        .context("python3-aiosmtpd (Debian) must be installed: tests/run.sh does it")?;
        let start = Instant::now();
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            if start.elapsed() > PATIENCE {
                bail!("aiosmtpd did not listen on {listen}:\n{}", daemon.output());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(SmtpServer {
            port,
            out,
            _daemon: daemon,
        })
    }

    /// Every message received so far, in arrival order.
    pub fn messages(&self) -> Vec<Mail> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
            .map(|v| Mail {
                raw: v["raw"].as_str().unwrap_or_default().to_owned(),
                raw_utf8: v["raw_utf8"].as_bool().unwrap_or(false),
                rcpt_tos: v["rcpt_tos"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect(),
                headers: v["headers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| Some((h[0].as_str()?.to_owned(), h[1].as_str()?.to_owned())))
                    .collect(),
                body: v["body"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// Waits for a message whose `X-Tocsin-Event` is `event`.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_for(&self, event: &str) -> Result<Mail> {
        eventually(&format!("a {event} mail"), PATIENCE, || async {
            self.messages()
                .into_iter()
                .find(|m| m.header("X-Tocsin-Event") == Some(event))
        })
        .await
    }
}
