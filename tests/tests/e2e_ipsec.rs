//! End to end with real strongSwan: IKEv2 PSK clients behind nftables masquerade NATs (real NAT-T)
//! reach three charon gateways through the real agent (`vpnlb run`, L2 DSR) balancing one IPsec VIP
//! group (UDP 500, UDP 4500 and ESP on one address, `hash = "source"`, `ikev2` health checks).
//! Checks: IKE on 500, then IKE and ESP-in-UDP on 4500 of each client reach one gateway (the
//! session table and the per-backend packet counters of the pinned maps, and the gateways' SAs
//! agree), every CHILD_SA carries pings, every gateway gets a share, and the clients' SAs still
//! point at the VIP at the end (DSR: the gateways answer from the VIP). Then a gateway's charon is
//! killed with -9 and another gateway's link is cut: the agent marks each down, their clients come
//! back on healthy gateways by DPD, the other clients lose no ping. Separately: admin drain
//! (`vpnlb drain`/`undrain`), an IKE_AUTH fragmented at IKE level and one fragmented at IP level
//! completing through the LB, and a client whose NAT gets a new public address keeping its gateway
//! and IKE_SA by the learned SPIs although the source hash of the new address picks another
//! gateway, and path MTU discovery working through the LB (a NAT's "fragmentation needed",
//! addressed to the VIP, reaches the gateway owning the flow). All run the recommended VIP group
//! (`session_ids = "ipsec"`).
//!
//! Needs root, the agent binary and eBPF objects (see tests/src/agent.rs), and the Debian packages
//! strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
//! libstrongswan-extra-plugins nftables iputils-ping.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb_tests::agent::{AgentBed, INTERFACE, wait_for, wait_moved};
use vpnlb_tests::ipsec::{CLIENT_CHARON, IkeSa, IpsecBed, IpsecOpts, backends_ikev2, ipsec_vips};
use vpnlb_tests::testbed::VIP;
use vpnlb_tests::wg::{PingLog, Pinger, assert_no_loss_after, now_epoch};

const PREFIX: &str = "vpnlb-ips";
const GWS: [&str; 3] = ["gw1", "gw2", "gw3"];
/// Clients per NAT site: two sites hold two clients each (they share a public address).
const SITES: [usize; 10] = [2, 2, 1, 1, 1, 1, 1, 1, 1, 1];
const PING_EVERY: Duration = Duration::from_millis(100);
/// The recommended IPsec VIP group learns the gateways' SPIs (docs/config.md).
const SESSION_IDS: &str = "session_ids = \"ipsec\"\n";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The agent with the IPsec VIP group over the three gateways (ikev2 checks, SPI learning), and
/// charon on the gateways and clients behind NATs as `opts` says; waits for
/// the agent to see every gateway up. Returns both.
fn beds(opts: &IpsecOpts) -> (AgentBed, IpsecBed) {
    let t0 = Instant::now();
    let mut bed = AgentBed::up(PREFIX, 3, 0, |t, _| {
        format!(
            "{INTERFACE}{}{}",
            backends_ikev2(t),
            ipsec_vips(&GWS, SESSION_IDS)
        )
    });
    // The topology's UDP echo sinks are not part of these tests.
    bed.topo.sinks.clear();
    let t_agent = t0.elapsed();
    let ips = IpsecBed::up(&bed.topo, PREFIX, opts);
    bed.agent.wait_all_up(&GWS, Duration::from_secs(15));
    println!(
        "setup: agent + topology {:.0} ms; 3 charon gateways + {} NAT sites + {} charon clients {:.0} ms; \
         all gateways up in the agent {:.0} ms later",
        ms(t_agent),
        opts.sites.len(),
        ips.clients.len(),
        ms(ips.setup),
        ms(t0.elapsed() - t_agent - ips.setup)
    );
    (bed, ips)
}

/// `vpnlb inspect sessions --json`: the sessions list.
fn sessions(bed: &AgentBed) -> Vec<Value> {
    let v = bed.agent.cli_json(&["inspect", "sessions"]);
    v["sessions"].as_array().cloned().unwrap_or_default()
}

