//! The agent's configuration: the raw TOML/environment shape ([`RawConfig`]) and the
//! validated, typed [`AgentConfig`] the daemon runs with.
//!
//! Sources, later ones win: built-in defaults (the seed's thresholds), the TOML file given
//! with `--config`, the seed's variables (`CPU_ALERT_THRESHOLD`, `MEMORY_ALERT_THRESHOLD`,
//! `NAMESPACE`), then `TOCSIN_AGENT_…` variables (`__` for nesting).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::evaluate::{Direction, Rule};
use crate::settings::{self, ConfigError, Validator};
use crate::telemetry::{LogConfig, RawLog};
use tocsin_proto::limits::{MAX_ID_LEN, MAX_LABELS};

/// This node's hostname (`uname(2)`'s nodename, as `hostname` prints it), or
/// `localhost` when it is empty or not UTF-8.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

/// Default sampling interval.
pub const DEFAULT_INTERVAL: &str = "1s";
/// Shortest sampling interval: two `/proc/stat` readings closer than this give a CPU
/// usage of a few clock ticks (10 ms each), too coarse to judge.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Default heartbeat interval (current state of every check sent to the aggregator).
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "5s";
/// Longest heartbeat interval: dead-node detection waits for 3 missed heartbeats.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// Default aggregator gRPC endpoint (loopback).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7601";
/// Default largest gRPC message, bytes (4 MiB, tonic's default).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Seed: CPU warning/critical at 80 % / 95 % busy.
pub const CPU_WARNING_PCT: f64 = 80.0;
/// Seed: CPU critical level, percent busy of all cores.
pub const CPU_CRITICAL_PCT: f64 = 95.0;
/// Seed: memory warning at 85 % used (from MemAvailable).
pub const MEMORY_WARNING_PCT: f64 = 85.0;
/// Seed: memory critical at 95 % used.
pub const MEMORY_CRITICAL_PCT: f64 = 95.0;
/// Seed: process restarts warning at 3 per hour.
pub const RESTARTS_WARNING: f64 = 3.0;
/// Seed: process restarts critical at 10 per hour.
pub const RESTARTS_CRITICAL: f64 = 10.0;
/// Default `for` of the CPU and memory rules: a breach must hold this long. The seed
/// checks these every minute; a one-second spike is not an incident.
pub const DEFAULT_RESOURCE_FOR: &str = "1m";
/// Default period of full process-table reads for process watches (between them only
/// the known processes are refreshed; a death noticed by pidfd also triggers one).
pub const DEFAULT_DISCOVERY_INTERVAL: &str = "10s";
/// Seed: `RECOVERY_TIMEOUT`, the longest a recovery action may run.
pub const DEFAULT_RECOVERY_TIMEOUT: &str = "300s";

/// Shortest `cpu_step`: each step is one read of `/proc/stat`.
pub const MIN_CPU_STEP: Duration = Duration::from_millis(100);
/// Most `cpu_step`s per `interval` (the ring of readings is sized by it).
pub const MAX_CPU_STEPS: u32 = 20;
/// Steps per interval of `cpu_step = "auto"`: `interval / 5`, but no step shorter than
/// [`MIN_CPU_STEP`] (a 200 ms interval gets 2 steps of 100 ms; below 200 ms there is
/// none).
pub const AUTO_CPU_STEPS: u32 = 5;

/// Readings per interval from `cpu_step` (see [`AgentConfig::cpu_steps`]); problems
/// name the key.
fn cpu_steps(v: &mut Validator, raw: &str, interval: Duration) -> u32 {
    if raw.trim() == "auto" {
        let fit = interval.as_nanos() / MIN_CPU_STEP.as_nanos();
        let steps = u32::try_from(fit)
            .unwrap_or(u32::MAX)
            .clamp(1, AUTO_CPU_STEPS);
        // Only steps that divide the interval exactly (to the nanosecond).
        return (1..=steps)
            .rev()
            .find(|&n| interval.as_nanos().is_multiple_of(u128::from(n)))
            .unwrap_or(1);
    }
    let step = v.duration("cpu_step", raw, Duration::ZERO);
    if step.is_zero() {
        return 1;
    }
    if step < MIN_CPU_STEP {
        v.problem(
            "cpu_step",
            format!("{raw:?} is below the shortest step, 100ms (\"0s\" turns steps off)"),
        );
        return 1;
    }
    if step > interval || !interval.as_nanos().is_multiple_of(step.as_nanos()) {
        v.problem(
            "cpu_step",
            format!(
                "{raw:?} does not divide `interval` ({}) into whole steps; use \"auto\", \
                 \"0s\" (off) or e.g. {}",
                settings::format_duration(interval),
                settings::format_duration(interval / AUTO_CPU_STEPS)
            ),
        );
        return 1;
    }
    let steps = interval.as_nanos() / step.as_nanos();
    if steps > u128::from(MAX_CPU_STEPS) {
        v.problem(
            "cpu_step",
            format!(
                "{raw:?} gives {steps} steps per `interval`; at most {MAX_CPU_STEPS} (a step \
                 of at least {})",
                settings::format_duration(interval / MAX_CPU_STEPS)
            ),
        );
        return 1;
    }
    u32::try_from(steps).unwrap_or(1)
}

