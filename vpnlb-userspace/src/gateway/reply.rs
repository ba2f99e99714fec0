//! The active reply test of `vpnlb gateway-check`: does the daemon answer a packet sent to the VIP
//! *from the VIP*? A temporary namespace `vpnlb-gwcheck-PID` is wired to this one by a veth pair
//! and plays a client with an address (default from 198.18.0.0/15, the benchmarking range) that
//! nothing else uses. This namespace gets a /32 route to that client carrying the source the host
//! would pick towards its real clients, so a daemon that lets the kernel choose (no pktinfo) answers
//! from the same address it would use for real clients. The probe is one of vpnlb's health probes
//! (UDP, IKEv2, WireGuard handshake) run inside the client namespace; a filtered packet socket here
//! records the source of every reply to the client, whatever interface it leaves by. Everything is removed
//! on return (also on error); real traffic is never touched.

use std::net::{IpAddr, Ipv4Addr};
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

/// One UDP packet to the probe client seen leaving this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
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

/// Builds the client namespace; `route_src` is the source of this namespace's route to `client`.
fn wire(vip: Ipv4Addr, client: Ipv4Addr, route_src: Ipv4Addr) -> anyhow::Result<ProbeNs> {
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
    let (c32, v32) = (format!("{client}/32"), format!("{vip}/32"));
    ip(&["-n", n, "link", "set", "lo", "up"])?;
    ip(&["-n", n, "link", "set", "eth0", "up"])?;
    ip(&["-n", n, "addr", "add", &c32, "dev", "eth0"])?;
    ip(&["-n", n, "route", "add", &v32, "dev", "eth0"])?;
    let host_mac = mac_of(&["link", "show", "dev", host_if])?;
    let probe_mac = mac_of(&["-n", n, "link", "show", "dev", "eth0"])?;
    let (vs, cs, ss) = (vip.to_string(), client.to_string(), route_src.to_string());
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
    ip(&["route", "replace", &c32, "dev", host_if, "src", &ss])?;
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

/// A packet socket seeing the packets this namespace sends to `client` from UDP `port` (ETH_P_ALL:
/// protocol-specific packet sockets never see outgoing packets). A classic BPF filter drops
/// everything else in the kernel, so a busy gateway's traffic is not copied to us.
fn capture_socket(client: Ipv4Addr, port: u16) -> anyhow::Result<Socket> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX, BPF_MSH, BPF_RET,
        BPF_W, SKF_AD_OFF, SKF_AD_PROTOCOL,
    };
    let op = |code: u32| code as u16;
    // Offsets are from the network header (SOCK_DGRAM); every failed test jumps to "drop" (10).
    let filter = [
        SockFilter::new(
            op(BPF_LD | BPF_W | BPF_ABS),
            0,
            0,
            (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32,
        ),
        SockFilter::new(op(BPF_JMP | BPF_JEQ | BPF_K), 0, 8, libc::ETH_P_IP as u32),
        SockFilter::new(op(BPF_LD | BPF_B | BPF_ABS), 0, 0, 9),
        SockFilter::new(
            op(BPF_JMP | BPF_JEQ | BPF_K),
            0,
            6,
            libc::IPPROTO_UDP as u32,
        ),
        SockFilter::new(op(BPF_LD | BPF_W | BPF_ABS), 0, 0, 16),
        SockFilter::new(op(BPF_JMP | BPF_JEQ | BPF_K), 0, 4, u32::from(client)),
        SockFilter::new(op(BPF_LDX | BPF_B | BPF_MSH), 0, 0, 0),
        SockFilter::new(op(BPF_LD | BPF_H | BPF_IND), 0, 0, 0),
        SockFilter::new(op(BPF_JMP | BPF_JEQ | BPF_K), 0, 1, u32::from(port)),
        SockFilter::new(op(BPF_RET | BPF_K), 0, 0, 0xffff),
        SockFilter::new(op(BPF_RET | BPF_K), 0, 0, 0),
    ];
    let proto = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
    let sock = Socket::new(Domain::PACKET, Type::DGRAM, Some(proto))
        .context("AF_PACKET socket (needs root)")?;
    sock.attach_filter(&filter).context("SO_ATTACH_FILTER")?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(sock)
}

/// The UDP source and source port of an outgoing IPv4 packet to `client`.
fn parse_reply(pkt: &[u8], client: Ipv4Addr) -> Option<(Ipv4Addr, u16)> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != libc::IPPROTO_UDP as u8 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    if dst != client || pkt.len() < ihl + 8 {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    Some((src, u16::from_be_bytes([pkt[ihl], pkt[ihl + 1]])))
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
fn capture(sock: Socket, client: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> Vec<Seen> {
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
        if n <= 0
            || sll.sll_pkttype != libc::PACKET_OUTGOING
            || sll.sll_protocol != (libc::ETH_P_IP as u16).to_be()
        {
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
    vip: Ipv4Addr,
    client: Ipv4Addr,
    timeout: Duration,
) -> Result<String, String> {
    let path = format!("/run/netns/{ns}");
    let target = CheckTarget {
        backend_id: 0,
        check_index: 0,
        addr: IpAddr::V4(vip),
        source: Some(IpAddr::V4(client)),
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
    vip: Ipv4Addr,
    port: u16,
    client: Ipv4Addr,
    route_src: Ipv4Addr,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
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
        let client = Ipv4Addr::new(198, 18, 0, 2);
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&client.octets());
        p[20..22].copy_from_slice(&51820u16.to_be_bytes());
        assert_eq!(
            parse_reply(&p, client),
            Some((Ipv4Addr::new(10, 0, 0, 1), 51820))
        );
        assert_eq!(parse_reply(&p, Ipv4Addr::new(198, 18, 0, 3)), None);
        p[9] = 6;
        assert_eq!(parse_reply(&p, client), None);
        assert_eq!(parse_reply(&p[..10], client), None);
    }
}
