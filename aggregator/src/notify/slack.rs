//! Slack incoming webhooks: the message text is the P1 incident notice template
//! (`incident.md.j2`, see `template`), cut to Slack's limit on a character boundary.

use serde_json::{Value, json};

use crate::notify::template::{Name, Templates};
use crate::notify::truncate::{Limit, truncate};

/// Longest message text sent, characters: Slack truncates longer messages itself
/// (api.slack.com changelog 2018-04, "truncating really long messages").
pub const MAX_TEXT: usize = 40_000;

/// The message for one outbox payload (tocsin's JSON, see `payload`): `{"text": …}`.
/// The incident's strings are escaped for Slack (`&`, `<`, `>`) before rendering, so a
/// check's output cannot forge links or mentions; the template's own text is not.
pub fn body(payload: &str, templates: &Templates) -> String {
    let p: Value = serde_json::from_str(payload).unwrap_or_default();
    let text = templates.render(Name::Incident, &escape_strings(p), "slack");
    json!({ "text": truncate(&text, Limit::Chars(MAX_TEXT)) }).to_string()
}

/// `v` with `&`, `<` and `>` in every string escaped as Slack's mrkdwn requires.
fn escape_strings(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;"),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(escape_strings).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k, escape_strings(v))).collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_the_notice_escaped_and_cut_on_characters() {
        let t = Templates::defaults(Default::default());
        let mut p = crate::notify::template::sample_payload("trigger");
        p["incident"]["summary"] = json!(format!("<!channel> & {}", "🔥".repeat(50_000)));
        let b: Value = serde_json::from_str(&body(&p.to_string(), &t)).expect("json");
        let text = b["text"].as_str().expect("text");
        assert_eq!(text.chars().count(), MAX_TEXT);
        assert!(text.ends_with('…'));
        assert!(
            text.contains("&lt;!channel&gt; &amp; 🔥"),
            "{}",
            &text[..300]
        );
        assert!(
            text.starts_with("🚨 *TRIGGERED P1 #7: http:checkout on web-1*"),
            "{}",
            &text[..300]
        );
    }
}
