//! The verifier's figures of the XDP programs and their checked-in budget
//! (`vpnlb-ebpf/budget.toml`): verified instructions (the verifier's "processed N insns"), the
//! translated size (`bpftool prog show`: xlated) and the stack depth (the verifier's "stack depth").
//! The budget test (tests/budget.rs) fails when a figure exceeds its budget by more than the
//! tolerance; `cargo xtask bench` prints the figures beside its rows.
//!
//! Instructions and size come from the kernel's program info of the object loaded the way the
//! agent loads it. The stack depth is only in the verifier log, and aya keeps no log of a load that
//! succeeds, so the same relocated instructions are loaded a second time with the statistics log
//! level (`BPF_LOG_STATS`); that load must report the same instruction count, or the figures are
//! refused (`VPNLB_BUDGET_LOG=1` prints its log). Root only (loads programs).

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aya::maps::{MapFd, MapInfo};
use aya::programs::Xdp;
use serde::{Deserialize, Serialize};
use vpnlb::dataplane::loader::{LoadOptions, load};
use vpnlb_common::prog_names;

/// The programs with a budget, in the order they are printed.
pub const PROGRAMS: [&str; 2] = [prog_names::INGRESS, prog_names::DECAP];

/// Where the budget lives (in the eBPF crate, beside the code it limits).
pub const BUDGET_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../vpnlb-ebpf/budget.toml");

/// One program's figures as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Figures {
    /// The verifier's "processed N insns" (`verified_insns` in the program info).
    pub verified_insns: u32,
    /// Size of the translated program in bytes (8 per instruction; `bpftool prog show`: xlated).
    pub xlated_bytes: u32,
    /// The verifier's "stack depth" in bytes (the sum over subprograms; of at most 512).
    pub stack_depth: u32,
}

/// One program's budget.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramBudget {
    pub verified_insns: u32,
    pub xlated_bytes: u32,
    pub stack_depth: u32,
    /// Why the budget is what it is (the reason of its last raise).
    pub reason: String,
}

/// `vpnlb-ebpf/budget.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// How far above its budget a figure may go, in percent.
    pub tolerance_pct: f64,
    pub vpnlb_ingress: ProgramBudget,
    pub vpnlb_decap: ProgramBudget,
}

impl Budget {
    /// Reads and parses [`BUDGET_FILE`].
    pub fn load() -> Budget {
        let text = std::fs::read_to_string(BUDGET_FILE)
            .unwrap_or_else(|e| panic!("reading {BUDGET_FILE}: {e}"));
        toml::from_str(&text).unwrap_or_else(|e| panic!("parsing {BUDGET_FILE}: {e}"))
    }

    /// The budget of program `name`.
    pub fn program(&self, name: &str) -> &ProgramBudget {
        match name {
            prog_names::INGRESS => &self.vpnlb_ingress,
            prog_names::DECAP => &self.vpnlb_decap,
            _ => panic!("no budget for program {name}"),
        }
    }

    /// The figures of `name` over their budget by more than the tolerance, as
    /// (what, figure, budget).
    pub fn exceeded(&self, name: &str, f: &Figures) -> Vec<(&'static str, u32, u32)> {
        let b = self.program(name);
        let limit = |budget: u32| f64::from(budget) * (1.0 + self.tolerance_pct / 100.0);
        [
            ("verified_insns", f.verified_insns, b.verified_insns),
            ("xlated_bytes", f.xlated_bytes, b.xlated_bytes),
            ("stack_depth", f.stack_depth, b.stack_depth),
        ]
        .into_iter()
        .filter(|(_, figure, budget)| f64::from(*figure) > limit(*budget))
        .collect()
    }
}

/// Loads `obj` (small maps: their sizes do not change what the verifier sees) and measures every
/// program in [`PROGRAMS`].
pub fn measure(obj: &[u8]) -> BTreeMap<&'static str, Figures> {
    let mut ebpf = load(
        obj,
        &LoadOptions {
            pin_dir: None,
            max_sessions: Some(4096),
            ring_rows: Some(1),
        },
    )
    .expect("load the eBPF object");
    let mut info = BTreeMap::new();
    let mut map_ids = HashSet::new();
    for name in PROGRAMS {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} in the object"))
            .try_into()
            .expect("an XDP program");
        prog.load()
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        let i = prog.info().expect("program info");
        map_ids.extend(i.map_ids().expect("map ids").unwrap_or_default());
        let insns = i
            .verified_instruction_count()
            .expect("verified_insns (kernel >= 5.16)");
        let xlated = i.size_translated().expect("xlated size");
        info.insert(name, (insns, xlated));
    }
    let stacks = reload_with_stats(obj, &map_ids);
    PROGRAMS
        .into_iter()
        .map(|name| {
            let (verified_insns, xlated_bytes) = info[name];
            let (processed, stack_depth) = stacks[name];
            assert_eq!(
                processed, verified_insns,
                "{name}: the statistics reload processed {processed} insns, the agent's load \
                 {verified_insns}: the reload does not reproduce the program"
            );
            (
                name,
                Figures {
                    verified_insns,
                    xlated_bytes,
                    stack_depth,
                },
            )
        })
        .collect()
}

/// The prefix of the kernel's `union bpf_attr` that BPF_PROG_LOAD reads here (the rest is zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP`: what aya loads an interface XDP program with.
const BPF_XDP: u32 = 37;
/// `BPF_LOG_STATS`: only the final statistics lines ("processed ...", "stack depth ...").
const BPF_LOG_STATS: u32 = 4;

