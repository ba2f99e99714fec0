//! The agent's configuration file (TOML, docs/config.md): the typed schema, [`load`]/[`parse`] with
//! errors that name the file, the line and the field, the semantic checks ([`validate`]) that run
//! before anything is returned, and stable data-plane ids across reloads ([`assign_ids`]).
//!
//! Syntax and type errors come from `toml` with a byte span; checks found by validation carry a
//! path (`vip[1].pool[0].backends[2]`). Both are resolved against the spanned document tree to a
//! line and a display path that uses item names (`vip "wireguard".pool "primary".backends[2]`).

mod cluster;
mod error;
mod ids;
mod locate;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_probes;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vpnlb_common::{
    DEFAULT_GUE_PORT, DEFAULT_MAX_SESSIONS, DEFAULT_RING_SIZE, FWD_MODE_GUE, FWD_MODE_IPIP,
    FWD_MODE_L2DSR, PROTO_ESP, PROTO_TCP, PROTO_UDP, VIP_F_HASH_SRC_ONLY, VIP_F_IDS_IPSEC,
    VIP_F_IDS_OPENVPN, VIP_F_IDS_WIREGUARD, VipKey,
};

use crate::dataplane::session_ids::{IdPrefix, esp_range_prefixes, ike_label_prefix};
use crate::health::CheckSpec;

pub use cluster::{ClusterConfig, OnEtcdLoss, ServiceDoc};
pub use error::{ConfigError, FieldPath, PathSeg};
pub use ids::{IdMap, RingKey, assign_ids};
pub use validate::{MAX_NAME_LEN, MAX_WEIGHT, is_prime};

/// Reads and parses the config file at `path` (see [`parse`]).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Parses and validates a config; `origin` names it in errors (usually the file path). Returns the
/// first problem in file order; nothing half-valid is returned.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_all_errors(text, origin).map_err(|mut errors| errors.swap_remove(0))
}

/// Like [`parse`], but returns every validation problem, sorted by line (for `check-config`).
/// A syntax or type error stops parsing, so it is always alone. The error list is never empty.
pub fn parse_all_errors(text: &str, origin: &str) -> Result<Config, Vec<ConfigError>> {
    let doc = locate::Doc::parse(text).map_err(|e| vec![locate::syntax_error(text, origin, &e)])?;
    let mut cfg: Config = toml::from_str(text).map_err(|e| vec![doc.schema_error(origin, &e)])?;
    let issues = validate::validate(&cfg, &doc);
    if !issues.is_empty() {
        let mut errors: Vec<ConfigError> = issues
            .into_iter()
            .map(|(path, reason)| doc.error_at(origin, &path, reason))
            .collect();
        // Stable: problems on one line keep the order they were found in.
        errors.sort_by_key(|e| e.line().unwrap_or(0));
        return Err(errors);
    }
    cfg.source = ConfigSource {
        origin: origin.to_string(),
        text: Some(Arc::from(text)),
    };
    Ok(cfg)
}

/// Parses and validates a cluster's service document (`[[backend]]` and `[[vip]]` only, as
/// `vpnlb cluster push` writes it); `origin` names it in errors.
pub fn parse_service(text: &str, origin: &str) -> Result<ServiceDoc, ConfigError> {
    let doc = locate::Doc::parse(text).map_err(|e| locate::syntax_error(text, origin, &e))?;
    let svc: ServiceDoc = toml::from_str(text).map_err(|e| {
        let mut err = doc.schema_error(origin, &e);
        if let ConfigError::Invalid { reason, .. } = &mut err
            && reason.starts_with("unknown field")
        {
            reason.push_str(
                "; a cluster's service holds [[backend]] and [[vip]] only ([agent], [[interface]], [hooks] and [cluster] are each host's own)",
            );
        }
        err
    })?;
    let cfg = Config {
        backends: svc.backends.clone(),
        vips: svc.vips.clone(),
        ..Config::default()
    };
    let mut issues = validate::validate_service(&cfg, &doc);
    if !issues.is_empty() {
        issues.sort_by_key(|(p, _)| doc.line_of(p));
        let (p, reason) = issues.swap_remove(0);
        return Err(doc.error_at(origin, &p, reason));
    }
    Ok(svc)
}

