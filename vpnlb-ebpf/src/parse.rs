//! Stage 1: validate Ethernet (one 802.1Q tag at most), IPv4/IPv6 and the UDP/TCP/ESP header exactly
//! as docs/datapath.md says, and record where the headers are.

use aya_ebpf::programs::XdpContext;
use vpnlb_common::{
    FAMILY_V4, FAMILY_V6, PASS_ESP_BAD_SPI, PASS_FRAGMENT, PASS_IPV4_BAD_IHL, PASS_IPV4_BAD_TOTLEN,
    PASS_IPV4_BAD_VERSION, PASS_IPV4_TRUNCATED, PASS_IPV6_BAD_PAYLOAD_LEN, PASS_IPV6_BAD_VERSION,
    PASS_IPV6_EXT_HDR, PASS_IPV6_TRUNCATED, PASS_L2_TRUNCATED, PASS_L4_TRUNCATED, PASS_NOT_IP,
    PASS_OTHER_PROTO, PASS_TCP_BAD_DOFF, PASS_UDP_BAD_LEN, PASS_VLAN_STACKED, PROTO_ESP, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    bytes::{bytes_at, frame_len, load16, load32},
    hdr::{
        ESP_LEN, ETH_LEN, ETH_P_8021AD_BE, ETH_P_8021Q_BE, ETH_P_IP_BE, ETH_P_IPV6_BE,
        FRAG_HDR_LEN, ICMP_LEN, IPV4_LEN, IPV6_LEN, PROTO_FRAGMENT, PROTO_ICMP, PROTO_ICMPV6,
        TCP_LEN, UDP_LEN, VLAN_ETH_LEN,
    },
    stats::Stop,
};

/// The Ethernet header: its length (14, or 18 with one 802.1Q tag) and the (inner) EtherType in
/// network order. Errors are `PASS_*` counter ids.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Result<(usize, u16), u32> {
    let eth = bytes_at(ctx, 0, ETH_LEN).ok_or(PASS_L2_TRUNCATED)?;
    // SAFETY: 14 bytes at `eth` are in the packet.
    let proto = unsafe { load16(eth.add(12)) };
    if proto == ETH_P_8021AD_BE {
        return Err(PASS_VLAN_STACKED);
    }
    if proto != ETH_P_8021Q_BE {
        return Ok((ETH_LEN, proto));
    }
    let eth = bytes_at(ctx, 0, VLAN_ETH_LEN).ok_or(PASS_L2_TRUNCATED)?;
    // SAFETY: 18 bytes at `eth` are in the packet.
    let proto = unsafe { load16(eth.add(16)) };
    if proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE {
        return Err(PASS_VLAN_STACKED);
    }
    Ok((VLAN_ETH_LEN, proto))
}

/// `Packet::frag`: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// `Packet::frag`: the first fragment (offset 0, more fragments): it has the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// `Packet::frag`: a later fragment (offset > 0): no L4 header; `l4` must not be read.
pub const FRAG_LATER: u8 = 2;

/// A packet that passed stage 1.
pub struct Packet {
    /// Bytes in the frame as received.
    pub frame_len: u32,
    /// 14, or 18 with an 802.1Q tag.
    pub l2_len: u32,
    /// The IP header: at least 20 (IPv4) or 40 (IPv6) bytes are known to be present.
    pub l3: *const u8,
    /// The L4 header: at least 8 (UDP, ESP) or 20 (TCP) bytes are known to be present (not for
    /// `FRAG_LATER`, where it equals `l3` and must not be read as L4).
    pub l4: *const u8,
    /// The L4 length `L` (the fragment's share for a fragment).
    pub l4_len: u32,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// The fragment identification (IPv4: 16 bits; IPv6: the Fragment header's 32), host order.
    pub frag_id: u32,
    /// `FAMILY_V4` / `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_UDP`, `PROTO_TCP`, `PROTO_ESP`, or `PROTO_ICMP`/`PROTO_ICMPV6` for a PMTU message
    /// (then `l4` is its ICMP header, 8 bytes present).
    pub proto: u8,
    /// The DSCP/ECN byte (IPv4 TOS, IPv6 traffic class).
    pub tos: u8,
}

