//! vpnlb's BFD against a real peer: FRR's bfdd in a gateway namespace, our `BfdManager` in a load
//! balancer namespace, joined by a veth. Session Up, the agreed 50 ms rate, Down after `kill -9`
//! (measured), back Up after a restart, Down on link loss, AdminDown both ways, IPv6, passive.
//! Needs root and Debian's `frr` (run through `cargo xtask test`).

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use vpnlb::health::bfd::{BfdManager, BfdSessionHandle, SessionParams, State};
use vpnlb::health::{CheckResult, CheckTarget};

use vpnlb_tests::bfd_peer::{BfdLab, Bfdd, BfddPeer, Percentiles, kill_to_down_latencies};

const MS: Duration = Duration::from_millis(1);
/// 50 ms x 3: Down 150 ms after the last packet; bound from the kill with margin.
const DOWN_BOUND: Duration = Duration::from_millis(500);

/// The tests measure timing: run them one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn fast() -> SessionParams {
    SessionParams {
        desired_min_tx: 50 * MS,
        required_min_rx: 50 * MS,
        detect_mult: 3,
        passive: false,
    }
}

/// Our side: a manager started inside the lab's `lb` namespace (its thread, and every socket it
/// opens, live there) and a receiver for the reports.
struct Ours {
    mgr: BfdManager,
    rt: tokio::runtime::Runtime,
}

impl Ours {
    fn start(lab: &BfdLab) -> Ours {
        let mgr = lab
            .lb
            .run(BfdManager::start)
            .unwrap_or_else(|e| panic!("BfdManager::start: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Ours { mgr, rt }
    }

    fn session(
        &self,
        params: SessionParams,
        peer: IpAddr,
        local: IpAddr,
    ) -> (BfdSessionHandle, mpsc::Receiver<CheckResult>) {
        let (tx, rx) = mpsc::channel(64);
        let target = CheckTarget {
            backend_id: 7,
            check_index: 0,
            generation: 0,
            addr: peer,
            source: Some(local),
            interface: Some("eth0".into()),
        };
        let h = self
            .mgr
            .add_session(params, target, tx)
            .unwrap_or_else(|e| panic!("add_session: {e}"));
        (h, rx)
    }

    /// The next report with `ok`, and when it was received; panics after `timeout`.
    fn wait(
        &self,
        rx: &mut mpsc::Receiver<CheckResult>,
        ok: bool,
        timeout: Duration,
    ) -> (CheckResult, Instant) {
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) if r.ok == ok => return (r, Instant::now()),
                    Ok(Some(r)) => seen.push(r.detail),
                    Ok(None) => panic!("report channel closed; seen {seen:?}"),
                    Err(_) => panic!("no ok={ok} report within {timeout:?}; seen {seen:?}"),
                }
            }
        })
    }
}

/// Waits until the session runs at the agreed fast rate (Poll/Final done on both sides).
fn wait_fast(h: &BfdSessionHandle, timeout: Duration) {
    let t = Instant::now();
    loop {
        let st = h.status();
        if st.state == State::Up
            && st.tx_interval == Some(50 * MS)
            && st.detection_time == Some(150 * MS)
        {
            return;
        }
        assert!(
            t.elapsed() < timeout,
            "not at 50 ms x 3 after {timeout:?}: {st:?}"
        );
        std::thread::sleep(5 * MS);
    }
}

/// Counts our received packets over `window`: the peer's actual rate.
fn rx_rate(h: &BfdSessionHandle, window: Duration) -> f64 {
    let a = h.status().rx_packets;
    std::thread::sleep(window);
    let b = h.status().rx_packets;
    (b - a) as f64 / window.as_secs_f64()
}

