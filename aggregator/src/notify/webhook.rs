//! Generic JSON webhook: `POST` the payload with `Content-Type: application/json` and an
//! `Idempotency-Key` header (stable per notification, so a receiver can drop the
//! duplicates that at-least-once delivery may cause).

use std::time::Duration;

use crate::notify::Delivery;

/// Sends one notification. 2xx is delivered; 408, 429 and 5xx are retried (honouring
/// `Retry-After` in seconds); other statuses, redirects included, fail for good with the
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
            return Delivery::Transient {
                error: format!("POST {url}: {}", tocsin_agent::telemetry::chain(&e)),
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
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
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
            "POST {url}: HTTP {status}: redirects are not followed; point the webhook at the final URL {to}"
        )
    } else {
        format!("POST {url}: HTTP {status}: {text}")
    };
    if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
        Delivery::Transient { error, retry_after }
    } else {
        Delivery::Permanent { error }
    }
}
