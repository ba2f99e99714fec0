//! Real packets through the real `vpnlb_ingress` attached in native XDP mode to a veth in a network
//! namespace: UDP flows from a client namespace reach DSR gateways that answer from the VIP. Asserts
//! which gateway got each flow (against the userspace prediction from the same hash and Maglev table),
//! stickiness, drain and failover, and the counters; and that the probe sends again what the network
//! drops (nftables on the switch). Root only.

use std::net::SocketAddr;
use std::time::Duration;

use vpnlb::dataplane::maps::MapReader;
use vpnlb_common::hash::pick_hash;
use vpnlb_common::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, FWD_L2DSR_TX, FlowKey, PROTO_UDP, SESSION_INSERT,
};
use vpnlb_tests::testbed::{Flows, RING_SIZE, Testbed, VIP, VIP_PORT};

/// Deadline of a probe round: a flow without an answer gets its datagram again until then (a
/// round ends as soon as every flow has answered).
const WAIT: Duration = Duration::from_secs(5);

/// The gateway name the data plane must choose for a new flow from `local`, by the shared hash and
/// the installed Maglev table.
fn predicted(tb: &Testbed, local: SocketAddr) -> String {
    let key = FlowKey::new(local.ip(), VIP.into(), local.port(), VIP_PORT, PROTO_UDP);
    let ring = tb
        .dp
        .installed_ring(tb.vip.ring_id)
        .expect("ring installed");
    let id = ring[(pick_hash(&key, tb.vip.flags) % RING_SIZE) as usize];
    format!("gw{id}")
}

