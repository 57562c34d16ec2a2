//! Process death → restart, side by side in the same run (issue 9, scenario 3):
//! tocsin-agent's local recovery against Debian's `monit` with a 1 s cycle.
//!
//! Two identical dummy services run for the whole benchmark, one per supervisor. Each is
//! a small bash script that appends `PID $EPOCHREALTIME` to its start log, writes its PID
//! to its pidfile and then `exec`s a copy of `/bin/sleep` (so the PID stays). Both
//! supervisors start it (also the first instance) with the same argv, without a shell of
//! their own: `/usr/bin/setsid -f SCRIPT`.
//! - tocsin: a real `tocsin-agent` (release binary next to this one; 1 s interval,
//!   default rules) watching the dummy by `pidfile`, with
//!   `recover = { command = [setsid, -f, SCRIPT], max_runs = RUNS + 10, window = "1h" }`,
//!   streaming to a real `tocsin-aggregator` on loopback (the agent needs an endpoint).
//! - monit: `monit -I -c CONF` (foreground; `set daemon 1`; no httpd; log, id, state and
//!   pid files in a temporary directory; control file mode 0600) with
//!   `check process … with pidfile … start program = "/usr/bin/setsid -f SCRIPT"`.
//!
//! RUNS times, alternating which supervisor goes first: once the dummy has run for 2.5 s
//! under its supervisor (for tocsin also: the agent reports `process:NAME` ok on its
//! admin `/metrics`, so the restart is not held back by the 10 s retry spacing of a
//! still-failing recovery), after a random 0–1000 ms (so the kill falls at any phase of
//! monit's cycle), the dummy gets SIGKILL at T0 (`kill(2)` from this process).
//!
//! The dummy is an orphan once `setsid` exits. This process makes itself the child
//! subreaper, so the orphan becomes its child, and reaps a killed dummy at once, as
//! systemd (PID 1) does with a daemonized service: monit counts a zombie as running (it
//! logs "process with pid N is a zombie" and waits), and this VM's PID 1 reaps orphans
//! only about once a second, which would add up to 1–2 s to monit's time. The agent sees
//! the death through a pidfd, zombie or not.
//!
//! Measured: time from T0 to the replacement's first script line, self-stamped with
//! bash's `$EPOCHREALTIME` (microseconds, no fork) against the wall clock read just
//! before `kill(2)`. This has the least bias: no polling granularity and no observer
//! competing for the 2 cores; it includes the same bash start-up (about 1 ms) for both
//! supervisors. As a cross-check, this process also polls the pidfile and `/proc` every
//! 0.5 ms and reports when it first sees a new live PID there.
//!
//! Usage: `cargo build --release --bins && target/release/bench-restart [RUNS] [--tsv]`
//! (default RUNS 20). With `--tsv` stdout gets only the issue-9 row (see
//! `bench/side-by-side.sh`) and the table goes to stderr. Installs `monit` with apt-get
//! when missing (root). Loopback only; bounded (30 s per restart at most); stops every
//! process it started, by PID, also on errors, SIGINT and SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tocsin_e2e::measure::{Spread, ensure_debian, plain, take_flag, tsv_row};
use tocsin_e2e::{Aggregator, AggregatorToml, Daemon, start_agent};

/// Progress on stderr (the result goes to stdout).
macro_rules! note {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    }};
}

const MONIT: &str = "/usr/bin/monit";
const SETSID: &str = "/usr/bin/setsid";
/// How long the dummy must have run under its supervisor before it is killed.
const STABLE: Duration = Duration::from_millis(2500);
/// Longest wait for a replacement (monit restarts within ~1 s).
const LIMIT: Duration = Duration::from_secs(30);

