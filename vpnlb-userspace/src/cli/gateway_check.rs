//! `vpnlb gateway-check`: run on a gateway host, checks what direct server return or decapsulation
//! needs there and prints each finding (ok / warn / fail) with the exact fix:
//! - `vip_address`: the VIP on `lo` or a dummy (on a real interface the host would answer ARP for it);
//! - `arp_ignore`, `arp_announce`, `rp_filter` per receiving interface (the kernel uses the larger
//!   of `all` and the interface's value);
//! - `decap`: `vpnlb_decap` attached (and the GUE port set) when the VIP is encapsulated;
//! - `reply_source`: one probe to VIP:port through a throw-away namespace ([`reply`]) and the source
//!   its reply leaves with;
//! - `daemon`: per VPN daemon running here, whether it is set up to reply from the VIP;
//! - `probe_allowed_ips`, `probe_route`, `forwarding`, `inside_route`: what the load balancer's
//!   `wireguard` check with `inside` needs here ([`probe_tunnel`]).
//!
//! Any `fail` makes the command exit non-zero.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use vpnlb_common::prog_names;

use crate::gateway::daemons::{self, Daemon, Kind};
use crate::gateway::host::{self, Iface};
use crate::gateway::{decap, reply};
use crate::health::{CheckSpec, CheckTiming};

pub mod probe_tunnel;
pub use probe_tunnel::ProbeTunnel;

/// How the load balancer sends the VIP's packets to this gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// L2 DSR: the packet arrives addressed to the VIP, only the MACs rewritten.
    None,
    Ipip,
    Gue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One finding: what was checked, where, the verdict and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    pub level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// What to check.
#[derive(Clone, Debug)]
pub struct Options {
    pub vip: IpAddr,
    /// The VIP's port: enables the active reply test.
    pub port: Option<u16>,
    /// `udp` or `tcp` (the reply test is UDP only).
    pub proto: String,
    pub encap: Encap,
    /// Interfaces the VIP's packets arrive on; empty = every up Ethernet interface with an address.
    pub ifaces: Vec<String>,
    /// GUE port `vpnlb_decap` must accept (with `encap = gue`).
    pub gue_port: u16,
    pub decap_pin_dir: PathBuf,
    /// The reply test's probe (built by [`probe_spec`]); None = no active test.
    pub probe: Option<CheckSpec>,
    /// The probe client's address (unused anywhere else); None = [`DEFAULT_CLIENT`] or
    /// [`DEFAULT_CLIENT6`] by the VIP's family.
    pub client: Option<IpAddr>,
    pub timeout: Duration,
    /// The `wireguard` check with `inside`: what the gateway must allow and route for it.
    pub probe_tunnel: Option<ProbeTunnel>,
}

/// Default probe client: the benchmarking range (RFC 2544), routed nowhere.
pub const DEFAULT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The same for IPv6 VIPs (2001:2::/48, RFC 5180).
pub const DEFAULT_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

/// Payload of the generic UDP probe.
pub const DEFAULT_PAYLOAD: &str = "vpnlb gateway-check";

/// Which probe the reply test sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// wireguard with keys, ikev2 on 500/4500, else udp.
    Auto,
    Udp,
    Ikev2,
    Wireguard,
    None,
}

