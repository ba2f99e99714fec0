//! Userspace reference model of the data plane, written from docs/datapath.md alone (not from the
//! XDP code): the differential test runs both on the same packets and maps and compares verdict,
//! output bytes and counters; `vpnlb simulate` uses it to explain where a packet would go.
//!
//! It runs on [`MemMaps`] as one CPU and applies the same side effects as `vpnlb_ingress` /
//! `vpnlb_decap`: counters, VIP/backend stats, session inserts and refreshes, the flood window.
//!
//! Where the spec leaves room, this model reads it as follows (also in the crate report):
//! - `now − last_seen_ns` and the flood window's `now − window_start_ns` are wrapping u64
//!   subtractions, as plain unsigned arithmetic in the program.
//! - A VIP `fwd_mode` other than L2 DSR, IPIP or GUE is `XDP_DROP` with `DROP_BACKEND_BAD`, decided
//!   in stage 5, i.e. after the session stage (the session is looked up, picked and recorded first).
//! - A session whose backend is both unusable and idle counts `SESSION_REPICK_DOWN` (usability is
//!   checked first); a cleared backend slot (state `BACKEND_UNUSED`) is not usable.
//! - On `DROP_REDIRECT_FAILED` the frame is returned as rewritten (MACs/encapsulation applied):
//!   the redirect is the last step. Other drops and every PASS return the input unchanged.
//! - The outer IPv4 total length / IPv6 payload length / GUE length are truncated to 16 bits.
//! - `ring_id × RING_SIZE_MAX + slot` and `vip_id × 64 + DSCP` are wrapping u32 arithmetic (a
//!   ring larger than a row reads into the next row; an index past the array reads as 0).

use vpnlb_common::hash::pick_hash;
use vpnlb_common::*;

mod kernel;

use crate::dataplane::maps::MemMaps;
use crate::dataplane::session_ids::IdPrefix;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const NS_PER_SEC: u64 = 1_000_000_000;
/// ICMP and ICMPv6 protocol numbers (PMTU messages).
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// IPv6 extension headers that make the packet `PASS_IPV6_EXT_HDR` (44, Fragment, is separate).
const IPV6_EXT_HDRS: [u8; 7] = [0, 43, 60, 135, 139, 140, 253];

/// What the program would see besides the frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelCtx {
    pub ingress_ifindex: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE).
    pub now_ns: u64,
}

/// The verdict and everything the model learnt on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelResult {
    /// `XDP_*` action (ABORTED 0, DROP 1, PASS 2, TX 3, REDIRECT 4).
    pub action: u32,
    /// Output frame; equals the input for PASS.
    pub frame: Vec<u8>,
    /// The one outcome counter id incremented.
    pub outcome: u32,
    /// `SESSION_*` counter ids incremented, in order.
    pub events: Vec<u32>,
    pub vip: Option<VipKey>,
    /// The backend chosen (by session or ring), also when it then turned out unusable.
    pub backend_id: Option<u32>,
    pub flow: Option<FlowKey>,
    pub hash: Option<u32>,
    /// The session id the packet carries for its VIP (VIPs with a `VIP_F_IDS_*` flag).
    pub session_id: Option<IdKey>,
}

impl ModelResult {
    fn new(frame: &[u8]) -> Self {
        ModelResult {
            action: XDP_PASS,
            frame: frame.to_vec(),
            outcome: 0,
            events: Vec::new(),
            vip: None,
            backend_id: None,
            flow: None,
            hash: None,
            session_id: None,
        }
    }
}

/// The kernel's name of an XDP action.
pub fn verdict_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_UNKNOWN",
    }
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// The four wire bytes at `off` as the u32 a little-endian load yields (wire order in memory).
fn wire32(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

/// Ethernet stage shared by both programs: (l2_len, EtherType) or the PASS reason.
fn parse_eth(f: &[u8]) -> Result<(usize, u16), u32> {
    if f.len() < ETH_HLEN {
        return Err(PASS_L2_TRUNCATED);
    }
    let mut et = be16(f, 12);
    if et == ETH_P_8021AD {
        return Err(PASS_VLAN_STACKED);
    }
    let mut l2 = ETH_HLEN;
    if et == ETH_P_8021Q {
        if f.len() < 18 {
            return Err(PASS_L2_TRUNCATED);
        }
        et = be16(f, 16);
        if et == ETH_P_8021Q || et == ETH_P_8021AD {
            return Err(PASS_VLAN_STACKED);
        }
        l2 = 18;
    }
    Ok((l2, et))
}

/// Fragment kinds (stage 1): not a fragment, first (offset 0, more fragments), later (offset > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frag {
    None,
    First,
    Later,
}