/// A whole, validated config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`.
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[[interface]]`: where `vpnlb_ingress` is attached (at least one).
    #[serde(rename = "interface", default)]
    pub interfaces: Vec<InterfaceConfig>,
    /// `[[backend]]`, in file order.
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendConfig>,
    /// `[[vip]]`, in file order.
    #[serde(rename = "vip", default)]
    pub vips: Vec<VipConfig>,
    /// `[hooks]`.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// `[cluster]`: this host is a member of a cluster, whose service (backends and VIPs) comes
    /// from etcd. None: a single host, everything in this file.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Where the config came from, to point at its lines after parsing ([`Config::error_at`]).
    #[serde(skip)]
    pub source: ConfigSource,
}

impl Config {
    pub fn backend(&self, name: &str) -> Option<&BackendConfig> {
        self.backends.iter().find(|b| b.name == name)
    }

    pub fn vip(&self, name: &str) -> Option<&VipConfig> {
        self.vips.iter().find(|v| v.name == name)
    }

    /// Every ring the data plane needs, in file order: each VIP's default pool order, then one
    /// per class.
    pub fn ring_keys(&self) -> Vec<RingKey> {
        self.vips
            .iter()
            .flat_map(|v| {
                std::iter::once(RingKey::default_of(&v.name)).chain(
                    v.classes
                        .iter()
                        .map(|c| RingKey::class_of(&v.name, &c.name)),
                )
            })
            .collect()
    }

    /// This host's config with a cluster's service in place of its (empty) backends and VIPs. The
    /// result's errors point into the service document (`service_text`, named `origin`).
    pub fn with_service(&self, svc: &ServiceDoc, service_text: &str, origin: &str) -> Config {
        Config {
            backends: svc.backends.clone(),
            vips: svc.vips.clone(),
            source: ConfigSource {
                origin: origin.to_string(),
                text: Some(Arc::from(service_text)),
            },
            ..self.clone()
        }
    }

    /// The file name given to [`parse`] / [`load`] ("" for a config built in code).
    pub fn origin(&self) -> &str {
        &self.source.origin
    }

    /// An error pointing at `path` in this config's file, for problems found after parsing (an
    /// interface that does not exist on this host, a MAC that cannot be resolved, ...). The line
    /// is that of the deepest part of `path` present in the file; 0 when the config has no
    /// source text.
    pub fn error_at(&self, path: &FieldPath, reason: impl Into<String>) -> ConfigError {
        let reason = reason.into();
        if let Some(text) = &self.source.text
            && let Ok(doc) = locate::Doc::parse(text)
        {
            return doc.error_at(&self.source.origin, path, reason);
        }
        ConfigError::Invalid {
            file: self.source.origin.clone(),
            line: 0,
            field: path.to_string(),
            reason,
        }
    }

    /// Checks every interface name against this host: each `[[interface]]` must exist, and a
    /// backend's `interface` must be one of them or exist. `exists` is the host's view (for
    /// example `|n| Path::new("/sys/class/net").join(n).exists()`), so this stays testable.
    pub fn check_interfaces(&self, exists: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        for (i, iface) in self.interfaces.iter().enumerate() {
            if !exists(&iface.name) {
                return Err(self.error_at(
                    &FieldPath::new().key("interface").index(i).key("name"),
                    format!("no interface named {:?} on this host", iface.name),
                ));
            }
        }
        for (i, b) in self.backends.iter().enumerate() {
            if let Some(name) = &b.interface
                && !self.interfaces.iter().any(|x| &x.name == name)
                && !exists(name)
            {
                return Err(self.error_at(
                    &FieldPath::new().key("backend").index(i).key("interface"),
                    format!("no interface named {name:?} on this host"),
                ));
            }
        }
        Ok(())
    }
}

/// The origin and text of a parsed config. Ignored by `==` (two configs are equal when their
/// settings are).
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub origin: String,
    pub text: Option<Arc<str>>,
}

impl PartialEq for ConfigSource {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for ConfigSource {}

/// `[agent]`: process-wide settings. Every key is optional.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Directory of the pinned maps (bpffs).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Unix socket of the operator CLI.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Prometheus endpoint; `""` in the file (None) disables it.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "de_metrics_listen",
        serialize_with = "ser_metrics_listen"
    )]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Capacity of the session table (LRU).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// Session inserts per CPU per second before the flood guard stops inserting; 0 = off.
    #[serde(default)]
    pub flood_max_inserts_per_sec: u32,
    /// Outer IPv4 source for ipip/gue to IPv4 backends.
    #[serde(default)]
    pub encap_source_v4: Option<Ipv4Addr>,
    /// Low bits of the outer IPv4 source taken from the flow hash (0..=16).
    #[serde(default)]
    pub encap_source_v4_hash_bits: u8,
    /// Outer IPv6 source for ipip/gue to IPv6 backends.
    #[serde(default)]
    pub encap_source_v6: Option<Ipv6Addr>,
    /// Low bits of the outer IPv6 source taken from the flow hash (0..=32).
    #[serde(default)]
    pub encap_source_v6_hash_bits: u8,
}

pub fn default_pin_dir() -> PathBuf {
    crate::dataplane::loader::default_pin_dir()
}
pub fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/vpnlb/control.sock")
}
pub fn default_metrics_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
}
pub fn default_max_sessions() -> u32 {
    DEFAULT_MAX_SESSIONS
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            pin_dir: default_pin_dir(),
            control_socket: default_control_socket(),
            metrics_listen: default_metrics_listen(),
            log_format: LogFormat::default(),
            max_sessions: default_max_sessions(),
            flood_max_inserts_per_sec: 0,
            encap_source_v4: None,
            encap_source_v4_hash_bits: 0,
            encap_source_v6: None,
            encap_source_v6_hash_bits: 0,
        }
    }
}

fn de_metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid listen address {s:?}: expected IP:port such as \"127.0.0.1:9100\" or \
             \"[::1]:9100\", or \"\" to disable metrics"
        ))
    })
}

fn ser_metrics_listen<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

/// `agent.log_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