/// `vpnlb inspect backends --json`: forwarded packets per backend name.
fn backend_packets(bed: &AgentBed) -> BTreeMap<String, u64> {
    let v = bed.agent.cli_json(&["inspect", "backends"]);
    v.as_array()
        .expect("backends array")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["packets"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The gateways among `gws` holding an established SA with each client.
fn on(ips: &IpsecBed, gws: &[usize]) -> Vec<Vec<usize>> {
    ips.placement()
        .iter()
        .map(|p| {
            p.iter()
                .map(|(g, _)| *g)
                .filter(|g| gws.contains(g))
                .collect()
        })
        .collect()
}

/// Waits until every client is on exactly one of `gws` (an established SA with an installed
/// CHILD_SA; a cut-off gateway still holds its stale SAs, so it is left out) and returns that
/// gateway per client.
fn wait_placed(ips: &IpsecBed, gws: &[usize], timeout: Duration) -> Vec<usize> {
    wait_for(timeout, || {
        let p = on(ips, gws);
        p.iter()
            .all(|g| g.len() == 1)
            .then(|| p.iter().map(|g| g[0]).collect())
    })
    .unwrap_or_else(|| {
        panic!(
            "not every client on one of gateways {gws:?}: {:?}",
            on(ips, gws)
        )
    })
}

/// The client's own SA points at the VIP on 4500 (NAT-T), so its traffic goes through the LB.
fn assert_through_vip(ips: &IpsecBed, n: usize) -> IkeSa {
    let sa = ips.clients[n]
        .sa()
        .unwrap_or_else(|| panic!("client {n} has no established SA"));
    assert_eq!(
        sa.remote,
        Some(SocketAddr::from((VIP, 4500))),
        "client {n}'s SA left the VIP: {sa:?}"
    );
    sa
}

/// Stops the pingers and returns their logs.
fn stop_all(pingers: &mut [Pinger]) -> Vec<PingLog> {
    pingers.iter_mut().map(Pinger::stop).collect()
}

/// Kills (`how` = "kill -9") or cuts off one gateway with clients, waits for the agent to mark it
/// down and for its clients to come back on the other live gateways; asserts the other clients lost
/// no ping. Returns the new placement.
fn fail_gateway(
    bed: &AgentBed,
    ips: &mut IpsecBed,
    owner: &[usize],
    live: &[usize],
    dead: usize,
    how: &str,
) -> Vec<usize> {
    let name = GWS[dead];
    let moved: Vec<usize> = (0..owner.len()).filter(|&n| owner[n] == dead).collect();
    let stayed: Vec<usize> = (0..owner.len()).filter(|&n| owner[n] != dead).collect();
    assert!(!moved.is_empty(), "no client on {name}");
    let healthy: Vec<usize> = live.iter().copied().filter(|&g| g != dead).collect();
    let mut pingers = ips.ping_all(PING_EVERY);
    std::thread::sleep(Duration::from_secs(1));
    let t_fail = Instant::now();
    let fail_epoch = now_epoch();
    match how {
        "kill -9" => ips.gws[dead].kill(),
        "link cut" => bed.topo.cut(dead),
        other => panic!("unknown failure {other}"),
    }
    let detect = bed.agent.wait_state(name, "down", Duration::from_secs(5));
    // From now on nothing may reach it, not even by a learned SPI.
    std::thread::sleep(Duration::from_millis(50));
    let sent_dead = backend_packets(bed)[name];
    let back = wait_moved(&moved, t_fail, Duration::from_secs(40), || {
        ips.placement()
            .iter()
            .map(|p| p.iter().find(|(g, _)| healthy.contains(g)).map(|(g, _)| *g))
            .collect()
    });
    // Let the moved tunnels carry a few pings.
    std::thread::sleep(Duration::from_secs(1));
    let logs = stop_all(&mut pingers);
    let window = t_fail.elapsed();
    let late = backend_packets(bed)[name] - sent_dead;
    assert_eq!(
        late, 0,
        "the LB sent {late} packets to {name} after marking it down"
    );
    let not_back: Vec<usize> = moved
        .iter()
        .copied()
        .filter(|n| !back.contains_key(n))
        .collect();
    assert!(
        not_back.is_empty(),
        "{how} {name}: clients {not_back:?} did not come back on a healthy gateway within 40 s; \
         placement {:#?}",
        ips.placement()
    );
    println!(
        "{how} {name}: agent marked it down after {:.0} ms; the LB sent it {late} packets since",
        ms(detect)
    );
    let mut rec = Vec::new();
    for &n in &moved {
        let (g, t) = back[&n];
        let first = logs[n]
            .first_after(fail_epoch + 0.2)
            .unwrap_or_else(|| panic!("client {n}: no ping reply after moving to {}", GWS[g]));
        println!(
            "  moved client {n}: new SA on {} after {:.1} s, first ping reply after {:.1} s",
            GWS[g],
            t.as_secs_f64(),
            first - fail_epoch
        );
        rec.push(t.as_secs_f64());
    }
    let span_total = assert_no_loss_after(&logs, &stayed, owner, fail_epoch);
    rec.sort_by(f64::total_cmp);
    println!(
        "{how} {name}: detection {:.0} ms; {} clients moved, recovery (new SA) min {:.1} s, max {:.1} s; \
         {} clients of healthy gateways lost 0 of {span_total} pings over {:.1} s",
        ms(detect),
        moved.len(),
        rec[0],
        rec[rec.len() - 1],
        stayed.len(),
        window.as_secs_f64()
    );
    let now = wait_placed(ips, &healthy, Duration::from_secs(5));
    for &n in &stayed {
        assert_eq!(now[n], owner[n], "client {n} left its healthy gateway");
    }
    now
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ipsec_nat_t_clients_stay_on_one_gateway_and_fail_over() {
    let t_start = Instant::now();
    let (bed, mut ips) = beds(&IpsecOpts {
        sites: &SITES,
        gw_charon: "",
        gw_conn: "",
        client_charon: CLIENT_CHARON,
        client_conn: "",
    });
    let clients = ips.clients.len();
    let t_conn = Instant::now();
    ips.connect_all();
    println!(
        "all {clients} clients connected (IKE_SA + CHILD_SA through the LB) in {:.0} ms",
        ms(t_conn.elapsed())
    );

    let before = backend_packets(&bed);
    let mut pingers = ips.ping_all(PING_EVERY);
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let logs = stop_all(&mut pingers);
    let after = backend_packets(&bed);
    let placement = ips.placement();
    let table = sessions(&bed);

    // Per client: its gateway's SA names the NAT's public address; the LB's sessions of that
    // address (IKE on 500, NAT-T on 4500) all go to that gateway; the CHILD_SA carried the pings.
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
            "{} holds client {n}'s SA on another address",
            GWS[g]
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
            assert_eq!(
                s["backend"].as_str(),
                Some(GWS[g]),
                "client {n} ({public}): a session on another gateway than {}: {s}",
                GWS[g]
            );
        }
        assert!(
            mine.iter().any(|s| s["vip_port"] == 4500
                && s["client_port"].as_u64() == Some(u64::from(remote.port()))),
            "client {n}: no 4500 session for {remote}: {mine:?}"
        );
        let sa = assert_through_vip(&ips, n);
        let child = &sa.children[0];
        let replies = logs[n].replies.len();
        println!(
            "client {n} via {public}: {} (SA from {remote}), CHILD_SA in {} / out {} packets, {replies} ping replies",
            GWS[g], child.in_packets, child.out_packets
        );
        assert!(
            replies > 0 && child.in_packets > 0 && child.out_packets > 0,
            "client {n}: the CHILD_SA carried no traffic ({replies} replies, {child:?})"
        );
    }

    // Per gateway: the LB forwarded packets to a gateway only if it holds clients, and at least
    // as many as its CHILD_SAs received (the rest is IKE: DPD, NAT-T keepalives).
    let mut share = BTreeMap::new();
    for (g, name) in GWS.iter().enumerate() {
        let mine: Vec<usize> = (0..clients).filter(|&n| owner[n] == g).collect();
        let esp_in: u64 = mine
            .iter()
            .map(|&n| placement[n][0].1.children[0].in_packets)
            .sum();
        let lb = after[*name] - before[*name];
        println!(
            "{name}: {} clients {mine:?}, LB forwarded {lb} packets during the pings, its CHILD_SAs received {esp_in} in total",
            mine.len()
        );
        assert!(!mine.is_empty(), "{name} got no client: not a spread");
        assert!(lb > 0, "{name}: the LB forwarded nothing to it");
        share.insert(*name, mine.len());
    }
    let total_lb: u64 = GWS.iter().map(|g| after[*g]).sum();
    let total_esp: u64 = placement
        .iter()
        .map(|p| p[0].1.children[0].in_packets)
        .sum();
    assert!(
        total_lb >= total_esp,
        "the gateways received {total_esp} ESP packets but the LB forwarded only {total_lb}"
    );
    println!(
        "spread over 3 gateways ({clients} clients, {} NAT addresses): {share:?}",
        SITES.len()
    );

    // Failover 1: charon killed with -9. Failover 2: another gateway's link cut.
    let by_load = |live: &[usize], own: &[usize]| {
        *live
            .iter()
            .max_by_key(|&&g| own.iter().filter(|&&o| o == g).count())
            .expect("a live gateway")
    };
    let dead1 = by_load(&[0, 1, 2], &owner);
    let owner2 = fail_gateway(&bed, &mut ips, &owner, &[0, 1, 2], dead1, "kill -9");
    let live: Vec<usize> = (0..3).filter(|&g| g != dead1).collect();
    let dead2 = by_load(&live, &owner2);
    let end = fail_gateway(&bed, &mut ips, &owner2, &live, dead2, "link cut");
    for (n, g) in end.iter().enumerate() {
        assert_through_vip(&ips, n);
        assert!(*g != dead1 && *g != dead2, "client {n} on a failed gateway");
    }
    println!("whole test {:.1} s", t_start.elapsed().as_secs_f64());
}

/// The backend `vpnlb simulate` picks for a new IKE_SA_INIT from `src` (port 500) right now.
fn simulated_pick(bed: &AgentBed, src: std::net::Ipv4Addr) -> String {
    let v = bed.agent.cli_json(&[
        "simulate",
        "--src",
        &format!("{src}:500"),
        "--dst",
        &format!("{VIP}:500"),
        "--proto",
        "udp",
    ]);
    v["backend"].as_str().unwrap_or("-").to_string()
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ipsec_drain_keeps_sas_and_steers_new_clients_away() {
    let (bed, mut ips) = beds(&IpsecOpts {
        sites: &SITES,
        gw_charon: "",
        gw_conn: "",
        client_charon: CLIENT_CHARON,
        client_conn: "",
    });
    ips.connect_all();
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    let drained = (0..3)
        .max_by_key(|g| owner.iter().filter(|o| *o == g).count())
        .expect("a gateway");
    let name = GWS[drained];
    // Two new NAT sites whose public address the ring gives to the gateway we drain.
    let fresh: Vec<usize> = (SITES.len()..SITES.len() + 40)
        .filter(|&k| simulated_pick(&bed, vpnlb_tests::ipsec::nat_public(k)) == name)
        .take(2)
        .collect();
    assert_eq!(fresh.len(), 2, "no new address hashes to {name}");
    let mine: Vec<usize> = (0..owner.len()).filter(|&n| owner[n] == drained).collect();

    let mut pingers = ips.ping_all(PING_EVERY);
    std::thread::sleep(Duration::from_secs(1));
    let drain_epoch = now_epoch();
    let r = bed.agent.cli_json(&["drain", name]);
    println!("vpnlb drain {name}: {r}");
    bed.agent
        .wait_state(name, "draining", Duration::from_secs(2));
    let before: Vec<u64> = mine
        .iter()
        .map(|&n| ips.placement()[n][0].1.children[0].in_packets)
        .collect();

    // A new client whose address hashed to the drained gateway goes elsewhere.
    let n_new = ips.add_site(&bed.topo, fresh[0], 1)[0];
    let sim = simulated_pick(&bed, ips.public(n_new));
    ips.connect(n_new)
        .unwrap_or_else(|e| panic!("new client: {e}"));
    let placed = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(5));
    println!(
        "new client {n_new} via {} (hashed to {name} before the drain): on {}, simulate says {sim}",
        ips.public(n_new),
        GWS[placed[n_new]]
    );
    assert_ne!(
        placed[n_new], drained,
        "a new client landed on drained {name}"
    );
    assert_eq!(sim, GWS[placed[n_new]]);
    std::thread::sleep(Duration::from_secs(2));
    let logs = stop_all(&mut pingers);

    // The drained gateway's SAs kept working: no ping lost, more ESP received, same gateway.
    let now = ips.placement();
    for (i, &n) in mine.iter().enumerate() {
        let (lost, span) = logs[n].lost_after(drain_epoch);
        let esp = now[n][0].1.children[0].in_packets;
        println!(
            "client {n} on drained {name}: {lost} of {span} pings lost, CHILD_SA in {} -> {esp}",
            before[i]
        );
        assert_eq!(placed[n], drained, "client {n} left drained {name}");
        assert!(span > 0 && lost == 0, "client {n}: {lost} of {span} lost");
        assert!(
            esp > before[i],
            "client {n}: no ESP reached {name} while draining"
        );
    }

    // Undrained: a new client whose address hashes to it lands there again.
    let r = bed.agent.cli_json(&["undrain", name]);
    println!("vpnlb undrain {name}: {r}");
    bed.agent.wait_state(name, "up", Duration::from_secs(2));
    let n_back = ips.add_site(&bed.topo, fresh[1], 1)[0];
    ips.connect(n_back)
        .unwrap_or_else(|e| panic!("client after undrain: {e}"));
    let placed = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(5));
    println!(
        "after undrain: new client {n_back} via {} on {}",
        ips.public(n_back),
        GWS[placed[n_back]]
    );
    assert_eq!(
        placed[n_back], drained,
        "undrained {name} got no new client"
    );
    for n in 0..ips.clients.len() {
        assert_through_vip(&ips, n);
    }
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ike_fragmentation_completes_through_the_lb() {
    // IKE fragments of at most 200 bytes (IP datagram) both ways: the PSK IKE_AUTH (~290 bytes)
    // is split into several UDP datagrams on 4500.
    let frag = "  fragment_size = 200";
    let client_charon = format!("{CLIENT_CHARON}\n{frag}");
    let (bed, ips) = beds(&IpsecOpts {
        sites: &[1, 1],
        gw_charon: frag,
        gw_conn: "    fragmentation = yes",
        client_charon: &client_charon,
        client_conn: "    fragmentation = yes",
    });
    ips.connect_all();
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    let mut pingers = ips.ping_all(PING_EVERY);
    std::thread::sleep(Duration::from_secs(1));
    let logs = stop_all(&mut pingers);
    let table = sessions(&bed);
    for (n, c) in ips.clients.iter().enumerate() {
        let g = owner[n];
        let split: Vec<String> = c
            .charon
            .log()
            .lines()
            .filter(|l| l.contains("splitting IKE message"))
            .map(str::to_string)
            .collect();
        let gw_log = ips.gws[g].log();
        let id = format!("client{n}.vpnlb.test");
        let reassembled = |log: &str| {
            log.lines()
                .filter(|l| l.contains("reassembled fragmented IKE message"))
                .count()
        };
        let (at_gw, at_client) = (reassembled(&gw_log), reassembled(&c.charon.log()));
        println!(
            "client {n} on {}: {split:?}; {} reassembled {at_gw} fragmented messages, the client {at_client}; \
             {} ping replies",
            GWS[g],
            GWS[g],
            logs[n].replies.len()
        );
        assert!(!split.is_empty(), "client {n} sent no IKE fragments");
        assert!(at_gw > 0, "{} reassembled no fragmented message", GWS[g]);
        assert!(at_client > 0, "client {n} got no fragmented answer");
        assert!(gw_log.contains(&id), "{} never saw {id}", GWS[g]);
        assert!(
            !logs[n].replies.is_empty(),
            "client {n}: no ping through the tunnel"
        );
        let public = ips.public(n).to_string();
        for s in table
            .iter()
            .filter(|s| s["client"].as_str() == Some(&public))
        {
            assert_eq!(s["backend"].as_str(), Some(GWS[g]), "{s}");
        }
        assert_through_vip(&ips, n);
    }
    // No fragment went astray: the other gateways never heard of these clients.
    for (g, gw) in ips.gws.iter().enumerate() {
        let log = gw.log();
        for n in (0..ips.clients.len()).filter(|&n| owner[n] != g) {
            assert!(
                !log.contains(&format!("client{n}.vpnlb.test")),
                "{} saw client {n}'s IKE",
                GWS[g]
            );
        }
    }
}

/// `vpnlb inspect stats --json`: data-plane counter `name`.
fn counter(bed: &AgentBed, name: &str) -> u64 {
    bed.agent.cli_json(&["inspect", "stats"])["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ipsec_client_keeps_its_gateway_when_its_nat_is_renumbered() {
    let (bed, mut ips) = beds(&IpsecOpts {
        sites: &[1, 1, 1],
        gw_charon: "",
        gw_conn: "",
        client_charon: CLIENT_CHARON,
        client_conn: "",
    });
    ips.connect_all();
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    let (g, n) = (owner[0], 0);
    let first = ips.placement()[n][0].1.clone();
    let old = ips.public(n);
    // A new public address that the source hash gives to another gateway: only the learned SPI
    // can keep the client where its SAs are.
    let new = (120..250)
        .map(|i| std::net::Ipv4Addr::new(10, 77, 0, i))
        .find(|a| simulated_pick(&bed, *a) != GWS[g])
        .expect("an address hashing elsewhere");
    let hashed = simulated_pick(&bed, new);
    let used0 = counter(&bed, "session_id_used");

    let mut pingers = ips.ping_all(PING_EVERY);
    std::thread::sleep(Duration::from_secs(1));
    let epoch = now_epoch();
    let t0 = Instant::now();
    ips.nats[ips.clients[n].site].renumber(new);
    let moved = wait_for(Duration::from_secs(10), || {
        let p = ips.placement();
        p[n].iter()
            .find(|(_, sa)| sa.remote.map(|r| r.ip()) == Some(new.into()))
            .map(|(gw, sa)| (*gw, sa.clone(), t0.elapsed()))
    });
    std::thread::sleep(Duration::from_secs(2));
    let logs = stop_all(&mut pingers);
    let (gw, sa, t) = moved.unwrap_or_else(|| {
        panic!(
            "no gateway saw client {n} from {new}: {:#?}\n{}",
            ips.placement()[n],
            ips.gws[g].log()
        )
    });
    let (lost, span) = logs[n].lost_after(epoch);
    let back = logs[n]
        .first_after(epoch)
        .map_or(f64::NAN, |r| (r - epoch) * 1e3);
    println!(
        "client {n}: NAT {old} -> {new} (the hash would pick {hashed}); {} follows it to {} after {:.0} ms, \
         IKE_SA #{} -> #{}; first ping reply after {back:.0} ms, {lost} of {span} pings lost \
         (the gateway answers the old address until the client's DPD updates the NAT mapping)",
        GWS[gw],
        sa.remote.expect("remote"),
        ms(t),
        first.id,
        sa.id
    );
    assert_eq!(gw, g, "client {n} moved from {} to {}", GWS[g], GWS[gw]);
    assert_eq!(sa.id, first.id, "client {n} built a new IKE_SA");
    assert_eq!(
        ips.placement()[n].len(),
        1,
        "client {n} on several gateways"
    );
    for (o, gw) in ips.gws.iter().enumerate().filter(|(o, _)| *o != g) {
        assert!(
            !gw.log().contains(&new.to_string()),
            "{} got packets from {new}",
            GWS[o]
        );
    }
    assert!(
        logs[n].replies_after(epoch + t.as_secs_f64()) > 0,
        "client {n}: no ping through the tunnel after the change"
    );
    let table = sessions(&bed);
    let mine: Vec<&Value> = table
        .iter()
        .filter(|s| s["client"].as_str() == Some(&new.to_string()))
        .collect();
    assert!(!mine.is_empty(), "no session from {new}");
    for s in &mine {
        assert_eq!(s["backend"].as_str(), Some(GWS[g]), "{s}");
    }
    let used = counter(&bed, "session_id_used") - used0;
    println!("session_id_used +{used}; sessions from {new}: {mine:?}");
    assert!(used > 0, "no packet was steered by a learned id");
    assert_through_vip(&ips, n);
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn ike_auth_in_ip_fragments_follows_its_first_fragment() {
    // No IKE fragmentation and 300-byte client links: the client's kernel fragments the ~316-byte
    // IKE_AUTH datagram on 4500, its NAT reassembles, translates and fragments it again to the
    // same sizes; the LB sees a first fragment (with the UDP header) and a later one without
    // ports. The gateways' answers (at most ~276 bytes) fit.
    let (bed, ips) = beds(&IpsecOpts {
        sites: &[1, 1],
        gw_charon: "",
        gw_conn: "",
        client_charon: CLIENT_CHARON,
        client_conn: "    fragmentation = no",
    });
    for c in &ips.clients {
        c.ns.sh("ip link set eth0 mtu 300");
    }
    let before: Vec<u64> = ["frag_record", "frag_hit", "frag_miss"]
        .iter()
        .map(|c| counter(&bed, c))
        .collect();
    ips.connect_all();
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    let mut pingers = ips.ping_all(PING_EVERY);
    std::thread::sleep(Duration::from_secs(1));
    let logs = stop_all(&mut pingers);
    let after: Vec<u64> = ["frag_record", "frag_hit", "frag_miss"]
        .iter()
        .map(|c| counter(&bed, c))
        .collect();
    let (record, hit, miss) = (
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
    );
    println!("LB fragment counters: frag_record +{record}, frag_hit +{hit}, frag_miss +{miss}");
    for (n, c) in ips.clients.iter().enumerate() {
        let g = owner[n];
        let public = ips.public(n);
        // The gateway got the whole IKE_AUTH (reassembled from the fragments the LB forwarded).
        let whole = ips.gws[g]
            .log()
            .lines()
            .filter(|l| {
                l.contains(&format!("received packet: from {public}["))
                    && l.contains(&format!("to {VIP}[4500]"))
            })
            .map(str::to_string)
            .next();
        let sent = c
            .charon
            .log()
            .lines()
            .find(|l| l.contains("sending packet") && l.contains("[4500]"))
            .map(str::to_string);
        println!(
            "client {n} via {public} on {}: sent {sent:?}; gateway got {whole:?}; {} ping replies",
            GWS[g],
            logs[n].replies.len()
        );
        assert!(
            whole.is_some(),
            "{} never got client {n}'s IKE_AUTH",
            GWS[g]
        );
        assert!(
            !logs[n].replies.is_empty(),
            "client {n}: no ping through the tunnel"
        );
        for (o, gw) in ips.gws.iter().enumerate().filter(|(o, _)| *o != g) {
            assert!(
                !gw.log().contains(&format!("client{n}.vpnlb.test")),
                "{} saw client {n}'s IKE",
                GWS[o]
            );
        }
        assert_through_vip(&ips, n);
    }
    assert!(
        record >= 2 && hit >= 2,
        "the LB recorded {record} first fragments and followed {hit} later ones"
    );
}

#[test]
#[ignore = "needs root and strongswan: run cargo xtask test"]
fn pmtu_discovery_through_the_lb() {
    // The NATs' LANs take 576-byte packets (clients fragment their big pings). A big ping's reply leaves the gateway as one
    // ESP-in-UDP datagram with DF; the NAT cannot forward it and sends "fragmentation needed"
    // to its source, the VIP. Only if the LB hands that ICMP to the gateway owning the quoted
    // flow does the gateway learn the path MTU and fragment the next replies.
    let (bed, ips) = beds(&IpsecOpts {
        sites: &[1, 1],
        gw_charon: "",
        gw_conn: "",
        client_charon: CLIENT_CHARON,
        client_conn: "",
    });
    for c in &ips.clients {
        c.ns.sh("ip link set eth0 mtu 576");
    }
    for s in &ips.nats {
        s.ns.sh("for p in /sys/class/net/lan/brif/*; do ip link set ${p##*/} mtu 576; done");
    }
    ips.connect_all();
    let owner = wait_placed(&ips, &[0, 1, 2], Duration::from_secs(10));
    let before = counter(&bed, "icmp_pmtu_session");
    for (n, c) in ips.clients.iter().enumerate() {
        let g = owner[n];
        let public = ips.public(n);
        let out = c.ns.sh(&format!(
            "ping -n -c 10 -i 0.2 -W 1 -s 1200 {} | grep -c 'bytes from' || true",
            vpnlb_tests::wg::client_target(n)
        ));
        let replies: u32 = out.trim().parse().unwrap_or(0);
        let route = bed.topo.gws[g].sh(&format!("ip route get {public} from {VIP}"));
        println!(
            "client {n} via {public} on {}: {replies} of 10 big pings answered; {}'s route: {}",
            GWS[g],
            GWS[g],
            route.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        assert!(
            route.contains("mtu 576"),
            "{} did not learn the path MTU: {route}",
            GWS[g]
        );
        assert!(replies > 0, "client {n}: no big ping answered");
        for (o, gw) in bed.topo.gws.iter().enumerate().filter(|(o, _)| *o != g) {
            let r = gw.sh(&format!("ip route get {public} from {VIP}"));
            assert!(
                !r.contains("mtu 576"),
                "{} got client {n}'s ICMP: {r}",
                GWS[o]
            );
        }
        assert_through_vip(&ips, n);
    }
    let pmtu = counter(&bed, "icmp_pmtu_session") - before;
    println!("LB: icmp_pmtu_session +{pmtu}");
    assert!(
        pmtu >= 2,
        "the LB forwarded {pmtu} fragmentation-needed messages by session"
    );
}