fn frag_of(offset: u16, more: bool) -> Frag {
    match (offset, more) {
        (0, false) => Frag::None,
        (0, true) => Frag::First,
        _ => Frag::Later,
    }
}

/// A packet that passed stage 1.
struct Parsed {
    l2_len: usize,
    /// Offset of the L4 header in the frame (a later fragment has none).
    l4: usize,
    /// The L4 length (the fragment's share of the datagram for fragments).
    l4_len: usize,
    frag: Frag,
    /// IPv4 identification or IPv6 Fragment header identification.
    frag_id: u32,
    /// The DSCP/ECN byte (IPv4 TOS or IPv6 traffic class).
    tos: u8,
    key: FlowKey,
}

/// Stage 1 (parse) and stage 2 (flow key).
fn parse(f: &[u8]) -> Result<Parsed, u32> {
    let (l2, et) = parse_eth(f)?;
    let l3 = l2;
    let avail = f.len() - l3;
    let (family, proto, src, dst, tos, l4, l4_len, frag, frag_id);
    match et {
        ETH_P_IPV4 => {
            if avail < 20 {
                return Err(PASS_IPV4_TRUNCATED);
            }
            if f[l3] >> 4 != 4 {
                return Err(PASS_IPV4_BAD_VERSION);
            }
            let ihl = (f[l3] & 0x0f) as usize * 4;
            if ihl < 20 {
                return Err(PASS_IPV4_BAD_IHL);
            }
            if avail < ihl {
                return Err(PASS_IPV4_TRUNCATED);
            }
            let tot = be16(f, l3 + 2) as usize;
            if tot < ihl || tot > avail {
                return Err(PASS_IPV4_BAD_TOTLEN);
            }
            proto = f[l3 + 9];
            let ff = be16(f, l3 + 6);
            frag = frag_of(ff & 0x1fff, ff & 0x2000 != 0);
            let icmp = proto == ICMP && frag == Frag::None;
            if ![PROTO_UDP, PROTO_TCP, PROTO_ESP].contains(&proto) && !icmp {
                return Err(PASS_OTHER_PROTO);
            }
            frag_id = u32::from(be16(f, l3 + 4));
            family = FAMILY_V4;
            tos = f[l3 + 1];
            src = [wire32(f, l3 + 12), 0, 0, 0];
            dst = [wire32(f, l3 + 16), 0, 0, 0];
            l4 = l3 + ihl;
            l4_len = tot - ihl;
        }
        ETH_P_IPV6 => {
            if avail < 40 {
                return Err(PASS_IPV6_TRUNCATED);
            }
            if f[l3] >> 4 != 6 {
                return Err(PASS_IPV6_BAD_VERSION);
            }
            let plen = be16(f, l3 + 4) as usize;
            if plen == 0 || 40 + plen > avail {
                return Err(PASS_IPV6_BAD_PAYLOAD_LEN);
            }
            let mut nh = f[l3 + 6];
            let mut hdrs = 40;
            (frag, frag_id) = if nh == 44 {
                // Fragment header: next header, offset << 3 | M, identification.
                if plen < 8 {
                    return Err(PASS_FRAGMENT);
                }
                let h = l3 + 40;
                nh = f[h];
                hdrs = 48;
                let om = be16(f, h + 2);
                (
                    frag_of(om >> 3, om & 1 != 0),
                    u32::from_be_bytes([f[h + 4], f[h + 5], f[h + 6], f[h + 7]]),
                )
            } else {
                (Frag::None, 0)
            };
            if IPV6_EXT_HDRS.contains(&nh) || nh == 254 || nh == 44 {
                return Err(PASS_IPV6_EXT_HDR);
            }
            let icmp = nh == ICMPV6 && frag == Frag::None;
            if ![PROTO_UDP, PROTO_TCP, PROTO_ESP].contains(&nh) && !icmp {
                return Err(PASS_OTHER_PROTO);
            }
            proto = nh;
            family = FAMILY_V6;
            tos = ((f[l3] & 0x0f) << 4) | (f[l3 + 1] >> 4);
            let w = |i: usize| wire32(f, l3 + 8 + 4 * i);
            src = [w(0), w(1), w(2), w(3)];
            dst = [w(4), w(5), w(6), w(7)];
            l4 = l3 + hdrs;
            l4_len = plen - (hdrs - 40);
        }
        _ => return Err(PASS_NOT_IP),
    }
    // L4, against l4_len (which never exceeds what the frame holds); a later fragment has none.
    match proto {
        _ if frag == Frag::Later => {}
        // ICMP is ours only as a PMTU message with its 8-byte header.
        ICMP | ICMPV6 => {
            let pmtu = if family == FAMILY_V4 {
                l4_len >= 8 && f[l4] == 3 && f[l4 + 1] == 4
            } else {
                l4_len >= 8 && f[l4] == 2
            };
            if !pmtu {
                return Err(PASS_OTHER_PROTO);
            }
        }
        PROTO_UDP => {
            if l4_len < 8 {
                return Err(PASS_L4_TRUNCATED);
            }
            // A first fragment holds only part of the datagram the UDP length counts.
            let ulen = be16(f, l4 + 4) as usize;
            if ulen < 8 || (ulen > l4_len && frag != Frag::First) {
                return Err(PASS_UDP_BAD_LEN);
            }
        }
        PROTO_TCP => {
            if l4_len < 20 {
                return Err(PASS_L4_TRUNCATED);
            }
            let doff = (f[l4 + 12] >> 4) as usize;
            if doff < 5 || doff * 4 > l4_len {
                return Err(PASS_TCP_BAD_DOFF);
            }
        }
        _ => {
            if l4_len < 8 {
                return Err(PASS_L4_TRUNCATED);
            }
            if wire32(f, l4) == 0 {
                return Err(PASS_ESP_BAD_SPI);
            }
        }
    }
    let key = FlowKey {
        src,
        dst,
        ports: if frag == Frag::Later || proto == ICMP || proto == ICMPV6 {
            0
        } else {
            wire32(f, l4)
        },
        proto,
        family,
        _pad: [0; 2],
    };
    Ok(Parsed {
        l2_len: l2,
        l4,
        l4_len,
        frag,
        frag_id,
        tos,
        key,
    })
}

