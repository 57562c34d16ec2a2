//! Packaging: the systemd units pass `systemd-analyze verify`; both daemons speak the
//! `sd_notify` protocol to a real socket (READY after they are really ready, watchdog
//! pings, STOPPING and exit 0 on SIGTERM, SIGHUP survived); the Debian packages build,
//! install with `dpkg -i`, run as their system users and purge cleanly; every
//! Kubernetes manifest validates offline and its configs pass `check-config`.
//!
//! Tools come from `tests/run.sh` (cargo-deb, kubernetes-validate; systemd-analyze and
//! dpkg are part of Debian). The Debian test installs packages on this machine and
//! therefore needs root (as CI has); it purges them again, also when it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use tocsin_e2e::{Daemon, PATIENCE, bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A Python tool: from the virtualenv `tests/run.sh` makes (`target/tools/venv`) when
/// there, else from `PATH`.
fn python_tool(name: &str) -> String {
    let venv = repo().join("target/tools/venv/bin").join(name);
    if venv.exists() {
        venv.to_string_lossy().into_owned()
    } else {
        name.to_owned()
    }
}

/// Runs `program args`; returns its output, failing with a hint when it is missing.
fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program}: install it with `bash tests/run.sh` (see there)")
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `program args` and fails unless it exits 0; returns stdout and stderr.
fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    let all = text(&out);
    ensure!(
        out.status.success(),
        "{program} {args:?} failed with {}:\n{all}",
        out.status
    );
    Ok(all)
}

/// The `sd_notify` socket of a service manager: a Unix datagram socket whose path is
/// given to the daemon as `NOTIFY_SOCKET`.
struct NotifySocket {
    path: PathBuf,
    sock: tokio::net::UnixDatagram,
    log: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Result<Self> {
        let path = dir.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        Ok(NotifySocket {
            path,
            sock,
            log: Vec::new(),
        })
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap_or_default()
    }

    /// Waits for the next message that has `line` as one of its lines; returns it.
    async fn wait_for(&mut self, line: &str) -> Result<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(received) = tokio::time::timeout(left, self.sock.recv(&mut buf)).await else {
                bail!(
                    "no {line:?} within {PATIENCE:?}; messages so far: {:?}",
                    self.log
                );
            };
            let msg = String::from_utf8_lossy(&buf[..received?]).into_owned();
            self.log.push(msg.clone());
            if msg.lines().any(|l| l == line) {
                return Ok(msg);
            }
        }
    }
}

fn signal(daemon: &Daemon, sig: &str) -> Result<()> {
    run_ok("kill", &[&format!("-{sig}"), &daemon.pid().to_string()]).map(drop)
}

/// Copies `unit` from `systemd/` into `dir` with `/usr/bin/NAME` replaced by the
/// freshly built binary, so `systemd-analyze verify` finds its executables.
fn unit_with_built_binaries(dir: &Path, unit: &str) -> Result<PathBuf> {
    let mut text = std::fs::read_to_string(repo().join("systemd").join(unit))?;
    for name in ["tocsin-agent", "tocsin-aggregator"] {
        let built = bin(name);
        text = text.replace(
            &format!("/usr/bin/{name} "),
            &format!("{} ", built.display()),
        );
    }
    let path = dir.join(unit);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `systemd-analyze verify` exits 0 even for unknown keys: a unit passes only with no
/// complaint at all about it.
fn verify_units(units: &[&Path]) -> Result<String> {
    let mut args = vec!["verify"];
    args.extend(units.iter().map(|u| u.to_str().unwrap_or_default()));
    let out = run("systemd-analyze", &args)?;
    let all = text(&out);
    let complaints: Vec<&str> = all.lines().filter(|l| l.contains("tocsin")).collect();
    ensure!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify {units:?}: {}:\n{all}",
        out.status
    );
    Ok(all)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = unit_with_built_binaries(dir.path(), "tocsin-agent.service")?;
    let aggregator = unit_with_built_binaries(dir.path(), "tocsin-aggregator.service")?;
    verify_units(&[&agent, &aggregator])?;

    // The check has teeth: a misspelt key is reported.
    let broken = dir.path().join("tocsin-broken.service");
    let text = std::fs::read_to_string(&agent)?.replace("Restart=on-failure", "Restrat=no");
    std::fs::write(&broken, text)?;
    let err = verify_units(&[&broken]).expect_err("a misspelt key must be reported");
    assert!(format!("{err:#}").contains("Restrat"), "{err:#}");
    Ok(())
}

