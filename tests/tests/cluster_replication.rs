//! Replicated sessions (root only; real etcd, two real agents as members of one cluster, and every
//! gateway running wireguard-go, charon and openvpn): WireGuard, IPsec (NAT-T behind NAT sites)
//! and OpenVPN tunnels established through LB host A, including clients whose session differs from
//! the Maglev pick (their gateway drained: sessions stay, new flows avoid it) and a WireGuard client
//! that roamed to another source port (kept on its gateway by its learned receiver index), are
//! moved to LB host B (every client segment's neighbour entry of the VIP changes, as after a
//! gratuitous ARP). With replication every tunnel stays on its gateway with no new handshake (the
//! same WireGuard handshake, IKE_SA and OpenVPN session) and no ping lost; without it (the control)
//! the exception flows break.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb_common::FlowKey;
use vpnlb_tests::agent::{AgentProcess, Scratch, env_path, wait_for};
use vpnlb_tests::etcd::{EtcdCluster, etcd_on_switch, write_peer_key};
use vpnlb_tests::ipsec::{CLIENT_CHARON, IpsecBed, IpsecOpts, ipsec_vips};
use vpnlb_tests::netns::{Netns, cable, fmt_mac};
use vpnlb_tests::openvpn::{OvpnBed, Pki};
use vpnlb_tests::testbed::{Topology, VIP, VIP_PORT, gw_addr};
use vpnlb_tests::wg::{PingLog, Pinger, WgBed, now_epoch};

/// WireGuard clients (one namespace), IPsec clients (each behind its own NAT site), OpenVPN
/// clients (each in its own namespace).
const CLIENTS: usize = 12;
const IPSEC_CLIENTS: usize = 3;
const OVPN_CLIENTS: usize = 3;
const OVPN_PORT: u16 = 1194;
const GWS: [&str; 3] = ["gw1", "gw2", "gw3"];
const PING: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(30);
const LB_B: &str = "10.77.0.3";

fn service() -> String {
    let mut s = String::new();
    for (i, g) in GWS.iter().enumerate() {
        s.push_str(&format!(
            "[[backend]]\nname = \"{g}\"\naddress = \"{}\"\n[[backend.check]]\ntype = \"icmp\"\n\
             interval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n\n",
            gw_addr(i)
        ));
    }
    s.push_str(&format!(
        "[[vip]]\nname = \"wg\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"udp\"\n\
         ring_size = 65537\nsession_ids = \"wireguard\"\n[[vip.pool]]\nname = \"all\"\n\
         backends = [\"gw1\", \"gw2\", \"gw3\"]\n\n"
    ));
    s.push_str(&ipsec_vips(&GWS, "session_ids = \"ipsec\"\n"));
    s.push_str(&format!(
        "[[vip]]\nname = \"openvpn\"\naddress = \"{VIP}\"\nport = {OVPN_PORT}\nprotocol = \"udp\"\n\
         [[vip.pool]]\nname = \"all\"\nbackends = [\"gw1\", \"gw2\", \"gw3\"]\n"
    ));
    s
}

/// What identifies a tunnel's session with its gateway: a new handshake changes it.
#[derive(Clone, Debug, PartialEq)]
enum Ident {
    /// The latest handshake as the client and its gateway see it.
    Wireguard(Option<u64>, Option<u64>),
    /// charon's unique id of the IKE_SA.
    Ipsec(u32),
    /// When the session was established, and its peer-id.
    Openvpn(u64, u32),
}

/// Drop order: pingers, VPNs, agents, etcd, namespaces, files.
struct Bed {
    pingers: Vec<Pinger>,
    ovpn: OvpnBed,
    ipsec: IpsecBed,
    wg: WgBed,
    lbs: Vec<AgentProcess>,
    _etcd: EtcdCluster,
    lb_b: Netns,
    _ns_etcd: Netns,
    topo: Topology,
    _scratch: Vec<Scratch>,
}

