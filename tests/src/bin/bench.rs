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
//!
//! Every run loads the object afresh (its own maps, programmed like the agent does, sessions
//! warmed). With `VPNLB_BASELINE_OBJ` (`cargo xtask bench --baseline REV`) another revision's
//! object is loaded beside it the same way, and every row is measured for both, one right after the
//! other on the same CPU, the order (of loading and of measuring) alternating between runs, so the
//! ratio new/old holds even when the machine's speed moves between days. Both objects must share
//! the map ABI: the current userspace programs both.
//!
//! The verifier's figures of each object (instructions, translated size, stack; tests/src/budget.rs)
//! are printed beside the rows.

use std::net::{IpAddr, Ipv4Addr};

use aya::Ebpf;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use serde::Serialize;
use vpnlb::dataplane::loader::{LoadOptions, load, object_bytes};
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::*;
use vpnlb_tests::budget::{self, Budget};
use vpnlb_tests::packet::{Frame, vpn};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Runs of every row (`--runs N` changes it).
const RUNS: usize = 7;
const REPEAT: u32 = 1_000_000;
const SINGLE_CALLS: u32 = 40_000;
/// Environment variable naming the baseline object (set by `cargo xtask bench --baseline REV`).
const BASELINE_ENV: &str = "VPNLB_BASELINE_OBJ";

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
    /// The baseline object's `raw_ns` / `ns_per_packet` in the same runs (with a baseline).
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_raw_ns: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_ns_per_packet: Option<f64>,
    /// Median over the runs of new/old, each run's two measurements taken back to back (per-packet
    /// costs): below 1 the current object is faster. With the smallest and largest run's ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_baseline_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_baseline_max: Option<f64>,
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

/// The rows of vpnlb_ingress, in the order they run and print.
const ROWS: [(&str, &str); 7] = [
    ("hit_l2dsr", "repeat"),
    ("hit_encap", "single"),
    ("new_flow", "single"),
    ("pass_non_vip", "repeat"),
    ("hit_known_id", "repeat"),
    ("learn_session_id", "single"),
    ("hit_by_session_id", "single"),
];

const VIP_DSR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const VIP_ENCAP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const VIP_IDS: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const MAC_LB: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const MAC_CL: [u8; 6] = [2, 0, 0, 0, 0, 0x07];
/// The WireGuard receiver index the warm-up teaches the id VIP.
const KNOWN_ID: u32 = 0x4b4b_4b4b;

