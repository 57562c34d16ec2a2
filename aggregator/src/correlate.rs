//! Correlation: which incident change a check's new state causes. Pure: no I/O, no
//! clock; the store applies the decision in the same transaction as the event.
//!
//! This slice keeps one incident per firing fingerprint (node + check + labels);
//! grouping by labels, inhibition and silences come with the incidents work.

use std::collections::BTreeMap;

use crate::model::{Severity, State};

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
}
