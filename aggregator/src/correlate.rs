//! Correlation: which incident change a check's new state causes, which incident a
//! firing fingerprint joins (its **group key**, from `[correlation] group_by`), which
//! severity P1–P4 an incident has (ordered `[[severity]]` rules, then the seed's
//! defaults), and how a group incident describes itself. Pure: no I/O, no clock; the
//! store (`store::apply`) gathers the facts, applies the decision in the same
//! transaction as the event, and owns inhibition, silences, group waits and re-opening.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Severity, State};
use crate::silence::Matcher;

/// Check name of the incident a silent node raises (see `liveness`).
pub const NODE_DOWN: &str = "node_down";

/// Default `[correlation] group_by`: one incident per check, whatever the node
/// ("CPU critical on 12 web nodes" is one incident, not 12).
pub const DEFAULT_GROUP_BY: &[&str] = &["check"];
/// Default `[correlation] group_wait`: the first member pages at once.
pub const DEFAULT_GROUP_WAIT: &str = "0s";
/// Default `[correlation] reopen_window`: a fingerprint firing again this soon after its
/// incident resolved reopens that incident.
pub const DEFAULT_REOPEN_WINDOW: &str = "5m";

/// Node label that marks a node critical: `node_down` of a node labelled
/// `tier = "critical"` is P1 by default.
pub const TIER_LABEL: &str = "tier";
/// Value of [`TIER_LABEL`] that marks a critical node.
pub const CRITICAL_TIER: &str = "critical";
/// Node label naming the service a node serves: critical on at least half (and at least
/// two) of a service's known nodes is P1 by default.
pub const SERVICE_LABEL: &str = "service";

/// Correlation settings, validated from `[correlation]` and `[[severity]]`.
#[derive(Debug, Clone)]
pub struct Correlation {
    /// Names whose values make the group key: `node`, `check`, or label names (a label
    /// a fingerprint lacks counts as empty). Empty: one group for everything.
    pub group_by: Vec<String>,
    /// How long a new incident's trigger is held so that the page names every member
    /// that joins meanwhile, ms (0: page at once).
    pub group_wait_ms: i64,
    /// A fingerprint firing again within this time after its incident resolved reopens
    /// that incident, ms (0: never reopen).
    pub reopen_window_ms: i64,
    /// User severity rules, first match wins; the seed's defaults follow them.
    pub severity: Vec<SeverityRule>,
}

impl Default for Correlation {
    fn default() -> Self {
        Correlation {
            group_by: DEFAULT_GROUP_BY.iter().map(|s| (*s).to_owned()).collect(),
            group_wait_ms: 0,
            reopen_window_ms: 300_000,
            severity: Vec::new(),
        }
    }
}

/// One `[[severity]]` rule: when every matcher matches a firing member (fields `node`,
/// `check`, `state` and the member's labels), the member has severity `level`.
#[derive(Debug, Clone)]
pub struct SeverityRule {
    /// All must match (silence-style: `=`, `!=`, `=~`, `!~`).
    pub matchers: Vec<Matcher>,
    /// Severity given.
    pub level: Severity,
}

/// The group key of a fingerprint: `name=value` for each `group_by` name, joined with
/// `,` (`check=cpu`). Names are `node`, `check` or label names; a missing label is empty.
pub fn group_key(
    group_by: &[String],
    node: &str,
    check: &str,
    labels: &BTreeMap<String, String>,
) -> String {
    let parts: Vec<String> = group_by
        .iter()
        .map(|name| {
            let v = match name.as_str() {
                "node" => node,
                "check" => check,
                label => labels.get(label).map_or("", String::as_str),
            };
            format!("{name}={v}")
        })
        .collect();
    // Never empty: an empty key means "ungrouped" (incidents from before grouping).
    format!("[{}]", parts.join(","))
}

