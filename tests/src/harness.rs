//! Drives the production XDP object through `BPF_PROG_TEST_RUN` (root only): loads it with small
//! maps, programs it through the agent's own [`Dataplane`] API, runs one frame at a time on a
//! pinned CPU and reports the verdict, output bytes and every counter/stat delta.
//!
//! [`Harness::check`] compares a run with an [`Expect`]ation; on any mismatch it writes a pcap of
//! input/expected/actual and panics with the fixture name, a hex diff and counter names.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use aya::Ebpf;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use vpnlb::dataplane::loader::{self, LoadOptions};
use vpnlb::dataplane::maps::{AyaMaps, MapReader, MapWriter};
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::{
    COUNTER_NAMES, FlowKey, GlobalConfig, INGRESS_OUTCOMES, MAX_BACKENDS, MAX_VIPS, PktBytes,
    Session, VipKey, prog_names,
};

use crate::netns::ThreadNetns;
use crate::packet::{check_outer, hexdump_diff};
use crate::pcap;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

pub fn counter_name(id: u32) -> &'static str {
    COUNTER_NAMES.get(id as usize).copied().unwrap_or("?")
}

/// Ring rows and session capacity the harness loads the object with (small and fast to load).
pub const RING_ROWS: u32 = 4;
pub const MAX_SESSIONS: u32 = 4096;
/// The CPU every run is pinned to (per-CPU counters, LRU lists and flood state stay consistent).
pub const CPU: usize = 0;

/// One `BPF_PROG_TEST_RUN` and what it changed.
#[derive(Clone, Debug)]
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
    /// Counters that moved: (id, delta), in id order.
    pub counter_deltas: Vec<(u32, u64)>,
    /// VIP_STATS rows that moved: (vip_id, delta).
    pub vip_deltas: Vec<(u32, PktBytes)>,
    /// BACKEND_STATS rows that moved: (backend id, delta).
    pub backend_deltas: Vec<(u32, PktBytes)>,
    pub duration: Duration,
}

impl Run {
    /// The ingress outcome counters that moved.
    pub fn outcomes(&self) -> Vec<u32> {
        self.counter_deltas
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| INGRESS_OUTCOMES.contains(id))
            .collect()
    }

    pub fn counters_text(&self) -> String {
        counters_text(&self.counter_deltas)
    }
}

fn counters_text(c: &[(u32, u64)]) -> String {
    let v: Vec<String> = c
        .iter()
        .map(|(id, d)| format!("{}(+{d})", counter_name(*id)))
        .collect();
    format!("[{}]", v.join(", "))
}

/// What the frame must become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// The input, untouched (every `XDP_PASS`).
    Unchanged,
    /// Not compared (the frame was dropped: its bytes never leave the host).
    Ignore,
}

/// The expected result of one run.
#[derive(Clone, Debug)]
pub struct Expect {
    pub action: u32,
    pub output: Output,
    /// Every counter that must move, by +1 each (outcome and session events); nothing else may move.
    pub counters: Vec<u32>,
    /// `Some((vip_id, backend_id))`: those two stats rows get +1 packet, +frame_len bytes, no other
    /// row moves. `None`: no stats row moves.
    pub stats: Option<(u32, u32)>,
    /// L2 header length of the output, to verify outer checksums of an encapsulated frame.
    pub check_outer_l2: Option<usize>,
}

impl Expect {
    /// `XDP_PASS`, untouched, exactly one counter.
    pub fn pass(counter: u32) -> Self {
        Expect {
            action: XDP_PASS,
            output: Output::Unchanged,
            counters: vec![counter],
            stats: None,
            check_outer_l2: None,
        }
    }

    /// `XDP_DROP` with these counters (outcome plus session events).
    pub fn drop(counters: &[u32]) -> Self {
        Expect {
            action: XDP_DROP,
            output: Output::Ignore,
            counters: counters.to_vec(),
            stats: None,
            check_outer_l2: None,
        }
    }

    /// A forward: verdict, exact bytes, counters and the VIP/backend stats rows.
    pub fn forward(
        action: u32,
        output: Vec<u8>,
        counters: &[u32],
        vip_id: u32,
        backend_id: u32,
    ) -> Self {
        Expect {
            action,
            output: Output::Exact(output),
            counters: counters.to_vec(),
            stats: Some((vip_id, backend_id)),
            check_outer_l2: None,
        }
    }

    pub fn with_outer_check(mut self, l2_len: usize) -> Self {
        self.check_outer_l2 = Some(l2_len);
        self
    }
}

struct StatsSnapshot {
    counters: Vec<u64>,
    vips: Vec<PktBytes>,
    backends: Vec<PktBytes>,
}