/// "Session ids": the gateway-chosen id the packet carries for its VIP's protocol, if any.
fn session_id(f: &[u8], p: &Parsed, vip: &VipMeta) -> Option<IdKey> {
    let k = &p.key;
    let ids = vip.flags & VIP_F_IDS;
    let (kind, wire): (u8, &[u8]) = if k.proto == PROTO_ESP {
        if ids & VIP_F_IDS_IPSEC == 0 {
            return None;
        }
        (ID_ESP, &f[p.l4..p.l4 + 4])
    } else if k.proto == PROTO_UDP && ids != 0 {
        // A first fragment holds only what L covers of the UDP length.
        let ulen = (be16(f, p.l4 + 4) as usize).min(p.l4_len);
        let pl = &f[p.l4 + 8..p.l4 + ulen];
        if ids & VIP_F_IDS_WIREGUARD != 0 {
            // Type byte, three zero bytes, then the receiver index (type 2: after the sender's).
            if pl.len() < 4 || pl[1..4] != [0, 0, 0] {
                return None;
            }
            let at = match pl[0] {
                3 | 4 => 4,
                2 => 8,
                _ => return None,
            };
            (ID_WIREGUARD, pl.get(at..at + 4)?)
        } else if ids & VIP_F_IDS_IPSEC != 0 {
            let dport = be16(f, p.l4 + 2);
            let ike_at = if dport == 500 {
                0
            } else if pl.len() < 4 {
                // Shorter than a marker: a NAT-T keepalive (0xff) or nothing we know.
                return None;
            } else if pl[..4] == [0, 0, 0, 0] {
                4
            } else if pl.len() < 8 {
                return None;
            } else {
                return Some(id_key(k, ID_ESP, &pl[..4]));
            };
            let hdr = pl.get(ike_at..ike_at + 28)?;
            if hdr[8..16] == [0; 8] {
                return None;
            }
            (ID_IKE, &hdr[8..16])
        } else {
            // OpenVPN: P_DATA_V2 is opcode 9 in the top five bits; peer-id 0xFFFFFF is unset.
            if pl.len() < 4 || pl[0] >> 3 != 9 || pl[1..4] == [0xff, 0xff, 0xff] {
                return None;
            }
            // Peer-ids repeat across gateways: the id also holds the client's folded address.
            let mut id = [0u8; 7];
            id[..3].copy_from_slice(&pl[1..4]);
            id[3..].copy_from_slice(&fold_addr(f, p));
            return Some(id_key(k, ID_OPENVPN, &id));
        }
    } else {
        return None;
    };
    Some(id_key(k, kind, wire))
}

