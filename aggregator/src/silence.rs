//! Silences: matchers on an incident's fields, a time span, an owner and a reason. A
//! silence mutes paging — the incident is recorded as usual, its page is held — never
//! recording; when the silence ends while the incident still fires, the page goes out.
//!
//! Owns matching only; the store keeps the silences and applies them.

use std::collections::BTreeMap;

use serde::Serialize;

/// Names a matcher may use besides labels: `node`, `check`, `severity` (silences) and
/// `state` (severity rules).
pub const FIELD_NAMES: &[&str] = &["node", "check", "severity", "state"];

/// One matcher: `name=value`, `name!=value`, `name=~regex` or `name!~regex` (regular
/// expressions are anchored: they match the whole value).
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Field: `node`, `check`, `severity`, or a label name (`service`, `process`, …).
    pub name: String,
    op: Op,
    /// The text as written, for display.
    pub text: String,
}

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Re(regex::Regex),
    NotRe(regex::Regex),
}

impl Matcher {
    /// Parses `name=value`, `name!=value`, `name=~regex`, `name!~regex`.
    ///
    /// # Errors
    /// A message naming the matcher and the accepted forms.
    pub fn parse(text: &str) -> Result<Self, String> {
        let form = "expected name=value, name!=value, name=~regex or name!~regex";
        let (name, op) = if let Some((n, v)) = text.split_once("=~") {
            (n, Op::Re(anchored(v)?))
        } else if let Some((n, v)) = text.split_once("!~") {
            (n, Op::NotRe(anchored(v)?))
        } else if let Some((n, v)) = text.split_once("!=") {
            (n, Op::Ne(v.to_owned()))
        } else if let Some((n, v)) = text.split_once('=') {
            (n, Op::Eq(v.to_owned()))
        } else {
            return Err(format!("matcher {text:?}: {form}"));
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "matcher {text:?}: the name must be a field or label name; {form}"
            ));
        }
        Ok(Matcher {
            name: name.to_owned(),
            op,
            text: text.to_owned(),
        })
    }

    /// Whether `fields` satisfy this matcher (a missing field is the empty string).
    pub fn matches(&self, fields: &BTreeMap<String, String>) -> bool {
        let v = fields.get(&self.name).map_or("", String::as_str);
        match &self.op {
            Op::Eq(x) => v == x,
            Op::Ne(x) => v != x,
            Op::Re(re) => re.is_match(v),
            Op::NotRe(re) => !re.is_match(v),
        }
    }
}

fn anchored(re: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            let reason = e.to_string();
            let reason = reason.lines().last().unwrap_or("").trim().to_owned();
            format!("{re:?} is not a regular expression: {reason}")
        })
}

/// A silence as stored.
#[derive(Debug, Clone)]
pub struct Silence {
    /// Id.
    pub id: i64,
    /// All must match.
    pub matchers: Vec<Matcher>,
    /// Start, Unix ms.
    pub starts_ms: i64,
    /// End, Unix ms (set to the expiry time when expired early).
    pub ends_ms: i64,
    /// Owner.
    pub created_by: String,
    /// Why.
    pub reason: String,
    /// The silence ends when this incident resolves (`ends_with_incident`).
    pub ends_with_incident: Option<i64>,
    /// Who or what ended it early: a user name, or `incident #ID resolved`.
    pub expired_by: Option<String>,
}

impl Silence {
    /// Active at `now`.
    pub fn is_active(&self, now: i64) -> bool {
        self.starts_ms <= now && now < self.ends_ms
    }

    /// Whether it mutes an incident with these fields at `now`.
    pub fn mutes(&self, fields: &BTreeMap<String, String>, now: i64) -> bool {
        self.is_active(now) && self.matchers.iter().all(|m| m.matches(fields))
    }
}

/// The fields silences match: the labels, plus `node`, `check` and `severity`.
pub fn fields(
    node: &str,
    check: &str,
    severity: &str,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut f = labels.clone();
    f.insert("node".into(), node.into());
    f.insert("check".into(), check.into());
    f.insert("severity".into(), severity.into());
    f
}

/// A silence as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SilenceView {
    /// Id.
    pub id: i64,
    /// Matchers as written.
    pub matchers: Vec<String>,
    /// Start and end (Unix ms).
    pub starts_at_ms: i64,
    /// End (Unix ms).
    pub ends_at_ms: i64,
    /// Owner.
    pub created_by: String,
    /// Why.
    pub reason: String,
    /// `active`, `pending` (starts later) or `expired`.
    pub state: &'static str,
    /// The incident whose resolution ends it, if any.
    pub ends_with_incident: Option<i64>,
    /// Who or what ended it early (a user, or `incident #ID resolved`), if anyone.
    pub expired_by: Option<String>,
}

impl SilenceView {
    /// The view of `s` at `now`.
    pub fn of(s: &Silence, now: i64) -> Self {
        SilenceView {
            id: s.id,
            matchers: s.matchers.iter().map(|m| m.text.clone()).collect(),
            starts_at_ms: s.starts_ms,
            ends_at_ms: s.ends_ms,
            created_by: s.created_by.clone(),
            reason: s.reason.clone(),
            ends_with_incident: s.ends_with_incident,
            expired_by: s.expired_by.clone(),
            state: if now < s.starts_ms {
                "pending"
            } else if s.is_active(now) {
                "active"
            } else {
                "expired"
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers() {
        let f = fields(
            "web-1",
            "disk:/var",
            "P3",
            &BTreeMap::from([("service".into(), "api".into())]),
        );
        let m = |t: &str| Matcher::parse(t).expect(t).matches(&f);
        assert!(m("node=web-1"));
        assert!(!m("node=web-2"));
        assert!(m("node!=web-2"));
        assert!(m("check=~disk:.*"));
        assert!(!m("check=~disk"), "anchored");
        assert!(m("check!~cpu.*"));
        assert!(m("service=api"));
        assert!(!m("team=ops"), "a missing label is empty");
        assert!(Matcher::parse("novalue").is_err());
        assert!(Matcher::parse("=x").is_err());
        assert!(Matcher::parse("check=~([").is_err());
    }
}
