//! Counter helpers: the per-CPU outcome/event counters, the per-VIP and per-backend packet/byte
//! pairs, and `Stop`, the early-exit outcome that maps a counter id to its verdict.

use aya_ebpf::{bindings::xdp_action, btf_maps::PerCpuArray};
use vpnlb_common::{PktBytes, is_drop};

use crate::maps::STATS;

/// Adds one to the `STATS` counter `id` on this CPU.
#[inline(always)]
pub fn count(id: u32) {
    if let Some(p) = STATS.get_ptr_mut(id) {
        // SAFETY: `p` points at this CPU's slot of a per-CPU array entry, which only this program
        // invocation touches (no preemption inside an XDP run); the kernel keeps it valid.
        unsafe { *p += 1 };
    }
}

/// Adds one packet of `bytes` to entry `idx` of a `PktBytes` per-CPU array.
#[inline(always)]
pub fn add_pkt<const N: usize>(map: &PerCpuArray<PktBytes, N>, idx: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(idx) {
        // SAFETY: as in `count`: this CPU's slot of a per-CPU array entry, valid and unshared.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}

/// A packet that leaves the pipeline without being forwarded: the `STATS` id of its outcome
/// (`PASS_*`, `DROP_*` or `DECAP_*`). The verdict follows from the id through the outcome table
/// `vpnlb_common::COUNTERS`.
#[derive(Clone, Copy)]
pub struct Stop(pub u32);

impl Stop {
    /// Counts the outcome and returns its verdict: `XDP_DROP` for the outcomes the table says drop,
    /// else `XDP_PASS`.
    #[inline(always)]
    pub fn finish(self) -> u32 {
        count(self.0);
        if is_drop(self.0) {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        }
    }
}
