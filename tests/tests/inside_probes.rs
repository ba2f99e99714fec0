//! End-to-end probes against real gateways: the real agent checks two gateways that each run
//! `wireguard-go` and strongSwan's `charon`, with a host behind them (namespace `vpnlb-inp-in`,
//! 10.96.0.1, reached through each gateway's `in0` with forwarding and a masquerade, as a VPN
//! gateway in front of a private network is set up). Every gateway has four checks:
//! - `icmp`: the host is up;
//! - `wireguard:51820`: a WireGuard handshake (its own probe key);
//! - `wireguard:51820>10.96.0.1`: the handshake, then an ICMP echo to 10.96.0.1 through the tunnel
//!   (another probe key, tunnel address 192.0.2.77, which the gateways' AllowedIPs cover);
//! - `exec:ipsec-inside.sh`: docs/examples/probes/ipsec-inside.sh, which brings up a real IKEv2
//!   tunnel with a private charon in the LB namespace and pings 10.96.0.1 through it.
//!
//! The path to the inside network of gw1 is broken twice, by turning forwarding off and by
//! removing its route to 10.96.0.1: each time the two end-to-end probes go down and take gw1 down
//! while `icmp` and the plain handshake stay up (the control: only these probes see it), and gw2
//! is untouched; fixed, gw1 comes back. At the end no tun device, routing rule or process of the
//! exec probes is left in the LB namespace.
//!
//! Needs root, the agent binary and eBPF objects (tests/src/agent.rs), wireguard-go,
//! wireguard-tools, the strongSwan packages (tests/src/ipsec.rs), nftables and iputils-ping.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, backend_in, metric, vip, wait_for};
use vpnlb_tests::ipsec::Charon;
use vpnlb_tests::netns::{Netns, ip};
use vpnlb_tests::testbed::gw_addr;
use vpnlb_tests::wg::{Keypair, WgBed};

const GWS: [&str; 2] = ["gw1", "gw2"];
const INSIDE: &str = "10.96.0.1";
/// The inside probe's tunnel address and the plain probe's (each key its own /32).
const TUNNEL_ADDR: &str = "192.0.2.77";
const PLAIN_ADDR: &str = "192.0.2.78";
const PSK: &str = "vpnlb-inside-probe-secret";

const ICMP: &str = "icmp";
const WG_PLAIN: &str = "wireguard:51820";
const WG_INSIDE: &str = "wireguard:51820>10.96.0.1";
const EXEC: &str = "exec:ipsec-inside.sh";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/probes/ipsec-inside.sh")
}

/// Each gateway's charon: a connection for the probe on the gateway's own address, virtual IPs
/// from a pool of its own, traffic selectors covering the inside network (and `in0`'s address,
/// which kernel-libipsec needs inside local_ts).
fn gateway_swanctl(g: usize) -> String {
    format!(
        "connections {{
  probe {{
    version = 2
    local_addrs = {own}
    pools = probes
    proposals = aes256-sha256-x25519
    local {{
      auth = psk
      id = gw.vpnlb.test
    }}
    remote {{
      auth = psk
    }}
    children {{
      inside {{
        local_ts = 10.96.0.0/16
        esp_proposals = aes256gcm16
      }}
    }}
  }}
}}
pools {{
  probes {{
    addrs = 10.95.{n}.0/24
  }}
}}
secrets {{
  ike-probe {{
    secret = \"{PSK}\"
  }}
}}
",
        own = gw_addr(g),
        n = g + 1
    )
}

/// Config body: every gateway with the four checks (the three probes once `probes` is given).
fn body(macs: &[[u8; 6]], probes: Option<(&str, &Keypair, &Keypair, &str)>) -> String {
    let mut s = String::from(INTERFACE);
    for (i, m) in macs.iter().enumerate() {
        s.push_str(&backend(i, Some(*m), 1, &["icmp"]));
        if let Some((server, plain, inside, psk_file)) = probes {
            s.push_str(&format!(
                "[[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{server}\"\nprivate_key = \"{}\"\n\
                 interval_ms = 400\ntimeout_ms = 200\nrise = 2\nfall = 2\n\n\
                 [[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{server}\"\nprivate_key = \"{}\"\n\
                 inside = \"{INSIDE}\"\ntunnel_address = \"{TUNNEL_ADDR}\"\ninside_timeout_ms = 300\n\
                 interval_ms = 700\ntimeout_ms = 200\nrise = 2\nfall = 2\n\n\
                 [[backend.check]]\ntype = \"exec\"\ncommand = [\"{}\", \"{INSIDE}\", \"{psk_file}\"]\n\
                 interval_ms = 2000\ntimeout_ms = 1800\nrise = 2\nfall = 2\n\n",
                plain.private,
                inside.private,
                script().display(),
            ));
        }
    }
    s.push_str(&vip(&[("all", 0, &GWS)]));
    s
}

/// The check of `backend` labelled exactly `label` in a status.
fn check<'a>(st: &'a Value, backend: &str, label: &str) -> &'a Value {
    backend_in(st, backend)
        .and_then(|b| b["checks"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["check"] == label))
        .unwrap_or_else(|| panic!("{backend} has no check {label}: {st:#}"))
}

