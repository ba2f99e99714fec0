//! What a `wireguard` check with `inside` needs on the gateway (`--wg-probe-tunnel-address`):
//! - `probe_allowed_ips`: the WireGuard interface lists the probe's public key as a peer and its
//!   AllowedIPs cover the probe's tunnel address (else the gateway drops the echo it decrypts);
//! - `probe_route`: the route back to that address leads into that interface (else the inside
//!   host's reply never re-enters the tunnel);
//! - `forwarding`: the host forwards between the tunnel and the inside network;
//! - `inside_route` (with `--wg-inside`): a route to the inside host that does not loop back into
//!   the tunnel.

use std::net::IpAddr;
use std::process::Command;

use super::{Level, Report};
use crate::gateway::host;

/// The probe's side of a `wireguard` check with `inside`, as the flags give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTunnel {
    /// The probe's public key (base64).
    pub public_key: String,
    pub tunnel_address: IpAddr,
    pub inside: Option<IpAddr>,
}

/// One line of `wg show all allowed-ips`: interface, peer key, its AllowedIPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIps {
    pub iface: String,
    pub peer: String,
    pub allowed: Vec<String>,
}

/// Parses `wg show all allowed-ips` (`IF\tKEY\tA/N B/M` per line; `(none)` for no AllowedIPs).
pub fn parse_allowed_ips(text: &str) -> Vec<PeerIps> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let iface = f.next()?.trim().to_string();
            let peer = f.next()?.trim().to_string();
            let allowed = f
                .next()
                .unwrap_or("")
                .split_whitespace()
                .filter(|a| *a != "(none)")
                .map(str::to_string)
                .collect();
            (!iface.is_empty() && !peer.is_empty()).then_some(PeerIps {
                iface,
                peer,
                allowed,
            })
        })
        .collect()
}

