//! Message templates (`minijinja`) for the seed's three messages: the P1 incident notice
//! (Slack text, PagerDuty summary), the status-page update and the user e-mail (body and
//! subject). The defaults are embedded from `aggregator/templates/`; a `[templates] dir`
//! may override any of them with a file of the same name, compiled and test-rendered at
//! startup so a broken template is a config error naming the file and line.
//!
//! This module owns rendering only; what a channel does with the text (escaping, limits)
//! is the channel's business. Rendering never fails a page: an override that fails at
//! render time falls back to the embedded default, and says so in the log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior, Value};

/// The templates, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Name {
    /// The P1 incident notice (`incident.md.j2`): Slack text and PagerDuty summary.
    Incident,
    /// The status-page update (`status.md.j2`, markdown).
    Status,
    /// The user e-mail body (`email.txt.j2`, plain text).
    Email,
    /// The user e-mail subject (`email-subject.txt.j2`, one line).
    EmailSubject,
}

impl Name {
    /// Every template.
    pub const ALL: [Name; 4] = [
        Name::Incident,
        Name::Status,
        Name::Email,
        Name::EmailSubject,
    ];

    /// The file name in the embedded set and in `[templates] dir`.
    pub fn file(self) -> &'static str {
        match self {
            Name::Incident => "incident.md.j2",
            Name::Status => "status.md.j2",
            Name::Email => "email.txt.j2",
            Name::EmailSubject => "email-subject.txt.j2",
        }
    }

    /// The short name used by `render-template` (`incident`, `status`, `email`,
    /// `email-subject`).
    pub fn short(self) -> &'static str {
        self.file()
            .trim_end_matches(".j2")
            .split('.')
            .next()
            .unwrap_or("")
    }

    /// Parses a short name or a file name.
    pub fn parse(s: &str) -> Option<Name> {
        Name::ALL
            .into_iter()
            .find(|n| n.short() == s || n.file() == s)
    }

    fn default_source(self) -> &'static str {
        match self {
            Name::Incident => include_str!("../../templates/incident.md.j2"),
            Name::Status => include_str!("../../templates/status.md.j2"),
            Name::Email => include_str!("../../templates/email.txt.j2"),
            Name::EmailSubject => include_str!("../../templates/email-subject.txt.j2"),
        }
    }

    /// The `channel` values this template is rendered for (Slack and PagerDuty for the
    /// notice, the status page for the update, e-mail for the e-mail), so the startup
    /// trial renders each override as it will be used.
    fn channels(self) -> &'static [&'static str] {
        match self {
            Name::Incident => &["slack", "pagerduty"],
            Name::Status => &["status-page", "cli"],
            Name::Email | Name::EmailSubject => &["email"],
        }
    }

    fn default_key(self) -> String {
        format!("default/{}", self.file())
    }
}

/// A template that cannot be loaded, compiled or test-rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct TemplateError {
    /// The file (or directory) at fault.
    pub path: String,
    /// 1-based line in that file, when known.
    pub line: Option<usize>,
    /// What is wrong (minijinja's description).
    pub message: String,
}

/// The compiled templates: the embedded defaults plus the overrides of one directory.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    overridden: BTreeSet<Name>,
    dir: Option<PathBuf>,
    vars: BTreeMap<String, String>,
}