/// The packet's source address folded to 4 bytes: the XOR of its 4-byte groups (IPv4: itself).
fn fold_addr(f: &[u8], p: &Parsed) -> [u8; 4] {
    let (at, len) = if p.key.family == FAMILY_V6 {
        (p.l2_len + 8, 16)
    } else {
        (p.l2_len + 12, 4)
    };
    f[at..at + len].chunks(4).fold([0; 4], |mut acc, c| {
        acc.iter_mut().zip(c).for_each(|(a, b)| *a ^= b);
        acc
    })
}

fn id_key(k: &FlowKey, kind: u8, wire: &[u8]) -> IdKey {
    IdKey {
        addr: k.dst,
        id: id_from_wire(wire),
        kind,
        family: k.family,
        _pad: [0; 6],
    }
}

/// The backend a known id names: a static range (longest prefix) first, else the learned id.
fn id_owner(maps: &MemMaps, sid: &IdKey) -> Option<u32> {
    let full = IdPrefix::new(sid.kind, sid.id.to_le_bytes(), 64);
    maps.id_range_lookup(&full.data)
        .or_else(|| maps.session_ids.get(sid).copied())
}

fn vip_key_of(k: &FlowKey) -> VipKey {
    let port_be = if k.proto == PROTO_ESP {
        0
    } else {
        (k.ports >> 16) as u16
    };
    VipKey {
        addr: k.dst,
        port_be,
        proto: k.proto,
        family: k.family,
    }
}

fn usable(maps: &MemMaps, id: u32) -> bool {
    maps.backends
        .get(id as usize)
        .is_some_and(|b| b.state == BACKEND_UP || b.state == BACKEND_DRAINING)
}

fn count(maps: &mut MemMaps, id: u32) {
    if let Some(c) = maps.counters.get_mut(id as usize) {
        *c = c.wrapping_add(1);
    }
}

/// Internet checksum of an IPv4 header (checksum field zero on input).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Runs `vpnlb_ingress` on `frame` against `maps` (mutated like the program mutates its maps).
pub fn run_ingress(maps: &mut MemMaps, frame: &[u8], ctx: &ModelCtx) -> ModelResult {
    let mut r = ModelResult::new(frame);
    let (action, outcome) = ingress(maps, frame, ctx, &mut r);
    r.action = action;
    r.outcome = outcome;
    count(maps, outcome);
    for e in r.events.clone() {
        count(maps, e);
    }
    // The action of every outcome is the one vpnlb_common::COUNTERS gives it.
    let verdict = counters::verdict(outcome);
    debug_assert_eq!(verdict == Some(counters::Verdict::Drop), action == XDP_DROP);
    if verdict == Some(counters::Verdict::Forward) {
        let len = frame.len() as u64;
        let add = |s: &mut PktBytes| {
            s.packets = s.packets.wrapping_add(1);
            s.bytes = s.bytes.wrapping_add(len);
        };
        if let Some(vip) = r.vip.and_then(|k| maps.vips.get(&k).copied())
            && vip.vip_id < MAX_VIPS
        {
            add(maps.vip_stats.entry(vip.vip_id).or_default());
        }
        if let Some(id) = r.backend_id.filter(|id| *id < MAX_BACKENDS) {
            add(maps.backend_stats.entry(id).or_default());
        }
    }
    if action == XDP_PASS {
        debug_assert_eq!(r.frame, frame, "PASS must leave the packet untouched");
    }
    r
}

