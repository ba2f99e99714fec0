//! An L2 testbed in network namespaces: one switch (bridge), a client namespace with many source
//! addresses, the load-balancer namespace running the real `vpnlb_ingress` in native XDP mode, and N
//! gateway namespaces with the VIP on `lo` (DSR) running UDP echo sinks that answer with their name.
//! Used by the demo, the real-packet data-plane test ([`Testbed`]: the test attaches the program) and
//! the agent tests ([`Topology`] only: the `vpnlb` agent attaches it).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::programs::{Xdp, XdpMode};
use vpnlb::dataplane::loader::{LoadOptions, load, object_bytes};
use vpnlb::dataplane::maps::AyaMaps;
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::{BACKEND_UP, FWD_MODE_L2DSR, GlobalConfig, PROTO_UDP, VipKey};

use crate::netns::{Netns, cable, switch};
use crate::probe_round::{ProbeRound, Step};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
pub const VIP_PORT: u16 = 51820;
pub const LB_ADDR: &str = "10.77.0.1";
/// Maglev table size for the testbed VIP (prime; small keeps ring writes quick).
pub const RING_SIZE: u32 = 65537;

/// The object with the trivial programs (`vpnlb_floor_tx`, `vpnlb_floor_redirect`, `vpnlb_pass`):
/// `$VPNLB_BENCH_OBJ` (set by xtask), else the release build next to the production object.
pub fn helper_object() -> Vec<u8> {
    let path = std::env::var("VPNLB_BENCH_OBJ").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../vpnlb-ebpf/target/bpfel-unknown-none/release/vpnlb-bench-progs"
        )
        .to_string()
    });
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run cargo xtask build-ebpf)"))
}

/// A UDP echo sink in a gateway namespace: counts datagrams per client and answers with its name.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams received per client address.
    pub seen: Arc<Mutex<HashMap<SocketAddr, u64>>>,
}

impl Sink {
    pub fn start(ns: &Netns, name: &str, bind: SocketAddr) -> Sink {
        let sock = ns.run(|| {
            UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind} in {}: {e}", ns.name()))
        });
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, seen2, name) = (stop.clone(), seen.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    *seen2.lock().unwrap().entry(from).or_insert(0) += 1;
                    let mut reply = name.as_bytes().to_vec();
                    reply.push(b' ');
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        Sink {
            stop,
            thread: Some(thread),
            seen,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Client flows: one UDP socket per (source address, port), all sending to the VIP.
pub struct Flows {
    pub sockets: Vec<UdpSocket>,
    /// Datagrams [`Flows::probe`] sent per flow, over all rounds.
    sent: Vec<AtomicU32>,
}

impl Flows {
    pub fn new(sockets: Vec<UdpSocket>) -> Flows {
        let sent = sockets.iter().map(|_| AtomicU32::new(0)).collect();
        Flows { sockets, sent }
    }

    /// Probes every flow once and returns, per flow, the name of the gateway that answered (None
    /// if none did within `wait`). Replies come straight from the gateway (DSR), from the VIP.
    ///
    /// A flow that has not answered gets its datagram again (first after 200 ms, then with a
    /// doubling gap, see [`crate::probe_round`]) until `wait` has passed: UDP is lossy and a busy
    /// machine slow, so `wait` should be generous; the round ends as soon as every flow has
    /// answered. A flow that has answered is never sent to again, so a wrong gateway's answer is
    /// what the caller sees. Panics at once on a reply not from the VIP or on a flow answered by
    /// two gateways in one round.
    pub fn probe(&self, round: u32, wait: Duration) -> Vec<Option<String>> {
        self.probe_at(SocketAddr::from((VIP, VIP_PORT)), round, wait)
    }

    /// [`Flows::probe`] towards `dest` (the VIP in the testbed).
    pub fn probe_at(&self, dest: SocketAddr, round: u32, wait: Duration) -> Vec<Option<String>> {
        for s in &self.sockets {
            s.set_nonblocking(true).expect("non-blocking flow socket");
        }
        let mut r = ProbeRound::new(self.sockets.len(), Instant::now(), wait);
        loop {
            match r.step(Instant::now()) {
                Step::Send(to) => {
                    for i in to {
                        let msg = format!("flow {i} round {round}");
                        match self.sockets[i].send_to(msg.as_bytes(), dest) {
                            Ok(_) => {
                                self.sent[i].fetch_add(1, Ordering::Relaxed);
                            }
                            // A full socket buffer loses the datagram like the network would.
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) => panic!("flow {i}: send to {dest}: {e}"),
                        }
                    }
                }
                Step::Wait(until) => {
                    self.wait_readable(until);
                    self.collect(&mut r, dest, round);
                }
                Step::Done => break,
                // Past the deadline, still take the replies that are already queued.
                Step::Expired => {
                    self.collect(&mut r, dest, round);
                    break;
                }
            }
        }
        for s in &self.sockets {
            s.set_nonblocking(false).expect("blocking flow socket");
        }
        r.into_answers()
    }

    /// Blocks until a flow socket is readable or `until` (poll(2) over all of them).
    fn wait_readable(&self, until: Instant) {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let left = until.saturating_duration_since(Instant::now());
        // Rounded up: a wait of 0 ms before `until` would spin.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of fds.len() pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
        }
    }

    /// Takes every queued reply (all sockets, non-blocking) into the round: this round's answers
    /// count, stale answers of earlier rounds are skipped.
    fn collect(&self, r: &mut ProbeRound, dest: SocketAddr, round: u32) {
        let mut buf = [0u8; 2048];
        for (i, s) in self.sockets.iter().enumerate() {
            let tail = format!("flow {i} round {round}");
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                assert_eq!(from, dest, "flow {i}: reply not from the VIP");
                let text = String::from_utf8_lossy(&buf[..n]);
                if !text.ends_with(&tail) {
                    continue;
                }
                let gw = text.split(' ').next().unwrap_or_default();
                if let Err(e) = r.answer(i, gw) {
                    panic!("{e}: {:?}", self.sockets[i].local_addr());
                }
            }
        }
    }

    /// Datagrams sent per flow by all probes so far (one per round unless some were resent).
    pub fn sent(&self) -> Vec<u32> {
        self.sent
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// All datagrams sent by all probes so far.
    pub fn sent_total(&self) -> u64 {
        self.sent().iter().map(|&c| u64::from(c)).sum()
    }
}

