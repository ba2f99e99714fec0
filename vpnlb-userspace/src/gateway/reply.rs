//! The active reply test of `vpnlb gateway-check`: does the daemon answer a packet sent to the VIP
//! *from the VIP*? A temporary namespace `vpnlb-gwcheck-PID` is wired to this one by a veth pair
//! and plays a client with an address nothing else uses (default from the benchmarking ranges
//! 198.18.0.0/15 and 2001:2::/48). This namespace gets a host route to that client carrying the
//! source the host would pick towards its real clients, so a daemon that lets the kernel choose (no
//! pktinfo) answers from the same address it would use for real clients. The probe is one of
//! vpnlb's health probes (UDP, IKEv2, WireGuard handshake) run inside the client namespace; a
//! filtered packet socket here records the source of every reply to the client, whatever interface
//! it leaves by. Everything is removed on return (also on error); real traffic is never touched.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Protocol, SockFilter, Socket, Type};

use crate::health::ikev2::Ikev2Probe;
use crate::health::udp::UdpProbe;
use crate::health::wireguard::WireguardProbe;
use crate::health::{CheckSpec, CheckTarget};

use super::host::{self, ip};

/// Prefix of the temporary namespaces (followed by the PID).
pub const NS_PREFIX: &str = "vpnlb-gwcheck-";
/// Serializes reply tests on this machine.
const LOCK: &str = "/run/vpnlb-gwcheck.lock";

/// One UDP packet to the probe client seen leaving this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub sport: u16,
    pub iface: String,
}

/// What the probe got.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The probe's verdict: `Ok(detail)` when a valid answer came back from the VIP (its socket is
    /// connected to VIP:port, so answers from any other address never reach it).
    pub probe: Result<String, String>,
    /// Every reply from `port` to the probe client that left this namespace.
    pub replies: Vec<Seen>,
}

/// Deletes the veth pair (synchronously, with the route and neighbour entry on it; a namespace is
/// torn down asynchronously) and the temporary namespace.
struct ProbeNs {
    name: String,
    host_if: String,
}

impl Drop for ProbeNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Deletes `vpnlb-gwcheck-PID` namespaces of processes that no longer exist (killed runs).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn mac_of(args: &[&str]) -> anyhow::Result<String> {
    let v = host::ip_json(args)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .context("no MAC address")
}

