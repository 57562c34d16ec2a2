//! Generic JSON webhook: `POST` the payload with `Content-Type: application/json` and an
//! `Idempotency-Key` header (stable per notification, so a receiver can drop the
//! duplicates that at-least-once delivery may cause).
//!
//! **Signature.** With `secret_file` set on a `kind = "generic"` channel, every request
//! also carries
//!
//! ```text
//! X-Tocsin-Timestamp: 1705313100
//! X-Tocsin-Signature: sha256=5f1c…(64 lower-case hex digits)
//! ```
//!
//! where the timestamp is the Unix time in seconds at which this attempt was sent and the
//! signature is HMAC-SHA256, keyed with the secret (the file's content, surrounding
//! whitespace trimmed, as bytes), over the timestamp, a `.`, and the request body exactly
//! as received (`"<timestamp>.<body>"`). A receiver verifies by recomputing it over the
//! raw body bytes before parsing them, comparing in constant time, and rejecting a
//! timestamp more than a few minutes from its own clock (e.g. 5 min): that bounds how
//! long a captured request can be replayed, and the `Idempotency-Key` drops replays and
//! duplicates within that window. Each retry is signed afresh with a new timestamp (same
//! body, same `Idempotency-Key`), so a delivery retried for hours still verifies.

use std::time::Duration;

use crate::notify::Delivery;

/// Header of a signed request: the Unix time (seconds) the attempt was sent.
pub const TIMESTAMP_HEADER: &str = "X-Tocsin-Timestamp";
/// Header of a signed request: `sha256=` and the hex HMAC, see [`signature`].
pub const SIGNATURE_HEADER: &str = "X-Tocsin-Signature";

/// The `X-Tocsin-Signature` value of a request with `body` sent at `timestamp` (Unix
/// seconds): `sha256=` followed by the 64 lower-case hex digits of
/// HMAC-SHA256(`secret`, `"<timestamp>.<body>"`) (ring's HMAC).
pub fn signature(secret: &[u8], timestamp: u64, body: &str) -> String {
    use std::fmt::Write as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// [`deliver_signed`] without a signature (Slack, PagerDuty, Alertmanager, and generic
/// channels without `secret_file`).
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    idempotency_key: &str,
    body: &str,
) -> Delivery {
    deliver_signed(client, url, timeout, idempotency_key, body, None).await
}

/// Sends one notification; with `secret` (a generic channel's `secret_file`), signed
/// with [`TIMESTAMP_HEADER`] and [`SIGNATURE_HEADER`] (see the module docs). 2xx is delivered; 408, 429 and 5xx are retried (honouring
/// `Retry-After`, see [`parse_retry_after`]); other statuses, redirects included, fail for good with the
/// response body.
pub async fn deliver_signed(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    idempotency_key: &str,
    body: &str,
    secret: Option<&tocsin_agent::config::Secret>,
) -> Delivery {
    let mut request = client
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", idempotency_key);
    if let Some(secret) = secret {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        request = request
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(secret.expose().as_bytes(), timestamp, body),
            );
    }
    let response = request.body(body.to_owned()).send().await;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            // reqwest quotes the full URL (query included) in its errors: drop it, the
            // redacted one leads the message.
            let e = e.without_url();
            return Delivery::Transient {
                error: format!(
                    "POST {}: {}",
                    redact_url(url),
                    redact_text(&tocsin_agent::telemetry::chain(&e), url)
                ),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Delivery::Ok;
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    let response_location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut text = response.text().await.unwrap_or_default();
    if text.len() > 512 {
        let cut = (0..=512)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    let error = if status.is_redirection() {
        let to = response_location.unwrap_or_default();
        format!(
            "POST {}: HTTP {status}: redirects are not followed; point the webhook at the final URL {}",
            redact_url(url),
            redact_url(&to)
        )
    } else {
        format!("POST {}: HTTP {status}: {text}", redact_url(url))
    };
    if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
        Delivery::Transient { error, retry_after }
    } else {
        Delivery::Permanent { error }
    }
}