/// Runs stage 1 on the frame.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stop> {
    let frame_len = frame_len(ctx);
    let (l2_len, ethertype) = ethernet(ctx).map_err(Stop)?;
    let ip_room = frame_len - l2_len as u32;
    let ip = if ethertype == ETH_P_IP_BE {
        ipv4(ctx, l2_len, ip_room)?
    } else if ethertype == ETH_P_IPV6_BE {
        ipv6(ctx, l2_len, ip_room)?
    } else {
        return Err(Stop(PASS_NOT_IP));
    };
    // A later fragment carries no L4 header; ICMP has its own checks.
    let l4 = if ip.frag == FRAG_LATER {
        ip.l3
    } else if ip.proto == ip.icmp_proto {
        pmtu_icmp(ctx, &ip)?
    } else {
        l4(ctx, &ip)?
    };
    Ok(Packet {
        frame_len,
        l2_len: l2_len as u32,
        l3: ip.l3,
        l4,
        l4_len: ip.l4_len,
        frag: ip.frag,
        frag_id: ip.frag_id,
        family: ip.family,
        proto: ip.proto,
        tos: ip.tos,
    })
}

/// What the IP stage hands to the L4 stage.
struct Ip {
    l3: *const u8,
    /// Offset of the L4 header from the start of the frame.
    l4_off: usize,
    /// The L4 length `L` (never more than the frame holds after `l4_off`).
    l4_len: u32,
    family: u8,
    proto: u8,
    tos: u8,
    frag: u8,
    frag_id: u32,
    /// The ICMP protocol number of this family (1 or 58).
    icmp_proto: u8,
}