fn locals(f: &Flows) -> Vec<SocketAddr> {
    f.sockets.iter().map(|s| s.local_addr().unwrap()).collect()
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn flows_follow_maglev_stick_drain_and_fail_over() {
    let mut tb = Testbed::up("vpnlb-t-l2", 3, 8);
    let flows = tb.flows(3);
    let n = flows.sockets.len();
    // Answered (flow, round) pairs: each is at least one datagram forwarded.
    let mut answered = 0u64;

    // Every flow is answered by the gateway the userspace prediction names.
    let first = flows.probe(1, WAIT);
    answered += n as u64;
    let sent_first = flows.sent();
    let want: Vec<String> = locals(&flows)
        .into_iter()
        .map(|l| predicted(&tb, l))
        .collect();
    for (i, (got, want)) in first.iter().zip(&want).enumerate() {
        assert_eq!(
            got.as_deref(),
            Some(want.as_str()),
            "flow {i} ({:?})",
            flows.sockets[i].local_addr()
        );
    }
    for g in ["gw1", "gw2", "gw3"] {
        assert!(
            first.iter().any(|o| o.as_deref() == Some(g)),
            "{g} got no flow of {n}: {first:?}"
        );
    }
    // Each gateway's sink saw exactly the clients assigned to it.
    for (gi, sink) in tb.sinks.iter().enumerate() {
        let seen = sink.seen.lock().unwrap();
        let expect: Vec<SocketAddr> = locals(&flows)
            .into_iter()
            .zip(&want)
            .filter(|(_, w)| **w == format!("gw{}", gi + 1))
            .map(|(l, _)| l)
            .collect();
        assert_eq!(
            seen.len(),
            expect.len(),
            "gw{} saw {:?}",
            gi + 1,
            seen.keys()
        );
        // Once, or more if a datagram was sent again (its first answer was lost or late).
        for l in expect {
            let i = locals(&flows).iter().position(|x| *x == l).unwrap();
            let c = seen.get(&l).copied().unwrap_or(0);
            assert!(
                (1..=u64::from(sent_first[i])).contains(&c),
                "gw{} saw {l} {c} times, {} sent",
                gi + 1,
                sent_first[i]
            );
        }
    }
    let c = tb.dp.writer().counters().unwrap();
    assert_eq!(c[SESSION_INSERT as usize], n as u64, "one session per flow");

    // Sticky over rounds.
    for round in 2..=3 {
        assert_eq!(flows.probe(round, WAIT), first, "round {round} moved flows");
        answered += n as u64;
    }

    // Drain gw3: its existing flows stay, brand-new flows avoid it.
    tb.dp.set_backend_state(3, BACKEND_DRAINING).unwrap();
    assert_eq!(flows.probe(4, WAIT), first, "drain moved existing sessions");
    answered += n as u64;
    let fresh = tb.flows_on_ports(100, 3);
    let fresh_owners = fresh.probe(5, WAIT);
    answered += fresh.sockets.len() as u64;
    assert!(
        fresh_owners
            .iter()
            .all(|o| o.is_some() && o.as_deref() != Some("gw3")),
        "new flows during drain: {fresh_owners:?}"
    );
    tb.dp.set_backend_state(3, BACKEND_UP).unwrap();

    // gw2 dies: once marked down, its flows move to healthy gateways and no other flow moves.
    tb.cut(1);
    tb.dp.set_backend_state(2, BACKEND_DOWN).unwrap();
    let after = flows.probe(6, WAIT);
    answered += n as u64;
    for (i, (before, now)) in first.iter().zip(&after).enumerate() {
        if before.as_deref() == Some("gw2") {
            assert!(
                matches!(now.as_deref(), Some("gw1") | Some("gw3")),
                "flow {i} of dead gw2 went to {now:?}"
            );
        } else {
            assert_eq!(now, before, "flow {i} on a healthy gateway moved");
        }
    }
    let c = tb.dp.writer().counters().unwrap();
    // Every datagram to the VIP forwarded by XDP_TX exactly once: equal to what was sent unless a
    // datagram was sent again, then between the answers and the datagrams sent.
    let sent = flows.sent_total() + fresh.sent_total();
    let tx = c[FWD_L2DSR_TX as usize];
    assert!(
        (answered..=sent).contains(&tx),
        "fwd_l2dsr_tx {tx}: {answered} answers, {sent} datagrams sent"
    );
    let moved = first.iter().filter(|o| o.as_deref() == Some("gw2")).count() as u64;
    assert_eq!(
        c[vpnlb_common::SESSION_REPICK_DOWN as usize],
        moved,
        "one re-pick per flow of the dead gateway"
    );
}

/// The probe over a lossy path: nftables on the switch (bridge family, so neither end sees it)
/// drops the first datagram of every flow (a set of the flows seen so far), so every flow is
/// answered only because the probe sends again; each is answered by the gateway the prediction
/// names, and the next round (nothing dropped) agrees.
#[test]
#[ignore = "needs root, nftables and the eBPF object: run cargo xtask test"]
fn probes_resend_the_datagrams_the_network_drops() {
    let tb = Testbed::up("vpnlb-t-loss", 3, 4);
    tb.sw.sh(&format!(
        "nft -f - <<'EOF'
table bridge vpnlb_lossy {{
  set seen {{ type ipv4_addr . inet_service; flags dynamic; }}
  chain drop_first {{
    type filter hook forward priority 0; policy accept;
    ip daddr {VIP} udp dport {VIP_PORT} ip saddr . udp sport @seen accept
    ip daddr {VIP} udp dport {VIP_PORT} add @seen {{ ip saddr . udp sport }} counter drop
  }}
}}
EOF"
    ));
    let flows = tb.flows(3);
    let n = flows.sockets.len();
    let got = flows.probe(1, WAIT);
    let sent = flows.sent();
    let chain = tb.sw.sh("nft list chain bridge vpnlb_lossy drop_first");
    let dropped = chain
        .lines()
        .find(|l| l.contains("counter"))
        .unwrap_or_default()
        .trim()
        .to_string();
    println!("{n} flows, datagrams sent per flow {sent:?}; switch: {dropped}");
    let want: Vec<Option<String>> = locals(&flows)
        .into_iter()
        .map(|l| Some(predicted(&tb, l)))
        .collect();
    assert_eq!(got, want, "owners over the lossy path");
    assert!(
        sent.iter().all(|&c| c >= 2),
        "every flow lost its first datagram and was sent again: {sent:?}"
    );
    assert!(
        dropped.contains(&format!("counter packets {n} ")),
        "the switch dropped one datagram per flow: {chain}"
    );
    assert_eq!(flows.probe(2, WAIT), want, "the next round");
}
