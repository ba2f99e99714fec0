//! The real agent (`vpnlb run`, a separate process) in the LB namespace of the bridged testbed:
//! it attaches `vpnlb_ingress` natively to the LB's eth0 through a pinned link, health-checks the
//! gateways (icmp, tcp, http, udp against servers in the gateway namespaces) and programs the maps.
//! Real UDP flows from the client namespace reach the DSR gateways, which answer with their name.
//! Asserts balancing, failure detection and recovery, drain/disable over the control socket,
//! reloads (broken and valid, SIGHUP and `reload`), a kill -9 and restart under load with zero
//! loss, hooks, and active-standby pools, and prints measured times. Root only: the binary comes
//! from $VPNLB_BIN and the object from $VPNLB_EBPF_OBJ (`cargo xtask test` exports both).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb::agent::control::Request;
use vpnlb_tests::agent::{
    AgentBed, FALL, GwServers, Histogram, INTERFACE, INTERVAL_MS, RISE, TIMEOUT_MS, WebhookSink,
    active_pool, backend, backend_in, json_stream, metric, subset, tally, vip, wait_for,
};
use vpnlb_tests::testbed::{Flows, VIP, VIP_PORT, gw_addr};

/// Deadline of a probe round: a flow without an answer gets its datagram again until then (a
/// round ends as soon as every flow has answered, so a passing run never waits this long).
const WAIT: Duration = Duration::from_secs(5);
const GWS: [&str; 3] = ["gw1", "gw2", "gw3"];
/// Time for every backend's first check results.
const STARTUP: Duration = Duration::from_secs(10);

/// Longest time a dead gateway may take to be declared down: the next probe may start up to one
/// interval after the death, then `fall` failures of one interval each (the last one reported at
/// its timeout), plus a margin for a loaded 2-core machine running a debug build.
fn detection_bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS + 1000)
}

/// Likewise for `rise` successes.
fn rise_bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * (RISE + 1) + 1500)
}

fn idx_of(owners: &[Option<String>], gw: &str) -> Vec<usize> {
    owners
        .iter()
        .enumerate()
        .filter(|(_, o)| o.as_deref() == Some(gw))
        .map(|(i, _)| i)
        .collect()
}

fn all_answered(owners: &[Option<String>], what: &str) {
    assert!(
        owners.iter().all(Option::is_some),
        "{what}: unanswered flows: {:?}",
        tally(owners)
    );
}

fn map_writes(bed: &AgentBed) -> Histogram {
    Histogram::parse(&bed.agent.metrics_text(), "vpnlb_map_write_seconds")
}

