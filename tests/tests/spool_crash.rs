//! The agent spool survives SIGKILL in the middle of writes: every append that reported
//! committed is still there after reopening, in order, and the sequence goes on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tocsin_agent::spool::Spool;
use tocsin_e2e::bin;

#[test]
fn sigkill_during_writes_loses_no_committed_event() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut committed_max = 0u64;
    for round in 0..5u64 {
        let mut child = Command::new(bin("spool-writer"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.parse::<u64>().ok())
                .max()
        });
        // Kill at a different moment every round, in the middle of the write loop.
        std::thread::sleep(Duration::from_millis(150 + 70 * round));
        child.kill()?;
        child.wait()?;
        let last_reported = reader
            .join()
            .ok()
            .flatten()
            .context("the writer committed something")?;
        assert!(last_reported > committed_max, "round {round} made progress");
        committed_max = last_reported;

        let mut spool = Spool::open(dir.path())?;
        let held: Vec<u64> = spool
            .read_after(0, 10_000_000)?
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(held.first(), Some(&1));
        assert!(held.windows(2).all(|w| w[1] == w[0] + 1), "no gap");
        assert!(
            *held.last().unwrap_or(&0) >= committed_max,
            "every reported commit survived"
        );
        committed_max = *held.last().unwrap_or(&0);
    }
    let spool = Spool::open(dir.path())?;
    assert!(spool.last_seq()? >= committed_max);
    Ok(())
}