/// Loaded object, its maps behind the agent's Dataplane, and the programs ready for test runs.
pub struct Harness {
    ebpf: Ebpf,
    pub dp: Dataplane<AyaMaps>,
    /// The private netns with a veth pair, when [`Harness::with_netns`] created one.
    pub netns: Option<ThreadNetns>,
}

/// Panics unless we are root (fixtures must fail loudly, not skip).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this test needs root (BPF_PROG_TEST_RUN, map creation): run `cargo xtask test` or sudo"
        );
    }
}

/// Pins the calling thread to `cpu` so every run sees the same per-CPU map slots.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            panic!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The 24-byte `struct xdp_md` for `BPF_PROG_TEST_RUN`: data = 0, data_end = len, data_meta = 0,
/// ingress_ifindex, rx_queue_index = 0, egress_ifindex = 0 (the kernel refuses anything else there).
pub fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    c[12..16].copy_from_slice(&ingress_ifindex.to_le_bytes());
    c
}

#[allow(
    clippy::new_without_default,
    reason = "loading BPF needs root: not a default value"
)]
impl Harness {
    /// Loads the production object (ring_rows 4, max_sessions 4096), loads both XDP programs and
    /// pins this thread to CPU 0. Panics (never skips) without root or without the object.
    pub fn new() -> Self {
        require_root();
        pin_to_cpu(CPU);
        let obj = loader::object_bytes().unwrap_or_else(|e| {
            panic!(
                "no eBPF object: {e} (build it with `cargo xtask build-ebpf` or set VPNLB_EBPF_OBJ)"
            )
        });
        let opts = LoadOptions {
            pin_dir: None,
            max_sessions: Some(MAX_SESSIONS),
            ring_rows: Some(RING_ROWS),
        };
        let mut ebpf = loader::load(&obj, &opts)
            .unwrap_or_else(|e| panic!("loading the eBPF object: {}", chain(&e)));
        for name in [prog_names::INGRESS, prog_names::DECAP] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| {
                    panic!("the eBPF object has no program {name} (placeholder object?)")
                })
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not an XDP program: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name} (verifier): {}", chain(&e)));
        }
        let maps = AyaMaps::from_ebpf(&mut ebpf)
            .unwrap_or_else(|e| panic!("taking the maps: {}", chain(&e)));
        Harness {
            ebpf,
            dp: Dataplane::with_ring_rows(maps, RING_ROWS),
            netns: None,
        }
    }

    /// As [`Harness::new`], with this thread moved into a private netns holding a veth pair (for
    /// redirect fixtures: real ifindexes for `TX_PORTS` and `ingress_ifindex`).
    pub fn with_netns() -> Self {
        require_root();
        let ns = ThreadNetns::enter();
        let mut h = Self::new();
        h.netns = Some(ns);
        h
    }

    pub fn maps(&self) -> &AyaMaps {
        self.dp.writer()
    }

    pub fn maps_mut(&mut self) -> &mut AyaMaps {
        self.dp.writer_mut()
    }

    pub fn set_config(&mut self, cfg: GlobalConfig) {
        self.dp
            .set_config(cfg)
            .unwrap_or_else(|e| panic!("set_config: {}", chain(&e)));
    }

    pub fn upsert_backend(&mut self, spec: BackendSpec) {
        let id = spec.id;
        self.dp
            .upsert_backend(spec)
            .unwrap_or_else(|e| panic!("upsert_backend {id}: {}", chain(&e)));
    }

    pub fn set_backend_state(&mut self, id: u32, state: u32) {
        self.dp
            .set_backend_state(id, state)
            .unwrap_or_else(|e| panic!("set_backend_state {id}: {}", chain(&e)));
    }

    pub fn upsert_vip(&mut self, spec: VipSpec) {
        let label = vpnlb::dataplane::vip_label(&spec.key);
        self.dp
            .upsert_vip(spec)
            .unwrap_or_else(|e| panic!("upsert_vip {label}: {}", chain(&e)));
    }

    pub fn set_session(&mut self, key: &FlowKey, s: &Session) {
        self.maps_mut()
            .set_session(key, s)
            .unwrap_or_else(|e| panic!("set_session: {}", chain(&e)));
    }

    pub fn session(&self, key: &FlowKey) -> Option<Session> {
        self.maps()
            .session(key)
            .unwrap_or_else(|e| panic!("session lookup: {}", chain(&e)))
    }

    pub fn sessions(&self) -> Vec<(FlowKey, Session)> {
        self.maps()
            .sessions()
            .unwrap_or_else(|e| panic!("session dump: {}", chain(&e)))
    }

    /// The backend id in slot `slot` of ring `ring_id`, as installed in `RINGS`.
    pub fn ring_slot(&self, ring_id: u32, slot: u32) -> u32 {
        self.maps()
            .ring_slot(ring_id, slot)
            .unwrap_or_else(|e| panic!("ring lookup: {}", chain(&e)))
    }

    /// The backend the data plane must pick for a new flow with `hash` under `vip`
    /// (`RINGS[ring_id × RING_SIZE_MAX + hash % ring_size]`, read from the map).
    pub fn ring_pick(&self, vip: &VipKey, hash: u32) -> u32 {
        let spec = self
            .dp
            .vip(vip)
            .unwrap_or_else(|| panic!("unknown vip {}", vpnlb::dataplane::vip_label(vip)));
        self.ring_slot(spec.ring_id, hash % spec.ring_size)
    }

    fn snapshot(&self) -> StatsSnapshot {
        let m = self.maps();
        let counters = m
            .counters()
            .unwrap_or_else(|e| panic!("reading STATS: {}", chain(&e)));
        let vips = (0..MAX_VIPS)
            .map(|i| {
                m.vip_stats(i)
                    .unwrap_or_else(|e| panic!("reading VIP_STATS[{i}]: {}", chain(&e)))
            })
            .collect();
        let backends = (0..MAX_BACKENDS)
            .map(|i| {
                m.backend_stats(i)
                    .unwrap_or_else(|e| panic!("reading BACKEND_STATS[{i}]: {}", chain(&e)))
            })
            .collect();
        StatsSnapshot {
            counters,
            vips,
            backends,
        }
    }

    fn program(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Runs `frame` through the ingress program once (frames must be ≥ 14 bytes: the kernel's
    /// `BPF_PROG_TEST_RUN` refuses shorter ones with EINVAL).
    pub fn run(&mut self, frame: &[u8], ingress_ifindex: u32) -> Run {
        self.run_prog(prog_names::INGRESS, frame, ingress_ifindex)
    }

    /// Runs `frame` through `vpnlb_decap` once.
    pub fn run_decap(&mut self, frame: &[u8], ingress_ifindex: u32) -> Run {
        self.run_prog(prog_names::DECAP, frame, ingress_ifindex)
    }

    /// The raw test run, no bookkeeping: Ok((verdict, output)) or the syscall error.
    pub fn try_test_run(
        &mut self,
        prog: &str,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(u32, Vec<u8>, Duration), String> {
        let ctx = xdp_md(frame.len(), ingress_ifindex);
        let mut out = vec![0u8; frame.len() + 512];
        let p = self.program(prog);
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .map_err(|e| chain(&e))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
    }

    fn run_prog(&mut self, prog: &str, frame: &[u8], ingress_ifindex: u32) -> Run {
        let before = self.snapshot();
        let (action, output, duration) = self
            .try_test_run(prog, frame, ingress_ifindex)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN of {prog} ({} byte frame, ifindex {ingress_ifindex}): {e}",
                    frame.len()
                )
            });
        let after = self.snapshot();
        let counter_deltas = before
            .counters
            .iter()
            .zip(&after.counters)
            .enumerate()
            .filter(|(_, (b, a))| a != b)
            .map(|(i, (b, a))| (i as u32, a.wrapping_sub(*b)))
            .collect();
        let diff = |b: &[PktBytes], a: &[PktBytes]| -> Vec<(u32, PktBytes)> {
            b.iter()
                .zip(a)
                .enumerate()
                .filter(|(_, (b, a))| a != b)
                .map(|(i, (b, a))| {
                    (
                        i as u32,
                        PktBytes {
                            packets: a.packets.wrapping_sub(b.packets),
                            bytes: a.bytes.wrapping_sub(b.bytes),
                        },
                    )
                })
                .collect()
        };
        Run {
            action,
            output,
            counter_deltas,
            vip_deltas: diff(&before.vips, &after.vips),
            backend_deltas: diff(&before.backends, &after.backends),
            duration,
        }
    }

    /// Runs `input` through the ingress program and checks it against `exp`; see [`check_run`].
    pub fn check(&mut self, name: &str, input: &[u8], ingress_ifindex: u32, exp: &Expect) -> Run {
        let run = self.run(input, ingress_ifindex);
        check_run(name, input, &run, exp, true);
        run
    }

    /// Runs `input` through `vpnlb_decap` and checks it against `exp`.
    pub fn check_decap(
        &mut self,
        name: &str,
        input: &[u8],
        ingress_ifindex: u32,
        exp: &Expect,
    ) -> Run {
        let run = self.run_decap(input, ingress_ifindex);
        check_run(name, input, &run, exp, false);
        run
    }
}