/// Stages 1-5; returns (action, outcome) and fills `r`.
fn ingress(maps: &mut MemMaps, frame: &[u8], ctx: &ModelCtx, r: &mut ModelResult) -> (u32, u32) {
    let p = match parse(frame) {
        Ok(p) => p,
        Err(reason) => return (XDP_PASS, reason),
    };
    if p.key.proto == ICMP || p.key.proto == ICMPV6 {
        return pmtu_message(maps, frame, ctx, &p, r);
    }
    r.flow = Some(p.key);
    if p.frag == Frag::Later {
        return later_fragment(maps, frame, ctx, &p, r);
    }
    let vkey = vip_key_of(&p.key);
    let Some(vip) = maps.vips.get(&vkey).copied() else {
        return (XDP_PASS, PASS_NOT_VIP);
    };
    r.vip = Some(vkey);
    let sid = session_id(frame, &p, &vip);
    r.session_id = sid;
    let now = ctx.now_ns;
    // A session hit uses the hash stored with the session; a new pick computes it.
    let mut hash = pick_hash(&p.key, vip.flags);

    // Stage 4.1: session.
    let mut chosen = None;
    match maps.sessions.get(&p.key).copied() {
        Some(s) => {
            let idle = now.wrapping_sub(s.last_seen_ns);
            if !usable(maps, s.backend_id) {
                r.events.push(SESSION_REPICK_DOWN);
            } else if vip.idle_timeout_ns != 0 && idle > vip.idle_timeout_ns {
                r.events.push(SESSION_REPICK_IDLE);
            } else {
                r.events.push(SESSION_HIT);
                if idle >= SESSION_TOUCH_NS
                    && let Some(s) = maps.sessions.get_mut(&p.key)
                {
                    s.last_seen_ns = now;
                }
                chosen = Some(s.backend_id);
                hash = s.hash;
                // Learn the id from the hit, writing only when it is news.
                if let Some(sid) = sid
                    && maps.session_ids.get(&sid) != Some(&s.backend_id)
                    && maps.env.max_session_ids != 0
                {
                    maps.id_insert(sid, s.backend_id);
                    r.events.push(SESSION_ID_LEARNED);
                    // Reported on EVENTS (the model's ring buffer never fills).
                    if maps.config.replicate != 0 {
                        r.events.push(REPL_EVENT);
                    }
                }
            }
        }
        None => r.events.push(SESSION_MISS),
    }
    // A new flow with a known id goes to the id's backend when it is usable.
    if chosen.is_none()
        && let Some(owner) = sid.and_then(|sid| id_owner(maps, &sid))
    {
        if usable(maps, owner) {
            r.events.push(SESSION_ID_USED);
            chosen = Some(owner);
        } else {
            r.events.push(SESSION_ID_REJECTED);
        }
    }
    let hit = r.events.contains(&SESSION_HIT);

    r.hash = Some(hash);
    let id = match chosen {
        Some(id) if hit => id,
        Some(id) => {
            r.backend_id = Some(id);
            record(maps, r, p.key, id, hash, now);
            id
        }
        None => {
            // Stage 4.2: Maglev pick.
            let Some(id) = ring_pick(maps, &vip, p.tos, hash) else {
                return (XDP_DROP, DROP_NO_BACKEND);
            };
            r.backend_id = Some(id);
            if !usable(maps, id) {
                return (XDP_DROP, DROP_BACKEND_DOWN);
            }
            record(maps, r, p.key, id, hash, now);
            id
        }
    };
    r.backend_id = Some(id);
    if p.frag == Frag::First {
        let rec = Session {
            backend_id: id,
            hash,
            last_seen_ns: now,
        };
        if maps.frag_insert(frag_key(&p), rec) {
            r.events.push(FRAG_RECORD);
        }
    }
    forward(maps, frame, ctx, &p, &vip, id, hash, r)
}

/// "PMTU messages": the client flow a quoted packet (VIP → client) belongs to, reversed; `None`
/// for a bad quote (too short, not IPv4/IPv6 of the ICMP's family with UDP/TCP/ESP, a later
/// fragment).
fn quoted_flow(f: &[u8], p: &Parsed) -> Option<FlowKey> {
    let q = f.get(p.l4 + 8..p.l4 + p.l4_len)?;
    let (src, dst, proto, l4): ([u32; 4], [u32; 4], u8, usize) = if p.key.family == FAMILY_V4 {
        if q.len() < 20 || q[0] >> 4 != 4 || q[0] & 0x0f < 5 || be16(q, 6) & 0x1fff != 0 {
            return None;
        }
        (
            [wire32(q, 12), 0, 0, 0],
            [wire32(q, 16), 0, 0, 0],
            q[9],
            (q[0] & 0x0f) as usize * 4,
        )
    } else {
        if q.len() < 40 || q[0] >> 4 != 6 {
            return None;
        }
        let w = |i: usize| wire32(q, 8 + 4 * i);
        ([w(0), w(1), w(2), w(3)], [w(4), w(5), w(6), w(7)], q[6], 40)
    };
    if ![PROTO_UDP, PROTO_TCP, PROTO_ESP].contains(&proto) || q.len() < l4 + 4 {
        return None;
    }
    let w = wire32(q, l4);
    // The client's direction: addresses swapped, and the ports (ESP keeps its SPI).
    let ports = if proto == PROTO_ESP {
        w
    } else {
        w.rotate_left(16)
    };
    Some(FlowKey {
        src: dst,
        dst: src,
        ports,
        proto,
        family: p.key.family,
        _pad: [0; 2],
    })
}