/// The fragment kind from the offset and the more-fragments flag.
#[inline(always)]
fn frag_kind(offset: u16, more: bool) -> u8 {
    if offset != 0 {
        FRAG_LATER
    } else if more {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3_off: usize, ip_room: u32) -> Result<Ip, Stop> {
    let h = bytes_at(ctx, l3_off, IPV4_LEN).ok_or(Stop(PASS_IPV4_TRUNCATED))?;
    // SAFETY: 20 bytes at `h` are in the packet.
    let (vihl, tos, tot_len, ip_id, frag, proto) = unsafe {
        (
            *h,
            *h.add(1),
            u16::from_be(load16(h.add(2))),
            u16::from_be(load16(h.add(4))),
            u16::from_be(load16(h.add(6))),
            *h.add(9),
        )
    };
    if vihl >> 4 != 4 {
        return Err(Stop(PASS_IPV4_BAD_VERSION));
    }
    let hlen = u32::from(vihl & 0x0f) * 4;
    if hlen < IPV4_LEN as u32 {
        return Err(Stop(PASS_IPV4_BAD_IHL));
    }
    if hlen > ip_room {
        return Err(Stop(PASS_IPV4_TRUNCATED));
    }
    let tot_len = u32::from(tot_len);
    if tot_len < hlen || tot_len > ip_room {
        return Err(Stop(PASS_IPV4_BAD_TOTLEN));
    }
    // Offset and more-fragments flag in one test first: most packets are not fragments.
    let frag = if frag & 0x3fff == 0 {
        FRAG_NONE
    } else {
        frag_kind(frag & 0x1fff, frag & 0x2000 != 0)
    };
    let icmp = proto == PROTO_ICMP && frag == FRAG_NONE;
    if proto != PROTO_UDP && proto != PROTO_TCP && proto != PROTO_ESP && !icmp {
        return Err(Stop(PASS_OTHER_PROTO));
    }
    Ok(Ip {
        l3: h,
        l4_off: l3_off + hlen as usize,
        l4_len: tot_len - hlen,
        family: FAMILY_V4,
        proto,
        tos,
        frag,
        frag_id: u32::from(ip_id),
        icmp_proto: PROTO_ICMP,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3_off: usize, ip_room: u32) -> Result<Ip, Stop> {
    let h = bytes_at(ctx, l3_off, IPV6_LEN).ok_or(Stop(PASS_IPV6_TRUNCATED))?;
    // SAFETY: 40 bytes at `h` are in the packet.
    let (b0, b1, payload_len, next) =
        unsafe { (*h, *h.add(1), u16::from_be(load16(h.add(4))), *h.add(6)) };
    if b0 >> 4 != 6 {
        return Err(Stop(PASS_IPV6_BAD_VERSION));
    }
    let payload_len = u32::from(payload_len);
    if payload_len == 0 || IPV6_LEN as u32 + payload_len > ip_room {
        return Err(Stop(PASS_IPV6_BAD_PAYLOAD_LEN));
    }
    let (mut next, mut hdrs, mut frag, mut frag_id) = (next, IPV6_LEN, FRAG_NONE, 0);
    if next == PROTO_FRAGMENT {
        // The Fragment header right after the fixed header: next header, offset and M flag, id.
        if payload_len < FRAG_HDR_LEN as u32 {
            return Err(Stop(PASS_FRAGMENT));
        }
        let f = bytes_at(ctx, l3_off + IPV6_LEN, FRAG_HDR_LEN).ok_or(Stop(PASS_FRAGMENT))?;
        // SAFETY: 8 bytes at `f` are in the packet.
        let (nh, off_m, id) = unsafe { (*f, u16::from_be(load16(f.add(2))), load32(f.add(4))) };
        next = nh;
        hdrs += FRAG_HDR_LEN;
        frag = frag_kind(off_m >> 3, off_m & 1 != 0);
        frag_id = u32::from_be(id);
    }
    match next {
        0 | 43 | 44 | 60 | 135 | 139 | 140 | 253 | 254 => return Err(Stop(PASS_IPV6_EXT_HDR)),
        PROTO_UDP | PROTO_TCP | PROTO_ESP => {}
        PROTO_ICMPV6 if frag == FRAG_NONE => {}
        _ => return Err(Stop(PASS_OTHER_PROTO)),
    }
    Ok(Ip {
        l3: h,
        l4_off: l3_off + hdrs,
        l4_len: payload_len - (hdrs - IPV6_LEN) as u32,
        family: FAMILY_V6,
        proto: next,
        tos: (b0 << 4) | (b1 >> 4),
        frag,
        frag_id,
        icmp_proto: PROTO_ICMPV6,
    })
}

/// An ICMP packet (not fragmented) is ours only as a PMTU message: ICMP type 3 code 4
/// ("fragmentation needed") or ICMPv6 type 2 ("packet too big"); need 8 bytes of ICMP header.
/// Anything else is `PASS_OTHER_PROTO`. Returns the ICMP header.
#[inline(always)]
fn pmtu_icmp(ctx: &XdpContext, ip: &Ip) -> Result<*const u8, Stop> {
    if ip.l4_len < ICMP_LEN as u32 {
        return Err(Stop(PASS_OTHER_PROTO));
    }
    let h = bytes_at(ctx, ip.l4_off, ICMP_LEN).ok_or(Stop(PASS_OTHER_PROTO))?;
    // SAFETY: 8 bytes at `h` are in the packet.
    let (ty, code) = unsafe { (*h, *h.add(1)) };
    let pmtu = if ip.family == FAMILY_V4 {
        ty == 3 && code == 4
    } else {
        ty == 2
    };
    if !pmtu {
        return Err(Stop(PASS_OTHER_PROTO));
    }
    Ok(h)
}

/// Checks the L4 header against `L` and returns a pointer to it.
#[inline(always)]
fn l4(ctx: &XdpContext, ip: &Ip) -> Result<*const u8, Stop> {
    let len = ip.l4_len;
    match ip.proto {
        PROTO_UDP => {
            if len < UDP_LEN as u32 {
                return Err(Stop(PASS_L4_TRUNCATED));
            }
            // verifier: `L >= 8` already implies the bytes exist, but the verifier needs the test.
            let u = bytes_at(ctx, ip.l4_off, UDP_LEN).ok_or(Stop(PASS_L4_TRUNCATED))?;
            // SAFETY: 8 bytes at `u` are in the packet.
            let udp_len = u32::from(u16::from_be(unsafe { load16(u.add(4)) }));
            // A first fragment holds only part of the datagram the UDP length counts.
            if udp_len < UDP_LEN as u32 || (udp_len > len && ip.frag != FRAG_FIRST) {
                return Err(Stop(PASS_UDP_BAD_LEN));
            }
            Ok(u)
        }
        PROTO_TCP => {
            if len < TCP_LEN as u32 {
                return Err(Stop(PASS_L4_TRUNCATED));
            }
            // verifier: `L >= 20` already implies the bytes exist, but the verifier needs the test.
            let t = bytes_at(ctx, ip.l4_off, TCP_LEN).ok_or(Stop(PASS_L4_TRUNCATED))?;
            // SAFETY: 20 bytes at `t` are in the packet.
            let doff = u32::from(unsafe { *t.add(12) } >> 4);
            if doff < 5 || doff * 4 > len {
                return Err(Stop(PASS_TCP_BAD_DOFF));
            }
            Ok(t)
        }
        _ => {
            if len < ESP_LEN as u32 {
                return Err(Stop(PASS_L4_TRUNCATED));
            }
            // verifier: `L >= 8` already implies the bytes exist, but the verifier needs the test.
            let e = bytes_at(ctx, ip.l4_off, ESP_LEN).ok_or(Stop(PASS_L4_TRUNCATED))?;
            // SAFETY: 8 bytes at `e` are in the packet.
            if unsafe { load32(e) } == 0 {
                return Err(Stop(PASS_ESP_BAD_SPI));
            }
            Ok(e)
        }
    }
}
