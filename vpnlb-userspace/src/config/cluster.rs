//! `[cluster]`: this host as a member of a vpnlb cluster. The host's own file keeps what is about
//! the host (`[agent]`, `[[interface]]`, `[hooks]`, `[cluster]`); the service (`[[backend]]` and
//! `[[vip]]`) is the cluster's, written to etcd by `vpnlb cluster push` and applied by every member
//! ([`ServiceDoc`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{BackendConfig, VipConfig};

/// What a member does while it cannot reach etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnEtcdLoss {
    /// Keep the last agreed state: the maps keep forwarding as they are; local check results are
    /// recorded but change nothing until etcd is back.
    #[default]
    Freeze,
    /// Fall back to this host's own checks.
    Local,
}

impl OnEtcdLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            OnEtcdLoss::Freeze => "freeze",
            OnEtcdLoss::Local => "local",
        }
    }
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name: every member of one cluster has the same. Also names the etcd prefix
    /// by default.
    #[serde(default = "default_name")]
    pub name: String,
    /// This host's name in the cluster, unique among its members (default: the host name).
    #[serde(default)]
    pub member: Option<String>,
    /// etcd client URLs: `http://10.0.0.1:2379` or `https://...` (then `etcd_ca_file` is needed).
    pub etcd_endpoints: Vec<String>,
    /// Key prefix in etcd (default `/vpnlb/<name>`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// CA certificate that signed etcd's server certificates (PEM).
    #[serde(default)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate and key for etcd (PEM), when etcd asks for one.
    #[serde(default)]
    pub etcd_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub etcd_key_file: Option<PathBuf>,
    /// Timeout of every etcd request and of the first connection (ms).
    #[serde(default = "default_etcd_timeout_ms")]
    pub etcd_timeout_ms: u64,
    /// TTL of this member's lease (s): a member that stops renewing leaves the cluster's view
    /// after this long.
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u64,
    /// How many live members must see a backend down before it leaves the rings (and up before it
    /// comes back). Default: a majority of the live members.
    #[serde(default)]
    pub health_quorum: Option<u32>,
    #[serde(default)]
    pub on_etcd_loss: OnEtcdLoss,
    /// Where this member accepts the session stream of its peers (TCP).
    pub peer_listen: SocketAddr,
    /// The address peers connect to (default: `peer_listen`).
    #[serde(default)]
    pub peer_advertise: Option<SocketAddr>,
    /// The key that authenticates the session stream between members (the same file on every
    /// member; at least 32 bytes; readable by root only).
    pub peer_key_file: PathBuf,
    /// Replicate sessions and learned session ids to the peers (off: each member keeps its own).
    #[serde(default = "default_true")]
    pub replicate: bool,
}

pub fn default_name() -> String {
    "vpnlb".into()
}

pub fn default_etcd_timeout_ms() -> u64 {
    2000
}

pub fn default_lease_ttl_s() -> u64 {
    2
}

fn default_true() -> bool {
    true
}

impl ClusterConfig {
    /// The etcd key prefix, without a trailing `/`.
    pub fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("/vpnlb/{}", self.name))
            .trim_end_matches('/')
            .to_string()
    }

    /// This member's name.
    pub fn member_name(&self) -> String {
        self.member.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "vpnlb".into())
        })
    }

    /// The address peers reach this member's session stream at.
    pub fn advertised(&self) -> SocketAddr {
        self.peer_advertise.unwrap_or(self.peer_listen)
    }
}

/// The cluster's service: what `vpnlb cluster push` writes and every member applies. A document
/// with anything else (`[agent]`, `[[interface]]`, ...) is refused: those are each host's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDoc {
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendConfig>,
    #[serde(rename = "vip", default)]
    pub vips: Vec<VipConfig>,
}