/// What severity classification knows about one firing member.
#[derive(Debug, Clone)]
pub struct MemberFacts<'a> {
    /// Agent id of the node.
    pub node: &'a str,
    /// Check name.
    pub check: &'a str,
    /// Current state.
    pub state: State,
    /// Node and check labels merged.
    pub labels: &'a BTreeMap<String, String>,
    /// For a critical member of a node labelled `service`: how many distinct known nodes
    /// of that service are critical on this check (this one included), and how many
    /// nodes of that service the store knows (from the `agents` table's labels).
    pub service_share: Option<(u64, u64)>,
}

/// The severity of one member: `None` when it is not firing; else the first user rule
/// that matches, else the seed's defaults — P1 (system unavailable or data at risk):
/// `node_down` of a node labelled `tier = "critical"`, or critical on at least half of
/// a service's known nodes (at least two of them); P2 (core function affected):
/// critical; P3 (non-core function): warning. P4 (minor) comes only from rules.
pub fn classify(m: &MemberFacts<'_>, rules: &[SeverityRule]) -> Option<Severity> {
    if !m.state.is_firing() {
        return None;
    }
    let mut fields = m.labels.clone();
    fields.insert("node".into(), m.node.into());
    fields.insert("check".into(), m.check.into());
    fields.insert("state".into(), m.state.as_str().into());
    if let Some(rule) = rules
        .iter()
        .find(|r| r.matchers.iter().all(|x| x.matches(&fields)))
    {
        return Some(rule.level);
    }
    let critical_tier = m.labels.get(TIER_LABEL).map(String::as_str) == Some(CRITICAL_TIER);
    if m.check == NODE_DOWN && critical_tier {
        return Some(Severity::P1);
    }
    if m.state == State::Critical
        && let Some((critical, total)) = m.service_share
        && critical >= 2
        && critical * 2 >= total
    {
        return Some(Severity::P1);
    }
    Some(severity(m.state))
}

/// The severity of an incident: the most severe of its firing members' (`None` when no
/// member fires: the incident keeps the severity it has).
pub fn incident_severity(members: &[MemberFacts<'_>], rules: &[SeverityRule]) -> Option<Severity> {
    members.iter().filter_map(|m| classify(m, rules)).min()
}

/// A member of an incident: one fingerprint, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// Fingerprint (`node/check{labels}`).
    pub fingerprint: String,
    /// Agent id of the node.
    pub node: String,
    /// Check name.
    pub check: String,
    /// Node and check labels merged.
    pub labels: BTreeMap<String, String>,
    /// Latest state (`ok` once it recovered).
    pub state: State,
    /// Latest value.
    pub value: Option<f64>,
    /// Latest message.
    pub message: String,
    /// In this state since (Unix ms, aggregator clock).
    pub since_ms: i64,
    /// Last observed (Unix ms, aggregator clock).
    pub updated_ms: i64,
}

/// How an incident describes its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The node they share, else `"N nodes"`.
    pub node: String,
    /// The check they share, else `"N checks"`.
    pub check: String,
    /// The labels every member has with the same value.
    pub labels: BTreeMap<String, String>,
    /// Worst state of the firing members (critical over warning).
    pub state: Option<State>,
    /// One line: a lone member's message, else e.g. `cpu critical on 12 nodes: web-1,
    /// web-2, …` naming every firing member (up to [`SUMMARY_NAMES`], then `+N more`);
    /// when every member is OK, all of them (`cpu ok on 12 nodes: …`).
    pub summary: String,
}

/// Most member names a summary lists.
pub const SUMMARY_NAMES: usize = 20;

