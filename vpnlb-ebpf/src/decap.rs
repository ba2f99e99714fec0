//! The gateway-side program `vpnlb_decap`: strip an outer IPv4/IPv6 (+GUE UDP) header so the kernel
//! receives the client's original packet, keeping the L2 header (VLAN tag included) in front.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use vpnlb_common::{
    DECAP_ADJUST_FAILED, DECAP_BAD_INNER, DECAP_GUE, DECAP_IPIP, DECAP_PASS, PROTO_UDP,
};

use crate::{
    bytes::{bytes_at, load16, load32, store16, store32},
    hdr::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_LEN, IPV6_LEN, PROTO_IPIP, PROTO_IPV6, UDP_LEN,
        VLAN_ETH_LEN,
    },
    maps::CONFIG,
    parse::ethernet,
    stats::{Stop, count},
};

/// Decapsulates one IPIP/IP6IP6/4in6/6in4 or GUE packet; anything else passes untouched.
#[inline(always)]
pub fn try_decap(ctx: &XdpContext) -> Result<u32, Stop> {
    let pass = Stop(DECAP_PASS);
    let (l2_len, ethertype) = ethernet(ctx).map_err(|_| pass)?;
    let (ip_len, proto) = if ethertype == ETH_P_IP_BE {
        let h = bytes_at(ctx, l2_len, IPV4_LEN).ok_or(pass)?;
        // SAFETY: 20 bytes at `h` are in the packet.
        let (vihl, frag, proto) = unsafe { (*h, load16(h.add(6)), *h.add(9)) };
        // Version 4 with IHL exactly 5; no MF flag and no fragment offset.
        if vihl != 0x45 || u16::from_be(frag) & 0x3fff != 0 {
            return Err(pass);
        }
        (IPV4_LEN, proto)
    } else if ethertype == ETH_P_IPV6_BE {
        let h = bytes_at(ctx, l2_len, IPV6_LEN).ok_or(pass)?;
        // SAFETY: 40 bytes at `h` are in the packet.
        let (b0, next) = unsafe { (*h, *h.add(6)) };
        if b0 >> 4 != 6 {
            return Err(pass);
        }
        (IPV6_LEN, next)
    } else {
        return Err(pass);
    };

    // `want`: the inner version nibble required (0 = 4 or 6).
    let (overhead, outcome, want) = match proto {
        PROTO_IPIP => (ip_len, DECAP_IPIP, 4),
        PROTO_IPV6 => (ip_len, DECAP_IPIP, 6),
        PROTO_UDP => {
            let u = bytes_at(ctx, l2_len + ip_len, UDP_LEN).ok_or(pass)?;
            // SAFETY: 8 bytes at `u` are in the packet.
            let dport = u16::from_be(unsafe { load16(u.add(2)) });
            let port = CONFIG.get(0).map_or(0, |c| c.decap_gue_port);
            if port == 0 || dport != port {
                return Err(pass);
            }
            (ip_len + UDP_LEN, DECAP_GUE, 0)
        }
        _ => return Err(pass),
    };
    let inner = bytes_at(ctx, l2_len + overhead, 1).ok_or(Stop(DECAP_BAD_INNER))?;
    // SAFETY: 1 byte at `inner` is in the packet.
    let version = unsafe { *inner } >> 4;
    let ok = if want == 0 {
        version == 4 || version == 6
    } else {
        version == want
    };
    if !ok {
        return Err(Stop(DECAP_BAD_INNER));
    }
    let inner_ethertype = if version == 4 {
        ETH_P_IP_BE
    } else {
        ETH_P_IPV6_BE
    };

    // Keep the MACs (and the 802.1Q tag) before the head moves past them.
    let vlan = l2_len == VLAN_ETH_LEN;
    // verifier: `ethernet` proved these bytes, but its range is not carried over to here.
    let eth = bytes_at(ctx, 0, ETH_LEN).ok_or(pass)?;
    // SAFETY: 14 bytes at `eth` are in the packet.
    let macs = unsafe { [load32(eth), load32(eth.add(4)), load32(eth.add(8))] };
    let tag = if vlan {
        // verifier: the tag read at 12..16 needs an 18-byte range from `data`.
        let eth = bytes_at(ctx, 0, VLAN_ETH_LEN).ok_or(pass)?;
        // SAFETY: 18 bytes at `eth` are in the packet.
        unsafe { load32(eth.add(12)) }
    } else {
        0
    };

    // SAFETY: `ctx.ctx` is the context the kernel passed to this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, overhead as i32) } != 0 {
        return Err(Stop(DECAP_ADJUST_FAILED));
    }
    // verifier: adjust_head invalidated every packet pointer, so each write needs a fresh range
    // check. The new frame is the L2 header plus at least one inner byte: these never fail.
    let eth = bytes_at(ctx, 0, ETH_LEN).ok_or(Stop(DECAP_ADJUST_FAILED))?;
    // SAFETY: 14 bytes at `eth` are in the packet.
    unsafe {
        store32(eth, macs[0]);
        store32(eth.add(4), macs[1]);
        store32(eth.add(8), macs[2]);
    }
    if vlan {
        // verifier: the tag and EtherType writes at 12..18 need an 18-byte range.
        let eth = bytes_at(ctx, 0, VLAN_ETH_LEN).ok_or(Stop(DECAP_ADJUST_FAILED))?;
        // SAFETY: 18 bytes at `eth` are in the packet.
        unsafe {
            store32(eth.add(12), tag);
            store16(eth.add(16), inner_ethertype);
        }
    } else {
        // SAFETY: 14 bytes at `eth` are in the packet.
        unsafe { store16(eth.add(12), inner_ethertype) };
    }
    count(outcome);
    Ok(xdp_action::XDP_PASS)
}
