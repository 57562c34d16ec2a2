//! Bad config files, one mistake each: every binary refuses them at start with exit
//! code 64 and a message naming the file (and line), the key and the accepted form.

use std::path::PathBuf;
use std::process::Command;

use tocsin_e2e::bin;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bad")
        .join(name)
}

/// (binary, fixture, substrings the message must contain)
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "tocsin-agent",
        "agent_unknown_key.toml",
        &[
            "agent_unknown_key.toml:3",
            "key `aggregator.endpoint`",
            "unknown key",
            "`endpoints`",
        ],
    ),
    (
        "tocsin-agent",
        "agent_bad_duration.toml",
        &[
            "agent_bad_duration.toml:1",
            "key `interval`",
            "\"5minutes\"",
            "\"500ms\", \"5s\"",
        ],
    ),
    (
        "tocsin-agent",
        "agent_bad_endpoint.toml",
        &[
            "agent_bad_endpoint.toml:2",
            "key `aggregator.endpoints`",
            "\"127.0.0.1:7601\"",
            "http://HOST:PORT",
        ],
    ),
    (
        "tocsin-agent",
        "agent_inverted_levels.toml",
        &[
            "agent_inverted_levels.toml:2",
            "key `rules.cpu.warning`",
            "beyond the critical level 90",
        ],
    ),
    (
        "tocsin-agent",
        "agent_wrong_type.toml",
        &[
            "agent_wrong_type.toml:1",
            "key `interval`",
            "expected a string",
        ],
    ),
    (
        "tocsin-agent",
        "agent_bad_cpu_step.toml",
        &[
            "agent_bad_cpu_step.toml:2",
            "key `cpu_step`",
            "\"300ms\"",
            "does not divide `interval` (1s)",
            "\"auto\"",
        ],
    ),
    (
        "tocsin-agent",
        "agent_syntax.toml",
        &["agent_syntax.toml", "line 1, column 15"],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_listen.toml",
        &[
            "aggregator_bad_listen.toml:1",
            "key `listen_http`",
            "\"localhost:7600\"",
            "IP:PORT",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_webhook.toml",
        &[
            "aggregator_bad_webhook.toml:3",
            "key `notify.webhook.0.url`",
            "ftp://",
            "http://",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_read_only.toml",
        &[
            "aggregator_bad_read_only.toml:2",
            "key `auth.read_only`",
            "\"everyone\"",
            "\"public\" or \"login\"",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_user_password.toml",
        &[
            "aggregator_bad_user_password.toml",
            "key `auth.user.0.password_file`",
            "/nonexistent/tocsin-alice.password",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_repost.toml",
        &[
            "aggregator_bad_repost.toml:5",
            "key `notify.webhook.0.repost_interval`",
            "\"500ms\"",
            "minimum of 1s",
            "resolve_timeout",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_retry.toml",
        &[
            "aggregator_bad_retry.toml:2",
            "key `notify.retry_min`",
            "\"10 seconds\"",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_unknown_key.toml",
        &[
            "aggregator_unknown_key.toml:2",
            "key `listen_htpp`",
            "`listen_http`",
        ],
    ),
    (
        "tocsin-agent",
        "agent_interval_too_short.toml",
        &["agent_interval_too_short.toml:1", "key `interval`", "200ms"],
    ),
    (
        "tocsin-agent",
        "agent_negative_threshold.toml",
        &[
            "agent_negative_threshold.toml:2",
            "key `rules.cpu.warning`",
            "outside 0 to 100",
        ],
    ),
    (
        "tocsin-agent",
        "agent_process_path.toml",
        &[
            "agent_process_path.toml:2",
            "key `process.0.name`",
            "file name",
        ],
    ),
    (
        "tocsin-agent",
        "agent_duplicate_process.toml",
        &[
            "agent_duplicate_process.toml:5",
            "key `process.1.name`",
            "watched twice",
        ],
    ),
    (
        "tocsin-agent",
        "agent_bad_log_level.toml",
        &[
            "agent_bad_log_level.toml:2",
            "key `log.level`",
            "\"warnings\"",
        ],
    ),
    (
        "tocsin-agent",
        "agent_bad_uri.toml",
        &[
            "agent_bad_uri.toml:2",
            "key `aggregator.endpoints`",
            "http://HOST:PORT",
        ],
    ),
    (
        "tocsin-agent",
        "agent_huge_duration.toml",
        &[
            "agent_huge_duration.toml:2",
            "key `aggregator.backoff_max`",
            "365d",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_same_ports.toml",
        &[
            "aggregator_same_ports.toml:2",
            "key `listen_grpc`",
            "different ports",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_email_tls.toml",
        &[
            "aggregator_bad_email_tls.toml:3",
            "key `notify.email.0.tls`",
            "\"ssl\"",
            "\"starttls\"",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_email_to.toml",
        &[
            "aggregator_bad_email_to.toml",
            "key `notify.email.0.to.0`",
            "\"ops at example.org\"",
            "Ops <ops@example.org>",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_empty_group_by.toml",
        &[
            "aggregator_empty_group_by.toml:2",
            "key `correlation.group_by`",
            "at least one name",
            "[\"node\", \"check\"] to group nothing",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_sweep_interval.toml",
        &[
            "aggregator_sweep_interval.toml:2",
            "key `paging_sweep_interval`",
            "\"5m\"",
            "outside 100ms to 60s",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_storm_window.toml",
        &[
            "aggregator_storm_window.toml:3",
            "key `notify.storm_window`",
            "\"48h\"",
            "maximum of 24h",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_repeat_interval.toml",
        &[
            "aggregator_repeat_interval.toml:6",
            "key `route.0.repeat_interval`",
            "\"5s\"",
            "minimum of 10s",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_bad_route_severity.toml",
        &[
            "aggregator_bad_route_severity.toml:5",
            "key `route.0.severity`",
            "\"P5\"",
            "\"P1\", \"P2\", \"P3\" or \"P4\"",
        ],
    ),
    (
        "tocsin-aggregator",
        "aggregator_secret_on_slack.toml",
        &[
            "aggregator_secret_on_slack.toml:5",
            "key `notify.webhook.0.secret_file`",
            "only for kind = \"generic\"",
        ],
    ),
];

fn run(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin(binary))
        .args(args)
        .env_remove("TOCSIN_AGENT_CONFIG")
        .env_remove("TOCSIN_AGGREGATOR_CONFIG")
        .output()
        .expect("run binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_bad_config_is_refused_with_a_message_naming_file_key_and_form() {
    for (binary, file, expected) in CASES {
        let path = fixture(file);
        let path = path.to_str().expect("utf-8 path");
        for command in ["check-config", "run"] {
            let (code, stderr) = run(binary, &["--config", path, command]);
            assert_eq!(
                code,
                Some(64),
                "{binary} {command} {file}: exit code, stderr:\n{stderr}"
            );
            for needle in *expected {
                assert!(
                    stderr.contains(needle),
                    "{binary} {command} {file}: missing {needle:?} in:\n{stderr}"
                );
            }
        }
    }
}

#[test]
fn several_mistakes_are_reported_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "interval = \"fast\"\nheartbeat_interval = \"0s\"\n[aggregator]\nendpoints = [\"nope\"]\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-agent",
        &["--config", path.to_str().expect("utf-8"), "check-config"],
    );
    assert_eq!(code, Some(64));
    for key in [
        "key `interval`",
        "key `heartbeat_interval`",
        "key `aggregator.endpoints`",
    ] {
        assert!(stderr.contains(key), "missing {key} in:\n{stderr}");
    }
}

/// Wrong types and unknown keys (which serde reports one at a time) are all reported
/// together too, each with its file and line, in the agent's and the aggregator's config.
#[test]
fn several_type_mistakes_are_reported_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        "agent_id = \"x\"\ninterval = 5\nbogus = 1\n[aggregator]\nendpoints = \"http://127.0.0.1:1\"\n\
         [[process]]\nname = \"a\"\nmin = -1\n[[process]]\nname = 7\nmax = \"two\"\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-agent",
        &["--config", agent.to_str().expect("utf-8"), "check-config"],
    );
    assert_eq!(code, Some(64));
    for want in [
        "agent.toml:2: key `interval`: invalid type",
        "agent.toml:3: key `bogus`: unknown key",
        "agent.toml:5: key `aggregator.endpoints`: invalid type",
        "agent.toml:8: key `process.0.min`",
        "agent.toml:10: key `process.1.name`: invalid type",
        "agent.toml:11: key `process.1.max`: invalid type",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
    let aggregator = dir.path().join("aggregator.toml");
    std::fs::write(
        &aggregator,
        // A number is seconds for a duration key (`retry_min = 1` is fine); a boolean is not.
        "listen_http = 7600\nnode_timeout = []\n[notify]\nretry_min = true\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-aggregator",
        &[
            "--config",
            aggregator.to_str().expect("utf-8"),
            "check-config",
        ],
    );
    assert_eq!(code, Some(64));
    for want in [
        "aggregator.toml:1: key `listen_http`",
        "aggregator.toml:2: key `node_timeout`",
        "aggregator.toml:4: key `notify.retry_min`",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

/// Edge values that are fine pass: a storm window of "0s" when the guard is off
/// (budget 0), a route severity in lower case (like `[response_targets]` keys), the
/// bounds of the paging sweep and of a repeat. And the one mistake in the fixture with
/// "p1" and "P5" is only the "P5".
#[test]
fn edge_values_that_are_fine_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("aggregator.toml");
    std::fs::write(
        &path,
        "paging_sweep_interval = \"100ms\"\n[notify]\nconsole = true\nstorm_budget = 0\n\
         storm_window = \"0s\"\n[[route]]\nseverity = [\"p1\", \"P2\"]\nchannels = [\"console\"]\n\
         repeat_interval = \"10s\"\n[[route]]\nchannels = [\"console\"]\n[correlation]\n\
         group_by = [\"node\", \"check\"]\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-aggregator",
        &["--config", path.to_str().expect("utf-8"), "check-config"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (_, stderr) = run(
        "tocsin-aggregator",
        &[
            "--config",
            fixture("aggregator_bad_route_severity.toml")
                .to_str()
                .expect("utf-8"),
            "check-config",
        ],
    );
    assert!(!stderr.contains("\"p1\""), "p1 is accepted: {stderr}");
    std::fs::write(
        &path,
        "paging_sweep_interval = \"61s\"\n[notify]\nstorm_budget = 3\nstorm_window = \"0s\"\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-aggregator",
        &["--config", path.to_str().expect("utf-8"), "check-config"],
    );
    assert_eq!(code, Some(64), "{stderr}");
    for want in [
        "key `paging_sweep_interval`: \"61s\" is outside",
        "key `notify.storm_window`: must be greater than zero",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

/// Regression: a route naming an unknown channel listed the known channels with
/// repeats ("(channels: console, console)") when a name was configured twice.
#[test]
fn unknown_channel_error_lists_each_channel_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("aggregator.toml");
    std::fs::write(
        &path,
        "[notify]\nconsole = true\n[[notify.webhook]]\nname = \"console\"\n\
         url = \"http://127.0.0.1:9099/hook\"\n[[notify.webhook]]\nname = \"ops\"\n\
         url = \"http://127.0.0.1:9099/ops\"\n[[notify.webhook]]\nname = \"ops\"\n\
         url = \"http://127.0.0.1:9099/ops2\"\n[[route]]\nchannels = [\"nope\"]\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "tocsin-aggregator",
        &["--config", path.to_str().expect("utf-8"), "check-config"],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("unknown channel \"nope\" (channels: console, ops)"),
        "{stderr}"
    );
    assert!(stderr.contains("is used twice"), "{stderr}");
}

#[test]
fn missing_config_file_is_a_usage_error() {
    let (code, stderr) = run(
        "tocsin-aggregator",
        &["--config", "/nonexistent/tocsin.toml", "check-config"],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("/nonexistent/tocsin.toml"), "{stderr}");
}

#[test]
fn defaults_and_documented_examples_are_valid() {
    assert_eq!(run("tocsin-agent", &["check-config"]).0, Some(0));
    assert_eq!(run("tocsin-aggregator", &["check-config"]).0, Some(0));
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples");
    for (binary, file) in [
        ("tocsin-agent", "agent.toml"),
        ("tocsin-aggregator", "aggregator.toml"),
    ] {
        let path = examples.join(file);
        let (code, stderr) = run(
            binary,
            &["--config", path.to_str().expect("utf-8"), "check-config"],
        );
        assert_eq!(code, Some(0), "{}: {stderr}", path.display());
    }
}

#[test]
fn environment_overrides_and_strings_stay_strings() {
    let out = Command::new(bin("tocsin-agent"))
        .arg("print-config")
        .env("TOCSIN_AGENT_AGENT_ID", "1234")
        .env("CPU_ALERT_THRESHOLD", "70")
        .env("TOCSIN_AGENT_LABELS__VERSION", "1.10")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agent_id = \"1234\""), "{text}");
    assert!(text.contains("version = \"1.10\""), "{text}");
    assert!(text.contains("warning = 70"), "{text}");

    let bad = Command::new(bin("tocsin-agent"))
        .arg("check-config")
        .env("TOCSIN_AGENT_RULES__CPU__WARNING", "lots")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(64));
    assert!(
        stderr.contains("environment variable TOCSIN_AGENT_RULES__CPU__WARNING"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for (binary, args) in [
        ("tocsin", &["frob"][..]),
        ("tocsin", &["show", "abc"][..]),
        ("tocsin-agent", &["--bogus"][..]),
        ("tocsin-aggregator", &["frob"][..]),
        ("tocsin", &["--api", "notaurl", "incidents"][..]),
    ] {
        let (code, stderr) = run(binary, args);
        assert_eq!(code, Some(64), "{binary} {args:?}: {stderr}");
    }
    assert_eq!(run("tocsin", &["--help"]).0, Some(0));
    assert_eq!(run("tocsin-agent", &["--version"]).0, Some(0));
}

#[test]
fn cli_reports_an_unreachable_api_with_its_cause() {
    // Port 9 (discard) on loopback: nothing listens there in the test environment.
    let (code, stderr) = run("tocsin", &["--api", "http://127.0.0.1:9", "incidents"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:9")
            && stderr.to_lowercase().contains("refused"),
        "{stderr}"
    );
}
