//! Drills: faults the aggregator asks this agent to inject for real on its node
//! (`tocsin drill NODE SCENARIO`), so the whole path — detection, incident, page,
//! recovery — is exercised. The agent runs a scenario only when `[drills] allow` names it
//! (or says `"all"`); otherwise it answers `refused: drills not allowed on this node`.
//!
//! Scenarios:
//! - `process_crash`: SIGKILL to one process of a process watch (`target` names the
//!   watch; empty: the first watch). Local recovery (`recover`) and the aggregator's
//!   hooks then do their job.
//! - `high_load`: one busy thread per CPU for `duration_ms` (at most [`MAX_DURATION`]),
//!   stopped afterwards; the `cpu` rule sees it.
//! - `dependency_down`: with `[drills] dependency_listen = "127.0.0.1:PORT"` the agent
//!   itself holds that port open all the time (a stand-in dependency: it accepts and
//!   closes connections) for a `[[tcp]]` (or `[[http]]`) check to watch; the drill closes
//!   it for `duration_ms`, then holds it again, so the check fails and recovers.
//! - `node_down`: the shipper sends no heartbeat and no event for `duration_ms` (the
//!   connection stays up), so the aggregator's liveness raises `node_down`; the events
//!   of that time are sent afterwards.
//!
//! Every command gets one [`v1::DrillReport`] when it starts or is refused (`done`
//! false) and one when the fault is over (`done` true), sent over the current stream.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tocsin_proto::v1;
use tokio::sync::mpsc;

use crate::config::{AgentConfig, ProcessWatch};
use crate::event::now_ms;
use crate::settings::Validator;

/// The scenarios an agent can run.
pub const SCENARIOS: [&str; 4] = ["process_crash", "high_load", "dependency_down", "node_down"];

/// Longest fault a drill may ask for.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// Reply to a drill this node does not allow.
pub const REFUSED: &str = "refused: drills not allowed on this node";

/// `[drills]` as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDrills {
    /// Scenario names this node runs (see [`SCENARIOS`]), or `"all"`. Default: none.
    pub allow: Vec<String>,
    /// `127.0.0.1:PORT` (loopback only) the agent holds open as the stand-in dependency
    /// that `dependency_down` closes; empty: none (then `dependency_down` is refused).
    pub dependency_listen: String,
}

/// The validated `[drills]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrillPolicy {
    /// Allowed scenario names (`"all"` expanded).
    pub allow: BTreeSet<String>,
    /// The stand-in dependency's address (`[drills] dependency_listen`), loopback.
    pub dependency: Option<std::net::SocketAddr>,
}

impl DrillPolicy {
    /// Validates `raw`; an unknown scenario is a problem of `drills.allow`.
    pub fn validate(raw: RawDrills, v: &mut Validator<'_>) -> Self {
        let mut allow = BTreeSet::new();
        for s in raw.allow {
            let s = s.trim().to_owned();
            if s == "all" {
                allow.extend(SCENARIOS.iter().map(|s| (*s).to_owned()));
            } else if SCENARIOS.contains(&s.as_str()) {
                allow.insert(s);
            } else {
                v.problem(
                    "drills.allow",
                    format!(
                        "unknown scenario {s:?}: use {} or \"all\"",
                        SCENARIOS.join(", ")
                    ),
                );
            }
        }
        let dependency = match raw.dependency_listen.trim() {
            "" => None,
            a => {
                match a.parse::<std::net::SocketAddr>() {
                    Ok(addr) if addr.ip().is_loopback() && addr.port() != 0 => Some(addr),
                    Ok(_) => {
                        v.problem(
                        "drills.dependency_listen",
                        format!("{a:?} must be a loopback address with a port, e.g. \"127.0.0.1:15432\""),
                    );
                        None
                    }
                    Err(e) => {
                        v.problem("drills.dependency_listen", format!("{a:?}: {e}"));
                        None
                    }
                }
            }
        };
        DrillPolicy { allow, dependency }
    }
}

