//! PMTU messages (docs/datapath.md, "PMTU messages"): an ICMP "fragmentation needed" or ICMPv6
//! "packet too big" sent to a VIP quotes a packet the gateway sent from the VIP to a client; the
//! quote, reversed, is that client's flow. This file finds that flow; the message then goes where
//! the flow goes (its VIP, its session read only, else its hash: session.rs) and is forwarded the
//! flow's way.

use aya_ebpf::programs::XdpContext;
use vpnlb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, PASS_ICMP_BAD_QUOTE, PROTO_ESP, PROTO_TCP, PROTO_UDP,
};

use crate::{
    bytes::{View, load16, load32},
    hdr::ICMP_LEN,
    parse::Packet,
    stats::Stop,
};

const BAD: Stop = Stop(PASS_ICMP_BAD_QUOTE);

/// What the quote parsers return for a bad quote (protocol 0). They return a bare `FlowKey`, not a
/// `Result`: a key behind an enum tag sits 4 bytes off 8-byte alignment, and the zero words of an
/// IPv4 key are then stored as a misaligned u64, which the verifier refuses.
const NO_FLOW: FlowKey = FlowKey {
    src: [0; 4],
    dst: [0; 4],
    ports: 0,
    proto: 0,
    family: 0,
    _pad: [0; 2],
};

/// The flow a PMTU message is about: the quoted packet's flow key, reversed. The message must be
/// addressed to the address the quoted packet came from (the VIP); else `PASS_ICMP_BAD_QUOTE`.
#[inline(always)]
pub fn quoted_flow(ctx: &XdpContext, pkt: &Packet) -> Result<FlowKey, Stop> {
    // The quoted packet: what the ICMP length covers after the ICMP header.
    let q = View::new(
        ctx,
        pkt.l4.wrapping_add(ICMP_LEN),
        pkt.l4_len - ICMP_LEN as u32,
    );
    let key = if pkt.family == FAMILY_V4 {
        quote_v4(&q)
    } else {
        quote_v6(&q)
    };
    if key.proto == NO_FLOW.proto {
        return Err(BAD);
    }
    // SAFETY: parse proved 20 (IPv4) / 40 (IPv6) bytes at `l3`.
    let to = unsafe {
        if pkt.family == FAMILY_V4 {
            [load32(pkt.l3.add(16)), 0, 0, 0]
        } else {
            [
                load32(pkt.l3.add(24)),
                load32(pkt.l3.add(28)),
                load32(pkt.l3.add(32)),
                load32(pkt.l3.add(36)),
            ]
        }
    };
    if to != key.dst {
        return Err(BAD);
    }
    Ok(key)
}

/// The client flow of a quoted IPv4 packet (VIP → client): need the IPv4 header (version 4,
/// IHL >= 5, not a later fragment, UDP/TCP/ESP) and 4 bytes of its L4 header.
#[inline(always)]
fn quote_v4(q: &View) -> FlowKey {
    let Some(h) = q.at(0, 20) else {
        return NO_FLOW;
    };
    // SAFETY: 20 bytes at `h` are in the packet.
    let (vihl, frag, proto, src, dst) = unsafe {
        (
            *h,
            u16::from_be(load16(h.add(6))),
            *h.add(9),
            load32(h.add(12)),
            load32(h.add(16)),
        )
    };
    let hlen = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || hlen < 20 || frag & 0x1fff != 0 || !l4_proto(proto) {
        return NO_FLOW;
    }
    let Some(l4) = q.at(hlen, 4) else {
        return NO_FLOW;
    };
    // SAFETY: 4 bytes at `l4` are in the packet.
    let ports = unsafe { load32(l4) };
    // Only word 0 of each address: the rest stays zero from NO_FLOW (zero words built in place
    // can be merged into a misaligned u64 store).
    let mut k = reversed(NO_FLOW.src, NO_FLOW.dst, ports, proto, FAMILY_V4);
    k.src[0] = dst;
    k.dst[0] = src;
    k
}

/// The client flow of a quoted IPv6 packet: need the 40-byte header (version 6, next header
/// UDP/TCP/ESP: no extension headers) and 4 bytes of its L4 header.
#[inline(always)]
fn quote_v6(q: &View) -> FlowKey {
    let Some(h) = q.at(0, 44) else {
        return NO_FLOW;
    };
    // SAFETY: 44 bytes at `h` are in the packet.
    let (b0, proto, src, dst, ports) = unsafe {
        (
            *h,
            *h.add(6),
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
            load32(h.add(40)),
        )
    };
    if b0 >> 4 != 6 || !l4_proto(proto) {
        return NO_FLOW;
    }
    reversed(dst, src, ports, proto, FAMILY_V6)
}

#[inline(always)]
fn l4_proto(p: u8) -> bool {
    p == PROTO_UDP || p == PROTO_TCP || p == PROTO_ESP
}

/// The flow key of the client's direction: addresses swapped and, for UDP/TCP, the ports (the
/// two halves of the wire-order word); ESP keeps the quoted SPI.
#[inline(always)]
fn reversed(src: [u32; 4], dst: [u32; 4], ports: u32, proto: u8, family: u8) -> FlowKey {
    FlowKey {
        src,
        dst,
        ports: if proto == PROTO_ESP {
            ports
        } else {
            ports.rotate_left(16)
        },
        proto,
        family,
        _pad: [0; 2],
    }
}
