//! End to end with real strongSwan and OpenVPN behind an encapsulating VIP (issue #5: gateways
//! behind IPIP/GUE use vpnlb's decap program): the real agent (`vpnlb run`, `agent.encap_source_v4`)
//! forwards to three gateways by GUE (port 6081) or IPIP; every gateway holds the VIP on lo and runs
//! the real `vpnlb decap attach --iface eth0` (this kernel has no ipip/fou modules). The beds are the
//! L2 DSR tests' (tests/e2e_ipsec.rs, tests/e2e_openvpn.rs) with another `forwarding`.
//! - IPsec (GUE and IPIP): IKEv2 PSK clients behind nftables masquerade NATs (real NAT-T) on the IPsec VIP
//!   group (`hash = "source"`, `session_ids = "ipsec"`): IKE on 500, IKE and ESP-in-UDP on 4500 of
//!   each client reach one gateway, every CHILD_SA carries pings, every gateway gets a share, the
//!   clients' SAs still point at the VIP at the end.
//! - OpenVPN (GUE and IPIP): 12 clients, every tunnel carries pings, every gateway gets a share, every
//!   client stays on one gateway, which sees the client's own address; every client talks to the
//!   VIP only at the end (nftables counters).
//!
//! Both: each gateway's decap counter of the mode counted exactly the packets the LB sent it (the
//! other mode's none), and `vpnlb gateway-check --encap MODE` with the protocol's probe (IKEv2 on
//! 500; the recorded OpenVPN hard reset) exits 0 with every finding `ok`, but charon's `daemon`,
//! which is always a `warn` with the `mobike = no` fix (it cannot read charon's configuration).
//!
//! MTU: the gateway links keep 1500 and the VIPs say `mtu = 1500`: the largest packets through the
//! LB (OpenVPN's TLS records, at most 1250 bytes by default; an IKE_AUTH, about 300) fit with the
//! 20 (IPIP) or 28 (GUE) bytes added (largest GUE packets seen on the wire: 1262 bytes for
//! OpenVPN, 348 for IPsec), and one that did not would be counted (`drop_encap_too_big`, asserted
//! 0).
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), and the Debian packages
//! of tests/e2e_ipsec.rs and tests/e2e_openvpn.rs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb_tests::agent::{AgentBed, Decap, INTERFACE, backend, vip, wait_for};
use vpnlb_tests::ipsec::{
    CLIENT_CHARON, IpsecBed, IpsecOpts, backends_ikev2, ipsec_vips_forwarding,
};
use vpnlb_tests::openvpn::{OvpnBed, Pki, hard_reset_check, hex};
use vpnlb_tests::testbed::{VIP, VIP_PORT, assert_fair_share};

const GWS: [&str; 3] = ["gw1", "gw2", "gw3"];
const PING_EVERY: Duration = Duration::from_millis(100);

