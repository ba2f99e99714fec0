//! End to end with real WireGuard behind an encapsulating VIP: the real agent (`vpnlb run`)
//! forwards UDP VIP 51820 to three `wireguard-go` gateways by GUE (`forwarding = "gue"`, port 6081)
//! or IPIP, with `agent.encap_source_v4` set; every gateway holds the VIP on lo and runs the real
//! `vpnlb decap attach --iface eth0`, which unwraps the packets in XDP (this kernel has no ipip/fou
//! modules).
//! Checks: every one of 24 client tunnels carries traffic, every gateway gets a share, every client
//! stays on one gateway and keeps the VIP as its endpoint (gateways reply from the VIP, directly),
//! the gateways see the clients' own addresses, each gateway's decap counter of the mode counted
//! exactly the packets the LB sent it (and the other mode's none), and `vpnlb gateway-check` finds
//! nothing wrong there. Then one gateway's decap is detached: its clients get no replies while the
//! others carry on; attached again, they recover.
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), and the Debian packages
//! wireguard-go, wireguard-tools and iputils-ping.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use vpnlb_tests::agent::{AgentBed, Decap, INTERFACE, backend, vip, vpnlb_in, wait_for};
use vpnlb_tests::testbed::{VIP, VIP_PORT, assert_fair_share};
use vpnlb_tests::wg::{Keypair, WgBed};

const CLIENTS: usize = 24;

fn run(mode: &str) {
    let t_start = Instant::now();
    let prefix = format!("vpnlb-enc{}", &mode[..1]);
    let mut bed = AgentBed::up(&prefix, 3, CLIENTS, |t, _| {
        let mut s = format!("{}{INTERFACE}", Decap::agent_keys());
        for (i, g) in t.gws.iter().enumerate() {
            s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
        }
        s.push_str(
            &vip(&[("all", 0, &["gw1", "gw2", "gw3"])])
                .replace("forwarding = \"l2dsr\"\n", &Decap::vip_keys(mode)),
        );
        s
    });
    bed.topo.sinks.clear();
    bed.agent
        .wait_all_up(&["gw1", "gw2", "gw3"], Duration::from_secs(15));
    // The gateways' side: the real command, per-gateway pins (removed with the scratch pin root).
    let decap = Decap::attach(&bed, mode);

    let gw_prefix = format!("wge{}", &mode[..1]);
    let cl_prefix = format!("wgec{}", &mode[..1]);
    let wg = WgBed::up(&bed.topo, &gw_prefix, &cl_prefix);
    let mut pingers = wg.ping_all(Duration::from_millis(50));
    let all = [0usize, 1, 2];
    let placed = wait_for(Duration::from_secs(15), || {
        let p = wg.placement(&all);
        p.iter().all(|g| g.len() == 1).then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "{mode}: not every client completed a handshake: {:?}",
            wg.placement(&all)
        )
    });
    println!(
        "{mode}: all {CLIENTS} handshakes done {:.1} s after start",
        t_start.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();

    let now = wg.placement(&all);
    for n in 0..CLIENTS {
        assert_eq!(
            now[n].len(),
            1,
            "client {n} on several gateways: {:?}",
            now[n]
        );
        let (gw, peer) = &now[n][0];
        assert_eq!(*gw, placed[n][0].0, "client {n} changed gateway");
        assert_eq!(
            peer.endpoint,
            Some(wg.clients[n].underlay()),
            "gw{} sees client {n} from another address",
            gw + 1
        );
        let replies = logs[n].replies.len();
        assert!(
            replies >= 5,
            "client {n}: only {replies} ping replies through its tunnel"
        );
        let p = wg.client_peer(n).expect("client peer");
        assert_eq!(
            p.endpoint,
            Some(SocketAddr::from((VIP, VIP_PORT))),
            "client {n} roamed away from the VIP"
        );
    }
    let replies: usize = logs.iter().map(|l| l.replies.len()).sum();
    println!("{mode}: {replies} ping replies in all");
    let owner: Vec<usize> = now.iter().map(|p| p[0].0).collect();
    assert_fair_share(&owner, 3, CLIENTS / 8);

    // Every gateway unwrapped packets of this mode, none of the other, and exactly what the LB
    // sent it.
    decap.assert_all_unwrapped();
    decap.assert_lb_sent_all_unwrapped(&bed.agent);

    // gateway-check agrees: an authenticated WireGuard handshake to the VIP is answered from it.
    let probe = Keypair::generate();
    let keys = [
        "--wg-public-key",
        &wg.server.public,
        "--wg-probe-private-key",
        &probe.private,
    ];
    for g in 0..3 {
        std::process::Command::new("wg")
            .args(["set", &wg.gws[g].ifname, "peer", &probe.public])
            .args(["allowed-ips", "10.99.250.1/32"])
            .status()
            .expect("wg set peer")
            .success()
            .then_some(())
            .expect("wg set peer failed");
        let levels = decap.assert_gateway_check(g, VIP_PORT, &keys, &[]);
        assert!(
            levels.iter().any(|(c, l)| c == "arp_ignore" && l == "ok"),
            "{levels:?}"
        );
    }

    // The decap program does the work: without it gw1's clients get nothing through, the others
    // carry on; attached again, gw1's tunnels carry traffic at once.
    let gw1 = bed.topo.gws[0].name().to_string();
    let on_gw1: Vec<usize> = (0..CLIENTS).filter(|&n| now[n][0].0 == 0).collect();
    let detach = [
        "decap",
        "detach",
        "--iface",
        "eth0",
        "--decap-pin-dir",
        &decap.gws[0].1,
    ];
    let (code, _, err) = vpnlb_in(&gw1, &detach);
    assert_eq!(code, Some(0), "decap detach: {err}");
    let (code, out, _) = vpnlb_in(
        &gw1,
        &[
            "gateway-check",
            "--vip",
            &VIP.to_string(),
            "--encap",
            mode,
            "--iface",
            "eth0",
        ],
    );
    assert_eq!(code, Some(1), "gateway-check without decap: {out}");
    assert!(out.contains("FAIL decap [eth0]"), "{out}");
    let replies = |what: &str| -> Vec<usize> {
        let mut p = wg.ping_all(Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(1500));
        let got: Vec<usize> = p.iter_mut().map(|x| x.stop().replies.len()).collect();
        println!("{mode}: ping replies per client {what}: {got:?}");
        got
    };
    let without = replies("with gw1's decap detached");
    for (n, &got) in without.iter().enumerate() {
        if on_gw1.contains(&n) {
            assert_eq!(got, 0, "client {n} on gw1 got replies without decap");
        } else {
            assert!(got > 0, "client {n} on a healthy gateway got no reply");
        }
    }
    let attach = [
        "decap",
        "attach",
        "--iface",
        "eth0",
        "--gue-port",
        &decap.gue_port(),
        "--decap-pin-dir",
        &decap.gws[0].1,
    ];
    let (code, _, err) = vpnlb_in(&gw1, &attach);
    assert_eq!(code, Some(0), "decap attach again: {err}");
    let with = replies("with gw1's decap attached again");
    for &n in &on_gw1 {
        assert!(
            with[n] > 0,
            "client {n} on gw1: no reply after re-attaching decap"
        );
    }

    println!(
        "{mode}: whole test {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
    drop(wg);
}

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn wireguard_through_gue_to_decapsulating_gateways() {
    run("gue");
}

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn wireguard_through_ipip_to_decapsulating_gateways() {
    run("ipip");
}