/// A UDP packet to `dst`:51820 with a WireGuard-data-looking payload.
fn udp(dst: Ipv4Addr, sport: u16, src: Ipv4Addr) -> Vec<u8> {
    Frame::udp(
        IpAddr::V4(src),
        sport,
        IpAddr::V4(dst),
        51820,
        &[0x04, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    )
    .macs(MAC_LB, MAC_CL)
    .bytes()
}

/// WireGuard transport data to the id VIP: receiver index `index`, from `src`:`sport`.
fn wg(src: Ipv4Addr, sport: u16, index: u32) -> Vec<u8> {
    Frame::udp(
        IpAddr::V4(src),
        sport,
        IpAddr::V4(VIP_IDS),
        51820,
        &vpn::wireguard(4, index),
    )
    .macs(MAC_LB, MAC_CL)
    .bytes()
}

/// One object under test: loaded with its own maps, programmed like the agent does (three VIPs:
/// L2 DSR, IPIP, and L2 DSR learning WireGuard ids; three backends each), its sessions warmed.
/// Each subject makes the same packet sequence, so two objects see the same packets.
struct Subject {
    ebpf: Ebpf,
    dp: Dataplane<AyaMaps>,
    /// Receiver indices never seen before (the warm-up used 0 and KNOWN_ID).
    next_index: u32,
    next_client: u32,
}

impl Subject {
    fn new(obj: &[u8], what: &str) -> Subject {
        let mut ebpf = load(
            obj,
            &LoadOptions {
                pin_dir: None,
                // A fresh subject per run: new_flow and hit_by_session_id insert SINGLE_CALLS
                // sessions each (80k); with per-CPU LRU lists a CPU gets max_sessions / ncpus,
                // so 2M keeps every insert free of eviction and the rows comparable.
                max_sessions: Some(1 << 21),
                ring_rows: Some(3),
            },
        )
        .unwrap_or_else(|e| panic!("load the {what} object: {e:?}"));
        let maps = AyaMaps::from_ebpf(&mut ebpf).expect("maps");
        let mut dp = Dataplane::new(maps);
        dp.set_config(GlobalConfig {
            encap_src_v4: u32::from_ne_bytes([10, 1, 0, 1]),
            encap_src_v4_hash_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
            ..Default::default()
        })
        .unwrap();
        for id in 1..=3u32 {
            dp.upsert_backend(BackendSpec {
                id,
                addr: IpAddr::V4(Ipv4Addr::new(10, 2, 0, id as u8)),
                mac: [2, 0, 0, 0, 0, id as u8],
                src_mac: MAC_LB,
                ifindex: 0,
                weight: 1,
                state: BACKEND_UP,
            })
            .unwrap();
        }
        for (i, (addr, mode, flags)) in [
            (VIP_DSR, FWD_MODE_L2DSR, 0),
            (VIP_ENCAP, FWD_MODE_IPIP, 0),
            (VIP_IDS, FWD_MODE_L2DSR, VIP_F_IDS_WIREGUARD),
        ]
        .into_iter()
        .enumerate()
        {
            dp.upsert_vip(VipSpec {
                key: VipKey::new(IpAddr::V4(addr), 51820, PROTO_UDP),
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
        let ingress: &mut Xdp = ebpf
            .program_mut(prog_names::INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        ingress.load().unwrap();
        let s = Subject {
            ebpf,
            dp,
            next_index: 0x1000_0000,
            next_client: 0,
        };
        // Warm the sessions the hit rows use (and check they were created).
        let ingress = s.ingress();
        run_repeat(ingress, &udp(VIP_DSR, 40000, CLIENT), 1, XDP_TX);
        run_repeat(ingress, &udp(VIP_ENCAP, 40000, CLIENT), 1, XDP_TX);
        // The id VIP's session, then a hit that learns KNOWN_ID; and the session
        // learn_session_id hits.
        run_repeat(ingress, &wg(CLIENT, 40000, KNOWN_ID), 2, XDP_TX);
        run_repeat(ingress, &wg(CLIENT, 40001, 0), 1, XDP_TX);
        assert_eq!(
            s.counter(SESSION_INSERT),
            4,
            "{what}: warm-up inserted the four sessions"
        );
        assert_eq!(
            s.counter(SESSION_ID_LEARNED),
            1,
            "{what}: warm-up learned the id"
        );
        s
    }

    fn ingress(&self) -> &Xdp {
        self.ebpf
            .program(prog_names::INGRESS)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn counter(&self, id: u32) -> u64 {
        self.dp.writer().counters().expect("counters")[id as usize]
    }

    /// Counter deltas of `ids` while `f` runs.
    fn deltas(&mut self, ids: [u32; 2], f: impl FnOnce(&mut Self) -> f64) -> (f64, [u64; 2]) {
        let before = ids.map(|id| self.counter(id));
        let ns = f(self);
        let mut after = ids.map(|id| self.counter(id));
        for (a, b) in after.iter_mut().zip(before) {
            *a -= b;
        }
        (ns, after)
    }

    /// Measures row `name` once and checks its verdicts and counters.
    fn row(&mut self, name: &str) -> f64 {
        let (repeat, single) = (u64::from(REPEAT), u64::from(SINGLE_CALLS));
        match name {
            "hit_l2dsr" => {
                let pkt = udp(VIP_DSR, 40000, CLIENT);
                let (ns, d) = self.deltas([SESSION_HIT, FWD_L2DSR_TX], |s| {
                    run_repeat(s.ingress(), &pkt, REPEAT, XDP_TX)
                });
                assert_eq!(d, [repeat; 2], "hit_l2dsr: every packet a forwarded hit");
                ns
            }
            "hit_encap" => {
                let pkt = udp(VIP_ENCAP, 40000, CLIENT);
                let (ns, d) = self.deltas([SESSION_HIT, FWD_IPIP], |s| {
                    run_single(s.ingress(), SINGLE_CALLS, XDP_TX, |_| pkt.clone())
                });
                assert_eq!(
                    d, [single; 2],
                    "hit_encap: every packet an encapsulated hit"
                );
                ns
            }
            "new_flow" => {
                let (ns, d) = self.deltas([SESSION_MISS, SESSION_INSERT], |s| {
                    let mut n = s.next_client;
                    let ns = run_single(s.ingress(), SINGLE_CALLS, XDP_TX, |_| {
                        n += 1;
                        // 198.0.0.0/8 + n: a new client every packet
                        let c = Ipv4Addr::from(0xc600_0000u32 + n);
                        udp(VIP_DSR, 40000 + (n % 20000) as u16, c)
                    });
                    s.next_client = n;
                    ns
                });
                assert_eq!(d, [single; 2], "new_flow: every packet a miss, inserted");
                ns
            }
            "pass_non_vip" => {
                let pkt = udp(Ipv4Addr::new(10, 0, 0, 99), 40000, CLIENT);
                let (ns, d) = self.deltas([PASS_NOT_VIP, SESSION_HIT], |s| {
                    run_repeat(s.ingress(), &pkt, REPEAT, XDP_PASS)
                });
                assert_eq!(d, [repeat, 0], "pass_non_vip: every packet passed");
                ns
            }
            "hit_known_id" => {
                // A session hit whose id is already learned: one SESSION_IDS lookup on top of
                // hit_l2dsr.
                let pkt = wg(CLIENT, 40000, KNOWN_ID);
                let (ns, d) = self.deltas([SESSION_HIT, SESSION_ID_LEARNED], |s| {
                    run_repeat(s.ingress(), &pkt, REPEAT, XDP_TX)
                });
                assert_eq!(d, [repeat, 0], "hit_known_id: hits, nothing new to learn");
                ns
            }
            "learn_session_id" => {
                // A session hit carrying a new id every packet: lookup + SESSION_IDS insert.
                let (ns, d) = self.deltas([SESSION_HIT, SESSION_ID_LEARNED], |s| {
                    let mut n = s.next_index;
                    let ns = run_single(s.ingress(), SINGLE_CALLS, XDP_TX, |_| {
                        n += 1;
                        wg(CLIENT, 40001, n)
                    });
                    s.next_index = n;
                    ns
                });
                assert_eq!(d, [single; 2], "learn_session_id: hits that learn their id");
                ns
            }
            "hit_by_session_id" => {
                // A new five-tuple (a roamed client) carrying the known id: miss, id lookup,
                // insert.
                let (ns, d) = self.deltas([SESSION_ID_USED, SESSION_INSERT], |s| {
                    let mut n = s.next_client;
                    let ns = run_single(s.ingress(), SINGLE_CALLS, XDP_TX, |_| {
                        n += 1;
                        wg(Ipv4Addr::from(0xc700_0000u32 + n), 40000, KNOWN_ID)
                    });
                    s.next_client = n;
                    ns
                });
                assert_eq!(
                    d, [single; 2],
                    "hit_by_session_id: every packet went by its id and created its session"
                );
                ns
            }
            _ => unreachable!("no row {name}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let runs = match args.iter().position(|a| a == "--runs") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .expect("--runs N (N > 0)"),
        None => RUNS,
    };
    pin_cpu(1);

    let obj = object_bytes().expect("eBPF object (cargo xtask build-ebpf)");
    let baseline_path = std::env::var_os(BASELINE_ENV).filter(|p| !p.is_empty());
    let baseline_obj = baseline_path
        .as_ref()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.to_string_lossy())));

    // The verifier's figures first: each measurement loads its object once more on its own.
    let figures = budget::measure(&obj);
    let baseline_figures = baseline_obj.as_deref().map(budget::measure);

    let mut floor_ebpf =
        aya::Ebpf::load(&vpnlb_tests::testbed::helper_object()).expect("load bench programs");
    let floor: &mut Xdp = floor_ebpf
        .program_mut("vpnlb_floor_tx")
        .expect("vpnlb_floor_tx")
        .try_into()
        .unwrap();
    floor.load().unwrap();
    let floor = &*floor;
    let pkt_dsr = udp(VIP_DSR, 40000, CLIENT);

    let (mut floor_repeat, mut floor_single) = (Vec::new(), Vec::new());
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = ROWS.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        // Fresh subjects every run. With a baseline, the two objects are loaded and measured in
        // alternating order: where an object's maps and code land in memory moves its rows by a
        // few percent (a run of one object against itself, always loaded in the same order, put
        // the first one 5% behind on hit_encap), so neither object keeps the better place.
        let old_first = run % 2 == 1;
        let load_old = || baseline_obj.as_deref().map(|o| Subject::new(o, "baseline"));
        let (mut new, mut old) = if old_first {
            let old = load_old();
            (Subject::new(&obj, "current"), old)
        } else {
            (Subject::new(&obj, "current"), load_old())
        };
        // Interleave the rows inside each run so drift hits them all alike; with a baseline,
        // each row runs on both objects back to back.
        floor_repeat.push(run_repeat(floor, &pkt_dsr, REPEAT, XDP_TX));
        floor_single.push(run_single(floor, SINGLE_CALLS, XDP_TX, |_| pkt_dsr.clone()));
        for (i, (name, _)) in ROWS.iter().enumerate() {
            match old.as_mut() {
                Some(old) if old_first => {
                    samples[i].1.push(old.row(name));
                    samples[i].0.push(new.row(name));
                }
                Some(old) => {
                    samples[i].0.push(new.row(name));
                    samples[i].1.push(old.row(name));
                }
                None => samples[i].0.push(new.row(name)),
            }
        }
    }

    // Single-call rows carry the kernel's per-call timer overhead; the floor measured the same way
    // gives it (floor_single - floor), and it is subtracted so every ratio is to the same floor.
    let floor_ns = median(&mut floor_repeat).0;
    let overhead = median(&mut floor_single).0 - floor_ns;
    let mut rows = vec![Row {
        name: "floor".into(),
        method: "repeat",
        raw_ns: floor_ns,
        ns_per_packet: floor_ns,
        min: floor_repeat[0],
        max: floor_repeat[runs - 1],
        ratio_to_floor: 1.0,
        checked: true,
        baseline_raw_ns: None,
        baseline_ns_per_packet: None,
        ratio_to_baseline: None,
        ratio_to_baseline_min: None,
        ratio_to_baseline_max: None,
    }];
    for ((name, method), (v, b)) in ROWS.iter().zip(samples.iter_mut()) {
        let sub = if *method == "single" { overhead } else { 0.0 };
        // The ratio of each run's back-to-back pair, then their median: a pair shares the
        // machine's state of the moment, the medians of the two columns do not.
        let mut pairs: Vec<f64> = v
            .iter()
            .zip(b.iter())
            .map(|(n, o)| (n - sub) / (o - sub))
            .collect();
        let ratio = (!pairs.is_empty()).then(|| median(&mut pairs));
        let (med, min, max) = median(v);
        let base = (!b.is_empty()).then(|| median(b).0);
        rows.push(Row {
            name: name.to_string(),
            method,
            raw_ns: med,
            ns_per_packet: med - sub,
            min: min - sub,
            max: max - sub,
            ratio_to_floor: (med - sub) / floor_ns,
            checked: true,
            baseline_raw_ns: base,
            baseline_ns_per_packet: base.map(|b| b - sub),
            ratio_to_baseline: ratio.map(|r| r.0),
            ratio_to_baseline_min: ratio.map(|r| r.1),
            ratio_to_baseline_max: ratio.map(|r| r.2),
        });
    }
    if json {
        let mut out = serde_json::json!({ "results": rows, "budget": figures });
        if let Some(f) = baseline_figures {
            out["baseline_budget"] = serde_json::json!(f);
            out["baseline_object"] = serde_json::json!(baseline_path.unwrap().to_string_lossy());
        }
        println!("{out}");
        return;
    }
    println!(
        "vpnlb data-plane benchmark: BPF_PROG_TEST_RUN on CPU 1, {runs} runs, median [min-max]"
    );
    println!(
        "repeat = {REPEAT} iterations per syscall; single = {SINGLE_CALLS} syscalls of one packet (kernel-timed)"
    );
    if let Some(p) = &baseline_path {
        println!(
            "baseline: {} (each row on both objects back to back; new/old: median of the runs' \
             ratios, < 1 is faster)",
            p.to_string_lossy()
        );
        println!(
            "{:<18} {:<7} {:>10} {:>17} {:>8} {:>10} {:>8} {:>13}",
            "path",
            "method",
            "ns/packet",
            "min-max",
            "x floor",
            "old ns",
            "new/old",
            "runs min-max"
        );
    } else {
        println!(
            "{:<18} {:<7} {:>8} {:>10} {:>17} {:>8}",
            "path", "method", "raw ns", "ns/packet", "min-max", "x floor"
        );
    }
    for r in &rows {
        let range = format!("{:.1}-{:.1}", r.min, r.max);
        match (r.baseline_ns_per_packet, r.ratio_to_baseline) {
            (Some(old), Some(ratio)) => println!(
                "{:<18} {:<7} {:>10.1} {:>17} {:>8.2} {:>10.1} {:>7.2}x {:>13}",
                r.name,
                r.method,
                r.ns_per_packet,
                range,
                r.ratio_to_floor,
                old,
                ratio,
                format!(
                    "{:.2}-{:.2}",
                    r.ratio_to_baseline_min.unwrap_or(ratio),
                    r.ratio_to_baseline_max.unwrap_or(ratio)
                )
            ),
            _ if baseline_path.is_some() => println!(
                "{:<18} {:<7} {:>10.1} {:>17} {:>8.2}",
                r.name, r.method, r.ns_per_packet, range, r.ratio_to_floor
            ),
            _ => println!(
                "{:<18} {:<7} {:>8.1} {:>10.1} {:>17} {:>8.2}",
                r.name, r.method, r.raw_ns, r.ns_per_packet, range, r.ratio_to_floor
            ),
        }
    }
    println!(
        "single-call rows: the per-call timer overhead measured on the floor ({overhead:.1} ns) is \
         subtracted; every ratio is to the repeat floor; verdicts and counters checked on every run"
    );
    println!(
        "\nverifier figures of the object / budget ({}):\n{}",
        budget::BUDGET_FILE,
        budget::table(&figures, Some(&Budget::load()))
    );
    if let Some(f) = baseline_figures {
        println!("baseline object:\n{}", budget::table(&f, None));
    }
}
