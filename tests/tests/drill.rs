//! Smoke test of `cargo xtask drill`: runs the `gateway-kill` scenario through the real
//! `vpnlb-drill` binary (real agent; gateways running wireguard-go, charon and openvpn; WireGuard,
//! IPsec and OpenVPN clients in namespaces `vpnlb-drl-*`) and checks that the report has every
//! field of the JSON interface with sane values, a tunnel recovery per protocol, and that
//! report.json, summary.md and the SVG timeline are written. The binary itself fails when a
//! scenario's expectations do not hold (e.g. a client of a healthy gateway lost a ping).
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), wireguard-go,
//! wireguard-tools, strongSwan (charon, swanctl), openvpn, easy-rsa, iputils-ping and nftables.

use std::process::{Command, Stdio};

use serde_json::Value;

#[test]
#[ignore = "needs root, wireguard-go, strongSwan and openvpn: run cargo xtask test"]
fn drill_gateway_kill_reports_failover_numbers() {
    let out = std::env::temp_dir().join(format!("vpnlb-drill-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let res = Command::new(env!("CARGO_BIN_EXE_vpnlb-drill"))
        .args(["--scenario", "gateway-kill", "--json", "--out"])
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .expect("run vpnlb-drill");
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "vpnlb-drill failed ({}):\n{stdout}",
        res.status
    );
    let report: Value = serde_json::from_str(&stdout).expect("--json prints the report");
    let scenarios = report["scenarios"].as_array().expect("scenarios array");
    assert_eq!(scenarios.len(), 1, "{report:#}");
    let s = &scenarios[0];
    for key in [
        "name",
        "detect_ms",
        "map_write_ms",
        "lb_recovery_ms",
        "tunnel_recovery_ms",
        "healthy_flows_lost_packets",
    ] {
        assert!(s.get(key).is_some(), "field {key} missing: {s:#}");
    }
    assert_eq!(s["name"], "gateway-kill");
    let num = |k: &str| {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("{k} is not a number: {s:#}"))
    };
    let (detect, map, lb) = (num("detect_ms"), num("map_write_ms"), num("lb_recovery_ms"));
    assert!(detect > 0.0 && detect < 5000.0, "detect_ms {detect}");
    // The map write follows the agent's decision; sampling every 10 ms may see it a little late.
    assert!(
        map > 0.0 && map + 50.0 >= detect,
        "map_write_ms {map} vs detect {detect}"
    );
    assert!(lb >= map, "lb_recovery_ms {lb} before the map write {map}");
    // Every protocol's tunnels come back, after the LB moved their sessions (each protocol's own
    // timers: WireGuard ~15 s, IPsec DPD ~4-5 s, OpenVPN ping-restart 5 s).
    let tunnels = s["tunnel_recovery_ms"]
        .as_object()
        .expect("tunnel_recovery_ms map");
    let mut keys: Vec<&str> = tunnels.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ipsec", "openvpn", "wireguard"], "{s:#}");
    let mut moved = 0;
    for (proto, t) in tunnels {
        assert_eq!(t["recovered"], t["clients"], "{proto}: {s:#}");
        let clients = t["clients"].as_u64().expect("clients");
        moved += clients;
        if clients > 0 {
            let (p50, max) = (
                t["p50"].as_f64().expect("p50"),
                t["max"].as_f64().expect("max"),
            );
            assert!(
                lb < p50 && p50 <= max,
                "{proto} tunnel recovery p50 {p50} max {max}, LB {lb}"
            );
        }
    }
    assert!(
        tunnels["wireguard"]["clients"].as_u64() > Some(0),
        "no client moved: {s:#}"
    );
    assert_eq!(s["clients_moved"].as_u64(), Some(moved), "{s:#}");
    // Losses are counted over real pings: some were sent, none of a healthy tunnel lost, for
    // every protocol.
    assert!(s["healthy_flows_sent_packets"].as_u64() > Some(0), "{s:#}");
    assert_eq!(s["healthy_flows_lost_packets"].as_u64(), Some(0), "{s:#}");
    for proto in ["wireguard", "ipsec", "openvpn"] {
        let l = &s["healthy_flows_by_protocol"][proto];
        assert!(l["sent"].as_u64() > Some(0), "{proto}: {s:#}");
        assert_eq!(l["lost"].as_u64(), Some(0), "{proto}: {s:#}");
    }
    // Every daemon is dead: each protocol's probe goes down (after the first one took the gateway
    // down, within a probe interval or two), icmp never does.
    for (proto, check) in [
        ("wireguard", "wireguard:51820"),
        ("ipsec", "ikev2:500"),
        ("openvpn", "udp:1194"),
    ] {
        let c = &s["caught_by_protocol"][proto];
        assert_eq!(c["check"], check, "{s:#}");
        let down = c["down_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{check}: {s:#}"));
        assert!(down >= detect - 50.0, "{check} down at {down} ms: {s:#}");
    }
    let caught = s["caught_by"].as_array().expect("caught_by");
    assert!(!caught.is_empty(), "{s:#}");
    assert!(!caught.contains(&Value::from("icmp")), "{s:#}");
    assert!(
        s["missed_by"]
            .as_array()
            .is_some_and(|m| m.contains(&Value::from("icmp"))),
        "{s:#}"
    );
    assert_eq!(s["ok"], true, "{s:#}");

    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    assert_eq!(on_disk["scenarios"][0]["name"], "gateway-kill");
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("| gateway-kill | yes |"), "{md}");
    let svg = std::fs::read_to_string(out.join("gateway-kill.svg")).expect("timeline plot");
    assert!(
        svg.starts_with("<svg") && svg.contains("gw1") && svg.contains("<polyline"),
        "{svg}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
