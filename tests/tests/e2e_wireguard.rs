//! End to end with real WireGuard: the real agent (`vpnlb run`) balances the UDP VIP 51820 (L2 DSR)
//! over three `wireguard-go` gateways sharing one server key; 24 client tunnels ping through it.
//! Checks: every tunnel carries traffic, every gateway gets a share, every client stays on one
//! gateway and keeps the VIP as its endpoint (gateways reply from the VIP), the gateways see the
//! clients' own addresses. Then one gateway dies (wireguard-go killed, cable cut): the agent marks it
//! down, its clients re-handshake onto healthy gateways, and the other tunnels lose no packet.
//! Drain (`vpnlb drain`/`undrain` through the control socket): the drained gateway's tunnels keep
//! working, clients that arrive meanwhile avoid it, clients that arrive after the undrain reach it.
//! Roaming (issue #6, session-id learning): a client that changes its source port, and one that
//! changes its address, keep their gateway with no new handshake, although the VIP's hash would send
//! their new five-tuples elsewhere (without learning, that gateway drops their data and they stall).
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), and the Debian packages
//! wireguard-go, wireguard-tools and iputils-ping.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, backend_in, vip, wait_for, wait_moved};
use vpnlb_tests::testbed::{VIP, VIP_PORT, assert_fair_share, spread};
use vpnlb_tests::wg::{Pinger, WgBed, assert_no_loss_after, now_epoch};