impl Bed {
    /// `vpnlb cluster status --json`, run on host A.
    fn cluster_status(&self) -> serde_json::Value {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.topo.lb.name()))
            .arg(env_path("VPNLB_BIN"))
            .args(["cluster", "status", "--json", "--host-config"])
            .arg(&self.lbs[0].config)
            .output()
            .expect("run vpnlb");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cluster status: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn up(prefix: &str, wg_prefix: &str, replicate: bool) -> Bed {
        let mut topo = Topology::up(prefix, GWS.len(), CLIENTS);
        topo.sinks.clear();
        let lb_b = Netns::new(&format!("{prefix}-lbb"));
        cable(&topo.sw, "lbb", &lb_b, &format!("{LB_B}/24"));
        let (ns_etcd, etcd) = etcd_on_switch(&topo.sw, prefix, "10.77.0");
        let scratch: Vec<Scratch> = (0..2).map(|_| Scratch::new()).collect();
        let mut lbs = Vec::new();
        for (i, (ns, addr)) in [(topo.lb.name(), "10.77.0.1"), (lb_b.name(), LB_B)]
            .into_iter()
            .enumerate()
        {
            let key = scratch[i].dir.join("peer.key");
            write_peer_key(&key, 42);
            let body = format!(
                "[[interface]]\nname = \"eth0\"\nmode = \"generic\"\n\n[cluster]\nname = \"rpl\"\n\
                 member = \"lb{}\"\n{}peer_listen = \"{addr}:7946\"\npeer_key_file = \"{}\"\n\
                 replicate = {replicate}\n",
                ["a", "b"][i],
                etcd.cluster_toml(),
                key.display()
            );
            lbs.push(AgentProcess::start(&scratch[i], ns, &body));
        }
        // The service, pushed from host A.
        let f = scratch[0].dir.join("service.toml");
        std::fs::write(&f, service()).unwrap();
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topo.lb.name()))
            .arg(env_path("VPNLB_BIN"))
            .args(["cluster", "push", "--config", f.to_str().unwrap()])
            .arg("--host-config")
            .arg(&lbs[0].config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for a in &lbs {
            for g in GWS {
                a.wait_state(g, "up", WAIT);
            }
        }
        let wg = WgBed::up(&topo, &format!("{wg_prefix}g"), &format!("{wg_prefix}c"));
        let mut ipsec = IpsecBed::up(
            &topo,
            &format!("{prefix}-i"),
            &IpsecOpts {
                sites: &[],
                gw_charon: "",
                gw_conn: "",
                client_charon: CLIENT_CHARON,
                client_conn: "",
            },
        );
        // Tunnel addresses clear of the WireGuard clients'; public addresses 10.77.0.40..
        ipsec.first_client = 100;
        for k in 0..IPSEC_CLIENTS {
            ipsec.add_site(&topo, k, 1);
        }
        let ovpn_prefix = format!("{prefix}-o");
        let mut ovpn = OvpnBed::up_on(&topo, &ovpn_prefix, Pki::generate(&ovpn_prefix), OVPN_PORT);
        // Client addresses 10.77.0.60.., clear of the others on the switch.
        ovpn.first_client = 40;
        ipsec.connect_all();
        ovpn.connect(&topo, OVPN_CLIENTS);
        let mut pingers = wg.ping_all(PING);
        pingers.extend(ipsec.ping_all(PING));
        pingers.extend(ovpn.ping_all(PING));
        Bed {
            pingers,
            ovpn,
            ipsec,
            wg,
            lbs,
            _etcd: etcd,
            lb_b,
            _ns_etcd: ns_etcd,
            topo,
            _scratch: scratch,
        }
    }

    /// Every tunnel's gateway and session, in pinger order (WireGuard, IPsec, OpenVPN); `None`
    /// while some tunnel is not established with exactly one gateway.
    fn tunnels(&self) -> Option<Vec<(usize, Ident)>> {
        let all = [0usize, 1, 2];
        let mut out = Vec::new();
        for (n, p) in self.wg.placement(&all).into_iter().enumerate() {
            let [(g, gw)] = p.as_slice() else { return None };
            let client = self.wg.client_peer(n).map(|p| p.latest_handshake);
            out.push((*g, Ident::Wireguard(client, Some(gw.latest_handshake))));
        }
        for p in self.ipsec.placement() {
            let [(g, sa)] = p.as_slice() else { return None };
            out.push((*g, Ident::Ipsec(sa.id)));
        }
        for p in self.ovpn.placement(&all) {
            let [(g, s)] = p.as_slice() else { return None };
            out.push((*g, Ident::Openvpn(s.since, s.peer_id)));
        }
        Some(out)
    }

    fn settle(&self) -> Vec<(usize, Ident)> {
        wait_for(WAIT, || self.tunnels()).unwrap_or_else(|| {
            panic!(
                "not every tunnel on exactly one gateway: wg {:?}\nipsec {:?}\novpn {:?}",
                self.wg.placement(&[0, 1, 2]),
                self.ipsec.placement(),
                self.ovpn.placement(&[0, 1, 2])
            )
        })
    }

    /// Points every namespace of the testbed that reaches the VIP through host A at host B.
    fn repoint(&self, prefix: &str) {
        let from = fmt_mac(&self.topo.lb_mac);
        let to = fmt_mac(&self.lb_b.mac("eth0"));
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect();
        let mut moved = 0;
        for ns in names {
            let out = Command::new("ip")
                .args(["-n", &ns, "neigh", "show", &VIP.to_string()])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&from) {
                let st = Command::new("ip")
                    .args([
                        "-n",
                        &ns,
                        "neigh",
                        "replace",
                        &VIP.to_string(),
                        "lladdr",
                        &to,
                    ])
                    .args(["dev", "eth0", "nud", "permanent"])
                    .status()
                    .unwrap();
                assert!(st.success(), "repoint {ns}");
                moved += 1;
            }
        }
        assert_eq!(
            moved,
            1 + IPSEC_CLIENTS + OVPN_CLIENTS,
            "client segments repointed"
        );
    }

    fn hash_pick(&self, src: SocketAddr) -> usize {
        let name = self.lbs[0].simulate_udp(src, SocketAddr::from((VIP, VIP_PORT)));
        GWS.iter()
            .position(|g| *g == name)
            .unwrap_or_else(|| panic!("simulate picked {name}"))
    }

    fn sessions(&self, i: usize) -> HashSet<FlowKey> {
        let m = AyaMaps::open_pinned(&self.lbs[i].pin_dir).expect("pins");
        m.sessions().unwrap().into_iter().map(|(k, _)| k).collect()
    }
}

