//! `vpnlb-throughput-bench`: packets per second that vpnlb forwards on one core through veth, next
//! to a trivial XDP redirect program and an nftables DNAT load balancer on the same topology, in the
//! same run (modes interleaved run by run so drift hits them alike).
//!
//! Topology (namespaces `vpnlb-tp-*`, deleted on exit):
//!
//! ```text
//!  vpnlb-tp-gen            vpnlb-tp-lb                          vpnlb-tp-gw{1,2,3}
//!  tpgen  ----veth----  tplb0   tplbg1 ----veth---- tpgw1 (gw1)
//!  10.90.0.2            10.90.0.1  tplbg2 ----veth---- tpgw2 (gw2)   10.91.N.2, VIP on lo
//!  XDP live-frames gen            tplbg3 ----veth---- tpgw3 (gw3)
//! ```
//!
//! - Generator: an XDP live-frames program (`vpnlb_tests::livegen`) transmits 68-byte UDP frames
//!   to VIP:51820 out of `tpgen` with 1024 source ports (random per frame), as fast as it can, from
//!   a thread pinned to CPU 0.
//! - LB on `tplb0`: one of (a) `vpnlb_ingress` (native) with the VIP in L2 DSR mode over three
//!   backends reached by redirect through `TX_PORTS` to `tplbg1..3`; (b) `vpnlb_floor_redirect`
//!   (native) redirecting every frame to `tplbg1`; (c) no XDP: kernel forwarding with an nftables
//!   `dnat to jhash ip saddr . udp sport mod 3 map { .. }` rule (conntrack). GRO is on so the veth
//!   has a NAPI (and accepts the generator's XDP frames) without an XDP program.
//! - Gateways: `vpnlb_floor_redirect` with an empty `TX_PORTS` (= XDP_DROP on every frame) on
//!   `tpgw1..3` (native redirect into a veth needs a program on the peer; dropping keeps the
//!   receivers cheap so the LB dominates the cost).
//! - CPU: by default everything runs on CPU 0: veth NAPI runs in the softirq raised by the
//!   generator's own syscall, so generator, LB and sinks share one core and the three modes differ
//!   only in the LB's work. `--split` (experimental) moves the LB's and the gateways' NAPI to
//!   threads on CPU 1; on this VM that is much slower (kthread wake-ups, ring overflows).
//! - Counting: `rx_packets` of `tpgw1..3` (from /proc/net/dev inside each gateway namespace) over
//!   a fixed window after a warm-up: pps delivered, not sent. vpnlb is `checked` when its
//!   `fwd_l2dsr_redirect` counter moved by the number of frames the gateways received (within 1%,
//!   from before the generator starts to after it drained) and every gateway got >= 10%; the floor
//!   when gw1 got everything; nftables when every gateway got >= 10%.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::maps::DevMapHash;
use aya::programs::{Xdp, XdpMode};
use vpnlb::dataplane::loader::{LoadOptions, load, object_bytes};
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::*;
use vpnlb_tests::livegen::LiveGen;
use vpnlb_tests::netns::{Netns, fmt_mac, ip};
use vpnlb_tests::packet::Frame;

const N_GW: usize = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 90, 1, 100);
const VIP_PORT: u16 = 51820;
const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
const FLOW_BASE_PORT: u16 = 40000;
/// 1024 flows (source ports 40000..=41023).
const FLOW_MASK: u16 = 1023;
const GEN_CPU: usize = 0;
const LB_CPU: usize = 1;
/// Frames per generator syscall (about 20-100 ms): how quickly the generator stops.
const GEN_CHUNK: u32 = 1 << 19;
const GEN_BATCH: u32 = 64;
const WARMUP: Duration = Duration::from_millis(400);
const DRAIN: Duration = Duration::from_millis(100);
/// vpnlb's forwarded counter and the frames received must agree this closely.
const TOLERANCE: f64 = 0.01;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Vpnlb,
    Floor,
    Nft,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Vpnlb => "pps_vpnlb",
            Mode::Floor => "pps_redirect_floor",
            Mode::Nft => "pps_nftables",
        }
    }
}