/// Probes the flows of a dead gateway every ~20 ms and polls `status` until both the backend is
/// reported down and one of those flows is answered by another gateway. Returns (detection,
/// first re-routed answer), both from `t_kill`.
fn measure_failover(
    bed: &AgentBed,
    dead: &str,
    flows: &Flows,
    t_kill: Instant,
    round0: u32,
) -> (Duration, Duration) {
    let (mut detect, mut reroute) = (None, None);
    let mut round = round0;
    while detect.is_none() || reroute.is_none() {
        assert!(
            t_kill.elapsed() < Duration::from_secs(10),
            "{dead}: detection {detect:?}, re-route {reroute:?} after 10 s"
        );
        if detect.is_none() && bed.agent.state(dead).as_deref() == Some("down") {
            detect = Some(t_kill.elapsed());
        }
        if reroute.is_none() {
            round += 1;
            let got = flows.probe(round, Duration::from_millis(20));
            if got.iter().any(|o| o.as_deref().is_some_and(|g| g != dead)) {
                reroute = Some(t_kill.elapsed());
            }
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    (detect.unwrap(), reroute.unwrap())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 1. Three gateways with different checks (gw1: icmp + tcp, MAC written out; gw2: http, gw3: udp,
///    MACs resolved by the agent); every flow answered, every gateway used, sticky, sinks saw
///    exactly their flows, and the data-plane counters on the metrics endpoint match what was sent.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn agent_balances_flows_over_healthy_gateways() {
    let bed = AgentBed::up("vpnlb-ag1", 3, 8, |t, _| {
        format!(
            "{INTERFACE}{}{}{}{}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["icmp", "tcp"]),
            backend(1, None, 1, &["http"]),
            backend(2, None, 1, &["udp"]),
            vip(&[("all", 100, &GWS)])
        )
    });
    let t0 = Instant::now();
    bed.agent.wait_all_up(&GWS, STARTUP);
    println!(
        "agent startup (spawn -> control socket) {:.0} ms; all backends up {:.0} ms later",
        ms(bed.agent.startup[0]),
        ms(t0.elapsed())
    );
    let st = bed.agent.status();
    let labels = |n: &str| -> Vec<String> {
        backend_in(&st, n).unwrap()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["check"].as_str().unwrap().to_string())
            .collect()
    };
    println!(
        "checks: gw1 {:?}, gw2 {:?}, gw3 {:?}",
        labels("gw1"),
        labels("gw2"),
        labels("gw3")
    );
    assert_eq!(labels("gw1").len(), 2, "gw1: icmp + tcp, MAC configured");
    assert_eq!(labels("gw2").len(), 2, "gw2: http + neighbour resolution");
    assert_eq!(labels("gw3").len(), 2, "gw3: udp + neighbour resolution");
    assert_eq!(active_pool(&st, "wg").as_deref(), Some("all"));

    let shares = bed.agent.ring_shares();
    println!("ring slots per backend id: {shares:?}");
    assert_eq!(shares.len(), 3, "three members in the ring: {shares:?}");
    for (id, n) in &shares {
        let f = *n as f64 / 65537.0;
        assert!((f - 1.0 / 3.0).abs() < 0.02, "backend {id}: share {f:.3}");
    }
    let flows = bed.topo.flows(3);
    let n = flows.sockets.len() as u64;
    let first = flows.probe(1, WAIT);
    all_answered(&first, "first round");
    println!("share of {n} flows: {:?}", tally(&first));
    for g in GWS {
        assert!(
            first.iter().any(|o| o.as_deref() == Some(g)),
            "{g} got no flow: {first:?}"
        );
    }
    for round in 2..=3 {
        assert_eq!(flows.probe(round, WAIT), first, "round {round} moved flows");
    }
    // Three answers per flow; a datagram lost on the way was sent again (then counts below lie
    // between what the sinks saw and what was sent; with nothing resent, they are exact).
    let per_flow = flows.sent();
    let sent = flows.sent_total();
    println!("{sent} datagrams sent for {} answers", 3 * n);
    // Each sink saw exactly its flows, each at least once per round and at most as often as sent.
    let locals: Vec<SocketAddr> = flows
        .sockets
        .iter()
        .map(|s| s.local_addr().unwrap())
        .collect();
    let mut seen_by = BTreeMap::new();
    for (gi, sink) in bed.topo.sinks.iter().enumerate() {
        let seen = sink.seen.lock().unwrap();
        let mine = idx_of(&first, GWS[gi]);
        assert_eq!(seen.len(), mine.len(), "{} saw {:?}", GWS[gi], seen);
        for i in mine {
            let l = locals[i];
            let c = seen.get(&l).copied().unwrap_or(0);
            assert!(
                (3..=u64::from(per_flow[i])).contains(&c),
                "{} saw {l} {c} times: 3 rounds answered, {} datagrams sent",
                GWS[gi],
                per_flow[i]
            );
        }
        seen_by.insert(GWS[gi], seen.values().sum::<u64>());
    }
    let seen_total: u64 = seen_by.values().sum();
    let text = bed.agent.metrics_text();
    let tx = metric(&text, "vpnlb_datapath_total{counter=\"fwd_l2dsr_tx\"}").unwrap_or(-1.0);
    assert!(
        (seen_total as f64..=sent as f64).contains(&tx),
        "fwd_l2dsr_tx {tx}: the sinks saw {seen_total}, {sent} datagrams sent"
    );
    assert_eq!(
        metric(&text, "vpnlb_vip_packets_total{vip=\"wg\"}"),
        Some(tx),
        "every datagram to the VIP forwarded"
    );
    for g in GWS {
        let mine = idx_of(&first, g);
        let sent_g: u64 = mine.iter().map(|&i| u64::from(per_flow[i])).sum();
        let pkts = metric(
            &text,
            &format!("vpnlb_backend_packets_total{{backend=\"{g}\"}}"),
        )
        .unwrap_or(-1.0);
        assert!(
            (seen_by[g] as f64..=sent_g as f64).contains(&pkts),
            "packets to {g}: {pkts}, its sink saw {}, {sent_g} sent to its flows",
            seen_by[g]
        );
        assert_eq!(
            metric(
                &text,
                &format!("vpnlb_backend_state{{backend=\"{g}\",state=\"up\"}}")
            ),
            Some(1.0)
        );
    }
    let h = Histogram::parse(&text, "vpnlb_map_write_seconds");
    println!(
        "map writes since start (event -> maps written): {}",
        h.describe()
    );
}

/// 2. gw2 dies (servers stopped, cable cut): it is declared down within fall x interval + margin,
///    its flows are answered by gw1/gw3, flows of gw1/gw3 stay. It comes back: up after rise,
///    existing flows stay where they are, new flows reach it again.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn agent_detects_a_dead_gateway_and_recovers() {
    let mut bed = AgentBed::up("vpnlb-ag2", 3, 8, |t, _| {
        format!(
            "{INTERFACE}{}{}{}{}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["icmp", "tcp"]),
            backend(1, None, 1, &["icmp", "http"]),
            backend(2, Some(t.gws[2].mac("eth0")), 1, &["icmp", "udp"]),
            vip(&[("all", 100, &GWS)])
        )
    });
    bed.agent.wait_all_up(&GWS, STARTUP);
    let flows = bed.topo.flows(4);
    let first = flows.probe(1, WAIT);
    all_answered(&first, "before");
    let on_gw2 = idx_of(&first, "gw2");
    assert!(!on_gw2.is_empty(), "gw2 got no flow: {:?}", tally(&first));
    let gw2_flows = subset(&flows, &on_gw2);
    let writes_before = map_writes(&bed);

    bed.servers[1].stop();
    let t_kill = Instant::now();
    bed.topo.cut(1);
    let (detect, reroute) = measure_failover(&bed, "gw2", &gw2_flows, t_kill, 100);
    let writes = map_writes(&bed).since(&writes_before);
    println!(
        "gw2 killed: status down after {:.0} ms, first re-routed answer after {:.0} ms (checks every {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms, fall {FALL}); map writes for it: {}",
        ms(detect),
        ms(reroute),
        writes.describe()
    );
    assert!(
        detect <= detection_bound(),
        "detection {detect:?} > {:?}",
        detection_bound()
    );
    assert!(reroute <= detection_bound() + Duration::from_millis(200));
    let st = bed.agent.status();
    let reason = backend_in(&st, "gw2").unwrap()["checks"].to_string();
    println!("gw2 checks when down: {reason}");

    let after = flows.probe(1000, WAIT);
    all_answered(&after, "after gw2 died");
    for (i, (b, a)) in first.iter().zip(&after).enumerate() {
        if b.as_deref() == Some("gw2") {
            assert!(
                matches!(a.as_deref(), Some("gw1") | Some("gw3")),
                "flow {i} of gw2 went to {a:?}"
            );
        } else {
            assert_eq!(a, b, "flow {i} of a healthy gateway moved");
        }
    }

    // Back: cable mended, servers restarted.
    bed.servers[1] = GwServers::start(&bed.topo.gws[1], gw_addr(1));
    let t_back = Instant::now();
    bed.topo.mend(1);
    bed.agent.wait_state("gw2", "up", rise_bound());
    println!(
        "gw2 back: up after {:.0} ms (rise {RISE} x {INTERVAL_MS} ms)",
        ms(t_back.elapsed())
    );
    let sticky = flows.probe(1001, WAIT);
    assert_eq!(sticky, after, "existing flows moved when gw2 came back");
    let fresh = bed.topo.flows_on_ports(100, 4);
    let owners = fresh.probe(1002, WAIT);
    all_answered(&owners, "new flows after recovery");
    println!("new flows after recovery: {:?}", tally(&owners));
    assert!(
        owners.iter().any(|o| o.as_deref() == Some("gw2")),
        "no new flow reached the recovered gw2: {:?}",
        tally(&owners)
    );
}

/// 3. Drain over the control socket: gw3's sessions stay on gw3, new flows avoid it; undrain
///    restores it for new flows. Disable: its flows move, the others' stay.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn drain_undrain_disable_enable_over_the_control_socket() {
    let mut bed = AgentBed::up("vpnlb-ag3", 3, 8, |t, _| {
        format!(
            "{INTERFACE}{}{}{}{}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["icmp"]),
            backend(1, Some(t.gws[1].mac("eth0")), 1, &["tcp"]),
            backend(2, None, 1, &["icmp"]),
            vip(&[("all", 100, &GWS)])
        )
    });
    bed.agent.wait_all_up(&GWS, STARTUP);
    let flows = bed.topo.flows(3);
    let first = flows.probe(1, WAIT);
    all_answered(&first, "before");
    assert!(!idx_of(&first, "gw3").is_empty(), "{:?}", tally(&first));

    let r = bed.agent.request(Request::Drain {
        backend: "gw3".into(),
    });
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result["state"], "draining");
    assert_eq!(r.result["changed"], true);
    assert_eq!(bed.agent.state("gw3").as_deref(), Some("draining"));
    assert_eq!(
        backend_in(&bed.agent.status(), "gw3").unwrap()["admin"],
        "drain"
    );
    assert_eq!(flows.probe(2, WAIT), first, "drain moved existing sessions");
    let during = bed.topo.flows_on_ports(100, 5);
    let owners = during.probe(3, WAIT);
    all_answered(&owners, "new flows while gw3 drains");
    assert!(
        !owners.iter().any(|o| o.as_deref() == Some("gw3")),
        "a new flow went to draining gw3: {:?}",
        tally(&owners)
    );
    // Draining survives check results: still draining after a few intervals.
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    assert_eq!(bed.agent.state("gw3").as_deref(), Some("draining"));
    assert_eq!(flows.probe(4, WAIT), first);

    let r = bed.agent.request(Request::Undrain {
        backend: "gw3".into(),
    });
    assert!(r.ok && r.result["state"] == "up", "{r:?}");
    let later = bed.topo.flows_on_ports(200, 5);
    let owners = later.probe(5, WAIT);
    all_answered(&owners, "new flows after undrain");
    assert!(
        owners.iter().any(|o| o.as_deref() == Some("gw3")),
        "no new flow reached undrained gw3: {:?}",
        tally(&owners)
    );
    assert_eq!(flows.probe(6, WAIT), first);

    // Unknown backend: an error, nothing changes.
    let r = bed.agent.request(Request::Drain {
        backend: "gw9".into(),
    });
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("gw9"),
        "{r:?}"
    );

    // Disable: gw3's sessions move to gw1/gw2, the others stay.
    let r = bed.agent.request(Request::Disable {
        backend: "gw3".into(),
    });
    assert!(r.ok && r.result["state"] == "disabled", "{r:?}");
    let moved = flows.probe(7, WAIT);
    all_answered(&moved, "after disable");
    for (i, (b, a)) in first.iter().zip(&moved).enumerate() {
        if b.as_deref() == Some("gw3") {
            assert!(
                matches!(a.as_deref(), Some("gw1") | Some("gw2")),
                "flow {i} of disabled gw3 went to {a:?}"
            );
        } else {
            assert_eq!(a, b, "flow {i} moved");
        }
    }
    let r = bed.agent.request(Request::Enable {
        backend: "gw3".into(),
    });
    assert!(r.ok && r.result["state"] == "up", "{r:?}");
    let text = bed.agent.metrics_text();
    assert_eq!(
        metric(&text, "vpnlb_backend_state{backend=\"gw3\",state=\"up\"}"),
        Some(1.0)
    );
    assert!(
        metric(&text, "vpnlb_backend_transitions_total{backend=\"gw3\"}").unwrap_or(0.0) >= 5.0,
        "unknown->up, drain, undrain, disable, enable"
    );

    // Admin state survives an agent restart (kill -9): drained gw3 keeps its sessions and gets no
    // new flows, disabled gw2 stays out of service.
    let now = flows.probe(8, WAIT);
    all_answered(&now, "before drain + disable");
    for (cmd, gw) in [("drain", "gw3"), ("disable", "gw2")] {
        let req = if cmd == "drain" {
            Request::Drain { backend: gw.into() }
        } else {
            Request::Disable { backend: gw.into() }
        };
        assert!(bed.agent.request(req).ok);
    }
    let before = flows.probe(9, WAIT);
    all_answered(&before, "drained + disabled");
    assert!(idx_of(&before, "gw2").is_empty());
    bed.agent.kill9();
    bed.agent.restart();
    let st = bed.agent.status();
    println!(
        "after kill -9 + restart: gw2 {} ({}), gw3 {} ({})",
        backend_in(&st, "gw2").unwrap()["state"],
        backend_in(&st, "gw2").unwrap()["admin"],
        backend_in(&st, "gw3").unwrap()["state"],
        backend_in(&st, "gw3").unwrap()["admin"]
    );
    assert_eq!(
        flows.probe(10, WAIT),
        before,
        "flows moved across the restart"
    );
    // Give the restarted agent's checks time to conclude: admin still wins.
    std::thread::sleep(Duration::from_millis(4 * INTERVAL_MS));
    let st = bed.agent.status();
    assert_eq!(
        backend_in(&st, "gw3").unwrap()["state"],
        "draining",
        "{st:#}"
    );
    assert_eq!(
        backend_in(&st, "gw2").unwrap()["state"],
        "disabled",
        "{st:#}"
    );
    assert_eq!(
        flows.probe(11, WAIT),
        before,
        "flows moved after the restart"
    );
    let owners = bed.topo.flows_on_ports(300, 5).probe(12, WAIT);
    all_answered(&owners, "new flows after the restart");
    assert!(
        owners.iter().all(|o| o.as_deref() == Some("gw1")),
        "new flows with gw2 disabled and gw3 draining: {:?}",
        tally(&owners)
    );
}

