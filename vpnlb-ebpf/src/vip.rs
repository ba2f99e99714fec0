//! Stage 3: find the VIP a flow is addressed to (`VIPS`), or let the packet pass.

use vpnlb_common::{FlowKey, PASS_NOT_VIP, PROTO_ESP, VipKey, VipMeta};

use crate::{maps::VIPS, stats::Stop};

/// The VIP of `key`: destination address, destination port as on the wire (0 for ESP), protocol.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Result<&'static VipMeta, Stop> {
    let vk = VipKey {
        addr: key.dst,
        // The second half of the wire-order ports word (little-endian load) is the destination port.
        port_be: if key.proto == PROTO_ESP {
            0
        } else {
            (key.ports >> 16) as u16
        },
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: this program never inserts into or deletes from VIPS, so the entry cannot be recycled
    // under us by our own updates; a concurrent userspace update of the same VIP may be read half
    // old, half new for this one packet, which every BPF map reader accepts (the agent writes a
    // VIP's ring and backends before the VIP itself).
    unsafe { VIPS.get(vk) }.ok_or(Stop(PASS_NOT_VIP))
}
