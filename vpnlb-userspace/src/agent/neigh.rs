//! Facts about the host's interfaces (ifindex, MAC from sysfs) and next-hop MACs of backends from
//! the kernel's neighbour table (`ip -j neigh`), with a nudge (one UDP datagram) that makes the
//! kernel resolve an address it has not seen yet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use super::desired::Iface;

/// Reads an interface's index and MAC address.
pub fn iface(name: &str) -> Option<Iface> {
    let base = format!("/sys/class/net/{name}");
    let ifindex = std::fs::read_to_string(format!("{base}/ifindex")).ok()?.trim().parse().ok()?;
    let mac = parse_mac(std::fs::read_to_string(format!("{base}/address")).ok()?.trim())?;
    Some(Iface { ifindex, mac })
}

/// The interfaces named, those that exist.
pub fn ifaces<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<String, Iface> {
    names.into_iter().filter_map(|n| iface(n).map(|i| (n.to_string(), i))).collect()
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// States of a usable neighbour entry.
const USABLE: [&str; 6] = ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"];

/// The MAC the kernel has for `addr` on `dev`, if usable.
pub fn lookup(addr: IpAddr, dev: &str) -> Option<[u8; 6]> {
    let out = std::process::Command::new("ip")
        .args(["-j", "neigh", "show", "to", &addr.to_string(), "dev", dev])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?.iter().find_map(|e| {
        let states: Vec<&str> = e["state"].as_array()?.iter().filter_map(|s| s.as_str()).collect();
        if !states.iter().any(|s| USABLE.contains(s)) {
            return None;
        }
        parse_mac(e["lladdr"].as_str()?)
    })
}

/// Makes the kernel resolve `addr` (it sends ARP / neighbour solicitation for the datagram).
pub fn nudge(addr: IpAddr) {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    if let Ok(s) = UdpSocket::bind(bind) {
        // Port 9 (discard); the datagram itself does not matter.
        let _ = s.send_to(b"vpnlb", SocketAddr::new(addr, 9));
    }
}

/// Looks `addr` up, nudging the kernel and retrying for up to `wait`.
pub fn resolve(addr: IpAddr, dev: &str, wait: Duration) -> Option<[u8; 6]> {
    if let Some(m) = lookup(addr, dev) {
        return Some(m);
    }
    nudge(addr);
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < wait {
        std::thread::sleep(step);
        waited += step;
        if let Some(m) = lookup(addr, dev) {
            return Some(m);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:00:00:00:00:11"), Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:11:22"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:11"), None);
    }

    #[test]
    fn loopback_exists() {
        let lo = iface("lo").expect("lo");
        assert_eq!(lo.ifindex, 1);
        assert_eq!(lo.mac, [0; 6]);
    }
}