/// What the agent logs when a reload (SIGHUP or `reload`) is rejected: "reload rejected; the
/// running config stays" with the error as a quoted field (its own quotes escaped).
const REJECTED: &str = "reload rejected";

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
        + 1
}

/// Backends and their states (and admin, weight, transitions) in a status.
fn summary(st: &Value) -> Vec<String> {
    st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {} {} w{} t{}",
                b["name"], b["state"], b["admin"], b["weight"], b["transitions"]
            )
        })
        .collect()
}

/// 4. Reloads: a syntax error and an unknown pool member (SIGHUP and `reload`) are rejected with
///    file and line, the agent keeps serving the old config; valid edits (remove a backend by
///    SIGHUP, add it back and change weights by `reload`) apply and move no other flow.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn reloads_reject_broken_configs_and_apply_valid_edits() {
    let body = |weights: [u32; 3], with_gw3: bool, extra_member: &str| -> String {
        let mut members: Vec<&str> = vec!["gw1", "gw2"];
        if with_gw3 {
            members.push("gw3");
        }
        if !extra_member.is_empty() {
            members.push(extra_member);
        }
        let mut s = format!(
            "{INTERFACE}{}{}",
            backend(0, None, weights[0], &["icmp"]),
            backend(1, None, weights[1], &["icmp"])
        );
        if with_gw3 {
            s.push_str(&backend(2, None, weights[2], &["icmp"]));
        }
        s + &vip(&[("all", 100, &members)])
    };
    let mut bed = AgentBed::up("vpnlb-ag4", 3, 8, |_, _| body([1, 1, 1], true, ""));
    bed.agent.wait_all_up(&GWS, STARTUP);
    let flows = bed.topo.flows(4);
    let first = flows.probe(1, WAIT);
    all_answered(&first, "before");
    let good = bed.agent.config_text();
    let before = summary(&bed.agent.status());
    let cfg = bed.agent.config.display().to_string();

    // (a) TOML syntax error, by SIGHUP and by `reload`.
    let broken = format!("{good}[[vip.pool]\nname = \"extra\"\n");
    let line = good.lines().count() + 1;
    bed.agent.write_raw(&broken);
    let n = count(&bed.agent.log(), REJECTED);
    bed.agent.sighup();
    wait_for(Duration::from_secs(5), || {
        (count(&bed.agent.log(), REJECTED) > n).then_some(())
    })
    .unwrap_or_else(|| panic!("no rejection logged:\n{}", bed.agent.log()));
    let log = bed.agent.log();
    let err_line = log
        .lines()
        .rfind(|l| l.contains(REJECTED))
        .unwrap()
        .to_string();
    println!("syntax error, SIGHUP: {err_line}");
    assert!(
        err_line.contains(&format!("{cfg}:{line}")),
        "no {cfg}:{line} in {err_line}"
    );
    let r = bed.agent.request(Request::Reload {});
    assert!(!r.ok, "{r:?}");
    let e = r.error.unwrap();
    println!("syntax error, reload: {e}");
    assert!(e.contains(&format!("{cfg}:{line}")), "{e}");
    assert_eq!(summary(&bed.agent.status()), before, "status changed");
    assert_eq!(
        flows.probe(2, WAIT),
        first,
        "traffic after a rejected reload"
    );

    // (b) A pool member that is no backend.
    let unknown = bed.agent.write_config(&body([1, 1, 1], true, "gw9"));
    let line = line_of(&unknown, "\"gw9\"");
    let n = count(&bed.agent.log(), REJECTED);
    bed.agent.sighup();
    wait_for(Duration::from_secs(5), || {
        (count(&bed.agent.log(), REJECTED) > n).then_some(())
    })
    .unwrap_or_else(|| panic!("no rejection logged:\n{}", bed.agent.log()));
    let log = bed.agent.log();
    let err_line = log
        .lines()
        .rfind(|l| l.contains(REJECTED))
        .unwrap()
        .to_string();
    println!("unknown backend, SIGHUP: {err_line}");
    assert!(
        err_line.contains(&format!("{cfg}:{line}"))
            && err_line.contains("unknown backend")
            && err_line.contains("gw9"),
        "{err_line}"
    );
    let r = bed.agent.request(Request::Reload {});
    assert!(
        !r.ok
            && r.error
                .as_deref()
                .unwrap_or("")
                .contains(&format!("{cfg}:{line}"))
            && r.error.as_deref().unwrap_or("").contains("gw9"),
        "{r:?}"
    );
    assert_eq!(summary(&bed.agent.status()), before, "status changed");
    assert_eq!(
        flows.probe(3, WAIT),
        first,
        "traffic after a rejected reload"
    );
    assert!(bed.agent.running());

    // (c) Valid, by SIGHUP: gw3 removed. Its flows move, no other flow does.
    bed.agent.write_config(&body([1, 1, 1], false, ""));
    let n = count(&bed.agent.log(), "config reloaded");
    let t = Instant::now();
    bed.agent.sighup();
    wait_for(Duration::from_secs(5), || {
        (count(&bed.agent.log(), "config reloaded") > n).then_some(())
    })
    .unwrap_or_else(|| panic!("SIGHUP reload not applied:\n{}", bed.agent.log()));
    println!(
        "SIGHUP reload (gw3 removed) applied within {:.0} ms",
        ms(t.elapsed())
    );
    let st = bed.agent.status();
    assert!(backend_in(&st, "gw3").is_none(), "{st:#}");
    assert_eq!(st["backends"].as_array().unwrap().len(), 2);
    let after = flows.probe(4, WAIT);
    all_answered(&after, "after removing gw3");
    for (i, (b, a)) in first.iter().zip(&after).enumerate() {
        if b.as_deref() == Some("gw3") {
            assert!(
                matches!(a.as_deref(), Some("gw1") | Some("gw2")),
                "flow {i} of removed gw3 went to {a:?}"
            );
        } else {
            assert_eq!(a, b, "flow {i} of an untouched backend moved");
        }
    }

    // (d) Valid, by `reload`: gw3 back with weight 2, gw1's weight 3.
    bed.agent.write_config(&body([3, 1, 2], true, ""));
    let t = Instant::now();
    let r = bed.agent.request(Request::Reload {});
    println!(
        "control reload (gw3 added, weights 3/1/2) answered in {:.1} ms: {r:?}",
        ms(t.elapsed())
    );
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result["restarted_checks"], serde_json::json!(["gw3"]));
    bed.agent.wait_state("gw3", "up", STARTUP);
    let st = bed.agent.status();
    assert_eq!(backend_in(&st, "gw1").unwrap()["weight"], 3, "{st:#}");
    assert_eq!(backend_in(&st, "gw3").unwrap()["weight"], 2, "{st:#}");
    assert_eq!(backend_in(&st, "gw2").unwrap()["state"], "up");
    assert_eq!(
        flows.probe(5, WAIT),
        after,
        "existing flows moved on reload"
    );
    let fresh = bed.topo.flows_on_ports(100, 6);
    let owners = fresh.probe(6, WAIT);
    all_answered(&owners, "new flows after reload");
    println!("new flows with weights 3/1/2: {:?}", tally(&owners));
    assert!(owners.iter().any(|o| o.as_deref() == Some("gw3")));
    // The ring holds the members in proportion to their weights (Maglev: within a few percent).
    let shares = bed.agent.ring_shares();
    let id = |n: &str| backend_in(&st, n).unwrap()["id"].as_u64().unwrap() as u32;
    let total: usize = shares.values().sum();
    let share = |n: &str| shares.get(&id(n)).copied().unwrap_or(0) as f64 / total as f64;
    println!(
        "ring shares after reload: gw1 {:.3}, gw2 {:.3}, gw3 {:.3} (weights 3/1/2: 0.500/0.167/0.333)",
        share("gw1"),
        share("gw2"),
        share("gw3")
    );
    for (n, want) in [("gw1", 3.0 / 6.0), ("gw2", 1.0 / 6.0), ("gw3", 2.0 / 6.0)] {
        assert!(
            (share(n) - want).abs() < 0.02,
            "{n}: ring share {:.3}, weight share {want:.3}: {shares:?}",
            share(n)
        );
    }

    // (e) Valid, by `reload`: only gw1's check timing changes (interval 200 -> 1000 ms). The new
    //     check's first probe may be up to an interval away; until it concludes gw1 must keep
    //     serving (its MAC kept too), or its sessions are re-picked.
    let all_now = flows.probe(7, WAIT);
    let text = bed.agent.config_text();
    let old_timing = format!("interval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\n");
    let at = text.find(&old_timing).expect("gw1's check timing");
    assert!(text[..at].contains("name = \"gw1\"") && !text[..at].contains("name = \"gw2\""));
    let edited = format!(
        "{}interval_ms = 1000\ntimeout_ms = 500\n{}",
        &text[..at],
        &text[at + old_timing.len()..]
    );
    bed.agent.write_raw(&edited);
    let r = bed.agent.request(Request::Reload {});
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result["restarted_checks"], serde_json::json!(["gw1"]));
    let right_after = bed.agent.state("gw1");
    let probed = flows.probe(8, WAIT);
    std::thread::sleep(Duration::from_millis(1500));
    let st = bed.agent.status();
    println!(
        "gw1 check edited: state right after the reload {right_after:?}, 1.5 s later {}; flows {:?} -> {:?}",
        backend_in(&st, "gw1").unwrap()["state"],
        tally(&all_now),
        tally(&probed)
    );
    assert_eq!(
        right_after.as_deref(),
        Some("up"),
        "gw1 left service on a check edit"
    );
    assert_eq!(probed, all_now, "a check edit of gw1 moved flows");
    assert_eq!(backend_in(&st, "gw1").unwrap()["state"], "up");
    assert_eq!(flows.probe(9, WAIT), all_now);
}