pub use crate::dataplane::attach::AttachMode;

/// `[[interface]]`: an interface `vpnlb_ingress` is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    #[serde(default)]
    pub mode: AttachMode,
}

/// `[[backend]]`: one VPN gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique, `[A-Za-z0-9_.-]+`.
    pub name: String,
    pub address: IpAddr,
    /// Next-hop MAC; resolved from the neighbour table at run time when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Egress interface; absent = the first `[[interface]]`.
    #[serde(default)]
    pub interface: Option<String>,
    /// 1..=1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// `[[backend.check]]`; none = always up.
    #[serde(rename = "check", default)]
    pub checks: Vec<CheckSpec>,
    /// Static ESP SPI range of this gateway (strongSwan `charon.spi_min`/`spi_max`): ESP with an
    /// SPI in `esp_spi_min..=esp_spi_max` goes here on a session miss, learned or not.
    #[serde(default)]
    pub esp_spi_min: Option<u32>,
    #[serde(default)]
    pub esp_spi_max: Option<u32>,
    /// Static IKE SPI label (strongSwan `charon.spi_mask`/`spi_label`): IKE whose responder SPI
    /// has `ike_spi_label` under `ike_spi_mask` (contiguous high bits) goes here.
    #[serde(default)]
    pub ike_spi_mask: Option<Hex64>,
    #[serde(default)]
    pub ike_spi_label: Option<Hex64>,
}

/// A 64-bit value written as a TOML integer or, above `i64::MAX`, a `"0x..."` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hex64(pub u64);

impl Serialize for Hex64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#018x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "invalid 64-bit value {s:?}: expected an integer or a hex string such as \
                 \"0xff00000000000000\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(v) => Ok(Hex64(v)),
            Raw::Str(s) => {
                let digits = s
                    .strip_prefix("0x")
                    .or_else(|| s.strip_prefix("0X"))
                    .ok_or_else(|| bad(&s))?;
                u64::from_str_radix(&digits.replace('_', ""), 16)
                    .map(Hex64)
                    .map_err(|_| bad(&s))
            }
        }
    }
}