/// "PMTU messages": forwarded to the quoted flow's session backend, else its hash pick.
fn pmtu_message(
    maps: &mut MemMaps,
    frame: &[u8],
    ctx: &ModelCtx,
    p: &Parsed,
    r: &mut ModelResult,
) -> (u32, u32) {
    let Some(key) = quoted_flow(frame, p).filter(|k| k.dst == p.key.dst) else {
        return (XDP_PASS, PASS_ICMP_BAD_QUOTE);
    };
    r.flow = Some(key);
    let vkey = vip_key_of(&key);
    let Some(vip) = maps.vips.get(&vkey).copied() else {
        return (XDP_PASS, PASS_NOT_VIP);
    };
    r.vip = Some(vkey);
    let (id, hash) = match maps
        .sessions
        .get(&key)
        .filter(|s| usable(maps, s.backend_id))
    {
        Some(s) => {
            r.events.push(ICMP_PMTU_SESSION);
            (s.backend_id, s.hash)
        }
        None => {
            r.events.push(ICMP_PMTU_HASH);
            let hash = pick_hash(&key, vip.flags);
            r.hash = Some(hash);
            let Some(id) = ring_pick(maps, &vip, p.tos, hash) else {
                return (XDP_DROP, DROP_NO_BACKEND);
            };
            r.backend_id = Some(id);
            if !usable(maps, id) {
                return (XDP_DROP, DROP_BACKEND_DOWN);
            }
            (id, hash)
        }
    };
    r.hash = Some(hash);
    r.backend_id = Some(id);
    forward(maps, frame, ctx, p, &vip, id, hash, r)
}

fn frag_key(p: &Parsed) -> FragKey {
    FragKey {
        src: p.key.src,
        dst: p.key.dst,
        id: p.frag_id,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
    }
}

/// "Fragments": a later fragment goes to its datagram's recorded backend (fresh and usable) or,
/// without one, by the source-address hash on the ring of the address's fragment VIP.
fn later_fragment(
    maps: &mut MemMaps,
    frame: &[u8],
    ctx: &ModelCtx,
    p: &Parsed,
    r: &mut ModelResult,
) -> (u32, u32) {
    let portless = VipKey {
        port_be: 0,
        ..vip_key_of(&p.key)
    };
    let Some(vkey) = maps.frag_vips.get(&portless).copied() else {
        return (XDP_PASS, PASS_NOT_VIP);
    };
    let Some(vip) = maps.vips.get(&vkey).copied() else {
        return (XDP_PASS, PASS_NOT_VIP);
    };
    r.vip = Some(vkey);
    let now = ctx.now_ns;
    let rec = maps.frags.get(&frag_key(p)).copied().filter(|s| {
        now.wrapping_sub(s.last_seen_ns) <= FRAG_TIMEOUT_NS && usable(maps, s.backend_id)
    });
    let (id, hash) = match rec {
        Some(s) => {
            r.events.push(FRAG_HIT);
            (s.backend_id, s.hash)
        }
        None => {
            r.events.push(FRAG_MISS);
            let hash = vpnlb_common::hash::hash_src(&p.key);
            r.hash = Some(hash);
            let Some(id) = ring_pick(maps, &vip, p.tos, hash) else {
                return (XDP_DROP, DROP_NO_BACKEND);
            };
            r.backend_id = Some(id);
            if !usable(maps, id) {
                return (XDP_DROP, DROP_BACKEND_DOWN);
            }
            (id, hash)
        }
    };
    r.hash = Some(hash);
    r.backend_id = Some(id);
    forward(maps, frame, ctx, p, &vip, id, hash, r)
}

/// Stage 4.2: the backend id in slot `hash % ring_size` of the packet's ring (the VIP's, or its
/// DSCP class's); `None` when the VIP has no ring or the slot is empty.
fn ring_pick(maps: &MemMaps, vip: &VipMeta, tos: u8, hash: u32) -> Option<u32> {
    if vip.ring_size == 0 {
        return None;
    }
    // A VIP with traffic classes picks from the ring its DSCP maps to (CLASS_RINGS holds ring
    // id + 1; 0 or absent = the VIP's own ring). The index is u32 arithmetic like the RINGS
    // index: a vip_id ≥ 2^26 wraps onto another VIP's entries, one whose index lands past the
    // array reads as absent.
    let mut ring_id = vip.ring_id;
    if vip.flags & VIP_F_CLASSES != 0 {
        let idx = vip
            .vip_id
            .wrapping_mul(DSCP_VALUES)
            .wrapping_add(u32::from(tos >> 2));
        if let Some(r) = maps.class_rings.get(&idx).copied()
            && r != 0
        {
            ring_id = r - 1;
        }
    }
    let id = maps.ring_lookup(ring_id, hash % vip.ring_size);
    (id != 0).then_some(id)
}