/// 5. kill -9 under load: a steady 2,000 pps over 20 flows while the agent is killed, left dead
///    for 1 s, and restarted: no datagram lost, no flow moved, the new agent adopted the pinned
///    sessions. A second `vpnlb run` with the same config refuses and disturbs nothing.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn kill9_and_restart_under_load_loses_nothing() {
    let mut bed = AgentBed::up("vpnlb-ag5", 3, 4, |t, _| {
        format!(
            "{INTERFACE}{}{}{}{}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["icmp"]),
            backend(1, None, 1, &["icmp", "tcp"]),
            backend(2, None, 1, &["udp"]),
            vip(&[("all", 100, &GWS)])
        )
    });
    bed.agent.wait_all_up(&GWS, STARTUP);
    let flows = bed.topo.flows(5);
    let n = flows.sockets.len();
    assert_eq!(n, 20);
    let locals: Vec<SocketAddr> = flows
        .sockets
        .iter()
        .map(|s| s.local_addr().unwrap())
        .collect();
    let first_pid = bed.agent.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sockets = flows.sockets;
    // 20 flows x 100 datagrams/s = 2,000 pps, paced by absolute deadlines.
    let sender = std::thread::spawn(move || {
        let mut sent = vec![0u64; sockets.len()];
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
        }
        let tick = Duration::from_millis(10);
        let mut next = Instant::now();
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            for (i, s) in sockets.iter().enumerate() {
                let msg = format!("flow {i} seq {}", sent[i]);
                s.send_to(msg.as_bytes(), (VIP, VIP_PORT)).expect("send");
                sent[i] += 1;
                while s.recv_from(&mut buf).is_ok() {}
            }
            next += tick;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(1));
    bed.agent.kill9();
    let t_kill = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    bed.agent.restart();
    println!(
        "killed -9, dead for 1 s, restarted: control socket answered {:.0} ms after spawn ({:.0} ms after the kill)",
        ms(bed.agent.startup[1]),
        ms(t_kill.elapsed())
    );
    assert_ne!(bed.agent.pid(), first_pid);
    let log = bed.agent.log_of_last_run();
    let adopted = log
        .lines()
        .find(|l| l.contains("pinned state adopted"))
        .unwrap_or_else(|| panic!("no adoption line in:\n{log}"))
        .to_string();
    println!("restarted agent: {adopted}");
    let sessions: u64 = adopted
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sessions="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sessions= in {adopted}"));
    assert!(
        sessions >= n as u64,
        "adopted {sessions} sessions, {n} flows"
    );
    for g in GWS {
        assert_eq!(
            bed.agent.state(g).as_deref(),
            Some("up"),
            "{g} after restart"
        );
    }

    // A second agent on the same config must refuse without touching the running one.
    let pid = bed.agent.pid();
    let (st, out) = bed.agent.run_duplicate(Duration::from_secs(15));
    println!(
        "duplicate `vpnlb run`: {st:?}: {}",
        out.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
    );
    assert!(
        st.is_some_and(|s| !s.success()),
        "a second agent on the same config did not refuse (status {st:?}):\n{out}"
    );
    assert!(
        out.contains("control socket") || out.contains("another agent"),
        "refusal does not say why:\n{out}"
    );
    assert!(bed.agent.running(), "the running agent died");
    assert_eq!(
        bed.agent.status()["agent"]["pid"].as_u64(),
        Some(pid as u64)
    );
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let total: u64 = sent.iter().sum();
    let mut lost = 0u64;
    let mut per_gw: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, l) in locals.iter().enumerate() {
        let counts: Vec<(usize, u64)> = bed
            .topo
            .sinks
            .iter()
            .enumerate()
            .filter_map(|(g, s)| s.seen.lock().unwrap().get(l).map(|c| (g, *c)))
            .collect();
        assert_eq!(
            counts.len(),
            1,
            "flow {i} ({l}) reached several gateways: {counts:?}"
        );
        *per_gw.entry(GWS[counts[0].0]).or_default() += 1;
        lost += sent[i] - counts[0].1.min(sent[i]);
        assert_eq!(
            counts[0].1, sent[i],
            "flow {i} ({l}) on {}: sent {}, received {}",
            GWS[counts[0].0], sent[i], counts[0].1
        );
    }
    println!(
        "{total} datagrams in {n} flows ({per_gw:?}) across kill -9 + restart + duplicate start: {lost} lost, no flow moved"
    );
}

