//! `cargo xtask bench`: ns/packet of the data plane's paths with BPF_PROG_TEST_RUN on one pinned CPU,
//! each next to a trivial XDP_TX program measured in the same run the same way, so the ratios hold on
//! a noisy machine. Every run checks the verdict and the counters it must have moved, so a broken path
//! cannot look fast.
//!
//! Two methods (shared/TOOLCHAIN.md: the kernel does not reset the packet between repeats):
//! - `repeat`: one syscall runs the program N times on the same packet (idempotent paths: L2 DSR hit,
//!   pass); the kernel reports the mean.
//! - `single`: N syscalls with repeat=1 (paths that grow the packet or need a new flow every time:
//!   encapsulation, miss+insert, a new session id every packet); the mean of the kernel-reported
//!   durations.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use serde::Serialize;
use vpnlb::dataplane::loader::{LoadOptions, load, object_bytes};
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::*;
use vpnlb_tests::packet::{Frame, vpn};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const RUNS: usize = 7;
const REPEAT: u32 = 1_000_000;
const SINGLE_CALLS: u32 = 40_000;

#[derive(Serialize)]
struct Row {
    name: String,
    method: &'static str,
    /// Median as measured (single-call rows include the per-call timer overhead).
    raw_ns: f64,
    /// Median per-packet cost, timer overhead removed.
    ns_per_packet: f64,
    min: f64,
    max: f64,
    ratio_to_floor: f64,
    checked: bool,
}

fn pin_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it; pid 0 = this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

