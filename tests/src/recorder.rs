//! A webhook receiver whose answers the test changes while it runs: a status code, or
//! holding every request unanswered until the test releases it (a receiver that hangs).
//! It records each request with its `Idempotency-Key` header, its JSON body and how it
//! was answered, so a test can count deliveries by idempotency key and dedup key.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use serde_json::Value;
use tokio::sync::watch;

use crate::{PATIENCE, eventually};

/// How the receiver answers requests that arrive from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Answer at once with this HTTP status (a 429 carries `Retry-After: 1`).
    Status(u16),
    /// Hold the request unanswered until [`Recorder::release`], then answer 200.
    Hold,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived.
    pub at: Instant,
    /// Its `Idempotency-Key` header (empty when absent).
    pub idempotency_key: String,
    /// Its body, parsed as JSON (a JSON string when it is not JSON).
    pub body: Value,
    /// The status it was answered with; `None` while it is held, or when the client
    /// went away before the answer.
    pub answered: Option<u16>,
}

impl Request {
    /// Whether the receiver accepted it (answered 2xx).
    pub fn accepted(&self) -> bool {
        self.answered.is_some_and(|s| (200..300).contains(&s))
    }

    /// The body's `event` (`trigger`, `acknowledge`, `resolve`).
    pub fn event(&self) -> &str {
        self.body["event"].as_str().unwrap_or_default()
    }

    /// The body's `dedup_key`.
    pub fn dedup_key(&self) -> &str {
        self.body["dedup_key"].as_str().unwrap_or_default()
    }

    /// The body's `incident.id` (0 when absent).
    pub fn incident_id(&self) -> i64 {
        self.body["incident"]["id"].as_i64().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Shared {
    answer: Mutex<Answer>,
    log: Mutex<Vec<Request>>,
    release: watch::Sender<u64>,
}

/// A real HTTP server on 127.0.0.1:0 serving `POST /hook`, answering as told.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// `http://127.0.0.1:PORT/hook`.
    pub url: String,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Binds 127.0.0.1:0 and serves in the background (on the test's runtime),
    /// answering with `answer` until told otherwise.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start(answer: Answer) -> Result<Self> {
        crate::init();
        let shared = Arc::new(Shared {
            answer: Mutex::new(answer),
            log: Mutex::new(Vec::new()),
            release: watch::channel(0).0,
        });
        let state = shared.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let state = state.clone();
                async move { state.serve(&headers, body).await }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Recorder { url, shared })
    }

    /// Answers requests that arrive from now on with `answer`; held requests stay held.
    pub fn answer(&self, answer: Answer) {
        *self.shared.answer.lock().expect("recorder lock") = answer;
    }

    /// Answers every request held so far with 200 (later ones are held again while the
    /// answer is [`Answer::Hold`]).
    pub fn release(&self) {
        self.shared.release.send_modify(|g| *g += 1);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().expect("recorder lock").clone()
    }

    /// The accepted (2xx) requests so far, in arrival order.
    pub fn accepted(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::accepted)
            .collect()
    }

    /// Accepted requests whose `event` is `kind` for incident `id`.
    pub fn accepted_of(&self, kind: &str, id: i64) -> Vec<Request> {
        self.accepted()
            .into_iter()
            .filter(|r| r.event() == kind && r.incident_id() == id)
            .collect()
    }

    /// Waits until a request satisfying `pred` arrived (answered or not); returns it.
    ///
    /// # Errors
    /// On timeout ([`PATIENCE`]).
    pub async fn wait_request(
        &self,
        what: &str,
        pred: impl Fn(&Request) -> bool,
    ) -> Result<Request> {
        eventually(what, PATIENCE, || async {
            self.requests().into_iter().find(|r| pred(r))
        })
        .await
    }

    /// Waits until an accepted `kind` notification for `check` arrived; returns it.
    ///
    /// # Errors
    /// On timeout ([`PATIENCE`]).
    pub async fn wait_accepted(&self, kind: &str, check: &str) -> Result<Request> {
        self.wait_request(&format!("an accepted {kind} for {check}"), |r| {
            r.accepted() && r.event() == kind && r.body["incident"]["check"] == check
        })
        .await
    }
}

impl Shared {
    async fn serve(
        &self,
        headers: &axum::http::HeaderMap,
        body: String,
    ) -> (
        axum::http::StatusCode,
        [(&'static str, &'static str); 1],
        String,
    ) {
        let idempotency_key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        let answer = *self.answer.lock().expect("recorder lock");
        let mut released = self.release.subscribe();
        let index = {
            let mut log = self.log.lock().expect("recorder lock");
            log.push(Request {
                at: Instant::now(),
                idempotency_key,
                body,
                answered: None,
            });
            log.len() - 1
        };
        let status = match answer {
            Answer::Status(s) => s,
            Answer::Hold => {
                // Held until the next release; dropped unanswered if the client goes away.
                let _ = released.changed().await;
                200
            }
        };
        self.log.lock().expect("recorder lock")[index].answered = Some(status);
        let code = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
        // Retry-After only where a real service sends one: with a 429.
        let header = if status == 429 {
            ("retry-after", "1")
        } else {
            ("x-recorder", "1")
        };
        (code, [header], format!("recorder {status}"))
    }
}
