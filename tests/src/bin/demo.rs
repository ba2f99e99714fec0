//! `cargo xtask demo`: UDP flows from many clients through the real XDP load balancer (native mode on
//! a veth in a network namespace) to three gateways by L2 DSR; then one gateway dies and its flows
//! move while every other flow stays where it was.
//!
//! Until the agent exists (issue #3) the demo itself marks the dead gateway down through the same
//! `Dataplane` API the agent uses; issue #5 replaces the UDP sinks with real VPN daemons.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vpnlb::maps::MapReader;
use vpnlb_common::{BACKEND_DOWN, COUNTER_NAMES};
use vpnlb_tests::testbed::Testbed;

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

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let t0 = Instant::now();
    let step = |msg: &str| println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());

    step(
        "bringing up namespaces vpnlb-demo-*: switch, client (8 addresses), LB, 3 gateways (VIP on lo, DSR)",
    );
    let mut tb = Testbed::up("vpnlb-demo", 3, 8);
    step(
        "vpnlb_ingress attached to the LB's eth0 in native XDP mode; VIP 10.77.0.100:51820/udp, Maglev M=65537, L2 DSR",
    );
    let flows = tb.flows(3);
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

    let dead = 1usize;
    step("gateway gw2 dies (its cable is cut at the switch)");
    tb.cut(dead);
    let blackholed = flows.probe(5, Duration::from_millis(300));
    step(&format!("before the LB reacts: {}", tally(&blackholed)));
    let t_write = Instant::now();
    tb.dp
        .set_backend_state(tb.backend_ids[dead], BACKEND_DOWN)
        .expect("mark down");
    let write_ms = t_write.elapsed().as_secs_f64() * 1e3;
    step(&format!(
        "gw2 marked down in the maps ({write_ms:.1} ms: backend state + Maglev delta); the agent's health checks will do this (issue #3)"
    ));
    let after = flows.probe(6, Duration::from_secs(1));
    let moved = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.as_deref() == Some("gw2") && b.is_some() && a != b)
        .count();
    let on_dead = first.iter().filter(|a| a.as_deref() == Some("gw2")).count();
    let undisturbed = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.as_deref() != Some("gw2") && a == b)
        .count();
    println!("         share now: {}", tally(&after));

    let c = tb.dp.writer().counters().expect("counters");
    let show = |name: &str| {
        let id = COUNTER_NAMES.iter().position(|n| *n == name).unwrap();
        format!("{name}={}", c[id])
    };
    step(&format!(
        "counters: {} {} {} {} {}",
        show("fwd_l2dsr_tx"),
        show("session_insert"),
        show("session_hit"),
        show("session_repick_down"),
        show("pass_not_vip")
    ));
    println!();
    println!(
        "summary: {n} flows; {on_dead} were on gw2 and {moved} of them moved to healthy gateways;"
    );
    println!(
        "         {undisturbed} of {} flows on healthy gateways stayed where they were; map write {write_ms:.1} ms",
        n - on_dead
    );
    if keep {
        println!();
        println!("--keep: the testbed stays up until you press Ctrl-C. Try:");
        println!("  ip netns exec vpnlb-demo-cl ping -c1 10.77.0.11");
        println!("  ip -n vpnlb-demo-lb link show eth0    # shows the attached XDP program");
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
    drop(tb);
    let ok = sticky
        && moved == on_dead
        && undisturbed == n - on_dead
        && first.iter().all(Option::is_some);
    if !ok {
        eprintln!("demo: unexpected outcome (see above)");
        std::process::exit(1);
    }
}
