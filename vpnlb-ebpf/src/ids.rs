//! Stage 3b: the session id a packet carries for its VIP's VPN protocol (docs/datapath.md,
//! "Session ids"): the WireGuard receiver index, the IKE responder SPI, the ESP SPI (native or
//! NAT-T) or the OpenVPN peer-id (with the client's folded address), all chosen by the gateway.

use core::mem::MaybeUninit;

use aya_ebpf::programs::XdpContext;
use vpnlb_common::{
    FlowKey, ID_ESP, ID_IKE, ID_OPENVPN, ID_WIREGUARD, IdKey, PROTO_ESP, PROTO_UDP, VIP_F_IDS,
    VIP_F_IDS_IPSEC, VIP_F_IDS_WIREGUARD, VipMeta,
};

use crate::{
    bytes::{View, load16},
    hdr::UDP_LEN,
    parse::Packet,
};

/// IKE's well-known port: the IKE header starts the UDP payload (no non-ESP marker).
const IKE_PORT_BE: u16 = 500u16.to_be();
/// IKE header length (RFC 7296 3.1).
const IKE_HDR_LEN: u32 = 28;
/// OpenVPN's P_DATA_V2 opcode (top 5 bits of the first payload byte).
const P_DATA_V2: u8 = 9;
/// "No peer-id" in P_DATA_V2.
const PEER_ID_UNSET: u32 = 0x00FF_FFFF;

/// The IKE responder SPI of the header at payload offset `off` (None when zero or short).
#[inline(always)]
fn ike_responder_spi(p: &View, off: usize) -> Option<(u8, u64)> {
    if p.len() < off as u32 + IKE_HDR_LEN {
        return None;
    }
    let lo = p.word(off + 8)?;
    let hi = p.word(off + 12)?;
    let spi = u64::from(lo) | (u64::from(hi) << 32);
    (spi != 0).then_some((ID_IKE, spi))
}

/// The id key of the packet, or `None` when the VIP learns no ids or the packet carries none.
#[inline(always)]
pub fn session_id(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, vip: &VipMeta) -> Option<IdKey> {
    let flags = vip.flags;
    // Most VIPs learn no ids: one test, before any protocol check.
    if flags & VIP_F_IDS == 0 {
        return None;
    }
    let (kind, id) = if key.proto == PROTO_ESP {
        if flags & VIP_F_IDS_IPSEC == 0 {
            return None;
        }
        // The SPI (non-zero, checked by parse) is the first word of the ESP header.
        (ID_ESP, u64::from(key.ports))
    } else {
        if key.proto != PROTO_UDP {
            return None;
        }
        // SAFETY: parse proved the 8-byte UDP header at `l4`.
        let udp_len = u32::from(u16::from_be(unsafe { load16(pkt.l4.add(4)) }));
        // A first fragment holds less than the UDP length says: only what `L` covers.
        let len = if udp_len < pkt.l4_len {
            udp_len
        } else {
            pkt.l4_len
        };
        let p = View::new(ctx, pkt.l4.wrapping_add(UDP_LEN), len - UDP_LEN as u32);
        if flags & VIP_F_IDS_WIREGUARD != 0 {
            wireguard(&p)?
        } else if flags & VIP_F_IDS_IPSEC != 0 {
            ipsec(&p, (key.ports >> 16) as u16)?
        } else {
            openvpn(&p, &key.src)?
        }
    };
    Some(id_key(key, kind, id))
}

/// The `IdKey` of (`key`'s VIP address and family, `kind`, `id`). Kind, family and the 6 pad bytes
/// go in as one u64 store: a `_pad: [0; 6]` literal at offset 26 compiles to a call of the
/// byte-loop `memset` on every id packet.
#[inline(always)]
fn id_key(key: &FlowKey, kind: u8, id: u64) -> IdKey {
    const _: () = assert!(core::mem::offset_of!(IdKey, kind) == 24);
    let mut k = MaybeUninit::<IdKey>::uninit();
    let p = k.as_mut_ptr();
    // SAFETY: every byte of the key is written (16 + 8 + 8 at offsets 0, 16, 24; the tail word is
    // 8-aligned), so it is initialised; all fields are plain integers.
    unsafe {
        (&raw mut (*p).addr).write(key.dst);
        (&raw mut (*p).id).write(id);
        (&raw mut (*p).kind)
            .cast::<u64>()
            .write(u64::from_ne_bytes([kind, key.family, 0, 0, 0, 0, 0, 0]));
        k.assume_init()
    }
}

/// Receiver index: type 4 (transport data) and 3 (cookie reply) at offset 4, type 2 (handshake
/// response) at offset 8; the three reserved bytes after the type must be zero.
#[inline(always)]
fn wireguard(p: &View) -> Option<(u8, u64)> {
    let head = p.word(0)?;
    let (msg_type, reserved) = (head & 0xff, head >> 8);
    if reserved != 0 {
        return None;
    }
    let index = match msg_type {
        3 | 4 => p.word(4)?,
        2 => p.word(8)?,
        _ => return None,
    };
    Some((ID_WIREGUARD, u64::from(index)))
}

/// UDP 500: the IKE header; any other port (NAT-T): a single 0xff byte is a keepalive (no id),
/// a zero non-ESP marker is followed by the IKE header, otherwise the payload is ESP (SPI first).
#[inline(always)]
fn ipsec(p: &View, dport_be: u16) -> Option<(u8, u64)> {
    if dport_be == IKE_PORT_BE {
        return ike_responder_spi(p, 0);
    }
    let marker = p.word(0)?;
    if marker == 0 {
        return ike_responder_spi(p, 4);
    }
    // An ESP header is at least SPI + sequence number.
    p.at(0, 8)?;
    Some((ID_ESP, u64::from(marker)))
}

/// P_DATA_V2 (opcode 9): the 24-bit peer-id in payload bytes 1..4, unless unset (0xFFFFFF),
/// followed by the source address folded to 32 bits (the XOR of its wire-order words: IPv4 is the
/// address itself). Every openvpn server numbers peer-ids from 0, so the bare peer-id is not
/// unique across gateways; with the client's address it is (a rebound source port keeps it).
#[inline(always)]
fn openvpn(p: &View, src: &[u32; 4]) -> Option<(u8, u64)> {
    let w = p.word(0)?;
    if (w & 0xff) as u8 >> 3 != P_DATA_V2 {
        return None;
    }
    let peer = w >> 8;
    if peer == PEER_ID_UNSET {
        return None;
    }
    let folded = src[0] ^ src[1] ^ src[2] ^ src[3];
    Some((ID_OPENVPN, u64::from(peer) | (u64::from(folded) << 24)))
}