const CLIENTS: usize = 24;
const DEAD: usize = 1;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn wireguard_clients_balanced_and_moved_off_a_dead_gateway() {
    let t_start = Instant::now();
    let mut bed = AgentBed::up("vpnlb-wg", 3, CLIENTS, |t, _| {
        let mut s = String::from(INTERFACE);
        for (i, g) in t.gws.iter().enumerate() {
            s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
        }
        s.push_str(&vip(&[("all", 0, &["gw1", "gw2", "gw3"])]));
        s
    });
    // The echo sinks hold VIP:51820: WireGuard takes the port.
    bed.topo.sinks.clear();
    bed.agent
        .wait_all_up(&["gw1", "gw2", "gw3"], Duration::from_secs(15));
    let mut wg = WgBed::up(&bed.topo, "vwg", "vwc");
    println!(
        "wireguard-go: 3 gateways + {CLIENTS} clients configured in {:.0} ms",
        ms(wg.setup)
    );

    // Steady traffic through every tunnel for the whole test.
    let mut pingers = wg.ping_all(Duration::from_millis(50));
    let all = [0usize, 1, 2];
    let placed = wait_for(Duration::from_secs(10), || {
        let p = wg.placement(&all);
        p.iter().all(|g| g.len() == 1).then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every client completed a handshake: {:?}",
            wg.placement(&all)
        )
    });
    println!(
        "all {CLIENTS} handshakes done {:.0} ms after setup",
        ms(t_start.elapsed()) - ms(wg.setup)
    );
    std::thread::sleep(Duration::from_secs(2));

    let first = wg.placement(&all);
    let owner: Vec<usize> = first
        .iter()
        .enumerate()
        .map(|(n, g)| {
            assert_eq!(g.len(), 1, "client {n} on several gateways: {g:?}");
            assert_eq!(g[0].0, placed[n][0].0, "client {n} changed gateway");
            let (gw, peer) = &g[0];
            assert_eq!(
                peer.endpoint,
                Some(wg.clients[n].underlay()),
                "gateway {} sees client {n} from another address (DSR through the VIP)",
                gw + 1
            );
            *gw
        })
        .collect();
    assert_fair_share(&owner, 3, CLIENTS / 8);
    for n in 0..CLIENTS {
        let p = wg.client_peer(n).expect("client peer");
        assert_eq!(
            p.endpoint,
            Some(std::net::SocketAddr::from((VIP, VIP_PORT))),
            "client {n} roamed away from the VIP"
        );
    }

    // Fail gateway DEAD.
    let moved: Vec<usize> = (0..CLIENTS).filter(|&n| owner[n] == DEAD).collect();
    let stayed: Vec<usize> = (0..CLIENTS).filter(|&n| owner[n] != DEAD).collect();
    assert!(!moved.is_empty(), "no client on gw{}", DEAD + 1);
    let kill_epoch = now_epoch();
    let t_kill = Instant::now();
    wg.kill_gateway(DEAD);
    bed.topo.cut(DEAD);
    let detect = bed
        .agent
        .wait_state(&format!("gw{}", DEAD + 1), "down", Duration::from_secs(5));
    println!(
        "gw{} killed: agent marked it down after {:.0} ms",
        DEAD + 1,
        ms(detect)
    );
    let dead_id = backend_in(&bed.agent.status(), &format!("gw{}", DEAD + 1))
        .and_then(|b| b["id"].as_u64())
        .expect("dead backend id") as u32;
    let ring = bed.agent.ring_shares();
    println!("Maglev ring slots per backend id after the failure: {ring:?}");
    assert!(
        !ring.contains_key(&dead_id),
        "the dead gateway still owns ring slots"
    );
    let healthy: Vec<usize> = all.iter().copied().filter(|&g| g != DEAD).collect();
    // Back = a handshake with a healthy gateway since the kill.
    let back = wait_moved(&moved, t_kill, Duration::from_secs(25), || {
        wg.placement(&healthy)
            .iter()
            .map(|p| {
                p.iter()
                    .find(|(_, peer)| peer.latest_handshake as f64 >= kill_epoch.floor())
                    .map(|(g, _)| *g)
            })
            .collect()
    });
    // Let the moved tunnels carry a few pings, then stop all pings.
    std::thread::sleep(Duration::from_millis(600));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();
    let window = t_kill.elapsed();

    let not_back: Vec<usize> = moved
        .iter()
        .copied()
        .filter(|n| !back.contains_key(n))
        .collect();
    assert!(
        not_back.is_empty(),
        "clients {not_back:?} did not re-handshake on a healthy gateway within 25 s"
    );
    let mut rec = Vec::new();
    for &n in &moved {
        let (g, hs) = back[&n];
        let first_reply = logs[n]
            .first_after(kill_epoch + 0.2)
            .unwrap_or_else(|| panic!("client {n}: no ping reply after moving to gw{}", g + 1));
        let (lost, span) = logs[n].lost_after(kill_epoch);
        println!(
            "  moved client {n:>2}: handshake on gw{} after {:.1} s, first reply after {:.1} s, {lost} of {span} pings lost",
            g + 1,
            hs.as_secs_f64(),
            first_reply - kill_epoch
        );
        rec.push(hs.as_secs_f64());
    }
    let span_total = assert_no_loss_after(&logs, &stayed, &owner, kill_epoch);
    rec.sort_by(f64::total_cmp);
    println!(
        "failover: detection {:.0} ms; {} clients moved, recovery (new handshake) min {:.1} s, max {:.1} s; \
         {} undisturbed clients lost 0 of {span_total} pings over {:.1} s",
        ms(detect),
        moved.len(),
        rec[0],
        rec[rec.len() - 1],
        stayed.len(),
        window.as_secs_f64()
    );

    // End state: healthy clients never left their gateway, moved ones are on exactly one healthy
    // gateway, the gateways see the clients' addresses, every client's endpoint is still the VIP.
    let end = wg.placement(&healthy);
    for n in 0..CLIENTS {
        let gws: Vec<usize> = end[n].iter().map(|(g, _)| *g).collect();
        let want = if owner[n] == DEAD {
            back[&n].0
        } else {
            owner[n]
        };
        assert_eq!(gws, vec![want], "client {n}: gateways with a handshake");
        assert_eq!(end[n][0].1.endpoint, Some(wg.clients[n].underlay()));
        let p = wg.client_peer(n).expect("client peer");
        assert_eq!(
            p.endpoint,
            Some(std::net::SocketAddr::from((VIP, VIP_PORT))),
            "client {n} roamed away from the VIP"
        );
    }
    println!("whole test {:.1} s", t_start.elapsed().as_secs_f64());
    drop(wg);
}

