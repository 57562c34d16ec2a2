//! HTTP probes: one request per run with reqwest (rustls, ring), judged by status, body
//! text and body pattern.
//!
//! Owns the client of one check (its redirect and certificate policy) and the wording of
//! results. It does not schedule runs or keep history (see [`super::window`]).
//!
//! Policy, and why:
//! - No proxy from the environment: a monitoring probe must reach the URL it was given.
//! - No idle connection is kept between runs, so each run connects afresh (like
//!   Prometheus' blackbox exporter): the latency includes DNS, connect and TLS, and a
//!   listener that stopped accepting is noticed even if an old connection still works.
//! - The body is read up to [`MAX_BODY_BYTES`]; matching uses what was read.
//! - The whole run (connect, TLS, redirects, headers, body) is bounded by the check's
//!   `timeout`; a run that hits it reports a latency equal to the timeout.

use std::error::Error as StdError;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use tokio::time::Instant;

use super::{
    HttpCheck, MAX_BODY_BYTES, ProbeError, ProbeResult, install_crypto_provider, one_line,
    redact_url,
};
use crate::settings::format_duration;

/// Longest quote of `body_contains` / `body_regex` in a message, characters.
const MAX_QUOTE_CHARS: usize = 100;

/// A ready-to-run HTTP check: the validated [`HttpCheck`] and its own client.
#[derive(Debug)]
pub struct HttpProbe {
    check: HttpCheck,
    client: reqwest::Client,
    /// `HOST:PORT` of the URL, for messages (never holds credentials).
    target: String,
}

/// The TLS client config of every check with `tls_verify = true`, as reqwest builds it
/// for each client (the ring provider, TLS 1.2 and 1.3, the system's CA roots through
/// rustls-platform-verifier, ALPN h2 and http/1.1), but built once per process: clones
/// share the verifier and its parsed roots, where one client per check held its own
/// copy of the system's CA bundle (issue 3, agent RSS). `None` when it cannot be built
/// (no provider, no CA roots): reqwest's own setup then reports the reason per check.
fn verified_tls() -> Option<rustls::ClientConfig> {
    static SHARED: std::sync::OnceLock<Option<rustls::ClientConfig>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let provider = rustls::crypto::CryptoProvider::get_default()?.clone();
            let verifier = rustls_platform_verifier::Verifier::new(provider.clone()).ok()?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .ok()?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Some(config)
        })
        .clone()
}

/// What came back from the server, before judging.
struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: Vec<u8>,
    truncated: bool,
}

/// The exchange failed; `status` is set when the headers had arrived.
struct Failure {
    status: Option<StatusCode>,
    error: reqwest::Error,
}