/// The config as written in TOML or the environment: strings for durations and
/// addresses, converted by [`RawConfig::validate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Stable identity of this agent; defaults to the hostname.
    pub agent_id: Option<String>,
    /// Sampling interval.
    pub interval: String,
    /// Time between sub-interval readings of `/proc/stat` for the `cpu` rule: `auto`,
    /// a duration dividing `interval`, or `0s` (once per interval).
    pub cpu_step: String,
    /// Heartbeat interval.
    pub heartbeat_interval: String,
    /// Directory for the spool (`spool.db`).
    pub state_dir: String,
    /// Most events the spool keeps while the aggregator is unreachable.
    pub max_spool_events: u64,
    /// Most bytes of events the spool keeps.
    pub max_spool_bytes: u64,
    /// Address of `/metrics` and `/health` (empty: off).
    pub admin_listen: String,
    /// Labels of this node (e.g. `service = "web"`), sent with every event.
    pub labels: BTreeMap<String, String>,
    /// How to reach the aggregator.
    pub aggregator: RawAggregatorLink,
    /// Resource rules.
    pub rules: RawRules,
    /// Which filesystems are checked.
    pub disks: RawDisks,
    /// Defaults shared by many checks (the seed's variables).
    pub defaults: RawDefaults,
    /// Watched processes (`[[process]]` tables).
    pub process: Vec<RawProcessWatch>,
    /// HTTP checks (`[[http]]` tables).
    pub http: Vec<crate::probe::RawHttpCheck>,
    /// TCP connect checks (`[[tcp]]` tables).
    pub tcp: Vec<crate::probe::RawTcpCheck>,
    /// Nagios-plugin checks (`[[exec]]` tables).
    pub exec: Vec<crate::nagios::RawExecCheck>,
    /// Logging.
    pub log: RawLog,
    /// Drills this node accepts from the aggregator (`[drills]`).
    pub drills: crate::drill::RawDrills,
}

/// `[defaults]`: values many checks share, set by the seed's variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDefaults {
    /// Timeout of HTTP, TCP and exec checks without their own (`HEALTH_CHECK_TIMEOUT`,
    /// seconds or a duration; seed: 10).
    pub health_check_timeout: String,
    /// Timeout of recovery actions without their own (`RECOVERY_TIMEOUT`; seed: 300).
    pub recovery_timeout: String,
    /// Error rate, percent, that is a warning for HTTP checks without their own level
    /// (`ERROR_RATE_THRESHOLD`; seed: 5).
    pub error_rate_warning: f64,
}

impl Default for RawDefaults {
    fn default() -> Self {
        RawDefaults {
            health_check_timeout: "10s".into(),
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT.into(),
            error_rate_warning: 5.0,
        }
    }
}

/// `[aggregator]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAggregatorLink {
    /// gRPC endpoints, tried in order (failover).
    pub endpoints: Vec<String>,
    /// Connect timeout per attempt.
    pub connect_timeout: String,
    /// First reconnect delay.
    pub backoff_min: String,
    /// Largest reconnect delay.
    pub backoff_max: String,
    /// Largest gRPC message sent or accepted, bytes (the aggregator has the same limit).
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval; a silent peer is dead after twice this.
    pub keepalive: String,
    /// File holding this agent's token (presented in Hello). Secrets come from files.
    pub token_file: Option<String>,
    /// PEM CA that signed the aggregator's certificate (needed for `https://`).
    pub tls_ca_file: Option<String>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<String>,
    /// PEM private key of the client certificate.
    pub tls_key_file: Option<String>,
    /// Name to verify in the aggregator's certificate, if not the endpoint's host.
    pub tls_domain: Option<String>,
}

/// `[rules]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRules {
    /// CPU busy %, all cores.
    pub cpu: RawRule,
    /// Memory used %, from MemAvailable.
    pub memory: RawRule,
    /// Swap used % (no check when the node has no swap).
    pub swap: RawRule,
    /// CPU time waiting for I/O, % of all cores.
    pub iowait: RawRule,
    /// CPU time stolen by the hypervisor, % of all cores.
    pub steal: RawRule,
    /// Busy % of each core (`cpu_core:N`); off by default (one busy core is often normal).
    pub cpu_core: RawRule,
    /// 1-minute load average per core (runnable and uninterruptible tasks / cores).
    pub load: RawRule,
    /// Disk space used %, per real filesystem (`disk:MOUNT`).
    pub disk: RawRule,
    /// Inodes used %, per real filesystem (`inodes:MOUNT`).
    pub inodes: RawRule,
}

/// `[disks]`: which filesystems get `disk:` and `inodes:` checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDisks {
    /// Only these mount points (empty: every real filesystem, pseudo, image and network
    /// filesystems skipped, each device once).
    pub include_mounts: Vec<String>,
    /// Filesystem types to skip in addition to the built-in lists (`fuse.*` patterns).
    pub exclude_fstypes: Vec<String>,
}

/// One threshold rule as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRule {
    /// Evaluate this rule at all.
    pub enabled: bool,
    /// `"above"` or `"below"`.
    pub direction: String,
    /// Warning level.
    pub warning: Option<f64>,
    /// Critical level.
    pub critical: Option<f64>,
    /// How long a breach must hold.
    #[serde(rename = "for")]
    pub hold_for: String,
    /// Clear level (hysteresis).
    pub clear: Option<f64>,
    /// How long the value must stay cleared.
    pub clear_for: String,
}

/// One `[[process]]` watch as written. Matching: by `exe` (default: `name`), or by
/// exactly one of `cmdline`, `pidfile`, `unit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProcessWatch {
    /// Name of the watch (check names `process:NAME`, …); also the executable name to
    /// match when no other matcher is given.
    pub name: String,
    /// Executable file name to match (full name, not the 15-byte `comm`).
    pub exe: Option<String>,
    /// Regular expression matched against the command line (arguments joined by spaces).
    pub cmdline: Option<String>,
    /// File holding the PID of the process.
    pub pidfile: Option<String>,
    /// systemd unit whose cgroup holds the processes (e.g. `nginx.service`).
    pub unit: Option<String>,
    /// Fewer live instances than this is critical.
    pub min: u32,
    /// More live instances than this is a warning (unset: no upper bound).
    pub max: Option<u32>,
    /// How long the shortfall must hold.
    #[serde(rename = "for")]
    pub hold_for: String,
    /// Restarts (new PIDs) in `restarts_window` that are a warning.
    pub restarts_warning: f64,
    /// Restarts in `restarts_window` that are critical.
    pub restarts_critical: f64,
    /// Window for counting restarts.
    pub restarts_window: String,
    /// CPU use of the watch (percent of one core, summed) that is a warning.
    pub cpu_warning: Option<f64>,
    /// CPU use that is critical.
    pub cpu_critical: Option<f64>,
    /// Resident memory of the watch (MiB, summed) that is a warning.
    pub rss_warning_mib: Option<f64>,
    /// Resident memory that is critical.
    pub rss_critical_mib: Option<f64>,
    /// How long a CPU or RSS breach must hold.
    pub usage_for: String,
    /// How often the full process table is read to find new matching processes.
    pub discovery_interval: String,
    /// Local recovery action when the live count goes critical.
    pub recover: Option<RawRecovery>,
}