pub fn default_weight() -> u32 {
    1
}

impl BackendConfig {
    /// The `ID_RANGES` prefixes of this backend's static ESP SPI range and IKE SPI label (a
    /// half-given or invalid pair, which validation reports, gives none).
    pub fn id_prefixes(&self) -> Vec<IdPrefix> {
        let mut out = Vec::new();
        if let (Some(min), Some(max)) = (self.esp_spi_min, self.esp_spi_max)
            && min <= max
        {
            out.extend(esp_range_prefixes(min, max));
        }
        if let (Some(mask), Some(label)) = (self.ike_spi_mask, self.ike_spi_label)
            && let Ok(p) = ike_label_prefix(mask.0, label.0)
        {
            out.push(p);
        }
        out
    }
}

/// `[[vip]]`: one (address, port, protocol) the data plane balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// Unique, `[A-Za-z0-9_.-]+`.
    pub name: String,
    pub address: IpAddr,
    /// Required for udp/tcp; absent or 0 for esp. Use [`VipConfig::port`] for the effective one.
    #[serde(default)]
    pub port: Option<u16>,
    pub protocol: Protocol,
    #[serde(default)]
    pub hash: HashMode,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Only with `forwarding = "gue"` (default 6080). Use [`VipConfig::gue_port`].
    #[serde(default)]
    pub gue_port: Option<u16>,
    /// Sessions idle this long are re-picked; 0 = never.
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// Largest outer packet after encapsulation (ipip/gue); 0 = unlimited.
    #[serde(default)]
    pub mtu: u32,
    /// Maglev table size: a prime <= 65537.
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// `[[vip.pool]]` (at least one).
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolConfig>,
    /// `[[vip.class]]`.
    #[serde(rename = "class", default)]
    pub classes: Vec<ClassConfig>,
    /// Learn the gateway-chosen ids of this VPN protocol and keep roaming clients on their
    /// gateway; VIPs of one address with the same value share what they learn.
    #[serde(default)]
    pub session_ids: Option<SessionIds>,
}

/// `vip.session_ids`: which protocol's ids the data plane learns (docs/datapath.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionIds {
    /// WireGuard receiver indices (UDP).
    Wireguard,
    /// IKE responder SPIs and ESP SPIs (UDP 500, NAT-T on any other UDP port, esp).
    Ipsec,
    /// OpenVPN P_DATA_V2 peer-ids (UDP).
    Openvpn,
}

impl SessionIds {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionIds::Wireguard => "wireguard",
            SessionIds::Ipsec => "ipsec",
            SessionIds::Openvpn => "openvpn",
        }
    }

    /// The `VIP_F_IDS_*` flag.
    pub fn flag(self) -> u32 {
        match self {
            SessionIds::Wireguard => VIP_F_IDS_WIREGUARD,
            SessionIds::Ipsec => VIP_F_IDS_IPSEC,
            SessionIds::Openvpn => VIP_F_IDS_OPENVPN,
        }
    }
}

pub fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}

impl VipConfig {
    /// The destination port the data plane matches (0 for ESP).
    pub fn port(&self) -> u16 {
        match self.protocol {
            Protocol::Esp => 0,
            _ => self.port.unwrap_or(0),
        }
    }

    /// The GUE destination port (0 unless `forwarding = "gue"`).
    pub fn gue_port(&self) -> u16 {
        match self.forwarding {
            Forwarding::Gue => self.gue_port.unwrap_or(DEFAULT_GUE_PORT),
            _ => 0,
        }
    }

    /// The `VIPS` key.
    pub fn vip_key(&self) -> VipKey {
        VipKey::new(self.address, self.port(), self.protocol.number())
    }