impl Templates {
    /// Only the embedded defaults, with `vars` (the `[templates.vars]` table, available to
    /// templates as `vars.NAME`).
    pub fn defaults(vars: BTreeMap<String, String>) -> Self {
        let mut env = Environment::new();
        // Payloads written by older versions may lack a field: render it empty.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        for name in Name::ALL {
            // The embedded sources are compiled (and rendered) by the unit tests.
            let _ = env.add_template_owned(name.default_key(), name.default_source());
        }
        Templates {
            env,
            overridden: BTreeSet::new(),
            dir: None,
            vars,
        }
    }

    /// The defaults, overridden by the files of `dir` named like [`Name::file`]; each
    /// override is compiled and test-rendered against a sample incident for every event
    /// and every channel it serves.
    ///
    /// # Errors
    /// Every problem at once: a missing or unreadable directory, a `.j2` file of an
    /// unknown name (a typo would otherwise be ignored silently), a syntax or render
    /// error (with file and line), an override that renders only whitespace for some
    /// event (naming the file, the event and the channel).
    pub fn load(
        dir: Option<&Path>,
        vars: BTreeMap<String, String>,
    ) -> Result<Self, Vec<TemplateError>> {
        let mut t = Templates::defaults(vars);
        let Some(dir) = dir else {
            return Ok(t);
        };
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                return Err(vec![TemplateError {
                    path: dir.display().to_string(),
                    line: None,
                    message: format!("cannot read the template directory: {e}"),
                }]);
            }
        };
        let mut files: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|f| f.ends_with(".j2"))
            .collect();
        files.sort();
        for file in files {
            let path = dir.join(&file);
            let Some(name) = Name::ALL.into_iter().find(|n| n.file() == file) else {
                problems.push(TemplateError {
                    path: path.display().to_string(),
                    line: None,
                    message: format!(
                        "unknown template (expected {})",
                        Name::ALL.map(Name::file).join(", ")
                    ),
                });
                continue;
            };
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(TemplateError {
                        path: path.display().to_string(),
                        line: None,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            if let Err(e) = t.env.add_template_owned(file.clone(), source) {
                problems.push(error_at(&path, &e));
                continue;
            }
            // Compiled: now render it for every event and channel, to catch unknown
            // filters, bad calls and type errors, and text that comes out empty (a page
            // saying nothing), before the first page depends on it.
            let mut trial = None;
            'events: for event in crate::notify::payload::EVENTS {
                for channel in name.channels() {
                    match t.render_named(&file, &sample_payload(event), channel) {
                        Err(e) => trial = Some(error_at(&path, &e)),
                        Ok(text) if text.trim().is_empty() => {
                            trial = Some(TemplateError {
                                path: path.display().to_string(),
                                line: None,
                                message: format!(
                                    "renders only whitespace for event {event:?} (channel \
                                     {channel:?}): a notification would carry no text"
                                ),
                            });
                        }
                        Ok(_) => continue,
                    }
                    break 'events;
                }
            }
            if let Some(e) = trial {
                problems.push(e);
                continue;
            }
            t.overridden.insert(name);
        }
        if problems.is_empty() {
            t.dir = Some(dir.to_owned());
            Ok(t)
        } else {
            Err(problems)
        }
    }

    /// Whether `name` comes from the template directory rather than the embedded set.
    pub fn is_overridden(&self, name: Name) -> bool {
        self.overridden.contains(&name)
    }

    /// The template directory in use, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Renders `name` for one notification payload (tocsin's JSON, see `payload`: its
    /// fields are the template's top-level variables) for `channel` (`slack`,
    /// `pagerduty`, `email`, `cli`; the `channel` variable). The text is trimmed of
    /// surrounding blank lines. An override that fails here, or renders only whitespace,
    /// falls back to the embedded default (logged); should that fail too, a one-line
    /// summary is returned.
    pub fn render(&self, name: Name, payload: &serde_json::Value, channel: &str) -> String {
        if self.is_overridden(name) {
            match self.render_named(name.file(), payload, channel) {
                Ok(text) if text.trim().is_empty() => {
                    tracing::warn!(
                        template = name.file(),
                        "template rendered no text, using the built-in one"
                    );
                }
                Ok(text) => return text,
                Err(e) => {
                    let dir = self.dir.as_deref().unwrap_or(Path::new(""));
                    let error = error_at(&dir.join(name.file()), &e);
                    tracing::warn!(template = name.file(), error = %error, "template failed, using the built-in one");
                }
            }
        }
        match self.render_named(&name.default_key(), payload, channel) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(template = name.file(), error = %e, "built-in template failed");
                fallback_line(payload)
            }
        }
    }

    fn render_named(
        &self,
        key: &str,
        payload: &serde_json::Value,
        channel: &str,
    ) -> Result<String, minijinja::Error> {
        let template = self.env.get_template(key)?;
        let ctx = minijinja::context! {
            channel => channel,
            vars => Value::from(minijinja::value::Serde(&self.vars)),
            ..Value::from(minijinja::value::Serde(payload))
        };
        let text = template.render(ctx)?;
        Ok(text.trim_matches(|c| c == '\n' || c == '\r').to_owned())
    }
}

