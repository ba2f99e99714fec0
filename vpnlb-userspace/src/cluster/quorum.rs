//! Health by quorum (pure): every member publishes what its own checks say of each backend; a
//! backend leaves the rings of every member only when `quorum` live members see it down, and
//! comes back only when `quorum` see it up. Between the two (a split view) the last agreed state
//! stays, so one member's broken path never takes a gateway out, and a flapping view does not
//! flap the rings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one member's own checks say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seen {
    Up,
    Down,
    /// No check has concluded on that member yet.
    Unknown,
}

/// The default quorum among `live` members: a majority.
pub fn majority(live: usize) -> usize {
    live / 2 + 1
}

/// The quorum in force: the configured one (capped at the live members, so a cluster that lost
/// members can still decide), else a majority.
pub fn quorum(configured: Option<u32>, live: usize) -> usize {
    match configured {
        Some(q) => (q as usize).clamp(1, live.max(1)),
        None => majority(live),
    }
}

/// The agreed state of one backend from the views of the live members (`views`: member ->
/// what it sees), given the previous agreed state. Returns the new agreed state and, when it
/// comes from the views, the members that decided it.
pub fn agree(views: &BTreeMap<String, Seen>, quorum: usize, previous: Seen) -> (Seen, Vec<String>) {
    let who = |s: Seen| -> Vec<String> {
        views
            .iter()
            .filter(|(_, v)| **v == s)
            .map(|(m, _)| m.clone())
            .collect()
    };
    let (down, up) = (who(Seen::Down), who(Seen::Up));
    if down.len() >= quorum && down.len() >= up.len() {
        (Seen::Down, down)
    } else if up.len() >= quorum {
        (Seen::Up, up)
    } else {
        (previous, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(v: &[(&str, Seen)]) -> BTreeMap<String, Seen> {
        v.iter().map(|(m, s)| (m.to_string(), *s)).collect()
    }

    #[test]
    fn majority_and_configured_quorum() {
        assert_eq!([1, 2, 3, 4, 5].map(majority), [1, 2, 2, 3, 3]);
        assert_eq!(quorum(None, 3), 2);
        assert_eq!(quorum(Some(1), 3), 1);
        // More than the live members can give: capped, so two survivors of five still decide.
        assert_eq!(quorum(Some(3), 2), 2);
        assert_eq!(quorum(Some(2), 0), 1);
    }

    #[test]
    fn one_member_alone_cannot_take_a_backend_out() {
        use Seen::*;
        let v = views(&[("lb1", Down), ("lb2", Up), ("lb3", Up)]);
        assert_eq!(agree(&v, 2, Up).0, Up);
        let v = views(&[("lb1", Down), ("lb2", Down), ("lb3", Up)]);
        let (s, who) = agree(&v, 2, Up);
        assert_eq!((s, who), (Down, vec!["lb1".to_string(), "lb2".into()]));
    }

    #[test]
    fn a_split_view_keeps_the_last_agreement() {
        use Seen::*;
        // Two members left; one sees it down, one up: neither has the quorum of 2.
        let v = views(&[("lb1", Down), ("lb2", Up)]);
        assert_eq!(agree(&v, 2, Up).0, Up);
        assert_eq!(agree(&v, 2, Down).0, Down);
        // Comes back the same way: a quorum of ups.
        let v = views(&[("lb1", Up), ("lb2", Up), ("lb3", Down)]);
        assert_eq!(agree(&v, 2, Down).0, Up);
        // Unknown views count for nothing.
        let v = views(&[("lb1", Unknown), ("lb2", Unknown), ("lb3", Up)]);
        assert_eq!(agree(&v, 2, Unknown).0, Unknown);
        // A quorum of one (configured): any member's down wins over nothing, a tie goes down.
        let v = views(&[("lb1", Down), ("lb2", Up)]);
        assert_eq!(agree(&v, 1, Up).0, Down);
    }
}
