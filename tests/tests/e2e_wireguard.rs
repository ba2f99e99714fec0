//! End to end with real WireGuard: the real agent (`vpnlb run`) balances the UDP VIP 51820 (L2 DSR)
//! over three `wireguard-go` gateways sharing one server key; 24 client tunnels ping through it.
//! Checks: every tunnel carries traffic, every gateway gets a share, every client stays on one
//! gateway and keeps the VIP as its endpoint (gateways reply from the VIP), the gateways see the
//! clients' own addresses. Then one gateway dies (wireguard-go killed, cable cut): the agent marks it
//! down, its clients re-handshake onto healthy gateways, and the other tunnels lose no packet.
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), and the Debian packages
//! wireguard-go, wireguard-tools and iputils-ping.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, backend_in, vip, wait_for};
use vpnlb_tests::testbed::{VIP, VIP_PORT};
use vpnlb_tests::wg::{WgBed, now_epoch};

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
    let mut share: BTreeMap<usize, usize> = BTreeMap::new();
    for g in &owner {
        *share.entry(*g).or_default() += 1;
    }
    let spread: Vec<String> = (0..3)
        .map(|g| format!("gw{}: {}", g + 1, share.get(&g).copied().unwrap_or(0)))
        .collect();
    println!(
        "share over 3 gateways ({CLIENTS} clients): {}",
        spread.join(", ")
    );
    for g in 0..3 {
        let k = share.get(&g).copied().unwrap_or(0);
        assert!(
            k >= CLIENTS / 8,
            "gateway {} got {k} of {CLIENTS} clients: not a fair share",
            g + 1
        );
    }
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
    let mut back: BTreeMap<usize, (usize, Duration)> = BTreeMap::new();
    let deadline = t_kill + Duration::from_secs(25);
    while back.len() < moved.len() && Instant::now() < deadline {
        let p = wg.placement(&healthy);
        for &n in &moved {
            if back.contains_key(&n) {
                continue;
            }
            if let Some((g, _)) = p[n]
                .iter()
                .find(|(_, peer)| peer.latest_handshake as f64 >= kill_epoch.floor())
            {
                back.insert(n, (*g, t_kill.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let mut lost_total = 0;
    let mut span_total = 0;
    for &n in &stayed {
        let (lost, span) = logs[n].lost_after(kill_epoch);
        assert!(span > 0, "client {n}: no reply after the failure");
        lost_total += lost;
        span_total += span;
        assert_eq!(
            lost,
            0,
            "client {n} on healthy gw{} lost {lost} of {span} pings during the failover",
            owner[n] + 1
        );
    }
    rec.sort_by(f64::total_cmp);
    println!(
        "failover: detection {:.0} ms; {} clients moved, recovery (new handshake) min {:.1} s, max {:.1} s; \
         {} undisturbed clients lost {lost_total} of {span_total} pings over {:.1} s",
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