/// The reply test's probe: vpnlb's own health probes, with the keys and payload from the flags.
pub fn probe_spec(
    kind: ProbeKind,
    port: u16,
    wg_public_key: Option<String>,
    wg_private_key: Option<String>,
    wg_private_key_file: Option<String>,
    payload: Option<String>,
    payload_hex: Option<String>,
) -> anyhow::Result<Option<CheckSpec>> {
    let keys = wg_public_key.is_some();
    let kind = match kind {
        ProbeKind::Auto if keys => ProbeKind::Wireguard,
        ProbeKind::Auto if port == 500 || port == 4500 => ProbeKind::Ikev2,
        ProbeKind::Auto => ProbeKind::Udp,
        k => k,
    };
    let timing = CheckTiming::default();
    let spec = match kind {
        ProbeKind::None => return Ok(None),
        ProbeKind::Udp | ProbeKind::Auto => CheckSpec::Udp {
            port,
            payload: match (&payload, &payload_hex) {
                (None, None) => Some(DEFAULT_PAYLOAD.to_string()),
                _ => payload,
            },
            payload_hex,
            expect: None,
            expect_hex: None,
            timing,
        },
        ProbeKind::Ikev2 => CheckSpec::Ikev2 { port, timing },
        ProbeKind::Wireguard => {
            let public_key = wg_public_key.ok_or_else(|| {
                anyhow::anyhow!("--probe wireguard needs --wg-public-key (the gateway's key)")
            })?;
            if wg_private_key.is_none() && wg_private_key_file.is_none() {
                anyhow::bail!(
                    "--probe wireguard needs --wg-probe-private-key or --wg-probe-private-key-file (a key the gateway lists as a peer)"
                );
            }
            CheckSpec::Wireguard {
                port,
                public_key,
                private_key: wg_private_key,
                private_key_file: wg_private_key_file,
                inside: None,
                timing,
            }
        }
    };
    // Bad keys are an input error now, not a failed probe later.
    let target = crate::health::CheckTarget {
        backend_id: 0,
        check_index: 0,
        generation: 0,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        source: None,
        interface: None,
    };
    match spec {
        CheckSpec::Wireguard { .. } => {
            crate::health::wireguard::WireguardProbe::new(&spec, &target)?;
        }
        CheckSpec::Udp { .. } => {
            crate::health::udp::UdpProbe::new(&spec, &target)?;
        }
        _ => {}
    }
    Ok(Some(spec))
}

struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn add(
        &mut self,
        check: &'static str,
        iface: Option<&str>,
        level: Level,
        message: String,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            check,
            iface: iface.map(str::to_string),
            level,
            message,
            fix,
        });
    }
}

/// The interfaces the VIP's packets arrive on.
fn receiving(opts: &Options, all: &[Iface]) -> Vec<Iface> {
    if !opts.ifaces.is_empty() {
        return opts
            .ifaces
            .iter()
            .map(|n| {
                all.iter().find(|i| &i.name == n).cloned().unwrap_or(Iface {
                    name: n.clone(),
                    link_type: String::new(),
                    kind: String::new(),
                    up: false,
                    addrs: Vec::new(),
                })
            })
            .collect();
    }
    let family = opts.vip.is_ipv4();
    all.iter()
        .filter(|i| {
            i.up && i.link_type == "ether"
                && i.addrs.iter().any(|a| match a {
                    IpAddr::V4(_) => family,
                    IpAddr::V6(v) => !family && !v.is_unicast_link_local(),
                })
        })
        // Our own probe links of a concurrent run are not receiving interfaces.
        .filter(|i| !i.name.starts_with("vgwc"))
        .cloned()
        .collect()
}

fn check_vip(opts: &Options, all: &[Iface], r: &mut Report) {
    let vip = opts.vip;
    let holders: Vec<&Iface> = all.iter().filter(|i| i.addrs.contains(&vip)).collect();
    let plen = if vip.is_ipv4() { 32 } else { 128 };
    let add_lo = format!("ip addr add {vip}/{plen} dev lo");
    if holders.is_empty() {
        r.add(
            "vip_address",
            None,
            Level::Fail,
            format!("{vip} is not a local address: the kernel drops packets to it"),
            Some(add_lo),
        );
        return;
    }
    for i in holders {
        if i.link_type == "loopback" || i.kind == "dummy" {
            r.add(
                "vip_address",
                Some(&i.name),
                Level::Ok,
                format!("{vip} is on {}", i.name),
                None,
            );
        } else {
            r.add(
                "vip_address",
                Some(&i.name),
                Level::Fail,
                format!(
                    "{vip} is on {}: this host answers ARP/ND for the VIP and steals it from the load balancer",
                    i.name
                ),
                Some(format!(
                    "ip addr del {vip}/{plen} dev {} && {add_lo}",
                    i.name
                )),
            );
        }
    }
}