#[test]
fn units_run_check_config_as_exec_start_pre_and_use_the_state_directories() -> Result<()> {
    for (daemon, config, key, dir) in [
        ("tocsin-agent", "agent.toml", "state_dir", "tocsin-agent"),
        (
            "tocsin-aggregator",
            "aggregator.toml",
            "data_dir",
            "tocsin-aggregator",
        ),
    ] {
        let unit = std::fs::read_to_string(repo().join(format!("systemd/{daemon}.service")))?;
        for line in [
            "Type=notify".to_owned(),
            format!("ExecStartPre=/usr/bin/{daemon} --config /etc/tocsin/{config} check-config"),
            format!("ExecStart=/usr/bin/{daemon} --config /etc/tocsin/{config}"),
            format!("StateDirectory={dir}"),
            format!("EnvironmentFile=-/etc/default/{daemon}"),
            "Restart=on-failure".to_owned(),
        ] {
            assert!(unit.lines().any(|l| l == line), "{daemon}: no {line}");
        }
        let pkg = if daemon == "tocsin-agent" {
            "agent"
        } else {
            "aggregator"
        };
        let installed =
            std::fs::read_to_string(repo().join(format!("packaging/deb/{pkg}/{config}")))?;
        assert!(
            installed.contains(&format!("{key} = \"/var/lib/{dir}\"")),
            "{config}: {key} must be the unit's StateDirectory"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_notifies_ready_once_listening_then_watchdog_and_stopping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "listen_http = \"127.0.0.1:0\"\nlisten_grpc = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )?;
    let mut daemon = Daemon::spawn_with_env(
        "tocsin-aggregator",
        &bin("tocsin-aggregator"),
        &["--config", config.to_str().unwrap_or_default()],
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        dir.path(),
    )?;

    let ready = notify.wait_for("READY=1").await?;
    // READY carries the bound addresses; the API answers at once, without retrying.
    let http = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .with_context(|| format!("no http= in {ready:?}"))?;
    tocsin_e2e::init();
    let health: serde_json::Value = reqwest::get(format!("http://{http}/health"))
        .await?
        .json()
        .await?;
    assert_eq!(health["status"], "ok");

    notify.wait_for("WATCHDOG=1").await?;
    notify.wait_for("WATCHDOG=1").await?;

    // SIGHUP does not reload and does not kill: it is logged, and the pings go on.
    signal(&daemon, "HUP")?;
    daemon
        .wait_for_output("configuration is not reloaded")
        .await?;
    notify.wait_for("WATCHDOG=1").await?;

    assert_eq!(daemon.stop("TERM")?, Some(0), "exit code after SIGTERM");
    notify.wait_for("STOPPING=1").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notifies_ready_with_spool_open_then_watchdog_probe_and_stopping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    // Port 9 (discard) on loopback: nothing listens, the agent spools and retries.
    std::fs::write(
        &config,
        format!(
            "agent_id = \"notify-test\"\ninterval = \"250ms\"\nstate_dir = \"{}\"\n\
             [aggregator]\nendpoints = [\"http://127.0.0.1:9\"]\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n",
            state.display()
        ),
    )?;
    let config_arg = config.to_str().unwrap_or_default();
    let agent = bin("tocsin-agent");
    let agent_str = agent.to_str().unwrap_or_default();

    // No agent ran yet: the liveness probe fails.
    let out = run(agent_str, &["--config", config_arg, "probe"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    let mut daemon = Daemon::spawn_with_env(
        "tocsin-agent",
        &agent,
        &["--config", config_arg],
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        dir.path(),
    )?;
    notify.wait_for("READY=1").await?;
    assert!(
        state.join("spool.db").exists(),
        "READY before the spool was open"
    );
    notify.wait_for("WATCHDOG=1").await?;
    notify.wait_for("WATCHDOG=1").await?;
    let alive = run_ok(agent_str, &["--config", config_arg, "probe"])?;
    assert!(alive.contains("alive"), "{alive}");

    signal(&daemon, "HUP")?;
    daemon
        .wait_for_output("configuration is not reloaded")
        .await?;
    notify.wait_for("WATCHDOG=1").await?;

    assert_eq!(daemon.stop("TERM")?, Some(0), "exit code after SIGTERM");
    notify.wait_for("STOPPING=1").await?;
    Ok(())
}

/// Purges the packages when dropped, so a failed test leaves nothing installed.
struct Installed;

const PACKAGES: [&str; 2] = ["tocsin-agent", "tocsin-aggregator"];

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
    }
}

fn is_root() -> Result<bool> {
    Ok(run_ok("id", &["-u"])?.trim() == "0")
}

fn package_status(pkg: &str) -> String {
    run("dpkg-query", &["-W", "-f=${db:Status-Abbrev}", pkg])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Builds both packages from the binaries `cargo build` made (dev profile: the test is
/// about the packaging, and a release build would double the CI time; release packages
/// are built with plain `cargo deb -p …`, see packaging/README.md).
fn build_debs(out: &Path) -> Result<Vec<PathBuf>> {
    let mut debs = Vec::new();
    for pkg in PACKAGES {
        let output = Command::new("cargo")
            .current_dir(repo())
            .args([
                "deb",
                "-p",
                pkg,
                "--no-build",
                "--profile",
                "dev",
                "--fast",
                "-o",
            ])
            .arg(out)
            .output()
            .context("cargo deb: install it with `bash tests/run.sh`")?;
        ensure!(
            output.status.success(),
            "cargo deb -p {pkg} failed:\n{}",
            text(&output)
        );
        let deb = String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|l| l.trim_end().ends_with(".deb"))
            .map(|l| PathBuf::from(l.trim()))
            .with_context(|| format!("no .deb path in the output of cargo deb -p {pkg}"))?;
        debs.push(deb);
    }
    Ok(debs)
}

/// Starts the installed `program` as the system `user` (like the unit's `User=`), with
/// a notify socket, and waits for READY=1; then SIGTERM must end it with exit 0.
async fn run_installed_as(
    user: &str,
    program: &str,
    env: &[(&str, &str)],
    dir: &Path,
) -> Result<String> {
    let mut notify = NotifySocket::bind(dir)?;
    // The service user must reach the socket, as it reaches systemd's.
    run_ok("chmod", &["0755", dir.to_str().unwrap_or_default()])?;
    run_ok("chmod", &["0666", notify.path()])?;
    let mut all_env = vec![("NOTIFY_SOCKET", notify.path())];
    all_env.extend_from_slice(env);
    let reuid = format!("--reuid={user}");
    let regid = format!("--regid={user}");
    let config = if program.ends_with("agent") {
        "/etc/tocsin/agent.toml"
    } else {
        "/etc/tocsin/aggregator.toml"
    };
    let mut daemon = Daemon::spawn_with_env(
        user,
        Path::new("setpriv"),
        &[&reuid, &regid, "--init-groups", program, "--config", config],
        &all_env,
        dir,
    )?;
    let ready = notify.wait_for("READY=1").await?;
    assert_eq!(
        daemon.stop("TERM")?,
        Some(0),
        "{program}: exit after SIGTERM"
    );
    notify.wait_for("STOPPING=1").await?;
    Ok(ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_packages_install_run_and_purge() -> Result<()> {
    ensure!(
        is_root()?,
        "this test installs .deb packages with dpkg and needs root (CI runs as root)"
    );
    let work = tempfile::tempdir()?;
    let debs = build_debs(work.path())?;

    // The test owns these package names on this machine: leftovers of an interrupted
    // run are purged first.
    drop(Installed);
    let guard = Installed;
    let deb_args: Vec<&str> = debs
        .iter()
        .map(|d| d.to_str().unwrap_or_default())
        .collect();
    let mut install = vec!["-i"];
    install.extend(&deb_args);
    run_ok("dpkg", &install)?;
    // Installing again (an upgrade to the same version) works: the scripts are idempotent.
    run_ok("dpkg", &install)?;
    for pkg in PACKAGES {
        assert_eq!(package_status(pkg), "ii", "{pkg} not installed");
    }

    let version = env!("CARGO_PKG_VERSION");
    for program in ["tocsin-agent", "tocsin-aggregator", "tocsin"] {
        let out = run_ok(&format!("/usr/bin/{program}"), &["--version"])?;
        assert_eq!(out.trim(), format!("{program} {version}"));
    }
    run_ok(
        "/usr/bin/tocsin-agent",
        &["--config", "/etc/tocsin/agent.toml", "check-config"],
    )?;
    run_ok(
        "/usr/bin/tocsin-aggregator",
        &["--config", "/etc/tocsin/aggregator.toml", "check-config"],
    )?;

    // Conffiles, users, state directories, units, enabled for boot.
    let conffiles = run_ok(
        "dpkg-query",
        &[
            "-W",
            "-f=${Conffiles}\n",
            "tocsin-agent",
            "tocsin-aggregator",
        ],
    )?;
    for f in [
        "/etc/tocsin/agent.toml",
        "/etc/default/tocsin-agent",
        "/etc/tocsin/aggregator.toml",
        "/etc/default/tocsin-aggregator",
    ] {
        assert!(conffiles.contains(f), "{f} is not a conffile:\n{conffiles}");
    }
    for user in PACKAGES {
        run_ok("getent", &["passwd", user])?;
        let owner = run_ok("stat", &["-c", "%U:%G %a", &format!("/var/lib/{user}")])?;
        assert_eq!(owner.trim(), format!("{user}:{user} 750"));
        assert!(
            Path::new(&format!(
                "/etc/systemd/system/multi-user.target.wants/{user}.service"
            ))
            .exists(),
            "{user}.service not enabled"
        );
    }
    let secret = run_ok("stat", &["-c", "%U:%G %a", "/etc/tocsin/aggregator.toml"])?;
    assert_eq!(secret.trim(), "root:tocsin-aggregator 640");
    verify_units(&[
        Path::new("/usr/lib/systemd/system/tocsin-agent.service"),
        Path::new("/usr/lib/systemd/system/tocsin-aggregator.service"),
    ])?;

    // The installed daemons run as their users with the shipped configs. The aggregator's
    // ports are moved to port 0 through the environment (as /etc/default would), so the
    // test does not collide with anything on 7600/7601.
    let agent_dir = tempfile::tempdir()?;
    run_installed_as(
        "tocsin-agent",
        "/usr/bin/tocsin-agent",
        &[
            ("TOCSIN_AGENT_INTERVAL", "250ms"),
            // Port 9 on loopback: whatever else runs on this machine's 7601 is left alone.
            (
                "TOCSIN_AGENT_AGGREGATOR__ENDPOINTS",
                "[\"http://127.0.0.1:9\"]",
            ),
        ],
        agent_dir.path(),
    )
    .await?;
    assert!(Path::new("/var/lib/tocsin-agent/spool.db").exists());
    let agg_dir = tempfile::tempdir()?;
    let ready = run_installed_as(
        "tocsin-aggregator",
        "/usr/bin/tocsin-aggregator",
        &[
            ("TOCSIN_AGGREGATOR_LISTEN_HTTP", "127.0.0.1:0"),
            ("TOCSIN_AGGREGATOR_LISTEN_GRPC", "127.0.0.1:0"),
        ],
        agg_dir.path(),
    )
    .await?;
    assert!(ready.contains("STATUS=listening"), "{ready}");
    assert!(Path::new("/var/lib/tocsin-aggregator/tocsin.db").exists());

    // Remove keeps the conffiles; purge removes everything but the system users.
    let mut remove = vec!["-r"];
    remove.extend(PACKAGES);
    run_ok("dpkg", &remove)?;
    for pkg in PACKAGES {
        assert_eq!(package_status(pkg), "rc", "{pkg} after dpkg -r");
        assert!(!Path::new(&format!("/usr/bin/{pkg}")).exists());
    }
    assert!(!Path::new("/usr/bin/tocsin").exists());
    assert!(
        Path::new("/etc/tocsin/agent.toml").exists(),
        "conffile kept"
    );
    let mut purge = vec!["--purge"];
    purge.extend(PACKAGES);
    run_ok("dpkg", &purge)?;
    for pkg in PACKAGES {
        assert_eq!(package_status(pkg), "", "{pkg} after purge");
        for gone in [
            format!("/var/lib/{pkg}"),
            format!("/etc/default/{pkg}"),
            format!("/usr/lib/systemd/system/{pkg}.service"),
            format!("/etc/systemd/system/multi-user.target.wants/{pkg}.service"),
        ] {
            assert!(!Path::new(&gone).exists(), "{gone} left after purge");
        }
    }
    assert!(
        !Path::new("/etc/tocsin").exists(),
        "/etc/tocsin left after purge"
    );
    drop(guard);
    Ok(())
}

/// Every key of the reference examples appears (set or commented) in the configs the
/// packages install, so the installed files stay documented as the examples grow.
#[test]
fn installed_configs_document_every_example_key() -> Result<()> {
    fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    match v {
                        toml::Value::Table(_) | toml::Value::Array(_) => {
                            leaves(k, v, out);
                        }
                        _ => out.push(k.clone()),
                    }
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    leaves(prefix, item, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    for (example, installed) in [
        (
            "packaging/examples/agent.toml",
            "packaging/deb/agent/agent.toml",
        ),
        (
            "packaging/examples/aggregator.toml",
            "packaging/deb/aggregator/aggregator.toml",
        ),
    ] {
        let example: toml::Value = toml::from_str(&std::fs::read_to_string(repo().join(example))?)?;
        let text = std::fs::read_to_string(repo().join(installed))?;
        let mut keys = Vec::new();
        leaves("", &example, &mut keys);
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !text.contains(&format!("{k} =")))
            .collect();
        assert!(missing.is_empty(), "{installed} lacks {missing:?}");
    }
    Ok(())
}

fn kubernetes_dir() -> PathBuf {
    repo().join("packaging/kubernetes")
}

fn manifests() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

#[test]
fn kubernetes_manifests_validate_offline() -> Result<()> {
    let files = manifests()?;
    let resources: Vec<&PathBuf> = files
        .iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    ensure!(resources.len() >= 6, "too few manifests: {files:?}");
    let mut args = vec!["--strict"];
    args.extend(resources.iter().map(|p| p.to_str().unwrap_or_default()));
    let out = run_ok(&python_tool("kubernetes-validate"), &args)?;
    for kind in [
        "daemonset/tocsin-agent",
        "statefulset/tocsin-aggregator",
        "service/tocsin-aggregator",
        "configmap/tocsin-agent-config",
        "configmap/tocsin-aggregator-config",
        "secret/tocsin-secrets",
        "namespace/tocsin",
    ] {
        assert!(
            out.contains(&format!("passed for resource {kind} ")),
            "{kind}:\n{out}"
        );
    }
    assert!(!out.contains("ERROR") && !out.contains("WARN"), "{out}");

    // The kustomization lists every manifest, and only existing ones.
    let kustomization = std::fs::read_to_string(kubernetes_dir().join("kustomization.yaml"))?;
    let listed: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
        .collect();
    let mut names: Vec<String> = resources
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    let mut listed_sorted: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
    listed_sorted.sort();
    assert_eq!(listed_sorted, names, "kustomization resources");
    Ok(())
}

/// The TOML in the ConfigMaps is a valid config for the daemons (extracted with PyYAML,
/// which kubernetes-validate brings along).
#[test]
fn kubernetes_configmaps_pass_check_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (daemon, file, key) in [
        ("tocsin-agent", "agent-configmap.yaml", "agent.toml"),
        (
            "tocsin-aggregator",
            "aggregator-configmap.yaml",
            "aggregator.toml",
        ),
    ] {
        let manifest = kubernetes_dir().join(file);
        let script = format!(
            "import sys, yaml; sys.stdout.write(yaml.safe_load(open(sys.argv[1]))['data']['{key}'])"
        );
        let toml = run_ok(
            &python_tool("python3"),
            &["-c", &script, manifest.to_str().unwrap_or_default()],
        )?;
        let path = dir.path().join(key);
        std::fs::write(&path, &toml)?;
        let bin = bin(daemon);
        let out = run(
            bin.to_str().unwrap_or_default(),
            &[
                "--config",
                path.to_str().unwrap_or_default(),
                "check-config",
            ],
        )?;
        assert!(out.status.success(), "{file}: {}", text(&out));
        // Inside the pod the aggregator must listen beyond loopback, explicitly.
        if daemon == "tocsin-aggregator" {
            assert!(toml.contains("listen_grpc = \"0.0.0.0:7601\""), "{toml}");
        }
    }
    Ok(())
}