/// A local recovery action (`recover = { command = [...], ... }`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRecovery {
    /// argv, run without a shell; event fields arrive as `TOCSIN_*` variables.
    pub command: Vec<String>,
    /// Most runs within `window` (the restart budget).
    pub max_runs: u32,
    /// The budget's window.
    pub window: String,
    /// Timeout per run (default: `RECOVERY_TIMEOUT`, else 300 s).
    pub timeout: String,
}

impl Default for RawRecovery {
    fn default() -> Self {
        RawRecovery {
            command: Vec::new(),
            max_runs: 3,
            window: "10m".into(),
            timeout: String::new(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            agent_id: None,
            interval: DEFAULT_INTERVAL.into(),
            cpu_step: "auto".into(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL.into(),
            state_dir: "/var/lib/tocsin-agent".into(),
            max_spool_events: crate::spool::DEFAULT_MAX_EVENTS,
            max_spool_bytes: crate::spool::DEFAULT_MAX_BYTES,
            admin_listen: crate::admin::DEFAULT_ADMIN_LISTEN.into(),
            labels: BTreeMap::new(),
            aggregator: RawAggregatorLink::default(),
            rules: RawRules::default(),
            disks: RawDisks::default(),
            defaults: RawDefaults::default(),
            process: Vec::new(),
            http: Vec::new(),
            tcp: Vec::new(),
            exec: Vec::new(),
            log: RawLog::default(),
            drills: crate::drill::RawDrills::default(),
        }
    }
}

impl Default for RawAggregatorLink {
    fn default() -> Self {
        RawAggregatorLink {
            endpoints: vec![DEFAULT_ENDPOINT.into()],
            connect_timeout: "5s".into(),
            backoff_min: "200ms".into(),
            backoff_max: "30s".into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive: "10s".into(),
            token_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_domain: None,
        }
    }
}

impl Default for RawRules {
    fn default() -> Self {
        RawRules {
            cpu: RawRule::above(CPU_WARNING_PCT, CPU_CRITICAL_PCT),
            memory: RawRule::above(MEMORY_WARNING_PCT, MEMORY_CRITICAL_PCT),
            swap: RawRule::above(80.0, 95.0).hold("5m"),
            iowait: RawRule::above(20.0, 50.0).hold("5m"),
            steal: RawRule::above(10.0, 30.0).hold("5m"),
            cpu_core: RawRule {
                enabled: false,
                ..RawRule::above(95.0, 100.0).hold("5m")
            },
            load: RawRule::above(2.0, 4.0).hold("5m"),
            disk: RawRule::above(85.0, 95.0),
            inodes: RawRule::above(85.0, 95.0),
        }
    }
}

impl RawRule {
    fn hold(mut self, hold_for: &str) -> Self {
        hold_for.clone_into(&mut self.hold_for);
        self
    }

    fn above(warning: f64, critical: f64) -> Self {
        RawRule {
            enabled: true,
            direction: "above".into(),
            warning: Some(warning),
            critical: Some(critical),
            hold_for: DEFAULT_RESOURCE_FOR.into(),
            clear: None,
            clear_for: "0s".into(),
        }
    }
}

impl Default for RawRule {
    fn default() -> Self {
        RawRule::above(CPU_WARNING_PCT, CPU_CRITICAL_PCT)
    }
}

impl Default for RawProcessWatch {
    fn default() -> Self {
        RawProcessWatch {
            name: String::new(),
            exe: None,
            cmdline: None,
            pidfile: None,
            unit: None,
            min: 1,
            max: None,
            hold_for: "0s".into(),
            restarts_warning: RESTARTS_WARNING,
            restarts_critical: RESTARTS_CRITICAL,
            restarts_window: "1h".into(),
            cpu_warning: None,
            cpu_critical: None,
            rss_warning_mib: None,
            rss_critical_mib: None,
            usage_for: "1m".into(),
            discovery_interval: DEFAULT_DISCOVERY_INTERVAL.into(),
            recover: None,
        }
    }
}

/// The validated agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Agent identity (config `agent_id`, else the hostname).
    pub agent_id: String,
    /// Hostname of this node (from the kernel).
    pub hostname: String,
    /// Sampling interval.
    pub interval: Duration,
    /// `/proc/stat` readings per `interval` for the `cpu` rule (config `cpu_step` =
    /// `interval / cpu_steps`); 1: once per interval (no sub-interval evaluation). The
    /// busy percent always covers the last `interval`; it is evaluated every step.
    pub cpu_steps: u32,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Spool directory.
    pub state_dir: PathBuf,
    /// Spool bounds.
    pub spool_limits: crate::spool::SpoolLimits,
    /// `/metrics` and `/health` address; `None` when off.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Aggregator endpoints, in failover order.
    pub endpoints: Vec<String>,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive interval.
    pub keepalive: Duration,
    /// Token presented in Hello (from `token_file`). Never logged.
    pub token: Option<Secret>,
    /// TLS toward the aggregator, when configured.
    pub tls: Option<ClientTls>,
    /// CPU rule, if enabled.
    pub cpu: Option<Rule>,
    /// Memory rule, if enabled.
    pub memory: Option<Rule>,
    /// Swap, iowait, steal, per-core, load-per-core, disk and inode rules, if enabled.
    pub host_rules: HostRules,
    /// Which filesystems are checked.
    pub disks: crate::host::DiskOptions,
    /// Process watches.
    pub processes: Vec<ProcessWatch>,
    /// HTTP, TCP and exec checks, in that order.
    pub active: Vec<crate::active::ActiveCheck>,
    /// Timeout of checks without their own (`defaults.health_check_timeout`).
    pub health_check_timeout: Duration,
    /// Error-rate warning level of HTTP checks without their own, percent.
    pub error_rate_warning: f64,
    /// Log settings.
    pub log: LogConfig,
    /// Drill scenarios this node runs when the aggregator asks (`[drills] allow`).
    pub drills: crate::drill::DrillPolicy,
}

/// The validated host rules beyond CPU and memory (`None` when disabled).
#[derive(Debug, Clone, Default)]
pub struct HostRules {
    /// Swap used %.
    pub swap: Option<Rule>,
    /// iowait %.
    pub iowait: Option<Rule>,
    /// steal %.
    pub steal: Option<Rule>,
    /// Busy % of each core.
    pub cpu_core: Option<Rule>,
    /// 1-minute load per core.
    pub load: Option<Rule>,
    /// Disk used %.
    pub disk: Option<Rule>,
    /// Inodes used %.
    pub inodes: Option<Rule>,
}

/// A secret string (token, key) that never shows in `Debug` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    /// The secret itself, to put on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// PEM material for TLS toward the aggregator.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA certificate(s) that sign the aggregator's certificate.
    pub ca_pem: String,
    /// Client certificate and key for mutual TLS.
    pub identity: Option<(String, Secret)>,
    /// Name to verify instead of the endpoint host.
    pub domain: Option<String>,
}

