//! Stage 5 (encapsulation): prepend an outer IPv4/IPv6 header (IPIP, IP6IP6, 4in6, 6in4) and for
//! GUE a UDP header, keeping the original L2 header (VLAN tag included) in front.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use vpnlb_common::{
    Backend, DROP_ADJUST_FAILED, DROP_BACKEND_BAD, DROP_ENCAP_TOO_BIG, FAMILY_V4, FAMILY_V6,
    FWD_GUE, FWD_IPIP, FWD_MODE_GUE, GlobalConfig, PROTO_UDP, VipMeta,
};

use crate::{
    bytes::{bytes_at, load32, store16, store32},
    hdr::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_LEN, IPV6_LEN, PROTO_IPIP, PROTO_IPV6, UDP_LEN,
        VLAN_ETH_LEN,
    },
    l2::set_macs,
    maps::CONFIG,
    parse::Packet,
    stats::Stop,
};

const OUTER_TTL: u32 = 64;

/// Encapsulates the frame for backend `b` and returns the outcome (`FWD_IPIP` or `FWD_GUE`).
#[inline(always)]
pub fn encap(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    b: &Backend,
    hash: u32,
) -> Result<u32, Stop> {
    let gue = vip.fwd_mode == FWD_MODE_GUE;
    let outer_v6 = match b.family {
        FAMILY_V4 => false,
        FAMILY_V6 => true,
        _ => return Err(Stop(DROP_BACKEND_BAD)),
    };
    let overhead =
        (if outer_v6 { IPV6_LEN } else { IPV4_LEN } + if gue { UDP_LEN } else { 0 }) as u32;
    let inner_len = pkt.frame_len - pkt.l2_len;
    let outer_len = inner_len + overhead;
    if vip.mtu != 0 && outer_len > vip.mtu {
        return Err(Stop(DROP_ENCAP_TOO_BIG));
    }
    // Borrowed, not copied: the writers read the few words they need from the map value.
    // verifier: the lookup needs a test; entry 0 of an array always exists, so it never fails.
    let cfg = CONFIG.get(0).ok_or(Stop(DROP_ADJUST_FAILED))?;
    let h = Outer {
        tos: u32::from(pkt.tos),
        inner_len,
        outer_len,
        inner_proto: if pkt.family == FAMILY_V4 {
            u32::from(PROTO_IPIP)
        } else {
            u32::from(PROTO_IPV6)
        },
        hash,
        gue_port_be: vip.gue_port.to_be(),
    };
    let vlan = pkt.l2_len == VLAN_ETH_LEN as u32;
    // The 802.1Q TPID + TCI, read before the head moves.
    let tag = if vlan {
        // verifier: parse proved 18 bytes at `data`, but that range is not carried over here.
        let eth = bytes_at(ctx, 0, VLAN_ETH_LEN).ok_or(Stop(DROP_ADJUST_FAILED))?;
        // SAFETY: 18 bytes at `eth` are in the packet.
        unsafe { load32(eth.add(12)) }
    } else {
        0
    };

    // SAFETY: `ctx.ctx` is the context the kernel passed to this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Stop(DROP_ADJUST_FAILED));
    }
    // verifier: adjust_head invalidated every packet pointer; each write below re-derives one from
    // the new `data` behind its own range check. None can fail: the frame only grew.
    set_macs(ctx, b).ok_or(Stop(DROP_ADJUST_FAILED))?;
    let ethertype = if outer_v6 { ETH_P_IPV6_BE } else { ETH_P_IP_BE };
    let l3 = if vlan {
        // verifier: the tag and EtherType writes at 12..18 need an 18-byte range.
        let eth = bytes_at(ctx, 0, VLAN_ETH_LEN).ok_or(Stop(DROP_ADJUST_FAILED))?;
        // SAFETY: 18 bytes at `eth` are in the packet.
        unsafe {
            store32(eth.add(12), tag);
            store16(eth.add(16), ethertype);
        }
        VLAN_ETH_LEN
    } else {
        // verifier: the EtherType write at 12..14 needs a 14-byte range.
        let eth = bytes_at(ctx, 0, ETH_LEN).ok_or(Stop(DROP_ADJUST_FAILED))?;
        // SAFETY: 14 bytes at `eth` are in the packet.
        unsafe { store16(eth.add(12), ethertype) };
        ETH_LEN
    };
    // One monomorphic writer per header shape, so each range check has a constant length.
    match (outer_v6, gue) {
        (false, false) => h.write::<false, false>(ctx, l3, cfg, b),
        (false, true) => h.write::<false, true>(ctx, l3, cfg, b),
        (true, false) => h.write::<true, false>(ctx, l3, cfg, b),
        (true, true) => h.write::<true, true>(ctx, l3, cfg, b),
    }?;
    Ok(if gue { FWD_GUE } else { FWD_IPIP })
}

/// The values that go into the outer headers.
struct Outer {
    /// Inner DSCP/ECN byte.
    tos: u32,
    inner_len: u32,
    outer_len: u32,
    /// 4 or 41, used when there is no UDP header.
    inner_proto: u32,
    hash: u32,
    gue_port_be: u16,
}