const GWS: [&str; 3] = ["gw1", "gw2", "gw3"];

/// The agent (`icmp` checks) in front of three `wireguard-go` gateways, and WireGuard clients.
/// Field order is drop order: the WireGuard daemons die before the namespaces.
struct WgLb {
    wg: WgBed,
    lb: AgentBed,
}

impl WgLb {
    /// Namespaces `<prefix>-*`, gateway interfaces `<gw_prefix>N`, client interfaces
    /// `<client_prefix>N`, `clients` clients; `vip_keys` is added to the VIP's table.
    fn up(
        prefix: &str,
        gw_prefix: &str,
        client_prefix: &str,
        clients: usize,
        vip_keys: &str,
    ) -> WgLb {
        let mut lb = AgentBed::up(prefix, 3, clients, |t, _| {
            let mut s = String::from(INTERFACE);
            for (i, g) in t.gws.iter().enumerate() {
                s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
            }
            let v = vip(&[("all", 0, &GWS)]);
            s.push_str(&v.replacen("[[vip.pool]]", &format!("{vip_keys}[[vip.pool]]"), 1));
            s
        });
        lb.topo.sinks.clear();
        lb.agent.wait_all_up(&GWS, Duration::from_secs(15));
        let wg = WgBed::up(&lb.topo, gw_prefix, client_prefix);
        WgLb { wg, lb }
    }

    /// Waits until each of `clients` has completed a handshake with exactly one gateway; returns
    /// that gateway per client (in the order of `clients`).
    fn settle(&self, clients: &[usize]) -> Vec<usize> {
        let all = [0usize, 1, 2];
        wait_for(Duration::from_secs(15), || {
            let p = self.wg.placement(&all);
            clients
                .iter()
                .map(|&n| (p[n].len() == 1).then(|| p[n][0].0))
                .collect()
        })
        .unwrap_or_else(|| {
            panic!(
                "clients {clients:?}: not each with a handshake on exactly one gateway: {:?}",
                self.wg.placement(&all)
            )
        })
    }

    /// Adds `k` clients (addresses after the topology's) with a steady ping each.
    fn add_clients(
        &mut self,
        client_prefix: &str,
        k: usize,
        pingers: &mut Vec<Pinger>,
    ) -> Vec<usize> {
        (0..k)
            .map(|_| {
                let n = self.wg.clients.len();
                let addr = Ipv4Addr::new(10, 77, 0, 20 + n as u8);
                self.wg.add_client(&self.lb.topo, client_prefix, addr);
                let c = &self.wg.clients[n];
                pingers.push(Pinger::start(
                    &self.wg.client_ns,
                    c.target,
                    PING,
                    &self.wg.dir,
                    n,
                ));
                n
            })
            .collect()
    }

    /// The gateway a new flow from `src` would get (the VIP's hash).
    fn hash_pick(&self, src: SocketAddr) -> usize {
        let name = self
            .lb
            .agent
            .simulate_udp(src, SocketAddr::from((VIP, VIP_PORT)));
        GWS.iter()
            .position(|g| *g == name)
            .unwrap_or_else(|| panic!("simulate picked {name}"))
    }

    /// `vpnlb drain|undrain NAME` through the agent's control socket; returns the new state.
    fn admin(&self, verb: &str, name: &str) -> String {
        let r = self.lb.agent.cli_json(&[verb, name]);
        r["state"].as_str().unwrap_or_default().to_string()
    }
}

