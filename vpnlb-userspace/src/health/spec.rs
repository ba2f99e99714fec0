//! The configuration of one health check and the result it reports. These are the interface
//! between the config file, the probe tasks and the agent core.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Timing shared by every check kind. For `bfd`, `interval_ms`/`timeout_ms` are not used (BFD has
/// its own timers) and rise/fall apply to session Up/Down reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckTiming {
    /// Time between probes.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A probe without an answer within this is a failure (must be <= interval_ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a check up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that bring a check down.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

pub fn default_interval_ms() -> u64 {
    1000
}
pub fn default_timeout_ms() -> u64 {
    500
}
pub fn default_rise() -> u32 {
    2
}
pub fn default_fall() -> u32 {
    3
}

impl Default for CheckTiming {
    fn default() -> Self {
        CheckTiming {
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

/// What a check probes. In the config file each is a table with `type = "..."`.
///
/// Deserialized through `RawCheck` (one flat table) so that a key the kind does not take is an
/// error: serde ignores `deny_unknown_fields` next to `#[serde(flatten)]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    deny_unknown_fields,
    try_from = "RawCheck"
)]
pub enum CheckSpec {
    /// ICMP / ICMPv6 echo request; success = a matching echo reply.
    Icmp {
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// TCP connect; success = the handshake completes.
    Tcp {
        port: u16,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// HTTP/1.1 GET (or HTTPS with rustls); success = the status matches and, if set, the body
    /// contains `body_contains`.
    Http {
        port: u16,
        #[serde(default = "default_path")]
        path: String,
        #[serde(default = "default_status")]
        expect_status: u16,
        #[serde(default)]
        body_contains: Option<String>,
        /// Host header (default: the backend address).
        #[serde(default)]
        host: Option<String>,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    Https {
        port: u16,
        #[serde(default = "default_path")]
        path: String,
        #[serde(default = "default_status")]
        expect_status: u16,
        #[serde(default)]
        body_contains: Option<String>,
        /// Host header and TLS server name (default: the backend address).
        #[serde(default)]
        host: Option<String>,
        /// Skip certificate verification (self-signed gateway certificates).
        #[serde(default)]
        insecure: bool,
        /// PEM file of CA certificates to trust instead of the built-in roots.
        #[serde(default)]
        ca_file: Option<String>,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// UDP request/response: sends `payload` (text, or hex with `payload_hex`), success = any reply
    /// or, if set, a reply containing `expect` (text) / `expect_hex`.
    Udp {
        port: u16,
        #[serde(default)]
        payload: Option<String>,
        #[serde(default)]
        payload_hex: Option<String>,
        #[serde(default)]
        expect: Option<String>,
        #[serde(default)]
        expect_hex: Option<String>,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// BFD asynchronous mode, single hop (RFC 5880/5881, UDP 3784).
    Bfd {
        /// Desired min TX interval once Up (ms).
        #[serde(default = "default_bfd_interval_ms")]
        desired_min_tx_ms: u64,
        /// Required min RX interval (ms).
        #[serde(default = "default_bfd_interval_ms")]
        required_min_rx_ms: u64,
        #[serde(default = "default_detect_mult")]
        detect_mult: u8,
        /// Wait for the peer to start (RFC 5880 passive role).
        #[serde(default)]
        passive: bool,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// WireGuard handshake (Noise IK) with the gateway as a configured peer; success = a valid
    /// handshake response. `interval_ms` defaults to 5000: the gateway drops initiations from one
    /// peer key that come too fast.
    Wireguard {
        #[serde(default = "default_wireguard_port")]
        port: u16,
        /// The gateway's public key (base64).
        public_key: String,
        /// The probe's own private key (base64); or `private_key_file`.
        #[serde(default)]
        private_key: Option<String>,
        /// File holding the probe's private key (base64, as written by `wg genkey`).
        #[serde(default)]
        private_key_file: Option<String>,
        /// After the handshake, an ICMP echo through the tunnel to a host behind the gateway.
        #[serde(flatten, default)]
        inside: Option<InsideProbe>,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// Stateless IKEv2 liveness: an IKE_SA_INIT whose KE group is not a proposed one, answered by
    /// INVALID_KE_PAYLOAD (or COOKIE, another notify, or a full IKE_SA_INIT response).
    Ikev2 {
        #[serde(default = "default_ikev2_port")]
        port: u16,
        #[serde(flatten)]
        timing: CheckTiming,
    },
    /// An operator's program (keepalived's MISC_CHECK): exit status 0 = success, the first line
    /// of its stdout is the detail; `timeout_ms` bounds it. `interval_ms` defaults to 10000 and
    /// `timeout_ms` to 5000: a program (a real tunnel brought up and pinged through) is heavier
    /// than a packet.
    Exec {
        /// argv: the program and its arguments (no shell).
        command: Vec<String>,
        /// Environment naming the backend, its address and its VIPs; filled by the agent when it
        /// starts the check ([`CheckSpec::with_env`]), never read from the file.
        #[serde(skip)]
        env: Vec<(String, String)>,
        #[serde(flatten)]
        timing: CheckTiming,
    },
}

/// The `inside` keys of a `wireguard` check: after the handshake the probe sends an ICMP echo
/// from `tunnel_address` to `inside` through the tunnel and requires the decrypted reply, so a
/// gateway whose forwarding, NAT or route to the inside network is broken fails the check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsideProbe {
    /// The host behind the gateway to ping (`inside`).
    #[serde(rename = "inside")]
    pub addr: IpAddr,
    /// The probe's own address in the tunnel: the gateway's AllowedIPs for the probe key must
    /// cover it, and its route back to it must lead into the tunnel.
    pub tunnel_address: IpAddr,
    /// How long the echo reply may take after the handshake (`inside_timeout_ms`; default: the
    /// check's `timeout_ms`).
    #[serde(rename = "inside_timeout_ms")]
    pub timeout_ms: u64,
}

/// The `type` of a check table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CheckKind {
    Icmp,
    Tcp,
    Http,
    Https,
    Udp,
    Bfd,
    Wireguard,
    Ikev2,
    Exec,
}

/// A check table as written: every key any kind takes, each optional. Without `flatten` serde
/// rejects unknown keys at their own position; `CheckSpec::try_from` then rejects the keys the
/// kind does not take and applies the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: CheckKind,
    port: Option<u16>,
    path: Option<String>,
    expect_status: Option<u16>,
    body_contains: Option<String>,
    host: Option<String>,
    insecure: Option<bool>,
    ca_file: Option<String>,
    payload: Option<String>,
    payload_hex: Option<String>,
    expect: Option<String>,
    expect_hex: Option<String>,
    desired_min_tx_ms: Option<u64>,
    required_min_rx_ms: Option<u64>,
    detect_mult: Option<u8>,
    passive: Option<bool>,
    public_key: Option<String>,
    private_key: Option<String>,
    private_key_file: Option<String>,
    inside: Option<IpAddr>,
    tunnel_address: Option<IpAddr>,
    inside_timeout_ms: Option<u64>,
    command: Option<Vec<String>>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

impl TryFrom<RawCheck> for CheckSpec {
    type Error = String;

    fn try_from(r: RawCheck) -> Result<Self, String> {
        const TIMING: [&str; 4] = ["interval_ms", "timeout_ms", "rise", "fall"];
        let (name, own): (&str, &[&str]) = match r.kind {
            CheckKind::Icmp => ("icmp", &[]),
            CheckKind::Tcp => ("tcp", &["port"]),
            CheckKind::Http => (
                "http",
                &["port", "path", "expect_status", "body_contains", "host"],
            ),
            CheckKind::Https => (
                "https",
                &[
                    "port",
                    "path",
                    "expect_status",
                    "body_contains",
                    "host",
                    "insecure",
                    "ca_file",
                ],
            ),
            CheckKind::Udp => (
                "udp",
                &["port", "payload", "payload_hex", "expect", "expect_hex"],
            ),
            CheckKind::Bfd => (
                "bfd",
                &[
                    "desired_min_tx_ms",
                    "required_min_rx_ms",
                    "detect_mult",
                    "passive",
                ],
            ),
            CheckKind::Wireguard => (
                "wireguard",
                &[
                    "port",
                    "public_key",
                    "private_key",
                    "private_key_file",
                    "inside",
                    "tunnel_address",
                    "inside_timeout_ms",
                ],
            ),
            CheckKind::Ikev2 => ("ikev2", &["port"]),
            CheckKind::Exec => ("exec", &["command"]),
        };
        let present = [
            ("port", r.port.is_some()),
            ("path", r.path.is_some()),
            ("expect_status", r.expect_status.is_some()),
            ("body_contains", r.body_contains.is_some()),
            ("host", r.host.is_some()),
            ("insecure", r.insecure.is_some()),
            ("ca_file", r.ca_file.is_some()),
            ("payload", r.payload.is_some()),
            ("payload_hex", r.payload_hex.is_some()),
            ("expect", r.expect.is_some()),
            ("expect_hex", r.expect_hex.is_some()),
            ("desired_min_tx_ms", r.desired_min_tx_ms.is_some()),
            ("required_min_rx_ms", r.required_min_rx_ms.is_some()),
            ("detect_mult", r.detect_mult.is_some()),
            ("passive", r.passive.is_some()),
            ("public_key", r.public_key.is_some()),
            ("private_key", r.private_key.is_some()),
            ("private_key_file", r.private_key_file.is_some()),
            ("inside", r.inside.is_some()),
            ("tunnel_address", r.tunnel_address.is_some()),
            ("inside_timeout_ms", r.inside_timeout_ms.is_some()),
            ("command", r.command.is_some()),
        ];
        if let Some((key, _)) = present.iter().find(|(k, set)| *set && !own.contains(k)) {
            let takes: Vec<String> = ["type"]
                .iter()
                .chain(own)
                .chain(TIMING.iter())
                .map(|k| format!("`{k}`"))
                .collect();
            return Err(format!(
                "unknown field `{key}`: a check of type \"{name}\" takes {}",
                takes.join(", ")
            ));
        }
        let port = || r.port.ok_or_else(|| "missing field `port`".to_string());
        let timing = CheckTiming {
            interval_ms: r.interval_ms.unwrap_or(match r.kind {
                CheckKind::Wireguard => default_wireguard_interval_ms(),
                CheckKind::Exec => default_exec_interval_ms(),
                _ => default_interval_ms(),
            }),
            timeout_ms: r.timeout_ms.unwrap_or(match r.kind {
                CheckKind::Exec => default_exec_timeout_ms(),
                _ => default_timeout_ms(),
            }),
            rise: r.rise.unwrap_or_else(default_rise),
            fall: r.fall.unwrap_or_else(default_fall),
        };
        Ok(match r.kind {
            CheckKind::Icmp => CheckSpec::Icmp { timing },
            CheckKind::Tcp => CheckSpec::Tcp {
                port: port()?,
                timing,
            },
            CheckKind::Http => CheckSpec::Http {
                port: port()?,
                path: r.path.unwrap_or_else(default_path),
                expect_status: r.expect_status.unwrap_or_else(default_status),
                body_contains: r.body_contains,
                host: r.host,
                timing,
            },
            CheckKind::Https => CheckSpec::Https {
                port: port()?,
                path: r.path.unwrap_or_else(default_path),
                expect_status: r.expect_status.unwrap_or_else(default_status),
                body_contains: r.body_contains,
                host: r.host,
                insecure: r.insecure.unwrap_or_default(),
                ca_file: r.ca_file,
                timing,
            },
            CheckKind::Udp => CheckSpec::Udp {
                port: port()?,
                payload: r.payload,
                payload_hex: r.payload_hex,
                expect: r.expect,
                expect_hex: r.expect_hex,
                timing,
            },
            CheckKind::Bfd => CheckSpec::Bfd {
                desired_min_tx_ms: r.desired_min_tx_ms.unwrap_or_else(default_bfd_interval_ms),
                required_min_rx_ms: r.required_min_rx_ms.unwrap_or_else(default_bfd_interval_ms),
                detect_mult: r.detect_mult.unwrap_or_else(default_detect_mult),
                passive: r.passive.unwrap_or_default(),
                timing,
            },
            CheckKind::Wireguard => CheckSpec::Wireguard {
                port: r.port.unwrap_or_else(default_wireguard_port),
                public_key: r
                    .public_key
                    .ok_or_else(|| "missing field `public_key`".to_string())?,
                private_key: r.private_key,
                private_key_file: r.private_key_file,
                inside: match (r.inside, r.tunnel_address) {
                    (Some(addr), Some(tunnel_address)) => Some(InsideProbe {
                        addr,
                        tunnel_address,
                        timeout_ms: r.inside_timeout_ms.unwrap_or(timing.timeout_ms),
                    }),
                    (Some(_), None) => {
                        return Err("missing field `tunnel_address`: a wireguard check with \
                                    `inside` needs the probe's own address in the tunnel"
                            .into());
                    }
                    // `tunnel_address` or `inside_timeout_ms` alone: reported at its line by the
                    // config's validation.
                    (None, _) => None,
                },
                timing,
            },
            CheckKind::Ikev2 => CheckSpec::Ikev2 {
                port: r.port.unwrap_or_else(default_ikev2_port),
                timing,
            },
            CheckKind::Exec => CheckSpec::Exec {
                command: r
                    .command
                    .ok_or_else(|| "missing field `command`".to_string())?,
                env: Vec::new(),
                timing,
            },
        })
    }
}

pub fn default_path() -> String {
    "/".to_string()
}
pub fn default_status() -> u16 {
    200
}
pub fn default_bfd_interval_ms() -> u64 {
    300
}
pub fn default_detect_mult() -> u8 {
    3
}
pub fn default_wireguard_port() -> u16 {
    51820
}
/// WireGuard probes are spaced: wireguard-go drops initiations from one peer key < 20 ms apart,
/// and every answered probe is a new handshake (and session) on the gateway.
pub fn default_wireguard_interval_ms() -> u64 {
    5000
}
pub fn default_ikev2_port() -> u16 {
    500
}
/// An exec check runs a program: every 10 s by default.
pub fn default_exec_interval_ms() -> u64 {
    10_000
}
/// ...and gives it 5 s (bringing up a real tunnel takes a while).
pub fn default_exec_timeout_ms() -> u64 {
    5_000
}

impl CheckSpec {
    pub fn timing(&self) -> &CheckTiming {
        match self {
            CheckSpec::Icmp { timing }
            | CheckSpec::Tcp { timing, .. }
            | CheckSpec::Http { timing, .. }
            | CheckSpec::Https { timing, .. }
            | CheckSpec::Udp { timing, .. }
            | CheckSpec::Bfd { timing, .. }
            | CheckSpec::Wireguard { timing, .. }
            | CheckSpec::Ikev2 { timing, .. }
            | CheckSpec::Exec { timing, .. } => timing,
        }
    }

    /// This check with `env` as the environment of its program (exec checks; others unchanged).
    pub fn with_env(&self, vars: Vec<(String, String)>) -> CheckSpec {
        match self {
            CheckSpec::Exec {
                command, timing, ..
            } => CheckSpec::Exec {
                command: command.clone(),
                env: vars,
                timing: timing.clone(),
            },
            other => other.clone(),
        }
    }

    /// The longest one probe may take: `timeout_ms`, plus `inside_timeout_ms` for a wireguard
    /// check with `inside` (the echo through the tunnel follows the handshake), plus the grace
    /// between SIGTERM and SIGKILL for an exec check.
    pub fn probe_budget(&self) -> Duration {
        let extra = match self {
            CheckSpec::Wireguard {
                inside: Some(i), ..
            } => i.timeout_ms,
            CheckSpec::Exec { .. } => super::exec::TERM_GRACE.as_millis() as u64,
            _ => 0,
        };
        Duration::from_millis(self.timing().timeout_ms.saturating_add(extra))
    }

    /// Short name for logs and metrics labels: `icmp`, `tcp:443`, `http:80/health`, `bfd`, ...
    pub fn label(&self) -> String {
        match self {
            CheckSpec::Icmp { .. } => "icmp".into(),
            CheckSpec::Tcp { port, .. } => format!("tcp:{port}"),
            CheckSpec::Http { port, path, .. } => format!("http:{port}{path}"),
            CheckSpec::Https { port, path, .. } => format!("https:{port}{path}"),
            CheckSpec::Udp { port, .. } => format!("udp:{port}"),
            CheckSpec::Bfd { .. } => "bfd".into(),
            CheckSpec::Wireguard {
                port, inside: None, ..
            } => format!("wireguard:{port}"),
            CheckSpec::Wireguard {
                port,
                inside: Some(i),
                ..
            } => format!("wireguard:{port}>{}", i.addr),
            CheckSpec::Ikev2 { port, .. } => format!("ikev2:{port}"),
            CheckSpec::Exec { command, .. } => {
                let prog = command.first().map(String::as_str).unwrap_or("");
                format!("exec:{}", prog.rsplit('/').next().unwrap_or(prog))
            }
        }
    }
}

/// Where a check probes: the backend's address, optionally from a given local address/interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    /// Backend id in the data plane (what results are keyed by).
    pub backend_id: u32,
    /// Index of the check within the backend's `checks` list.
    pub check_index: usize,
    /// Which start of the backend's checks this is (the agent restarts them on reload): results
    /// of a stopped generation still queued are recognised and ignored.
    pub generation: u64,
    pub addr: IpAddr,
    /// Local address to probe from (BFD needs it; others bind to it when set).
    pub source: Option<IpAddr>,
    /// Interface to bind to (SO_BINDTODEVICE), when set.
    pub interface: Option<String>,
}

/// One raw probe result (or, for BFD, a session state report). Rise/fall is applied by the agent.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub backend_id: u32,
    pub check_index: usize,
    /// The [`CheckTarget::generation`] of the check that produced it.
    pub generation: u64,
    pub ok: bool,
    /// Round-trip time of a successful probe (BFD: none).
    pub latency: Option<Duration>,
    /// The round trip of each exchange of a successful multi-step probe (`handshake`, `inside`);
    /// usually empty.
    pub phases: Vec<(&'static str, Duration)>,
    /// Short human detail: "echo reply", "timeout after 500ms", "status 503", "bfd Down (Control
    /// Detection Time Expired)", ...
    pub detail: String,
    /// When the result was observed.
    pub at: Instant,
}