/// Whether that check is up (false while the agent does not have it yet).
fn up(st: &Value, backend: &str, label: &str) -> bool {
    backend_in(st, backend)
        .and_then(|b| b["checks"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["check"] == label))
        .is_some_and(|c| c["up"] == true)
}

fn state(st: &Value, backend: &str) -> String {
    backend_in(st, backend).expect("backend")["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn summary(st: &Value, backend: &str) -> String {
    [ICMP, WG_PLAIN, WG_INSIDE, EXEC]
        .iter()
        .map(|l| {
            let c = check(st, backend, l);
            format!(
                "{l}={} ({})",
                if c["up"] == true { "up" } else { "down" },
                c["last_detail"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
#[ignore = "needs root, wireguard-go and strongswan: run cargo xtask test"]
fn inside_probes_catch_a_broken_path_to_the_inside_network() {
    let mut bed = AgentBed::up("vpnlb-inp", 2, 1, |t, _| {
        let macs: Vec<[u8; 6]> = t.gws.iter().map(|g| g.mac("eth0")).collect();
        body(&macs, None)
    });
    bed.topo.sinks.clear();
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    let wg = WgBed::up(&bed.topo, "inpg", "inpc");

    // The network behind the gateways: 10.96.0.1 on the inside host, a link to each gateway.
    let inside = Netns::new("vpnlb-inp-in");
    inside.sh(&format!("ip addr add {INSIDE}/32 dev lo"));
    let plain = Keypair::generate();
    let probe = Keypair::generate();
    for (g, gw) in bed.topo.gws.iter().enumerate() {
        let n = g + 1;
        ip(&[
            "-n",
            gw.name(),
            "link",
            "add",
            "in0",
            "type",
            "veth",
            "peer",
            "name",
            &format!("ig{n}"),
            "netns",
            inside.name(),
        ]);
        inside.sh(&format!(
            "ip addr add 10.96.{n}.2/24 dev ig{n} && ip link set ig{n} up"
        ));
        gw.sh(&format!(
            "ip addr add 10.96.{n}.1/24 dev in0 && ip link set in0 up \
             && ip route add {INSIDE}/32 via 10.96.{n}.2 && sysctl -qw net.ipv4.ip_forward=1"
        ));
        gw.sh(
            "nft -f - <<'EOF'\ntable ip vpnlb_inside {\n  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"in0\" masquerade\n  }\n}\nEOF",
        );
        // Both probe keys are peers; the inside probe's tunnel address is routed into the tunnel.
        let ifname = &wg.gws[g].ifname;
        for (k, a) in [(&plain, PLAIN_ADDR), (&probe, TUNNEL_ADDR)] {
            let out = Command::new("wg")
                .args(["set", ifname, "peer", &k.public, "allowed-ips"])
                .arg(format!("{a}/32"))
                .output()
                .expect("wg set");
            assert!(out.status.success(), "wg set: {out:?}");
        }
        gw.sh(&format!("ip route replace {TUNNEL_ADDR}/32 dev {ifname}"));
    }
    let charons: Vec<Charon> = bed
        .topo
        .gws
        .iter()
        .enumerate()
        .map(|(g, gw)| {
            let c = Charon::start(
                gw.name(),
                &bed.scratch.dir.join(format!("charon-gw{}", g + 1)),
                "",
            );
            let loaded = c.load(&gateway_swanctl(g));
            assert!(loaded.contains("loaded connection 'probe'"), "{loaded}");
            c
        })
        .collect();
    let psk_file = bed.scratch.dir.join("ipsec-probe.psk");
    std::fs::write(&psk_file, PSK).expect("psk file");

    // gateway-check on gw1 agrees that the gateway is set up for the inside probe.
    let gc = vpnlb_tests::agent::vpnlb_in(
        bed.topo.gws[0].name(),
        &[
            "gateway-check",
            "--vip",
            &vpnlb_tests::testbed::VIP.to_string(),
            "--json",
            "--wg-probe-private-key",
            &probe.private,
            "--wg-probe-tunnel-address",
            TUNNEL_ADDR,
            "--wg-inside",
            INSIDE,
        ],
    );
    let gc: Value =
        serde_json::from_str(&gc.1).unwrap_or_else(|e| panic!("gateway-check: {e}: {gc:?}"));
    for name in [
        "probe_allowed_ips",
        "probe_route",
        "forwarding",
        "inside_route",
    ] {
        let f = gc["findings"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["check"] == name))
            .unwrap_or_else(|| panic!("no {name} finding: {gc:#}"));
        assert_eq!(f["level"], "ok", "{name}: {f}");
    }

    let macs: Vec<[u8; 6]> = (0..2).map(|i| bed.gw_mac(i)).collect();
    let psk = psk_file.to_str().expect("utf-8").to_string();
    bed.agent.write_config(&body(
        &macs,
        Some((&wg.server.public, &plain, &probe, &psk)),
    ));
    bed.agent.sighup();
    // Up and passing: a check added by a reload starts up (the backend keeps serving until the
    // new checks say otherwise), so its own last result must be a success too.
    let all_up = |st: &Value| {
        GWS.iter().all(|g| {
            [ICMP, WG_PLAIN, WG_INSIDE, EXEC]
                .iter()
                .all(|l| up(st, g, l) && check(st, g, l)["last_ok"] == true)
        })
    };
    let st = wait_for(Duration::from_secs(40), || {
        let st = bed.agent.status();
        (GWS.iter().all(|g| up(&st, g, EXEC)) && all_up(&st)).then_some(st)
    })
    .unwrap_or_else(|| panic!("the probes did not all come up: {:#}", bed.agent.status()));
    for g in GWS {
        println!("{g}: {}", summary(&st, g));
        assert_eq!(state(&st, g), "up");
    }
    let phases = &check(&st, "gw1", WG_INSIDE)["last_phases_ms"];
    assert!(
        phases["handshake"].as_f64().is_some() && phases["inside"].as_f64().is_some(),
        "handshake and inside round trips reported separately: {phases}"
    );
    let text = bed.agent.metrics_text();
    let series = format!(
        "vpnlb_check_phase_latency_seconds{{backend=\"gw1\",check=\"{WG_INSIDE}\",phase=\"inside\"}}"
    );
    let inside_rtt = metric(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    println!(
        "gw1 inside probe: handshake {:.2} ms, inside {:.2} ms (metric {:.2} ms)",
        phases["handshake"].as_f64().unwrap_or(0.0),
        phases["inside"].as_f64().unwrap_or(0.0),
        inside_rtt * 1e3
    );

    let gw1 = &bed.topo.gws[0];
    let faults = [
        (
            "forwarding off",
            "sysctl -qw net.ipv4.ip_forward=0",
            "sysctl -qw net.ipv4.ip_forward=1",
        ),
        (
            "route to the inside network removed",
            "ip route del 10.96.0.1/32",
            "ip route add 10.96.0.1/32 via 10.96.1.2",
        ),
    ];
    for (what, brk, fix) in faults {
        let t0 = Instant::now();
        gw1.sh(brk);
        // Both end-to-end probes down (the backend goes down with the first), the others up.
        let st = wait_for(Duration::from_secs(30), || {
            let st = bed.agent.status();
            (!up(&st, "gw1", WG_INSIDE) && !up(&st, "gw1", EXEC)).then_some(st)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: the end-to-end probes did not go down: {}",
                summary(&bed.agent.status(), "gw1")
            )
        });
        let took = t0.elapsed();
        println!(
            "{what} on gw1 -> both end-to-end probes down in {:.1} s: {}",
            took.as_secs_f64(),
            summary(&st, "gw1")
        );
        assert_eq!(state(&st, "gw1"), "down", "{what}: gw1 taken out");
        assert!(
            up(&st, "gw1", ICMP) && up(&st, "gw1", WG_PLAIN),
            "{what}: icmp and the plain handshake must still pass (they cannot see it): {}",
            summary(&st, "gw1")
        );
        assert_eq!(state(&st, "gw2"), "up", "{what}: gw2 untouched");
        let shares = bed.agent.ring_shares();
        let gw1_id = backend_in(&st, "gw1").unwrap()["id"].as_u64().unwrap() as u32;
        assert!(
            !shares.contains_key(&gw1_id),
            "{what}: gw1 out of the ring: {shares:?}"
        );
        let detail = check(&st, "gw1", WG_INSIDE)["last_detail"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            detail.starts_with("handshake ok (") && detail.contains("10.96.0.1"),
            "{what}: the inside probe says the handshake worked and the inside did not: {detail}"
        );

        let t1 = Instant::now();
        gw1.sh(fix);
        let st = wait_for(Duration::from_secs(40), || {
            let st = bed.agent.status();
            (state(&st, "gw1") == "up" && all_up(&st)).then_some(st)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what} fixed: gw1 did not come back: {}",
                summary(&bed.agent.status(), "gw1")
            )
        });
        println!(
            "{what} fixed -> gw1 up with every check in {:.1} s: {}",
            t1.elapsed().as_secs_f64(),
            summary(&st, "gw1")
        );
    }

    // The exec probes leave nothing behind in the LB namespace once the agent is gone.
    bed.agent.stop();
    let lb = bed.topo.lb.name().to_string();
    let left = wait_for(Duration::from_secs(10), || {
        let links = ip(&["-n", &lb, "-o", "link", "show"]);
        let rules = ip(&["-n", &lb, "rule", "show"]);
        (!links.contains("ipsec") && rules.lines().count() == 3).then_some(())
    });
    assert!(
        left.is_some(),
        "the exec probes left state in the LB namespace: {}\n{}",
        ip(&["-n", &lb, "-o", "link", "show"]),
        ip(&["-n", &lb, "rule", "show"])
    );
    drop(charons);
    drop(wg);
    drop(inside);
}
