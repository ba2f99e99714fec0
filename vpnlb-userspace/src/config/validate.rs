//! Semantic checks of a config that parsed against the schema: names, references between items,
//! ranges, and what the data plane can hold. Each problem is reported at the path of the key that
//! is wrong (or of the item that lacks it); the caller turns paths into lines.

use std::collections::HashMap;
use std::net::IpAddr;

use vpnlb_common::{MAX_BACKENDS, MAX_VIPS, RING_SIZE_MAX};

use super::error::FieldPath;
use super::locate::Doc;
use super::{
    AgentConfig, BackendConfig, CheckSpec, ClusterConfig, Config, Forwarding, HashMode,
    HooksConfig, Protocol, SessionIds, VipConfig,
};

/// Longest backend/VIP/pool/class name.
pub const MAX_NAME_LEN: usize = 64;
/// Highest backend weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Shortest health-check interval and BFD timer (ms).
const MIN_INTERVAL_MS: u64 = 10;
/// wireguard-go drops handshake initiations from one peer key less than 20 ms apart; with the
/// runner's -10% jitter 50 ms stays clear of that.
const MIN_WIREGUARD_INTERVAL_MS: u64 = 50;
/// Longest BFD timer (ms): the protocol carries microseconds in 32 bits.
const MAX_BFD_INTERVAL_MS: u64 = u32::MAX as u64 / 1000;
/// Longest idle timeout that fits in nanoseconds in a u64.
const MAX_IDLE_TIMEOUT_S: u64 = u64::MAX / 1_000_000_000;
/// Linux IFNAMSIZ - 1.
const MAX_IFNAME_LEN: usize = 15;
/// Lowest ESP SPI a static range may start at (1..=255 are reserved, RFC 4303 2.1).
const MIN_ESP_SPI: u32 = 256;

pub(crate) type Issue = (FieldPath, String);

pub(crate) fn validate(cfg: &Config, doc: &Doc<'_>) -> Vec<Issue> {
    let mut v = Checker {
        doc,
        issues: Vec::new(),
    };
    v.agent(&cfg.agent);
    v.interfaces(cfg);
    v.backends(cfg);
    v.vips(cfg);
    v.hooks(&cfg.hooks);
    if let Some(c) = &cfg.cluster {
        v.cluster(c, cfg);
    }
    v.issues
}

/// The checks of a cluster's service document: its backends and VIPs.
pub(crate) fn validate_service(cfg: &Config, doc: &Doc<'_>) -> Vec<Issue> {
    let mut v = Checker {
        doc,
        issues: Vec::new(),
    };
    v.backends(cfg);
    v.vips(cfg);
    v.issues
}

/// Trial division; the largest input is 65537.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn path(key: &str) -> FieldPath {
    FieldPath::new().key(key)
}

