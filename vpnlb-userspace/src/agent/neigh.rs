//! Facts about the host's interfaces (ifindex and MAC, asked of the kernel in the agent's network
//! namespace) and next-hop MACs of backends from the kernel's neighbour table (`ip -j neigh`), with
//! a nudge (one UDP datagram) that makes the kernel resolve an address it has not seen yet; and
//! the watcher task that reports changes of the entries the core asks for ([`watch`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::desired::Iface;

/// A neighbour-table report for a backend without a configured MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighUpdate {
    pub backend: String,
    /// The generation of the watch that produced it ([`Effect::WatchNeigh`]).
    pub generation: u64,
    /// The usable entry's MAC; `None`: no usable entry (the watcher has nudged the kernel).
    pub mac: Option<[u8; 6]>,
    pub detail: String,
}

/// The entries to watch: backend -> (key, generation). Shared by the shell (which follows the
/// core's `WatchNeigh` / `UnwatchNeigh` effects) and the watcher task.
pub type Wanted = Arc<Mutex<BTreeMap<String, (NeighKey, u64)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds or replaces a watched entry.
pub fn want(wanted: &Wanted, backend: &str, key: NeighKey, generation: u64) {
    lock(wanted).insert(backend.to_string(), (key, generation));
}

/// Stops watching `backend`.
pub fn unwant(wanted: &Wanted, backend: &str) {
    lock(wanted).remove(backend);
}

/// How long the watcher sleeps after a read: 1 s when every wanted entry was found; while some
/// are missing it reads again sooner (100 ms, doubling up to 1 s) so a fresh start resolves
/// quickly without polling fast forever for an address that never answers.
pub fn next_read(missing_streak: u32) -> Duration {
    if missing_streak == 0 {
        return Duration::from_secs(1);
    }
    Duration::from_millis(100u64.saturating_mul(1 << (missing_streak - 1).min(4)))
        .min(Duration::from_secs(1))
}

/// Reads of a new entry that may miss (each followed by a nudge) before "no neighbour entry" is
/// reported: with [`next_read`]'s schedule about 0.7 s, so a fresh start reports the MACs the
/// kernel resolves in that time rather than a failure first.
pub const MISSES_BEFORE_REPORT: u32 = 3;

/// Resolves the next-hop MACs of every wanted backend from one read of the neighbour table per
/// round (nudging the kernel for missing ones), and reports each change of a backend's MAC, and
/// the first result of every new (backend, generation), on `tx`. A new entry that is missing is
/// reported only after [`MISSES_BEFORE_REPORT`] reads.
pub fn watch(wanted: Wanted, tx: mpsc::Sender<NeighUpdate>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: HashMap<(String, u64), Option<[u8; 6]>> = HashMap::new();
        let mut misses: HashMap<(String, u64), u32> = HashMap::new();
        let mut streak = 0u32;
        loop {
            let snapshot: Vec<(String, (NeighKey, u64))> = lock(&wanted)
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            let mut missing = false;
            if !snapshot.is_empty() {
                let table = tokio::task::spawn_blocking(table).await.unwrap_or_default();
                let live =
                    |k: &(String, u64)| snapshot.iter().any(|(n, (_, g))| *n == k.0 && *g == k.1);
                last.retain(|k, _| live(k));
                misses.retain(|k, _| live(k));
                for (name, (key, generation)) in &snapshot {
                    let mac = table.get(key).copied();
                    let (dev, addr) = (&key.0, key.1);
                    let k = (name.clone(), *generation);
                    if mac.is_none() {
                        missing = true;
                        nudge(addr);
                        if !last.contains_key(&k) {
                            let n = misses.entry(k.clone()).or_default();
                            *n += 1;
                            if *n < MISSES_BEFORE_REPORT {
                                continue;
                            }
                        }
                    }
                    if last.get(&k) == Some(&mac) {
                        continue;
                    }
                    let detail = match mac {
                        Some(m) => format!("lladdr {} on {dev}", fmt_mac(&m)),
                        None => format!(
                            "no neighbour entry for {addr} on {dev}: set mac = ... or make it reachable"
                        ),
                    };
                    let u = NeighUpdate {
                        backend: name.clone(),
                        generation: *generation,
                        mac,
                        detail,
                    };
                    if tx.send(u).await.is_err() {
                        return;
                    }
                    last.insert(k, mac);
                }
            }
            streak = if missing { streak.saturating_add(1) } else { 0 };
            tokio::time::sleep(next_read(streak)).await;
        }
    })
}

/// `02:00:00:00:00:11`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

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

/// Every interface of the agent's network namespace (if_nameindex(3)), with its ifindex and MAC.
pub fn all_ifaces() -> HashMap<String, Iface> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry (or null on error),
    // freed below with if_freenameindex; the names are NUL-terminated C strings inside it.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return HashMap::new();
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    ifaces(names.iter().map(String::as_str))
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
    fn missing_entries_are_read_again_sooner_then_backing_off() {
        assert_eq!(next_read(0), Duration::from_secs(1));
        assert_eq!(next_read(1), Duration::from_millis(100));
        assert_eq!(next_read(2), Duration::from_millis(200));
        assert_eq!(next_read(4), Duration::from_millis(800));
        assert_eq!(next_read(5), Duration::from_secs(1));
        assert_eq!(next_read(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn loopback_exists() {
        assert_eq!(all_ifaces().get("lo").map(|i| i.ifindex), Some(1));
        let lo = iface("lo").expect("lo");
        assert_eq!(lo.ifindex, 1);
        assert_eq!(lo.mac, [0; 6]);
    }
}
