//! Agent footprint, side by side in the same run: tocsin-agent (1 s sampling, the default
//! rules, 10 watched processes, 5 HTTP checks) against Debian's
//! `prometheus-node-exporter` scraped every second and `collectd` (cpu, memory, load,
//! interface at a 1 s interval). All three run at the same time for SECONDS after a
//! 5 s warm-up; CPU is utime+stime over that window, RSS the median of 1 s readings.
//! RUNS runs, each with fresh processes; the table shows median, min and max.
//!
//! Then the agent's cycle time with IDLE extra sleeping processes on the node (read from
//! its `tocsin_cycle_duration_seconds` histogram): every cycle must finish well inside
//! the 1 s interval, including the full process-table reads (every 10 s).
//!
//! Usage: `cargo build --release --bins && target/release/bench-agent-cost [SECONDS] [RUNS] [IDLE] [--tsv]`
//! (defaults 60, 3, 20000). With `--tsv` stdout gets only the issue-9 rows (`footprint`
//! `agent_cpu` and `agent_rss` against each peer; see `bench/side-by-side.sh`) and the
//! tables go to stderr. Installs the peers with apt-get when missing (root). Loopback
//! only; bounded; stops every process it starts, by PID.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tocsin_e2e::measure::{
    Spread, cpu_seconds, ensure_debian, median, rss_mib, take_flag, tsv_row,
};
use tocsin_e2e::{Aggregator, Daemon, start_agent};

/// Progress on stderr (the table goes to stdout).
macro_rules! note {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    }};
}

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const COLLECTD: &str = "/usr/sbin/collectd";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Children started by this benchmark, killed (by PID) and reaped on drop.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// A tiny HTTP server answering `ok` on every path, for the agent's HTTP checks.
async fn health_server() -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn agent_config(dir: &Path, grpc: std::net::SocketAddr, http: std::net::SocketAddr) -> String {
    let mut s = format!(
        "agent_id = \"bench\"\ninterval = \"1s\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{grpc}\"]\n[log]\nlevel = \"warn,tocsin_agent=info\"\n",
        dir.join("agent-state").display()
    );
    for i in 0..10 {
        s.push_str(&format!("[[process]]\nname = \"bench-svc-{i}\"\n"));
    }
    for i in 0..5 {
        s.push_str(&format!(
            "[[http]]\nname = \"web{i}\"\nurl = \"http://{http}/health/{i}\"\n"
        ));
    }
    s
}

fn collectd_config(dir: &Path) -> String {
    format!(
        "Hostname \"bench\"\nFQDNLookup false\nInterval 1\nBaseDir \"{d}\"\nPIDFile \"{d}/collectd.pid\"\n\
         TypesDB \"/usr/share/collectd/types.db\"\nLoadPlugin logfile\n<Plugin logfile>\n  File \"{d}/collectd.log\"\n</Plugin>\n\
         LoadPlugin cpu\nLoadPlugin memory\nLoadPlugin load\nLoadPlugin interface\n",
        d = dir.display()
    )
}

struct Usage {
    cpu_pct: f64,
    rss_mib: f64,
}