/// What happened to the tunnels when the VIP's traffic moved from host A to host B (tunnels in
/// pinger order: WireGuard, IPsec, OpenVPN).
struct Outcome {
    before: Vec<(usize, Ident)>,
    /// Tunnels whose session is not where the ring points (their gateway drained), and the
    /// WireGuard client that roamed.
    exceptions: Vec<usize>,
    roamer: usize,
    logs: Vec<PingLog>,
    switch_epoch: f64,
    after: Vec<Option<(usize, Ident)>>,
    b_forwarded: u64,
}

fn kind(n: usize) -> &'static str {
    if n < CLIENTS {
        "WireGuard"
    } else if n < CLIENTS + IPSEC_CLIENTS {
        "IPsec"
    } else {
        "OpenVPN"
    }
}

fn move_to_b(prefix: &str, wg_prefix: &str, replicate: bool) -> Outcome {
    let mut b = Bed::up(prefix, wg_prefix, replicate);
    let first = b.settle();
    // Data packets through every session teach host A the receiver indexes and SPIs.
    std::thread::sleep(Duration::from_secs(1));
    // Exceptions: drain the gateway with the most tunnels (cluster-wide): its sessions stay, the
    // rings no longer point at it.
    let drained = (0..GWS.len())
        .max_by_key(|g| first.iter().filter(|(o, _)| o == g).count())
        .unwrap();
    let r = b.lbs[0].request(vpnlb::agent::control::Request::Drain {
        backend: GWS[drained].into(),
    });
    assert!(r.ok, "{r:?}");
    for a in &b.lbs {
        a.wait_state(GWS[drained], "draining", WAIT);
    }
    let mut exceptions: Vec<usize> = (0..first.len())
        .filter(|n| first[*n].0 == drained)
        .collect();
    // A WireGuard client on another gateway roams to a source port the hash sends elsewhere:
    // only its learned receiver index keeps it on its gateway.
    let roamer = (0..CLIENTS).find(|n| first[*n].0 != drained).unwrap();
    let owner = first[roamer].0;
    let c = b.wg.clients[roamer].clone();
    let new_port = (c.port + 100..c.port + 300)
        .find(|&p| b.hash_pick(SocketAddr::from((c.addr, p))) != owner)
        .expect("a port the hash sends elsewhere");
    b.topo.client.sh(&format!(
        "wg set {} listen-port {new_port} && wg set {} peer {} endpoint {VIP}:{VIP_PORT}",
        c.ifname, c.ifname, b.wg.server.public
    ));
    let roamed = SocketAddr::from((c.addr, new_port));
    wait_for(WAIT, || {
        b.wg.gw_peers(owner)
            .into_iter()
            .find(|p| p.public == c.keys.public && p.endpoint == Some(roamed))
    })
    .expect("the roamer's gateway sees its new port");
    exceptions.push(roamer);
    exceptions.sort();
    let before = b.settle();
    // With replication, host B holds every session of host A before the switch.
    if replicate {
        wait_for(WAIT, || {
            let (a, bb) = (b.sessions(0), b.sessions(1));
            (!a.is_empty() && a.is_subset(&bb)).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "host B never held host A's sessions ({} of {}); A: {:#}\nB: {:#}",
                b.sessions(1).len(),
                b.sessions(0).len(),
                b.lbs[0].status()["cluster"],
                b.lbs[1].status()["cluster"]
            )
        });
    }
    if replicate {
        // `vpnlb cluster status` shows both members ready and host A's replication lag.
        let st = wait_for(WAIT, || {
            let st = b.cluster_status();
            let m = st["members"].as_array()?;
            let ready = m.len() == 2 && m.iter().all(|m| m["role"] == "ready");
            let lag = m
                .iter()
                .find(|m| m["member"] == "lba")?
                .get("replication_lag_ms_p99")?
                .as_f64()?;
            (ready && lag >= 0.0).then_some(st)
        })
        .unwrap_or_else(|| panic!("cluster status: {:#}", b.cluster_status()));
        println!("cluster status: {}", st["members"]);
    }
    let b_fwd0 = b.lbs[1].counter("fwd_l2dsr_tx");
    // The switch: every client segment now reaches the VIP through host B.
    let switch_epoch = now_epoch();
    b.repoint(prefix);
    // Pings go on through every tunnel for a while (what is measured).
    std::thread::sleep(Duration::from_secs(4));
    let logs: Vec<PingLog> = b.pingers.iter_mut().map(|p| p.stop()).collect();
    let after = match b.tunnels() {
        Some(t) => t.into_iter().map(Some).collect(),
        None => {
            // Some tunnel is on no gateway or on two: compare per protocol where possible.
            let mut v: Vec<Option<(usize, Ident)>> = vec![None; before.len()];
            for (n, p) in b.wg.placement(&[0, 1, 2]).into_iter().enumerate() {
                if let [(g, gw)] = p.as_slice() {
                    let cl = b.wg.client_peer(n).map(|p| p.latest_handshake);
                    v[n] = Some((*g, Ident::Wireguard(cl, Some(gw.latest_handshake))));
                }
            }
            v
        }
    };
    let b_forwarded = b.lbs[1].counter("fwd_l2dsr_tx") - b_fwd0;
    println!(
        "replicate={replicate}: host B forwarded {b_forwarded} packets; host B replication: {}",
        b.lbs[1].status()["cluster"]["replication"]
    );
    Outcome {
        before,
        exceptions,
        roamer,
        logs,
        switch_epoch,
        after,
        b_forwarded,
    }
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn tunnels_moved_to_another_lb_host_keep_their_gateways() {
    let o = move_to_b("vpnlb-rpl", "rpl", true);
    assert!(o.b_forwarded > 0, "the traffic never reached host B");
    for (n, (gw, id)) in o.before.iter().enumerate() {
        let (lost, span) = o.logs[n].lost_after(o.switch_epoch);
        let what = if n == o.roamer {
            " (roamed)"
        } else if o.exceptions.contains(&n) {
            " (drained gateway)"
        } else {
            ""
        };
        println!(
            "{} tunnel {n}{what} on gw{}: {lost} of {span} pings lost after the switch",
            kind(n),
            gw + 1
        );
        assert!(span > 0, "tunnel {n}: no ping reply after the switch");
        assert_eq!(
            lost,
            0,
            "{} tunnel {n}{what}: {lost} of {span} pings lost",
            kind(n)
        );
        assert_eq!(
            o.after[n],
            Some((*gw, id.clone())),
            "{} tunnel {n}{what}: another gateway or a new handshake",
            kind(n)
        );
    }
    for k in ["IPsec", "OpenVPN"] {
        assert!(
            (0..o.before.len()).any(|n| kind(n) == k),
            "no {k} tunnel in the test"
        );
    }
    assert!(o.exceptions.len() >= 2, "{:?}", o.exceptions);
}

/// The control: the same move without replication breaks the exception flows, so the test above
/// can fail.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn without_replication_the_moved_exception_flows_break() {
    let o = move_to_b("vpnlb-rpn", "rpn", false);
    assert!(o.b_forwarded > 0, "the traffic never reached host B");
    let broken: Vec<usize> = o
        .exceptions
        .iter()
        .copied()
        .filter(|&n| {
            let (lost, _) = o.logs[n].lost_after(o.switch_epoch);
            lost > 0 || o.logs[n].replies_after(o.switch_epoch + 1.0) == 0
        })
        .collect();
    println!(
        "without replication: exception clients {:?}, broken {:?}",
        o.exceptions, broken
    );
    assert_eq!(
        broken, o.exceptions,
        "every exception flow breaks without replication"
    );
}
