//! Stage 4b: the Maglev pick, one slot of the VIP's ring in `RINGS`.

use vpnlb_common::{DROP_NO_BACKEND, VipMeta, ring_slot_index};

use crate::{maps::RINGS, stats::Stop};

/// The backend id in slot `hash % ring_size` of the VIP's ring; `DROP_NO_BACKEND` when the VIP has
/// no ring yet or the slot is empty (a slot past the end of a shrunken `RINGS` reads as empty).
#[inline(always)]
pub fn pick(vip: &VipMeta, hash: u32) -> Result<u32, Stop> {
    let size = vip.ring_size;
    if size == 0 {
        return Err(Stop(DROP_NO_BACKEND));
    }
    let idx = ring_slot_index(vip.ring_id, hash % size);
    match RINGS.get(idx).copied() {
        Some(id) if id != 0 => Ok(id),
        _ => Err(Stop(DROP_NO_BACKEND)),
    }
}