impl HttpProbe {
    /// Builds the client of `check`: its redirect policy (`follow_redirects`), certificate
    /// policy (`tls_verify`), no proxy, no idle connections, connect timeout = the
    /// check's timeout. Installs the ring crypto provider if none is installed yet.
    ///
    /// # Errors
    /// [`ProbeError::Client`] when reqwest cannot build the client (TLS backend setup).
    pub fn new(check: HttpCheck) -> Result<Self, ProbeError> {
        install_crypto_provider();
        let max = usize::try_from(check.follow_redirects).unwrap_or(usize::MAX);
        let policy = if max == 0 {
            Policy::none()
        } else {
            // `previous` holds the URLs requested so far, the first one included: stop
            // (and answer with this 3xx) once `max` redirects were followed. reqwest's
            // `Policy::limited` would turn that into an error instead.
            Policy::custom(move |attempt| {
                if attempt.previous().len() > max {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            })
        };
        let builder = reqwest::Client::builder()
            .user_agent(concat!("tocsin-agent/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .redirect(policy)
            .connect_timeout(check.timeout)
            .pool_max_idle_per_host(0);
        let builder = match verified_tls() {
            Some(tls) if check.tls_verify => builder.tls_backend_preconfigured(tls),
            // reqwest's own setup: no verification, or the shared config could not be
            // built (reqwest then reports why, as a client error of this check).
            _ => builder.tls_danger_accept_invalid_certs(!check.tls_verify),
        };
        let client = builder.build().map_err(|source| ProbeError::Client {
            name: check.name.clone(),
            source,
        })?;
        let target = format!(
            "{}:{}",
            check.url.host_str().unwrap_or_default(),
            check.url.port_or_known_default().unwrap_or_default()
        );
        Ok(HttpProbe {
            check,
            client,
            target,
        })
    }

    /// The check this probe runs.
    pub fn check(&self) -> &HttpCheck {
        &self.check
    }

    /// Runs the check once. Never fails: every outcome is a [`ProbeResult`]. `ok` when
    /// the status is in `expect_status` and the body (first [`MAX_BODY_BYTES`]) contains
    /// `body_contains` and matches `body_regex`. `latency` is the time to the full
    /// response (headers and bounded body), or the timeout when it was hit.
    pub async fn run(&self) -> ProbeResult {
        let timeout = self.check.timeout;
        let start = Instant::now();
        let outcome = tokio::time::timeout(timeout, self.exchange()).await;
        let latency = start.elapsed();
        match outcome {
            Err(_elapsed) => timed_out(timeout),
            Ok(Err(failure)) if failure.error.is_timeout() => timed_out(timeout),
            Ok(Err(failure)) => {
                let status = failure.status.map(|s| s.as_u16());
                ProbeResult::new(false, latency, &self.describe(failure), status)
            }
            Ok(Ok(answer)) => self.judge(&answer, latency),
        }
    }

    async fn exchange(&self) -> Result<Answer, Failure> {
        let mut response = self
            .client
            .request(self.check.method.clone(), self.check.url.clone())
            .headers(self.check.headers.clone())
            .send()
            .await
            .map_err(|error| Failure {
                status: None,
                error,
            })?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = response.chunk().await.map_err(|error| Failure {
            status: Some(status),
            error,
        })? {
            let room = MAX_BODY_BYTES - body.len();
            if chunk.len() >= room {
                body.extend_from_slice(&chunk[..room]);
                // More may follow: stop reading, the connection is dropped.
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            location,
            body,
            truncated,
        })
    }

    fn judge(&self, answer: &Answer, latency: Duration) -> ProbeResult {
        let check = &self.check;
        let code = answer.status.as_u16();
        let mut head = format!("HTTP {code}");
        if let Some(reason) = answer.status.canonical_reason() {
            head.push(' ');
            head.push_str(reason);
        }
        if answer.status.is_redirection()
            && let Some(to) = &answer.location
        {
            head.push_str(&format!(" to {}", redact_url(to)));
        }
        let fail = |why: String| ProbeResult::new(false, latency, &why, Some(code));
        if !check.expect_status.iter().any(|r| r.contains(code)) {
            return fail(format!("{head} (expected {})", check.expect_status_text()));
        }
        let read = if answer.truncated {
            format!(" (first {} KiB read)", MAX_BODY_BYTES / 1024)
        } else {
            String::new()
        };
        let text = String::from_utf8_lossy(&answer.body);
        if let Some(needle) = &check.body_contains
            && !text.contains(needle.as_str())
        {
            return fail(format!(
                "{head}: body does not contain {}{read}",
                quote(needle)
            ));
        }
        if let Some(re) = &check.body_regex
            && !re.is_match(&text)
        {
            return fail(format!(
                "{head}: body does not match /{}/{read}",
                one_line(&shorten(re.as_str()))
            ));
        }
        ProbeResult::new(true, latency, &head, Some(code))
    }

    /// One line for a failed exchange, classified by error type; never holds the URL's
    /// credentials or query.
    fn describe(&self, failure: Failure) -> String {
        let e = &failure.error;
        // After a redirect the failing request is another host: name that one.
        let failed_at = e.url().map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or_default(),
                u.port_or_known_default().unwrap_or_default()
            )
        });
        let target = failed_at.as_ref().unwrap_or(&self.target);
        if let Some(io) = find::<std::io::Error>(e) {
            use std::io::ErrorKind as K;
            let what = match io.kind() {
                K::ConnectionRefused => Some("connection refused"),
                K::ConnectionReset => Some("connection reset by"),
                K::HostUnreachable => Some("host unreachable:"),
                K::NetworkUnreachable => Some("network unreachable:"),
                _ => None,
            };
            if let Some(what) = what {
                return format!("{what} {target}");
            }
        }
        if let Some(tls) = find::<rustls::Error>(e) {
            return format!("TLS with {target} failed: {tls}");
        }
        let is_redirect = e.is_redirect();
        // reqwest quotes the full URL in its errors: drop it (the target leads instead).
        let mut chain = crate::telemetry::chain(&failure.error.without_url());
        chain = chain.replace(
            self.check.url.as_str(),
            &redact_url(self.check.url.as_str()),
        );
        if let Some(pw) = self.check.url.password()
            && pw.len() >= 4
        {
            chain = chain.replace(pw, "***");
        }
        match failure.status {
            Some(status) => format!("HTTP {}: reading the body failed: {chain}", status.as_u16()),
            None if is_redirect => format!("redirect from {target} failed: {chain}"),
            None => format!("request to {target} failed: {chain}"),
        }
    }
}