/// Builds the client namespace; `route_src` (None: the kernel's choice) is the source of this
/// namespace's route to `client`. `vip` and `client` are of one family.
fn wire(vip: IpAddr, client: IpAddr, route_src: Option<IpAddr>) -> anyhow::Result<ProbeNs> {
    remove_stale();
    let pid = std::process::id();
    let ns = ProbeNs {
        name: format!("{NS_PREFIX}{pid}"),
        host_if: format!("vgwc{pid}"),
    };
    let host_if = ns.host_if.as_str();
    let _ = ip(&["netns", "del", &ns.name]);
    ip(&["netns", "add", &ns.name])?;
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    ip(&["link", "set", host_if, "up"])?;
    let n = ns.name.as_str();
    let plen = if vip.is_ipv4() { 32 } else { 128 };
    let (c, v) = (format!("{client}/{plen}"), format!("{vip}/{plen}"));
    ip(&["-n", n, "link", "set", "lo", "up"])?;
    ip(&["-n", n, "link", "set", "eth0", "up"])?;
    // nodad: a tentative IPv6 address cannot be bound for a second or so.
    let nodad: &[&str] = if vip.is_ipv4() { &[] } else { &["nodad"] };
    ip(&[&["-n", n, "addr", "add", &c, "dev", "eth0"], nodad].concat())?;
    ip(&["-n", n, "route", "add", &v, "dev", "eth0"])?;
    let host_mac = mac_of(&["link", "show", "dev", host_if])?;
    let probe_mac = mac_of(&["-n", n, "link", "show", "dev", "eth0"])?;
    let (vs, cs) = (vip.to_string(), client.to_string());
    ip(&[
        "-n",
        n,
        "neigh",
        "replace",
        &vs,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    // Replace: a killed run's route may still point at its (dying) veth.
    let src = route_src.map(|s| s.to_string());
    let src_args: Vec<&str> = src.iter().flat_map(|s| ["src", s.as_str()]).collect();
    ip(&[&["route", "replace", &c, "dev", host_if][..], &src_args].concat())?;
    ip(&[
        "neigh",
        "replace",
        &cs,
        "lladdr",
        &probe_mac,
        "dev",
        host_if,
        "nud",
        "permanent",
    ])?;
    Ok(ns)
}

/// Classic BPF accepting a packet only when every (load, value) test matches: each test is a
/// load instruction and a compare that jumps to the final "drop" when it differs.
fn all_equal(tests: &[(u32, u32, u32)]) -> Vec<SockFilter> {
    use libc::{BPF_JEQ, BPF_JMP, BPF_K, BPF_RET};
    let n = tests.len();
    let mut f = Vec::with_capacity(2 * n + 2);
    for (i, &(load, k, value)) in tests.iter().enumerate() {
        f.push(SockFilter::new(load as u16, 0, 0, k));
        // From compare i (at 2i+1), the drop (at 2n+1) is 2(n-i)-1 instructions ahead.
        let to_drop = u8::try_from(2 * (n - i) - 1).expect("short filter");
        f.push(SockFilter::new(
            (BPF_JMP | BPF_JEQ | BPF_K) as u16,
            0,
            to_drop,
            value,
        ));
    }
    f.push(SockFilter::new((BPF_RET | BPF_K) as u16, 0, 0, 0xffff));
    f.push(SockFilter::new((BPF_RET | BPF_K) as u16, 0, 0, 0));
    f
}

/// A packet socket seeing the packets this namespace sends to `client` from UDP `port` (ETH_P_ALL:
/// protocol-specific packet sockets never see outgoing packets). A classic BPF filter drops
/// everything else in the kernel, so a busy gateway's traffic is not copied to us. IPv4 replies
/// with IP options and IPv6 replies with extension headers are not matched (hosts send neither).
fn capture_socket(client: IpAddr, port: u16) -> anyhow::Result<Socket> {
    use libc::{BPF_ABS, BPF_B, BPF_H, BPF_LD, BPF_W, SKF_AD_OFF, SKF_AD_PROTOCOL};
    let (b, h, w) = (
        BPF_LD | BPF_B | BPF_ABS,
        BPF_LD | BPF_H | BPF_ABS,
        BPF_LD | BPF_W | BPF_ABS,
    );
    let udp = libc::IPPROTO_UDP as u32;
    // Offsets are from the network header (SOCK_DGRAM).
    let mut tests = vec![(w, (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32, 0)];
    match client {
        IpAddr::V4(c) => {
            tests[0].2 = libc::ETH_P_IP as u32;
            tests.extend([
                (b, 0, 0x45),
                (b, 9, udp),
                (w, 16, u32::from(c)),
                (h, 20, port.into()),
            ]);
        }
        IpAddr::V6(c) => {
            tests[0].2 = libc::ETH_P_IPV6 as u32;
            tests.push((b, 6, udp));
            for (i, word) in c.octets().chunks(4).enumerate() {
                let word = u32::from_be_bytes(word.try_into().expect("4 bytes"));
                tests.push((w, 24 + 4 * i as u32, word));
            }
            tests.push((h, 40, port.into()));
        }
    }
    let proto = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
    let sock = Socket::new(Domain::PACKET, Type::DGRAM, Some(proto))
        .context("AF_PACKET socket (needs root)")?;
    sock.attach_filter(&all_equal(&tests))
        .context("SO_ATTACH_FILTER")?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(sock)
}

/// The UDP source and source port of an outgoing IPv4/IPv6 packet to `client`.
fn parse_reply(pkt: &[u8], client: IpAddr) -> Option<(IpAddr, u16)> {
    let (src, dst, l4): (IpAddr, IpAddr, usize) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 && pkt[9] == libc::IPPROTO_UDP as u8 => {
            let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&pkt[o..o + 4]).expect("4 bytes"));
            (a(12), a(16), usize::from(pkt[0] & 0x0f) * 4)
        }
        6 if pkt.len() >= 40 && pkt[6] == libc::IPPROTO_UDP as u8 => {
            let a =
                |o: usize| IpAddr::from(<[u8; 16]>::try_from(&pkt[o..o + 16]).expect("16 bytes"));
            (a(8), a(24), 40)
        }
        _ => return None,
    };
    if dst != client || pkt.len() < l4 + 8 {
        return None;
    }
    Some((src, u16::from_be_bytes([pkt[l4], pkt[l4 + 1]])))
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Reads outgoing UDP packets to `client` from `port` until `stop`.
fn capture(sock: Socket, client: IpAddr, port: u16, stop: Arc<AtomicBool>) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: zeroed sockaddr_ll is a valid out-parameter.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and sll are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n <= 0 || sll.sll_pkttype != libc::PACKET_OUTGOING {
            continue;
        }
        if let Some((src, sport)) = parse_reply(&buf[..n as usize], client)
            && sport == port
        {
            seen.push(Seen {
                src,
                sport,
                iface: ifname(sll.sll_ifindex as u32),
            });
        }
    }
    seen
}