/// The namespaces, cables and sinks of the testbed, without any program of ours on the LB: the
/// switch, a client namespace with many source addresses, the LB namespace (`eth0`, `vpnlb_pass` on
/// its switch-side peer so native XDP_TX works) and the gateways (VIP on `lo`, DSR sysctls, a UDP
/// echo sink each). [`Testbed`] attaches `vpnlb_ingress` itself; the agent tests run `vpnlb run`.
/// Everything is torn down on drop.
pub struct Topology {
    // Field order is drop order: sinks and the helper program go before the namespaces.
    pub sinks: Vec<Sink>,
    /// `vpnlb_pass` on the switch side of the LB's veth (native XDP_TX needs a program on the peer).
    pub peer_ebpf: aya::Ebpf,
    pub client: Netns,
    pub lb: Netns,
    pub gws: Vec<Netns>,
    pub sw: Netns,
    pub client_addrs: Vec<Ipv4Addr>,
    /// MAC of the LB's `eth0`.
    pub lb_mac: [u8; 6],
}

/// Address of gateway `i` (0-based) on the switch.
pub fn gw_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

impl Topology {
    /// Brings up `n_gw` gateways and `n_clients` client addresses under namespace prefix `prefix`
    /// (must start with `vpnlb`). Nothing is attached to the LB's `eth0`.
    pub fn up(prefix: &str, n_gw: usize, n_clients: usize) -> Topology {
        let sw = switch(&format!("{prefix}-sw"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        cable(&sw, "lb", &lb, &format!("{LB_ADDR}/24"));
        let client = Netns::new(&format!("{prefix}-cl"));
        cable(&sw, "cl", &client, "10.77.0.2/24");
        let client_addrs: Vec<Ipv4Addr> = (0..n_clients)
            .map(|i| Ipv4Addr::new(10, 77, 0, 20 + i as u8))
            .collect();
        for a in &client_addrs {
            client.sh(&format!("ip addr add {a}/24 dev eth0"));
        }
        // The VIP is routed to the LB: here a static neighbour entry on the client.
        let lb_mac = lb.mac("eth0");
        client.sh(&format!(
            "ip neigh replace {VIP} lladdr {} dev eth0 nud permanent",
            crate::netns::fmt_mac(&lb_mac)
        ));
        let mut gws = Vec::new();
        for i in 0..n_gw {
            let gw = Netns::new(&format!("{prefix}-gw{}", i + 1));
            cable(
                &sw,
                &format!("gw{}", i + 1),
                &gw,
                &format!("{}/24", gw_addr(i)),
            );
            // DSR: the VIP on lo, never answered for by ARP.
            gw.sh(&format!(
                "ip addr add {VIP}/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
            ));
            gws.push(gw);
        }
        let sinks = gws
            .iter()
            .enumerate()
            .map(|(i, gw)| {
                Sink::start(
                    gw,
                    &format!("gw{}", i + 1),
                    SocketAddr::from((VIP, VIP_PORT)),
                )
            })
            .collect();
        let mut peer_ebpf = aya::Ebpf::load(&helper_object()).expect("load helper programs");
        let pass: &mut Xdp = peer_ebpf
            .program_mut("vpnlb_pass")
            .expect("vpnlb_pass")
            .try_into()
            .expect("XDP");
        pass.load().expect("load vpnlb_pass");
        sw.run(|| {
            pass.attach("lb", XdpMode::Driver)
                .expect("native XDP attach on the LB's peer")
        });
        Topology {
            sinks,
            peer_ebpf,
            client,
            lb,
            gws,
            sw,
            client_addrs,
            lb_mac,
        }
    }

    /// `ports` flows from every client address (source ports 40000..), bound in the client namespace.
    pub fn flows(&self, ports: u16) -> Flows {
        self.flows_on_ports(0, ports)
    }

    /// Like [`Topology::flows`] with source ports starting at `40000 + offset`.
    pub fn flows_on_ports(&self, offset: u16, ports: u16) -> Flows {
        let addrs = self.client_addrs.clone();
        let sockets = self.client.run(move || {
            let mut v = Vec::new();
            for a in &addrs {
                for p in 0..ports {
                    v.push(UdpSocket::bind((*a, 40000 + offset + p)).expect("bind client flow"));
                }
            }
            v
        });
        Flows::new(sockets)
    }

    /// Cuts gateway `i`'s cable at the switch: its packets vanish (a dead gateway).
    pub fn cut(&self, i: usize) {
        self.sw.sh(&format!("ip link set gw{} down", i + 1));
    }

    /// Restores gateway `i`'s cable.
    pub fn mend(&self, i: usize) {
        self.sw.sh(&format!("ip link set gw{} up", i + 1));
    }
}

/// The whole testbed: the [`Topology`] with `vpnlb_ingress` loaded and attached by the test itself
/// (no agent); everything is torn down on drop (XDP detached, namespaces deleted). Derefs to the
/// topology (`tb.sinks`, `tb.flows(..)`, `tb.cut(..)`).
pub struct Testbed {
    // Field order is drop order: the program goes before the namespaces.
    pub dp: Dataplane<AyaMaps>,
    pub ebpf: aya::Ebpf,
    pub topo: Topology,
    pub vip: VipSpec,
    /// Backend ids of the gateways (gateway i has id i + 1).
    pub backend_ids: Vec<u32>,
}

impl std::ops::Deref for Testbed {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topo
    }
}

impl Testbed {
    /// Brings up the [`Topology`], loads and attaches `vpnlb_ingress` natively to the LB's `eth0`,
    /// and programs one UDP VIP in L2 DSR mode over all gateways.
    pub fn up(prefix: &str, n_gw: usize, n_clients: usize) -> Testbed {
        let topo = Topology::up(prefix, n_gw, n_clients);
        let obj = object_bytes().expect("eBPF object (run cargo xtask build-ebpf)");
        let mut ebpf = load(
            &obj,
            &LoadOptions {
                pin_dir: None,
                max_sessions: Some(65536),
                ring_rows: Some(2),
            },
        )
        .expect("load");
        let maps = AyaMaps::from_ebpf(&mut ebpf).expect("maps");
        let mut dp = Dataplane::new(maps);
        dp.set_config(GlobalConfig::default()).expect("config");
        let mut backend_ids = Vec::new();
        for (i, gw) in topo.gws.iter().enumerate() {
            let id = i as u32 + 1;
            dp.upsert_backend(BackendSpec {
                id,
                addr: IpAddr::V4(gw_addr(i)),
                mac: gw.mac("eth0"),
                src_mac: topo.lb_mac,
                ifindex: 0,
                weight: 1,
                state: BACKEND_UP,
            })
            .expect("backend");
            backend_ids.push(id);
        }
        let vip = VipSpec {
            key: VipKey::new(IpAddr::V4(VIP), VIP_PORT, PROTO_UDP),
            vip_id: 0,
            ring_id: 0,
            ring_size: RING_SIZE,
            flags: 0,
            fwd_mode: FWD_MODE_L2DSR,
            mtu: 0,
            idle_timeout_ns: 0,
            gue_port: 0,
            backends: backend_ids.clone(),
            classes: Vec::new(),
        };
        dp.upsert_vip(vip.clone()).expect("vip");
        let prog: &mut Xdp = ebpf
            .program_mut(vpnlb_common::prog_names::INGRESS)
            .expect("vpnlb_ingress in object")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("verifier accepts vpnlb_ingress");
        topo.lb.run(|| {
            prog.attach("eth0", XdpMode::Driver)
                .expect("native XDP attach on veth")
        });
        Testbed {
            dp,
            ebpf,
            topo,
            vip,
            backend_ids,
        }
    }
}

/// Clients per gateway from `owner` (the gateway index of each client), as "gw1: N, gw2: N, ...".
pub fn spread(owner: &[usize], gateways: usize) -> String {
    (0..gateways)
        .map(|g| format!("gw{}: {}", g + 1, owner.iter().filter(|&&o| o == g).count()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints the spread of `owner` over `gateways` and asserts every gateway got at least `min`
/// clients (a fair share, given the hash's variance over few clients).
pub fn assert_fair_share(owner: &[usize], gateways: usize, min: usize) {
    let line = spread(owner, gateways);
    println!(
        "share over {gateways} gateways ({} clients): {line}",
        owner.len()
    );
    for g in 0..gateways {
        let k = owner.iter().filter(|&&o| o == g).count();
        assert!(
            k >= min,
            "gateway {} got {k} of {} clients: not a fair share ({line})",
            g + 1,
            owner.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gateways on loopback behind one address: `answers(flow, n)` names the gateways that answer
    /// the `n`th datagram (1-based) of flow `flow`, each with one reply "<gateway> <payload>" from
    /// that address; none: the datagram is lost.
    struct FakeGateways {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeGateways {
        fn start(answers: impl Fn(usize, u32) -> Vec<&'static str> + Send + 'static) -> Self {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind fake gateways");
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            let addr = sock.local_addr().expect("address");
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut seen: HashMap<usize, u32> = HashMap::new();
                let mut buf = [0u8; 2048];
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let flow: usize = text
                        .split(' ')
                        .nth(1)
                        .and_then(|f| f.parse().ok())
                        .expect("flow N round R");
                    let k = seen.entry(flow).or_default();
                    *k += 1;
                    for g in answers(flow, *k) {
                        let _ = sock.send_to(format!("{g} {text}").as_bytes(), from);
                    }
                }
            });
            FakeGateways {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for FakeGateways {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn loopback_flows(n: usize) -> Flows {
        Flows::new(
            (0..n)
                .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind flow"))
                .collect(),
        )
    }

    fn names(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|g| Some(g.to_string())).collect()
    }

    /// Long enough never to be reached when every flow answers (the round ends at the last answer).
    const GENEROUS: Duration = Duration::from_secs(60);

    /// Flow 0 answers at once, flow 1 loses its first datagram and gets it again, flow 2 sits on
    /// the wrong gateway (gw3 instead of gw2): the probe answers gw1, gw2, gw3 and the caller's
    /// comparison with the expected owners fails, as it must.
    #[test]
    fn probe_resends_a_lost_datagram_and_reports_a_wrong_gateway() {
        let gws = FakeGateways::start(|flow, n| match (flow, n) {
            (0, _) => vec!["gw1"],
            (1, 1) => vec![],
            (1, _) => vec!["gw2"],
            _ => vec!["gw3"],
        });
        let flows = loopback_flows(3);
        let got = flows.probe_at(gws.addr, 1, GENEROUS);
        assert_eq!(got, names(&["gw1", "gw2", "gw3"]));
        assert_ne!(
            got,
            names(&["gw1", "gw2", "gw2"]),
            "the wrong gateway shows"
        );
        let sent = flows.sent();
        assert!(
            sent[1] >= 2,
            "flow 1 lost its first datagram: resent ({sent:?})"
        );
        // The next round: stale replies of round 1 (to resent datagrams) are skipped.
        assert_eq!(flows.probe_at(gws.addr, 2, GENEROUS), got);
    }

    #[test]
    fn probe_gives_a_flow_that_never_answers_none() {
        let gws = FakeGateways::start(|flow, _| if flow == 0 { vec!["gw1"] } else { vec![] });
        let flows = loopback_flows(2);
        let got = flows.probe_at(gws.addr, 1, Duration::from_millis(500));
        assert_eq!(got[1], None);
    }

    /// Flow 0 is answered by gw1 and gw2: the probe panics when the second answer comes (flow 1,
    /// silent, keeps the round open until then).
    #[test]
    #[should_panic(expected = "flow 0 answered by gw1 and then by gw2")]
    fn probe_fails_at_once_on_a_flow_answered_by_two_gateways() {
        let gws = FakeGateways::start(|flow, _| {
            if flow == 0 {
                vec!["gw1", "gw2"]
            } else {
                vec![]
            }
        });
        loopback_flows(2).probe_at(gws.addr, 1, GENEROUS);
    }
}