/// Describes an incident from its members (join order). `None` when there is none.
pub fn describe(members: &[Member]) -> Option<Description> {
    let first = members.first()?;
    let firing: Vec<&Member> = members.iter().filter(|m| m.state.is_firing()).collect();
    let shown: Vec<&Member> = if firing.is_empty() {
        members.iter().collect()
    } else {
        firing.clone()
    };
    // In first-seen order; a set keeps large groups (thousands of members) linear.
    let distinct = |f: fn(&Member) -> &str| -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        members.iter().map(f).filter(|v| seen.insert(*v)).collect()
    };
    let nodes = distinct(|m| m.node.as_str());
    let checks = distinct(|m| m.check.as_str());
    let mut labels = first.labels.clone();
    labels.retain(|k, v| members.iter().all(|m| m.labels.get(k) == Some(v)));
    let state = firing.iter().map(|m| m.state).max_by_key(|s| match s {
        State::Critical => 2,
        State::Warning => 1,
        _ => 0,
    });
    let node = if nodes.len() == 1 {
        first.node.clone()
    } else {
        format!("{} nodes", nodes.len())
    };
    let check = if checks.len() == 1 {
        first.check.clone()
    } else {
        format!("{} checks", checks.len())
    };
    let summary = if members.len() == 1 {
        first.message.clone()
    } else {
        // Nothing fires: every member OK (the resolve), else pending or unknown.
        let all_ok = members.iter().all(|m| m.state == State::Ok);
        let state_word = state.map_or(if all_ok { "ok" } else { "firing" }, State::as_str);
        let list = |names: Vec<String>| -> String {
            let more = names.len().saturating_sub(SUMMARY_NAMES);
            let mut s = names
                .into_iter()
                .take(SUMMARY_NAMES)
                .collect::<Vec<_>>()
                .join(", ");
            if more > 0 {
                s.push_str(&format!(", … (+{more} more)"));
            }
            s
        };
        let shown_nodes: Vec<String> = {
            let mut seen = std::collections::HashSet::new();
            shown
                .iter()
                .filter(|m| seen.insert(m.node.as_str()))
                .map(|m| m.node.clone())
                .collect()
        };
        if checks.len() == 1 {
            format!(
                "{} {state_word} on {} node{}: {}",
                first.check,
                shown_nodes.len(),
                if shown_nodes.len() == 1 { "" } else { "s" },
                list(shown_nodes)
            )
        } else if nodes.len() == 1 {
            format!(
                "{} checks {state_word} on {}: {}",
                shown.len(),
                first.node,
                list(shown.iter().map(|m| m.check.clone()).collect())
            )
        } else {
            format!(
                "{} alerts {state_word}: {}",
                shown.len(),
                list(
                    shown
                        .iter()
                        .map(|m| format!("{}/{}", m.node, m.check))
                        .collect()
                )
            )
        }
    };
    Some(Description {
        node,
        check,
        labels,
        state,
        summary,
    })
}

/// What to do with the incident of a fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changes.
    Nothing,
    /// Open a new incident with this severity.
    Open(Severity),
    /// The open incident's severity changes.
    Reclassify(Severity),
    /// The open incident keeps its severity; its latest state/value are refreshed.
    Refresh,
    /// Resolve the open incident.
    Resolve,
}

/// Default severity of a firing state (the seed: critical on a core function is P2,
/// a warning is non-core P3).
pub fn severity(state: State) -> Severity {
    match state {
        State::Critical => Severity::P2,
        _ => Severity::P3,
    }
}

/// Decides for a new `state` given the severity of the fingerprint's open incident.
pub fn decide(state: State, open: Option<Severity>) -> Decision {
    match (state.is_firing(), open) {
        (true, None) => Decision::Open(severity(state)),
        (true, Some(current)) if severity(state) != current => {
            Decision::Reclassify(severity(state))
        }
        (true, Some(_)) => Decision::Refresh,
        (false, Some(_)) if state == State::Ok => Decision::Resolve,
        // Pending, unknown: the incident (if any) stays as it is.
        (false, _) => Decision::Nothing,
    }
}