/// One measured window.
struct Sample {
    pps: f64,
    offered_pps: f64,
    cpu1_busy: f64,
    cpu0_busy: f64,
    per_gw: [u64; N_GW],
    checked: bool,
    note: String,
}

fn pin_thread(cpu: usize) {
    pin_pid(0, cpu).expect("sched_setaffinity");
}

fn pin_pid(pid: i32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every kernel thread whose name starts with `prefix` (threaded NAPI: `napi/DEV-ID`).
fn pin_kthreads(prefix: &str, cpu: usize) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) && pin_pid(pid, cpu).is_ok() {
            n += 1;
        }
    }
    n
}

/// (busy, total) jiffies of `cpu` from /proc/stat.
fn cpu_times(cpu: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let tag = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&tag))
        .expect("cpu line");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy(a: (u64, u64), b: (u64, u64)) -> f64 {
    let dt = (b.1 - a.1).max(1) as f64;
    (b.0 - a.0) as f64 / dt
}

/// (rx_packets, rx_dropped, tx_packets, tx_dropped) of `dev` in `ns`.
fn dev_stats(ns: &Netns, dev: &str) -> [u64; 4] {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev"));
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == dev {
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            return [v[1], v[3], v[9], v[11]];
        }
    }
    panic!("{dev} not in /proc/net/dev of {}", ns.name());
}

struct Bed {
    sender: Netns,
    lb: Netns,
    gws: Vec<Netns>,
}

impl Bed {
    fn gw_rx(&self) -> [u64; N_GW] {
        let mut r = [0; N_GW];
        for (i, gw) in self.gws.iter().enumerate() {
            r[i] = dev_stats(gw, &format!("tpgw{}", i + 1))[0];
        }
        r
    }

    /// tplb0's (rx_packets, rx_dropped) and the sum of tplbg*'s (tx_packets, tx_dropped).
    fn lb_stats(&self) -> [u64; 4] {
        let i = dev_stats(&self.lb, "tplb0");
        let mut r = [i[0], i[1], 0, 0];
        for n in 1..=N_GW {
            let o = dev_stats(&self.lb, &format!("tplbg{n}"));
            r[2] += o[2];
            r[3] += o[3];
        }
        r
    }
}

fn gw_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, i as u8 + 1, 2)
}