fn median(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Runs `prog` on `pkt` `repeat` times in one syscall; returns the kernel's mean ns and checks the verdict.
fn run_repeat(prog: &Xdp, pkt: &[u8], repeat: u32, verdict: u32) -> f64 {
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("test_run");
    assert_eq!(r.return_value, verdict, "verdict");
    r.duration.as_nanos() as f64
}

/// One syscall per packet; `pkt_for(i)` gives the i-th packet. Mean of kernel-measured durations.
fn run_single(
    prog: &Xdp,
    calls: u32,
    verdict: u32,
    mut pkt_for: impl FnMut(u32) -> Vec<u8>,
) -> f64 {
    let mut total = 0u128;
    let mut out = vec![0u8; 4096];
    for i in 0..calls {
        let pkt = pkt_for(i);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        assert_eq!(r.return_value, verdict, "verdict on call {i}");
        total += r.duration.as_nanos();
    }
    total as f64 / calls as f64
}

fn counter(maps: &AyaMaps, id: u32) -> u64 {
    maps.counters().expect("counters")[id as usize]
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    pin_cpu(1);

    // Production object with three VIPs: L2 DSR, IPIP, and L2 DSR learning WireGuard ids; three
    // backends each.
    let obj = object_bytes().expect("eBPF object (cargo xtask build-ebpf)");
    let mut ebpf = load(
        &obj,
        &LoadOptions {
            pin_dir: None,
            // new_flow and hit_by_session_id insert RUNS x SINGLE_CALLS sessions each (560k):
            // with per-CPU LRU lists a CPU gets max_sessions / ncpus, so 2M keeps every insert
            // free of eviction on up to 3 CPUs and the rows comparable between runs.
            max_sessions: Some(1 << 21),
            ring_rows: Some(3),
        },
    )
    .expect("load vpnlb");
    let maps = AyaMaps::from_ebpf(&mut ebpf).expect("maps");
    let mut dp = Dataplane::new(maps);
    let encap_src: Ipv4Addr = "10.1.0.1".parse().unwrap();
    dp.set_config(GlobalConfig {
        encap_src_v4: u32::from_ne_bytes(encap_src.octets()),
        encap_src_v4_hash_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        ..Default::default()
    })
    .unwrap();
    for id in 1..=3u32 {
        dp.upsert_backend(BackendSpec {
            id,
            addr: IpAddr::V4(Ipv4Addr::new(10, 2, 0, id as u8)),
            mac: [2, 0, 0, 0, 0, id as u8],
            src_mac: [2, 0, 0, 0, 0, 0xfe],
            ifindex: 0,
            weight: 1,
            state: BACKEND_UP,
        })
        .unwrap();
    }
    let vip_dsr: IpAddr = "10.0.0.10".parse().unwrap();
    let vip_encap: IpAddr = "10.0.0.11".parse().unwrap();
    let vip_ids: IpAddr = "10.0.0.12".parse().unwrap();
    for (i, (addr, mode, flags)) in [
        (vip_dsr, FWD_MODE_L2DSR, 0),
        (vip_encap, FWD_MODE_IPIP, 0),
        (vip_ids, FWD_MODE_L2DSR, VIP_F_IDS_WIREGUARD),
    ]
    .into_iter()
    .enumerate()
    {
        dp.upsert_vip(VipSpec {
            key: VipKey::new(addr, 51820, PROTO_UDP),
            vip_id: i as u32,
            ring_id: i as u32,
            ring_size: DEFAULT_RING_SIZE,
            flags,
            fwd_mode: mode,
            mtu: 0,
            idle_timeout_ns: 0,
            gue_port: 0,
            backends: vec![1, 2, 3],
            classes: Vec::new(),
        })
        .unwrap();
    }
    let client: IpAddr = "192.0.2.7".parse().unwrap();
    let mac_lb = [2, 0, 0, 0, 0, 0xfe];
    let mac_cl = [2, 0, 0, 0, 0, 0x07];
    let udp = |dst: IpAddr, sport: u16, src: IpAddr| {
        Frame::udp(
            src,
            sport,
            dst,
            51820,
            &[0x04, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        )
        .macs(mac_lb, mac_cl)
        .bytes()
    };
    let pkt_dsr = udp(vip_dsr, 40000, client);
    let pkt_encap = udp(vip_encap, 40000, client);
    let pkt_other = udp("10.0.0.99".parse().unwrap(), 40000, client);
    // WireGuard transport data to the id VIP: receiver index `index`, from `src`:`sport`.
    let wg = |src: IpAddr, sport: u16, index: u32| {
        Frame::udp(src, sport, vip_ids, 51820, &vpn::wireguard(4, index))
            .macs(mac_lb, mac_cl)
            .bytes()
    };
    const KNOWN_ID: u32 = 0x4b4b_4b4b;
    let pkt_known = wg(client, 40000, KNOWN_ID);

    let mut floor_ebpf =
        aya::Ebpf::load(&vpnlb_tests::testbed::helper_object()).expect("load bench programs");
    let floor: &mut Xdp = floor_ebpf
        .program_mut("vpnlb_floor_tx")
        .expect("vpnlb_floor_tx")
        .try_into()
        .unwrap();
    floor.load().unwrap();
    let ingress: &mut Xdp = ebpf
        .program_mut(prog_names::INGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    ingress.load().unwrap();
    let (floor, ingress) = (&*floor, &*ingress);

    // Warm the sessions the hit rows use (and check they were created).
    run_repeat(ingress, &pkt_dsr, 1, XDP_TX);
    run_repeat(ingress, &pkt_encap, 1, XDP_TX);
    // The id VIP's session, then a hit that learns KNOWN_ID; and the session learn_session_id hits.
    run_repeat(ingress, &pkt_known, 2, XDP_TX);
    run_repeat(ingress, &wg(client, 40001, 0), 1, XDP_TX);
    let maps = dp.writer();
    assert_eq!(
        counter(maps, SESSION_INSERT),
        4,
        "warm-up inserted the four sessions"
    );
    assert_eq!(
        counter(maps, SESSION_ID_LEARNED),
        1,
        "warm-up learned the id"
    );

    let mut samples: Vec<(&str, &str, Vec<f64>)> = vec![
        ("floor", "repeat", vec![]),
        ("floor_single", "single", vec![]),
        ("hit_l2dsr", "repeat", vec![]),
        ("hit_encap", "single", vec![]),
        ("new_flow", "single", vec![]),
        ("pass_non_vip", "repeat", vec![]),
        ("hit_known_id", "repeat", vec![]),
        ("learn_session_id", "single", vec![]),
        ("hit_by_session_id", "single", vec![]),
    ];
    // Receiver indices never seen before (the warm-up used 0 and KNOWN_ID).
    let mut next_index = 0x1000_0000u32;
    let mut next_client = 0u32;
    for _ in 0..RUNS {
        // Interleave the rows inside each run so drift hits them all alike.
        samples[0]
            .2
            .push(run_repeat(floor, &pkt_dsr, REPEAT, XDP_TX));
        samples[1]
            .2
            .push(run_single(floor, SINGLE_CALLS, XDP_TX, |_| pkt_dsr.clone()));

        let (h0, f0) = (counter(maps, SESSION_HIT), counter(maps, FWD_L2DSR_TX));
        samples[2]
            .2
            .push(run_repeat(ingress, &pkt_dsr, REPEAT, XDP_TX));
        assert_eq!(
            counter(maps, SESSION_HIT) - h0,
            REPEAT as u64,
            "hit_l2dsr: every packet a session hit"
        );
        assert_eq!(
            counter(maps, FWD_L2DSR_TX) - f0,
            REPEAT as u64,
            "hit_l2dsr: every packet forwarded"
        );

        let (h0, f0) = (counter(maps, SESSION_HIT), counter(maps, FWD_IPIP));
        samples[3]
            .2
            .push(run_single(ingress, SINGLE_CALLS, XDP_TX, |_| {
                pkt_encap.clone()
            }));
        assert_eq!(
            counter(maps, SESSION_HIT) - h0,
            SINGLE_CALLS as u64,
            "hit_encap: every packet a session hit"
        );
        assert_eq!(
            counter(maps, FWD_IPIP) - f0,
            SINGLE_CALLS as u64,
            "hit_encap: every packet encapsulated"
        );

        let (i0, m0) = (counter(maps, SESSION_INSERT), counter(maps, SESSION_MISS));
        samples[4]
            .2
            .push(run_single(ingress, SINGLE_CALLS, XDP_TX, |_| {
                next_client += 1;
                let c = 0xc600_0000u32 + next_client; // 198.0.0.0/8 + n: a new client every packet
                udp(
                    vip_dsr,
                    40000 + (next_client % 20000) as u16,
                    IpAddr::V4(Ipv4Addr::from(c)),
                )
            }));
        assert_eq!(
            counter(maps, SESSION_MISS) - m0,
            SINGLE_CALLS as u64,
            "new_flow: every packet a miss"
        );
        assert_eq!(
            counter(maps, SESSION_INSERT) - i0,
            SINGLE_CALLS as u64,
            "new_flow: every miss inserted"
        );

        let p0 = counter(maps, PASS_NOT_VIP);
        samples[5]
            .2
            .push(run_repeat(ingress, &pkt_other, REPEAT, XDP_PASS));
        assert_eq!(
            counter(maps, PASS_NOT_VIP) - p0,
            REPEAT as u64,
            "pass_non_vip: every packet passed"
        );

        // A session hit whose id is already learned: one SESSION_IDS lookup on top of hit_l2dsr.
        let (h0, l0) = (
            counter(maps, SESSION_HIT),
            counter(maps, SESSION_ID_LEARNED),
        );
        samples[6]
            .2
            .push(run_repeat(ingress, &pkt_known, REPEAT, XDP_TX));
        assert_eq!(
            counter(maps, SESSION_HIT) - h0,
            REPEAT as u64,
            "hit_known_id: every packet a session hit"
        );
        assert_eq!(
            counter(maps, SESSION_ID_LEARNED),
            l0,
            "hit_known_id: nothing new to learn"
        );

        // A session hit carrying a new id every packet: lookup + SESSION_IDS insert.
        let (h0, l0) = (
            counter(maps, SESSION_HIT),
            counter(maps, SESSION_ID_LEARNED),
        );
        samples[7]
            .2
            .push(run_single(ingress, SINGLE_CALLS, XDP_TX, |_| {
                next_index += 1;
                wg(client, 40001, next_index)
            }));
        assert_eq!(
            counter(maps, SESSION_HIT) - h0,
            SINGLE_CALLS as u64,
            "learn_session_id: every packet a session hit"
        );
        assert_eq!(
            counter(maps, SESSION_ID_LEARNED) - l0,
            SINGLE_CALLS as u64,
            "learn_session_id: every packet learned its id"
        );

        // A new five-tuple (a roamed client) carrying the known id: miss, id lookup, insert.
        let (u0, i0) = (
            counter(maps, SESSION_ID_USED),
            counter(maps, SESSION_INSERT),
        );
        samples[8]
            .2
            .push(run_single(ingress, SINGLE_CALLS, XDP_TX, |_| {
                next_client += 1;
                let c = 0xc700_0000u32 + next_client;
                wg(IpAddr::V4(Ipv4Addr::from(c)), 40000, KNOWN_ID)
            }));
        assert_eq!(
            counter(maps, SESSION_ID_USED) - u0,
            SINGLE_CALLS as u64,
            "hit_by_session_id: every packet went by its id"
        );
        assert_eq!(
            counter(maps, SESSION_INSERT) - i0,
            SINGLE_CALLS as u64,
            "hit_by_session_id: every packet created its session"
        );
    }

    // Single-call rows carry the kernel's per-call timer overhead; the floor measured the same way
    // gives it (floor_single - floor), and it is subtracted so every ratio is to the same floor.
    let floor_repeat = median(&mut samples[0].2.clone()).0;
    let floor_single = median(&mut samples[1].2.clone()).0;
    let overhead = floor_single - floor_repeat;
    let rows: Vec<Row> = samples
        .iter_mut()
        .filter(|(name, _, _)| *name != "floor_single")
        .map(|(name, method, v)| {
            let (med, min, max) = median(v);
            let sub = if *method == "single" { overhead } else { 0.0 };
            Row {
                name: name.to_string(),
                method,
                raw_ns: med,
                ns_per_packet: med - sub,
                min: min - sub,
                max: max - sub,
                ratio_to_floor: (med - sub) / floor_repeat,
                checked: true,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::json!({ "results": rows }));
        return;
    }
    println!(
        "vpnlb data-plane benchmark: BPF_PROG_TEST_RUN on CPU 1, {RUNS} runs, median [min-max]"
    );
    println!(
        "repeat = {REPEAT} iterations per syscall; single = {SINGLE_CALLS} syscalls of one packet (kernel-timed)"
    );
    println!(
        "{:<18} {:<7} {:>8} {:>10} {:>17} {:>8}",
        "path", "method", "raw ns", "ns/packet", "min-max", "x floor"
    );
    for r in &rows {
        println!(
            "{:<18} {:<7} {:>8.1} {:>10.1} {:>17} {:>8.2}",
            r.name,
            r.method,
            r.raw_ns,
            r.ns_per_packet,
            format!("{:.1}-{:.1}", r.min, r.max),
            r.ratio_to_floor
        );
    }
    println!(
        "single-call rows: the per-call timer overhead measured on the floor ({overhead:.1} ns) is \
         subtracted; every ratio is to the repeat floor; verdicts and counters checked on every run"
    );
}