/// Compares `run` with `exp`. On a mismatch writes `<target>/fixture-pcaps/<name>.pcap` (input,
/// expected, actual) and panics listing every difference. `ingress` adds the "exactly one ingress
/// outcome counter" rule.
pub fn check_run(name: &str, input: &[u8], run: &Run, exp: &Expect, ingress: bool) {
    let mut problems = Vec::new();
    if run.action != exp.action {
        problems.push(format!(
            "verdict {} ({}), expected {} ({})",
            action_name(run.action),
            run.action,
            action_name(exp.action),
            exp.action
        ));
    }
    let expected_bytes: Option<&[u8]> = match &exp.output {
        Output::Exact(b) => Some(b),
        Output::Unchanged => Some(input),
        Output::Ignore => None,
    };
    if let Some(want) = expected_bytes
        && run.output != want
    {
        let first = run
            .output
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(run.output.len().min(want.len()));
        problems.push(format!(
            "output differs (first at byte {first}; {} bytes, expected {}):\n-- expected\n{}-- actual\n{}",
            run.output.len(),
            want.len(),
            hexdump_diff(want, &run.output),
            hexdump_diff(&run.output, want)
        ));
    }
    if let Some(l2) = exp.check_outer_l2
        && let Err(e) = check_outer(&run.output, l2)
    {
        problems.push(format!("outer headers: {e}"));
    }
    let mut want_counters: Vec<(u32, u64)> = Vec::new();
    for c in &exp.counters {
        match want_counters.iter_mut().find(|(id, _)| id == c) {
            Some((_, n)) => *n += 1,
            None => want_counters.push((*c, 1)),
        }
    }
    want_counters.sort();
    if run.counter_deltas != want_counters {
        problems.push(format!(
            "counters moved {}, expected {}",
            run.counters_text(),
            counters_text(&want_counters)
        ));
    }
    if ingress {
        let outcomes = run.outcomes();
        if outcomes.len() != 1
            || run
                .counter_deltas
                .iter()
                .any(|(id, d)| INGRESS_OUTCOMES.contains(id) && *d != 1)
        {
            let names: Vec<&str> = outcomes.iter().map(|o| counter_name(*o)).collect();
            problems.push(format!(
                "exactly one outcome counter must move by 1, moved: {names:?}"
            ));
        }
    }
    let (want_vip, want_backend) = match exp.stats {
        Some((v, b)) => {
            let d = PktBytes {
                packets: 1,
                bytes: input.len() as u64,
            };
            (vec![(v, d)], vec![(b, d)])
        }
        None => (vec![], vec![]),
    };
    if run.vip_deltas != want_vip {
        problems.push(format!(
            "VIP_STATS moved {:?}, expected {:?}",
            run.vip_deltas, want_vip
        ));
    }
    if run.backend_deltas != want_backend {
        problems.push(format!(
            "BACKEND_STATS moved {:?}, expected {:?}",
            run.backend_deltas, want_backend
        ));
    }
    if problems.is_empty() {
        return;
    }
    let path = pcap_dir().join(format!("{name}.pcap"));
    let mut frames: Vec<&[u8]> = vec![input];
    if let Some(w) = expected_bytes {
        frames.push(w);
    }
    frames.push(&run.output);
    let saved = match pcap::write(&path, &frames) {
        Ok(()) => format!("pcap (input, expected, actual): {}", path.display()),
        Err(e) => format!("could not write {}: {e}", path.display()),
    };
    panic!(
        "fixture {name} failed:\n  - {}\n{saved}\n-- input\n{}",
        problems.join("\n  - "),
        hexdump_diff(input, input)
    );
}

/// Where failing fixtures leave their pcaps: `$VPNLB_FIXTURE_PCAPS`, else `<target>/fixture-pcaps`.
pub fn pcap_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VPNLB_FIXTURE_PCAPS") {
        return PathBuf::from(d);
    }
    // The test binary lives in <target>/<profile>/deps/.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(|t| t.join("fixture-pcaps")))
        .unwrap_or_else(|| std::env::temp_dir().join("vpnlb-fixture-pcaps"))
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// CLOCK_MONOTONIC_COARSE now, in ns (the clock `bpf_ktime_get_coarse_ns` reads).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A backend spec with the usual test MACs.
pub fn backend(id: u32, addr: IpAddr, ifindex: u32, state: u32) -> BackendSpec {
    BackendSpec {
        id,
        addr,
        mac: [0x02, 0xbb, 0, 0, 0, id as u8],
        src_mac: [0x02, 0xaa, 0, 0, 0, 0x01],
        ifindex,
        weight: 1,
        state,
    }
}