fn build() -> Bed {
    // No IPv6: router solicitations and MLD reports would land in the counters.
    let no_v6 = "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1";
    let sender = Netns::new("vpnlb-tp-gen");
    sender.sh(no_v6);
    let lb = Netns::new("vpnlb-tp-lb");
    lb.sh(no_v6);
    ip(&[
        "-n",
        sender.name(),
        "link",
        "add",
        "tpgen",
        "type",
        "veth",
        "peer",
        "name",
        "tplb0",
        "netns",
        lb.name(),
    ]);
    sender.sh(&format!(
        "ip addr add {GEN_ADDR}/24 dev tpgen && ip link set tpgen up"
    ));
    lb.sh(
        "ip addr add 10.90.0.1/24 dev tplb0 && ip link set tplb0 up && ethtool -K tplb0 gro on >/dev/null \
         && sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
         net.ipv4.conf.tplb0.rp_filter=0",
    );
    let mut gws = Vec::new();
    for i in 0..N_GW {
        let n = i + 1;
        let gw = Netns::new(&format!("vpnlb-tp-gw{n}"));
        gw.sh(no_v6);
        ip(&[
            "-n",
            lb.name(),
            "link",
            "add",
            &format!("tplbg{n}"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("tpgw{n}"),
            "netns",
            gw.name(),
        ]);
        lb.sh(&format!(
            "ip addr add 10.91.{n}.1/24 dev tplbg{n} && ip link set tplbg{n} up"
        ));
        gw.sh(&format!(
            "ip addr add {}/24 dev tpgw{n} && ip link set tpgw{n} up && ethtool -K tpgw{n} gro on >/dev/null \
             && ip addr add {VIP}/32 dev lo",
            gw_addr(i)
        ));
        // The gateways' XDP sink drops everything, ARP included: static neighbours on the LB.
        let mac = gw.mac(&format!("tpgw{n}"));
        lb.sh(&format!(
            "ip neigh replace {} lladdr {} dev tplbg{n} nud permanent",
            gw_addr(i),
            fmt_mac(&mac)
        ));
        gws.push(gw);
    }
    // (c): DNAT spread by a hash of the flow, as users configure nftables load balancing.
    let map: Vec<String> = (0..N_GW).map(|i| format!("{i} : {}", gw_addr(i))).collect();
    lb.sh(&format!(
        "nft add table ip vpnlb_tp && \
         nft 'add chain ip vpnlb_tp pre {{ type nat hook prerouting priority dstnat; policy accept; }}' && \
         nft 'add rule ip vpnlb_tp pre ip daddr {VIP} udp dport {VIP_PORT} dnat to jhash ip saddr . udp sport mod {N_GW} map {{ {} }}'",
        map.join(", ")
    ));
    Bed { sender, lb, gws }
}

/// `--split`: threaded NAPI for the LB's and the gateways' receive work, pinned to LB_CPU (the
/// generator keeps GEN_CPU to itself). Returns a warning when a thread is missing.
fn place_napi(bed: &Bed) -> Option<String> {
    let mut warn = Vec::new();
    bed.lb.sh("echo 1 > /sys/class/net/tplb0/threaded || true");
    for (i, gw) in bed.gws.iter().enumerate() {
        gw.sh(&format!(
            "echo 1 > /sys/class/net/tpgw{}/threaded || true",
            i + 1
        ));
    }
    if pin_kthreads("napi/tplb0-", LB_CPU) == 0 {
        warn.push("no threaded NAPI for tplb0: the LB runs in softirq on the generator's CPU");
    }
    if pin_kthreads("napi/tpgw", LB_CPU) < N_GW {
        warn.push("not every gateway NAPI is threaded");
    }
    (!warn.is_empty()).then(|| warn.join("; "))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

struct Args {
    json: bool,
    split: bool,
    only: Option<String>,
    runs: usize,
    secs: f64,
}

fn args() -> Args {
    let mut a = Args {
        json: false,
        split: false,
        only: None,
        runs: 5,
        secs: 2.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--json" => a.json = true,
            "--split" => a.split = true,
            "--only" => a.only = it.next(),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--secs" => a.secs = it.next().and_then(|v| v.parse().ok()).expect("--secs S"),
            "-h" | "--help" => {
                println!(
                    "vpnlb-throughput-bench [--json] [--runs N (5)] [--secs S (2.0)] [--split] [--only MODE]\n\
                     needs root; VPNLB_EBPF_OBJ = production object, VPNLB_BENCH_OBJ = helper object"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.runs >= 1 && a.secs > 0.0, "--runs >= 1, --secs > 0");
    a
}

fn main() {
    let args = args();
    // Load everything before building the topology, so a missing object fails fast.
    let obj = object_bytes().expect("eBPF object (cargo xtask build-ebpf or $VPNLB_EBPF_OBJ)");
    let helper = vpnlb_tests::testbed::helper_object();

    let bed = build();
    let lb_if = bed.lb.ifindex("tplb0");
    let lbg_if: Vec<u32> = (1..=N_GW)
        .map(|n| bed.lb.ifindex(&format!("tplbg{n}")))
        .collect();
    let gen_if = bed.sender.ifindex("tpgen");
    let lb_mac = bed.lb.mac("tplb0");
    let gen_mac = bed.sender.mac("tpgen");

    // Gateways: XDP_DROP sinks (helper instance whose TX_PORTS stays empty).
    let mut sink_ebpf = aya::Ebpf::load(&helper).expect("load helper object (sinks)");
    let sink: &mut Xdp = sink_ebpf
        .program_mut("vpnlb_floor_redirect")
        .expect("vpnlb_floor_redirect")
        .try_into()
        .expect("XDP");
    sink.load().expect("load sink");
    for (i, gw) in bed.gws.iter().enumerate() {
        gw.run(|| {
            sink.attach(&format!("tpgw{}", i + 1), XdpMode::Driver)
                .expect("attach sink")
        });
    }

    // (b) the floor: its own helper instance, TX_PORTS[tplb0] = tplbg1.
    let mut floor_ebpf = aya::Ebpf::load(&helper).expect("load helper object (floor)");
    {
        let mut ports: DevMapHash<_> = floor_ebpf
            .map_mut("TX_PORTS")
            .expect("TX_PORTS")
            .try_into()
            .expect("DEVMAP_HASH");
        // DEVMAP entries resolve the ifindex in the caller's namespace.
        bed.lb
            .run(|| ports.insert(lb_if, lbg_if[0], None, 0))
            .expect("TX_PORTS entry");
    }
    let floor: &mut Xdp = floor_ebpf
        .program_mut("vpnlb_floor_redirect")
        .expect("vpnlb_floor_redirect")
        .try_into()
        .expect("XDP");
    floor.load().expect("load floor");

    // (a) vpnlb: one L2 DSR VIP over the three gateways, each behind its own LB interface.
    let mut ebpf = load(
        &obj,
        &LoadOptions {
            pin_dir: None,
            max_sessions: Some(65536),
            ring_rows: Some(2),
        },
    )
    .expect("load vpnlb");
    let maps = AyaMaps::from_ebpf(&mut ebpf).expect("maps");
    let mut dp = Dataplane::new(maps);
    dp.set_config(GlobalConfig::default()).expect("config");
    for (i, (gw, &ifindex)) in bed.gws.iter().zip(&lbg_if).enumerate() {
        let spec = BackendSpec {
            id: i as u32 + 1,
            addr: IpAddr::V4(gw_addr(i)),
            mac: gw.mac(&format!("tpgw{}", i + 1)),
            src_mac: bed.lb.mac(&format!("tplbg{}", i + 1)),
            ifindex,
            weight: 1,
            state: BACKEND_UP,
        };
        // The backend's TX_PORTS entry is written here: inside the LB namespace.
        bed.lb.run(|| dp.upsert_backend(spec)).expect("backend");
    }
    dp.upsert_vip(VipSpec {
        key: VipKey::new(IpAddr::V4(VIP), VIP_PORT, PROTO_UDP),
        vip_id: 0,
        ring_id: 0,
        ring_size: DEFAULT_RING_SIZE,
        flags: 0,
        fwd_mode: FWD_MODE_L2DSR,
        mtu: 0,
        idle_timeout_ns: 0,
        gue_port: 0,
        backends: (1..=N_GW as u32).collect(),
        classes: Vec::new(),
    })
    .expect("vip");
    let ingress: &mut Xdp = ebpf
        .program_mut(prog_names::INGRESS)
        .expect("vpnlb_ingress")
        .try_into()
        .expect("XDP");
    ingress.load().expect("verifier accepts vpnlb_ingress");

    let napi_warning = if args.split { place_napi(&bed) } else { None };

    // The template: UDP to the VIP, zero UDP checksum (the generator rewrites the source port).
    let mut frame = Frame::udp(
        IpAddr::V4(GEN_ADDR),
        FLOW_BASE_PORT,
        IpAddr::V4(VIP),
        VIP_PORT,
        &[
            4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
    .macs(lb_mac, gen_mac)
    .bytes();
    frame[40] = 0;
    frame[41] = 0;
    let frame_len = frame.len();
    let livegen =
        LiveGen::load(&frame, FLOW_BASE_PORT, FLOW_MASK).expect("load the traffic generator");

    let modes = [Mode::Vpnlb, Mode::Floor, Mode::Nft];
    let mut samples: Vec<(Mode, Vec<Sample>)> = modes.iter().map(|m| (*m, Vec::new())).collect();
    let window = Duration::from_secs_f64(args.secs);
    let counters = |dp: &Dataplane<AyaMaps>| dp.writer().counters().expect("counters");

    for run in 0..args.runs {
        for (mode, out) in samples.iter_mut() {
            let mode = *mode;
            if args
                .only
                .as_deref()
                .is_some_and(|o| !mode.name().contains(o))
            {
                continue;
            }
            // Attach this mode's LB program (none for nftables).
            let link = match mode {
                Mode::Vpnlb => Some(bed.lb.run(|| {
                    ingress
                        .attach("tplb0", XdpMode::Driver)
                        .expect("attach vpnlb_ingress")
                })),
                Mode::Floor => Some(bed.lb.run(|| {
                    floor
                        .attach("tplb0", XdpMode::Driver)
                        .expect("attach floor")
                })),
                Mode::Nft => None,
            };
            if args.split {
                // Attaching can recreate the NAPI: place it again.
                pin_kthreads("napi/tplb0-", LB_CPU);
            }

            let c0 = counters(&dp);
            let lb0 = bed.lb_stats();
            let rx_start = bed.gw_rx();
            let stop = AtomicBool::new(false);
            let (rx0, rx1, t, gen0, gen1, lb_busy, gen_busy) = std::thread::scope(|s| {
                let g = s.spawn(|| {
                    bed.sender.run(|| {
                        pin_thread(GEN_CPU);
                        while !stop.load(Ordering::Relaxed) {
                            livegen
                                .send(&frame, gen_if, GEN_CHUNK, GEN_BATCH)
                                .expect("live-frames generator");
                        }
                    })
                });
                std::thread::sleep(WARMUP);
                let (l0, g0) = (cpu_times(LB_CPU), cpu_times(GEN_CPU));
                let gen0 = dev_stats(&bed.sender, "tpgen");
                let t0 = Instant::now();
                let rx0 = bed.gw_rx();
                std::thread::sleep(window);
                let rx1 = bed.gw_rx();
                let t = t0.elapsed().as_secs_f64();
                let gen1 = dev_stats(&bed.sender, "tpgen");
                let (l1, g1) = (cpu_times(LB_CPU), cpu_times(GEN_CPU));
                stop.store(true, Ordering::Relaxed);
                g.join().expect("generator thread");
                (rx0, rx1, t, gen0, gen1, busy(l0, l1), busy(g0, g1))
            });
            std::thread::sleep(DRAIN);
            let rx_end = bed.gw_rx();
            let c1 = counters(&dp);
            let lb1 = bed.lb_stats();
            let lb_diag = format!(
                "LB tplb0 rx {} rx_dropped {}, tplbg* tx {} tx_dropped {}",
                lb1[0] - lb0[0],
                lb1[1] - lb0[1],
                lb1[2] - lb0[2],
                lb1[3] - lb0[3]
            );
            if let Some(id) = link {
                bed.lb.run(|| match mode {
                    Mode::Vpnlb => ingress.detach(id).expect("detach"),
                    _ => floor.detach(id).expect("detach"),
                });
            }

            let got: u64 = (0..N_GW).map(|i| rx1[i] - rx0[i]).sum();
            let per_gw: [u64; N_GW] = std::array::from_fn(|i| rx_end[i] - rx_start[i]);
            let total: u64 = per_gw.iter().sum();
            let share_ok = per_gw.iter().all(|&n| n * 10 >= total) && total > 0;
            let (checked, note) = match mode {
                Mode::Vpnlb => {
                    let fwd = c1[FWD_L2DSR_REDIRECT as usize] - c0[FWD_L2DSR_REDIRECT as usize];
                    let failed =
                        c1[DROP_REDIRECT_FAILED as usize] - c0[DROP_REDIRECT_FAILED as usize];
                    let diff = (fwd as f64 - total as f64).abs() / (fwd.max(1) as f64);
                    (
                        diff <= TOLERANCE && share_ok && fwd > 0,
                        format!(
                            "fwd_l2dsr_redirect {fwd}, received {total} ({:+.3}%), redirect_failed {failed}",
                            (total as f64 - fwd as f64) * 100.0 / fwd.max(1) as f64
                        ),
                    )
                }
                Mode::Floor => (
                    total > 0 && (per_gw[1] + per_gw[2]) * 1000 <= total,
                    format!("received {total}, all on gw1"),
                ),
                Mode::Nft => (share_ok, format!("received {total}")),
            };
            let s = Sample {
                pps: got as f64 / t,
                offered_pps: (gen1[2] - gen0[2]) as f64 / t,
                cpu1_busy: lb_busy,
                cpu0_busy: gen_busy,
                per_gw,
                checked,
                note: format!("{note}; {lb_diag}"),
            };
            if !args.json {
                eprintln!(
                    "run {} {:<19} {:>12.0} pps  (offered {:>10.0}, cpu0 {:>3.0}%, cpu1 {:>3.0}%, per gw {:?}) {} {}",
                    run + 1,
                    mode.name(),
                    s.pps,
                    s.offered_pps,
                    s.cpu0_busy * 100.0,
                    s.cpu1_busy * 100.0,
                    s.per_gw,
                    if s.checked { "ok" } else { "CHECK FAILED" },
                    s.note
                );
            }
            out.push(s);
        }
    }

    if args.only.is_some() {
        // A partial run (debugging): the per-run lines above are the output.
        return;
    }
    let stat = |m: Mode| {
        let v = &samples
            .iter()
            .find(|(x, _)| *x == m)
            .expect("mode measured")
            .1;
        let pps: Vec<f64> = v.iter().map(|s| s.pps).collect();
        let mut sorted = pps.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let med = |f: fn(&Sample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        Summary {
            median: median(&pps),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            offered: med(|s| s.offered_pps),
            cpu0: med(|s| s.cpu0_busy),
            cpu1: med(|s| s.cpu1_busy),
            checked: v.iter().all(|s| s.checked),
            last_note: v.last().map(|s| s.note.clone()).unwrap_or_default(),
            runs: pps,
        }
    };
    let (v, f, n) = (stat(Mode::Vpnlb), stat(Mode::Floor), stat(Mode::Nft));
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let row = |name: &str, s: &Summary| {
        serde_json::json!({
            "name": name,
            "value": s.median.round(),
            "unit": "pps",
            "min": s.min.round(),
            "max": s.max.round(),
            "runs": s.runs.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "offered_pps": s.offered.round(),
            "cpu0_busy": round3(s.cpu0),
            "cpu1_busy": round3(s.cpu1),
            "checked": s.checked,
        })
    };
    let ratio_floor = v.median / f.median;
    let ratio_nft = v.median / n.median;
    let mut r_v = row("pps_vpnlb", &v);
    r_v["ratio_to_redirect_floor"] = serde_json::json!(round3(ratio_floor));
    r_v["ratio_vpnlb_to_nftables"] = serde_json::json!(round3(ratio_nft));
    let r_f = row("pps_redirect_floor", &f);
    let mut r_n = row("pps_nftables", &n);
    r_n["ratio_vpnlb_to_nftables"] = serde_json::json!(round3(ratio_nft));

    if args.json {
        let mut doc = serde_json::json!({ "results": [r_v, r_f, r_n] });
        if let Some(w) = &napi_warning {
            doc["warning"] = serde_json::json!(w);
        }
        println!("{doc}");
        return;
    }
    let placement = if args.split {
        format!("generator on CPU {GEN_CPU}, LB and gateway NAPI threads on CPU {LB_CPU}")
    } else {
        format!("generator, LB and gateways all in softirq on CPU {GEN_CPU}")
    };
    println!(
        "vpnlb throughput: XDP live-frames generator ({} flows, {frame_len}-byte frames) -> LB veth -> \
         {N_GW} gateway namespaces (XDP drop sinks); {placement}",
        FLOW_MASK as u32 + 1
    );
    println!(
        "{} runs x {:.1} s, pps delivered to the gateways (rx_packets), median [min-max]",
        args.runs, args.secs
    );
    println!(
        "{:<19} {:>10} {:>23} {:>10} {:>5} {:>5} {:>8}",
        "path", "pps", "min-max", "offered", "cpu0", "cpu1", "checked"
    );
    for (name, s) in [
        ("pps_vpnlb", &v),
        ("pps_redirect_floor", &f),
        ("pps_nftables", &n),
    ] {
        println!(
            "{:<19} {:>10.0} {:>23} {:>10.0} {:>4.0}% {:>4.0}% {:>8}",
            name,
            s.median,
            format!("{:.0}-{:.0}", s.min, s.max),
            s.offered,
            s.cpu0 * 100.0,
            s.cpu1 * 100.0,
            s.checked
        );
    }
    println!(
        "vpnlb / redirect floor = {ratio_floor:.3}; vpnlb / nftables = {ratio_nft:.3}\nlast vpnlb check: {}",
        v.last_note
    );
    if let Some(w) = napi_warning {
        println!("warning: {w}");
    }
}

struct Summary {
    median: f64,
    min: f64,
    max: f64,
    runs: Vec<f64>,
    offered: f64,
    cpu0: f64,
    cpu1: f64,
    checked: bool,
    last_note: String,
}