fn monit_version() -> String {
    Command::new(MONIT)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// True while `pid` runs (exists and is neither a zombie nor dead).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// One dummy service: `DIR/NAME.sh` starts it, `DIR/NAME.pid` names it, `DIR/NAME.starts`
/// logs `PID UNIX_SECONDS` per start, and the running process is `DIR/NAME` (a copy of
/// `/bin/sleep`, so `comm` is NAME). Drop kills every instance still running, by PID.
struct Service {
    name: String,
    script: PathBuf,
    pidfile: PathBuf,
    starts: PathBuf,
}

impl Service {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let exe = dir.join(name);
        std::fs::copy("/bin/sleep", &exe)?;
        let script = dir.join(format!("{name}.sh"));
        let pidfile = dir.join(format!("{name}.pid"));
        let starts = dir.join(format!("{name}.starts"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\n# Dummy service of bench-restart: stamp the start (no fork), name the PID, become the service.\n\
                 echo \"$$ $EPOCHREALTIME\" >> '{}'\necho \"$$\" > '{}'\nexec '{}' 1000000\n",
                starts.display(),
                pidfile.display(),
                exe.display()
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(Service {
            name: name.to_owned(),
            script,
            pidfile,
            starts,
        })
    }

    /// The start command both supervisors run (argv, no shell).
    fn start_argv(&self) -> [String; 3] {
        [
            SETSID.to_owned(),
            "-f".to_owned(),
            self.script.display().to_string(),
        ]
    }

    /// PID named by the pidfile, when it names one.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every start so far: (PID, Unix seconds of the script's first line).
    fn starts(&self) -> Vec<(u32, f64)> {
        std::fs::read_to_string(&self.starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (pid, t) = l.split_once(' ')?;
                Some((pid.parse().ok()?, t.replace(',', ".").parse().ok()?))
            })
            .collect()
    }

    /// Waits until the pidfile names a live PID other than `old` that has stayed the
    /// same for [`STABLE`]; returns it.
    async fn settle(&self, old: Option<u32>) -> Result<u32> {
        let begin = Instant::now();
        let mut current: Option<(u32, Instant)> = None;
        loop {
            let now = self.pid().filter(|&p| Some(p) != old && alive(p));
            current = match (now, current) {
                (Some(p), Some((q, since))) if p == q => Some((q, since)),
                (Some(p), _) => Some((p, Instant::now())),
                (None, _) => None,
            };
            if let Some((p, since)) = current
                && since.elapsed() >= STABLE
            {
                return Ok(p);
            }
            if begin.elapsed() > LIMIT + STABLE {
                bail!("{} did not run stably within {LIMIT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for (pid, _) in self.starts() {
            // Only our own instance: the PID may have been reused since.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // `comm` is NAME once the script exec'd, NAME.sh before.
            if alive(pid) && comm.trim().starts_with(&self.name) {
                kill(pid);
                reap(pid, false);
            }
        }
    }
}

fn rustix_pid(pid: u32) -> Option<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
}

fn kill(pid: u32) {
    if let Some(p) = rustix_pid(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// Reaps `pid` if it is a child of this process (every orphan is: this process is a child
/// subreaper), waiting for its exit unless `nohang`.
fn reap(pid: u32, nohang: bool) {
    let opts = if nohang {
        rustix::process::WaitOptions::NOHANG
    } else {
        rustix::process::WaitOptions::empty()
    };
    if let Some(p) = rustix_pid(pid) {
        let _ = rustix::process::waitpid(Some(p), opts);
    }
}

/// Reaps every exited child of this process except `keep` (the harness's daemons, which
/// their `Child` handles reap): the orphans the supervisors' start commands leave.
fn reap_orphans(keep: &[u32]) {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        if fields.first() == Some(&"Z")
            && fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me)
            && !keep.contains(&pid)
        {
            reap(pid, true);
        }
    }
}

/// Polls the pidfile and `/proc` every 0.5 ms (blocking) until a live PID other than
/// `old` is named; returns it and the time since `t0`.
fn wait_replacement(pidfile: &Path, old: u32, t0: Instant) -> Result<(u32, Duration)> {
    loop {
        if let Some(p) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&p| p != old && alive(p))
        {
            return Ok((p, t0.elapsed()));
        }
        if t0.elapsed() > LIMIT {
            bail!(
                "no replacement named in {} within {LIMIT:?}",
                pidfile.display()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// One restart: (ms until the replacement's first line ran, ms until the poll saw it).
struct Trial {
    stamped_ms: f64,
    polled_ms: f64,
}

/// Kills `pid` of `svc` with SIGKILL and measures its restart; returns the trial and the
/// replacement's PID.
async fn trial(svc: &Service, pid: u32) -> Result<(Trial, u32)> {
    let pidfile = svc.pidfile.clone();
    let (t0_wall, (new, polled)) = tokio::task::spawn_blocking(move || {
        let (t0_wall, t0) = (SystemTime::now(), Instant::now());
        kill(pid);
        // Reaped at once, as systemd (PID 1) reaps a daemonized service on SIGCHLD: monit
        // counts a zombie as running, and this VM's PID 1 reaps orphans only about once
        // a second.
        reap(pid, false);
        wait_replacement(&pidfile, pid, t0).map(|r| (t0_wall, r))
    })
    .await??;
    let t0_unix = t0_wall.duration_since(UNIX_EPOCH)?.as_secs_f64();
    let started = svc
        .starts()
        .into_iter()
        .rev()
        .find(|&(p, _)| p == new)
        .map(|(_, t)| t)
        .with_context(|| format!("PID {new} of {} has no start stamp", svc.name))?;
    let stamped_ms = (started - t0_unix) * 1000.0;
    if stamped_ms < 0.0 {
        bail!(
            "the replacement of {} stamped {stamped_ms:.3} ms before the kill: the wall clock moved",
            svc.name
        );
    }
    Ok((
        Trial {
            stamped_ms,
            polled_ms: polled.as_secs_f64() * 1000.0,
        },
        new,
    ))
}

fn admin_addr(agent: &Daemon) -> Option<String> {
    agent
        .output()
        .split("admin=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_owned)
}

/// Waits until the agent's `/metrics` show `process:NAME` ok.
async fn agent_ok(admin: &str, name: &str) -> Result<()> {
    let want = format!("check=\"process:{name}\"");
    let begin = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("http://{admin}/metrics")).await
            && let Ok(body) = r.text().await
            && body.lines().any(|l| {
                l.starts_with("tocsin_check_state{")
                    && l.contains(&want)
                    && l.contains("state=\"ok\"")
            })
        {
            return Ok(());
        }
        if begin.elapsed() > LIMIT {
            bail!("the agent did not report process:{name} ok within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything the benchmark runs. Fields drop in order: the supervisors stop before the
/// dummies are killed (or a supervisor would restart them), the directory goes last.
struct Rig {
    /// PIDs of the daemons below (not reaped by [`reap_orphans`]).
    daemons: Vec<u32>,
    _monit: Daemon,
    _agent: Daemon,
    _agg: Aggregator,
    tocsin_svc: Service,
    monit_svc: Service,
    _dir: tempfile::TempDir,
}

async fn rig(runs: usize) -> Result<(Rig, String)> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let tocsin_svc = Service::new(d, "rdum-tocsin")?;
    let monit_svc = Service::new(d, "rdum-monit")?;
    // No first start of our own: each supervisor starts its dummy (the pidfile is absent).

    let agg = Aggregator::start(d, &AggregatorToml::new(d).build()).await?;
    let argv: Vec<String> = tocsin_svc
        .start_argv()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    let agent_cfg = format!(
        "agent_id = \"bench-restart\"\ninterval = \"1s\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
         [aggregator]\nendpoints = [\"http://{}\"]\n[log]\nlevel = \"warn,tocsin_agent=info\"\n\
         [[process]]\nname = \"{}\"\npidfile = \"{}\"\n\
         recover = {{ command = [{}], max_runs = {}, window = \"1h\" }}\n",
        d.join("agent-state").display(),
        agg.grpc,
        tocsin_svc.name,
        tocsin_svc.pidfile.display(),
        argv.join(", "),
        runs + 10,
    );
    let mut agent = start_agent(d, &agent_cfg)?;
    agent.wait_for_output("admin listening").await?;
    let admin = admin_addr(&agent).context("admin address in the agent log")?;

    let conf = d.join("monitrc");
    std::fs::write(
        &conf,
        format!(
            "set daemon 1\nset logfile {d}/monit-own.log\nset pidfile {d}/monit.pid\nset idfile {d}/monit.id\n\
             set statefile {d}/monit.state\n\
             check process {name} with pidfile {pidfile}\n  start program = \"{start}\"\n",
            d = d.display(),
            name = monit_svc.name,
            pidfile = monit_svc.pidfile.display(),
            start = monit_svc.start_argv().join(" "),
        ),
    )?;
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600))?;
    let monit = Daemon::spawn(
        "monit",
        Path::new(MONIT),
        &["-I", "-c", &conf.display().to_string()],
        d,
    )?;
    Ok((
        Rig {
            daemons: vec![monit.pid(), agent.pid(), agg.daemon.pid()],
            _monit: monit,
            _agent: agent,
            _agg: agg,
            tocsin_svc,
            monit_svc,
            _dir: dir,
        },
        admin,
    ))
}

struct Results {
    tocsin: Vec<Trial>,
    monit: Vec<Trial>,
}

async fn bench(runs: usize) -> Result<Results> {
    let (rig, admin) = rig(runs).await?;
    reap_orphans(&rig.daemons);
    let mut out = Results {
        tocsin: Vec::new(),
        monit: Vec::new(),
    };
    for run in 0..runs {
        for tocsin_turn in [run % 2 == 0, run % 2 == 1] {
            let svc = if tocsin_turn {
                &rig.tocsin_svc
            } else {
                &rig.monit_svc
            };
            // Stable under its supervisor (already true for the one not killed last).
            let pid = svc.settle(None).await?;
            if tocsin_turn {
                agent_ok(&admin, &svc.name).await?;
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1000))).await;
            if svc.pid() != Some(pid) || !alive(pid) {
                bail!("{} changed before the kill", svc.name);
            }
            let (t, _) = trial(svc, pid).await?;
            reap_orphans(&rig.daemons);
            note!(
                "run {}/{runs} {}: replacement started after {:.2} ms (seen by the poll after {:.2} ms)",
                run + 1,
                if tocsin_turn { "tocsin" } else { "monit" },
                t.stamped_ms,
                t.polled_ms
            );
            if tocsin_turn {
                out.tocsin.push(t);
            } else {
                out.monit.push(t);
            }
        }
    }
    // Let the last replacements settle so the supervisors are idle when stopped.
    rig.tocsin_svc.settle(None).await?;
    rig.monit_svc.settle(None).await?;
    drop(rig);
    Ok(out)
}

const USAGE: &str = "usage: bench-restart [RUNS] [--tsv]\n\
  SIGKILLs a dummy service RUNS times (default 20) under tocsin-agent's local recovery and\n\
  under monit (1 s cycle), alternating, and reports the time until the replacement ran.\n\
  --tsv  print only the issue-9 row on stdout (the table goes to stderr)\n";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tocsin_e2e::init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        std::io::Write::write_all(&mut std::io::stdout(), USAGE.as_bytes())?;
        return Ok(());
    }
    let tsv = take_flag(&mut args, "--tsv");
    let runs: usize = match args.as_slice() {
        [] => 20,
        [n] => n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("RUNS must be a positive number, got {n:?}\n{USAGE}"))?,
        _ => bail!("too many arguments: {args:?}\n{USAGE}"),
    };
    ensure_debian(&[(MONIT, "monit")])?;
    let version = monit_version();
    // Orphans (the dummies, once their `setsid -f` parent exits) become children of this
    // process, so it can reap a killed dummy at once, like systemd would.
    rustix::process::set_child_subreaper(rustix_pid(1)).context("prctl(PR_SET_CHILD_SUBREAPER)")?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Dropping `bench` on a signal drops its rig: every process it started is stopped.
    let results = tokio::select! {
        r = bench(runs) => r?,
        _ = tokio::signal::ctrl_c() => return Err(anyhow!("interrupted (SIGINT); stopped every process started")),
        _ = term.recv() => return Err(anyhow!("terminated (SIGTERM); stopped every process started")),
    };

    let spread =
        |v: &[Trial], f: fn(&Trial) -> f64| Spread::of(&v.iter().map(f).collect::<Vec<_>>());
    let t = spread(&results.tocsin, |t| t.stamped_ms);
    let m = spread(&results.monit, |t| t.stamped_ms);
    let tp = spread(&results.tocsin, |t| t.polled_ms);
    let mp = spread(&results.monit, |t| t.polled_ms);
    let line = |name: &str, s: &Spread, p: &Spread| {
        format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            plain(s.median),
            plain(s.min),
            plain(s.max),
            plain(p.median),
            plain(p.min),
            plain(p.max)
        )
    };
    let mut table = format!(
        "Process death → restart: {runs} SIGKILLs each, alternating; time from the kill until the replacement's first line ran (self-stamped), and until a 0.5 ms poll of the pidfile and /proc saw it\n\n\
         | supervisor | started ms (median) | min | max | seen by the poll ms (median) | min | max |\n\
         |---|---:|---:|---:|---:|---:|---:|\n"
    );
    table.push_str(&line(
        "tocsin-agent (pidfd, local recovery, 1 s interval)",
        &t,
        &tp,
    ));
    table.push_str(&line(&format!("monit {version} (set daemon 1)"), &m, &mp));
    table.push_str(&format!(
        "\nratio tocsin / monit (medians): {:.3}; target ≤ 50 ms: {}\n",
        t.median / m.median,
        if t.median <= 50.0 { "met" } else { "not met" }
    ));
    if tsv {
        note!("{table}");
        let row = tsv_row(
            "restart",
            "restart_started",
            "ms",
            &t,
            Some(("monit", &m)),
            "<= 50 ms",
        );
        std::io::Write::write_all(&mut std::io::stdout(), row.as_bytes())?;
    } else {
        std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes())?;
    }
    Ok(())
}
