//! `cargo xtask demo`: real WireGuard behind the real agent. `vpnlb run` in a load-balancer
//! namespace attaches the XDP program natively to its veth and health-checks three gateway
//! namespaces (ICMP + TCP every 200 ms). Each gateway runs `wireguard-go` with the same server key
//! (any gateway accepts any client) and the VIP on `lo` (L2 DSR: it answers straight from the VIP).
//! Several WireGuard clients ping through their tunnels; then a gateway dies: the agent detects it
//! and rewrites the maps, the dead gateway's clients re-handshake (WireGuard retries after ~15 s
//! without replies) and land on healthy gateways, the other clients notice nothing.
//!
//! Needs root, `VPNLB_BIN` (set by xtask) and the Debian packages wireguard-go, wireguard-tools and
//! iputils-ping. `--keep` leaves everything running (gw2 restarted) until Ctrl-C.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vpnlb_tests::agent::{
    AgentBed, FALL, INTERFACE, INTERVAL_MS, RISE, TCP_PORT, TIMEOUT_MS, backend_in, wait_for,
};
use vpnlb_tests::netns::fmt_mac;
use vpnlb_tests::testbed::{VIP, VIP_PORT, gw_addr};
use vpnlb_tests::wg::{WgBed, now_epoch};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const CLIENTS: usize = 9;
const DEAD: usize = 1;

fn config(macs: &[[u8; 6]]) -> String {
    let mut s = String::from(INTERFACE);
    for (i, mac) in macs.iter().enumerate() {
        s.push_str(&format!(
            "[[backend]]\nname = \"gw{n}\"\naddress = \"{a}\"\nmac = \"{m}\"\n\
             [[backend.check]]\ntype = \"icmp\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\
             [[backend.check]]\ntype = \"tcp\"\nport = {TCP_PORT}\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\n",
            n = i + 1,
            a = gw_addr(i),
            m = fmt_mac(mac),
        ));
    }
    s.push_str(&format!(
        "[[vip]]\nname = \"wireguard\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"udp\"\nforwarding = \"l2dsr\"\n\
         [[vip.pool]]\nname = \"all\"\nbackends = [\"gw1\", \"gw2\", \"gw3\"]\n"
    ));
    s
}

