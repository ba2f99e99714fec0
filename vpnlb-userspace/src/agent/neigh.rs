//! Facts about the host's interfaces (ifindex and MAC, asked of the kernel in the agent's network
//! namespace) and next-hop MACs of backends from the kernel's neighbour table (`ip -j neigh`), with
//! a nudge (one UDP datagram) that makes the kernel resolve an address it has not seen yet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use super::desired::Iface;

/// Reads an interface's index and MAC address in the agent's network namespace. Syscalls, not
/// /sys/class/net: sysfs shows the namespace of whoever mounted it, which is not ours when the
/// agent was moved into a namespace with `nsenter --net` (the wrong ifindex then makes TX_PORTS
/// writes fail with EINVAL, or redirect to another device).
pub fn iface(name: &str) -> Option<Iface> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c = std::ffi::CString::new(name).ok()?;
    if c.as_bytes().len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return None;
    }
    // SAFETY: plain socket(2); the fd is owned (and closed) by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(c.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_ifru.ifru_hwaddr of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return None;
    }
    // SAFETY: the ioctl above filled the hwaddr member of the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Some(Iface { ifindex, mac })
}

/// The interfaces named, those that exist.
pub fn ifaces<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<String, Iface> {
    names
        .into_iter()
        .filter_map(|n| iface(n).map(|i| (n.to_string(), i)))
        .collect()
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

/// A (device, address) key of the neighbour table.
pub type NeighKey = (String, IpAddr);

/// The usable entries of the kernel's neighbour table, all devices and families, from one
/// `ip -j neigh show`: one process per round however many backends need a MAC.
pub fn table() -> HashMap<NeighKey, [u8; 6]> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-j", "neigh", "show"])
        .output()
    else {
        return HashMap::new();
    };
    parse_table(&out.stdout)
}

fn parse_table(json: &[u8]) -> HashMap<NeighKey, [u8; 6]> {
    let Ok(serde_json::Value::Array(entries)) = serde_json::from_slice(json) else {
        return HashMap::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let usable = e["state"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_str())
                .any(|s| USABLE.contains(&s));
            if !usable {
                return None;
            }
            let dst: IpAddr = e["dst"].as_str()?.parse().ok()?;
            let dev = e["dev"].as_str()?.to_string();
            Some(((dev, dst), parse_mac(e["lladdr"].as_str()?)?))
        })
        .collect()
}

/// Makes the kernel resolve `addr` (it sends ARP / neighbour solicitation for the datagram).
pub fn nudge(addr: IpAddr) {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    if let Ok(s) = UdpSocket::bind(bind) {
        // Port 9 (discard); the datagram itself does not matter.
        let _ = s.send_to(b"vpnlb", SocketAddr::new(addr, 9));
    }
}

/// Looks every `wanted` key up; nudges the kernel for the missing ones and polls the table (every
/// 50 ms, one read for all) for up to `wait`. Returns what was found.
pub fn resolve_all(wanted: &[NeighKey], wait: Duration) -> HashMap<NeighKey, [u8; 6]> {
    let found = |t: &HashMap<NeighKey, [u8; 6]>| -> HashMap<NeighKey, [u8; 6]> {
        wanted
            .iter()
            .filter_map(|k| t.get(k).map(|m| (k.clone(), *m)))
            .collect()
    };
    let mut have = found(&table());
    if have.len() == wanted.len() {
        return have;
    }
    for k in wanted.iter().filter(|k| !have.contains_key(*k)) {
        nudge(k.1);
    }
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < wait && have.len() < wanted.len() {
        std::thread::sleep(step);
        waited += step;
        have = found(&table());
    }
    have
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
    fn the_table_keeps_usable_entries_only() {
        let json = br#"[
            {"dst":"10.0.0.11","dev":"eth0","lladdr":"02:00:00:00:00:11","state":["REACHABLE"]},
            {"dst":"10.0.0.12","dev":"eth0","lladdr":"02:00:00:00:00:12","state":["STALE"]},
            {"dst":"10.0.0.13","dev":"eth0","state":["FAILED"]},
            {"dst":"10.0.0.14","dev":"eth0","lladdr":"02:00:00:00:00:14","state":["INCOMPLETE"]},
            {"dst":"fd00::11","dev":"eth1","lladdr":"02:00:00:00:01:11","state":["DELAY","PROBE"]}
        ]"#;
        let t = parse_table(json);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(
            t[&("eth0".to_string(), "10.0.0.12".parse().unwrap())],
            [2, 0, 0, 0, 0, 0x12]
        );
        assert_eq!(
            t[&("eth1".to_string(), "fd00::11".parse().unwrap())],
            [2, 0, 0, 0, 1, 0x11]
        );
        assert!(parse_table(b"garbage").is_empty());
    }

    #[test]
    fn loopback_exists() {
        let lo = iface("lo").expect("lo");
        assert_eq!(lo.ifindex, 1);
        assert_eq!(lo.mac, [0; 6]);
    }
}