    /// The `VipMeta::flags` the config decides (`VIP_F_HASH_SRC_ONLY`, `VIP_F_IDS_*`); flags
    /// that follow from installed state (classes) are the agent's.
    pub fn flags(&self) -> u32 {
        let hash = match self.hash {
            HashMode::Source => VIP_F_HASH_SRC_ONLY,
            HashMode::FiveTuple => 0,
        };
        hash | self.session_ids.map_or(0, SessionIds::flag)
    }

    pub fn idle_timeout_ns(&self) -> u64 {
        self.idle_timeout_s.saturating_mul(1_000_000_000)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn class(&self, name: &str) -> Option<&ClassConfig> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// The pools in the order they serve: by descending priority for the default order
    /// (`class = None`), or the class's `pool_order`. Unknown class: empty.
    pub fn pool_order(&self, class: Option<&str>) -> Vec<&PoolConfig> {
        match class {
            None => {
                let mut order: Vec<&PoolConfig> = self.pools.iter().collect();
                order.sort_by_key(|p| std::cmp::Reverse(p.priority));
                order
            }
            Some(c) => self
                .class(c)
                .map(|c| c.pool_order.iter().filter_map(|p| self.pool(p)).collect())
                .unwrap_or_default(),
        }
    }

    /// Names of every backend any pool lists, first appearance first.
    pub fn backend_names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for b in self.pools.iter().flat_map(|p| &p.backends) {
            if !out.contains(&b.as_str()) {
                out.push(b);
            }
        }
        out
    }
}

/// `vip.protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Udp,
    Tcp,
    Esp,
}

impl Protocol {
    /// IP protocol number (`PROTO_*`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Udp => PROTO_UDP,
            Protocol::Tcp => PROTO_TCP,
            Protocol::Esp => PROTO_ESP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
            Protocol::Esp => "esp",
        }
    }
}

/// `vip.hash`: what picks a new flow's backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// Addresses, ports (or the ESP SPI) and protocol.
    #[default]
    FiveTuple,
    /// Source address only: IKE 500/4500 and ESP of one peer land on one gateway.
    Source,
}

/// `vip.forwarding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Rewrite MACs only (direct server return); the gateways own the VIP.
    #[default]
    L2dsr,
    /// IP-in-IP to the gateway.
    Ipip,
    /// Generic UDP encapsulation to the gateway.
    Gue,
}

impl Forwarding {
    /// `FWD_MODE_*`.
    pub fn mode(self) -> u32 {
        match self {
            Forwarding::L2dsr => FWD_MODE_L2DSR,
            Forwarding::Ipip => FWD_MODE_IPIP,
            Forwarding::Gue => FWD_MODE_GUE,
        }
    }

    pub fn encapsulates(self) -> bool {
        !matches!(self, Forwarding::L2dsr)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::L2dsr => "l2dsr",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
        }
    }
}

/// `[[vip.pool]]`: backends that share load; pools fail over by priority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Higher serves first; distinct within a VIP.
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// Names of `[[backend]]`s.
    pub backends: Vec<String>,
}

pub fn default_priority() -> i64 {
    100
}

/// `[[vip.class]]`: traffic matched by DSCP served with another pool order (own ring).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub name: String,
    /// DSCP values (0..=63) this class matches.
    pub dscp: Vec<u8>,
    /// Names of this VIP's pools, in the order they serve this class.
    pub pool_order: Vec<String>,
}

/// `[hooks]`: what runs on backend state changes and failovers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// argv of a command that gets the event JSON on stdin; empty = none.
    #[serde(default)]
    pub exec: Vec<String>,
    /// URL the event JSON is POSTed to.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Limit for one hook run or request.
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
}

pub fn default_hook_timeout_ms() -> u64 {
    2000
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            exec: Vec::new(),
            webhook: None,
            timeout_ms: default_hook_timeout_ms(),
        }
    }
}

/// An Ethernet address, written `02:00:00:00:00:11` (hex pairs separated by `:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
    /// Neither multicast/broadcast (group bit) nor all-zero: usable as a next hop.
    pub fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid MAC address {s:?}: expected six hex pairs such as \"02:00:00:00:00:11\""
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