/// `net.ipv4.conf.{all,IF}.KEY` and the value the kernel acts on (their maximum).
fn effective(iface: &str, key: &str) -> (Option<u32>, Option<u32>, u32) {
    let (a, i) = (host::conf("all", key), host::conf(iface, key));
    (a, i, a.unwrap_or(0).max(i.unwrap_or(0)))
}

fn sysctl_fix(iface: &str, key: &str, value: u32) -> String {
    format!(
        "sysctl -w net.ipv4.conf.all.{key}={value} net.ipv4.conf.{iface}.{key}={value} (persist in /etc/sysctl.d/90-vpnlb.conf)"
    )
}

fn check_sysctls(opts: &Options, ifaces: &[Iface], r: &mut Report) {
    // ARP matters on the VIP's L2 segment: with encapsulation the LB reaches this host at its own
    // address, so a wrong value only warns.
    let arp_level = if opts.encap == Encap::None {
        Level::Fail
    } else {
        Level::Warn
    };
    for i in ifaces {
        let n = i.name.as_str();
        if host::conf(n, "rp_filter").is_none() {
            r.add(
                "interface",
                Some(n),
                Level::Fail,
                format!("no interface {n} here"),
                Some("pass the interface the VIP's packets arrive on with --iface".into()),
            );
            continue;
        }
        if !opts.vip.is_ipv4() {
            // ARP and reverse-path filtering are IPv4 settings (ND only answers for addresses on
            // the receiving interface; IPv6 has no rp_filter).
            continue;
        }
        let (a, x, eff) = effective(n, "arp_ignore");
        let (level, fix) = if eff >= 1 {
            (Level::Ok, None)
        } else {
            (arp_level, Some(sysctl_fix(n, "arp_ignore", 1)))
        };
        r.add(
            "arp_ignore",
            Some(n),
            level,
            format!(
                "arp_ignore {eff} (all {}, {n} {}): {}",
                show(a),
                show(x),
                if eff >= 1 {
                    "ARP for the VIP on lo is not answered"
                } else {
                    "this host answers ARP for the VIP on lo and draws the VIP's traffic"
                }
            ),
            fix,
        );
        let (a, x, eff) = effective(n, "arp_announce");
        let (level, fix) = if eff >= 2 {
            (Level::Ok, None)
        } else {
            (arp_level, Some(sysctl_fix(n, "arp_announce", 2)))
        };
        r.add(
            "arp_announce",
            Some(n),
            level,
            format!(
                "arp_announce {eff} (all {}, {n} {}): {}",
                show(a),
                show(x),
                if eff >= 2 {
                    "ARP requests use the interface's own address"
                } else {
                    "ARP requests may carry the VIP as sender and poison neighbours' caches"
                }
            ),
            fix,
        );
        let (a, x, eff) = effective(n, "rp_filter");
        let strict = eff == 1;
        r.add(
            "rp_filter",
            Some(n),
            if strict { Level::Fail } else { Level::Ok },
            format!(
                "rp_filter {eff} (all {}, {n} {}): {}",
                show(a),
                show(x),
                if strict {
                    "strict reverse-path filtering drops DSR/decapsulated packets whose client is not routed back out of this interface"
                } else if eff == 2 {
                    "loose"
                } else {
                    "off"
                }
            ),
            strict.then(|| sysctl_fix(n, "rp_filter", 2)),
        );
    }
}