/// How a process watch finds its processes.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// Executable file name, `argv[0]` file name, or `comm` for names of ≤ 15 bytes.
    Exe(String),
    /// Regular expression on the command line (arguments joined by spaces).
    Cmdline(regex_lite::Regex),
    /// The PID in this file.
    Pidfile(PathBuf),
    /// Every process in this systemd unit's cgroup.
    Unit(String),
}

/// A validated local recovery action.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// argv (no shell).
    pub command: Vec<String>,
    /// Most runs within `window`.
    pub max_runs: u32,
    /// The budget's window.
    pub window: Duration,
    /// Timeout per run; the process group is killed after it.
    pub timeout: Duration,
}

/// A validated process watch.
#[derive(Debug, Clone)]
pub struct ProcessWatch {
    /// Name of the watch.
    pub name: String,
    /// How processes are matched.
    pub matcher: Matcher,
    /// Fewer live processes than this is critical.
    pub min: u32,
    /// Rule on the live count (below `min` is critical).
    pub count_rule: Rule,
    /// Rule on the live count above `max` (warning), when `max` is set.
    pub max_rule: Option<Rule>,
    /// Rule on restarts within `restarts_window`.
    pub restarts_rule: Rule,
    /// Window for restarts.
    pub restarts_window: Duration,
    /// Rule on CPU % of one core, summed over the watch.
    pub cpu_rule: Option<Rule>,
    /// Rule on resident memory, MiB, summed over the watch.
    pub rss_rule: Option<Rule>,
    /// How often the whole process table is read for new matches.
    pub discovery: Duration,
    /// Local recovery when the count goes critical.
    pub recover: Option<Recovery>,
}

/// Prefix of the agent's environment variables (`TOCSIN_AGENT_INTERVAL=2s`).
pub const ENV_PREFIX: &str = "TOCSIN_AGENT_";

/// The seed's own variable names, mapped onto config keys.
pub const SEED_ENV: &[(&str, &str)] = &[
    ("CPU_ALERT_THRESHOLD", "rules.cpu.warning"),
    ("MEMORY_ALERT_THRESHOLD", "rules.memory.warning"),
    ("ERROR_RATE_THRESHOLD", "defaults.error_rate_warning"),
    ("HEALTH_CHECK_TIMEOUT", "defaults.health_check_timeout"),
    ("RECOVERY_TIMEOUT", "defaults.recovery_timeout"),
    ("NAMESPACE", "labels.namespace"),
];

fn seed_env() -> Vec<settings::EnvVar> {
    settings::env_providers(ENV_PREFIX, SEED_ENV)
}

/// Loads and validates the config from `file` (optional) and the environment, with
/// `defaults` as the lowest layer.
///
/// # Errors
/// [`ConfigError`] listing every problem, each with its origin (file and line,
/// environment variable) and key.
pub fn load_with(defaults: &RawConfig, file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    let fig = settings::figment(defaults, file, seed_env())?;
    let raw: RawConfig = settings::extract(&fig)?;
    raw.validate(&fig)
}

/// [`load_with`] with the built-in defaults.
///
/// # Errors
/// See [`load_with`].
pub fn load(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    load_with(&RawConfig::default(), file)
}

/// The effective raw config (after merging), for `print-config`.
///
/// # Errors
/// See [`load_with`].
pub fn effective(file: Option<&Path>) -> Result<RawConfig, ConfigError> {
    let fig = settings::figment(&RawConfig::default(), file, seed_env())?;
    settings::extract::<RawConfig>(&fig).map(RawConfig::redacted)
}

impl RawConfig {
    /// The config with secrets it may hold inline replaced: credentials and query
    /// strings of check URLs, request header values, exec environment values.
    pub fn redacted(mut self) -> Self {
        const HIDDEN: &str = "<redacted>";
        for h in &mut self.http {
            h.url = crate::probe::redact_url(&h.url);
            for v in h.headers.values_mut() {
                HIDDEN.clone_into(v);
            }
        }
        for e in &mut self.exec {
            for v in e.env.values_mut() {
                HIDDEN.clone_into(v);
            }
        }
        self
    }

