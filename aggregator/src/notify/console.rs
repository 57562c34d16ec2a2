//! The console channel: one line per notification on standard output (`tocsin up`).

use std::io::Write;

use crate::notify::Delivery;

/// Writes one line such as
/// `[tocsin] TRIGGER P2 #3 web-1 process:nginx: process:nginx critical: 0.0 below 1`.
pub fn deliver(body: &str) -> Delivery {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let i = &v["incident"];
    use tocsin_agent::event::printable;
    let line = format!(
        "[tocsin] {} {} #{} {} {}: {}\n",
        v["event"].as_str().unwrap_or("?").to_uppercase(),
        printable(i["severity"].as_str().unwrap_or("?")),
        i["id"],
        printable(i["node"].as_str().unwrap_or("?")),
        printable(i["check"].as_str().unwrap_or("?")),
        printable(
            i["resolution"]
                .as_str()
                .or(i["summary"].as_str())
                .unwrap_or("")
        ),
    );
    let mut out = std::io::stdout().lock();
    match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Delivery::Ok,
        Err(e) => Delivery::Transient {
            error: format!("stdout: {e}"),
            retry_after: None,
        },
    }
}