/// The wait a `Retry-After` header value asks for (RFC 9110 §10.2.3): either delay
/// seconds (`"120"`) or an HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`, also the
/// obsolete RFC 850 and asctime forms), the latter counted from `now`; a date already
/// past asks for no wait (`Duration::ZERO`). `None` for anything else, then the
/// dispatcher's own backoff applies. The caller bounds the result (`retry_min`,
/// `retry_max`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A webhook URL fit for logs, the timeline and the API: user info and the query string
/// (where services put their tokens) are replaced by `***`; the path is kept, except
/// that long path segments (Slack-style secret paths) are cut to 4 characters.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return "<invalid URL>".to_owned();
    };
    let had_userinfo = !u.username().is_empty() || u.password().is_some();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("***"));
    }
    let path: Vec<String> = u
        .path_segments()
        .map(|segs| {
            segs.map(|s| {
                if s.len() > 16 {
                    format!("{}***", &s[..4])
                } else {
                    s.to_owned()
                }
            })
            .collect()
        })
        .unwrap_or_default();
    u.set_path(&path.join("/"));
    let text = u.to_string();
    if had_userinfo {
        text.replacen("://", "://***@", 1)
    } else {
        text
    }
}

/// `text` with every occurrence of the raw `url` replaced by its redacted form (error
/// chains from the HTTP client quote the URL).
fn redact_text(text: &str, url: &str) -> String {
    text.replace(url, &redact_url(url))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    /// Regression: a refused connection quoted the full URL, token included.
    #[tokio::test]
    async fn connection_errors_do_not_leak_the_url() {
        crate::install_crypto_provider();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let url = format!("http://alice:pw@127.0.0.1:{port}/hook?token=SECRET123");
        let client = reqwest::Client::new();
        let got = super::deliver(&client, &url, std::time::Duration::from_secs(2), "k", "{}").await;
        let crate::notify::Delivery::Transient { error, .. } = got else {
            panic!("expected a retry: {got:?}")
        };
        assert!(
            !error.contains("SECRET123") && !error.contains("pw@"),
            "{error}"
        );
        assert!(
            error.contains(&format!("127.0.0.1:{port}/hook?***")),
            "{error}"
        );
    }

    /// The scheme receivers verify, pinned to values computed independently with
    /// `printf '%s' '1705313100.{"event":"trigger"}' | openssl dgst -sha256 -hmac s3cret`
    /// (and Python's `hmac`), the second with RFC 4231 case 2's key and message.
    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        use super::signature;
        assert_eq!(
            signature(b"s3cret", 1_705_313_100, r#"{"event":"trigger"}"#),
            "sha256=500c3ecef2e8c8f02792062708f563f7b5b41b756da4c62ebd5282ca51fea0c3"
        );
        assert_eq!(
            signature(b"Jefe", 0, "what do ya want for nothing?"),
            "sha256=37f471929915ccd2cbbe79feb84ffcff4f2bb25e15fc41c2506687331ae179cc"
        );
        assert_ne!(
            signature(b"s3cret", 1_705_313_101, r#"{"event":"trigger"}"#),
            signature(b"s3cret", 1_705_313_100, r#"{"event":"trigger"}"#),
            "the timestamp is signed"
        );
    }

    /// Regression: `Retry-After` in its HTTP-date form was ignored (only seconds were
    /// read), so a receiver's "come back at 10:00" fell back to the short backoff.
    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};

        use super::parse_retry_after;
        // 2015-10-21T07:28:00Z
        let date = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let now = date - Duration::from_secs(90);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        for form in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
        ] {
            assert_eq!(
                parse_retry_after(form, now),
                Some(Duration::from_secs(90)),
                "{form}"
            );
        }
        assert_eq!(
            parse_retry_after(
                "Wed, 21 Oct 2015 07:28:00 GMT",
                date + Duration::from_secs(5)
            ),
            Some(Duration::ZERO),
            "a date already past: no wait"
        );
        for bad in ["", "-5", "1.5", "soon", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(bad, SystemTime::now()), None, "{bad:?}");
        }
    }

    #[test]
    fn secrets_in_urls_are_redacted() {
        assert_eq!(
            redact_url("http://user:pw@127.0.0.1:9191/ok?token=SECRET"),
            "http://***@127.0.0.1:9191/ok?***"
        );
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"),
            "https://hooks.slack.com/services/T000/B000/XXXX***"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:8080/hook"),
            "http://127.0.0.1:8080/hook"
        );
    }
}