/// Ring slots per gateway name, from the pinned maps.
fn ring(bed: &AgentBed) -> String {
    let st = bed.agent.status();
    let names: BTreeMap<u64, String> = st["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| Some((b["id"].as_u64()?, b["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let shares = bed.agent.ring_shares();
    let mut out: Vec<String> = Vec::new();
    for n in 1..=3 {
        let name = format!("gw{n}");
        let slots = names
            .iter()
            .find(|(_, v)| **v == name)
            .and_then(|(id, _)| shares.get(&(*id as u32)))
            .copied()
            .unwrap_or(0);
        out.push(format!("{name} {slots}"));
    }
    out.join(", ")
}

fn share(owner: &[Option<usize>]) -> String {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for o in owner {
        let k = o.map_or("nowhere".to_string(), |g| format!("gw{}", g + 1));
        *m.entry(k).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let t0 = Instant::now();
    let step = |msg: &str| println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());

    step(&format!(
        "bringing up namespaces vpnlb-demo-*: switch, client ({CLIENTS} addresses), LB, 3 gateways (VIP on lo, DSR)"
    ));
    let mut bed = AgentBed::up("vpnlb-demo", 3, CLIENTS, |t, _| {
        let macs: Vec<[u8; 6]> = t.gws.iter().map(|g| g.mac("eth0")).collect();
        config(&macs)
    });
    // The topology's UDP echo sinks hold VIP:51820: wireguard-go takes the port.
    bed.topo.sinks.clear();
    step(&format!(
        "agent `vpnlb run` (pid {}) in vpnlb-demo-lb: vpnlb_ingress attached natively to eth0; VIP {VIP}:{VIP_PORT}/udp, L2 DSR; checks icmp+tcp every {INTERVAL_MS} ms, fall {FALL}",
        bed.agent.pid()
    ));
    bed.agent
        .wait_all_up(&["gw1", "gw2", "gw3"], Duration::from_secs(15));
    step(&format!(
        "all three gateways up; Maglev ring slots: {}",
        ring(&bed)
    ));

    let mut wg = WgBed::up(&bed.topo, "vdg", "vdc");
    step(&format!(
        "wireguard-go on 3 gateways (one server key {}…, port {VIP_PORT}) and {CLIENTS} client tunnels (endpoint {VIP}:{VIP_PORT}) in {:.0} ms",
        &wg.server.public[..8],
        wg.setup.as_secs_f64() * 1e3
    ));
    let mut pingers = wg.ping_all(Duration::from_millis(100));
    let all = [0usize, 1, 2];
    let placed = wait_for(Duration::from_secs(10), || {
        let p = wg.placement(&all);
        p.iter().all(|g| g.len() == 1).then_some(p)
    });
    let Some(placed) = placed else {
        eprintln!(
            "demo: not every client completed a handshake: {:?}",
            wg.placement(&all)
        );
        std::process::exit(1);
    };
    step("every client completed its handshake; pinging through each tunnel every 100 ms");
    let owner: Vec<Option<usize>> = placed.iter().map(|g| g.first().map(|x| x.0)).collect();
    println!("         client tunnel      underlay (gw sees)   -> gateway   (client's endpoint)");
    let mut dsr_ok = true;
    for (n, c) in wg.clients.iter().enumerate() {
        let seen = placed[n].first().and_then(|x| x.1.endpoint);
        let ep = wg.client_peer(n).and_then(|p| p.endpoint);
        dsr_ok &=
            seen == Some(c.underlay()) && ep == Some(std::net::SocketAddr::from((VIP, VIP_PORT)));
        println!(
            "         {:<6} {:<11} {:<20} -> gw{}       ({})",
            c.ifname,
            c.tunnel_addr.to_string(),
            seen.map_or("?".into(), |s| s.to_string()),
            owner[n].map_or(0, |g| g + 1),
            ep.map_or("?".into(), |s| s.to_string())
        );
    }
    println!("         share: {}", share(&owner));
    std::thread::sleep(Duration::from_secs(2));
    let again: Vec<Option<usize>> = wg
        .placement(&all)
        .iter()
        .map(|g| (g.len() == 1).then(|| g[0].0))
        .collect();
    let sticky = again == owner;
    step(&format!(
        "2 s of traffic later every client is still on its gateway: {sticky}"
    ));

    let moved: Vec<usize> = (0..CLIENTS).filter(|&n| owner[n] == Some(DEAD)).collect();
    let stayed: Vec<usize> = (0..CLIENTS).filter(|&n| owner[n] != Some(DEAD)).collect();
    step(&format!(
        "gateway gw{} dies: wireguard-go (pid {}) killed, cable cut, services stopped ({} clients on it)",
        DEAD + 1,
        wg.gws[DEAD].pid().unwrap_or(0),
        moved.len()
    ));
    let kill_epoch = now_epoch();
    let t_kill = Instant::now();
    wg.kill_gateway(DEAD);
    bed.servers[DEAD].stop();
    bed.topo.cut(DEAD);
    let name = format!("gw{}", DEAD + 1);
    let detect = bed.agent.wait_state(&name, "down", Duration::from_secs(5));
    let st = bed.agent.status();
    let checks = backend_in(&st, &name)
        .and_then(|b| b["checks"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c["check"].as_str().unwrap_or("?"),
                c["last_detail"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    step(&format!(
        "agent marked {name} down after {:.0} ms ({checks})",
        detect.as_secs_f64() * 1e3
    ));
    step(&format!(
        "maps rewritten: Maglev ring slots now {}",
        ring(&bed)
    ));
    step(
        "its clients' packets now go to healthy gateways, which do not know their session: \
         WireGuard re-handshakes after ~15 s without replies",
    );

    let healthy: Vec<usize> = all.iter().copied().filter(|&g| g != DEAD).collect();
    let mut back: BTreeMap<usize, (usize, Duration)> = BTreeMap::new();
    let deadline = t_kill + Duration::from_secs(25);
    let mut last_note = Instant::now();
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
                let t = t_kill.elapsed();
                back.insert(n, (*g, t));
                step(&format!(
                    "client {} re-handshook on gw{} ({:.1} s after the failure)",
                    wg.clients[n].ifname,
                    g + 1,
                    t.as_secs_f64()
                ));
            }
        }
        if last_note.elapsed() > Duration::from_secs(3) && back.len() < moved.len() {
            last_note = Instant::now();
            step(&format!(
                "waiting: {} of {} clients of {name} back",
                back.len(),
                moved.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let logs: Vec<_> = pingers.iter_mut().map(|p| p.stop()).collect();
    let mut lost_stayed = 0;
    let mut sent_stayed = 0;
    for &n in &stayed {
        let (l, s) = logs[n].lost_after(kill_epoch);
        lost_stayed += l;
        sent_stayed += s;
    }
    let end = wg.placement(&healthy);
    let undisturbed = stayed
        .iter()
        .filter(|&&n| {
            logs[n].lost_after(kill_epoch).0 == 0
                && end[n].iter().map(|x| x.0).collect::<Vec<_>>() == vec![owner[n].unwrap_or(9)]
        })
        .count();
    let moved_ok = moved.iter().all(|n| {
        back.get(n).is_some_and(|(g, _)| {
            end[*n].iter().map(|x| x.0).collect::<Vec<_>>() == vec![*g]
                && logs[*n].first_after(kill_epoch + 0.2).is_some()
        })
    });
    let vip_kept = (0..CLIENTS).all(|n| {
        wg.client_peer(n).and_then(|p| p.endpoint)
            == Some(std::net::SocketAddr::from((VIP, VIP_PORT)))
    });
    let now_owner: Vec<Option<usize>> =
        end.iter().map(|g| (g.len() == 1).then(|| g[0].0)).collect();
    println!("         share now: {}", share(&now_owner));
    let times: Vec<String> = moved
        .iter()
        .filter_map(|n| back.get(n).map(|(_, t)| format!("{:.1}", t.as_secs_f64())))
        .collect();
    let metrics = bed.agent.metrics_text();
    let show = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("vpnlb_datapath_total{{counter=\"{name}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?")
            .to_string()
    };
    step(&format!(
        "agent metrics: fwd_l2dsr_tx={} session_insert={} session_hit={} session_repick_down={}",
        show("fwd_l2dsr_tx"),
        show("session_insert"),
        show("session_hit"),
        show("session_repick_down")
    ));
    println!();
    println!(
        "summary: {CLIENTS} WireGuard clients over 3 wireguard-go gateways; gw{} died and the agent detected it in {:.0} ms",
        DEAD + 1,
        detect.as_secs_f64() * 1e3
    );
    println!(
        "         clients moved: {} of {} back on healthy gateways (re-handshake after [{}] s)",
        back.len(),
        moved.len(),
        times.join(", ")
    );
    println!(
        "         clients undisturbed: {undisturbed} of {} ({lost_stayed} of {sent_stayed} pings lost during the failover)",
        stayed.len()
    );
    println!(
        "         gateways saw the clients' own addresses and every client kept the VIP as its endpoint: {}",
        dsr_ok && vip_kept
    );

    if keep {
        wg.restart_gateway(&bed.topo, DEAD);
        bed.servers[DEAD] =
            vpnlb_tests::agent::GwServers::start(&bed.topo.gws[DEAD], gw_addr(DEAD));
        bed.topo.mend(DEAD);
        let bin = std::env::var("VPNLB_BIN").unwrap_or_else(|_| "vpnlb".into());
        let sock = bed.agent.socket.display().to_string();
        let pins = bed.agent.pin_dir.display().to_string();
        println!();
        println!(
            "--keep: the testbed stays up until Ctrl-C (gw{} is back). Try:",
            DEAD + 1
        );
        println!("  {bin} status --control-socket {sock}");
        println!("  {bin} top --pin-dir {pins} --control-socket {sock}");
        println!("  {bin} inspect sessions --pin-dir {pins} --control-socket {sock}");
        println!("  {bin} inspect ring --pin-dir {pins} --control-socket {sock}");
        println!(
            "  wg show vdg1; wg show vdc0          # gateways vdg1..3, clients vdc0..{}",
            CLIENTS - 1
        );
        println!("  ip netns exec vpnlb-demo-cl ping 10.98.1.1   # through client vdc0's tunnel");
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        while !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("tearing down");
    drop(pingers);
    drop(wg);
    drop(bed);
    let ok = sticky
        && dsr_ok
        && vip_kept
        && moved_ok
        && back.len() == moved.len()
        && undisturbed == stayed.len();
    if !ok {
        eprintln!("demo: unexpected outcome (see above)");
        std::process::exit(1);
    }
}