fn error_at(path: &Path, e: &minijinja::Error) -> TemplateError {
    TemplateError {
        path: path.display().to_string(),
        line: e.line(),
        message: match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    }
}

/// The last resort when even the embedded template fails: one line from the payload.
fn fallback_line(p: &serde_json::Value) -> String {
    let i = &p["incident"];
    format!(
        "{} {} #{} {} {}: {}",
        p["event"].as_str().unwrap_or("").to_uppercase(),
        i["severity"].as_str().unwrap_or(""),
        i["id"],
        i["node"].as_str().unwrap_or(""),
        i["check"].as_str().unwrap_or(""),
        i["summary"].as_str().unwrap_or("")
    )
}

/// A sample payload for `event` (the shape `payload::render` writes; a `storm_summary`
/// also has the `storm` object of `store::paging`), used to test-render overrides at
/// startup and by `render-template` without `--payload`.
pub fn sample_payload(event: &str) -> serde_json::Value {
    let resolved = event == "resolve";
    let mut p = serde_json::json!({
        "version": crate::notify::payload::PAYLOAD_VERSION,
        "event": event,
        "dedup_key": "tocsin-0123456789abcdef-7",
        "created_at": "2024-01-15T10:05:00.000Z",
        "incident": {
            "id": 7,
            "status": match event { "resolve" => "resolved", "acknowledge" => "acknowledged", _ => "triggered" },
            "severity": "P1",
            "node": "web-1",
            "check": "http:checkout",
            "state": "critical",
            "value": 23.5,
            "unit": "percent",
            "threshold": 20.0,
            "summary": "http:checkout critical: error rate 23.5% above 20%",
            "labels": {"service": "checkout", "env": "production"},
            "fingerprint": "web-1/http:checkout",
            "triggered_at": "2024-01-15T10:01:00.000Z",
            "acknowledged_at": (event != "trigger").then_some("2024-01-15T10:03:00.000Z"),
            "resolved_at": resolved.then_some("2024-01-15T10:05:00.000Z"),
            "resolution": resolved.then_some("http:checkout ok: error rate 0.4%"),
            "breach_started_at": "2024-01-15T10:00:30.000Z",
            "first_triggered_at": "2024-01-15T10:01:00.000Z",
        }
    });
    if event == crate::store::STORM_SUMMARY {
        p["dedup_key"] = serde_json::json!("tocsin-0123456789abcdef-storm-war-room-1705313100000");
        p["storm"] = serde_json::json!({
            "channel": "war-room",
            "held": 23,
            "open": 21,
            "by_severity": {"P1": 2, "P2": 21},
            "window_start": "2024-01-15T10:00:00.000Z",
            "window_end": "2024-01-15T10:05:00.000Z",
            "incidents": [7, 8, 9],
        });
        p["incident"]["check"] = serde_json::json!(crate::store::STORM_SUMMARY);
        p["incident"]["node"] = serde_json::json!("");
        p["incident"]["summary"] = serde_json::json!(
            "+23 more incidents: 2 P1, 21 P2; 21 still open: #7 web-1 http:checkout, …"
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).expect("write template");
    }

    #[test]
    fn the_status_page_update_shows_no_internals() {
        let t = Templates::defaults(BTreeMap::new());
        for event in ["trigger", "acknowledge", "resolve"] {
            let text = t.render(Name::Status, &sample_payload(event), "status-page");
            for secret in [
                "web-1",
                "http:checkout",
                "error rate",
                "tocsin-0123456789abcdef",
            ] {
                assert!(!text.contains(secret), "{event} shows {secret}: {text}");
            }
            assert!(text.contains("checkout"), "{text}");
            assert!(text.contains("Major outage"), "{text}");
            assert!(text.contains("**Status:** "), "{text}");
            assert!(
                text.lines()
                    .filter(|l| l.starts_with("**Started:**"))
                    .all(|l| l.ends_with("  ")),
                "Markdown line breaks: {text}"
            );
        }
    }

    #[test]
    fn defaults_render_every_event_with_the_seed_fields() {
        let t = Templates::defaults(BTreeMap::new());
        for event in ["trigger", "acknowledge", "resolve"] {
            let p = sample_payload(event);
            for name in Name::ALL {
                for channel in ["slack", "pagerduty", "email"] {
                    let text = t.render(name, &p, channel);
                    assert!(!text.trim().is_empty(), "{name:?} {event}");
                    assert!(
                        text.contains("#7") || text.contains("checkout"),
                        "{name:?} {event}: {text}"
                    );
                }
            }
            let notice = t.render(Name::Incident, &p, "slack");
            for field in [
                "*Severity:*",
                "*Impact:*",
                "*Started:*",
                "*Status:*",
                "*Contact:*",
                "P1",
                "23.5 percent (threshold 20.0)",
                "2024-01-15T10:00:30.000Z",
                "tocsin-0123456789abcdef-7",
                "service=checkout",
            ] {
                assert!(notice.contains(field), "{event}: {field} in\n{notice}");
            }
            assert_eq!(
                notice.contains("Next update:"),
                event != "resolve",
                "{notice}"
            );
            let plain = t.render(Name::Incident, &p, "pagerduty");
            assert!(!plain.contains('*'), "no Slack markup elsewhere: {plain}");
            let mail = t.render(Name::Email, &p, "email");
            for field in [
                "Severity:",
                "Impact:",
                "Started:",
                "Current status:",
                "Contact:",
            ] {
                assert!(mail.contains(field), "{event}: {field} in\n{mail}");
            }
            let status = t.render(Name::Status, &p, "cli");
            assert!(status.starts_with("## "), "{status}");
            let subject = t.render(Name::EmailSubject, &p, "email");
            assert!(!subject.contains('\n'), "{subject:?}");
        }
        let resolved = t.render(Name::Incident, &sample_payload("resolve"), "slack");
        assert!(resolved.starts_with("✅"), "{resolved}");
        assert!(resolved.contains("error rate 0.4%"), "{resolved}");
    }

    #[test]
    fn a_repeat_is_a_reminder_and_a_storm_summary_says_what_was_held() {
        let t = Templates::defaults(BTreeMap::new());
        let repeat = sample_payload("repeat");
        let notice = t.render(Name::Incident, &repeat, "slack");
        assert!(
            notice.starts_with("🔁 *STILL OPEN P1 #7: http:checkout on web-1*"),
            "{notice}"
        );
        let mail = t.render(Name::Email, &repeat, "email");
        assert!(mail.contains("Reminder: the issue"), "{mail}");
        assert!(!mail.contains("has been resolved"), "{mail}");
        assert_eq!(
            t.render(Name::EmailSubject, &repeat, "email"),
            "[P1] Reminder #7: http:checkout on web-1"
        );
        let storm = sample_payload("storm_summary");
        let notice = t.render(Name::Incident, &storm, "pagerduty");
        assert!(
            notice.starts_with("🌀 STORM on war-room — +23 more incidents"),
            "{notice}"
        );
        assert!(!notice.contains("storm_summary on"), "{notice}");
        let mail = t.render(Name::Email, &storm, "email");
        assert!(mail.contains("23 of"), "{mail}");
        assert!(!mail.contains("has been resolved"), "{mail}");
        assert_eq!(
            t.render(Name::EmailSubject, &storm, "email"),
            "[P1] Storm on war-room: 23 more incidents"
        );
    }

    #[test]
    fn vars_reach_the_templates() {
        let vars = BTreeMap::from([("contact".to_owned(), "@john.doe".to_owned())]);
        let t = Templates::defaults(vars);
        let text = t.render(Name::Incident, &sample_payload("trigger"), "slack");
        assert!(text.contains("*Contact:* @john.doe"), "{text}");
    }

    #[test]
    fn a_payload_missing_fields_still_renders() {
        let t = Templates::defaults(BTreeMap::new());
        let p = serde_json::json!({"event": "trigger", "incident": {"id": 3}});
        for name in Name::ALL {
            let text = t.render(name, &p, "slack");
            assert!(!text.is_empty(), "{name:?}");
        }
    }

    #[test]
    fn overrides_replace_only_their_template() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "incident.md.j2",
            "OVERRIDE {{ incident.severity }} {{ event }} {{ channel }} {{ vars.x }}\n",
        );
        let vars = BTreeMap::from([("x".to_owned(), "y".to_owned())]);
        let t = Templates::load(Some(dir.path()), vars).expect("loads");
        assert!(t.is_overridden(Name::Incident) && !t.is_overridden(Name::Email));
        let p = sample_payload("trigger");
        assert_eq!(
            t.render(Name::Incident, &p, "slack"),
            "OVERRIDE P1 trigger slack y"
        );
        assert!(
            t.render(Name::Email, &p, "email")
                .contains("Current status:")
        );
    }

    #[test]
    fn a_syntax_error_names_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "email.txt.j2",
            "line one\nline two\n{% if incident.id %}unclosed\n",
        );
        write(
            dir.path(),
            "status.md.j2",
            "ok\n\n{{ incident.id | nosuchfilter }}\n",
        );
        write(dir.path(), "incidnet.md.j2", "typo in the name\n");
        let errors = Templates::load(Some(dir.path()), BTreeMap::new()).expect_err("broken");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        let email = errors
            .iter()
            .find(|e| e.path.ends_with("email.txt.j2"))
            .expect("email error");
        assert!(email.line.is_some_and(|l| l >= 3), "{email}");
        assert!(email.to_string().contains("email.txt.j2:"), "{email}");
        assert!(email.message.contains("syntax error"), "{email}");
        let status = errors
            .iter()
            .find(|e| e.path.ends_with("status.md.j2"))
            .expect("status error");
        assert_eq!(status.line, Some(3), "{status}");
        assert!(status.message.contains("nosuchfilter"), "{status}");
        assert!(
            text.iter()
                .any(|t| t.contains("incidnet.md.j2") && t.contains("unknown template")),
            "{text:?}"
        );
    }

    /// Regression: an override that renders nothing (for every event, or only for one
    /// event or channel) passed check-config, and its pages went out empty.
    #[test]
    fn an_override_that_renders_only_whitespace_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "email-subject.txt.j2",
            "  {{ nosuchvar }}  \n\n",
        );
        write(
            dir.path(),
            "incident.md.j2",
            "{% if event != \"resolve\" %}{{ incident.summary }}{% endif %}\n",
        );
        write(
            dir.path(),
            "status.md.j2",
            "{% if channel == \"cli\" %}{{ incident.summary }}{% endif %}\n",
        );
        write(dir.path(), "email.txt.j2", "{{ incident.summary }}\n");
        let errors = Templates::load(Some(dir.path()), BTreeMap::new()).expect_err("empty");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        for (file, what) in [
            ("email-subject.txt.j2", "\"trigger\""),
            ("incident.md.j2", "\"resolve\""),
            ("status.md.j2", "\"status-page\""),
        ] {
            assert!(
                text.iter()
                    .any(|t| t.contains(file) && t.contains("only whitespace") && t.contains(what)),
                "{file} {what}: {text:?}"
            );
        }
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let errors = Templates::load(
            Some(Path::new("/nonexistent/tocsin-templates")),
            BTreeMap::new(),
        )
        .expect_err("missing");
        assert!(
            errors[0]
                .to_string()
                .contains("/nonexistent/tocsin-templates")
        );
    }

    #[test]
    fn names_parse_from_short_and_file_names() {
        assert_eq!(Name::parse("incident"), Some(Name::Incident));
        assert_eq!(Name::parse("email-subject"), Some(Name::EmailSubject));
        assert_eq!(Name::parse("status.md.j2"), Some(Name::Status));
        assert_eq!(Name::parse("nope"), None);
    }
}