    /// Converts into typed values, reporting every problem at once.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with one [`settings::Problem`] per bad value.
    pub fn validate(self, fig: &figment::Figment) -> Result<AgentConfig, ConfigError> {
        let mut v = Validator::new(fig);
        let fallback = Duration::from_secs(1);
        let interval = v.positive_duration("interval", &self.interval, fallback);
        if interval < MIN_INTERVAL {
            v.problem(
                "interval",
                format!("{:?} is below the shortest sampling interval, 200ms (CPU usage needs two readings that far apart)", self.interval),
            );
        }
        let cpu_steps = cpu_steps(&mut v, &self.cpu_step, interval);
        let heartbeat_interval =
            v.positive_duration("heartbeat_interval", &self.heartbeat_interval, fallback);
        if heartbeat_interval > MAX_HEARTBEAT_INTERVAL {
            v.problem(
                "heartbeat_interval",
                format!(
                    "{:?} is longer than 60s: the aggregator declares a node down only after \
                     3 missed heartbeats, so a dead node would go unnoticed that long",
                    self.heartbeat_interval
                ),
            );
        }
        let connect_timeout = v.positive_duration(
            "aggregator.connect_timeout",
            &self.aggregator.connect_timeout,
            fallback,
        );
        let backoff_min = v.positive_duration(
            "aggregator.backoff_min",
            &self.aggregator.backoff_min,
            fallback,
        );
        let admin_listen = if self.admin_listen.trim().is_empty() {
            None
        } else {
            v.socket_addr("admin_listen", &self.admin_listen)
        };
        let link = &self.aggregator;
        let token = link.token_file.as_deref().and_then(|f| {
            let t = v.secret_file("aggregator.token_file", f)?;
            if t.is_empty() {
                v.problem("aggregator.token_file", format!("{f} is empty"));
                return None;
            }
            Some(Secret::new(t))
        });
        let ca_pem = link
            .tls_ca_file
            .as_deref()
            .and_then(|f| v.pem_file("aggregator.tls_ca_file", f, "CERTIFICATE"));
        let identity = match (&link.tls_cert_file, &link.tls_key_file) {
            (Some(c), Some(k)) => {
                let cert = v.pem_file("aggregator.tls_cert_file", c, "CERTIFICATE");
                let key = v.pem_file("aggregator.tls_key_file", k, "PRIVATE KEY");
                cert.zip(key).map(|(c, k)| (c, Secret::new(k)))
            }
            (None, None) => None,
            _ => {
                v.problem(
                    "aggregator.tls_cert_file",
                    "tls_cert_file and tls_key_file go together",
                );
                None
            }
        };
        let wants_tls = link.endpoints.iter().any(|e| e.starts_with("https://"));
        if wants_tls && link.tls_ca_file.is_none() {
            v.problem(
                "aggregator.tls_ca_file",
                "https:// endpoints need the CA that signed the aggregator's certificate",
            );
        }
        if !wants_tls && (link.tls_ca_file.is_some() || identity.is_some()) {
            v.problem(
                "aggregator.endpoints",
                "TLS files are set but no endpoint is https://",
            );
        }
        let tls = ca_pem.map(|ca_pem| ClientTls {
            ca_pem,
            identity,
            domain: link.tls_domain.clone(),
        });
        let keepalive = v.positive_duration(
            "aggregator.keepalive",
            &self.aggregator.keepalive,
            Duration::from_secs(10),
        );
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.aggregator.max_message_bytes) {
            v.problem(
                "aggregator.max_message_bytes",
                format!(
                    "{} is outside 65536 to 67108864",
                    self.aggregator.max_message_bytes
                ),
            );
        }
        let backoff_max = v.positive_duration(
            "aggregator.backoff_max",
            &self.aggregator.backoff_max,
            fallback,
        );
        if backoff_min > backoff_max {
            v.problem(
                "aggregator.backoff_min",
                format!(
                    "{:?} is larger than aggregator.backoff_max {:?}",
                    self.aggregator.backoff_min, self.aggregator.backoff_max
                ),
            );
        }
        if self.aggregator.endpoints.is_empty() {
            v.problem("aggregator.endpoints", "at least one endpoint is required");
        }
        for e in &self.aggregator.endpoints {
            let authority = e.split_once("://").map_or("", |(_, rest)| {
                rest.split(['/', '?', '#']).next().unwrap_or("")
            });
            if authority.contains('@') {
                v.problem(
                    "aggregator.endpoints",
                    format!(
                        "{} carries credentials, which are not used and would be logged: \
                         give the agent's token with aggregator.token_file",
                        crate::probe::redact_url(e)
                    ),
                );
            }
        }
        let endpoints: Vec<String> = self
            .aggregator
            .endpoints
            .iter()
            .filter(|e| !e.contains('@'))
            .filter_map(|e| v.endpoint("aggregator.endpoints", e))
            .collect();

        let cpu = validate_rule(&mut v, "rules.cpu", &self.rules.cpu, PERCENT);
        let memory = validate_rule(&mut v, "rules.memory", &self.rules.memory, PERCENT);
        let r = &self.rules;
        let host_rules = HostRules {
            swap: validate_rule(&mut v, "rules.swap", &r.swap, PERCENT),
            iowait: validate_rule(&mut v, "rules.iowait", &r.iowait, PERCENT),
            steal: validate_rule(&mut v, "rules.steal", &r.steal, PERCENT),
            cpu_core: validate_rule(&mut v, "rules.cpu_core", &r.cpu_core, PERCENT),
            load: validate_rule(&mut v, "rules.load", &r.load, (0.0, 1.0e6)),
            disk: validate_rule(&mut v, "rules.disk", &r.disk, PERCENT),
            inodes: validate_rule(&mut v, "rules.inodes", &r.inodes, PERCENT),
        };
        for (i, m) in self.disks.include_mounts.iter().enumerate() {
            if !Path::new(m).is_absolute() {
                v.problem(
                    &format!("disks.include_mounts.{i}"),
                    format!("{m:?} must be an absolute mount point such as \"/var\""),
                );
            }
        }
        let disks = crate::host::DiskOptions {
            include_mounts: self.disks.include_mounts.clone(),
            exclude_fstypes: self.disks.exclude_fstypes.clone(),
        };

        let recovery_timeout = v.seconds_or_duration(
            "defaults.recovery_timeout",
            &self.defaults.recovery_timeout,
            Duration::from_secs(300),
        );
        let health_check_timeout = v.seconds_or_duration(
            "defaults.health_check_timeout",
            &self.defaults.health_check_timeout,
            Duration::from_secs(10),
        );
        let e = self.defaults.error_rate_warning;
        if !(e.is_finite() && e > 0.0 && e <= 100.0) {
            v.problem(
                "defaults.error_rate_warning",
                format!("{e} is outside 0 (exclusive) to 100 percent"),
            );
        }
        let mut processes = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.process.iter().enumerate() {
            let key = format!("process.{i}");
            if let Some(w) = validate_watch(&mut v, &key, p, recovery_timeout) {
                if !seen.insert(w.name.clone()) {
                    v.problem(
                        &format!("{key}.name"),
                        format!("process {:?} is watched twice", w.name),
                    );
                }
                processes.push(w);
            }
        }

