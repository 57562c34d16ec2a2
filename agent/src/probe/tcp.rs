//! TCP probes: resolve `HOST:PORT` and open a connection to each address in turn until
//! one accepts; the connection is closed at once (nothing is sent).
//!
//! Owns the wording of TCP results. Success means the kernel of the peer completed the
//! handshake (a listener exists), not that the service behind it is healthy.

use std::io::ErrorKind;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ProbeResult, TcpCheck};
use crate::settings::format_duration;

/// Connects to `check.address`, resolving the host (e.g. `localhost` → `::1`,
/// `127.0.0.1`) and trying each address in resolver order. Never fails: every outcome
/// is a [`ProbeResult`] (`status` is always `None`). `ok` when a connection opened;
/// `latency` is the time to that connection (resolution included), or the timeout
/// when `check.timeout` (which bounds resolution and all attempts together) was hit.
/// Messages: `connected to 127.0.0.1:5432`, `connection refused 127.0.0.1:9`,
/// `cannot resolve db.local:5432: …`, `timed out after 2s`.
pub async fn run_tcp(check: &TcpCheck) -> ProbeResult {
    let start = Instant::now();
    match tokio::time::timeout(check.timeout, connect(&check.address)).await {
        Err(_elapsed) => ProbeResult::new(
            false,
            check.timeout,
            &format!("timed out after {}", format_duration(check.timeout)),
            None,
        ),
        Ok(Ok(addr)) => {
            let latency = start.elapsed();
            ProbeResult::new(true, latency, &format!("connected to {addr}"), None)
        }
        Ok(Err(why)) => ProbeResult::new(false, start.elapsed(), &why, None),
    }
}

/// The address that accepted, or the message for the last failure.
async fn connect(address: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(address).await {
        Ok(a) => a.collect(),
        Err(e) => return Err(format!("cannot resolve {address}: {e}")),
    };
    let mut last = format!("{address} resolved to no address");
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                drop(stream);
                return Ok(*addr);
            }
            Err(e) => last = describe(*addr, &e),
        }
    }
    if addrs.len() > 1 {
        let tried: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        last.push_str(&format!(" (tried {})", tried.join(", ")));
    }
    Err(last)
}

fn describe(addr: SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => format!("connection refused {addr}"),
        ErrorKind::HostUnreachable => format!("host unreachable: {addr}"),
        ErrorKind::NetworkUnreachable => format!("network unreachable: {addr}"),
        ErrorKind::TimedOut => format!("connect to {addr} timed out (kernel)"),
        _ => format!("connect to {addr} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::run_tcp;
    use crate::probe::TcpCheck;

    fn check(address: String) -> TcpCheck {
        TcpCheck {
            name: "t".into(),
            address,
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(10),
            hold_for: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn open_port_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let r = run_tcp(&check(addr.to_string())).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.message, format!("connected to {addr}"));
        assert_eq!(r.status, None);
        assert!(r.latency < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn names_are_resolved_and_each_address_tried() {
        // `localhost` may resolve to ::1 first, where nothing listens: the probe must
        // go on to 127.0.0.1.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let r = run_tcp(&check(format!("localhost:{port}"))).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.message, format!("connected to 127.0.0.1:{port}"));
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let r = run_tcp(&check(closed.to_string())).await;
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.message, format!("connection refused {closed}"));
        assert!(r.latency < Duration::from_secs(5));
    }
}