fn timed_out(timeout: Duration) -> ProbeResult {
    ProbeResult::new(
        false,
        timeout,
        &format!("timed out after {}", format_duration(timeout)),
        None,
    )
}

/// The first error of type `T` in the chain of `e`, looking inside `io::Error`s too
/// (their `source()` skips the error they wrap).
fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(t) = inner.downcast_ref::<T>() {
                return Some(t);
            }
            if let Some(t) = find::<T>(inner) {
                return Some(t);
            }
        }
        next = err.source();
    }
    None
}

/// `s` cut to [`MAX_QUOTE_CHARS`] characters (with `…`).
fn shorten(s: &str) -> String {
    if s.chars().count() > MAX_QUOTE_CHARS {
        let mut out: String = s.chars().take(MAX_QUOTE_CHARS).collect();
        out.push('…');
        out
    } else {
        s.to_owned()
    }
}

/// `s` shortened and quoted with escapes (`"a\nb"`).
fn quote(s: &str) -> String {
    format!("{:?}", shorten(s))
}

#[cfg(test)]
mod tests {
    //! Real servers on 127.0.0.1 port 0: a small HTTP/1.1 responder written here (so the
    //! tests control every byte and delay), plain or behind tokio-rustls with an rcgen
    //! self-signed certificate.

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::HttpProbe;
    use crate::probe::{HttpCheck, ProbeResult, RawHttpCheck};
    use crate::settings::Validator;

