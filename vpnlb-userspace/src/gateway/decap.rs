//! `vpnlb decap attach|detach|status`: puts `vpnlb_decap` on a gateway's interfaces so IPIP/GUE
//! packets from the load balancer reach the VPN daemon as the client's original packet (this kernel
//! has no ipip/fou modules). The link is pinned like the agent's ([`crate::dataplane::attach`]): it
//! survives the command, and attaching again swaps the program in place. Pins live in their own
//! directory ([`default_pin_dir`]) so one host can be load balancer and gateway at once.

use std::path::{Path, PathBuf};

use aya::programs::Xdp;
use serde_json::json;
use vpnlb_common::{
    ABI_VERSION, COUNTER_NAMES, DECAP_ADJUST_FAILED, DECAP_IPIP, PIN_ROOT, map_names, prog_names,
};

use crate::dataplane::attach::AttachMode;
use crate::dataplane::attach::{self, Attached, link_pin};
use crate::dataplane::loader::{self, LoadOptions};
use crate::dataplane::maps::{AyaMaps, MapReader, MapWriter};

use super::host;

/// `/sys/fs/bpf/vpnlb/decap/v{ABI_VERSION}`: beside the LB's `v{N}` directory, never inside it.
pub fn default_pin_dir() -> PathBuf {
    Path::new(PIN_ROOT)
        .join("decap")
        .join(format!("v{ABI_VERSION}"))
}

/// The GUE port `vpnlb_decap` accepts by default: the config's default `gue_port`.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// The decap program only reads `CONFIG` and counts into `STATS`: the per-flow maps get the
/// smallest sizes the loader accepts instead of the LB's defaults.
fn load_options(pin_dir: &Path) -> LoadOptions {
    LoadOptions {
        pin_dir: Some(pin_dir.to_path_buf()),
        max_sessions: Some(1),
        ring_rows: Some(1),
    }
}

/// Loads the object over the pins in `pin_dir`, sets the GUE port (0 = IPIP only) and attaches
/// `vpnlb_decap` to `iface` (native, generic fallback with a warning, per `mode`).
pub fn attach(
    pin_dir: &Path,
    iface: &str,
    mode: AttachMode,
    gue_port: u16,
) -> anyhow::Result<Attached> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        anyhow::bail!("no interface {iface} in this network namespace");
    }
    let r = load_and_attach(pin_dir, iface, mode, gue_port);
    if r.is_err() {
        // Leave no maps behind that no program uses.
        let _ = unpin_if_unused(pin_dir);
    }
    r
}

fn load_and_attach(
    pin_dir: &Path,
    iface: &str,
    mode: AttachMode,
    gue_port: u16,
) -> anyhow::Result<Attached> {
    let obj = loader::object_bytes()?;
    let mut ebpf = loader::load(&obj, &load_options(pin_dir))?;
    {
        let prog: &mut Xdp = ebpf
            .program_mut(prog_names::DECAP)
            .ok_or_else(|| anyhow::anyhow!("the eBPF object has no {}", prog_names::DECAP))?
            .try_into()?;
        prog.load()?;
    }
    // The port first: the first decapsulated packet must already see it.
    {
        let mut maps = AyaMaps::open_pinned(pin_dir)?;
        let mut cfg = maps.config()?;
        cfg.decap_gue_port = gue_port;
        maps.set_config(&cfg)?;
    }
    let prog: &mut Xdp = ebpf
        .program_mut(prog_names::DECAP)
        .expect("checked above")
        .try_into()?;
    Ok(attach::attach(prog, iface, mode, pin_dir)?)
}