        let probes = crate::probe::validate_checks(
            &mut v,
            &self.http,
            &self.tcp,
            health_check_timeout,
            self.defaults.error_rate_warning,
        );
        let execs =
            crate::nagios::validate_exec_checks(&self.exec, &mut v, "exec", health_check_timeout);
        let active: Vec<crate::active::ActiveCheck> = probes
            .http
            .into_iter()
            .map(|h| crate::active::ActiveCheck::Http(Box::new(h)))
            .chain(probes.tcp.into_iter().map(crate::active::ActiveCheck::Tcp))
            .chain(execs.into_iter().map(crate::active::ActiveCheck::Exec))
            .collect();

        let log = crate::telemetry::validate(&mut v, &self.log);

        let hostname = host_name();
        let agent_id = match self.agent_id {
            Some(id) if id.trim().is_empty() => {
                v.problem(
                    "agent_id",
                    "must not be empty (leave it out to use the hostname)",
                );
                hostname.clone()
            }
            Some(id) => id,
            None => hostname.clone(),
        };
        if self.labels.len() > MAX_LABELS {
            v.problem(
                "labels",
                format!("{} labels, at most {MAX_LABELS}", self.labels.len()),
            );
        }
        for (k, val) in &self.labels {
            if k.is_empty() || k.len() > MAX_ID_LEN || val.len() > MAX_ID_LEN {
                v.problem(
                    &format!("labels.{k}"),
                    format!("label names must be 1 to {MAX_ID_LEN} bytes and values at most {MAX_ID_LEN}"),
                );
            }
        }
        if agent_id.chars().any(char::is_control) {
            v.problem(
                "agent_id",
                "contains control characters (newlines, terminal escapes)",
            );
        }
        for (k, val) in &self.labels {
            if k.chars().chain(val.chars()).any(char::is_control) {
                v.problem(
                    &format!("labels.{}", k.escape_default()),
                    "contains control characters",
                );
            }
        }
        if agent_id.len() > MAX_ID_LEN {
            v.problem(
                "agent_id",
                format!("{} bytes, at most {MAX_ID_LEN}", agent_id.len()),
            );
        }
        if self.max_spool_events < 100 {
            v.problem(
                "max_spool_events",
                format!("{} is too small: at least 100", self.max_spool_events),
            );
        }
        if self.max_spool_bytes < 1024 * 1024 {
            v.problem(
                "max_spool_bytes",
                format!(
                    "{} bytes is too small: at least 1048576 (1 MiB)",
                    self.max_spool_bytes
                ),
            );
        }
        if std::path::Path::new(&self.state_dir).exists()
            && !std::path::Path::new(&self.state_dir).is_dir()
        {
            v.problem(
                "state_dir",
                format!("{} exists and is not a directory", self.state_dir),
            );
        }
        if self.state_dir.trim().is_empty() {
            v.problem("state_dir", "must not be empty");
        }

        let drills = crate::drill::DrillPolicy::validate(self.drills, &mut v);
        v.finish(AgentConfig {
            agent_id,
            hostname,
            interval,
            cpu_steps,
            heartbeat_interval,
            state_dir: PathBuf::from(self.state_dir),
            spool_limits: crate::spool::SpoolLimits {
                max_events: self.max_spool_events,
                max_bytes: self.max_spool_bytes,
            },
            admin_listen,
            labels: self.labels,
            endpoints,
            connect_timeout,
            backoff_min,
            backoff_max,
            max_message_bytes: self.aggregator.max_message_bytes,
            keepalive,
            token,
            tls,
            cpu,
            memory,
            host_rules,
            disks,
            processes,
            active,
            health_check_timeout,
            error_rate_warning: self.defaults.error_rate_warning,
            log,
            drills,
        })
    }
}