/// Relocates `obj`'s programs against the maps already created for it (`map_ids`, matched by
/// name) exactly as aya does, loads each of [`PROGRAMS`] again with `BPF_LOG_STATS` and returns
/// (processed insns, stack depth) per program.
fn reload_with_stats(obj: &[u8], map_ids: &HashSet<u32>) -> BTreeMap<&'static str, (u32, u32)> {
    let mut parsed = aya_obj::Object::parse(obj).expect("parse the eBPF object");
    // The kernel keeps the first 15 bytes of a map name.
    let kernel_maps: Vec<(String, MapFd)> = map_ids
        .iter()
        .map(|id| {
            let m = MapInfo::from_id(*id).expect("map info");
            let name = m.name_as_str().expect("map name").to_string();
            (name, m.fd().expect("map fd"))
        })
        .collect();
    // Owned copies of the definitions: relocation borrows the object mutably.
    let maps: Vec<(String, i32, aya_obj::Map)> = parsed
        .maps
        .iter()
        .filter_map(|(name, m)| {
            let short = &name[..name.len().min(15)];
            let (_, fd) = kernel_maps.iter().find(|(k, _)| k == short)?;
            Some((name.clone(), fd.as_fd().as_raw_fd(), m.clone()))
        })
        .collect();
    let text_sections: HashSet<usize> = parsed.functions.keys().map(|(s, _)| *s).collect();
    parsed
        .relocate_maps(
            maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
            &text_sections,
        )
        .expect("relocate maps");
    parsed
        .relocate_calls(&text_sections)
        .expect("relocate calls");
    PROGRAMS
        .into_iter()
        .map(|name| {
            let prog = &parsed.programs[name];
            let insns = &parsed.functions[&prog.function_key()].instructions;
            let log = load_stats(name, insns, &prog.license);
            if std::env::var_os("VPNLB_BUDGET_LOG").is_some() {
                eprintln!("{name}:\n{log}");
            }
            (name, parse_stats(name, &log))
        })
        .collect()
}

/// BPF_PROG_LOAD of `insns` as an XDP program with the statistics log; returns the log.
fn load_stats(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &std::ffi::CStr,
) -> String {
    let mut log = vec![0u8; 1 << 16];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: BPF_LOG_STATS,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD prefix whose pointers (instructions, license, log
    // buffer with its length) outlive the call; the kernel zero-extends the rest of the union.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>(),
        )
    };
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).into_owned();
    if fd < 0 {
        panic!(
            "reloading {name} with the statistics log: {}\n{text}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the syscall returned a new program fd that nothing else owns; dropping closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    text
}

/// (processed insns, stack depth) from a statistics log: "processed 1234 insns (limit ...) ..."
/// and "stack depth 224" (subprograms: "stack depth 224+0+16", summed).
fn parse_stats(name: &str, log: &str) -> (u32, u32) {
    let after = |prefix: &str| {
        log.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("{name}: no \"{prefix}\" in the verifier log:\n{log}"))
    };
    let processed = after("processed ");
    let processed = processed
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: bad \"processed\" line: {processed}"));
    let stack = after("stack depth ");
    let stack = stack
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .split('+')
        .map(|n| n.parse::<u32>())
        .sum::<Result<u32, _>>()
        .unwrap_or_else(|_| panic!("{name}: bad \"stack depth\" line: {stack}"));
    (processed, stack)
}

/// The figures as a table, one row per program, with the budget beside each figure when given.
pub fn table(figures: &BTreeMap<&'static str, Figures>, budget: Option<&Budget>) -> String {
    let mut out = format!(
        "{:<14} {:>16} {:>16} {:>12}\n",
        "program", "verified insns", "xlated bytes", "stack"
    );
    for name in PROGRAMS {
        let f = figures[name];
        let cell = |v: u32, b: Option<u32>| match b {
            Some(b) => format!("{v} / {b}"),
            None => v.to_string(),
        };
        let b = budget.map(|b| b.program(name));
        out += &format!(
            "{:<14} {:>16} {:>16} {:>12}\n",
            name,
            cell(f.verified_insns, b.map(|b| b.verified_insns)),
            cell(f.xlated_bytes, b.map(|b| b.xlated_bytes)),
            cell(f.stack_depth, b.map(|b| b.stack_depth)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_file_parses_with_a_reason_per_program() {
        let b = Budget::load();
        assert!(b.tolerance_pct > 0.0 && b.tolerance_pct <= 10.0);
        for name in PROGRAMS {
            let p = b.program(name);
            assert!(!p.reason.trim().is_empty(), "{name}: reason");
            assert!(
                p.stack_depth <= 512,
                "{name}: the verifier's stack is 512 bytes"
            );
        }
    }

    #[test]
    fn exceeded_allows_the_tolerance() {
        let b = Budget::load();
        let base = b.program(prog_names::INGRESS).clone();
        let f = |insns: u32| Figures {
            verified_insns: insns,
            xlated_bytes: base.xlated_bytes,
            stack_depth: base.stack_depth,
        };
        let within = (f64::from(base.verified_insns) * (1.0 + b.tolerance_pct / 100.0)) as u32;
        assert!(b.exceeded(prog_names::INGRESS, &f(within)).is_empty());
        let over = b.exceeded(prog_names::INGRESS, &f(within + 1));
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].0, "verified_insns");
    }

    #[test]
    fn stats_lines_are_parsed() {
        let log = "processed 2345 insns (limit 1000000) max_states_per_insn 4 total_states 120 \
                   peak_states 120 mark_read 40\nstack depth 224+0+16\nverification time 1234 usec\n";
        assert_eq!(parse_stats("p", log), (2345, 240));
        assert_eq!(
            parse_stats("p", "stack depth 304\nprocessed 7 insns (limit 1)"),
            (7, 304)
        );
    }
}
