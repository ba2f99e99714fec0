//! `cargo xtask demo`: the real agent (`vpnlb run`) in a load-balancer namespace attaches the XDP
//! program natively to its veth and health-checks three gateway namespaces (ICMP + TCP every
//! 200 ms); UDP flows from many client addresses go through the VIP by L2 DSR and the gateways
//! answer directly from the VIP. Then a gateway dies: the agent detects it, rewrites the maps, its
//! flows move and every other flow stays where it was; an admin drain follows.
//!
//! Issue #5 replaces the UDP echo gateways with real WireGuard/strongSwan/OpenVPN daemons.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vpnlb::control::Request;
use vpnlb_tests::agent::{
    AgentBed, FALL, GwServers, INTERFACE, INTERVAL_MS, RISE, TCP_PORT, TIMEOUT_MS, backend_in,
};
use vpnlb_tests::netns::fmt_mac;
use vpnlb_tests::testbed::{VIP, VIP_PORT, gw_addr};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn tally(owners: &[Option<String>]) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for o in owners {
        *m.entry(o.as_deref().unwrap_or("no answer")).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

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

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let t0 = Instant::now();
    let step = |msg: &str| println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());

    step(
        "bringing up namespaces vpnlb-demo-*: switch, client (8 addresses), LB, 3 gateways (VIP on lo, DSR)",
    );
    let mut bed = AgentBed::up("vpnlb-demo", 3, 8, |t, _| {
        let macs: Vec<[u8; 6]> = t.gws.iter().map(|g| g.mac("eth0")).collect();
        config(&macs)
    });
    step(&format!(
        "agent `vpnlb run` (pid {}) in vpnlb-demo-lb: vpnlb_ingress attached natively to eth0; VIP {VIP}:{VIP_PORT}/udp, L2 DSR, Maglev M=65537; checks icmp+tcp every {INTERVAL_MS} ms, fall {FALL}",
        bed.agent.pid()
    ));
    bed.agent
        .wait_all_up(&["gw1", "gw2", "gw3"], Duration::from_secs(15));
    step("all three gateways up (agent status)");

    let flows = bed.topo.flows(3);
    let n = flows.sockets.len();
    step(&format!(
        "sending {n} UDP flows through the VIP; gateways answer directly from the VIP"
    ));
    let first = flows.probe(1, Duration::from_secs(1));
    println!("         flow -> gateway:");
    for (i, (s, o)) in flows.sockets.iter().zip(&first).enumerate() {
        println!(
            "           {:>2}  {:<17} -> {}",
            i,
            s.local_addr().unwrap().to_string(),
            o.as_deref().unwrap_or("(no answer)")
        );
    }
    println!("         share: {}", tally(&first));
    let mut sticky = true;
    for round in 2..=4 {
        sticky &= flows.probe(round, Duration::from_secs(1)) == first;
    }
    step(&format!(
        "3 more rounds: every flow stayed on its gateway: {sticky}"
    ));

    step("gateway gw2 dies: its cable is cut at the switch and its services stop");
    bed.servers[1].stop();
    let t_kill = Instant::now();
    bed.topo.cut(1);
    let detect = bed.agent.wait_state("gw2", "down", Duration::from_secs(5));
    let st = bed.agent.status();
    let checks = backend_in(&st, "gw2")
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
        "agent marked gw2 down after {:.0} ms and rewrote the maps in the same event-loop turn ({checks})",
        detect.as_secs_f64() * 1e3
    ));
    let after = flows.probe(5, Duration::from_secs(1));
    let lb_recovery = t_kill.elapsed();
    let on_dead = first.iter().filter(|a| a.as_deref() == Some("gw2")).count();
    let moved = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.as_deref() == Some("gw2") && b.is_some() && a != b)
        .count();
    let undisturbed = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.as_deref() != Some("gw2") && a == b)
        .count();
    println!("         share now: {}", tally(&after));

    step("admin drain of gw3 over the control socket: its flows stay, new flows avoid it");
    let r = bed.agent.request(Request::Drain {
        backend: "gw3".into(),
    });
    let drained_ok = r.ok;
    let still = flows.probe(6, Duration::from_secs(1));
    let fresh = bed.topo.flows_on_ports(100, 2);
    let fresh_owners = fresh.probe(7, Duration::from_secs(1));
    let drain_kept = still == after;
    let drain_avoided = fresh_owners
        .iter()
        .all(|o| o.is_some() && o.as_deref() != Some("gw3"));
    println!(
        "         existing flows unchanged: {drain_kept}; {} new flows: {}",
        fresh_owners.len(),
        tally(&fresh_owners)
    );
    bed.agent.request(Request::Undrain {
        backend: "gw3".into(),
    });

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
        "metrics: fwd_l2dsr_tx={} session_insert={} session_hit={} session_repick_down={}",
        show("fwd_l2dsr_tx"),
        show("session_insert"),
        show("session_hit"),
        show("session_repick_down")
    ));
    println!();
    println!(
        "summary: {n} flows; gw2 died and the agent detected it in {:.0} ms; its {on_dead} flows were answered",
        detect.as_secs_f64() * 1e3
    );
    println!(
        "         by healthy gateways {:.0} ms after the failure ({moved} moved); {undisturbed} of {} flows on healthy",
        lb_recovery.as_secs_f64() * 1e3,
        n - on_dead
    );
    println!(
        "         gateways stayed where they were; drain kept existing flows and steered new ones away: {}",
        drain_kept && drain_avoided
    );

    if keep {
        bed.servers[1] = GwServers::start(&bed.topo.gws[1], gw_addr(1));
        bed.topo.mend(1);
        println!();
        println!("--keep: the testbed stays up until Ctrl-C (gw2 is back). Try:");
        println!(
            "  echo '{{\"cmd\":\"status\"}}' | nsenter --net=/run/netns/vpnlb-demo-lb socat - UNIX-CONNECT:{}",
            bed.agent.socket.display()
        );
        println!(
            "  nsenter --net=/run/netns/vpnlb-demo-lb curl -s http://{}/metrics | grep vpnlb_",
            bed.agent.metrics
        );
        println!("  ip -n vpnlb-demo-lb link show eth0        # the attached XDP program");
        println!(
            "  ip netns exec vpnlb-demo-cl ping -c1 {VIP}   # (ICMP to the VIP is passed to the LB's kernel)"
        );
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
    drop(flows);
    drop(fresh);
    drop(bed);
    let ok = sticky
        && moved == on_dead
        && undisturbed == n - on_dead
        && first.iter().all(Option::is_some)
        && drained_ok
        && drain_kept
        && drain_avoided;
    if !ok {
        eprintln!("demo: unexpected outcome (see above)");
        std::process::exit(1);
    }
}