/// Stage 4.3: record the session, guarded against insert floods.
fn record(maps: &mut MemMaps, r: &mut ModelResult, key: FlowKey, id: u32, hash: u32, now: u64) {
    let limit = u64::from(maps.config.flood_max_inserts_per_sec);
    if limit != 0 {
        let fl = &mut maps.flood;
        if now.wrapping_sub(fl.window_start_ns) >= NS_PER_SEC {
            fl.window_start_ns = now;
            fl.inserts = 0;
        }
        if fl.inserts >= limit {
            r.events.push(SESSION_FLOOD_SKIP);
            return;
        }
        fl.inserts += 1;
    }
    let ok = maps.lru_insert(
        key,
        Session {
            backend_id: id,
            hash,
            last_seen_ns: now,
        },
    );
    r.events.push(if ok {
        SESSION_INSERT
    } else {
        SESSION_INSERT_FAILED
    });
    if ok && maps.config.replicate != 0 {
        r.events.push(REPL_EVENT);
    }
}

/// Stage 5: rewrite or encapsulate, then TX or redirect.
#[allow(clippy::too_many_arguments)]
fn forward(
    maps: &MemMaps,
    frame: &[u8],
    ctx: &ModelCtx,
    p: &Parsed,
    vip: &VipMeta,
    id: u32,
    hash: u32,
    r: &mut ModelResult,
) -> (u32, u32) {
    let b = maps.backends[id as usize];
    let l2 = p.l2_len;
    let outcome = match vip.fwd_mode {
        FWD_MODE_IPIP | FWD_MODE_GUE => {
            let gue = vip.fwd_mode == FWD_MODE_GUE;
            if b.family != FAMILY_V4 && b.family != FAMILY_V6 {
                return (XDP_DROP, DROP_BACKEND_BAD);
            }
            let inner = &frame[l2..];
            let inner_len = inner.len();
            let ip_hdr = if b.family == FAMILY_V4 { 20 } else { 40 };
            let overhead = ip_hdr + if gue { 8 } else { 0 };
            let outer_len = inner_len + overhead;
            if vip.mtu != 0 && outer_len > vip.mtu as usize {
                return (XDP_DROP, DROP_ENCAP_TOO_BIG);
            }
            if overhead > maps.env.headroom as usize {
                return (XDP_DROP, DROP_ADJUST_FAILED);
            }
            let inner_proto: u8 = if p.key.family == FAMILY_V4 { 4 } else { 41 };
            let next = if gue { PROTO_UDP } else { inner_proto };
            let mut out = Vec::with_capacity(frame.len() + overhead);
            out.extend_from_slice(&frame[..l2]);
            out[0..6].copy_from_slice(&b.mac);
            out[6..12].copy_from_slice(&b.src_mac);
            let et = if b.family == FAMILY_V4 {
                ETH_P_IPV4
            } else {
                ETH_P_IPV6
            };
            out[l2 - 2..l2].copy_from_slice(&et.to_be_bytes());
            let cfg = &maps.config;
            if b.family == FAMILY_V4 {
                let m = cfg.encap_src_v4_hash_mask;
                let src = (cfg.encap_src_v4 & !m) | (hash & m);
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[1] = p.tos;
                h[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
                h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
                h[8] = 64;
                h[9] = next;
                h[12..16].copy_from_slice(&src.to_ne_bytes());
                h[16..20].copy_from_slice(&b.addr[0].to_ne_bytes());
                let c = ipv4_checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                out.extend_from_slice(&h);
            } else {
                let m = cfg.encap_src_v6_hash_mask;
                let mut src = cfg.encap_src_v6;
                src[3] = (src[3] & !m) | (hash & m);
                let mut h = [0u8; 40];
                let w0 = (6u32 << 28) | (u32::from(p.tos) << 20) | (hash & 0xF_FFFF);
                h[0..4].copy_from_slice(&w0.to_be_bytes());
                h[4..6].copy_from_slice(&((outer_len - 40) as u16).to_be_bytes());
                h[6] = next;
                h[7] = 64;
                for i in 0..4 {
                    h[8 + 4 * i..12 + 4 * i].copy_from_slice(&src[i].to_ne_bytes());
                    h[24 + 4 * i..28 + 4 * i].copy_from_slice(&b.addr[i].to_ne_bytes());
                }
                out.extend_from_slice(&h);
            }
            if gue {
                let mut u = [0u8; 8];
                u[0..2].copy_from_slice(&(0xC000u16 | (hash & 0x3FFF) as u16).to_be_bytes());
                u[2..4].copy_from_slice(&vip.gue_port.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + inner_len) as u16).to_be_bytes());
                out.extend_from_slice(&u);
            }
            out.extend_from_slice(inner);
            r.frame = out;
            if gue { FWD_GUE } else { FWD_IPIP }
        }
        FWD_MODE_L2DSR => {
            r.frame[0..6].copy_from_slice(&b.mac);
            r.frame[6..12].copy_from_slice(&b.src_mac);
            FWD_L2DSR_TX
        }
        // An unknown mode: the backend cannot be reached the way the VIP asks.
        _ => return (XDP_DROP, DROP_BACKEND_BAD),
    };
    // Egress.
    if b.ifindex == 0 || b.ifindex == ctx.ingress_ifindex {
        return (XDP_TX, outcome);
    }
    if !maps.tx_ports.contains(&b.ifindex) {
        return (XDP_DROP, DROP_REDIRECT_FAILED);
    }
    let outcome = if outcome == FWD_L2DSR_TX {
        FWD_L2DSR_REDIRECT
    } else {
        outcome
    };
    (XDP_REDIRECT, outcome)
}