/// IKEv2 clients behind NATs through a `mode` VIP group to three decapsulating charon gateways.
fn ipsec(mode: &str) {
    const PREFIX: &str = "vpnlb-ipe";
    // As tests/e2e_ipsec.rs: two sites hold two clients each (they share a public address).
    const SITES: [usize; 10] = [2, 2, 1, 1, 1, 1, 1, 1, 1, 1];
    let t_start = Instant::now();
    let mut bed = AgentBed::up(PREFIX, 3, 0, |t, _| {
        format!(
            "{}{INTERFACE}{}{}",
            Decap::agent_keys(),
            backends_ikev2(t),
            ipsec_vips_forwarding(&GWS, "session_ids = \"ipsec\"\n", &Decap::vip_keys(mode))
        )
    });
    bed.topo.sinks.clear();
    let decap = Decap::attach(&bed, mode);
    let ips = IpsecBed::up(
        &bed.topo,
        PREFIX,
        &IpsecOpts {
            sites: &SITES,
            gw_charon: "",
            gw_conn: "",
            client_charon: CLIENT_CHARON,
            client_conn: "",
        },
    );
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    let clients = ips.clients.len();
    ips.connect_all();
    println!(
        "{mode}: all {clients} IPsec clients connected {:.1} s after start",
        t_start.elapsed().as_secs_f64()
    );

    let one_each = || {
        let p = ips.placement();
        p.iter()
            .all(|g| g.len() == 1)
            .then(|| p.iter().map(|g| g[0].0).collect::<Vec<usize>>())
    };
    let mut pingers = ips.ping_all(PING_EVERY);
    let owner = wait_for(Duration::from_secs(10), one_each)
        .unwrap_or_else(|| panic!("not every client on one gateway: {:?}", ips.placement()));
    std::thread::sleep(Duration::from_secs(3));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();
    let placement = ips.placement();
    let table = bed.agent.cli_json(&["inspect", "sessions"])["sessions"]
        .as_array()
        .cloned()
        .unwrap_or_default();

    // Per client: its gateway's SA names the NAT's public address and the VIP; the LB's sessions
    // of that address (IKE on 500, IKE and ESP-in-UDP on 4500) all go to that gateway; the
    // CHILD_SA carried the pings; the client's own SA points at the VIP.
    for n in 0..clients {
        let g = owner[n];
        let public = ips.public(n);
        let (_, gw_sa) = &placement[n][0];
        let remote = gw_sa.remote.expect("gateway SA remote");
        assert_eq!(
            remote.ip(),
            public,
            "{} sees client {n} from {remote}",
            GWS[g]
        );
        assert_eq!(
            gw_sa.local,
            Some(SocketAddr::from((VIP, 4500))),
            "{gw_sa:?}"
        );
        let mine: Vec<&Value> = table
            .iter()
            .filter(|s| s["client"].as_str() == Some(&public.to_string()))
            .collect();
        let ports: BTreeSet<u64> = mine.iter().filter_map(|s| s["vip_port"].as_u64()).collect();
        assert!(
            ports.contains(&500) && ports.contains(&4500),
            "client {n} ({public}): sessions {mine:?}"
        );
        for s in &mine {
            assert_eq!(s["backend"].as_str(), Some(GWS[g]), "client {n}: {s}");
        }
        let sa = ips.clients[n].sa().expect("client SA");
        assert_eq!(
            sa.remote,
            Some(SocketAddr::from((VIP, 4500))),
            "client {n}: {sa:?}"
        );
        let child = &gw_sa.children[0];
        let replies = logs[n].replies.len();
        println!(
            "{mode}: client {n} via {public} on {}: CHILD_SA in {} / out {} packets, {replies} ping replies",
            GWS[g], child.in_packets, child.out_packets
        );
        assert!(
            replies > 0 && child.in_packets > 0 && child.out_packets > 0,
            "client {n}: the CHILD_SA carried no traffic ({replies} replies, {child:?})"
        );
    }
    assert_fair_share(&owner, 3, 1);

    decap.assert_all_unwrapped();
    let sent = decap.assert_lb_sent_all_unwrapped(&bed.agent);
    println!("{mode}: LB sent {sent:?} packets to gw1..gw3, all unwrapped there");
    for g in 0..3 {
        decap.assert_gateway_check(g, 500, &[], &[("daemon", "mobike = no")]);
    }

    // At the end: still one gateway each, the same, and the clients' SAs on the VIP.
    assert_eq!(one_each(), Some(owner), "a client moved");
    for (n, c) in ips.clients.iter().enumerate() {
        let sa = c.sa().expect("client SA at the end");
        assert_eq!(
            sa.remote,
            Some(SocketAddr::from((VIP, 4500))),
            "client {n}: {sa:?}"
        );
    }
    println!(
        "{mode}: whole test {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
}

/// OpenVPN clients through a `mode` VIP to three decapsulating openvpn gateways.
fn openvpn(mode: &str) {
    const PREFIX: &str = "vpnlb-ove";
    const CLIENTS: usize = 12;
    let t_start = Instant::now();
    let pki = Pki::generate(PREFIX);
    let probe = pki.hard_reset_probe(PREFIX);
    let mut bed = AgentBed::up(PREFIX, 3, 0, |t, _| {
        let mut s = format!("{}{INTERFACE}", Decap::agent_keys());
        for (i, g) in t.gws.iter().enumerate() {
            s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
            s.push_str(&hard_reset_check(&probe));
        }
        s.push_str(
            &vip(&[("all", 0, &GWS)]).replace("forwarding = \"l2dsr\"\n", &Decap::vip_keys(mode)),
        );
        s
    });
    // The echo sinks hold VIP:51820: OpenVPN takes the port.
    bed.topo.sinks.clear();
    let decap = Decap::attach(&bed, mode);
    let mut ovpn = OvpnBed::up(&bed.topo, PREFIX, pki);
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    ovpn.connect(&bed.topo, CLIENTS);
    println!(
        "{mode}: all {CLIENTS} OpenVPN clients connected {:.1} s after start",
        t_start.elapsed().as_secs_f64()
    );

    let all = [0usize, 1, 2];
    let mut pingers = ovpn.ping_all(PING_EVERY);
    let placed = wait_for(Duration::from_secs(10), || {
        let p = ovpn.placement(&all);
        p.iter().all(|g| g.len() == 1).then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every client on exactly one gateway: {:?}\n{}",
            ovpn.placement(&all),
            ovpn.logs()
        )
    });
    let vip_before: Vec<_> = ovpn.clients.iter().map(|c| c.udp_counters()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();
    let now = ovpn.placement(&all);
    let mut owner = Vec::new();
    for n in 0..CLIENTS {
        // Found by the client's own address: the gateway sees the client itself (no NAT by the LB).
        assert_eq!(now[n], placed[n], "client {n} changed gateway or session");
        let replies = logs[n].replies.len();
        println!(
            "{mode}: client {n} on gw{}: {replies} ping replies",
            now[n][0].0 + 1
        );
        assert!(
            replies >= 5,
            "client {n}: only {replies} ping replies through its tunnel"
        );
        owner.push(now[n][0].0);
    }
    assert_fair_share(&owner, 3, CLIENTS / 6);

    decap.assert_all_unwrapped();
    let sent = decap.assert_lb_sent_all_unwrapped(&bed.agent);
    println!("{mode}: LB sent {sent:?} packets to gw1..gw3, all unwrapped there");
    let payload = hex(&probe);
    for g in 0..3 {
        decap.assert_gateway_check(g, VIP_PORT, &["--udp-payload-hex", &payload], &[]);
    }

    // Every client sent to the VIP only and heard from the VIP only (keepalives every second).
    for (n, c) in ovpn.clients.iter().enumerate() {
        let v = c.udp_counters();
        assert_eq!(
            (v.to_other, v.from_other),
            (0, 0),
            "client {n} left the VIP: {v:?}"
        );
        assert!(
            v.to_vip > vip_before[n].to_vip && v.from_vip > vip_before[n].from_vip,
            "client {n}: no packets to and from the VIP at the end: {:?} -> {v:?}",
            vip_before[n]
        );
    }
    assert_eq!(ovpn.placement(&all), placed, "a client moved");
    println!(
        "{mode}: whole test {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ipsec_nat_t_through_gue_to_decapsulating_gateways() {
    ipsec("gue");
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ipsec_nat_t_through_ipip_to_decapsulating_gateways() {
    ipsec("ipip");
}

#[test]
#[ignore = "needs root and openvpn: run cargo xtask test"]
fn openvpn_through_ipip_to_decapsulating_gateways() {
    openvpn("ipip");
}

#[test]
#[ignore = "needs root and openvpn: run cargo xtask test"]
fn openvpn_through_gue_to_decapsulating_gateways() {
    openvpn("gue");
}