/// 6. Hooks: exec (`cat >> FILE`) and a webhook both get a backend_state event when a gateway
///    goes down, and a failover event when the primary pool's only member dies.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn hooks_report_state_changes_and_failovers() {
    let mut webhook = None;
    let mut events_file = None;
    let bed = AgentBed::up("vpnlb-ag6", 3, 2, |t, scratch| {
        let w = WebhookSink::start(&t.lb);
        let file = scratch.dir.join("events.json");
        let hooks = format!(
            "[hooks]\nexec = [\"sh\", \"-c\", \"cat >> {}\"]\nwebhook = \"http://{}/vpnlb/events\"\ntimeout_ms = 2000\n",
            file.display(),
            w.addr
        );
        webhook = Some(w);
        events_file = Some(file);
        format!(
            "{INTERFACE}{}{}{}{}{hooks}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["icmp"]),
            backend(1, None, 1, &["icmp"]),
            backend(2, None, 1, &["icmp"]),
            vip(&[("primary", 100, &["gw1"]), ("standby", 50, &["gw2", "gw3"])])
        )
    });
    let (webhook, file) = (webhook.unwrap(), events_file.unwrap());
    bed.agent.wait_all_up(&GWS, STARTUP);
    assert_eq!(
        active_pool(&bed.agent.status(), "wg").as_deref(),
        Some("primary")
    );
    let both = || -> [Vec<Value>; 2] { [json_stream(&file), webhook.events()] };
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> [Value; 2] {
        let got = wait_for(Duration::from_secs(5), || {
            let [a, b] = both();
            let x = a.iter().rfind(|v| pred(v))?.clone();
            let y = b.iter().rfind(|v| pred(v))?.clone();
            Some([x, y])
        });
        got.unwrap_or_else(|| {
            let [a, b] = both();
            panic!("no {what} event: exec got {a:#?}\nwebhook got {b:#?}")
        })
    };

    // A standby member dies: a backend_state event, no failover. The event of this transition is
    // the one from "up": each backend may also have had an "unknown -> down" at startup (its
    // neighbour check failing before ARP resolved it), and hooks run concurrently, so on a busy
    // machine that one can still be the last to arrive.
    bed.topo.cut(2);
    bed.agent.wait_state("gw3", "down", detection_bound());
    let [a, b] = find(
        &|v| {
            v["event"] == "backend_state"
                && v["backend"] == "gw3"
                && v["from"] == "up"
                && v["to"] == "down"
        },
        "gw3 up -> down",
    );
    println!("exec hook got: {a}");
    for v in [&a, &b] {
        assert!(
            v["reason"].as_str().unwrap().contains("icmp"),
            "reason: {}",
            v["reason"]
        );
        assert!(
            v["summary"]
                .as_str()
                .unwrap()
                .contains("backend gw3 up -> down")
        );
        assert!(v["at_wall"].as_f64().is_some() && v["backend_id"].as_u64().is_some());
        assert!(v["checks"].as_array().is_some_and(|c| !c.is_empty()));
    }
    assert_eq!(a, b, "exec and webhook got different events");
    let failovers = |vs: &[Value]| {
        vs.iter()
            .filter(|v| v["event"] == "failover" && v["from_pool"] == "primary")
            .count()
    };
    let [x, y] = both();
    assert_eq!(
        (failovers(&x), failovers(&y)),
        (0, 0),
        "failover without a reason"
    );

    // The primary pool's only member dies: failover to standby.
    let t_kill = Instant::now();
    bed.topo.cut(0);
    let [a, b] = find(
        &|v| v["event"] == "failover" && v["from_pool"] == "primary",
        "failover",
    );
    println!(
        "failover hook event {:.0} ms after the kill: {a}",
        ms(t_kill.elapsed())
    );
    for v in [&a, &b] {
        assert_eq!(v["vip"], "wg");
        assert_eq!(v["to_pool"], "standby");
        assert!(v["class"].is_null());
        assert!(
            v["summary"]
                .as_str()
                .unwrap()
                .contains("now served by pool standby (was primary)")
        );
    }
    find(
        &|v| {
            v["event"] == "backend_state"
                && v["backend"] == "gw1"
                && v["from"] == "up"
                && v["to"] == "down"
        },
        "gw1 up -> down",
    );
    assert_eq!(
        active_pool(&bed.agent.status(), "wg").as_deref(),
        Some("standby")
    );
    let [x, _] = both();
    let seen: Vec<String> = x
        .iter()
        .map(|v| match v["event"].as_str() {
            Some("failover") => format!("failover {} -> {}", v["from_pool"], v["to_pool"]),
            _ => format!("{} {} -> {}", v["backend"], v["from"], v["to"]),
        })
        .collect();
    println!("all events (exec hook): {seen:?}");
    let text = bed.agent.metrics_text();
    assert_eq!(
        metric(&text, "vpnlb_hooks_total{result=\"failed\"}"),
        Some(0.0)
    );
    assert!(metric(&text, "vpnlb_hooks_total{result=\"ok\"}").unwrap_or(0.0) >= 4.0);
    assert_eq!(
        metric(
            &text,
            "vpnlb_active_pool{vip=\"wg\",class=\"\",pool=\"standby\"}"
        ),
        Some(1.0)
    );
}