/// Runs `vpnlb_decap` on `frame`: strips an outer IPIP / IPv6-in-IP / GUE header addressed to us.
pub fn run_decap(maps: &mut MemMaps, frame: &[u8]) -> ModelResult {
    let mut r = ModelResult::new(frame);
    let (action, outcome) = decap(maps, frame, &mut r);
    r.action = action;
    r.outcome = outcome;
    count(maps, outcome);
    r
}

fn decap(maps: &MemMaps, f: &[u8], r: &mut ModelResult) -> (u32, u32) {
    let pass = (XDP_PASS, DECAP_PASS);
    let Ok((l2, et)) = parse_eth(f) else {
        return pass;
    };
    let l3 = l2;
    let avail = f.len() - l3;
    let (ip_hdr, proto) = match et {
        ETH_P_IPV4 => {
            if avail < 20 || f[l3] != 0x45 {
                return pass;
            }
            let frag = be16(f, l3 + 6);
            if frag & 0x3fff != 0 {
                return pass;
            }
            (20, f[l3 + 9])
        }
        ETH_P_IPV6 => {
            if avail < 40 || f[l3] >> 4 != 6 {
                return pass;
            }
            (40, f[l3 + 6])
        }
        _ => return pass,
    };
    let (overhead, want, outcome) = match proto {
        4 => (ip_hdr, Some(4u8), DECAP_IPIP),
        41 => (ip_hdr, Some(6u8), DECAP_IPIP),
        17 => {
            let port = maps.config.decap_gue_port;
            if avail < ip_hdr + 8 || port == 0 || be16(f, l3 + ip_hdr + 2) != port {
                return pass;
            }
            (ip_hdr + 8, None, DECAP_GUE)
        }
        _ => return pass,
    };
    let inner = l3 + overhead;
    let Some(first) = f.get(inner) else {
        return (XDP_PASS, DECAP_BAD_INNER);
    };
    let version = first >> 4;
    let ok = match want {
        Some(v) => version == v,
        None => version == 4 || version == 6,
    };
    if !ok {
        return (XDP_PASS, DECAP_BAD_INNER);
    }
    // bpf_xdp_adjust_head(+overhead) refuses to leave less than an Ethernet header.
    if f.len() - overhead < ETH_HLEN {
        return (XDP_DROP, DECAP_ADJUST_FAILED);
    }
    let mut out = Vec::with_capacity(f.len() - overhead);
    out.extend_from_slice(&f[..l2]);
    let et = if version == 4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    out[l2 - 2..l2].copy_from_slice(&et.to_be_bytes());
    out.extend_from_slice(&f[inner..]);
    r.frame = out;
    (XDP_PASS, outcome)
}

#[cfg(test)]
mod tests;