const PING: Duration = Duration::from_millis(50);

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn wireguard_drain_keeps_tunnels_and_steers_new_clients() {
    const FIRST: usize = 12;
    const MORE: usize = 9;
    let t_start = Instant::now();
    let mut b = WgLb::up("vpnlb-wgr", "wgr", "wgrc", FIRST, "");
    let mut pingers = b.wg.ping_all(PING);
    let first: Vec<usize> = (0..FIRST).collect();
    let owner = b.settle(&first);
    println!(
        "{FIRST} clients settled {:.1} s after the start: {}",
        t_start.elapsed().as_secs_f64(),
        spread(&owner, 3)
    );
    let drained = (0..3)
        .max_by_key(|&g| owner.iter().filter(|&&o| o == g).count())
        .unwrap();
    let name = GWS[drained];
    let on_drained: Vec<usize> = first
        .iter()
        .copied()
        .filter(|&n| owner[n] == drained)
        .collect();

    let drain_epoch = now_epoch();
    assert_eq!(b.admin("drain", name), "draining");
    assert_eq!(b.lb.agent.state(name).as_deref(), Some("draining"));
    let id = backend_in(&b.lb.agent.status(), name)
        .and_then(|v| v["id"].as_u64())
        .expect("backend id") as u32;
    assert!(
        !b.lb.agent.ring_shares().contains_key(&id),
        "a draining gateway still owns ring slots"
    );
    let during = b.add_clients("wgrc", MORE, &mut pingers);
    let placed = b.settle(&during);
    println!(
        "{name} drained: {MORE} new clients placed {}",
        spread(&placed, 3)
    );
    assert!(
        !placed.contains(&drained),
        "a client that arrived while {name} drained was placed on it: {placed:?}"
    );
    // Existing tunnels, those on the drained gateway too, keep carrying pings for a while.
    std::thread::sleep(Duration::from_secs(3));

    assert_eq!(b.admin("undrain", name), "up");
    let after = b.add_clients("wgrc", MORE, &mut pingers);
    let placed_after = b.settle(&after);
    println!(
        "{name} undrained: {MORE} new clients placed {}",
        spread(&placed_after, 3)
    );
    assert!(
        placed_after.contains(&drained),
        "no new client was placed on {name} after the undrain: {placed_after:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();

    // The first clients (those on the drained gateway too) kept their gateway and lost nothing.
    let end = b.settle(&(0..b.wg.clients.len()).collect::<Vec<_>>());
    assert_eq!(&end[..FIRST], &owner[..], "a client changed gateway");
    assert_eq!(&end[FIRST..FIRST + MORE], &placed[..]);
    let first: Vec<usize> = (0..FIRST).collect();
    let span_total = assert_no_loss_after(&logs, &first, &owner, drain_epoch);
    for n in during.iter().chain(&after) {
        assert!(
            logs[*n].replies.len() > 1,
            "new client {n}: no ping replies"
        );
    }
    let drained_span: usize = on_drained
        .iter()
        .map(|&n| logs[n].lost_after(drain_epoch).1)
        .sum();
    println!(
        "drain/undrain: {} tunnels on {name} kept working ({drained_span} pings, 0 lost); \
         all {FIRST} first tunnels lost 0 of {span_total} pings; whole test {:.1} s",
        on_drained.len(),
        t_start.elapsed().as_secs_f64()
    );
}

/// The VIP key that turns on WireGuard session-id learning (issue #6).
const SESSION_IDS: &str = "session_ids = \"wireguard\"\n";

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn wireguard_client_roams_and_keeps_its_gateway() {
    const CLIENTS: usize = 6;
    let b = WgLb::up("vpnlb-wgr", "wgr", "wgrc", CLIENTS, SESSION_IDS);
    let mut pingers = b.wg.ping_all(PING);
    let owner = b.settle(&(0..CLIENTS).collect::<Vec<_>>());
    // Data packets through the sessions teach the data plane the gateways' receiver indexes.
    std::thread::sleep(Duration::from_secs(1));
    let handshakes = |b: &WgLb, n: usize| {
        let c = &b.wg.clients[n];
        let gw = b.wg.gw_peers(owner[n]);
        let on_gw = gw.iter().find(|p| p.public == c.keys.public).cloned();
        (b.wg.client_peer(n).map(|p| p.latest_handshake), on_gw)
    };
    let before: Vec<_> = (0..CLIENTS).map(|n| handshakes(&b, n)).collect();

    // Client 0 moves to another source port, client 1 to another address (the old one is gone,
    // as after a Wi-Fi to LTE switch): each to one that the VIP's hash sends to another gateway,
    // so only the learned receiver index can keep it on its gateway.
    let (pc, ac) = (0usize, 1usize);
    let c = b.wg.clients[pc].clone();
    let new_port = (c.port + 100..c.port + 200)
        .find(|&p| b.hash_pick(SocketAddr::from((c.addr, p))) != owner[pc])
        .expect("a port the hash sends elsewhere");
    let a = b.wg.clients[ac].clone();
    let new_addr = (CLIENTS..CLIENTS + 50)
        .map(|k| Ipv4Addr::new(10, 77, 0, 20 + k as u8))
        .find(|&ip| b.hash_pick(SocketAddr::from((ip, a.port))) != owner[ac])
        .expect("an address the hash sends elsewhere");
    let used0 = b.lb.agent.counter("session_id_used");
    let roam_epoch = now_epoch();
    // wireguard-go (unlike kernel WireGuard) keeps sending from the source address it cached for
    // the endpoint and fails once that address is gone: setting the same endpoint again clears it.
    b.lb.topo.client.sh(&format!(
        "wg set {} listen-port {new_port} && ip addr add {new_addr}/24 dev eth0 && \
         ip route replace 10.77.0.0/24 dev eth0 src {new_addr} table {} && ip addr del {}/24 dev eth0 && \
         wg set {} peer {} endpoint {VIP}:{VIP_PORT}",
        c.ifname,
        a.table(),
        a.addr,
        a.ifname,
        b.wg.server.public
    ));
    let moved = [
        (pc, SocketAddr::from((c.addr, new_port)), "source port"),
        (ac, SocketAddr::from((new_addr, a.port)), "address"),
    ];
    // Each roamer's gateway sees its new endpoint (authenticated data from there).
    let unseen: Vec<String> = moved
        .iter()
        .filter(|(n, to, _)| {
            wait_for(Duration::from_secs(5), || {
                b.wg.gw_peers(owner[*n])
                    .into_iter()
                    .find(|p| p.public == b.wg.clients[*n].keys.public && p.endpoint == Some(*to))
            })
            .is_none()
        })
        .map(|(n, to, what)| {
            format!(
                "client {n} changed its {what} to {to}: gw{} never saw it there ({:?})",
                owner[*n] + 1,
                b.wg.placement(&[0, 1, 2])[*n]
            )
        })
        .collect();
    assert!(unseen.is_empty(), "{}", unseen.join("\n"));
    // Pings go on through the roamed tunnels for a while.
    std::thread::sleep(Duration::from_secs(3));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();
    let after: Vec<_> = (0..CLIENTS).map(|n| handshakes(&b, n)).collect();
    let end = b.settle(&(0..CLIENTS).collect::<Vec<_>>());
    for (n, to, what) in moved {
        let (lost, span) = logs[n].lost_after(roam_epoch);
        println!(
            "client {n} changed its {what} to {to}: still on gw{}, no new handshake, {lost} of {span} pings lost",
            owner[n] + 1
        );
        assert!(
            logs[n].replies_after(roam_epoch + 1.0) > 0,
            "client {n}: no ping reply after changing its {what}"
        );
    }
    for n in 0..CLIENTS {
        assert_eq!(end[n], owner[n], "client {n} changed gateway");
        let (hs0, gw0) = &before[n];
        let (hs1, gw1) = &after[n];
        assert_eq!(hs1, hs0, "client {n}: a new handshake");
        assert_eq!(
            gw1.as_ref().map(|p| p.latest_handshake),
            gw0.as_ref().map(|p| p.latest_handshake),
            "client {n}: a new handshake on gw{}",
            owner[n] + 1
        );
    }
    let p = b.wg.client_peer(pc).expect("client peer");
    assert_eq!(p.endpoint, Some(SocketAddr::from((VIP, VIP_PORT))));
    // Each roamer's first packet from its new five-tuple was steered by its receiver index.
    let used = b.lb.agent.counter("session_id_used") - used0;
    println!(
        "session ids: {used} used, {} learned, {} rejected",
        b.lb.agent.counter("session_id_learned"),
        b.lb.agent.counter("session_id_rejected")
    );
    assert!(used >= 2, "session_id_used grew by {used}, not by 2");
}