fn unicast_problem(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("is the unspecified address")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        Some("is the broadcast address")
    } else {
        None
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

struct Checker<'a, 'i> {
    doc: &'a Doc<'i>,
    issues: Vec<Issue>,
}

impl Checker<'_, '_> {
    fn err(&mut self, path: FieldPath, reason: impl Into<String>) {
        self.issues.push((path, reason.into()));
    }

    fn line(&self, path: &FieldPath) -> usize {
        self.doc.line_of(path)
    }

    /// A name of an item: `[A-Za-z0-9_.-]{1,64}`.
    fn name(&mut self, at: FieldPath, name: &str) {
        if name.is_empty() {
            self.err(at, "must not be empty");
        } else if name.len() > MAX_NAME_LEN {
            self.err(at, format!("longer than {MAX_NAME_LEN} characters"));
        } else if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            self.err(
                at,
                format!("{name:?} contains {c:?}; names use only A-Z a-z 0-9 _ . -"),
            );
        }
    }

    /// Reports the second and later uses of each name among `names` (paths of their `name` keys).
    fn unique<'n>(&mut self, what: &str, names: impl IntoIterator<Item = (FieldPath, &'n str)>) {
        let mut seen: HashMap<&str, FieldPath> = HashMap::new();
        for (at, name) in names {
            if let Some(first) = seen.get(name) {
                let line = self.line(first);
                self.err(
                    at,
                    format!("duplicate {what} {name:?} (first at line {line})"),
                );
            } else {
                seen.insert(name, at);
            }
        }
    }

    fn interface_name(&mut self, at: FieldPath, name: &str) {
        let problem = if name.is_empty() {
            Some("must not be empty".to_string())
        } else if name.len() > MAX_IFNAME_LEN {
            Some(format!(
                "{name:?} is longer than {MAX_IFNAME_LEN} characters"
            ))
        } else if name == "." || name == ".." {
            Some(format!("{name:?} is not an interface name"))
        } else {
            name.chars()
                .find(|c| c.is_whitespace() || matches!(c, '/' | ':' | '\0'))
                .map(|c| format!("{name:?} contains {c:?}, which interface names cannot"))
        };
        if let Some(p) = problem {
            self.err(at, p);
        }
    }

    fn agent(&mut self, a: &AgentConfig) {
        let at = |k: &str| path("agent").key(k);
        if !a.pin_dir.is_absolute() {
            self.err(at("pin_dir"), "must be an absolute path");
        }
        if !a.control_socket.is_absolute() {
            self.err(at("control_socket"), "must be an absolute path");
        }
        if a.max_sessions == 0 {
            self.err(at("max_sessions"), "must be at least 1");
        }
        if let Some(ip) = a.encap_source_v4
            && let Some(p) = unicast_problem(IpAddr::V4(ip))
        {
            self.err(at("encap_source_v4"), format!("{ip} {p}"));
        }
        if a.encap_source_v4_hash_bits > 16 {
            self.err(
                at("encap_source_v4_hash_bits"),
                format!("{} is out of range 0..=16", a.encap_source_v4_hash_bits),
            );
        } else if a.encap_source_v4_hash_bits > 0 && a.encap_source_v4.is_none() {
            self.err(
                at("encap_source_v4_hash_bits"),
                "has no effect without agent.encap_source_v4",
            );
        }
        if let Some(ip) = a.encap_source_v6
            && let Some(p) = unicast_problem(IpAddr::V6(ip))
        {
            self.err(at("encap_source_v6"), format!("{ip} {p}"));
        }
        if a.encap_source_v6_hash_bits > 32 {
            self.err(
                at("encap_source_v6_hash_bits"),
                format!("{} is out of range 0..=32", a.encap_source_v6_hash_bits),
            );
        } else if a.encap_source_v6_hash_bits > 0 && a.encap_source_v6.is_none() {
            self.err(
                at("encap_source_v6_hash_bits"),
                "has no effect without agent.encap_source_v6",
            );
        }
    }

    fn interfaces(&mut self, cfg: &Config) {
        if cfg.interfaces.is_empty() {
            self.err(
                path("interface"),
                "at least one [[interface]] is required (where vpnlb_ingress is attached)",
            );
        }
        let at = |i: usize| path("interface").index(i).key("name");
        for (i, iface) in cfg.interfaces.iter().enumerate() {
            self.interface_name(at(i), &iface.name);
        }
        self.unique(
            "interface",
            cfg.interfaces
                .iter()
                .enumerate()
                .map(|(i, x)| (at(i), x.name.as_str())),
        );
    }

    fn backends(&mut self, cfg: &Config) {
        let max = MAX_BACKENDS as usize - 1;
        if cfg.backends.len() > max {
            self.err(
                path("backend").index(max),
                format!("too many backends: at most {max} (data-plane ids 1..={max})"),
            );
        }
        for (i, b) in cfg.backends.iter().enumerate() {
            self.backend(path("backend").index(i), b);
        }
        self.id_range_overlaps(cfg);
        self.unique(
            "backend name",
            cfg.backends
                .iter()
                .enumerate()
                .map(|(i, b)| (path("backend").index(i).key("name"), b.name.as_str())),
        );
    }

    fn backend(&mut self, at: FieldPath, b: &BackendConfig) {
        self.name(at.clone().key("name"), &b.name);
        if let Some(p) = unicast_problem(b.address) {
            self.err(at.clone().key("address"), format!("{} {p}", b.address));
        }
        if let Some(mac) = b.mac
            && !mac.is_unicast()
        {
            self.err(
                at.clone().key("mac"),
                format!("{mac} is not a unicast MAC address"),
            );
        }
        if let Some(name) = &b.interface {
            self.interface_name(at.clone().key("interface"), name);
        }
        if !(1..=MAX_WEIGHT).contains(&b.weight) {
            self.err(
                at.clone().key("weight"),
                format!("{} is out of range 1..={MAX_WEIGHT}", b.weight),
            );
        }
        self.id_ranges(&at, b);
        let mut bfd_seen = false;
        for (j, check) in b.checks.iter().enumerate() {
            let cat = at.clone().key("check").index(j);
            if matches!(check, CheckSpec::Bfd { .. }) {
                if bfd_seen {
                    self.err(
                        cat.clone().key("type"),
                        "only one bfd check per backend (one BFD session per peer)",
                    );
                }
                bfd_seen = true;
            }
            self.check(cat, check);
        }
    }

    /// A backend's static session-id ranges: both ends (or mask and label) or neither, in order.
    fn id_ranges(&mut self, at: &FieldPath, b: &BackendConfig) {
        let k = |key: &str| at.clone().key(key);
        match (b.esp_spi_min, b.esp_spi_max) {
            (Some(_), None) => self.err(k("esp_spi_min"), "esp_spi_min needs esp_spi_max"),
            (None, Some(_)) => self.err(k("esp_spi_max"), "esp_spi_max needs esp_spi_min"),
            (Some(min), Some(max)) if min < MIN_ESP_SPI || min > max => self.err(
                k("esp_spi_min"),
                format!(
                    "{min:#x}..={max:#x} is not a range of valid SPIs ({MIN_ESP_SPI}..=0xffffffff, \
                     min <= max; SPIs below 256 are reserved by RFC 4303)"
                ),
            ),
            _ => {}
        }
        match (b.ike_spi_mask, b.ike_spi_label) {
            (Some(_), None) => self.err(k("ike_spi_mask"), "ike_spi_mask needs ike_spi_label"),
            (None, Some(_)) => self.err(k("ike_spi_label"), "ike_spi_label needs ike_spi_mask"),
            (Some(mask), Some(label)) => {
                if let Err(e) = crate::dataplane::session_ids::ike_label_prefix(mask.0, label.0) {
                    self.err(k("ike_spi_mask"), e);
                }
            }
            _ => {}
        }
    }

    /// Two backends must not claim the same ESP SPI or IKE SPI label: the data plane could only
    /// send such ids to one of them.
    fn id_range_overlaps(&mut self, cfg: &Config) {
        let ranges: Vec<(usize, Vec<crate::dataplane::session_ids::IdPrefix>)> = cfg
            .backends
            .iter()
            .map(|b| b.id_prefixes())
            .enumerate()
            .filter(|(_, p)| !p.is_empty())
            .collect();
        for (n, (i, mine)) in ranges.iter().enumerate() {
            let Some((j, key)) = ranges[..n].iter().find_map(|(j, theirs)| {
                mine.iter().find_map(|a| {
                    theirs
                        .iter()
                        .find(|b| a.matches(&b.data) || b.matches(&a.data))
                        .map(|_| (*j, a.data.kind))
                })
            }) else {
                continue;
            };
            let field = if key == vpnlb_common::ID_ESP {
                "esp_spi_min"
            } else {
                "ike_spi_label"
            };
            let line = self.line(&path("backend").index(j));
            self.err(
                path("backend").index(*i).key(field),
                format!(
                    "overlaps the range of backend {:?} (line {line}): an id can have one owner",
                    cfg.backends[j].name
                ),
            );
        }
    }

    fn check(&mut self, at: FieldPath, c: &CheckSpec) {
        let k = |key: &str| at.clone().key(key);
        let t = c.timing();
        if let CheckSpec::Bfd {
            desired_min_tx_ms,
            required_min_rx_ms,
            detect_mult,
            ..
        } = c
        {
            for key in ["interval_ms", "timeout_ms"] {
                if self.doc.has(&k(key)) {
                    self.err(
                        k(key),
                        "not used by bfd checks: their timers are desired_min_tx_ms, \
                         required_min_rx_ms and detect_mult",
                    );
                }
            }
            for (key, ms) in [
                ("desired_min_tx_ms", *desired_min_tx_ms),
                ("required_min_rx_ms", *required_min_rx_ms),
            ] {
                if !(MIN_INTERVAL_MS..=MAX_BFD_INTERVAL_MS).contains(&ms) {
                    self.err(
                        k(key),
                        format!(
                            "{ms} ms is out of range {MIN_INTERVAL_MS}..={MAX_BFD_INTERVAL_MS} ms"
                        ),
                    );
                }
            }
            if *detect_mult == 0 {
                self.err(k("detect_mult"), "must be at least 1");
            }
        } else {
            if t.interval_ms < MIN_INTERVAL_MS {
                self.err(
                    k("interval_ms"),
                    format!(
                        "{} ms is below the minimum of {MIN_INTERVAL_MS} ms",
                        t.interval_ms
                    ),
                );
            }
            if t.timeout_ms == 0 {
                self.err(k("timeout_ms"), "must be at least 1");
            } else if t.timeout_ms > t.interval_ms {
                // Point at whichever of the two the file sets (timeout_ms when both are).
                if self.doc.has(&k("timeout_ms")) || !self.doc.has(&k("interval_ms")) {
                    self.err(
                        k("timeout_ms"),
                        format!(
                            "{} ms is longer than interval_ms ({} ms)",
                            t.timeout_ms, t.interval_ms
                        ),
                    );
                } else {
                    self.err(
                        k("interval_ms"),
                        format!(
                            "{} ms is shorter than timeout_ms ({} ms, the default)",
                            t.interval_ms, t.timeout_ms
                        ),
                    );
                }
            }
        }
        if t.rise == 0 {
            self.err(k("rise"), "must be at least 1");
        }
        if t.fall == 0 {
            self.err(k("fall"), "must be at least 1");
        }
        match c {
            CheckSpec::Tcp { port, .. }
            | CheckSpec::Udp { port, .. }
            | CheckSpec::Wireguard { port, .. }
            | CheckSpec::Ikev2 { port, .. }
                if *port == 0 =>
            {
                self.err(k("port"), "must be 1..=65535");
            }
            CheckSpec::Http {
                port,
                path,
                expect_status,
                host,
                ..
            }
            | CheckSpec::Https {
                port,
                path,
                expect_status,
                host,
                ..
            } => {
                if *port == 0 {
                    self.err(k("port"), "must be 1..=65535");
                }
                if !path.starts_with('/') {
                    self.err(k("path"), format!("{path:?} must start with \"/\""));
                }
                if !(100..=599).contains(expect_status) {
                    self.err(
                        k("expect_status"),
                        format!("{expect_status} is not an HTTP status (100..=599)"),
                    );
                }
                if host.as_deref() == Some("") {
                    self.err(k("host"), "must not be empty");
                }
            }
            _ => {}
        }
        match c {
            CheckSpec::Https {
                insecure: true,
                ca_file: Some(_),
                ..
            } => {
                self.err(
                    k("ca_file"),
                    "has no effect with insecure = true (certificates are not verified)",
                );
            }
            CheckSpec::Https {
                ca_file: Some(f), ..
            } if f.is_empty() => {
                self.err(k("ca_file"), "must not be empty");
            }
            CheckSpec::Udp {
                payload,
                payload_hex,
                expect,
                expect_hex,
                ..
            } => {
                for (text_key, text, hex_key, hex) in [
                    ("payload", payload, "payload_hex", payload_hex),
                    ("expect", expect, "expect_hex", expect_hex),
                ] {
                    if text.is_some() && hex.is_some() {
                        self.err(
                            k(hex_key),
                            format!("set only one of {text_key} and {hex_key}"),
                        );
                    } else if let Some(h) = hex
                        && let Err(e) = crate::health::udp::parse_hex(h)
                    {
                        self.err(k(hex_key), format!("invalid hex: {e}"));
                    }
                }
            }
            CheckSpec::Wireguard {
                public_key,
                private_key,
                private_key_file,
                ..
            } => {
                use crate::health::wireguard::{parse_key, public_key_bytes};
                if t.interval_ms < MIN_WIREGUARD_INTERVAL_MS {
                    self.err(
                        k("interval_ms"),
                        format!(
                            "{} ms is below the minimum of {MIN_WIREGUARD_INTERVAL_MS} ms for \
                             wireguard checks (gateways drop initiations that come faster)",
                            t.interval_ms
                        ),
                    );
                }
                if let Err(e) = parse_key(public_key) {
                    self.err(k("public_key"), format!("invalid key: {e}"));
                }
                match (private_key, private_key_file) {
                    (None, None) => self.err(
                        at.clone(),
                        "a wireguard check needs private_key or private_key_file (the probe's \
                         own key, configured as a peer on the gateway)",
                    ),
                    (Some(_), Some(_)) => self.err(
                        k("private_key_file"),
                        "set only one of private_key and private_key_file",
                    ),
                    (Some(key), None) => match parse_key(key) {
                        Err(e) => self.err(k("private_key"), format!("invalid key: {e}")),
                        Ok(private) => {
                            if parse_key(public_key).is_ok_and(|p| p == public_key_bytes(private)) {
                                self.err(
                                    k("private_key"),
                                    "is the private key of public_key: the probe needs a key of \
                                     its own, configured as a peer on the gateway",
                                );
                            }
                        }
                    },
                    (None, Some(f)) if f.is_empty() => {
                        self.err(k("private_key_file"), "must not be empty");
                    }
                    (None, Some(_)) => {}
                }
                match c {
                    CheckSpec::Wireguard {
                        inside: Some(i), ..
                    } => self.inside_probe(&at, i, t),
                    _ => {
                        for key in ["tunnel_address", "inside_timeout_ms"] {
                            if self.doc.has(&k(key)) {
                                self.err(
                                    k(key),
                                    "is only used with `inside` (the host to ping through the tunnel)",
                                );
                            }
                        }
                    }
                }
            }
            CheckSpec::Exec { command, .. } => {
                if command.is_empty() {
                    self.err(k("command"), "needs at least the program to run");
                } else if command[0].is_empty() {
                    self.err(k("command").index(0), "the program path must not be empty");
                }
            }
            _ => {}
        }
    }

    /// The `inside` keys of a wireguard check: a unicast host, a tunnel address of its family,
    /// and the echo's time within the interval.
    fn inside_probe(
        &mut self,
        at: &FieldPath,
        i: &crate::health::spec::InsideProbe,
        t: &crate::health::CheckTiming,
    ) {
        let k = |key: &str| at.clone().key(key);
        let odd = |a: IpAddr| {
            a.is_unspecified() || a.is_multicast() || a == IpAddr::from([255, 255, 255, 255])
        };
        if odd(i.addr) {
            self.err(k("inside"), format!("{} is not a unicast address", i.addr));
        }
        if odd(i.tunnel_address) {
            self.err(
                k("tunnel_address"),
                format!("{} is not a unicast address", i.tunnel_address),
            );
        } else if i.tunnel_address.is_ipv4() != i.addr.is_ipv4() {
            self.err(
                k("tunnel_address"),
                format!(
                    "{} and inside {} are of different families: the echo goes from one to the other",
                    i.tunnel_address, i.addr
                ),
            );
        } else if i.tunnel_address == i.addr {
            self.err(k("tunnel_address"), "must not be the inside host itself");
        }
        if i.timeout_ms == 0 {
            self.err(k("inside_timeout_ms"), "must be at least 1");
        } else if t.timeout_ms.saturating_add(i.timeout_ms) > t.interval_ms {
            let key = if self.doc.has(&k("inside_timeout_ms")) {
                "inside_timeout_ms"
            } else {
                "inside"
            };
            self.err(
                k(key),
                format!(
                    "timeout_ms + inside_timeout_ms ({} + {} ms) is longer than interval_ms ({} ms): \
                     a probe must end before the next one starts",
                    t.timeout_ms, i.timeout_ms, t.interval_ms
                ),
            );
        }
    }

    fn vips(&mut self, cfg: &Config) {
        let max = MAX_VIPS as usize;
        if cfg.vips.len() > max {
            self.err(
                path("vip").index(max),
                format!("too many vips: at most {max}"),
            );
        }
        let mut rings = 0usize;
        let mut keys: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        let mut source_hash: HashMap<IpAddr, usize> = HashMap::new();
        for (i, v) in cfg.vips.iter().enumerate() {
            let at = path("vip").index(i);
            self.vip(cfg, at.clone(), v);
            match keys.get(&(v.address, v.port(), v.protocol)) {
                Some(&first) => {
                    let line = self.line(&path("vip").index(first));
                    self.err(
                        at.clone(),
                        format!(
                            "same address, port and protocol as vip {:?} (line {line})",
                            cfg.vips[first].name
                        ),
                    );
                }
                None => {
                    keys.insert((v.address, v.port(), v.protocol), i);
                }
            }
            if v.hash == HashMode::Source {
                match source_hash.get(&v.address) {
                    Some(&first) if !same_selection(&cfg.vips[first], v) => {
                        let line = self.line(&path("vip").index(first));
                        self.err(
                            at.clone().key("hash"),
                            format!(
                                "hash = \"source\" vips on {} must have the same pools and \
                                 ring_size so that a peer's IKE and ESP reach one gateway; \
                                 vip {:?} (line {line}) differs",
                                v.address, cfg.vips[first].name
                            ),
                        );
                    }
                    Some(_) => {}
                    None => {
                        source_hash.insert(v.address, i);
                    }
                }
            }
            // One ring per vip and per class, all in 0..MAX_VIPS.
            for c in 0..=v.classes.len() {
                rings += 1;
                if rings == max + 1 {
                    let where_ = if c == 0 {
                        at.clone()
                    } else {
                        at.clone().key("class").index(c - 1)
                    };
                    self.err(
                        where_,
                        format!("too many rings: every vip and every class takes one of {max}"),
                    );
                }
            }
        }
        self.unique(
            "vip name",
            cfg.vips
                .iter()
                .enumerate()
                .map(|(i, v)| (path("vip").index(i).key("name"), v.name.as_str())),
        );
    }

    fn vip(&mut self, cfg: &Config, at: FieldPath, v: &VipConfig) {
        let k = |key: &str| at.clone().key(key);
        self.name(k("name"), &v.name);
        if let Some(p) = unicast_problem(v.address) {
            self.err(k("address"), format!("{} {p}", v.address));
        }
        match (v.protocol, v.port) {
            (Protocol::Udp | Protocol::Tcp, None | Some(0)) => self.err(
                k("port"),
                format!(
                    "protocol = {:?} needs a port (1..=65535)",
                    v.protocol.as_str()
                ),
            ),
            (Protocol::Esp, Some(p)) if p != 0 => self.err(
                k("port"),
                "must be absent or 0 with protocol = \"esp\" (ESP has no ports)",
            ),
            _ => {}
        }
        match (v.session_ids, v.protocol) {
            (Some(SessionIds::Ipsec), Protocol::Udp | Protocol::Esp)
            | (Some(SessionIds::Wireguard | SessionIds::Openvpn), Protocol::Udp)
            | (None, _) => {}
            (Some(ids), proto) => self.err(
                k("session_ids"),
                format!(
                    "{:?} ids are not carried by protocol = {:?} ({})",
                    ids.as_str(),
                    proto.as_str(),
                    if ids == SessionIds::Ipsec {
                        "ipsec: udp (500, NAT-T) or esp"
                    } else {
                        "udp only"
                    }
                ),
            ),
        }
        match (v.forwarding, v.gue_port) {
            (Forwarding::Gue, Some(0)) => self.err(k("gue_port"), "must be 1..=65535"),
            (Forwarding::L2dsr | Forwarding::Ipip, Some(_)) => self.err(
                k("gue_port"),
                format!(
                    "only used with forwarding = \"gue\" (this vip uses {:?})",
                    v.forwarding.as_str()
                ),
            ),
            _ => {}
        }
        let backends: Vec<&BackendConfig> = v
            .backend_names()
            .into_iter()
            .filter_map(|n| cfg.backend(n))
            .collect();
        if v.mtu != 0 {
            let v6 = backends.iter().find(|b| b.address.is_ipv6());
            if !v.forwarding.encapsulates() {
                self.err(
                    k("mtu"),
                    "only used with forwarding = \"ipip\" or \"gue\" (l2dsr does not add headers)",
                );
            } else if !(576..=65535).contains(&v.mtu) {
                self.err(k("mtu"), format!("{} is out of range 576..=65535", v.mtu));
            } else if let Some(b) = v6
                && v.mtu < 1280
            {
                self.err(
                    k("mtu"),
                    format!(
                        "{} is below 1280, the IPv6 minimum (backend {:?} is IPv6)",
                        v.mtu, b.name
                    ),
                );
            }
        }
        if v.idle_timeout_s > MAX_IDLE_TIMEOUT_S {
            self.err(
                k("idle_timeout_s"),
                format!(
                    "{} is above the maximum of {MAX_IDLE_TIMEOUT_S}",
                    v.idle_timeout_s
                ),
            );
        }
        if v.ring_size > RING_SIZE_MAX || !is_prime(v.ring_size) {
            self.err(
                k("ring_size"),
                format!(
                    "{} is not a prime <= {RING_SIZE_MAX} (for example 65537, 32771, 16381, \
                     4099, 1021, 251)",
                    v.ring_size
                ),
            );
        } else if let Some(p) = v.pools.iter().max_by_key(|p| p.backends.len())
            && (v.ring_size as usize) < p.backends.len()
        {
            self.err(
                k("ring_size"),
                format!(
                    "{} is smaller than pool {:?}'s {} backends",
                    v.ring_size,
                    p.name,
                    p.backends.len()
                ),
            );
        }
        if v.forwarding.encapsulates() {
            let a = &cfg.agent;
            for (is_v6, needed, missing) in [
                (false, "agent.encap_source_v4", a.encap_source_v4.is_none()),
                (true, "agent.encap_source_v6", a.encap_source_v6.is_none()),
            ] {
                if let Some(b) = backends.iter().find(|b| b.address.is_ipv6() == is_v6)
                    && missing
                {
                    self.err(
                        k("forwarding"),
                        format!(
                            "forwarding = {:?} to {} backend {:?} needs {needed}",
                            v.forwarding.as_str(),
                            family(b.address),
                            b.name
                        ),
                    );
                }
            }
        }
        self.pools(cfg, &at, v);
        self.classes(&at, v);
    }

    fn pools(&mut self, cfg: &Config, at: &FieldPath, v: &VipConfig) {
        if v.pools.is_empty() {
            self.err(
                at.clone().key("pool"),
                "a vip needs at least one [[vip.pool]]",
            );
        }
        let pat = |i: usize| at.clone().key("pool").index(i);
        let mut priorities: HashMap<i64, usize> = HashMap::new();
        for (i, p) in v.pools.iter().enumerate() {
            self.name(pat(i).key("name"), &p.name);
            match priorities.get(&p.priority) {
                Some(&first) => {
                    let line = self.line(&pat(first));
                    let default = if self.doc.has(&pat(i).key("priority")) {
                        ""
                    } else {
                        " (the default)"
                    };
                    self.err(
                        pat(i).key("priority"),
                        format!(
                            "priority {}{default} is also pool {:?}'s (line {line}); the pools \
                             of a vip need distinct priorities",
                            p.priority, v.pools[first].name
                        ),
                    );
                }
                None => {
                    priorities.insert(p.priority, i);
                }
            }
            if p.backends.is_empty() {
                self.err(pat(i).key("backends"), "a pool needs at least one backend");
            }
            for (j, b) in p.backends.iter().enumerate() {
                let bat = pat(i).key("backends").index(j);
                if cfg.backend(b).is_none() {
                    self.err(bat, format!("unknown backend {b:?}"));
                } else if p.backends[..j].contains(b) {
                    self.err(bat, format!("backend {b:?} is listed twice"));
                }
            }
        }
        self.unique(
            "pool name",
            v.pools
                .iter()
                .enumerate()
                .map(|(i, p)| (pat(i).key("name"), p.name.as_str())),
        );
    }

    fn classes(&mut self, at: &FieldPath, v: &VipConfig) {
        let cat = |i: usize| at.clone().key("class").index(i);
        let mut dscp_owner: HashMap<u8, usize> = HashMap::new();
        for (i, c) in v.classes.iter().enumerate() {
            self.name(cat(i).key("name"), &c.name);
            if c.dscp.is_empty() {
                self.err(cat(i).key("dscp"), "needs at least one DSCP value");
            }
            for (j, &d) in c.dscp.iter().enumerate() {
                let dat = cat(i).key("dscp").index(j);
                if d > 63 {
                    self.err(dat, format!("DSCP {d} is out of range 0..=63"));
                } else if c.dscp[..j].contains(&d) {
                    self.err(dat, format!("DSCP {d} is listed twice"));
                } else if let Some(&owner) = dscp_owner.get(&d) {
                    self.err(
                        dat,
                        format!(
                            "DSCP {d} is already matched by class {:?}",
                            v.classes[owner].name
                        ),
                    );
                } else {
                    dscp_owner.insert(d, i);
                }
            }
            if c.pool_order.is_empty() {
                self.err(cat(i).key("pool_order"), "needs at least one pool");
            }
            for (j, p) in c.pool_order.iter().enumerate() {
                let pat = cat(i).key("pool_order").index(j);
                if v.pool(p).is_none() {
                    let known: Vec<&str> = v.pools.iter().map(|p| p.name.as_str()).collect();
                    self.err(
                        pat,
                        format!(
                            "unknown pool {p:?}: this vip's pools are {}",
                            known.join(", ")
                        ),
                    );
                } else if c.pool_order[..j].contains(p) {
                    self.err(pat, format!("pool {p:?} is listed twice"));
                }
            }
        }
        self.unique(
            "class name",
            v.classes
                .iter()
                .enumerate()
                .map(|(i, c)| (cat(i).key("name"), c.name.as_str())),
        );
    }

    fn cluster(&mut self, c: &ClusterConfig, cfg: &Config) {
        let at = |k: &str| path("cluster").key(k);
        // The service is the cluster's: a member's own file cannot have one too.
        if !cfg.backends.is_empty() {
            self.err(
                path("backend").index(0),
                "with [cluster], backends and VIPs come from `vpnlb cluster push`, not from the host's file",
            );
        }
        if !cfg.vips.is_empty() {
            self.err(
                path("vip").index(0),
                "with [cluster], backends and VIPs come from `vpnlb cluster push`, not from the host's file",
            );
        }
        self.name(at("name"), &c.name);
        if let Some(m) = &c.member {
            self.name(at("member"), m);
        }
        if c.etcd_endpoints.is_empty() {
            self.err(at("etcd_endpoints"), "needs at least one etcd client URL");
        }
        for (i, e) in c.etcd_endpoints.iter().enumerate() {
            let ok = match e.parse::<hyper::Uri>() {
                Ok(u) => {
                    matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some()
                        && u.port_u16().is_some()
                }
                Err(_) => false,
            };
            if !ok {
                self.err(
                    at("etcd_endpoints").index(i),
                    format!(
                        "{e:?} is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)"
                    ),
                );
            } else if e.starts_with("https://") && c.etcd_ca_file.is_none() {
                self.err(
                    at("etcd_ca_file"),
                    "https:// endpoints need etcd_ca_file (the CA of etcd's server certificates)",
                );
            }
        }
        if let Some(p) = &c.prefix
            && (!p.starts_with('/') || p.trim_end_matches('/').is_empty())
        {
            self.err(
                at("prefix"),
                format!("{p:?} must start with / and not be / alone"),
            );
        }
        if c.etcd_cert_file.is_some() != c.etcd_key_file.is_some() {
            self.err(
                at(if c.etcd_cert_file.is_some() {
                    "etcd_key_file"
                } else {
                    "etcd_cert_file"
                }),
                "etcd_cert_file and etcd_key_file go together",
            );
        }
        if c.etcd_timeout_ms == 0 {
            self.err(at("etcd_timeout_ms"), "must be at least 1");
        }
        if !(1..=60).contains(&c.lease_ttl_s) {
            self.err(
                at("lease_ttl_s"),
                format!("{} is out of range 1..=60", c.lease_ttl_s),
            );
        }
        if c.health_quorum == Some(0) {
            self.err(at("health_quorum"), "must be at least 1");
        }
        if c.peer_listen.port() == 0 {
            self.err(at("peer_listen"), "needs a port");
        }
        if let Some(a) = c.peer_advertise
            && (a.ip().is_unspecified() || a.port() == 0)
        {
            self.err(
                at("peer_advertise"),
                format!("{a} is not an address peers can reach"),
            );
        }
        if c.peer_advertise.is_none() && c.peer_listen.ip().is_unspecified() {
            self.err(
                at("peer_advertise"),
                "needed when peer_listen is a wildcard address (peers must know where to connect)",
            );
        }
    }

    fn hooks(&mut self, h: &HooksConfig) {
        let at = |k: &str| path("hooks").key(k);
        if self.doc.has(&at("exec")) && h.exec.is_empty() {
            self.err(at("exec"), "needs at least the program to run");
        } else if h.exec.first().is_some_and(|p| p.is_empty()) {
            self.err(at("exec").index(0), "the program path must not be empty");
        }
        if let Some(url) = &h.webhook {
            match url.parse::<hyper::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
                _ => self.err(
                    at("webhook"),
                    format!("{url:?} is not an http:// URL (https is not supported)"),
                ),
            }
        }
        if h.timeout_ms == 0 {
            self.err(at("timeout_ms"), "must be at least 1");
        }
    }
}

/// Whether two source-hash VIPs pick the same gateway for a peer: same ring size and the same
/// pools (priority and backends).
fn same_selection(a: &VipConfig, b: &VipConfig) -> bool {
    fn shape(v: &VipConfig) -> (u32, Vec<(i64, Vec<&str>)>) {
        let mut pools: Vec<(i64, Vec<&str>)> = v
            .pools
            .iter()
            .map(|p| {
                let mut members: Vec<&str> = p.backends.iter().map(String::as_str).collect();
                members.sort_unstable();
                (p.priority, members)
            })
            .collect();
        pools.sort();
        (v.ring_size, pools)
    }
    shape(a) == shape(b)
}
