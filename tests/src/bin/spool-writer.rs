//! Test helper: appends events to a real agent spool in a loop and prints the sequence
//! number of every committed append, one per line, so a test can kill it with SIGKILL
//! at any moment and then check that everything reported committed is still there.
//!
//! Usage: `spool-writer STATE_DIR`

use std::io::Write;

use tocsin_agent::evaluate::State;
use tocsin_agent::event::Event;
use tocsin_agent::spool::Spool;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: spool-writer STATE_DIR"))?;
    let mut spool = Spool::open(std::path::Path::new(&dir))?;
    let mut out = std::io::stdout().lock();
    for i in 0u64..1_000_000 {
        let events = (0..3)
            .map(|k| Event {
                seq: 0,
                check: format!("check-{k}"),
                labels: Default::default(),
                state: State::Critical,
                previous: State::Ok,
                value: Some(i as f64),
                unit: "count".into(),
                threshold: None,
                message: "x".repeat(200),
                observed_at_ms: i64::try_from(i).unwrap_or(0),
                breach_started_at_ms: 0,
                flapping: false,
            })
            .collect();
        let committed = spool.append(events)?;
        if let Some(last) = committed.last() {
            writeln!(out, "{}", last.seq)?;
            out.flush()?;
        }
    }
    Ok(())
}