/// The fingerprint of a check on a node: `node/check` followed by the sorted
/// identifying labels (`{k=v,…}`) when there are any.
pub fn fingerprint(node: &str, check: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return format!("{node}/{check}");
    }
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{node}/{check}{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_decisions() {
        assert_eq!(decide(State::Critical, None), Decision::Open(Severity::P2));
        assert_eq!(decide(State::Warning, None), Decision::Open(Severity::P3));
        assert_eq!(
            decide(State::Critical, Some(Severity::P3)),
            Decision::Reclassify(Severity::P2)
        );
        assert_eq!(
            decide(State::Critical, Some(Severity::P2)),
            Decision::Refresh
        );
        assert_eq!(decide(State::Ok, Some(Severity::P2)), Decision::Resolve);
        assert_eq!(decide(State::Ok, None), Decision::Nothing);
        assert_eq!(decide(State::Pending, None), Decision::Nothing);
        assert_eq!(
            decide(State::Unknown, Some(Severity::P2)),
            Decision::Nothing
        );
    }

    #[test]
    fn fingerprints_are_stable_and_label_order_free() {
        let a = BTreeMap::from([
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(
            fingerprint("web-1", "process:nginx", &a),
            "web-1/process:nginx{a=1,b=2}"
        );
        assert_eq!(fingerprint("web-1", "cpu", &BTreeMap::new()), "web-1/cpu");
    }

    fn rule(matchers: &[&str], level: Severity) -> SeverityRule {
        SeverityRule {
            matchers: matchers
                .iter()
                .map(|m| Matcher::parse(m).expect(m))
                .collect(),
            level,
        }
    }

    fn facts<'a>(
        node: &'a str,
        check: &'a str,
        state: State,
        labels: &'a BTreeMap<String, String>,
    ) -> MemberFacts<'a> {
        MemberFacts {
            node,
            check,
            state,
            labels,
            service_share: None,
        }
    }

    #[test]
    fn severity_defaults_follow_the_seed() {
        let none = BTreeMap::new();
        let critical_tier = BTreeMap::from([(TIER_LABEL.to_owned(), CRITICAL_TIER.to_owned())]);
        let c = |f: MemberFacts<'_>| classify(&f, &[]);
        assert_eq!(
            c(facts("a", "cpu", State::Critical, &none)),
            Some(Severity::P2)
        );
        assert_eq!(
            c(facts("a", "cpu", State::Warning, &none)),
            Some(Severity::P3)
        );
        assert_eq!(c(facts("a", "cpu", State::Ok, &none)), None);
        assert_eq!(c(facts("a", "cpu", State::Unknown, &none)), None);
        assert_eq!(
            c(facts("a", NODE_DOWN, State::Critical, &none)),
            Some(Severity::P2)
        );
        assert_eq!(
            c(facts("a", NODE_DOWN, State::Critical, &critical_tier)),
            Some(Severity::P1),
            "node_down of a critical node"
        );
        assert_eq!(
            c(facts("a", "cpu", State::Critical, &critical_tier)),
            Some(Severity::P2),
            "only node_down of a critical node is P1 by itself"
        );
        let share = |critical, total| MemberFacts {
            service_share: Some((critical, total)),
            ..facts("a", "cpu", State::Critical, &none)
        };
        assert_eq!(c(share(2, 4)), Some(Severity::P1), "half the service");
        assert_eq!(c(share(3, 4)), Some(Severity::P1));
        assert_eq!(c(share(2, 5)), Some(Severity::P2), "less than half");
        assert_eq!(
            c(share(1, 1)),
            Some(Severity::P2),
            "one node is not a fleet"
        );
        let warning_share = MemberFacts {
            state: State::Warning,
            ..share(4, 4)
        };
        assert_eq!(c(warning_share), Some(Severity::P3), "P1 needs critical");
    }

    #[test]
    fn the_first_matching_user_rule_wins_over_the_defaults() {
        let web = BTreeMap::from([("service".to_owned(), "web".to_owned())]);
        let rules = [
            rule(&["check=~disk:.*", "state=warning"], Severity::P4),
            rule(&["service=web", "state=critical"], Severity::P1),
            rule(&["service=web"], Severity::P3),
        ];
        let c = |f: MemberFacts<'_>| classify(&f, &rules);
        assert_eq!(
            c(facts("a", "disk:/var", State::Warning, &web)),
            Some(Severity::P4)
        );
        assert_eq!(
            c(facts("a", "cpu", State::Critical, &web)),
            Some(Severity::P1)
        );
        assert_eq!(
            c(facts("a", "cpu", State::Warning, &web)),
            Some(Severity::P3)
        );
        let none = BTreeMap::new();
        assert_eq!(
            c(facts("a", "cpu", State::Critical, &none)),
            Some(Severity::P2),
            "no rule matches: the defaults"
        );
        assert_eq!(
            c(facts("a", "cpu", State::Ok, &web)),
            None,
            "rules see firing members only"
        );
        let members = [
            facts("a", "disk:/var", State::Warning, &web),
            facts("b", "cpu", State::Critical, &none),
            facts("c", "cpu", State::Ok, &web),
        ];
        assert_eq!(
            incident_severity(&members, &rules),
            Some(Severity::P2),
            "the worst"
        );
        assert_eq!(incident_severity(&members[2..], &rules), None);
    }

    #[test]
    fn group_keys_use_node_check_and_labels() {
        let labels = BTreeMap::from([("service".to_owned(), "web".to_owned())]);
        let by =
            |names: &[&str]| -> Vec<String> { names.iter().map(|s| (*s).to_owned()).collect() };
        assert_eq!(
            group_key(&by(&["check"]), "a", "cpu", &labels),
            "[check=cpu]"
        );
        assert_eq!(
            group_key(&by(&["check"]), "a", "cpu", &labels),
            group_key(&by(&["check"]), "b", "cpu", &BTreeMap::new()),
            "the node does not matter"
        );
        assert_eq!(
            group_key(&by(&["service", "node"]), "a", "cpu", &labels),
            "[service=web,node=a]"
        );
        assert_eq!(group_key(&by(&["team"]), "a", "cpu", &labels), "[team=]");
        assert_ne!(
            group_key(&[], "a", "cpu", &labels),
            "",
            "never the legacy key"
        );
    }

    fn member(node: &str, check: &str, state: State, message: &str) -> Member {
        Member {
            fingerprint: fingerprint(node, check, &BTreeMap::new()),
            node: node.into(),
            check: check.into(),
            labels: BTreeMap::from([
                ("service".to_owned(), "web".to_owned()),
                ("host".to_owned(), node.to_owned()),
            ]),
            state,
            value: None,
            message: message.into(),
            since_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn descriptions_name_the_members() {
        assert_eq!(describe(&[]), None);
        let one = describe(&[member("web-1", "cpu", State::Critical, "cpu 97%")]).expect("one");
        assert_eq!(
            (one.node.as_str(), one.check.as_str(), one.summary.as_str()),
            ("web-1", "cpu", "cpu 97%")
        );
        assert_eq!(one.labels.get("host").map(String::as_str), Some("web-1"));
        let many: Vec<Member> = (1..=25)
            .map(|n| member(&format!("web-{n}"), "cpu", State::Critical, "hot"))
            .collect();
        let d = describe(&many).expect("many");
        assert_eq!((d.node.as_str(), d.check.as_str()), ("25 nodes", "cpu"));
        assert!(
            d.summary
                .starts_with("cpu critical on 25 nodes: web-1, web-2, web-3"),
            "{}",
            d.summary
        );
        assert!(d.summary.ends_with("web-20, … (+5 more)"), "{}", d.summary);
        assert_eq!(
            d.labels.len(),
            1,
            "only the labels all share: {:?}",
            d.labels
        );
        let mixed = [
            member("web-1", "cpu", State::Warning, ""),
            member("web-1", "memory", State::Critical, ""),
            member("web-1", "disk", State::Ok, ""),
        ];
        let d = describe(&mixed).expect("mixed");
        assert_eq!(d.state, Some(State::Critical));
        assert_eq!(d.summary, "2 checks critical on web-1: cpu, memory");
        assert_eq!(d.check, "3 checks");
        let spread = [
            member("web-1", "cpu", State::Warning, ""),
            member("web-2", "memory", State::Warning, ""),
        ];
        assert_eq!(
            describe(&spread).expect("spread").summary,
            "2 alerts warning: web-1/cpu, web-2/memory"
        );
    }
}