/// Removes `iface`'s link; with no link left, also unpins the maps (and removes the directories
/// when nothing else is in them).
pub fn detach(pin_dir: &Path, iface: &str) -> anyhow::Result<()> {
    attach::detach(pin_dir, iface)?;
    // The kernel releases the link after its last reference is gone, possibly a little later on a
    // busy machine: return once the interface no longer runs the program (or after 2 s, saying
    // so), so what the operator checks next sees the detached state.
    let t0 = std::time::Instant::now();
    while host::xdp_prog(iface).ok().flatten().as_deref() == Some(prog_names::DECAP) {
        if t0.elapsed() > std::time::Duration::from_secs(2) {
            tracing::warn!(
                iface,
                "the link is unpinned but {} still runs on {iface}",
                prog_names::DECAP
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unpin_if_unused(pin_dir)
}

/// Unpins the maps and removes the (empty) directories when no link is pinned any more.
fn unpin_if_unused(pin_dir: &Path) -> anyhow::Result<()> {
    if !pinned_links(pin_dir).is_empty() {
        return Ok(());
    }
    for name in map_names::ALL {
        let p = pin_dir.join(name);
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            anyhow::bail!("unpin {}: {e}", p.display());
        }
    }
    let links = link_pin(pin_dir, "x");
    let _ = std::fs::remove_dir(links.parent().expect("has parent"));
    let _ = std::fs::remove_dir(pin_dir);
    Ok(())
}

/// Interface names with a pinned decap link under `pin_dir`.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let dir = link_pin(pin_dir, "x");
    let mut v: Vec<String> = std::fs::read_dir(dir.parent().expect("has parent"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What `vpnlb decap status` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub pin_dir: PathBuf,
    /// `CONFIG.decap_gue_port` (0 = GUE off); None when nothing is pinned.
    pub gue_port: Option<u16>,
    /// Per pinned link: the interface and whether `vpnlb_decap` runs on it in this namespace.
    pub links: Vec<(String, bool)>,
    /// `decap_*` counters (name, value), summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
}

impl Status {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |c| c.1)
    }
}

/// Reads the pinned state under `pin_dir` (empty when nothing was ever attached).
pub fn status(pin_dir: &Path) -> anyhow::Result<Status> {
    let links = pinned_links(pin_dir)
        .into_iter()
        .map(|i| {
            let on = host::xdp_prog(&i).ok().flatten().as_deref() == Some(prog_names::DECAP);
            (i, on)
        })
        .collect();
    let (gue_port, counters) = if pin_dir.join(map_names::STATS).exists() {
        let maps = AyaMaps::open_pinned(pin_dir)?;
        let all = maps.counters()?;
        let counters = (DECAP_IPIP..=DECAP_ADJUST_FAILED)
            .map(|id| (COUNTER_NAMES[id as usize], all[id as usize]))
            .collect();
        (Some(maps.config()?.decap_gue_port), counters)
    } else {
        (None, Vec::new())
    };
    Ok(Status {
        pin_dir: pin_dir.to_path_buf(),
        gue_port,
        links,
        counters,
    })
}

/// `vpnlb decap status` as JSON and as text.
pub fn render(s: &Status) -> (serde_json::Value, String) {
    let counters: serde_json::Map<String, serde_json::Value> = s
        .counters
        .iter()
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect();
    let j = json!({
        "pin_dir": s.pin_dir,
        "gue_port": s.gue_port,
        "interfaces": s
            .links
            .iter()
            .map(|(i, on)| json!({"iface": i, "attached": on}))
            .collect::<Vec<_>>(),
        "counters": counters,
    });
    let mut t = format!("pin dir {}\n", s.pin_dir.display());
    if s.links.is_empty() {
        t.push_str("vpnlb_decap is not attached anywhere (vpnlb decap attach --iface IF)\n");
    }
    for (i, on) in &s.links {
        let state = if *on {
            "attached"
        } else {
            "pinned, not running on this interface here (another namespace, or the device is gone)"
        };
        t.push_str(&format!("{i}: {state}\n"));
    }
    match s.gue_port {
        Some(0) => t.push_str("GUE: off (IPIP only)\n"),
        Some(p) => t.push_str(&format!("GUE port: {p}\n")),
        None => {}
    }
    for (n, v) in &s.counters {
        t.push_str(&format!("{n:<20} {v}\n"));
    }
    (j, t)
}