fn show(v: Option<u32>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn check_decap(opts: &Options, ifaces: &[Iface], r: &mut Report) {
    if opts.encap == Encap::None {
        return;
    }
    let gue = opts.encap == Encap::Gue;
    let attach = |i: &str| {
        let mut s = format!("vpnlb decap attach --iface {i}");
        if gue {
            s.push_str(&format!(" --gue-port {}", opts.gue_port));
        }
        s
    };
    for i in ifaces {
        let n = i.name.as_str();
        match host::xdp_prog(n) {
            Ok(Some(p)) if p == prog_names::DECAP => r.add(
                "decap",
                Some(n),
                Level::Ok,
                format!("{} is attached to {n}", prog_names::DECAP),
                None,
            ),
            Ok(other) => r.add(
                "decap",
                Some(n),
                Level::Fail,
                match other {
                    Some(p) => format!(
                        "{n} runs XDP program {p}, not {}: encapsulated packets are never unwrapped",
                        prog_names::DECAP
                    ),
                    None => format!(
                        "no XDP program on {n}: {} packets from the load balancer are never unwrapped",
                        if gue { "GUE" } else { "IPIP" }
                    ),
                },
                Some(attach(n)),
            ),
            Err(e) => r.add("decap", Some(n), Level::Fail, format!("{e:#}"), None),
        }
    }
    if gue {
        let port = decap::status(&opts.decap_pin_dir)
            .ok()
            .and_then(|s| s.gue_port);
        let ok = port == Some(opts.gue_port);
        r.add(
            "decap_gue_port",
            None,
            if ok { Level::Ok } else { Level::Fail },
            match port {
                Some(p) if ok => format!("{} accepts GUE on port {p}", prog_names::DECAP),
                Some(0) => format!("{} has GUE off (IPIP only)", prog_names::DECAP),
                Some(p) => format!(
                    "{} accepts GUE on port {p}, the VIP uses {}",
                    prog_names::DECAP,
                    opts.gue_port
                ),
                None => format!("no decap state pinned in {}", opts.decap_pin_dir.display()),
            },
            (!ok).then(|| attach(ifaces.first().map_or("IF", |i| i.name.as_str()))),
        );
    }
}

/// What makes `d` reply from the VIP (the fix line of its findings).
fn daemon_fix(kind: Kind, vip: IpAddr, port: u16, iface: &str) -> String {
    match kind {
        Kind::WireguardGo | Kind::Boringtun => format!(
            "ip route add <client-net> dev {iface} src {vip} table 100 && ip rule add ipproto udp sport {port} lookup 100 (or nft: ip saddr <own> udp sport {port} ip saddr set {vip}, with notrack)"
        ),
        Kind::Charon => format!(
            "in every swanctl connection: mobike = no and local_addrs = {vip} (else MOBIKE moves the SA to the own address ~1 s after IKE_AUTH)"
        ),
        Kind::Openvpn => {
            format!("openvpn --multihome (or --local {vip}; `multihome` in the config file)")
        }
    }
}

/// Policy routing that gives replies from `port` the VIP as source (the boringtun fix).
fn sport_rule_to_vip(vip: IpAddr, port: u16) -> bool {
    let Ok(rules) = host::rules() else {
        return false;
    };
    rules.iter().any(|r| {
        r["sport"].as_u64() == Some(u64::from(port))
            && r["table"].as_str().is_some_and(|t| {
                host::routes(t).is_ok_and(|routes| {
                    routes
                        .iter()
                        .any(|x| x["prefsrc"].as_str() == Some(&vip.to_string()))
                })
            })
    })
}

fn check_daemons(opts: &Options, running: &[Daemon], iface: &str, r: &mut Report) {
    let vip = opts.vip;
    let port = opts.port.unwrap_or(0);
    for d in running {
        let fix = daemon_fix(d.kind, vip, port, iface);
        let what = format!("{} (pid {})", d.kind.name(), d.pid);
        let (level, msg, fix) = match d.kind {
            Kind::WireguardGo | Kind::Boringtun if sport_rule_to_vip(vip, port) => (
                Level::Ok,
                format!(
                    "{what}: policy routing by source port {port} gives its replies {vip} as source"
                ),
                None,
            ),
            // wireguard-go replies from the VIP it was reached at, but forgets it when a
            // handshake it retries goes unanswered; handshakes it then initiates (a gateway out
            // of the pool, back after a flap) leave from its own address and, every gateway
            // having the same key, clients roam to it past the LB (found by `cargo xtask drill`).
            Kind::WireguardGo => (
                Level::Warn,
                format!(
                    "{what} replies from the VIP it was reached at, but handshakes it initiates after an unanswered one leave from the route's source: clients then roam to this host's own address, past the LB"
                ),
                Some(fix),
            ),
            Kind::Boringtun => (
                Level::Fail,
                format!(
                    "{what} replies from the route's source (this host's own address) unless policy routing gives it the VIP"
                ),
                Some(fix),
            ),
            Kind::Charon => (
                Level::Warn,
                format!(
                    "{what} answers from the VIP, but MOBIKE moves SAs to the own address unless disabled (its config is not read here)"
                ),
                Some(fix),
            ),
            Kind::Openvpn if daemons::openvpn_replies_from(d, &vip.to_string()) => (
                Level::Ok,
                format!("{what} runs with --multihome or --local {vip}"),
                None,
            ),
            Kind::Openvpn => (
                Level::Fail,
                format!(
                    "{what} without --multihome or --local {vip} replies from its own address: clients reject the replies"
                ),
                Some(fix),
            ),
        };
        r.add("daemon", None, level, msg, fix);
    }
}

/// The source the host picks towards clients: the probe client's route, else the first address
/// of the VIP's family on the receiving interfaces (None: the kernel's choice).
fn client_route_src(client: IpAddr, ifaces: &[Iface]) -> Option<IpAddr> {
    host::route_src(client).or_else(|| {
        ifaces
            .iter()
            .flat_map(|i| &i.addrs)
            .copied()
            .find(|a| match (a, client) {
                (IpAddr::V4(_), IpAddr::V4(_)) => true,
                (IpAddr::V6(v), IpAddr::V6(_)) => !v.is_unicast_link_local(),
                _ => false,
            })
    })
}

fn check_reply(opts: &Options, ifaces: &[Iface], running: &[Daemon], r: &mut Report) {
    let Some(port) = opts.port else {
        r.add(
            "reply_source",
            None,
            Level::Warn,
            "not tested: give --port to send a probe to the VIP and see which source answers"
                .into(),
            None,
        );
        return;
    };
    let vip = opts.vip;
    if opts.proto != "udp" {
        r.add(
            "reply_source",
            None,
            Level::Warn,
            format!(
                "not tested: the reply test sends UDP only ({} VIP)",
                opts.proto
            ),
            None,
        );
        return;
    }
    let Some(spec) = &opts.probe else {
        r.add(
            "reply_source",
            None,
            Level::Warn,
            "not tested (--probe none)".into(),
            None,
        );
        return;
    };
    let client = opts.client.unwrap_or(match vip {
        IpAddr::V4(_) => IpAddr::V4(DEFAULT_CLIENT),
        IpAddr::V6(_) => IpAddr::V6(DEFAULT_CLIENT6),
    });
    let src = client_route_src(client, ifaces);
    let label = spec.label();
    let to = std::net::SocketAddr::new(vip, port);
    let out = match reply::run(spec, vip, port, client, src, opts.timeout) {
        Ok(o) => o,
        Err(e) => {
            r.add(
                "reply_source",
                None,
                Level::Fail,
                format!("the reply test could not run: {e:#}"),
                None,
            );
            return;
        }
    };
    let wrong: Vec<&reply::Seen> = out.replies.iter().filter(|s| s.src != vip).collect();
    let fixes: Vec<String> = running
        .iter()
        .map(|d| {
            daemon_fix(
                d.kind,
                opts.vip,
                port,
                ifaces.first().map_or("eth0", |i| &i.name),
            )
        })
        .collect();
    let fix = (!fixes.is_empty()).then(|| fixes.join("; "));
    if let Some(w) = wrong.first() {
        r.add(
            "reply_source",
            Some(&w.iface),
            Level::Fail,
            format!(
                "the {label} probe to {to} was answered from {} (leaving by {}): clients would roam to that address and bypass the load balancer",
                std::net::SocketAddr::new(w.src, w.sport),
                w.iface
            ),
            Some(fix.unwrap_or_else(|| {
                "make the daemon reply from the address it was reached at (see docs/gateways.md)"
                    .into()
            })),
        );
        return;
    }
    match (&out.probe, out.replies.first()) {
        (Ok(detail), _) => r.add(
            "reply_source",
            None,
            Level::Ok,
            format!("the {label} probe to {to} was answered from the VIP ({detail})"),
            None,
        ),
        (Err(_), Some(s)) => r.add(
            "reply_source",
            Some(&s.iface),
            Level::Ok,
            format!(
                "the {label} probe to {to} was answered from the VIP, leaving by {} (policy routing sent it away from the probe's link)",
                s.iface
            ),
            None,
        ),
        (Err(e), None) => {
            // A generic payload may be ignored by design (OpenVPN with tls-auth/tls-crypt).
            let generic = matches!(spec, CheckSpec::Udp { .. });
            r.add(
                "reply_source",
                None,
                if generic { Level::Warn } else { Level::Fail },
                if generic {
                    format!(
                        "no reply to a generic UDP probe to {to} ({e}): the reply source could not be checked actively; see the daemon findings"
                    )
                } else {
                    format!(
                        "no reply to the {label} probe to {to} ({e}); no reply to the probe client left this host by any interface"
                    )
                },
                (!generic).then(|| {
                    "check that the daemon listens on the VIP's port (and, for --probe wireguard, lists the probe key as a peer)".into()
                }),
            );
        }
    }
}

/// Runs every check.
pub fn run(opts: &Options) -> anyhow::Result<Vec<Finding>> {
    let all = host::interfaces()?;
    let ifaces = receiving(opts, &all);
    let running = daemons::running();
    let mut r = Report {
        findings: Vec::new(),
    };
    check_vip(opts, &all, &mut r);
    if ifaces.is_empty() {
        r.add(
            "interface",
            None,
            Level::Warn,
            "no up Ethernet interface with an address: nothing to check for ARP, rp_filter or decap"
                .into(),
            Some("pass the interface the VIP's packets arrive on with --iface".into()),
        );
    }
    check_sysctls(opts, &ifaces, &mut r);
    check_decap(opts, &ifaces, &mut r);
    check_reply(opts, &ifaces, &running, &mut r);
    if let Some(pt) = &opts.probe_tunnel {
        probe_tunnel::check(pt, &mut r);
    }
    check_daemons(
        opts,
        &running,
        ifaces.first().map_or("eth0", |i| &i.name),
        &mut r,
    );
    Ok(r.findings)
}

/// The worst level (Ok for no findings).
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

/// `--json` and text renderings.
pub fn render(opts: &Options, findings: &[Finding]) -> (serde_json::Value, String) {
    let count = |l| findings.iter().filter(|f| f.level == l).count();
    let j = json!({
        "vip": opts.vip,
        "port": opts.port,
        "proto": opts.proto,
        "encap": opts.encap,
        "findings": findings,
        "summary": {"ok": count(Level::Ok), "warn": count(Level::Warn), "fail": count(Level::Fail)},
    });
    let mut t = String::new();
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let at = f
            .iface
            .as_deref()
            .map(|i| format!(" [{i}]"))
            .unwrap_or_default();
        t.push_str(&format!("{tag} {}{at}: {}\n", f.check, f.message));
        if let Some(fix) = &f.fix {
            t.push_str(&format!("     fix: {fix}\n"));
        }
    }
    t.push_str(&format!(
        "{} ok, {} warn, {} fail\n",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    ));
    (j, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ProbeKind, port: u16, wg: bool) -> Option<CheckSpec> {
        let key = "QOLr51gDwcX0YpyKtuZJFC8wg7FLGAyPXGX0T+6S1XA=".to_string();
        let (public, private) = if wg {
            (Some(key.clone()), Some(key))
        } else {
            (None, None)
        };
        probe_spec(kind, port, public, private, None, None, None).expect("valid flags")
    }

    #[test]
    fn auto_probe_by_keys_then_port() {
        let label = |s: Option<CheckSpec>| s.map(|s| s.label());
        assert_eq!(
            label(spec(ProbeKind::Auto, 51820, true)),
            Some("wireguard:51820".into())
        );
        assert_eq!(
            label(spec(ProbeKind::Auto, 500, false)),
            Some("ikev2:500".into())
        );
        assert_eq!(
            label(spec(ProbeKind::Auto, 4500, false)),
            Some("ikev2:4500".into())
        );
        assert_eq!(
            label(spec(ProbeKind::Auto, 1194, false)),
            Some("udp:1194".into())
        );
        assert_eq!(
            label(spec(ProbeKind::Udp, 500, false)),
            Some("udp:500".into())
        );
        assert_eq!(spec(ProbeKind::None, 500, false), None);
        let Some(CheckSpec::Udp { payload, .. }) = spec(ProbeKind::Udp, 1, false) else {
            panic!("udp spec");
        };
        assert_eq!(payload.as_deref(), Some(DEFAULT_PAYLOAD));
    }

    #[test]
    fn bad_probe_flags_are_errors() {
        let wg = probe_spec(ProbeKind::Wireguard, 51820, None, None, None, None, None);
        assert!(wg.unwrap_err().to_string().contains("--wg-public-key"));
        let no_key = probe_spec(
            ProbeKind::Wireguard,
            51820,
            Some("QOLr51gDwcX0YpyKtuZJFC8wg7FLGAyPXGX0T+6S1XA=".into()),
            None,
            None,
            None,
            None,
        );
        assert!(no_key.unwrap_err().to_string().contains("private"));
        let hex = probe_spec(ProbeKind::Udp, 1, None, None, None, None, Some("zz".into()));
        assert!(hex.unwrap_err().to_string().contains("hex"));
    }

    #[test]
    fn worst_level_and_rendering() {
        let f = |check, level| Finding {
            check,
            iface: Some("eth0".into()),
            level,
            message: "m".into(),
            fix: (level == Level::Fail).then(|| "sysctl -w x=1".to_string()),
        };
        let findings = vec![f("rp_filter", Level::Ok), f("arp_ignore", Level::Fail)];
        assert_eq!(worst(&findings), Level::Fail);
        assert_eq!(worst(&findings[..1]), Level::Ok);
        assert_eq!(worst(&[]), Level::Ok);
        let opts = Options {
            vip: "203.0.113.10".parse().unwrap(),
            port: Some(51820),
            proto: "udp".into(),
            encap: Encap::Gue,
            ifaces: Vec::new(),
            gue_port: 6080,
            decap_pin_dir: PathBuf::from("/x"),
            probe: None,
            client: None,
            timeout: Duration::from_secs(1),
            probe_tunnel: None,
        };
        let (j, t) = render(&opts, &findings);
        assert_eq!(j["encap"], "gue");
        assert_eq!(j["summary"]["fail"], 1);
        assert_eq!(j["findings"][1]["fix"], "sysctl -w x=1");
        assert!(j["findings"][0].get("fix").is_none());
        assert!(
            t.contains("FAIL arp_ignore [eth0]: m\n     fix: sysctl -w x=1\n"),
            "{t}"
        );
        assert!(t.ends_with("1 ok, 0 warn, 1 fail\n"), "{t}");
    }
}