/// 7. Active-standby with packets: primary {gw1}, standby {gw2, gw3}. gw1 dies: flows go to the
///    standby pool (both members); gw1 returns: new flows go to gw1 again, sessions on the
///    standby members stay there.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn pool_failover_and_failback_with_packets() {
    let mut bed = AgentBed::up("vpnlb-ag7", 3, 8, |t, _| {
        format!(
            "{INTERFACE}{}{}{}{}",
            backend(0, None, 1, &["icmp", "http"]),
            backend(1, Some(t.gws[1].mac("eth0")), 1, &["icmp"]),
            backend(2, None, 1, &["tcp"]),
            vip(&[("primary", 100, &["gw1"]), ("standby", 50, &["gw2", "gw3"])])
        )
    });
    bed.agent.wait_all_up(&GWS, STARTUP);
    let flows = bed.topo.flows(3);
    let first = flows.probe(1, WAIT);
    all_answered(&first, "before");
    assert_eq!(
        idx_of(&first, "gw1").len(),
        first.len(),
        "{:?}",
        tally(&first)
    );

    let writes_before = map_writes(&bed);
    bed.servers[0].stop();
    let t_kill = Instant::now();
    bed.topo.cut(0);
    let (detect, reroute) = measure_failover(&bed, "gw1", &flows, t_kill, 100);
    let writes = map_writes(&bed).since(&writes_before);
    println!(
        "primary gw1 killed: down after {:.0} ms, first answer from the standby pool after {:.0} ms; map writes: {}",
        ms(detect),
        ms(reroute),
        writes.describe()
    );
    assert!(detect <= detection_bound(), "{detect:?}");
    let st = bed.agent.status();
    assert_eq!(active_pool(&st, "wg").as_deref(), Some("standby"));
    let failed_over = flows.probe(1000, WAIT);
    all_answered(&failed_over, "after failover");
    println!("flows on the standby pool: {:?}", tally(&failed_over));
    assert!(!idx_of(&failed_over, "gw2").is_empty() && !idx_of(&failed_over, "gw3").is_empty());

    bed.servers[0] = GwServers::start(&bed.topo.gws[0], gw_addr(0));
    let t_back = Instant::now();
    bed.topo.mend(0);
    bed.agent.wait_state("gw1", "up", rise_bound());
    println!("gw1 back: up after {:.0} ms", ms(t_back.elapsed()));
    assert_eq!(
        active_pool(&bed.agent.status(), "wg").as_deref(),
        Some("primary")
    );
    let fresh = bed.topo.flows_on_ports(100, 3);
    let owners = fresh.probe(1001, WAIT);
    all_answered(&owners, "new flows after failback");
    assert_eq!(
        idx_of(&owners, "gw1").len(),
        owners.len(),
        "new flows after failback: {:?}",
        tally(&owners)
    );
    assert_eq!(
        flows.probe(1002, WAIT),
        failed_over,
        "sessions on the standby pool moved on failback"
    );
}

/// The agent with a BFD check (50 ms x 3) against a real FRR bfdd: every kill -9 of the peer turns
/// the backend down in the pinned BACKENDS map within detection time plus margin, and it comes
/// back up when bfdd restarts.
#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn bfd_against_frr_marks_a_dead_gateway_down_in_the_map() {
    let (p, lat) = vpnlb_tests::agent::bfd_detect_to_map("vpnlb-agbfd", 93, 3);
    eprintln!("agent bfd kill -9 -> map down: {lat:?} (p50 {:?})", p.p50);
    for l in &lat {
        // Detection is 3 x 50 ms after the last packet; the rest is margin for a loaded machine.
        assert!(*l < std::time::Duration::from_millis(500), "{lat:?}");
    }
}