/// Settings that are valid but can never give a working drill, as `(key, why)`:
/// `dependency_down` allowed without `[drills] dependency_listen` (refused every
/// time); a `dependency_listen` that no `[[tcp]]` or `[[http]]` check watches (the
/// drill closes a port nobody looks at: no incident); `process_crash` allowed without
/// a `[[process]]` watch (nothing to kill). `check-config` prints them as warnings
/// (exit 0) and the agent logs them at start.
pub fn warnings(cfg: &AgentConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let allow = &cfg.drills.allow;
    if allow.contains("dependency_down") && cfg.drills.dependency.is_none() {
        out.push((
            "drills.allow",
            "allows dependency_down but drills.dependency_listen is not set: every \
             dependency_down drill will be refused (set dependency_listen = \"127.0.0.1:PORT\" \
             and a [[tcp]] check on that address)"
                .to_owned(),
        ));
    }
    if let Some(dep) = cfg.drills.dependency
        && !cfg.active.iter().any(|c| watches(c, dep))
    {
        out.push((
            "drills.dependency_listen",
            format!(
                "no [[tcp]] or [[http]] check watches {dep}: a dependency_down drill closes a \
                 port nobody checks and can never raise an incident (add a [[tcp]] check with \
                 address = \"{dep}\")"
            ),
        ));
    }
    if allow.contains("process_crash") && cfg.processes.is_empty() {
        out.push((
            "drills.allow",
            "allows process_crash but no [[process]] watch is configured: every process_crash \
             drill will fail (nothing to kill)"
                .to_owned(),
        ));
    }
    out
}