#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn frr_up_at_50ms_kill_detection_and_restart() {
    let _g = serial();
    let lab = BfdLab::new("vpnlb-bfd-kill", 1);
    let peer = BfddPeer::fast(lab.lb_v4, lab.gw_v4);
    let mut bfdd = Bfdd::start(&lab.gw, std::slice::from_ref(&peer));
    let ours = Ours::start(&lab);
    let started = Instant::now();
    let (h, mut rx) = ours.session(fast(), lab.gw_v4, lab.lb_v4);

    let (first, _) = ours.wait(&mut rx, false, Duration::from_secs(1));
    assert_eq!(first.detail, "bfd Down (session started)");
    let (up, _) = ours.wait(&mut rx, true, Duration::from_secs(5));
    assert_eq!(up.detail, "bfd Up");
    assert_eq!(up.backend_id, 7);
    let up_after = up.at - started;
    println!(
        "bfd: Up {:.0} ms after the session was added",
        up_after.as_secs_f64() * 1e3
    );
    wait_fast(&h, Duration::from_secs(3));

    // The agreed rate, seen three ways: our status, our packet count, bfdd's view.
    let rate = rx_rate(&h, Duration::from_secs(2));
    println!("bfd: receiving {rate:.1} packets/s from bfdd (50 ms less 0-25% jitter: 20-26.7)");
    assert!((17.0..=30.0).contains(&rate), "{rate} packets/s");
    let st = h.status();
    let j = bfdd.peer_json(lab.lb_v4);
    assert_eq!(j["status"], "up", "{j}");
    assert_eq!(j["remote-id"].as_u64(), Some(st.local_discr as u64), "{j}");
    assert_eq!(j["id"].as_u64(), Some(st.remote_discr as u64), "{j}");
    assert_eq!(j["remote-transmit-interval"], 50, "{j}");
    assert_eq!(j["remote-receive-interval"], 50, "{j}");
    assert_eq!(j["remote-detect-multiplier"], 3, "{j}");
    assert_eq!(j["transmit-interval"], 50, "{j}");
    assert_eq!(ours.mgr.stats().rx_bad_ttl, 0);

    // kill -9: bfdd sends nothing; our detection time runs out. Restart: Up again.
    // VPNLB_BFD_REPS=30 for a longer measurement.
    let reps = std::env::var("VPNLB_BFD_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let samples = kill_to_down_latencies(&mut bfdd, reps, |up, timeout| {
        let (r, seen) = ours.wait(&mut rx, up, timeout);
        if up {
            assert_eq!(r.detail, "bfd Up");
            wait_fast(&h, Duration::from_secs(3));
        } else {
            assert_eq!(r.detail, "bfd Down (control detection time expired)");
        }
        seen
    });
    let p = Percentiles::of(&samples);
    println!("bfd: kill -9 -> Down report (IPv4, 50 ms x 3): {p}");
    for s in &samples {
        assert!(*s < DOWN_BOUND, "Down {s:?} after the kill: {samples:?}");
        assert!(*s >= 95 * MS, "Down only {s:?} after the kill: {samples:?}");
    }
    assert_eq!(bfdd.peer_json(lab.lb_v4)["status"], "up");
}

#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn frr_link_down_and_back() {
    let _g = serial();
    let lab = BfdLab::new("vpnlb-bfd-link", 2);
    let peer = BfddPeer::fast(lab.lb_v4, lab.gw_v4);
    let _bfdd = Bfdd::start(&lab.gw, &[peer]);
    let ours = Ours::start(&lab);
    let (h, mut rx) = ours.session(fast(), lab.gw_v4, lab.lb_v4);
    ours.wait(&mut rx, true, Duration::from_secs(5));
    wait_fast(&h, Duration::from_secs(3));

    let mut samples = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(250 * MS);
        let t = Instant::now();
        lab.set_gw_link(false);
        let (r, seen) = ours.wait(&mut rx, false, Duration::from_secs(2));
        assert_eq!(r.detail, "bfd Down (control detection time expired)");
        samples.push(seen - t);
        lab.set_gw_link(true);
        ours.wait(&mut rx, true, Duration::from_secs(10));
        wait_fast(&h, Duration::from_secs(3));
    }
    println!(
        "bfd: link down -> Down report: {}",
        Percentiles::of(&samples)
    );
    assert!(samples.iter().all(|s| *s < DOWN_BOUND), "{samples:?}");
}