/// Runs `spec` (udp, ikev2 or wireguard) once against VIP from `client` inside namespace `ns`.
fn probe_in(
    ns: &str,
    spec: &CheckSpec,
    vip: IpAddr,
    client: IpAddr,
    timeout: Duration,
) -> Result<String, String> {
    let path = format!("/run/netns/{ns}");
    let target = CheckTarget {
        backend_id: 0,
        check_index: 0,
        generation: 0,
        addr: vip,
        source: Some(client),
        interface: None,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
            // SAFETY: setns on a valid netns fd; only this short-lived thread moves.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let r = match spec {
                    CheckSpec::Udp { .. } => match UdpProbe::new(spec, &target) {
                        Ok(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    CheckSpec::Ikev2 { .. } => match Ikev2Probe::new(spec, &target) {
                        Ok(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    CheckSpec::Wireguard { .. } => match WireguardProbe::new(spec, &target) {
                        Ok(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    other => return Err(format!("no reply test for {} checks", other.label())),
                };
                r.map(|ok| ok.detail)
            })
        })
        .join()
        .unwrap_or_else(|_| Err("probe thread panicked".into()))
    })
}

/// Sends one `spec` probe to `vip` from `client` through a temporary namespace and records where
/// the replies to the client came from. `route_src` is the source the route to the client carries.
pub fn run(
    spec: &CheckSpec,
    vip: IpAddr,
    port: u16,
    client: IpAddr,
    route_src: Option<IpAddr>,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    if vip.is_ipv4() != client.is_ipv4() {
        anyhow::bail!("the probe client {client} and the VIP {vip} are of different families");
    }
    // One reply test at a time: two would fight over the probe client's route.
    let lock = std::fs::File::create(LOCK).with_context(|| format!("create {LOCK}"))?;
    // SAFETY: flock on a file we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("flock");
    }
    let sock = capture_socket(client, port)?;
    let ns = wire(vip, client, route_src)?;
    let stop = Arc::new(AtomicBool::new(false));
    let cap = {
        let stop = stop.clone();
        std::thread::spawn(move || capture(sock, client, port, stop))
    };
    let probe = probe_in(&ns.name, spec, vip, client, timeout);
    // Replies from a wrong address miss the probe's connected socket: give them a moment to pass.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let replies = cap.join().unwrap_or_default();
    drop(ns);
    Ok(Outcome { probe, replies })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_udp_replies_to_the_client_only() {
        let client = IpAddr::from([198, 18, 0, 2]);
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 2]);
        p[20..22].copy_from_slice(&51820u16.to_be_bytes());
        assert_eq!(
            parse_reply(&p, client),
            Some((IpAddr::from([10, 0, 0, 1]), 51820))
        );
        assert_eq!(parse_reply(&p, IpAddr::from([198, 18, 0, 3])), None);
        p[9] = 6;
        assert_eq!(parse_reply(&p, client), None);
        assert_eq!(parse_reply(&p[..10], client), None);
    }

    #[test]
    fn parses_ipv6_replies() {
        let client: IpAddr = "2001:2::2".parse().unwrap();
        let src: IpAddr = "2001:db8::11".parse().unwrap();
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = 17;
        if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, client) {
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
        }
        p[40..42].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(parse_reply(&p, client), Some((src, 500)));
        assert_eq!(parse_reply(&p[..44], client), None);
        p[6] = 58;
        assert_eq!(parse_reply(&p, client), None);
    }
}
