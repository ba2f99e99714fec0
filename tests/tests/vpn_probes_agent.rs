//! The real agent with VPN-protocol probes against real gateways (`wireguard-go`, strongSwan's
//! charon): a gateway whose daemon is frozen (SIGSTOP) still answers ICMP, so only the `wireguard`
//! handshake check or the stateless `ikev2` SA_INIT check can tell that it no longer serves tunnels. The agent must mark it down within fall x interval (plus one
//! timeout), say in `status` that ICMP is still up and the handshake check is not, and take it out
//! of the pinned Maglev ring; thawed (SIGCONT) it comes back, killed it goes down again.
//!
//! The wireguard check needs the gateways' key, which exists only once WireGuard is up, so the
//! agent starts with ICMP checks and gets the handshake checks by a reload (SIGHUP): this also shows
//! that a check change on reload keeps the backends serving.
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), wireguard-go,
//! wireguard-tools and the strongSwan packages (see tests/src/ipsec.rs).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb_tests::agent::{
    AgentBed, FALL, INTERFACE, INTERVAL_MS, RISE, TIMEOUT_MS, backend, backend_in, check_up, vip,
    wait_for,
};
use vpnlb_tests::ipsec::{Charon, backends_ikev2_and, gateway_conf, ipsec_vips};
use vpnlb_tests::testbed::RING_SIZE;
use vpnlb_tests::wg::{Keypair, WgBed};

const GWS: [&str; 2] = ["gw1", "gw2"];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// fall failures `INTERVAL_MS` apart, the last one waiting its timeout, plus scheduling slack.
fn detection_bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS + 1000)
}

fn rise_bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * (RISE + 1) + 1500)
}

/// The `[[backend.check]]` of type `wireguard`: a handshake with the gateways' key as `probe`.
fn wireguard_check(server_public: &str, probe: &Keypair) -> String {
    format!(
        "[[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{server_public}\"\nprivate_key = \"{}\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\n",
        probe.private
    )
}

/// Config body: every gateway with an ICMP check and the given extra check text.
fn body(macs: &[[u8; 6]], extra: &str) -> String {
    let mut s = String::from(INTERFACE);
    for (i, m) in macs.iter().enumerate() {
        s.push_str(&backend(i, Some(*m), 1, &["icmp"]));
        s.push_str(extra);
    }
    s.push_str(&vip(&[("all", 0, &GWS)]));
    s
}