/// Whether `cidr` (`A/N`, or a bare address) contains `addr`.
pub fn covers(cidr: &str, addr: IpAddr) -> bool {
    let (net, len) = match cidr.split_once('/') {
        Some((n, l)) => (n, l.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else {
        return false;
    };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The device of this host's route to `dst` (None: no route).
fn route_dev(dst: IpAddr) -> Option<String> {
    let v = host::ip_json(&["route", "get", &dst.to_string()]).ok()?;
    v[0]["dev"].as_str().map(str::to_string)
}

fn forwarding(v6: bool) -> Option<u32> {
    let path = if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/conf/all/forwarding"
    };
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub(super) fn check(pt: &ProbeTunnel, r: &mut Report) {
    let addr = pt.tunnel_address;
    let plen = if addr.is_ipv4() { 32 } else { 128 };
    let out = Command::new("wg")
        .args(["show", "all", "allowed-ips"])
        .output();
    let peers = match out {
        Ok(o) if o.status.success() => parse_allowed_ips(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => {
            r.add(
                "probe_allowed_ips",
                None,
                Level::Fail,
                format!(
                    "wg show all allowed-ips failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                None,
            );
            return;
        }
        Err(e) => {
            r.add(
                "probe_allowed_ips",
                None,
                Level::Fail,
                format!("cannot run wg (wireguard-tools): {e}"),
                None,
            );
            return;
        }
    };
    let mine: Vec<&PeerIps> = peers.iter().filter(|p| p.peer == pt.public_key).collect();
    if mine.is_empty() {
        r.add(
            "probe_allowed_ips",
            None,
            Level::Fail,
            format!(
                "no WireGuard interface here lists the probe key {} as a peer: the probe's handshake and echo are dropped",
                pt.public_key
            ),
            Some(format!(
                "wg set IF peer {} allowed-ips {addr}/{plen} && ip route replace {addr}/{plen} dev IF",
                pt.public_key
            )),
        );
        return;
    }
    for p in mine {
        let iface = p.iface.as_str();
        if p.allowed.iter().any(|c| covers(c, addr)) {
            r.add(
                "probe_allowed_ips",
                Some(iface),
                Level::Ok,
                format!(
                    "the probe peer's AllowedIPs ({}) cover its tunnel address {addr}",
                    p.allowed.join(", ")
                ),
                None,
            );
        } else {
            let mut list = p.allowed.clone();
            list.push(format!("{addr}/{plen}"));
            r.add(
                "probe_allowed_ips",
                Some(iface),
                Level::Fail,
                format!(
                    "the probe peer's AllowedIPs ({}) do not cover its tunnel address {addr}: {iface} drops the echo it decrypts",
                    if p.allowed.is_empty() {
                        "none".to_string()
                    } else {
                        p.allowed.join(", ")
                    }
                ),
                // `wg set ... allowed-ips` replaces the list: keep what is there.
                Some(format!(
                    "wg set {iface} peer {} allowed-ips {}",
                    pt.public_key,
                    list.join(",")
                )),
            );
        }
        match route_dev(addr) {
            Some(dev) if dev == iface => r.add(
                "probe_route",
                Some(iface),
                Level::Ok,
                format!("replies to {addr} are routed into {iface}"),
                None,
            ),
            other => r.add(
                "probe_route",
                Some(iface),
                Level::Fail,
                format!(
                    "replies to the probe's tunnel address {addr} are routed {}, not into {iface}: the inside host's echo reply never re-enters the tunnel",
                    other.map_or_else(|| "nowhere".to_string(), |d| format!("to {d}"))
                ),
                Some(format!("ip route replace {addr}/{plen} dev {iface}")),
            ),
        }
    }
    let v6 = addr.is_ipv6();
    let on = forwarding(v6) == Some(1);
    let key = if v6 {
        "net.ipv6.conf.all.forwarding"
    } else {
        "net.ipv4.ip_forward"
    };
    r.add(
        "forwarding",
        None,
        if on { Level::Ok } else { Level::Fail },
        if on {
            format!("{key} = 1: tunnel traffic is forwarded to the inside network")
        } else {
            format!("{key} is off: every user's traffic to the inside network is dropped here")
        },
        (!on).then(|| format!("sysctl -w {key}=1 (persist in /etc/sysctl.d/90-vpnlb.conf)")),
    );
    if let Some(inside) = pt.inside {
        let wg: Vec<&str> = peers
            .iter()
            .filter(|p| p.peer == pt.public_key)
            .map(|p| p.iface.as_str())
            .collect();
        match route_dev(inside) {
            Some(dev) if !wg.contains(&dev.as_str()) => r.add(
                "inside_route",
                Some(&dev),
                Level::Ok,
                format!("{inside} is routed to {dev}"),
                None,
            ),
            Some(dev) => r.add(
                "inside_route",
                Some(&dev),
                Level::Fail,
                format!("{inside} is routed back into the tunnel ({dev})"),
                Some(format!("ip route replace {inside} via <inside router>")),
            ),
            None => r.add(
                "inside_route",
                None,
                Level::Fail,
                format!("no route to the inside host {inside}"),
                Some(format!("ip route replace {inside} via <inside router>")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ips_parse_and_cover() {
        let t =
            "wg0\tAAA=\t10.99.1.1/32 192.0.2.77/32\nwg0\tBBB=\t(none)\nwg1\tCCC=\t0.0.0.0/0 ::/0\n";
        let p = parse_allowed_ips(t);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].allowed, vec!["10.99.1.1/32", "192.0.2.77/32"]);
        assert!(p[1].allowed.is_empty());
        let a: IpAddr = "192.0.2.77".parse().unwrap();
        assert!(covers("192.0.2.77/32", a));
        assert!(covers("192.0.2.0/24", a));
        assert!(covers("0.0.0.0/0", a));
        assert!(covers("192.0.2.77", a));
        assert!(!covers("192.0.2.78/32", a));
        assert!(!covers("::/0", a));
        let b: IpAddr = "2001:db8::77".parse().unwrap();
        assert!(covers("2001:db8::/64", b) && covers("::/0", b) && !covers("2001:db9::/32", b));
    }
}
