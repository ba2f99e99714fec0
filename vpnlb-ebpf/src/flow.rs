//! Stage 2: the session key (`FlowKey`) of a parsed packet, addresses and ports in wire order.

use vpnlb_common::{FAMILY_V4, FlowKey};

use crate::{
    bytes::load32,
    parse::{FRAG_LATER, Packet},
};

/// Builds the five-tuple key: addresses as on the wire (IPv4 in word 0), the first 4 bytes of the
/// L4 header (ports, or the ESP SPI; 0 for a later fragment), protocol and family; padding zeroed.
#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    let h = pkt.l3;
    // SAFETY: parse proved 20 (IPv4) / 40 (IPv6) bytes at `l3` and at least 8 bytes at `l4`; the
    // offsets read here stay inside those.
    let (src, dst, ports) = unsafe {
        let (src, dst) = if pkt.family == FAMILY_V4 {
            ([load32(h.add(12)), 0, 0, 0], [load32(h.add(16)), 0, 0, 0])
        } else {
            (
                [
                    load32(h.add(8)),
                    load32(h.add(12)),
                    load32(h.add(16)),
                    load32(h.add(20)),
                ],
                [
                    load32(h.add(24)),
                    load32(h.add(28)),
                    load32(h.add(32)),
                    load32(h.add(36)),
                ],
            )
        };
        // A later fragment has no ports: 0.
        let ports = if pkt.frag == FRAG_LATER {
            0
        } else {
            load32(pkt.l4)
        };
        (src, dst, ports)
    };
    // Every byte is written (no memset), so the key can go straight to a map helper.
    FlowKey {
        src,
        dst,
        ports,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}
