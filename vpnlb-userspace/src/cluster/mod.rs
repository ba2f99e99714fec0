//! Several vpnlb hosts with one desired state (docs/cluster.md). What lives in etcd under the
//! cluster's prefix `P` ([`Keys`]):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `P/service` | the service document (TOML: `[[backend]]`, `[[vip]]`); its mod revision is the service revision | `vpnlb cluster push` |
//! | `P/ids` | the stable name -> id assignment (JSON), in the same transaction | `vpnlb cluster push` |
//! | `P/admin/<backend>` | `drain` or `disable` (absent: none) | any member's control socket |
//! | `P/members/<member>` | [`MemberState`] (JSON) under the member's lease | each member |
//!
//! Each member decides alone from what it reads there (the agent core): the service it applies,
//! the agreed health of every backend ([`quorum`]), the admin state. Members publish their own
//! check results, the revision they run, and a hash of every ring they built ([`ring_hash`]), so
//! any divergence is visible.

pub mod etcd;
pub mod peer;
pub mod quorum;
pub mod replicate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::IdMap;
pub use quorum::Seen;

/// The keys of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }
    pub fn service(&self) -> String {
        format!("{}/service", self.prefix)
    }
    pub fn ids(&self) -> String {
        format!("{}/ids", self.prefix)
    }
    pub fn admin_dir(&self) -> String {
        format!("{}/admin/", self.prefix)
    }
    pub fn admin(&self, backend: &str) -> String {
        format!("{}{backend}", self.admin_dir())
    }
    pub fn members_dir(&self) -> String {
        format!("{}/members/", self.prefix)
    }
    pub fn member(&self, name: &str) -> String {
        format!("{}{name}", self.members_dir())
    }
    /// Everything of the cluster (for one watch).
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
}

/// What a member publishes about itself (under its lease, so it disappears with the member).
/// Fields a later version adds are ignored (members of two versions run side by side during an
/// upgrade); missing ones take their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    pub member: String,
    /// Where its peers reach its session stream.
    pub peer: String,
    pub pid: u32,
    /// Unix seconds of the agent's start.
    pub started: u64,
    /// The service revision it runs (0: none yet).
    pub service_revision: i64,
    /// Why it refused the latest revision, if it did (it keeps running `service_revision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_error: Option<String>,
    /// Its own checks' view of every backend.
    pub health: BTreeMap<String, Seen>,
    /// A digest of what its rings are built from (the agreed health and admin state of every
    /// backend): members with the same revision and digest must have the same rings.
    pub agreed: String,
    /// Ring hash per ring (`vip` or `vip/class`).
    pub rings: BTreeMap<String, String>,
    /// Ready to carry traffic (maps written, first checks concluded, bulk sync done).
    pub ready: bool,
    /// What it is doing (`ready` is [`Role::Ready`]).
    #[serde(default)]
    pub role: Role,
    /// Its recent replication lag to its peers (ms, p50 and p99), once it has sent anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_ms_p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_ms_p99: Option<f64>,
}

/// A member's role in the cluster. Part 2 (VIP takeover, BGP) announces only from `Ready`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No service applied yet: it touches no map.
    #[default]
    Waiting,
    /// Runs the service; its first checks have not all concluded.
    Checking,
    /// Waits for the bulk copy of a ready peer's sessions.
    Syncing,
    /// Carries traffic.
    Ready,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Waiting => "waiting",
            Role::Checking => "checking",
            Role::Syncing => "syncing",
            Role::Ready => "ready",
        }
    }
}

/// What `vpnlb cluster push` writes, read back by the members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// etcd's mod revision of the service key.
    pub revision: i64,
    pub text: String,
    pub ids: Option<IdMap>,
}

/// A stable 64-bit hash of a ring (FNV-1a over its size and slots, little-endian), as 16 hex
/// digits: the same on every host and in every version.
pub fn ring_hash(slots: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&(slots.len() as u32).to_le_bytes());
    for s in slots {
        eat(&s.to_le_bytes());
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_under_the_prefix() {
        let k = Keys::new("/vpnlb/edge/");
        assert_eq!(k.service(), "/vpnlb/edge/service");
        assert_eq!(k.admin("gw1"), "/vpnlb/edge/admin/gw1");
        assert_eq!(k.member("lb2"), "/vpnlb/edge/members/lb2");
        assert!(k.member("lb2").starts_with(&k.members_dir()));
        assert_eq!(k.all(), "/vpnlb/edge/");
    }

    #[test]
    fn ring_hashes_are_stable_and_sensitive() {
        // Pinned values: a change of the function would make hosts of two versions disagree.
        assert_eq!(ring_hash(&[]), "4d25767f9dce13f5");
        assert_eq!(ring_hash(&[1, 2, 3]), ring_hash(&[1, 2, 3]));
        assert_ne!(ring_hash(&[1, 2, 3]), ring_hash(&[1, 3, 2]));
        assert_ne!(ring_hash(&[0]), ring_hash(&[0, 0]));
    }
}
