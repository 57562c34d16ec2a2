//! The issue-9 umbrella script `bench/side-by-side.sh`, without running a benchmark: its
//! help, its argument checks, and the table it renders from saved rows (ratio and
//! whether each kind of target is met). No timing is asserted.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::Result;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/side-by-side.sh")
}

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new("bash").arg(script()).args(args).output()?)
}

#[test]
fn help_names_the_options_and_bad_arguments_are_refused() -> Result<()> {
    let out = run(&["--help"])?;
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout)?;
    for want in [
        "--quick",
        "--only SCENARIO",
        "--render",
        "bench-restart",
        "minutes",
    ] {
        assert!(help.contains(want), "{want} in:\n{help}");
    }
    let out = run(&["--only", "nonsense"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8(out.stderr)?.contains("unknown scenario"));
    Ok(())
}

#[test]
fn the_table_gives_ratios_and_decides_each_kind_of_target() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tsv = dir.path().join("rows.tsv");
    let rows = [
        "footprint\tagent_cpu\t%cpu\t0.05\t0.04\t0.06\tnode_exporter\t0.8\t0.7\t0.9\t-",
        "footprint\tagent_cpu\t%cpu\t0.1\t0.09\t0.2\tcollectd\t0.083\t0.08\t0.09\t<= collectd",
        "footprint\tagent_rss\tMiB\t4.5\t4.4\t4.6\tcollectd\t2.4\t2.4\t2.4\t<= 5 MiB",
        "#note\tonset\tnot run: target/release/bench-onset is not built",
        "onset\tpage_p50\ts\t0.9\t0.8\t1.2\tprometheus_tuned\t4.2\t4\t5\t<= 0.25 x peer",
        "onset\tpage_p50\tms\t867\t846\t882\tprometheus_tuned\t4083\t3905\t4562\t<= 1000 ms, <= 0.25 x peer",
        "onset\tpage_p50\tms\t867\t846\t882\tprometheus_irate\t1479\t901\t1806\t<= 1000 ms, <= 0.25 x peer",
        "onset\tresolve_p50\ts\t1.6\t1.5\t1.7\tprometheus_tuned\t2.1\t2\t2.2\t<= 1500 ms",
        "ingest\tingest_rate\tevents/s\t116000\t116000\t116000\t-\t-\t-\t-\t>= 100000 events/s",
        "restart\trestart_started\tms\t7.5\t5\t12\tmonit\t512\t30\t990\t<= 50 ms",
    ];
    std::fs::write(&tsv, rows.join("\n") + "\n")?;
    let out = run(&["--render", tsv.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2 + rows.len(), "{table}");
    let want = [
        "| footprint | agent_cpu | 0.05 %cpu (0.04–0.06) | node_exporter | 0.8 %cpu (0.7–0.9) | 0.06 | - | - |",
        "| footprint | agent_cpu | 0.1 %cpu (0.09–0.2) | collectd | 0.083 %cpu (0.08–0.09) | 1.20 | <= collectd | no |",
        "| footprint | agent_rss | 4.5 MiB (4.4–4.6) | collectd | 2.4 MiB (2.4–2.4) | 1.88 | <= 5 MiB | yes |",
        "| onset | - | not run: target/release/bench-onset is not built | - | - | - | - | - |",
        "| onset | page_p50 | 0.9 s (0.8–1.2) | prometheus_tuned | 4.2 s (4–5) | 0.21 | <= 0.25 x peer | yes |",
        "| onset | page_p50 | 867 ms (846–882) | prometheus_tuned | 4083 ms (3905–4562) | 0.21 | <= 1000 ms, <= 0.25 x peer | yes |",
        "| onset | page_p50 | 867 ms (846–882) | prometheus_irate | 1479 ms (901–1806) | 0.59 | <= 1000 ms, <= 0.25 x peer | no |",
        "| onset | resolve_p50 | 1.6 s (1.5–1.7) | prometheus_tuned | 2.1 s (2–2.2) | 0.76 | <= 1500 ms | no |",
        "| ingest | ingest_rate | 116000 events/s (116000–116000) | - | - | - | >= 100000 events/s | yes |",
        "| restart | restart_started | 7.5 ms (5–12) | monit | 512 ms (30–990) | 0.01 | <= 50 ms | yes |",
    ];
    for (got, want) in lines[2..].iter().zip(want) {
        assert_eq!(*got, want);
    }
    Ok(())
}