impl Outer {
    /// Writes the outer IP (+UDP) header at `l3` bytes into the (already grown) frame.
    #[inline(always)]
    fn write<const V6: bool, const GUE: bool>(
        &self,
        ctx: &XdpContext,
        l3: usize,
        cfg: &GlobalConfig,
        b: &Backend,
    ) -> Result<(), Stop> {
        let ip_len = if V6 { IPV6_LEN } else { IPV4_LEN };
        let len = ip_len + if GUE { UDP_LEN } else { 0 };
        // verifier: the header writes need `l3 + len` proven against data_end.
        let p = bytes_at(ctx, l3, len).ok_or(Stop(DROP_ADJUST_FAILED))?;
        let proto = if GUE {
            u32::from(PROTO_UDP)
        } else {
            self.inner_proto
        };
        // SAFETY: `len` bytes at `p` are in the packet, and each writer stays inside them.
        unsafe {
            if V6 {
                self.ipv6(p, proto, cfg, b);
            } else {
                self.ipv4(p, proto, cfg, b);
            }
            if GUE {
                self.udp(p.add(ip_len));
            }
        }
        Ok(())
    }

    /// Outer IPv4: 0x45, TOS, total length, id 0, DF, TTL 64, protocol, checksum, source with
    /// hash bits, destination `b.addr[0]`.
    ///
    /// # Safety
    /// 20 bytes at `p` must be in the packet.
    #[inline(always)]
    unsafe fn ipv4(&self, p: *mut u8, proto: u32, cfg: &GlobalConfig, b: &Backend) {
        let mask = cfg.encap_src_v4_hash_mask;
        let src = (cfg.encap_src_v4 & !mask) | (self.hash & mask);
        let dst = b.addr[0];
        // Words as they sit in memory (little-endian loads of wire bytes).
        let w0 = 0x45 | (self.tos << 8) | (u32::from((self.outer_len as u16).to_be()) << 16);
        let w1 = 0x40 << 16; // id 0; flags/offset 0x4000 (DF) on the wire
        let ttl_proto = OUTER_TTL | (proto << 8);
        let csum = ipv4_csum(w0, w1, ttl_proto, src, dst);
        // SAFETY: the caller guarantees 20 bytes at `p`.
        unsafe {
            store32(p, w0);
            store32(p.add(4), w1);
            store32(p.add(8), ttl_proto | (u32::from(csum) << 16));
            store32(p.add(12), src);
            store32(p.add(16), dst);
        }
    }

    /// Outer IPv6: version 6, traffic class, flow label from the hash, payload length, next
    /// header, hop limit 64, source with hash bits in word 3, destination `b.addr`.
    ///
    /// # Safety
    /// 40 bytes at `p` must be in the packet.
    #[inline(always)]
    unsafe fn ipv6(&self, p: *mut u8, proto: u32, cfg: &GlobalConfig, b: &Backend) {
        let w0 = ((6 << 28) | (self.tos << 20) | (self.hash & 0xF_FFFF)).to_be();
        let payload_len = self.outer_len - IPV6_LEN as u32;
        let w1 = u32::from((payload_len as u16).to_be()) | (proto << 16) | (OUTER_TTL << 24);
        let mask = cfg.encap_src_v6_hash_mask;
        let s = cfg.encap_src_v6;
        let src3 = (s[3] & !mask) | (self.hash & mask);
        // SAFETY: the caller guarantees 40 bytes at `p`.
        unsafe {
            store32(p, w0);
            store32(p.add(4), w1);
            store32(p.add(8), s[0]);
            store32(p.add(12), s[1]);
            store32(p.add(16), s[2]);
            store32(p.add(20), src3);
            store32(p.add(24), b.addr[0]);
            store32(p.add(28), b.addr[1]);
            store32(p.add(32), b.addr[2]);
            store32(p.add(36), b.addr[3]);
        }
    }

    /// GUE variant 1 UDP header: source port from the hash, destination the VIP's GUE port,
    /// length, checksum 0.
    ///
    /// # Safety
    /// 8 bytes at `p` must be in the packet.
    #[inline(always)]
    unsafe fn udp(&self, p: *mut u8) {
        let sport = (0xC000 | (self.hash & 0x3FFF)) as u16;
        let ports = u32::from(sport.to_be()) | (u32::from(self.gue_port_be) << 16);
        let len = ((UDP_LEN as u32 + self.inner_len) as u16).to_be();
        // SAFETY: the caller guarantees 8 bytes at `p`.
        unsafe {
            store32(p, ports);
            store32(p.add(4), u32::from(len));
        }
    }
}

/// RFC 1071 checksum of an IPv4 header given as its in-memory words (checksum field zero). The
/// one's-complement sum is byte-order independent, so summing the little-endian halves and storing
/// the result the same way gives the right wire bytes.
#[inline(always)]
fn ipv4_csum(w0: u32, w1: u32, ttl_proto: u32, src: u32, dst: u32) -> u16 {
    let halves = |w: u32| u64::from(w & 0xffff) + u64::from(w >> 16);
    let mut sum = halves(w0) + halves(w1) + u64::from(ttl_proto) + halves(src) + halves(dst);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