/// Whether active check `c` probes `dep` (same port, on a loopback host or `dep`'s IP).
fn watches(c: &crate::active::ActiveCheck, dep: std::net::SocketAddr) -> bool {
    let (host, port) = match c {
        crate::active::ActiveCheck::Tcp(t) => match t.address.rsplit_once(':') {
            Some((h, p)) => (h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().ok()),
            None => return false,
        },
        crate::active::ActiveCheck::Http(h) => (
            h.url
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned(),
            h.url.port_or_known_default(),
        ),
        crate::active::ActiveCheck::Exec(_) => return false,
    };
    if port != Some(dep.port()) {
        return false;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == dep.ip() || (ip.is_loopback() && dep.ip().is_loopback()),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The drill runner of this agent, shared by the shipper (which receives commands and
/// mutes heartbeats during `node_down`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drills {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    policy: DrillPolicy,
    watches: Vec<ProcessWatch>,
    /// `node_down` in progress until then.
    mute_until: Mutex<Option<Instant>>,
    /// A drill runs: a second one is refused.
    busy: AtomicBool,
    reports: mpsc::UnboundedSender<v1::DrillReport>,
    /// The stand-in dependency is closed until then.
    dependency_down: tokio::sync::watch::Sender<Option<Instant>>,
}

impl Drills {
    /// The runner for `cfg`, and the receiver of its reports (for the shipper).
    pub fn new(cfg: &AgentConfig) -> (Self, mpsc::UnboundedReceiver<v1::DrillReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Drills {
                inner: Arc::new(Inner {
                    policy: cfg.drills.clone(),
                    watches: cfg.processes.clone(),
                    mute_until: Mutex::new(None),
                    busy: AtomicBool::new(false),
                    reports: tx,
                    dependency_down: tokio::sync::watch::channel(None).0,
                }),
            },
            rx,
        )
    }

    /// Holds the stand-in dependency's port (`[drills] dependency_listen`) open until
    /// `shutdown`, closing it while a `dependency_down` drill says so. Nothing to do
    /// without the setting.
    pub async fn hold_dependency(self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(addr) = self.inner.policy.dependency else {
            return;
        };
        let mut down = self.inner.dependency_down.subscribe();
        let mut warned = false;
        loop {
            let until = *down.borrow_and_update();
            if let Some(t) = until.filter(|t| *t > Instant::now()) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(t.into()) => continue,
                }
            }
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, "holding the drill dependency port");
                    warned = false;
                    l
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(%addr, error = %e, "cannot hold the drill dependency port; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = down.changed() => {
                        if r.is_err() {
                            return;
                        }
                        break;
                    }
                    a = listener.accept() => drop(a),
                }
            }
            drop(listener);
        }
    }

    /// Whether a `node_down` drill holds heartbeats and events back now.
    pub fn muted(&self) -> bool {
        let mut m = self
            .inner
            .mute_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *m {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *m = None;
                false
            }
            None => false,
        }
    }

    fn report(&self, cmd: &v1::DrillCommand, accepted: bool, done: bool, message: String) {
        let _ = self.inner.reports.send(v1::DrillReport {
            drill_id: cmd.drill_id,
            accepted,
            done,
            message,
            injected_at_ms: if accepted { now_ms() } else { 0 },
        });
    }

    /// Starts `cmd` (or refuses it); its reports go to the shipper's receiver.
    pub fn start(&self, cmd: v1::DrillCommand) {
        let scenario = cmd.scenario.as_str();
        if !SCENARIOS.contains(&scenario) {
            let m = format!("refused: unknown scenario {scenario:?}");
            return self.report(&cmd, false, true, m);
        }
        if !self.inner.policy.allow.contains(scenario) {
            let m = if self.inner.policy.allow.is_empty() {
                REFUSED.to_owned()
            } else {
                format!(
                    "{REFUSED} for {scenario} (allowed: {:?})",
                    self.inner.policy.allow
                )
            };
            tracing::warn!(drill = cmd.drill_id, scenario, "drill refused: not allowed");
            return self.report(&cmd, false, true, m);
        }
        if self.inner.busy.swap(true, Ordering::SeqCst) {
            let m = "refused: another drill is running on this node".to_owned();
            return self.report(&cmd, false, true, m);
        }
        let duration = Duration::from_millis(u64::from(cmd.duration_ms)).min(MAX_DURATION);
        tracing::warn!(drill = cmd.drill_id, scenario, ?duration, target = %cmd.target, "DRILL: injecting a fault");
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.run(&cmd, duration).await;
            this.inner.busy.store(false, Ordering::SeqCst);
            match outcome {
                Ok(done) => this.report(&cmd, true, true, done),
                Err(e) => this.report(&cmd, false, true, format!("failed: {e}")),
            }
        });
    }

    async fn run(&self, cmd: &v1::DrillCommand, duration: Duration) -> Result<String, String> {
        match cmd.scenario.as_str() {
            "process_crash" => {
                let (watch, pid) = self.victim(&cmd.target).await?;
                let p = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(-1))
                    .ok_or_else(|| format!("bad pid {pid}"))?;
                rustix::process::kill_process(p, rustix::process::Signal::KILL)
                    .map_err(|e| format!("cannot kill PID {pid} of watch {watch}: {e}"))?;
                self.report(
                    cmd,
                    true,
                    false,
                    format!("killed PID {pid} of watch {watch} (SIGKILL)"),
                );
                Ok(format!("killed PID {pid} of watch {watch} (SIGKILL)"))
            }
            "high_load" => {
                let threads = std::thread::available_parallelism().map_or(1, usize::from);
                self.report(
                    cmd,
                    true,
                    false,
                    format!("burning {threads} CPU threads for {duration:?}"),
                );
                let deadline = Instant::now() + duration;
                tokio::task::spawn_blocking(move || burn(threads, deadline))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!(
                    "burned {threads} CPU threads for {duration:?}; stopped"
                ))
            }
            "dependency_down" => {
                let addr = self.inner.policy.dependency.ok_or_else(|| {
                    "no stand-in dependency: set [drills] dependency_listen".to_owned()
                })?;
                self.inner
                    .dependency_down
                    .send_replace(Some(Instant::now() + duration));
                self.report(
                    cmd,
                    true,
                    false,
                    format!("dependency {addr} closed for {duration:?}"),
                );
                tokio::time::sleep(duration).await;
                Ok(format!(
                    "dependency {addr} closed for {duration:?}; open again"
                ))
            }
            "node_down" => {
                *self
                    .inner
                    .mute_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(Instant::now() + duration);
                self.report(
                    cmd,
                    true,
                    false,
                    format!("heartbeats and events stopped for {duration:?}"),
                );
                tokio::time::sleep(duration).await;
                Ok(format!(
                    "heartbeats and events stopped for {duration:?}; resumed"
                ))
            }
            other => Err(format!("unknown scenario {other:?}")),
        }
    }

    /// The watch named `target` (empty: the first) and one live PID of it.
    async fn victim(&self, target: &str) -> Result<(String, u32), String> {
        let watch = self
            .inner
            .watches
            .iter()
            .find(|w| target.is_empty() || w.name == target)
            .cloned()
            .ok_or_else(|| format!("no process watch {target:?} on this node"))?;
        let name = watch.name.clone();
        tokio::task::spawn_blocking(move || {
            let mut d = crate::sample::Discoverer::new(vec![watch.clone()]);
            let found = d.scan();
            let mut s = crate::sample::Sampler::new(vec![watch], Default::default())
                .map_err(|e| e.to_string())?;
            let sample = s.sample(Duration::ZERO, Some(found));
            sample
                .processes
                .first()
                .and_then(|p| p.pids.first().copied())
                .map(|pid| (name.clone(), pid))
                .ok_or_else(|| format!("watch {name} has no running process to kill"))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Keeps `threads` threads busy until `deadline`, then returns.
fn burn(threads: usize, deadline: Instant) {
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut x = 0u64;
                while Instant::now() < deadline {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
                std::hint::black_box(x);
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<crate::config::AgentConfig, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        crate::config::load(Some(&path)).map_err(|e| e.to_string())
    }

    #[test]
    fn drills_are_off_by_default_and_all_allows_every_scenario() {
        let none = load("").expect("empty config");
        assert!(none.drills.allow.is_empty());
        assert_eq!(none.drills.dependency, None);
        let all = load("[drills]\nallow = [\"all\"]\ndependency_listen = \"127.0.0.1:15432\"\n")
            .expect("config");
        assert_eq!(all.drills.allow.len(), SCENARIOS.len());
        assert_eq!(
            all.drills.dependency,
            Some("127.0.0.1:15432".parse().expect("addr"))
        );
    }

    #[test]
    fn bad_drill_settings_name_their_keys_all_at_once() {
        let e = load("[drills]\nallow = [\"meltdown\"]\ndependency_listen = \"0.0.0.0:80\"\n")
            .expect_err("refused");
        assert!(e.contains("drills.allow") && e.contains("meltdown"), "{e}");
        assert!(
            e.contains("drills.dependency_listen") && e.contains("loopback"),
            "{e}"
        );
    }

    /// Regression (review of issue 6, finding 12): `check-config` accepted drill
    /// setups that can never work.
    #[test]
    fn drill_setups_that_can_never_work_are_warned_about_by_key() {
        let cfg =
            load("[drills]\nallow = [\"dependency_down\", \"process_crash\"]\n").expect("valid");
        let w = warnings(&cfg);
        assert!(
            w.iter()
                .any(|(k, m)| *k == "drills.allow" && m.contains("dependency_listen is not set")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|(k, m)| *k == "drills.allow" && m.contains("no [[process]] watch")),
            "{w:?}"
        );
        let cfg = load(
            "[drills]\nallow = [\"dependency_down\"]\ndependency_listen = \"127.0.0.1:15432\"\n\
             [[tcp]]\nname = \"other\"\naddress = \"127.0.0.1:15433\"\n",
        )
        .expect("valid");
        let w = warnings(&cfg);
        assert!(
            w.iter()
                .any(|(k, m)| *k == "drills.dependency_listen" && m.contains("127.0.0.1:15432")),
            "{w:?}"
        );
        let cfg = load(
            "[drills]\nallow = [\"dependency_down\"]\ndependency_listen = \"127.0.0.1:15432\"\n\
             [[tcp]]\nname = \"db\"\naddress = \"localhost:15432\"\n",
        )
        .expect("valid");
        assert!(warnings(&cfg).is_empty(), "{:?}", warnings(&cfg));
        assert!(warnings(&load("").expect("empty")).is_empty());
    }
}