/// Measures `pids` together for `seconds`: CPU % of one core and median RSS of each.
async fn measure(pids: &[u32], seconds: u64) -> Vec<Usage> {
    let start: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let t0 = Instant::now();
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); pids.len()];
    while t0.elapsed() < Duration::from_secs(seconds) {
        for (i, &p) in pids.iter().enumerate() {
            rss[i].push(rss_mib(p, "VmRSS:"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    pids.iter()
        .enumerate()
        .map(|(i, &p)| Usage {
            cpu_pct: (cpu_seconds(p) - start[i]) * 100.0 / wall,
            rss_mib: median(&rss[i]),
        })
        .collect()
}

fn admin_addr(agent: &Daemon) -> Option<String> {
    agent
        .output()
        .split("admin=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_owned)
}

async fn wait_admin(agent: &mut Daemon) -> Result<String> {
    agent.wait_for_output("admin listening").await?;
    admin_addr(agent).context("admin address in the agent log")
}

/// (bucket upper bound s, cumulative count) of the agent's cycle histogram, and its sum.
async fn cycle_histogram(admin: &str) -> Result<(Vec<(f64, u64)>, f64)> {
    let body = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    let mut buckets = Vec::new();
    let mut sum = 0.0;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("tocsin_cycle_duration_seconds_bucket{le=\"") {
            let (le, count) = rest.split_once("\"} ").context("bucket line")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            buckets.push((le, count.trim().parse()?));
        } else if let Some(v) = line.strip_prefix("tocsin_cycle_duration_seconds_sum ") {
            sum = v.trim().parse()?;
        }
    }
    Ok((buckets, sum))
}

struct Run {
    agent: Usage,
    node_exporter: Usage,
    collectd: Usage,
}

async fn one_run(seconds: u64) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut children = Children::default();
    for i in 0..10 {
        let exe = dir.path().join(format!("bench-svc-{i}"));
        std::fs::copy("/bin/sleep", &exe)?;
        children.0.push(Command::new(&exe).arg("3600").spawn()?);
    }
    let http = health_server().await?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n",
        dir.path().join("agg").display()
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let mut agent = start_agent(dir.path(), &agent_config(dir.path(), agg.grpc, http))?;
    wait_admin(&mut agent).await?;

    let port = free_port()?;
    children.0.push(
        Command::new(NODE_EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let scrape_url = format!("http://127.0.0.1:{port}/metrics");
    let scraper = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Ok(r) = client.get(&scrape_url).send().await {
                let _ = r.bytes().await;
            }
        }
    });
    let conf = dir.path().join("collectd.conf");
    std::fs::write(&conf, collectd_config(dir.path()))?;
    children.0.push(
        Command::new(COLLECTD)
            .args(["-f", "-C"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let ne_pid = children.0[10].id();
    let cd_pid = children.0[11].id();

    tokio::time::sleep(Duration::from_secs(5)).await;
    for (what, pid) in [("node_exporter", ne_pid), ("collectd", cd_pid)] {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!(
                "{what} exited at start (see {})",
                dir.path().join("collectd.log").display()
            );
        }
    }
    let usage = measure(&[agent.pid(), ne_pid, cd_pid], seconds).await;
    scraper.abort();
    let _ = agent.stop("TERM");
    drop(children);
    let mut u = usage.into_iter();
    let mut next = || u.next().context("usage");
    Ok(Run {
        agent: next()?,
        node_exporter: next()?,
        collectd: next()?,
    })
}

/// The agent's cycles with `idle` extra sleeping processes on the node, over `seconds`.
async fn idle_cycles(idle: usize, seconds: u64) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut children = Children::default();
    let spawn_start = Instant::now();
    for _ in 0..idle {
        match Command::new("/bin/sleep")
            .arg("900")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => children.0.push(c),
            Err(e) => {
                note!("stopped at {} idle processes: {e}", children.0.len());
                break;
            }
        }
    }
    let spawned = children.0.len();
    note!(
        "{spawned} idle processes started in {:.1}s",
        spawn_start.elapsed().as_secs_f64()
    );
    for i in 0..10 {
        let exe = dir.path().join(format!("bench-svc-{i}"));
        std::fs::copy("/bin/sleep", &exe)?;
        children.0.push(Command::new(&exe).arg("900").spawn()?);
    }
    let http = health_server().await?;
    let agg_cfg = format!(
        "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n",
        dir.path().join("agg").display()
    );
    let agg = Aggregator::start(dir.path(), &agg_cfg).await?;
    let mut agent = start_agent(dir.path(), &agent_config(dir.path(), agg.grpc, http))?;
    let admin = wait_admin(&mut agent).await?;
    let pid = agent.pid();
    // Start-up (the first, in-line scan of the process table) is reported apart: the
    // steady state is the histogram's growth after 5 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (start_buckets, start_sum) = cycle_histogram(&admin).await?;
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu_pct = (cpu_seconds(pid) - cpu0) * 100.0 / t0.elapsed().as_secs_f64();
    let rss = rss_mib(pid, "VmRSS:");
    let (end_buckets, end_sum) = cycle_histogram(&admin).await?;
    let _ = agent.stop("TERM");
    drop(children);
    let slowest_of = |buckets: &[(f64, u64)]| {
        let count = buckets.last().map_or(0, |b| b.1);
        buckets
            .iter()
            .find(|(_, c)| *c == count)
            .map_or(f64::NAN, |b| b.0)
    };
    let startup = slowest_of(&start_buckets);
    let buckets: Vec<(f64, u64)> = end_buckets
        .iter()
        .zip(&start_buckets)
        .map(|(e, s)| (e.0, e.1.saturating_sub(s.1)))
        .collect();
    let sum = end_sum - start_sum;
    let count = buckets.last().map_or(0, |b| b.1);
    let slowest = slowest_of(&buckets);
    let p50 = buckets
        .iter()
        .find(|(_, c)| *c * 2 >= count)
        .map_or(f64::NAN, |b| b.0);
    Ok(format!(
        "| {spawned} | ≤ {:.0} | {count} | {:.2} | ≤ {:.1} | ≤ {:.1} | {cpu_pct:.2} | {rss:.1} |\n",
        startup * 1000.0,
        sum * 1000.0 / count.max(1) as f64,
        p50 * 1000.0,
        slowest * 1000.0,
    ))
}

fn row(name: &str, values: &[&Usage], tocsin: &[&Usage]) -> String {
    let cpu: Vec<f64> = values.iter().map(|u| u.cpu_pct).collect();
    let rss: Vec<f64> = values.iter().map(|u| u.rss_mib).collect();
    let t_cpu = median(&tocsin.iter().map(|u| u.cpu_pct).collect::<Vec<_>>());
    let t_rss = median(&tocsin.iter().map(|u| u.rss_mib).collect::<Vec<_>>());
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "| {name} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
        median(&cpu),
        min(&cpu),
        max(&cpu),
        median(&rss),
        min(&rss),
        max(&rss),
        t_cpu / median(&cpu),
        t_rss / median(&rss),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tsv = take_flag(&mut args, "--tsv");
    let mut args = args.into_iter();
    let mut num = |default: u64, what: &str| -> Result<u64> {
        match args.next() {
            Some(s) => s
                .parse()
                .with_context(|| format!("{what} must be a number, got {s:?}")),
            None => Ok(default),
        }
    };
    let seconds = num(60, "SECONDS")?;
    let runs = num(3, "RUNS")?;
    let idle = usize::try_from(num(20_000, "IDLE")?)?;
    ensure_debian(&[
        (NODE_EXPORTER, "prometheus-node-exporter"),
        (COLLECTD, "collectd-core"),
    ])?;

    let mut all = Vec::new();
    for r in 0..runs {
        note!("run {} of {runs} ({seconds}s)", r + 1);
        all.push(one_run(seconds).await?);
    }
    let agent: Vec<&Usage> = all.iter().map(|r| &r.agent).collect();
    let ne: Vec<&Usage> = all.iter().map(|r| &r.node_exporter).collect();
    let cd: Vec<&Usage> = all.iter().map(|r| &r.collectd).collect();
    let mut out = format!(
        "Footprint, {runs} runs of {seconds}s each, all three running at once (ratio = tocsin / peer, medians)\n\n\
         | process | CPU % of one core (median) | min | max | RSS MiB (median) | min | max | CPU ratio | RSS ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    out.push_str(&row(
        "tocsin-agent (1 s, default rules, 10 watches, 5 HTTP checks)",
        &agent,
        &agent,
    ));
    out.push_str(&row(
        "prometheus-node-exporter (scraped every 1 s)",
        &ne,
        &agent,
    ));
    out.push_str(&row(
        "collectd (cpu, memory, load, interface at 1 s)",
        &cd,
        &agent,
    ));
    if idle > 0 {
        note!("cycle time with {idle} idle processes");
        out.push_str(
            "\nAgent cycles with many idle processes on the node (1 s interval, 10 watches, 5 HTTP checks)\n\n\
             | idle processes | start-up cycle ms | steady cycles | mean ms | p50 ms | slowest ms | agent CPU % | RSS MiB |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        out.push_str(&idle_cycles(idle, seconds.min(60)).await?);
    }
    if tsv {
        note!("{out}");
        let cpu = |v: &[&Usage]| Spread::of(&v.iter().map(|u| u.cpu_pct).collect::<Vec<_>>());
        let rss = |v: &[&Usage]| Spread::of(&v.iter().map(|u| u.rss_mib).collect::<Vec<_>>());
        let mut rows = String::new();
        for (peer, values, cpu_target) in [
            ("node_exporter", &ne, "-"),
            ("collectd", &cd, "<= collectd"),
        ] {
            rows.push_str(&tsv_row(
                "footprint",
                "agent_cpu",
                "%cpu",
                &cpu(&agent),
                Some((peer, &cpu(values))),
                cpu_target,
            ));
        }
        for (peer, values) in [("node_exporter", &ne), ("collectd", &cd)] {
            rows.push_str(&tsv_row(
                "footprint",
                "agent_rss",
                "MiB",
                &rss(&agent),
                Some((peer, &rss(values))),
                "<= 5 MiB",
            ));
        }
        std::io::Write::write_all(&mut std::io::stdout(), rows.as_bytes())?;
    } else {
        std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    }
    Ok(())
}