/// Validates one `[[process]]` watch; `None` when its name or matcher is unusable (the
/// problems are recorded in `v`).
fn validate_watch(
    v: &mut Validator<'_>,
    key: &str,
    p: &RawProcessWatch,
    recovery_timeout: Duration,
) -> Option<ProcessWatch> {
    let fallback = Duration::from_secs(1);
    if p.name.trim().is_empty() {
        v.problem(
            &format!("{key}.name"),
            "a process watch needs a non-empty name",
        );
        return None;
    }
    // "process_restarts:" + name must fit the wire's identifier limit.
    let max_name = MAX_ID_LEN - "process_restarts:".len();
    if p.name.len() > max_name {
        v.problem(
            &format!("{key}.name"),
            format!("{} bytes, at most {max_name}", p.name.len()),
        );
    }
    if p.name.chars().any(char::is_control) {
        v.problem(
            &format!("{key}.name"),
            format!("{:?} contains control characters", p.name),
        );
    }
    let given = [
        p.exe.is_some(),
        p.cmdline.is_some(),
        p.pidfile.is_some(),
        p.unit.is_some(),
    ]
    .into_iter()
    .filter(|&b| b)
    .count();
    if given > 1 {
        v.problem(
            key,
            "give at most one of exe, cmdline, pidfile, unit (without any, the name is the executable)",
        );
    }
    let exe_name = |v: &mut Validator<'_>, field: &str, name: &str| {
        if name.contains('/') || name.contains('\0') || name.is_empty() {
            v.problem(
                &format!("{key}.{field}"),
                format!("{name:?} is not an executable file name: give e.g. \"nginx\", or use pidfile/cmdline"),
            );
        }
        Matcher::Exe(name.to_owned())
    };
    let matcher = if let Some(re) = &p.cmdline {
        if re.trim().is_empty() {
            v.problem(
                &format!("{key}.cmdline"),
                "an empty pattern matches every process: give part of the command line",
            );
        }
        match regex_lite::RegexBuilder::new(re)
            .size_limit(1 << 20)
            .build()
        {
            Ok(re) => Matcher::Cmdline(re),
            Err(e) => {
                // The regex crate's message spans lines (pattern, caret, reason): keep
                // the reason, on one line.
                let text = e.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .trim_start_matches("error: ")
                    .to_owned();
                v.problem(
                    &format!("{key}.cmdline"),
                    format!(
                        "{re:?} is not a regular expression: {}",
                        crate::event::printable(&reason)
                    ),
                );
                Matcher::Exe(p.name.clone())
            }
        }
    } else if let Some(f) = &p.pidfile {
        if !Path::new(f).is_absolute() {
            v.problem(
                &format!("{key}.pidfile"),
                format!("{f:?} must be an absolute path"),
            );
        }
        Matcher::Pidfile(PathBuf::from(f))
    } else if let Some(u) = &p.unit {
        let valid = !u.is_empty()
            && u.len() <= 256
            && u.contains('.')
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
        if !valid {
            v.problem(
                &format!("{key}.unit"),
                format!("{u:?} is not a systemd unit name such as \"nginx.service\""),
            );
        }
        Matcher::Unit(u.clone())
    } else if let Some(e) = &p.exe {
        exe_name(v, "exe", e)
    } else {
        exe_name(v, "name", &p.name)
    };
    for (what, level) in [
        ("restarts_warning", p.restarts_warning),
        ("restarts_critical", p.restarts_critical),
    ] {
        if !(level >= 1.0 && level.is_finite()) {
            v.problem(
                &format!("{key}.{what}"),
                format!("{level} restarts: must be at least 1"),
            );
        }
    }
    if p.min == 0 {
        v.problem(&format!("{key}.min"), "must be at least 1");
    }
    if let Some(max) = p.max
        && max < p.min
    {
        v.problem(
            &format!("{key}.max"),
            format!("{max} is below min {}", p.min),
        );
    }
    let hold_for = v.duration(&format!("{key}.for"), &p.hold_for, Duration::ZERO);
    let usage_for = v.duration(&format!("{key}.usage_for"), &p.usage_for, Duration::ZERO);
    let restarts_window = v.positive_duration(
        &format!("{key}.restarts_window"),
        &p.restarts_window,
        fallback,
    );
    let discovery = v.positive_duration(
        &format!("{key}.discovery_interval"),
        &p.discovery_interval,
        Duration::from_secs(10),
    );
    if discovery < Duration::from_millis(100) {
        v.problem(
            &format!("{key}.discovery_interval"),
            format!(
                "{:?} is shorter than 100ms: each discovery reads the whole process table",
                p.discovery_interval
            ),
        );
    }
    if p.restarts_warning > p.restarts_critical {
        v.problem(
            &format!("{key}.restarts_warning"),
            format!(
                "{} is above restarts_critical {}",
                p.restarts_warning, p.restarts_critical
            ),
        );
    }
    let mut usage = |fields: [&str; 2], warning: Option<f64>, critical: Option<f64>| {
        if warning.is_none() && critical.is_none() {
            return None;
        }
        for (field, level) in fields.iter().zip([warning, critical]) {
            if let Some(l) = level
                && !(l.is_finite() && l > 0.0)
            {
                v.problem(
                    &format!("{key}.{field}"),
                    format!("{l} must be a positive number"),
                );
            }
        }
        if let (Some(w), Some(c)) = (warning, critical)
            && w > c
        {
            v.problem(
                &format!("{key}.{}", fields[0]),
                format!("{w} is above the critical level {c}"),
            );
        }
        Some(Rule {
            direction: Direction::Above,
            warning,
            critical,
            hold_for: usage_for,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        })
    };
    let cpu_rule = usage(
        ["cpu_warning", "cpu_critical"],
        p.cpu_warning,
        p.cpu_critical,
    );
    let rss_rule = usage(
        ["rss_warning_mib", "rss_critical_mib"],
        p.rss_warning_mib,
        p.rss_critical_mib,
    );
    let recover = p.recover.as_ref().map(|r| {
        if r.command.is_empty() || r.command[0].trim().is_empty() {
            v.problem(
                &format!("{key}.recover.command"),
                "needs a program and its arguments, e.g. [\"systemctl\", \"restart\", \"nginx\"]",
            );
        }
        if r.max_runs == 0 {
            v.problem(&format!("{key}.recover.max_runs"), "must be at least 1");
        }
        let window = v.positive_duration(
            &format!("{key}.recover.window"),
            &r.window,
            Duration::from_secs(600),
        );
        let timeout = if r.timeout.trim().is_empty() {
            recovery_timeout
        } else {
            v.positive_duration(
                &format!("{key}.recover.timeout"),
                &r.timeout,
                recovery_timeout,
            )
        };
        Recovery {
            command: r.command.clone(),
            max_runs: r.max_runs,
            window,
            timeout,
        }
    });
    Some(ProcessWatch {
        name: p.name.clone(),
        matcher,
        min: p.min,
        count_rule: Rule {
            direction: Direction::Below,
            warning: None,
            critical: Some(f64::from(p.min)),
            hold_for,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        },
        max_rule: p.max.map(|max| Rule {
            direction: Direction::Above,
            warning: Some(f64::from(max)),
            critical: None,
            hold_for,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: false,
        }),
        restarts_rule: Rule {
            direction: Direction::Above,
            // "3 restarts per hour" is the warning: reaching the level is a breach.
            warning: Some(p.restarts_warning),
            critical: Some(p.restarts_critical),
            hold_for: Duration::ZERO,
            clear: None,
            clear_for: Duration::ZERO,
            inclusive: true,
        },
        restarts_window,
        cpu_rule,
        rss_rule,
        discovery,
        recover,
    })
}

/// The range of a percentage.
const PERCENT: (f64, f64) = (0.0, 100.0);

