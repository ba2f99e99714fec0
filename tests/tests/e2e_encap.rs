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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, vip, vpnlb_in, wait_for};
use vpnlb_tests::testbed::{LB_ADDR, VIP, VIP_PORT};
use vpnlb_tests::wg::{Keypair, WgBed};

const CLIENTS: usize = 24;

/// `vpnlb decap status --json` of a gateway.
fn decap_status(ns: &str, pin_dir: &str) -> Value {
    let (code, out, err) = vpnlb_in(
        ns,
        &["decap", "status", "--json", "--decap-pin-dir", pin_dir],
    );
    assert_eq!(code, Some(0), "decap status in {ns}: {err}");
    serde_json::from_str(&out).expect("decap status JSON")
}

/// The VIP's GUE port: not the default 6080, so the flags are exercised end to end.
const GUE_PORT: &str = "6081";

fn run(mode: &str) {
    let t_start = Instant::now();
    // GUE: the VIP's port; IPIP: GUE off on the gateways.
    let gue_port = if mode == "gue" { GUE_PORT } else { "0" };
    let prefix = format!("vpnlb-enc{}", &mode[..1]);
    let mut bed = AgentBed::up(&prefix, 3, CLIENTS, |t, _| {
        // Still in the [agent] table: the outer source of the encapsulated packets.
        let mut s = format!("encap_source_v4 = \"{LB_ADDR}\"\n\n{INTERFACE}");
        for (i, g) in t.gws.iter().enumerate() {
            s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
        }
        let mut fwd = format!("forwarding = \"{mode}\"");
        if mode == "gue" {
            fwd.push_str(&format!("\ngue_port = {GUE_PORT}"));
        }
        s.push_str(
            &vip(&[("all", 0, &["gw1", "gw2", "gw3"])]).replace("forwarding = \"l2dsr\"", &fwd),
        );
        s
    });
    bed.topo.sinks.clear();
    bed.agent
        .wait_all_up(&["gw1", "gw2", "gw3"], Duration::from_secs(15));

    // The gateways' side: the real command, per-gateway pins (removed with the scratch pin root).
    let pin_dirs: Vec<String> = (0..3)
        .map(|i| {
            bed.scratch
                .pin_root
                .join(format!("decap-gw{}", i + 1))
                .display()
                .to_string()
        })
        .collect();
    for (gw, dir) in bed.topo.gws.iter().zip(&pin_dirs) {
        let (code, out, err) = vpnlb_in(
            gw.name(),
            &[
                "decap",
                "attach",
                "--iface",
                "eth0",
                "--gue-port",
                gue_port,
                "--decap-pin-dir",
                dir,
            ],
        );
        assert_eq!(code, Some(0), "decap attach in {}: {out}{err}", gw.name());
        println!("{}: {}", gw.name(), out.trim());
    }

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
    let mut share: BTreeMap<usize, usize> = BTreeMap::new();
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
        *share.entry(*gw).or_default() += 1;
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
    println!(
        "{mode}: share over 3 gateways ({CLIENTS} clients): {share:?}; {replies} ping replies in all"
    );
    for g in 0..3 {
        let k = share.get(&g).copied().unwrap_or(0);
        assert!(
            k >= CLIENTS / 8,
            "{mode}: gw{} got {k} of {CLIENTS} clients",
            g + 1
        );
    }

    // Every gateway unwrapped packets of this mode, none of the other.
    let (this, other) = if mode == "gue" {
        ("decap_gue", "decap_ipip")
    } else {
        ("decap_ipip", "decap_gue")
    };
    for (gw, dir) in bed.topo.gws.iter().zip(&pin_dirs) {
        let s = decap_status(gw.name(), dir);
        let c = &s["counters"];
        println!("{}: decap counters {c}", gw.name());
        assert!(
            c[this].as_u64().unwrap_or(0) > 0,
            "{}: {this} did not move: {s}",
            gw.name()
        );
        assert_eq!(c[other].as_u64(), Some(0), "{}: {s}", gw.name());
        assert_eq!(c["decap_bad_inner"].as_u64(), Some(0), "{}: {s}", gw.name());
        assert_eq!(s["interfaces"][0]["attached"], true, "{s}");
        assert_eq!(s["gue_port"].to_string(), gue_port, "{s}");
    }
    // Every packet the LB encapsulated to a gateway was unwrapped there: its per-backend count,
    // read between two reads of the gateway's counter (keepalives still flow), lies between them.
    let unwrapped = || -> Vec<u64> {
        bed.topo
            .gws
            .iter()
            .zip(&pin_dirs)
            .map(|(gw, dir)| {
                decap_status(gw.name(), dir)["counters"][this]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect()
    };
    let before = unwrapped();
    let stats = bed.agent.cli_json(&["inspect", "stats"]);
    let after = unwrapped();
    for g in 0..3 {
        let name = format!("gw{}", g + 1);
        let sent = stats["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|x| x["name"] == name.as_str()))
            .and_then(|b| b["packets"].as_u64())
            .unwrap_or_else(|| panic!("{name} not in inspect stats: {stats}"));
        println!(
            "{mode}: LB sent {sent} packets to {name}, it unwrapped {}..{}",
            before[g], after[g]
        );
        assert!(
            before[g] <= sent && sent <= after[g],
            "{mode}: LB sent {sent} to {name}, it unwrapped {}..{}",
            before[g],
            after[g]
        );
    }
    let fwd = stats["counters"][format!("fwd_{mode}")]
        .as_u64()
        .unwrap_or(0);
    assert!(
        fwd >= before.iter().sum::<u64>(),
        "fwd_{mode} {fwd}: {stats}"
    );

    // gateway-check agrees: an authenticated WireGuard handshake to the VIP is answered from it.
    let probe = Keypair::generate();
    for (g, gw) in bed.topo.gws.iter().enumerate() {
        std::process::Command::new("wg")
            .args(["set", &wg.gws[g].ifname, "peer", &probe.public])
            .args(["allowed-ips", "10.99.250.1/32"])
            .status()
            .expect("wg set peer")
            .success()
            .then_some(())
            .expect("wg set peer failed");
        let (code, out, err) = vpnlb_in(
            gw.name(),
            &[
                "gateway-check",
                "--vip",
                &VIP.to_string(),
                "--port",
                &VIP_PORT.to_string(),
                "--encap",
                mode,
                "--gue-port",
                gue_port,
                "--iface",
                "eth0",
                "--decap-pin-dir",
                &pin_dirs[g],
                "--wg-public-key",
                &wg.server.public,
                "--wg-probe-private-key",
                &probe.private,
                "--json",
            ],
        );
        let j: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("gateway-check JSON in {}: {e}: {out}{err}", gw.name()));
        let levels: Vec<(String, String)> = j["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .map(|f| {
                (
                    f["check"].as_str().unwrap_or("").to_string(),
                    f["level"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        println!("{}: gateway-check {levels:?}", gw.name());
        assert_eq!(
            code,
            Some(0),
            "gateway-check failed in {}: {j:#}",
            gw.name()
        );
        for want in [
            "vip_address",
            "arp_ignore",
            "rp_filter",
            "decap",
            "reply_source",
            "daemon",
        ] {
            assert!(
                levels.iter().any(|(c, l)| c == want && l == "ok"),
                "{}: no ok {want} finding: {j:#}",
                gw.name()
            );
        }
        assert!(
            levels.iter().all(|(_, l)| l == "ok"),
            "{}: {j:#}",
            gw.name()
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
        &pin_dirs[0],
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
        gue_port,
        "--decap-pin-dir",
        &pin_dirs[0],
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
