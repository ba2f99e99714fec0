//! The production object loaded with its maps pinned in a unique directory under /sys/fs/bpf (as the
//! agent pins them), `vpnlb_ingress` loaded for test runs, the maps programmed through `Dataplane`,
//! and a temp dir for agent-side files (`ids.json`, a control socket path). Pins and the temp dir are
//! removed on drop, also when a test fails. Root only; the calling thread is pinned to CPU 0 so
//! per-CPU state is read where test runs wrote it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::Ebpf;
use aya::programs::Xdp;
use vpnlb::dataplane::Dataplane;
use vpnlb::dataplane::loader::{self, LoadOptions};
use vpnlb::dataplane::maps::AyaMaps;
use vpnlb_common::prog_names;

use crate::harness::{pin_to_cpu, require_root};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct PinnedObject {
    pub ebpf: Ebpf,
    pub dp: Dataplane<AyaMaps>,
    /// The pin directory (what `--pin-dir` / the agent's `pin_dir` would name).
    pub pins: PathBuf,
    /// Temp dir holding `ids.json` next to `socket`.
    pub dir: PathBuf,
    /// A control socket path nobody listens on (the CLI looks for `ids.json` beside it).
    pub socket: PathBuf,
}

impl PinnedObject {
    /// Loads the object (from `VPNLB_EBPF_OBJ` or the dev build) with `ring_rows` ring rows and
    /// 4096 sessions; `tag` names the directories (`vpnlb-<tag>-<pid>-<n>`).
    pub fn new(tag: &str, ring_rows: u32) -> PinnedObject {
        require_root();
        pin_to_cpu(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let pins = PathBuf::from(format!("/sys/fs/bpf/vpnlb-{tag}-{pid}-{n}"));
        let dir = std::env::temp_dir().join(format!("vpnlb-{tag}-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&pins);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let obj = loader::object_bytes().unwrap_or_else(|e| panic!("no eBPF object: {e}"));
        let opts = LoadOptions {
            pin_dir: Some(pins.clone()),
            max_sessions: Some(4096),
            ring_rows: Some(ring_rows),
        };
        let mut ebpf = loader::load(&obj, &opts).unwrap_or_else(|e| panic!("load: {e:?}"));
        let prog: &mut Xdp = ebpf
            .program_mut(prog_names::INGRESS)
            .expect("vpnlb_ingress")
            .try_into()
            .unwrap();
        prog.load().unwrap_or_else(|e| panic!("verifier: {e:?}"));
        let maps = AyaMaps::from_ebpf(&mut ebpf).unwrap();
        let socket = dir.join("control.sock");
        PinnedObject {
            ebpf,
            dp: Dataplane::with_ring_rows(maps, ring_rows),
            pins,
            dir,
            socket,
        }
    }
}

impl Drop for PinnedObject {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.pins) {
            eprintln!("removing {}: {e}", self.pins.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