fn validate_rule(
    v: &mut Validator<'_>,
    key: &str,
    raw: &RawRule,
    range: (f64, f64),
) -> Option<Rule> {
    let direction = match raw.direction.as_str() {
        "above" => Direction::Above,
        "below" => Direction::Below,
        other => {
            v.problem(
                &format!("{key}.direction"),
                format!("invalid value {other:?} (expected \"above\" or \"below\")"),
            );
            Direction::Above
        }
    };
    let hold_for = v.duration(&format!("{key}.for"), &raw.hold_for, Duration::ZERO);
    let clear_for = v.duration(&format!("{key}.clear_for"), &raw.clear_for, Duration::ZERO);
    for (name, level) in [
        ("warning", raw.warning),
        ("critical", raw.critical),
        ("clear", raw.clear),
    ] {
        if let Some(l) = level
            && !(l.is_finite() && l >= range.0 && l <= range.1)
        {
            v.problem(
                &format!("{key}.{name}"),
                format!("{l} is outside {} to {}", range.0, range.1),
            );
        }
    }
    if raw.warning.is_none() && raw.critical.is_none() {
        v.problem(
            key,
            "needs a warning or a critical level (or enabled = false)",
        );
    }
    let worse = |a: f64, b: f64| match direction {
        Direction::Above => a > b,
        Direction::Below => a < b,
    };
    if let (Some(w), Some(c)) = (raw.warning, raw.critical)
        && worse(w, c)
    {
        v.problem(
            &format!("{key}.warning"),
            format!(
                "warning level {w} is beyond the critical level {c} for direction {:?} \
                 (change {key}.critical too, e.g. TOCSIN_AGENT_{}__CRITICAL)",
                raw.direction,
                key.to_uppercase().replace('.', "__")
            ),
        );
    }
    if let (Some(clear), Some(lowest)) = (raw.clear, raw.warning.or(raw.critical))
        && worse(clear, lowest)
    {
        v.problem(
            &format!("{key}.clear"),
            format!("clear level {clear} is past the alerting level {lowest}: the check could never clear"),
        );
    }
    raw.enabled.then_some(Rule {
        direction,
        warning: raw.warning,
        critical: raw.critical,
        hold_for,
        clear: raw.clear,
        clear_for,
        inclusive: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).expect("write");
        load(Some(&path))
    }

    #[test]
    fn defaults_are_the_seed_table() {
        let c = load(None).expect("defaults validate");
        let cpu = c.cpu.expect("cpu rule");
        assert_eq!((cpu.warning, cpu.critical), (Some(80.0), Some(95.0)));
        let mem = c.memory.expect("memory rule");
        assert_eq!((mem.warning, mem.critical), (Some(85.0), Some(95.0)));
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.endpoints, vec![DEFAULT_ENDPOINT.to_owned()]);
    }

    #[test]
    fn cpu_step_auto_is_a_fifth_of_the_interval_and_at_least_100ms() {
        let steps = |toml: &str| load_str(toml).expect("valid").cpu_steps;
        assert_eq!(load(None).expect("defaults").cpu_steps, 5);
        assert_eq!(steps("interval = \"10s\"\n"), 5);
        assert_eq!(steps("interval = \"300ms\"\n"), 3);
        assert_eq!(steps("interval = \"200ms\"\n"), 2);
        assert_eq!(steps("cpu_step = \"0s\"\n"), 1);
        assert_eq!(steps("cpu_step = \"100ms\"\n"), 10);
        assert_eq!(steps("cpu_step = \"1s\"\n"), 1);
        assert_eq!(steps("interval = \"2s\"\ncpu_step = \"500ms\"\n"), 4);
    }

    #[test]
    fn bad_cpu_steps_name_the_key() {
        for (toml, needle) in [
            ("cpu_step = \"50ms\"\n", "shortest step"),
            ("cpu_step = \"300ms\"\n", "does not divide"),
            ("cpu_step = \"2s\"\n", "does not divide"),
            ("cpu_step = \"often\"\n", "invalid duration"),
            ("interval = \"1m\"\ncpu_step = \"1s\"\n", "at most 20"),
        ] {
            let err = load_str(toml).expect_err(toml).to_string();
            assert!(err.contains("key `cpu_step`"), "{toml}: {err}");
            assert!(err.contains(needle), "{toml}: {err}");
        }
    }

    #[test]
    fn bad_duration_names_file_line_key_and_form() {
        let err = load_str("interval = \"5minutes\"\n")
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("agent.toml:1"), "{err}");
        assert!(err.contains("key `interval`"), "{err}");
        assert!(err.contains("\"5s\""), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[aggregator]\nendpoint = \"http://x:1\"\n")
            .expect_err("fails")
            .to_string();
        assert!(err.contains("agent.toml:2"), "{err}");
        assert!(err.contains("aggregator.endpoint"), "{err}");
        assert!(err.contains("`endpoints`"), "{err}");
    }

    #[test]
    fn every_problem_is_reported() {
        let err = load_str(
            "interval = \"x\"\nheartbeat_interval = \"0s\"\n[aggregator]\nendpoints = [\"nope\"]\n",
        )
        .expect_err("fails")
        .to_string();
        assert_eq!(err.lines().count(), 3, "{err}");
    }

    #[test]
    fn inverted_levels_rejected() {
        let err = load_str("[rules.cpu]\nwarning = 99\ncritical = 90\n")
            .expect_err("fails")
            .to_string();
        assert!(err.contains("rules.cpu.warning"), "{err}");
    }

    #[test]
    fn review_findings_are_config_errors() {
        let err = load_str(
            "heartbeat_interval = \"5m\"\n\
             [aggregator]\nendpoints = [\"http://user:hunter2@127.0.0.1:7601\"]\n\
             [[process]]\nname = \"all\"\ncmdline = \"\"\n\
             [[process]]\nname = \"big\"\nrss_warning_mib = -5.0\ndiscovery_interval = \"1ms\"\n\
             [[process]]\nname = \"re\"\ncmdline = \"([unclosed\"\n",
        )
        .expect_err("fails")
        .to_string();
        assert!(err.contains("key `heartbeat_interval`"), "{err}");
        assert!(err.contains("carries credentials"), "{err}");
        assert!(!err.contains("hunter2"), "a password never shows: {err}");
        assert!(err.contains("empty pattern"), "{err}");
        assert!(err.contains("key `process.1.rss_warning_mib`"), "{err}");
        assert!(err.contains("key `process.1.discovery_interval`"), "{err}");
        let re = err
            .lines()
            .find(|l| l.contains("process.2.cmdline"))
            .expect("regex problem");
        assert!(re.contains("unclosed"), "{re}");
    }
}
