//! Generic JSON webhook: `POST` the payload with `Content-Type: application/json` and an
//! `Idempotency-Key` header (stable per notification, so a receiver can drop the
//! duplicates that at-least-once delivery may cause).

use std::time::Duration;

use crate::notify::Delivery;

/// Sends one notification. 2xx is delivered; 408, 429 and 5xx are retried (honouring
/// `Retry-After`, see [`parse_retry_after`]); other statuses, redirects included, fail for good with the
/// response body.
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    idempotency_key: &str,
    body: &str,
) -> Delivery {
    let response = client
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", idempotency_key)
        .body(body.to_owned())
        .send()
        .await;
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
