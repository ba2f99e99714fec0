//! Stage 4b: the Maglev pick, one slot of the VIP's ring in `RINGS` (or of its traffic class's
//! ring, chosen by DSCP through `CLASS_RINGS`).

use vpnlb_common::{DROP_NO_BACKEND, VIP_F_CLASSES, VipMeta, class_slot_index, ring_slot_index};

use crate::{
    maps::{CLASS_RINGS, RINGS},
    stats::Stop,
};

/// The ring a new flow is picked from: the VIP's, unless it has classes and the packet's DSCP
/// maps to a class ring (`CLASS_RINGS` holds ring id + 1; 0 = the VIP's own ring).
#[inline(always)]
fn ring_of(vip: &VipMeta, tos: u8) -> u32 {
    if vip.flags & VIP_F_CLASSES != 0 {
        let slot = class_slot_index(vip.vip_id, (tos >> 2) as u32);
        if let Some(r) = CLASS_RINGS.get(slot).copied()
            && r != 0
        {
            return r - 1;
        }
    }
    vip.ring_id
}

/// The backend id in slot `hash % ring_size` of the ring for this packet; `DROP_NO_BACKEND` when
/// the VIP has no ring yet or the slot is empty (a slot past the end of a shrunken `RINGS` reads as
/// empty).
#[inline(always)]
pub fn pick(vip: &VipMeta, hash: u32, tos: u8) -> Result<u32, Stop> {
    let size = vip.ring_size;
    if size == 0 {
        return Err(Stop(DROP_NO_BACKEND));
    }
    let idx = ring_slot_index(ring_of(vip, tos), hash % size);
    match RINGS.get(idx).copied() {
        Some(id) if id != 0 => Ok(id),
        _ => Err(Stop(DROP_NO_BACKEND)),
    }
}