/// `up` of each check of backend `name`, by check type (label prefix).
fn check_states(status: &Value, name: &str) -> Vec<(String, bool)> {
    backend_in(status, name)
        .unwrap_or_else(|| panic!("{name} missing from status: {status:#}"))["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap_or("").to_string(),
                c["up"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn backend_id(status: &Value, name: &str) -> u32 {
    backend_in(status, name).expect("backend")["id"]
        .as_u64()
        .expect("id") as u32
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the PID of a daemon this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
#[ignore = "needs root and wireguard-go: run cargo xtask test"]
fn frozen_wireguard_daemon_is_marked_down_while_icmp_says_up() {
    let mut bed = AgentBed::up("vpnlb-vpa", 2, 1, |t, _| {
        let macs: Vec<[u8; 6]> = t.gws.iter().map(|g| g.mac("eth0")).collect();
        body(&macs, "")
    });
    // The echo sinks hold VIP:51820: WireGuard takes the port.
    bed.topo.sinks.clear();
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    let wg = WgBed::up(&bed.topo, "vpag", "vpac");

    // The probe's own key is a peer of every gateway, with an address nobody uses.
    let probe = Keypair::generate();
    for d in &wg.gws {
        let out = Command::new("wg")
            .args(["set", &d.ifname, "peer", &probe.public])
            .args(["allowed-ips", "10.219.9.77/32"])
            .output()
            .expect("wg set");
        assert!(out.status.success(), "wg set: {out:?}");
    }
    let macs: Vec<[u8; 6]> = (0..2).map(|i| bed.gw_mac(i)).collect();
    bed.agent
        .write_config(&body(&macs, &wireguard_check(&wg.server.public, &probe)));
    bed.agent.sighup();
    let both = wait_for(Duration::from_secs(10), || {
        let st = bed.agent.status();
        GWS.iter()
            .all(|g| {
                let c = check_states(&st, g);
                c.len() == 2 && c.iter().all(|(_, up)| *up)
            })
            .then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "handshake checks not up after reload: {:#}\n{}",
            bed.agent.status(),
            bed.agent.log()
        )
    });
    for g in GWS {
        assert_eq!(
            backend_in(&both, g).unwrap()["state"],
            "up",
            "{g} left up by the reload"
        );
    }
    let gw1 = backend_id(&both, "gw1");
    let gw2 = backend_id(&both, "gw2");
    let shares = bed.agent.ring_shares();
    assert!(
        shares.get(&gw1).copied().unwrap_or(0) > 0 && shares.get(&gw2).copied().unwrap_or(0) > 0,
        "both gateways in the ring: {shares:?}"
    );

    // Freeze gw1's wireguard-go: the host still answers pings, the VPN daemon does not.
    let pid = wg.gws[0].pid().expect("gw1 daemon");
    let t0 = Instant::now();
    signal(pid, libc::SIGSTOP);
    bed.agent.wait_state("gw1", "down", detection_bound());
    let detect = t0.elapsed();
    let st = bed.agent.status();
    assert!(
        check_up(&st, "gw1", "icmp"),
        "icmp must still say up for a frozen daemon: {:?}",
        check_states(&st, "gw1")
    );
    assert!(
        !check_up(&st, "gw1", "wireguard"),
        "the handshake check caught it: {:?}",
        check_states(&st, "gw1")
    );
    assert_eq!(st_state(&st, "gw2"), "up", "gw2 untouched");
    let shares = bed.agent.ring_shares();
    assert_eq!(
        shares.get(&gw2).copied(),
        Some(RING_SIZE as usize),
        "gw2 owns the whole ring while gw1 is down: {shares:?}"
    );
    println!(
        "SIGSTOP wireguard-go -> gw1 down in {:.0} ms (bound: fall {FALL} x {INTERVAL_MS} ms + timeout {TIMEOUT_MS} ms + 1 s); icmp up, wireguard down",
        ms(detect)
    );

    // Thawed, it answers handshakes again.
    let t1 = Instant::now();
    signal(pid, libc::SIGCONT);
    bed.agent.wait_state("gw1", "up", rise_bound());
    println!("SIGCONT -> gw1 up in {:.0} ms", ms(t1.elapsed()));
    let shares = bed.agent.ring_shares();
    assert!(
        shares.get(&gw1).copied().unwrap_or(0) > 0,
        "gw1 back in the ring: {shares:?}"
    );

    // Dead for good: down again, ICMP still up.
    let mut wg = wg;
    let t2 = Instant::now();
    wg.kill_gateway(0);
    bed.agent.wait_state("gw1", "down", detection_bound());
    let st = bed.agent.status();
    assert!(check_up(&st, "gw1", "icmp") && !check_up(&st, "gw1", "wireguard"));
    println!(
        "kill -9 wireguard-go -> gw1 down in {:.0} ms",
        ms(t2.elapsed())
    );
    drop(wg);
}

fn st_state(status: &Value, name: &str) -> String {
    backend_in(status, name).expect("backend")["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn frozen_charon_is_marked_down_while_icmp_says_up() {
    let bed = AgentBed::up("vpnlb-vpi", 2, 1, |t, _| {
        // icmp + ikev2 on every gateway, and the IPsec VIP group over both.
        let mut s = String::from(INTERFACE);
        s.push_str(&backends_ikev2_and(t, &["icmp"]));
        s.push_str(&ipsec_vips(&GWS, ""));
        s
    });
    let charons: Vec<Charon> = bed
        .topo
        .gws
        .iter()
        .enumerate()
        .map(|(i, gw)| {
            let dir = bed.scratch.dir.join(format!("charon-gw{}", i + 1));
            let c = Charon::start(gw.name(), &dir, "");
            c.load(&gateway_conf(""));
            c
        })
        .collect();
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    let st = bed.agent.status();
    for g in GWS {
        assert!(
            check_up(&st, g, "icmp") && check_up(&st, g, "ikev2"),
            "{st:#}"
        );
    }
    let gw1 = backend_id(&st, "gw1");
    let gw2 = backend_id(&st, "gw2");

    let t0 = Instant::now();
    charons[0].signal(libc::SIGSTOP);
    bed.agent.wait_state("gw1", "down", detection_bound());
    let detect = t0.elapsed();
    let st = bed.agent.status();
    assert!(
        check_up(&st, "gw1", "icmp") && !check_up(&st, "gw1", "ikev2"),
        "icmp up, ikev2 down for a frozen charon: {st:#}"
    );
    assert_eq!(st_state(&st, "gw2"), "up", "gw2 untouched");
    // Every VIP of the group (500, 4500, ESP) now hashes to gw2 only.
    let maps =
        vpnlb::dataplane::maps::AyaMaps::open_pinned(&bed.agent.pin_dir).expect("pinned maps");
    use vpnlb::dataplane::maps::MapReader;
    for (_, meta) in maps.vips().expect("VIPS") {
        let ring = maps.ring(meta.ring_id, meta.ring_size).expect("ring");
        assert!(
            ring.iter().all(|&b| b == gw2) && !ring.contains(&gw1),
            "a ring still names gw1"
        );
    }
    println!(
        "SIGSTOP charon -> gw1 down in {:.0} ms (fall {FALL} x {INTERVAL_MS} ms + timeout {TIMEOUT_MS} ms); icmp up, ikev2 down",
        ms(detect)
    );
    let t1 = Instant::now();
    charons[0].signal(libc::SIGCONT);
    bed.agent.wait_state("gw1", "up", rise_bound());
    println!("SIGCONT -> gw1 up in {:.0} ms", ms(t1.elapsed()));
    drop(charons);
}