    /// A test server; stopped when dropped.
    struct Server {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        async fn plain() -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(respond(stream));
                }
            });
            Server { addr, task }
        }

        async fn tls() -> Server {
            let rcgen::CertifiedKey { cert, signing_key } =
                rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                    .expect("certificate");
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            respond(tls).await;
                        }
                    });
                }
            });
            Server { addr, task }
        }

        fn url(&self, scheme: &str, path: &str) -> String {
            format!("{scheme}://{}{path}", self.addr)
        }
    }

    /// Reads one request head and answers by path:
    /// `/ok` 200 "all ok", `/fail` 503, `/teapot` 418, `/empty` 204, `/slow` 200 after 3 s,
    /// `/redirect` 302 → `/ok`, `/loop` 302 → `/loop`, `/method` 200 with the method as
    /// body, `/header` 200 only with `x-probe: yes`, `/auth` 200 only with Basic
    /// alice:s3cret, `/big` 2 MiB of `a` then "needle", `/hangup` closes without answering.
    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default().to_uppercase();
        let path = words.next().unwrap_or_default().to_owned();
        let path = path.split('?').next().unwrap_or_default();
        let has = |line: &str| head.lines().any(|l| l.trim() == line);
        let (status, extra, body): (&str, &str, Vec<u8>) = match path {
            "/ok" => ("200 OK", "", b"all ok".to_vec()),
            "/fail" => ("503 Service Unavailable", "", b"down".to_vec()),
            "/teapot" => ("418 I'm a teapot", "", Vec::new()),
            "/empty" => ("204 No Content", "", Vec::new()),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                ("200 OK", "", b"late".to_vec())
            }
            "/redirect" => ("302 Found", "location: /ok\r\n", Vec::new()),
            "/loop" => ("302 Found", "location: /loop\r\n", Vec::new()),
            "/method" => ("200 OK", "", method.clone().into_bytes()),
            "/header" if has("x-probe: yes") => ("200 OK", "", Vec::new()),
            "/header" => ("400 Bad Request", "", Vec::new()),
            "/auth" if has("authorization: basic ywxpy2u6cznjcmv0") => ("200 OK", "", Vec::new()),
            "/auth" => ("401 Unauthorized", "", Vec::new()),
            "/big" => {
                let mut b = vec![b'a'; 2 * 1024 * 1024];
                b.extend_from_slice(b"needle");
                ("200 OK", "", b)
            }
            "/hangup" => return,
            _ => ("404 Not Found", "", Vec::new()),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
        if method != "HEAD" {
            let _ = stream.write_all(&body).await;
        }
        let _ = stream.shutdown().await;
    }

    fn check(url: &str, edit: impl FnOnce(&mut RawHttpCheck)) -> HttpCheck {
        let mut raw = RawHttpCheck {
            name: "t".into(),
            url: url.into(),
            ..RawHttpCheck::default()
        };
        edit(&mut raw);
        let fig = figment::Figment::new();
        let mut v = Validator::new(&fig);
        let c = raw.validate(&mut v, "http.0", Duration::from_secs(5), 5.0);
        v.finish(()).expect("valid check");
        c.expect("valid check")
    }

    async fn probe(url: &str, edit: impl FnOnce(&mut RawHttpCheck)) -> ProbeResult {
        HttpProbe::new(check(url, edit))
            .expect("client")
            .run()
            .await
    }

    fn assert_clean(r: &ProbeResult) {
        assert!(r.message.len() <= crate::probe::MAX_MESSAGE_LEN, "{r:?}");
        assert!(!r.message.chars().any(char::is_control), "{r:?}");
    }

    #[tokio::test]
    async fn status_200_is_ok() {
        let s = Server::plain().await;
        let r = probe(&s.url("http", "/ok"), |_| {}).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.status, Some(200));
        assert_eq!(r.message, "HTTP 200 OK");
        assert!(r.latency > Duration::ZERO && r.latency < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn status_503_fails_with_status_and_expectation() {
        let s = Server::plain().await;
        let r = probe(&s.url("http", "/fail"), |_| {}).await;
        assert!(!r.ok);
        assert_eq!(r.status, Some(503));
        assert_eq!(r.message, "HTTP 503 Service Unavailable (expected 200-399)");
    }

    #[tokio::test]
    async fn expect_status_lists_classes_and_ranges() {
        let s = Server::plain().await;
        let teapot = s.url("http", "/teapot");
        let expect = |list: &[&str]| {
            let list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
            move |c: &mut RawHttpCheck| c.expect_status = list
        };
        assert!(probe(&teapot, expect(&["4xx"])).await.ok);
        assert!(probe(&teapot, expect(&["200", "418"])).await.ok);
        assert!(probe(&teapot, expect(&["400-420"])).await.ok);
        let r = probe(&teapot, expect(&["2xx", "419-499"])).await;
        assert!(!r.ok);
        assert_eq!(
            r.message,
            "HTTP 418 I'm a teapot (expected 200-299, 419-499)"
        );
        let empty = s.url("http", "/empty");
        assert!(probe(&empty, expect(&["2xx"])).await.ok);
        assert!(!probe(&empty, expect(&["200"])).await.ok);
    }

    #[tokio::test]
    async fn body_contains_and_regex() {
        let s = Server::plain().await;
        let ok = s.url("http", "/ok");
        assert!(probe(&ok, |c| c.body_contains = Some("ok".into())).await.ok);
        let r = probe(&ok, |c| c.body_contains = Some("healthy".into())).await;
        assert!(!r.ok);
        assert_eq!(r.message, "HTTP 200 OK: body does not contain \"healthy\"");
        assert_eq!(r.status, Some(200));
        assert!(
            probe(&ok, |c| c.body_regex = Some("^all\\s+o.$".into()))
                .await
                .ok
        );
        let r = probe(&ok, |c| c.body_regex = Some("^ok".into())).await;
        assert!(!r.ok);
        assert_eq!(r.message, "HTTP 200 OK: body does not match /^ok/");
        // A body check does not rescue a bad status.
        let r = probe(&s.url("http", "/fail"), |c| {
            c.body_contains = Some("down".into())
        })
        .await;
        assert!(!r.ok, "{r:?}");
    }

    #[tokio::test]
    async fn body_is_read_up_to_one_mebibyte() {
        let s = Server::plain().await;
        let big = s.url("http", "/big");
        assert!(
            probe(&big, |c| c.body_contains = Some("aaaa".into()))
                .await
                .ok
        );
        let r = probe(&big, |c| c.body_contains = Some("needle".into())).await;
        assert!(!r.ok);
        assert_eq!(
            r.message,
            "HTTP 200 OK: body does not contain \"needle\" (first 1024 KiB read)"
        );
    }

    #[tokio::test]
    async fn slow_server_times_out_with_latency_of_the_timeout() {
        let s = Server::plain().await;
        let started = std::time::Instant::now();
        let r = probe(&s.url("http", "/slow"), |c| {
            c.timeout = Some("300ms".into())
        })
        .await;
        assert!(!r.ok);
        assert_eq!(r.message, "timed out after 300ms");
        assert_eq!(r.latency, Duration::from_millis(300));
        assert_eq!(r.status, None);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the probe waited for the server"
        );
    }

    #[tokio::test]
    async fn redirect_not_followed_is_the_answer() {
        let s = Server::plain().await;
        let url = s.url("http", "/redirect");
        // Default 200-399: a 302 is an answer in range.
        let r = probe(&url, |_| {}).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.status, Some(302));
        assert_eq!(r.message, "HTTP 302 Found to /ok");
        let r = probe(&url, |c| c.expect_status = vec!["200".into()]).await;
        assert!(!r.ok);
        assert_eq!(r.message, "HTTP 302 Found to /ok (expected 200)");
    }

    #[tokio::test]
    async fn redirect_followed_reaches_the_target() {
        let s = Server::plain().await;
        let r = probe(&s.url("http", "/redirect"), |c| {
            c.follow_redirects = 1;
            c.expect_status = vec!["200".into()];
            c.body_contains = Some("all ok".into());
        })
        .await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.status, Some(200));
    }

    #[tokio::test]
    async fn redirect_loop_stops_after_the_limit_with_the_last_3xx() {
        let s = Server::plain().await;
        let r = probe(&s.url("http", "/loop"), |c| {
            c.follow_redirects = 2;
            c.expect_status = vec!["2xx".into()];
        })
        .await;
        assert!(!r.ok);
        assert_eq!(r.status, Some(302));
        assert_eq!(r.message, "HTTP 302 Found to /loop (expected 200-299)");
    }

    #[tokio::test]
    async fn method_and_headers_are_sent() {
        let s = Server::plain().await;
        let r = probe(&s.url("http", "/method"), |c| {
            c.method = "post".into();
            c.body_contains = Some("POST".into());
        })
        .await;
        assert!(r.ok, "{r:?}");
        let r = probe(&s.url("http", "/method"), |c| c.method = "HEAD".into()).await;
        assert!(r.ok, "{r:?}");
        let header = s.url("http", "/header");
        assert!(!probe(&header, |_| {}).await.ok);
        let r = probe(&header, |c| {
            c.headers.insert("X-Probe".into(), "yes".into());
        })
        .await;
        assert!(r.ok, "{r:?}");
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_sent_as_basic_auth() {
        let s = Server::plain().await;
        let r = probe(&format!("http://alice:s3cret@{}/auth", s.addr), |_| {}).await;
        assert!(r.ok, "{r:?}");
        let r = probe(&s.url("http", "/auth"), |_| {}).await;
        assert_eq!(r.message, "HTTP 401 Unauthorized (expected 200-399)");
    }

    /// Regression guard: errors must never quote the URL's user info or query.
    #[tokio::test]
    async fn failures_never_show_credentials_or_query() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let r = probe(
            &format!("http://alice:s3cret@{closed}/x?token=TOPSECRET"),
            |_| {},
        )
        .await;
        assert!(!r.ok);
        assert_eq!(r.message, format!("connection refused {closed}"));
        assert_eq!(r.status, None);

        let s = Server::plain().await;
        let r = probe(
            &format!("http://alice:s3cret@{}/hangup?token=TOPSECRET", s.addr),
            |_| {},
        )
        .await;
        assert!(!r.ok);
        assert!(
            r.message
                .starts_with(&format!("request to {} failed: ", s.addr)),
            "{r:?}"
        );
        for secret in ["s3cret", "TOPSECRET", "alice"] {
            assert!(!r.message.contains(secret), "{r:?}");
        }
        assert_clean(&r);
    }

    #[tokio::test]
    async fn self_signed_https_fails_verification_unless_disabled() {
        let s = Server::tls().await;
        let url = s.url("https", "/ok");
        let r = probe(&url, |_| {}).await;
        assert!(!r.ok, "{r:?}");
        assert!(
            r.message
                .starts_with(&format!("TLS with {} failed: ", s.addr)),
            "{r:?}"
        );
        assert!(r.message.contains("certificate"), "{r:?}");
        assert_clean(&r);
        let r = probe(&url, |c| {
            c.tls_verify = false;
            c.body_contains = Some("all ok".into());
        })
        .await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.status, Some(200));
    }

    #[test]
    fn debug_output_hides_credentials_and_header_values() {
        let c = check("http://alice:s3cret@127.0.0.1:1/x?token=TOPSECRET", |c| {
            c.headers
                .insert("Authorization".into(), "Bearer HEADERSECRET".into());
        });
        let text = format!("{c:?}");
        for secret in ["s3cret", "TOPSECRET", "HEADERSECRET"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("http://***@127.0.0.1:1/x?***"), "{text}");
    }
}