#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn frr_admin_down_both_ways() {
    let _g = serial();
    let lab = BfdLab::new("vpnlb-bfd-admin", 3);
    let peer = BfddPeer::fast(lab.lb_v4, lab.gw_v4);
    let bfdd = Bfdd::start(&lab.gw, std::slice::from_ref(&peer));
    let ours = Ours::start(&lab);
    let (h, mut rx) = ours.session(fast(), lab.gw_v4, lab.lb_v4);
    ours.wait(&mut rx, true, Duration::from_secs(5));
    wait_fast(&h, Duration::from_secs(3));

    // bfdd `shutdown`: it sends AdminDown, we go Down at once (no detection time).
    let t = Instant::now();
    bfdd.set_shutdown(&peer, true);
    let (r, seen) = ours.wait(&mut rx, false, Duration::from_secs(2));
    assert_eq!(
        r.detail,
        "bfd Down (neighbor signaled session down: administratively down)"
    );
    println!("bfd: peer AdminDown -> Down report {:?}", seen - t);
    assert_eq!(h.status().remote_state, State::AdminDown);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h.status().state,
        State::Down,
        "stays Down while the peer is AdminDown"
    );
    bfdd.set_shutdown(&peer, false);
    ours.wait(&mut rx, true, Duration::from_secs(5));
    wait_fast(&h, Duration::from_secs(3));

    // Our handle dropped: we send AdminDown, bfdd goes down with "neighbor down".
    drop(h);
    let t = Instant::now();
    loop {
        let j = bfdd.peer_json(lab.lb_v4);
        if j["status"] == "down" {
            println!("bfdd after our AdminDown: {j}");
            assert_eq!(j["remote-diagnostic"], "administratively down", "{j}");
            assert_eq!(j["diagnostic"], "neighbor signaled session down", "{j}");
            break;
        }
        // A liveness bound for a loaded machine: our AdminDown packet is what brings it down (the
        // diagnostic above), not the time it takes.
        assert!(t.elapsed() < Duration::from_secs(10), "bfdd still {j}");
        std::thread::sleep(10 * MS);
    }
}

#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn frr_ipv6_session() {
    let _g = serial();
    let lab = BfdLab::new("vpnlb-bfd-v6", 4);
    let peer = BfddPeer::fast(lab.lb_v6, lab.gw_v6);
    let mut bfdd = Bfdd::start(&lab.gw, &[peer]);
    let ours = Ours::start(&lab);
    let (h, mut rx) = ours.session(fast(), lab.gw_v6, lab.lb_v6);
    ours.wait(&mut rx, true, Duration::from_secs(5));
    wait_fast(&h, Duration::from_secs(3));
    let rate = rx_rate(&h, Duration::from_secs(1));
    assert!((15.0..=32.0).contains(&rate), "{rate} packets/s");
    assert_eq!(bfdd.peer_json(lab.lb_v6)["status"], "up");
    let samples = kill_to_down_latencies(&mut bfdd, 3, |up, timeout| {
        let (_, seen) = ours.wait(&mut rx, up, timeout);
        if up {
            wait_fast(&h, Duration::from_secs(3));
        }
        seen
    });
    println!(
        "bfd: kill -9 -> Down report (IPv6): {}",
        Percentiles::of(&samples)
    );
    assert!(samples.iter().all(|s| *s < DOWN_BOUND), "{samples:?}");
}

#[test]
#[ignore = "needs root and frr: run cargo xtask test"]
fn frr_passive_roles() {
    let _g = serial();
    let lab = BfdLab::new("vpnlb-bfd-pass", 5);
    // bfdd passive, we active; and (second peer pair over IPv6) bfdd active, we passive.
    let mut p4 = BfddPeer::fast(lab.lb_v4, lab.gw_v4);
    p4.passive = true;
    let p6 = BfddPeer::fast(lab.lb_v6, lab.gw_v6);
    let bfdd = Bfdd::start(&lab.gw, &[p4, p6]);
    let ours = Ours::start(&lab);
    let (h4, mut rx4) = ours.session(fast(), lab.gw_v4, lab.lb_v4);
    let passive = SessionParams {
        passive: true,
        ..fast()
    };
    let (h6, mut rx6) = ours.session(passive, lab.gw_v6, lab.lb_v6);
    ours.wait(&mut rx4, true, Duration::from_secs(5));
    ours.wait(&mut rx6, true, Duration::from_secs(5));
    wait_fast(&h4, Duration::from_secs(3));
    wait_fast(&h6, Duration::from_secs(3));
    assert_eq!(bfdd.peer_json(lab.lb_v4)["status"], "up");
    assert_eq!(bfdd.peer_json(lab.lb_v6)["status"], "up");
}
